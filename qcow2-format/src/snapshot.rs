//! Snapshot-table entries (qcow2 v2 and v3) and the snapshot table.
//!
//! The table is `nb_snapshots` variable-length entries stored contiguously at
//! `snapshots_offset` (cluster aligned), each starting at an 8-byte boundary:
//! a 40-byte fixed part, `extra_data_size` bytes of extra data (QEMU knows the first 24:
//! `vm_state_size_large`, `disk_size`, `icount`), the id string and the name, without NULs.
//!
//! Reading follows QEMU's `qcow2_do_read_snapshots`, including its repair mode (`qemu-img
//! check -r all`); writing follows `qcow2_write_snapshots`, so a table written here is what
//! QEMU would write for the same snapshots. Ids and names are kept as raw bytes so that a
//! table round-trips even when they are not UTF-8.
//!
//! Positions are relative to the start of the table. Because the table is cluster aligned,
//! aligning relative positions to 8 is the same as QEMU aligning absolute file offsets.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::limits::{
    MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA, SNAPSHOT_ENTRY_FIXED_SIZE,
};

/// Size of the extra data QEMU knows and always writes: `vm_state_size_large`, `disk_size`
/// and `icount` (QEMU's `sizeof(QCowSnapshotExtraData)`).
pub const SNAPSHOT_KNOWN_EXTRA_DATA: u32 = 24;
/// Smallest extra data a v3 entry must carry (`vm_state_size_large` and `disk_size`).
pub const SNAPSHOT_V3_MIN_EXTRA_DATA: u32 = 16;
/// The `icount` value meaning "icount was disabled" (QEMU's `-1ULL`), also QEMU's default
/// when an entry's extra data does not contain the field.
pub const ICOUNT_DISABLED: u64 = u64::MAX;

