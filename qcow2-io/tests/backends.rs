//! Integration tests of the test backends: blkdebug-style fault injection and the
//! volatile-cache crash simulator, each checked against `MemStorage` as the model.
// Test helpers outside `#[test]` functions: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use qcow2_io::crash::{CrashOptions, CrashState, CrashStateKind, CrashStorage, Op, PendingOp};
use qcow2_io::fault::{FaultStorage, IoKind, IoKinds, Rule};
use qcow2_io::{errno, Event, FileStorage, MemStorage, Storage, StorageExt};
use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use std::sync::{Arc, Mutex};

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.unwrap_err().raw_os_error()
}

// ---------------------------------------------------------------------------------------
// FaultStorage
// ---------------------------------------------------------------------------------------

#[test]
fn fault_once_fails_exactly_one_request_and_does_not_perform_it() {
    let s = FaultStorage::new(MemStorage::from_bytes(vec![0xEE; 64]));
    let id = s.add_rule(Rule::on_event(Event::WriteAio, errno::EIO).once(true));
    s.event(Event::WriteAio);
    assert_eq!(errno_of(s.write_at(&[1; 8], 0)), Some(errno::EIO));
    assert_eq!(
        s.inner().to_bytes(),
        vec![0xEE; 64],
        "failed write must not reach the disk"
    );
    s.write_at(&[1; 8], 0).unwrap();
    s.event(Event::WriteAio);
    s.write_at(&[2; 8], 8).unwrap();
    assert_eq!(s.fired(id), 1);
    assert_eq!(s.failed_requests(), 1);
}

#[test]
fn fault_once_off_fails_every_later_targeted_request() {
    let s = FaultStorage::new(MemStorage::from_bytes(vec![5; 4096]));
    s.add_rule(Rule::on_event(Event::RefblockUpdatePart, errno::ENOSPC));
    s.write_at(&[1], 0).unwrap();
    s.event(Event::RefblockUpdatePart);
    assert_eq!(errno_of(s.write_at(&[1], 0)), Some(errno::ENOSPC));
    assert_eq!(errno_of(s.read_vec(0, 4)), Some(errno::ENOSPC));
    assert_eq!(errno_of(s.flush()), Some(errno::ENOSPC));
    assert_eq!(errno_of(s.discard(0, 512)), Some(errno::ENOSPC));
    assert_eq!(errno_of(s.write_zeroes(0, 512)), Some(errno::ENOSPC));
    // blkdebug's default mask leaves truncation and the length query alone.
    s.set_len(4096).unwrap();
    assert_eq!(s.len().unwrap(), 4096);
    let st = s.stats();
    assert_eq!(st.failed_total(), 5);
    assert_eq!(st.failed(IoKind::Read), 1);
    assert_eq!(st.requests(IoKind::Write), 2);
    assert_eq!(&s.inner().to_bytes()[..4], &[1, 5, 5, 5]);
    s.clear_rules();
    s.write_zeroes(0, 512).unwrap();
    assert_eq!(s.failed_requests(), 5);
}

#[test]
fn fault_countdown_arms_after_n_occurrences() {
    let s = FaultStorage::new(MemStorage::new());
    s.add_rule(
        Rule::on_event(Event::L2Load, errno::EIO)
            .skip_events(3)
            .once(true)
            .kinds(IoKinds::READ),
    );
    for _ in 0..3 {
        s.event(Event::L2Load);
        s.read_vec(0, 8).unwrap();
    }
    s.event(Event::L2Load);
    assert_eq!(errno_of(s.read_vec(0, 8)), Some(errno::EIO));
    s.event(Event::L2Load);
    s.read_vec(0, 8).unwrap();
}

