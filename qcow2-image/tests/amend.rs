//! `Image::amend` (iotests 061 and 112): refcount width changes both ways with and without
//! snapshots, compat downgrade (zero clusters expanded, 72-byte v2 header) and upgrade,
//! lazy refcounts, QEMU's refusal messages, EIO during a width change leaks at most.

mod common;

use common::{assert_clean, qemu_create, qemu_io};
use qcow2_image::{
    AmendOptions, BackingPolicy, Compat, CreateOptions, Image, ImageError, OpenOptions,
};
use qcow2_io::fault::{FaultStorage, IoKind, Rule};
use qcow2_io::{errno, FileStorage, MemStorage};
use std::path::Path;
use std::sync::Arc;

fn open_rw(p: &Path) -> Image {
    let dir = p.parent().unwrap().to_path_buf();
    let opts = OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.clone(),
            max_depth: 2,
            allowed_dirs: vec![dir],
        },
        ..OpenOptions::default()
    };
    Image::open(Arc::new(FileStorage::open(p, true).unwrap()), &opts).unwrap()
}

fn amend(p: &Path, text: &str) -> Result<(), ImageError> {
    let mut img = open_rw(p);
    let r = AmendOptions::parse(text).and_then(|o| img.amend(&o));
    img.close().unwrap();
    r
}

fn header_u32(p: &Path, off: usize) -> u32 {
    let b = std::fs::read(p).unwrap();
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

fn verify(p: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    let out = qemu_io(p, &cmds);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn refcount_bits_16_1_64_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.qcow2");
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 4096;
    let mut img = Image::create_path(&p, &o).unwrap();
    img.write(0, &[0x11; 40960]).unwrap();
    img.write(9 << 20, &[0x22; 4096]).unwrap();
    img.write_compressed(12 << 20, &[0x33; 4096]).unwrap();
    img.close().unwrap();
    for bits in [1u32, 64, 2, 16] {
        let mut seen = Vec::new();
        let mut img = open_rw(&p);
        let o = AmendOptions {
            refcount_bits: Some(bits),
            ..AmendOptions::default()
        };
        img.amend_with_progress(&o, &mut |d, t| seen.push((d, t)))
            .unwrap();
        assert_eq!(img.geometry().refcount_bits(), bits);
        // Still usable at the new width.
        img.write(1 << 20, &[bits as u8; 4096]).unwrap();
        img.close().unwrap();
        assert!(
            seen.last().is_some_and(|&(d, t)| d == t && t > 0),
            "{seen:?}"
        );
        assert_eq!(header_u32(&p, 96), bits.trailing_zeros());
        assert_clean(&p, true, &format!("refcount_bits={bits}"));
        verify(
            &p,
            &[
                "read -P 0x11 0 40k",
                "read -P 0x22 9M 4k",
                "read -P 0x33 12M 4k",
            ],
        );
    }
}

#[test]
fn refcount_bits_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    qemu_create(&p, "cluster_size=4096", 4 << 20, None);
    qemu_io(&p, &["write -P 0x5a 0 64k".into()]);
    let mut img = open_rw(&p);
    img.snapshot_create("s1").unwrap();
    img.write(0, &[0x6b; 4096]).unwrap();
    img.close().unwrap();
    let before = std::fs::read(&p).unwrap();
    // A shared cluster has refcount 2: 1 bit cannot hold it; nothing changes.
    let e = amend(&p, "refcount_bits=1").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x")
            && msg.ends_with("has a refcount of 2"),
        "{msg}"
    );
    assert_eq!(e.errno(), errno::EINVAL);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "refused amend changed the image"
    );
    // 2 bits hold it.
    amend(&p, "refcount_bits=2").unwrap();
    assert_clean(&p, true, "refcount_bits=2 with a snapshot");
    // Apply still works at the new width and restores the snapshot's data.
    let mut img = open_rw(&p);
    img.snapshot_apply("s1").unwrap();
    img.close().unwrap();
    assert_clean(&p, true, "apply after amend");
    verify(&p, &["read -P 0x5a 0 64k"]);
    amend(&p, "refcount_bits=16").unwrap();
    assert_clean(&p, true, "back to 16");
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("s1"));
}

