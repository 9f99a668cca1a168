//! Many guest requests in flight from one thread: [`RequestQueue`] plans each request under
//! the metadata lock as [`SharedImage::read`] and [`SharedImage::write`] do, then hands its
//! data transfers to the storage's asynchronous queue ([`qcow2_io::IoQueue`]: io_uring
//! rings on files opened with it, the storage's synchronous calls otherwise) instead of
//! moving the data itself. A few threads, each with a queue, keep many requests in flight.
//!
//! The protocol is the shared image's (see `shared.rs` and `inflight.rs`): a request's
//! clusters are registered before its data moves; an allocation is linked under the lock
//! when its data is written. A queue never blocks while requests of its own are in flight
//! unless to complete them: where a request has to wait for a registered range (possibly
//! its own earlier request), the queue completes its own requests first and only then
//! waits for other threads' ones.

use crate::error::{ImageError, Op, Result};
use crate::inflight::{InFlightGuard, Moving};
use crate::plan::{AllocPlan, ReadPiece};
use crate::sync::RwLockReadGuard;
use crate::SharedImage;
use qcow2_io::{Completion, Dir, IoBuf, IoQueue, Transfer};
use std::collections::VecDeque;

/// A finished request.
#[derive(Debug)]
pub struct Done {
    /// The tag the request was started with.
    pub tag: u64,
    /// How it went.
    pub result: Result<()>,
    /// The guest bytes of a read that succeeded.
    pub data: Option<IoBuf>,
}

/// Transfers of one request are tagged `slot << PIECE_BITS | piece`. A request has at most
/// one transfer per cluster it touches (at least 512 bytes of its in-memory buffer each),
/// so far fewer than 2^32.
const PIECE_BITS: u32 = 32;

enum Kind {
    /// A read: `buf` is the guest buffer (holding what was filled under the lock), unless
    /// its single transfer covers it whole and carries it.
    Read { buf: Option<IoBuf> },
    /// An in-place write.
    Rewrite,
    /// An allocating write, linked when its data is written.
    Alloc(AllocPlan),
}

struct Request<'a> {
    tag: u64,
    kind: Kind,
    /// (request offset, host offset) of each transfer.
    pieces: Vec<(u64, u64)>,
    pending: usize,
    error: Option<ImageError>,
    /// Released after the request is finished (linked, for allocations).
    _moving: InFlightGuard<'a>,
}

/// Guest requests of one thread in flight on a [`SharedImage`] (see the module docs).
/// Whole-image operations wait until the queue is dropped; dropping it completes the
/// requests in flight first. A thread with a queue must not call the shared image's
/// blocking request methods meanwhile (they may wait for the queue's own requests).
pub struct RequestQueue<'a> {
    image: &'a SharedImage,
    _drain: RwLockReadGuard<'a, ()>,
    io: Box<dyn IoQueue>,
    requests: Vec<Option<Request<'a>>>,
    free: Vec<usize>,
    active: usize,
    ready: VecDeque<Done>,
    completions: Vec<Completion>,
    /// Encrypted images: every request runs synchronously (data is decrypted and
    /// encrypted on the shared image's own paths).
    sync_only: bool,
}

impl std::fmt::Debug for RequestQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestQueue")
            .field("active", &self.active)
            .field("ready", &self.ready.len())
            .field("async", &self.io.is_async())
            .finish_non_exhaustive()
    }
}

impl SharedImage {
    /// A queue for about `depth` requests in flight from the calling thread, over the
    /// data storage's asynchronous queue (io_uring where the file was set up for it).
    pub fn queue(&self, depth: usize) -> Result<RequestQueue<'_>> {
        let op = Op::Read;
        let drain = self.requests(op)?;
        let core = self.core(op)?;
        let storage = core.data_storage_arc();
        let sync_only = core.crypto_arc().is_some();
        drop(core);
        let io = qcow2_io::queue(&storage, depth)
            .map_err(|e| ImageError::io(op, "set up the I/O queue", 0, e))?;
        Ok(RequestQueue {
            image: self,
            _drain: drain,
            io,
            requests: Vec::new(),
            free: Vec::new(),
            active: 0,
            ready: VecDeque::new(),
            completions: Vec::new(),
            sync_only,
        })
    }
}

impl<'a> RequestQueue<'a> {
    /// Requests started and not yet returned by [`RequestQueue::complete`].
    pub fn in_flight(&self) -> usize {
        self.active + self.ready.len()
    }

    /// Whether the data transfers really overlap (an asynchronous storage queue).
    pub fn is_async(&self) -> bool {
        self.io.is_async()
    }

