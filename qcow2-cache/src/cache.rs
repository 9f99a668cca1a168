//! The two metadata caches, their slots and the ordering rules between them.

use crate::{CacheError, CacheOptions, OverlapError};
use hashbrown::HashMap;
use qcow2_io::{Event, Storage};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which of the two metadata caches (QEMU has exactly these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheId {
    /// The L2 table cache; entries are L2 slices (a whole table or a power-of-two part).
    L2,
    /// The refcount-block cache; entries are whole refcount blocks (one cluster).
    Refblock,
}

impl CacheId {
    /// Both caches.
    pub const ALL: [CacheId; 2] = [CacheId::L2, CacheId::Refblock];

    /// QEMU's name of what the cache holds, used in error messages: `"L2 table"` or
    /// `"refcount block"`.
    pub const fn name(self) -> &'static str {
        match self {
            CacheId::L2 => "L2 table",
            CacheId::Refblock => "refcount block",
        }
    }

    /// The blkdebug event reported before an entry is read from storage.
    pub const fn load_event(self) -> Event {
        match self {
            CacheId::L2 => Event::L2Load,
            CacheId::Refblock => Event::RefblockLoad,
        }
    }

    /// The blkdebug event reported before an entry is written back (QEMU's
    /// `qcow2_cache_entry_flush`).
    pub const fn update_event(self) -> Event {
        match self {
            CacheId::L2 => Event::L2Update,
            CacheId::Refblock => Event::RefblockUpdatePart,
        }
    }

    const fn index(self) -> usize {
        match self {
            CacheId::L2 => 0,
            CacheId::Refblock => 1,
        }
    }
}

impl fmt::Display for CacheId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pre-write veto (invariant 5). Called for every entry write-back, after the dependency
/// flush and before the event and the write; an `Err` means nothing is written and the entry
/// stays dirty. Implemented by the layer that knows the live metadata (QEMU's
/// `qcow2_pre_write_overlap_check`; the L2 cache should ignore "active L2", the refblock cache
/// "refcount block" — the `id` says which cache is writing).
pub trait OverlapCheck: Send + Sync {
    /// Returns `Err` if writing `[offset, offset + len)` for cache `id` would overwrite
    /// metadata other than the table being written.
    fn check_write(&self, id: CacheId, offset: u64, len: u64) -> Result<(), OverlapError>;
}

/// Counters of one cache, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get`/`get_empty` calls that found the entry cached.
    pub hits: u64,
    /// `get`/`get_empty` calls that had to (re)use a slot.
    pub misses: u64,
    /// Entries read from storage.
    pub loads: u64,
    /// Entries dropped to make room for another (clean or dirty).
    pub evictions: u64,
    /// Evictions that first wrote the victim back.
    pub dirty_evictions: u64,
    /// Entries written back successfully.
    pub writes: u64,
    /// Entry write-backs that failed (storage error or overlap veto); the entry stayed dirty.
    pub write_errors: u64,
    /// Storage flush barriers issued on behalf of this cache.
    pub barriers: u64,
}

/// A pinned cache entry. Obtained from [`Caches::get`] / [`Caches::get_empty`], it keeps the
/// entry in memory (never evicted) until it is given back to [`Caches::put`]. It is not a
/// borrow: data is reached through `Caches::data(&handle)`, so no reference into the cache
/// outlives a call that might evict, and nested cache use (a refcount update inside an L2
/// update) cannot alias. Dropping a handle without `put` leaks the pin.
#[derive(Debug)]
#[must_use = "a cache handle pins its entry until it is passed to Caches::put"]
pub struct Handle {
    id: CacheId,
    slot: u32,
    offset: u64,
    owner: u64,
}

impl Handle {
    /// The cache holding the entry.
    pub fn cache(&self) -> CacheId {
        self.id
    }

