//! The synchronization primitives of the concurrent paths ([`SharedImage`](crate::SharedImage),
//! its request queues and the in-flight registry): `std::sync`'s, or — in the
//! schedule-exploring tests, built with `--cfg shuttle` — shuttle's, whose scheduler then
//! controls every interleaving of those paths (`schedule_tests.rs`).

#[cfg(not(all(test, shuttle)))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

#[cfg(all(test, shuttle))]
pub(crate) use shuttle::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// Marks where a thread moves guest data after releasing the metadata lock: a point where,
/// in reality, it may be preempted for any length of time. Under shuttle it is a scheduling
/// point (shuttle switches threads only at its own operations, and releasing a lock is
/// none), so the tests explore other requests running in that window; otherwise nothing.
#[inline(always)]
pub(crate) fn data_moves() {
    #[cfg(all(test, shuttle))]
    shuttle::thread::yield_now();
}
