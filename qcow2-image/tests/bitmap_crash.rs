//! Persistent bitmaps whatever happens to the storage: at every instant on disk, whatever
//! crashes (every crash state of every flush interval) and whatever write or flush fails
//! (error injection at each request of the store), each bitmap is either IN_USE or
//! consistent **and correct**: an enabled bitmap holds every granule whose guest data
//! changed (and no granule nobody wrote), a disabled one is unchanged.

mod common;

use common::assert_clean;
use qcow2_image::{Image, OpenOptions};
use qcow2_io::crash::{CrashOptions, CrashStorage};
use qcow2_io::fault::{FaultStorage, IoKinds, Rule};
use qcow2_io::{errno, MemStorage};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};

const G: u64 = 4096;
const SIZE: u64 = 4 << 20;

/// The guest changes made under test: (offset, len, kind 0 write / 1 zero / 2 discard).
const CHANGES: [(u64, u64, u8); 4] = [
    (64 << 10, 8192, 0),
    (1 << 20, 64 << 10, 1),
    (3 << 20, 4096, 0),
    (2 << 20, 8192, 2),
];

fn qemu(args: &[&str], tool: &str) {
    let st = Command::new(tool).args(args).output().expect(tool);
    assert!(st.status.success(), "{tool} {args:?}");
}

/// A QEMU image with an enabled bitmap and a disabled ("frozen") one, both holding the
/// granule of a write QEMU made before `frozen` was disabled.
fn qemu_image() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("b.qcow2");
    let ps = p.to_str().expect("utf-8 path");
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            ps,
            "4M",
        ],
        "qemu-img",
    );
    qemu(&["bitmap", "--add", ps, "enabled"], "qemu-img");
    qemu(&["bitmap", "--add", ps, "frozen"], "qemu-img");
    qemu(&["-f", "qcow2", "-c", "write -P 0x11 0 4k", ps], "qemu-io");
    qemu(&["bitmap", "--disable", ps, "frozen"], "qemu-img");
    std::fs::read(&p).expect("read")
}

fn guest(image: &[u8]) -> Vec<u8> {
    let mut img = Image::open(
        Arc::new(MemStorage::from_bytes(image.to_vec())),
        &OpenOptions::read_only(),
    )
    .expect("open");
    let mut buf = vec![0u8; SIZE as usize];
    img.read(0, &mut buf).expect("read");
    buf
}

fn granules(ranges: impl Iterator<Item = (u64, u64)>) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (o, l) in ranges {
        if l > 0 {
            s.extend(o / G..=(o + l - 1) / G);
        }
    }
    s
}

fn apply_changes(img: &mut Image) -> qcow2_image::Result<()> {
    for (off, len, kind) in CHANGES {
        match kind {
            0 => img.write(off, &vec![0x5a; len as usize])?,
            1 => img.write_zeroes(off, len, false)?,
            _ => img.discard(off, len)?,
        }
    }
    Ok(())
}

/// Asserts the bitmap invariant on one on-disk state; returns how many bitmaps were
/// consistent.
fn assert_bitmaps_correct(state: &[u8], original: &[u8], what: &str) -> usize {
    let img = Image::open(
        Arc::new(MemStorage::from_bytes(state.to_vec())),
        &OpenOptions::read_only(),
    )
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let list = img.bitmaps().expect("bitmaps");
    assert_eq!(list.len(), 2, "{what}: bitmaps lost");
    let before = guest(original);
    let now = guest(state);
    let changed: BTreeSet<u64> = (0..SIZE / G)
        .filter(|&g| {
            let r = (g * G) as usize..((g + 1) * G) as usize;
            before[r.clone()] != now[r]
        })
        .collect();
    let initial = BTreeSet::from([0u64]);
    let mut written = granules(CHANGES.iter().map(|&(o, l, _)| (o, l)));
    written.extend(&initial);
    let mut consistent = 0;
    for b in list {
        if b.in_use {
            continue;
        }
        consistent += 1;
        let bits = granules(img.dirty_ranges(&b.name).expect("ranges"));
        match b.name.as_str() {
            "frozen" => {
                assert!(!b.auto, "{what}: frozen became enabled");
                assert_eq!(bits, initial, "{what}: the disabled bitmap changed");
            }
            _ => {
                assert!(b.auto, "{what}: enabled became disabled");
                assert!(
                    changed.is_subset(&bits) && initial.is_subset(&bits),
                    "{what}: a consistent bitmap misses changed data: {changed:?} vs {bits:?}"
                );
                assert!(
                    bits.is_subset(&written),
                    "{what}: bits nobody wrote: {bits:?}"
                );
            }
        }
    }
    consistent
}

