//! Metadata-cache hot paths on `MemStorage`: the hit path (get + put on a warm cache), a miss
//! that evicts a dirty entry (write-back + load), and a dependency flush (refblock written,
//! barrier, then the L2 slice).
// `criterion_group!` generates an undocumented `pub fn`; a bench binary has no API to document.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qcow2_cache::{CacheId, CacheOptions, Caches};
use qcow2_io::{MemStorage, Storage};
use std::hint::black_box;
use std::sync::Arc;

const CLUSTER: usize = 64 << 10;

fn caches(entry_size: usize, capacity: usize) -> Caches {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Caches::new(
        storage,
        CacheOptions::new(entry_size, capacity),
        CacheOptions::new(CLUSTER, 4),
    )
    .expect("valid options")
}

/// ns per get + put when the table is cached (the L2 lookup of every guest request).
fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_hit");
    g.throughput(Throughput::Elements(1));
    for &entries in &[16usize, 512] {
        let mut caches = caches(CLUSTER, entries);
        let offsets: Vec<u64> = (1..=entries as u64).map(|i| i * CLUSTER as u64).collect();
        for &o in &offsets {
            let h = caches.get(CacheId::L2, o).expect("load");
            caches.put(h).expect("put");
        }
        g.bench_with_input(
            BenchmarkId::new("get_put", entries),
            &offsets,
            |b, offsets| {
                let mut i = 0usize;
                b.iter(|| {
                    let o = offsets[i % offsets.len()];
                    i = i.wrapping_add(7);
                    let h = caches.get(CacheId::L2, black_box(o)).expect("hit");
                    caches.put(h).expect("put");
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("get_read_u64_put", entries),
            &offsets,
            |b, offsets| {
                let mut i = 0usize;
                b.iter(|| {
                    let o = offsets[i % offsets.len()];
                    i = i.wrapping_add(7);
                    let h = caches.get(CacheId::L2, black_box(o)).expect("hit");
                    let d = caches.data(&h);
                    let e = u64::from_be_bytes(d[64..72].try_into().expect("8 bytes"));
                    caches.put(h).expect("put");
                    black_box(e)
                })
            },
        );
    }
    g.finish();
}

/// A miss whose victim is dirty: write-back of the victim, load of the new table, modify,
/// mark dirty, put. Cycling over 8x the capacity makes every get a miss.
fn miss_dirty_eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_miss_dirty_evict");
    for &entry_size in &[4096usize, CLUSTER] {
        let capacity = 8;
        let mut caches = caches(entry_size, capacity);
        let offsets: Vec<u64> = (1..=(capacity * 8) as u64)
            .map(|i| i * entry_size as u64)
            .collect();
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("get_modify_put", entry_size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let o = offsets[i % offsets.len()];
                i += 1;
                let h = caches.get(CacheId::L2, o).expect("miss");
                caches.data_mut(&h)[8] ^= 1;
                caches.mark_dirty(&h);
                caches.put(h).expect("put");
            })
        });
        assert!(caches.stats(CacheId::L2).dirty_evictions > 0);
    }
    g.finish();
}

/// One allocation's worth of ordering: dirty refblock, L2 depends on it, dirty L2 slice,
/// flush L2 (refblock write, barrier, L2 write, barrier). MemStorage barriers are free, so
/// this measures the cache's own cost.
fn dependency_flush(c: &mut Criterion) {
    let mut caches = caches(CLUSTER, 16);
    c.bench_function("cache_dependency_flush", |b| {
        b.iter(|| {
            let rb = caches
                .get(CacheId::Refblock, CLUSTER as u64)
                .expect("refblock");
            caches.data_mut(&rb)[0] ^= 1;
            caches.mark_dirty(&rb);
            caches.put(rb).expect("put");
            caches
                .set_dependency(CacheId::L2, CacheId::Refblock)
                .expect("dependency");
            let l2 = caches.get(CacheId::L2, 2 * CLUSTER as u64).expect("l2");
            caches.data_mut(&l2)[0] ^= 1;
            caches.mark_dirty(&l2);
            caches.put(l2).expect("put");
            caches.flush(CacheId::L2).expect("flush");
        })
    });
}

criterion_group!(benches, hit, miss_dirty_eviction, dependency_flush);
criterion_main!(benches);
