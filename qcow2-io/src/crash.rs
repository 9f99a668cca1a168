//! Crash simulation: a volatile write cache over an in-memory durable image.
//!
//! [`CrashStorage`] keeps two images: the *durable* one (what survives power loss) and the
//! *current* one that reads see (durable plus every pending operation, as a write cache
//! would serve them). Every `write_at`, `write_zeroes`, `discard` and `set_len` since the
//! last successful `flush` is *pending*; a successful `flush` makes all of them durable at
//! once and starts a new *epoch* (epoch = number of successful flushes).
//!
//! After a crash, any subset of the pending operations may have reached the disk, and a
//! multi-sector write may be torn at sector granularity. [`CrashStates`] enumerates such
//! post-crash images lazily (one image in memory at a time besides the checkpoint):
//! - every prefix of the pending operations, applied in order (pending + 1 states, from
//!   "nothing" to "everything");
//! - seeded random subsets (each pending operation applied or not, in order);
//! - torn writes: the operations before a pending write applied, then only some of that
//!   write's 512-byte sectors (sector-aligned, so every sector holds either its old or its
//!   new contents).
//!
//! A crash test walks these states at interesting moments: take a [`Checkpoint`] (cheap:
//! reference-counted durable image plus pending list), or register [`CrashStorage::on_flush`]
//! / [`CrashStorage::on_op`] hooks that receive one before every flush or after every
//! operation.
//!
//! Failing flushes: the [`CrashStorage::on_flush`] hook may return an error, which fails the
//! flush; or wrap the storage in [`crate::fault::FaultStorage`], which fails the flush before
//! it reaches this one. Either way nothing becomes durable and the operations stay pending
//! (a failed flush promises nothing, so every crash state stays possible).
//!
//! The byte semantics of every operation are exactly [`crate::MemStorage`]'s (shared code),
//! so a crash state can be compared byte for byte with a `MemStorage` that received the same
//! operations.

use crate::mem::{vec_discard, vec_read, vec_set_len, vec_write, vec_write_zeroes};
use crate::{Event, Storage};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// A tiny deterministic PRNG (SplitMix64), so crash enumeration is reproducible from a seed
/// without a dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`; equal seeds give equal sequences.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`0` when `n == 0`); the slight modulo bias does not matter here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// A storage operation that changes contents or length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at(data, offset)`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes written (shared, so checkpoints clone cheaply).
        data: Arc<[u8]>,
    },
    /// `write_zeroes(offset, len)`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `discard(offset, len)`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `set_len(len)`.
    SetLen {
        /// The new length.
        len: u64,
    },
}

impl Op {
    /// Applies the operation to `image` with [`crate::MemStorage`]'s semantics.
    pub fn apply(&self, image: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Op::Write { offset, data } => vec_write(image, data, *offset),
            Op::WriteZeroes { offset, len } => vec_write_zeroes(image, *offset, *len),
            Op::Discard { offset, len } => vec_discard(image, *offset, *len),
            Op::SetLen { len } => vec_set_len(image, *len),
        }
    }

    /// The byte range the operation may change, `[start, end)`; `end == None` means "to
    /// infinity" (a `set_len` changes the length, so every byte from the new end on may
    /// read differently). Bytes outside it read the same before and after.
    pub fn touched(&self) -> (u64, Option<u64>) {
        match self {
            Op::Write { offset, data } => (*offset, offset.checked_add(data.len() as u64)),
            Op::WriteZeroes { offset, len } | Op::Discard { offset, len } => {
                (*offset, offset.checked_add(*len))
            }
            Op::SetLen { len } => (*len, None),
        }
    }
}

/// An operation waiting in the volatile cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingOp {
    /// The operation.
    pub op: Op,
    /// The event most recently reported before it (a diagnostic hint: which engine step
    /// issued the write).
    pub event: Option<Event>,
    /// Sequence number over the storage's lifetime (0-based, never reused).
    pub seq: u64,
}