#[test]
fn fault_events_arm_only_their_rules() {
    let s = FaultStorage::new(MemStorage::new());
    let l1 = s.add_rule(Rule::on_event(Event::L1Update, errno::EIO));
    let l2 = s.add_rule(Rule::on_event(Event::L2Update, errno::ENOSPC));
    for e in Event::ALL {
        if e != Event::L1Update && e != Event::L2Update {
            s.event(e);
        }
    }
    assert!(!s.is_armed(l1) && !s.is_armed(l2));
    s.write_at(&[1], 0).unwrap();
    s.event(Event::L2Update);
    assert!(s.is_armed(l2) && !s.is_armed(l1));
    assert_eq!(errno_of(s.write_at(&[1], 0)), Some(errno::ENOSPC));
    s.event(Event::L1Update);
    assert_eq!(
        errno_of(s.write_at(&[1], 0)),
        Some(errno::EIO),
        "the new event replaced the armed set"
    );
}

#[test]
fn fault_nth_request_rule_ignores_events() {
    let s = FaultStorage::new(MemStorage::new());
    s.add_rule(
        Rule::on_request(4, errno::EIO)
            .kinds(IoKinds::ALL)
            .once(true),
    );
    s.write_at(&[1], 0).unwrap();
    s.set_len(10).unwrap();
    s.read_vec(0, 1).unwrap();
    assert_eq!(errno_of(s.flush()), Some(errno::EIO));
    s.flush().unwrap();
    assert_eq!(s.stats().failed(IoKind::Flush), 1);
}

#[test]
fn fault_event_log_records_order_of_ext_helpers() {
    let s = FaultStorage::new(MemStorage::new());
    s.event(Event::ClusterAlloc);
    s.write_event(Event::RefblockUpdate, &[0; 2], 0).unwrap();
    s.write_event(Event::L2Update, &[0; 8], 64).unwrap();
    let mut b = [0u8; 8];
    s.read_event(Event::L2Load, &mut b, 64).unwrap();
    assert_eq!(
        s.take_events(),
        [
            Event::ClusterAlloc,
            Event::RefblockUpdate,
            Event::L2Update,
            Event::L2Load
        ]
    );
    assert!(s.events().is_empty());
}

#[test]
fn fault_rules_can_be_changed_from_another_thread() {
    let s = Arc::new(FaultStorage::new(MemStorage::new()));
    s.add_rule(Rule::on_event(Event::WriteAio, errno::EIO));
    s.event(Event::WriteAio);
    let worker = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.write_at(&[1], 0).is_err())
    };
    assert!(worker.join().unwrap());
    let clearer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.clear_rules())
    };
    clearer.join().unwrap();
    s.write_at(&[1], 0).unwrap();
}

#[test]
fn fault_over_crash_failed_flush_keeps_writes_pending() {
    let s = FaultStorage::new(CrashStorage::new());
    s.add_rule(
        Rule::on_event(Event::FlushToDisk, errno::EIO)
            .once(true)
            .kinds(IoKinds::FLUSH),
    );
    s.write_event(Event::L2Update, &[7; 16], 0).unwrap();
    s.event(Event::FlushToDisk);
    assert!(s.flush().is_err());
    assert_eq!(s.inner().pending_count(), 1);
    assert_eq!(s.inner().pending()[0].event, Some(Event::L2Update));
    assert_eq!(s.inner().epoch(), 0);
    s.flush().unwrap();
    assert_eq!(s.inner().durable(), vec![7; 16]);
}

// ---------------------------------------------------------------------------------------
// CrashStorage
// ---------------------------------------------------------------------------------------

/// Applies `op` through the `Storage` API of the model.
fn apply_to_model(m: &MemStorage, op: &Op) {
    match op {
        Op::Write { offset, data } => m.write_at(data, *offset),
        Op::WriteZeroes { offset, len } => m.write_zeroes(*offset, *len),
        Op::Discard { offset, len } => m.discard(*offset, *len),
        Op::SetLen { len } => m.set_len(*len),
    }
    .unwrap();
}

fn model_of(durable: &[u8], ops: &[&PendingOp]) -> Vec<u8> {
    let m = MemStorage::from_bytes(durable.to_vec());
    for p in ops {
        apply_to_model(&m, &p.op);
    }
    m.into_bytes()
}

