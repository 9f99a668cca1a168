//! Interop with qemu-img / qemu-io, both ways: snapshots we create are listed, applied and
//! deleted by qemu-img; snapshots qemu-img created are listed, applied and deleted by us;
//! `qemu-img check` is clean after every step and the guest data read back after every apply
//! is what was written before that snapshot.

mod common;
use common::*;
use std::path::Path;

fn open(path: &Path) -> TestImage {
    TestImage::open_file(path).unwrap()
}

fn names(img: &TestImage) -> Vec<(String, String)> {
    img.snapshots
        .entries()
        .iter()
        .map(|e| {
            (
                e.id_str().unwrap().to_owned(),
                e.name_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn ours_are_listed_applied_and_deleted_by_qemu_img() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=8",
        "cluster_size=65536,extended_l2=on",
        "compat=0.10,cluster_size=4096",
    ] {
        let (_d, p) = tmp_image();
        qemu_create(&p, opts, "32M");
        qemu_io(&p, &["write -P 0x11 0 1M", "write -c -P 0x12 4M 128k"]);
        let mut img = open(&p);
        img.create("s1").unwrap();
        img.close().unwrap();
        assert_clean(&p);
        qemu_io(&p, &["write -P 0x22 512k 1M", "write -P 0x23 8M 64k"]);
        let mut img = open(&p);
        img.create("s2").unwrap();
        img.close().unwrap();
        assert_clean(&p);
        assert_eq!(qemu_list(&p), pairs(&[("1", "s1"), ("2", "s2")]), "{opts}");

        qemu_io(&p, &["write -P 0x33 0 64k"]);
        let (code, _, err) = run("qemu-img", &["snapshot", "-a", "s1", p.to_str().unwrap()]);
        assert_eq!(code, 0, "{opts}: {err}");
        assert_clean(&p);
        verify(&p, 0x11, "0", "1M");
        verify(&p, 0x12, "4M", "128k");
        verify(&p, 0, "8M", "64k");
        let (code, _, err) = run("qemu-img", &["snapshot", "-a", "2", p.to_str().unwrap()]);
        assert_eq!(code, 0, "{opts}: {err}");
        verify(&p, 0x11, "0", "512k");
        verify(&p, 0x22, "512k", "1M");
        verify(&p, 0x23, "8M", "64k");
        assert_clean(&p);
        for name in ["s1", "s2"] {
            let (code, _, err) = run("qemu-img", &["snapshot", "-d", name, p.to_str().unwrap()]);
            assert_eq!(code, 0, "{opts}: {err}");
            assert_clean(&p);
        }
        verify(&p, 0x22, "512k", "1M");
        assert!(qemu_list(&p).is_empty());
    }
}

#[test]
fn qemu_img_snapshots_are_listed_applied_and_deleted_by_us() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=32",
        "cluster_size=16384,extended_l2=on",
        "compat=0.10",
    ] {
        let (_d, p) = tmp_image();
        let ps = p.to_str().unwrap();
        qemu_create(&p, opts, "16M");
        // Data, compressed data, and (v3) a preallocated zero cluster and a plain zero one.
        qemu_io(&p, &["write -P 0x41 0 256k", "write -c -P 0x42 1M 64k"]);
        if !opts.contains("0.10") {
            qemu_io(
                &p,
                &["write -P 0x43 2M 64k", "write -z 2M 64k", "write -z 3M 64k"],
            );
        }
        assert_eq!(run("qemu-img", &["snapshot", "-c", "a", ps]).0, 0);
        qemu_io(&p, &["write -P 0x51 128k 256k", "write -c -P 0x52 5M 64k"]);
        assert_eq!(run("qemu-img", &["snapshot", "-c", "b", ps]).0, 0);
        qemu_io(&p, &["write -P 0x61 0 512k"]);

        let mut img = open(&p);
        assert_eq!(names(&img), pairs(&[("1", "a"), ("2", "b")]), "{opts}");
        img.apply("a").unwrap();
        img.close().unwrap();
        assert_clean(&p);
        verify(&p, 0x41, "0", "256k");
        verify(&p, 0, "256k", "256k");
        verify(&p, 0x42, "1M", "64k");
        verify(&p, 0, "2M", "2M");

        let mut img = open(&p);
        img.apply("2").unwrap(); // by id
        img.close().unwrap();
        assert_clean(&p);
        verify(&p, 0x41, "0", "128k");
        verify(&p, 0x51, "128k", "256k");
        verify(&p, 0x52, "5M", "64k");
        verify(&p, 0x42, "1M", "64k");

        // Writes after the apply COW away from the snapshot, then delete both.
        qemu_io(&p, &["write -P 0x71 0 64k"]);
        let mut img = open(&p);
        let gone = img.delete("a").unwrap();
        assert_eq!(gone.name, b"a");
        img.close().unwrap();
        assert_clean(&p);
        assert_eq!(qemu_list(&p), pairs(&[("2", "b")]));
        let mut img = open(&p);
        img.delete("b").unwrap();
        img.close().unwrap();
        assert_clean(&p);
        assert!(qemu_list(&p).is_empty());
        verify(&p, 0x71, "0", "64k");
        verify(&p, 0x41, "64k", "64k");
        verify(&p, 0x51, "128k", "256k");
        // Every COPIED flag is back: writing in place must not allocate.
        let before = std::fs::metadata(&p).unwrap().len();
        qemu_io(&p, &["write -P 0x72 128k 64k"]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), before, "{opts}");
    }
}

