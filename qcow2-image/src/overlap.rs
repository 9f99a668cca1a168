//! Metadata-overlap checks (invariant 5; QEMU's `qcow2_check_metadata_overlap`).
//!
//! The live metadata layout is mirrored into an [`OverlapState`] shared (behind a mutex)
//! with the cache's pre-write hook, so cache write-backs are checked as well as the facade's
//! own data, L1 and header writes. The image refreshes the mirror whenever it changes the
//! L1 table or the refcount engine may have changed the refcount structures.

use crate::options::OverlapLevel;
use qcow2_cache::{CacheId, OverlapCheck, OverlapError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// QEMU's `QCOW2_OL_*` bits, in QEMU's order (the lowest set bit names the overlap).
pub(crate) mod bits {
    pub const MAIN_HEADER: u32 = 1 << 0;
    pub const ACTIVE_L1: u32 = 1 << 1;
    pub const ACTIVE_L2: u32 = 1 << 2;
    pub const REFCOUNT_TABLE: u32 = 1 << 3;
    pub const REFCOUNT_BLOCK: u32 = 1 << 4;
    pub const SNAPSHOT_TABLE: u32 = 1 << 5;
    pub const INACTIVE_L1: u32 = 1 << 6;
    pub const INACTIVE_L2: u32 = 1 << 7;
    pub const BITMAP_DIRECTORY: u32 = 1 << 8;

    pub const CONSTANT: u32 =
        MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
    pub const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1;
    pub const ALL: u32 = CACHED | INACTIVE_L2;
}

const NAMES: [&str; 9] = [
    "qcow2_header",
    "active L1 table",
    "active L2 table",
    "refcount table",
    "refcount block",
    "snapshot table",
    "inactive L1 table",
    "inactive L2 table",
    "bitmap directory",
];

/// The metadata layout the checks compare against.
#[derive(Debug, Default)]
pub(crate) struct OverlapState {
    pub mask: u32,
    pub cluster_bits: u32,
    pub l1: (u64, u64),
    pub active_l2: HashSet<u64>,
    pub reftable: (u64, u64),
    /// Refcount block offsets, with how many table entries name each (a damaged table may
    /// name one twice).
    pub refblocks: HashMap<u64, u32>,
    /// The refcount-table entries `refblocks` was built from, so that a change (one block
    /// hooked in) updates one entry instead of rebuilding the set.
    pub reftable_mirror: Vec<u64>,
    /// `RefcountEngine::reftable_generation` when `reftable`/`refblocks` were last taken
    /// (`None`: never), so a refresh costs one comparison unless the table changed.
    pub reftable_generation: Option<u64>,
    pub snapshot_table: (u64, u64),
    pub inactive_l1: Vec<(u64, u64)>,
    pub inactive_l2: HashSet<u64>,
    pub bitmap_dir: Option<(u64, u64)>,
    /// The LUKS header and key material of an encrypted image (no QEMU bit of its own:
    /// guarded as part of the image header).
    pub crypto_header: Option<(u64, u64)>,
}

pub(crate) fn level_mask(level: OverlapLevel) -> u32 {
    match level {
        OverlapLevel::None => 0,
        OverlapLevel::Constant => bits::CONSTANT,
        OverlapLevel::Cached => bits::CACHED,
        OverlapLevel::All => bits::ALL,
    }
}

impl OverlapState {
    /// Brings `refblocks` in line with the refcount table `table` (raw entries), touching
    /// only the entries that differ from the last call.
    pub fn sync_refblocks(&mut self, table: &[u64]) {
        let mask = qcow2_format::refcount::REFT_OFFSET_MASK;
        let n = table.len().max(self.reftable_mirror.len());
        for i in 0..n {
            let old = self.reftable_mirror.get(i).copied().unwrap_or(0) & mask;
            let new = table.get(i).copied().unwrap_or(0) & mask;
            if old == new {
                continue;
            }
            if old != 0 {
                if let Some(c) = self.refblocks.get_mut(&old) {
                    *c -= 1;
                    if *c == 0 {
                        self.refblocks.remove(&old);
                    }
                }
            }
            if new != 0 {
                *self.refblocks.entry(new).or_insert(0) += 1;
            }
        }
        self.reftable_mirror.clear();
        self.reftable_mirror.extend_from_slice(table);
    }
}

fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl OverlapState {
    /// Which structure `[offset, offset + len)` (widened to whole clusters) overlaps, if
    /// any, ignoring the structures in `ignore`.
    pub fn check(&self, offset: u64, len: u64, ignore: u32) -> Option<&'static str> {
        let chk = self.mask & !ignore;
        if chk == 0 || len == 0 {
            return None;
        }
        let cs = 1u64 << self.cluster_bits;
        let start = offset & !(cs - 1);
        let end = offset.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        let size = end - start;
        let hit_set = |set: &HashSet<u64>| -> bool {
            let n = size >> self.cluster_bits;
            if n as usize > set.len() {
                set.iter().any(|&o| o >= start && o < end)
            } else {
                (0..n).any(|i| set.contains(&(start + (i << self.cluster_bits))))
            }
        };
        let found = |bit: u32| -> bool {
            match bit {
                bits::MAIN_HEADER => {
                    start < cs
                        || self
                            .crypto_header
                            .is_some_and(|(o, l)| ranges_overlap(start, size, o, l))
                }
                bits::ACTIVE_L1 => ranges_overlap(start, size, self.l1.0, self.l1.1),
                bits::ACTIVE_L2 => hit_set(&self.active_l2),
                bits::REFCOUNT_TABLE => {
                    ranges_overlap(start, size, self.reftable.0, self.reftable.1)
                }
                bits::REFCOUNT_BLOCK => {
                    let n = size >> self.cluster_bits;
                    if n as usize > self.refblocks.len() {
                        self.refblocks.keys().any(|&o| o >= start && o < end)
                    } else {
                        (0..n).any(|i| {
                            self.refblocks
                                .contains_key(&(start + (i << self.cluster_bits)))
                        })
                    }
                }
                bits::SNAPSHOT_TABLE => {
                    ranges_overlap(start, size, self.snapshot_table.0, self.snapshot_table.1)
                }
                bits::INACTIVE_L1 => self
                    .inactive_l1
                    .iter()
                    .any(|&(o, l)| ranges_overlap(start, size, o, l)),
                bits::INACTIVE_L2 => hit_set(&self.inactive_l2),
                bits::BITMAP_DIRECTORY => self
                    .bitmap_dir
                    .is_some_and(|(o, l)| ranges_overlap(start, size, o, l)),
                _ => false,
            }
        };
        (0..NAMES.len())
            .map(|i| 1u32 << i)
            .find(|&bit| chk & bit != 0 && found(bit))
            .map(|bit| NAMES[bit.trailing_zeros() as usize])
    }
}