/// Errors of the snapshot-table codec; each names the entry it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// More snapshots than QEMU supports (65536).
    #[error("Too many snapshots ({nb_snapshots} > {max})", max = MAX_SNAPSHOTS)]
    TooManySnapshots {
        /// The rejected count.
        nb_snapshots: u64,
    },
    /// An entry with more than 1024 bytes of extra data (QEMU: EFBIG; `check -r all`
    /// truncates it).
    #[error("Too much extra metadata in snapshot table entry {index} ({extra_data_size} > {max})", max = MAX_SNAPSHOT_EXTRA_DATA)]
    TooMuchExtraData {
        /// Index of the entry.
        index: u32,
        /// Its extra-data size.
        extra_data_size: u64,
    },
    /// The table grows beyond 64 MiB at entry `index` (QEMU: EFBIG; `check -r all` drops the
    /// overhanging snapshots).
    #[error("Snapshot table is too big (at entry {index}, {overhanging} overhanging snapshots)")]
    TableTooBig {
        /// First entry that does not fit.
        index: u32,
        /// Number of snapshots from `index` to the end.
        overhanging: u32,
    },
    /// The bytes end before entry `index` does.
    #[error("snapshot table entry {index} is truncated: it needs {needed} bytes of the table, only {available} are available")]
    Truncated {
        /// Index of the entry.
        index: u32,
        /// Table length needed to hold the entry (or its fixed part).
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A v3 entry with less than 16 bytes of extra data (a corruption for QEMU's checker).
    #[error("snapshot table entry {index} is incomplete (extra_data_size {extra_data_size} < {min})", min = SNAPSHOT_V3_MIN_EXTRA_DATA)]
    Incomplete {
        /// Index of the entry.
        index: u32,
        /// Its extra-data size.
        extra_data_size: u32,
    },
    /// An id or name longer than the 16-bit size field allows.
    #[error("snapshot table entry {index}: {field} is {len} bytes, more than 65535")]
    StringTooLong {
        /// Index of the entry.
        index: u32,
        /// `"id"` or `"name"`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A position that cannot be aligned or addressed.
    #[error("snapshot table position {pos} is out of range")]
    Position {
        /// The rejected position.
        pos: usize,
    },
}

/// The 40-byte fixed part of a snapshot-table entry, as on disk (big-endian).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawSnapshotHeader {
    /// Offset of the snapshot's L1 table copy (cluster aligned).
    pub l1_table_offset: U64,
    /// Number of entries in that L1 table.
    pub l1_size: U32,
    /// Length of the id string.
    pub id_str_size: U16,
    /// Length of the name.
    pub name_size: U16,
    /// Creation time, seconds.
    pub date_sec: U32,
    /// Creation time, nanoseconds.
    pub date_nsec: U32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: U64,
    /// VM state size, 32-bit (0 when it does not fit; the extra data has the full value).
    pub vm_state_size: U32,
    /// Size of the extra data that follows.
    pub extra_data_size: U32,
}

impl RawSnapshotHeader {
    /// Bytes of the entry after the fixed part: extra data, id and name (without padding).
    /// Useful to read an entry incrementally: read 40 bytes, then this many more.
    pub fn variable_len(&self) -> u64 {
        u64::from(self.extra_data_size.get())
            + u64::from(self.id_str_size.get())
            + u64::from(self.name_size.get())
    }
}

// The fixed part must be exactly what the spec says.
const _: () =
    assert!(core::mem::size_of::<RawSnapshotHeader>() as u64 == SNAPSHOT_ENTRY_FIXED_SIZE);

/// One snapshot, as QEMU holds it in memory (`QCowSnapshot`).
///
/// `vm_state_size`, `disk_size` and `icount` are the effective values: from the extra data
/// when present, else QEMU's defaults. `extra_data_size` is the size read from disk (or 24 for
/// a new snapshot); the size written is `24 + unknown_extra_data.len()`, which equals QEMU's
/// `MAX(24, extra_data_size)` for every entry this module parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table copy.
    pub l1_table_offset: u64,
    /// Number of entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The id string, raw bytes (QEMU writes decimal numbers).
    pub id: Vec<u8>,
    /// The name, raw bytes (names need not be unique).
    pub name: Vec<u8>,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes (0 for disk-only snapshots such as qemu-img's).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time.
    pub disk_size: u64,
    /// Instruction count at snapshot time, or [`ICOUNT_DISABLED`].
    pub icount: u64,
    /// Extra-data size as read (24 for a new entry; capped at 1024 by repair).
    pub extra_data_size: u32,
    /// Extra data beyond the 24 known bytes, preserved byte for byte.
    pub unknown_extra_data: Vec<u8>,
}

impl SnapshotEntry {
    /// A new snapshot as `qemu-img snapshot -c` records it: no VM state, guest clock 0,
    /// icount 0 (the system emulator would record [`ICOUNT_DISABLED`] or a real count),
    /// 24 bytes of extra data. Set the date fields from the wall clock.
    pub fn new(
        id: impl Into<Vec<u8>>,
        name: impl Into<Vec<u8>>,
        l1_table_offset: u64,
        l1_size: u32,
        disk_size: u64,
    ) -> Self {
        Self {
            l1_table_offset,
            l1_size,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size,
            icount: 0,
            extra_data_size: SNAPSHOT_KNOWN_EXTRA_DATA,
            unknown_extra_data: Vec::new(),
        }
    }

    /// The id as text, if it is UTF-8.
    pub fn id_str(&self) -> Option<&str> {
        core::str::from_utf8(&self.id).ok()
    }

    /// The name as text, if it is UTF-8.
    pub fn name_str(&self) -> Option<&str> {
        core::str::from_utf8(&self.name).ok()
    }

    /// The instruction count, or `None` if icount was disabled.
    pub fn icount_value(&self) -> Option<u64> {
        if self.icount == ICOUNT_DISABLED {
            None
        } else {
            Some(self.icount)
        }
    }

    /// Whether the entry has the 16 bytes of extra data every v3 entry needs.
    pub fn is_complete_v3(&self) -> bool {
        self.extra_data_size >= SNAPSHOT_V3_MIN_EXTRA_DATA
    }

    /// Extra-data size this entry is written with: the known 24 bytes plus the unknown ones.
    pub fn written_extra_data_size(&self) -> u64 {
        u64::from(SNAPSHOT_KNOWN_EXTRA_DATA) + self.unknown_extra_data.len() as u64
    }

    /// Length of the entry as written, without the padding to the next entry.
    pub fn encoded_len(&self) -> u64 {
        SNAPSHOT_ENTRY_FIXED_SIZE
            + self.written_extra_data_size()
            + self.id.len() as u64
            + self.name.len() as u64
    }

    /// Checks that the entry can be written: strings fit their 16-bit sizes, extra data
    /// within QEMU's 1024-byte limit (so QEMU can read it back). `index` is for the report.
    pub fn check_writable(&self, index: u32) -> Result<(), SnapshotError> {
        for (field, len) in [("id", self.id.len()), ("name", self.name.len())] {
            if len > usize::from(u16::MAX) {
                return Err(SnapshotError::StringTooLong { index, field, len });
            }
        }
        let extra = self.written_extra_data_size();
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(SnapshotError::TooMuchExtraData {
                index,
                extra_data_size: extra,
            });
        }
        Ok(())
    }

    /// Appends the entry exactly as QEMU writes it (no leading or trailing padding): the
    /// 32-bit `vm_state_size` is 0 when the size does not fit, so that older readers treat it
    /// as a disk-only snapshot rather than truncating the VM state; the extra data is always
    /// at least the 24 known bytes.
    pub fn write_to(&self, index: u32, out: &mut Vec<u8>) -> Result<(), SnapshotError> {
        self.check_writable(index)?;
        // check_writable bounds every size below, so the narrowing casts are lossless.
        let header = RawSnapshotHeader {
            l1_table_offset: U64::new(self.l1_table_offset),
            l1_size: U32::new(self.l1_size),
            id_str_size: U16::new(self.id.len() as u16),
            name_size: U16::new(self.name.len() as u16),
            date_sec: U32::new(self.date_sec),
            date_nsec: U32::new(self.date_nsec),
            vm_clock_nsec: U64::new(self.vm_clock_nsec),
            vm_state_size: U32::new(u32::try_from(self.vm_state_size).unwrap_or(0)),
            extra_data_size: U32::new(self.written_extra_data_size() as u32),
        };
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.to_be_bytes());
        out.extend_from_slice(&self.icount.to_be_bytes());
        out.extend_from_slice(&self.unknown_extra_data);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        Ok(())
    }
}

