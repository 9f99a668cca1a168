//! A dirty bitmap in memory (QEMU's `BdrvDirtyBitmap` over an `HBitmap`): one bit per
//! `granularity` bytes of the guest disk, and the serialization QEMU stores in bitmap data
//! clusters (little-endian 64-bit words: bit `i` is bit `i % 8` of byte `i / 8`).

/// One bit per `1 << granularity_bits` guest bytes of a disk of `size` bytes. Bits past
/// the last granule are always zero (the serialized words QEMU writes keep them zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity_bits: u8,
    size: u64,
    words: Vec<u64>,
}

fn words_for(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(64)
}

impl DirtyBitmap {
    /// An empty bitmap for a disk of `size` bytes. `granularity_bits` must be at most 31
    /// and `size` small enough for the bits to fit in memory (the callers check QEMU's
    /// limits first: at most 512 MiB of bits).
    pub(crate) fn new(size: u64, granularity_bits: u8) -> Self {
        let granularity_bits = granularity_bits.min(63);
        Self {
            granularity_bits,
            size,
            words: vec![0; words_for(size, granularity_bits) as usize],
        }
    }

    /// Bytes of guest disk one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// The granularity as a shift.
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn nbits(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Whether the granule holding guest byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let bit = offset >> self.granularity_bits;
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w >> (bit % 64) & 1 != 0)
    }

    /// Marks every granule that `[offset, offset + len)` touches (clipped to the disk).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        self.change_range(offset, len, true);
    }

    fn change_range(&mut self, offset: u64, len: u64, set: bool) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if let Some(word) = self.words.get_mut(w) {
                if set {
                    *word |= mask;
                } else {
                    *word &= !mask;
                }
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of dirty bytes (QEMU's `count`: dirty granules times the granularity,
    /// the last one clipped to the disk).
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().map(|(s, l)| l.min(self.size - s)).sum()
    }

    /// The first dirty guest byte at or after `from` (granule start), if any.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.next_bit(from, true)
    }

    /// The first clean guest byte at or after `from` (granule start), or the disk size.
    pub fn next_clean(&self, from: u64) -> u64 {
        self.next_bit(from, false)
            .unwrap_or(self.size)
            .min(self.size)
    }

    fn next_bit(&self, from: u64, dirty: bool) -> Option<u64> {
        let nbits = self.nbits();
        let mut bit = from >> self.granularity_bits;
        while bit < nbits {
            let w = (bit / 64) as usize;
            let word = self.words.get(w).copied().unwrap_or(0);
            let word = if dirty { word } else { !word };
            let masked = word & (u64::MAX << (bit % 64));
            if masked != 0 {
                let found = w as u64 * 64 + u64::from(masked.trailing_zeros());
                return (found < nbits).then(|| (found << self.granularity_bits).max(from));
            }
            bit = (w as u64 + 1) * 64;
        }
        None
    }

    /// The dirty ranges `(offset, length)` in guest order, each a run of dirty granules
    /// (the last one clipped to the disk size).
    pub fn ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            pos: 0,
            end: self.size,
        }
    }

    /// The dirty ranges that intersect `[offset, offset + len)`, clipped to it.
    pub fn ranges_in(&self, offset: u64, len: u64) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            pos: offset,
            end: offset.saturating_add(len).min(self.size),
        }
    }

    /// Sets every granule of `self` that a dirty range of `other` touches (QEMU's merge:
    /// granularities may differ, sizes must match; the caller checks the sizes).
    pub(crate) fn merge_from(&mut self, other: &DirtyBitmap) {
        if other.granularity_bits == self.granularity_bits && other.size == self.size {
            for (a, b) in self.words.iter_mut().zip(&other.words) {
                *a |= b;
            }
            return;
        }
        let ranges: Vec<(u64, u64)> = other.ranges().collect();
        for (s, l) in ranges {
            self.set_range(s, l);
        }
    }

    /// Changes the disk size: new granules are clean, granules past the new end are gone
    /// (QEMU's `hbitmap_truncate`).
    pub(crate) fn truncate(&mut self, size: u64) {
        let old = self.size;
        self.size = size;
        self.words
            .resize(words_for(size, self.granularity_bits) as usize, 0);
        if size < old {
            // Clear the bits of the last word past the new end.
            let nbits = self.nbits();
            if nbits % 64 != 0 {
                if let Some(w) = self.words.last_mut() {
                    *w &= u64::MAX >> (64 - nbits % 64);
                }
            }
        }
    }

    /// Whether any bit of table entry `index` (one data cluster of bits) is set.
    pub(crate) fn cluster_dirty(&self, index: u64, cluster_size: u64) -> bool {
        let wpc = (cluster_size / 8) as usize;
        let start = (index as usize).saturating_mul(wpc);
        self.words
            .get(start..(start + wpc).min(self.words.len()))
            .is_some_and(|ws| ws.iter().any(|&w| w != 0))
    }

    /// The serialized bits of table entry `index`, zero padded to one cluster.
    pub(crate) fn serialize_cluster(&self, index: u64, cluster_size: u64) -> Vec<u8> {
        let wpc = (cluster_size / 8) as usize;
        let start = (index as usize).saturating_mul(wpc);
        let mut out = vec![0u8; cluster_size as usize];
        if let Some(ws) = self.words.get(start..(start + wpc).min(self.words.len())) {
            for (chunk, w) in out.chunks_exact_mut(8).zip(ws) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Loads table entry `index` from its serialized bits (`None`: all ones).
    pub(crate) fn deserialize_cluster(
        &mut self,
        index: u64,
        cluster_size: u64,
        data: Option<&[u8]>,
    ) {
        let wpc = (cluster_size / 8) as usize;
        let start = (index as usize).saturating_mul(wpc);
        let end = (start + wpc).min(self.words.len());
        if start >= end {
            return;
        }
        match data {
            Some(bytes) => {
                for (w, chunk) in self.words[start..end].iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(chunk);
                    *w = u64::from_le_bytes(b);
                }
            }
            None => self.words[start..end].fill(u64::MAX),
        }
        // Bits past the disk end stay zero whatever the cluster held.
        if end == self.words.len() {
            let nbits = self.nbits();
            if nbits % 64 != 0 {
                if let Some(w) = self.words.last_mut() {
                    *w &= u64::MAX >> (64 - nbits % 64);
                }
            }
        }
    }
}