/// The shared state plus the cache hook.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overlap(pub Arc<Mutex<OverlapState>>);

impl Overlap {
    pub fn with<R>(&self, f: impl FnOnce(&mut OverlapState) -> R) -> R {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// Checks a write; `Err` carries QEMU's message.
    pub fn check(&self, offset: u64, len: u64, ignore: u32) -> Result<(), OverlapError> {
        match self.with(|s| s.check(offset, len, ignore)) {
            None => Ok(()),
            Some(region) => Err(OverlapError {
                offset,
                len,
                region,
            }),
        }
    }
}

impl OverlapCheck for Overlap {
    fn check_write(&self, id: CacheId, offset: u64, len: u64) -> Result<(), OverlapError> {
        // A cache legitimately writes the kind of table it holds. The L2 cache also holds
        // snapshot (inactive) L2 tables while a snapshot refcount pass updates their COPIED
        // flags, and shared tables are both active and inactive.
        let ignore = match id {
            CacheId::L2 => bits::ACTIVE_L2 | bits::INACTIVE_L2,
            CacheId::Refblock => bits::REFCOUNT_BLOCK,
        };
        self.check(offset, len, ignore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_order() {
        let mut s = OverlapState {
            mask: bits::ALL,
            cluster_bits: 16,
            l1: (0x30000, 8),
            reftable: (0x10000, 0x10000),
            ..Default::default()
        };
        s.sync_refblocks(&[0x20000]);
        s.active_l2.insert(0x40000);
        assert_eq!(s.check(0, 512, 0), Some("qcow2_header"));
        assert_eq!(s.check(0x30008, 8, 0), Some("active L1 table"));
        assert_eq!(s.check(0x30008, 8, bits::ACTIVE_L1), None);
        assert_eq!(s.check(0x20000, 0x10000, 0), Some("refcount block"));
        assert_eq!(s.check(0x1ffff, 2, 0), Some("refcount table"));
        assert_eq!(s.check(0x40000, 0x10000, bits::ACTIVE_L2), None);
        assert_eq!(s.check(0x40000, 0x10000, 0), Some("active L2 table"));
        assert_eq!(s.check(0x50000, 0x10000, 0), None);
        s.mask = 0;
        assert_eq!(s.check(0, 512, 0), None);
    }
}
