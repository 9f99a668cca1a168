//! `qcow2 resize` against `qemu-img resize`: raw files (qemu-img prints a three-line warning
//! when it has to probe a raw image for writing; we do not), qcow2 growth (byte-identical)
//! and qcow2 shrinking (same guest data, clean check). Same exit status, same stdout, same
//! messages (with their warning and continuation lines).

mod common;

use common::{have_qemu, qcow2, qemu_img};

/// qemu-img's stderr without the "WARNING: Image format was not specified" block.
fn without_probe_warning(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with("WARNING: ") && !l.starts_with("         "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn raw_resize_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["ours.raw", "qemu.raw"] {
        std::fs::write(dir.path().join(name), vec![3u8; 1 << 20]).expect("write");
    }
    for args in [
        &["X", "2M"][..],
        &["X", "+1M"][..],
        &["X", "-1M"][..],
        &["--shrink", "X", "-1M"][..],
        &["X", "1X"][..],
        &["X", "--shrink", "1000"][..],
        &["-q", "X", "4M"][..],
        &["X", "-100M"][..],
        &["--shrink", "X", "-100M"][..],
        &["X", "9E"][..],
        &["-f", "qcow2", "X", "1M"][..],
        &["X", "+0"][..],
        &["X", "1.5"][..],
        &["--shrink", "X", "0"][..],
        &["missing.raw", "1M"][..],
    ] {
        fn with<'a>(args: &[&'a str], name: &'a str) -> Vec<&'a str> {
            let mut v = vec!["resize", "-f", "raw"];
            v.extend(args.iter().map(|a| if *a == "X" { name } else { *a }));
            v
        }
        let ours = qcow2(dir.path(), &with(args, "ours.raw"));
        let qemu = qemu_img(dir.path(), &with(args, "qemu.raw"));
        assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?} {qemu:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        assert_eq!(
            ours.stderr.replace("ours.raw", "X"),
            without_probe_warning(&qemu.stderr)
                .replace("qemu-img: ", "qcow2: ")
                .replace("qemu.raw", "X"),
            "{args:?}"
        );
        let len = |n: &str| std::fs::metadata(dir.path().join(n)).expect("stat").len();
        assert_eq!(len("ours.raw"), len("qemu.raw"), "{args:?}");
    }
}

/// Growing a qcow2 image: same message and a byte-identical file as qemu-img resize;
/// shrinking without --shrink refuses the same way, with the warning line.
#[test]
fn qcow2_grow_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for size in ["+1G", "3G", "+1M", "-1M", "1000", "+1000"] {
        for name in ["ours.qcow2", "qemu.qcow2"] {
            assert_eq!(
                qemu_img(d, &["create", "-q", "-f", "qcow2", name, "1G"]).code,
                0
            );
            assert_eq!(
                common::qemu_io(d, &["-c", "write -P 5 0 64k", name]).code,
                0
            );
        }
        let ours = qcow2(d, &["resize", "ours.qcow2", size]);
        let qemu = qemu_img(d, &["resize", "qemu.qcow2", size]);
        assert_eq!(ours.code, qemu.code, "{size}: {ours:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{size}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{size}"
        );
        let a = std::fs::read(d.join("ours.qcow2")).expect("read");
        let b = std::fs::read(d.join("qemu.qcow2")).expect("read");
        assert!(a == b, "{size}: files differ");
    }
}

