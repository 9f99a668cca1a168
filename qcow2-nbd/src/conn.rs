//! The transmission phase of one connection: a reader (this thread) parses requests and
//! reads write payloads, a bounded pool of worker threads serves them in parallel on the
//! export, and replies go out under one writer lock, in whatever order requests finish.
//!
//! Memory is bounded per connection: the reader admits a request only when fewer than
//! [`ServerConfig::max_requests_in_flight`](crate::ServerConfig) are in flight and its
//! payload or reply buffer fits in the byte budget; otherwise it stops reading the socket
//! (back-pressure) until replies have gone out.

use std::io::{self, BufRead, Read};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};

use crate::export::{Allocation, ExportError, NbdExport};
use crate::handshake::{Session, ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID, DIRTY_BITMAP_ID};
use crate::net::Stream;
use crate::proto::{
    self, cflag, chunk, cmd, NbdErrno, Request, EXTENDED_REQUEST_LEN, REPLY_FLAG_DONE, REQUEST_LEN,
};
use crate::server::{ConnError, DetectZeroes, Export, Server, MAX_REQUEST};

/// Bytes the reader buffers from the socket.
const READ_BUFFER: usize = 128 << 10;

/// Most descriptors in one block-status reply.
const MAX_EXTENTS: usize = 16 << 10;

/// Requests in flight and the bytes they hold.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    max_requests: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct BudgetState {
    requests: usize,
    bytes: usize,
    /// The reader waits for room (only then does a release wake it).
    waiting: bool,
}

impl Budget {
    fn acquire(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A request larger than the byte budget alone still goes through when nothing
        // else is in flight.
        while st.requests >= self.max_requests
            || (st.requests > 0 && st.bytes + bytes > self.max_bytes)
        {
            st.waiting = true;
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.waiting = false;
        st.requests += 1;
        st.bytes += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests = st.requests.saturating_sub(1);
        st.bytes = st.bytes.saturating_sub(bytes);
        let wake = st.waiting;
        drop(st);
        if wake {
            self.freed.notify_one();
        }
    }
}

/// The reply side of the socket. One thread at a time writes to the socket (the
/// "flusher"); replies that come in meanwhile are queued and go out with its next write,
/// so replies finishing together share one system call. Once a write fails the
/// connection is dead and later replies are dropped.
struct Writer {
    state: Mutex<WriterState>,
    /// Signalled when the flusher is done.
    idle: Condvar,
    stream: Mutex<Stream>,
}

struct WriterState {
    /// Replies waiting for the socket.
    queued: Vec<u8>,
    /// A thread is writing to the socket.
    flushing: bool,
    dead: bool,
}

/// Replies up to this size are queued and combined; larger ones are written in place.
const COMBINE_MAX: usize = 64 << 10;

impl Writer {
    fn new(stream: Stream) -> Writer {
        Writer {
            state: Mutex::new(WriterState {
                queued: Vec::new(),
                flushing: false,
                dead: false,
            }),
            idle: Condvar::new(),
            stream: Mutex::new(stream),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one reply made of `parts`.
    fn send(&self, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut st = self.state();
        if st.dead {
            return;
        }
        if total <= COMBINE_MAX {
            for p in parts {
                st.queued.extend_from_slice(p);
            }
            if st.flushing {
                // The flusher sends it with its next write.
                return;
            }
            st.flushing = true;
            drop(st);
            self.flush_queue(&[]);
            return;
        }
        // A large reply: wait for the socket, then send what is queued and this.
        while st.flushing && !st.dead {
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.dead {
            return;
        }
        st.flushing = true;
        drop(st);
        self.flush_queue(parts);
    }

    /// As the flusher: writes the queue (and `extra` after it), then whatever was queued
    /// meanwhile, until the queue is empty; then hands the socket back.
    fn flush_queue(&self, extra: &[&[u8]]) {
        let mut extra = extra;
        let mut batch = Vec::new();
        loop {
            let mut st = self.state();
            if st.dead || (st.queued.is_empty() && extra.is_empty()) {
                st.flushing = false;
                st.queued = std::mem::take(&mut batch);
                st.queued.clear();
                drop(st);
                self.idle.notify_all();
                return;
            }
            std::mem::swap(&mut st.queued, &mut batch);
            drop(st);
            let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + extra.len());
            parts.push(&batch);
            parts.extend_from_slice(extra);
            let ok = {
                let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
                let ok = stream.write_all_vectored(&parts).is_ok();
                if !ok {
                    stream.shutdown();
                }
                ok
            };
            batch.clear();
            extra = &[];
            if !ok {
                self.state().dead = true;
            }
        }
    }
}

struct Conn<'a> {
    export: &'a Export,
    session: Session,
    writer: Writer,
    budget: Budget,
}

struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: usize,
}

/// A request refused before it reaches the export.
fn refuse(errno: NbdErrno) -> Result<(), NbdErrno> {
    Err(errno)
}

pub(crate) fn transmission(
    server: &Server,
    stream: Stream,
    session: Session,
) -> Result<(), ConnError> {
    let Some(export) = server.exports().get(session.export) else {
        return Ok(());
    };
    let cfg = server.config();
    let mut reader = stream.try_clone()?;
    let conn = Conn {
        export,
        session,
        writer: Writer::new(stream),
        budget: Budget {
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
            max_requests: cfg.max_requests_in_flight.max(1),
            max_bytes: cfg.max_buffered_bytes.max(MAX_REQUEST as usize),
        },
    };
    let workers = cfg.workers_per_connection.max(1);
    let (tx, rx) = mpsc::sync_channel::<Job>(conn.budget.max_requests);
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            let (conn, rx) = (&conn, &rx);
            let spawned = std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(scope, move || loop {
                    let job = {
                        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                        rx.recv()
                    };
                    let Ok(job) = job else { return };
                    conn.serve(&job);
                    conn.budget.release(job.cost);
                });
            if let Err(e) = spawned {
                return Err(ConnError::Io(e));
            }
        }
        // Buffered: one read takes in many small requests (and the head of a payload).
        let mut buffered = io::BufReader::with_capacity(READ_BUFFER, &mut reader);
        let r = conn.read_requests(server, &mut buffered, &tx);
        drop(tx);
        r
    });
    // Every worker has finished: requests in flight completed (and were answered while
    // the client still listened) before the socket closes.
    reader.shutdown();
    result
}

