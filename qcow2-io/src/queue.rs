//! Asynchronous transfers: many positional reads and writes in flight from one thread.
//!
//! An [`IoQueue`] takes transfers that own their buffers ([`IoBuf`]) and hands them back
//! when they complete, so nothing the kernel may still write into can be freed or moved.
//! [`queue`] returns the storage's own queue where it has one ([`FileStorage`] with
//! io_uring enabled: [`FileStorage::enable_io_uring`]) and otherwise a queue that performs
//! each transfer with the storage's synchronous calls ([`SyncQueue`]), so every backend —
//! memory, the fault-injecting and crash-simulating ones — serves the same callers.
//!
//! [`FileStorage`]: crate::FileStorage
//! [`FileStorage::enable_io_uring`]: crate::FileStorage::enable_io_uring

use crate::{IoBuf, Storage};
use std::io;
use std::sync::Arc;

/// Which way a transfer moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Storage to buffer; bytes beyond the end of the storage read as zero (as
    /// [`Storage::read_at`]).
    Read,
    /// Buffer to storage, growing it if needed (as [`Storage::write_at`]).
    Write,
}

/// One positional transfer handed to a queue.
#[derive(Debug)]
pub struct Transfer {
    /// The caller's name for it, returned with its completion.
    pub tag: u64,
    /// Read or write.
    pub dir: Dir,
    /// Storage offset of the first byte.
    pub offset: u64,
    /// The whole buffer is read into or written from.
    pub buf: IoBuf,
}

/// A finished transfer: its buffer back, and how it went.
#[derive(Debug)]
pub struct Completion {
    /// The tag it was pushed with.
    pub tag: u64,
    /// The transfer's buffer (filled, for reads that succeeded).
    pub buf: IoBuf,
    /// `Ok` when every byte moved.
    pub result: io::Result<()>,
}

/// Transfers in flight from one thread. Each transfer completes exactly once; a queue
/// dropped with transfers in flight waits for them first (their buffers may not be freed
/// before the kernel is done with them).
pub trait IoQueue: Send {
    /// Queues a transfer; it starts at the latest at the next [`IoQueue::wait`].
    fn push(&mut self, transfer: Transfer);

    /// Transfers pushed and not yet returned by [`IoQueue::wait`].
    fn pending(&self) -> usize;

    /// Starts what was pushed and waits until at least `min` transfers (at most
    /// [`IoQueue::pending`]) have completed; appends their completions to `out`. An error
    /// here is the queue's own failure (the ring broke); a failed transfer reports its
    /// error in its [`Completion`].
    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> io::Result<()>;

    /// Whether transfers really overlap (an asynchronous queue) or run one by one inside
    /// [`IoQueue::wait`].
    fn is_async(&self) -> bool;
}

/// The queue for `storage`: its asynchronous one where it has one, otherwise a
/// [`SyncQueue`]. `depth` is how many transfers the caller means to keep in flight.
pub fn queue(storage: &Arc<dyn Storage>, depth: usize) -> io::Result<Box<dyn IoQueue>> {
    match storage.io_queue(depth)? {
        Some(q) => Ok(q),
        None => Ok(Box::new(SyncQueue::new(storage.clone()))),
    }
}

/// A queue over a storage's synchronous calls: [`IoQueue::wait`] performs every pending
/// transfer in order.
pub struct SyncQueue {
    storage: Arc<dyn Storage>,
    pending: Vec<Transfer>,
}

impl SyncQueue {
    /// A queue performing its transfers on `storage`.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        SyncQueue {
            storage,
            pending: Vec::new(),
        }
    }
}

impl IoQueue for SyncQueue {
    fn push(&mut self, transfer: Transfer) {
        self.pending.push(transfer);
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }

    fn wait(&mut self, _min: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        for mut t in self.pending.drain(..) {
            let result = match t.dir {
                Dir::Read => self.storage.read_at(&mut t.buf, t.offset),
                Dir::Write => self.storage.write_at(&t.buf, t.offset),
            };
            out.push(Completion {
                tag: t.tag,
                buf: t.buf,
                result,
            });
        }
        Ok(())
    }

    fn is_async(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DIRECT_ALIGN;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0usize, 1, 511, 4096, 65536 + 3] {
            let b = IoBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let mut b = IoBuf::from_slice(&[1, 2, 3]);
        b.truncate(2);
        assert_eq!(&*b, &[1, 2]);
    }

    #[test]
    fn the_sync_queue_completes_every_transfer() {
        let s: Arc<dyn Storage> = Arc::new(crate::MemStorage::new());
        let mut q = queue(&s, 4).unwrap();
        assert!(!q.is_async());
        q.push(Transfer {
            tag: 1,
            dir: Dir::Write,
            offset: 100,
            buf: IoBuf::from_slice(&[9u8; 10]),
        });
        let mut out = Vec::new();
        q.wait(1, &mut out).unwrap();
        q.push(Transfer {
            tag: 2,
            dir: Dir::Read,
            offset: 95,
            buf: IoBuf::new(20),
        });
        q.wait(1, &mut out).unwrap();
        assert_eq!(q.pending(), 0);
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2]);
        assert!(out.iter().all(|c| c.result.is_ok()));
        assert_eq!(&out[1].buf[..5], &[0u8; 5]);
        assert_eq!(&out[1].buf[5..15], &[9u8; 10]);
        assert_eq!(&out[1].buf[15..], &[0u8; 5]);
    }
}
