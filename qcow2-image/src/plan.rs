//! Request planning for concurrent guest I/O: under the metadata lock, a request is mapped
//! to host ranges whose data can then move with the lock released (see `shared.rs`).
//!
//! Three kinds of request are planned this way: reads of data clusters, writes into
//! clusters this image owns alone (COPIED) whose touched subclusters already hold data,
//! and allocating writes whose copy-on-write areas read as zero (the new clusters are
//! allocated here, their data is written without the lock, and they are linked under it
//! again: QEMU's in-flight `QCowL2Meta`). Everything else (copy-on-write of data, zero,
//! compressed and backing ranges) takes the engine's full path under the lock.

use crate::error::{ImageError, Op, Result};
use crate::image::MapKind;
use crate::write::{Cow, Need};
use crate::Image;
use qcow2_format::L2Entry;
use qcow2_io::{Event, Storage};
use qcow2_refcount::DiscardType;
use std::sync::Arc;

/// One piece of a planned read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadPiece {
    /// Guest bytes `[at, at + len)` of the request (relative offsets) live at `host` in the
    /// data storage.
    Host { at: u64, len: u64, host: u64 },
    /// Already filled under the lock (zeros, compressed or backing data).
    Done,
}

/// One piece of a planned in-place write: request bytes `[at, at + len)` go to `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WritePiece {
    pub at: u64,
    pub len: u64,
    pub host: u64,
}

/// An allocating write in flight: its clusters are allocated, not yet linked.
#[derive(Debug)]
pub(crate) struct AllocPlan {
    /// Guest offset of the first cluster.
    guest: u64,
    l2_index: u64,
    host: u64,
    run: u64,
    cow: Cow,
    olds: Vec<L2Entry>,
    /// Host range that must read as zero around the data (COW areas and the data itself).
    pub zero: (u64, u64),
    /// Host offset of the request's first byte.
    pub data_at: u64,
}

impl Image {
    /// Maps a guest read: data ranges become host pieces for the caller to read without the
    /// lock; zero, compressed and backing ranges are read into `buf` here.
    pub(crate) fn plan_read(&mut self, offset: u64, buf: &mut [u8]) -> Result<Vec<ReadPiece>> {
        let op = Op::Read;
        self.check_range(op, offset, buf.len() as u64)?;
        if self.poisoned.is_some() && self.is_corrupt() {
            return Err(ImageError::Poisoned {
                op,
                cause: self.poisoned.clone().unwrap_or_default(),
            });
        }
        if self.crypto.is_some() && !crate::crypto::sector_aligned(offset, buf.len() as u64) {
            // Partial sectors of encrypted data are read and decrypted under the lock;
            // whole sectors are planned as usual and decrypted by the caller (host
            // pieces then start and end on sector boundaries too).
            self.read_internal(op, offset, buf)?;
            return Ok(vec![ReadPiece::Done]);
        }
        let mut pieces: Vec<ReadPiece> = Vec::new();
        let mut pos = 0u64;
        let len = buf.len() as u64;
        while pos < len {
            let guest = offset + pos;
            let chunk = self.lookup(op, guest, len - pos)?;
            let n = chunk.len;
            match chunk.kind {
                MapKind::Data(host) => {
                    self.storage.event(Event::ReadAio);
                    match pieces.last_mut() {
                        Some(ReadPiece::Host {
                            at,
                            len: l,
                            host: h,
                        }) if *at + *l == pos && *h + *l == host => *l += n,
                        _ => pieces.push(ReadPiece::Host {
                            at: pos,
                            len: n,
                            host,
                        }),
                    }
                }
                _ => {
                    let dst = &mut buf[pos as usize..(pos + n) as usize];
                    self.read_internal(op, guest, dst)?;
                    pieces.push(ReadPiece::Done);
                }
            }
            pos += n;
        }
        Ok(pieces)
    }

    /// Maps a guest write that needs no metadata change: every touched cluster is owned by
    /// this image alone and every touched subcluster holds data. Returns `None` when any
    /// part needs the full write path. Overlap checks and I/O events happen here, so the
    /// data can be written without the lock.
    pub(crate) fn plan_rewrite(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<WritePiece>>> {
        let op = Op::Write;
        if self.crypto.is_some() && !crate::crypto::sector_aligned(offset, len) {
            // Partial sectors of encrypted data need a read-modify-write: full path.
            // Whole sectors are planned as usual and encrypted by the caller.
            return Ok(None);
        }
        let g = self.geo;
        let cs = g.cluster_size();
        let mut pieces: Vec<WritePiece> = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let guest = offset + pos;
            let in_cluster = g.offset_in_cluster(guest);
            let n = (cs - in_cluster).min(len - pos);
            let l2_offset = self.l2_offset(op, g.l1_index(guest))?;
            if l2_offset == 0 {
                return Ok(None);
            }
            let (h, idx) = self.get_slice(op, l2_offset, g.l2_index(guest))?;
            let e = self.slice_entry(&h, idx);
            self.put(op, h)?;
            let host = match self.need(op, e, guest - in_cluster, in_cluster, in_cluster + n)? {
                Need::InPlace(host) => host + in_cluster,
                Need::KeepOld(_) | Need::Alloc => return Ok(None),
            };
            match pieces.last_mut() {
                Some(p) if p.at + p.len == pos && p.host + p.len == host => p.len += n,
                _ => pieces.push(WritePiece {
                    at: pos,
                    len: n,
                    host,
                }),
            }
            pos += n;
        }
        // Data in an external data file cannot overwrite metadata of the image file.
        if self.data.is_none() {
            for p in &pieces {
                if let Err(e) = self.overlap.check(p.host, p.len, 0) {
                    return Err(self.corruption(op, true, e.to_string()));
                }
            }
        }
        for _ in &pieces {
            self.storage.event(Event::WriteAio);
        }
        Ok(Some(pieces))
    }

