//! Test fixtures for the crates above the engine (feature `test-utils`): fresh images from
//! the format crate's layout builder, an engine over them, linking allocated clusters into L2
//! tables so that qemu-img sees them used, and running `qemu-img check`.
//!
//! These helpers panic on failure: they are for tests only.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::{Change, DiscardType, RefcountEngine};
use qcow2_cache::{CacheId, CacheOptions, Caches};
use qcow2_format::header::Header;
use qcow2_format::layout::{fresh_image, CreateOptions};
use qcow2_format::Geometry;
use qcow2_io::{Storage, StorageExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// An engine over a fresh image.
pub struct Fixture {
    pub storage: Arc<dyn Storage>,
    pub caches: Caches,
    pub engine: RefcountEngine,
    pub header: Header,
    pub geometry: Geometry,
}

pub fn fresh_bytes(cluster_size: u64, refcount_bits: u32, size: u64) -> Vec<u8> {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    fresh_image(&o).expect("layout").to_bytes()
}

pub fn open(storage: Arc<dyn Storage>) -> Fixture {
    let mut first = vec![0u8; 4096];
    storage.read_at(&mut first, 0).unwrap();
    let header = Header::parse(&first).expect("header");
    let geometry = header.geometry().unwrap();
    let cs = geometry.cluster_size() as usize;
    let caches = Caches::new(
        storage.clone(),
        CacheOptions::new(cs, 16),
        CacheOptions::new(cs, 4),
    )
    .unwrap();
    let engine = RefcountEngine::open(
        geometry,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        &*storage,
    )
    .unwrap();
    Fixture {
        storage,
        caches,
        engine,
        header,
        geometry,
    }
}

impl Fixture {
    pub fn flush(&mut self) {
        self.caches.flush(CacheId::L2).unwrap();
        self.caches.flush(CacheId::Refblock).unwrap();
        self.engine.release_quarantine(&mut self.caches);
    }

    /// Host clusters of the image's fixed metadata (header, L1) plus the engine's refcount
    /// table and blocks.
    pub fn metadata_clusters(&self) -> Vec<u64> {
        let g = &self.geometry;
        let mut v = vec![0];
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        for c in 0..g.size_to_clusters(l1_bytes) {
            v.push(g.cluster_index(self.header.l1_table_offset) + c);
        }
        let rt = g.cluster_index(self.engine.reftable_offset());
        for c in 0..self.engine.reftable_clusters() {
            v.push(rt + c);
        }
        for o in self.engine.refblock_offsets() {
            v.push(g.cluster_index(o));
        }
        v.sort_unstable();
        v
    }

    /// Links every cluster in `data` (each must have refcount 1) into L2 tables at guest
    /// offsets 0, cs, 2cs, ... so that qemu-img counts exactly one reference to each. The L2
    /// tables are allocated through the engine. Everything is flushed afterwards.
    pub fn link_data(&mut self, data: &[u64]) {
        let bits = self.geometry.cluster_bits();
        let entries: Vec<u64> = data.iter().map(|&c| (c << bits) | (1 << 63)).collect();
        let end = data.iter().max().map_or(0, |&m| (m + 1) << bits);
        self.link_l2_entries(&entries, end);
    }

    /// Writes raw standard L2 entries into L2 tables (allocated through the engine) at guest
    /// offsets 0, cs, 2cs, ..., points the L1 at them, makes the file at least `file_end`
    /// long (as written guest data would) and flushes everything.
    pub fn link_l2_entries(&mut self, entries: &[u64], file_end: u64) {
        let g = self.geometry;
        let per_l2 = g.l2_entries() as usize;
        assert!(
            entries.len().div_ceil(per_l2) <= self.header.l1_size as usize,
            "virtual size too small to map every entry"
        );
        let mut l1 = vec![0u8; self.header.l1_size as usize * 8];
        for (t, chunk) in entries.chunks(per_l2).enumerate() {
            let l2_off = self.engine.alloc_clusters(&mut self.caches, 1).unwrap();
            let mut l2 = vec![0u8; g.cluster_size() as usize];
            for (i, &e) in chunk.iter().enumerate() {
                l2[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.storage.write_at(&l2, l2_off).unwrap();
            l1[t * 8..t * 8 + 8].copy_from_slice(&(l2_off | (1 << 63)).to_be_bytes());
        }
        self.storage
            .write_at(&l1, self.header.l1_table_offset)
            .unwrap();
        // Data clusters are never written by these tests; the file must still cover them,
        // as it would after the guest data was written.
        if self.storage.len().unwrap() < file_end {
            self.storage.set_len(file_end).unwrap();
        }
        self.flush();
        self.storage.flush().unwrap();
    }

    pub fn refcount(&mut self, cluster: u64) -> u64 {
        self.engine.get(&mut self.caches, cluster).unwrap()
    }

    pub fn bump(&mut self, offset: u64, change: Change) -> Result<(), crate::RefcountError> {
        self.engine.update(
            &mut self.caches,
            offset,
            self.geometry.cluster_size(),
            change,
            DiscardType::Never,
        )
    }

    pub fn file_len(&self) -> u64 {
        self.storage.len().unwrap()
    }
}

/// Runs `qemu-img check --output=json` and returns (exit code, parsed JSON).
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if code != 0 {
        eprintln!(
            "qemu-img check stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (code, json)
}

/// Writes `bytes` to a temp file and runs `qemu-img check` on it.
pub fn qemu_check_bytes(bytes: &[u8]) -> (i32, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    std::fs::write(&p, bytes).unwrap();
    qemu_check(&p)
}

pub fn read_all(storage: &dyn Storage) -> Vec<u8> {
    let len = storage.len().unwrap() as usize;
    storage.read_vec(0, len).unwrap()
}