/// Growth whose L1 table needs the refcount table to grow (512-byte clusters, 64-bit
/// refcounts: the first table describes 2 MiB of file): the new L1 table and refcount
/// structures are packed after the used area as qemu-img packs them (same file length up to
/// a cluster, no hole the size of the table), the check is clean and the data stays.
#[test]
fn qcow2_grow_with_refcount_table_growth() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for name in ["ours.qcow2", "qemu.qcow2"] {
        let o = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
        ];
        let mut args = o.to_vec();
        args.extend([name, "64M"]);
        assert_eq!(qemu_img(d, &args).code, 0);
        assert_eq!(common::qemu_io(d, &["-c", "write -P 5 0 1M", name]).code, 0);
    }
    let ours = qcow2(d, &["resize", "ours.qcow2", "8G"]);
    let qemu = qemu_img(d, &["resize", "qemu.qcow2", "8G"]);
    assert_eq!(
        (ours.code, &ours.stdout),
        (qemu.code, &qemu.stdout),
        "{ours:?}"
    );
    let len = |n: &str| std::fs::metadata(d.join(n)).expect("stat").len();
    let (a, b) = (len("ours.qcow2"), len("qemu.qcow2"));
    assert!(
        a.abs_diff(b) <= 512,
        "file lengths {a} (ours) vs {b} (qemu-img)"
    );
    assert_eq!(qemu_img(d, &["check", "ours.qcow2"]).code, 0);
    assert_eq!(
        qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]).code,
        0
    );
}

/// `resize --shrink` of qcow2 images: the same messages as qemu-img ("Image resized.", the
/// 512-byte rule, v2 with snapshots), the same guest data afterwards (qemu-img compare), a
/// clean check, data below the new end kept, and a file no larger than qemu-img's.
#[test]
fn qcow2_shrink_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (&["--shrink", "X", "32M"], "1.1"),
        (&["--shrink", "X", "-1k"], "1.1"),
        (&["--shrink", "X", "1000"], "1.1"),
        (&["--shrink", "X", "41M"], "1.1"),
        (&["-q", "--shrink", "X", "1M"], "1.1"),
        (&["--shrink", "X", "32M"], "0.10"),
        (&["X", "32M"], "1.1"),
    ];
    for (args, compat) in cases {
        for name in ["ours.qcow2", "qemu.qcow2"] {
            let opt = format!("compat={compat}");
            let r = qemu_img(d, &["create", "-q", "-f", "qcow2", "-o", &opt, name, "64M"]);
            assert_eq!(r.code, 0);
            let r = common::qemu_io(
                d,
                &[
                    "-c",
                    "write -P 1 0 1M",
                    "-c",
                    "write -P 2 40M 2M",
                    "-c",
                    "write -c -P 3 60M 64k",
                    name,
                ],
            );
            assert_eq!(r.code, 0);
            if *compat == "0.10" {
                assert_eq!(qemu_img(d, &["snapshot", "-c", "s", name]).code, 0);
            }
        }
        let with = |name: &'static str| {
            let mut v = vec!["resize"];
            v.extend(args.iter().map(|a| if *a == "X" { name } else { *a }));
            v
        };
        let ours = qcow2(d, &with("ours.qcow2"));
        let qemu = qemu_img(d, &with("qemu.qcow2"));
        assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?} {qemu:?}");
        assert_eq!(ours.text(), qemu.text(), "{args:?}");
        let c = qemu_img(d, &["check", "ours.qcow2"]);
        assert_eq!(c.code, 0, "{args:?}: {c:?}");
        let cmp = qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
        assert_eq!(cmp.code, 0, "{args:?}: {cmp:?}");
        let len = |n: &str| std::fs::metadata(d.join(n)).expect("stat").len();
        assert!(
            len("ours.qcow2") <= len("qemu.qcow2"),
            "{args:?}: {} > {}",
            len("ours.qcow2"),
            len("qemu.qcow2")
        );
    }
}