    /// Plans an allocating write without copy-on-write data: `[offset, offset + len)` lies in
    /// one L2 slice, every touched cluster needs a new host cluster, and the COW areas read
    /// as zero. The clusters are allocated (refcounted, overlap-checked) here; the caller
    /// writes [`AllocPlan::zero`] and the data without the lock, then calls
    /// [`Image::finish_alloc`] (or [`Image::abort_alloc`] when the data write failed).
    /// `None`: the full write path is needed (nothing was allocated).
    pub(crate) fn plan_alloc(&mut self, offset: u64, len: u64) -> Result<Option<AllocPlan>> {
        let op = Op::Write;
        let g = self.geo;
        let cs = g.cluster_size();
        if len == 0 || self.data.is_some() || self.crypto.is_some() {
            return Ok(None);
        }
        let in_cluster = g.offset_in_cluster(offset);
        let cluster_guest = offset - in_cluster;
        let l2_index = g.l2_index(offset);
        let se = self.slice_entries();
        let run = (in_cluster + len).div_ceil(cs);
        if run > se - l2_index % se {
            return Ok(None);
        }
        let l2_offset = self.l2_for_write(op, offset)?;
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let olds: Vec<L2Entry> = (0..run).map(|i| self.slice_entry(&h, idx + i)).collect();
        self.put(op, h)?;
        for (i, e) in olds.iter().enumerate() {
            let i = i as u64;
            let a = if i == 0 { in_cluster } else { 0 };
            let b = (in_cluster + len - i * cs).min(cs);
            if self.need(op, *e, cluster_guest + i * cs, a, b)? != Need::Alloc {
                return Ok(None);
            }
        }
        let end_in_last = in_cluster + len - (run - 1) * cs;
        let cow = Cow {
            start: self.cow_start_new(olds[0], in_cluster),
            end: self.cow_end_new(olds[olds.len() - 1], end_in_last),
        };
        let head = (
            cluster_guest + cow.start,
            in_cluster.saturating_sub(cow.start),
        );
        let tail_at = offset + len;
        let tail = (
            tail_at,
            (cluster_guest + (run - 1) * cs + cow.end).saturating_sub(tail_at),
        );
        if !self.reads_as_zero(op, head.0, head.1)? || !self.reads_as_zero(op, tail.0, tail.1)? {
            return Ok(None);
        }
        let host = self.alloc_data_clusters(op, cluster_guest, run)?;
        self.sync_overlap_refcounts();
        let span = (run - 1) * cs + cow.end - cow.start;
        if let Err(e) = self.overlap.check(host + cow.start, span, 0) {
            return Err(self.corruption(op, true, e.to_string()));
        }
        if head.1 > 0 || tail.1 > 0 {
            self.storage.event(Event::ClusterAllocSpace);
        }
        self.storage.event(Event::WriteAio);
        Ok(Some(AllocPlan {
            guest: cluster_guest,
            l2_index,
            host,
            run,
            cow,
            olds,
            zero: (host + cow.start, span),
            data_at: host + in_cluster,
        }))
    }

    /// Links the clusters of a planned allocation whose data is written.
    pub(crate) fn finish_alloc(&mut self, plan: AllocPlan) -> Result<()> {
        let op = Op::Write;
        // Whatever happened to the L2 table meanwhile (nothing can move it while requests
        // are in flight, but the lookup is cheap), link into the current one.
        let l2_offset = self.l2_for_write(op, plan.guest)?;
        self.link(
            op,
            l2_offset,
            plan.l2_index,
            plan.host,
            plan.run,
            plan.cow.start,
            plan.cow.end,
            &plan.olds,
        )
    }

    /// Gives back the clusters of a planned allocation whose data write failed (nothing
    /// references them: invariant 3).
    pub(crate) fn abort_alloc(&mut self, plan: &AllocPlan) {
        let cs = self.geo.cluster_size();
        let _ = self.engine.free_clusters(
            &mut self.caches,
            plan.host,
            plan.run * cs,
            DiscardType::Never,
        );
    }

    /// The storage guest data lives in (the external data file, or the image file).
    /// The payload cipher of an encrypted image, for data moved without the lock.
    pub(crate) fn crypto_arc(&self) -> Option<Arc<dyn qcow2_crypto::SectorCipher>> {
        self.crypto.clone()
    }

    pub(crate) fn data_storage_arc(&self) -> Arc<dyn Storage> {
        self.data_storage().clone()
    }
}
