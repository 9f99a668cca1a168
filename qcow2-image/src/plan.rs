//! Request planning for concurrent guest I/O: under the metadata lock, a request is mapped
//! to host ranges whose data can then move with the lock released (see `shared.rs`).
//!
//! Three kinds of request are planned this way: reads (of data clusters, compressed
//! clusters and the backing file), writes into clusters this image owns alone (COPIED)
//! whose touched subclusters already hold data, and allocating writes whose copy-on-write
//! areas read as zero or come from the backing file (the new clusters are allocated here,
//! their data — with the backing bytes around it — is written without the lock, and they
//! are linked under it again: QEMU's in-flight `QCowL2Meta`). Everything else
//! (copy-on-write of this image's own data, writes into compressed clusters, encrypted
//! allocations) takes the engine's full path under the lock.

use crate::backing::SharedBacking;
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
    /// Guest bytes `[at, at + len)` read through to the backing image at `guest`.
    Backing { at: u64, len: u64, guest: u64 },
    /// Guest bytes `[at, at + len)` are bytes `in_cluster..` of the compressed cluster
    /// whose `csize` compressed bytes start at `host` (guest cluster `cluster`).
    Compressed {
        at: u64,
        len: u64,
        in_cluster: u64,
        host: u64,
        csize: u64,
        cluster: u64,
    },
    /// Already filled under the lock (zeros).
    Done,
}

impl ReadPiece {
    /// Whether the piece still has data to move.
    pub(crate) fn pending(&self) -> bool {
        !matches!(self, ReadPiece::Done)
    }
}

/// What a planned read needs to move its data without the metadata lock.
pub(crate) struct ReadSources {
    /// Where data clusters live (the external data file, or the image file).
    pub data: Arc<dyn Storage>,
    /// The image file (compressed clusters).
    image: Arc<dyn Storage>,
    pub cipher: Option<Arc<dyn qcow2_crypto::SectorCipher>>,
    /// Legacy AES: IVs count guest sectors, not host ones.
    iv_guest: bool,
    backing: Option<Arc<SharedBacking>>,
    compression: qcow2_format::features::CompressionType,
    cluster_size: u64,
}

impl ReadSources {
    /// Moves the data of `piece` into the request's buffer `buf`, which starts at guest
    /// offset `guest`.
    pub(crate) fn fill(&self, op: Op, guest: u64, piece: &ReadPiece, buf: &mut [u8]) -> Result<()> {
        match *piece {
            ReadPiece::Done => Ok(()),
            ReadPiece::Host { at, len, host } => {
                let dst = &mut buf[at as usize..(at + len) as usize];
                match &self.cipher {
                    // Planned pieces of encrypted images are whole sectors.
                    Some(c) => {
                        let iv = if self.iv_guest { guest + at } else { host };
                        crate::crypto::read_decrypted(&*self.data, c.as_ref(), host, iv, dst)
                    }
                    None => self.data.read_at(dst, host),
                }
                .map_err(|e| ImageError::io(op, "read guest data", host, e))
            }
            ReadPiece::Backing { at, len, guest } => {
                let dst = &mut buf[at as usize..(at + len) as usize];
                match &self.backing {
                    Some(b) => b.read(guest, dst),
                    None => {
                        dst.fill(0);
                        Ok(())
                    }
                }
            }
            ReadPiece::Compressed {
                at,
                len,
                in_cluster,
                host,
                csize,
                cluster,
            } => {
                // `csize` comes from a decoded entry: at most two clusters (the format's
                // bound), so this allocation is bounded.
                let mut input = vec![0u8; csize as usize];
                self.image
                    .read_at(&mut input, host)
                    .map_err(|e| ImageError::io(op, "read compressed data", host, e))?;
                let mut out = vec![0u8; self.cluster_size as usize];
                crate::compress::decompress(self.compression, &input, &mut out).map_err(
                    |reason| ImageError::Decompress {
                        op,
                        guest_offset: cluster,
                        host_offset: host,
                        reason,
                    },
                )?;
                let (a, i) = (at as usize, in_cluster as usize);
                buf[a..a + len as usize].copy_from_slice(&out[i..i + len as usize]);
                Ok(())
            }
        }
    }
}

/// Where the copy-on-write bytes around an allocating write come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CowSource {
    /// They read as zero.
    Zero,
    /// The backing image at the same guest offsets.
    Backing,
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
    /// Host range the allocation writes: the COW areas and the data itself.
    pub zero: (u64, u64),
    /// Host offset of the request's first byte.
    pub data_at: u64,
    /// Guest ranges of the head and tail COW areas, and the backing image they are read
    /// from when they do not read as zero.
    head: (u64, u64),
    tail: (u64, u64),
    cow_backing: Option<Arc<SharedBacking>>,
    /// Which of head and tail come from `cow_backing` (the other reads as zero).
    from_backing: (bool, bool),
}

