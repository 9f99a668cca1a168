//! (4) Error injection with `FaultStorage` at QEMU's blkdebug events (iotest 026 style): the
//! operation fails with the injected errno, the image shows no corruption under
//! `qemu-img check` after reopening (leaks allowed), and after a failed flush the image
//! refuses writes until it is reopened.

mod common;

use common::assert_clean;
use qcow2_image::{CreateOptions, Image, ImageError, OpenOptions};
use qcow2_io::fault::{FaultStorage, Rule};
use qcow2_io::{errno, Event, MemStorage};
use std::sync::Arc;

type Fs = Arc<FaultStorage<MemStorage>>;

fn fresh(cluster: u64, refcount_bits: u32, size: u64) -> Fs {
    let fs: Fs = Arc::new(FaultStorage::new(MemStorage::new()));
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster;
    o.refcount_bits = refcount_bits;
    let mut img = Image::create(fs.clone(), &o).unwrap();
    // An L2 table exists, so l2_load / l2_update have something to hit.
    img.write(0, &[1u8; 512]).unwrap();
    img.close().unwrap();
    fs
}

fn check_no_corruption(fs: &Fs, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    std::fs::write(&p, fs.inner().to_bytes()).unwrap();
    assert_clean(&p, false, what);
}

fn errno_of(e: &ImageError) -> i32 {
    e.errno()
}

#[test]
fn iotest_026_style_events() {
    let events = [
        Event::L1Update,
        Event::L2Load,
        Event::L2Update,
        Event::L2AllocWrite,
        Event::WriteAio,
        Event::RefblockLoad,
        Event::RefblockUpdatePart,
        Event::RefblockAlloc,
        Event::ClusterAlloc,
    ];
    let mut fired = 0;
    for ev in events {
        for code in [errno::EIO, errno::ENOSPC] {
            for once in [true, false] {
                let what = format!("{ev} errno {code} once {once}");
                let fs = fresh(1024, 16, 64 << 20);
                let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
                let id = fs.add_rule(Rule::on_event(ev, code).once(once));
                // 128 KiB at 0 (existing L2), then 128 KiB far away (new L2 table, and with
                // 1 KiB clusters a new refcount block).
                let data = vec![0x5au8; 128 << 10];
                let r1 = img.write(0, &data);
                let r2 = img.write(48 << 20, &data);
                let r3 = img.flush();
                if fs.fired(id) > 0 {
                    fired += 1;
                    let err = [r1, r2, r3]
                        .into_iter()
                        .find_map(Result::err)
                        .unwrap_or_else(|| panic!("{what}: injected error was swallowed"));
                    assert_eq!(errno_of(&err), code, "{what}: {err}");
                }
                fs.clear_rules();
                let _ = img.close();
                check_no_corruption(&fs, &what);
                // The image opens and works again.
                let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
                img.write(4096, &[7u8; 4096]).unwrap();
                img.close().unwrap();
                check_no_corruption(&fs, &format!("{what}, rewritten"));
            }
        }
    }
    assert!(fired >= 20, "only {fired} injections fired");
}

#[test]
fn growth_events_fail_cleanly() {
    // L1 growth (resize) and refcount-table growth (512-byte clusters, 64-bit refcounts:
    // one reftable cluster describes 2 MiB).
    let cases = [
        Event::L1GrowAllocTable,
        Event::L1GrowWriteTable,
        Event::L1GrowActivateTable,
        Event::RefblockAllocHookup,
        Event::RefblockAllocWrite,
        Event::RefblockAllocWriteBlocks,
        Event::RefblockAllocWriteTable,
        Event::RefblockAllocSwitchTable,
    ];
    let mut fired = 0;
    for ev in cases {
        for once in [true, false] {
            let what = format!("{ev} once {once}");
            let fs = fresh(512, 64, 1 << 20);
            let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
            let id = fs.add_rule(Rule::on_event(ev, errno::ENOSPC).once(once));
            let r = img
                .resize(8 << 20)
                .and_then(|()| img.write(0, &vec![3u8; 3 << 20]));
            if fs.fired(id) > 0 {
                fired += 1;
                let err = r.err().unwrap_or_else(|| panic!("{what}: no error"));
                assert_eq!(err.errno(), errno::ENOSPC, "{what}: {err}");
            }
            fs.clear_rules();
            let _ = img.close();
            check_no_corruption(&fs, &what);
        }
    }
    assert!(fired >= 12, "only {fired} growth injections fired");
}

