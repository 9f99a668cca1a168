//! The refcount engine proper.

use crate::error::RefcountError;
use crate::index::FreeIndex;
use qcow2_cache::{CacheId, Caches, Handle};
use qcow2_format::limits::{MAX_CLUSTER_OFFSET, MAX_REFTABLE_SIZE};
use qcow2_format::refcount::{RefcountCodec, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use qcow2_format::Geometry;
use qcow2_io::{Event, Storage, StorageExt};

/// Header offset of `refcount_table_offset` (be64) followed by `refcount_table_clusters`
/// (be32): the 12 bytes a table switch rewrites in one write.
const HEADER_REFTABLE_OFFSET: u64 = 48;

/// Why clusters are freed; decides whether the freed range is passed down to the storage as
/// a discard (QEMU's `Qcow2DiscardType` and its `pass-discard-*` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardType {
    /// Never passed down (COW replacement, rollback).
    Never,
    /// Always passed down (repair of leaks).
    Always,
    /// A guest discard request (`pass-discard-request`).
    Request,
    /// Snapshot deletion and related frees (`pass-discard-snapshot`, default on).
    Snapshot,
    /// Anything else: old refcount tables, L1 tables (`pass-discard-other`, default off).
    Other,
}

impl DiscardType {
    const fn index(self) -> usize {
        match self {
            DiscardType::Never => 0,
            DiscardType::Always => 1,
            DiscardType::Request => 2,
            DiscardType::Snapshot => 3,
            DiscardType::Other => 4,
        }
    }
}

/// Which discard types are passed down to the storage (QEMU's defaults: always, snapshot;
/// request only with `discard=unmap`; never `never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardPassthrough {
    /// `pass-discard-request`.
    pub request: bool,
    /// `pass-discard-snapshot`.
    pub snapshot: bool,
    /// `pass-discard-other`.
    pub other: bool,
}

impl Default for DiscardPassthrough {
    fn default() -> Self {
        Self {
            request: false,
            snapshot: true,
            other: false,
        }
    }
}

impl DiscardPassthrough {
    /// Whether clusters freed for `ty` are discarded in the storage.
    pub fn passes(&self, ty: DiscardType) -> bool {
        [false, true, self.request, self.snapshot, self.other][ty.index()]
    }
}

/// A host range whose clusters reached refcount 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedRange {
    /// Host offset of the first cluster.
    pub offset: u64,
    /// Length in bytes (whole clusters).
    pub len: u64,
    /// Why it was freed.
    pub discard: DiscardType,
}

/// A refcount change applied to every cluster of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add this amount.
    Increase(u64),
    /// Subtract this amount.
    Decrease(u64),
}

impl Change {
    fn inverse(self) -> Self {
        match self {
            Change::Increase(n) => Change::Decrease(n),
            Change::Decrease(n) => Change::Increase(n),
        }
    }
}

/// Internal outcome of one attempt: a new refcount block was hooked in (QEMU's `-EAGAIN`),
/// so the caller must restart its search, or a real error.
enum Fail {
    Again,
    Err(RefcountError),
}

impl From<RefcountError> for Fail {
    fn from(e: RefcountError) -> Self {
        Fail::Err(e)
    }
}

impl From<qcow2_cache::CacheError> for Fail {
    fn from(e: qcow2_cache::CacheError) -> Self {
        Fail::Err(e.into())
    }
}

impl From<qcow2_format::refcount::RefcountError> for Fail {
    fn from(e: qcow2_format::refcount::RefcountError) -> Self {
        Fail::Err(RefcountError::InvalidRequest {
            reason: codec_reason(e),
        })
    }
}

fn codec_reason(e: qcow2_format::refcount::RefcountError) -> &'static str {
    use qcow2_format::refcount::RefcountError as C;
    match e {
        C::IndexOutOfRange { .. } => "refcount index out of range",
        C::ValueTooLarge { .. } => "refcount value too large",
        _ => "refcount codec error",
    }
}

/// Bound on "again" restarts of one operation. Each restart hooks in a new refcount block,
/// and an allocation of `n` clusters can need at most a handful; the bound only turns a
/// logic error into a typed error instead of a hang.
const MAX_RESTARTS: u32 = 1 << 16;

