//! Creating LUKS-encrypted qcow2 images (`qcow2 create -o encrypt.format=luks,...`, and
//! convert targets) against qemu-img: the same options give the same image except the
//! random salts, keys, UUID and the benchmarked iteration counts — every byte outside the
//! LUKS area equal (header, extension, refcounts, L1), the LUKS header field by field,
//! slot 0's material where QEMU puts it and zeros elsewhere — `qemu-img check` clean,
//! `qemu-img info` equal, data written by either tool read back by the other; QEMU's
//! messages for bad options, and no file left behind.

mod common;

use common::luks::{assert_ok, qemu_check_clean, run_io, SECRET};
use common::{have_qemu, qcow2, qemu_img, Run};
use qcow2_crypto::LuksHeader;
use qcow2_format::header::{open_first_cluster, OpenOptions};
use std::path::Path;

/// Creates `name` with `qcow2` (ours) or qemu-img, LUKS with a short iter-time and
/// `extra` options.
fn create_with(ours: bool, dir: &Path, name: &str, extra: &str, size: &str) -> Run {
    let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
    let args = [
        "create", "-f", "qcow2", "--object", SECRET, "-o", &o, name, size,
    ];
    if ours {
        qcow2(dir, &args)
    } else {
        qemu_img(dir, &args)
    }
}

fn first_cluster(bytes: &[u8]) -> qcow2_format::extensions::FirstCluster {
    open_first_cluster(
        bytes,
        &OpenOptions {
            read_write: false,
            check_mode: false,
        },
    )
    .expect("first cluster")
}

/// Everything but the random and benchmarked parts is equal.
fn assert_same_structure(ours: &[u8], qemu: &[u8], what: &str) {
    assert_eq!(ours.len(), qemu.len(), "{what}: file length");
    let fc = first_cluster(qemu);
    assert_eq!(first_cluster(ours), fc, "{what}: header and extensions");
    let ext = fc.extensions.crypto_header.expect("crypto extension");
    let (at, len) = (ext.offset as usize, ext.length as usize);
    assert_eq!(ours[..at], qemu[..at], "{what}: bytes before the LUKS area");
    assert_eq!(
        ours[at + len..],
        qemu[at + len..],
        "{what}: bytes after the LUKS area"
    );
    let (o, q) = (&ours[at..at + len], &qemu[at..at + len]);
    let (ho, hq) = (LuksHeader::parse(o).unwrap(), LuksHeader::parse(q).unwrap());
    assert_eq!(
        (
            ho.version,
            &ho.cipher_name,
            &ho.cipher_mode,
            &ho.hash_spec,
            ho.payload_offset_sector,
            ho.key_bytes
        ),
        (
            hq.version,
            &hq.cipher_name,
            &hq.cipher_mode,
            &hq.hash_spec,
            hq.payload_offset_sector,
            hq.key_bytes
        ),
        "{what}: LUKS header"
    );
    assert_eq!(ho.uuid.len(), 36, "{what}: uuid {}", ho.uuid);
    assert_ne!(ho.uuid, hq.uuid);
    assert_ne!(ho.mk_digest_salt, hq.mk_digest_salt);
    assert!(ho.mk_digest_iterations >= 1000);
    for (i, (so, sq)) in ho.key_slots.iter().zip(&hq.key_slots).enumerate() {
        assert_eq!(
            (so.active, so.key_offset_sector, so.stripes),
            (sq.active, sq.key_offset_sector, sq.stripes),
            "{what}: slot {i}"
        );
        let (a, l) = ho.slot_material_range(i).unwrap();
        let (a, l) = (a as usize, l as usize);
        let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        if i == 0 {
            assert!(so.iterations >= 1000);
            assert!(
                !zero(&o[a..a + l]) && !zero(&q[a..a + l]),
                "{what}: material"
            );
            assert_ne!(o[a..a + l], q[a..a + l]);
            // Between the header and slot 0, and after the material: zeros in both.
            assert!(zero(&o[592..a]) && zero(&q[592..a]), "{what}: gap");
            assert!(zero(&o[a + l..]) == zero(&q[a + l..]), "{what}: rest");
        } else {
            assert_eq!((so.iterations, so.salt), (0, [0u8; 32]), "{what}: slot {i}");
        }
    }
    // Past slot 0's material only zeros in both.
    let (a, l) = ho.slot_material_range(0).unwrap();
    let end = (a + l) as usize;
    assert!(o[end..].iter().all(|&x| x == 0), "{what}: our free slots");
    assert!(
        q[end..].iter().all(|&x| x == 0),
        "{what}: qemu's free slots"
    );
}

