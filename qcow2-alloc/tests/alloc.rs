//! The byte allocator and L2-entry freeing against `qemu-img check`.

use qcow2_alloc::{AllocError, Allocator, DiscardType};
use qcow2_format::compressed::CompressedFormat;
use qcow2_format::entry::{L2Context, L2Entry};
use qcow2_io::MemStorage;
use qcow2_refcount::test_utils::*;
use quickcheck::{QuickCheck, TestResult};
use std::sync::Arc;

fn fixture(cs: u64, bits: u32) -> Fixture {
    open(Arc::new(MemStorage::from_bytes(fresh_bytes(
        cs,
        bits,
        4096 * cs,
    ))))
}

/// Allocates compressed ranges of the given sizes, links their descriptors into L2 tables
/// and returns `qemu-img check`'s verdict.
fn compressed_run(cs: u64, bits: u32, sizes: &[u64], free_every: usize) -> TestResult {
    let mut f = fixture(cs, bits);
    let mut a = Allocator::new(f.geometry);
    let fmt = CompressedFormat::for_geometry(&f.geometry);
    let mut entries = Vec::new();
    let mut end = 0;
    for (i, &s) in sizes.iter().enumerate() {
        let size = s % cs + 1;
        let off = a.alloc_bytes(&mut f.engine, &mut f.caches, size).unwrap();
        let e = fmt.encode(off, size).unwrap();
        // Every touched cluster is in use.
        let d = fmt.decode(e).unwrap();
        for c in d.host_clusters(&f.geometry).unwrap() {
            assert!(f.refcount(c) >= 1);
        }
        if free_every != 0 && i % free_every == free_every - 1 {
            a.free_l2_entry(
                &mut f.engine,
                &mut f.caches,
                e,
                L2Context::STANDARD,
                DiscardType::Request,
            )
            .unwrap();
        } else {
            end = end.max(d.host_offset() + d.compressed_size());
            entries.push(e.raw_entry());
        }
    }
    f.link_l2_entries(&entries, end);
    let (code, json) = qemu_check_bytes(&read_all(&*f.storage));
    if code != 0 {
        return TestResult::error(format!("cs {cs} bits {bits}: exit {code} {json}"));
    }
    TestResult::passed()
}

#[test]
fn compressed_ranges_share_clusters_and_check_clean() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for bits in [1u32, 2, 16, 64] {
            let sizes: Vec<u64> = (0..200u64)
                .map(|i| (i * 7919 + 13) % (cs / 2 + 1) + 1)
                .collect();
            let r = compressed_run(cs, bits, &sizes, 0);
            assert!(!r.is_failure(), "{r:?}");
        }
    }
}

#[test]
fn compressed_frees_leave_no_leak() {
    for bits in [1u32, 4, 16] {
        let sizes: Vec<u64> = (0..300u64).map(|i| (i * 104729) % 3000 + 1).collect();
        let r = compressed_run(4096, bits, &sizes, 3);
        assert!(!r.is_failure(), "{r:?}");
    }
}

#[test]
fn refcount_bits_1_gives_each_compressed_cluster_its_own_host_cluster() {
    let mut f = fixture(65536, 1);
    let mut a = Allocator::new(f.geometry);
    let x = a.alloc_bytes(&mut f.engine, &mut f.caches, 100).unwrap();
    let y = a.alloc_bytes(&mut f.engine, &mut f.caches, 100).unwrap();
    assert_ne!(f.geometry.cluster_index(x), f.geometry.cluster_index(y));
}

