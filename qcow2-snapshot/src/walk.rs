//! Snapshot refcount walking: QEMU's `qcow2_update_snapshot_refcount`, batched.
//!
//! QEMU walks an L1 tree entry by entry through the L2 cache and updates refcounts cluster by
//! cluster through the refcount-block cache. The result is the same here, computed in
//! phases so that each refcount block and each L2 table is touched once:
//!
//! - **A, collect.** Every L2 table the L1 references is read (grouped, sorted by offset,
//!   contiguous tables in one read, dirty slices taken from the L2 cache), and every entry is
//!   validated and turned into host-cluster runs: the L2 table itself, each data or
//!   preallocated-zero cluster, and each host cluster a compressed cluster touches, each
//!   counted once per L1 reference to its table. Nothing has changed yet, so corruption
//!   anywhere in the tree fails the pass cleanly (QEMU fails midway, leaking).
//! - **A2, strip (addend +1 only).** Every COPIED flag of the tree is cleared (L2 slices,
//!   then the L1) and made durable before any increment can reach the disk: at every
//!   instant COPIED is set only where the refcount is 1. (QEMU clears the flags after the
//!   increments, ordered by the L2-depends-on-refblock edge; a failure midway then leaves
//!   COPIED on clusters with refcount 2, which `qemu-img check` reports as corruption.)
//! - **B, apply.** The runs are sorted and merged into disjoint segments with a count; each
//!   segment is one [`RefcountEngine::update`] (one cache round trip per refcount block). On
//!   any error what was applied is undone (overflow with narrow refcounts leaves no trace).
//! - **C, COPIED.** For passes with addend >= 0: the refcount blocks are flushed (the
//!   refcounts are durable before any COPIED flag is set on disk), refcounts are read back
//!   one block at a time, and every entry gets COPIED iff its cluster's refcount is 1
//!   (compressed never). Changed slices go through the L2 cache when cached there, else
//!   straight to storage.
//! - **D, E: write back and L1.** Both caches are written back; for addend >= 0, if an L1
//!   entry's COPIED flag changed, the whole L1 is rewritten at its offset (for the active L1
//!   also in memory); then one storage flush makes all of it durable (QEMU: `bdrv_flush`,
//!   then a synchronous L1 write). A pass with addend -1 never rewrites its L1 (it is going
//!   away), as in QEMU.
//!
//! A pass with addend -1 leaves the COPIED flags of the tables it walked alone: those tables
//! are no longer reachable from the active L1 or are about to be re-examined by the addend-0
//! pass every caller runs next (COPIED is only meaningful in the active tree).

use crate::error::Error;
use crate::host::{MetadataWrite, SnapshotHost};
use qcow2_cache::{CacheId, Caches, Handle};
use qcow2_format::compressed::CompressedFormat;
use qcow2_format::entry::{
    read_l2_entry, write_l2_entry, ClusterType, L2Context, L2Entry, L1E_OFFSET_MASK, OFLAG_COPIED,
};
use qcow2_format::limits::{ENTRY_SIZE, MAX_L1_SIZE};
use qcow2_format::refcount::{RefcountCodec, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use qcow2_format::Geometry;
use qcow2_io::{Event, Storage, StorageExt};
use qcow2_refcount::{Change, DiscardType, RefcountEngine, RefcountError};
use std::ops::Range;
use std::sync::Arc;

/// L2 tables read per group (one buffer), bounding memory whatever the image size.
const GROUP_BYTES: u64 = 16 << 20;
/// Up to this many bytes of L2 tables are kept between phases A and C instead of re-read.
const RETAIN_BYTES: u64 = 128 << 20;

/// The refcount change a pass applies to every cluster reachable from an L1 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addend {
    /// -1: the L1 table stops referencing its tree (snapshot delete, the old tree on apply).
    Decrease,
    /// 0: only recompute the COPIED flags of the tree (after a delete or an apply).
    Recompute,
    /// +1: a new L1 table references the tree (snapshot create, the new tree on apply).
    Increase,
}

/// Where the L1 table of a pass comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Source<'a> {
    /// The host's in-memory active L1 table (QEMU's special case: the on-disk copy may
    /// already hold something else during an apply). COPIED changes are written to memory
    /// and, synchronously, to the table at [`SnapshotHost::l1_table_offset`].
    Active,
    /// An L1 table on disk (a snapshot's), validated as QEMU's `qcow2_validate_table` for
    /// "Snapshot L1 table" before it is read. COPIED changes are written back there.
    OnDisk {
        /// Host offset of the table.
        offset: u64,
        /// Number of entries.
        l1_size: u32,
    },
    /// Entries supplied by the caller (apply's copy of the old active L1). Nothing is ever
    /// written back for them; use with [`Addend::Decrease`].
    Entries(&'a [u64]),
}

