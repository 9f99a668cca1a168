//! (3) Crash behaviour: a write workload that allocates L2 tables, grows the L1 table and
//! the refcount table runs on `CrashStorage`; post-crash images (prefixes and random subsets
//! of the pending writes at sampled flush boundaries, and at the end) must show no
//! corruption under `qemu-img check` (leaks allowed), and data flushed before the crash
//! must read back.

mod common;

use common::Rng;
use qcow2_image::{CreateOptions, Image};
use qcow2_io::crash::{Checkpoint, CrashOptions, CrashStorage};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const FINAL_SIZE: u64 = 4 << 20;

#[test]
fn crash_states_show_no_corruption_and_keep_flushed_data() {
    let storage = Arc::new(CrashStorage::new());
    let armed = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let cps: Arc<Mutex<Vec<(Checkpoint, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let (armed, completed, calls, cps) =
            (armed.clone(), completed.clone(), calls.clone(), cps.clone());
        storage.on_flush(move |cp| {
            if armed.load(Ordering::SeqCst) {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n % 13 == 5 {
                    let k = completed.load(Ordering::SeqCst);
                    cps.lock().unwrap().push((cp.clone(), k));
                }
            }
            Ok(())
        });
    }
    let mut opts = CreateOptions::new(256 << 10);
    opts.cluster_size = 512;
    opts.refcount_bits = 64;
    let mut img = Image::create(storage.clone(), &opts).unwrap();
    img.flush().unwrap();
    armed.store(true, Ordering::SeqCst);
    let mut rng = Rng(42);
    let mut mirror = vec![0u8; FINAL_SIZE as usize];
    let mut mirrors = vec![mirror.clone()];
    // Guest ranges written in each round (round index = completed flushes at the time).
    let mut written: Vec<Vec<(u64, u64)>> = vec![Vec::new()];
    let rounds = 18;
    for r in 0..rounds {
        if r == 4 {
            // L1 growth: 256 KiB -> 4 MiB needs 128 L1 entries (two clusters).
            img.resize(FINAL_SIZE).unwrap();
        }
        let size = img.virtual_size();
        for _ in 0..8 {
            let off = rng.below(size - 8192);
            let len = 1 + rng.below(if r >= 4 { 64 << 10 } else { 4096 });
            let len = len.min(size - off);
            let data = rng.data(len as usize);
            img.write(off, &data).unwrap();
            mirror[off as usize..(off + len) as usize].copy_from_slice(&data);
            written[r].push((off, len));
        }
        if r % 3 == 2 {
            let off = rng.below(size - 4096) / 512 * 512;
            img.discard(off, 2048).unwrap();
            mirror[off as usize..off as usize + 2048].fill(0);
            written[r].push((off, 2048));
            let off = rng.below(size - 4096);
            img.write_zeroes(off, 1500, true).unwrap();
            mirror[off as usize..off as usize + 1500].fill(0);
            written[r].push((off, 1500));
        }
        img.flush().unwrap();
        completed.fetch_add(1, Ordering::SeqCst);
        mirrors.push(mirror.clone());
        written.push(Vec::new());
    }
    // Unflushed tail work, then the crash.
    for _ in 0..4 {
        let off = rng.below(FINAL_SIZE - 70000);
        let data = rng.data(65536 + 100);
        img.write(off, &data).unwrap();
        mirror[off as usize..off as usize + data.len()].copy_from_slice(&data);
        written[rounds].push((off, data.len() as u64));
    }
    let last = storage.checkpoint();
    img.abandon();
    // The refcount table must have grown (host file beyond what one reftable cluster
    // of 64 refblocks x 64 clusters x 512 bytes = 2 MiB describes).
    assert!(
        storage.current().len() > 2 << 20,
        "workload too small to grow the reftable"
    );

    let mask = |ranges: &[(u64, u64)]| {
        let mut m = vec![false; FINAL_SIZE as usize];
        for &(o, l) in ranges {
            m[o as usize..(o + l) as usize].fill(true);
        }
        m
    };
    let cps = cps.lock().unwrap().clone();
    let mut checked = 0;
    for (i, (cp, k)) in cps.iter().enumerate() {
        let k = *k as usize;
        let unstable = mask(&written[k]);
        let opts = CrashOptions::default()
            .with_random_subsets(2)
            .with_seed(i as u64);
        let states: Vec<_> = cp.crash_states(&opts).collect();
        let step = (states.len() / 2).max(1);
        for (j, st) in states.iter().enumerate() {
            if j % step != 0 && j + 2 < states.len() {
                continue;
            }
            common::check_crash_state(
                &st.image,
                &mirrors[k],
                &unstable,
                &format!("checkpoint {i} state {j} ({:?})", st.kind),
            );
            checked += 1;
        }
    }
    let opts = CrashOptions::default()
        .with_random_subsets(3)
        .with_torn_writes(false);
    let states: Vec<_> = last.crash_states(&opts).collect();
    let step = (states.len() / 6).max(1);
    for (j, st) in states.iter().enumerate() {
        if j % step == 0 || j + 3 >= states.len() {
            common::check_crash_state(
                &st.image,
                &mirrors[rounds],
                &mask(&written[rounds]),
                &format!("final state {j}"),
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} crash states checked");
}