/// The refcount table in memory, refcount blocks through the refcount-block cache, for every
/// `refcount_order`.
///
/// The engine does not own the caches: every operation borrows the image's [`Caches`], whose
/// storage it also uses for the refcount table and the header switch. Invariants it keeps:
/// - a crash at any point leaks clusters at most (new refcount blocks are written and flushed
///   before the table entry that points at them; a grown table is written and flushed before
///   the one header write that switches to it; the old table is freed afterwards);
/// - refcount decreases make the refcount-block cache depend on the L2 cache, so an
///   unreference reaches the disk before the free (invariant 1);
/// - with quarantine on, a cluster whose refcount reaches 0 is not handed out again until
///   [`RefcountEngine::release_quarantine`] is called after a durable flush (invariant 2).
#[derive(Debug)]
pub struct RefcountEngine {
    geometry: Geometry,
    codec: RefcountCodec,
    reftable_offset: u64,
    /// Raw refcount-table entries; length is a whole number of clusters of entries.
    reftable: Vec<u64>,
    index: FreeIndex,
    quarantine_enabled: bool,
    quarantine: Vec<FreedRange>,
    passthrough: DiscardPassthrough,
    /// Freed ranges waiting to be discarded in the storage (without quarantine).
    pending_discards: Vec<FreedRange>,
    /// A cluster the layer above keeps appending into (the byte allocator's partially used
    /// cluster), and whether it has been freed since it was watched.
    watched: Option<u64>,
    watched_freed: bool,
    /// Bumped whenever the refcount table changes (a block hooked in, the table moved), so
    /// callers that mirror it (overlap checks) can tell cheaply whether to refresh.
    reftable_generation: u64,
}

impl RefcountEngine {
    /// Reads the refcount table (`refcount_table_clusters` clusters at `reftable_offset`) and
    /// builds the engine. The size is checked against QEMU's 8 MiB limit before anything is
    /// allocated.
    pub fn open(
        geometry: Geometry,
        reftable_offset: u64,
        reftable_clusters: u32,
        storage: &dyn Storage,
    ) -> Result<Self, RefcountError> {
        let bytes = u64::from(reftable_clusters)
            .checked_mul(geometry.cluster_size())
            .filter(|&b| b <= MAX_REFTABLE_SIZE)
            .ok_or(RefcountError::ReftableTooLarge {
                clusters: u64::from(reftable_clusters),
            })?;
        if !geometry.is_cluster_aligned(reftable_offset)
            || reftable_offset.checked_add(bytes).is_none()
        {
            return Err(RefcountError::InvalidReftable {
                reason: format!("Reference count table offset invalid ({reftable_offset:#x})"),
            });
        }
        storage.event(Event::ReftableLoad);
        let mut raw = vec![0u8; bytes as usize];
        storage
            .read_at(&mut raw, reftable_offset)
            .map_err(|e| RefcountError::io("Failed to read the refcount table", e))?;
        let reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(Self::from_table(geometry, reftable_offset, reftable))
    }

    /// Builds the engine from an in-memory refcount table (raw entries) located at
    /// `reftable_offset`. The table is padded with zero entries to a whole cluster.
    pub fn from_table(geometry: Geometry, reftable_offset: u64, mut reftable: Vec<u64>) -> Self {
        let per_cluster = geometry.table_entries_per_cluster() as usize;
        let len = reftable.len().div_ceil(per_cluster).max(1) * per_cluster;
        reftable.resize(len, 0);
        Self {
            geometry,
            codec: RefcountCodec::for_geometry(&geometry),
            reftable_offset,
            reftable,
            index: FreeIndex::new(geometry.refcount_block_bits()),
            quarantine_enabled: true,
            quarantine: Vec::new(),
            passthrough: DiscardPassthrough::default(),
            pending_discards: Vec::new(),
            watched: None,
            watched_freed: false,
            reftable_generation: next_generation(),
        }
    }

    /// The image geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Host offset of the refcount table.
    pub fn reftable_offset(&self) -> u64 {
        self.reftable_offset
    }

    /// Size of the refcount table in clusters.
    pub fn reftable_clusters(&self) -> u64 {
        self.reftable.len() as u64 / self.geometry.table_entries_per_cluster()
    }

    /// The raw refcount-table entries.
    pub fn reftable(&self) -> &[u64] {
        &self.reftable
    }

    /// A value that changes whenever the refcount table changes (new block hooked in, table
    /// grown and moved); unique across engine instances. Equal values mean `reftable()` and
    /// `refblock_offsets()` are unchanged.
    pub fn reftable_generation(&self) -> u64 {
        self.reftable_generation
    }

    /// Host offsets of every allocated refcount block (for overlap checks).
    pub fn refblock_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// Turns the quarantine of freed clusters on or off (on by default). Turning it off
    /// releases what is held, so call it only at a durable point.
    pub fn set_quarantine(&mut self, enabled: bool) {
        if !enabled {
            self.release_quarantine_unchecked();
        }
        self.quarantine_enabled = enabled;
    }

    /// Which freed clusters are discarded in the storage.
    pub fn set_discard_passthrough(&mut self, passthrough: DiscardPassthrough) {
        self.passthrough = passthrough;
    }

    /// Number of clusters held in quarantine.
    pub fn quarantined_clusters(&self) -> u64 {
        self.quarantine
            .iter()
            .map(|r| r.len >> self.geometry.cluster_bits())
            .sum()
    }

