//! (a) Open an arbitrary image, read and map it, and check it: never a panic, a hang or an
//! allocation out of proportion to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_check::{check, CheckOptions};
use qcow2_image::{Image, OpenOptions};
use qcow2_io::SparseStorage;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(SparseStorage::from_bytes(data));
    if let Ok(mut img) = Image::open(storage.clone(), &OpenOptions::read_only()) {
        let size = img.virtual_size();
        let cs = img.cluster_size();
        // A bounded sample of the guest: the first clusters and a few spread over the disk.
        let mut buf = vec![0u8; cs.min(1 << 16) as usize];
        for i in 0..8u64 {
            let off = (size / 8).saturating_mul(i) & !(cs - 1);
            let _ = img.read(off, &mut buf);
        }
        let _ = img.map(0, size.min(64 << 20));
    }
    let _ = check(storage, &CheckOptions::default());
});
