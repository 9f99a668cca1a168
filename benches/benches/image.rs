//! The composed stack through the image facade, scaled down for criterion: sequential and
//! random allocating writes, rewrites, sequential reads and compressed writes, on a sparse
//! in-memory storage (so the figures show the engine, not the disk; `cargo xtask bench`
//! measures against qemu-img on real files).
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use benches::SparseStorage;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcow2_image::{CreateOptions, Image};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const TOTAL: u64 = 64 * MIB;

fn image(cluster_size: u64) -> Image {
    let mut o = CreateOptions::new(16 << 30);
    o.cluster_size = cluster_size;
    Image::create(Arc::new(SparseStorage::default()), &o).expect("create")
}

fn written(cluster_size: u64, req: u64) -> Image {
    let mut img = image(cluster_size);
    let buf = vec![0x5au8; req as usize];
    for i in 0..TOTAL / req {
        img.write(i * req, &buf).expect("write");
    }
    img.flush().expect("flush");
    img
}

fn bench_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("image_write");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(TOTAL));
    for (cs, req) in [
        (65536u64, 65536u64),
        (4096, 65536),
        (512, 65536),
        (65536, 4096),
    ] {
        g.bench_function(format!("seq_alloc_cs{cs}_req{req}"), |b| {
            let buf = vec![0x5au8; req as usize];
            b.iter_batched(
                || image(cs),
                |mut img| {
                    for i in 0..TOTAL / req {
                        img.write(i * req, &buf).expect("write");
                    }
                    img.flush().expect("flush");
                    img
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.bench_function("random_alloc_cs65536_req4096", |b| {
        let buf = vec![0x5au8; 4096];
        let n = TOTAL / 4096;
        b.iter_batched(
            || image(65536),
            |mut img| {
                // A full-period LCG over the request slots of a 1 GiB region: every write
                // allocates, in scattered order.
                let slots = (1u64 << 30) / 4096;
                let mut x = 12345u64;
                for _ in 0..n {
                    x = (x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407))
                        % slots;
                    img.write(x * 4096, &buf).expect("write");
                }
                img.flush().expect("flush");
                img
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("rewrite_cs65536_req65536", |b| {
        let buf = vec![0xa5u8; 65536];
        b.iter_batched(
            || written(65536, 65536),
            |mut img| {
                for i in 0..TOTAL / 65536 {
                    img.write(i * 65536, &buf).expect("write");
                }
                img.flush().expect("flush");
                img
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("image_read");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(TOTAL));
    let mut img = written(65536, 65536);
    let mut buf = vec![0u8; 65536];
    g.bench_function("seq_read_cs65536_req65536", |b| {
        b.iter(|| {
            for i in 0..TOTAL / 65536 {
                img.read(i * 65536, &mut buf).expect("read");
            }
        })
    });
    g.finish();
}

fn bench_compressed(c: &mut Criterion) {
    let mut g = c.benchmark_group("image_write_compressed");
    g.sample_size(10);
    let clusters = 256u64;
    g.throughput(Throughput::Bytes(clusters * 65536));
    // Compressible but not trivial: a repeating text-like pattern.
    let data: Vec<u8> = (0..65536u32)
        .map(|i| b"qcow2 engine "[(i % 13) as usize] ^ (i / 4096) as u8)
        .collect();
    g.bench_function("deflate_cs65536", |b| {
        b.iter_batched(
            || image(65536),
            |mut img| {
                for i in 0..clusters {
                    img.write_compressed(i * 65536, &data)
                        .expect("write_compressed");
                }
                img.flush().expect("flush");
                img
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_writes, bench_reads, bench_compressed);
criterion_main!(benches);
