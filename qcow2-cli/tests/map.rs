//! `qcow2 map` against `qemu-img map` (human and JSON) on qcow2 images with data, zero,
//! compressed and unallocated clusters and a qcow2 backing file; on images whose data
//! clusters are holes in the image file (`preallocation=metadata`, and a truncated file),
//! where QEMU asks the file system (SEEK_DATA/SEEK_HOLE); `falloc`/`full` images; 512-byte
//! clusters with preallocated zero clusters at scattered host offsets; extended-L2 images
//! with partly written clusters (with and without a backing file); raw images and raw
//! backing files with holes.

mod common;

use common::{have_qemu, ok, qcow2, qemu_img, qemu_io};

#[test]
fn map_equals_qemu_img_map() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write 3M 64k",
            "base.qcow2",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 2 64k 64k", "top.qcow2"]));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "comp.qcow2", "16M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -c 1M 128k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 3 0 64k",
            "comp.qcow2",
        ],
    ));
    let top = d.join("top.qcow2");
    let top = top.to_str().expect("utf-8");
    for args in [
        &["map", "base.qcow2"][..],
        &["map", "--output=json", "base.qcow2"][..],
        &["map", "top.qcow2"][..],
        &["map", "--output=json", "top.qcow2"][..],
        &[
            "map",
            "--output=json",
            "--start-offset",
            "64k",
            "--max-length",
            "100k",
            "top.qcow2",
        ][..],
        &["map", top][..],
        &["map", "--output", "json", "comp.qcow2"][..],
        &["map", "comp.qcow2"][..],
        &["map", "missing.qcow2"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = qemu_img(d, args);
        assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        assert_eq!(
            ours.stderr,
            qemu.stderr.replace("qemu-img: ", "qcow2: "),
            "{args:?}"
        );
    }
}

/// `qcow2 map` and `qemu-img map` (human, JSON, and a window) print the same on each image.
fn assert_maps_equal(d: &std::path::Path, images: &[&str]) {
    for img in images {
        for args in [
            &["map", img][..],
            &["map", "--output=json", img][..],
            &[
                "map",
                "--output=json",
                "--start-offset",
                "1000",
                "--max-length",
                "1M",
                img,
            ][..],
            // Nothing to map: qemu-img still prints its empty first entry.
            &["map", "--output=json", "--start-offset", "64M", img][..],
        ] {
            let ours = qcow2(d, args);
            let qemu = qemu_img(d, args);
            assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?} {qemu:?}");
            assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
            assert_eq!(ours.stderr, qemu.stderr.replace("qemu-img: ", "qcow2: "));
        }
    }
}

/// Data clusters whose host range is a hole: QEMU detects `preallocation=metadata` images
/// and then reports those ranges `"zero": true` (left out of the human output). Images
/// made and written by qemu-img / qemu-io, and by us; 64 KiB and 512-byte clusters, an
/// extended-L2 image, a qcow2 backing file that is preallocated, an external data file.
#[test]
fn map_reports_holes_of_metadata_preallocated_images_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let writes = [
        "-c",
        "write -P 1 64k 64k",
        "-c",
        "write -P 2 1M 4k",
        "-c",
        "write -P 3 1052k 1k",
        "-c",
        "write -z 2M 64k",
        "-c",
        "discard 3M 128k",
    ];
    let with = |name: &str, opts: &str, ours: bool| {
        let create = ["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"];
        let mut io = writes.to_vec();
        io.push(name);
        if ours {
            ok(qcow2(d, &create));
            ok(qcow2(d, &{
                let mut a = vec!["io"];
                a.extend(io);
                a
            }));
        } else {
            ok(qemu_img(d, &create));
            ok(qemu_io(d, &io));
        }
    };
    with("pm.qcow2", "preallocation=metadata", false);
    with("pm-ours.qcow2", "preallocation=metadata", true);
    with(
        "pm512.qcow2",
        "preallocation=metadata,cluster_size=512",
        false,
    );
    with(
        "pm-ext.qcow2",
        "preallocation=metadata,extended_l2=on",
        false,
    );
    with(
        "pm-data.qcow2",
        "preallocation=metadata,data_file=pm-data.raw",
        false,
    );
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "pm.qcow2",
            "-F",
            "qcow2",
            "pm-top.qcow2",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 4 1M 64k", "pm-top.qcow2"]));
    // A written image whose file was cut short inside a data cluster: past the end of the
    // file reads as zero, and QEMU's heuristic takes the file for preallocated.
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "cut.qcow2", "1M"],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 0 128k", "cut.qcow2"]));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("cut.qcow2"))
        .expect("open");
    f.set_len(0x58000 + 1000).expect("truncate");
    drop(f);
    assert_maps_equal(
        d,
        &[
            "pm.qcow2",
            "pm-ours.qcow2",
            "pm512.qcow2",
            "pm-ext.qcow2",
            "pm-data.qcow2",
            "pm-top.qcow2",
            "cut.qcow2",
        ],
    );
    // The holes are really reported (not only "all data" on both sides).
    let json = qcow2(d, &["map", "--output=json", "pm.qcow2"]).stdout;
    assert!(json.contains("\"zero\": true, \"data\": true"), "{json}");
}