    /// Host offset of the table (slice) the entry holds.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Slot link terminator for the intrusive replacement list.
const NIL: u32 = u32::MAX;

/// Descriptor of one entry; the bytes live in the cache's contiguous buffer at
/// `slot * entry_size`.
#[derive(Debug, Clone)]
struct Slot {
    /// Host offset of the table; 0 marks an empty slot (offset 0 is the header, never a
    /// table).
    offset: u64,
    /// Value of the cache's release counter when the last pin was dropped.
    lru: u64,
    /// Number of live handles.
    pins: u32,
    /// Modified since it was loaded or last written back.
    dirty: bool,
    /// Discarded while pinned: the map no longer points here, nothing will be written, and
    /// the slot empties when its last handle is put.
    orphan: bool,
    /// Links in the replacement list, which holds exactly the unpinned slots: empty slots
    /// first, then occupied ones by release time. The head is the next victim.
    prev: u32,
    next: u32,
    /// Lost-update guard: CRC-32 of the bytes when the entry last became clean.
    #[cfg(debug_assertions)]
    crc: u32,
}

impl Slot {
    fn empty() -> Self {
        Slot {
            offset: 0,
            lru: 0,
            pins: 0,
            dirty: false,
            orphan: false,
            prev: NIL,
            next: NIL,
            #[cfg(debug_assertions)]
            crc: 0,
        }
    }
}

struct Cache {
    id: CacheId,
    entry_size: usize,
    writethrough: bool,
    buf: Vec<u8>,
    slots: Vec<Slot>,
    map: HashMap<u64, u32>,
    head: u32,
    tail: u32,
    /// Bumped on every last release; an entry's `lru` is its release time.
    lru_counter: u64,
    /// `lru_counter` at the previous `clean_unused`.
    clean_lru_stamp: u64,
    /// "No entry of this cache may be written before the dependency is flushed" (one edge).
    depends: Option<CacheId>,
    /// "No entry of this cache may be written before the next storage flush."
    depends_on_flush: bool,
    /// An entry of this cache was written and no storage flush followed yet. While false and
    /// with no dirty entries, a dependency on this cache is already satisfied.
    unbarriered: bool,
    dirty_count: usize,
    pinned_count: usize,
    stats: CacheStats,
    /// Reused by `write_all` to order dirty slots by offset without allocating.
    scratch: Vec<u32>,
}

impl Cache {
    fn new(id: CacheId, o: &CacheOptions) -> Self {
        let n = o.capacity as u32; // validated: capacity < u32::MAX
        let mut slots = vec![Slot::empty(); o.capacity];
        // All slots start empty and unpinned, so all are on the replacement list.
        for (i, s) in slots.iter_mut().enumerate() {
            let i = i as u32;
            s.prev = if i == 0 { NIL } else { i - 1 };
            s.next = if i + 1 == n { NIL } else { i + 1 };
        }
        Cache {
            id,
            entry_size: o.entry_size,
            writethrough: o.writethrough,
            buf: vec![0; o.capacity * o.entry_size],
            slots,
            map: HashMap::with_capacity(o.capacity),
            head: 0,
            tail: n - 1,
            lru_counter: 0,
            clean_lru_stamp: 0,
            depends: None,
            depends_on_flush: false,
            unbarriered: false,
            dirty_count: 0,
            pinned_count: 0,
            stats: CacheStats::default(),
            scratch: Vec::new(),
        }
    }

    fn range(&self, slot: usize) -> Range<usize> {
        slot * self.entry_size..(slot + 1) * self.entry_size
    }

    fn check_offset(&self, offset: u64) -> Result<(), CacheError> {
        if offset == 0 || offset > qcow2_format::limits::MAX_CLUSTER_OFFSET {
            return Err(CacheError::InvalidOffset {
                cache: self.id,
                offset,
            });
        }
        if offset & (self.entry_size as u64 - 1) != 0 {
            return Err(CacheError::UnalignedOffset {
                cache: self.id,
                offset,
            });
        }
        Ok(())
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let s = &mut self.slots[i as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.slots[old as usize].prev = i;
        }
        self.head = i;
    }

    fn push_back(&mut self, i: u32) {
        let old = self.tail;
        {
            let s = &mut self.slots[i as usize];
            s.prev = old;
            s.next = NIL;
        }
        if old == NIL {
            self.head = i;
        } else {
            self.slots[old as usize].next = i;
        }
        self.tail = i;
    }

    fn pin(&mut self, i: u32) {
        let pins = self.slots[i as usize].pins;
        if pins == 0 {
            self.unlink(i);
            self.pinned_count += 1;
        }
        self.slots[i as usize].pins = pins + 1;
    }

