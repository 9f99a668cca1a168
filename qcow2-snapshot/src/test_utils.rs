//! A minimal [`SnapshotHost`] for tests and benchmarks (feature `test-utils`): an image
//! opened over any [`Storage`] with just what snapshots need (header, caches, refcount
//! engine, active L1), and helpers that drive `qemu-img` / `qemu-io` as peers.
//!
//! It is also the reference for implementing the trait: [`TestImage`] keeps the
//! [`Snapshots`] value next to the host ([`TestHost`]) so that operations borrow disjoint
//! fields. These helpers panic on unexpected failures: they are for tests only.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::{Error, HostError, HostParts, SnapshotHost, Snapshots};
use qcow2_cache::{CacheId, CacheOptions, Caches};
use qcow2_format::header::Header;
use qcow2_format::Geometry;
use qcow2_io::{FileStorage, MemStorage, Storage, StorageExt};
use qcow2_refcount::{DiscardType, RefcountEngine};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Everything but the snapshot table: the [`SnapshotHost`] implementation.
pub struct TestHost {
    pub storage: Arc<dyn Storage>,
    pub caches: Caches,
    pub refcounts: RefcountEngine,
    pub header: Header,
    pub geometry: Geometry,
    pub l1: Vec<u64>,
}

/// An open image: host plus snapshot table.
pub struct TestImage {
    pub host: TestHost,
    pub snapshots: Snapshots,
}

impl SnapshotHost for TestHost {
    fn parts(&mut self) -> HostParts<'_> {
        HostParts {
            caches: &mut self.caches,
            refcounts: &mut self.refcounts,
            active_l1: &mut self.l1,
        }
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn l1_table_offset(&self) -> u64 {
        self.header.l1_table_offset
    }

    fn snapshot_table_switched(&mut self, nb_snapshots: u32, snapshots_offset: u64) {
        self.header.nb_snapshots = nb_snapshots;
        self.header.snapshots_offset = snapshots_offset;
    }

    fn resize(&mut self, new_size: u64) -> Result<(), HostError> {
        if self.header.version < 3 && self.header.nb_snapshots > 0 {
            return Err("Can't resize a v2 image which has snapshots".into());
        }
        let needed = self.geometry.l1_entries_for(new_size);
        self.grow_l1(u32::try_from(needed)?)?;
        // Shrinking keeps the clusters beyond the end mapped (still counted, never read).
        self.storage.write_sync(&new_size.to_be_bytes(), 24)?;
        self.header.size = new_size;
        Ok(())
    }

    fn grow_l1(&mut self, min_entries: u32) -> Result<(), HostError> {
        if min_entries as usize <= self.l1.len() {
            return Ok(());
        }
        let g = self.geometry;
        let bytes = u64::from(min_entries) * 8;
        let new_off = self
            .refcounts
            .alloc_clusters(&mut self.caches, g.size_to_clusters(bytes))?;
        // The new table's refcount is durable before the header names it.
        self.caches.flush(CacheId::Refblock)?;
        let mut entries = self.l1.clone();
        entries.resize(min_entries as usize, 0);
        self.storage
            .write_sync(&crate::walk::l1_bytes(&entries), new_off)?;
        let mut sw = [0u8; 12];
        sw[..4].copy_from_slice(&min_entries.to_be_bytes());
        sw[4..].copy_from_slice(&new_off.to_be_bytes());
        self.storage.write_sync(&sw, 36)?;
        let (old_off, old_len) = (self.header.l1_table_offset, self.l1.len() as u64 * 8);
        self.header.l1_size = min_entries;
        self.header.l1_table_offset = new_off;
        self.l1 = entries;
        if old_len > 0 {
            let _ = self.refcounts.free_clusters(
                &mut self.caches,
                old_off,
                old_len,
                DiscardType::Other,
            );
        }
        Ok(())
    }
}

impl TestHost {
    /// Opens the image in `storage` with `l2_entries` L2 slices (cluster-sized) and
    /// `refblock_entries` refcount blocks of cache.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        l2_entries: usize,
        refblock_entries: usize,
    ) -> Self {
        let first = storage.read_vec(0, 4096).unwrap();
        let header = Header::parse(&first).expect("header");
        let geometry = header.geometry().unwrap();
        let cs = geometry.cluster_size() as usize;
        let caches = Caches::new(
            storage.clone(),
            CacheOptions::new(cs, l2_entries),
            CacheOptions::new(cs, refblock_entries),
        )
        .unwrap();
        let refcounts = RefcountEngine::open(
            geometry,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            &*storage,
        )
        .unwrap();
        let raw = storage
            .read_vec(header.l1_table_offset, header.l1_size as usize * 8)
            .unwrap();
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        Self {
            storage,
            caches,
            refcounts,
            header,
            geometry,
            l1,
        }
    }

    /// Writes every dirty cache entry back and flushes.
    pub fn flush(&mut self) -> Result<(), Error> {
        crate::walk::flush_all(&mut self.caches)
    }
}

