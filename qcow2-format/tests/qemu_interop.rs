//! Interop with the installed `qemu-img` (10.0.2): images it creates parse to the values
//! `qemu-img info --output=json` reports, and the layout builder writes the same bytes.

use std::path::Path;
use std::process::Command;

use qcow2_format::extensions::FirstCluster;
use qcow2_format::features::{CompressionType, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow2_format::header::{open_first_cluster, OpenOptions};
use qcow2_format::layout::{fresh_image, Compat, CreateOptions};
use serde_json::Value;

fn qemu_img(args: &[&str], dir: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img must be on PATH for the interop tests");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `-o` string and `-b/-F` arguments qemu-img needs for `opts`.
fn create_args(opts: &CreateOptions) -> Vec<String> {
    let mut o = vec![
        format!("cluster_size={}", opts.cluster_size),
        format!("refcount_bits={}", opts.refcount_bits),
        format!("compat={}", opts.compat.name()),
    ];
    if opts.lazy_refcounts {
        o.push("lazy_refcounts=on".into());
    }
    if opts.compression_type == CompressionType::Zstd {
        o.push("compression_type=zstd".into());
    }
    if opts.extended_l2 {
        o.push("extended_l2=on".into());
    }
    let mut args = vec!["-o".to_string(), o.join(",")];
    if let Some(b) = &opts.backing_file {
        args.push("-b".into());
        args.push(b.clone());
    }
    if let Some(f) = &opts.backing_format {
        args.push("-F".into());
        args.push(f.clone());
    }
    args
}

fn open(bytes: &[u8]) -> FirstCluster {
    open_first_cluster(
        bytes,
        &OpenOptions {
            read_write: true,
            check_mode: false,
        },
    )
    .expect("qemu-img's image must open")
}

/// Asserts every field we parse against `qemu-img info --output=json`.
fn assert_matches_info(fc: &FirstCluster, info: &Value) {
    let h = &fc.header;
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(h.size));
    assert_eq!(info["cluster-size"].as_u64(), Some(h.cluster_size()));
    assert_eq!(
        info["dirty-flag"].as_bool(),
        Some(h.incompatible_features & INCOMPAT_DIRTY != 0)
    );
    let data = &info["format-specific"]["data"];
    assert_eq!(info["format-specific"]["type"], "qcow2");
    assert_eq!(data["compat"], if h.version == 2 { "0.10" } else { "1.1" });
    assert_eq!(
        data["compression-type"],
        h.compression().map(CompressionType::name).unwrap_or("?")
    );
    assert_eq!(
        data["refcount-bits"].as_u64(),
        Some(1u64 << h.refcount_order)
    );
    if h.version >= 3 {
        assert_eq!(
            data["lazy-refcounts"].as_bool(),
            Some(h.compatible_features & 1 != 0)
        );
        assert_eq!(
            data["corrupt"].as_bool(),
            Some(h.incompatible_features & INCOMPAT_CORRUPT != 0)
        );
        assert_eq!(data["extended-l2"].as_bool(), Some(h.extended_l2()));
    } else {
        assert!(data.get("lazy-refcounts").is_none());
    }
    match fc.backing_file_str() {
        Some(b) => assert_eq!(info["backing-filename"].as_str(), Some(b.as_str())),
        None => assert!(info.get("backing-filename").is_none()),
    }
    match fc.backing_format_str() {
        Some(f) => assert_eq!(info["backing-filename-format"].as_str(), Some(f.as_str())),
        None => assert!(info.get("backing-filename-format").is_none()),
    }
    let snapshots = info
        .get("snapshots")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    assert_eq!(snapshots as u64, u64::from(h.nb_snapshots));
}

fn info(name: &str, dir: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", name], dir)).expect("info JSON")
}

/// Creates with qemu-img and with the layout builder; compares parse, info and bytes.
fn check_case(opts: &CreateOptions, dir: &Path, name: &str) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    args.extend(create_args(opts));
    args.push(name.into());
    args.push(opts.size.to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&argv, dir);

    let theirs = std::fs::read(dir.join(name)).expect("read image");
    let fc = open(&theirs);
    assert_matches_info(&fc, &info(name, dir));

    let ours = fresh_image(opts).unwrap_or_else(|e| panic!("{name}: layout failed: {e}"));
    assert_eq!(ours.file_length, theirs.len() as u64, "{name}: file length");
    let bytes = ours.to_bytes();
    if let Some(i) = bytes.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("{name}: first differing byte at {i:#x}");
    }
    assert_eq!(ours.first_cluster, fc, "{name}: parsed first cluster");
}

