//! Crashes and I/O errors with several requests in flight on one `SharedImage`.
//!
//! Crash: three threads write, rewrite, zero and discard in their own regions at once
//! (allocating writes interleave, L2 tables and refcount blocks are allocated by whichever
//! thread gets there first) while flushes run from every thread; at sampled flushes and
//! at the end, post-crash images (prefixes, random subsets, torn writes) must show no
//! corruption under `qemu-img check` (leaks allowed) and keep every byte flushed before.
//!
//! Faults: an injected error at an engine event or on the n-th storage request while other
//! threads' requests are in flight: the error reaches a request (never swallowed), the
//! other threads' requests complete or fail cleanly (no panic, no hang), and after reopening
//! the image shows no corruption and works.

mod common;

use common::{assert_clean, check_crash_state, Rng};
use qcow2_image::{CreateOptions, Image, OpenOptions, SharedImage};
use qcow2_io::crash::{Checkpoint, CrashOptions, CrashStorage};
use qcow2_io::fault::{FaultStorage, Rule};
use qcow2_io::{errno, Event, MemStorage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

const THREADS: u64 = 3;
const REGION: u64 = 1 << 20;
const SIZE: u64 = THREADS * REGION;

/// One thread's operations of one round in its region; returns the ranges it changed.
fn round_ops(
    img: &SharedImage,
    tid: u64,
    rng: &mut Rng,
    model: &mut [u8],
    ops: usize,
) -> Vec<(u64, u64)> {
    let base = tid * REGION;
    let mut touched = Vec::new();
    for _ in 0..ops {
        let off = rng.below(REGION - 40_000);
        let big = rng.chance(30);
        let len = 1 + rng.below(if big { 32_768 } else { 3000 });
        match rng.below(8) {
            0..=4 => {
                let data = rng.data(len as usize);
                img.write(base + off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 => {
                img.write_zeroes(base + off, len, rng.chance(50)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            6 => {
                // Whole clusters, so that the model stays exact.
                let a = off / 4096 * 4096;
                img.discard(base + a, 8192).unwrap();
                model[a as usize..a as usize + 8192].fill(0);
                touched.push((base + a, 8192));
                continue;
            }
            _ => img.flush().unwrap(),
        }
        touched.push((base + off, len));
    }
    touched
}

#[test]
fn crash_states_with_several_writers_in_flight() {
    let storage = Arc::new(CrashStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = 4096;
    opts.refcount_bits = 16;
    let img = Image::create(storage.clone(), &opts).unwrap();
    let img = SharedImage::new(img);
    img.flush().unwrap();

    // Completed round flushes; checkpoints sampled at flushes, tagged with that count.
    let completed = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let cps: Arc<Mutex<Vec<(Checkpoint, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let (completed, calls, cps) = (completed.clone(), calls.clone(), cps.clone());
        storage.on_flush(move |cp| {
            if calls.fetch_add(1, Ordering::SeqCst) % 7 == 3 {
                cps.lock()
                    .unwrap()
                    .push((cp.clone(), completed.load(Ordering::SeqCst)));
            }
            Ok(())
        });
    }
    let rounds = 6usize;
    let mut mirror = vec![0u8; SIZE as usize];
    let mut mirrors = vec![mirror.clone()];
    let mut written: Vec<Vec<(u64, u64)>> = Vec::new();
    let barrier = Barrier::new(THREADS as usize);
    let models: Vec<Mutex<(Vec<u8>, Rng)>> = (0..THREADS)
        .map(|t| Mutex::new((vec![0u8; REGION as usize], Rng(77 + t))))
        .collect();
    for round in 0..=rounds {
        // The last round is the unflushed tail before the crash.
        let touched: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|tid| {
                    let (img, barrier, models) = (&img, &barrier, &models);
                    s.spawn(move || {
                        barrier.wait();
                        let mut m = models[tid as usize].lock().unwrap();
                        let (model, rng) = &mut *m;
                        round_ops(img, tid, rng, model, 12)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        written.push(touched.concat());
        if round == rounds {
            break;
        }
        img.flush().unwrap();
        completed.fetch_add(1, Ordering::SeqCst);
        for (t, m) in models.iter().enumerate() {
            let at = t * REGION as usize;
            mirror[at..at + REGION as usize].copy_from_slice(&m.lock().unwrap().0);
        }
        mirrors.push(mirror.clone());
    }
    let last = storage.checkpoint();
    img.into_inner().unwrap().abandon();

    let mask = |ranges: &[(u64, u64)]| {
        let mut m = vec![false; SIZE as usize];
        for &(o, l) in ranges {
            m[o as usize..(o + l) as usize].fill(true);
        }
        m
    };
    let cps = cps.lock().unwrap().clone();
    assert!(cps.len() >= 4, "only {} flushes sampled", cps.len());
    let mut checked = 0;
    for (i, (cp, k)) in cps.iter().enumerate() {
        let k = *k as usize;
        let opts = CrashOptions::default()
            .with_random_subsets(2)
            .with_torn_random(1)
            .with_seed(i as u64);
        let states: Vec<_> = cp.crash_states(&opts).collect();
        let step = (states.len() / 3).max(1);
        for (j, st) in states.iter().enumerate() {
            if j % step == 0 || j + 1 == states.len() {
                check_crash_state(
                    &st.image,
                    &mirrors[k],
                    &mask(&written[k]),
                    &format!("checkpoint {i} (round {k}) state {j} ({:?})", st.kind),
                );
                checked += 1;
            }
        }
    }
    let opts = CrashOptions::thorough(3, 9);
    let states: Vec<_> = last.crash_states(&opts).collect();
    let step = (states.len() / 8).max(1);
    for (j, st) in states.iter().enumerate() {
        if j % step == 0 || j + 1 == states.len() {
            check_crash_state(
                &st.image,
                &mirrors[rounds],
                &mask(&written[rounds]),
                &format!("final state {j} ({:?})", st.kind),
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} crash states checked");
}

type Fs = Arc<FaultStorage<MemStorage>>;

fn fresh() -> Fs {
    let fs: Fs = Arc::new(FaultStorage::new(MemStorage::new()));
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = 4096;
    let mut img = Image::create(fs.clone(), &o).unwrap();
    // Half of every region allocated, so in-place rewrites run outside the lock.
    for t in 0..THREADS {
        img.write(t * REGION, &vec![0x11; (REGION / 2) as usize])
            .unwrap();
    }
    img.close().unwrap();
    fs
}

/// Runs every thread's requests until each has done `ops` or met an error; returns the
/// errors seen (errno values).
fn hammer(img: &SharedImage, ops: u64) -> Vec<i32> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|tid| {
                s.spawn(move || {
                    let mut rng = Rng(500 + tid);
                    let base = tid * REGION;
                    let mut errs = Vec::new();
                    for _ in 0..ops {
                        let off = rng.below(REGION - 40_000);
                        let len = 1 + rng.below(20_000) as usize;
                        let r = match rng.below(6) {
                            0..=2 => img.write(base + off, &rng.data(len)),
                            3 => img.write_zeroes(base + off, len as u64, true),
                            4 => img.read(base + off, &mut vec![0u8; len]),
                            _ => img.flush(),
                        };
                        if let Err(e) = r {
                            errs.push(e.errno());
                        }
                    }
                    errs
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn faults_with_requests_in_flight() {
    let events = [
        Event::L2AllocWrite,
        Event::L2Update,
        Event::RefblockAlloc,
        Event::ClusterAlloc,
        Event::WriteAio,
    ];
    let mut cases: Vec<(String, Rule)> = events
        .iter()
        .map(|&ev| (format!("event {ev}"), Rule::on_event(ev, errno::EIO)))
        .collect();
    for n in [5, 40, 200] {
        cases.push((format!("request {n}"), Rule::on_request(n, errno::ENOSPC)));
    }
    let mut fired = 0;
    for (what, rule) in cases {
        for once in [true, false] {
            let what = format!("{what} once {once}");
            let fs = fresh();
            let img = SharedImage::new(Image::open(fs.clone(), &OpenOptions::default()).unwrap());
            let code = rule.errno;
            let id = fs.add_rule(rule.once(once));
            let errs = hammer(&img, 40);
            if fs.fired(id) > 0 {
                fired += 1;
                assert!(
                    errs.contains(&code),
                    "{what}: injected errno {code} never reached a request: {errs:?}"
                );
            }
            // Errors other than the injected one are the poisoned image's refusals.
            assert!(
                errs.iter().all(|&e| e == code || e == errno::EIO),
                "{what}: unexpected errors {errs:?}"
            );
            fs.clear_rules();
            let _ = img.close();
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.qcow2");
            std::fs::write(&p, fs.inner().to_bytes()).unwrap();
            assert_clean(&p, false, &what);
            let img = SharedImage::new(Image::open(fs.clone(), &OpenOptions::default()).unwrap());
            assert!(hammer(&img, 10).is_empty(), "{what}: errors after reopen");
            img.close().unwrap();
        }
    }
    assert!(fired >= 8, "only {fired} injected faults fired");
}
