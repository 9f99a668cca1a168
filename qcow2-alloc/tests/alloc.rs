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