#[test]
fn round_trips_and_ids_with_duplicate_names() {
    let (_d, p) = tmp_image();
    let ps = p.to_str().unwrap();
    qemu_create(&p, "cluster_size=4096", "4M");
    qemu_io(&p, &["write -P 1 0 64k"]);
    // qemu-img makes 1 and 2, deletes 1; our next id is 3 (max + 1, not count + 1).
    assert_eq!(run("qemu-img", &["snapshot", "-c", "x", ps]).0, 0);
    assert_eq!(run("qemu-img", &["snapshot", "-c", "dup", ps]).0, 0);
    assert_eq!(run("qemu-img", &["snapshot", "-d", "x", ps]).0, 0);
    let mut img = open(&p);
    img.create("dup").unwrap();
    assert_eq!(img.snapshots.next_id(), "4");
    img.close().unwrap();
    assert_clean(&p);
    assert_eq!(qemu_list(&p), pairs(&[("2", "dup"), ("3", "dup")]));
    // Delete is by name, first match; an id is not a name.
    let mut img = open(&p);
    assert!(matches!(
        img.delete("3"),
        Err(qcow2_snapshot::Error::NotFound { .. })
    ));
    img.delete("dup").unwrap();
    assert_eq!(names(&img), pairs(&[("3", "dup")]));
    img.close().unwrap();
    assert_clean(&p);
    // Snapshot entries written by us keep QEMU's fields: icount 0, 24 bytes of extra data,
    // disk size; qemu-img info shows them.
    let (_, info, _) = run("qemu-img", &["info", "--output=json", ps]);
    assert!(info.contains("\"icount\": 0"), "{info}");
    assert!(info.contains("\"vm-state-size\": 0"), "{info}");
}

#[test]
fn snapshot_l1_smaller_and_larger_than_active() {
    // iotest 029 flavour: the snapshot's L1 is smaller than the active one, then larger;
    // apply resizes the disk to the snapshot's size.
    let (_d, p) = tmp_image();
    let ps = p.to_str().unwrap();
    qemu_create(&p, "cluster_size=4096", "1M");
    qemu_io(&p, &["write -P 0x11 0 1M"]);
    let mut img = open(&p);
    img.create("small").unwrap();
    assert_eq!(img.snapshots.entries()[0].l1_size, 1);
    img.close().unwrap();
    assert_eq!(run("qemu-img", &["resize", ps, "4G"]).0, 0);
    qemu_io(&p, &["write -P 0x22 3G 64k", "write -P 0x23 0 4k"]);
    let mut img = open(&p);
    img.create("large").unwrap();
    assert_eq!(img.snapshots.entries()[1].disk_size, 4 << 30);
    img.apply("small").unwrap();
    assert_eq!(img.host.header.size, 1 << 20);
    assert!(img.host.l1.len() > 1, "the active L1 is never shrunk");
    img.close().unwrap();
    assert_clean(&p);
    verify(&p, 0x11, "0", "1M");
    let (_, info, _) = run("qemu-img", &["info", "--output=json", ps]);
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");

    let mut img = open(&p);
    img.apply("large").unwrap();
    img.close().unwrap();
    assert_clean(&p);
    verify(&p, 0x23, "0", "4k");
    verify(&p, 0x11, "4k", "1020k");
    verify(&p, 0x22, "3G", "64k");
    // qemu-img applies our snapshots the other way round too.
    assert_eq!(run("qemu-img", &["snapshot", "-a", "small", ps]).0, 0);
    assert_clean(&p);
    verify(&p, 0x11, "0", "1M");
}

#[test]
fn many_snapshots_and_shared_trees() {
    // iotest 007/015 flavour: ten snapshots with writes in between, applied in every order.
    let (_d, p) = tmp_image();
    qemu_create(&p, "cluster_size=1024", "2M");
    for i in 0..10u8 {
        qemu_io(
            &p,
            &[&format!("write -P {} {}k 64k", i + 1, u32::from(i) * 32)],
        );
        let mut img = open(&p);
        img.create(&format!("s{i}")).unwrap();
        img.close().unwrap();
    }
    assert_clean(&p);
    for i in [3u8, 9, 0, 5] {
        let mut img = open(&p);
        img.apply(&format!("s{i}")).unwrap();
        img.close().unwrap();
        assert_clean(&p);
        verify(&p, i + 1, &format!("{}k", u32::from(i) * 32), "64k");
    }
    for i in [4u8, 0, 9, 1, 2, 3, 5, 6, 7, 8] {
        let mut img = open(&p);
        img.delete(&format!("s{i}")).unwrap();
        img.close().unwrap();
        assert_clean(&p);
    }
    verify(&p, 6, "160k", "64k");
}
