//! Mapping queries: what each guest range is (data, zero, compressed, unallocated, backing)
//! and where it lives, for `qemu-img map`-style output and block-status helpers.

use crate::error::{Op, Result};
use crate::image::MapKind;
use crate::Image;

/// What a guest range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Guest data in this image (`host_offset` says where).
    Data,
    /// Reads as zeros by metadata (a zero cluster or zero subclusters; `host_offset` is the
    /// preallocated host cluster, if any).
    Zero,
    /// A compressed cluster (no usable host offset).
    Compressed,
    /// Not allocated and no backing file shows through: reads as zeros.
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
    /// Host offset of the first byte (data) or of the preallocated cluster (zero).
    pub host_offset: Option<u64>,
}

impl Extent {
    /// Whether the range is allocated in this image (data, zero or compressed), as
    /// qemu-io's `alloc` counts it.
    pub fn is_allocated(&self) -> bool {
        matches!(
            self.kind,
            ExtentKind::Data | ExtentKind::Zero | ExtentKind::Compressed
        )
    }

    /// Whether the range reads as zeros without reading data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

impl Image {
    /// Maps guest `[offset, offset + len)` to extents, merging neighbours of equal kind
    /// (and contiguous host offsets for data).
    pub fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
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
                MapKind::Zero(h) => (
                    ExtentKind::Zero,
                    h.map(|h| h + self.geo.offset_in_cluster(guest)),
                    c.len,
                ),
                MapKind::Compressed(_) => (ExtentKind::Compressed, None, c.len),
                MapKind::Unallocated(_) => match self.backing.as_ref().map(|b| b.size()) {
                    Some(bs) if guest < bs => (ExtentKind::Backing, None, c.len.min(bs - guest)),
                    _ => (ExtentKind::Unallocated, None, c.len),
                },
            };
            let merged = match out.last_mut() {
                Some(last) if last.kind == kind && last.offset + last.length == guest => {
                    match (kind, last.host_offset, host) {
                        (ExtentKind::Data, Some(a), Some(b)) if a + last.length == b => {
                            last.length += n;
                            true
                        }
                        (ExtentKind::Data, _, _) => false,
                        (ExtentKind::Zero, a, b)
                            if a.is_none() && b.is_none()
                                || a.zip(b).is_some_and(|(a, b)| a + last.length == b) =>
                        {
                            last.length += n;
                            true
                        }
                        (ExtentKind::Zero, _, _) => false,
                        _ => {
                            last.length += n;
                            true
                        }
                    }
                }
                _ => false,
            };
            if !merged {
                out.push(Extent {
                    offset: guest,
                    length: n,
                    kind,
                    host_offset: host,
                });
            }
            pos += n;
        }
        Ok(out)
    }

    /// Hints that guest `[offset, offset + len)` will be read soon: the host ranges of its
    /// data clusters are handed to the storage's prefetch (a file starts reading them in
    /// the background), so that a reader can overlap the next request's I/O with this
    /// one's. Unallocated, zero and compressed ranges are skipped; errors are ignored (it
    /// is only a hint).
    pub fn prefetch(&mut self, offset: u64, len: u64) {
        let Ok(extents) = self.map(offset, len) else {
            return;
        };
        let data = self.data_storage().clone();
        for x in extents {
            if let (crate::ExtentKind::Data, Some(host)) = (x.kind, x.host_offset) {
                data.prefetch(host, x.length);
            }
        }
    }

    /// The kind of the run starting at `offset` and its length (at most `len`), like
    /// QEMU's block status.
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent> {
        let ext = self.map(offset, len.min(self.virtual_size().saturating_sub(offset)))?;
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
            .map(offset, len)?
            .iter()
            .filter(|e| e.is_allocated())
            .map(|e| e.length)
            .sum())
    }
}
