//! Schedule-exploring tests of the shared image's concurrency protocol (`plan_alloc` /
//! `finish_alloc` / `abort_alloc`, the in-flight registry and its waits, request queues),
//! run on the real [`SharedImage`] and [`RequestQueue`](crate::RequestQueue) over memory:
//! built with `--cfg shuttle`, every lock, condition variable and thread of those paths is
//! shuttle's, whose schedulers (random and PCT) choose the interleavings. Shuttle fails a
//! run on a deadlock (every thread blocked); the tests check no lost write, no double
//! allocation (host growth, refcounts), no corruption or leak (the checker), for two or
//! three requests on the same and on neighbouring clusters.
//!
//! Run with: `RUSTFLAGS="--cfg shuttle" cargo test -p qcow2-image --lib --target-dir
//! target/shuttle schedule_tests` (`.ci/run` does).

use crate::{CreateOptions, Image, SharedImage};
use qcow2_io::{MemStorage, Storage};
use shuttle::thread;
use std::sync::Arc;

const CS: u64 = 65536;
const ITERATIONS: usize = 400;

/// A fresh image whose first L2 table exists (cluster 0 written), cluster 4 allocated
/// with 0x44; returns the storage, the shared image and the storage length.
fn fresh() -> (Arc<MemStorage>, Arc<SharedImage>, u64) {
    let storage = Arc::new(MemStorage::new());
    let mut img = Image::create(storage.clone(), &CreateOptions::new(8 << 20)).unwrap();
    img.write(0, &[1u8; 512]).unwrap();
    img.write(4 * CS, &vec![0x44u8; CS as usize]).unwrap();
    img.flush().unwrap();
    let len = storage.len().unwrap();
    (storage, Arc::new(SharedImage::new(img)), len)
}

/// Closes the image and runs the checker: no corruption, no leak.
fn close_and_check(storage: Arc<MemStorage>, shared: Arc<SharedImage>) {
    let shared = Arc::try_unwrap(shared).expect("every thread joined");
    shared.close().unwrap();
    let r = qcow2_check::check(storage, &qcow2_check::CheckOptions::default()).unwrap();
    assert_eq!(
        (r.result.corruptions, r.result.leaks),
        (0, 0),
        "{:?}",
        r.findings
    );
}

fn read(shared: &SharedImage, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    shared.read(offset, &mut b).unwrap();
    b
}

/// Runs `f` under shuttle's random scheduler and its PCT scheduler (depth 3), with
/// stacks large enough for the engine's unoptimized frames.
fn explore(f: impl Fn() + Send + Sync + 'static) {
    explore_with(f, ITERATIONS, 3);
}

/// [`explore`] with `iterations` runs of each scheduler, PCT at `depth`.
fn explore_with(f: impl Fn() + Send + Sync + 'static, iterations: usize, depth: usize) {
    use shuttle::scheduler::{PctScheduler, RandomScheduler};
    let f = Arc::new(f);
    let config = || {
        let mut c = shuttle::Config::new();
        c.stack_size = 8 << 20;
        c
    };
    let g = f.clone();
    shuttle::Runner::new(RandomScheduler::new(iterations), config()).run(move || g());
    shuttle::Runner::new(PctScheduler::new(depth, iterations), config()).run(move || f());
}

