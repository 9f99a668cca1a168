//! `qcow2 io` against `qemu-io` on raw files: the same command list must print the same text
//! (timing figures masked: "N ops; <time> (<rate>/sec and <ops>/sec)" differ by definition),
//! exit the same way and leave byte-identical files. qcow2 images wait on qcow2-image.

mod common;

use common::{have_qemu, qcow2, qemu_io};

const COMMANDS: &[&str] = &[
    "write -P 1 64k 64k",
    "alloc 0 1M",
    "map",
    "info",
    "length",
    "truncate 2M",
    "length",
    "discard 64k 4k",
    "read -P 1 64k 4k",
    "read -v 65530 20",
    "write -z -u 0 4k",
    "write -c 0 64k",
    "read 0",
    "read foo 512",
    "read 0 1X",
    "read 0 99E",
    "read 64M 512",
    "frob",
    "read -P 0xzz 0 512",
    "write -P 300 0 512",
    "read -q 0 512",
    "alloc 0 0",
    "read -P 0 0 -1",
    "write -z -P 1 0 512",
    "write -u 0 512",
    "alloc 1k",
    "write -c 1k 100",
    "flush",
    "read -P 0 1M 512",
    "write -P 0x41 0 16",
    "read -v 0 16",
    "write -z 1000 3000",
    "read -P 0 1000 3000",
    "discard 100000 10",
    "alloc 1M 2M",
    "write -P 0xab 1.5k 0x200",
    "read -P 171 1536 512",
];

fn mask(s: &str) -> String {
    s.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; <time>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn raw_io_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["ours.raw", "qemu.raw"] {
        std::fs::write(dir.path().join(name), vec![0u8; 1 << 20]).expect("write");
    }
    let mut args = vec!["-f", "raw"];
    for c in COMMANDS {
        args.push("-c");
        args.push(c);
    }
    let mut ours_args = vec!["io"];
    ours_args.extend(&args);
    ours_args.push("ours.raw");
    args.push("qemu.raw");
    let ours = qcow2(dir.path(), &ours_args);
    let qemu = qemu_io(dir.path(), &args);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(mask(&ours.stdout), mask(&qemu.stdout));
    assert_eq!(ours.stderr, qemu.stderr);
    let a = std::fs::read(dir.path().join("ours.raw")).expect("read");
    let b = std::fs::read(dir.path().join("qemu.raw")).expect("read");
    assert!(a == b, "files differ");
}

#[test]
fn read_only_and_missing_files() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 4096]).expect("write");
    for args in [
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "write 0 512",
            "-c",
            "read -P 0 0 512",
            "d.raw",
        ][..],
        &["-c", "read 0 512", "missing.raw"][..],
        &["-f", "raw", "-c", "read 0 512", "missing.raw"][..],
    ] {
        let mut ours_args = vec!["io"];
        ours_args.extend_from_slice(args);
        let ours = qcow2(dir.path(), &ours_args);
        let qemu = qemu_io(dir.path(), args);
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(mask(&ours.stdout), mask(&qemu.stdout), "{args:?}");
        assert_eq!(
            ours.stderr.replace("qcow2: ", ""),
            qemu.stderr.replace("qemu-io: ", ""),
            "{args:?}"
        );
    }
}