#[test]
fn every_crash_state_leaves_bitmaps_in_use_or_correct() {
    let original = qemu_image();
    let storage = Arc::new(CrashStorage::from_bytes(original.clone()));
    let cps = Arc::new(Mutex::new(Vec::new()));
    {
        let cps = cps.clone();
        storage.on_flush(move |cp| {
            cps.lock().expect("lock").push(cp.clone());
            Ok(())
        });
    }
    let mut img = Image::open(storage.clone(), &OpenOptions::default()).expect("open");
    apply_changes(&mut img).expect("changes");
    img.flush().expect("flush");
    img.close().expect("close");
    let mut all = cps.lock().expect("lock").clone();
    all.push(storage.checkpoint());
    let (mut states, mut consistent_with_changes) = (0, 0);
    for (i, cp) in all.iter().enumerate() {
        for st in cp.crash_states(&CrashOptions::thorough(4, 7 + i as u64)) {
            states += 1;
            let what = format!("checkpoint {i} {:?}", st.kind);
            let n = assert_bitmaps_correct(&st.image, &original, &what);
            if n > 0 && guest(&st.image) != guest(&original) {
                consistent_with_changes += 1;
            }
        }
    }
    // The final state: both consistent, stored, and QEMU finds nothing wrong.
    let final_bytes = storage.checkpoint().durable().to_vec();
    assert_eq!(
        assert_bitmaps_correct(&final_bytes, &original, "final"),
        2,
        "stored bitmaps are consistent"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("final.qcow2");
    std::fs::write(&p, &final_bytes).expect("write");
    assert_clean(&p, true, "final");
    assert!(
        states > 20 && consistent_with_changes > 0,
        "{states} states, {consistent_with_changes} consistent after changes"
    );
}

#[test]
fn failed_writes_and_flushes_during_the_store_never_corrupt() {
    let original = qemu_image();
    let mut n = 1;
    let mut failed_runs = 0;
    loop {
        let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(original.clone())));
        let mut img = Image::open(fs.clone(), &OpenOptions::default()).expect("open");
        apply_changes(&mut img).expect("changes");
        img.flush().expect("flush");
        // Fail the n-th write or flush of the close (the bitmap store comes first).
        let id = fs.add_rule(
            Rule::on_request(n, errno::EIO)
                .kinds(IoKinds::WRITE | IoKinds::FLUSH)
                .once(true),
        );
        let closed = img.close();
        let fired = fs.fired(id) > 0;
        fs.clear_rules();
        let what = format!("request {n} failed");
        if fired {
            assert!(closed.is_err(), "{what}: the error was swallowed");
            failed_runs += 1;
        } else {
            closed.expect("close without a fault");
        }
        let bytes = fs.inner().to_bytes();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.qcow2");
        std::fs::write(&p, &bytes).expect("write");
        assert_clean(&p, !fired, &what);
        let consistent = assert_bitmaps_correct(&bytes, &original, &what);
        if !fired {
            assert_eq!(consistent, 2, "the store without faults");
            break;
        }
        n += 1;
        assert!(n < 200, "the close never finished");
    }
    assert!(failed_runs > 5, "{failed_runs} injected failures");
}

