//! Encrypted (LUKS) images through the library: `Image` and `SharedImage` on images made
//! by `qemu-img`, random unaligned writes checked against a model, the result verified by
//! `qemu-io` with the secret and `qemu-img check` clean; open errors leave the file as it
//! was.

mod common;

use common::Rng;
use qcow2_image::{Image, ImageError, OpenOptions, Secret, SharedImage};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

fn create(path: &Path, extra: &str, size: &str) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10{extra}");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s,data=pw",
        ])
        .args(["-o", &o])
        .arg(path)
        .arg(size)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image_opts(path: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        "secret,id=s,data=pw".into(),
        "--image-opts".into(),
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s",
            path.display()
        ),
    ]
}

fn opts() -> OpenOptions {
    OpenOptions {
        key_secret: Some(Secret::new(b"pw".to_vec())),
        ..OpenOptions::default()
    }
}

/// Dumps the guest disk with qemu-io (`read -v` is slow: use convert to raw instead).
fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("dump.raw");
    let out = Command::new("qemu-img")
        .arg("convert")
        .args(image_opts(path))
        .args(["-O", "raw"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(raw).unwrap()
}

fn qemu_check(path: &Path) {
    let out = Command::new("qemu-img")
        .arg("check")
        .args(image_opts(path))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn random_writes_match_model_and_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let size = 4u64 << 20;
    create(&path, ",cluster_size=4k", "4M");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x1u64 << 40 | 19);
    {
        let mut img = Image::open_path(&path, &opts()).unwrap();
        assert!(img.is_encrypted());
        for i in 0..300 {
            let off = rng.below(size - 1);
            let len = (1 + rng.below(20_000)).min(size - off);
            if rng.chance(15) {
                img.write_zeroes(off, len, rng.chance(50)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data = rng.data(len as usize);
                img.write(off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            if i % 50 == 0 {
                let mut back = vec![0u8; size as usize];
                img.read(0, &mut back).unwrap();
                assert!(back == model, "after op {i}");
            }
        }
        img.close().unwrap();
    }
    qemu_check(&path);
    assert!(qemu_raw(&path, dir.path()) == model);
}

#[test]
fn shared_image_threads() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    create(&path, "", "8M");
    let img = Image::open_path(&path, &opts()).unwrap();
    let shared = Arc::new(SharedImage::new(img));
    let region = 2u64 << 20;
    let handles: Vec<_> = (0..3u64)
        .map(|t| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let base = t * region;
                let mut model = vec![0u8; region as usize];
                let mut rng = Rng(t + 7);
                for _ in 0..120 {
                    let mut off = rng.below(region - 1);
                    let mut len = (1 + rng.below(70_000)).min(region - off);
                    if rng.chance(60) {
                        // Whole sectors: the data moves and is encrypted outside the lock.
                        off = off / 512 * 512;
                        len = len.div_ceil(512) * 512;
                        len = len.min(region - off);
                    }
                    let data = rng.data(len as usize);
                    shared.write(base + off, &data).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    let mut back = vec![0u8; len as usize];
                    shared.read(base + off, &mut back).unwrap();
                    assert!(back == data);
                }
                let mut back = vec![0u8; region as usize];
                shared.read(base, &mut back).unwrap();
                assert!(back == model);
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(shared);
    qemu_check(&path);
    let raw = qemu_raw(&path, dir.path());
    for (t, m) in models.iter().enumerate() {
        let at = t * region as usize;
        assert!(raw[at..at + m.len()] == m[..], "thread {t}");
    }
}

#[test]
fn open_errors_write_nothing() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.qcow2");
    create(&path, "", "1M");
    let before = std::fs::read(&path).unwrap();
    let e = Image::open_path(&path, &OpenOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    let wrong = OpenOptions {
        key_secret: Some(Secret::new(b"pW".to_vec())),
        ..OpenOptions::default()
    };
    let e = Image::open_path(&path, &wrong).unwrap_err();
    assert!(matches!(e, ImageError::Refused { .. }));
    assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The secret never shows in Debug output.
    assert!(!format!("{:?}", opts()).contains("pw"));
    // Compressed writes are refused.
    let mut img = Image::open_path(&path, &opts()).unwrap();
    assert!(img.write_compressed(0, &vec![1u8; 65536]).is_err());
}
