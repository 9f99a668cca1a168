//! Invalid headers in the style of QEMU iotests 080 and 036: pokes into an image created by
//! `qemu-img`, each yielding the expected typed error whose message equals the one QEMU
//! prints for the same file (checked by opening it read-write with `qemu-io`).

use std::path::Path;
use std::process::Command;

use qcow2_format::extensions::{push_extension, ExtensionError};
use qcow2_format::features::FeatureNameEntry;
use qcow2_format::header::{open_first_cluster, HeaderError, OpenOptions};

const RW: OpenOptions = OpenOptions {
    read_write: true,
    check_mode: false,
};
const RO: OpenOptions = OpenOptions {
    read_write: false,
    check_mode: false,
};
const CHECK: OpenOptions = OpenOptions {
    read_write: true,
    check_mode: true,
};

fn fresh(dir: &Path, size: &str) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size)
        .status()
        .expect("qemu-img must be on PATH");
    assert!(st.success());
    std::fs::read(&path).expect("read")
}

fn poke32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn poke64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// What QEMU says when opening `bytes` read-write (`qemu-io -c "read 0 512"`, as iotest 080).
fn qemu_open_error(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("poked.qcow2");
    std::fs::write(&path, bytes).expect("write");
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read 0 512"])
        .arg(&path)
        .output()
        .expect("qemu-io must be on PATH");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// Asserts our error for `bytes` and that QEMU prints the same message.
fn expect(dir: &Path, bytes: &[u8], opts: OpenOptions, check: impl Fn(&HeaderError) -> bool) {
    let err = open_first_cluster(bytes, &opts).expect_err("must be refused");
    assert!(check(&err), "unexpected error variant: {err:?}");
    let msg = err.to_string();
    let qemu = qemu_open_error(dir, bytes);
    assert!(
        qemu.contains(&format!(": {msg}")),
        "our message {msg:?} not in QEMU's output {qemu:?}"
    );
}

#[test]
fn iotest_080_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = fresh(d, "64M");
    assert!(open_first_cluster(&img, &RW).is_ok());
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = img.clone();
        f(&mut b);
        b
    };

    for v in [0xffff_ffff, 0x7fff_ffff] {
        let b = with(&|b| poke32(b, 100, v));
        expect(
            d,
            &b,
            RW,
            |e| matches!(e, HeaderError::HeaderExceedsCluster { header_length, .. } if *header_length == v),
        );
    }

    // An unknown extension that claims 2 GiB at 112, then three backing offsets.
    let big_ext = |bfo: u64| {
        with(&|b| {
            poke64(b, 8, bfo);
            poke32(b, 112, 0x1234_5678);
            poke32(b, 116, 0x7fff_ffff);
        })
    };
    expect(d, &big_ext(u64::MAX), RW, |e| {
        matches!(
            e,
            HeaderError::InvalidBackingFileOffset {
                backing_file_offset: u64::MAX,
                ..
            }
        )
    });
    for bfo in [116, 0] {
        let b = big_ext(bfo);
        // With offset 116 the backing name would be read from inside the extension; the
        // extension check comes first in QEMU.
        let err = open_first_cluster(&b, &RW).expect_err("refused");
        assert!(
            matches!(
                err,
                HeaderError::Extension(ExtensionError::TooLarge { offset: 112, .. })
            ),
            "{err:?}"
        );
        assert!(qemu_open_error(d, &b).contains("Header extension too large"));
    }

    for v in [0xffff_ffff, 0x0002_0001] {
        let b = with(&|b| poke32(b, 56, v));
        expect(
            d,
            &b,
            RW,
            |e| matches!(e, HeaderError::RefcountTableTooLarge { clusters } if *clusters == v),
        );
    }
    let b = with(&|b| poke64(b, 48, 0x1234_5678_90ab_cdef));
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::RefcountTableOffsetInvalid { .. })
    });
    let b = with(&|b| {
        poke64(b, 48, 0xffff_ffff_ffff_0000);
        poke32(b, 56, 0x7f);
    });
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::RefcountTableOffsetInvalid {
                offset: 0xffff_ffff_ffff_0000
            }
        )
    });

    for v in [0xffff_ffff, 0x7fff_ffff] {
        let b = with(&|b| poke32(b, 60, v));
        expect(
            d,
            &b,
            RW,
            |e| matches!(e, HeaderError::SnapshotTableTooLarge { nb_snapshots } if *nb_snapshots == v),
        );
        // Check mode skips the snapshot-table checks.
        assert!(open_first_cluster(&b, &CHECK).is_ok());
    }
    let b = with(&|b| {
        poke64(b, 64, 0xffff_ffff_ffff_0000);
        poke32(b, 60, 0xffff);
    });
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::SnapshotTableOffsetInvalid { .. })
    });
    let b = with(&|b| poke64(b, 64, 0x1234_5678_90ab_cdef));
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::SnapshotTableOffsetInvalid {
                offset: 0x1234_5678_90ab_cdef
            }
        )
    });

    for v in [0xffff_ffff, 0x7fff_ffff] {
        let b = with(&|b| poke32(b, 36, v));
        expect(
            d,
            &b,
            RW,
            |e| matches!(e, HeaderError::L1TableTooLarge { l1_size } if *l1_size == v),
        );
    }
    let b = with(&|b| {
        poke64(b, 40, 0x7fff_ffff_ffff_0000);
        poke32(b, 36, 0xffff);
    });
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::L1TableOffsetInvalid { .. })
    });
    let b = with(&|b| {
        poke64(b, 40, 0x1234_5678_90ab_cdef);
        poke32(b, 36, 1);
    });
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::L1TableOffsetInvalid { .. })
    });

    let b = with(&|b| poke32(b, 36, 0));
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::L1TableTooSmall {
                l1_size: 0,
                needed: 1
            }
        )
    });

    let b = with(&|b| {
        poke64(b, 8, 0x1000);
        poke32(b, 16, 0xffff_ffff);
    });
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::BackingFileNameTooLong {
                backing_file_size: 0xffff_ffff,
                max: 1023
            }
        )
    });
}