/// Three threads write and zero at once through one `SharedImage` with an enabled bitmap
/// (the tracking runs under the metadata lock each request takes anyway); flushes run
/// from every thread. In every crash state of sampled flush intervals and after the close,
/// the bitmap is IN_USE or holds every granule whose data changed; after the close it holds
/// exactly the granules written.
#[test]
fn concurrent_writers_crash_states_keep_the_bitmap_honest() {
    use qcow2_image::{BitmapAddOptions, CreateOptions, SharedImage};
    const REGION: u64 = 1 << 20;
    let storage = Arc::new(CrashStorage::new());
    let mut o = CreateOptions::new(3 * REGION);
    o.cluster_size = 4096;
    let mut img = Image::create(storage.clone(), &o).expect("create");
    img.bitmap_add(
        "t",
        &BitmapAddOptions {
            granularity: Some(G),
            disabled: false,
        },
    )
    .expect("add");
    img.close().expect("close");
    let original = storage.checkpoint().durable().to_vec();
    let cps = Arc::new(Mutex::new(Vec::new()));
    let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (cps, flushes) = (cps.clone(), flushes.clone());
        storage.on_flush(move |cp| {
            if flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5 == 0 {
                cps.lock().expect("lock").push(cp.clone());
            }
            Ok(())
        });
    }
    let shared = Arc::new(SharedImage::new(
        Image::open(storage.clone(), &OpenOptions::default()).expect("open"),
    ));
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let s = shared.clone();
            std::thread::spawn(move || {
                let mut touched = Vec::new();
                let mut x = t * 7 + 1;
                for i in 0..40u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = t * REGION + (x >> 33) % (REGION - 20_000);
                    let len = 1 + (x >> 20) % 9000;
                    if i % 7 == 6 {
                        s.write_zeroes(off, len, false).expect("zero");
                    } else {
                        s.write(off, &vec![(t + 1) as u8; len as usize])
                            .expect("write");
                    }
                    touched.push((off, len));
                    if i % 5 == 4 {
                        s.flush().expect("flush");
                    }
                }
                touched
            })
        })
        .collect();
    let mut written = BTreeSet::new();
    for t in threads {
        written.extend(granules(t.join().expect("thread").into_iter()));
    }
    let shared = Arc::into_inner(shared).expect("last reference");
    shared.close().expect("close");
    let mut all = cps.lock().expect("lock").clone();
    all.push(storage.checkpoint());
    let before = {
        let mut i = Image::open(
            Arc::new(MemStorage::from_bytes(original.clone())),
            &OpenOptions::read_only(),
        )
        .expect("open");
        let mut b = vec![0u8; (3 * REGION) as usize];
        i.read(0, &mut b).expect("read");
        b
    };
    let (mut states, mut in_use, mut checked) = (0, 0, 0);
    for (n, cp) in all.iter().enumerate() {
        for st in cp.crash_states(&CrashOptions::thorough(2, 11 + n as u64)) {
            states += 1;
            let img = Image::open(
                Arc::new(MemStorage::from_bytes(st.image.clone())),
                &OpenOptions::read_only(),
            )
            .expect("open crash state");
            let b = &img.bitmaps().expect("bitmaps")[0];
            if b.in_use {
                in_use += 1;
                continue;
            }
            checked += 1;
            let mut now = vec![0u8; (3 * REGION) as usize];
            let mut img = img;
            img.read(0, &mut now).expect("read");
            let bits = granules(img.dirty_ranges("t").expect("ranges"));
            for g in 0..3 * REGION / G {
                let r = (g * G) as usize..((g + 1) * G) as usize;
                assert!(
                    before[r.clone()] == now[r] || bits.contains(&g),
                    "checkpoint {n} {:?}: granule {g} changed but is clean",
                    st.kind
                );
            }
            assert!(bits.is_subset(&written), "bits nobody wrote");
        }
    }
    let last = storage.checkpoint().durable().to_vec();
    let img = Image::open(
        Arc::new(MemStorage::from_bytes(last)),
        &OpenOptions::read_only(),
    )
    .expect("open");
    assert!(!img.bitmaps().expect("bitmaps")[0].in_use);
    assert_eq!(granules(img.dirty_ranges("t").expect("ranges")), written);
    assert!(
        states > 10 && in_use > 0 && checked > 0,
        "{states} crash states, {in_use} in use, {checked} consistent checked"
    );
}