    /// Watches cluster `cluster` (or stops watching): if its refcount reaches 0 the next
    /// [`RefcountEngine::take_watched_freed`] returns `true`. The byte allocator watches the
    /// cluster it appends compressed data into, so that it never appends into a cluster that
    /// was freed and handed to someone else meanwhile.
    pub fn watch_cluster(&mut self, cluster: Option<u64>) {
        self.watched = cluster;
        self.watched_freed = false;
    }

    /// Whether the watched cluster reached refcount 0 since it was watched (and resets it).
    pub fn take_watched_freed(&mut self) -> bool {
        std::mem::take(&mut self.watched_freed)
    }

    /// Lowest cluster index that may be free (the allocator's hint).
    pub fn free_cluster_hint(&self) -> u64 {
        self.index.hint
    }

    /// Refcount of the cluster at index `cluster`. Clusters beyond the table, or covered by
    /// a table entry of 0, have refcount 0.
    pub fn get(&self, caches: &mut Caches, cluster: u64) -> Result<u64, RefcountError> {
        let block = self.geometry.reftable_index(cluster);
        let Some(offset) = self.refblock_offset(block)? else {
            return Ok(0);
        };
        let h = caches.get(CacheId::Refblock, offset)?;
        let r = self
            .codec
            .get(caches.data(&h), self.geometry.refblock_index(cluster));
        caches.put(h)?;
        r.map_err(|e| RefcountError::InvalidRequest {
            reason: codec_reason(e),
        })
    }

    /// Block offset for refcount-table index `block`, `None` if unallocated or beyond the
    /// table; corruption if the entry is unaligned or has reserved bits.
    fn refblock_offset(&self, block: u64) -> Result<Option<u64>, RefcountError> {
        let Some(&raw) = usize::try_from(block)
            .ok()
            .and_then(|b| self.reftable.get(b))
        else {
            return Ok(None);
        };
        let offset = raw & REFT_OFFSET_MASK;
        if raw & REFT_RESERVED_MASK != 0 || !self.geometry.is_cluster_aligned(offset) {
            return Err(RefcountError::UnalignedRefblock {
                offset: raw,
                index: block,
            });
        }
        Ok((offset != 0).then_some(offset))
    }

    /// Applies `change` to every cluster touched by `[offset, offset + length)`.
    ///
    /// All or nothing: if a cluster would overflow or underflow, or I/O fails midway, what was
    /// already applied is undone (best effort, as QEMU) and the error returned. A missing
    /// refcount block is allocated and hooked in first.
    pub fn update(
        &mut self,
        caches: &mut Caches,
        offset: u64,
        length: u64,
        change: Change,
        discard: DiscardType,
    ) -> Result<(), RefcountError> {
        if length == 0 {
            return Ok(());
        }
        let (first, last) = self.cluster_range(offset, length)?;
        for _ in 0..MAX_RESTARTS {
            match self.update_clusters(caches, first, last, change, discard) {
                Ok(()) => return Ok(()),
                Err(Fail::Again) => continue,
                Err(Fail::Err(e)) => return Err(e),
            }
        }
        Err(RefcountError::InvalidRequest {
            reason: "refcount update did not converge",
        })
    }

    /// [`RefcountEngine::update`] for allocators: if a refcount block had to be placed
    /// first, nothing is applied and `Ok(false)` is returned, because the block may have
    /// taken a cluster of the range (QEMU's `-EAGAIN`): search for space again. `Ok(true)`:
    /// the change was applied.
    pub fn try_update(
        &mut self,
        caches: &mut Caches,
        offset: u64,
        length: u64,
        change: Change,
        discard: DiscardType,
    ) -> Result<bool, RefcountError> {
        if length == 0 {
            return Ok(true);
        }
        let (first, last) = self.cluster_range(offset, length)?;
        match self.update_clusters(caches, first, last, change, discard) {
            Ok(()) => Ok(true),
            Err(Fail::Again) => Ok(false),
            Err(Fail::Err(e)) => Err(e),
        }
    }