#[test]
fn basic_field_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = fresh(d, "64M");
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = img.clone();
        f(&mut b);
        b
    };

    expect(d, &with(&|b| poke32(b, 0, 0x5146_49fa)), RW, |e| {
        matches!(e, HeaderError::BadMagic { magic: 0x5146_49fa })
    });
    expect(d, &with(&|b| poke32(b, 4, 4)), RW, |e| {
        matches!(e, HeaderError::UnsupportedVersion { version: 4 })
    });
    assert_eq!(
        open_first_cluster(&with(&|b| poke32(b, 4, 4)), &RW)
            .unwrap_err()
            .to_string(),
        "Unsupported qcow2 version 4"
    );
    expect(d, &with(&|b| poke32(b, 20, 8)), RW, |e| {
        matches!(e, HeaderError::UnsupportedClusterSize { cluster_bits: 8 })
    });
    expect(d, &with(&|b| poke32(b, 20, 22)), RW, |e| {
        matches!(e, HeaderError::UnsupportedClusterSize { cluster_bits: 22 })
    });
    expect(d, &with(&|b| poke32(b, 100, 100)), RW, |e| {
        matches!(e, HeaderError::HeaderTooShort { header_length: 100 })
    });

    // Compression type.
    expect(d, &with(&|b| b[104] = 2), RW, |e| {
        matches!(
            e,
            HeaderError::UnknownCompressionType {
                compression_type: 2
            }
        )
    });
    expect(d, &with(&|b| b[104] = 1), RW, |e| {
        matches!(e, HeaderError::CompressionBitMustBeSet { .. })
    });
    expect(d, &with(&|b| poke64(b, 72, 1 << 3)), RW, |e| {
        matches!(e, HeaderError::CompressionBitMustNotBeSet { .. })
    });

    // Corrupt bit: refused read-write only, allowed read-only and in check mode.
    let corrupt = with(&|b| poke64(b, 72, 1 << 1));
    expect(d, &corrupt, RW, |e| matches!(e, HeaderError::Corrupt));
    assert!(open_first_cluster(&corrupt, &RO).is_ok());
    assert!(open_first_cluster(&corrupt, &CHECK).is_ok());

    // Extended L2 with 8 KiB clusters (offsets of the 64 KiB image stay aligned).
    let b = with(&|b| {
        poke32(b, 20, 13);
        poke64(b, 72, 1 << 4);
        poke32(b, 36, 16);
    });
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::UnsupportedSubclusterSize {
                subcluster_size: 256
            }
        )
    });

    expect(d, &with(&|b| poke32(b, 96, 7)), RW, |e| {
        matches!(e, HeaderError::RefcountOrderTooLarge { refcount_order: 7 })
    });

    let no_reftable = with(&|b| poke32(b, 56, 0));
    expect(d, &no_reftable, RW, |e| {
        matches!(e, HeaderError::NoRefcountTable)
    });
    assert!(open_first_cluster(&no_reftable, &CHECK).is_ok());

    expect(d, &with(&|b| poke64(b, 24, 1 << 61)), RW, |e| {
        matches!(e, HeaderError::ImageTooBig { .. })
    });

    expect(d, &with(&|b| poke64(b, 88, 1 << 1)), RW, |e| {
        matches!(e, HeaderError::DataFileRawWithoutDataFile)
    });

    // Extension-level checks, written where QEMU's feature table starts.
    let mut ext = Vec::new();
    push_extension(&mut ext, 0xe279_2aca, b"a-format-too-long").expect("ext");
    push_extension(&mut ext, 0, &[]).expect("ext");
    let b = with(&|b| b[112..112 + ext.len()].copy_from_slice(&ext));
    expect(d, &b, RW, |e| {
        matches!(
            e,
            HeaderError::Extension(ExtensionError::BackingFormatTooLong { length: 17 })
        )
    });
}

