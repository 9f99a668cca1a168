//! Block status through a whole backing chain, as QEMU's `bdrv_block_status_above` answers
//! it (for `compare`, `measure`, `dd`), and raw image files as read-only guest disks.

use crate::backing::BackingImage;
use crate::error::{ImageError, Op, Result};
use crate::image::MapKind;
use crate::Image;
use qcow2_io::{FileStorage, Storage};

/// QEMU's block-status flags of a guest run (`BDRV_BLOCK_*`), over the whole chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockStatus {
    /// Guest offset of the run.
    pub offset: u64,
    /// Its length (at least 1 unless the query was empty or beyond the end).
    pub length: u64,
    /// `BDRV_BLOCK_DATA`: data is stored (possibly reading as zeros).
    pub data: bool,
    /// `BDRV_BLOCK_ZERO`: reads as zeros.
    pub zero: bool,
    /// `BDRV_BLOCK_ALLOCATED`: some layer of the chain holds the run.
    pub allocated: bool,
    /// `BDRV_BLOCK_OFFSET_VALID`: the run has a host offset.
    pub offset_valid: bool,
    /// `BDRV_BLOCK_EOF`: the run ends at the end of the image (for a run no layer holds,
    /// possibly the end of the lowest image asked, as QEMU keeps that layer's flag).
    pub eof: bool,
}

impl BlockStatus {
    /// A run of plain data (what a layer that cannot tell reports).
    pub fn data(offset: u64, length: u64) -> Self {
        Self {
            offset,
            length,
            data: true,
            zero: false,
            allocated: true,
            offset_valid: true,
            eof: false,
        }
    }

    /// A run no layer holds and that reads as zeros.
    pub fn unallocated_zero(offset: u64, length: u64) -> Self {
        Self {
            offset,
            length,
            data: false,
            zero: true,
            allocated: false,
            offset_valid: false,
            eof: false,
        }
    }

    /// Whether the run holds data that must be read (QEMU: allocated, data, not zero).
    pub fn needs_read(&self) -> bool {
        !self.zero
    }
}

impl Image {
    /// The block status of the run at `offset` (at most `len` bytes, within the virtual
    /// size) through this image and its backing chain. Runs end at L2-table boundaries,
    /// as QEMU's qcow2 driver answers one L2 slice per query.
    pub fn chain_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus> {
        BackingImage::status_above(self, offset, len)
    }

    /// The status of the run at `offset` from this layer down, with `BDRV_BLOCK_EOF` as the
    /// layer that answered sets it. A length of 0 means `offset` lies beyond this image.
    pub(crate) fn layer_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.virtual_size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(BlockStatus {
                eof: true,
                ..BlockStatus::unallocated_zero(offset, 0)
            });
        }
        // One run of equal kind within one L2 slice, as QEMU's qcow2_get_host_offset
        // answers (compressed clusters one by one, data while host offsets continue).
        let chunk = self.lookup(Op::Map, offset, len)?;
        let n = match chunk.kind {
            MapKind::Zero(_) | MapKind::Unallocated(_) => {
                self.exact_run(offset, chunk.kind, chunk.len)?
            }
            _ => chunk.len,
        };
        let n = n.clamp(1, len);
        let st = match chunk.kind {
            MapKind::Data(host) => {
                if self.metadata_preallocated() {
                    self.file_status(offset, n, host)?
                } else {
                    BlockStatus::data(offset, n)
                }
            }
            MapKind::Compressed(_) => BlockStatus {
                offset_valid: false,
                ..BlockStatus::data(offset, n)
            },
            MapKind::Zero(host) => BlockStatus {
                offset,
                length: n,
                data: false,
                zero: true,
                allocated: true,
                offset_valid: host.is_some(),
                eof: false,
            },
            MapKind::Unallocated(host) => match self.backing.as_mut() {
                Some(b) => {
                    let mut st = b.status(offset, n)?;
                    if st.length == 0 {
                        // Beyond a shorter backing file: zeros that count as allocated
                        // there (QEMU).
                        st = BlockStatus {
                            zero: true,
                            allocated: true,
                            ..BlockStatus::unallocated_zero(offset, n)
                        };
                    }
                    st.length = st.length.min(n);
                    st.offset = offset;
                    return Ok(st);
                }
                // An unallocated subcluster of an allocated cluster (extended L2) still
                // has a host offset (QEMU: QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC).
                None => BlockStatus {
                    offset_valid: host.is_some(),
                    ..BlockStatus::unallocated_zero(offset, n)
                },
            },
        };
        let mut st = st;
        st.eof = offset + st.length == size;
        Ok(st)
    }

    /// The length of the zero or unallocated run at `offset` as QEMU counts it
    /// (`count_contiguous_subclusters`): the lookup merges runs of those kinds across
    /// clusters whether or not they have a host cluster, QEMU keeps plain and allocated
    /// ones apart and wants allocated ones contiguous. `merged` is the lookup's length.
    fn exact_run(&mut self, offset: u64, kind: MapKind, merged: u64) -> Result<u64> {
        let cs = self.geometry().cluster_size();
        let first_cluster = offset / cs;
        let mut n = merged.min((first_cluster + 1) * cs - offset);
        while n < merged {
            let at = offset + n;
            let c = self.lookup(Op::Map, at, (merged - n).min(cs))?;
            let step = (at / cs - first_cluster) * cs;
            let same = match (kind, c.kind) {
                (MapKind::Zero(a), MapKind::Zero(b))
                | (MapKind::Unallocated(a), MapKind::Unallocated(b)) => match (a, b) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.checked_add(step) == Some(b),
                    _ => false,
                },
                _ => false,
            };
            if !same || c.len == 0 {
                break;
            }
            n += c.len;
            if c.len < cs {
                break;
            }
        }
        Ok(n)
    }

    /// The status of data run `[offset, offset + n)` at `host` refined by the file system
    /// (QEMU's `BDRV_BLOCK_RECURSE`): a hole reads as zeros; the run ends where the file's
    /// extent does.
    fn file_status(&mut self, offset: u64, n: u64, host: u64) -> Result<BlockStatus> {
        let io = |e| ImageError::io(Op::Map, "block status of the image file", host, e);
        let mut st = BlockStatus::data(offset, n);
        let (data, run) = self.data_storage().data_status(host, n).map_err(io)?;
        st.zero = !data;
        st.length = run.clamp(1, n.max(1)).min(n);
        Ok(st)
    }
}

