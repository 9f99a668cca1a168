//! LUKS-encrypted qcow2 images against QEMU: images made by `qemu-img create -o
//! encrypt.format=luks` (the default aes-256-xts-plain64 with sha256, cbc-essiv, aes-128,
//! plain, sha1/sha512 key derivation), data written by `qemu-io` read back by `qcow2 io`
//! and the other way round, partial-sector and partial-cluster writes (copy-on-write,
//! including clusters shared with an internal snapshot), QEMU's messages without or with a
//! wrong secret (file unchanged), `qemu-img check` clean after our writes, map/convert
//! equal to qemu-img's.

mod common;

use common::luks::{assert_ok, create, opts, qemu_check_clean, run_io, READS, WRITES};
use common::{have_qemu, qcow2, qemu_img, qemu_io};

/// Every supported combination: writes by one tool read back by the other, both ways.
#[test]
fn interop_both_ways_every_cipher() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let variants = [
        "",
        ",encrypt.cipher-alg=aes-128",
        ",encrypt.cipher-alg=aes-192",
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
         encrypt.ivgen-hash-alg=sha256",
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain",
        ",encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
        ",encrypt.hash-alg=sha512",
        ",extended_l2=on",
    ];
    for (i, v) in variants.iter().enumerate() {
        for ours_writes in [false, true] {
            let name = format!("v{i}-{ours_writes}.qcow2");
            create(dir, &name, v, "4M");
            let w = run_io(dir, ours_writes, &name, WRITES);
            assert_ok(&w, &format!("writes {v} ours={ours_writes}"));
            let r = run_io(dir, !ours_writes, &name, READS);
            assert_ok(&r, &format!("reads {v} ours={}", !ours_writes));
            // And the writer reads its own data back.
            let r = run_io(dir, ours_writes, &name, READS);
            assert_ok(&r, &format!("self reads {v}"));
            qemu_check_clean(dir, &name);
        }
    }
}

/// Copy-on-write of clusters shared with an internal snapshot: the old data is decrypted
/// and re-encrypted at the new host offset; the snapshot keeps its data.
#[test]
fn cow_of_snapshot_clusters() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "s.qcow2", "", "4M");
    assert_ok(
        &run_io(dir, false, "s.qcow2", &["write -P 0x11 0 256k"]),
        "qemu write",
    );
    let snapshot = |op: &str| {
        let mut a = vec!["snapshot".to_string(), op.to_string(), "snap".into()];
        a.extend(opts("s.qcow2"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = qemu_img(dir, &a);
        assert_eq!(r.code, 0, "{}", r.text());
    };
    snapshot("-c");
    let w = run_io(
        dir,
        true,
        "s.qcow2",
        &["write -P 0x22 4096 512", "write -P 0x33 65000 100"],
    );
    assert_ok(&w, "our COW writes");
    let reads = [
        "read -P 0x11 0 4096",
        "read -P 0x22 4096 512",
        "read -P 0x11 4608 60392",
        "read -P 0x33 65000 100",
        "read -P 0x11 65100 196044",
    ];
    assert_ok(&run_io(dir, false, "s.qcow2", &reads), "qemu reads");
    qemu_check_clean(dir, "s.qcow2");
    snapshot("-a");
    assert_ok(
        &run_io(dir, true, "s.qcow2", &["read -P 0x11 0 256k"]),
        "snapshot data",
    );
}

/// No secret, a wrong secret, an unknown secret id: QEMU's messages, nothing written.
#[test]
fn secret_errors_as_qemu() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "e.qcow2", "", "1M");
    let before = std::fs::read(dir.join("e.qcow2")).unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec!["-c".into(), "write 0 512".into(), "e.qcow2".into()],
        vec![
            "--object".into(),
            "secret,id=sec0,data=abd".into(),
            "--image-opts".into(),
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0".into(),
            "-c".into(),
            "write 0 512".into(),
        ],
        vec![
            "--object".into(),
            "secret,id=sec0,data=abc".into(),
            "--image-opts".into(),
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec1".into(),
            "-c".into(),
            "write 0 512".into(),
        ],
    ];
    for c in &cases {
        let a: Vec<&str> = c.iter().map(String::as_str).collect();
        let q = qemu_io(dir, &a);
        let mut ours_args = vec!["io"];
        ours_args.extend(a.iter().copied());
        let o = qcow2(dir, &ours_args);
        assert_eq!(o.text(), q.text(), "{c:?}");
        assert_eq!(o.code, q.code, "{c:?}");
        assert_ne!(o.code, 0);
    }
    assert_eq!(std::fs::read(dir.join("e.qcow2")).unwrap(), before);
    // The key secret from a file, base64.
    std::fs::write(dir.join("pw"), "YWJj").unwrap();
    let o = qcow2(
        dir,
        &[
            "io",
            "--object",
            "secret,id=k,file=pw,format=base64",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=k",
            "-c",
            "read -P 0 0 64k",
        ],
    );
    assert_ok(&o, "secret from a base64 file");
}