fn workload(s: &impl Storage) {
    s.write_at(&[1; 700], 300).unwrap();
    s.write_zeroes(100, 50).unwrap();
    s.set_len(5000).unwrap();
    s.write_at(&[2; 1024], 4096).unwrap();
    s.discard(0, 512).unwrap();
    s.write_at(&[3; 3], 9000).unwrap();
}

#[test]
fn crash_prefixes_count_and_match_the_model() {
    let s = CrashStorage::from_bytes((0..4096u32).map(|i| i as u8).collect());
    s.write_at(&[0xFF; 10], 10).unwrap();
    s.flush().unwrap();
    workload(&s);
    let cp = s.checkpoint();
    assert_eq!(cp.pending().len(), 6);
    let states: Vec<CrashState> = s.crash_states(&CrashOptions::default()).collect();
    assert_eq!(states.len(), cp.pending().len() + 1);
    for (k, st) in states.iter().enumerate() {
        assert_eq!(st.kind, CrashStateKind::Prefix { applied: k });
        let ops: Vec<&PendingOp> = cp.pending()[..k].iter().collect();
        assert_eq!(st.image, model_of(cp.durable(), &ops), "prefix {k}");
    }
    assert_eq!(states[0].image, s.durable());
    assert_eq!(states[6].image, s.current());
}

#[test]
fn crash_random_subsets_are_reproducible_and_match_the_model() {
    let s = CrashStorage::new();
    workload(&s);
    let cp = s.checkpoint();
    let opts = CrashOptions::default()
        .with_prefixes(false)
        .with_random_subsets(20)
        .with_seed(7);
    let a: Vec<CrashState> = cp.crash_states(&opts).collect();
    let b: Vec<CrashState> = cp.crash_states(&opts).collect();
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "same seed, same states");
    let c: Vec<CrashState> = cp.crash_states(&opts.clone().with_seed(8)).collect();
    assert_ne!(a, c, "another seed explores other subsets");
    for st in &a {
        let CrashStateKind::Subset { applied } = &st.kind else {
            panic!("expected a subset, got {}", st.kind)
        };
        let ops: Vec<&PendingOp> = cp
            .pending()
            .iter()
            .zip(applied)
            .filter(|(_, &on)| on)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(st.image, model_of(cp.durable(), &ops), "{}", st.kind);
        assert_eq!(st.image, cp.state(&st.kind, 512));
    }
    // Torn states use their own stream: enabling them does not change the subsets.
    let with_torn: Vec<CrashState> = cp
        .crash_states(&opts.clone().with_torn_random(3))
        .filter(|st| matches!(st.kind, CrashStateKind::Subset { .. }))
        .collect();
    assert_eq!(with_torn, a);
}

#[test]
fn crash_torn_writes_mix_only_old_and_new_sectors() {
    let base: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let s = CrashStorage::from_bytes(base);
    s.write_at(&[0x11; 2000], 700).unwrap(); // unaligned, 5 sectors
    s.write_at(&[0x22; 1536], 7680).unwrap(); // aligned, 3 sectors, extends the file
    s.write_at(&[0x33; 100], 10).unwrap(); // one sector: never torn
    let cp = s.checkpoint();
    let opts = CrashOptions::default()
        .with_prefixes(false)
        .with_torn_writes(true)
        .with_torn_random(6)
        .with_seed(3);
    let states: Vec<CrashState> = cp.crash_states(&opts).collect();
    assert_eq!(states.len(), (2 * 4 + 6) + (2 * 2 + 6));
    assert_eq!(cp.crash_states(&opts).len(), states.len());
    for st in &states {
        let CrashStateKind::Torn { op, sectors } = &st.kind else {
            panic!("expected torn, got {}", st.kind)
        };
        let old = cp.prefix(*op);
        let new = cp.prefix(op + 1);
        let Op::Write { offset, data } = &cp.pending()[*op].op else {
            panic!("torn non-write")
        };
        let (start, end) = (*offset as usize, *offset as usize + data.len());
        let mut saw_old = false;
        let mut saw_new = false;
        for sec in (start / 512)..end.div_ceil(512) {
            let lo = (sec * 512).max(start);
            let hi = ((sec + 1) * 512).min(end);
            let at = |img: &[u8]| {
                (lo..hi)
                    .map(|i| img.get(i).copied().unwrap_or(0))
                    .collect::<Vec<u8>>()
            };
            let got = at(&st.image);
            if got == at(&old) {
                saw_old = true;
            } else {
                assert_eq!(
                    got,
                    at(&new),
                    "{}: sector {sec} is neither old nor new",
                    st.kind
                );
                saw_new = true;
            }
        }
        assert!(saw_old && saw_new, "{}: torn means partial", st.kind);
        assert_eq!(sectors.len(), end.div_ceil(512) - start / 512);
        // Outside the write, the state is the old image.
        for i in (0..start).chain(end..old.len()) {
            assert_eq!(
                st.image.get(i).copied().unwrap_or(0),
                old[i],
                "{}: byte {i}",
                st.kind
            );
        }
        assert_eq!(st.image, cp.state(&st.kind, 512));
    }
}