/// A first cluster whose feature-name table (at 112) is replaced by `table`.
fn with_feature_table(img: &[u8], incompat: u64, table: &[FeatureNameEntry]) -> Vec<u8> {
    let mut b = img.to_vec();
    poke64(&mut b, 72, incompat);
    let data: Vec<u8> = table.iter().flat_map(|e| e.to_bytes()).collect();
    let mut ext = Vec::new();
    push_extension(&mut ext, 0x6803_f857, &data).expect("ext");
    push_extension(&mut ext, 0, &[]).expect("ext");
    b[112..512].fill(0);
    b[112..112 + ext.len()].copy_from_slice(&ext);
    b
}

#[test]
fn iotest_036_unknown_features() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = fresh(d, "64M");

    let b = with_feature_table(&img, 1 << 63, &[]);
    expect(
        d,
        &b,
        RW,
        |e| matches!(e, HeaderError::UnsupportedFeatures { mask, .. } if *mask == 1 << 63),
    );
    assert_eq!(
        open_first_cluster(&b, &RO).unwrap_err().to_string(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"
    );

    let b = with_feature_table(
        &img,
        1 << 63,
        &[FeatureNameEntry::new(0, 63, "Test feature")],
    );
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::UnsupportedFeatures { .. })
    });
    assert_eq!(
        open_first_cluster(&b, &RW).unwrap_err().to_string(),
        "Unsupported qcow2 feature(s): Test feature"
    );

    let b = with_feature_table(&img, 0xe000_0000_0000_0000, &[]);
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::UnsupportedFeatures { .. })
    });
    assert!(open_first_cluster(&b, &RW)
        .unwrap_err()
        .to_string()
        .ends_with(": e000000000000000"));

    // Mixed: named bits, a compatible entry for the same bit (ignored), an unnamed bit.
    let table = [
        FeatureNameEntry::new(0, 60, "test1"),
        FeatureNameEntry::new(1, 63, "compat"),
        FeatureNameEntry::new(0, 61, "test2"),
    ];
    let b = with_feature_table(&img, (1 << 60) | (1 << 61) | (1 << 63), &table);
    expect(d, &b, RW, |e| {
        matches!(e, HeaderError::UnsupportedFeatures { .. })
    });
    assert_eq!(
        open_first_cluster(&b, &RW).unwrap_err().to_string(),
        "Unsupported qcow2 feature(s): test1, test2, Unknown incompatible feature: 8000000000000000"
    );
}

#[test]
fn unknown_autoclear_bits_are_cleared_like_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut img = fresh(d, "64M");
    poke64(&mut img, 88, 1 << 63);
    let mut ours = open_first_cluster(&img, &RW).expect("unknown autoclear bits open");
    assert!(ours.header.has_unknown_autoclear());
    assert!(ours.header.clear_unknown_autoclear());
    assert_eq!(ours.header.autoclear_features, 0);

    // A read-write open by QEMU rewrites the header without the bit: same bytes as ours.
    let out = qemu_open_error(d, &img);
    assert!(out.contains("read 512/512"), "{out}");
    let rewritten = std::fs::read(d.join("poked.qcow2")).expect("read");
    assert_eq!(
        ours.to_bytes().expect("serialize"),
        rewritten[..65536].to_vec()
    );

    // Read-only opens leave the bit alone (nothing to clear in our value either).
    let ro = open_first_cluster(&img, &RO).expect("ro");
    assert_eq!(ro.header.autoclear_features, 1 << 63);
}
