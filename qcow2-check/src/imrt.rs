//! The in-memory refcount table (QEMU's IMRT): one counter per host cluster, as narrow as
//! the image's refcount width allows, saturating at the width's maximum like QEMU.

use qcow2_format::RefcountCodec;

/// Counters in the narrowest integer that holds the image's `refcount_max`.
#[derive(Debug, Clone)]
enum Cells {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

/// The in-memory refcount table. Its length is QEMU's `nb_clusters` (it grows when ranges
/// just past the end of the file are referenced, and during a rebuild).
#[derive(Debug, Clone)]
pub(crate) struct Imrt {
    cells: Cells,
    max: u64,
}

impl Imrt {
    /// A zeroed table of `len` counters for refcount width `codec`, or `None` if the memory
    /// cannot be reserved (QEMU's `-ENOMEM`).
    pub(crate) fn new(codec: &RefcountCodec, len: u64) -> Option<Self> {
        let n = usize::try_from(len).ok()?;
        fn zeroed<T: Clone + Default>(n: usize) -> Option<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.resize(n, T::default());
            Some(v)
        }
        let cells = match codec.order() {
            0..=3 => Cells::U8(zeroed(n)?),
            4 => Cells::U16(zeroed(n)?),
            5 => Cells::U32(zeroed(n)?),
            _ => Cells::U64(zeroed(n)?),
        };
        Some(Self {
            cells,
            max: codec.max(),
        })
    }

    /// An empty table (no allocation).
    pub(crate) fn empty(codec: &RefcountCodec) -> Self {
        let cells = match codec.order() {
            0..=3 => Cells::U8(Vec::new()),
            4 => Cells::U16(Vec::new()),
            5 => Cells::U32(Vec::new()),
            _ => Cells::U64(Vec::new()),
        };
        Self {
            cells,
            max: codec.max(),
        }
    }

    /// Number of counters (`nb_clusters`).
    pub(crate) fn len(&self) -> u64 {
        (match &self.cells {
            Cells::U8(v) => v.len(),
            Cells::U16(v) => v.len(),
            Cells::U32(v) => v.len(),
            Cells::U64(v) => v.len(),
        }) as u64
    }

    /// Grows to `len` counters (new ones zero); `false` if memory is not available.
    pub(crate) fn grow(&mut self, len: u64) -> bool {
        let Ok(n) = usize::try_from(len) else {
            return false;
        };
        fn grow_vec<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> bool {
            if n <= v.len() {
                return true;
            }
            if v.try_reserve_exact(n - v.len()).is_err() {
                return false;
            }
            v.resize(n, T::default());
            true
        }
        match &mut self.cells {
            Cells::U8(v) => grow_vec(v, n),
            Cells::U16(v) => grow_vec(v, n),
            Cells::U32(v) => grow_vec(v, n),
            Cells::U64(v) => grow_vec(v, n),
        }
    }