#[test]
fn temporary_data_write_failure_leaks_nothing() {
    // iotest 026 part 4: write_aio EIO once; the first write fails, the second succeeds and
    // the image is strictly clean.
    let fs = fresh(65536, 16, 64 << 20);
    let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
    fs.add_rule(Rule::on_event(Event::WriteAio, errno::EIO).once(true));
    let data = vec![9u8; 1 << 20];
    let e = img.write(1 << 20, &data).unwrap_err();
    assert_eq!(e.errno(), errno::EIO);
    img.write(1 << 20, &data).unwrap();
    img.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p4.qcow2");
    std::fs::write(&p, fs.inner().to_bytes()).unwrap();
    assert_clean(&p, true, "026 part 4");
}

#[test]
fn failed_flush_poisons_until_reopen() {
    let fs = fresh(65536, 16, 16 << 20);
    let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
    img.write(65536, &[1u8; 4096]).unwrap();
    fs.add_rule(Rule::on_event(Event::FlushToDisk, errno::EIO).once(true));
    let e = img.flush().unwrap_err();
    assert_eq!(e.errno(), errno::EIO);
    assert!(img.poisoned().is_some());
    let e = img.write(0, &[2u8; 512]).unwrap_err();
    assert!(matches!(e, ImageError::Poisoned { .. }), "{e}");
    assert!(img.flush().is_err());
    // Reads still work.
    let mut b = [0u8; 512];
    img.read(0, &mut b).unwrap();
    drop(img);
    check_no_corruption(&fs, "poisoned");
    let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
    img.write(0, &[2u8; 512]).unwrap();
    img.close().unwrap();
    check_no_corruption(&fs, "after reopen");
}

#[test]
fn failed_l2_write_back_poisons() {
    let fs = fresh(65536, 16, 16 << 20);
    let mut img = Image::open(fs.clone(), &OpenOptions::default()).unwrap();
    img.write(65536, &[1u8; 4096]).unwrap();
    fs.add_rule(Rule::on_event(Event::L2Update, errno::EIO).once(true));
    let e = img.flush().unwrap_err();
    assert_eq!(e.errno(), errno::EIO, "{e}");
    assert!(matches!(
        img.write(0, &[1]).unwrap_err(),
        ImageError::Poisoned { .. }
    ));
    drop(img);
    check_no_corruption(&fs, "l2_update write-back");
}

/// External data file: every write or flush of the data file failing in turn (from the
/// n-th request on). The failing operation reports the errno; reopened, the image file has
/// no corruption (the checker), and every written range reads back either new or old data —
/// never an L2 entry pointing at data that did not reach the data file before it.
#[test]
fn data_file_write_and_flush_failures_never_corrupt() {
    use qcow2_image::DataFileStorage;
    use qcow2_io::fault::IoKinds;
    for n in 1..=8u64 {
        let meta = Arc::new(MemStorage::new());
        let data: Fs = Arc::new(FaultStorage::new(MemStorage::new()));
        let mut o = CreateOptions::new(4 << 20);
        o.data_file = Some("d.raw".into());
        let open = OpenOptions {
            data_file: Some(DataFileStorage(data.clone())),
            ..OpenOptions::default()
        };
        let mut img = Image::create_with(meta.clone(), &o, &open).unwrap();
        img.write(0, &[1u8; 65536]).unwrap();
        img.flush().unwrap();
        data.add_rule(Rule::on_request(n, errno::EIO).kinds(IoKinds::WRITE | IoKinds::FLUSH));
        let steps: [(u64, usize, u8); 3] =
            [(65536, 131072, 2), (4096, 8192, 3), (1 << 20, 4096, 4)];
        let mut failed = false;
        for (off, len, byte) in steps {
            match img.write(off, &vec![byte; len]).and_then(|()| img.flush()) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.errno(), errno::EIO, "n={n}: {e}");
                    failed = true;
                    break;
                }
            }
        }
        img.abandon();
        assert!(failed || n > 6, "n={n}: nothing failed");
        data.clear_rules();
        let r = qcow2_check::check(meta.clone(), &qcow2_check::CheckOptions::default()).unwrap();
        assert_eq!(r.result.corruptions, 0, "n={n}: {:?}", r.findings);
        let mut img = Image::open(meta.clone(), &open).unwrap();
        for (off, len, byte) in [
            (0u64, 65536usize, 1u8),
            (65536, 131072, 2),
            (1 << 20, 4096, 4),
        ] {
            let mut buf = vec![0u8; len];
            img.read(off, &mut buf).unwrap();
            let old = if off == 0 { 1 } else { 0 };
            for (i, chunk) in buf.chunks(512).enumerate() {
                // Unwritten old bytes, the new byte, or (for the partial COW at 4096) the
                // bytes of the write at 4096.
                assert!(
                    chunk.iter().all(|&b| b == old || b == byte || b == 3),
                    "n={n}: {off:#x}+{}: {:?}",
                    i * 512,
                    &chunk[..4]
                );
            }
        }
    }
}
