//! What tracking one enabled persistent bitmap costs on the write path, without the
//! storage in the way: the `cargo xtask bench` write workloads' request patterns
//! (sequential allocating 64 KiB writes over 1 GiB; random allocating 4 KiB writes, one per
//! 64 KiB cluster) on an in-memory image, with and without an enabled bitmap, alternating
//! runs; prints the median time of each and the ratio.
//!
//! `cargo run --release -p qcow2-image --example bitmap_cost [RUNS [SIZE_MIB [MODE]]]`
//!
//! MODE `none` or `bitmap` (optionally `:seq` or `:rand`) runs only that side once per
//! run (for an instruction count under `valgrind --tool=callgrind`, which a loaded machine
//! does not disturb).

use qcow2_image::{BitmapAddOptions, CreateOptions, Image};
use qcow2_io::MemStorage;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run(bitmap: bool, random: bool, disk: u64) -> Duration {
    let size = if random { disk + 4096 } else { disk };
    let mut img =
        Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(size)).expect("create");
    if bitmap {
        img.bitmap_add("b0", &BitmapAddOptions::default())
            .expect("add");
    }
    let t = Instant::now();
    if random {
        let clusters = disk / 65536;
        let buf = vec![165u8; 4096];
        for k in 0..clusters / 2 {
            img.write((k * 7919 % clusters) * 65536, &buf)
                .expect("write");
        }
    } else {
        let buf = vec![165u8; 65536];
        for k in 0..disk / 65536 {
            img.write(k * 65536, &buf).expect("write");
        }
    }
    img.close().expect("close");
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let disk = args
        .get(2)
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(1024)
        << 20;
    if let Some(mode) = args.get(3) {
        // `none`, `bitmap`, or either with `:seq` / `:rand` for one workload.
        let (side, only) = mode.split_once(':').unwrap_or((mode, ""));
        for random in [false, true] {
            if (only == "seq" && random) || (only == "rand" && !random) {
                continue;
            }
            for _ in 0..runs {
                run(side == "bitmap", random, disk);
            }
        }
        return;
    }
    // 7919 is coprime to the cluster count (a power of two): every cluster once.
    for random in [false, true] {
        let (mut none, mut with) = (Vec::new(), Vec::new());
        for i in 0..runs {
            // Alternate which goes first, so drift hits both alike.
            if i % 2 == 0 {
                none.push(run(false, random, disk));
                with.push(run(true, random, disk));
            } else {
                with.push(run(true, random, disk));
                none.push(run(false, random, disk));
            }
        }
        let (n, w) = (median(none), median(with));
        println!(
            "{}: no bitmap {:?}, one enabled bitmap {:?}, ratio {:.3}",
            if random {
                "rand-write-4k"
            } else {
                "seq-write-64k"
            },
            n,
            w,
            w.as_secs_f64() / n.as_secs_f64()
        );
    }
}