/// What a pass did (for tests, benchmarks and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassStats {
    /// Distinct L2 tables walked.
    pub l2_tables: u64,
    /// Host clusters whose refcount was considered (tables, data, compressed hosts).
    pub clusters: u64,
    /// Disjoint refcount segments applied in phase B (one engine update each).
    pub segments: u64,
    /// L2 slices whose COPIED flags were rewritten.
    pub l2_slices_rewritten: u64,
    /// Whether the L1 table was rewritten.
    pub l1_rewritten: bool,
}

/// How much of a failed pass's refcount change remains on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remains {
    /// Nothing: the pass failed before changing refcounts, or undid what it applied.
    Nothing,
    /// The whole change (phase B completed; a later phase failed). A pass in the opposite
    /// direction over the same tree takes it back exactly.
    All,
    /// An unknown part (the undo itself failed): only leaking is safe.
    Unknown,
}

/// A failed pass: the error and what remains of its refcount change.
#[derive(Debug)]
pub(crate) struct PassFailure {
    pub error: Error,
    pub remains: Remains,
}

impl PassFailure {
    fn clean(error: impl Into<Error>) -> Self {
        Self {
            error: error.into(),
            remains: Remains::Nothing,
        }
    }

    fn applied(error: impl Into<Error>) -> Self {
        Self {
            error: error.into(),
            remains: Remains::All,
        }
    }
}

/// Validates a snapshot's L1 table location as QEMU's `qcow2_validate_table(.., L1E_SIZE,
/// QCOW_MAX_L1_SIZE, "Snapshot L1 table")`: too many entries is "too large" (`EFBIG`); an
/// unaligned offset or an end beyond `INT64_MAX` is "offset invalid" (`EINVAL`).
pub fn validate_snapshot_l1(geometry: &Geometry, offset: u64, l1_size: u32) -> Result<(), Error> {
    if u64::from(l1_size) > MAX_L1_SIZE / ENTRY_SIZE {
        return Err(Error::L1TooLarge { l1_size });
    }
    let bytes = u64::from(l1_size) * ENTRY_SIZE;
    if (i64::MAX as u64) - bytes < offset || !geometry.is_cluster_aligned(offset) {
        return Err(Error::L1OffsetInvalid { offset });
    }
    Ok(())
}

/// Reads a (validated) L1 table of `l1_size` entries at `offset`.
pub(crate) fn read_l1(storage: &dyn Storage, offset: u64, l1_size: u32) -> Result<Vec<u64>, Error> {
    // Validated by the caller: at most 32 MiB.
    let bytes = storage
        .read_vec(offset, l1_size as usize * ENTRY_SIZE as usize)
        .map_err(|e| Error::io("Failed to read the snapshot L1 table", e))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect())
}

/// Big-endian bytes of L1 entries (the on-disk form of an L1 table).
pub fn l1_bytes(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// Flushes both caches and the storage (QEMU's `bdrv_flush` for metadata): every cache
/// write honours the dependency edges, then one barrier makes all of it durable.
pub fn flush_all(caches: &mut Caches) -> Result<(), Error> {
    caches.write(CacheId::L2)?;
    caches.write(CacheId::Refblock)?;
    caches
        .storage()
        .clone()
        .flush()
        .map_err(|e| Error::io("Failed to flush the image", e))
}

/// One L2 table referenced by the L1, with the number of L1 entries that reference it.
#[derive(Debug, Clone, Copy)]
struct L2Ref {
    offset: u64,
    mult: u64,
}

/// A run of host clusters with the number of references the tree holds on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    start: u64,
    len: u64,
    count: u64,
}

/// Collects references as runs, merging consecutive contiguous runs of equal count (data
/// allocated sequentially collapses to a few runs).
#[derive(Debug, Default)]
struct Runs {
    runs: Vec<Seg>,
}

impl Runs {
    fn push(&mut self, start: u64, len: u64, count: u64) {
        if let Some(last) = self.runs.last_mut() {
            if last.count == count && last.start.checked_add(last.len) == Some(start) {
                last.len += len;
                return;
            }
        }
        self.runs.push(Seg { start, len, count });
    }

