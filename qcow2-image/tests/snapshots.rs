//! Internal snapshots through the facade, against qemu-img both ways: ours are listed and
//! checked clean by QEMU and apply restores guest data; QEMU's are listed, applied (id
//! first) and deleted (name only) by us; overlap checks cover the snapshot L1 tables; EIO
//! injected during create/delete/apply leaks at most.

mod common;

use common::{assert_clean, qemu_create, qemu_io};
use qcow2_image::{CreateOptions, Image, ImageError, OpenOptions, OverlapLevel};
use qcow2_io::fault::{FaultStorage, Rule};
use qcow2_io::{errno, Event, FileStorage, MemStorage, Storage, StorageExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn open_rw(p: &Path) -> Image {
    Image::open(
        Arc::new(FileStorage::open(p, true).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap()
}

fn qemu_snapshot_list(p: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-f", "qcow2"])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(img: &mut Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read(off, &mut b).unwrap();
    b
}

#[test]
fn ours_listed_and_checked_by_qemu_apply_restores() {
    for (compat, ext) in [("1.1", false), ("0.10", false), ("1.1", true)] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let mut o = CreateOptions::new(4 << 20);
        o.cluster_size = if ext { 16384 } else { 4096 };
        o.extended_l2 = ext;
        if compat == "0.10" {
            o.compat = qcow2_image::Compat::V0_10;
        }
        let what = format!("compat {compat} ext {ext}");
        let mut img = Image::create_path(&p, &o).unwrap();
        img.write(0, &[1u8; 8192]).unwrap();
        img.write(1 << 20, &[2u8; 4096]).unwrap();
        let s1 = img.snapshot_create("first").unwrap();
        assert_eq!(s1.id_str(), Some("1"));
        img.write(0, &[3u8; 4096]).unwrap();
        img.write_zeroes(1 << 20, 4096, false).unwrap();
        img.write(3 << 20, &[4u8; 4096]).unwrap();
        img.snapshot_create("second").unwrap();
        img.snapshot_create("first").unwrap(); // duplicate names are allowed
        assert_eq!(img.snapshots().len(), 3);
        img.close().unwrap();
        assert_clean(&p, true, &format!("{what}: after create"));
        let list = qemu_snapshot_list(&p);
        assert!(list.contains("first") && list.contains("second"), "{list}");
        assert_eq!(list.lines().count(), 5, "{list}");

        // Apply by id "1" (id first), then check guest data and QEMU's view.
        let mut img = open_rw(&p);
        img.snapshot_apply("1").unwrap();
        assert_eq!(read(&mut img, 0, 8192), vec![1u8; 8192], "{what}");
        assert_eq!(read(&mut img, 1 << 20, 4096), vec![2u8; 4096], "{what}");
        assert_eq!(read(&mut img, 3 << 20, 4096), vec![0u8; 4096], "{what}");
        // Writes after apply COW away from the snapshot.
        img.write(4096, &[9u8; 4096]).unwrap();
        img.close().unwrap();
        assert_clean(&p, true, &format!("{what}: after apply"));
        let out = qemu_io(
            &p,
            &["read -P 1 0 4096".into(), "read -P 9 4096 4096".into()],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");

        // Apply "second" by name, delete by name (first match), delete unknown fails.
        let mut img = open_rw(&p);
        img.snapshot_apply("second").unwrap();
        assert_eq!(read(&mut img, 0, 4096), vec![3u8; 4096], "{what}");
        assert_eq!(read(&mut img, 3 << 20, 4096), vec![4u8; 4096], "{what}");
        let gone = img.snapshot_delete("first").unwrap();
        assert_eq!(gone.id_str(), Some("1"));
        let e = img.snapshot_delete("2").unwrap_err(); // delete looks names up only
        assert!(matches!(e, ImageError::Snapshot { .. }), "{e}");
        assert_eq!(e.errno(), 2);
        assert!(img.poisoned().is_none());
        img.close().unwrap();
        assert_clean(&p, true, &format!("{what}: after delete"));
        let list = qemu_snapshot_list(&p);
        assert!(list.contains("second") && list.contains("first"), "{list}");
        assert_eq!(list.lines().count(), 4, "{list}");
        let st = Command::new("qemu-img")
            .args(["snapshot", "-a", "3"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let out = qemu_io(&p, &["read -P 3 0 4096".into(), "read -P 4 3M 4096".into()]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

#[test]
fn qemu_snapshots_applied_and_deleted_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    qemu_create(&p, "cluster_size=4096", 2 << 20, None);
    qemu_io(&p, &["write -P 0x11 0 12k".into()]);
    let run = |args: &[&str]| {
        let st = Command::new("qemu-img")
            .args(args)
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    run(&["snapshot", "-c", "base"]);
    qemu_io(&p, &["write -P 0x22 4k 8k".into()]);
    run(&["snapshot", "-c", "mid"]);
    qemu_io(&p, &["write -P 0x33 0 4k".into()]);
    let mut img = open_rw(&p);
    let names: Vec<_> = img
        .snapshots()
        .iter()
        .map(|s| s.name_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["base", "mid"]);
    img.snapshot_apply("mid").unwrap();
    assert_eq!(read(&mut img, 0, 4096), vec![0x11; 4096]);
    assert_eq!(read(&mut img, 4096, 8192), vec![0x22; 8192]);
    img.snapshot_delete("base").unwrap();
    img.snapshot_create("ours").unwrap();
    assert_eq!(img.snapshots()[1].id_str(), Some("3"));
    img.close().unwrap();
    assert_clean(
        &p,
        true,
        "after our apply/delete/create on QEMU's snapshots",
    );
    let list = qemu_snapshot_list(&p);
    assert!(list.contains("mid") && list.contains("ours") && !list.contains("base"));
    // Overlap level All reads the snapshot L1s at open; operations still work.
    let mut img = Image::open(
        Arc::new(FileStorage::open(&p, true).unwrap()),
        &OpenOptions {
            overlap_check: OverlapLevel::All,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    img.write(0, &[5u8; 4096]).unwrap();
    img.snapshot_delete("mid").unwrap();
    img.snapshot_apply("ours").unwrap();
    img.close().unwrap();
    assert_clean(&p, true, "after level All operations");
}

/// iotest 060 style: an active L2 entry (COPIED) redirected at a snapshot's L1 table; the
/// in-place write is caught by the overlap check and the image is marked corrupt.
#[test]
fn overlap_check_covers_snapshot_l1() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(1 << 20);
    o.cluster_size = 4096;
    let mut img = Image::create(s.clone(), &o).unwrap();
    img.write(0, &[1u8; 4096]).unwrap();
    img.snapshot_create("s").unwrap();
    img.write(0, &[2u8; 4096]).unwrap(); // COW: new L2 and data cluster, COPIED
    let sn_l1 = img.snapshots()[0].l1_table_offset;
    let l1_off = img.header().l1_table_offset;
    img.close().unwrap();
    let l1e = u64::from_be_bytes(s.read_vec(l1_off, 8).unwrap().try_into().unwrap());
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    s.write_at(&(sn_l1 | 1 << 63).to_be_bytes(), l2).unwrap();
    let mut img = Image::open(s.clone(), &OpenOptions::default()).unwrap();
    let e = img.write(0, &[3u8; 512]).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(e.to_string().contains("inactive L1 table"), "{e}");
    assert!(img.is_corrupt());
}

/// QEMU finds leaks at most. With a persistent error (`transient` false) the flags the
/// create pass strips before incrementing (so that COPIED is never set on a shared cluster)
/// cannot be restored either: "OFLAG_COPIED ... refcount=1" (a missing flag, which only costs
/// a copy-on-write and `check -r` restores) is then the one finding allowed besides leaks.
fn check_mem(s: &MemStorage, what: &str, transient: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    std::fs::write(&p, s.to_bytes()).unwrap();
    if transient {
        assert_clean(&p, false, what);
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(
            line.starts_with("ERROR OFLAG_COPIED") && line.ends_with("refcount=1"),
            "{what}: {line}\n{stderr}"
        );
    }
}

/// EIO at refcount, L2 and flush events of create, delete and apply: the operation fails,
/// and after reopening QEMU finds leaks at most.
#[test]
fn snapshot_ops_under_eio_leak_at_most() {
    let events = [
        Event::RefblockUpdatePart,
        Event::RefblockAlloc,
        Event::ClusterAlloc,
        Event::L2Update,
        Event::L2Load,
        Event::FlushToDisk,
    ];
    let mut fired = 0;
    for ev in events {
        for op in 0..3 {
            for once in [true, false] {
                let fs = Arc::new(FaultStorage::new(MemStorage::new()));
                let mut o = CreateOptions::new(4 << 20);
                o.cluster_size = 1024;
                let mut img = Image::create(fs.clone(), &o).unwrap();
                img.write(0, &[1u8; 64 << 10]).unwrap();
                img.write(2 << 20, &[2u8; 8 << 10]).unwrap();
                if op > 0 {
                    img.snapshot_create("s").unwrap();
                    img.write(0, &[3u8; 16 << 10]).unwrap();
                }
                img.flush().unwrap();
                let id = fs.add_rule(Rule::on_event(ev, errno::EIO).once(once));
                let r = match op {
                    0 => img.snapshot_create("x").map(|_| ()),
                    1 => img.snapshot_delete("s").map(|_| ()),
                    _ => img.snapshot_apply("s"),
                };
                let what = format!("{ev} during op {op} once {once}");
                if fs.fired(id) > 0 {
                    fired += 1;
                    let e = r.expect_err(&what);
                    assert_eq!(e.errno(), errno::EIO, "{what}: {e}");
                }
                fs.clear_rules();
                let _ = img.close();
                check_mem(fs.inner(), &what, once);
                // Reopens and works again.
                let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
                img.write(8192, &[7u8; 4096]).unwrap();
                img.close().unwrap();
                check_mem(fs.inner(), &format!("{what}, rewritten"), once);
            }
        }
    }
    assert!(fired >= 8, "only {fired} injections fired");
}

#[test]
fn refcount_bits_1_snapshot_is_refused_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r1.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.refcount_bits = 1;
    let mut img = Image::create_path(&p, &o).unwrap();
    img.write(0, &[1u8; 4096]).unwrap();
    let e = img.snapshot_create("s").unwrap_err();
    assert_eq!(e.errno(), errno::EINVAL, "{e}");
    assert!(img.poisoned().is_none());
    assert!(img.snapshots().is_empty());
    img.write(4096, &[2u8; 4096]).unwrap();
    img.close().unwrap();
    assert_clean(&p, true, "refcount_bits=1 refused snapshot");
}
