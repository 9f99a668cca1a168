//! Mapping queries: what each guest range is (data, zero, compressed, unallocated, backing)
//! and where it lives, for `qemu-img map`-style output and block-status helpers.
//!
//! Two views, as QEMU has two block-status modes:
//! - [`Image::map_metadata`] answers from the L1/L2 tables alone (QEMU's block status
//!   without `want_zero`, what `bdrv_is_allocated` sees): cheap, no host queries.
//! - [`Image::map`] and [`Image::block_status`] answer as `qemu-img map` sees one layer
//!   (precise block status): in addition, when the image looks preallocated with
//!   `preallocation=metadata` (QEMU's `qcow2_detect_metadata_preallocation`), data
//!   clusters are checked against the host storage's holes ([`Storage::data_status`],
//!   `SEEK_DATA`/`SEEK_HOLE` on files) and the parts that are holes, or beyond the end of
//!   the host file, are [`ExtentKind::DataHole`]. QEMU asks the host only then (its
//!   `BDRV_BLOCK_RECURSE`), so that is when we ask too: the same image maps the same way.
//!
//! Runs split where QEMU's block status splits them (`count_contiguous_subclusters`): a
//! change of subcluster type, or a host offset that does not continue the run, for data,
//! preallocated zero clusters and unallocated subclusters of allocated clusters alike.
//!
//! [`Storage::data_status`]: qcow2_io::Storage::data_status

use crate::error::{Op, Result};
use crate::image::MapKind;
use crate::Image;
use qcow2_format::refcount::REFT_OFFSET_MASK;

/// What a guest range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Guest data in this image (`host_offset` says where).
    Data,
    /// Guest data in this image whose host range reads as zero: a hole in the host storage,
    /// or beyond its end (`host_offset` says where). QEMU's `"data": true, "zero": true`.
    /// Only [`Image::map`] and [`Image::block_status`] report it, and only where QEMU asks
    /// the host storage (images that look preallocated with `preallocation=metadata`).
    DataHole,
    /// Reads as zeros by metadata (a zero cluster or zero subclusters; `host_offset` is
    /// where the preallocated host cluster maps the range, if there is one).
    Zero,
    /// A compressed cluster (no usable host offset).
    Compressed,
    /// Not allocated and no backing file shows through: reads as zeros. `host_offset` is
    /// set for unallocated subclusters of an allocated cluster (extended L2), as QEMU
    /// reports them.
    Unallocated,
    /// Not allocated here: read from the backing file.
    Backing,
}

/// One run of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it holds.
    pub kind: ExtentKind,
    /// Host offset of the first byte, where the range has a host cluster (data, data
    /// holes, preallocated zero clusters, unallocated subclusters of allocated clusters).
    pub host_offset: Option<u64>,
}

impl Extent {
    /// Whether the range is allocated in this image (data, zero or compressed), as
    /// qemu-io's `alloc` counts it.
    pub fn is_allocated(&self) -> bool {
        matches!(
            self.kind,
            ExtentKind::Data | ExtentKind::DataHole | ExtentKind::Zero | ExtentKind::Compressed
        )
    }

