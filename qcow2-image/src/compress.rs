//! Compressed clusters: raw deflate (no zlib header, 4 KiB window, as QEMU writes) and zstd,
//! reading and whole-cluster compressed writes through the byte allocator.

use crate::error::{ImageError, Op, Result};
use crate::Image;
use qcow2_cache::CacheId;
use qcow2_format::compressed::CompressedFormat;
use qcow2_format::features::CompressionType;
use qcow2_format::{ClusterType, L2Entry};
use qcow2_io::Event;
use qcow2_refcount::DiscardType;
use std::io::Read;

/// Compresses one guest cluster for a compressed write (QEMU's `qcow2_co_compress` as
/// `qcow2_co_pwritev_compressed_part` calls it): `data` is padded with zeros to
/// `cluster_size` bytes (a short last cluster of the image) and compressed with
/// `compression_type` (raw deflate with a 4 KiB window, as QEMU's reader expects, or zstd).
/// Returns `None` when compression does not pay, that is when the result does not fit in
/// `cluster_size - 1` bytes: QEMU then writes the cluster uncompressed, and so must the
/// caller ([`Image::write`]). Also `None` for an invalid `cluster_size` (not a power of two
/// in 512 ..= 2 MiB) or `data` longer than a cluster.
///
/// Pure and thread-safe (no image state): a converter compresses clusters on several
/// threads, then hands the results to [`Image::write_compressed_prepared`] **in guest
/// order** on the thread that owns the image, so that the byte allocator packs them exactly
/// as a sequential `qemu-img convert -c` would.
pub fn compress_cluster(
    compression_type: CompressionType,
    cluster_size: u64,
    data: &[u8],
) -> Option<Vec<u8>> {
    if !cluster_size.is_power_of_two()
        || !(512..=(2 << 20)).contains(&cluster_size)
        || data.len() as u64 > cluster_size
    {
        return None;
    }
    let cs = cluster_size as usize;
    if data.len() == cs {
        compress(compression_type, data, cs - 1)
    } else {
        let mut cluster = data.to_vec();
        cluster.resize(cs, 0);
        compress(compression_type, &cluster, cs - 1)
    }
}

/// Compresses `data`; `None` if the result does not fit in `max_out` bytes (QEMU: the
/// output buffer is `max_out` bytes and a stream that does not end in it is -ENOMEM).
pub(crate) fn compress(kind: CompressionType, data: &[u8], max_out: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Deflate => {
            // QEMU: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, ...); QEMU's
            // reader inflates with a 4 KiB window, so ours must not reach further back.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(max_out);
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() <= max_out => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(data, 0).ok()?;
            (out.len() <= max_out).then_some(out)
        }
    }
}

/// Decompresses into exactly `out.len()` bytes (QEMU requires the output to fill the
/// cluster; trailing input belongs to the next compressed cluster or is padding).
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(s) => Err(format!(
                    "inflate produced {} of {} bytes ({s:?})",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("inflate failed: {e}")),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            dec.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}