    /// Empties an unpinned slot (the caller has dealt with the map and with dirty data) and
    /// moves it to the front of the replacement list, so it is reused before any live entry.
    fn forget_unpinned(&mut self, i: u32) {
        debug_assert_eq!(self.slots[i as usize].pins, 0);
        // Unlink while the links are still intact, then reset the descriptor.
        self.unlink_if_listed(i);
        if self.slots[i as usize].dirty {
            self.dirty_count -= 1;
        }
        self.slots[i as usize] = Slot::empty();
        self.push_front(i);
    }

    fn unlink_if_listed(&mut self, i: u32) {
        let s = &self.slots[i as usize];
        if s.prev != NIL || s.next != NIL || self.head == i {
            self.unlink(i);
        }
    }

    /// Records the lost-update baseline: the entry just became clean with these bytes.
    fn baseline(&mut self, i: usize) {
        #[cfg(debug_assertions)]
        {
            let crc = crc32fast::hash(&self.buf[self.range(i)]);
            self.slots[i].crc = crc;
        }
        #[cfg(not(debug_assertions))]
        let _ = i;
    }

    /// Lost-update guard: a clean, live entry must still hold the bytes it had when it became
    /// clean; otherwise someone changed it without `mark_dirty` and the change would be lost.
    fn verify_clean(&self, i: usize) -> Result<(), CacheError> {
        #[cfg(debug_assertions)]
        {
            let s = &self.slots[i];
            if s.offset != 0 && !s.dirty && !s.orphan {
                let found = crc32fast::hash(&self.buf[self.range(i)]);
                if found != s.crc {
                    let err = CacheError::UndeclaredModification {
                        cache: self.id,
                        offset: s.offset,
                        expected: s.crc,
                        found,
                    };
                    // Outside this crate's own unit tests (which check the typed error), a
                    // debug build stops right here so the bug is found at its source.
                    #[cfg(not(test))]
                    panic!("{err}");
                    #[cfg(test)]
                    return Err(err);
                }
            }
        }
        #[cfg(not(debug_assertions))]
        let _ = i;
        Ok(())
    }
}

/// Source of per-instance ids, so a [`Handle`] from one `Caches` is refused by another.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// The L2 and refcount-block caches of one image, over one storage, with QEMU's ordering
/// rules between them.
///
/// Crash safety (invariant 1) rests on two kinds of ordering edge, both checked whenever an
/// entry of a cache is about to be written back (flush, write, eviction, write-through):
/// - [`set_dependency(c, dep)`](Caches::set_dependency): before any entry of `c` reaches
///   storage, every dirty entry of `dep` is written **and** a storage flush barrier is issued
///   after those writes; then the edge is consumed.
/// - [`set_depends_on_flush(c)`](Caches::set_depends_on_flush): before any entry of `c`
///   reaches storage, a storage flush barrier is issued (used after data/COW writes made
///   outside the cache).
pub struct Caches {
    storage: Arc<dyn Storage>,
    caches: [Cache; 2],
    overlap: Option<Arc<dyn OverlapCheck>>,
    owner: u64,
}

impl fmt::Debug for Caches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Caches");
        for c in &self.caches {
            d.field(
                c.id.name(),
                &format_args!(
                    "{{ entry_size: {}, capacity: {}, cached: {}, dirty: {}, pinned: {}, \
                     depends: {:?}, depends_on_flush: {} }}",
                    c.entry_size,
                    c.slots.len(),
                    c.map.len(),
                    c.dirty_count,
                    c.pinned_count,
                    c.depends,
                    c.depends_on_flush
                ),
            );
        }
        d.field("overlap_check", &self.overlap.is_some()).finish()
    }
}

