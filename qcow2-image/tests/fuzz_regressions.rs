//! Sequences found by the `ops_against_model` fuzz target, kept as regression tests.

use qcow2_image::{Compat, CreateOptions, Image, OpenOptions};
use qcow2_io::MemStorage;
use std::sync::Arc;

/// v2, 512-byte clusters: a zero write (which v2 must write as data, allocating clusters and
/// refcount blocks), then a compressed write. The compressed write was refused by the
/// overlap check as "overlaps with refcount block".
#[test]
fn compressed_write_after_v2_zero_write() {
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 512;
    o.compat = Compat::V0_10;
    let storage = Arc::new(MemStorage::new());
    let mut img = Image::create(storage.clone(), &o).unwrap();
    img.write_zeroes(1_150_976, 254_464, false).unwrap();
    let mut buf = vec![127u8; 512];
    buf[0] = 128;
    img.write_compressed(2_241_536, &buf).unwrap();
    let mut back = vec![0u8; 512];
    img.read(2_241_536, &mut back).unwrap();
    assert_eq!(back, buf);
    img.close().unwrap();
    let mut img = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
    img.read(2_241_536, &mut back).unwrap();
    assert_eq!(back, buf);
    let report = qcow2_check::check(storage, &qcow2_check::CheckOptions::default()).unwrap();
    assert!(report.is_clean(), "{}", report.render_stderr());
}