/// Which post-crash image a [`CrashState`] is, enough to rebuild it with
/// [`Checkpoint::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashStateKind {
    /// The first `applied` pending operations reached the disk, in order.
    Prefix {
        /// How many.
        applied: usize,
    },
    /// Pending operation `i` reached the disk iff `applied[i]`.
    Subset {
        /// One flag per pending operation.
        applied: Vec<bool>,
    },
    /// The operations before pending write `op` reached the disk, then sector `j` of that
    /// write (counting the sector-aligned pieces it covers) iff `sectors[j]`.
    Torn {
        /// Index of the torn write in the pending list.
        op: usize,
        /// One flag per sector piece of the write.
        sectors: Vec<bool>,
    },
}

impl fmt::Display for CrashStateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = |v: &[bool]| {
            v.iter()
                .map(|&b| if b { '1' } else { '0' })
                .collect::<String>()
        };
        match self {
            CrashStateKind::Prefix { applied } => write!(f, "prefix of {applied} ops"),
            CrashStateKind::Subset { applied } => write!(f, "subset {}", bits(applied)),
            CrashStateKind::Torn { op, sectors } => {
                write!(f, "torn write #{op} sectors {}", bits(sectors))
            }
        }
    }
}

/// One post-crash image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    /// How it was formed.
    pub kind: CrashStateKind,
    /// The disk contents after the crash (reads beyond its end are zero).
    pub image: Vec<u8>,
}

/// Which crash states to enumerate. `Default` gives the prefixes only, seed 0, 512-byte
/// sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashOptions {
    /// Every prefix of the pending operations (pending + 1 states).
    pub prefixes: bool,
    /// This many seeded random subsets of the pending operations.
    pub random_subsets: usize,
    /// For every pending write spanning two or more sectors: its first `j` sectors and its
    /// last `j` sectors, for each `j` in `1..sectors` (in-order and reverse-order tearing).
    pub torn_writes: bool,
    /// For every pending write spanning two or more sectors: this many seeded random
    /// non-empty proper subsets of its sectors.
    pub torn_random: usize,
    /// Seed of the random choices; equal seeds give equal sequences.
    pub seed: u64,
    /// Atomic unit of a write, in bytes (512, as a disk sector). At least 1.
    pub sector_size: u64,
}

impl Default for CrashOptions {
    fn default() -> Self {
        Self {
            prefixes: true,
            random_subsets: 0,
            torn_writes: false,
            torn_random: 0,
            seed: 0,
            sector_size: 512,
        }
    }
}

impl CrashOptions {
    /// Prefixes, `subsets` random subsets and all torn-write families (`torn_random` of 4),
    /// from `seed`.
    pub fn thorough(subsets: usize, seed: u64) -> Self {
        Self {
            prefixes: true,
            random_subsets: subsets,
            torn_writes: true,
            torn_random: 4,
            seed,
            sector_size: 512,
        }
    }

    /// Sets [`CrashOptions::prefixes`].
    pub fn with_prefixes(mut self, on: bool) -> Self {
        self.prefixes = on;
        self
    }

    /// Sets [`CrashOptions::random_subsets`].
    pub fn with_random_subsets(mut self, n: usize) -> Self {
        self.random_subsets = n;
        self
    }

    /// Sets [`CrashOptions::torn_writes`].
    pub fn with_torn_writes(mut self, on: bool) -> Self {
        self.torn_writes = on;
        self
    }

    /// Sets [`CrashOptions::torn_random`].
    pub fn with_torn_random(mut self, n: usize) -> Self {
        self.torn_random = n;
        self
    }

    /// Sets [`CrashOptions::seed`].
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets [`CrashOptions::sector_size`] (0 is taken as 1).
    pub fn with_sector_size(mut self, size: u64) -> Self {
        self.sector_size = size.max(1);
        self
    }
}

/// The sector-aligned pieces `[start, end)` of a write of `len` bytes at `offset`.
fn sector_pieces(offset: u64, len: u64, sector: u64) -> impl Iterator<Item = (u64, u64)> {
    let sector = sector.max(1);
    let end = offset.saturating_add(len);
    let first = offset / sector;
    let count = if len == 0 {
        0
    } else {
        (end - 1) / sector - first + 1
    };
    (0..count).map(move |j| {
        let s = (first + j) * sector;
        (s.max(offset), s.saturating_add(sector).min(end))
    })
}

