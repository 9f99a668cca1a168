//! Legacy AES-encrypted qcow2 images (`encrypt.format=aes`, `crypt_method` 1) made and
//! written by QEMU: read by `qcow2 io -r` and converted (to raw, and to a LUKS target)
//! with the same data as QEMU; QEMU's message without a secret; our writes read back by
//! QEMU; a wrong passphrase reads garbage in both tools (the format cannot tell).

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io};
use std::path::Path;

const SECRET: &str = "secret,id=k,data=pw";

fn spec(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=k")
}

fn io(ours: bool, dir: &Path, secret: &str, file: &str, cmds: &[&str], ro: bool) -> common::Run {
    let s = spec(file);
    let mut a: Vec<&str> = Vec::new();
    if ours {
        a.push("io");
    }
    if ro {
        a.push("-r");
    }
    a.extend(["--object", secret, "--image-opts", &s]);
    for c in cmds {
        a.extend(["-c", c]);
    }
    if ours {
        qcow2(dir, &a)
    } else {
        qemu_io(dir, &a)
    }
}

#[test]
fn qemu_made_aes_images_read_and_convert() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (name, extra) in [
        ("a.qcow2", ""),
        // A passphrase longer than the 16-byte key and small clusters.
        ("b.qcow2", ",cluster_size=4096"),
    ] {
        let secret = if extra.is_empty() {
            SECRET
        } else {
            "secret,id=k,data=a-passphrase-longer-than-sixteen"
        };
        let o = format!("encrypt.format=aes,encrypt.key-secret=k{extra}");
        let r = qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "--object", secret, "-o", &o, name, "4M",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.text());
        let writes = [
            "write -P 0x5a 1000 70000",
            "write -P 0x21 1M 64k",
            "write -P 0x77 3000000 513",
            "write -z 1M 4k",
        ];
        let w = io(false, dir, secret, name, &writes, false);
        assert_eq!(w.code, 0, "{}", w.text());
        let reads = [
            "read -P 0x5a 1000 70000",
            "read -P 0 0 1000",
            "read -P 0 71000 100000",
            "read -P 0 1M 4k",
            "read -P 0x21 1052672 61440",
            "read -P 0x77 3000000 513",
        ];
        let r = io(true, dir, secret, name, &reads, true);
        assert_eq!(r.code, 0, "{}", r.text());
        assert!(!r.text().contains("Pattern verification"), "{}", r.text());
        // Convert to raw: the same bytes as qemu-img's conversion.
        for (ours, out) in [(true, "ours.raw"), (false, "qemu.raw")] {
            let s = spec(name);
            let a = [
                "convert",
                "-O",
                "raw",
                "--object",
                secret,
                "--image-opts",
                &s,
                out,
            ];
            let c = if ours {
                qcow2(dir, &a)
            } else {
                qemu_img(dir, &a)
            };
            assert_eq!(c.code, 0, "{}", c.text());
        }
        assert!(
            std::fs::read(dir.join("ours.raw")).unwrap()
                == std::fs::read(dir.join("qemu.raw")).unwrap(),
            "{name}: converted bytes differ"
        );
        // A wrong passphrase: no error in either tool, other bytes.
        for ours in [true, false] {
            let r = io(
                ours,
                dir,
                "secret,id=k,data=wrong",
                name,
                &["read -P 0x5a 1000 70000"],
                true,
            );
            assert!(
                r.text().contains("Pattern verification failed"),
                "{}",
                r.text()
            );
        }
    }
    // Into an encrypted LUKS target: QEMU reads what the AES image held.
    let s = spec("a.qcow2");
    let r = qcow2(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            "--image-opts",
            &s,
            "luks.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.text());
    let r = qemu_img(
        dir,
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &spec("a.qcow2"),
            &spec("luks.qcow2"),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.text());
}

#[test]
fn missing_secret_and_our_writes() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=k",
            "c.qcow2",
            "1M",
        ],
    );
    assert_eq!(r.code, 0);
    let before = std::fs::read(dir.join("c.qcow2")).unwrap();
    // No secret: QEMU's message from both.
    let ours = qcow2(dir, &["io", "-r", "-c", "read 0 512", "c.qcow2"]);
    let qemu = qemu_io(dir, &["-r", "-c", "read 0 512", "c.qcow2"]);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(ours.text(), qemu.text());
    assert!(std::fs::read(dir.join("c.qcow2")).unwrap() == before);
    // Our writes (unaligned, partial clusters, copy-on-write of a written cluster) read
    // back by QEMU: the IVs count guest sectors.
    let writes = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1000 3000",
        "write -P 0x33 100k 70000",
        "write -P 0x44 500000 5",
    ];
    let w = io(true, dir, SECRET, "c.qcow2", &writes, false);
    assert_eq!(w.code, 0, "{}", w.text());
    let reads = [
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x11 4000 61536",
        "read -P 0x33 100k 70000",
        "read -P 0x44 500000 5",
        "read -P 0 500005 100000",
    ];
    for ours in [false, true] {
        let r = io(ours, dir, SECRET, "c.qcow2", &reads, true);
        assert_eq!(r.code, 0, "{}", r.text());
        assert!(!r.text().contains("Pattern verification"), "{}", r.text());
    }
    let c = qemu_img(
        dir,
        &[
            "check",
            "--object",
            SECRET,
            "--image-opts",
            &spec("c.qcow2"),
        ],
    );
    assert_eq!(c.code, 0, "{}", c.text());
    // info without a secret, as qemu-img.
    let a = qcow2(dir, &["info", "c.qcow2"]);
    let b = qemu_img(dir, &["info", "c.qcow2"]);
    assert_eq!(a.code, 0, "{}", a.text());
    assert_eq!(a.stdout, b.stdout);
}