/// How to read a snapshot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotReadOptions {
    /// The image's current virtual size: the `disk_size` of entries that do not record one.
    pub virtual_size: u64,
    /// QEMU's repair mode (`qemu-img check -r all`): truncate extra data above 1024 bytes and
    /// drop snapshots beyond the table-size limit instead of failing.
    pub repair: bool,
}

/// One entry parsed at a position of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSnapshotEntry {
    /// The entry.
    pub entry: SnapshotEntry,
    /// Where it starts (the requested position rounded up to 8).
    pub start: usize,
    /// One past its last byte (unpadded; the next entry starts at `end` rounded up to 8).
    pub end: usize,
    /// Whether repair mode truncated its extra data to 1024 bytes.
    pub extra_data_truncated: bool,
}

impl ParsedSnapshotEntry {
    /// The entry's length including padding to the next 8-byte boundary.
    pub fn padded_len(&self) -> usize {
        align8(self.end).unwrap_or(self.end) - self.start
    }
}

/// `pos` rounded up to a multiple of 8.
fn align8(pos: usize) -> Option<usize> {
    pos.checked_add(7).map(|p| p & !7)
}

/// The fixed part of entry `index` at `start` (already 8-aligned).
fn read_header(table: &[u8], start: usize, index: u32) -> Result<RawSnapshotHeader, SnapshotError> {
    let truncated = SnapshotError::Truncated {
        index,
        needed: (start as u64).saturating_add(SNAPSHOT_ENTRY_FIXED_SIZE),
        available: table.len() as u64,
    };
    let rest = table.get(start..).ok_or(truncated.clone())?;
    RawSnapshotHeader::read_from_prefix(rest)
        .map(|(h, _)| h)
        .map_err(|_| truncated)
}

