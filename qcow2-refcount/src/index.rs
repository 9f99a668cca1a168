//! The free-space index: which host clusters have refcount 0, per refcount block.
//!
//! QEMU finds free clusters with a linear scan of refcounts through the cache, one cluster
//! at a time, from a hint. Here each refcount block, the first time the allocator or an update
//! touches it, is summarised into a bitmap of used clusters (one bit per cluster) and a used
//! count; searches then skip full blocks by count and find free bits 64 at a time. The index
//! is kept in step with every refcount change the engine makes, so the cost of an allocation
//! does not grow with the image size.
//!
//! Invariant: for a *known* block, bit set ⇔ refcount ≠ 0 or the cluster is quarantined.
//! `hint` is a cluster index below which no cluster is free.

/// Used-cluster bitmaps of the refcount blocks that have been summarised.
#[derive(Debug)]
pub(crate) struct FreeIndex {
    /// `log2` of refcounts per block.
    block_bits: u32,
    /// Summaries by refcount-table index; `None` = not summarised yet.
    blocks: Vec<Option<BlockSummary>>,
    /// No free cluster below this cluster index.
    pub(crate) hint: u64,
}

#[derive(Debug)]
struct BlockSummary {
    used: Box<[u64]>,
    used_count: u64,
}

impl FreeIndex {
    pub(crate) fn new(block_bits: u32) -> Self {
        Self {
            block_bits,
            blocks: Vec::new(),
            hint: 0,
        }
    }

    fn entries(&self) -> u64 {
        1 << self.block_bits
    }