impl AllocPlan {
    /// Prepares the bytes of the allocation, without the lock: `None` when the COW areas
    /// read as zero and the storage zeroed the new range fast (only `data` then goes to
    /// [`AllocPlan::data_at`]); otherwise the whole range for [`AllocPlan::zero`], the
    /// COW areas filled with zeros or backing data around `data`.
    pub(crate) fn prepare(
        &self,
        op: Op,
        storage: &dyn Storage,
        data: &[u8],
    ) -> Result<Option<qcow2_io::IoBuf>> {
        let (at, len) = self.zero;
        if self.cow_backing.is_none() {
            let fast = storage
                .zero_fast(at, len)
                .map_err(|e| ImageError::io(op, "write guest data", at, e))?;
            if fast {
                return Ok(None);
            }
        }
        let mut whole = qcow2_io::IoBuf::new(len as usize);
        let d = (self.data_at - at) as usize;
        whole[d..d + data.len()].copy_from_slice(data);
        if let Some(b) = &self.cow_backing {
            let (h, t) = (self.head, self.tail);
            if self.from_backing.0 {
                b.read(h.0, &mut whole[d - h.1 as usize..d])?;
            }
            let e = d + data.len();
            if self.from_backing.1 {
                b.read(t.0, &mut whole[e..e + t.1 as usize])?;
            }
        }
        Ok(Some(whole))
    }
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
                MapKind::Unallocated(_) if self.backing.is_some() => {
                    self.storage.event(Event::ReadBackingAio);
                    pieces.push(ReadPiece::Backing {
                        at: pos,
                        len: n,
                        guest,
                    });
                }
                MapKind::Compressed(e) => {
                    let fmt = qcow2_format::CompressedFormat::for_geometry(&self.geo);
                    let d = fmt.decode(e).map_err(|err| ImageError::Decompress {
                        op,
                        guest_offset: guest,
                        host_offset: 0,
                        reason: err.to_string(),
                    })?;
                    self.storage.event(Event::ReadCompressed);
                    let in_cluster = self.geo.offset_in_cluster(guest);
                    pieces.push(ReadPiece::Compressed {
                        at: pos,
                        len: n,
                        in_cluster,
                        host: d.host_offset(),
                        csize: d.compressed_size(),
                        cluster: guest - in_cluster,
                    });
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

    /// What the pieces of a planned read need to be filled without the lock.
    pub(crate) fn read_sources(&mut self) -> ReadSources {
        ReadSources {
            data: self.data_storage().clone(),
            image: self.storage.clone(),
            cipher: self.crypto.clone(),
            iv_guest: self.crypt_iv_guest,
            backing: crate::backing::share_backing(&mut self.backing),
            compression: self.compression_type(),
            cluster_size: self.geo.cluster_size(),
        }
    }

    /// Where the copy-on-write bytes of guest `[offset, offset + len)` come from, if the
    /// allocation can be done without the lock: zeros, or a backing image below clusters
    /// this image does not allocate at all.
    fn cow_source(&mut self, op: Op, offset: u64, len: u64) -> Result<Option<CowSource>> {
        if self.reads_as_zero(op, offset, len)? {
            return Ok(Some(CowSource::Zero));
        }
        if self.backing.is_none() {
            return Ok(None);
        }
        let mut pos = 0;
        while pos < len {
            let c = self.lookup(op, offset + pos, len - pos)?;
            if !matches!(c.kind, MapKind::Unallocated(None)) {
                return Ok(None);
            }
            pos += c.len;
        }
        Ok(Some(CowSource::Backing))
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
        let (Some(head_src), Some(tail_src)) = (
            self.cow_source(op, head.0, head.1)?,
            self.cow_source(op, tail.0, tail.1)?,
        ) else {
            return Ok(None);
        };
        let from_backing = (
            head_src == CowSource::Backing,
            tail_src == CowSource::Backing,
        );
        let cow_backing = if from_backing.0 || from_backing.1 {
            for (_, l) in [head, tail] {
                if l > 0 {
                    self.storage.event(Event::CowRead);
                }
            }
            crate::backing::share_backing(&mut self.backing)
        } else {
            None
        };
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
            head,
            tail,
            cow_backing,
            from_backing,
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