#[test]
fn byte_allocations_are_packed_and_straddle_contiguous_clusters() {
    let mut f = fixture(4096, 16);
    let mut a = Allocator::new(f.geometry);
    let x = a.alloc_bytes(&mut f.engine, &mut f.caches, 3000).unwrap();
    let y = a.alloc_bytes(&mut f.engine, &mut f.caches, 3000).unwrap();
    assert_eq!(
        y,
        x + 3000,
        "the second range follows the first, straddling clusters"
    );
    let c = f.geometry.cluster_index(x);
    assert_eq!(f.refcount(c), 2);
    assert_eq!(f.refcount(c + 1), 1);
    let err = a
        .alloc_bytes(&mut f.engine, &mut f.caches, 4097)
        .unwrap_err();
    assert!(matches!(err, AllocError::InvalidSize { .. }));
}

#[test]
fn freeing_an_unaligned_entry_is_reported_not_done() {
    let mut f = fixture(65536, 16);
    let mut a = Allocator::new(f.geometry);
    let e = L2Entry::from_raw(0x8000_0000_0005_2a00, 0);
    let err = a
        .free_l2_entry(
            &mut f.engine,
            &mut f.caches,
            e,
            L2Context::STANDARD,
            DiscardType::Request,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Cannot free unaligned cluster 0x52a00");
}

#[test]
fn compressed_property() {
    fn prop(sizes: Vec<u16>, bits_sel: u8) -> TestResult {
        let bits = [1u32, 2, 4, 8, 16, 32, 64][usize::from(bits_sel % 7)];
        let sizes: Vec<u64> = sizes.into_iter().map(u64::from).collect();
        compressed_run(4096, bits, &sizes, 5)
    }
    QuickCheck::new()
        .tests(20)
        .quickcheck(prop as fn(Vec<u16>, u8) -> TestResult);
}

// ----- combined model: clusters and compressed bytes -------------------------------------

use qcow2_alloc::Change;
use quickcheck::{Arbitrary, Gen};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Alloc(u8),
    AllocAt(u16, u8),
    AllocBytes(u16),
    FreeCluster(u16),
    FreeBytes(u16),
    Flush,
}

impl Arbitrary for Op {
    fn arbitrary(g: &mut Gen) -> Self {
        match u8::arbitrary(g) % 11 {
            0..=2 => Op::Alloc(u8::arbitrary(g) % 4 + 1),
            3 => Op::AllocAt(u16::arbitrary(g), u8::arbitrary(g) % 3 + 1),
            4..=6 => Op::AllocBytes(u16::arbitrary(g)),
            7 => Op::FreeCluster(u16::arbitrary(g)),
            8 | 9 => Op::FreeBytes(u16::arbitrary(g)),
            _ => Op::Flush,
        }
    }
}

thread_local! {
    static CONFIG: std::cell::Cell<(u64, u32)> = const { std::cell::Cell::new((4096, 16)) };
}