fn sector_count(op: &Op, sector: u64) -> usize {
    match op {
        Op::Write { offset, data } => sector_pieces(*offset, data.len() as u64, sector).count(),
        _ => 0,
    }
}

/// Applies the pieces of a write selected by `sectors`.
fn apply_torn(image: &mut Vec<u8>, op: &Op, sectors: &[bool], sector: u64) {
    if let Op::Write { offset, data } = op {
        for ((s, e), _) in sector_pieces(*offset, data.len() as u64, sector)
            .zip(sectors)
            .filter(|(_, &on)| on)
        {
            // The offsets lie inside `data` by construction of the pieces.
            let (a, b) = ((s - offset) as usize, (e - offset) as usize);
            apply_ok(vec_write(image, &data[a..b], s));
        }
    }
}

/// Every recorded operation was applied successfully to the cache when it was issued, and
/// an operation's validity depends only on its arguments, so replaying it cannot fail.
fn apply_ok(r: io::Result<()>) {
    debug_assert!(r.is_ok(), "replaying a validated operation failed: {r:?}");
}

/// A moment's durable image and pending operations; cheap to clone (shared buffers).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    durable: Arc<Vec<u8>>,
    pending: Arc<[PendingOp]>,
    epoch: u64,
}

impl Checkpoint {
    /// The durable image: what survives if nothing pending reached the disk.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// The pending operations, oldest first.
    pub fn pending(&self) -> &[PendingOp] {
        &self.pending
    }

    /// Successful flushes before this moment.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The image with the first `n` pending operations applied (`n` is capped).
    pub fn prefix(&self, n: usize) -> Vec<u8> {
        let mut image = (*self.durable).clone();
        for p in self.pending.iter().take(n) {
            apply_ok(p.op.apply(&mut image));
        }
        image
    }

    /// The image with every pending operation applied: what reads saw at this moment.
    pub fn current(&self) -> Vec<u8> {
        self.prefix(self.pending.len())
    }

    /// Rebuilds the image described by `kind` (`sector_size` as enumerated).
    pub fn state(&self, kind: &CrashStateKind, sector_size: u64) -> Vec<u8> {
        match kind {
            CrashStateKind::Prefix { applied } => self.prefix(*applied),
            CrashStateKind::Subset { applied } => {
                let mut image = (*self.durable).clone();
                for (p, _) in self.pending.iter().zip(applied).filter(|(_, &on)| on) {
                    apply_ok(p.op.apply(&mut image));
                }
                image
            }
            CrashStateKind::Torn { op, sectors } => {
                let mut image = self.prefix(*op);
                if let Some(p) = self.pending.get(*op) {
                    apply_torn(&mut image, &p.op, sectors, sector_size);
                }
                image
            }
        }
    }

    /// Enumerates the post-crash images chosen by `opts`, lazily.
    pub fn crash_states(&self, opts: &CrashOptions) -> CrashStates {
        CrashStates::new(self.clone(), opts.clone())
    }
}

#[derive(Debug)]
enum Phase {
    Prefix(usize),
    Subset(usize),
    /// Pending op index, and the variant within that op's torn family.
    Torn(usize, usize),
    Done,
}

/// A lazy iterator over post-crash images (see [`CrashOptions`]). Holds the checkpoint and
/// at most one working image; each item is built on demand.
#[derive(Debug)]
pub struct CrashStates {
    cp: Checkpoint,
    opts: CrashOptions,
    phase: Phase,
    /// The durable image with `pending[..running_k]` applied, reused so that walking
    /// prefixes and torn writes in order applies each operation once.
    running: Vec<u8>,
    running_k: usize,
    subset_rng: SplitMix64,
    torn_rng: SplitMix64,
    remaining: usize,
}