fn opts(size: u64, cluster_size: u64, refcount_bits: u32) -> CreateOptions {
    CreateOptions {
        cluster_size,
        refcount_bits,
        ..CreateOptions::new(size)
    }
}

#[test]
fn create_matrix_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = 1u64 << 30;
    let mut cases: Vec<(&str, CreateOptions)> = vec![
        ("default.qcow2", opts(g, 65536, 16)),
        ("c512.qcow2", opts(g, 512, 16)),
        ("c512-r64.qcow2", opts(g, 512, 64)),
        ("c512-r2.qcow2", opts(3 * g, 512, 2)),
        ("c4k-r1.qcow2", opts(g, 4096, 1)),
        ("c4k-r8.qcow2", opts(3 * g, 4096, 8)),
        ("c64k-r4.qcow2", opts(100 << 20, 65536, 4)),
        ("c64k-r32.qcow2", opts(5 * g, 65536, 32)),
        ("c2m-r64.qcow2", opts(g, 2 << 20, 64)),
        ("empty.qcow2", opts(0, 65536, 16)),
        ("odd.qcow2", opts(1_000_000, 65536, 16)),
        // L1 tables the first refcount table cannot describe: QEMU grows the refcount
        // table while allocating the L1 (qcow2_refcount_area), once or more.
        ("grow-c512.qcow2", opts(128 * g, 512, 16)),
        ("grow-c512-r64.qcow2", opts(8 * g, 512, 64)),
        ("grow-c2k-r64.qcow2", opts(2048 * g, 2048, 64)),
    ];
    cases.push((
        "v2.qcow2",
        CreateOptions {
            compat: Compat::V0_10,
            ..opts(g, 65536, 16)
        },
    ));
    cases.push((
        "v2-c512.qcow2",
        CreateOptions {
            compat: Compat::V0_10,
            ..opts(g, 512, 16)
        },
    ));
    cases.push((
        "lazy.qcow2",
        CreateOptions {
            lazy_refcounts: true,
            ..opts(g, 65536, 16)
        },
    ));
    cases.push((
        "zstd.qcow2",
        CreateOptions {
            compression_type: CompressionType::Zstd,
            ..opts(g, 65536, 16)
        },
    ));
    cases.push((
        "extl2.qcow2",
        CreateOptions {
            extended_l2: true,
            ..opts(g, 65536, 16)
        },
    ));
    cases.push((
        "extl2-16k.qcow2",
        CreateOptions {
            extended_l2: true,
            ..opts(g, 16384, 16)
        },
    ));
    cases.push((
        "all-v3.qcow2",
        CreateOptions {
            lazy_refcounts: true,
            compression_type: CompressionType::Zstd,
            extended_l2: true,
            ..opts(2 * g, 2 << 20, 8)
        },
    ));
    for (name, o) in &cases {
        check_case(o, dir.path(), name);
    }

    // The odd size is rounded up to a sector, as qemu-img does.
    let odd = open(&std::fs::read(dir.path().join("odd.qcow2")).expect("read"));
    assert_eq!(odd.header.size, 1_000_448);
}