/// Growing an image whose backing file reaches past the old end: the new area reads as
/// zeros (iotests 292 and 271), the map and the checker agree with qemu-img's result of the
/// same steps, and a v2 image is refused as QEMU refuses it (no zero clusters there).
#[test]
fn grow_over_longer_backing_reads_zeros() {
    if !have_qemu() {
        return;
    }
    struct Case {
        name: &'static str,
        create: &'static [&'static str],
        size: &'static str,
        steps: &'static [&'static [&'static str]],
        zero_from: u64,
        zero_to: u64,
    }
    let cases = [
        // 512k overlay over 1M of 0xff, grown to 1M.
        Case {
            name: "aligned",
            create: &[],
            size: "512k",
            steps: &[&["resize", "top.qcow2", "1M"]],
            zero_from: 512 << 10,
            zero_to: 1 << 20,
        },
        // An old end inside a cluster: explicit zeros for the head, zero clusters after.
        Case {
            name: "unaligned",
            create: &[],
            size: "500k",
            steps: &[&["resize", "top.qcow2", "1M"]],
            zero_from: 500 << 10,
            zero_to: 1 << 20,
        },
        Case {
            name: "extended-l2",
            create: &["-o", "extended_l2=on"],
            size: "500k",
            steps: &[&["resize", "top.qcow2", "1M"]],
            zero_from: 500 << 10,
            zero_to: 1 << 20,
        },
        // iotest 292: the cut cluster keeps the overlay's old data beyond the shrunken end.
        Case {
            name: "shrink-then-grow",
            create: &[],
            size: "1M",
            steps: &[
                &["resize", "--shrink", "top.qcow2", "520k"],
                &["resize", "top.qcow2", "567k"],
            ],
            zero_from: 520 << 10,
            zero_to: 567 << 10,
        },
    ];
    for case in cases {
        let pair = common::Pair::new();
        for dir in [pair.ours(), pair.qemu()] {
            let run = |prog: &str, args: &[&str]| {
                let r = match prog {
                    "img" => qemu_img(&dir, args),
                    _ => common::qemu_io(&dir, args),
                };
                assert_eq!(r.code, 0, "{}: {args:?}: {r:?}", case.name);
            };
            run("img", &["create", "-q", "-f", "raw", "base.raw", "1M"]);
            run("io", &["-f", "raw", "-c", "write -P 0xff 0 1M", "base.raw"]);
            let mut args = vec!["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"];
            args.extend_from_slice(case.create);
            args.extend_from_slice(&["top.qcow2", case.size]);
            run("img", &args);
            let fill = format!("write -P 0x22 0 {}", case.size);
            run("io", &["-c", &fill, "top.qcow2"]);
        }
        for step in case.steps {
            let (ours, qemu) = pair.both(step);
            assert_eq!(
                ours.code, qemu.code,
                "{}: {step:?}: {ours:?} {qemu:?}",
                case.name
            );
            assert_eq!(ours.stdout, qemu.stdout, "{}: {step:?}", case.name);
        }
        let read = format!(
            "read -P 0 {} {}",
            case.zero_from,
            case.zero_to - case.zero_from
        );
        let r = common::qemu_io(&pair.ours(), &["-c", &read, "top.qcow2"]);
        assert!(
            r.code == 0 && !r.stdout.contains("Pattern verification failed"),
            "{}: the grown area does not read as zeros: {r:?}",
            case.name
        );
        let check = qemu_img(&pair.ours(), &["check", "top.qcow2"]);
        assert_eq!(check.code, 0, "{}: {check:?}", case.name);
        let map =
            |dir: &std::path::Path| qemu_img(dir, &["map", "--output=json", "top.qcow2"]).stdout;
        // Host offsets may differ (our allocator packs differently); the extents may not.
        let strip = |s: String| {
            s.lines()
                .map(|l| l.split(", \"offset\"").next().unwrap_or(l).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(map(&pair.ours())),
            strip(map(&pair.qemu())),
            "{}: qemu-img map differs",
            case.name
        );
    }

    // A v2 image cannot hold zero clusters: QEMU refuses the grow and keeps the size.
    let pair = common::Pair::new();
    for dir in [pair.ours(), pair.qemu()] {
        assert_eq!(
            qemu_img(&dir, &["create", "-q", "-f", "raw", "base.raw", "1M"]).code,
            0
        );
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "512k",
        ];
        assert_eq!(qemu_img(&dir, &args).code, 0);
    }
    let (ours, qemu) = pair.both(&["resize", "top.qcow2", "1M"]);
    assert_eq!(ours.code, qemu.code, "{ours:?} {qemu:?}");
    assert_eq!(ours.text(), qemu.text());
    let info = qemu_img(&pair.ours(), &["info", "--output=json", "top.qcow2"]);
    assert!(info.stdout.contains("\"virtual-size\": 524288"), "{info:?}");
}