    pub(crate) fn is_known(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.blocks.get(b))
            .is_some_and(Option::is_some)
    }

    /// Records the summary of `block`; `is_used(i)` tells whether entry `i` is in use.
    pub(crate) fn insert(&mut self, block: u64, mut is_used: impl FnMut(u64) -> bool) {
        let Ok(b) = usize::try_from(block) else {
            return;
        };
        let entries = self.entries();
        let words = usize::try_from(entries.div_ceil(64)).unwrap_or(1);
        let mut used = vec![0u64; words].into_boxed_slice();
        let mut used_count = 0;
        for i in 0..entries {
            if is_used(i) {
                if let Some(w) = used.get_mut((i / 64) as usize) {
                    *w |= 1 << (i % 64);
                }
                used_count += 1;
            }
        }
        if self.blocks.len() <= b {
            self.blocks.resize_with(b + 1, || None);
        }
        if let Some(slot) = self.blocks.get_mut(b) {
            *slot = Some(BlockSummary { used, used_count });
        }
    }

    /// Forgets a block's summary (it will be rebuilt from the refcount block).
    pub(crate) fn forget(&mut self, block: u64) {
        if let Some(slot) = usize::try_from(block)
            .ok()
            .and_then(|b| self.blocks.get_mut(b))
        {
            *slot = None;
        }
    }

    fn summary(&self, block: u64) -> Option<&BlockSummary> {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.blocks.get(b))
            .and_then(Option::as_ref)
    }

    fn summary_mut(&mut self, block: u64) -> Option<&mut BlockSummary> {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.blocks.get_mut(b))
            .and_then(Option::as_mut)
    }

    /// Marks `cluster` used in a known block (no-op for unknown blocks: their summary is
    /// built from the refcount block, which already holds the change).
    pub(crate) fn mark_used(&mut self, cluster: u64) {
        let bits = self.block_bits;
        let i = cluster & ((1 << bits) - 1);
        if let Some(s) = self.summary_mut(cluster >> bits) {
            if let Some(w) = s.used.get_mut((i / 64) as usize) {
                if *w & (1 << (i % 64)) == 0 {
                    *w |= 1 << (i % 64);
                    s.used_count += 1;
                }
            }
        }
    }

    /// Marks `cluster` free in a known block and lowers the hint.
    pub(crate) fn mark_free(&mut self, cluster: u64) {
        let bits = self.block_bits;
        let i = cluster & ((1 << bits) - 1);
        if let Some(s) = self.summary_mut(cluster >> bits) {
            if let Some(w) = s.used.get_mut((i / 64) as usize) {
                if *w & (1 << (i % 64)) != 0 {
                    *w &= !(1 << (i % 64));
                    s.used_count -= 1;
                }
            }
        }
        if cluster < self.hint {
            self.hint = cluster;
        }
    }

    /// Whether `cluster` is used; `None` if its block is not known.
    #[cfg(test)]
    pub(crate) fn is_used(&self, cluster: u64) -> Option<bool> {
        let bits = self.block_bits;
        let i = cluster & ((1 << bits) - 1);
        self.summary(cluster >> bits).map(|s| {
            s.used
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    /// First free cluster at or after `from` within `from`'s block, if the block is known.
    /// `Some(None)` means the block is known and has no free cluster at or after `from`.
    pub(crate) fn next_free_in_block(&self, from: u64) -> Option<Option<u64>> {
        let bits = self.block_bits;
        let block = from >> bits;
        let s = self.summary(block)?;
        if s.used_count == self.entries() {
            return Some(None);
        }
        let base = block << bits;
        let mut i = from - base;
        let entries = self.entries();
        while i < entries {
            let w = s.used.get((i / 64) as usize).copied().unwrap_or(u64::MAX);
            let free = !w >> (i % 64);
            if free != 0 {
                let found = i + u64::from(free.trailing_zeros());
                return Some(if found < entries {
                    Some(base + found)
                } else {
                    None
                });
            }
            i = (i / 64 + 1) * 64;
        }
        Some(None)
    }

    /// First used cluster in `[from, limit)` within `from`'s block (`limit` is clamped to
    /// the block end), if the block is known. `Some(None)`: none used there.
    pub(crate) fn next_used_in_block(&self, from: u64, limit: u64) -> Option<Option<u64>> {
        let bits = self.block_bits;
        let block = from >> bits;
        let s = self.summary(block)?;
        let base = block << bits;
        let end = limit.min(base + self.entries());
        if s.used_count == 0 {
            return Some(None);
        }
        let mut i = from - base;
        while base + i < end {
            let w = s.used.get((i / 64) as usize).copied().unwrap_or(0);
            let used = w >> (i % 64);
            if used != 0 {
                let found = base + i + u64::from(used.trailing_zeros());
                return Some(if found < end { Some(found) } else { None });
            }
            i = (i / 64 + 1) * 64;
        }
        Some(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_search() {
        let mut ix = FreeIndex::new(7); // 128 entries per block
        ix.insert(0, |i| i < 70 || i == 100);
        assert_eq!(ix.next_free_in_block(0), Some(Some(70)));
        assert_eq!(ix.next_used_in_block(70, 128), Some(Some(100)));
        assert_eq!(ix.next_used_in_block(70, 90), Some(None));
        assert_eq!(ix.next_free_in_block(100), Some(Some(101)));
        assert_eq!(ix.next_free_in_block(128), None);
        ix.mark_used(70);
        assert_eq!(ix.next_free_in_block(0), Some(Some(71)));
        ix.insert(1, |_| true);
        assert_eq!(ix.next_free_in_block(128), Some(None));
        ix.mark_free(130);
        assert_eq!(ix.next_free_in_block(128), Some(Some(130)));
        assert_eq!(ix.is_used(129), Some(true));
        assert_eq!(ix.is_used(130), Some(false));
        assert_eq!(ix.is_used(1000), None);
    }

    #[test]
    fn small_blocks() {
        let mut ix = FreeIndex::new(2); // 4 entries per block
        ix.insert(0, |i| i != 3);
        assert_eq!(ix.next_free_in_block(0), Some(Some(3)));
        ix.mark_used(3);
        assert_eq!(ix.next_free_in_block(0), Some(None));
        assert_eq!(ix.next_used_in_block(0, 2), Some(Some(0)));
    }
}