impl Conn<'_> {
    fn read_requests(
        &self,
        server: &Server,
        reader: &mut io::BufReader<&mut Stream>,
        tx: &mpsc::SyncSender<Job>,
    ) -> Result<(), ConnError> {
        let extended = self.session.extended;
        let header_len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        loop {
            let mut h = [0u8; EXTENDED_REQUEST_LEN];
            match read_full(reader, &mut h[..header_len])? {
                0 => return Ok(()),
                n if n < header_len => {
                    return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into()))
                }
                _ => {}
            }
            let req = if extended {
                Request::parse_extended(&h)?
            } else {
                let mut compact = [0u8; REQUEST_LEN];
                compact.copy_from_slice(&h[..REQUEST_LEN]);
                Request::parse(&compact)?
            };
            if req.kind == cmd::DISC {
                return Ok(());
            }
            let payload = req.has_payload(extended);
            // A compact payload is at most 4 GiB and can be skipped; an extended one
            // longer than any request served is not worth reading (QEMU hangs up too).
            if payload && extended && req.length > u64::from(MAX_REQUEST) {
                return Err(ConnError::PayloadTooLong(req.length));
            }
            if let Err(errno) = self.check(&req) {
                if payload {
                    io::copy(&mut reader.by_ref().take(req.length), &mut io::sink())?;
                }
                server.log(format_args!(
                    "request {} (type {}, flags {:#x}, offset {}, length {}) refused: {:?}",
                    req.cookie, req.kind, req.flags, req.offset, req.length, errno
                ));
                self.reply_error(&req, errno, "request refused");
                continue;
            }
            let cost = match req.kind {
                cmd::READ | cmd::WRITE => req.length as usize,
                _ => 0,
            };
            self.budget.acquire(cost);
            let mut payload = Vec::new();
            if req.kind == cmd::WRITE {
                // What the buffer holds, then the rest straight from the socket into spare
                // capacity (no zero-fill, no copy through the buffer).
                let len = req.length as usize;
                payload = Vec::with_capacity(len);
                let held = reader.buffer();
                let n = held.len().min(len);
                payload.extend_from_slice(&held[..n]);
                reader.consume(n);
                let got = Read::by_ref(reader.get_mut())
                    .take((len - n) as u64)
                    .read_to_end(&mut payload);
                if got.is_err() || payload.len() != len {
                    self.budget.release(cost);
                    return Err(got
                        .err()
                        .unwrap_or_else(|| io::ErrorKind::UnexpectedEof.into())
                        .into());
                }
            }
            if tx.send(Job { req, payload, cost }).is_err() {
                self.budget.release(cost);
                return Ok(());
            }
        }
    }

    /// The checks the reader makes before a request is queued.
    fn check(&self, r: &Request) -> Result<(), NbdErrno> {
        let e = self.export;
        let allowed = match r.kind {
            cmd::READ if self.session.structured => cflag::FUA | cflag::DF,
            cmd::READ => cflag::FUA,
            // With extended headers a write says that its length is its payload's;
            // any other payload is read, then the request refused for the flag.
            cmd::WRITE if self.session.extended => cflag::FUA | cflag::PAYLOAD_LEN,
            cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE => cflag::FUA,
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
            _ => return refuse(NbdErrno::Inval),
        };
        if r.flags & !allowed != 0 {
            return refuse(NbdErrno::Inval);
        }
        let end = r.offset.checked_add(r.length);
        let inside = end.is_some_and(|end| end <= e.size);
        let writes = matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && e.read_only {
            return refuse(NbdErrno::Perm);
        }
        match r.kind {
            cmd::READ | cmd::WRITE if r.length > u64::from(MAX_REQUEST) => refuse(NbdErrno::Inval),
            cmd::WRITE | cmd::WRITE_ZEROES if !inside => refuse(NbdErrno::NoSpc),
            cmd::READ | cmd::TRIM | cmd::CACHE if !inside => refuse(NbdErrno::Inval),
            cmd::BLOCK_STATUS
                if !(self.session.base_allocation
                    || self.session.allocation_depth
                    || self.session.dirty_bitmap)
                    || r.length == 0
                    || !inside =>
            {
                refuse(NbdErrno::Inval)
            }
            _ => Ok(()),
        }
    }

    /// Writes one reply; a failed write kills the connection (the reader sees the
    /// shutdown and stops).
    fn send(&self, parts: &[&[u8]]) {
        self.writer.send(parts);
    }

    /// Whether `r` is answered with reply chunks: always with extended headers (which
    /// have no simple reply), and for reads and block status with structured replies.
    fn structured_reply(&self, r: &Request) -> bool {
        self.session.extended
            || (self.session.structured && matches!(r.kind, cmd::READ | cmd::BLOCK_STATUS))
    }

    /// A reply chunk header in the negotiated format (`len` bytes of payload follow).
    fn chunk(&self, r: &Request, flags: u16, kind: u16, len: usize) -> ChunkHeader {
        let mut b = [0u8; 32];
        if self.session.extended {
            b = proto::extended_chunk_header(r.cookie, flags, kind, r.offset, len as u64);
            ChunkHeader { b, n: 32 }
        } else {
            // Compact payloads are bounded by the largest request (plus its chunk
            // fields) and by the extent limit: far below 4 GiB.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            b[..20].copy_from_slice(&proto::chunk_header(r.cookie, flags, kind, len));
            ChunkHeader { b, n: 20 }
        }
    }

    fn reply_ok(&self, r: &Request) {
        if self.structured_reply(r) {
            self.send(&[self.chunk(r, REPLY_FLAG_DONE, chunk::NONE, 0).bytes()]);
        } else {
            self.send(&[&proto::simple_reply(r.cookie, 0)]);
        }
    }

    fn reply_error(&self, r: &Request, errno: NbdErrno, msg: &str) {
        if self.structured_reply(r) {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            let mut p = Vec::with_capacity(6 + msg.len());
            p.extend_from_slice(&(errno as u32).to_be_bytes());
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            let h = self.chunk(r, REPLY_FLAG_DONE, chunk::ERROR, p.len());
            self.send(&[h.bytes(), &p]);
        } else {
            self.send(&[&proto::simple_reply(r.cookie, errno as u32)]);
        }
    }

    fn reply_result(&self, r: &Request, res: Result<(), ExportError>) {
        match res {
            Ok(()) => self.reply_ok(r),
            Err(e) => self.reply_error(r, e.errno(), &e.to_string()),
        }
    }

    /// Serves one admitted request (on a worker thread).
    fn serve(&self, job: &Job) {
        let r = &job.req;
        let b: &dyn NbdExport = &*self.export.backend;
        let fua = r.flags & cflag::FUA != 0;
        let (off, len) = (r.offset, r.length);
        let after = |res: Result<(), ExportError>| match res {
            Ok(()) if fua => b.flush(),
            other => other,
        };
        match r.kind {
            cmd::READ => self.read(r),
            cmd::WRITE
                if self.export.detect_zeroes != DetectZeroes::Off && is_zero(&job.payload) =>
            {
                // QEMU's detect-zeroes: the write becomes a zero write; deallocating only
                // with `unmap` and when discards reach the image.
                let may_trim = self.export.detect_zeroes == DetectZeroes::Unmap && self.export.trim;
                let res = if len == 0 {
                    Ok(())
                } else {
                    b.write_zeroes(off, len, may_trim, false)
                };
                self.reply_result(r, after(res));
            }
            cmd::WRITE => self.reply_result(r, b.write(off, &job.payload, fua)),
            cmd::WRITE_ZEROES => {
                let may_trim = r.flags & cflag::NO_HOLE == 0 && self.export.trim;
                let fast = r.flags & cflag::FAST_ZERO != 0;
                let res = if len == 0 {
                    Ok(())
                } else {
                    b.write_zeroes(off, len, may_trim, fast)
                };
                self.reply_result(r, after(res));
            }
            cmd::TRIM => {
                let res = if self.export.trim && len > 0 {
                    b.trim(off, len)
                } else {
                    Ok(())
                };
                self.reply_result(r, after(res));
            }
            cmd::FLUSH => self.reply_result(r, b.flush()),
            cmd::CACHE => self.reply_result(r, b.cache(off, len)),
            cmd::BLOCK_STATUS => self.block_status(r),
            _ => self.reply_error(r, NbdErrno::Inval, "unknown command"),
        }
    }

    fn read(&self, r: &Request) {
        let b = &*self.export.backend;
        let len = r.length as usize;
        let mut buf = vec![0u8; len];
        if !self.session.structured {
            match b.read(r.offset, &mut buf) {
                Ok(()) => self.send(&[&proto::simple_reply(r.cookie, 0), &buf]),
                Err(e) => self.reply_error(r, e.errno(), &e.to_string()),
            }
            return;
        }
        if len == 0 {
            return self.reply_ok(r);
        }
        // Pieces (start in the request, length, reads as zero): ranges that read as zero
        // are not read and go out as holes (unless the client wants one chunk).
        let runs = b
            .block_status(r.offset, len as u64)
            .map(|runs| clip(runs, len as u64))
            .unwrap_or_default();
        let mut pieces: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len() + 1);
        let mut at = 0usize;
        for x in &runs {
            let n = x.length as usize;
            pieces.push((at, n, x.flags & proto::STATE_ZERO != 0));
            at += n;
        }
        if at < len {
            pieces.push((at, len - at, false));
        }
        for &(start, n, zero) in &pieces {
            if zero {
                continue;
            }
            if let Err(e) = b.read(r.offset + start as u64, &mut buf[start..start + n]) {
                return self.reply_error(r, e.errno(), &e.to_string());
            }
        }
        let df = r.flags & cflag::DF != 0;
        if df || pieces.iter().all(|p| !p.2) {
            let h = self.chunk(r, REPLY_FLAG_DONE, chunk::OFFSET_DATA, len + 8);
            return self.send(&[h.bytes(), &r.offset.to_be_bytes(), &buf]);
        }
        // Several chunks, sent under one lock: headers first, then the slices. A header
        // is the chunk header, the offset, and for a hole its length.
        let headers: Vec<([u8; 44], usize)> = pieces
            .iter()
            .map(|&(start, n, zero)| {
                let (kind, length) = if zero {
                    (chunk::OFFSET_HOLE, 12)
                } else {
                    (chunk::OFFSET_DATA, n + 8)
                };
                let c = self.chunk(r, 0, kind, length);
                let mut h = [0u8; 44];
                let at = c.n;
                h[..at].copy_from_slice(c.bytes());
                h[at..at + 8].copy_from_slice(&(r.offset + start as u64).to_be_bytes());
                if zero {
                    // Pieces are inside one read request: at most 32 MiB.
                    h[at + 8..at + 12].copy_from_slice(&(n as u32).to_be_bytes());
                    (h, at + 12)
                } else {
                    (h, at + 8)
                }
            })
            .collect();
        let done = self.chunk(r, REPLY_FLAG_DONE, chunk::NONE, 0);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * headers.len() + 1);
        for ((h, hn), &(start, n, zero)) in headers.iter().zip(&pieces) {
            parts.push(&h[..*hn]);
            if !zero {
                parts.push(&buf[start..start + n]);
            }
        }
        parts.push(done.bytes());
        self.send(&parts);
    }

    /// One block-status chunk per selected metadata context, the last one with DONE.
    fn block_status(&self, r: &Request) {
        let b = &*self.export.backend;
        let len = r.length;
        let mut chunks: Vec<(u32, Vec<Allocation>)> = Vec::with_capacity(2);
        if self.session.base_allocation {
            match b.block_status(r.offset, len) {
                Ok(runs) => chunks.push((BASE_ALLOCATION_ID, clip(runs, len))),
                Err(e) => return self.reply_error(r, e.errno(), &e.to_string()),
            }
        }
        if self.session.allocation_depth {
            match b.allocation_depth(r.offset, len) {
                Ok(runs) => chunks.push((ALLOCATION_DEPTH_ID, clip(runs, len))),
                Err(e) => return self.reply_error(r, e.errno(), &e.to_string()),
            }
        }
        if let (true, Some(name)) = (self.session.dirty_bitmap, &self.export.dirty_bitmap) {
            match b.dirty_bitmap(name, r.offset, len) {
                Ok(runs) => chunks.push((DIRTY_BITMAP_ID, clip(runs, len))),
                Err(e) => return self.reply_error(r, e.errno(), &e.to_string()),
            }
        }
        let max = if r.flags & cflag::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let extended = self.session.extended;
        let count = chunks.len();
        let mut bodies: Vec<(ChunkHeader, Vec<u8>)> = Vec::with_capacity(count);
        for (i, (id, mut runs)) in chunks.into_iter().enumerate() {
            runs.truncate(max);
            if runs.is_empty() {
                // The backend described nothing: the whole range, as data / depth 1.
                let flags = if id == ALLOCATION_DEPTH_ID { 1 } else { 0 };
                runs.push(Allocation { length: len, flags });
            }
            let (kind, p) = if extended {
                // 64-bit lengths and flags, after the context and the count.
                let mut p = Vec::with_capacity(8 + 16 * runs.len());
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(&(runs.len() as u32).to_be_bytes());
                for x in &runs {
                    p.extend_from_slice(&x.length.to_be_bytes());
                    p.extend_from_slice(&u64::from(x.flags).to_be_bytes());
                }
                (chunk::BLOCK_STATUS_EXT, p)
            } else {
                let mut p = Vec::with_capacity(4 + 8 * runs.len());
                p.extend_from_slice(&id.to_be_bytes());
                for x in &runs {
                    // Runs are clipped to the request's length, 32 bits without
                    // extended headers.
                    let n = u32::try_from(x.length).unwrap_or(u32::MAX);
                    p.extend_from_slice(&n.to_be_bytes());
                    p.extend_from_slice(&x.flags.to_be_bytes());
                }
                (chunk::BLOCK_STATUS, p)
            };
            let done = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            let h = self.chunk(r, done, kind, p.len());
            bodies.push((h, p));
        }
        let parts: Vec<&[u8]> = bodies
            .iter()
            .flat_map(|(h, p)| [h.bytes(), &p[..]])
            .collect();
        self.send(&parts);
    }
}

