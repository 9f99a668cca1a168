//! (c) A structured sequence of guest operations on a fresh image against a raw mirror:
//! every read equals the mirror, a reopen keeps every byte, and the checker finds no error
//! and no leak at the end.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2_check::{check, CheckOptions};
use qcow2_image::{CreateOptions, Image, OpenOptions};
use qcow2_io::MemStorage;
use std::sync::Arc;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Arbitrary)]
enum Op {
    Write { off: u32, len: u16, byte: u8 },
    Zero { off: u32, len: u32, unmap: bool },
    Discard { off: u32, len: u32 },
    Compressed { cluster: u16, byte: u8 },
    Read { off: u32, len: u16 },
    Flush,
    Reopen,
}

#[derive(Debug, Arbitrary)]
struct Case {
    cluster_bits: u8,
    refcount_order: u8,
    v2: bool,
    extended_l2: bool,
    ops: Vec<Op>,
}

fuzz_target!(|case: Case| {
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = 1 << (9 + u64::from(case.cluster_bits % 8));
    opts.refcount_bits = 1 << (case.refcount_order % 7);
    if case.v2 {
        opts.compat = qcow2_image::Compat::V0_10;
        opts.refcount_bits = 16;
    } else if case.extended_l2 && opts.cluster_size >= 16384 {
        opts.extended_l2 = true;
    }
    let storage = Arc::new(MemStorage::new());
    let Ok(mut img) = Image::create(storage.clone(), &opts) else {
        return;
    };
    let cs = img.cluster_size();
    let mut mirror = vec![0u8; SIZE as usize];
    for op in case.ops.iter().take(64) {
        match *op {
            Op::Write { off, len, byte } => {
                let off = u64::from(off) % SIZE;
                let len = u64::from(len).min(SIZE - off);
                let buf = vec![byte; len as usize];
                img.write(off, &buf).expect("write");
                mirror[off as usize..(off + len) as usize].fill(byte);
            }
            Op::Zero { off, len, unmap } => {
                let off = u64::from(off) % SIZE & !511;
                let len = (u64::from(len) % (1 << 20)).min(SIZE - off) & !511;
                img.write_zeroes(off, len, unmap).expect("write_zeroes");
                mirror[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                // Discard only promises zeros for whole clusters with no backing file; the
                // mirror follows what a read returns, so re-read the range afterwards.
                let off = u64::from(off) % SIZE & !(cs - 1);
                let len = (u64::from(len) % (1 << 20)).min(SIZE - off) & !(cs - 1);
                img.discard(off, len).expect("discard");
                let mut got = vec![0u8; len as usize];
                img.read(off, &mut got).expect("read after discard");
                assert!(
                    got.iter().all(|&b| b == 0) || got == mirror[off as usize..(off + len) as usize],
                    "discard left neither zeros nor the old data"
                );
                mirror[off as usize..(off + len) as usize].copy_from_slice(&got);
            }
            Op::Compressed { cluster, byte } => {
                let off = (u64::from(cluster) * cs) % SIZE;
                let mut buf = vec![byte; cs as usize];
                buf[0] = byte.wrapping_add(1);
                img.write_compressed(off, &buf).expect("write_compressed");
                mirror[off as usize..(off + cs) as usize].copy_from_slice(&buf);
            }
            Op::Read { off, len } => {
                let off = u64::from(off) % SIZE;
                let len = u64::from(len).min(SIZE - off);
                let mut buf = vec![0u8; len as usize];
                img.read(off, &mut buf).expect("read");
                assert_eq!(buf, mirror[off as usize..(off + len) as usize], "read at {off}");
            }
            Op::Flush => img.flush().expect("flush"),
            Op::Reopen => {
                img.close().expect("close");
                img = Image::open(storage.clone(), &OpenOptions::read_write()).expect("reopen");
            }
        }
    }
    img.close().expect("close");
    let mut img = Image::open(storage.clone(), &OpenOptions::read_only()).expect("open");
    let mut all = vec![0u8; SIZE as usize];
    img.read(0, &mut all).expect("read all");
    assert!(all == mirror, "image differs from the mirror after close");
    let report = check(storage, &CheckOptions::default()).expect("check");
    assert!(report.is_clean(), "checker: {}", report.render_stderr());
});
