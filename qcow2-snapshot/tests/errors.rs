//! Typed errors: refcount overflow with narrow refcounts (iotest 112), too many snapshots and
//! bad snapshot L1 tables (iotest 080), lookups, corruption found before anything changes.

mod common;
use common::*;
use qcow2_snapshot::Error;
use std::path::Path;

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn poke(path: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, at).unwrap();
}

#[test]
fn refcount_bits_1_refuses_the_first_snapshot_cleanly() {
    let (_d, p) = tmp_image();
    qemu_create(&p, "refcount_bits=1", "64M");
    qemu_io(&p, &["write -P 0x5a 0 512", "write -P 0x5b 1M 64k"]);
    let before = std::fs::read(&p).unwrap();
    let mut img = TestImage::open_file(&p).unwrap();
    let e = img.create("foo").unwrap_err();
    assert!(matches!(e, Error::RefcountOverflow { max: 1, .. }), "{e:?}");
    assert_eq!(e.errno(), qcow2_io::errno::EINVAL);
    assert!(e.to_string().starts_with("Invalid argument"), "{e}");
    assert!(img.snapshots.is_empty());
    img.close().unwrap();
    // QEMU leaks the L1 copy here ("Leaked cluster 6"); we undo everything.
    assert_clean(&p);
    assert!(qemu_list(&p).is_empty());
    verify(&p, 0x5a, "0", "512");
    // The active tree still has its COPIED flags: the L1 entry is unchanged on disk.
    let after = std::fs::read(&p).unwrap();
    assert_eq!(be64(&after, 0x30000), be64(&before, 0x30000));
}

#[test]
fn refcount_bits_2_refuses_the_third_snapshot_cleanly() {
    let (_d, p) = tmp_image();
    qemu_create(&p, "refcount_bits=2", "64M");
    qemu_io(&p, &["write -P 0x5a 0 512"]);
    let mut img = TestImage::open_file(&p).unwrap();
    img.create("foo").unwrap();
    img.create("bar").unwrap();
    let e = img.create("baz").unwrap_err();
    assert!(matches!(e, Error::RefcountOverflow { max: 3, .. }), "{e:?}");
    assert_eq!(img.snapshots.len(), 2);
    img.close().unwrap();
    assert_clean(&p);
    assert_eq!(qemu_list(&p).len(), 2);
    // Deleting one makes room again.
    let mut img = TestImage::open_file(&p).unwrap();
    img.delete("foo").unwrap();
    img.create("baz").unwrap();
    img.close().unwrap();
    assert_clean(&p);
}

#[test]
fn compressed_cluster_at_refcount_max_overflows_cleanly() {
    // With 4-bit refcounts a host cluster full of tiny compressed clusters sits at 15; the
    // snapshot's +1 on it must fail and leave no trace (qemu-img fails the same way).
    let (_d, p) = tmp_image();
    qemu_create(&p, "cluster_size=4096,refcount_bits=4", "16M");
    qemu_io(&p, &["write -P 0x41 0 256k", "write -c -P 0x42 1M 64k"]);
    let mut img = TestImage::open_file(&p).unwrap();
    let e = img.create("a").unwrap_err();
    assert!(
        matches!(
            e,
            Error::RefcountOverflow {
                refcount: 15,
                max: 15,
                ..
            }
        ),
        "{e:?}"
    );
    img.close().unwrap();
    assert_clean(&p);
    verify(&p, 0x42, "1M", "64k");
}

