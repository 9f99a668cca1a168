//! Extended L2 entries: the subcluster bitmaps iotest 271 expects after each write
//! (reference §6.4 row 271), checked on the raw L2 table.

use qcow2_image::{CreateOptions, Image};
use qcow2_io::MemStorage;
use std::sync::Arc;

fn entry(s: &MemStorage, i: usize) -> (u64, u64) {
    let b = s.to_bytes();
    let o = 0x40000 + i * 16;
    let w = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    (w(o), w(o + 8))
}

#[test]
fn iotest_271_bitmaps() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(1 << 20);
    o.extended_l2 = true;
    let mut img = Image::create(s.clone(), &o).unwrap();
    let k = 1024u64;
    let steps: [(u64, u64, u64); 7] = [
        (0, k, 0x1),
        (3 * k, 512, 0x3),
        (5 * k, k, 0x7),
        (6 * k, 2 * k, 0xf),
        (8 * k, 6 * k, 0x7f),
        (15 * k, 4 * k, 0x3ff),
        (32 * k, k, 0x103ff),
    ];
    for (off, len, bm) in steps {
        img.write(off, &vec![0x11; len as usize]).unwrap();
        img.flush().unwrap();
        assert_eq!(entry(&s, 0).1, bm, "after write {off:#x}+{len:#x}");
    }
    assert_eq!(entry(&s, 0).0, 0x8000_0000_0005_0000);
    img.write(63 * k, &vec![0x11; 4 * k as usize]).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0).1, 0x8001_03ff);
    assert_eq!(entry(&s, 1).1, 0x3);
    img.write_zeroes(2 * k, 2 * k, false).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0).1, 0x0000_0002_8001_03fd);
    img.write_zeroes(0, 64 * k, false).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0), (0x8000_0000_0005_0000, 0xffff_ffff_0000_0000));
    img.write(0, &vec![0x22; 64 * k as usize]).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0), (0x8000_0000_0005_0000, 0xffff_ffff));
    img.write_zeroes(0, 32 * k, true).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0).1, 0x0000_ffff_ffff_0000);
    img.write_zeroes(0, 64 * k, true).unwrap();
    img.flush().unwrap();
    assert_eq!(entry(&s, 0), (0, 0xffff_ffff_0000_0000));
    // Reads follow the bitmaps.
    let mut b = vec![0xffu8; 128 * k as usize];
    img.read(0, &mut b).unwrap();
    assert!(b[..64 * k as usize].iter().all(|&x| x == 0));
    assert!(b[64 * k as usize..67 * k as usize]
        .iter()
        .all(|&x| x == 0x11));
    img.close().unwrap();
}
