//! Fault injection in the manner of QEMU's blkdebug `inject-error`.
//!
//! [`FaultStorage`] wraps any [`Storage`] and fails chosen I/O requests with a chosen `errno`.
//! A [`Rule`] is triggered either by a named [`Event`] the engine reports (blkdebug's
//! `event = "..."`) or by the N-th matching request (`Rule::on_request`).
//!
//! Semantics kept from blkdebug (`block/blkdebug.c`, `process_rule` / `rule_check`):
//! - Reporting an event *arms* the rules registered for it; it fails nothing by itself. The
//!   next request whose kind the rule targets (and, with [`Rule::at_offset`], whose range
//!   covers that offset) fails with the rule's errno and is **not** passed to the inner
//!   storage.
//! - When an event arms at least one rule, the previously armed event rules are disarmed
//!   first: the armed set is *replaced*, not extended (blkdebug re-initialises
//!   `active_rules`). Rules armed by the same event are checked in the order they were added.
//! - `once = true`: the rule is removed after it fired once and is never armed again.
//!   `once = false` (blkdebug's default): the armed rule keeps failing every later targeted
//!   request until it is disarmed (by another event arming, [`FaultStorage::disarm`],
//!   [`FaultStorage::remove_rule`] or [`FaultStorage::clear_rules`]).
//! - `immediately` only decides, in QEMU, whether the failing request returns its error
//!   synchronously or after a trip through the event loop; the same request fails either
//!   way. `Storage` is synchronous, so the flag is recorded and does not change which
//!   request fails.
//! - Default targets are blkdebug's default `iotype` mask: read, write, write-zeroes,
//!   discard and flush. `set_len` (a truncate, which blkdebug never fails) is targeted only
//!   when asked for ([`IoKinds::SET_LEN`], [`IoKinds::ALL`]). `len` is never failed.
//!
//! Extensions over blkdebug, for engine tests: [`Rule::skip_events`] (arm only from the
//! (n+1)-th report of the event) and [`Rule::on_request`] (blkdebug-less "fail the N-th
//! request"). Every reported event is logged in order and forwarded to the inner storage,
//! so fault and crash backends compose: `FaultStorage<CrashStorage>` fails a flush before it
//! reaches the crash simulator, leaving its pending writes pending.

use crate::{Event, Storage};
use std::fmt;
use std::io;
use std::ops::BitOr;
use std::sync::{Mutex, MutexGuard};

/// The kind of an I/O request, as blkdebug's `iotype` (plus `set_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
    /// `write_zeroes`.
    WriteZeroes,
    /// `set_len`.
    SetLen,
}

impl IoKind {
    /// Every kind, in declaration order (the index order of per-kind counters).
    pub const ALL: [IoKind; 6] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Discard,
        IoKind::WriteZeroes,
        IoKind::SetLen,
    ];

    const fn index(self) -> usize {
        match self {
            IoKind::Read => 0,
            IoKind::Write => 1,
            IoKind::Flush => 2,
            IoKind::Discard => 3,
            IoKind::WriteZeroes => 4,
            IoKind::SetLen => 5,
        }
    }

    const fn bit(self) -> u8 {
        1 << self.index()
    }
}

/// A set of [`IoKind`]s a rule targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoKinds(u8);

impl IoKinds {
    /// No kind: a rule with this target never fires.
    pub const NONE: IoKinds = IoKinds(0);
    /// Reads.
    pub const READ: IoKinds = IoKinds(IoKind::Read.bit());
    /// Writes.
    pub const WRITE: IoKinds = IoKinds(IoKind::Write.bit());
    /// Flushes.
    pub const FLUSH: IoKinds = IoKinds(IoKind::Flush.bit());
    /// Discards.
    pub const DISCARD: IoKinds = IoKinds(IoKind::Discard.bit());
    /// Write-zeroes requests.
    pub const WRITE_ZEROES: IoKinds = IoKinds(IoKind::WriteZeroes.bit());
    /// Discards and write-zeroes requests.
    pub const DISCARD_OR_ZEROES: IoKinds =
        IoKinds(IoKind::Discard.bit() | IoKind::WriteZeroes.bit());
    /// Truncate/extend requests.
    pub const SET_LEN: IoKinds = IoKinds(IoKind::SetLen.bit());
    /// blkdebug's default `iotype` mask: everything but `set_len`.
    pub const BLKDEBUG_DEFAULT: IoKinds = IoKinds(
        IoKind::Read.bit()
            | IoKind::Write.bit()
            | IoKind::Flush.bit()
            | IoKind::Discard.bit()
            | IoKind::WriteZeroes.bit(),
    );
    /// Every kind, `set_len` included.
    pub const ALL: IoKinds = IoKinds(Self::BLKDEBUG_DEFAULT.0 | IoKind::SetLen.bit());

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: IoKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

impl BitOr for IoKinds {
    type Output = IoKinds;
    fn bitor(self, rhs: IoKinds) -> IoKinds {
        IoKinds(self.0 | rhs.0)
    }
}

impl From<IoKind> for IoKinds {
    fn from(kind: IoKind) -> Self {
        IoKinds(kind.bit())
    }
}

/// What arms a [`Rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A report of `event`; the first `skip` reports are ignored.
    Event {
        /// The blkdebug event that arms the rule.
        event: Event,
        /// How many reports of `event` pass before one arms the rule.
        skip: u64,
    },
    /// The `n`-th targeted request (1-based, counted from when the rule was added) fails,
    /// whatever events were reported.
    Request {
        /// Which targeted request fails first.
        n: u64,
    },
}

