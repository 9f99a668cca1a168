//! `qcow2 info` and `qcow2 snapshot -l` against qemu-img on images qemu-img and qemu-io
//! made (fresh, v2, backing files, snapshots, a dirty lazy-refcounts image, LUKS and AES
//! encrypted images, raw files).
//!
//! Human text and JSON text are compared byte for byte, and the JSON also as
//! `serde_json::Value`s. No field is exempt: "actual-size" and "disk size" come from the
//! file's allocated blocks, which are the same because the tests look at the very same
//! file. Snapshot dates: qemu-img prints local time, we print UTC; the helper runs qemu-img
//! with `TZ=UTC` (the difference by definition is the time zone).

mod common;

use std::path::Path;

use common::{have_qemu, qcow2, qemu_img, qemu_io};

fn make_images(dir: &Path) -> Vec<&'static str> {
    let img = |args: &[&str]| {
        let r = qemu_img(dir, args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
    };
    img(&["create", "-q", "-f", "qcow2", "fresh.qcow2", "1G"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1G",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k,refcount_bits=1,lazy_refcounts=on,compression_type=zstd,extended_l2=on",
        "ext.qcow2",
        "512M",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "fresh.qcow2",
        "-F",
        "qcow2",
        "overlay.qcow2",
    ]);
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../fresh.qcow2",
        "-F",
        "qcow2",
        "sub/deep.qcow2",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "snaps.qcow2",
        "64M",
    ]);
    let w = qemu_io(dir, &["-c", "write -P 0x11 0 128k", "snaps.qcow2"]);
    assert_eq!(w.code, 0, "{w:?}");
    img(&["snapshot", "-c", "first", "snaps.qcow2"]);
    img(&[
        "snapshot",
        "-c",
        "a much longer snapshot name",
        "snaps.qcow2",
    ]);
    img(&["snapshot", "-c", "", "snaps.qcow2"]);
    // A dirty image: lazy refcounts and a write killed before the clean close.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "64M",
    ]);
    let _ = qemu_io(
        dir,
        &["-c", "write 0 512", "-c", "sigraise 9", "dirty.qcow2"],
    );
    // Encrypted images: LUKS with QEMU's default and a CBC/ESSIV set, legacy AES (v2, v3).
    for (name, opts) in [
        ("luks.qcow2", "encrypt.format=luks,encrypt.iter-time=10"),
        (
            "luks-essiv.qcow2",
            "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,\
             encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,\
             encrypt.hash-alg=sha512,cluster_size=4k",
        ),
        ("aes.qcow2", "encrypt.format=aes"),
        ("aes-v2.qcow2", "encrypt.format=aes,compat=0.10"),
    ] {
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            &format!("{opts},encrypt.key-secret=sec0"),
            name,
            "16M",
        ]);
    }
    std::fs::write(dir.join("disk.raw"), vec![1u8; 5000]).expect("write");
    std::fs::write(dir.join("empty.raw"), b"").expect("write");
    vec![
        "fresh.qcow2",
        "v2.qcow2",
        "ext.qcow2",
        "overlay.qcow2",
        "sub/deep.qcow2",
        "snaps.qcow2",
        "dirty.qcow2",
        "luks.qcow2",
        "luks-essiv.qcow2",
        "aes.qcow2",
        "aes-v2.qcow2",
        "disk.raw",
        "empty.raw",
    ]
}

#[test]
fn info_equals_qemu_img_info() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let abs_overlay = dir.path().join("overlay.qcow2");
    let abs_overlay = abs_overlay.to_str().expect("utf-8 path");
    let mut files = make_images(dir.path());
    files.push(abs_overlay);
    for f in files {
        for extra in [&[][..], &["--output=json"][..], &["--output", "human"][..]] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(f);
            let ours = qcow2(dir.path(), &args);
            let qemu = qemu_img(dir.path(), &args);
            assert_eq!(ours, qemu, "{args:?}");
            if extra.first() == Some(&"--output=json") {
                let a: serde_json::Value = serde_json::from_str(&ours.stdout).expect("our JSON");
                let b: serde_json::Value = serde_json::from_str(&qemu.stdout).expect("qemu JSON");
                assert_eq!(a, b, "{args:?}");
            }
        }
        let forced = ["info", "-f", "raw", f];
        assert_eq!(
            qcow2(dir.path(), &forced),
            qemu_img(dir.path(), &forced),
            "{forced:?}"
        );
    }
}

#[test]
fn snapshot_list_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    make_images(dir.path());
    for args in [
        &["snapshot", "-l", "snaps.qcow2"][..],
        &["snapshot", "snaps.qcow2"][..],
        &["snapshot", "--list", "fresh.qcow2"][..],
        &["snapshot", "-l", "disk.raw"][..],
        &["snapshot", "-l", "missing.qcow2"][..],
    ] {
        let ours = qcow2(dir.path(), args);
        let qemu = qemu_img(dir.path(), args);
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(ours.text(), qemu.text(), "{args:?}");
    }
    let l = qcow2(dir.path(), &["snapshot", "-l", "snaps.qcow2"]);
    let lines: Vec<&str> = l.stdout.lines().collect();
    assert_eq!(lines[0], "Snapshot list:");
    assert_eq!(
        lines[1],
        "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
    );
    assert!(
        lines[2].starts_with("1       first                 0 B "),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].ends_with(" 0000:00:00.000          0"),
        "{}",
        lines[2]
    );
    assert_eq!(lines.len(), 5);
}

#[test]
fn info_of_broken_files_is_one_line_and_exit_1() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    make_images(dir.path());
    let write =
        |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).expect("write");
    let fresh = std::fs::read(dir.path().join("fresh.qcow2")).expect("read");
    // Version 4, cluster_bits 30, header_length too short, l1_size too small.
    let mut v4 = fresh.clone();
    v4[7] = 4;
    write("v4.qcow2", v4);
    let mut cb = fresh.clone();
    cb[23] = 30;
    write("cb.qcow2", cb);
    let mut hl = fresh.clone();
    hl[100..104].copy_from_slice(&50u32.to_be_bytes());
    write("hl.qcow2", hl);
    let mut l1 = fresh.clone();
    l1[36..40].copy_from_slice(&1u32.to_be_bytes());
    write("l1.qcow2", l1);
    write("magic-only.qcow2", vec![b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3]);
    for args in [
        &["info", "v4.qcow2"][..],
        &["info", "cb.qcow2"][..],
        &["info", "hl.qcow2"][..],
        &["info", "l1.qcow2"][..],
        &["info", "-f", "qcow2", "disk.raw"][..],
        &["info", "missing.qcow2"][..],
        &["info", "-f", "qcow2", "empty.raw"][..],
        &["info", "magic-only.qcow2"][..],
    ] {
        let ours = qcow2(dir.path(), args);
        let qemu = qemu_img(dir.path(), args);
        assert_eq!(ours.code, 1, "{args:?}: {ours:?}");
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(ours.stdout, "");
        assert_eq!(ours.stderr.lines().count(), 1, "{args:?}: {ours:?}");
        assert_eq!(ours.text(), qemu.text(), "{args:?}");
    }
}
