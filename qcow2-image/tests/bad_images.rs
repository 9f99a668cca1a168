//! (5) Bad images (iotests 080/036/060 cases) give the expected typed errors and QEMU's
//! messages, never a panic; fatal corruption marks the image corrupt and refuses further
//! use; overlap checks stop writes onto metadata.

use qcow2_image::{CreateOptions, Image, ImageError, OpenOptions};
use qcow2_io::MemStorage;
use std::sync::Arc;

/// A fresh 64 MiB image with one 512-byte write at 0 (L2 at 0x40000, data at 0x50000).
fn base() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut img = Image::create(s.clone(), &CreateOptions::new(64 << 20)).unwrap();
    img.write(0, &[0x11; 512]).unwrap();
    img.close().unwrap();
    s.to_bytes()
}

fn poke(img: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if img.len() < off + bytes.len() {
        img.resize(off + bytes.len(), 0);
    }
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

fn open(bytes: Vec<u8>, ro: bool) -> Result<Image, ImageError> {
    let opts = if ro {
        OpenOptions::read_only()
    } else {
        OpenOptions::default()
    };
    Image::open(Arc::new(MemStorage::from_bytes(bytes)), &opts)
}

fn open_err(bytes: Vec<u8>) -> String {
    open(bytes, false).expect_err("open must fail").to_string()
}

#[test]
fn header_pokes_iotest_080() {
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (
            100,
            0xffff_ffffu32.to_be_bytes().to_vec(),
            "qcow2 header exceeds cluster size",
        ),
        (
            56,
            0xffff_ffffu32.to_be_bytes().to_vec(),
            "Reference count table too large",
        ),
        (
            48,
            0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec(),
            "Reference count table offset invalid",
        ),
        (
            60,
            0x7fff_ffffu32.to_be_bytes().to_vec(),
            "Snapshot table too large",
        ),
        (
            36,
            0x7fff_ffffu32.to_be_bytes().to_vec(),
            "Active L1 table too large",
        ),
        (36, 0u32.to_be_bytes().to_vec(), "L1 table is too small"),
        (
            4,
            4u32.to_be_bytes().to_vec(),
            "Unsupported qcow2 version 4",
        ),
        (
            20,
            30u32.to_be_bytes().to_vec(),
            "Unsupported cluster size: 2^30",
        ),
        (0, b"QFI\x00".to_vec(), "Image is not in qcow2 format"),
        (
            72,
            0x8000_0000_0000_0000u64.to_be_bytes().to_vec(),
            "Unsupported qcow2 feature(s)",
        ),
    ];
    for (off, bytes, msg) in cases {
        let mut img = base();
        poke(&mut img, off, &bytes);
        let e = open_err(img);
        assert!(
            e.contains(msg),
            "poke {off}: {e:?} does not contain {msg:?}"
        );
    }
    // Truncated or empty files.
    assert!(open_err(Vec::new()).contains("Image is not in qcow2 format"));
    let mut img = base();
    img.truncate(50);
    let _ = open(img, true);
}

#[test]
fn corrupt_bit_refuses_read_write_only() {
    let mut img = base();
    poke(&mut img, 72, &2u64.to_be_bytes());
    assert!(open_err(img.clone()).contains("Image is corrupt; cannot be opened read/write"));
    let mut ro = open(img, true).unwrap();
    let mut b = [0u8; 512];
    ro.read(0, &mut b).unwrap();
    assert_eq!(b, [0x11; 512]);
}

#[test]
fn dirty_image_is_repaired_on_read_write_open() {
    let mut img = base();
    poke(&mut img, 72, &1u64.to_be_bytes());
    // Read-only: opened as it is, nothing written.
    assert!(open(img.clone(), true).is_ok());
    // Repair disabled: refused.
    let s = Arc::new(MemStorage::from_bytes(img.clone()));
    let opts = OpenOptions {
        repair_dirty: false,
        ..OpenOptions::default()
    };
    let e = Image::open(s, &opts).err().unwrap();
    assert!(matches!(e, ImageError::DirtyImage { .. }), "{e}");
    assert!(
        e.to_string().starts_with("Could not repair dirty image: "),
        "{e}"
    );
    // Read-write (QEMU's default): repaired (nothing to fix here), bit cleared.
    let s = Arc::new(MemStorage::from_bytes(img));
    let i = Image::open(s.clone(), &OpenOptions::default()).unwrap();
    assert!(!i.is_dirty());
    i.close().unwrap();
    assert_eq!(s.to_bytes()[79] & 1, 0);
}