impl CrashStates {
    fn new(cp: Checkpoint, mut opts: CrashOptions) -> Self {
        opts.sector_size = opts.sector_size.max(1);
        let n = cp.pending.len();
        let per_torn = |s: usize| {
            if s < 2 {
                0
            } else {
                usize::from(opts.torn_writes) * 2 * (s - 1) + opts.torn_random
            }
        };
        let torn: usize = cp
            .pending
            .iter()
            .map(|p| per_torn(sector_count(&p.op, opts.sector_size)))
            .sum();
        let remaining = if opts.prefixes { n + 1 } else { 0 } + opts.random_subsets + torn;
        // Separate streams, so adding torn states does not change the subsets of a seed.
        let subset_rng = SplitMix64::new(opts.seed);
        let torn_rng = SplitMix64::new(opts.seed ^ 0x5EC7_0E5E_C70E_5EC7);
        let phase = if opts.prefixes {
            Phase::Prefix(0)
        } else {
            Phase::Subset(0)
        };
        Self {
            running: Vec::new(),
            running_k: usize::MAX,
            cp,
            opts,
            phase,
            subset_rng,
            torn_rng,
            remaining,
        }
    }

    /// Brings `running` to "first `k` pending ops applied", restarting from the durable
    /// image when it is ahead.
    fn advance_running(&mut self, k: usize) {
        if self.running_k > k {
            self.running = (*self.cp.durable).clone();
            self.running_k = 0;
        }
        while self.running_k < k {
            apply_ok(self.cp.pending[self.running_k].op.apply(&mut self.running));
            self.running_k += 1;
        }
    }

    /// The `v`-th torn variant of a write with `s` sectors, or `None` past the family.
    fn torn_variant(&mut self, s: usize, v: usize) -> Option<Vec<bool>> {
        let det = if self.opts.torn_writes {
            2 * (s - 1)
        } else {
            0
        };
        if v < det {
            let (j, from_front) = if v < s - 1 {
                (v + 1, true)
            } else {
                (v - (s - 1) + 1, false)
            };
            return Some(
                (0..s)
                    .map(|i| if from_front { i < j } else { i >= s - j })
                    .collect(),
            );
        }
        if v < det + self.opts.torn_random {
            // Rejection-sample a non-empty proper subset (accepted with p >= 1/2 for s >= 2).
            loop {
                let m: Vec<bool> = (0..s).map(|_| self.torn_rng.coin()).collect();
                let on = m.iter().filter(|&&b| b).count();
                if on != 0 && on != s {
                    return Some(m);
                }
            }
        }
        None
    }
}

impl Iterator for CrashStates {
    type Item = CrashState;