/// Random allocate / allocate-at / allocate-bytes / free / flush against a model of the
/// references; afterwards every on-disk refcount equals the model (after a reopen) and
/// `qemu-img check` finds no error and no leak.
fn combined(ops: Vec<Op>) -> TestResult {
    let (cs, bits) = CONFIG.with(|c| c.get());
    let mut f = fixture(cs, bits);
    let mut a = Allocator::new(f.geometry);
    let fmt = CompressedFormat::for_geometry(&f.geometry);
    let mut clusters: Vec<u64> = Vec::new();
    let mut compressed: Vec<L2Entry> = Vec::new();
    for op in ops {
        match op {
            Op::Alloc(n) => {
                let off = f
                    .engine
                    .alloc_clusters(&mut f.caches, u64::from(n))
                    .unwrap();
                clusters.extend((0..u64::from(n)).map(|i| off / cs + i));
            }
            Op::AllocAt(at, n) => {
                let c0 = u64::from(at) % (f.file_len() / cs + 8);
                let got = f
                    .engine
                    .alloc_clusters_at(&mut f.caches, c0 * cs, u64::from(n))
                    .unwrap();
                clusters.extend(c0..c0 + got);
            }
            Op::AllocBytes(s) => {
                let size = u64::from(s) % cs + 1;
                match a.alloc_bytes(&mut f.engine, &mut f.caches, size) {
                    Ok(off) => compressed.push(fmt.encode(off, size).unwrap()),
                    Err(e) => return TestResult::error(format!("alloc_bytes: {e}")),
                }
            }
            Op::FreeCluster(k) if !clusters.is_empty() => {
                let c = clusters.swap_remove(usize::from(k) % clusters.len());
                f.engine
                    .free_clusters(&mut f.caches, c * cs, cs, DiscardType::Request)
                    .unwrap();
            }
            Op::FreeBytes(k) if !compressed.is_empty() => {
                let e = compressed.swap_remove(usize::from(k) % compressed.len());
                a.free_l2_entry(
                    &mut f.engine,
                    &mut f.caches,
                    e,
                    L2Context::STANDARD,
                    DiscardType::Request,
                )
                .unwrap();
            }
            Op::Flush => f.flush(),
            _ => {}
        }
    }
    // Model: references per host cluster.
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    for &c in &clusters {
        *model.entry(c).or_default() += 1;
    }
    let mut end = 0;
    for e in &compressed {
        let d = fmt.decode(*e).unwrap();
        end = end.max(d.host_offset() + d.compressed_size());
        for c in d.host_clusters(&f.geometry).unwrap() {
            *model.entry(c).or_default() += 1;
        }
    }
    f.flush();
    let mut g = open(f.storage.clone());
    let meta = g.metadata_clusters();
    for c in 0..g.file_len().div_ceil(cs) + 2 {
        let expect = model.get(&c).copied().unwrap_or(0) + u64::from(meta.contains(&c));
        let got = g.refcount(c);
        if got != expect {
            return TestResult::error(format!(
                "cs {cs} bits {bits} cluster {c}: {got} != {expect}"
            ));
        }
    }
    let _ = Change::Increase(0);
    let mut entries: Vec<u64> = clusters.iter().map(|&c| (c * cs) | (1 << 63)).collect();
    entries.extend(compressed.iter().map(|e| e.raw_entry()));
    let file_end = end.max(clusters.iter().max().map_or(0, |&m| (m + 1) * cs));
    g.link_l2_entries(&entries, file_end);
    let (code, json) = qemu_check_bytes(&read_all(&*g.storage));
    if code != 0 {
        return TestResult::error(format!(
            "cs {cs} bits {bits}: qemu-img check exit {code}: {json}"
        ));
    }
    TestResult::passed()
}

#[test]
fn combined_model_every_width_and_cluster_size() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            CONFIG.with(|c| c.set((cs, bits)));
            QuickCheck::new()
                .tests(3)
                .rng(Gen::new(80))
                .quickcheck(combined as fn(Vec<Op>) -> TestResult);
        }
    }
}

/// Found by the combined model: a compressed cluster freed and released, its host cluster
/// handed out as a data cluster, then the next compressed write must not append into it
/// (QEMU's allocator only checks for refcount_max there).
#[test]
fn never_appends_compressed_data_into_a_cluster_freed_meanwhile() {
    let mut f = fixture(512, 4);
    let mut a = Allocator::new(f.geometry);
    let fmt = CompressedFormat::for_geometry(&f.geometry);
    let x = a.alloc_bytes(&mut f.engine, &mut f.caches, 276).unwrap();
    let e = fmt.encode(x, 276).unwrap();
    a.free_l2_entry(
        &mut f.engine,
        &mut f.caches,
        e,
        L2Context::STANDARD,
        DiscardType::Request,
    )
    .unwrap();
    f.flush();
    let data = f.engine.alloc_clusters(&mut f.caches, 1).unwrap();
    assert_eq!(data / 512, x / 512, "the freed cluster is reused for data");
    let y = a.alloc_bytes(&mut f.engine, &mut f.caches, 154).unwrap();
    assert_ne!(
        y / 512,
        data / 512,
        "compressed bytes went into a data cluster"
    );
}