/// Iterator over the dirty ranges of a [`DirtyBitmap`]: `(offset, length)` in guest bytes.
#[derive(Debug, Clone)]
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.bitmap.next_dirty(self.pos)?;
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self.bitmap.next_clean(start).min(self.end);
        self.pos = stop;
        Some((start, stop - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bitmap as a plain vector of granule bits, to compare against.
    fn model(size: u64, gbits: u8, writes: &[(u64, u64)]) -> Vec<bool> {
        let g = 1u64 << gbits;
        let n = size.div_ceil(g) as usize;
        let mut v = vec![false; n];
        for &(o, l) in writes {
            let end = (o + l).min(size);
            if l == 0 || o >= end {
                continue;
            }
            for b in (o / g)..=((end - 1) / g) {
                v[b as usize] = true;
            }
        }
        v
    }

    fn ranges_of(m: &[bool], g: u64, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &d) in m.iter().enumerate() {
            if !d {
                continue;
            }
            let s = i as u64 * g;
            let e = (s + g).min(size);
            match out.last_mut() {
                Some((ls, ll)) if *ls + *ll == s => *ll = e - *ls,
                _ => out.push((s, e - s)),
            }
        }
        out
    }

    quickcheck::quickcheck! {
        fn set_and_iterate_match_a_model(writes: Vec<(u32, u16)>, gsel: u8, size: u32) -> bool {
            let gbits = 9 + gsel % 8;
            let size = u64::from(size % (8 << 20)) + 1;
            let writes: Vec<(u64, u64)> = writes
                .iter()
                .map(|&(o, l)| (u64::from(o) % size, u64::from(l) * 7))
                .collect();
            let mut b = DirtyBitmap::new(size, gbits);
            for &(o, l) in &writes {
                b.set_range(o, l);
            }
            let m = model(size, gbits, &writes);
            let got: Vec<(u64, u64)> = b.ranges().collect();
            got == ranges_of(&m, 1 << gbits, size)
                && (0..m.len()).all(|i| b.get(i as u64 * (1 << gbits)) == m[i])
        }

        fn serialization_round_trips(writes: Vec<(u32, u16)>, size: u32) -> bool {
            let size = u64::from(size % (64 << 20)) + 1;
            let mut b = DirtyBitmap::new(size, 9);
            for &(o, l) in &writes {
                b.set_range(u64::from(o) % size, u64::from(l));
            }
            let cs = 512;
            let n = (size.div_ceil(512).div_ceil(64) * 8).div_ceil(cs);
            let mut c = DirtyBitmap::new(size, 9);
            for i in 0..n {
                let data = b.serialize_cluster(i, cs);
                assert_eq!(b.cluster_dirty(i, cs), data.iter().any(|&x| x != 0));
                c.deserialize_cluster(i, cs, Some(&data));
            }
            b == c
        }
    }

    #[test]
    fn serialization_is_little_endian_bit_order() {
        let mut b = DirtyBitmap::new(1 << 20, 16);
        b.set_range(0, 1);
        b.set_range(9 << 16, 1);
        let c = b.serialize_cluster(0, 512);
        assert_eq!(&c[..3], &[0x01, 0x02, 0]);
        let mut ones = DirtyBitmap::new(100 << 16, 16);
        ones.deserialize_cluster(0, 512, None);
        assert_eq!(ones.ranges().collect::<Vec<_>>(), vec![(0, 100 << 16)]);
    }

    #[test]
    fn truncate_and_merge() {
        let mut b = DirtyBitmap::new(1 << 20, 12);
        b.set_range(0, 1 << 20);
        b.truncate(1000 << 10);
        b.truncate(2 << 20);
        assert_eq!(b.ranges().collect::<Vec<_>>(), vec![(0, 1000 << 10)]);
        let mut coarse = DirtyBitmap::new(2 << 20, 16);
        let mut fine = DirtyBitmap::new(2 << 20, 9);
        fine.set_range(70000, 1);
        coarse.merge_from(&fine);
        assert_eq!(coarse.ranges().collect::<Vec<_>>(), vec![(65536, 65536)]);
        assert_eq!(
            b.ranges_in(4096, 8192).collect::<Vec<_>>(),
            vec![(4096, 8192)]
        );
    }
}