    fn next(&mut self) -> Option<CrashState> {
        let n = self.cp.pending.len();
        loop {
            match self.phase {
                Phase::Prefix(k) => {
                    if k > n {
                        self.phase = Phase::Subset(0);
                        continue;
                    }
                    self.advance_running(k);
                    self.phase = Phase::Prefix(k + 1);
                    self.remaining -= 1;
                    return Some(CrashState {
                        kind: CrashStateKind::Prefix { applied: k },
                        image: self.running.clone(),
                    });
                }
                Phase::Subset(i) => {
                    if i >= self.opts.random_subsets {
                        self.phase = Phase::Torn(0, 0);
                        continue;
                    }
                    let applied: Vec<bool> = (0..n).map(|_| self.subset_rng.coin()).collect();
                    self.phase = Phase::Subset(i + 1);
                    self.remaining -= 1;
                    let kind = CrashStateKind::Subset { applied };
                    let image = self.cp.state(&kind, self.opts.sector_size);
                    return Some(CrashState { kind, image });
                }
                Phase::Torn(op, v) => {
                    if op >= n {
                        self.phase = Phase::Done;
                        continue;
                    }
                    let s = sector_count(&self.cp.pending[op].op, self.opts.sector_size);
                    let variant = if s >= 2 {
                        self.torn_variant(s, v)
                    } else {
                        None
                    };
                    let Some(sectors) = variant else {
                        self.phase = Phase::Torn(op + 1, 0);
                        continue;
                    };
                    self.phase = Phase::Torn(op, v + 1);
                    self.advance_running(op);
                    let mut image = self.running.clone();
                    apply_torn(
                        &mut image,
                        &self.cp.pending[op].op,
                        &sectors,
                        self.opts.sector_size,
                    );
                    self.remaining -= 1;
                    return Some(CrashState {
                        kind: CrashStateKind::Torn { op, sectors },
                        image,
                    });
                }
                Phase::Done => {
                    // Release the working image as soon as the walk ends.
                    self.running = Vec::new();
                    return None;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for CrashStates {}

/// A hook run before every flush; an `Err` fails the flush.
type FlushHook = Box<dyn FnMut(&Checkpoint) -> io::Result<()> + Send>;
/// A hook run after every recorded operation.
type OpHook = Box<dyn FnMut(&Checkpoint) + Send>;

#[derive(Default)]
struct Hooks {
    on_flush: Option<FlushHook>,
    on_op: Option<OpHook>,
}

#[derive(Debug, Default)]
struct State {
    durable: Arc<Vec<u8>>,
    /// `durable` with every pending op applied; what reads see.
    cache: Vec<u8>,
    pending: Vec<PendingOp>,
    epoch: u64,
    next_seq: u64,
    last_event: Option<Event>,
}

impl State {
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            durable: Arc::clone(&self.durable),
            pending: self.pending.as_slice().into(),
            epoch: self.epoch,
        }
    }
}

/// A [`Storage`] modelling a volatile write cache over an in-memory durable image.
///
/// ```
/// use qcow2_io::crash::{CrashOptions, CrashStorage};
/// use qcow2_io::Storage;
///
/// let s = CrashStorage::from_bytes(vec![0; 1024]);
/// s.write_at(&[1; 1024], 0).unwrap(); // pending: reads see it, a crash may lose it
/// s.write_at(&[2; 8], 2048).unwrap();
/// let opts = CrashOptions::default().with_torn_writes(true);
/// // 3 prefixes + 2 torn variants of the 2-sector write.
/// assert_eq!(s.crash_states(&opts).count(), 5);
/// s.flush().unwrap();
/// assert_eq!(s.durable().len(), 2056);
/// assert_eq!(s.crash_states(&opts).count(), 1); // nothing pending: only the durable image
/// ```
pub struct CrashStorage {
    state: Mutex<State>,
    hooks: Mutex<Hooks>,
}

impl fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("CrashStorage")
            .field("durable_len", &st.durable.len())
            .field("current_len", &st.cache.len())
            .field("pending", &st.pending.len())
            .field("epoch", &st.epoch)
            .finish()
    }
}

impl Default for CrashStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl CrashStorage {
    /// An empty storage, nothing pending, epoch 0.
    pub fn new() -> Self {
        Self::from_bytes(Vec::new())
    }