/// Reads a raw image's bytes at `offset`: what lies beyond the file (`file_len`, up to
/// the sector-rounded disk size) reads as zeros. Shared by every raw layer (backing
/// files, commit bases).
pub(crate) fn raw_read(
    storage: &dyn Storage,
    file_len: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let avail = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    tail.fill(0);
    if head.is_empty() {
        return Ok(());
    }
    storage
        .read_at(head, offset)
        .map_err(|e| ImageError::io(Op::Read, "read from raw image", offset, e))
}

/// The block status of a raw image of `size` bytes at `offset`: every byte is allocated;
/// host holes (and the tail past the end of the file, up to the sector-rounded size)
/// read as zeros.
pub(crate) fn raw_status(
    storage: &dyn Storage,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<BlockStatus> {
    let len = len.min(size.saturating_sub(offset));
    if len == 0 {
        return Ok(BlockStatus {
            eof: true,
            ..BlockStatus::unallocated_zero(offset, 0)
        });
    }
    let (data, run) = storage
        .data_status(offset, len)
        .map_err(|e| ImageError::io(Op::Map, "block status of raw image", offset, e))?;
    let n = run.clamp(1, len);
    Ok(BlockStatus {
        offset,
        length: n,
        data,
        zero: !data,
        allocated: true,
        offset_valid: true,
        eof: offset + n == size,
    })
}

/// A raw image file as a read-only guest disk: its size rounded up to 512 bytes (as the
/// block layer counts sectors), holes reported by the file system as zero runs.
pub struct RawDisk {
    storage: FileStorage,
    file_len: u64,
    size: u64,
}

impl RawDisk {
    /// Wraps an open file.
    pub fn new(storage: FileStorage) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| ImageError::io(Op::Open, "length of raw image", 0, e))?;
        let size = file_len.checked_next_multiple_of(512).ok_or_else(|| {
            ImageError::io(
                Op::Open,
                "length of raw image",
                0,
                std::io::Error::from_raw_os_error(qcow2_io::errno::EFBIG),
            )
        })?;
        Ok(Self {
            storage,
            file_len,
            size,
        })
    }
}

impl BackingImage for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        raw_read(&self.storage, self.file_len, offset, buf)
    }

    fn status(&mut self, offset: u64, len: u64) -> Result<BlockStatus> {
        raw_status(&self.storage, self.size, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;
    use qcow2_io::MemStorage;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    #[test]
    fn qcow2_runs() {
        let mut o = CreateOptions::new(64 << 20);
        o.cluster_size = 4096;
        let mut img = Image::create(Arc::new(MemStorage::new()), &o).unwrap();
        img.write(0, &[1; 8192]).unwrap();
        img.write_zeroes(8192, 4096, false).unwrap();
        let st = img.chain_status(0, 64 << 20).unwrap();
        assert!(st.data && st.allocated && st.offset_valid && !st.zero);
        assert_eq!(st.length, 8192);
        let st = img.chain_status(8192, 64 << 20).unwrap();
        assert!(st.zero && st.allocated && !st.data);
        let st = img.chain_status(12288, 64 << 20).unwrap();
        assert_eq!(st, BlockStatus::unallocated_zero(12288, st.length));
        // One L2 table of 4 KiB clusters covers 2 MiB: runs stop there.
        assert_eq!(st.length, (2 << 20) - 12288);
        assert_eq!(img.chain_status(64 << 20, 1).unwrap().length, 0);
    }

    #[test]
    fn raw_files_report_holes_and_round_to_sectors() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f.as_file().write_all_at(&[5; 4096], 512 << 10).unwrap();
        f.as_file().set_len((1 << 20) + 100).unwrap();
        let storage = FileStorage::open(f.path(), false).unwrap();
        let mut disk = RawDisk::new(storage).unwrap();
        assert_eq!(disk.size(), (1 << 20) + 512);
        let mut off = 0;
        let mut data = 0;
        while off < disk.size() {
            let st = disk.status(off, disk.size() - off).unwrap();
            assert!(st.length > 0 && st.allocated && st.offset_valid);
            assert_ne!(st.data, st.zero);
            if st.data {
                data += st.length;
            }
            off += st.length;
        }
        assert_eq!(off, disk.size());
        assert!(data >= 4096);
        let mut buf = [9u8; 1024];
        disk.read((1 << 20) - 512, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