/// Compressed writes are refused (QEMU 10 would store them unencrypted).
#[test]
fn compressed_writes_refused() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "c.qcow2", "", "1M");
    let before = std::fs::read(dir.join("c.qcow2")).unwrap();
    let o = run_io(dir, true, "c.qcow2", &["write -c 0 64k"]);
    assert!(
        o.text().contains("write failed: Operation not supported"),
        "{}",
        o.text()
    );
    assert_eq!(std::fs::read(dir.join("c.qcow2")).unwrap(), before);
}

/// map (human and JSON) and convert to raw equal qemu-img's.
#[test]
fn map_and_convert_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "m.qcow2", "", "4M");
    assert_ok(&run_io(dir, false, "m.qcow2", WRITES), "qemu writes");
    for extra in [&[][..], &["--output=json"][..]] {
        let mut a = vec!["map".to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(opts("m.qcow2"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let q = qemu_img(dir, &a);
        let o = qcow2(dir, &a);
        assert_eq!(o.text(), q.text());
        assert_eq!(o.code, q.code);
    }
    let conv = |ours: bool, out: &str| {
        let mut a = vec!["convert".to_string()];
        a.extend(opts("m.qcow2"));
        a.extend(["-O".into(), "raw".into(), out.to_string()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = if ours {
            qcow2(dir, &a)
        } else {
            qemu_img(dir, &a)
        };
        assert_eq!(r.code, 0, "{}", r.text());
    };
    conv(true, "ours.raw");
    conv(false, "qemu.raw");
    assert_eq!(
        std::fs::read(dir.join("ours.raw")).unwrap(),
        std::fs::read(dir.join("qemu.raw")).unwrap()
    );
    // info and check take the same options.
    for cmd in ["info", "check"] {
        let mut a = vec![cmd.to_string()];
        a.extend(opts("m.qcow2"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = qcow2(dir, &a);
        assert_eq!(o.code, 0, "{cmd}: {}", o.text());
    }
}

/// bench, resize and amend take the secret the same way; QEMU reads the result.
#[test]
fn bench_resize_amend_with_secret() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "b.qcow2", "", "16M");
    let ours = |cmd: &[&str], tail: &[&str]| {
        let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        a.extend(opts("b.qcow2"));
        a.extend(tail.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = qcow2(dir, &a);
        assert_eq!(r.code, 0, "{cmd:?}: {}", r.text());
    };
    ours(
        &["bench", "-w", "-c", "500", "-s", "4k", "--pattern=0x5a"],
        &[],
    );
    ours(&["resize"], &["32M"]);
    ours(&["amend", "-o", "lazy_refcounts=on"], &[]);
    assert_ok(
        &run_io(
            dir,
            false,
            "b.qcow2",
            &["read -P 0x5a 0 2000k", "read -P 0 16M 16M", "length"],
        ),
        "qemu reads",
    );
    qemu_check_clean(dir, "b.qcow2");
}

/// Damaged LUKS headers: `io` (with the secret) and `info` (without) fail with QEMU's
/// messages, and nothing is written.
#[test]
fn damaged_headers_as_qemu() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "d.qcow2", "", "1M");
    let good = std::fs::read(dir.join("d.qcow2")).unwrap();
    let at = good
        .windows(6)
        .position(|w| w == b"LUKS\xba\xbe")
        .expect("LUKS header");
    let slot0 = at + 208;
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Damage)> = vec![
        ("version", Box::new(move |b| b[at + 7] = 2)),
        ("magic", Box::new(move |b| b[at] = b'X')),
        (
            "stripes",
            Box::new(move |b| b[slot0 + 44..slot0 + 48].fill(0)),
        ),
        ("state", Box::new(move |b| b[slot0..slot0 + 4].fill(0x11))),
        (
            "ivgen",
            Box::new(move |b| {
                b[at + 40..at + 72].fill(0);
                b[at + 40..at + 47].copy_from_slice(b"xts-foo");
            }),
        ),
        (
            "cipher name",
            Box::new(move |b| b[at + 8..at + 40].fill(b'a')),
        ),
        (
            "digest iterations",
            Box::new(move |b| b[at + 164..at + 168].fill(0)),
        ),
        (
            "key material",
            Box::new(move |b| {
                let off = u32::from_be_bytes(b[slot0 + 40..slot0 + 44].try_into().unwrap());
                b[at + off as usize * 512 + 7] ^= 0x80;
            }),
        ),
    ];
    for (what, damage) in damages {
        let mut b = good.clone();
        damage(&mut b);
        std::fs::write(dir.join("d.qcow2"), &b).unwrap();
        let mut a = vec!["-c".to_string(), "write 0 512".into()];
        a.extend(opts("d.qcow2"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let q = qemu_io(dir, &a);
        let mut oa = vec!["io"];
        oa.extend(a.iter().copied());
        let o = qcow2(dir, &oa);
        assert_eq!(o.text(), q.text(), "io, {what}");
        assert_eq!(o.code, q.code, "io, {what}");
        let qi = qemu_img(dir, &["info", "d.qcow2"]);
        let oi = qcow2(dir, &["info", "d.qcow2"]);
        assert_eq!(oi.code, qi.code, "info, {what}: {}", oi.text());
        if qi.code != 0 {
            assert_eq!(oi.text(), qi.text(), "info, {what}");
        }
        assert_eq!(std::fs::read(dir.join("d.qcow2")).unwrap(), b, "{what}");
    }
}
