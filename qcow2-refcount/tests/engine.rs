//! Refcount engine behaviour against a model and against `qemu-img check`.

use qcow2_io::fault::{FaultStorage, Rule};
use qcow2_io::{errno, Event, MemStorage, Storage};
use qcow2_refcount::test_utils::*;
use qcow2_refcount::{Change, DiscardType, RefcountError};
use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use std::collections::BTreeMap;
use std::sync::Arc;

const WIDTHS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];
const CLUSTER_SIZES: [u64; 4] = [512, 4096, 65536, 2 << 20];

fn mem_fixture(cs: u64, bits: u32, size: u64) -> Fixture {
    open(Arc::new(MemStorage::from_bytes(fresh_bytes(
        cs, bits, size,
    ))))
}

#[test]
fn fresh_image_refcounts_match_layout() {
    for cs in CLUSTER_SIZES {
        for bits in WIDTHS {
            let mut f = mem_fixture(cs, bits, 64 << 20);
            let meta = f.metadata_clusters();
            let end = f.geometry.size_to_clusters(f.file_len());
            for c in 0..end + 4 {
                let expect = u64::from(meta.contains(&c));
                assert_eq!(f.refcount(c), expect, "cs {cs} bits {bits} cluster {c}");
            }
        }
    }
}

#[test]
fn sequential_allocation_is_clean_for_every_width_and_cluster_size() {
    for cs in CLUSTER_SIZES {
        for bits in WIDTHS {
            let mut f = mem_fixture(cs, bits, 4096 * cs);
            let mut data = Vec::new();
            for _ in 0..300 {
                let off = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
                data.push(f.geometry.cluster_index(off));
            }
            // A run too.
            let off = f.engine.alloc_clusters(&mut f.caches, 17).unwrap();
            for i in 0..17 {
                data.push(f.geometry.cluster_index(off) + i);
            }
            let mut sorted = data.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), data.len(), "no cluster handed out twice");
            f.link_data(&data);
            let (code, json) = qemu_check_bytes(&read_all(&*f.storage));
            assert_eq!(code, 0, "cs {cs} bits {bits}: {json}");
            assert!(json.get("leaks").is_none() && json.get("corruptions").is_none());
        }
    }
}

#[test]
fn reftable_grows_three_times_with_512_byte_clusters_and_64_bit_refcounts() {
    let mut f = mem_fixture(512, 64, 1 << 30);
    let mut offsets = vec![f.engine.reftable_offset()];
    let mut data = Vec::new();
    let mut old_table_clusters = 0;
    let mut clusters = f.engine.reftable_clusters();
    while offsets.len() < 4 {
        let off = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
        data.push(f.geometry.cluster_index(off));
        if f.engine.reftable_offset() != *offsets.last().unwrap() {
            offsets.push(f.engine.reftable_offset());
            old_table_clusters += clusters;
            assert!(f.engine.reftable_clusters() > clusters, "the table grew");
            clusters = f.engine.reftable_clusters();
        }
        assert!(data.len() < 200_000, "table never grew");
    }
    // The table moved three times and grew each time.
    assert!(f.engine.reftable_clusters() > 1);
    // Header points at the live table.
    let mut hdr = [0u8; 12];
    f.storage.read_at(&mut hdr, 48).unwrap();
    assert_eq!(
        u64::from_be_bytes(hdr[..8].try_into().unwrap()),
        f.engine.reftable_offset()
    );
    assert_eq!(
        u64::from(u32::from_be_bytes(hdr[8..].try_into().unwrap())),
        f.engine.reftable_clusters()
    );
    f.link_data(&data);
    let (code, json) = qemu_check_bytes(&read_all(&*f.storage));
    assert_eq!(code, 0, "{json}");
    // No holes except the freed old tables (QEMU leaves those too).
    let end = f.geometry.size_to_clusters(f.file_len());
    let free = (0..end).filter(|&c| f.refcount(c) == 0).count() as u64;
    assert_eq!(
        free, old_table_clusters,
        "holes other than the freed old tables"
    );
}

