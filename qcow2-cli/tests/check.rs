//! `qcow2 check` against `qemu-img check`: clean, leaking, corrupted and dirty images, with
//! and without `-r leaks|all`, human and JSON output, `-q`. stdout, stderr (program prefix
//! aside), exit status and the repaired file must all be identical; nothing differs by
//! definition.

mod common;

use std::path::Path;

use common::{have_qemu, qcow2, qemu_img, qemu_io};

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut data = std::fs::read(path).expect("read");
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
    std::fs::write(path, data).expect("write");
}

fn make(dir: &Path) -> Vec<&'static str> {
    let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "clean.qcow2", "1G"],
    ));
    ok(qemu_io(
        dir,
        &[
            "-c",
            "write -P 1 0 200k",
            "-c",
            "write -c 1M 64k",
            "clean.qcow2",
        ],
    ));
    // A leak: cluster 20 gets refcount 1 and the file covers it.
    std::fs::copy(dir.join("clean.qcow2"), dir.join("leak.qcow2")).expect("copy");
    poke(&dir.join("leak.qcow2"), 0x20000 + 20 * 2, &[0, 1]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("leak.qcow2"))
        .expect("open");
    f.set_len(21 * 65536).expect("extend");
    // A corruption: the header cluster's refcount is 0.
    std::fs::copy(dir.join("clean.qcow2"), dir.join("corrupt.qcow2")).expect("copy");
    poke(&dir.join("corrupt.qcow2"), 0x20000, &[0, 0]);
    // Dirty lazy-refcounts image (iotest 039).
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "64M",
        ],
    ));
    let _ = qemu_io(
        dir,
        &["-c", "write 0 512", "-c", "sigraise 9", "dirty.qcow2"],
    );
    // Small clusters, 1-bit refcounts, v2.
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "small.qcow2",
            "8M",
        ],
    ));
    ok(qemu_io(dir, &["-c", "write -P 7 10k 100k", "small.qcow2"]));
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "64M",
        ],
    ));
    ok(qemu_img(dir, &["snapshot", "-c", "s", "v2.qcow2"]));
    vec!["clean", "leak", "corrupt", "dirty", "small", "v2"]
}

#[test]
fn check_equals_qemu_img_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for name in make(d) {
        for opts in [
            &[][..],
            &["--output=json"][..],
            &["-r", "leaks"][..],
            &["-r", "all"][..],
            &["-q"][..],
            &["-r", "all", "--output", "json"][..],
        ] {
            let src = d.join(format!("{name}.qcow2"));
            std::fs::copy(&src, d.join("img")).expect("copy");
            let mut args = vec!["check"];
            args.extend_from_slice(opts);
            args.push("img");
            let ours = qcow2(d, &args);
            let ours_file = std::fs::read(d.join("img")).expect("read");
            std::fs::copy(&src, d.join("img")).expect("copy");
            let qemu = qemu_img(d, &args);
            let qemu_file = std::fs::read(d.join("img")).expect("read");
            assert_eq!(ours.code, qemu.code, "{name} {opts:?}: {ours:?} {qemu:?}");
            assert_eq!(ours.stdout, qemu.stdout, "{name} {opts:?}");
            assert_eq!(
                ours.stderr,
                qemu.stderr.replace("qemu-img: ", "qcow2: "),
                "{name} {opts:?}"
            );
            assert!(
                ours_file == qemu_file,
                "{name} {opts:?}: repaired files differ"
            );
            if opts.contains(&"--output=json") {
                let a: serde_json::Value = serde_json::from_str(&ours.stdout).expect("JSON");
                let b: serde_json::Value = serde_json::from_str(&qemu.stdout).expect("JSON");
                assert_eq!(a, b);
            }
        }
    }
}

#[test]
fn check_errors_and_exit_codes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make(d);
    std::fs::write(d.join("disk.raw"), vec![0u8; 4096]).expect("write");
    for args in [
        &["check", "-f", "raw", "clean.qcow2"][..],
        &["check", "disk.raw"][..],
        &["check", "missing.qcow2"][..],
        &["check", "-f", "qcow2", "disk.raw"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = qemu_img(d, args);
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(ours.text(), qemu.text(), "{args:?}");
    }
    assert_eq!(qcow2(d, &["check", "-f", "raw", "clean.qcow2"]).code, 63);
}
