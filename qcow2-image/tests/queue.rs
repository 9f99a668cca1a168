//! Many requests in flight from few threads: `SharedImage::queue` over io_uring (buffered
//! and `O_DIRECT` files) and over the synchronous queue (memory), against a model of the
//! disk, against the threaded path reading the same image, and against QEMU reading the
//! result (`qemu-img compare` with a raw copy of the model, `qemu-img check`).

mod common;

use common::{assert_clean, assert_compare, Rng};
use qcow2_image::{CreateOptions, Done, Image, OpenOptions, RequestQueue, SharedImage};
use qcow2_io::{CacheMode, FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

const THREADS: u64 = 2;
const REGION: u64 = 8 << 20;
const DEPTH: usize = 32;

/// Opens `path` with io_uring enabled (and `O_DIRECT` with `direct`); `None` where the
/// kernel or the file system cannot (seccomp, old kernel, tmpfs without `O_DIRECT`).
fn open_uring(path: &Path, direct: bool) -> Option<Image> {
    let mode = if direct {
        CacheMode::None
    } else {
        CacheMode::Writeback
    };
    let mut f = match FileStorage::open_cached(path, true, mode) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(22) => return None,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = f.enable_io_uring() {
        eprintln!("no io_uring here ({e}): skipping");
        return None;
    }
    Some(Image::open_file(f, path, &OpenOptions::default()).unwrap())
}

/// Takes every finished request out of `q`, checking reads against `model` (the ranges
/// in flight never overlap, so each read has exactly one right answer).
fn reap(q: &mut RequestQueue<'_>, min: usize, expect: &mut Vec<(u64, Vec<u8>)>) {
    let mut done: Vec<Done> = Vec::new();
    q.complete(min, &mut done).unwrap();
    for d in done {
        d.result.unwrap();
        if let Some(data) = d.data {
            let i = expect.iter().position(|e| e.0 == d.tag).unwrap();
            let (_, want) = expect.swap_remove(i);
            assert!(*data == want[..], "read {} differs", d.tag);
        }
    }
}

/// One thread's random workload on its region through a queue of `DEPTH`: writes
/// (aligned and not, into fresh clusters, rewrites, neighbours in one cluster) and
/// reads, never two requests in flight on the same bytes. Returns the region's model.
fn drive(shared: &SharedImage, tid: u64, seed: u64) -> Vec<u8> {
    let base = tid * REGION;
    let mut model = vec![0u8; REGION as usize];
    let mut rng = Rng(seed);
    let mut q = shared.queue(DEPTH).unwrap();
    let mut busy: Vec<(u64, u64, u64)> = Vec::new();
    let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
    for tag in 0..1500u64 {
        // Mostly 4 KiB-aligned (the O_DIRECT path), some odd sizes (the buffered one),
        // clustered around a few hot clusters so requests meet in-flight allocations.
        let len = if rng.chance(70) {
            4096 * (1 + rng.below(4))
        } else {
            1 + rng.below(70_000)
        };
        let hot = rng.below(16) * 65536 * 7 % (REGION - 200_000);
        let off = if rng.chance(70) {
            (hot + rng.below(4) * 4096) / 512 * 512
        } else {
            rng.below(REGION - len)
        };
        let off = off.min(REGION - len);
        if busy.iter().any(|&(_, s, e)| s < off + len && off < e) {
            // Overlapping bytes in flight would make the outcome depend on the order:
            // finish everything first.
            reap(&mut q, usize::MAX, &mut expect);
            busy.clear();
        }
        if rng.chance(35) {
            let want = model[off as usize..(off + len) as usize].to_vec();
            expect.push((tag, want));
            q.read(tag, base + off, len as usize).unwrap();
        } else {
            let data = rng.data(len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            q.write(tag, base + off, &data).unwrap();
        }
        busy.push((tag, off, off + len));
        if q.in_flight() >= DEPTH {
            reap(&mut q, 1, &mut expect);
            // Whatever finished no longer blocks its bytes; keep it simple: forget the
            // ranges only when the queue is empty.
            if q.in_flight() == 0 {
                busy.clear();
            }
        }
    }
    reap(&mut q, usize::MAX, &mut expect);
    assert!(expect.is_empty());
    model
}

/// The whole scenario on `img`: threads with queues, then the threaded path and a
/// queue reading everything back; returns the disk's model.
fn scenario(img: Image, seed: u64) -> (SharedImage, Vec<u8>) {
    let shared = SharedImage::new(img);
    {
        let q = shared.queue(4).unwrap();
        eprintln!("queue: {q:?}");
    }
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let shared = &shared;
                s.spawn(move || drive(shared, t, seed + t))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let model = models.concat();
    // The threaded path reads what the queues wrote.
    let mut back = vec![0u8; model.len()];
    for (i, c) in back.chunks_mut(1 << 20).enumerate() {
        shared.read(i as u64 * (1 << 20), c).unwrap();
    }
    assert!(back == model, "threaded reads differ from the model");
    // And a queue reads it back too, in 1 MiB pieces at depth 8.
    {
        let mut q = shared.queue(8).unwrap();
        let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
        for (i, c) in model.chunks(1 << 20).enumerate() {
            expect.push((i as u64, c.to_vec()));
            q.read(i as u64, i as u64 * (1 << 20), c.len()).unwrap();
            if q.in_flight() >= 8 {
                reap(&mut q, 1, &mut expect);
            }
        }
        reap(&mut q, usize::MAX, &mut expect);
    }
    (shared, model)
}

fn file_case(direct: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.qcow2");
    Image::create_path(&path, &CreateOptions::new(THREADS * REGION))
        .unwrap()
        .close()
        .unwrap();
    let Some(img) = open_uring(&path, direct) else {
        return;
    };
    let (shared, model) = scenario(img, seed);
    shared.flush().unwrap();
    shared.close().unwrap();
    assert_clean(&path, true, "after queued I/O");
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_compare(&path, &raw, "qemu reads what the queues wrote");
    // Reopened: still the model.
    let img = Image::open_path(&path, &OpenOptions::default()).unwrap();
    let shared = SharedImage::new(img);
    let mut back = vec![0u8; model.len()];
    shared.read(0, &mut back).unwrap();
    assert!(back == model);
    shared.close().unwrap();
}

#[test]
fn io_uring_buffered_queues_match_the_model_and_qemu() {
    file_case(false, 11);
}

#[test]
fn io_uring_direct_queues_match_the_model_and_qemu() {
    file_case(true, 23);
}

#[test]
fn synchronous_queues_over_memory_match_the_model() {
    let storage: Arc<dyn Storage> = Arc::new(qcow2_io::MemStorage::new());
    let img = Image::create(storage.clone(), &CreateOptions::new(THREADS * REGION)).unwrap();
    let (shared, model) = scenario(img, 37);
    shared.close().unwrap();
    let r = qcow2_check::check(storage.clone(), &qcow2_check::CheckOptions::default()).unwrap();
    assert_eq!(
        (r.result.corruptions, r.result.leaks),
        (0, 0),
        "{:?}",
        r.findings
    );
    let mut img = Image::open(storage, &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; model.len()];
    img.read(0, &mut back).unwrap();
    assert!(back == model);
}

#[test]
fn qemu_written_image_read_through_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qemu.qcow2");
    common::qemu_create(&path, "cluster_size=65536", 4 << 20, None);
    common::qemu_io(
        &path,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 1M 4096".into(),
            "write -z 2M 64k".into(),
            "write -c -P 0x33 3M 64k".into(),
        ],
    );
    let Some(img) = open_uring(&path, true) else {
        return;
    };
    let shared = SharedImage::new(img);
    let mut q = shared.queue(16).unwrap();
    let mut expect = vec![
        (0u64, vec![0x11u8; 1 << 20]),
        (1, [vec![0x22u8; 4096], vec![0u8; 4096]].concat()),
        (2, vec![0u8; 65536]),
        (3, vec![0x33u8; 65536]),
    ];
    q.read(0, 0, 1 << 20).unwrap();
    q.read(1, 1 << 20, 8192).unwrap();
    q.read(2, 2 << 20, 65536).unwrap();
    q.read(3, 3 << 20, 65536).unwrap();
    reap(&mut q, 4, &mut expect);
    assert!(expect.is_empty());
    // Rewrite part of QEMU's data and allocate next to it, all in flight at once.
    q.write(4, 4096, &[0x44; 8192]).unwrap();
    q.write(5, (1 << 20) + 8192, &[0x55; 4096]).unwrap();
    q.write(6, (2 << 20) + 65536 + 512, &[0x66; 1000]).unwrap();
    reap(&mut q, 3, &mut expect);
    drop(q);
    shared.close().unwrap();
    assert_clean(&path, true, "after queued writes into QEMU's image");
    let out = common::qemu_io(
        &path,
        &[
            "read -P 0x11 0 4096".into(),
            "read -P 0x44 4096 8192".into(),
            "read -P 0x11 12288 4096".into(),
            "read -P 0x22 1M 4096".into(),
            "read -P 0 1052672 4096".into(),
            "read -P 0x55 1056768 4096".into(),
            "read -P 0 2162688 512".into(),
            "read -P 0x66 2163200 1000".into(),
            "read -P 0x33 3M 64k".into(),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// A data transfer that fails in a queue fails its request only: the allocation it was
/// for is given back (no leak, nothing linked), the other requests in flight complete.
#[test]
fn a_failed_transfer_fails_only_its_request() {
    use qcow2_io::fault::{FaultStorage, IoKind, Rule};
    use qcow2_io::{errno, Event};
    let fault = Arc::new(FaultStorage::new(qcow2_io::MemStorage::new()));
    let storage: Arc<dyn Storage> = fault.clone();
    let mut img = Image::create(storage.clone(), &CreateOptions::new(8 << 20)).unwrap();
    img.write(0, &[7u8; 65536]).unwrap();
    img.flush().unwrap();
    let shared = SharedImage::new(img);
    {
        let mut q = shared.queue(8).unwrap();
        // Armed by the first allocation's plan; fails the next write request: that
        // allocation's data.
        fault.add_rule(
            Rule::on_event(Event::WriteAio, errno::EIO)
                .once(true)
                .kinds(IoKind::Write),
        );
        q.write(1, 1 << 20, &[1u8; 4096]).unwrap();
        q.write(2, 2 << 20, &[2u8; 4096]).unwrap();
        q.write(3, 4096, &[3u8; 4096]).unwrap();
        let mut done = Vec::new();
        q.complete(3, &mut done).unwrap();
        done.sort_by_key(|d| d.tag);
        let e = done[0].result.as_ref().unwrap_err();
        assert_eq!(e.errno(), errno::EIO, "{e}");
        assert!(done[1].result.is_ok() && done[2].result.is_ok());
    }
    let mut b = vec![0u8; 4096];
    shared.read(1 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the failed write is visible");
    shared.read(2 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2));
    shared.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    shared.close().unwrap();
    let r = qcow2_check::check(storage, &qcow2_check::CheckOptions::default()).unwrap();
    assert_eq!(
        (r.result.corruptions, r.result.leaks),
        (0, 0),
        "{:?}",
        r.findings
    );
}
