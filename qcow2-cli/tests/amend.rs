//! `qcow2 amend` against `qemu-img amend`: the same option lists on twin images (data, a
//! zero cluster and a snapshot) give the same exit status and the same messages (with hint
//! lines), and the changed images check clean and hold the same guest data; refcount widths
//! 16 -> 1 -> 64 (iotest 112) stay clean; `-p` prints QEMU's progress lines.

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io, Pair};

fn twin_images(p: &Pair) {
    for dir in [p.ours(), p.qemu()] {
        let _ = std::fs::remove_file(dir.join("t.qcow2"));
        assert_eq!(
            qemu_img(&dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]).code,
            0
        );
        let r = qemu_io(
            &dir,
            &["-c", "write -P 7 0 64k", "-c", "write -z 1M 64k", "t.qcow2"],
        );
        assert_eq!(r.code, 0);
        assert_eq!(qemu_img(&dir, &["snapshot", "-c", "s", "t.qcow2"]).code, 0);
    }
}

#[test]
fn amend_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let cases: &[&[&str]] = &[
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=2"],
        &["-o", "refcount_bits=0x40"],
        &["-o", "compat=0.42"],
        &["-o", "foo=bar"],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=4k,foo=bar"],
        &["-o", "lazy_refcounts=maybe"],
        &["-o", "lazy_refcounts"],
        &["-o", "nolazy_refcounts"],
        &["-o", "size=128M"],
        &["-o", "size=1x"],
        &["-o", "refcount_bits=3"],
        &["-o", "refcount_bits=abc"],
        &["-o", "compat=0.10,lazy_refcounts=on"],
        &["-o", "compat=0.10,refcount_bits=64"],
        &["-o", "compat=0.10"],
        &["-o", "compat=0.10,size=32M"],
        &["-o", "compat=v3,compat=0.10"],
        &["-o", "backing_file=x"],
        &["-o", "data_file=x"],
        &["-o", "data_file_raw=on"],
        &["-o", ""],
        &["-o", "a=b", "-o", "compat=0.10"],
        &[
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            "-o",
            "lazy_refcounts=on",
        ],
        &["-o", "help"],
        &["-f", "raw", "-o", "size=1M"],
    ];
    for case in cases {
        twin_images(&p);
        let mut args = vec!["amend"];
        args.extend_from_slice(case);
        args.push("t.qcow2");
        let (ours, qemu) = p.both(&args);
        assert_eq!(ours.code, qemu.code, "{case:?}: {ours:?} {qemu:?}");
        assert_eq!(ours.text(), qemu.text(), "{case:?}");
        let (a, b) = (
            qemu_img(&p.ours(), &["check", "t.qcow2"]),
            qemu_img(&p.qemu(), &["check", "t.qcow2"]),
        );
        assert_eq!(a.code, 0, "{case:?}: {a:?}");
        assert_eq!(a.stdout, b.stdout, "{case:?}");
        // Same header fields and guest data as qemu-img's result.
        let (a, b) = (
            qcow2(&p.ours(), &["info", "t.qcow2"]),
            qemu_img(&p.qemu(), &["info", "t.qcow2"]),
        );
        let fields = |s: &str| {
            s.lines()
                .filter(|l| {
                    l.starts_with("virtual size")
                        || l.starts_with("    compat")
                        || l.starts_with("    lazy")
                        || l.starts_with("    refcount bits")
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&a.stdout), fields(&b.stdout), "{case:?}");
        let root = p.root.path();
        let cmp = qemu_img(root, &["compare", "ours/t.qcow2", "qemu/t.qcow2"]);
        assert_eq!(cmp.code, 0, "{case:?}: {cmp:?}");
    }
    // No -o at all: same message (our usage pointer differs from qemu-img's second line).
    let (ours, qemu) = p.both(&["amend", "t.qcow2"]);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(
        ours.stderr,
        "qcow2: Must specify options (-o) (see 'qcow2 amend --help')\n"
    );
    assert!(qemu
        .stderr
        .starts_with("qemu-img: Must specify options (-o)\n"));
}

/// iotest 112's width changes on an image with data: 16 -> 1 -> 64 -> 16, clean after each,
/// the data unchanged; `-p` prints "    (N.NN/100%)\r" steps from 0.00 to 100.00 and a
/// newline.
#[test]
fn refcount_width_16_1_64_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    assert_eq!(
        qemu_img(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]).code,
        0
    );
    let w = qemu_io(
        d,
        &[
            "-c",
            "write -P 9 0 1M",
            "-c",
            "write -c -P 3 8M 64k",
            "t.qcow2",
        ],
    );
    assert_eq!(w.code, 0);
    for bits in ["1", "64", "16"] {
        let opt = format!("refcount_bits={bits}");
        let r = qcow2(d, &["amend", "-p", "-o", &opt, "t.qcow2"]);
        assert_eq!(r.code, 0, "{bits}: {r:?}");
        assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{r:?}");
        assert!(r.stdout.ends_with("    (100.00/100%)\r\n"), "{r:?}");
        assert!(r
            .stdout
            .trim_end_matches('\n')
            .split('\r')
            .filter(|s| !s.is_empty())
            .all(|s| s.starts_with("    (") && s.ends_with("/100%)")));
        let c = qemu_img(d, &["check", "t.qcow2"]);
        assert_eq!(c.code, 0, "{bits}: {c:?}");
        let info = qemu_img(d, &["info", "t.qcow2"]);
        assert!(info.stdout.contains(&format!("refcount bits: {bits}\n")));
        let r = qemu_io(
            d,
            &["-c", "read -P 9 0 1M", "-c", "read -P 3 8M 64k", "t.qcow2"],
        );
        assert!(
            r.code == 0 && !r.stdout.contains("verification failed"),
            "{r:?}"
        );
    }
    // -q silences the progress.
    let r = qcow2(
        d,
        &["amend", "-p", "-q", "-o", "refcount_bits=4", "t.qcow2"],
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
}
