//! Refcount engine and allocator: allocating clusters one by one and in runs, on a fresh and
//! on a fragmented image, at two sizes an order of magnitude apart. Criterion reports time
//! per cluster (throughput in elements): flat across sizes means the allocation cost does
//! not grow with the image.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use benches::SparseStorage;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use qcow2_alloc::Allocator;
use qcow2_cache::{CacheId, CacheOptions, Caches};
use qcow2_format::header::Header;
use qcow2_format::layout::{fresh_image, CreateOptions};
use qcow2_refcount::{DiscardType, RefcountEngine};
use std::sync::Arc;

struct Setup {
    caches: Caches,
    engine: RefcountEngine,
}

fn fresh(cluster_size: u64) -> Setup {
    let mut o = CreateOptions::new(1 << 40);
    o.cluster_size = cluster_size;
    let bytes = fresh_image(&o).expect("layout").to_bytes();
    let storage = Arc::new(SparseStorage::from_bytes(&bytes));
    let header = Header::parse(&bytes).expect("header");
    let g = header.geometry().expect("geometry");
    let cs = g.cluster_size() as usize;
    let caches = Caches::new(
        storage.clone(),
        CacheOptions::new(cs, 16),
        CacheOptions::new(cs, 4),
    )
    .expect("caches");
    let engine = RefcountEngine::open(
        g,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        &*storage,
    )
    .expect("engine");
    Setup { caches, engine }
}

/// A fresh image with `2n` clusters allocated and every other one freed (and released).
fn fragmented(cluster_size: u64, n: u64) -> Setup {
    let mut s = fresh(cluster_size);
    let mut offs = Vec::with_capacity(2 * n as usize);
    for _ in 0..2 * n {
        offs.push(s.engine.alloc_clusters(&mut s.caches, 1).expect("alloc"));
    }
    for o in offs.iter().step_by(2) {
        s.engine
            .free_clusters(&mut s.caches, *o, cluster_size, DiscardType::Never)
            .expect("free");
    }
    s.caches.flush(CacheId::L2).expect("flush");
    s.caches.flush(CacheId::Refblock).expect("flush");
    s.engine.release_quarantine(&mut s.caches);
    s
}

fn bench_alloc(c: &mut Criterion) {
    let cs = 65536;
    let mut g = c.benchmark_group("alloc_clusters");
    g.sample_size(10);
    for n in [100_000u64, 1_000_000] {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("fresh_one_by_one", n), &n, |b, &n| {
            b.iter_batched(
                || fresh(cs),
                |mut s| {
                    for _ in 0..n {
                        s.engine.alloc_clusters(&mut s.caches, 1).expect("alloc");
                    }
                    s
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_with_input(BenchmarkId::new("fresh_runs_of_16", n), &n, |b, &n| {
            b.iter_batched(
                || fresh(cs),
                |mut s| {
                    for _ in 0..n / 16 {
                        s.engine.alloc_clusters(&mut s.caches, 16).expect("alloc");
                    }
                    s
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_with_input(BenchmarkId::new("fragmented_one_by_one", n), &n, |b, &n| {
            b.iter_batched(
                || fragmented(cs, n),
                |mut s| {
                    for _ in 0..n {
                        s.engine.alloc_clusters(&mut s.caches, 1).expect("alloc");
                    }
                    s
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_alloc_bytes(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_bytes");
    g.sample_size(10);
    let n = 100_000u64;
    g.throughput(Throughput::Elements(n));
    g.bench_function("compressed_3000_bytes", |b| {
        b.iter_batched(
            || fresh(65536),
            |mut s| {
                let mut a = Allocator::new(*s.engine.geometry());
                for _ in 0..n {
                    a.alloc_bytes(&mut s.engine, &mut s.caches, 3000)
                        .expect("alloc");
                }
                s
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_get(c: &mut Criterion) {
    let mut s = fresh(65536);
    for _ in 0..10_000 {
        s.engine.alloc_clusters(&mut s.caches, 1).expect("alloc");
    }
    c.bench_function("refcount_get_cached", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 7) % 10_000;
            s.engine.get(&mut s.caches, i).expect("get")
        })
    });
}

criterion_group!(benches, bench_alloc, bench_alloc_bytes, bench_get);
criterion_main!(benches);
