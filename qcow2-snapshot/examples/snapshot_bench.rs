//! Times snapshot create and delete through this crate on a qcow2 file, for comparison with
//! `qemu-img snapshot -c/-d` on a copy of the same image.
//!
//! `cargo run --release -p qcow2-snapshot --features test-utils --example snapshot_bench -- IMAGE`
//!
//! The image is modified (a snapshot "bench" is created, then deleted). Caches are sized as
//! QEMU's defaults for the image: L2 enough to map the whole disk up to 32 MiB, refcount
//! blocks 4 clusters.
use qcow2_io::{FileStorage, Storage};
use qcow2_snapshot::test_utils::TestImage;
use std::sync::Arc;
use std::time::Instant;

fn open(path: &str) -> TestImage {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true).expect("open image"));
    let probe = TestImage::open(storage.clone()).expect("image");
    let g = probe.host.geometry;
    let tables = probe.host.l1.len().max(1);
    let l2_entries = tables
        .min((32usize << 20) / g.cluster_size() as usize)
        .max(2);
    drop(probe);
    TestImage::open_with(storage, l2_entries, 4).expect("image")
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: snapshot_bench IMAGE");
    let t = Instant::now();
    let mut img = open(&path);
    img.create("bench").expect("create");
    img.close().expect("close");
    let create = t.elapsed();
    let t = Instant::now();
    let mut img = open(&path);
    img.delete("bench").expect("delete");
    img.close().expect("close");
    let delete = t.elapsed();
    println!(
        "create {:.3} s, delete {:.3} s (open and close included)",
        create.as_secs_f64(),
        delete.as_secs_f64()
    );
}