/// `qcow2 bench` against `qemu-img bench` on raw files: same lines (the run time masked),
/// same exit status, same file contents after write runs.
#[test]
fn raw_bench_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for opts in [
        &["-c", "10", "-s", "4k"][..],
        &[
            "-w",
            "-c",
            "10",
            "-d",
            "2",
            "-o",
            "4k",
            "-S",
            "8k",
            "--pattern=0x5a",
            "--flush-interval=3",
        ][..],
        &["-w", "-c", "300", "-s", "1000", "--pattern=7", "-o", "100"][..],
        &["-w", "-c", "10", "--flush-interval=3", "--no-drain"][..],
        &["-c", "0"][..],
        &["-c", "abc"][..],
        &["-d", "0"][..],
        &["-s", "3M"][..],
        &["-o", "2M", "-c", "1"][..],
        &["--pattern=300", "-w"][..],
        &["--flush-interval=2"][..],
        &["-o", "-1"][..],
    ] {
        for name in ["ours.raw", "qemu.raw"] {
            std::fs::write(dir.path().join(name), vec![0u8; 1 << 20]).expect("write");
        }
        let mut a = vec!["bench", "-f", "raw"];
        a.extend_from_slice(opts);
        let mut b = a.clone();
        a.push("ours.raw");
        b.push("qemu.raw");
        let ours = qcow2(dir.path(), &a);
        let qemu = common::qemu_img(dir.path(), &b);
        let time = |s: &str| {
            s.lines()
                .map(|l| {
                    if l.starts_with("Run completed in ") {
                        "Run completed in T seconds."
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(ours.code, qemu.code, "{opts:?}: {ours:?} {qemu:?}");
        assert_eq!(time(&ours.stdout), time(&qemu.stdout), "{opts:?}");
        assert_eq!(
            ours.stderr.replace("qcow2: ", ""),
            qemu.stderr.replace("qemu-img: ", ""),
            "{opts:?}"
        );
        let x = std::fs::read(dir.path().join("ours.raw")).expect("read");
        let y = std::fs::read(dir.path().join("qemu.raw")).expect("read");
        assert!(x == y, "{opts:?}: files differ");
    }
}

/// The same command list on a qcow2 image: same output as qemu-io, the same guest data
/// afterwards (qemu-img compare) and a clean check. The files are not compared byte for
/// byte: qemu compresses the clusters of one `write -c` in parallel tasks, so the order of
/// their compressed bytes in the file varies from run to run.
#[test]
fn qcow2_io_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for name in ["ours.qcow2", "qemu.qcow2"] {
        let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", name, "16M"]);
        assert_eq!(r.code, 0);
    }
    let cmds = [
        "write -P 1 64k 64k",
        "alloc 0 1M",
        "map",
        "info",
        "length",
        "discard 64k 4k",
        "read -P 1 64k 4k",
        "read -v 65530 20",
        "write -z -u 0 4k",
        "write -c 0 64k",
        "write -c 1M 128k",
        "read -P 0xcd 1M 128k",
        "read 64M 512",
        "write -P 0x41 0 16",
        "read -v 0 16",
        "write -z 1000 3000",
        "read -P 0 1000 3000",
        "alloc 1M 2M",
        "write -z 2M 1M",
        "map",
        "alloc 0 4M",
        "truncate 32M",
        "length",
        "flush",
    ];
    let mut args = vec![];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let mut ours_args = vec!["io"];
    ours_args.extend(&args);
    ours_args.push("ours.qcow2");
    args.push("qemu.qcow2");
    let ours = qcow2(d, &ours_args);
    let qemu = qemu_io(d, &args);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(mask(&ours.stdout), mask(&qemu.stdout));
    assert_eq!(ours.stderr, qemu.stderr);
    let cmp = common::qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
    assert_eq!(cmp.code, 0, "{cmp:?}");
    assert_eq!(common::qemu_img(d, &["check", "ours.qcow2"]).code, 0);
}

/// `qcow2 bench` on a qcow2 image: qemu-img's lines, and after a write run the guest data
/// equals qemu-img's (qemu-img compare) and the image checks clean — through the page
/// cache and bypassing it (`-t none`), with one and with many requests in flight, unaligned
/// (buffered path) and aligned (direct path), with flushes between.
#[test]
fn qcow2_bench_writes_what_qemu_img_bench_writes() {
    if !have_qemu() {
        return;
    }
    let cases = [
        ("writeback", "4", "1000", "12k"),
        ("none", "1", "0", "68k"),
        ("none", "16", "0", "68k"),
        ("none", "32", "512", "4k"),
        ("directsync", "8", "0", "20k"),
        ("writethrough", "8", "0", "20k"),
        ("unsafe", "8", "0", "20k"),
    ];
    for (cache, depth, offset, step) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for name in ["ours.qcow2", "qemu.qcow2"] {
            let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", name, "8M"]);
            assert_eq!(r.code, 0);
        }
        let opts = [
            "bench",
            "-w",
            "-t",
            cache,
            "-c",
            "500",
            "-s",
            "4k",
            "-S",
            step,
            "-o",
            offset,
            "--pattern=0x33",
            "-d",
            depth,
            "--flush-interval=50",
        ];
        let mut a = opts.to_vec();
        a.push("ours.qcow2");
        let mut b = opts.to_vec();
        b.push("qemu.qcow2");
        let ours = qcow2(d, &a);
        let qemu = common::qemu_img(d, &b);
        let what = format!("-t {cache} -d {depth} -o {offset} -S {step}");
        assert_eq!(ours.code, 0, "{what}: {ours:?}");
        assert_eq!(qemu.code, 0, "{what}: {qemu:?}");
        let first = |s: &str| s.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(first(&ours.stdout), first(&qemu.stdout), "{what}");
        assert!(ours
            .stdout
            .lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("Run completed in ")));
        let cmp = common::qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
        assert_eq!(cmp.code, 0, "{what}: {cmp:?}");
        let check = common::qemu_img(d, &["check", "ours.qcow2"]);
        assert_eq!(check.code, 0, "{what}: {check:?}");
        // Reads of what was written, in parallel and direct, succeed.
        let r = qcow2(
            d,
            &["bench", "-t", cache, "-d", depth, "-c", "500", "ours.qcow2"],
        );
        assert_eq!(r.code, 0, "{what}: {r:?}");
    }
}

/// A cache mode qemu-img does not know is refused with its message.
#[test]
fn bench_rejects_unknown_cache_mode() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    assert_eq!(r.code, 0);
    let ours = qcow2(d, &["bench", "-t", "bogus", "a.qcow2"]);
    let qemu = common::qemu_img(d, &["bench", "-t", "bogus", "a.qcow2"]);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(ours.stdout, qemu.stdout);
    assert_eq!(
        ours.stderr.replace("qcow2:", ""),
        qemu.stderr.replace("qemu-img:", "")
    );
}