/// An error-injection rule, blkdebug's `[inject-error]` section.
///
/// Built with [`Rule::on_event`] or [`Rule::on_request`] and refined with the builder
/// methods. Defaults are blkdebug's: `once = false`, `immediately = false`, targets
/// [`IoKinds::BLKDEBUG_DEFAULT`], any offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// What arms the rule.
    pub trigger: Trigger,
    /// The `errno` the failed request returns (`EIO` = 5, `ENOSPC` = 28, or any other).
    pub errno: i32,
    /// Remove the rule after it fired once (blkdebug `once = on`).
    pub once: bool,
    /// blkdebug `immediately`: recorded; no effect on which request fails (module docs).
    pub immediately: bool,
    /// The request kinds the rule fails (blkdebug `iotype`).
    pub kinds: IoKinds,
    /// Fail only requests whose byte range covers this offset (blkdebug `sector`, in
    /// bytes). A flush has no range, so a rule with an offset never fails one.
    pub offset: Option<u64>,
}

impl Rule {
    /// A rule armed by each report of `event` that fails with `errno`.
    pub fn on_event(event: Event, errno: i32) -> Rule {
        Rule {
            trigger: Trigger::Event { event, skip: 0 },
            errno,
            once: false,
            immediately: false,
            kinds: IoKinds::BLKDEBUG_DEFAULT,
            offset: None,
        }
    }

    /// A rule that fails the `n`-th targeted request (1-based; `0` behaves as `1`) and, unless
    /// `once`, every targeted request after it.
    pub fn on_request(n: u64, errno: i32) -> Rule {
        Rule {
            trigger: Trigger::Request { n: n.max(1) },
            ..Rule::on_event(Event::None, errno)
        }
    }

    /// Sets blkdebug `once`.
    pub fn once(mut self, once: bool) -> Rule {
        self.once = once;
        self
    }

    /// Sets blkdebug `immediately` (no effect on which request fails; see module docs).
    pub fn immediately(mut self, immediately: bool) -> Rule {
        self.immediately = immediately;
        self
    }

    /// Sets the targeted request kinds (blkdebug `iotype`).
    pub fn kinds(mut self, kinds: impl Into<IoKinds>) -> Rule {
        self.kinds = kinds.into();
        self
    }

    /// Fails only requests covering byte `offset` (blkdebug `sector`).
    pub fn at_offset(mut self, offset: u64) -> Rule {
        self.offset = Some(offset);
        self
    }

    /// For an event rule: ignore the first `n` reports of the event; the (n+1)-th arms the
    /// rule. No effect on a request rule.
    pub fn skip_events(mut self, n: u64) -> Rule {
        if let Trigger::Event { skip, .. } = &mut self.trigger {
            *skip = n;
        }
        self
    }

    /// Whether a request of `kind` over `[offset, offset + len)` is one this rule fails.
    fn targets(&self, kind: IoKind, offset: u64, len: u64) -> bool {
        if !self.kinds.contains(kind) {
            return false;
        }
        match self.offset {
            None => true,
            // As blkdebug: an empty request (flush) has no range to cover the offset.
            Some(at) => len != 0 && at >= offset && at - offset < len,
        }
    }
}

/// Identifies a rule added to a [`FaultStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(u64);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule#{}", self.0)
    }
}

/// Counters of requests seen and failed, per [`IoKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    requests: [u64; 6],
    failed: [u64; 6],
}

impl FaultStats {
    /// Requests of `kind` received (failed or not).
    pub fn requests(&self, kind: IoKind) -> u64 {
        self.requests[kind.index()]
    }