#[test]
fn too_many_snapshots_is_file_too_large() {
    // iotest 080: nb_snapshots 0x10000 with the table beyond the end of the file.
    let (_d, p) = tmp_image();
    qemu_create(&p, "", "64M");
    poke(&p, 60, &[0, 1, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0]);
    let mut img = TestImage::open_file(&p).unwrap();
    assert_eq!(img.snapshots.len(), 65536);
    let e = img.create("test").unwrap_err();
    assert!(
        matches!(e, Error::TooManySnapshots { count: 65536 }),
        "{e:?}"
    );
    assert_eq!(e.errno(), qcow2_io::errno::EFBIG);
    assert!(e.to_string().starts_with("File too large"));
    let (code, _, err) = run("qemu-img", &["snapshot", "-c", "test", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("File too large"), "{err}");
}

/// An image with one snapshot "test" made by qemu-img; returns the file offset of its table
/// entry.
fn with_snapshot(p: &Path) -> u64 {
    qemu_create(p, "", "64M");
    qemu_io(p, &["write -P 0x11 0 64k"]);
    assert_eq!(
        run("qemu-img", &["snapshot", "-c", "test", p.to_str().unwrap()]).0,
        0
    );
    be64(&std::fs::read(p).unwrap(), 64)
}

#[test]
fn snapshot_l1_offset_invalid() {
    let (_d, p) = tmp_image();
    let table = with_snapshot(&p);
    poke(&p, table, &0x400200u64.to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let mut img = TestImage::open_file(&p).unwrap();
    let e = img.apply("test").unwrap_err();
    assert!(
        matches!(e, Error::L1OffsetInvalid { offset: 0x400200 }),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "Snapshot L1 table offset invalid");
    assert_eq!(e.errno(), qcow2_io::errno::EINVAL);
    let e = img.delete("test").unwrap_err();
    assert!(matches!(e, Error::L1OffsetInvalid { .. }), "{e:?}");
    img.close().unwrap();
    assert!(std::fs::read(&p).unwrap() == before, "nothing written");
    // qemu-img agrees.
    let (_, _, err) = run("qemu-img", &["snapshot", "-d", "test", p.to_str().unwrap()]);
    assert!(err.contains("Snapshot L1 table offset invalid"), "{err}");
}

#[test]
fn snapshot_l1_too_large() {
    let (_d, p) = tmp_image();
    let table = with_snapshot(&p);
    poke(&p, table + 8, &0x1000_0000u32.to_be_bytes());
    let mut img = TestImage::open_file(&p).unwrap();
    let e = img.apply("1").unwrap_err();
    assert!(
        matches!(
            e,
            Error::L1TooLarge {
                l1_size: 0x1000_0000
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "Snapshot L1 table too large");
    assert_eq!(e.errno(), qcow2_io::errno::EFBIG);
    assert!(matches!(
        img.delete("test").unwrap_err(),
        Error::L1TooLarge { .. }
    ));
    let (_, _, err) = run("qemu-img", &["snapshot", "-a", "test", p.to_str().unwrap()]);
    assert!(err.contains("Snapshot L1 table too large"), "{err}");
}

#[test]
fn not_found() {
    let (_d, p) = tmp_image();
    with_snapshot(&p);
    let mut img = TestImage::open_file(&p).unwrap();
    let e = img.apply("nosuch").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    assert_eq!(e.errno(), 2);
    assert!(matches!(img.delete("1"), Err(Error::NotFound { .. })));
    img.apply("1").unwrap();
    img.close().unwrap();
    assert_clean(&p);
}

#[test]
fn corrupt_trees_fail_before_any_change() {
    // Fresh 64 KiB layout: L1 at 0x30000, first L2 at 0x40000, data at 0x50000.
    let cases: [(&str, u64, u64); 4] = [
        ("unaligned data cluster", 0x40000, 0x8000_0000_0005_0200),
        (
            "data far beyond the end of the file",
            0x40000,
            0x8000_00ff_ffff_0000,
        ),
        ("unaligned L2 table", 0x30000, 0x8000_0000_0004_0200),
        ("L1 entry without offset", 0x30000, 0x8000_0000_0000_0000),
    ];
    for (what, at, value) in cases {
        let (_d, p) = tmp_image();
        // The L2 table at 0x40000 is shared by the active and the snapshot L1.
        with_snapshot(&p);
        poke(&p, at, &value.to_be_bytes());
        let before = std::fs::read(&p).unwrap();
        let mut img = TestImage::open_file(&p).unwrap();
        let e = img.create("x").unwrap_err();
        assert!(e.is_corruption(), "{what}: {e:?}");
        if at == 0x40000 {
            let e2 = img.apply("test").unwrap_err();
            assert!(e2.is_corruption(), "{what}: {e2:?}");
        }
        img.close().unwrap();
        // The L1 copy of the failed create was allocated, written beyond the old end of the
        // file and freed again; everything that existed is unchanged.
        let after = std::fs::read(&p).unwrap();
        assert!(
            after[..before.len()] == before[..],
            "{what}: nothing changed"
        );
        match value {
            0x8000_0000_0005_0200 => assert!(
                e.to_string()
                    .starts_with("Cluster allocation offset 0x50200 unaligned (L2 offset: 0x"),
                "{e}"
            ),
            0x8000_0000_0004_0200 => assert_eq!(
                e.to_string(),
                "L2 table offset 0x40200 unaligned (L1 index: 0)"
            ),
            _ => {}
        }
    }
}

#[test]
fn data_file_images_are_refused() {
    struct NoSnapshots(qcow2_snapshot::test_utils::TestHost);
    impl qcow2_snapshot::SnapshotHost for NoSnapshots {
        fn parts(&mut self) -> qcow2_snapshot::HostParts<'_> {
            self.0.parts()
        }
        fn geometry(&self) -> qcow2_format::Geometry {
            self.0.geometry()
        }
        fn virtual_size(&self) -> u64 {
            self.0.virtual_size()
        }
        fn l1_table_offset(&self) -> u64 {
            self.0.l1_table_offset()
        }
        fn snapshot_table_switched(&mut self, nb: u32, off: u64) {
            self.0.snapshot_table_switched(nb, off)
        }
        fn resize(&mut self, s: u64) -> Result<(), qcow2_snapshot::HostError> {
            self.0.resize(s)
        }
        fn grow_l1(&mut self, n: u32) -> Result<(), qcow2_snapshot::HostError> {
            self.0.grow_l1(n)
        }
        fn has_data_file(&self) -> bool {
            true
        }
    }
    let (_d, p) = tmp_image();
    with_snapshot(&p);
    let img = TestImage::open_file(&p).unwrap();
    let mut snaps = img.snapshots.clone();
    let mut host = NoSnapshots(img.host);
    assert!(matches!(snaps.create(&mut host, "x"), Err(Error::DataFile)));
    assert!(matches!(
        snaps.apply(&mut host, "test"),
        Err(Error::DataFile)
    ));
}

#[test]
fn unaligned_snapshot_table_is_refused_at_load() {
    let (_d, p) = tmp_image();
    with_snapshot(&p);
    poke(&p, 64, &0x1234_5678_90ab_cdefu64.to_be_bytes());
    let e = TestImage::open_file(&p).err().unwrap();
    assert!(matches!(e, Error::TableOffsetInvalid { .. }), "{e:?}");
    assert_eq!(e.to_string(), "Snapshot table offset invalid");
}