impl Caches {
    /// Builds both caches over `storage`. Allocates `capacity * entry_size` bytes per cache
    /// once; fails with [`CacheError::InvalidOptions`] for a size that is not a power of two
    /// in `512..=2 MiB`, a zero capacity, or memory that cannot be addressed.
    pub fn new(
        storage: Arc<dyn Storage>,
        l2: CacheOptions,
        refblock: CacheOptions,
    ) -> Result<Self, CacheError> {
        l2.validate(CacheId::L2)?;
        refblock.validate(CacheId::Refblock)?;
        Ok(Caches {
            storage,
            caches: [
                Cache::new(CacheId::L2, &l2),
                Cache::new(CacheId::Refblock, &refblock),
            ],
            overlap: None,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The storage the caches load from and write to.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Installs (or removes) the pre-write overlap check consulted before every write-back.
    pub fn set_overlap_check(&mut self, hook: Option<Arc<dyn OverlapCheck>>) {
        self.overlap = hook;
    }

    /// Pins the entry for the table at `offset`, reading it from storage on a miss (after
    /// event `L2Load` / `RefblockLoad`). A miss reuses an empty slot or evicts the least
    /// recently released unpinned entry, writing it back first if dirty (honouring the
    /// ordering edges). Errors: invalid or unaligned offset, every entry pinned, the victim's
    /// write-back failed (the victim stays cached and dirty), or the read failed (nothing is
    /// cached).
    pub fn get(&mut self, id: CacheId, offset: u64) -> Result<Handle, CacheError> {
        self.do_get(id, offset, true)
    }

    /// Pins an entry for a table the caller is about to initialise in full (a newly allocated
    /// L2 table or refcount block): nothing is read, and the entry's bytes are all zero when
    /// this returns — also on a hit, where the cached contents are overwritten (the caller
    /// declared them dead). The entry is *not* marked dirty: the caller marks it after
    /// initialising, so an abandoned allocation never writes into an unallocated cluster. An
    /// abandoned, modified entry should be [`discard`](Caches::discard)ed.
    pub fn get_empty(&mut self, id: CacheId, offset: u64) -> Result<Handle, CacheError> {
        self.do_get(id, offset, false)
    }

    fn do_get(&mut self, id: CacheId, offset: u64, read: bool) -> Result<Handle, CacheError> {
        let owner = self.owner;
        let c = &mut self.caches[id.index()];
        c.check_offset(offset)?;
        if let Some(&slot) = c.map.get(&offset) {
            c.stats.hits += 1;
            c.pin(slot);
            if !read {
                let r = c.range(slot as usize);
                c.buf[r].fill(0);
                if !c.slots[slot as usize].dirty {
                    c.baseline(slot as usize);
                }
            }
            return Ok(Handle {
                id,
                slot,
                offset,
                owner,
            });
        }
        c.stats.misses += 1;
        let victim = c.head;
        if victim == NIL {
            return Err(CacheError::AllPinned {
                cache: id,
                capacity: c.slots.len(),
            });
        }
        if c.slots[victim as usize].offset != 0 {
            self.evict(id, victim)?;
        }
        let c = &mut self.caches[id.index()];
        let r = c.range(victim as usize);
        if read {
            self.storage.event(id.load_event());
            if let Err(source) = self.storage.read_at(&mut c.buf[r], offset) {
                // The slot stays empty at the head of the list.
                return Err(CacheError::Load {
                    cache: id,
                    offset,
                    source,
                });
            }
            c.stats.loads += 1;
        } else {
            c.buf[r].fill(0);
        }
        c.slots[victim as usize].offset = offset;
        c.map.insert(offset, victim);
        c.baseline(victim as usize);
        c.pin(victim);
        Ok(Handle {
            id,
            slot: victim,
            offset,
            owner,
        })
    }

    /// Drops the unpinned, occupied `slot` to make room, writing it back first if dirty.
    fn evict(&mut self, id: CacheId, slot: u32) -> Result<(), CacheError> {
        let i = slot as usize;
        let dirty = self.caches[id.index()].slots[i].dirty;
        if dirty {
            self.write_entry(id, i)?;
        } else {
            self.caches[id.index()].verify_clean(i)?;
        }
        let c = &mut self.caches[id.index()];
        let offset = c.slots[i].offset;
        c.map.remove(&offset);
        c.forget_unpinned(slot);
        c.stats.evictions += 1;
        if dirty {
            c.stats.dirty_evictions += 1;
        }
        Ok(())
    }

    /// Validates a handle against this instance and the slot it names. A mismatch is a
    /// programming error (a handle from another `Caches`, or forged), never bad input.
    fn slot_of(&self, h: &Handle) -> usize {
        assert_eq!(h.owner, self.owner, "cache handle from another Caches");
        let s = &self.caches[h.id.index()].slots[h.slot as usize];
        assert!(
            s.pins > 0 && s.offset == h.offset,
            "stale cache handle for {} at {:#x}",
            h.id,
            h.offset
        );
        h.slot as usize
    }

    /// The entry's bytes (big-endian table entries, as on disk).
    pub fn data(&self, h: &Handle) -> &[u8] {
        let i = self.slot_of(h);
        let c = &self.caches[h.id.index()];
        &c.buf[c.range(i)]
    }

    /// The entry's bytes, for modification. The caller must call
    /// [`mark_dirty`](Caches::mark_dirty) for the change to reach storage; debug builds
    /// detect a forgotten `mark_dirty` ([`CacheError::UndeclaredModification`]).
    pub fn data_mut(&mut self, h: &Handle) -> &mut [u8] {
        let i = self.slot_of(h);
        let c = &mut self.caches[h.id.index()];
        let r = c.range(i);
        &mut c.buf[r]
    }

    /// Declares the entry modified: it will be written back (at the latest on flush or
    /// eviction) with the ordering rules applied at that time. A no-op on an entry that was
    /// discarded while pinned (its cluster was freed; nothing may be written there).
    pub fn mark_dirty(&mut self, h: &Handle) {
        let i = self.slot_of(h);
        let c = &mut self.caches[h.id.index()];
        let s = &mut c.slots[i];
        if !s.dirty && !s.orphan {
            s.dirty = true;
            c.dirty_count += 1;
        }
    }

    /// Unpins the entry. When the last pin goes, the entry becomes the most recently used for
    /// replacement. The pin is always released; the `Result` only matters in write-through
    /// mode, where a dirty entry is written back here (with the ordering rules) and a failed
    /// write leaves it dirty for the next flush to retry. Write-back caches never fail here.
    pub fn put(&mut self, h: Handle) -> Result<(), CacheError> {
        let i = self.slot_of(&h);
        let c = &mut self.caches[h.id.index()];
        let s = &mut c.slots[i];
        s.pins -= 1;
        let (released, orphan, dirty) = (s.pins == 0, s.orphan, s.dirty);
        if released {
            c.pinned_count -= 1;
            if orphan {
                // Discarded while pinned: the map already forgot it.
                c.forget_unpinned(h.slot);
            } else {
                c.lru_counter += 1;
                c.slots[i].lru = c.lru_counter;
                c.push_back(h.slot);
            }
        }
        if c.writethrough && dirty && !orphan {
            self.write_entry(h.id, i)?;
        }
        Ok(())
    }

    /// Orders cache `dependent` after cache `dependency`: no entry of `dependent` is written
    /// before every dirty entry of `dependency` is written and a storage flush barrier
    /// followed. One edge per cache, and never a cycle: if `dependency` itself depends on a
    /// cache, that cache is flushed first (consuming the edge); if `dependent` already depends
    /// on a different cache, that one is flushed first. On error no new edge is recorded.
    ///
    /// Invariant 1 uses it in both directions: allocation sets (L2 after refblock) so the
    /// increment is durable before the reference; freeing sets (refblock after L2) so the
    /// reference is gone before the decrement.
    pub fn set_dependency(
        &mut self,
        dependent: CacheId,
        dependency: CacheId,
    ) -> Result<(), CacheError> {
        if dependent == dependency {
            return Err(CacheError::SelfDependency { cache: dependent });
        }
        if self.caches[dependency.index()].depends.is_some() {
            self.flush_dependency_of(dependency)?;
        }
        let current = self.caches[dependent.index()].depends;
        if current.is_some() && current != Some(dependency) {
            self.flush_dependency_of(dependent)?;
        }
        self.caches[dependent.index()].depends = Some(dependency);
        Ok(())
    }

    /// No entry of cache `id` is written before the next storage flush barrier (set after
    /// data or copy-on-write writes made outside the cache, so a table never points at data
    /// that is not yet durable).
    pub fn set_depends_on_flush(&mut self, id: CacheId) {
        self.caches[id.index()].depends_on_flush = true;
    }

    /// The cache `id` must be ordered after, if any (see
    /// [`set_dependency`](Caches::set_dependency)).
    pub fn dependency(&self, id: CacheId) -> Option<CacheId> {
        self.caches[id.index()].depends
    }

    /// Whether cache `id` waits for a storage flush before its next write.
    pub fn depends_on_flush(&self, id: CacheId) -> bool {
        self.caches[id.index()].depends_on_flush
    }

    /// Writes every dirty entry of cache `id` (in offset order), applying the ordering rules
    /// before the first. Every entry is tried; the first error is returned, except that a
    /// later `ENOSPC` replaces it (as QEMU). Failed entries stay dirty. No storage flush is
    /// issued except as the ordering rules require.
    pub fn write(&mut self, id: CacheId) -> Result<(), CacheError> {
        self.write_all(id)
    }

    /// [`write`](Caches::write), then a storage flush barrier if every write succeeded: on
    /// `Ok`, every modification of cache `id` is durable.
    pub fn flush(&mut self, id: CacheId) -> Result<(), CacheError> {
        self.write_all(id)?;
        self.barrier(id)
    }

    /// Drops the entry for `offset` without writing it, dirty or not: its cluster was freed,
    /// and writing the stale table there could clobber the cluster's next user. An entry that
    /// is still pinned is detached at once (a new `get` loads afresh) and its slot is freed
    /// when the last handle is put. A no-op if `offset` is not cached.
    pub fn discard(&mut self, id: CacheId, offset: u64) {
        let c = &mut self.caches[id.index()];
        let Some(slot) = c.map.remove(&offset) else {
            return;
        };
        if c.slots[slot as usize].pins == 0 {
            c.forget_unpinned(slot);
        } else {
            let s = &mut c.slots[slot as usize];
            if s.dirty {
                s.dirty = false;
                c.dirty_count -= 1;
            }
            s.orphan = true;
        }
    }

    /// [`flush`](Caches::flush)es cache `id`, then forgets every entry that is not pinned
    /// (pinned entries stay, clean). Used before the tables are rewritten behind the cache's
    /// back (refcount-order change, repair) or the cache is replaced.
    pub fn empty(&mut self, id: CacheId) -> Result<(), CacheError> {
        self.flush(id)?;
        let c = &mut self.caches[id.index()];
        for i in 0..c.slots.len() {
            let s = &c.slots[i];
            if s.offset != 0 && s.pins == 0 {
                let offset = s.offset;
                c.map.remove(&offset);
                c.forget_unpinned(i as u32);
            }
        }
        Ok(())
    }

    /// Drops clean, unpinned entries not released since the previous call (QEMU's
    /// `cache-clean-interval` timer), returning how many. Dirty and pinned entries stay. In
    /// debug builds an entry failing the lost-update check is kept, so the next flush reports
    /// it.
    pub fn clean_unused(&mut self, id: CacheId) -> usize {
        let c = &mut self.caches[id.index()];
        let mut dropped = 0;
        for i in 0..c.slots.len() {
            let s = &c.slots[i];
            if s.offset != 0
                && s.pins == 0
                && !s.dirty
                && s.lru <= c.clean_lru_stamp
                && c.verify_clean(i).is_ok()
            {
                let offset = c.slots[i].offset;
                c.map.remove(&offset);
                c.forget_unpinned(i as u32);
                dropped += 1;
            }
        }
        c.clean_lru_stamp = c.lru_counter;
        dropped
    }

    /// Whether the table at `offset` is cached in `id` (QEMU's `qcow2_cache_is_table_offset`).
    pub fn is_cached(&self, id: CacheId, offset: u64) -> bool {
        self.caches[id.index()].map.contains_key(&offset)
    }

    /// Entry size of cache `id` in bytes.
    pub fn entry_size(&self, id: CacheId) -> usize {
        self.caches[id.index()].entry_size
    }

    /// Capacity of cache `id` in entries.
    pub fn capacity(&self, id: CacheId) -> usize {
        self.caches[id.index()].slots.len()
    }

    /// Number of tables currently cached in `id`.
    pub fn cached_count(&self, id: CacheId) -> usize {
        self.caches[id.index()].map.len()
    }

    /// Number of dirty entries in `id`.
    pub fn dirty_count(&self, id: CacheId) -> usize {
        self.caches[id.index()].dirty_count
    }

    /// Number of entries of `id` pinned by at least one handle.
    pub fn pinned_count(&self, id: CacheId) -> usize {
        self.caches[id.index()].pinned_count
    }

    /// Counters of cache `id`.
    pub fn stats(&self, id: CacheId) -> CacheStats {
        self.caches[id.index()].stats
    }

    /// Whether cache `id` is in write-through mode.
    pub fn writethrough(&self, id: CacheId) -> bool {
        self.caches[id.index()].writethrough
    }

    /// Issues a storage flush barrier. Any barrier we issue satisfies every pending
    /// `depends_on_flush` (they were all set before it) and makes every completed cache write
    /// durable.
    fn barrier(&mut self, on_behalf_of: CacheId) -> Result<(), CacheError> {
        self.storage.flush().map_err(|source| CacheError::Flush {
            cache: on_behalf_of,
            source,
        })?;
        for c in &mut self.caches {
            c.unbarriered = false;
            c.depends_on_flush = false;
        }
        self.caches[on_behalf_of.index()].stats.barriers += 1;
        Ok(())
    }

    /// Satisfies and consumes `id`'s dependency edge: write every dirty entry of the
    /// dependency, then a barrier unless nothing of it has been written since the last one.
    /// On failure the edge is restored, so the next write of `id` tries again.
    fn flush_dependency_of(&mut self, id: CacheId) -> Result<(), CacheError> {
        // Taken before flushing so that even a (never constructed) cycle cannot recurse.
        let Some(dep) = self.caches[id.index()].depends.take() else {
            return Ok(());
        };
        let res = self.write_all(dep).and_then(|()| {
            if self.caches[dep.index()].unbarriered {
                self.barrier(dep)
            } else {
                Ok(())
            }
        });
        if res.is_err() {
            self.caches[id.index()].depends = Some(dep);
        }
        res
    }

    fn write_all(&mut self, id: CacheId) -> Result<(), CacheError> {
        let c = &mut self.caches[id.index()];
        let mut order = std::mem::take(&mut c.scratch);
        order.clear();
        let mut first: Option<CacheError> = None;
        for (i, s) in c.slots.iter().enumerate() {
            if s.dirty {
                order.push(i as u32);
            } else if let Err(e) = c.verify_clean(i) {
                keep_first_error(&mut first, e);
            }
        }
        // Sequential offsets make the write-back friendlier to the storage.
        order.sort_unstable_by_key(|&i| c.slots[i as usize].offset);
        for &i in &order {
            if let Err(e) = self.write_entry(id, i as usize) {
                keep_first_error(&mut first, e);
            }
        }
        self.caches[id.index()].scratch = order;
        first.map_or(Ok(()), Err)
    }

    /// Writes one entry back if dirty (QEMU's `qcow2_cache_entry_flush`): ordering edges
    /// first, then the overlap veto, the event, the write, and only then the clean state.
    fn write_entry(&mut self, id: CacheId, i: usize) -> Result<(), CacheError> {
        if !self.caches[id.index()].slots[i].dirty {
            return Ok(());
        }
        if self.caches[id.index()].depends.is_some() {
            self.flush_dependency_of(id)?;
        }
        // Checked separately (not `else`): a dependency flush that needed no barrier does not
        // satisfy depends_on_flush.
        if self.caches[id.index()].depends_on_flush {
            self.barrier(id)?;
        }
        let c = &mut self.caches[id.index()];
        let s = &c.slots[i];
        if !s.dirty {
            return Ok(());
        }
        let offset = s.offset;
        if let Some(hook) = &self.overlap {
            if let Err(source) = hook.check_write(id, offset, c.entry_size as u64) {
                c.stats.write_errors += 1;
                return Err(CacheError::Overlap {
                    cache: id,
                    offset,
                    source,
                });
            }
        }
        self.storage.event(id.update_event());
        let r = c.range(i);
        if let Err(source) = self.storage.write_at(&c.buf[r], offset) {
            c.stats.write_errors += 1;
            return Err(CacheError::WriteBack {
                cache: id,
                offset,
                source,
            });
        }
        c.slots[i].dirty = false;
        c.dirty_count -= 1;
        c.unbarriered = true;
        c.stats.writes += 1;
        c.baseline(i);
        Ok(())
    }
}

/// QEMU's rule for multi-entry writes: keep the first error, but `ENOSPC` wins.
fn keep_first_error(first: &mut Option<CacheError>, e: CacheError) {
    match first {
        None => *first = Some(e),
        Some(f) if !f.is_no_space() && e.is_no_space() => *first = Some(e),
        Some(_) => {}
    }
}