    /// Requests of `kind` that were failed by a rule.
    pub fn failed(&self, kind: IoKind) -> u64 {
        self.failed[kind.index()]
    }

    /// Requests of any kind that were failed by a rule.
    pub fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }
}

#[derive(Debug)]
struct Slot {
    id: RuleId,
    rule: Rule,
    /// Reports of the trigger event seen (event rules) or targeted requests seen (request
    /// rules), since the rule was added.
    seen: u64,
    /// Armed: the next targeted request fails. Event rules are armed by their event (and
    /// disarmed when another event arms); request rules when their count is reached.
    armed: bool,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Slot>,
    next_id: u64,
    events: Vec<Event>,
    stats: FaultStats,
    /// Failures per removed rule are lost with the rule; keep them by id.
    fired_by_id: Vec<(RuleId, u64)>,
}

/// A [`Storage`] that injects blkdebug-style errors into the requests it forwards.
///
/// All methods take `&self` (state behind a `Mutex`), so rules can be added, removed and
/// cleared while an engine holds the storage (e.g. in an `Arc`).
///
/// ```
/// use qcow2_io::fault::{FaultStorage, Rule};
/// use qcow2_io::{errno, Event, MemStorage, Storage, StorageExt};
///
/// let s = FaultStorage::new(MemStorage::new());
/// s.add_rule(Rule::on_event(Event::L2Update, errno::EIO).once(true));
/// s.write_at(b"ok", 0).unwrap(); // not armed yet
/// let err = s.write_event(Event::L2Update, b"no", 0).unwrap_err();
/// assert_eq!(err.raw_os_error(), Some(errno::EIO));
/// assert_eq!(s.inner().to_bytes(), b"ok"); // the failed write was not performed
/// s.write_event(Event::L2Update, b"ok", 0).unwrap(); // once: the rule is gone
/// assert_eq!(s.events(), [Event::L2Update, Event::L2Update]);
/// ```
#[derive(Debug)]
pub struct FaultStorage<S: Storage> {
    inner: S,
    state: Mutex<State>,
}

impl<S: Storage> FaultStorage<S> {
    /// Wraps `inner` with no rules.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// The wrapped storage (direct access bypasses the rules).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the storage.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not hide this storage's state; the state is
        // plain counters and lists, consistent after every statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a rule; it is not armed until its trigger happens.
    pub fn add_rule(&self, rule: Rule) -> RuleId {
        let mut st = self.lock();
        let id = RuleId(st.next_id);
        st.next_id += 1;
        st.rules.push(Slot {
            id,
            rule,
            seen: 0,
            armed: false,
        });
        id
    }