    /// A storage whose durable image is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            state: Mutex::new(State {
                cache: bytes.clone(),
                durable: Arc::new(bytes),
                ..State::default()
            }),
            hooks: Mutex::new(Hooks::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement; a panicking test thread must not
        // hide it from the assertions of another.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_hooks(&self) -> MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The durable image: what a crash right now leaves if no pending operation made it.
    pub fn durable(&self) -> Vec<u8> {
        (*self.lock().durable).clone()
    }

    /// The current image, as reads see it (durable plus every pending operation).
    pub fn current(&self) -> Vec<u8> {
        self.lock().cache.clone()
    }

    /// The pending operations, oldest first.
    pub fn pending(&self) -> Vec<PendingOp> {
        self.lock().pending.clone()
    }

    /// How many operations are pending.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Successful flushes so far.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The durable image and pending operations now (cheap: shares the durable buffer).
    pub fn checkpoint(&self) -> Checkpoint {
        self.lock().checkpoint()
    }

    /// Enumerates the post-crash images of the present moment, lazily (see
    /// [`Checkpoint::crash_states`]); later operations do not affect the iterator.
    pub fn crash_states(&self, opts: &CrashOptions) -> CrashStates {
        self.checkpoint().crash_states(opts)
    }

    /// Power loss: every pending operation is lost; reads see the durable image again.
    /// Returns how many operations were lost. The epoch is unchanged.
    pub fn crash(&self) -> usize {
        let mut st = self.lock();
        st.cache = (*st.durable).clone();
        st.last_event = None;
        std::mem::take(&mut st.pending).len()
    }

    /// Restarts from `image` as the durable image with nothing pending (e.g. a chosen
    /// [`CrashState`], to reopen the image "after the crash"). The epoch is unchanged.
    pub fn reset(&self, image: Vec<u8>) {
        let mut st = self.lock();
        st.cache = image.clone();
        st.durable = Arc::new(image);
        st.pending.clear();
        st.last_event = None;
    }

    /// Runs `hook` before every flush with the checkpoint about to become durable (the
    /// place to enumerate crash states at each flush boundary). An `Err` fails the flush:
    /// nothing becomes durable. Replaces any previous flush hook. The hook runs without the
    /// storage's locks held; a flush it issues on this storage does not re-run it.
    pub fn on_flush(&self, hook: impl FnMut(&Checkpoint) -> io::Result<()> + Send + 'static) {
        self.lock_hooks().on_flush = Some(Box::new(hook));
    }

    /// Runs `hook` after every recorded operation (write, write-zeroes, discard, set-len)
    /// with the checkpoint including it. Replaces any previous operation hook. Costs a
    /// copy of the pending list per operation.
    pub fn on_op(&self, hook: impl FnMut(&Checkpoint) + Send + 'static) {
        self.lock_hooks().on_op = Some(Box::new(hook));
    }

    /// Removes both hooks.
    pub fn clear_hooks(&self) {
        *self.lock_hooks() = Hooks::default();
    }

    /// Applies `op` to the cache (which validates it) and records it as pending.
    fn record(&self, op: Op) -> io::Result<()> {
        // Only pay for a checkpoint when someone watches. Checked before taking the state
        // lock: the two locks are never held together.
        let watched = self.lock_hooks().on_op.is_some();
        let cp = {
            let mut st = self.lock();
            op.apply(&mut st.cache)?;
            let (seq, event) = (st.next_seq, st.last_event);
            st.next_seq += 1;
            st.pending.push(PendingOp { op, event, seq });
            watched.then(|| st.checkpoint())
        };
        if let Some(cp) = cp {
            // Taken out while it runs, so it may use this storage without deadlocking.
            let hook = self.lock_hooks().on_op.take();
            if let Some(mut hook) = hook {
                hook(&cp);
                self.lock_hooks().on_op.get_or_insert(hook);
            }
        }
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        vec_read(&self.lock().cache, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            // Changes nothing, so no pending entry; validated as `MemStorage` does.
            return vec_write(&mut Vec::new(), buf, offset);
        }
        self.record(Op::Write {
            offset,
            data: buf.into(),
        })
    }

    fn flush(&self) -> io::Result<()> {
        let hook = self.lock_hooks().on_flush.take();
        if let Some(mut hook) = hook {
            let cp = self.checkpoint();
            let r = hook(&cp);
            self.lock_hooks().on_flush.get_or_insert(hook);
            // A failed flush promises nothing: everything stays pending.
            r?;
        }
        let mut st = self.lock();
        if !st.pending.is_empty() {
            st.durable = Arc::new(st.cache.clone());
            st.pending.clear();
        }
        st.epoch += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().cache.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Op::SetLen { len })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            // Changes nothing, so no pending entry; validated as `MemStorage` does.
            return vec_discard(&mut [], offset, len);
        }
        self.record(Op::Discard { offset, len })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            // Changes nothing, so no pending entry; validated as `MemStorage` does.
            return vec_write_zeroes(&mut Vec::new(), offset, len);
        }
        self.record(Op::WriteZeroes { offset, len })
    }

    /// A zero-range the model keeps as one pending operation, like a file's fallocate.
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.write_zeroes(offset, len).map(|()| true)
    }

    // The model is a byte vector, as `MemStorage`: no holes inside (the default
    // `data_status` is exact), the whole length allocated.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.len().map(Some)
    }

    fn event(&self, event: Event) {
        self.lock().last_event = Some(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn sectors(image: &[u8], at: usize) -> &[u8] {
        &image[at..at + 512]
    }

    #[test]
    fn reads_see_pending_and_flush_makes_durable() {
        let s = CrashStorage::from_bytes(vec![0; 16]);
        s.write_at(&[1; 4], 4).unwrap();
        let mut b = [0u8; 8];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(s.durable(), vec![0; 16]);
        assert_eq!(s.pending_count(), 1);
        s.flush().unwrap();
        assert_eq!(s.epoch(), 1);
        assert_eq!(s.pending_count(), 0);
        assert_eq!(s.durable(), s.current());
    }

    #[test]
    fn prefixes_count_and_contents() {
        let s = CrashStorage::from_bytes(vec![9; 8]);
        s.write_at(&[1], 0).unwrap();
        s.set_len(4).unwrap();
        s.write_zeroes(6, 2).unwrap();
        s.discard(0, 2).unwrap();
        let states: Vec<_> = s.crash_states(&CrashOptions::default()).collect();
        assert_eq!(states.len(), 5);
        assert_eq!(states[0].image, vec![9; 8]);
        assert_eq!(states[1].image, vec![1, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(states[2].image, vec![1, 9, 9, 9]);
        assert_eq!(states[3].image, vec![1, 9, 9, 9, 0, 0, 0, 0]);
        assert_eq!(states[4].image, vec![0, 0, 9, 9, 0, 0, 0, 0]);
        assert_eq!(states[4].image, s.current());
    }

    #[test]
    fn torn_variants_are_sector_mixes() {
        let s = CrashStorage::from_bytes(vec![0xAA; 2048]);
        // Unaligned: touches sectors 0..=3, partially the first and last.
        s.write_at(&[0x55; 1500], 100).unwrap();
        let opts = CrashOptions::default()
            .with_prefixes(false)
            .with_torn_writes(true)
            .with_torn_random(5);
        let old = vec![0xAAu8; 2048];
        let new = s.current();
        let states: Vec<_> = s.crash_states(&opts).collect();
        assert_eq!(states.len(), 2 * 3 + 5);
        for st in &states {
            let mut olds = 0;
            for at in (0..2048).step_by(512) {
                let got = sectors(&st.image, at);
                assert!(
                    got == sectors(&old, at) || got == sectors(&new, at),
                    "{}",
                    st.kind
                );
                olds += usize::from(got == sectors(&old, at));
            }
            assert!(olds > 0 && olds < 4, "{}: a torn write is partial", st.kind);
        }
    }

    #[test]
    fn splitmix_is_deterministic() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs[0], xs[1]);
        assert!(SplitMix64::new(1).below(10) < 10);
    }

    #[test]
    fn failing_flush_hook_keeps_pending() {
        let s = CrashStorage::new();
        s.write_at(&[1; 4], 0).unwrap();
        s.on_flush(|cp| {
            assert_eq!(cp.pending().len(), 1);
            Err(io::Error::from_raw_os_error(crate::errno::EIO))
        });
        assert!(s.flush().is_err());
        assert_eq!(s.pending_count(), 1);
        assert_eq!(s.epoch(), 0);
        s.clear_hooks();
        s.flush().unwrap();
        assert_eq!(s.epoch(), 1);
    }

    #[test]
    fn matches_mem_storage_semantics() {
        let s = CrashStorage::new();
        let m = MemStorage::new();
        for st in [&s as &dyn Storage, &m] {
            st.write_at(&[3; 10], 5).unwrap();
            st.discard(12, 100).unwrap();
            st.write_zeroes(20, 4).unwrap();
            st.set_len(22).unwrap();
        }
        assert_eq!(s.current(), m.to_bytes());
    }
}