#[test]
fn downgrade_expands_zero_clusters_and_upgrade() {
    for backing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.qcow2");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x77u8; 1 << 20]).unwrap();
        if backing {
            qemu_create(&p, "lazy_refcounts=on", 1 << 20, Some((&base, "raw")));
        } else {
            qemu_create(&p, "lazy_refcounts=on", 1 << 20, None);
        }
        qemu_io(
            &p,
            &[
                "write -P 0x2a 0 128k".into(),
                "write -z 0 64k".into(), // preallocated zero (keeps the cluster)
                "write -z -u 64k 64k".into(), // plain zero cluster
                "write -z 256k 64k".into(), // plain zero cluster, never allocated
            ],
        );
        let mut img = open_rw(&p);
        img.snapshot_create("same-size").unwrap();
        img.write_zeroes(512 << 10, 65536, false).unwrap(); // zero cluster in the active tree only
        img.close().unwrap();
        amend(&p, "compat=0.10").unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(header_u32(&p, 4), 2, "version");
        // Extensions start right after the 72-byte header; no feature-name table (v3 only).
        assert_ne!(&b[72..76], &0x6803_f857u32.to_be_bytes()[..]);
        assert!(!b[72..4096]
            .windows(4)
            .any(|w| w == 0x6803_f857u32.to_be_bytes()));
        assert_clean(&p, true, &format!("v2 after downgrade (backing {backing})"));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&p)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["format-specific"]["data"]["compat"], "0.10");
        verify(
            &p,
            &["read -P 0 0 64k", "read -P 0 64k 64k", "read -P 0 256k 64k"],
        );
        let mut img = open_rw(&p);
        assert!(!img.lazy_refcounts());
        img.snapshot_apply("same-size").unwrap();
        let mut buf = vec![1u8; 65536];
        img.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        img.close().unwrap();
        assert_clean(&p, true, "v2 apply");
        amend(&p, "compat=1.1").unwrap();
        assert_eq!(header_u32(&p, 4), 3);
        assert_eq!(header_u32(&p, 100), 112, "header_length");
        assert_clean(&p, true, "upgraded");
        verify(&p, &["read -P 0 0 64k", "read -P 0x2a 128k 0"]);
    }
}

#[test]
fn v2_snapshots_upgrade_then_resize() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.qcow2");
    qemu_create(&p, "compat=0.10", 1 << 20, None);
    qemu_io(&p, &["write -P 1 0 64k".into()]);
    let mut img = open_rw(&p);
    img.snapshot_create("s").unwrap();
    let e = img.resize(2 << 20).unwrap_err();
    assert_eq!(e.to_string(), "Can't resize a v2 image which has snapshots");
    img.amend(&AmendOptions {
        compat: Some(Compat::V1_1),
        size: Some(2 << 20),
        ..AmendOptions::default()
    })
    .unwrap();
    assert_eq!(img.virtual_size(), 2 << 20);
    // Downgrading with a snapshot of another size is refused (the resize stays).
    let e = img
        .amend(&AmendOptions {
            compat: Some(Compat::V0_10),
            ..AmendOptions::default()
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Internal snapshots prevent downgrade of image"
    );
    img.close().unwrap();
    assert_clean(&p, true, "v2 upgraded with snapshot");
}