    /// First and last cluster index of a byte range, checked against the addressable limit.
    fn cluster_range(&self, offset: u64, length: u64) -> Result<(u64, u64), RefcountError> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= MAX_CLUSTER_OFFSET + 1)
            .ok_or(RefcountError::OffsetTooLarge {
                offset: offset.saturating_add(length),
            })?;
        Ok((
            self.geometry.cluster_index(offset),
            self.geometry.cluster_index(end - 1),
        ))
    }

    fn update_clusters(
        &mut self,
        caches: &mut Caches,
        first: u64,
        last: u64,
        change: Change,
        discard: DiscardType,
    ) -> Result<(), Fail> {
        // No refcount table QEMU accepts (8 MiB) can describe a cluster this far: refuse
        // before any block or index state is created for it (a garbage offset from a damaged
        // L2 entry must not make the index or the table grow without bound).
        let max_blocks = MAX_REFTABLE_SIZE / 8;
        if self.geometry.reftable_index(last) >= max_blocks {
            return Err(Fail::Err(RefcountError::ReftableTooLarge {
                clusters: (self.geometry.reftable_index(last) + 1)
                    .div_ceil(self.geometry.table_entries_per_cluster()),
            }));
        }
        // Every refcount block of the range must exist before anything is applied: a block
        // allocated midway would be placed while the first part of the range is still
        // counted, land beyond it, and leave a hole when that part is rolled back. Placed
        // first, the block takes the cluster the range was meant to start at and the retry
        // moves the range one cluster on (reference §2.4, iotest 121).
        //
        // For a run of several clusters the block goes after the run instead (as QEMU's
        // allocator leaves its free-cluster hint there): the run keeps its place, and when
        // the table must grow, the new structures land after the run too. Placed at the
        // run's start, each block would shift the run, and a table growth placed inside
        // the run would make it jump past the new table, leaving the whole run as a hole.
        let bits = self.geometry.refcount_block_bits();
        let floor = if last > first { last + 1 } else { 0 };
        for block in (first >> bits)..=(last >> bits) {
            if self.refblock_offset(block)?.is_none() {
                let at = first.max(block << bits);
                return match change {
                    Change::Increase(_) => Err(self.alloc_refcount_block(caches, at, floor)),
                    Change::Decrease(n) => Err(Fail::Err(RefcountError::Underflow {
                        cluster_offset: at << self.geometry.cluster_bits(),
                        refcount: 0,
                        subtrahend: n,
                    })),
                };
            }
        }
        if matches!(change, Change::Decrease(_)) {
            // Invariant 1: the L2 tables that stopped referencing these clusters must reach
            // the disk before the refcount blocks that free them.
            caches.set_dependency(CacheId::Refblock, CacheId::L2)?;
        }
        let mut cluster = first;
        while cluster <= last {
            let block = self.geometry.reftable_index(cluster);
            let block_last =
                last.min(((block + 1) << self.geometry.refcount_block_bits()).saturating_sub(1));
            let done =
                match self.update_in_block(caches, block, cluster, block_last, change, discard) {
                    Ok(()) => block_last + 1,
                    Err((applied_to, fail)) => {
                        // Undo [first, applied_to): the opposite change, never discarded.
                        if applied_to > first {
                            let _ = self.update_clusters(
                                caches,
                                first,
                                applied_to - 1,
                                change.inverse(),
                                DiscardType::Never,
                            );
                        }
                        return Err(fail);
                    }
                };
            cluster = done;
        }
        self.flush_pending_discards(caches);
        Ok(())
    }

    /// Updates clusters `[from, to]` (all in refcount block `block`). On failure returns the
    /// first cluster not updated, with the reason.
    fn update_in_block(
        &mut self,
        caches: &mut Caches,
        block: u64,
        from: u64,
        to: u64,
        change: Change,
        discard: DiscardType,
    ) -> Result<(), (u64, Fail)> {
        let offset = match self.refblock_offset(block) {
            Ok(Some(o)) => o,
            Ok(None) => {
                return Err((from, self.alloc_refcount_block(caches, from, 0)));
            }
            Err(e) => return Err((from, Fail::Err(e))),
        };
        let h = caches
            .get(CacheId::Refblock, offset)
            .map_err(|e| (from, Fail::from(e)))?;
        self.summarise_from_handle(caches, block, &h);
        let mut c = from;
        let mut result = Ok(());
        let mut dirty = false;
        while c <= to {
            let i = self.geometry.refblock_index(c);
            let old = match self.codec.get(caches.data(&h), i) {
                Ok(v) => v,
                Err(e) => {
                    result = Err((c, Fail::from(e)));
                    break;
                }
            };
            let new = match change {
                Change::Increase(n) => {
                    match old.checked_add(n).filter(|&v| v <= self.codec.max()) {
                        Some(v) => v,
                        None => {
                            result = Err((
                                c,
                                Fail::Err(RefcountError::Overflow {
                                    cluster_offset: c << self.geometry.cluster_bits(),
                                    refcount: old,
                                    addend: n,
                                    max: self.codec.max(),
                                }),
                            ));
                            break;
                        }
                    }
                }
                Change::Decrease(n) => match old.checked_sub(n) {
                    Some(v) => v,
                    None => {
                        result = Err((
                            c,
                            Fail::Err(RefcountError::Underflow {
                                cluster_offset: c << self.geometry.cluster_bits(),
                                refcount: old,
                                subtrahend: n,
                            }),
                        ));
                        break;
                    }
                },
            };
            if let Err(e) = self.codec.set(caches.data_mut(&h), i, new) {
                result = Err((c, Fail::from(e)));
                break;
            }
            dirty = true;
            if old == 0 && new != 0 {
                self.index.mark_used(c);
            } else if old != 0 && new == 0 {
                self.cluster_freed(caches, c, discard, offset);
            }
            c += 1;
        }
        if dirty {
            caches.mark_dirty(&h);
        }
        if let Err(e) = caches.put(h) {
            // Write-through write-back failed: the entry stays dirty in the cache, so the
            // change is not lost; report it like any other failure after full application.
            if result.is_ok() {
                return Err((to + 1, Fail::from(e)));
            }
        }
        result
    }

    /// Builds the index summary of `block` from a pinned refcount block, once.
    fn summarise_from_handle(&mut self, caches: &Caches, block: u64, h: &Handle) {
        if self.index.is_known(block) {
            return;
        }
        let data = caches.data(h);
        let codec = self.codec;
        self.index.insert(block, |i| codec.get(data, i) != Ok(0));
    }

    /// Makes sure the index knows `block`, reading its refcount block through the cache.
    fn summarise(&mut self, caches: &mut Caches, block: u64) -> Result<(), RefcountError> {
        if self.index.is_known(block) {
            return Ok(());
        }
        match self.refblock_offset(block)? {
            None => self.index.insert(block, |_| false),
            Some(offset) => {
                let h = caches.get(CacheId::Refblock, offset)?;
                self.summarise_from_handle(caches, block, &h);
                caches.put(h)?;
            }
        }
        Ok(())
    }

    /// A cluster's refcount reached 0: drop cached tables it held, then quarantine it (or
    /// free it in the index right away).
    fn cluster_freed(
        &mut self,
        caches: &mut Caches,
        cluster: u64,
        discard: DiscardType,
        holder: u64,
    ) {
        let offset = cluster << self.geometry.cluster_bits();
        if self.watched == Some(cluster) {
            self.watched_freed = true;
        }
        // A freed cluster can no longer hold a table; a stale cached copy must never be
        // written back over whatever the cluster holds next.
        if offset != holder && caches.is_cached(CacheId::Refblock, offset) {
            caches.discard(CacheId::Refblock, offset);
        }
        let slice = caches.entry_size(CacheId::L2) as u64;
        let mut s = offset;
        while slice > 0 && s < offset + self.geometry.cluster_size() {
            if caches.is_cached(CacheId::L2, s) {
                caches.discard(CacheId::L2, s);
            }
            s += slice;
        }
        let range = FreedRange {
            offset,
            len: self.geometry.cluster_size(),
            discard,
        };
        if self.quarantine_enabled {
            push_merged(&mut self.quarantine, range);
        } else {
            self.index.mark_free(cluster);
            if self.passthrough.passes(discard) {
                push_merged(&mut self.pending_discards, range);
            }
        }
    }

    /// Issues queued discards (only used without quarantine; errors are ignored, as QEMU).
    fn flush_pending_discards(&mut self, caches: &mut Caches) {
        if self.pending_discards.is_empty() {
            return;
        }
        let storage = caches.storage().clone();
        for r in self.pending_discards.drain(..) {
            let _ = storage.discard(r.offset, r.len);
        }
    }

    /// Releases the quarantine: call after the metadata that stopped referencing the freed
    /// clusters is durable (both caches flushed and a storage flush issued). The clusters
    /// become allocatable; ranges whose discard type passes through are discarded in the
    /// storage. Returns the released ranges.
    pub fn release_quarantine(&mut self, caches: &mut Caches) -> Vec<FreedRange> {
        let released = std::mem::take(&mut self.quarantine);
        let storage = caches.storage().clone();
        let mut out = Vec::with_capacity(released.len());
        for r in released {
            // A cluster freed and then referenced again (a rolled-back decrease) is in use:
            // only clusters still at refcount 0 are released.
            let first = self.geometry.cluster_index(r.offset);
            let n = r.len >> self.geometry.cluster_bits();
            let mut run_start = None;
            for c in first..first + n {
                let free = matches!(self.get(caches, c), Ok(0));
                if free {
                    self.index.mark_free(c);
                    run_start.get_or_insert(c);
                }
                if !free || c + 1 == first + n {
                    if let Some(s) = run_start.take() {
                        let end = if free { c + 1 } else { c };
                        let range = FreedRange {
                            offset: s << self.geometry.cluster_bits(),
                            len: (end - s) << self.geometry.cluster_bits(),
                            discard: r.discard,
                        };
                        if self.passthrough.passes(r.discard) {
                            let _ = storage.discard(range.offset, range.len);
                        }
                        out.push(range);
                    }
                }
            }
        }
        out
    }

    fn release_quarantine_unchecked(&mut self) {
        for r in std::mem::take(&mut self.quarantine) {
            let first = self.geometry.cluster_index(r.offset);
            for c in first..first + (r.len >> self.geometry.cluster_bits()) {
                self.index.mark_free(c);
            }
        }
    }

    /// Finds `count` contiguous free clusters without taking them (QEMU's
    /// `alloc_clusters_noref`). Returns the first cluster index.
    pub fn find_free(&mut self, caches: &mut Caches, count: u64) -> Result<u64, RefcountError> {
        if count == 0 {
            return Err(RefcountError::InvalidRequest {
                reason: "allocation of zero clusters",
            });
        }
        self.find_free_from(caches, 0, count)
    }

    /// [`Self::find_free`] for a run starting at cluster `from` or later.
    fn find_free_from(
        &mut self,
        caches: &mut Caches,
        from: u64,
        count: u64,
    ) -> Result<u64, RefcountError> {
        let limit = self.geometry.cluster_index(MAX_CLUSTER_OFFSET) + 1;
        let mut start = self.next_free(caches, self.index.hint.max(from), limit)?;
        if from <= self.index.hint {
            // Everything below the first free cluster is in use.
            self.index.hint = start;
        }
        loop {
            let end = start
                .checked_add(count)
                .ok_or(RefcountError::OffsetTooLarge { offset: u64::MAX })?;
            if end > limit {
                return Err(RefcountError::OffsetTooLarge {
                    offset: end << self.geometry.cluster_bits(),
                });
            }
            match self.next_used(caches, start, end)? {
                None => return Ok(start),
                Some(used) => start = self.next_free(caches, used + 1, limit)?,
            }
        }
    }

    /// First free cluster at or after `from`.
    fn next_free(
        &mut self,
        caches: &mut Caches,
        from: u64,
        limit: u64,
    ) -> Result<u64, RefcountError> {
        let bits = self.geometry.refcount_block_bits();
        let mut c = from;
        while c < limit {
            let block = c >> bits;
            self.summarise(caches, block)?;
            match self.index.next_free_in_block(c) {
                Some(Some(found)) => return Ok(found),
                _ => c = (block + 1) << bits,
            }
        }
        Err(RefcountError::OffsetTooLarge {
            offset: limit << self.geometry.cluster_bits(),
        })
    }

    /// First used cluster in `[from, end)`, if any.
    fn next_used(
        &mut self,
        caches: &mut Caches,
        from: u64,
        end: u64,
    ) -> Result<Option<u64>, RefcountError> {
        let bits = self.geometry.refcount_block_bits();
        let mut c = from;
        while c < end {
            let block = c >> bits;
            self.summarise(caches, block)?;
            match self.index.next_used_in_block(c, end) {
                Some(Some(found)) => return Ok(Some(found)),
                _ => c = (block + 1) << bits,
            }
        }
        Ok(None)
    }

    /// Allocates `count` contiguous clusters (refcount 1 each) and returns the host offset
    /// of the first (QEMU's `qcow2_alloc_clusters`). The refcounts are in the refcount-block
    /// cache; callers that link the clusters into an L2 table make the L2 cache depend on
    /// the refcount-block cache first.
    pub fn alloc_clusters(
        &mut self,
        caches: &mut Caches,
        count: u64,
    ) -> Result<u64, RefcountError> {
        caches.storage().event(Event::ClusterAlloc);
        for _ in 0..MAX_RESTARTS {
            let first = self.find_free(caches, count)?;
            match self.update_clusters(
                caches,
                first,
                first + count - 1,
                Change::Increase(1),
                DiscardType::Never,
            ) {
                Ok(()) => return Ok(first << self.geometry.cluster_bits()),
                // A refcount block was just placed, possibly where we meant to put the data:
                // search again (this is how QEMU leaves no holes).
                Err(Fail::Again) => continue,
                Err(Fail::Err(e)) => return Err(e),
            }
        }
        Err(RefcountError::InvalidRequest {
            reason: "cluster allocation did not converge",
        })
    }

    /// Allocates up to `count` clusters starting exactly at host offset `offset` (cluster
    /// aligned); stops at the first cluster in use. Returns how many were allocated (QEMU's
    /// `qcow2_alloc_clusters_at`).
    pub fn alloc_clusters_at(
        &mut self,
        caches: &mut Caches,
        offset: u64,
        count: u64,
    ) -> Result<u64, RefcountError> {
        if !self.geometry.is_cluster_aligned(offset) {
            return Err(RefcountError::InvalidRequest {
                reason: "allocation offset not cluster aligned",
            });
        }
        if count == 0 {
            return Ok(0);
        }
        let first = self.geometry.cluster_index(offset);
        let end = first
            .checked_add(count)
            .ok_or(RefcountError::OffsetTooLarge { offset: u64::MAX })?;
        if end > self.geometry.cluster_index(MAX_CLUSTER_OFFSET) + 1 {
            return Err(RefcountError::OffsetTooLarge {
                offset: end << self.geometry.cluster_bits(),
            });
        }
        for _ in 0..MAX_RESTARTS {
            let n = match self.next_used(caches, first, end)? {
                Some(used) => used - first,
                None => count,
            };
            if n == 0 {
                return Ok(0);
            }
            match self.update_clusters(
                caches,
                first,
                first + n - 1,
                Change::Increase(1),
                DiscardType::Never,
            ) {
                Ok(()) => return Ok(n),
                Err(Fail::Again) => continue,
                Err(Fail::Err(e)) => return Err(e),
            }
        }
        Err(RefcountError::InvalidRequest {
            reason: "cluster allocation did not converge",
        })
    }

    /// Frees `[offset, offset + length)` (refcount −1 on each touched cluster; QEMU's
    /// `qcow2_free_clusters`).
    pub fn free_clusters(
        &mut self,
        caches: &mut Caches,
        offset: u64,
        length: u64,
        discard: DiscardType,
    ) -> Result<(), RefcountError> {
        caches.storage().event(Event::ClusterFree);
        self.update(caches, offset, length, Change::Decrease(1), discard)
    }

    /// Allocates and hooks in the refcount block that covers `cluster`, growing the refcount
    /// table if needed (QEMU's `alloc_refcount_block`). Always ends with [`Fail::Again`] on
    /// success: the caller restarts, because the block may have taken the cluster it wanted.
    /// Places the missing refcount block for `cluster` at the first free cluster at or
    /// after `floor` (see [`Self::update_clusters`]).
    fn alloc_refcount_block(&mut self, caches: &mut Caches, cluster: u64, floor: u64) -> Fail {
        match self.alloc_refcount_block_inner(caches, cluster, floor) {
            Ok(()) => Fail::Again,
            Err(f) => f,
        }
    }

    fn alloc_refcount_block_inner(
        &mut self,
        caches: &mut Caches,
        cluster: u64,
        floor: u64,
    ) -> Result<(), Fail> {
        let storage = caches.storage().clone();
        storage.event(Event::RefblockAlloc);
        // QEMU flushes the L2 cache here, so that the new block cannot overwrite a cluster an
        // on-disk L2 table still references. Quarantine (invariant 2) already guarantees
        // that: no cluster freed since the last durable flush is handed out, so the new
        // block's cluster is unreferenced on disk and that barrier is not needed — unless
        // the quarantine is off.
        if !self.quarantine_enabled {
            caches.flush(CacheId::L2)?;
        }

        let block = self.geometry.reftable_index(cluster);
        let new_cluster = self.find_free_from(caches, floor, 1)?;
        if new_cluster == 0 {
            return Err(Fail::Err(RefcountError::RefblockAtZero));
        }
        let new_offset = new_cluster << self.geometry.cluster_bits();

        let h = if self.geometry.reftable_index(new_cluster) == block {
            // The block describes itself: its own refcount lives in it.
            let h = caches.get_empty(CacheId::Refblock, new_offset)?;
            caches.data_mut(&h).fill(0);
            if let Err(e) = self.codec.set(
                caches.data_mut(&h),
                self.geometry.refblock_index(new_cluster),
                1,
            ) {
                caches.put(h)?;
                caches.discard(CacheId::Refblock, new_offset);
                return Err(Fail::from(e));
            }
            self.index.insert(block, |_| false);
            self.index.mark_used(new_cluster);
            h
        } else {
            // Counted by another block, which may itself need allocating (then: again). That
            // increment and the new block reach the disk together in the flush below, before
            // the table entry points at the block (QEMU flushes once more in between).
            self.update_clusters(
                caches,
                new_cluster,
                new_cluster,
                Change::Increase(1),
                DiscardType::Never,
            )?;
            let h = caches.get_empty(CacheId::Refblock, new_offset)?;
            caches.data_mut(&h).fill(0);
            self.index.insert(block, |_| false);
            h
        };
        storage.event(Event::RefblockAllocWrite);
        caches.mark_dirty(&h);
        caches.put(h)?;
        if let Err(e) = caches.flush(CacheId::Refblock) {
            return Err(Fail::from(e));
        }

        if (block as usize) < self.reftable.len() {
            storage.event(Event::RefblockAllocHookup);
            let entry_offset = self.reftable_offset + block * 8;
            storage
                .write_sync(&new_offset.to_be_bytes(), entry_offset)
                .map_err(|e| RefcountError::io("Failed to hook up a new refcount block", e))?;
            if let Some(slot) = self.reftable.get_mut(block as usize) {
                *slot = new_offset;
            }
            self.reftable_generation = next_generation();
            return Ok(());
        }

        storage.event(Event::ReftableGrow);
        self.grow_table(caches, cluster, block, new_offset)?;
        Ok(())
    }

    /// Grows the refcount table so that index `new_block` can hold `new_offset` (QEMU's
    /// `qcow2_refcount_area`): new refcount blocks covering the new metadata area and the new
    /// table are placed right after the region the existing blocks describe, written and
    /// flushed; then the table is written and flushed; then one header write switches to it;
    /// then the old table is freed. A crash before the switch leaks nothing the checker can
    /// see; after it, the old table is leaked at most.
    fn grow_table(
        &mut self,
        caches: &mut Caches,
        cluster: u64,
        new_block: u64,
        new_offset: u64,
    ) -> Result<(), RefcountError> {
        let g = self.geometry;
        let storage = caches.storage().clone();
        let bits = g.refcount_block_bits();
        let per_table_cluster = g.table_entries_per_cluster();
        let new_cluster = g.cluster_index(new_offset);
        let blocks_used = (cluster.max(new_cluster) >> bits) + 1;
        let area_start = blocks_used << bits;

        // Fixed point: `area_blocks` new refcount blocks must describe themselves and the
        // table that follows them; the table gets 50 % spare entries so growth amortises.
        let mut area_blocks = 0u64;
        let table_clusters = loop {
            let entries = blocks_used + area_blocks;
            let generous = entries + entries.div_ceil(2);
            let tc = generous.div_ceil(per_table_cluster);
            let needed = (area_blocks + tc).div_ceil(g.refcount_block_entries());
            if needed <= area_blocks {
                break tc;
            }
            area_blocks = needed;
        };
        if table_clusters
            .checked_mul(g.cluster_size())
            .is_none_or(|b| b > MAX_REFTABLE_SIZE)
        {
            return Err(RefcountError::ReftableTooLarge {
                clusters: table_clusters,
            });
        }
        let area_len = area_blocks + table_clusters;
        let area_end = area_start + area_len;
        if area_end > g.cluster_index(MAX_CLUSTER_OFFSET) {
            return Err(RefcountError::OffsetTooLarge {
                offset: area_end << g.cluster_bits(),
            });
        }
        let table_cluster = area_start + area_blocks;
        let table_offset = table_cluster << g.cluster_bits();

        let mut new_table = self.reftable.clone();
        new_table.resize((table_clusters * per_table_cluster) as usize, 0);
        if let Some(slot) = new_table.get_mut(new_block as usize) {
            *slot = new_offset;
        }
        let result = (|| -> Result<(), RefcountError> {
            for i in 0..area_blocks {
                let b = blocks_used + i;
                let off = (area_start + i) << g.cluster_bits();
                if let Some(slot) = new_table.get_mut(b as usize) {
                    *slot = off;
                }
                let h = caches.get_empty(CacheId::Refblock, off)?;
                caches.data_mut(&h).fill(0);
                let lo = area_start.max(b << bits);
                let hi = area_end.min((b + 1) << bits);
                for c in lo..hi {
                    if let Err(e) = self.codec.set(caches.data_mut(&h), g.refblock_index(c), 1) {
                        caches.put(h)?;
                        return Err(RefcountError::InvalidRequest {
                            reason: codec_reason(e),
                        });
                    }
                }
                caches.mark_dirty(&h);
                caches.put(h)?;
            }
            storage.event(Event::RefblockAllocWriteBlocks);
            caches.flush(CacheId::Refblock)?;

            storage.event(Event::RefblockAllocWriteTable);
            let mut bytes = Vec::with_capacity(new_table.len() * 8);
            for e in &new_table {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            storage
                .write_sync(&bytes, table_offset)
                .map_err(|e| RefcountError::io("Failed to write the new refcount table", e))?;

            storage.event(Event::RefblockAllocSwitchTable);
            let mut switch = [0u8; 12];
            switch[..8].copy_from_slice(&table_offset.to_be_bytes());
            switch[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
            storage
                .write_sync(&switch, HEADER_REFTABLE_OFFSET)
                .map_err(|e| RefcountError::io("Failed to switch to the new refcount table", e))?;
            Ok(())
        })();
        if let Err(e) = result {
            // The new blocks were never hooked in: drop them so they are not written later,
            // and forget their summaries (rebuilt from the unchanged table on demand).
            for i in 0..area_blocks {
                let off = (area_start + i) << g.cluster_bits();
                if caches.is_cached(CacheId::Refblock, off) {
                    caches.discard(CacheId::Refblock, off);
                }
                self.index.forget(blocks_used + i);
            }
            return Err(e);
        }

        let old_offset = self.reftable_offset;
        let old_clusters = self.reftable_clusters();
        self.reftable = new_table;
        self.reftable_offset = table_offset;
        self.reftable_generation = next_generation();
        for i in 0..area_blocks {
            let b = blocks_used + i;
            self.index.forget(b);
            let lo = area_start.max(b << bits);
            let hi = area_end.min((b + 1) << bits);
            self.index.insert(b, |e| {
                let c = (b << bits) + e;
                c >= lo && c < hi
            });
        }
        // The old table is garbage now; failing to free it only leaks.
        let _ = self.update(
            caches,
            old_offset,
            old_clusters << g.cluster_bits(),
            Change::Decrease(1),
            DiscardType::Other,
        );
        Ok(())
    }
}

/// A fresh table generation, unique across engine instances (an image that reopens its
/// engine must never see an old value again).
fn next_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Appends `r`, merging it into the last range when contiguous with the same discard type.
fn push_merged(list: &mut Vec<FreedRange>, r: FreedRange) {
    if let Some(last) = list.last_mut() {
        if last.discard == r.discard && last.offset + last.len == r.offset {
            last.len += r.len;
            return;
        }
    }
    list.push(r);
}
