//! Dirty-image auto-repair on a read-write open (reference §1.11 step 20, §2.12, iotest
//! 039): lazy refcounts and a killed writer leave refcounts behind; our read-write open
//! repairs as QEMU does (the checker's messages in `Image::messages`), `qemu-img check` is
//! clean afterwards and the data is intact; a repair that fails refuses the open with
//! "Could not repair dirty image: <errno text>".

mod common;

use common::{assert_clean, qemu_create};
use qcow2_image::{CreateOptions, Image, ImageError, OpenOptions};
use qcow2_io::fault::{FaultStorage, IoKind, Rule};
use qcow2_io::{errno, FileStorage, MemStorage};
use std::process::Command;
use std::sync::Arc;

fn open_rw(p: &std::path::Path) -> Result<Image, ImageError> {
    Image::open(
        Arc::new(FileStorage::open(p, true).unwrap()),
        &OpenOptions::default(),
    )
}

#[test]
fn iotest_039_qemu_io_killed_then_our_open_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    qemu_create(&p, "lazy_refcounts=on", 128 << 20, None);
    // qemu-io is killed by its own SIGKILL: the refcount of the data cluster never
    // reaches the disk, the dirty bit stays set.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 512",
            "-c",
            "sigraise 9",
        ])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes[79] & 1, 1, "dirty bit set");

    let mut img = open_rw(&p).unwrap();
    let msgs = img.messages().join("\n");
    assert!(
        msgs.contains("ERROR cluster 5 refcount=0 reference=1"),
        "{msgs}"
    );
    assert!(msgs.contains("Rebuilding refcount structure"), "{msgs}");
    assert!(!img.is_dirty());
    let mut b = [0u8; 512];
    img.read(0, &mut b).unwrap();
    assert_eq!(b, [0x5a; 512]);
    img.write(65536, &[1u8; 4096]).unwrap();
    img.close().unwrap();
    assert_clean(&p, true, "after our auto-repair");
}

#[test]
fn our_abandoned_lazy_image_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ours.qcow2");
    let mut o = CreateOptions::new(8 << 20);
    o.lazy_refcounts = true;
    let mut img = Image::create_path(&p, &o).unwrap();
    img.write(0, &[7u8; 200_000]).unwrap();
    img.write(5 << 20, &[8u8; 4096]).unwrap();
    img.flush().unwrap();
    assert!(img.is_dirty());
    img.abandon();
    // qemu-img agrees the image needs repair (data clusters have refcount 0).
    let st = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));

    // Read-only opens never repair (and never write).
    let ro = Image::open_path(&p, &OpenOptions::read_only()).unwrap();
    assert!(ro.is_dirty() && ro.messages().is_empty());
    drop(ro);

    let mut img = open_rw(&p).unwrap();
    assert!(!img.messages().is_empty());
    assert!(!img.is_dirty());
    let mut b = vec![0u8; 200_000];
    img.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    img.close().unwrap();
    assert_clean(&p, true, "after repairing our abandoned image");
}

#[test]
fn failed_repair_refuses_the_open() {
    let fs = Arc::new(FaultStorage::new(MemStorage::new()));
    let mut o = CreateOptions::new(8 << 20);
    o.lazy_refcounts = true;
    let mut img = Image::create(fs.clone(), &o).unwrap();
    img.write(0, &[7u8; 65536]).unwrap();
    img.flush().unwrap();
    img.abandon();
    // Every write fails: the repair cannot write its rebuilt structures.
    fs.add_rule(Rule::on_request(1, errno::EIO).kinds(IoKind::Write));
    let e = Image::open(fs.clone(), &OpenOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not repair dirty image: Input/output error",
        "{e:?}"
    );
    fs.clear_rules();
    let img = Image::open(fs, &OpenOptions::default()).unwrap();
    assert!(!img.is_dirty());
    img.close().unwrap();
}