/// Three allocating writes on distinct bytes of one fresh cluster and its neighbour:
/// one of them allocates each cluster, the others wait for that allocation and write
/// into it; nothing is lost, nothing allocated twice.
#[test]
fn schedule_tests_allocating_writes_on_one_fresh_cluster() {
    explore(|| {
        let (storage, shared, before) = fresh();
        let writes = [
            (CS, 4096u64, 0xa1u8),
            (CS + 8192, 4096, 0xb2),
            (2 * CS - 4096, 8192, 0xc3),
        ];
        let hs: Vec<_> = writes
            .iter()
            .map(|&(off, len, byte)| {
                let shared = shared.clone();
                thread::spawn(move || shared.write(off, &vec![byte; len as usize]).unwrap())
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let got = read(&shared, CS, 2 * CS as usize);
        let mut want = vec![0u8; 2 * CS as usize];
        for (off, len, byte) in writes {
            let a = (off - CS) as usize;
            want[a..a + len as usize].fill(byte);
        }
        assert!(got == want, "a write was lost");
        // Exactly the two data clusters were added to the file.
        assert_eq!(storage.len().unwrap() - before, 2 * CS);
        close_and_check(storage, shared);
    });
}

/// A queue that meets its own allocation in flight (two writes into one fresh cluster
/// from one thread) while another thread writes into the same cluster and a third reads
/// it and discards an unrelated one: the queue finishes its own request instead of
/// waiting for itself (no deadlock), nothing is lost, a read sees each write whole or
/// not at all.
#[test]
fn schedule_tests_queue_meets_its_own_allocation() {
    explore(|| {
        let (storage, shared, before) = fresh();
        let q_shared = shared.clone();
        let queued = thread::spawn(move || {
            let mut q = q_shared.queue(4).unwrap();
            q.write(1, CS, &[0xa1; 4096]).unwrap();
            q.write(2, CS + 4096, &[0xb2; 4096]).unwrap();
            let mut done = Vec::new();
            q.complete(2, &mut done).unwrap();
            assert_eq!(done.len(), 2);
            for d in done {
                d.result.unwrap();
            }
        });
        let w_shared = shared.clone();
        let writer = thread::spawn(move || w_shared.write(CS + 16384, &[0xc3; 4096]).unwrap());
        let r_shared = shared.clone();
        let reader = thread::spawn(move || {
            let b = read(&r_shared, CS, 20480);
            for (range, byte) in [(0..4096, 0xa1u8), (4096..8192, 0xb2), (16384..20480, 0xc3)] {
                let part = &b[range];
                assert!(
                    part.iter().all(|&x| x == byte) || part.iter().all(|&x| x == 0),
                    "a read saw half a write"
                );
            }
            r_shared.discard(6 * CS, CS).unwrap();
        });
        for h in [queued, writer, reader] {
            h.join().unwrap();
        }
        let b = read(&shared, CS, 20480);
        assert!(b[..4096].iter().all(|&x| x == 0xa1));
        assert!(b[4096..8192].iter().all(|&x| x == 0xb2));
        assert!(b[8192..16384].iter().all(|&x| x == 0));
        assert!(b[16384..].iter().all(|&x| x == 0xc3));
        assert_eq!(storage.len().unwrap() - before, CS);
        close_and_check(storage, shared);
    });
}

/// An in-place rewrite racing a discard and a zero write of the same allocated cluster,
/// and an allocating write racing a compressed write of the neighbour: the rewrite never
/// lands in a freed cluster (the cluster reads as all rewritten or all zero), every
/// request's bytes are whole, refcounts stay exact.
#[test]
fn schedule_tests_rewrite_races_discard_and_zero_write() {
    // The harmful window (a rewrite planned, its data not yet written, while another
    // thread frees, flushes and reallocates the cluster) needs one priority change at the
    // right step: PCT at depth 2 finds it.
    explore_with(
        || {
            let (storage, shared, _) = fresh();
            let s1 = shared.clone();
            let rewrite =
                thread::spawn(move || s1.write(4 * CS, &vec![0xd4; CS as usize]).unwrap());
            let s2 = shared.clone();
            let discard = thread::spawn(move || {
                s2.discard(4 * CS, CS).unwrap();
                // A durable flush ends the freed cluster's quarantine: the next allocation
                // may reuse it, and must not receive a late rewrite.
                s2.flush().unwrap();
                s2.write(5 * CS, &vec![0x55; CS as usize]).unwrap();
                s2.write_zeroes(4 * CS, 4096, false).unwrap();
            });
            let s3 = shared.clone();
            let neighbours = thread::spawn(move || {
                s3.write(2 * CS + 512, &[0xe5; 1024]).unwrap();
                s3.write_compressed(3 * CS, &vec![0xf6; CS as usize])
                    .unwrap();
            });
            for h in [rewrite, discard, neighbours] {
                h.join().unwrap();
            }
            let c4 = read(&shared, 4 * CS, CS as usize);
            let rewritten = c4[4096..].iter().all(|&x| x == 0xd4);
            let zero = c4[4096..].iter().all(|&x| x == 0);
            assert!(
                rewritten || zero,
                "cluster 4 mixes the rewrite and the discard"
            );
            assert!(c4[..4096].iter().all(|&x| x == 0) || c4[..4096].iter().all(|&x| x == 0xd4));
            let c2 = read(&shared, 2 * CS, 2048);
            assert!(c2[..512].iter().all(|&x| x == 0) && c2[512..1536].iter().all(|&x| x == 0xe5));
            assert!(read(&shared, 3 * CS, CS as usize)
                .iter()
                .all(|&x| x == 0xf6));
            assert!(
                read(&shared, 5 * CS, CS as usize)
                    .iter()
                    .all(|&x| x == 0x55),
                "a late rewrite landed in a reused cluster"
            );
            close_and_check(storage, shared);
        },
        ITERATIONS,
        2,
    );
}

/// Two partial writes into one fresh overlay cluster whose copy-on-write bytes come from
/// the backing image (read without the metadata lock), racing a reader of that cluster:
/// one allocation, the backing bytes around both writes, no write lost, and the reader
/// sees each write whole or not at all over backing data.
#[test]
fn schedule_tests_copy_on_write_from_backing() {
    // Two images per run (backing and overlay): fewer runs keep it quick.
    explore_with(
        || {
            let mut base =
                Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(8 << 20)).unwrap();
            base.write(0, &vec![0x33u8; 4 * CS as usize]).unwrap();
            let storage = Arc::new(MemStorage::new());
            let mut img = Image::create(storage.clone(), &CreateOptions::new(8 << 20)).unwrap();
            img.backing = Some(Box::new(base));
            img.write(0, &[1u8; 512]).unwrap();
            img.flush().unwrap();
            let before = storage.len().unwrap();
            let shared = Arc::new(SharedImage::new(img));
            let writes = [(CS + 1000, 100usize, 0xa1u8), (CS + 30000, 100, 0xb2)];
            let mut hs: Vec<_> = writes
                .iter()
                .map(|&(off, len, byte)| {
                    let shared = shared.clone();
                    thread::spawn(move || shared.write(off, &vec![byte; len]).unwrap())
                })
                .collect();
            let r = shared.clone();
            hs.push(thread::spawn(move || {
                let b = read(&r, CS, CS as usize);
                for &(off, len, byte) in &writes {
                    let a = (off - CS) as usize;
                    let part = &b[a..a + len];
                    assert!(
                        part.iter().all(|&x| x == byte) || part.iter().all(|&x| x == 0x33),
                        "a read saw half a write"
                    );
                }
                assert!(b[..1000].iter().all(|&x| x == 0x33));
            }));
            for h in hs {
                h.join().unwrap();
            }
            let mut want = vec![0x33u8; CS as usize];
            for (off, len, byte) in writes {
                let a = (off - CS) as usize;
                want[a..a + len].fill(byte);
            }
            assert!(
                read(&shared, CS, CS as usize) == want,
                "a write or the backing data was lost"
            );
            assert_eq!(storage.len().unwrap() - before, CS);
            close_and_check(storage, shared);
        },
        ITERATIONS / 2,
        3,
    );
}