impl Image {
    /// Decompresses the cluster described by the compressed entry `e` (cached: the last
    /// cluster decompressed is kept).
    pub(crate) fn decompress_cluster(&mut self, op: Op, guest: u64, e: L2Entry) -> Result<&[u8]> {
        let cs = self.geo.cluster_size() as usize;
        let hit = matches!(&self.decompressed, Some((w, _)) if *w == e.raw_entry());
        if !hit {
            let fmt = CompressedFormat::for_geometry(&self.geo);
            let d = fmt.decode(e).map_err(|err| ImageError::Decompress {
                op,
                guest_offset: guest,
                host_offset: 0,
                reason: err.to_string(),
            })?;
            let host = d.host_offset();
            let csize = d.compressed_size() as usize;
            let mut input = vec![0u8; csize];
            self.storage.event(Event::ReadCompressed);
            self.storage
                .read_at(&mut input, host)
                .map_err(|err| ImageError::io(op, "read compressed data", host, err))?;
            let mut out = vec![0u8; cs];
            decompress(self.compression_type(), &input, &mut out).map_err(|reason| {
                ImageError::Decompress {
                    op,
                    guest_offset: guest - self.geo.offset_in_cluster(guest),
                    host_offset: host,
                    reason,
                }
            })?;
            self.decompressed = Some((e.raw_entry(), out));
        }
        Ok(self
            .decompressed
            .as_ref()
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[]))
    }

    /// Writes one whole cluster compressed (what `qemu-img convert -c` does). `offset` must be
    /// cluster aligned and `data` one cluster long (shorter only for the last cluster of an
    /// image whose size is not a cluster multiple; it is padded with zeros). Data that does
    /// not compress is written as a normal cluster, as QEMU does. An existing cluster at
    /// `offset` is replaced (its clusters freed after the new entry is linked).
    ///
    /// This is [`compress_cluster`] followed by [`Image::write_compressed_prepared`] (or
    /// [`Image::write`] when compression does not pay).
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let op = Op::WriteCompressed;
        self.check_writable(op)?;
        self.check_compressed_target(op, offset, data.len() as u64)?;
        self.track_change(op, offset, data.len() as u64)?;
        match compress_cluster(self.compression_type(), self.geo.cluster_size(), data) {
            Some(out) => self.link_compressed(op, offset, &out),
            None => self.write_internal(op, offset, data),
        }
    }

    /// Writes an already compressed cluster at guest `offset` (cluster aligned, inside the
    /// image): `compressed` is what [`compress_cluster`] returned for this image's
    /// [`Image::compression_type`] and cluster size (1 ..= cluster_size - 1 bytes). Only
    /// metadata work happens here: the bytes are placed by the byte allocator (packed after
    /// the previous compressed cluster, QEMU's `qcow2_alloc_bytes`), written, and linked
    /// into the L2 table with a compressed descriptor; whatever the entry referenced before
    /// is freed afterwards.
    ///
    /// For a parallel `convert -c`: compress on worker threads with [`compress_cluster`],
    /// then call this (or [`Image::write`] with the raw data when it returned `None`) on the
    /// image's thread in increasing guest order; the result is byte-identical to a
    /// sequential conversion. The bytes are not validated beyond their length: data that
    /// does not decompress to one cluster makes reads of that cluster fail.
    ///
    /// Crash safety (invariants 1 and 3): the refcount of the new bytes is recorded before
    /// the L2 cache may be written (dependency), the data is durable before the descriptor
    /// (flush dependency); a failed data write gives the bytes back.
    pub fn write_compressed_prepared(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
        let op = Op::WriteCompressed;
        self.check_writable(op)?;
        let cs = self.geo.cluster_size();
        let len = self.virtual_size().saturating_sub(offset).min(cs);
        self.check_compressed_target(op, offset, len.max(1))?;
        self.track_change(op, offset, len)?;
        if compressed.is_empty() || compressed.len() as u64 >= cs {
            return Err(ImageError::InvalidArgument {
                op,
                reason: format!(
                    "a compressed cluster must be 1 to {} bytes; got {}",
                    cs - 1,
                    compressed.len()
                ),
            });
        }
        self.link_compressed(op, offset, compressed)
    }

    /// The target rules of a compressed write: cluster aligned, one cluster (or the short
    /// last cluster of the image).
    fn check_compressed_target(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        self.check_range(op, offset, len)?;
        if self.data.is_some() {
            // QEMU: "Compression is not supported with external data files" (ENOTSUP).
            return Err(ImageError::Refused {
                op,
                message: "Compression is not supported with external data files".into(),
                hint: None,
                errno: crate::error::ENOTSUP,
            });
        }
        if self.crypto.is_some() {
            // QEMU 10 stores compressed clusters of encrypted images unencrypted; we never
            // write guest data in the clear.
            return Err(ImageError::Refused {
                op,
                message: "Compression is not supported with encrypted images".into(),
                hint: None,
                errno: crate::error::ENOTSUP,
            });
        }
        let cs = self.geo.cluster_size();
        let at_end = offset.checked_add(len) == Some(self.virtual_size());
        if !self.geo.is_cluster_aligned(offset) || !(len == cs || (at_end && len < cs)) {
            return Err(ImageError::InvalidArgument {
                op,
                reason: format!(
                    "compressed writes must cover exactly one cluster ({cs} bytes at a cluster \
                     boundary); got {len} bytes at {offset:#x}"
                ),
            });
        }
        Ok(())
    }

    /// Allocates bytes for `out`, writes them and links the descriptor at `offset`.
    fn link_compressed(&mut self, op: Op, offset: u64, out: &[u8]) -> Result<()> {
        let l2_offset = self.l2_for_write(op, offset)?;
        let l2_index = self.geo.l2_index(offset);
        let len = out.len() as u64;
        let host = match self
            .alloc
            .alloc_bytes(&mut self.engine, &mut self.caches, len)
        {
            Ok(h) => h,
            Err(e) => return Err(self.alloc_err(op, e)),
        };
        self.sync_overlap_refcounts();
        let fmt = CompressedFormat::for_geometry(&self.geo);
        let entry = match fmt.encode(host, len) {
            Ok(e) => e,
            Err(e) => {
                let _ = self
                    .engine
                    .free_clusters(&mut self.caches, host, len, DiscardType::Never);
                self.alloc.reset_byte_offset();
                return Err(ImageError::InvalidArgument {
                    op,
                    reason: e.to_string(),
                });
            }
        };
        if let Err(e) = self.overlap.check(host, len, 0) {
            return Err(self.corruption(op, true, e.to_string()));
        }
        self.storage.event(Event::WriteCompressed);
        if let Err(e) = self.storage.write_at(out, host) {
            // Invariant 3: the bytes were never referenced.
            let _ = self
                .engine
                .free_clusters(&mut self.caches, host, len, DiscardType::Never);
            self.alloc.reset_byte_offset();
            return Err(ImageError::io(op, "write compressed data", host, e));
        }
        // The descriptor never reaches the disk before the data; `alloc_bytes` already made
        // the L2 cache depend on the refcount cache.
        self.caches.set_depends_on_flush(CacheId::L2);
        self.storage.event(Event::L2UpdateCompressed);
        let (h, idx) = self.get_slice(op, l2_offset, l2_index)?;
        let old = self.slice_entry(&h, idx);
        self.set_slice_entry(&h, idx, entry);
        self.put(op, h)?;
        if matches!(
            old.cluster_type(self.ctx),
            ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
        ) {
            self.free_entries(op, &[old], DiscardType::Never);
        }
        // Freed compressed bytes may be reused with an identical descriptor.
        self.decompressed = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let c = compress(kind, &data, 65535).unwrap();
            // Trailing garbage after the stream (the next compressed cluster) is ignored.
            let mut input = c.clone();
            input.extend_from_slice(&[0xab; 700]);
            let mut out = vec![0u8; 65536];
            decompress(kind, &input, &mut out).unwrap();
            assert_eq!(out, data);
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &noise, 4095).is_none());
        assert!(compress_cluster(CompressionType::Zstd, 4096, &noise).is_none());
        assert!(compress_cluster(CompressionType::Zstd, 4096, &[0u8; 4097]).is_none());
        assert!(compress_cluster(CompressionType::Zstd, 1000, &[0u8; 10]).is_none());
        // A short last cluster is padded with zeros.
        let c = compress_cluster(CompressionType::Deflate, 4096, &[1u8; 100]).unwrap();
        let mut out = vec![9u8; 4096];
        decompress(CompressionType::Deflate, &c, &mut out).unwrap();
        assert_eq!(&out[..100], &[1u8; 100]);
        assert!(out[100..].iter().all(|&b| b == 0));
    }
}
