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

/// Compresses one cluster; `None` if the result would not be smaller than `limit` bytes.
pub(crate) fn compress(kind: CompressionType, data: &[u8], limit: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Deflate => {
            // QEMU: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, ...); QEMU's
            // reader inflates with a 4 KiB window, so ours must not reach further back.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(data, 0).ok()?;
            (out.len() < limit).then_some(out)
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
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let op = Op::WriteCompressed;
        self.check_writable(op)?;
        self.check_range(op, offset, data.len() as u64)?;
        let cs = self.geo.cluster_size();
        let at_end = offset + data.len() as u64 == self.virtual_size();
        if !self.geo.is_cluster_aligned(offset)
            || !(data.len() as u64 == cs || (at_end && (data.len() as u64) < cs))
        {
            return Err(ImageError::InvalidArgument {
                op,
                reason: format!(
                    "compressed writes must cover exactly one cluster ({cs} bytes at a cluster \
                     boundary); got {} bytes at {offset:#x}",
                    data.len()
                ),
            });
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let Some(out) = compress(self.compression_type(), &cluster, cs as usize - 1) else {
            return self.write_internal(op, offset, data);
        };
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
        if let Err(e) = self.storage.write_at(&out, host) {
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
    }
}