/// Parses snapshot-table entry `index` at position `pos` (rounded up to 8 as QEMU does) of
/// `table`, whose first byte is at the table's cluster-aligned start.
///
/// Too much extra data is an error unless `opts.repair`, which keeps the first 1024 bytes
/// (like QEMU) and sets `extra_data_truncated`. The table-size limit is a property of the
/// whole table and is checked by [`parse_snapshot_table`].
pub fn parse_snapshot_entry(
    table: &[u8],
    pos: usize,
    index: u32,
    opts: &SnapshotReadOptions,
) -> Result<ParsedSnapshotEntry, SnapshotError> {
    let start = align8(pos).ok_or(SnapshotError::Position { pos })?;
    let available = table.len() as u64;
    let truncated = |needed: u64| SnapshotError::Truncated {
        index,
        needed,
        available,
    };
    let h = read_header(table, start, index)?;
    let fixed_end = start as u64 + SNAPSHOT_ENTRY_FIXED_SIZE;

    let extra_data_size = h.extra_data_size.get();
    let mut extra_data_truncated = false;
    if u64::from(extra_data_size) > MAX_SNAPSHOT_EXTRA_DATA {
        if !opts.repair {
            return Err(SnapshotError::TooMuchExtraData {
                index,
                extra_data_size: u64::from(extra_data_size),
            });
        }
        extra_data_truncated = true;
    }
    let end = fixed_end + h.variable_len();
    if end > available {
        return Err(truncated(end));
    }
    // Everything up to `end` is inside `table` now; `end` fits in usize.
    let body = table
        .get(fixed_end as usize..end as usize)
        .ok_or(truncated(end))?;
    let (extra, strings) = body.split_at(extra_data_size as usize);

    let field = |at: usize| -> Option<u64> {
        let b: [u8; 8] = extra.get(at..at + 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    };
    let known = (SNAPSHOT_KNOWN_EXTRA_DATA as usize).min(extra.len());
    let kept = if extra_data_truncated {
        MAX_SNAPSHOT_EXTRA_DATA as usize
    } else {
        extra.len()
    };
    let unknown_extra_data = extra.get(known..kept).unwrap_or_default().to_vec();
    let (id, name) = strings.split_at(usize::from(h.id_str_size.get()));

    let entry = SnapshotEntry {
        l1_table_offset: h.l1_table_offset.get(),
        l1_size: h.l1_size.get(),
        id: id.to_vec(),
        name: name.to_vec(),
        date_sec: h.date_sec.get(),
        date_nsec: h.date_nsec.get(),
        vm_clock_nsec: h.vm_clock_nsec.get(),
        vm_state_size: field(0).unwrap_or(u64::from(h.vm_state_size.get())),
        disk_size: field(8).unwrap_or(opts.virtual_size),
        icount: field(16).unwrap_or(ICOUNT_DISABLED),
        extra_data_size: if extra_data_truncated {
            MAX_SNAPSHOT_EXTRA_DATA as u32
        } else {
            extra_data_size
        },
        unknown_extra_data,
    };
    Ok(ParsedSnapshotEntry {
        entry,
        start,
        end: end as usize,
        extra_data_truncated,
    })
}

/// The snapshots of an image, in table order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SnapshotTable {
    /// The entries.
    pub entries: Vec<SnapshotEntry>,
}

/// The result of reading a snapshot table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotTableRead {
    /// The snapshots kept.
    pub table: SnapshotTable,
    /// Bytes the kept entries occupy on disk, from the table start to the unpadded end of
    /// the last kept entry (QEMU's `snapshots_size`: what to free when replacing the table).
    pub size: u64,
    /// Snapshots dropped by repair mode (over 65536, or beyond the 64 MiB limit). The header's
    /// `nb_snapshots` must be reduced by this many; their clusters become leaks.
    pub discarded_snapshots: u32,
    /// Entries whose extra data repair mode truncated to 1024 bytes (the table must be
    /// rewritten).
    pub truncated_extra_data: Vec<u32>,
}