#[test]
fn crash_flush_clears_pending_and_counts_epochs() {
    let s = CrashStorage::new();
    workload(&s);
    assert_eq!(s.pending_count(), 6);
    s.flush().unwrap();
    s.flush().unwrap();
    assert_eq!(s.epoch(), 2);
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.durable(), s.current());
    let only: Vec<CrashState> = s.crash_states(&CrashOptions::thorough(5, 1)).collect();
    assert!(only.iter().all(|st| st.image == s.durable()));
    // Power loss drops what came after.
    s.write_at(&[9; 4], 0).unwrap();
    assert_eq!(s.crash(), 1);
    assert_eq!(s.current(), s.durable());
}

#[test]
fn crash_checkpoint_is_a_frozen_moment() {
    let s = CrashStorage::new();
    s.write_at(&[1; 4], 0).unwrap();
    let cp = s.checkpoint();
    let states = s.crash_states(&CrashOptions::default());
    s.write_at(&[2; 4], 0).unwrap();
    s.flush().unwrap();
    assert_eq!(cp.pending().len(), 1);
    assert_eq!(cp.current(), vec![1; 4]);
    assert_eq!(
        states.map(|st| st.image).collect::<Vec<_>>(),
        [vec![], vec![1; 4]]
    );
}

#[test]
fn crash_hooks_see_every_flush_boundary_and_op() {
    let s = CrashStorage::new();
    let boundaries = Arc::new(Mutex::new(Vec::new()));
    let ops_seen = Arc::new(Mutex::new(Vec::new()));
    {
        let boundaries = Arc::clone(&boundaries);
        s.on_flush(move |cp| {
            // The place to check recovery of every crash state before the barrier.
            let n = cp
                .crash_states(&CrashOptions::thorough(2, cp.epoch()))
                .count();
            boundaries
                .lock()
                .unwrap()
                .push((cp.epoch(), cp.pending().len(), n));
            Ok(())
        });
        let ops_seen = Arc::clone(&ops_seen);
        s.on_op(move |cp| ops_seen.lock().unwrap().push(cp.pending().len()));
    }
    s.write_at(&[1; 8], 0).unwrap();
    s.write_at(&[2; 8], 8).unwrap();
    s.flush().unwrap();
    s.set_len(4).unwrap();
    s.flush().unwrap();
    assert_eq!(*boundaries.lock().unwrap(), [(0, 2, 3 + 2), (1, 1, 2 + 2)]);
    assert_eq!(*ops_seen.lock().unwrap(), [1, 2, 1]);
    s.clear_hooks();
    s.write_at(&[1], 0).unwrap();
    assert_eq!(ops_seen.lock().unwrap().len(), 3);
}

#[test]
fn crash_reset_restarts_from_a_chosen_state() {
    let s = CrashStorage::new();
    workload(&s);
    let chosen = s.crash_states(&CrashOptions::default()).nth(2).unwrap();
    s.reset(chosen.image.clone());
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.durable(), chosen.image);
    assert_eq!(s.read_vec(300, 4).unwrap(), [1, 1, 1, 1]);
}