    /// Counter `i` (0 beyond the end).
    #[inline]
    pub(crate) fn get(&self, i: u64) -> u64 {
        let Ok(i) = usize::try_from(i) else { return 0 };
        match &self.cells {
            Cells::U8(v) => v.get(i).map_or(0, |&x| u64::from(x)),
            Cells::U16(v) => v.get(i).map_or(0, |&x| u64::from(x)),
            Cells::U32(v) => v.get(i).map_or(0, |&x| u64::from(x)),
            Cells::U64(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    /// Sets counter `i` (which must be below `len`, and `value <= max`).
    #[inline]
    pub(crate) fn set(&mut self, i: u64, value: u64) {
        let Ok(i) = usize::try_from(i) else { return };
        // Values never exceed `max`, which fits the cell type by construction.
        match &mut self.cells {
            Cells::U8(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u8;
                }
            }
            Cells::U16(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u16;
                }
            }
            Cells::U32(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u32;
                }
            }
            Cells::U64(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value;
                }
            }
        }
    }

    /// Adds one reference to counter `i` (below `len`). Returns `false`, changing nothing,
    /// when the counter is already at the width's maximum (QEMU's overflow report).
    #[inline]
    pub(crate) fn inc(&mut self, i: u64) -> bool {
        let Ok(i) = usize::try_from(i) else {
            return true;
        };
        let max = self.max;
        macro_rules! bump {
            ($v:expr) => {
                match $v.get_mut(i) {
                    Some(x) => {
                        if u64::from(*x) >= max {
                            false
                        } else {
                            *x += 1;
                            true
                        }
                    }
                    None => true,
                }
            };
        }
        match &mut self.cells {
            Cells::U8(v) => bump!(v),
            Cells::U16(v) => bump!(v),
            Cells::U32(v) => bump!(v),
            Cells::U64(v) => match v.get_mut(i) {
                Some(x) => {
                    if *x >= max {
                        false
                    } else {
                        *x += 1;
                        true
                    }
                }
                None => true,
            },
        }
    }

    /// Counts the references of a run of plain L2 entries (8-byte entries of `table`, from
    /// entry `from`): entries that are zero or have no bit of `walk.plain_mask` set and
    /// point at a cluster below `walk.limit` whose counter is below the maximum. Stops at
    /// the first other entry and returns its index (the table's entry count when none),
    /// so that the caller's full per-entry logic handles it, reports included.
    ///
    /// This is the checker's hot loop: one load, one mask test and one increment per
    /// entry, monomorphised per counter width.
    pub(crate) fn inc_plain_l2(
        &mut self,
        table: &[u8],
        from: usize,
        walk: &mut PlainWalk,
    ) -> usize {
        macro_rules! run {
            ($v:expr, $t:ty) => {
                inc_plain::<$t>($v, self.max as $t, table, from, walk)
            };
        }
        match &mut self.cells {
            Cells::U8(v) => run!(v, u8),
            Cells::U16(v) => run!(v, u16),
            Cells::U32(v) => run!(v, u32),
            Cells::U64(v) => run!(v, u64),
        }
    }

    /// Sets every counter to zero, keeping the length.
    pub(crate) fn clear(&mut self) {
        match &mut self.cells {
            Cells::U8(v) => v.iter_mut().for_each(|x| *x = 0),
            Cells::U16(v) => v.iter_mut().for_each(|x| *x = 0),
            Cells::U32(v) => v.iter_mut().for_each(|x| *x = 0),
            Cells::U64(v) => v.iter_mut().for_each(|x| *x = 0),
        }
    }
}

/// The state [`Imrt::inc_plain_l2`] shares with the per-entry walk of one L2 table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlainWalk {
    /// Bits that make an entry not plain (compressed, zero, reserved, unaligned offset).
    pub(crate) plain_mask: u64,
    /// Host offset mask of an entry.
    pub(crate) offset_mask: u64,
    /// Cluster size bits.
    pub(crate) bits: u32,
    /// Clusters below this index are counted here; others take the full path (which
    /// grows the table or reports a reference beyond the end of the file).
    pub(crate) limit: u64,
    /// Allocated clusters seen (QEMU's statistic, kept by the caller only for the
    /// active table).
    pub(crate) allocated: u64,
    /// Clusters not contiguous with their predecessor.
    pub(crate) fragmented: u64,
    /// Host offset just past the previous allocated cluster (0 before the first).
    pub(crate) next_contiguous: u64,
}

/// A counter cell: an unsigned integer that can be compared and incremented.
trait Cell: Copy + PartialOrd + std::ops::AddAssign {
    const ONE: Self;
}

macro_rules! cell {
    ($($t:ty),*) => {$(impl Cell for $t { const ONE: Self = 1; })*};
}
cell!(u8, u16, u32, u64);

fn inc_plain<T: Cell>(
    cells: &mut [T],
    max: T,
    table: &[u8],
    from: usize,
    w: &mut PlainWalk,
) -> usize {
    let limit = w.limit.min(cells.len() as u64);
    let cs = 1u64 << w.bits;
    let (mut allocated, mut fragmented, mut next) = (0u64, 0u64, w.next_contiguous);
    let mut stop = table.len() / 8;
    for (i, chunk) in table.chunks_exact(8).enumerate().skip(from) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let entry = u64::from_be_bytes(word);
        if entry & w.plain_mask != 0 {
            stop = i;
            break;
        }
        let offset = entry & w.offset_mask;
        if offset == 0 {
            continue;
        }
        let k = offset >> w.bits;
        if k >= limit {
            stop = i;
            break;
        }
        // In bounds: `k < limit <= cells.len()`.
        let Some(cell) = cells.get_mut(k as usize) else {
            stop = i;
            break;
        };
        if *cell >= max {
            stop = i;
            break;
        }
        *cell += T::ONE;
        allocated += 1;
        fragmented += u64::from(next != 0 && offset != next);
        next = offset + cs;
    }
    w.allocated += allocated;
    w.fragmented += fragmented;
    w.next_contiguous = next;
    stop
}