#[test]
fn unknown_autoclear_bits_cleared_on_writable_open() {
    let mut img = base();
    poke(&mut img, 88, &0x8000_0000_0000_0000u64.to_be_bytes());
    let s = Arc::new(MemStorage::from_bytes(img));
    let i = Image::open(s.clone(), &OpenOptions::default()).unwrap();
    i.close().unwrap();
    let b = s.to_bytes();
    assert_eq!(u64::from_be_bytes(b[88..96].try_into().unwrap()), 0);
}

fn corruption_message(img: &Image) -> String {
    img.messages().join("\n")
}

#[test]
fn unaligned_l2_offset_is_fatal_corruption() {
    let mut img = base();
    poke(&mut img, 0x30000, &0x8000_0000_0004_2a00u64.to_be_bytes());
    let s = Arc::new(MemStorage::from_bytes(img));
    let mut i = Image::open(s.clone(), &OpenOptions::default()).unwrap();
    let mut b = [0u8; 512];
    let e = i.read(0, &mut b).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert_eq!(
        corruption_message(&i),
        "qcow2: Marking image as corrupt: L2 table offset 0x42a00 unaligned (L1 index: 0); \
         further corruption events will be suppressed"
    );
    assert!(i.write(0, &[1]).is_err());
    drop(i);
    // The corrupt bit is on disk now.
    assert!(open_err(s.to_bytes()).contains("Image is corrupt"));
}

#[test]
fn unaligned_data_cluster_read_only_is_non_fatal() {
    let mut img = base();
    poke(&mut img, 0x40000, &0x8000_0000_0005_2a00u64.to_be_bytes());
    let mut i = open(img, true).unwrap();
    let mut b = [0u8; 512];
    assert!(i.read(0, &mut b).unwrap_err().is_corruption());
    assert!(i.read(0, &mut b).unwrap_err().is_corruption());
    // One message only; read-only images are not marked corrupt.
    assert_eq!(
        corruption_message(&i),
        "qcow2: Image is corrupt: Cluster allocation offset 0x52a00 unaligned (L2 offset: \
         0x40000, L2 index: 0); further non-fatal corruption events will be suppressed"
    );
}

#[test]
fn overlap_check_stops_data_write_into_refblock() {
    // iotest 060: L2[0] points at the refcount block.
    let mut img = base();
    poke(&mut img, 0x40000, &0x8000_0000_0002_0000u64.to_be_bytes());
    let s = Arc::new(MemStorage::from_bytes(img));
    let before = s.to_bytes();
    let mut i = Image::open(s.clone(), &OpenOptions::default()).unwrap();
    let e = i.write(0, &[0xee; 512]).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(corruption_message(&i)
        .contains("Preventing invalid write on metadata (overlaps with refcount block)"));
    drop(i);
    let after = s.to_bytes();
    // Nothing was written onto the refcount block.
    assert_eq!(&before[0x20000..0x30000], &after[0x20000..0x30000]);
}

#[test]
fn overlap_check_stops_l2_write_into_l1() {
    // iotest 060: L1[0] points at the L1 table itself.
    let mut img = base();
    poke(&mut img, 0x30000, &0x8000_0000_0003_0000u64.to_be_bytes());
    let mut i = open(img, false).unwrap();
    let r = i.write(0, &[0xee; 512]).and_then(|()| i.flush());
    let e = r.unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(
        corruption_message(&i).contains("overlaps with active L1 table"),
        "{}",
        corruption_message(&i)
    );
}

#[test]
fn random_garbage_never_panics() {
    let good = base();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..100 {
        let mut img = good.clone();
        for _ in 0..(1 + round % 6) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly the header, the tables and the first L2 table.
            let off = match x % 4 {
                0 => (x >> 8) % 112,
                1 => 0x10000 + (x >> 8) % 64,
                2 => 0x30000 + (x >> 8) % 64,
                _ => 0x40000 + (x >> 8) % 64,
            } as usize;
            poke(&mut img, off, &[(x >> 40) as u8]);
        }
        for ro in [true, false] {
            if let Ok(mut i) = open(img.clone(), ro) {
                let mut b = vec![0u8; 4096];
                let _ = i.read(0, &mut b);
                let _ = i.map(0, i.virtual_size().min(1 << 20));
                if !ro {
                    let _ = i.write(0, &b);
                    let _ = i.write_zeroes(65536, 65536, true);
                    let _ = i.discard(0, 65536);
                    let _ = i.flush();
                }
            }
        }
    }
}