#[test]
fn new_refcount_block_takes_the_cluster_the_data_wanted() {
    // 512-byte clusters, 16-bit refcounts: one block covers 256 clusters. The first block
    // is at cluster 2; allocating up to cluster 255 and then one more must place the new
    // refcount block at 256 and the data at 257 (iotest 121's "no hole").
    let mut f = mem_fixture(512, 16, 1 << 20);
    let mut last = 0;
    while last < 255 {
        last = f
            .geometry
            .cluster_index(f.engine.alloc_clusters(&mut f.caches, 1).unwrap());
    }
    let next = f
        .geometry
        .cluster_index(f.engine.alloc_clusters(&mut f.caches, 1).unwrap());
    assert_eq!(next, 257);
    assert_eq!(f.engine.reftable()[1], 256 * 512);
    assert_eq!(f.refcount(256), 1);
}

#[test]
fn overflow_is_typed_and_leaves_no_corruption() {
    for bits in [1u32, 2] {
        let mut f = mem_fixture(65536, bits, 64 << 20);
        let off = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
        let max = (1u64 << bits) - 1;
        for _ in 1..max {
            f.bump(off, Change::Increase(1)).unwrap();
        }
        let err = f.bump(off, Change::Increase(1)).unwrap_err();
        assert!(
            matches!(err, RefcountError::Overflow { refcount, .. } if refcount == max),
            "{err}"
        );
        assert_eq!(err.errno(), errno::EINVAL);
        assert_eq!(f.refcount(f.geometry.cluster_index(off)), max);
        for _ in 1..max {
            f.bump(off, Change::Decrease(1)).unwrap();
        }
        let c = f.geometry.cluster_index(off);
        f.link_data(&[c]);
        let (code, json) = qemu_check_bytes(&read_all(&*f.storage));
        assert_eq!(code, 0, "bits {bits}: {json}");
    }
}

#[test]
fn failed_range_update_rolls_back() {
    let mut f = mem_fixture(65536, 2, 64 << 20);
    let off = f.engine.alloc_clusters(&mut f.caches, 3).unwrap();
    let cs = f.geometry.cluster_size();
    f.bump(off + cs, Change::Increase(2)).unwrap(); // middle at 3 = max
    let err = f
        .engine
        .update(
            &mut f.caches,
            off,
            3 * cs,
            Change::Increase(1),
            DiscardType::Never,
        )
        .unwrap_err();
    assert!(matches!(err, RefcountError::Overflow { .. }));
    let c = f.geometry.cluster_index(off);
    assert_eq!(
        [f.refcount(c), f.refcount(c + 1), f.refcount(c + 2)],
        [1, 3, 1]
    );
    let err = f
        .engine
        .update(
            &mut f.caches,
            off,
            3 * cs,
            Change::Decrease(2),
            DiscardType::Never,
        )
        .unwrap_err();
    assert!(matches!(err, RefcountError::Underflow { .. }));
    assert_eq!(
        [f.refcount(c), f.refcount(c + 1), f.refcount(c + 2)],
        [1, 3, 1]
    );
}

#[test]
fn freed_clusters_stay_quarantined_until_released() {
    let mut f = mem_fixture(65536, 16, 64 << 20);
    let a = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    f.engine
        .free_clusters(&mut f.caches, a, 65536, DiscardType::Request)
        .unwrap();
    assert_eq!(f.refcount(f.geometry.cluster_index(a)), 0);
    assert_eq!(f.engine.quarantined_clusters(), 1);
    let b = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    assert_ne!(a, b, "a quarantined cluster was handed out again");
    f.flush();
    assert_eq!(f.engine.quarantined_clusters(), 0);
    let c = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    assert_eq!(a, c, "released cluster is reused first");
}

#[test]
fn alloc_at_stops_at_the_first_used_cluster() {
    let mut f = mem_fixture(65536, 16, 64 << 20);
    let cs = 65536;
    // Fresh layout uses clusters 0..=3; 4.. are free.
    let n = f
        .engine
        .alloc_clusters_at(&mut f.caches, 6 * cs, 3)
        .unwrap();
    assert_eq!(n, 3);
    let n = f
        .engine
        .alloc_clusters_at(&mut f.caches, 4 * cs, 5)
        .unwrap();
    assert_eq!(n, 2);
    let n = f
        .engine
        .alloc_clusters_at(&mut f.caches, 3 * cs, 5)
        .unwrap();
    assert_eq!(n, 0);
    let next = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    assert_eq!(next, 9 * cs);
}

