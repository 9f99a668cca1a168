//! `qcow2 dd` against `qemu-img dd`: the same operands on the same inputs give the same
//! messages, exit codes and byte-identical outputs (raw and qcow2, which `qemu-img check`
//! finds clean).

mod common;

use common::{have_qemu, ok, qcow2, qemu_img, qemu_io};

#[test]
fn dd_equals_qemu_img_dd() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
    std::fs::write(d.join("in.raw"), &data).expect("write");
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.qcow2",
            "8M",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 0 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -c -P 3 2M 64k",
            "base.qcow2",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 7 3M 1M", "top.qcow2"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "ext.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 4k 4k", "ext.qcow2"]));
    let cases: &[&[&str]] = &[
        &["if=in.raw", "of=OUT", "bs=4k", "count=10", "skip=2"],
        &["-O", "qcow2", "if=in.raw", "of=OUT", "bs=1000", "skip=3"],
        &["-O", "qcow2", "if=base.qcow2", "of=OUT", "bs=64k"],
        &["if=top.qcow2", "of=OUT", "bs=1M", "count=6"],
        &["-O", "qcow2", "if=top.qcow2", "of=OUT", "bs=1M", "count=6"],
        &[
            "-O",
            "qcow2",
            "if=ext.qcow2",
            "of=OUT",
            "bs=3000",
            "count=1000",
            "skip=7",
        ],
        &["if=in.raw", "of=OUT", "skip=1000"],
        &["-O", "qcow2", "-f", "raw", "if=base.qcow2", "of=OUT"],
        &["if=in.raw", "of=OUT", "count=0"],
        &["-O", "qcow2", "if=in.raw", "of=OUT", "count=0x10"],
        &["-U", "of=OUT", "if=in.raw", "count=010", "bs=1.5k"],
        &[
            "-O",
            "raw",
            "-f",
            "qcow2",
            "if=top.qcow2",
            "of=OUT",
            "bs=2147483647",
        ],
        // Output sizes that are not whole sectors (raw files are created in sectors).
        &["if=in.raw", "of=OUT", "bs=1788", "count=304"],
        &["if=top.qcow2", "of=OUT", "bs=249", "skip=56"],
        &["-O", "qcow2", "if=in.raw", "of=OUT", "bs=107", "count=2591"],
    ];
    for (i, case) in cases.iter().enumerate() {
        let name = |who: &str| format!("{who}{i}");
        let with = |out: &str| -> Vec<String> {
            let mut v = vec!["dd".to_string()];
            v.extend(case.iter().map(|a| a.replace("OUT", out)));
            v
        };
        let (a, b) = (with(&name("ours")), with(&name("qemu")));
        let ours = qcow2(d, &a.iter().map(String::as_str).collect::<Vec<_>>());
        let qemu = qemu_img(d, &b.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(ours.code, qemu.code, "{case:?}: {ours:?} vs {qemu:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{case:?}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{case:?}"
        );
        let ours_bytes = std::fs::read(d.join(name("ours"))).expect("our output");
        let qemu_bytes = std::fs::read(d.join(name("qemu"))).expect("qemu output");
        assert!(ours_bytes == qemu_bytes, "{case:?}: outputs differ");
        if case.windows(2).any(|w| w == ["-O", "qcow2"]) {
            ok(qemu_img(d, &["check", &name("ours")]));
        }
    }
}

#[test]
fn dd_errors_equal_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("in.raw"), vec![5u8; 10_000]).expect("write");
    for case in [
        &["if=in.raw"][..],
        &["if=in.raw", "of=x", "osize=5"][..],
        &["if=in.raw", "of=x", "bs=0"][..],
        &["if=in.raw", "of=x", "bs=3G"][..],
        &["if=in.raw", "of=x", "bs=1x"][..],
        &["if=in.raw", "of=x", "count=-1"][..],
        &["if=in.raw", "of=x", "count=1k"][..],
        &["if=in.raw", "of=x", "count="][..],
        &["if=in.raw", "of=x", "count=99999999999999999999"][..],
        &["if=in.raw", "of=x", "skip=-1"][..],
        &["if=in.raw", "of=x", "skip=1.5"][..],
        &["if=in.raw", "of=x", "foo"][..],
        &["if=missing", "of=x"][..],
        &["if=in.raw", "of=x", "-O", "foo"][..],
        &["if=in.raw", "of=/nonexistent/x"][..],
        &["-O", "qcow2", "if=in.raw", "of=/nonexistent/x"][..],
        &["-f", "foo", "if=in.raw", "of=x"][..],
    ] {
        let mut full = vec!["dd"];
        full.extend_from_slice(case);
        let ours = qcow2(d, &full);
        let qemu = qemu_img(d, &full);
        assert_eq!(ours.code, qemu.code, "{case:?}: {ours:?} vs {qemu:?}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{case:?}"
        );
    }
}