    /// Starts reading `len` guest bytes at `offset`; the data comes back with the
    /// request's [`Done`]. An error here means the request failed before any I/O.
    pub fn read(&mut self, tag: u64, offset: u64, len: usize) -> Result<()> {
        let op = Op::Read;
        let image = self.image;
        let mut buf = IoBuf::new(len);
        if self.sync_only {
            let result = image.read_request(offset, &mut buf);
            return self.done_now(tag, result, Some(buf));
        }
        let mut core = image.core(op)?;
        let pieces = core.plan_read(offset, &mut buf)?;
        if !pieces.iter().any(ReadPiece::pending) {
            drop(core);
            return self.done_now(tag, Ok(()), Some(buf));
        }
        let sources = core.read_sources();
        let (start, end) = image.clusters(offset, len as u64);
        let moving = image.in_flight.register(start, end, Moving::Data);
        drop(core);
        crate::sync::data_moves();
        // Data clusters through the queue; compressed and backing pieces here, without
        // the lock (their clusters are registered as the data ones are).
        let mut hosts: Vec<(u64, u64, u64)> = Vec::new();
        for p in &pieces {
            match *p {
                ReadPiece::Host { at, len, host } => hosts.push((at, len, host)),
                _ => {
                    if let Err(e) = sources.fill(op, offset, p, &mut buf) {
                        return self.done_now(tag, Err(e), None);
                    }
                }
            }
        }
        if hosts.is_empty() {
            drop(moving);
            return self.done_now(tag, Ok(()), Some(buf));
        }
        let slot = self.slot();
        let whole = hosts.len() == 1 && hosts[0].0 == 0 && hosts[0].1 == len as u64;
        let mut transfers = Vec::with_capacity(hosts.len());
        let kind = if whole {
            transfers.push((hosts[0].2, buf));
            Kind::Read { buf: None }
        } else {
            for &(_, l, host) in &hosts {
                transfers.push((host, IoBuf::new(l as usize)));
            }
            Kind::Read { buf: Some(buf) }
        };
        let pieces = hosts.iter().map(|&(at, _, host)| (at, host)).collect();
        self.launch(slot, tag, kind, pieces, moving, Dir::Read, transfers)
    }

    /// Starts writing `data` at guest `offset`. Writes that need no allocation, and
    /// allocations whose copy-on-write areas read as zero, move their data through the
    /// queue; the others run at once under the lock (as [`SharedImage::write`]). An
    /// error here means the request failed (nothing of it is in flight).
    pub fn write(&mut self, tag: u64, offset: u64, data: &[u8]) -> Result<()> {
        let op = Op::Write;
        let image = self.image;
        if self.sync_only {
            let result = image.write_request(offset, data);
            return self.done_now(tag, result, None);
        }
        let len = data.len() as u64;
        let (start, end) = image.clusters(offset, len);
        loop {
            let mut core = image.core(op)?;
            if image.in_flight.allocating(start, end) {
                drop(core);
                self.wait_for(Moving::Alloc, start, end)?;
                continue;
            }
            core.check_writable(op)?;
            core.check_range(op, offset, len)?;
            core.track_change(op, offset, len)?;
            if let Some(pieces) = core.plan_rewrite(offset, len)? {
                let moving = image.in_flight.register(start, end, Moving::Data);
                drop(core);
                crate::sync::data_moves();
                let slot = self.slot();
                let transfers = pieces
                    .iter()
                    .map(|p| {
                        let src = &data[p.at as usize..(p.at + p.len) as usize];
                        (p.host, IoBuf::from_slice(src))
                    })
                    .collect();
                let pieces = pieces.iter().map(|p| (p.at, p.host)).collect();
                return self.launch(
                    slot,
                    tag,
                    Kind::Rewrite,
                    pieces,
                    moving,
                    Dir::Write,
                    transfers,
                );
            }
            if image.in_flight.moving(start, end) {
                drop(core);
                self.wait_for(Moving::Data, start, end)?;
                continue;
            }
            let Some(plan) = core.plan_alloc(offset, len)? else {
                let result = core.write(offset, data);
                drop(core);
                return self.done_now(tag, result, None);
            };
            let storage = core.data_storage_arc();
            let allocating = image.in_flight.register(start, end, Moving::Alloc);
            drop(core);
            crate::sync::data_moves();
            // Zeroing is one quick call (fallocate) and backing COW data a read; the data
            // then moves through the queue.
            let (host, buf) = match plan.prepare(op, &*storage, data) {
                Ok(None) => (plan.data_at, IoBuf::from_slice(data)),
                Ok(Some(whole)) => (plan.zero.0, whole),
                Err(e) => {
                    let mut core = image.core(op)?;
                    core.abort_alloc(&plan);
                    drop(core);
                    drop(allocating);
                    return Err(e);
                }
            };
            let slot = self.slot();
            return self.launch(
                slot,
                tag,
                Kind::Alloc(plan),
                vec![(0, host)],
                allocating,
                Dir::Write,
                vec![(host, buf)],
            );
        }
    }