    /// Disjoint, sorted segments with summed counts.
    fn into_segments(mut self) -> Vec<Seg> {
        self.runs.sort_unstable_by_key(|s| s.start);
        let overlapping = self
            .runs
            .windows(2)
            .any(|w| w[0].start + w[0].len > w[1].start);
        let mut out: Vec<Seg> = Vec::with_capacity(self.runs.len());
        let mut push = |s: Seg| {
            if let Some(last) = out.last_mut() {
                if last.count == s.count && last.start + last.len == s.start {
                    last.len += s.len;
                    return;
                }
            }
            out.push(s);
        };
        if !overlapping {
            for s in self.runs {
                push(s);
            }
            return out;
        }
        // Shared host clusters (compressed clusters in one cluster, or a corrupt tree that
        // references a cluster twice): sweep start/end events and sum the counts.
        let mut events: Vec<(u64, i128)> = Vec::with_capacity(self.runs.len() * 2);
        for s in &self.runs {
            events.push((s.start, i128::from(s.count)));
            events.push((s.start + s.len, -i128::from(s.count)));
        }
        events.sort_unstable_by_key(|e| e.0);
        let mut level: i128 = 0;
        let mut pos = 0u64;
        let mut i = 0;
        while i < events.len() {
            let at = events[i].0;
            if level > 0 && at > pos {
                push(Seg {
                    start: pos,
                    len: at - pos,
                    count: u64::try_from(level).unwrap_or(u64::MAX),
                });
            }
            while i < events.len() && events[i].0 == at {
                level += events[i].1;
                i += 1;
            }
            pos = at;
        }
        out
    }
}

/// For every cluster of a set of segments: is its refcount exactly 1? (All COPIED needs.)
struct Ones {
    segs: Vec<Seg>,
    /// Bit index of each segment's first cluster.
    base: Vec<u64>,
    bits: Vec<u64>,
}

impl Ones {
    /// Whether any cluster has refcount 1.
    fn any(&self) -> bool {
        self.bits.iter().any(|&w| w != 0)
    }

    fn is_one(&self, cluster: u64) -> bool {
        let k = self.segs.partition_point(|s| s.start <= cluster);
        let Some(k) = k.checked_sub(1) else {
            return false;
        };
        let s = self.segs[k];
        if cluster >= s.start + s.len {
            return false;
        }
        let bit = self.base[k] + (cluster - s.start);
        self.bits
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Reads the refcount of every cluster in `segs` (sorted, disjoint), getting each refcount
    /// block from the cache once.
    fn read(
        caches: &mut Caches,
        engine: &RefcountEngine,
        geometry: &Geometry,
        segs: Vec<Seg>,
    ) -> Result<Self, Error> {
        let total: u64 = segs.iter().map(|s| s.len).sum();
        let mut base = Vec::with_capacity(segs.len());
        let mut acc = 0u64;
        for s in &segs {
            base.push(acc);
            acc += s.len;
        }
        let words = usize::try_from(total.div_ceil(64)).map_err(|_| {
            Error::Refcount(RefcountError::InvalidRequest {
                reason: "too many clusters to track",
            })
        })?;
        let mut bits = vec![0u64; words];
        let codec = RefcountCodec::for_geometry(geometry);
        let reftable = engine.reftable();
        let mut held: Option<(u64, Option<Handle>)> = None;
        let mut result = Ok(());
        'outer: for (k, s) in segs.iter().enumerate() {
            for c in s.start..s.start + s.len {
                let block = geometry.reftable_index(c);
                if held.as_ref().map(|h| h.0) != Some(block) {
                    if let Some((_, Some(h))) = held.take() {
                        if let Err(e) = caches.put(h) {
                            result = Err(e.into());
                            break 'outer;
                        }
                    }
                    let raw = usize::try_from(block)
                        .ok()
                        .and_then(|b| reftable.get(b))
                        .copied()
                        .unwrap_or(0);
                    let offset = raw & REFT_OFFSET_MASK;
                    if raw & REFT_RESERVED_MASK != 0 || !geometry.is_cluster_aligned(offset) {
                        result = Err(Error::Refcount(RefcountError::UnalignedRefblock {
                            offset: raw,
                            index: block,
                        }));
                        break 'outer;
                    }
                    let handle = if offset == 0 {
                        None
                    } else {
                        match caches.get(CacheId::Refblock, offset) {
                            Ok(h) => Some(h),
                            Err(e) => {
                                result = Err(e.into());
                                break 'outer;
                            }
                        }
                    };
                    held = Some((block, handle));
                }
                let value = match &held {
                    Some((_, Some(h))) => {
                        match codec.get(caches.data(h), geometry.refblock_index(c)) {
                            Ok(v) => v,
                            Err(_) => {
                                result = Err(Error::Refcount(RefcountError::InvalidRequest {
                                    reason: "refcount index out of range",
                                }));
                                break 'outer;
                            }
                        }
                    }
                    _ => 0,
                };
                if value == 1 {
                    let bit = base[k] + (c - s.start);
                    if let Some(w) = bits.get_mut((bit / 64) as usize) {
                        *w |= 1 << (bit % 64);
                    }
                }
            }
        }
        if let Some((_, Some(h))) = held.take() {
            let put = caches.put(h);
            if result.is_ok() {
                put?;
            }
        }
        result.map(|()| Self { segs, base, bits })
    }
}

