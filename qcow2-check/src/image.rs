//! The image as QEMU's checker sees it after a check-mode open: header, extensions, the
//! active L1 table and the refcount table in memory, plus the snapshot list read by the
//! snapshot-table check. Also QEMU's metadata overlap check over that state.

use std::io;
use std::sync::Arc;

use qcow2_format::bitmap::load_bitmaps;
use qcow2_format::entry::L1E_OFFSET_MASK;
use qcow2_format::extensions::Extensions;
use qcow2_format::features::{AUTOCLEAR_BITMAPS, INCOMPAT_DATA_FILE};
use qcow2_format::header::{open_first_cluster, Header, OpenOptions};
use qcow2_format::limits::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use qcow2_format::refcount::REFT_OFFSET_MASK;
use qcow2_format::{Geometry, RefcountCodec, SnapshotEntry};
use qcow2_io::Storage;

use crate::io::{be64_words, pread, pwrite_sync};
use crate::CheckError;

/// Offset of `incompatible_features` in the header.
pub(crate) const INCOMPAT_OFFSET: u64 = 72;
/// Offset of `refcount_table_offset` in the header.
pub(crate) const REFTABLE_POINTER_OFFSET: u64 = 48;
/// Offset of `nb_snapshots` in the header (followed by `snapshots_offset`).
pub(crate) const SNAPSHOT_POINTER_OFFSET: u64 = 60;

/// The overlap-check bits of QEMU's default "cached" template, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ol {
    MainHeader,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    BitmapDirectory,
}

impl Ol {
    /// QEMU's name for the structure in "Preventing invalid write on metadata".
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ol::MainHeader => "qcow2_header",
            Ol::ActiveL1 => "active L1 table",
            Ol::ActiveL2 => "active L2 table",
            Ol::RefcountTable => "refcount table",
            Ol::RefcountBlock => "refcount block",
            Ol::SnapshotTable => "snapshot table",
            Ol::InactiveL1 => "inactive L1 table",
            Ol::InactiveL2 => "inactive L2 table",
            Ol::BitmapDirectory => "bitmap directory",
        }
    }
}

/// One snapshot as the checker needs it: the entry (for rewriting the table) and its id and
/// name as QEMU prints them (C strings: up to the first NUL).
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) entry: SnapshotEntry,
    pub(crate) id: String,
    pub(crate) name: String,
}

/// The open image.
pub(crate) struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) header: Header,
    pub(crate) ext: Extensions,
    pub(crate) geo: Geometry,
    pub(crate) codec: RefcountCodec,
    pub(crate) cs: u64,
    pub(crate) bits: u32,
    /// The active L1 table (QEMU's `s->l1_table`).
    pub(crate) l1: Vec<u64>,
    /// Raw refcount-table entries (QEMU's `s->refcount_table`).
    pub(crate) reftable: Vec<u64>,
    pub(crate) reftable_offset: u64,
    pub(crate) has_data_file: bool,
    /// The snapshot list of the current check run.
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshots_offset: u64,
    pub(crate) snapshots_size: u64,
    /// QEMU's `bs->total_sectors * 512`.
    pub(crate) virtual_size: u64,
}

impl Image {
    /// Opens the image in check mode (`BDRV_O_CHECK`, read-write when repairing): QEMU's
    /// open-time validation without the checks that check mode skips. With `writable`,
    /// unknown autoclear bits are cleared on disk as QEMU's read-write open does.
    pub(crate) fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Self, CheckError> {
        let mut head = [0u8; 24];
        pread(&*storage, &mut head, 0).map_err(CheckError::Io)?;
        let cb = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        // Only a valid cluster size reads a whole cluster; otherwise the header parser
        // reports the bad value from the first bytes.
        let first_len = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
            1usize << cb
        } else {
            4096
        };
        let mut first = vec![0u8; first_len];
        pread(&*storage, &mut first, 0).map_err(CheckError::Io)?;
        let opts = OpenOptions {
            read_write: writable,
            check_mode: true,
        };
        let mut fc = open_first_cluster(&first, &opts)?;
        let geo = fc.header.geometry().map_err(CheckError::Geometry)?;
        let cs = geo.cluster_size();
        let bits = geo.cluster_bits();

