//! Error injection (iotests 026/217 style): an I/O error at any request, or armed by any of
//! the refcount/L2 events, during create, delete and apply makes the operation fail cleanly,
//! and `qemu-img check` then finds leaks at most — both on the image as the failure left it
//! and after the image was closed (caches flushed). Missing COPIED flags on clusters whose
//! refcount is 1 are tolerated (they only cost a COW; QEMU leaves the same after a failed
//! final COPIED pass).

mod common;
use common::*;
use qcow2_io::errno::EIO;
use qcow2_io::fault::{FaultStorage, IoKind, Rule};
use qcow2_io::{Event, MemStorage, Storage};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
    Apply,
}

/// A small-cluster image (512 B: many L2 tables and refcount blocks) with snapshot "a" made
/// by qemu-img, writes after it, and a compressed cluster; built once.
fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let (_d, p) = tmp_image();
        let ps = p.to_str().unwrap();
        qemu_create(&p, "cluster_size=512", "4M");
        qemu_io(
            &p,
            &[
                "write -P 1 0 48k",
                "write -P 2 1M 16k",
                "write -c -P 3 2M 4k",
            ],
        );
        assert_eq!(run("qemu-img", &["snapshot", "-c", "a", ps]).0, 0);
        qemu_io(&p, &["write -P 4 8k 16k", "write -P 5 3M 8k"]);
        std::fs::read(&p).unwrap()
    })
}

fn run_op(img: &mut TestImage, op: Op) -> Result<(), qcow2_snapshot::Error> {
    match op {
        Op::Create => img.create("new").map(drop),
        Op::Delete => img.delete("a").map(drop),
        Op::Apply => img.apply("a"),
    }
}

/// Runs `op` on a fresh copy of the base over a FaultStorage with `rule`; checks the image
/// as the failure left it and after closing. Returns whether the op succeeded.
fn case(op: Op, rule: Option<Rule>, what: &str) -> bool {
    let fault = Arc::new(FaultStorage::new(MemStorage::from_bytes(base().clone())));
    let storage: Arc<dyn Storage> = fault.clone();
    // Tiny caches so that evictions (write-backs, loads) happen inside the operation.
    let mut img = TestImage::open_with(storage, 2, 2).unwrap();
    if let Some(r) = rule {
        fault.add_rule(r);
    }
    let result = run_op(&mut img, op);
    let (_d, p) = tmp_image();
    write_image(&p, &fault.inner().to_bytes());
    assert_leaks_at_most(&p, &format!("{op:?} {what} (as left)"));
    fault.clear_rules();
    let ok = result.is_ok();
    if let Err(e) = &result {
        // A failure is reported, never a panic; corruption is never claimed for I/O errors.
        assert!(!e.is_corruption(), "{op:?} {what}: {e}");
    }
    let _ = img.close();
    write_image(&p, &fault.inner().to_bytes());
    let f = assert_leaks_at_most(&p, &format!("{op:?} {what} (closed)"));
    if ok {
        // As in QEMU, failing to free the old table or the L1 copy after the switch only
        // leaks; the operation itself succeeded and every COPIED flag is right.
        assert_eq!(f.benign_copied, 0, "{op:?} {what}: succeeded: {f:?}");
    }
    ok
}

/// Number of targeted requests (reads, writes, flushes, discards) an undisturbed op makes.
fn requests(op: Op) -> u64 {
    let fault = Arc::new(FaultStorage::new(MemStorage::from_bytes(base().clone())));
    let storage: Arc<dyn Storage> = fault.clone();
    let mut img = TestImage::open_with(storage, 2, 2).unwrap();
    let s0 = fault.stats();
    run_op(&mut img, op).unwrap();
    let s1 = fault.stats();
    [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Discard]
        .iter()
        .map(|&k| s1.requests(k) - s0.requests(k))
        .sum()
}

fn sweep(op: Op) {
    assert!(case(op, None, "no fault"));
    let n = requests(op);
    assert!(n > 5, "{op:?}: only {n} requests");
    eprintln!("{op:?}: {n} requests");
    let mut failed = 0;
    // Every single request fails once; a persistent failure from every 4th request on.
    for i in 1..=n {
        if !case(
            op,
            Some(Rule::on_request(i, EIO).once(true)),
            &format!("request {i} once"),
        ) {
            failed += 1;
        }
    }
    for i in (1..=n).step_by(4) {
        // (The last requests are discards of freed clusters, whose errors are ignored.)
        case(
            op,
            Some(Rule::on_request(i, EIO).once(false)),
            &format!("requests {i}.. fail"),
        );
    }
    assert!(failed > 0, "{op:?}: no injected failure was noticed");
}

#[test]
fn create_fails_cleanly_at_every_request() {
    sweep(Op::Create);
}

#[test]
fn delete_fails_cleanly_at_every_request() {
    sweep(Op::Delete);
}

#[test]
fn apply_fails_cleanly_at_every_request() {
    sweep(Op::Apply);
}

#[test]
fn blkdebug_events_during_every_operation() {
    let events = [
        Event::ClusterAlloc,
        Event::ClusterFree,
        Event::RefblockLoad,
        Event::RefblockUpdatePart,
        Event::L2Load,
        Event::L2Update,
    ];
    for op in [Op::Create, Op::Delete, Op::Apply] {
        for ev in events {
            for once in [true, false] {
                case(
                    op,
                    Some(Rule::on_event(ev, EIO).once(once)),
                    &format!("{ev} once={once}"),
                );
            }
        }
    }
}

#[test]
fn iotest_217_cluster_free_eio_during_delete() {
    // The old snapshot table is freed right after the header switch: cluster_free arms, the
    // next request fails. Delete then fails after the table update, leaking only.
    let fault = Arc::new(FaultStorage::new(MemStorage::from_bytes(base().clone())));
    let storage: Arc<dyn Storage> = fault.clone();
    let mut img = TestImage::open_with(storage, 2, 2).unwrap();
    fault.add_rule(Rule::on_event(Event::ClusterFree, EIO).once(false));
    let e = img.delete("a").unwrap_err();
    assert_eq!(e.errno(), EIO);
    assert!(img.snapshots.is_empty(), "the table switch happened first");
    fault.clear_rules();
    img.close().unwrap();
    let (_d, p) = tmp_image();
    write_image(&p, &fault.inner().to_bytes());
    let f = assert_leaks_at_most(&p, "217");
    assert!(f.leaks > 0, "{f:?}");
    assert!(qemu_list(&p).is_empty());
    // `check -r leaks` repairs it completely, as in iotest 217.
    let (code, out, err) = run("qemu-img", &["check", "-r", "leaks", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_clean(&p);
}