impl TestImage {
    /// Opens the image in `storage` (caches: 64 L2 slices, 4 refcount blocks).
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self, Error> {
        Self::open_with(storage, 64, 4)
    }

    /// Opens with the given cache sizes (in entries).
    pub fn open_with(
        storage: Arc<dyn Storage>,
        l2_entries: usize,
        refblock_entries: usize,
    ) -> Result<Self, Error> {
        let host = TestHost::open_with(storage, l2_entries, refblock_entries);
        let snapshots = Snapshots::load(
            &*host.storage,
            &host.geometry,
            host.header.nb_snapshots,
            host.header.snapshots_offset,
            host.header.size,
        )?;
        Ok(Self { host, snapshots })
    }

    /// Opens a file read-write.
    pub fn open_file(path: &Path) -> Result<Self, Error> {
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true).unwrap());
        Self::open(s)
    }

    /// Opens a copy of `bytes` in memory.
    pub fn open_bytes(bytes: Vec<u8>) -> Result<Self, Error> {
        Self::open(Arc::new(MemStorage::from_bytes(bytes)))
    }

    pub fn create(&mut self, name: &str) -> Result<usize, Error> {
        self.snapshots.create(&mut self.host, name)
    }

    pub fn delete(&mut self, name: &str) -> Result<crate::SnapshotEntry, Error> {
        self.snapshots.delete(&mut self.host, name)
    }

    pub fn apply(&mut self, id_or_name: &str) -> Result<(), Error> {
        self.snapshots.apply(&mut self.host, id_or_name)
    }

    /// Flushes everything (what closing the image does).
    pub fn close(mut self) -> Result<(), Error> {
        self.host.flush()
    }

    /// The whole image as bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let len = self.host.storage.len().unwrap() as usize;
        self.host.storage.read_vec(0, len).unwrap()
    }
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
pub fn qemu_create(path: &Path, opts: &str, size: &str) {
    let p = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p);
    args.push(size);
    let (code, _, err) = run("qemu-img", &args);
    assert_eq!(code, 0, "qemu-img create: {err}");
}

/// `qemu-io -c CMD PATH` for each command (in one invocation); panics on a nonzero exit or
/// any "failed"/"Pattern verification" message.
pub fn qemu_io(path: &Path, cmds: &[&str]) -> String {
    let mut args = vec![];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    let (code, out, err) = run("qemu-io", &args);
    assert!(
        code == 0 && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}{err}"
    );
    out
}

/// `qemu-img check --output=json`: (exit code, leaks, corruptions, check errors).
pub fn qemu_check(path: &Path) -> (i32, u64, u64, u64) {
    let (code, out, err) = run(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_like::Value = serde_like::parse(&out);
    let leaks = v.get("leaks");
    let corruptions = v.get("corruptions");
    let errors = v.get("check-errors");
    if code != 0 && code != 3 {
        eprintln!("qemu-img check: {out}{err}");
    }
    (code, leaks, corruptions, errors)
}

/// `qemu-img snapshot -l`: the (id, name) pairs listed.
pub fn qemu_list(path: &Path) -> Vec<(String, String)> {
    let (code, out, err) = run("qemu-img", &["snapshot", "-l", path.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img snapshot -l: {err}");
    out.lines()
        .skip(2)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// A tiny reader for the flat integer fields of `qemu-img check --output=json` (avoids a
/// JSON dependency in the library).
mod serde_like {
    pub struct Value(String);

    pub fn parse(s: &str) -> Value {
        Value(s.to_owned())
    }

    impl Value {
        /// The integer after `"key": `, 0 if absent.
        pub fn get(&self, key: &str) -> u64 {
            let pat = format!("\"{key}\": ");
            self.0
                .find(&pat)
                .map(|i| {
                    self.0[i + pat.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|d| d.parse().ok())
                .unwrap_or(0)
        }
    }
}