/// Everything a pass needs about the image, copied out of the host once.
struct Ctx {
    geometry: Geometry,
    l2: L2Context,
    compressed: CompressedFormat,
    storage: Arc<dyn Storage>,
    file_len: u64,
}

impl Ctx {
    fn cs(&self) -> u64 {
        self.geometry.cluster_size()
    }

    /// QEMU's checker rule: a reference may reach past the end of the file, but by less than
    /// one cluster (the last cluster may be partially written).
    fn check_eof(&self, offset: u64, size: u64) -> Result<(), Error> {
        let beyond = Error::BeyondEndOfFile {
            offset,
            size,
            file_len: self.file_len,
        };
        let end = offset
            .checked_add(size)
            .ok_or_else(|| beyond_clone(&beyond))?;
        if end > self.file_len && end - self.file_len >= self.cs() {
            return Err(beyond);
        }
        Ok(())
    }
}

fn beyond_clone(e: &Error) -> Error {
    match e {
        Error::BeyondEndOfFile {
            offset,
            size,
            file_len,
        } => Error::BeyondEndOfFile {
            offset: *offset,
            size: *size,
            file_len: *file_len,
        },
        _ => Error::Refcount(RefcountError::InvalidRequest {
            reason: "range overflow",
        }),
    }
}

/// Splits the sorted tables into groups of at most [`GROUP_BYTES`] (at least one table).
fn groups(n: usize, cs: u64) -> Vec<Range<usize>> {
    let per = usize::try_from((GROUP_BYTES / cs).max(1)).unwrap_or(1);
    (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect()
}

/// Reads the tables of one group: contiguous tables in one read each, then every slice the
/// L2 cache holds replaces what was read (a dirty slice is newer than the disk).
fn load_group(caches: &mut Caches, ctx: &Ctx, tables: &[L2Ref]) -> Result<Vec<u8>, Error> {
    let cs = ctx.cs() as usize;
    let mut buf = vec![0u8; tables.len() * cs];
    let mut i = 0;
    while i < tables.len() {
        let mut j = i + 1;
        while j < tables.len()
            && tables[j - 1].offset.checked_add(ctx.cs()) == Some(tables[j].offset)
        {
            j += 1;
        }
        ctx.storage.event(Event::L2Load);
        ctx.storage
            .read_at(&mut buf[i * cs..j * cs], tables[i].offset)
            .map_err(|e| Error::io("Failed to read L2 tables", e))?;
        i = j;
    }
    let slice = caches.entry_size(CacheId::L2).clamp(1, cs);
    for (k, t) in tables.iter().enumerate() {
        for s in (0..cs).step_by(slice) {
            let off = t.offset + s as u64;
            if caches.is_cached(CacheId::L2, off) {
                let h = caches.get(CacheId::L2, off)?;
                let data = caches.data(&h);
                let n = data.len().min(cs - s);
                buf[k * cs + s..k * cs + s + n].copy_from_slice(&data[..n]);
                caches.put(h)?;
            }
        }
    }
    Ok(buf)
}

/// Phase A for one table: validates every entry and records what it references.
fn scan_table(
    ctx: &Ctx,
    table: &[u8],
    t: &L2Ref,
    with_compressed: bool,
    runs: &mut Runs,
) -> Result<(), Error> {
    let g = &ctx.geometry;
    let bits = g.cluster_bits();
    runs.push(t.offset >> bits, 1, t.mult);
    for j in 0..g.l2_entries() {
        let e = read_l2_entry(table, j, g.extended_l2()).map_err(|_| {
            Error::Refcount(RefcountError::InvalidRequest {
                reason: "L2 table buffer too short",
            })
        })?;
        let e = L2Entry::from_raw(e.raw_entry() & !OFLAG_COPIED, e.bitmap());
        match e.cluster_type(ctx.l2) {
            ClusterType::Compressed => {
                if !with_compressed {
                    continue;
                }
                let bad = |source| Error::CompressedInvalid {
                    entry: e.raw_entry(),
                    l2_offset: t.offset,
                    l2_index: j,
                    source,
                };
                let d = ctx.compressed.decode(e).map_err(bad)?;
                let hosts = d.host_clusters(g).map_err(bad)?;
                ctx.check_eof(d.host_offset(), d.compressed_size())?;
                runs.push(*hosts.start(), hosts.end() - hosts.start() + 1, t.mult);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = e.host_offset();
                if !g.is_cluster_aligned(off) {
                    return Err(Error::ClusterUnaligned {
                        offset: off,
                        l2_offset: t.offset,
                        l2_index: j,
                    });
                }
                ctx.check_eof(off, ctx.cs())?;
                runs.push(off >> bits, 1, t.mult);
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => {}
        }
    }
    Ok(())
}

/// Phase B: applies every segment; on failure undoes the applied ones. Returns whether the
/// undo was complete (on failure).
fn apply_segments(
    caches: &mut Caches,
    engine: &mut RefcountEngine,
    geometry: &Geometry,
    segs: &[Seg],
    decrease: bool,
) -> Result<(), PassFailure> {
    let cs = geometry.cluster_size();
    let range = |s: &Seg| -> Option<(u64, u64)> {
        Some((s.start.checked_mul(cs)?, s.len.checked_mul(cs)?))
    };
    for (k, s) in segs.iter().enumerate() {
        let change = if decrease {
            Change::Decrease(s.count)
        } else {
            Change::Increase(s.count)
        };
        let result = match range(s) {
            Some((off, len)) => engine.update(caches, off, len, change, DiscardType::Snapshot),
            None => Err(RefcountError::OffsetTooLarge { offset: u64::MAX }),
        };
        if let Err(e) = result {
            // The engine undid its part of segment k; undo 0..k, newest first, never
            // discarding (the clusters are still referenced).
            let mut complete = true;
            for p in segs[..k].iter().rev() {
                let inverse = if decrease {
                    Change::Increase(p.count)
                } else {
                    Change::Decrease(p.count)
                };
                let undone = range(p).is_some_and(|(off, len)| {
                    engine
                        .update(caches, off, len, inverse, DiscardType::Never)
                        .is_ok()
                });
                complete &= undone;
            }
            return Err(PassFailure {
                error: e.into(),
                remains: if complete {
                    Remains::Nothing
                } else {
                    Remains::Unknown
                },
            });
        }
    }
    Ok(())
}

/// QEMU's `qcow2_update_snapshot_refcount(l1, addend)`, batched (see the module docs for
/// the phases and their crash-safety order).
///
/// With [`Addend::Increase`] every cluster reachable from the L1 (L2 tables, data and
/// preallocated zero clusters, each host cluster a compressed cluster touches) gains one
/// reference per L1 entry that reaches it, durably, before any COPIED flag is cleared; with
/// [`Addend::Decrease`] they lose it (the refcount cache is ordered after the L2 cache by the
/// engine); [`Addend::Recompute`] only recomputes COPIED. Corruption anywhere in the tree
/// (unaligned L2 table or cluster, nonzero L1 entry without offset, reference one cluster or
/// more beyond the end of the file, bad compressed descriptor) fails the pass **before**
/// anything changed. An error while applying refcounts (overflow with narrow refcounts,
/// I/O) undoes what was applied.
pub fn update_snapshot_refcount<H: SnapshotHost + ?Sized>(
    host: &mut H,
    source: L1Source<'_>,
    addend: Addend,
) -> Result<PassStats, Error> {
    walk(host, source, addend).map_err(|f| f.error)
}

pub(crate) fn walk<H: SnapshotHost + ?Sized>(
    host: &mut H,
    source: L1Source<'_>,
    addend: Addend,
) -> Result<PassStats, PassFailure> {
    let geometry = host.geometry();
    let storage = host.parts().caches.storage().clone();
    let file_len = storage
        .len()
        .map_err(|e| PassFailure::clean(Error::io("Failed to get the image length", e)))?;
    let ctx = Ctx {
        geometry,
        l2: L2Context::for_geometry(&geometry, false),
        compressed: CompressedFormat::for_geometry(&geometry),
        storage,
        file_len,
    };
    let cs = ctx.cs();
    let bits = geometry.cluster_bits();
    let mut stats = PassStats::default();

    let l1: Vec<u64> = match source {
        L1Source::Active => host.parts().active_l1.to_vec(),
        L1Source::OnDisk { offset, l1_size } => {
            validate_snapshot_l1(&geometry, offset, l1_size).map_err(PassFailure::clean)?;
            read_l1(&*ctx.storage, offset, l1_size).map_err(PassFailure::clean)?
        }
        L1Source::Entries(e) => e.to_vec(),
    };

    // The L2 tables, sorted by offset, each with the number of L1 entries naming it.
    let mut named: Vec<u64> = Vec::with_capacity(l1.len());
    for (i, &e) in l1.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let off = e & L1E_OFFSET_MASK;
        let l1_index = i as u64;
        if off == 0 {
            return Err(PassFailure::clean(Error::L1EntryInvalid {
                l1_index,
                entry: e,
            }));
        }
        if !geometry.is_cluster_aligned(off) {
            return Err(PassFailure::clean(Error::L2TableUnaligned {
                l2_offset: off,
                l1_index,
            }));
        }
        ctx.check_eof(off, cs).map_err(PassFailure::clean)?;
        named.push(off);
    }
    named.sort_unstable();
    let mut tables: Vec<L2Ref> = Vec::with_capacity(named.len());
    for off in named {
        match tables.last_mut() {
            Some(t) if t.offset == off => t.mult += 1,
            _ => tables.push(L2Ref {
                offset: off,
                mult: 1,
            }),
        }
    }
    stats.l2_tables = tables.len() as u64;

    // Phase A.
    let groups = groups(tables.len(), cs);
    let retain = (tables.len() as u64).saturating_mul(cs) <= RETAIN_BYTES;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut runs = Runs::default();
    for g in &groups {
        let buf = load_group(host.parts().caches, &ctx, &tables[g.clone()])
            .map_err(PassFailure::clean)?;
        for (k, t) in tables[g.clone()].iter().enumerate() {
            let table = &buf[k * cs as usize..(k + 1) * cs as usize];
            scan_table(&ctx, table, t, addend != Addend::Recompute, &mut runs)
                .map_err(PassFailure::clean)?;
        }
        if retain {
            kept.push(buf);
        }
    }
    let segs = runs.into_segments();
    stats.segments = segs.len() as u64;
    stats.clusters = segs.iter().map(|s| s.len).sum();

    // Phase A2 (increase only): strip COPIED from the whole tree and make that durable
    // before any increment can reach the disk, so that at every instant COPIED is only set
    // where the refcount is 1 (a cleared flag only costs a COW; a flag on a shared cluster
    // would let a write in place reach another reference).
    if addend == Addend::Increase {
        let strip = |_: u64| false;
        rewrite_copied(
            host, &ctx, &tables, &groups, &mut kept, &strip, false, &mut stats,
        )
        .map_err(PassFailure::clean)?;
        let stripped: Vec<u64> = l1.iter().map(|&e| e & !OFLAG_COPIED).collect();
        if stripped != l1 {
            // L2 and L1 strips need no order among themselves; one barrier covers both.
            write_l1(host, &ctx, source, &stripped, &mut stats).map_err(PassFailure::clean)?;
        }
        flush_all(host.parts().caches).map_err(PassFailure::clean)?;
    }

    // Phase B.
    let changed = addend != Addend::Recompute && !segs.is_empty();
    if changed {
        let p = host.parts();
        apply_segments(
            p.caches,
            p.refcounts,
            &geometry,
            &segs,
            addend == Addend::Decrease,
        )?;
    }
    let fail = |e: Error| {
        if changed {
            PassFailure::applied(e)
        } else {
            PassFailure::clean(e)
        }
    };

    // Phase C.
    let mut new_l1: Option<Vec<u64>> = None;
    if addend != Addend::Decrease {
        let ones = {
            let p = host.parts();
            let ones = Ones::read(p.caches, p.refcounts, &geometry, segs).map_err(fail)?;
            // This pass's refcount changes are durable before any COPIED flag is set on disk
            // (a recompute pass follows passes that ended with a flush; after a +1 pass
            // nothing usually has refcount 1, and then nothing is set).
            if changed && ones.any() {
                p.caches
                    .flush(CacheId::Refblock)
                    .map_err(|e| fail(e.into()))?;
            }
            ones
        };
        let copied = |cluster: u64| ones.is_one(cluster);
        rewrite_copied(
            host,
            &ctx,
            &tables,
            &groups,
            &mut kept,
            &copied,
            addend == Addend::Increase,
            &mut stats,
        )
        .map_err(fail)?;
        // COPIED on the L1 entries: the L2 table's own refcount.
        let entries: Vec<u64> = l1
            .iter()
            .map(|&e| {
                let off = e & L1E_OFFSET_MASK;
                if e == 0 {
                    0
                } else if ones.is_one(off >> bits) {
                    off | OFLAG_COPIED
                } else {
                    off
                }
            })
            .collect();
        // After a strip, the L1 on disk has no COPIED flag.
        let on_disk: Vec<u64> = if addend == Addend::Increase {
            l1.iter().map(|&e| e & !OFLAG_COPIED).collect()
        } else {
            l1.clone()
        };
        if entries != on_disk {
            new_l1 = Some(entries);
        }
    }

    // Phases D and E: write back both caches, then the L1 (its flags agree with refcounts
    // that are durable already), then one barrier for all of it.
    {
        let caches = host.parts().caches;
        caches.write(CacheId::L2).map_err(|e| fail(e.into()))?;
        caches
            .write(CacheId::Refblock)
            .map_err(|e| fail(e.into()))?;
    }
    if let Some(entries) = new_l1 {
        write_l1(host, &ctx, source, &entries, &mut stats).map_err(fail)?;
    }
    ctx.storage
        .flush()
        .map_err(|e| fail(Error::io("Failed to flush the image", e)))?;
    Ok(stats)
}

/// Writes `entries` as the pass's L1 table (not flushed: the caller issues the barrier), and
/// into memory for the active one. Caller-supplied entries are never written anywhere.
fn write_l1<H: SnapshotHost + ?Sized>(
    host: &mut H,
    ctx: &Ctx,
    source: L1Source<'_>,
    entries: &[u64],
    stats: &mut PassStats,
) -> Result<(), Error> {
    let (offset, target) = match source {
        L1Source::Active => {
            let p = host.parts();
            let n = p.active_l1.len().min(entries.len());
            p.active_l1[..n].copy_from_slice(&entries[..n]);
            (host.l1_table_offset(), MetadataWrite::ActiveL1)
        }
        L1Source::OnDisk { offset, .. } => (offset, MetadataWrite::SnapshotL1),
        L1Source::Entries(_) => return Ok(()),
    };
    let bytes = l1_bytes(entries);
    host.check_overlap(offset, bytes.len() as u64, target)?;
    ctx.storage
        .write_at(&bytes, offset)
        .map_err(|e| Error::io("Failed to write the L1 table", e))?;
    stats.l1_rewritten = true;
    Ok(())
}

/// Sets COPIED on every data / preallocated zero entry of every table iff
/// `copied(cluster)`, clears it everywhere else (compressed, unallocated), and writes the
/// slices that changed: through the L2 cache when cached there (with the L2 cache ordered
/// after the refcount cache when `after_refcounts`), else directly (contiguous dirty slices
/// in one write, after the host's overlap check).
#[allow(clippy::too_many_arguments)]
fn rewrite_copied<H: SnapshotHost + ?Sized>(
    host: &mut H,
    ctx: &Ctx,
    tables: &[L2Ref],
    groups: &[Range<usize>],
    kept: &mut [Vec<u8>],
    copied: &dyn Fn(u64) -> bool,
    after_refcounts: bool,
    stats: &mut PassStats,
) -> Result<(), Error> {
    let geometry = ctx.geometry;
    let bits = geometry.cluster_bits();
    let cs = ctx.cs() as usize;
    let entry_size = ctx.l2.entry_size();
    let too_short = || {
        Error::Refcount(RefcountError::InvalidRequest {
            reason: "L2 table buffer too short",
        })
    };
    for (gi, g) in groups.iter().enumerate() {
        let mut local;
        let buf: &mut Vec<u8> = match kept.get_mut(gi) {
            Some(b) => b,
            None => {
                local = load_group(host.parts().caches, ctx, &tables[g.clone()])?;
                &mut local
            }
        };
        let mut direct: Vec<(u64, Range<usize>)> = Vec::new();
        {
            let p = host.parts();
            let slice = p.caches.entry_size(CacheId::L2).clamp(1, cs);
            for (k, t) in tables[g.clone()].iter().enumerate() {
                let base = k * cs;
                let table = &mut buf[base..base + cs];
                let mut dirty = vec![false; cs.div_ceil(slice)];
                for j in 0..geometry.l2_entries() {
                    let old =
                        read_l2_entry(table, j, geometry.extended_l2()).map_err(|_| too_short())?;
                    let raw = old.raw_entry() & !OFLAG_COPIED;
                    let plain = L2Entry::from_raw(raw, old.bitmap());
                    let set = match plain.cluster_type(ctx.l2) {
                        ClusterType::Normal | ClusterType::ZeroAlloc => {
                            copied(plain.host_offset() >> bits)
                        }
                        // Compressed clusters are never COPIED (QEMU counts them as 2).
                        _ => false,
                    };
                    let new_raw = if set { raw | OFLAG_COPIED } else { raw };
                    if new_raw != old.raw_entry() {
                        write_l2_entry(
                            table,
                            j,
                            L2Entry::from_raw(new_raw, old.bitmap()),
                            geometry.extended_l2(),
                        )
                        .map_err(|_| too_short())?;
                        if let Some(d) = dirty.get_mut(j as usize * entry_size / slice) {
                            *d = true;
                        }
                    }
                }
                // Cached slices are updated in the cache (never behind its back); the others
                // are written directly, contiguous dirty slices in one write.
                let mut run: Option<Range<usize>> = None;
                for (s, &d) in dirty.iter().enumerate() {
                    let soff = s * slice;
                    let cached = d && p.caches.is_cached(CacheId::L2, t.offset + soff as u64);
                    if cached {
                        stats.l2_slices_rewritten += 1;
                        if after_refcounts {
                            p.caches.set_dependency(CacheId::L2, CacheId::Refblock)?;
                        }
                        let h = p.caches.get(CacheId::L2, t.offset + soff as u64)?;
                        let dst = p.caches.data_mut(&h);
                        let n = dst.len().min(cs - soff);
                        dst[..n].copy_from_slice(&table[soff..soff + n]);
                        p.caches.mark_dirty(&h);
                        p.caches.put(h)?;
                    }
                    if d && !cached {
                        stats.l2_slices_rewritten += 1;
                        let r = base + soff..base + (soff + slice).min(cs);
                        run = Some(match run {
                            Some(prev) if prev.end == r.start => prev.start..r.end,
                            Some(prev) => {
                                direct.push((t.offset + (prev.start - base) as u64, prev));
                                r
                            }
                            None => r,
                        });
                    } else if let Some(prev) = run.take() {
                        direct.push((t.offset + (prev.start - base) as u64, prev));
                    }
                }
                if let Some(prev) = run.take() {
                    direct.push((t.offset + (prev.start - base) as u64, prev));
                }
            }
        }
        for (off, r) in direct {
            let len = (r.end - r.start) as u64;
            host.check_overlap(off, len, MetadataWrite::L2Table)?;
            ctx.storage.event(Event::L2Update);
            ctx.storage
                .write_at(&buf[r], off)
                .map_err(|e| Error::io("Failed to write an L2 table", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Runs, Seg};

    fn seg(start: u64, len: u64, count: u64) -> Seg {
        Seg { start, len, count }
    }

    #[test]
    fn contiguous_runs_merge() {
        let mut r = Runs::default();
        for c in [10, 11, 12, 20, 21] {
            r.push(c, 1, 1);
        }
        r.push(13, 1, 1);
        assert_eq!(r.into_segments(), vec![seg(10, 4, 1), seg(20, 2, 1)]);
    }

    #[test]
    fn overlapping_runs_sum_their_counts() {
        // Two compressed clusters sharing host cluster 5, a table named twice (count 2).
        let mut r = Runs::default();
        r.push(4, 2, 1);
        r.push(5, 1, 1);
        r.push(9, 1, 2);
        r.push(5, 3, 1);
        assert_eq!(
            r.into_segments(),
            vec![seg(4, 1, 1), seg(5, 1, 3), seg(6, 2, 1), seg(9, 1, 2)]
        );
    }
}
