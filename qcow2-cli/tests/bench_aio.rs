//! `qcow2 bench -i io_uring|native|threads`: the AIO engines write what qemu-img bench
//! writes with the same engine (qemu-img compare), the image checks clean, reads of it
//! succeed, and the option errors are qemu-img's.

mod common;

use common::{have_qemu, qcow2};

#[test]
fn every_aio_engine_writes_what_qemu_img_writes() {
    if !have_qemu() {
        return;
    }
    // (aio, cache, depth, offset, step, flush interval)
    let cases = [
        ("io_uring", "none", "64", "0", "68k", "0"),
        ("io_uring", "none", "32", "512", "4k", "64"),
        ("io_uring", "writeback", "8", "1000", "12k", "0"),
        ("io_uring", "none", "1", "0", "64k", "0"),
        ("native", "none", "16", "0", "20k", "32"),
        ("threads", "none", "16", "0", "20k", "0"),
    ];
    for (aio, cache, depth, offset, step, flush) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for name in ["ours.qcow2", "qemu.qcow2"] {
            let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", name, "8M"]);
            assert_eq!(r.code, 0);
        }
        let flush_opt = format!("--flush-interval={flush}");
        let mut opts = vec![
            "bench",
            "-w",
            "-i",
            aio,
            "-t",
            cache,
            "-c",
            "700",
            "-s",
            "4k",
            "-S",
            step,
            "-o",
            offset,
            "--pattern=0x5c",
            "-d",
            depth,
        ];
        if flush != "0" {
            opts.push(&flush_opt);
        }
        let what = format!("-i {aio} -t {cache} -d {depth} -o {offset} -S {step} {flush_opt}");
        let ours = qcow2(d, &[opts.as_slice(), &["ours.qcow2"]].concat());
        let qemu = common::qemu_img(d, &[opts.as_slice(), &["qemu.qcow2"]].concat());
        if ours.stderr.contains("Unable to use io_uring") {
            // No io_uring on this kernel: QEMU's message, and QEMU cannot either.
            assert_ne!(qemu.code, 0, "{what}: {qemu:?}");
            return;
        }
        assert_eq!(ours.code, 0, "{what}: {ours:?}");
        assert_eq!(qemu.code, 0, "{what}: {qemu:?}");
        let first = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("Run completed in "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(first(&ours.stdout), first(&qemu.stdout), "{what}");
        assert!(
            ours.stdout
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("Run completed in ")),
            "{what}: {ours:?}"
        );
        let cmp = common::qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
        assert_eq!(cmp.code, 0, "{what}: {cmp:?}");
        let check = common::qemu_img(d, &["check", "ours.qcow2"]);
        assert_eq!(check.code, 0, "{what}: {check:?}");
        let r = qcow2(
            d,
            &[
                "bench",
                "-i",
                aio,
                "-t",
                cache,
                "-d",
                depth,
                "-c",
                "700",
                "-S",
                step,
                "ours.qcow2",
            ],
        );
        assert_eq!(r.code, 0, "{what}: {r:?}");
    }
}

#[test]
fn aio_option_errors_are_qemu_img_s() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    assert_eq!(r.code, 0);
    for args in [
        &["bench", "-c", "1", "-i", "bogus", "a.qcow2"][..],
        &["bench", "-c", "1", "-i", "native", "a.qcow2"][..],
        &["bench", "-c", "1", "-n", "a.qcow2"][..],
        &["bench", "-c", "1", "-n", "-t", "writeback", "a.qcow2"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = common::qemu_img(d, args);
        assert_ne!(qemu.code, 0, "{args:?}");
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        assert_eq!(
            ours.stderr.replace("qcow2:", ""),
            qemu.stderr.replace("qemu-img:", ""),
            "{args:?}"
        );
    }
}