/// Reads a snapshot table of `nb_snapshots` entries from `table` (its first byte at the
/// cluster-aligned `snapshots_offset`), with QEMU's limits: at most 65536 snapshots, at most
/// 1024 bytes of extra data per entry, at most 64 MiB in total (counted with alignment
/// padding, and with the truncated extra-data size in repair mode, as QEMU counts).
///
/// Parsing allocates at most what the table bytes and those limits allow.
pub fn parse_snapshot_table(
    table: &[u8],
    nb_snapshots: u32,
    opts: &SnapshotReadOptions,
) -> Result<SnapshotTableRead, SnapshotError> {
    let mut read = SnapshotTableRead::default();
    let mut nb = nb_snapshots;
    if u64::from(nb) > MAX_SNAPSHOTS {
        if !opts.repair {
            return Err(SnapshotError::TooManySnapshots {
                nb_snapshots: u64::from(nb),
            });
        }
        read.discarded_snapshots = nb - MAX_SNAPSHOTS as u32;
        nb = MAX_SNAPSHOTS as u32;
    }
    // Each entry needs at least its fixed part, which bounds the preallocation by the input.
    let cap = (nb as usize).min(table.len() / SNAPSHOT_ENTRY_FIXED_SIZE as usize);
    let mut entries = Vec::with_capacity(cap);
    let mut offset = 0usize;
    // The size QEMU checks against the limit: padded entries, truncated extra data.
    let mut table_length = 0u64;
    for index in 0..nb {
        let start = align8(offset).ok_or(SnapshotError::Position { pos: offset })?;
        let h = read_header(table, start, index)?;
        let extra = u64::from(h.extra_data_size.get());
        if extra > MAX_SNAPSHOT_EXTRA_DATA && !opts.repair {
            return Err(SnapshotError::TooMuchExtraData {
                index,
                extra_data_size: extra,
            });
        }
        // QEMU checks the size after reading the entry; checking it before looking at the
        // variable part reports "too big" even when the caller could not supply bytes that far.
        let strings = u64::from(h.id_str_size.get()) + u64::from(h.name_size.get());
        let entry_length = table_length.div_ceil(8) * 8
            + SNAPSHOT_ENTRY_FIXED_SIZE
            + extra.min(MAX_SNAPSHOT_EXTRA_DATA)
            + strings;
        let entry_end = start as u64 + SNAPSHOT_ENTRY_FIXED_SIZE + extra + strings;
        if entry_length > MAX_SNAPSHOTS_SIZE || entry_end > i32::MAX as u64 {
            let overhanging = nb - index;
            if !opts.repair {
                return Err(SnapshotError::TableTooBig { index, overhanging });
            }
            read.discarded_snapshots += overhanging;
            break;
        }
        let p = parse_snapshot_entry(table, start, index, opts)?;
        table_length = entry_length;
        if p.extra_data_truncated {
            read.truncated_extra_data.push(index);
        }
        offset = p.end;
        entries.push(p.entry);
    }
    read.size = offset as u64;
    read.table = SnapshotTable { entries };
    Ok(read)
}

impl SnapshotTable {
    /// Reads a table strictly (as QEMU's open does): any limit violation is an error.
    pub fn parse(
        table: &[u8],
        nb_snapshots: u32,
        virtual_size: u64,
    ) -> Result<Self, SnapshotError> {
        let opts = SnapshotReadOptions {
            virtual_size,
            repair: false,
        };
        parse_snapshot_table(table, nb_snapshots, &opts).map(|r| r.table)
    }

    /// Number of snapshots (the header's `nb_snapshots`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no snapshots.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Indexes of the entries a v3 image must not have: less than 16 bytes of extra data
    /// (QEMU's checker reports "snapshot table entry N is incomplete"; rewriting fixes them).
    pub fn incomplete_entries(&self) -> Vec<u32> {
        (0u32..)
            .zip(&self.entries)
            .filter(|(_, e)| !e.is_complete_v3())
            .map(|(i, _)| i)
            .collect()
    }

    /// The first incomplete entry as an error, for v3 images.
    pub fn validate_v3(&self) -> Result<(), SnapshotError> {
        match (0u32..)
            .zip(&self.entries)
            .find(|(_, e)| !e.is_complete_v3())
        {
            Some((index, e)) => Err(SnapshotError::Incomplete {
                index,
                extra_data_size: e.extra_data_size,
            }),
            None => Ok(()),
        }
    }