#[test]
fn corrupt_reftable_entry_is_a_typed_error() {
    let f = mem_fixture(65536, 16, 64 << 20);
    // Poke an unaligned refcount-block offset into the table and reopen.
    f.storage
        .write_at(&0x22a00u64.to_be_bytes(), 0x10000)
        .unwrap();
    let mut f = open(f.storage.clone());
    let err = f.engine.get(&mut f.caches, 5).unwrap_err();
    assert!(
        matches!(
            err,
            RefcountError::UnalignedRefblock {
                offset: 0x22a00,
                index: 0
            }
        ),
        "{err}"
    );
    assert!(err.is_corruption());
    assert_eq!(
        err.to_string(),
        "Refblock offset 0x22a00 unaligned (reftable index: 0)"
    );
    assert!(f.engine.alloc_clusters(&mut f.caches, 1).is_err());
}

#[test]
fn events_of_a_table_growth_in_qemu_order() {
    let fault = Arc::new(FaultStorage::new(MemStorage::from_bytes(fresh_bytes(
        512,
        64,
        1 << 30,
    ))));
    let mut f = open(fault.clone());
    let start = f.engine.reftable_offset();
    while f.engine.reftable_offset() == start {
        f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    }
    let ev = fault.events();
    let pos = |e: Event| {
        ev.iter()
            .rposition(|&x| x == e)
            .unwrap_or_else(|| panic!("{e} missing"))
    };
    assert!(pos(Event::RefblockAlloc) < pos(Event::RefblockAllocWrite));
    assert!(pos(Event::RefblockAllocWrite) < pos(Event::ReftableGrow));
    assert!(pos(Event::ReftableGrow) < pos(Event::RefblockAllocWriteBlocks));
    assert!(pos(Event::RefblockAllocWriteBlocks) < pos(Event::RefblockAllocWriteTable));
    assert!(pos(Event::RefblockAllocWriteTable) < pos(Event::RefblockAllocSwitchTable));
    assert!(ev.contains(&Event::RefblockAllocHookup));
    assert!(ev.contains(&Event::ClusterAlloc));
}

/// Error injection at every refcount event, EIO and ENOSPC, once and always: the operation
/// fails with the injected errno, and after the fault clears the image has no corruption
/// (leaks allowed).
#[test]
fn error_injection_at_every_refcount_event_leaves_no_corruption() {
    let events = [
        Event::ClusterAlloc,
        Event::ClusterFree,
        Event::RefblockLoad,
        Event::RefblockUpdatePart,
        Event::RefblockAlloc,
        Event::RefblockAllocWrite,
        Event::RefblockAllocHookup,
        Event::ReftableGrow,
        Event::RefblockAllocWriteBlocks,
        Event::RefblockAllocWriteTable,
        Event::RefblockAllocSwitchTable,
    ];
    let mut cases = 0;
    let mut failed_ops = 0;
    for event in events {
        for code in [errno::EIO, errno::ENOSPC] {
            for once in [true, false] {
                cases += 1;
                let fault = Arc::new(FaultStorage::new(MemStorage::from_bytes(fresh_bytes(
                    512,
                    64,
                    64 << 20,
                ))));
                // Small caches force write-backs (refblock_update_part) during the run.
                let mut f = open(fault.clone());
                let mut data = Vec::new();
                let mut freed = 0;
                fault.add_rule(Rule::on_event(event, code).once(once));
                let mut failure = None;
                for i in 0..6000u64 {
                    let r = if i % 7 == 6 && !data.is_empty() {
                        let c: u64 = data.swap_remove((i as usize * 31) % data.len());
                        freed += 1;
                        f.engine
                            .free_clusters(&mut f.caches, c * 512, 512, DiscardType::Request)
                            .map(|()| None)
                            .inspect_err(|_| {
                                data.push(c); // still referenced: the free failed
                            })
                    } else {
                        f.engine.alloc_clusters(&mut f.caches, 1).map(Some)
                    };
                    match r {
                        Ok(Some(off)) => data.push(off / 512),
                        Ok(None) => {}
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    if i % 1000 == 999 {
                        if let Err(e) = f.caches.flush(qcow2_cache::CacheId::Refblock) {
                            failure = Some(e.into());
                            break;
                        }
                    }
                }
                let _ = freed;
                if let Some(e) = &failure {
                    failed_ops += 1;
                    assert_eq!(
                        e.errno(),
                        code,
                        "{event} errno {code} once {once}: unexpected error {e}"
                    );
                }
                // The fault clears (the image is reopened elsewhere in real life); what the
                // caches still hold is written, then the image must check clean of
                // corruption.
                fault.clear_rules();
                f.flush();
                f.link_data(&data);
                let (exit, json) = qemu_check_bytes(&read_all(&*f.storage));
                assert!(
                    exit == 0 || exit == 3,
                    "{event} errno {code} once {once}: exit {exit} {json}"
                );
                assert!(json.get("corruptions").is_none(), "{event}: {json}");
            }
        }
    }
    eprintln!("error injection: {cases} cases, {failed_ops} operations failed as injected");
    assert!(
        failed_ops >= cases - 4,
        "most injected faults must surface: {failed_ops}/{cases}"
    );
}

// ----- model-based property -----------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Alloc(u8),
    AllocAt(u16, u8),
    Free(u16),
    Share(u16),
    Flush,
}