        // Both sizes are validated by open_first_cluster (32 MiB and 8 MiB at most).
        let l1_bytes = u64::from(fc.header.l1_size) * 8;
        let mut l1_buf = vec![0u8; l1_bytes as usize];
        if l1_bytes > 0 {
            pread(&*storage, &mut l1_buf, fc.header.l1_table_offset)
                .map_err(|e| CheckError::Read("Could not read L1 table", e))?;
        }
        let rt_bytes = u64::from(fc.header.refcount_table_clusters) * cs;
        let mut rt_buf = vec![0u8; rt_bytes as usize];
        if rt_bytes > 0 {
            pread(&*storage, &mut rt_buf, fc.header.refcount_table_offset)
                .map_err(|e| CheckError::Read("Could not read refcount table", e))?;
        }
        // QEMU's read-write open (check mode included) rewrites the whole header
        // (`qcow2_update_header`) when it clears unknown autoclear bits or drops a bitmaps
        // extension that lost its autoclear bit: the same first cluster as QEMU writes
        // (its own feature table, unknown extensions in its order, no stale extension).
        let cleared = writable && fc.header.version >= 3 && fc.header.clear_unknown_autoclear();
        if writable && (cleared || fc.extensions.stale_bitmaps) {
            let bytes = fc.to_bytes().map_err(|e| {
                CheckError::Read(
                    "Could not update qcow2 header",
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                )
            })?;
            pwrite_sync(&*storage, &bytes, 0)
                .map_err(|e| CheckError::Read("Could not update qcow2 header", e))?;
            fc.extensions.stale_bitmaps = false;
        }
        let header = fc.header;
        let has_data_file = header.incompatible_features & INCOMPAT_DATA_FILE != 0;
        let virtual_size = header.size & !511;
        if let Some(b) = fc.extensions.bitmaps {
            if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
                let mut read = |offset: u64, buf: &mut [u8]| pread(&*storage, buf, offset);
                load_bitmaps(
                    b.nb_bitmaps,
                    b.directory_offset,
                    b.directory_size,
                    cs,
                    virtual_size,
                    &mut read,
                )?;
            }
        }
        Ok(Self {
            reftable_offset: header.refcount_table_offset,
            codec: RefcountCodec::for_geometry(&geo),
            storage,
            ext: fc.extensions,
            geo,
            cs,
            bits,
            l1: be64_words(&l1_buf),
            reftable: be64_words(&rt_buf),
            has_data_file,
            snapshots: Vec::new(),
            snapshots_offset: header.snapshots_offset,
            snapshots_size: 0,
            virtual_size,
            header,
        })
    }

    /// Current length of the image file.
    pub(crate) fn file_len(&self) -> io::Result<u64> {
        self.storage.len()
    }

    /// QEMU's `size_to_clusters`.
    pub(crate) fn size_to_clusters(&self, bytes: u64) -> u64 {
        (bytes >> self.bits) + u64::from(bytes & (self.cs - 1) != 0)
    }

    /// Number of entries of an L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.geo.l2_entries()
    }

    /// QEMU's `qcow2_check_metadata_overlap` with the default "cached" template (every
    /// structure except inactive L2 tables), ignoring the structures in `ign`. Returns the
    /// first structure `[offset, offset + size)` would overwrite.
    pub(crate) fn overlap(&self, ign: &[Ol], offset: u64, size: u64) -> Option<Ol> {
        if size == 0 {
            return None;
        }
        let chk = |o: Ol| !ign.contains(&o);
        if chk(Ol::MainHeader) && offset < self.cs {
            return Some(Ol::MainHeader);
        }
        let in_cluster = offset & (self.cs - 1);
        let size = (in_cluster + size)
            .div_ceil(self.cs)
            .saturating_mul(self.cs);
        let offset = offset & !(self.cs - 1);
        let hits = |ofs: u64, sz: u64| -> bool {
            if sz == 0 {
                return false;
            }
            // ranges_overlap on inclusive last bytes, in wrapping arithmetic like C.
            let last1 = offset.wrapping_add(size).wrapping_sub(1);
            let last2 = ofs.wrapping_add(sz).wrapping_sub(1);
            !(last2 < offset || last1 < ofs)
        };
        if chk(Ol::ActiveL1)
            && !self.l1.is_empty()
            && hits(self.header.l1_table_offset, self.l1.len() as u64 * 8)
        {
            return Some(Ol::ActiveL1);
        }
        if chk(Ol::RefcountTable)
            && !self.reftable.is_empty()
            && hits(self.reftable_offset, self.reftable.len() as u64 * 8)
        {
            return Some(Ol::RefcountTable);
        }
        if chk(Ol::SnapshotTable)
            && self.snapshots_size != 0
            && hits(self.snapshots_offset, self.snapshots_size)
        {
            return Some(Ol::SnapshotTable);
        }
        if chk(Ol::InactiveL1) {
            for sn in &self.snapshots {
                let sz = u64::from(sn.entry.l1_size) * 8;
                if sz != 0 && hits(sn.entry.l1_table_offset, sz) {
                    return Some(Ol::InactiveL1);
                }
            }
        }
        if chk(Ol::ActiveL2) {
            for &e in &self.l1 {
                let o = e & L1E_OFFSET_MASK;
                if o != 0 && hits(o, self.cs) {
                    return Some(Ol::ActiveL2);
                }
            }
        }
        if chk(Ol::RefcountBlock) {
            for &e in &self.reftable {
                let o = e & REFT_OFFSET_MASK;
                if o != 0 && hits(o, self.cs) {
                    return Some(Ol::RefcountBlock);
                }
            }
        }
        if chk(Ol::BitmapDirectory) && self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            if let Some(b) = &self.ext.bitmaps {
                if hits(b.directory_offset, b.directory_size) {
                    return Some(Ol::BitmapDirectory);
                }
            }
        }
        None
    }
}
