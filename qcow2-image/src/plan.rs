//! Request planning for concurrent guest I/O: under the metadata lock, a request is mapped
//! to host ranges whose data can then move with the lock released (see `shared.rs`).
//!
//! Only ranges whose mapping the data movement cannot change are planned this way: reads of
//! data clusters, and writes into clusters this image owns alone (COPIED) whose touched
//! subclusters already hold data. Everything else (allocation, copy-on-write, zero,
//! compressed and backing ranges) takes the engine's full path under the lock.

use crate::error::{ImageError, Op, Result};
use crate::image::MapKind;
use crate::write::Need;
use crate::Image;
use qcow2_io::{Event, Storage};
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

    /// The storage guest data lives in (the external data file, or the image file).
    pub(crate) fn data_storage_arc(&self) -> Arc<dyn Storage> {
        self.data_storage().clone()
    }
}