    /// Removes a rule; returns whether it was still present (a `once` rule that fired is
    /// already gone).
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut st = self.lock();
        let before = st.rules.len();
        st.rules.retain(|s| s.id != id);
        st.rules.len() != before
    }

    /// Removes every rule. The event log and counters are kept.
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    /// Disarms every rule without removing it: event rules wait for their event again;
    /// request rules that reached their count wait for the count to be reached again.
    pub fn disarm(&self) {
        for slot in &mut self.lock().rules {
            slot.armed = false;
            if matches!(slot.rule.trigger, Trigger::Request { .. }) {
                slot.seen = 0;
            }
        }
    }

    /// The rules still present, with their ids.
    pub fn rules(&self) -> Vec<(RuleId, Rule)> {
        self.lock().rules.iter().map(|s| (s.id, s.rule)).collect()
    }

    /// Whether rule `id` is present and armed.
    pub fn is_armed(&self, id: RuleId) -> bool {
        self.lock().rules.iter().any(|s| s.id == id && s.armed)
    }

    /// How many requests rule `id` has failed (also after a `once` rule removed itself).
    pub fn fired(&self, id: RuleId) -> u64 {
        self.lock()
            .fired_by_id
            .iter()
            .find(|(r, _)| *r == id)
            .map_or(0, |(_, n)| *n)
    }

    /// Every event reported so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// The events reported so far, clearing the log.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
    }

    /// Clears the event log.
    pub fn clear_events(&self) {
        self.lock().events.clear();
    }

    /// Request and failure counters.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }

    /// Requests failed by a rule, of any kind.
    pub fn failed_requests(&self) -> u64 {
        self.lock().stats.failed_total()
    }

    /// Resets the request and failure counters (not the rules' own counts).
    pub fn reset_stats(&self) {
        self.lock().stats = FaultStats::default();
    }

    /// Decides whether a request fails; counts it either way. `Err` means: do not perform.
    fn check(&self, kind: IoKind, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.stats.requests[kind.index()] += 1;

        // Request rules count every targeted request, fired or not, so "the N-th" means the
        // N-th request the rule could fail.
        for slot in &mut st.rules {
            if let Trigger::Request { n } = slot.rule.trigger {
                if slot.rule.targets(kind, offset, len) {
                    slot.seen += 1;
                    if slot.seen >= n {
                        slot.armed = true;
                    }
                }
            }
        }

        // Armed event rules all come from the latest arming event (arming replaces the set),
        // so insertion order among them is the check order; request rules (our extension)
        // are checked after them.
        let pick = st
            .rules
            .iter()
            .enumerate()
            .filter(|(_, s)| s.armed && s.rule.targets(kind, offset, len))
            .min_by_key(|(i, s)| (matches!(s.rule.trigger, Trigger::Request { .. }), *i))
            .map(|(i, _)| i);
        let Some(i) = pick else {
            return Ok(());
        };
        let (id, errno, once) = {
            let s = &st.rules[i];
            (s.id, s.rule.errno, s.rule.once)
        };
        if once {
            // As blkdebug's remove_rule: a once rule never arms again.
            st.rules.remove(i);
        }
        match st.fired_by_id.iter_mut().find(|(r, _)| *r == id) {
            Some((_, n)) => *n += 1,
            None => st.fired_by_id.push((id, 1)),
        }
        st.stats.failed[kind.index()] += 1;
        Err(io::Error::from_raw_os_error(errno))
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(IoKind::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(IoKind::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(IoKind::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // The range a truncate changes starts at the new end.
        self.check(IoKind::SetLen, len, u64::MAX - len)?;
        self.inner.set_len(len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(IoKind::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(IoKind::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len)
    }

    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.check(IoKind::WriteZeroes, offset, len)?;
        self.inner.zero_fast(offset, len)
    }

    // Status queries move no data: no fault rule applies to them.
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.data_status(offset, len)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }

    fn event(&self, event: Event) {
        {
            let mut st = self.lock();
            st.events.push(event);
            let mut replaced = false;
            for i in 0..st.rules.len() {
                let Trigger::Event { event: e, skip } = st.rules[i].rule.trigger else {
                    continue;
                };
                if e != event {
                    continue;
                }
                st.rules[i].seen += 1;
                if st.rules[i].seen <= skip {
                    continue;
                }
                if !replaced {
                    // blkdebug: the first rule this event arms resets the active list.
                    for s in &mut st.rules {
                        if matches!(s.rule.trigger, Trigger::Event { .. }) {
                            s.armed = false;
                        }
                    }
                    replaced = true;
                }
                st.rules[i].armed = true;
            }
        }
        // Forwarded outside the lock: the inner storage may be another fault layer.
        self.inner.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{errno, MemStorage, StorageExt};

    fn mem(bytes: &[u8]) -> FaultStorage<MemStorage> {
        FaultStorage::new(MemStorage::from_bytes(bytes.to_vec()))
    }

    fn os(e: io::Error) -> Option<i32> {
        e.raw_os_error()
    }

    #[test]
    fn event_arms_and_next_targeted_request_fails_once() {
        let s = mem(&[0; 8]);
        let id = s.add_rule(Rule::on_event(Event::L2Update, errno::ENOSPC).once(true));
        s.write_at(&[1], 0).unwrap();
        assert!(!s.is_armed(id));
        s.event(Event::L2Update);
        assert!(s.is_armed(id));
        assert_eq!(os(s.write_at(&[2], 1).unwrap_err()), Some(errno::ENOSPC));
        assert_eq!(s.inner().to_bytes(), [1, 0, 0, 0, 0, 0, 0, 0]);
        s.write_at(&[3], 2).unwrap();
        s.event(Event::L2Update);
        s.write_at(&[4], 3).unwrap();
        assert_eq!(s.fired(id), 1);
        assert!(s.rules().is_empty());
        assert_eq!(s.stats().failed(IoKind::Write), 1);
        assert_eq!(s.stats().requests(IoKind::Write), 4);
    }

    #[test]
    fn once_off_keeps_failing_until_cleared() {
        let s = mem(&[7; 4]);
        let id = s.add_rule(Rule::on_event(Event::RefblockLoad, errno::EIO));
        s.event(Event::RefblockLoad);
        let mut b = [0u8; 4];
        for _ in 0..3 {
            assert_eq!(os(s.read_at(&mut b, 0).unwrap_err()), Some(errno::EIO));
            assert_eq!(os(s.flush().unwrap_err()), Some(errno::EIO));
        }
        assert_eq!(s.fired(id), 6);
        assert_eq!(s.failed_requests(), 6);
        s.clear_rules();
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 4]);
    }

    #[test]
    fn kinds_restrict_what_fails() {
        let s = mem(&[0; 4]);
        s.add_rule(Rule::on_event(Event::FlushToDisk, errno::EIO).kinds(IoKinds::FLUSH));
        s.event(Event::FlushToDisk);
        s.write_at(&[1], 0).unwrap();
        s.read_at(&mut [0; 1], 0).unwrap();
        assert!(s.flush().is_err());
        // set_len is outside blkdebug's default mask, but can be targeted.
        let s = mem(&[0; 4]);
        s.add_rule(Rule::on_event(Event::None, errno::EIO));
        s.event(Event::None);
        s.set_len(1).unwrap();
        s.add_rule(Rule::on_event(Event::None, errno::EFBIG).kinds(IoKinds::SET_LEN));
        s.event(Event::None);
        assert_eq!(os(s.set_len(100).unwrap_err()), Some(errno::EFBIG));
        assert_eq!(s.len().unwrap(), 1);
    }

    #[test]
    fn a_new_arming_event_replaces_the_armed_set() {
        let s = mem(&[]);
        let a = s.add_rule(Rule::on_event(Event::L1Update, errno::EIO));
        let b = s.add_rule(Rule::on_event(Event::L2Update, errno::ENOSPC));
        s.event(Event::L1Update);
        s.event(Event::L2Update);
        assert!(!s.is_armed(a));
        assert!(s.is_armed(b));
        assert_eq!(os(s.write_at(&[1], 0).unwrap_err()), Some(errno::ENOSPC));
        // An event without rules leaves the armed set alone.
        s.event(Event::CowRead);
        assert!(s.is_armed(b));
    }

    #[test]
    fn skip_events_counts_down() {
        let s = mem(&[]);
        s.add_rule(
            Rule::on_event(Event::ClusterAlloc, errno::EIO)
                .skip_events(2)
                .once(true),
        );
        for _ in 0..2 {
            s.event(Event::ClusterAlloc);
            s.write_at(&[1], 0).unwrap();
        }
        s.event(Event::ClusterAlloc);
        assert!(s.write_at(&[1], 0).is_err());
        s.event(Event::ClusterAlloc);
        s.write_at(&[1], 0).unwrap();
    }

    #[test]
    fn nth_request_rule() {
        let s = mem(&[]);
        let id = s.add_rule(
            Rule::on_request(3, errno::EIO)
                .kinds(IoKinds::WRITE)
                .once(true),
        );
        s.write_at(&[1], 0).unwrap();
        s.read_at(&mut [0], 0).unwrap(); // not targeted, not counted
        s.write_at(&[2], 1).unwrap();
        assert!(s.write_at(&[3], 2).is_err());
        s.write_at(&[4], 3).unwrap();
        assert_eq!(s.inner().to_bytes(), [1, 2, 0, 4]);
        assert_eq!(s.fired(id), 1);

        let s = mem(&[]);
        s.add_rule(Rule::on_request(2, errno::ENOSPC));
        s.flush().unwrap();
        for _ in 0..3 {
            assert!(s.flush().is_err());
        }
    }

    #[test]
    fn offset_filter_as_blkdebug_sector() {
        let s = mem(&[0; 4096]);
        s.add_rule(Rule::on_event(Event::WriteAio, errno::EIO).at_offset(1024));
        s.event(Event::WriteAio);
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        assert!(s.write_at(&[1; 512], 1000).is_err());
        s.write_at(&[1; 10], 1025).unwrap();
    }

    #[test]
    fn events_are_logged_in_order_and_forwarded() {
        let inner = FaultStorage::new(MemStorage::new());
        let s = FaultStorage::new(inner);
        s.event(Event::L2Load);
        s.write_event(Event::L2Update, &[1], 0).unwrap();
        s.event(Event::L2Load);
        assert_eq!(s.events(), [Event::L2Load, Event::L2Update, Event::L2Load]);
        assert_eq!(s.inner().events(), s.events());
        assert_eq!(s.take_events().len(), 3);
        assert!(s.events().is_empty());
    }

    #[test]
    fn disarm_and_remove() {
        let s = mem(&[]);
        let id = s.add_rule(Rule::on_event(Event::L1Update, errno::EIO));
        s.event(Event::L1Update);
        s.disarm();
        s.write_at(&[1], 0).unwrap();
        s.event(Event::L1Update);
        assert!(s.remove_rule(id));
        assert!(!s.remove_rule(id));
        s.write_at(&[1], 0).unwrap();
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<FaultStorage<MemStorage>>();
    }
}