impl Arbitrary for Op {
    fn arbitrary(g: &mut Gen) -> Self {
        match u8::arbitrary(g) % 10 {
            0..=3 => Op::Alloc(u8::arbitrary(g) % 5 + 1),
            4 => Op::AllocAt(u16::arbitrary(g), u8::arbitrary(g) % 4 + 1),
            5 | 6 => Op::Free(u16::arbitrary(g)),
            7 | 8 => Op::Share(u16::arbitrary(g)),
            _ => Op::Flush,
        }
    }
}

/// Runs ops against the engine and a model (cluster -> refcount of data clusters), then
/// checks every on-disk refcount after a reopen and `qemu-img check` with no leak.
fn run_model(cs: u64, bits: u32, ops: &[Op]) -> TestResult {
    let mut f = mem_fixture(cs, bits, 4096 * cs);
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    for op in ops {
        match *op {
            Op::Alloc(n) => {
                let off = f
                    .engine
                    .alloc_clusters(&mut f.caches, u64::from(n))
                    .unwrap();
                for i in 0..u64::from(n) {
                    let c = f.geometry.cluster_index(off) + i;
                    assert!(model.insert(c, 1).is_none(), "cluster {c} handed out twice");
                }
            }
            Op::AllocAt(at, n) => {
                let end = f.geometry.size_to_clusters(f.file_len()) + 8;
                let c0 = u64::from(at) % end;
                let got = f
                    .engine
                    .alloc_clusters_at(&mut f.caches, c0 * cs, u64::from(n))
                    .unwrap();
                for i in 0..got {
                    assert!(
                        model.insert(c0 + i, 1).is_none(),
                        "alloc_at took a used cluster"
                    );
                }
            }
            Op::Free(k) if !model.is_empty() => {
                let c = *model.keys().nth(usize::from(k) % model.len()).unwrap();
                f.engine
                    .free_clusters(&mut f.caches, c * cs, cs, DiscardType::Request)
                    .unwrap();
                let r = model.get_mut(&c).unwrap();
                *r -= 1;
                if *r == 0 {
                    model.remove(&c);
                }
            }
            Op::Share(k) if !model.is_empty() => {
                let c = *model.keys().nth(usize::from(k) % model.len()).unwrap();
                let r = f.bump(c * cs, Change::Increase(1));
                let m = model.get_mut(&c).unwrap();
                if *m == max {
                    assert!(matches!(r, Err(RefcountError::Overflow { .. })));
                } else {
                    r.unwrap();
                    *m += 1;
                }
            }
            Op::Flush => f.flush(),
            _ => {}
        }
    }
    // Bring shared clusters back to one reference so qemu-img can be the judge.
    let shared: Vec<(u64, u64)> = model
        .iter()
        .filter(|(_, &r)| r > 1)
        .map(|(&c, &r)| (c, r))
        .collect();
    for (c, r) in shared {
        f.bump(c * cs, Change::Decrease(r - 1)).unwrap();
        model.insert(c, 1);
    }
    f.flush();
    // Reopen from storage only: on-disk refcounts must equal model + metadata.
    let mut g = open(f.storage.clone());
    let meta = g.metadata_clusters();
    let end = g.geometry.size_to_clusters(g.file_len());
    for c in 0..end {
        let expect = model.get(&c).copied().unwrap_or(0) + u64::from(meta.contains(&c));
        let got = g.refcount(c);
        if got != expect {
            return TestResult::error(format!("cluster {c}: refcount {got}, model {expect}"));
        }
    }
    let data: Vec<u64> = model.keys().copied().collect();
    g.link_data(&data);
    let (code, json) = qemu_check_bytes(&read_all(&*g.storage));
    if code != 0 {
        return TestResult::error(format!("qemu-img check exit {code}: {json}"));
    }
    TestResult::passed()
}