/// `qemu-img info` without the lines that differ by nature (name, UUID, iterations).
fn info_text(dir: &Path, file: &str) -> String {
    let r = qemu_img(dir, &["info", file]);
    assert_eq!(r.code, 0, "{}", r.text());
    r.stdout
        .lines()
        .filter(|l| {
            !(l.starts_with("image:")
                || l.contains("filename:")
                || l.contains("uuid:")
                || l.contains("iters:"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn created_images_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let variants = [
        ("", "64M"),
        (
            ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            "4M",
        ),
        (
            ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
            "4M",
        ),
        // The IV hash is written into the mode string even for plain64.
        (",encrypt.ivgen-hash-alg=sha1,encrypt.hash-alg=sha1", "4M"),
        (
            ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,\
             encrypt.hash-alg=sha384",
            "4M",
        ),
        // Small clusters: the LUKS area needs refcount blocks of its own.
        (",cluster_size=512", "4M"),
        (
            ",cluster_size=4096,refcount_bits=64,lazy_refcounts=on",
            "1G",
        ),
        (",compat=0.10", "4M"),
        // QEMU preallocates first: the LUKS area comes after the data clusters.
        (",preallocation=metadata", "4M"),
        (",preallocation=metadata,cluster_size=4096", "4M"),
        (",extended_l2=on", "4M"),
    ];
    for (i, (extra, size)) in variants.iter().enumerate() {
        let (a, b) = (format!("ours{i}.qcow2"), format!("qemu{i}.qcow2"));
        let o = create_with(true, dir, &a, extra, size);
        assert_eq!(o.code, 0, "{extra}: {}", o.text());
        let q = create_with(false, dir, &b, extra, size);
        assert_eq!(q.code, 0, "{extra}: {}", q.text());
        // The "Formatting" line is qemu-img's.
        assert_eq!(o.text().replace(&a, &b), q.text(), "{extra}");
        let ours = std::fs::read(dir.join(&a)).unwrap();
        let qemu = std::fs::read(dir.join(&b)).unwrap();
        assert_same_structure(&ours, &qemu, extra);
        assert_eq!(info_text(dir, &a), info_text(dir, &b), "{extra}: info");
        qemu_check_clean(dir, &a);
        // Data both ways on our image: QEMU writes, we read; we write, QEMU reads.
        let w = run_io(
            dir,
            false,
            &a,
            &["write -P 0x5a 0 100k", "write -P 0x21 3M 700"],
        );
        assert_ok(&w, "qemu writes");
        let w = run_io(
            dir,
            true,
            &a,
            &["write -P 0x77 1M 65k", "write -P 0x13 2M 1000"],
        );
        assert_ok(&w, "our writes");
        let mut reads = vec![
            "read -P 0x5a 0 100k",
            "read -P 0x21 3M 700",
            "read -P 0x77 1M 65k",
            "read -P 0x13 2M 1000",
        ];
        // Preallocated clusters hold zeros on disk, which decrypt to noise (in QEMU too):
        // compared between the tools below instead.
        if !extra.contains("preallocation") {
            reads.push("read -P 0 100k 900k");
        }
        assert_ok(&run_io(dir, false, &a, &reads), "qemu reads");
        assert_ok(&run_io(dir, true, &a, &reads), "we read");
        let spec = format!("driver=qcow2,file.filename={a},encrypt.key-secret=sec0");
        for (ours, out) in [(true, "o.raw"), (false, "q.raw")] {
            let args = [
                "convert",
                "-O",
                "raw",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                out,
            ];
            let r = if ours {
                qcow2(dir, &args)
            } else {
                qemu_img(dir, &args)
            };
            assert_eq!(r.code, 0, "{}", r.text());
        }
        assert!(
            std::fs::read(dir.join("o.raw")).unwrap() == std::fs::read(dir.join("q.raw")).unwrap(),
            "{extra}: guest data differs between the tools"
        );
        qemu_check_clean(dir, &a);
    }
}

/// Bad options: qemu-img's messages and exit status, and no file left behind.
#[test]
fn create_errors_as_qemu() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cases = [
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nope",
        "encrypt.format=bogus,encrypt.key-secret=sec0",
        "encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encryption=on",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.ivgen-alg=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.ivgen-alg=essiv,\
         encrypt.ivgen-hash-alg=sha512",
    ];
    for (i, o) in cases.iter().enumerate() {
        let name = format!("e{i}.qcow2");
        let args = [
            "create", "-f", "qcow2", "--object", SECRET, "-o", o, &name, "1M",
        ];
        let ours = qcow2(dir, &args);
        assert!(!dir.join(&name).exists(), "{o}: our file left");
        let qemu = qemu_img(dir, &args);
        assert!(!dir.join(&name).exists(), "{o}: qemu's file left");
        assert_eq!(ours.code, 1, "{o}: {}", ours.text());
        assert_eq!(ours.code, qemu.code, "{o}");
        assert_eq!(ours.text(), qemu.text(), "{o}");
    }
    // What QEMU creates and this tool does not: refused with a clear message, no file.
    for o in [
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "encryption=on,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=twofish-128",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=ecb",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=md5",
    ] {
        let r = qcow2(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "x.qcow2", "1M",
            ],
        );
        assert_eq!(r.code, 1, "{o}");
        assert!(
            r.stderr.contains("not supported by this tool"),
            "{o}: {}",
            r.text()
        );
        assert!(!dir.join("x.qcow2").exists(), "{o}");
    }
}

/// `convert -O qcow2 -o encrypt.format=luks,...`: an encrypted target QEMU reads as the
/// source, check clean.
#[test]
fn convert_to_encrypted_target() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut data = data;
    data[1 << 20..2 << 20].fill(0);
    std::fs::write(dir.join("src.raw"), &data).unwrap();
    let r = qcow2(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            "src.raw",
            "t.qcow2",
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
            "driver=raw,file.filename=src.raw",
            "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=sec0",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.text());
    qemu_check_clean(dir, "t.qcow2");
    let i = info_text(dir, "t.qcow2");
    assert!(
        i.contains("cipher mode: cbc") && i.contains("ivgen alg: essiv"),
        "{i}"
    );
    // A missing secret: QEMU's message, no target left.
    let r = qcow2(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "src.raw",
            "u.qcow2",
        ],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        r.text()
    );
    assert!(!dir.join("u.qcow2").exists());
}

/// `measure -O qcow2 -o encrypt.format=luks,...`: the LUKS area (in whole clusters) is
/// counted as qemu-img counts it; QEMU's messages without the secret.
#[test]
fn measure_counts_the_luks_area() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,\
         encrypt.cipher-mode=cbc,cluster_size=4096",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-192,\
         preallocation=full,cluster_size=2M",
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nope",
    ] {
        // (qemu-img runs the PBKDF2 benchmark for each: one output format is enough.)
        let args = [
            "measure", "--output=json", "--object", SECRET, "-O", "qcow2", "-o", o, "--size",
            "3G",
        ];
        let (ours, qemu) = (qcow2(dir, &args), qemu_img(dir, &args));
        assert_eq!(ours.code, qemu.code, "{o}: {}", ours.text());
        assert_eq!(ours.text(), qemu.text(), "{o}");
    }
}
