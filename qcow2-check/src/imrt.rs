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
