//! (2) Images QEMU writes, read and extended by us: `qemu-io` runs a seeded workload
//! (write, `write -c`, `write -z [-u]`, discard) on images `qemu-img create` made; we must read
//! every byte equal to the mirror, write more, and `qemu-img check` must stay clean.

mod common;

use common::{assert_clean, assert_compare, qemu_create, qemu_io, Rng, Workload};
use qcow2_image::{BackingPolicy, Image, OpenOptions};
use qcow2_io::FileStorage;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

struct Case {
    name: &'static str,
    opts: &'static str,
    size: u64,
    cs: u64,
    v2: bool,
    backing: bool,
}

fn open(path: &Path, dir: &Path) -> Image {
    let opts = OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.to_path_buf(),
            max_depth: 4,
            allowed_dirs: vec![dir.to_path_buf()],
        },
        ..OpenOptions::default()
    };
    Image::open(Arc::new(FileStorage::open(path, true).unwrap()), &opts).unwrap()
}

fn run(c: &Case, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img_path = d.join("q.qcow2");
    let mut rng = Rng(seed);
    let mut mirror = vec![0u8; c.size as usize];
    if c.backing {
        let blen = c.size / 2;
        let bdata = rng.data(blen as usize);
        std::fs::write(d.join("base.raw"), &bdata).unwrap();
        mirror[..blen as usize].copy_from_slice(&bdata);
        qemu_create(
            &img_path,
            c.opts,
            c.size,
            Some((Path::new("base.raw"), "raw")),
        );
    } else {
        qemu_create(&img_path, c.opts, c.size, None);
    }
    // qemu-io workload, 512-aligned.
    let sectors = c.size / 512;
    let mut touched: HashSet<u64> = HashSet::new();
    let mut cmds = Vec::new();
    for _ in 0..60 {
        let off = rng.below(sectors) * 512;
        let len = ((1 + rng.below((4 * c.cs / 512).max(1))) * 512).min(c.size - off);
        let clusters = (off / c.cs)..(off + len).div_ceil(c.cs);
        match rng.below(10) {
            0..=4 => {
                let p = 1 + rng.below(254);
                cmds.push(format!("write -q -P {p} {off} {len}"));
                mirror[off as usize..(off + len) as usize].fill(p as u8);
                touched.extend(clusters);
            }
            5 => {
                // QEMU refuses compressed writes over allocated clusters: only fresh ones.
                let o = off / c.cs * c.cs;
                if touched.insert(o / c.cs) {
                    let l = c.cs.min(c.size - o);
                    let p = 1 + rng.below(254);
                    cmds.push(format!("write -q -c -P {p} {o} {l}"));
                    mirror[o as usize..(o + l) as usize].fill(p as u8);
                }
            }
            6 | 7 => {
                let u = if rng.chance(50) { "-u " } else { "" };
                cmds.push(format!("write -q -z {u}{off} {len}"));
                mirror[off as usize..(off + len) as usize].fill(0);
                touched.extend(clusters);
            }
            _ => {
                cmds.push(format!("discard -q {off} {len}"));
                if !(c.v2 && c.backing) {
                    let start = off.div_ceil(c.cs) * c.cs;
                    let end = if off + len == c.size {
                        c.size
                    } else {
                        (off + len) / c.cs * c.cs
                    };
                    if start < end {
                        mirror[start as usize..end as usize].fill(0);
                    }
                }
                touched.extend(clusters);
            }
        }
    }
    qemu_io(&img_path, &cmds);
    assert_clean(&img_path, true, &format!("{} after qemu-io", c.name));

    let mut img = open(&img_path, d);
    let mut all = vec![0u8; c.size as usize];
    img.read(0, &mut all).unwrap();
    if all != mirror {
        let first = all.iter().zip(&mirror).position(|(a, b)| a != b).unwrap();
        panic!("{}: our read of QEMU's image differs at {first:#x}", c.name);
    }
    let wl = Workload {
        name: c.name,
        size: c.size,
        cs: c.cs,
        discard_ignored: c.v2 && c.backing,
    };
    img = wl.run(img, &mut mirror, &mut rng, 80, &|| open(&img_path, d));
    img.close().unwrap();
    let raw = d.join("mirror.raw");
    std::fs::write(&raw, &mirror).unwrap();
    assert_clean(&img_path, true, c.name);
    assert_compare(&img_path, &raw, c.name);
}

#[test]
fn qemu_to_ours_matrix() {
    let cases = [
        Case {
            name: "q-default",
            opts: "",
            size: 4 << 20,
            cs: 65536,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-512-rc1",
            opts: "cluster_size=512,refcount_bits=1",
            size: 1 << 20,
            cs: 512,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-2M-rc64",
            opts: "cluster_size=2M,refcount_bits=64",
            size: 8 << 20,
            cs: 2 << 20,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-v2",
            opts: "compat=0.10",
            size: 4 << 20,
            cs: 65536,
            v2: true,
            backing: false,
        },
        Case {
            name: "q-lazy",
            opts: "lazy_refcounts=on,cluster_size=4k",
            size: 2 << 20,
            cs: 4096,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-zstd",
            opts: "compression_type=zstd",
            size: 4 << 20,
            cs: 65536,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-extl2",
            opts: "extended_l2=on",
            size: 4 << 20,
            cs: 65536,
            v2: false,
            backing: false,
        },
        Case {
            name: "q-backing",
            opts: "",
            size: 4 << 20,
            cs: 65536,
            v2: false,
            backing: true,
        },
        Case {
            name: "q-backing-v2",
            opts: "compat=0.10",
            size: 2 << 20,
            cs: 65536,
            v2: true,
            backing: true,
        },
        Case {
            name: "q-backing-extl2",
            opts: "extended_l2=on,cluster_size=16k",
            size: 2 << 20,
            cs: 16384,
            v2: false,
            backing: true,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run(c, 0xbeef_0000 + i as u64);
    }
}
