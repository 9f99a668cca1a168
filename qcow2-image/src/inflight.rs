//! The in-flight registry of [`SharedImage`](crate::SharedImage): guest ranges (cluster
//! aligned) whose data moves without the metadata lock, and allocations waiting to be
//! linked (QEMU's in-flight `QCowL2Meta`).
//!
//! The protocol's one rule about waiting: **nobody waits on the registry while holding the
//! metadata lock**. A request that meets a registered range it must not touch drops the
//! lock, waits for the range, takes the lock again and plans again. So a request whose
//! data is in flight can always take the lock to finish (an allocation links its L2
//! entries; a queue driving many requests from one thread starts others meanwhile), and
//! no cycle of waits can form. Registration happens under the metadata lock, so a check
//! "nothing registered here" made under the lock stays true until the lock is released.
//!
//! Its primitives come from `crate::sync` (std's, or shuttle's in the schedule-exploring
//! test), like the rest of the shared image's.

use crate::sync::{Condvar, Mutex, MutexGuard};

/// Guest byte ranges (cluster aligned) registered by requests in flight.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    ranges: Mutex<Registry>,
    idle: Condvar,
}

/// What a registered range is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moving {
    /// Data of a read or in-place write: finishes without the metadata lock.
    Data,
    /// An allocation in flight: its data is being written to clusters that are
    /// allocated but not linked yet; it needs the metadata lock again to link them.
    Alloc,
}

/// The live ranges: a few per request in flight, so a vector scanned linearly
/// beats a map.
#[derive(Debug, Default)]
struct Registry {
    next: u64,
    live: Vec<(u64, u64, u64, Moving)>,
    /// Threads blocked on `idle`: releasing a range wakes them only if there are
    /// any (a wake-up is a system call on every request otherwise).
    waiters: usize,
}

impl Registry {
    fn overlaps(&self, start: u64, end: u64, kind: Moving) -> bool {
        self.live
            .iter()
            .any(|&(_, s, e, k)| k == kind && s < end && start < e)
    }
}

/// Unregisters its range when dropped (also on error paths and panics).
#[derive(Debug)]
pub(crate) struct InFlightGuard<'a> {
    owner: &'a InFlight,
    id: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.owner.registry();
        if let Some(i) = r.live.iter().position(|e| e.0 == self.id) {
            r.live.swap_remove(i);
        }
        let wake = r.waiters > 0;
        drop(r);
        if wake {
            self.owner.idle.notify_all();
        }
    }
}

impl InFlight {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `[start, end)`; called with the metadata lock held.
    pub(crate) fn register(&self, start: u64, end: u64, kind: Moving) -> InFlightGuard<'_> {
        let mut r = self.registry();
        let id = r.next;
        r.next += 1;
        r.live.push((id, start, end, kind));
        InFlightGuard { owner: self, id }
    }

    /// Whether an allocation is in flight in `[start, end)`.
    pub(crate) fn allocating(&self, start: u64, end: u64) -> bool {
        self.registry().overlaps(start, end, Moving::Alloc)
    }

    /// Whether data of a read or in-place write moves in `[start, end)`.
    pub(crate) fn moving(&self, start: u64, end: u64) -> bool {
        self.registry().overlaps(start, end, Moving::Data)
    }

    /// Blocks until nothing of `kind` is registered in `[start, end)`. Called
    /// **without** the metadata lock (see the module docs).
    pub(crate) fn wait_for(&self, kind: Moving, start: u64, end: u64) {
        let mut r = self.registry();
        while r.overlaps(start, end, kind) {
            r.waiters += 1;
            r = self
                .idle
                .wait(r)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.waiters -= 1;
        }
    }
}

#[cfg(all(test, not(shuttle)))]
mod tests {
    use super::*;

    #[test]
    fn allocations_block_their_range_until_released() {
        let f = std::sync::Arc::new(InFlight::default());
        let g = f.register(0, 65536, Moving::Alloc);
        // Data waits ignore allocations.
        f.wait_for(Moving::Data, 0, 65536);
        assert!(f.allocating(4096, 8192) && !f.allocating(65536, 70000));
        assert!(!f.moving(0, 65536));
        let f2 = f.clone();
        let t = std::thread::spawn(move || f2.wait_for(Moving::Alloc, 4096, 8192));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(g);
        t.join().unwrap();
    }

    #[test]
    fn waiting_ends_when_the_range_is_released() {
        let f = std::sync::Arc::new(InFlight::default());
        let g = f.register(0, 65536, Moving::Data);
        assert!(f.moving(4096, 8192));
        let f2 = f.clone();
        let t = std::thread::spawn(move || {
            f2.wait_for(Moving::Data, 4096, 8192);
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        // An unrelated range does not wait.
        f.wait_for(Moving::Data, 65536, 131072);
        drop(g);
        t.join().unwrap();
    }
}