#[test]
fn refusals_are_qemus() {
    let cases = [
        ("cluster_size=4k", "Invalid parameter 'cluster_size'", true),
        ("extended_l2=on", "Invalid parameter 'extended_l2'", true),
        (
            "preallocation=full",
            "Invalid parameter 'preallocation'",
            true,
        ),
        (
            "compression_type=zstd",
            "Invalid parameter 'compression_type'",
            true,
        ),
        ("encryption=on", "Invalid parameter 'encryption'", true),
        ("foo=bar", "Invalid parameter 'foo'", false),
        ("compat=0.42", "Unknown compatibility level 0.42", false),
        (
            "refcount_bits=3",
            "Refcount width must be a power of two and may not exceed 64 bits",
            false,
        ),
    ];
    for (text, msg, hint) in cases {
        let e = AmendOptions::parse(text).unwrap_err();
        assert_eq!(e.to_string(), msg);
        assert_eq!(
            e.hint(),
            hint.then_some("This option is only supported for image creation")
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.refcount_bits = 64;
    Image::create_path(&p, &o).unwrap().close().unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = amend(&p, "compat=0.10").unwrap_err();
    assert_eq!(e.to_string(), "compat=0.10 requires refcount_bits=16");
    let e = amend(&p, "refcount_bits=32,compat=0.10").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use \
         compat=1.1 or greater)"
    );
    let e = amend(&p, "backing_file=foo").unwrap_err();
    assert_eq!(e.to_string(), "Cannot amend the backing file");
    assert_eq!(e.hint(), Some("You can use 'qemu-img rebase' instead."));
    let e = amend(&p, "data_file=foo").unwrap_err();
    assert_eq!(
        e.to_string(),
        "data-file can only be set for images that use an external data file"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);

    let q = dir.path().join("e.qcow2");
    qemu_create(&q, "extended_l2=on", 1 << 20, None);
    let e = amend(&q, "compat=0.10").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot downgrade an image with incompatible features 0x10 set"
    );
    let v2 = dir.path().join("v2.qcow2");
    qemu_create(&v2, "compat=0.10", 1 << 20, None);
    let e = amend(&v2, "lazy_refcounts=on").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 \
         or greater)"
    );
}

#[test]
fn lazy_refcounts_on_off() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    Image::create_path(&p, &CreateOptions::new(1 << 20))
        .unwrap()
        .close()
        .unwrap();
    let mut img = open_rw(&p);
    img.amend(&AmendOptions::parse("lazy_refcounts=on").unwrap())
        .unwrap();
    assert!(img.lazy_refcounts());
    img.write(0, &[1u8; 4096]).unwrap();
    assert!(img.is_dirty());
    img.amend(&AmendOptions::parse("lazy_refcounts=off").unwrap())
        .unwrap();
    assert!(!img.is_dirty() && !img.lazy_refcounts());
    img.write(65536, &[2u8; 4096]).unwrap();
    assert!(!img.is_dirty());
    img.abandon();
    assert_clean(&p, true, "lazy off then abandoned");
    let b = std::fs::read(&p).unwrap();
    assert_eq!(b[87] & 1, 0, "compatible lazy bit cleared");
}

/// EIO at the n-th write or flush of a refcount-width change: the amend fails, and QEMU
/// finds leaks at most (the header names either complete structure).
#[test]
fn refcount_width_change_under_eio() {
    let mut fired = 0;
    for n in [1u64, 2, 3, 5, 8, 12] {
        for kind in [IoKind::Write, IoKind::Flush] {
            let fs = Arc::new(FaultStorage::new(MemStorage::new()));
            let mut o = CreateOptions::new(8 << 20);
            o.cluster_size = 1024;
            let mut img = Image::create(fs.clone(), &o).unwrap();
            img.write(0, &[1u8; 300_000]).unwrap();
            img.snapshot_create("s").unwrap();
            img.write(0, &[2u8; 4096]).unwrap();
            img.flush().unwrap();
            let id = fs.add_rule(Rule::on_request(n, errno::EIO).kinds(kind).once(true));
            let r = img.amend(&AmendOptions {
                refcount_bits: Some(4),
                ..AmendOptions::default()
            });
            if fs.fired(id) > 0 {
                fired += 1;
                assert!(r.is_err(), "n {n} {kind:?}: error swallowed");
            }
            fs.clear_rules();
            let _ = img.close();
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.qcow2");
            std::fs::write(&p, fs.inner().to_bytes()).unwrap();
            assert_clean(&p, false, &format!("EIO at {kind:?} #{n}"));
            let mut img = open_rw(&p);
            let mut b = vec![0u8; 4096];
            img.read(0, &mut b).unwrap();
            assert_eq!(b, vec![2u8; 4096]);
            img.write(8192, &[3u8; 4096]).unwrap();
            img.close().unwrap();
            assert_clean(&p, false, &format!("EIO at {kind:?} #{n}, rewritten"));
        }
    }
    assert!(fired >= 8, "only {fired} injections fired");
}