/// A reply chunk header: compact (20 bytes) or extended (32).
struct ChunkHeader {
    b: [u8; 32],
    n: usize,
}

impl ChunkHeader {
    fn bytes(&self) -> &[u8] {
        &self.b[..self.n]
    }
}

/// Keeps the runs inside `len` bytes (dropping empty ones).
fn clip(runs: Vec<Allocation>, len: u64) -> Vec<Allocation> {
    let mut left = len;
    let mut out = Vec::with_capacity(runs.len());
    for x in runs {
        if left == 0 {
            break;
        }
        let n = x.length.min(left);
        if n > 0 {
            out.push(Allocation {
                length: n,
                flags: x.flags,
            });
            left -= n;
        }
    }
    out
}

/// Whether every byte of `buf` is zero (16 bytes at a time: this runs on every write when
/// zero detection is on).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    let body = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    body && chunks.remainder().iter().all(|&b| b == 0)
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection_sees_one_nonzero_byte_anywhere() {
        assert!(is_zero(&[]));
        for len in [1usize, 15, 16, 17, 4096, 4099] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b), "{len}");
            for at in [0, len / 2, len - 1] {
                b[at] = 0x80;
                assert!(!is_zero(&b), "{len} {at}");
                b[at] = 0;
            }
        }
    }
}