/// `falloc` and `full` preallocation: the blocks are allocated, QEMU's heuristic does not
/// fire, and every allocated cluster is data (written or not).
#[test]
fn map_of_falloc_and_full_images_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (name, opts, ours) in [
        ("fa.qcow2", "preallocation=falloc", false),
        ("fa-ours.qcow2", "preallocation=falloc", true),
        ("full.qcow2", "preallocation=full", false),
    ] {
        let create = ["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"];
        let io = [
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 2M 128k",
            "-c",
            "write -P 2 3M 4k",
            name,
        ];
        if ours {
            ok(qcow2(d, &create));
            let mut a = vec!["io"];
            a.extend(io);
            ok(qcow2(d, &a));
        } else {
            ok(qemu_img(d, &create));
            ok(qemu_io(d, &io));
        }
    }
    assert_maps_equal(d, &["fa.qcow2", "fa-ours.qcow2", "full.qcow2"]);
}

/// 512-byte clusters: preallocated zero clusters whose host clusters are not contiguous
/// (written backwards, then zeroed) are separate extents, and plain zero clusters between
/// them have no host offset.
#[test]
fn map_splits_zero_clusters_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "z.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 3k 512",
            "-c",
            "write -P 1 2k 512",
            "-c",
            "write -P 1 1k 1k",
            "-c",
            "write -P 2 0 512",
            "-c",
            "write -z 1k 3k",
            "-c",
            "write -z 8k 2k",
            "-c",
            "write -P 3 16k 2k",
            "-c",
            "write -z 16k 1k",
            "-c",
            "write -P 4 40k 4k",
            "-c",
            "write -P 4 32k 4k",
            "-c",
            "write -z 32k 12k",
            "z.qcow2",
        ],
    ));
    // The same steps through our engine (its own allocation order).
    ok(qcow2(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "zo.qcow2",
            "1M",
        ],
    ));
    ok(qcow2(
        d,
        &[
            "io",
            "-c",
            "write -P 1 3k 512",
            "-c",
            "write -P 1 2k 512",
            "-c",
            "write -P 1 1k 1k",
            "-c",
            "write -z 1k 3k",
            "-c",
            "write -P 4 40k 4k",
            "-c",
            "write -P 4 32k 4k",
            "-c",
            "write -z 32k 12k",
            "zo.qcow2",
        ],
    ));
    assert_maps_equal(d, &["z.qcow2", "zo.qcow2"]);
    let json = qcow2(d, &["map", "--output=json", "z.qcow2"]).stdout;
    assert!(
        json.lines()
            .filter(|l| l
                .contains("\"zero\": true, \"data\": false, \"compressed\": false, \"offset\""))
            .count()
            >= 4,
        "{json}"
    );
}

/// Extended L2: unallocated subclusters of allocated clusters keep their host offset (no
/// backing file) or read through to the backing file; zero subclusters; partly written
/// clusters.
#[test]
fn map_of_extended_l2_subclusters_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let io = [
        "-c",
        "write -P 1 0 4k",
        "-c",
        "write -P 1 12k 2k",
        "-c",
        "write -P 2 128k 64k",
        "-c",
        "write -z 136k 8k",
        "-c",
        "write -P 3 70k 2k",
        "-c",
        "write -z -u 256k 16k",
        "-c",
        "write -P 4 300k 4k",
    ];
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "e.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(d, &[&io[..], &["e.qcow2"]].concat()));
    ok(qcow2(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "eo.qcow2",
            "1M",
        ],
    ));
    ok(qcow2(d, &[&["io"][..], &io[..], &["eo.qcow2"]].concat()));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    ));
    ok(qemu_io(d, &["-c", "write -P 9 0 512k", "b.qcow2"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "eb.qcow2",
        ],
    ));
    ok(qemu_io(d, &[&io[..], &["eb.qcow2"]].concat()));
    assert_maps_equal(d, &["e.qcow2", "eo.qcow2", "eb.qcow2"]);
    let json = qcow2(d, &["map", "--output=json", "e.qcow2"]).stdout;
    assert!(json.contains("\"present\": false, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\""), "{json}");
}