thread_local! {
    /// (cluster size, refcount bits) of the property being run on this thread.
    static CONFIG: std::cell::Cell<(u64, u32)> = const { std::cell::Cell::new((65536, 16)) };
}

fn model_prop(ops: Vec<Op>) -> TestResult {
    let (cs, bits) = CONFIG.with(|c| c.get());
    run_model(cs, bits, &ops)
}

#[test]
fn model_property_every_width_and_cluster_size() {
    for cs in CLUSTER_SIZES {
        for bits in WIDTHS {
            CONFIG.with(|c| c.set((cs, bits)));
            let tests = if cs == 512 { 6 } else { 3 };
            QuickCheck::new()
                .tests(tests)
                .rng(Gen::new(120))
                .quickcheck(model_prop as fn(Vec<Op>) -> TestResult);
        }
    }
}

#[test]
fn model_property_small_clusters_many_ops() {
    // Long sequences with tiny blocks exercise block allocation and table growth.
    CONFIG.with(|c| c.set((512, 64)));
    QuickCheck::new()
        .tests(5)
        .rng(Gen::new(3000))
        .quickcheck(model_prop as fn(Vec<Op>) -> TestResult);
}

#[test]
fn storage_is_send_and_sync() {
    fn assert_send<T: Send>() {}
    assert_send::<qcow2_refcount::RefcountEngine>();
    let _: Arc<dyn Storage> = Arc::new(MemStorage::new());
}

#[test]
fn freed_clusters_are_discarded_only_when_passthrough_allows_and_after_release() {
    use qcow2_refcount::DiscardPassthrough;
    let mut f = open(Arc::new(MemStorage::from_bytes(fresh_bytes(
        4096,
        16,
        64 << 20,
    ))));
    f.engine.set_discard_passthrough(DiscardPassthrough {
        request: true,
        snapshot: true,
        other: false,
    });
    let a = f.engine.alloc_clusters(&mut f.caches, 2).unwrap();
    f.storage.write_at(&[0xab; 8192], a).unwrap();
    f.engine
        .free_clusters(&mut f.caches, a, 4096, DiscardType::Request)
        .unwrap();
    f.engine
        .free_clusters(&mut f.caches, a + 4096, 4096, DiscardType::Never)
        .unwrap();
    let mut buf = [0u8; 8192];
    f.storage.read_at(&mut buf, a).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "nothing discarded before the flush"
    );
    f.flush();
    f.storage.read_at(&mut buf, a).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0),
        "request discard passed down"
    );
    assert!(
        buf[4096..].iter().all(|&b| b == 0xab),
        "DiscardType::Never kept"
    );
}

#[test]
fn updates_beyond_any_refcount_table_are_refused_without_growing_anything() {
    let mut f = mem_fixture(512, 16, 64 << 20);
    let before = f.file_len();
    // 512-byte clusters, 16-bit refcounts: an 8 MiB table covers 2^20 blocks of 256
    // clusters, i.e. 128 GiB of host file. A garbage offset far beyond must be refused.
    let far = 1u64 << 50;
    let err = f.bump(far, Change::Increase(1)).unwrap_err();
    assert!(
        matches!(err, RefcountError::ReftableTooLarge { .. }),
        "{err}"
    );
    assert_eq!(err.errno(), errno::EFBIG);
    let err = f
        .engine
        .free_clusters(&mut f.caches, far, 512, DiscardType::Request)
        .unwrap_err();
    assert!(
        matches!(err, RefcountError::ReftableTooLarge { .. }),
        "{err}"
    );
    assert_eq!(f.file_len(), before);
    assert_eq!(f.refcount(far / 512), 0);
}

#[test]
fn runs_crossing_a_refcount_block_boundary_leave_no_hole() {
    // 4 KiB clusters, 16-bit refcounts: one block covers 2048 clusters. Alternating one
    // cluster (an L2 table) and runs of 512 (its data), as a sequential guest write does.
    let mut f = mem_fixture(4096, 16, 1 << 30);
    let mut last_end = 0;
    for _ in 0..8 {
        let l2 = f.engine.alloc_clusters(&mut f.caches, 1).unwrap() / 4096;
        let run = f.engine.alloc_clusters(&mut f.caches, 512).unwrap() / 4096;
        assert!(
            run <= l2 + 2,
            "hole before the run: L2 at {l2}, run at {run}"
        );
        last_end = run + 512;
    }
    let free = (0..last_end).filter(|&c| f.refcount(c) == 0).count();
    assert_eq!(free, 0, "free clusters below the end");
}