    /// Whether the range reads as zeros without reading data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(
            self.kind,
            ExtentKind::DataHole | ExtentKind::Zero | ExtentKind::Unallocated
        )
    }

    /// Whether `next` continues this extent as one block-status run: adjacent, the same
    /// kind and, where there are host offsets, contiguous ones (qemu-img map's merge rule).
    fn continued_by(&self, next: &Extent) -> bool {
        self.offset + self.length == next.offset
            && self.kind == next.kind
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// Appends `x` to `out`, merged into the last extent when it continues it. Returns whether
/// a new extent was started.
fn push_merged(out: &mut Vec<Extent>, x: Extent) -> bool {
    if x.length == 0 {
        return false;
    }
    if let Some(last) = out.last_mut() {
        if last.continued_by(&x) {
            last.length += x.length;
            return false;
        }
    }
    out.push(x);
    true
}

impl Image {
    /// Maps guest `[offset, offset + len)` to extents as `qemu-img map` sees this layer
    /// (QEMU's precise block status): the metadata mapping of [`Image::map_metadata`], with
    /// data clusters whose host range is a hole reported as [`ExtentKind::DataHole`] when
    /// the image looks preallocated with `preallocation=metadata` (see the module docs).
    /// On encrypted images no extent has a host offset (QEMU's block status sets no
    /// `OFFSET_VALID` with encryption), so neighbours of equal kind merge.
    pub fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let v = self.map_precise(offset, len, usize::MAX)?;
        Ok(self.without_offsets_if_encrypted(v))
    }

    fn without_offsets_if_encrypted(&self, v: Vec<Extent>) -> Vec<Extent> {
        if self.crypto.is_none() {
            return v;
        }
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for mut x in v {
            x.host_offset = None;
            push_merged(&mut out, x);
        }
        out
    }

    /// Maps guest `[offset, offset + len)` to extents from the metadata alone (no host
    /// storage queries), merging neighbours of equal kind and contiguous host offsets.
    pub fn map_metadata(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.map_meta(offset, len, usize::MAX)
    }

    /// The metadata mapping, stopping once `limit` extents are complete.
    fn map_meta(&mut self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        let op = Op::Map;
        self.check_range(op, offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0;
        while pos < len {
            let guest = offset + pos;
            let c = self.lookup(op, guest, len - pos)?;
            // Split unallocated runs at the end of the backing file.
            let (kind, host, n) = match c.kind {
                MapKind::Data(h) => (ExtentKind::Data, Some(h), c.len),
                MapKind::Zero(h) => (ExtentKind::Zero, h, c.len),
                MapKind::Compressed(_) => (ExtentKind::Compressed, None, c.len),
                MapKind::Unallocated(h) => match self.backing.as_ref().map(|b| b.size()) {
                    // What the backing file holds replaces this layer's answer (and its
                    // host offset) entirely.
                    Some(bs) if guest < bs => (ExtentKind::Backing, None, c.len.min(bs - guest)),
                    _ => (ExtentKind::Unallocated, h, c.len),
                },
            };
            let x = Extent {
                offset: guest,
                length: n,
                kind,
                host_offset: host,
            };
            if push_merged(&mut out, x) && out.len() > limit {
                out.truncate(limit);
                return Ok(out);
            }
            pos += n;
        }
        Ok(out)
    }

    /// The precise mapping (see [`Image::map`]), stopping once `limit` extents are
    /// complete.
    fn map_precise(&mut self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        let meta = self.map_meta(offset, len, limit)?;
        // Only data clusters are checked against the host; without any, the detection
        // (a refcount scan) is not needed yet.
        if !meta.iter().any(|x| x.kind == ExtentKind::Data) || !self.metadata_preallocated() {
            return Ok(meta);
        }
        let host = self.data_storage().clone();
        let mut out: Vec<Extent> = Vec::with_capacity(meta.len());
        for x in meta {
            let (ExtentKind::Data, Some(h)) = (x.kind, x.host_offset) else {
                if push_merged(&mut out, x) && out.len() > limit {
                    out.truncate(limit);
                    return Ok(out);
                }
                continue;
            };
            let mut done = 0;
            while done < x.length {
                let left = x.length - done;
                // QEMU ignores a failed host query ("just providing extra information"):
                // the range stays data.
                let (data, n) = match host.data_status(h + done, left) {
                    Ok((data, n)) if n > 0 => (data, n.min(left)),
                    _ => (true, left),
                };
                let piece = Extent {
                    offset: x.offset + done,
                    length: n,
                    kind: if data {
                        ExtentKind::Data
                    } else {
                        ExtentKind::DataHole
                    },
                    host_offset: Some(h + done),
                };
                if push_merged(&mut out, piece) && out.len() > limit {
                    out.truncate(limit);
                    return Ok(out);
                }
                done += n;
            }
        }
        Ok(out)
    }

    /// Whether the image looks preallocated with `preallocation=metadata`: QEMU's
    /// `qcow2_detect_metadata_preallocation`, decided once per open as QEMU does. More
    /// clusters in use (refcount > 0) than the host file has blocks allocated (by a tenth,
    /// and at least two) means most of them were never written, and only then does QEMU's
    /// block status ask the host file which parts are holes. Any error answers "no", as
    /// QEMU's does.
    pub(crate) fn metadata_preallocated(&mut self) -> bool {
        // Encrypted images report no host offsets (QEMU's block status has no
        // OFFSET_VALID for them), so the host file's holes are never asked: zeros on disk
        // decrypt to noise, not to zeros.
        if self.crypto.is_some() {
            return false;
        }
        if let Some(v) = self.metadata_prealloc {
            return v;
        }
        let v = self.detect_metadata_prealloc().unwrap_or(false);
        self.metadata_prealloc = Some(v);
        v
    }

    fn detect_metadata_prealloc(&mut self) -> Option<bool> {
        let cs = self.geo.cluster_size();
        // The block layer counts whole sectors of the image file.
        let file_length = self.storage.len().ok()?.checked_next_multiple_of(512)?;
        let real_allocation = self.storage.allocated_size().ok()??;
        let real_clusters = real_allocation / cs;
        let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters + 2);
        let end_cluster = file_length.div_ceil(cs);
        let rg = *self.engine.geometry();
        let per_block = rg.refcount_block_entries();
        let mut count = 0u64;
        let mut i = 0;
        while i < end_cluster && count < threshold {
            // A refcount block that does not exist holds only zeros: skip it whole, so a
            // large sparse file with few clusters in use is not walked cluster by cluster.
            let block = rg.reftable_index(i);
            let present = usize::try_from(block)
                .ok()
                .and_then(|b| self.engine.reftable().get(b))
                .is_some_and(|&e| e & REFT_OFFSET_MASK != 0);
            if !present {
                i = (block + 1).saturating_mul(per_block);
                continue;
            }
            if self.engine.get(&mut self.caches, i).ok()? > 0 {
                count += 1;
            }
            i += 1;
        }
        Some(count >= threshold)
    }

    /// Hints that guest `[offset, offset + len)` will be read soon: the host ranges of its
    /// data clusters are handed to the storage's prefetch (a file starts reading them in
    /// the background), so that a reader can overlap the next request's I/O with this
    /// one's. Unallocated, zero and compressed ranges are skipped; errors are ignored (it
    /// is only a hint).
    pub fn prefetch(&mut self, offset: u64, len: u64) {
        let Ok(extents) = self.map_metadata(offset, len) else {
            return;
        };
        let data = self.data_storage().clone();
        for x in extents {
            if let (crate::ExtentKind::Data, Some(host)) = (x.kind, x.host_offset) {
                data.prefetch(host, x.length);
            }
        }
    }

    /// The run starting at `offset` (at most `len` bytes, clamped to the virtual size) as
    /// QEMU's precise block status reports it: the first extent of [`Image::map`].
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let ext = self.map_precise(offset, len, 1)?;
        let ext = self.without_offsets_if_encrypted(ext);
        Ok(ext.into_iter().next().unwrap_or(Extent {
            offset,
            length: 0,
            kind: ExtentKind::Unallocated,
            host_offset: None,
        }))
    }

    /// Bytes of `[offset, offset + len)` allocated in this image (qemu-io `alloc`).
    pub fn allocated_bytes(&mut self, offset: u64, len: u64) -> Result<u64> {
        Ok(self
            .map_metadata(offset, len)?
            .iter()
            .filter(|e| e.is_allocated())
            .map(|e| e.length)
            .sum())
    }
}