// ---------------------------------------------------------------------------------------
// Property: durable image after the last flush equals the model, and every crash state
// agrees with the durable image outside the bytes pending operations touch.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum TOp {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
    SetLen(u64),
    Flush,
}

impl Arbitrary for TOp {
    fn arbitrary(g: &mut Gen) -> Self {
        // Offsets and lengths within a few sectors, so writes straddle sectors and overlap.
        let off = u64::arbitrary(g) % 6000;
        let len = u64::arbitrary(g) % 1800;
        match u8::arbitrary(g) % 10 {
            0..=4 => {
                let b = u8::arbitrary(g);
                TOp::Write(off, vec![b | 1; len as usize])
            }
            5 => TOp::Zero(off, len),
            6 => TOp::Discard(off, len),
            7 => TOp::SetLen(off),
            _ => TOp::Flush,
        }
    }
}

fn apply_top(s: &dyn Storage, op: &TOp) {
    match op {
        TOp::Write(o, d) => s.write_at(d, *o),
        TOp::Zero(o, l) => s.write_zeroes(*o, *l),
        TOp::Discard(o, l) => s.discard(*o, *l),
        TOp::SetLen(l) => s.set_len(*l),
        TOp::Flush => s.flush(),
    }
    .unwrap();
}

fn touched(pending: &[PendingOp], i: u64) -> bool {
    pending.iter().any(|p| {
        let (s, e) = p.op.touched();
        i >= s && e.is_none_or(|e| i < e)
    })
}

fn prop_durable_and_crash_states(ops: Vec<TOp>, seed: u64) -> TestResult {
    let crash = CrashStorage::new();
    let model = MemStorage::new();
    let mut at_last_flush = Vec::new();
    for op in &ops {
        apply_top(&crash, op);
        apply_top(&model, op);
        if matches!(op, TOp::Flush) {
            at_last_flush = model.to_bytes();
            if crash.durable() != at_last_flush {
                return TestResult::error("durable image differs from the model at a flush");
            }
        }
    }
    if crash.durable() != at_last_flush || crash.current() != model.to_bytes() {
        return TestResult::error("durable or current image differs from the model");
    }
    let cp = crash.checkpoint();
    let durable = cp.durable();
    for st in cp.crash_states(&CrashOptions::thorough(8, seed).with_torn_random(2)) {
        let end = st.image.len().max(durable.len()) as u64 + 1;
        for i in 0..end {
            if touched(cp.pending(), i) {
                continue;
            }
            let get = |img: &[u8]| img.get(i as usize).copied().unwrap_or(0);
            if get(&st.image) != get(durable) {
                return TestResult::error(format!("{}: untouched byte {i} changed", st.kind));
            }
        }
    }
    TestResult::passed()
}

#[test]
fn quickcheck_durable_matches_model_and_crash_states_respect_untouched_bytes() {
    QuickCheck::new()
        .tests(200)
        .quickcheck(prop_durable_and_crash_states as fn(Vec<TOp>, u64) -> TestResult);
}

#[test]
fn allocate_reserves_blocks_and_keeps_contents() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let f = FileStorage::create(&path).unwrap();
    f.write_at(b"head", 0).unwrap();
    f.allocate(4096, 1 << 20).unwrap();
    assert_eq!(f.len().unwrap(), 4096 + (1 << 20));
    let mut buf = [0u8; 4];
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"head");
    let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(blocks >= 1 << 20, "only {blocks} bytes allocated");
    // A prefetch hint changes nothing either (also past the end, also huge).
    f.prefetch(0, 1 << 30);
    f.prefetch(u64::MAX - 1, 10);
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"head");
    // Inside the file nothing changes, not even the length.
    f.allocate(0, 8).unwrap();
    assert_eq!(f.len().unwrap(), 4096 + (1 << 20));
    // The default (memory) only extends, with zeros.
    let m = MemStorage::new();
    m.write_at(b"x", 0).unwrap();
    m.allocate(10, 6).unwrap();
    assert_eq!(m.len().unwrap(), 16);
    assert!(m.allocate(u64::MAX, 2).is_err());
}
