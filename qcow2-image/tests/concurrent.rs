//! Many threads on one `SharedImage`: each thread owns a region and checks it against its
//! own model while the others run (writes, rewrites, zero writes, discards, reads,
//! flushes); all threads also write whole sectors into one shared region, where every
//! 512-byte sector must end up equal to one of the writes that covered it, never a mix. At
//! the end: flush, close, `qemu-img check` clean, reopen, everything again.

mod common;

use common::{assert_clean, Rng};
use qcow2_image::{CreateOptions, Image, OpenOptions, SharedImage};
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;
const THREADS: u64 = 4;

/// A sector written by (thread, seq) at guest `sector`: self-describing bytes.
fn sector_pattern(tid: u64, seq: u64, sector: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SECTOR);
    let head = [tid.to_le_bytes(), seq.to_le_bytes(), sector.to_le_bytes()].concat();
    while v.len() < SECTOR {
        v.extend_from_slice(&head);
    }
    v.truncate(SECTOR);
    v
}

/// A write into the shared region: (thread, seq, first sector, sectors).
type SharedWrite = (u64, u64, u64, u64);

struct Layout {
    region: u64,
    shared_at: u64,
    shared_len: u64,
    size: u64,
}

fn run(opts: &CreateOptions, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    let lay = Layout {
        region: 4 << 20,
        shared_at: THREADS * (4 << 20),
        shared_len: 1 << 20,
        size: THREADS * (4 << 20) + (1 << 20),
    };
    let mut o = opts.clone();
    o.size = lay.size;
    let mut img = Image::create_path(&path, &o).unwrap();
    // Half of every region allocated up front, so rewrites take the in-place path.
    for t in 0..THREADS {
        img.write(t * lay.region, &vec![0xee; (lay.region / 2) as usize])
            .unwrap();
    }
    let shared = Arc::new(SharedImage::new(img));
    // Every write into the shared region: (tid, seq, offset, len).
    let log: Arc<Mutex<Vec<SharedWrite>>> = Arc::new(Mutex::new(Vec::new()));
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|tid| {
                let shared = shared.clone();
                let log = log.clone();
                let lay = &lay;
                s.spawn(move || {
                    let base = tid * lay.region;
                    let mut model = vec![0u8; lay.region as usize];
                    model[..(lay.region / 2) as usize].fill(0xee);
                    let mut rng = Rng(1000 + tid);
                    for seq in 0..300u64 {
                        let off = rng.below(lay.region - 70_000);
                        let big = rng.chance(30);
                        let len = 1 + rng.below(if big { 65_536 } else { 6000 });
                        match rng.below(10) {
                            0..=4 => {
                                let data = rng.data(len as usize);
                                shared.write(base + off, &data).unwrap();
                                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                            }
                            5 => {
                                let unmap = rng.chance(50);
                                shared.write_zeroes(base + off, len, unmap).unwrap();
                                model[off as usize..(off + len) as usize].fill(0);
                            }
                            6 => {
                                // Discard reads as zero on v3 for whole clusters only; use
                                // cluster-aligned ranges so the model stays exact.
                                let cs = 65536;
                                let a = off / cs * cs;
                                shared.discard(base + a, cs).unwrap();
                                model[a as usize..(a + cs) as usize].fill(0);
                            }
                            7 => {
                                // Whole sectors into the shared region.
                                let sectors = 1 + rng.below(16);
                                let first = rng.below(lay.shared_len / 512 - sectors);
                                let mut buf = Vec::new();
                                for k in 0..sectors {
                                    buf.extend(sector_pattern(tid, seq, first + k));
                                }
                                let at = lay.shared_at + first * 512;
                                log.lock().unwrap().push((tid, seq, first, sectors));
                                shared.write(at, &buf).unwrap();
                            }
                            8 => shared.flush().unwrap(),
                            _ => {
                                let mut buf = vec![0u8; len as usize];
                                shared.read(base + off, &mut buf).unwrap();
                                assert!(
                                    buf == model[off as usize..(off + len) as usize],
                                    "thread {tid} read {off:#x}+{len:#x} differs from its model"
                                );
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let shared = Arc::try_unwrap(shared).expect("no other owner");
    shared.flush().unwrap();
    let log = log.lock().unwrap().clone();
    let verify = |img: &mut Image, stage: &str| {
        for (tid, model) in models.iter().enumerate() {
            let mut buf = vec![0u8; lay.region as usize];
            img.read(tid as u64 * lay.region, &mut buf).unwrap();
            assert!(
                buf == *model,
                "{what} {stage}: region of thread {tid} differs"
            );
        }
        let mut buf = vec![0u8; lay.shared_len as usize];
        img.read(lay.shared_at, &mut buf).unwrap();
        for (i, sector) in buf.chunks(SECTOR).enumerate() {
            let i = i as u64;
            let covering: Vec<_> = log
                .iter()
                .filter(|&&(_, _, first, n)| first <= i && i < first + n)
                .collect();
            if covering.is_empty() {
                assert!(sector.iter().all(|&b| b == 0), "{what} {stage}: sector {i}");
                continue;
            }
            assert!(
                covering
                    .iter()
                    .any(|&&(t, s, _, _)| sector == sector_pattern(t, s, i).as_slice()),
                "{what} {stage}: shared sector {i} equals none of the writes that covered it"
            );
        }
    };
    let mut img = shared.into_inner().unwrap();
    verify(&mut img, "before close");
    img.close().unwrap();
    assert_clean(&path, true, what);
    let mut img = Image::open_path(&path, &OpenOptions::read_only()).unwrap();
    verify(&mut img, "after reopen");
}

#[test]
fn many_threads_one_image_64k_clusters() {
    run(&CreateOptions::new(0), "64k clusters");
}

#[test]
fn many_threads_one_image_4k_clusters_extended_l2() {
    let mut o = CreateOptions::new(0);
    o.cluster_size = 32768;
    o.extended_l2 = true;
    run(&o, "32k clusters, extended L2");
}

#[test]
fn whole_image_operations_wait_for_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.qcow2");
    let mut img = Image::create_path(&path, &CreateOptions::new(8 << 20)).unwrap();
    img.write(0, &vec![1u8; 8 << 20]).unwrap();
    let shared = Arc::new(SharedImage::new(img));
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let shared = shared.clone();
            s.spawn(move || {
                let mut rng = Rng(t);
                for _ in 0..200 {
                    let off = rng.below((8 << 20) - 4096);
                    let mut b = vec![0u8; 4096];
                    shared.read(off, &mut b).unwrap();
                    shared.write(off, &b).unwrap();
                }
            });
        }
        let shared = shared.clone();
        s.spawn(move || {
            for i in 0..5 {
                shared.snapshot_create(&format!("s{i}")).unwrap();
            }
        });
    });
    let shared = Arc::try_unwrap(shared).expect("no other owner");
    shared.close().unwrap();
    assert_clean(&path, true, "snapshots during I/O");
}