#[test]
fn backing_files_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        dir.path(),
    );
    let with_backing = |o: CreateOptions| CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..o
    };
    check_case(
        &with_backing(opts(64 << 20, 65536, 16)),
        dir.path(),
        "b-v3.qcow2",
    );
    check_case(
        &with_backing(opts(64 << 20, 512, 16)),
        dir.path(),
        "b-c512.qcow2",
    );
    check_case(
        &with_backing(opts(64 << 20, 4096, 16)),
        dir.path(),
        "b-c4k.qcow2",
    );
    check_case(
        &with_backing(CreateOptions {
            compat: Compat::V0_10,
            ..opts(64 << 20, 65536, 16)
        }),
        dir.path(),
        "b-v2.qcow2",
    );
    let fc = open(&std::fs::read(dir.path().join("b-v2.qcow2")).expect("read"));
    assert_eq!(fc.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
    assert_eq!(fc.extensions.backing_format.as_deref(), Some(&b"qcow2"[..]));
    // v2: 72-byte header, backing-format extension (16 bytes), end marker, then the name.
    assert_eq!(fc.header.backing_file_offset, 72 + 16 + 8);
}

#[test]
fn snapshots_are_parsed_and_rewrite_is_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "128M"], d);
    qemu_img(&["snapshot", "-c", "one", "s.qcow2"], d);
    qemu_img(&["snapshot", "-c", "two", "s.qcow2"], d);
    let bytes = std::fs::read(d.join("s.qcow2")).expect("read");
    let fc = open(&bytes);
    assert_eq!(fc.header.nb_snapshots, 2);
    assert_ne!(fc.header.snapshots_offset, 0);
    assert_matches_info(&fc, &info("s.qcow2", d));
    // QEMU's header rewrite (after snapshot -c) is what FirstCluster::to_bytes reproduces.
    let cs = fc.cluster_size() as usize;
    assert_eq!(fc.to_bytes().expect("serialize"), bytes[..cs].to_vec());
}

#[test]
fn header_rewrite_reverses_unknown_extensions_like_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "u.qcow2", "1M"], d);
    let path = d.join("u.qcow2");
    let mut bytes = std::fs::read(&path).expect("read");
    // Two unknown extensions where the end marker was (after the feature table at 112).
    let mut ext = Vec::new();
    qcow2_format::extensions::push_extension(&mut ext, 0x1111_1111, b"AAAA").expect("ext");
    qcow2_format::extensions::push_extension(&mut ext, 0x2222_2222, b"BBB").expect("ext");
    qcow2_format::extensions::push_extension(&mut ext, 0, &[]).expect("ext");
    bytes[504..504 + ext.len()].copy_from_slice(&ext);
    std::fs::write(&path, &bytes).expect("write");
    let before = open(&bytes);
    assert_eq!(before.extensions.unknown.len(), 2);
    assert_eq!(before.extensions.unknown[0].magic, 0x1111_1111);

    // amend rewrites the header (qcow2_update_header).
    qemu_img(&["amend", "-o", "lazy_refcounts=on", "u.qcow2"], d);
    let after_bytes = std::fs::read(&path).expect("read");
    let mut expected = before.clone();
    expected.header.compatible_features |= 1;
    let cs = before.cluster_size() as usize;
    assert_eq!(
        expected.to_bytes().expect("serialize"),
        after_bytes[..cs].to_vec()
    );
    let after = open(&after_bytes);
    assert_eq!(after.extensions.unknown[0].magic, 0x2222_2222);
}

#[test]
fn example_image_checks_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, o) in [
        ("ex1.qcow2", opts(1 << 30, 65536, 16)),
        ("ex2.qcow2", opts(1 << 30, 512, 16)),
        ("ex3.qcow2", opts(10 << 30, 4096, 1)),
    ] {
        std::fs::write(
            dir.path().join(name),
            fresh_image(&o).expect("layout").to_bytes(),
        )
        .expect("write");
        let out = Command::new("qemu-img")
            .args(["check", name])
            .current_dir(dir.path())
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found"));
    }
}