/// Raw images (`-f raw` and probed) and a raw backing file: data where the file has data,
/// zero in holes and in the sector after the end of the file.
#[test]
fn map_of_raw_images_equals_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let f = std::fs::File::create(d.join("r.raw")).expect("create");
    f.set_len(1 << 20).expect("set_len");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[7u8; 8192], 16384).expect("write");
    f.write_all_at(b"abc", 1 << 20).expect("write");
    drop(f);
    std::fs::File::create(d.join("hole.raw"))
        .and_then(|f| f.set_len(1000))
        .expect("hole");
    std::fs::write(d.join("small.raw"), b"hello\n").expect("small");
    ok(qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "rt.qcow2", "2M",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -P 1 0 4k", "rt.qcow2"]));
    assert_maps_equal(d, &["r.raw", "hole.raw", "small.raw", "rt.qcow2"]);
    for args in [
        &["map", "-f", "raw", "r.raw"][..],
        &["map", "-f", "raw", "--output=json", "small.raw"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = qemu_img(d, args);
        assert_eq!(
            (ours.code, &ours.stdout),
            (qemu.code, &qemu.stdout),
            "{args:?}"
        );
    }
}

/// Random workloads (fixed seed): writes, compressed writes, zero writes with and without
/// unmap, discards, through qemu-io or our engine, on images of every cluster size with
/// and without extended L2, each preallocation mode and a backing file; the maps agree.
#[test]
fn map_equals_qemu_img_on_random_workloads() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 3 0 700k",
            "-c",
            "write -z 100k 64k",
            "base.qcow2",
        ],
    ));
    let size = 2u64 << 20;
    let mut names = Vec::new();
    for i in 0..16 {
        let cs = [512u64, 4096, 32768, 65536][i % 4];
        let ext = cs >= 16384 && i % 8 >= 4;
        let backing = i % 3 == 0;
        // QEMU allows preallocation with a backing file only with extended L2.
        let prealloc = if backing && !ext {
            "off"
        } else {
            ["off", "metadata", "falloc"][(i / 4) % 3]
        };
        let name = format!("r{i}.qcow2");
        let opts = format!(
            "cluster_size={cs},extended_l2={},preallocation={prealloc}",
            if ext { "on" } else { "off" }
        );
        let mut create = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        if backing {
            create.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        create.extend([name.as_str(), "2M"]);
        ok(qemu_img(d, &create));
        let mut cmds = Vec::new();
        for _ in 0..20 {
            let mut off = rand(size / 512) * 512;
            let mut len = ((rand(200) + 1) * 512).min(size - off);
            let op = [
                "write -P 5",
                "write -z",
                "write -z -u",
                "discard",
                "write -P 7",
                "write -c -P 8",
            ][rand(6) as usize];
            if op.contains("-c") {
                off = off / cs * cs;
                len = cs;
            }
            cmds.push(format!("{op} {off} {len}"));
        }
        let mut args: Vec<&str> = Vec::new();
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(&name);
        // A compressed write over an allocated cluster fails (in QEMU too); the other
        // commands still run, and the maps compare whatever the image then holds.
        if i % 2 == 0 {
            qemu_io(d, &args);
        } else {
            qcow2(d, &[&["io"][..], &args[..]].concat());
        }
        names.push(name);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_maps_equal(d, &names);
    // The workloads reach the interesting cases: data holes, scattered preallocated zero
    // clusters, unallocated subclusters with host offsets.
    let all: String = names
        .iter()
        .map(|n| qemu_img(d, &["map", "--output=json", n]).stdout)
        .collect();
    for needle in [
        "\"zero\": true, \"data\": true",
        "\"present\": true, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\"",
        "\"present\": false, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\"",
        "\"compressed\": true",
    ] {
        assert!(all.contains(needle), "{needle}");
    }
}
