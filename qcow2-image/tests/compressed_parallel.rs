//! Compressed writes split for a parallel converter: clusters compressed on several threads
//! with `compress_cluster` and written in order with `write_compressed_prepared` give a file
//! byte-identical to sequential `write_compressed`, clean under `qemu-img check` and equal to
//! the raw data under `qemu-img compare`.

mod common;

use common::{assert_clean, assert_compare, Rng};
use qcow2_image::{compress_cluster, CompressionType, CreateOptions, Image};

fn guest_data(size: usize, cs: usize) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut v = vec![0u8; size];
    for (i, c) in v.chunks_mut(cs).enumerate() {
        match i % 4 {
            0 => c.fill((i % 251) as u8),               // compresses well
            1 => c.copy_from_slice(&rng.data(c.len())), // does not compress
            2 => {}                                     // zeros
            _ => c
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j / 64) as u8),
        }
    }
    v
}

#[test]
fn parallel_prepared_equals_sequential() {
    for kind in [CompressionType::Deflate, CompressionType::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let cs = 4096usize;
        // Not a cluster multiple: the last cluster is short.
        let size = 300 * cs + 1536;
        let data = guest_data(size, cs);
        let raw = dir.path().join("raw");
        std::fs::write(&raw, &data).unwrap();
        let mut o = CreateOptions::new(size as u64);
        o.cluster_size = cs as u64;
        o.compression_type = kind;

        let seq = dir.path().join("seq.qcow2");
        let mut img = Image::create_path(&seq, &o).unwrap();
        for (i, c) in data.chunks(cs).enumerate() {
            img.write_compressed((i * cs) as u64, c).unwrap();
        }
        img.close().unwrap();

        let par = dir.path().join("par.qcow2");
        let mut img = Image::create_path(&par, &o).unwrap();
        let chunks: Vec<&[u8]> = data.chunks(cs).collect();
        let mut results: Vec<Option<Vec<u8>>> = vec![None; chunks.len()];
        std::thread::scope(|s| {
            for (part, out) in chunks.chunks(64).zip(results.chunks_mut(64)) {
                s.spawn(move || {
                    for (c, o) in part.iter().zip(out.iter_mut()) {
                        *o = compress_cluster(kind, cs as u64, c);
                    }
                });
            }
        });
        for (i, (c, r)) in chunks.iter().zip(&results).enumerate() {
            let off = (i * cs) as u64;
            match r {
                Some(bytes) => img.write_compressed_prepared(off, bytes).unwrap(),
                None => img.write(off, c).unwrap(),
            }
        }
        assert!(img.write_compressed_prepared(1, &[1]).is_err());
        assert!(img.write_compressed_prepared(0, &vec![1u8; cs]).is_err());
        img.close().unwrap();

        let what = format!("{kind:?}");
        assert_eq!(
            std::fs::read(&seq).unwrap(),
            std::fs::read(&par).unwrap(),
            "{what}"
        );
        assert_clean(&par, true, &what);
        assert_compare(&par, &raw, &what);
    }
}