    /// Size of the table as QEMU writes it: entries 8-aligned, the last one unpadded.
    /// More than 64 MiB (or more than 65536 snapshots) is an error, as in QEMU.
    pub fn serialized_size(&self) -> Result<u64, SnapshotError> {
        if self.entries.len() as u64 > MAX_SNAPSHOTS {
            return Err(SnapshotError::TooManySnapshots {
                nb_snapshots: self.entries.len() as u64,
            });
        }
        let mut offset = 0u64;
        for (index, e) in (0u32..).zip(&self.entries) {
            e.check_writable(index)?;
            // Bounded: 65536 entries of at most 40 + 1024 + 2 * 65535 bytes.
            offset = offset.div_ceil(8) * 8 + e.encoded_len();
            if offset > MAX_SNAPSHOTS_SIZE {
                return Err(SnapshotError::TableTooBig {
                    index,
                    overhanging: self.entries.len() as u32 - index,
                });
            }
        }
        Ok(offset)
    }

    /// The table as QEMU writes it, with zeros in the padding between entries.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SnapshotError> {
        let size = self.serialized_size()?;
        let mut out = Vec::with_capacity(size as usize);
        for (index, e) in (0u32..).zip(&self.entries) {
            out.resize(out.len().div_ceil(8) * 8, 0);
            e.write_to(index, &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const OPTS: SnapshotReadOptions = SnapshotReadOptions {
        virtual_size: 1 << 30,
        repair: false,
    };

    /// Golden: `qemu-img create -f qcow2 -o refcount_bits=16,cluster_size=4096 r16.qcow2 64k`,
    /// `qemu-io -c 'write -P 0x5a 0 8k'`, `qemu-img snapshot -c s1`, then
    /// `qemu-img snapshot -c second-snapshot` on a copy; the table bytes at
    /// `snapshots_offset` (0xa000), 2 snapshots.
    const GOLDEN_TWO: &str = "\
        000000000000700000000001000100026b0792970acf74c00000000000000000\
        0000000000000018000000000000000000000000000100000000000000000000\
        31733100000000000000000000009000000000010001000f6b07929e27b52d28\
        0000000000000000000000000000001800000000000000000000000000010000\
        0000000000000000327365636f6e642d736e617073686f74";

    #[test]
    fn golden_qemu_table() {
        let bytes = hex(GOLDEN_TWO);
        assert_eq!(bytes.len(), 152);
        let read = parse_snapshot_table(&bytes, 2, &OPTS).unwrap();
        assert_eq!(read.size, bytes.len() as u64);
        assert_eq!(read.discarded_snapshots, 0);
        let t = &read.table;
        assert_eq!(t.len(), 2);
        let s1 = &t.entries[0];
        assert_eq!(s1.id_str(), Some("1"));
        assert_eq!(s1.name_str(), Some("s1"));
        assert_eq!(s1.l1_table_offset, 0x7000);
        assert_eq!(s1.l1_size, 1);
        assert_eq!(s1.date_sec, 0x6b07_9297);
        assert_eq!(s1.date_nsec, 0x0acf_74c0);
        assert_eq!(s1.disk_size, 65536);
        // qemu-img records icount 0, not "disabled".
        assert_eq!(s1.icount_value(), Some(0));
        assert_eq!(s1.extra_data_size, 24);
        let s2 = &t.entries[1];
        assert_eq!(s2.id_str(), Some("2"));
        assert_eq!(s2.name_str(), Some("second-snapshot"));
        assert_eq!(s2.l1_table_offset, 0x9000);
        assert!(t.validate_v3().is_ok());
        // QEMU's writer produces the same bytes.
        assert_eq!(t.to_bytes().unwrap(), bytes);
        // The first entry is 67 bytes, padded to 72.
        let p = parse_snapshot_entry(&bytes, 0, 0, &OPTS).unwrap();
        assert_eq!((p.start, p.end, p.padded_len()), (0, 67, 72));
        let p2 = parse_snapshot_entry(&bytes, p.end, 1, &OPTS).unwrap();
        assert_eq!(p2.start, 72);
    }

    fn v2_entry(extra: &[u8], id: &[u8], name: &[u8], vm_state_32: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0x30000u64.to_be_bytes());
        v.extend_from_slice(&2u32.to_be_bytes());
        v.extend_from_slice(&(id.len() as u16).to_be_bytes());
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(&[0; 16]);
        v.extend_from_slice(&vm_state_32.to_be_bytes());
        v.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        v.extend_from_slice(extra);
        v.extend_from_slice(id);
        v.extend_from_slice(name);
        v
    }

    #[test]
    fn defaults_when_extra_data_missing() {
        // v2 entry without extra data: 32-bit VM state, disk size from the caller, no icount.
        let bytes = v2_entry(&[], b"1", b"old", 4096);
        let e = &SnapshotTable::parse(&bytes, 1, 12345).unwrap().entries[0];
        assert_eq!(e.vm_state_size, 4096);
        assert_eq!(e.disk_size, 12345);
        assert_eq!(e.icount, ICOUNT_DISABLED);
        assert_eq!(e.icount_value(), None);
        assert!(!e.is_complete_v3());
        let t = SnapshotTable {
            entries: vec![e.clone()],
        };
        assert_eq!(t.incomplete_entries(), vec![0]);
        assert_eq!(
            t.validate_v3(),
            Err(SnapshotError::Incomplete {
                index: 0,
                extra_data_size: 0
            })
        );
        // Rewriting upgrades it to 24 bytes of extra data with the defaults filled in.
        let out = t.to_bytes().unwrap();
        assert_eq!(out.len(), 40 + 24 + 4);
        let again = &SnapshotTable::parse(&out, 1, 0).unwrap().entries[0];
        assert_eq!(again.disk_size, 12345);
        assert_eq!(again.icount, ICOUNT_DISABLED);
        assert_eq!(again.extra_data_size, 24);
        // 8 bytes of extra data: the large VM state size overrides the 32-bit one.
        let bytes = v2_entry(&(5u64 << 32).to_be_bytes(), b"1", b"", 0);
        let e = &SnapshotTable::parse(&bytes, 1, 7).unwrap().entries[0];
        assert_eq!(e.vm_state_size, 5 << 32);
        assert_eq!(e.disk_size, 7);
    }

    #[test]
    fn large_vm_state_written_as_zero() {
        let mut e = SnapshotEntry::new("1", "big", 0x10000, 1, 1 << 20);
        e.vm_state_size = 1 << 33;
        let mut out = Vec::new();
        e.write_to(0, &mut out).unwrap();
        assert_eq!(&out[32..36], &[0, 0, 0, 0]);
        assert_eq!(&out[40..48], &(1u64 << 33).to_be_bytes());
        e.vm_state_size = 0xffff_ffff;
        out.clear();
        e.write_to(0, &mut out).unwrap();
        assert_eq!(&out[32..36], &[0xff; 4]);
    }

    #[test]
    fn unknown_extra_data_preserved() {
        let mut extra = vec![0u8; 24];
        extra[8..16].copy_from_slice(&99u64.to_be_bytes());
        extra.extend_from_slice(b"future-field!");
        let bytes = v2_entry(&extra, b"7", b"\xffraw", 0);
        let e = &SnapshotTable::parse(&bytes, 1, 0).unwrap().entries[0];
        assert_eq!(e.unknown_extra_data, b"future-field!");
        assert_eq!(e.extra_data_size, 37);
        assert_eq!(e.name, b"\xffraw");
        assert_eq!(e.name_str(), None);
        let t = SnapshotTable {
            entries: vec![e.clone()],
        };
        assert_eq!(t.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn too_much_extra_data() {
        let extra = vec![0u8; 1025];
        let bytes = v2_entry(&extra, b"1", b"x", 0);
        let err = SnapshotTable::parse(&bytes, 1, 0).unwrap_err();
        assert_eq!(
            err,
            SnapshotError::TooMuchExtraData {
                index: 0,
                extra_data_size: 1025
            }
        );
        assert!(err
            .to_string()
            .starts_with("Too much extra metadata in snapshot table entry 0"));
        // Repair keeps the first 1024 bytes and still finds id and name after the full size.
        let opts = SnapshotReadOptions {
            virtual_size: 0,
            repair: true,
        };
        let read = parse_snapshot_table(&bytes, 1, &opts).unwrap();
        assert_eq!(read.truncated_extra_data, vec![0]);
        let e = &read.table.entries[0];
        assert_eq!(e.extra_data_size, 1024);
        assert_eq!(e.unknown_extra_data.len(), 1000);
        assert_eq!((e.id.as_slice(), e.name.as_slice()), (&b"1"[..], &b"x"[..]));
        assert_eq!(read.size, bytes.len() as u64);
    }

    #[test]
    fn table_limits() {
        assert_eq!(
            SnapshotTable::parse(&[], 65537, 0),
            Err(SnapshotError::TooManySnapshots {
                nb_snapshots: 65537
            })
        );
        // Entries with 2 * 65535-byte strings: the 64 MiB limit is crossed at entry 511.
        let one = v2_entry(&[0; 24], &vec![b'i'; 65535], &vec![b'n'; 65535], 0);
        let padded = one.len().div_ceil(8) * 8;
        let n = 600u32;
        let mut bytes = Vec::new();
        for _ in 0..n {
            bytes.resize(bytes.len().div_ceil(8) * 8, 0);
            bytes.extend_from_slice(&one);
        }
        let first_bad = (MAX_SNAPSHOTS_SIZE as usize - one.len()) / padded + 1;
        let err = SnapshotTable::parse(&bytes, n, 0).unwrap_err();
        assert_eq!(
            err,
            SnapshotError::TableTooBig {
                index: first_bad as u32,
                overhanging: n - first_bad as u32
            }
        );
        assert!(err.to_string().starts_with("Snapshot table is too big"));
        // Too big is reported even when the bytes stop early.
        assert!(matches!(
            SnapshotTable::parse(&bytes[..MAX_SNAPSHOTS_SIZE as usize], n, 0),
            Err(SnapshotError::TableTooBig { .. })
        ));
        let opts = SnapshotReadOptions {
            virtual_size: 0,
            repair: true,
        };
        let read = parse_snapshot_table(&bytes, n, &opts).unwrap();
        assert_eq!(read.table.len(), first_bad);
        assert_eq!(read.discarded_snapshots, n - first_bad as u32);
        assert_eq!(read.size as usize, (first_bad - 1) * padded + one.len());
        // The kept table serializes within the limit.
        assert!(read.table.serialized_size().unwrap() <= MAX_SNAPSHOTS_SIZE);
        // Writing the full table is refused like QEMU's EFBIG.
        let full = SnapshotTable::parse(&bytes[..first_bad * padded], first_bad as u32, 0).unwrap();
        let mut bigger = full.clone();
        bigger.entries.push(full.entries[0].clone());
        assert!(matches!(
            bigger.to_bytes(),
            Err(SnapshotError::TableTooBig { .. })
        ));
    }

    #[test]
    fn truncated_and_bad_positions() {
        let bytes = v2_entry(&[0; 24], b"1", b"abc", 0);
        for cut in 0..bytes.len() {
            let err = SnapshotTable::parse(&bytes[..cut], 1, 0).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated { index: 0, .. }),
                "{cut}"
            );
        }
        assert!(matches!(
            parse_snapshot_entry(&bytes, usize::MAX, 0, &OPTS),
            Err(SnapshotError::Position { .. })
        ));
        assert!(parse_snapshot_entry(&bytes, 1000, 0, &OPTS).is_err());
        assert_eq!(
            SnapshotTable::parse(&[], 0, 0),
            Ok(SnapshotTable::default())
        );
    }

    #[test]
    fn write_errors() {
        let mut e = SnapshotEntry::new(vec![b'1'; 70000], "n", 0, 0, 0);
        assert!(matches!(
            e.check_writable(3),
            Err(SnapshotError::StringTooLong {
                index: 3,
                field: "id",
                len: 70000
            })
        ));
        e.id = b"1".to_vec();
        e.unknown_extra_data = vec![0; 1001];
        assert!(matches!(
            e.write_to(0, &mut Vec::new()),
            Err(SnapshotError::TooMuchExtraData {
                extra_data_size: 1025,
                ..
            })
        ));
    }
}