    /// Waits until at least `min` requests (at most those in flight) have finished and
    /// moves them to `out`.
    pub fn complete(&mut self, min: usize, out: &mut Vec<Done>) -> Result<()> {
        let min = min.min(self.in_flight());
        while self.ready.len() < min {
            self.progress()?;
        }
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn slot(&mut self) -> usize {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.requests.push(None);
                self.requests.len() - 1
            }
        }
    }

    fn done_now(&mut self, tag: u64, result: Result<()>, data: Option<IoBuf>) -> Result<()> {
        let data = if result.is_ok() { data } else { None };
        self.ready.push_back(Done { tag, result, data });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        slot: usize,
        tag: u64,
        kind: Kind,
        pieces: Vec<(u64, u64)>,
        moving: InFlightGuard<'a>,
        dir: Dir,
        transfers: Vec<(u64, IoBuf)>,
    ) -> Result<()> {
        let n = transfers.len();
        let slot_tag = (slot as u64) << PIECE_BITS;
        self.requests[slot] = Some(Request {
            tag,
            kind,
            pieces,
            pending: n,
            error: None,
            _moving: moving,
        });
        self.active += 1;
        for (i, (offset, buf)) in transfers.into_iter().enumerate() {
            self.io.push(Transfer {
                tag: slot_tag | i as u64,
                dir,
                offset,
                buf,
            });
        }
        Ok(())
    }

    /// Makes room for a request that must wait for a registered range: completes one of
    /// this queue's own requests if it has any (they may be what it waits for), otherwise
    /// waits for other threads' requests.
    fn wait_for(&mut self, kind: Moving, start: u64, end: u64) -> Result<()> {
        if self.active > 0 {
            self.progress()
        } else {
            self.image.in_flight.wait_for(kind, start, end);
            Ok(())
        }
    }

    /// Waits for at least one transfer and finishes the requests it completes.
    fn progress(&mut self) -> Result<()> {
        let mut done = std::mem::take(&mut self.completions);
        let r = self.io.wait(1, &mut done);
        for c in done.drain(..) {
            self.transfer_done(c);
        }
        self.completions = done;
        r.map_err(|e| ImageError::io(Op::Read, "wait for the I/O queue", 0, e))
    }

    fn transfer_done(&mut self, c: Completion) {
        let slot = (c.tag >> PIECE_BITS) as usize;
        let piece = (c.tag & ((1 << PIECE_BITS) - 1)) as usize;
        let Some(req) = self.requests.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        req.pending -= 1;
        let (at, host) = req.pieces.get(piece).copied().unwrap_or((0, 0));
        let Completion { result, buf, .. } = c;
        let mut data = None;
        match (result, &mut req.kind) {
            (Err(e), kind) => {
                let (op, what) = match kind {
                    Kind::Read { .. } => (Op::Read, "read guest data"),
                    _ => (Op::Write, "write guest data"),
                };
                req.error.get_or_insert(ImageError::io(op, what, host, e));
            }
            // The single transfer of a read carries the guest buffer itself.
            (Ok(()), Kind::Read { buf: None }) => data = Some(buf),
            (Ok(()), Kind::Read { buf: Some(b) }) => {
                let at = at as usize;
                b[at..at + buf.len()].copy_from_slice(&buf);
            }
            (Ok(()), _) => {}
        }
        if req.pending > 0 {
            return;
        }
        let Some(req) = self.requests[slot].take() else {
            return;
        };
        self.free.push(slot);
        self.active -= 1;
        let Request {
            tag,
            kind,
            error,
            _moving,
            ..
        } = req;
        let (result, data) = match kind {
            Kind::Read { buf } => match error {
                None => (Ok(()), data.or(buf)),
                Some(e) => (Err(e), None),
            },
            Kind::Rewrite => (error.map_or(Ok(()), Err), None),
            Kind::Alloc(plan) => {
                // Linked (or given back) before the range is released: requests waiting
                // for it then plan against the new mapping.
                let result = match self.image.core(Op::Write) {
                    Err(e) => Err(e),
                    Ok(mut core) => match error {
                        None => core.finish_alloc(plan),
                        Some(e) => {
                            core.abort_alloc(&plan);
                            Err(e)
                        }
                    },
                };
                (result, None)
            }
        };
        drop(_moving);
        self.ready.push_back(Done { tag, result, data });
    }
}

impl Drop for RequestQueue<'_> {
    fn drop(&mut self) {
        // Allocations in flight are linked (or given back) and every range released.
        while self.active > 0 {
            if self.progress().is_err() {
                break;
            }
        }
    }
}
