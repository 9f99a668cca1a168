//! `qcow2 bench`: qemu-img bench's workload, options, messages and output.
//!
//! The workload: COUNT requests of SIZE bytes, the first at OFFSET, each next one STEP bytes
//! further, wrapping at the end of the image (offset modulo the virtual size); reads, or
//! writes of a buffer filled with PATTERN; with `--flush-interval N` a flush after every N
//! completed requests. qemu-img keeps DEPTH requests in flight through its AIO engine;
//! here DEPTH worker threads (at most 64, QEMU's thread-pool size) each keep one request
//! going on the shared image ([`SharedImage`]: data moves outside the metadata lock), and
//! the requests in flight that continue each other in the guest are merged into one engine
//! call (as the block layer merges adjacent requests), so a sequential run reaches the
//! engine as large requests and a scattered one as single requests in parallel (same
//! offsets, same bytes, same flush points). `-t` takes QEMU's cache modes on the image
//! file ([`CacheMode`]: `none`/`directsync` bypass the page cache for aligned requests,
//! `writethrough`/`directsync` make each write durable, `unsafe` skips flushes).

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use qcow2_image::{ImageError, SharedImage};
use qcow2_io::{CacheMode, FileStorage, Storage};

use crate::io::strerror;
use crate::size::{parse_size, SizeError};
use crate::{out, CliError};

/// The benchmark's parameters, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchParams {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight in qemu-img.
    pub depth: u64,
    /// First offset.
    pub offset: u64,
    /// Request size.
    pub bufsize: u64,
    /// Distance between requests.
    pub step: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written.
    pub pattern: u8,
    /// Flush after this many requests (0: never).
    pub flush_interval: u64,
    /// Wait for in-flight requests before a flush (always true here: requests are serial).
    pub drain: bool,
}

/// The raw option values of `bench`.
#[derive(Debug, Default, Clone)]
pub struct BenchOptions {
    /// `-c`.
    pub count: Option<String>,
    /// `-d`.
    pub depth: Option<String>,
    /// `-o`.
    pub offset: Option<String>,
    /// `-s`.
    pub buffer_size: Option<String>,
    /// `-S`.
    pub step_size: Option<String>,
    /// `-w`.
    pub write: bool,
    /// `--pattern`.
    pub pattern: Option<String>,
    /// `--flush-interval`.
    pub flush_interval: Option<String>,
    /// `--no-drain`.
    pub no_drain: bool,
}

/// qemu-img's `cvtnum_full(name, value, min, max)` with its messages.
fn cvtnum_full(name: &str, value: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match parse_size(value) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) | Err(SizeError::Overflow) => Err(CliError::new(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))),
        Err(SizeError::Invalid) => Err(CliError::new(format!(
            "Invalid {name} specified: '{value}'."
        ))),
    }
}

impl BenchParams {
    /// Checks the options in qemu-img's order, with its messages.
    pub fn from_options(o: &BenchOptions) -> Result<Self, CliError> {
        const INT_MAX: u64 = i32::MAX as u64;
        let num = |v: &Option<String>, name: &str, min: u64, max: u64, default: u64| {
            v.as_deref()
                .map(|s| cvtnum_full(name, s, min, max))
                .transpose()
                .map(|x| x.unwrap_or(default))
        };
        let count = num(&o.count, "request count", 1, INT_MAX, 75000)?;
        let depth = num(&o.depth, "queue depth", 1, INT_MAX, 64)?;
        let offset = num(&o.offset, "offset", 0, i64::MAX as u64, 0)?;
        let bufsize = num(&o.buffer_size, "buffer size", 1, INT_MAX, 4096)?;
        let step = num(&o.step_size, "step size", 0, INT_MAX, 0)?;
        let pattern = match o.pattern.as_deref() {
            None => 0,
            Some(p) => {
                let v = crate::opts::parse_number(p).ok_or_else(|| {
                    CliError::new(format!("Invalid pattern byte specified: '{p}'."))
                })?;
                u8::try_from(v).map_err(|_| {
                    CliError::new("Invalid pattern byte specified. Must be between 0 and 255.")
                })?
            }
        };
        let flush_interval = num(&o.flush_interval, "flush interval", 0, INT_MAX, 0)?;
        if !o.write && flush_interval > 0 {
            return Err(CliError::new(
                "--flush-interval is only available in write tests",
            ));
        }
        if flush_interval > 0 && flush_interval < depth {
            return Err(CliError::new("Flush interval can't be smaller than depth"));
        }
        Ok(BenchParams {
            count,
            depth,
            offset,
            bufsize,
            step: if step == 0 { bufsize } else { step },
            write: o.write,
            pattern,
            flush_interval,
            drain: !o.no_drain,
        })
    }

    /// The "Sending ..." line(s).
    pub fn banner(&self) -> String {
        let mut s = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.step
        );
        if self.flush_interval > 0 {
            s.push_str(&format!(
                "Sending flush every {} requests\n",
                self.flush_interval
            ));
        }
        s
    }

    /// Request offsets in submission order.
    pub fn offsets(&self, image_size: u64) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.offset;
        (0..self.count).map(move |_| {
            let this = next;
            next = if image_size == 0 {
                0
            } else {
                (next + self.step) % image_size
            };
            this
        })
    }
}

/// The largest guest range one merged engine call covers.
const MERGE_BYTES: u64 = 8 << 20;

/// One engine call: `len` guest bytes at `offset`, covering `requests` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submission {
    /// First guest byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Requests merged into it.
    pub requests: u64,
}

impl BenchParams {
    /// The requests grouped as this engine submits them: `depth` requests are in flight at
    /// a time (fewer where a flush must follow), and requests in flight that continue each
    /// other in the guest are merged into one call of at most [`MERGE_BYTES`] — the block
    /// layer's request merging, which is what a queue depth buys a synchronous engine.
    /// `Err(())` marks a request outside the image (it fails, after those before it).
    pub fn submissions(
        &self,
        image_size: u64,
    ) -> impl Iterator<Item = Result<Submission, ()>> + '_ {
        let mut offsets = self.offsets(image_size).peekable();
        let mut done = 0u64;
        let mut in_batch = 0u64;
        let max_merge = (MERGE_BYTES / self.bufsize).max(1);
        let fits = move |off: u64| {
            off.checked_add(self.bufsize)
                .is_some_and(|e| e <= image_size)
        };
        std::iter::from_fn(move || {
            let first = offsets.next()?;
            if !fits(first) {
                return Some(Err(()));
            }
            // A batch is `depth` requests, cut at every flush point.
            if in_batch == 0 {
                in_batch = self.depth;
                if self.flush_interval > 0 {
                    in_batch = in_batch.min(self.flush_interval - done % self.flush_interval);
                }
            }
            let mut sub = Submission {
                offset: first,
                len: self.bufsize,
                requests: 1,
            };
            in_batch -= 1;
            while in_batch > 0 && sub.requests < max_merge {
                match offsets.peek() {
                    Some(&next) if next == sub.offset + sub.len && fits(next) => {
                        offsets.next();
                        sub.len += self.bufsize;
                        sub.requests += 1;
                        in_batch -= 1;
                    }
                    _ => break,
                }
            }
            done += sub.requests;
            Some(Ok(sub))
        })
    }
}

/// qemu-img's cache mode (`-t`; writeback by default); unknown modes get its message.
pub fn cache_mode(mode: Option<&str>) -> Result<CacheMode, CliError> {
    match mode {
        None => Ok(CacheMode::Writeback),
        Some(m) => CacheMode::parse(m).ok_or_else(|| CliError::new("Invalid cache mode")),
    }
}

/// qemu-img's AIO engines (`-i`; `-n` is `native`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// A worker thread per request in flight (QEMU's thread pool).
    Threads,
    /// Linux native AIO in QEMU; here the io_uring path (the kernel's asynchronous
    /// interface), with QEMU's requirement of `O_DIRECT` (`-t none`/`directsync`).
    Native,
    /// io_uring: one ring keeps every request in flight.
    IoUring,
}

impl Aio {
    /// The engine named by `-i` (or `-n`), with qemu-img's message for an unknown one.
    pub fn parse(aio: Option<&str>, native: bool) -> Result<Aio, CliError> {
        match aio {
            None if native => Ok(Aio::Native),
            None | Some("threads") => Ok(Aio::Threads),
            Some("native") => Ok(Aio::Native),
            Some("io_uring") => Ok(Aio::IoUring),
            Some(other) => Err(CliError::new(format!("Invalid aio option: {other}"))),
        }
    }

    /// Whether requests go through an asynchronous queue rather than worker threads.
    pub fn queued(self) -> bool {
        self != Aio::Threads
    }

    /// QEMU's refusal of `aio=native` without `O_DIRECT`.
    pub fn check(self, file: &str, cache: CacheMode) -> Result<(), CliError> {
        if self == Aio::Native && !cache.direct() {
            return Err(CliError::new(format!(
                "Could not open '{file}': aio=native was specified, but it requires cache.direct=on, which was not specified."
            )));
        }
        Ok(())
    }
}

/// Most requests one queue keeps in flight.
const MAX_QUEUE_DEPTH: u64 = 1024;

/// Most threads driving queues (each with its own ring).
const MAX_RINGS: usize = 4;

/// What the queue drivers share: the submissions not yet taken, and the first failure.
struct Source<I> {
    subs: I,
    out_of_range: bool,
    failed: Option<CliError>,
}

/// Runs the benchmark on `image` with the requests in flight on asynchronous queues
/// ([`SharedImage::queue`]: io_uring when the image file was opened with it): one thread
/// per CPU (at most [`MAX_RINGS`]), each with its own ring carrying its share of the DEPTH
/// requests in flight — qemu-img's model (one thread, DEPTH requests in flight) spread
/// over the CPUs, so that completions are reaped wherever a CPU is free. The requests are
/// [`BenchParams::submissions`] (the same offsets, bytes and flush points as the threaded
/// run). With a flush interval one thread drives everything: at a flush point every
/// earlier request completes, then the flush runs, then later requests start.
pub fn run_queued(image: &SharedImage, p: &BenchParams) -> Result<(), CliError> {
    out(&p.banner());
    let size = image.virtual_size().map_err(|e| request_failed(&e))?;
    let depth = p.depth.min(MAX_QUEUE_DEPTH);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rings = if p.flush_interval > 0 {
        1
    } else {
        (cpus.min(MAX_RINGS) as u64).min(depth).min(p.count).max(1)
    };
    let source = Mutex::new(Source {
        subs: p.submissions(size),
        out_of_range: false,
        failed: None,
    });
    let start = Instant::now();
    std::thread::scope(|scope| {
        for i in 0..rings {
            // The DEPTH requests in flight split between the rings.
            let share = depth / rings + u64::from(i < depth % rings);
            let source = &source;
            scope.spawn(move || {
                if let Err(e) = drive_queue(image, p, share, source) {
                    let mut src = source.lock().unwrap_or_else(|e| e.into_inner());
                    src.failed.get_or_insert(e);
                }
            });
        }
    });
    let src = source.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = src.failed {
        return Err(e);
    }
    if src.out_of_range {
        return Err(CliError::new(format!("Failed request: {}", strerror(5))));
    }
    out(&format!(
        "Run completed in {:.3} seconds.\n",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn request_failed(e: &ImageError) -> CliError {
    CliError::new(format!("Failed request: {}", strerror(image_errno(e))))
}

/// One thread's share of [`run_queued`]: keeps `depth` requests in flight on its own
/// queue, taking submissions from `source` as room frees up.
fn drive_queue<I: Iterator<Item = Result<Submission, ()>>>(
    image: &SharedImage,
    p: &BenchParams,
    depth: u64,
    source: &Mutex<Source<I>>,
) -> Result<(), CliError> {
    let max_len = p.bufsize.max(MERGE_BYTES.min(p.bufsize * p.depth)) as usize;
    let data = vec![p.pattern; max_len];
    let mut queue = image
        .queue(depth as usize)
        .map_err(|e| request_failed(&e))?;
    let mut done = Vec::new();
    let mut batch: Vec<Submission> = Vec::with_capacity(depth as usize);
    // Requests (not submissions) in flight and issued, and the pending flush point.
    let (mut in_flight, mut issued) = (0u64, 0u64);
    let mut flush_at: Option<u64> = None;
    let mut exhausted = false;
    loop {
        if !exhausted && flush_at.is_none() && in_flight < depth {
            // Take what fits in one visit to the shared source.
            let mut src = source.lock().unwrap_or_else(|e| e.into_inner());
            if src.failed.is_some() || src.out_of_range {
                exhausted = true;
            }
            let mut room = depth - in_flight;
            while !exhausted && room > 0 {
                match src.subs.next() {
                    None => exhausted = true,
                    Some(Err(())) => {
                        src.out_of_range = true;
                        exhausted = true;
                    }
                    Some(Ok(s)) => {
                        room = room.saturating_sub(s.requests);
                        batch.push(s);
                        let before = issued;
                        issued += s.requests;
                        if p.flush_interval > 0
                            && issued / p.flush_interval > before / p.flush_interval
                        {
                            flush_at = Some(issued);
                            break;
                        }
                    }
                }
            }
            drop(src);
            for sub in batch.drain(..) {
                let len = sub.len as usize;
                let r = if p.write {
                    queue.write(sub.requests, sub.offset, &data[..len])
                } else {
                    queue.read(sub.requests, sub.offset, len)
                };
                r.map_err(|e| request_failed(&e))?;
                in_flight += sub.requests;
            }
        }
        if queue.in_flight() == 0 {
            if flush_at.take().is_some() {
                // The queue holds the image's drain guard: the flush runs without it.
                drop(queue);
                image.flush().map_err(|e| {
                    CliError::new(format!(
                        "Failed flush request: {}",
                        strerror(image_errno(&e))
                    ))
                })?;
                queue = image
                    .queue(depth as usize)
                    .map_err(|e| request_failed(&e))?;
                continue;
            }
            if exhausted {
                return Ok(());
            }
            continue;
        }
        queue
            .complete(1, &mut done)
            .map_err(|e| request_failed(&e))?;
        for d in done.drain(..) {
            d.result.map_err(|e| request_failed(&e))?;
            in_flight -= d.tag;
        }
    }
}

/// A device the benchmark's workers share: every method takes `&self`, so requests run
/// in parallel (the qcow2 engine's [`SharedImage`], a raw file's positioned I/O).
pub trait SharedDev: Sync {
    /// Virtual size in bytes.
    fn length(&self) -> Result<u64, i32>;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Writes `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), i32>;
}

impl SharedDev for SharedImage {
    fn length(&self) -> Result<u64, i32> {
        self.virtual_size().map_err(|e| image_errno(&e))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        SharedImage::read(self, offset, buf).map_err(|e| image_errno(&e))
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        SharedImage::write(self, offset, buf).map_err(|e| image_errno(&e))
    }
    fn flush(&self) -> Result<(), i32> {
        SharedImage::flush(self).map_err(|e| image_errno(&e))
    }
}

/// The errno of an engine error; a corruption is reported once, as the engine words it.
fn image_errno(e: &ImageError) -> i32 {
    if e.is_corruption() {
        eprintln!("{}{}", crate::prog::prefix(), crate::qcowdev::error_text(e));
    }
    e.errno()
}

/// A raw image file: positioned reads and writes need no lock.
pub struct RawFile(pub FileStorage);

impl SharedDev for RawFile {
    fn length(&self) -> Result<u64, i32> {
        // The block layer counts whole sectors.
        self.0
            .len()
            .map(|l| l.next_multiple_of(512))
            .map_err(|e| e.raw_os_error().unwrap_or(5))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| e.raw_os_error().unwrap_or(5))
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.0
            .write_at(buf, offset)
            .map_err(|e| e.raw_os_error().unwrap_or(5))
    }
    fn flush(&self) -> Result<(), i32> {
        self.0.flush().map_err(|e| e.raw_os_error().unwrap_or(5))
    }
}

/// Most worker threads a run uses (QEMU's thread pool has 64 by default).
const MAX_WORKERS: u64 = 64;

/// What the workers share: the submissions not yet taken, and the flush point they wait at.
struct Dispatch<I> {
    subs: I,
    issued: u64,
    completed: u64,
    /// Requests that must complete before the pending flush runs and anything new starts.
    flush_at: Option<u64>,
    failed: Option<CliError>,
}

/// Runs the benchmark on `dev`; prints qemu-img's lines. `depth` requests are in flight
/// at a time: that many workers (at most [`MAX_WORKERS`]) each keep one engine call going,
/// requests in flight that continue each other in the guest merged into one call (see
/// [`BenchParams::submissions`]). At a flush point every earlier request completes, then the
/// flush runs, then later requests start (qemu-img's drain; `--no-drain` is not
/// distinguished).
pub fn run(dev: &dyn SharedDev, p: &BenchParams) -> Result<(), CliError> {
    out(&p.banner());
    let size = dev
        .length()
        .map_err(|e| CliError::new(format!("Failed request: {}", strerror(e))))?;
    let max_len = p.bufsize.max(MERGE_BYTES.min(p.bufsize * p.depth)) as usize;
    let workers = p.depth.min(MAX_WORKERS).min(p.count);
    // Enough submissions per visit to the dispatcher to keep it off the profile, few
    // enough that every worker gets a share of a short run.
    let batch_size = (p.count / (workers * 16)).clamp(1, 8) as usize;
    let state = Mutex::new(Dispatch {
        subs: p.submissions(size),
        issued: 0,
        completed: 0,
        flush_at: None,
        failed: None,
    });
    let wake = Condvar::new();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| worker(dev, p, max_len, batch_size, &state, &wake));
        }
    });
    let st = state.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = st.failed {
        return Err(e);
    }
    out(&format!(
        "Run completed in {:.3} seconds.\n",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn worker<I: Iterator<Item = Result<Submission, ()>>>(
    dev: &dyn SharedDev,
    p: &BenchParams,
    max_len: usize,
    batch_size: usize,
    state: &Mutex<Dispatch<I>>,
    wake: &Condvar,
) {
    let mut buf = vec![p.pattern; max_len];
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let fail = |st: &mut Dispatch<I>, errno: i32| {
        st.failed = Some(CliError::new(format!(
            "Failed request: {}",
            strerror(errno)
        )));
        wake.notify_all();
    };
    let mut batch: Vec<Submission> = Vec::with_capacity(batch_size);
    let mut st = lock();
    loop {
        if st.failed.is_some() {
            return;
        }
        if st.flush_at.is_some() {
            st = wake.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if p.flush_interval == 0 && batch_size > 1 {
            // No flush point orders the requests: take several per visit, so that the
            // workers do not queue on the dispatcher for every request.
            batch.clear();
            let mut then_fail = false;
            while batch.len() < batch_size {
                match st.subs.next() {
                    None => break,
                    Some(Err(())) => {
                        then_fail = true;
                        break;
                    }
                    Some(Ok(s)) => batch.push(s),
                }
            }
            if batch.is_empty() && !then_fail {
                return;
            }
            drop(st);
            for sub in &batch {
                let b = &mut buf[..sub.len as usize];
                let r = if p.write {
                    dev.write(sub.offset, b)
                } else {
                    dev.read(sub.offset, b)
                };
                if let Err(e) = r {
                    fail(&mut lock(), e);
                    return;
                }
            }
            st = lock();
            if then_fail {
                fail(&mut st, 5);
                return;
            }
            continue;
        }
        let sub = match st.subs.next() {
            None => return,
            Some(Err(())) => {
                fail(&mut st, 5);
                return;
            }
            Some(Ok(s)) => s,
        };
        st.issued += sub.requests;
        if p.flush_interval > 0 && st.issued % p.flush_interval == 0 {
            st.flush_at = Some(st.issued);
        }
        drop(st);
        let b = &mut buf[..sub.len as usize];
        let r = if p.write {
            dev.write(sub.offset, b)
        } else {
            dev.read(sub.offset, b)
        };
        st = lock();
        st.completed += sub.requests;
        if let Err(e) = r {
            fail(&mut st, e);
            return;
        }
        if st.flush_at == Some(st.completed) {
            // Every request before the flush point has completed and no later one has
            // started: the others wait on `flush_at`.
            drop(st);
            let r = dev.flush();
            st = lock();
            st.flush_at = None;
            if let Err(e) = r {
                st.failed = Some(CliError::new(format!(
                    "Failed flush request: {}",
                    strerror(e)
                )));
            }
            wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_and_offsets() {
        let o = BenchOptions {
            count: Some("10".into()),
            depth: Some("2".into()),
            offset: Some("4k".into()),
            step_size: Some("8k".into()),
            write: true,
            pattern: Some("0x5a".into()),
            flush_interval: Some("3".into()),
            ..BenchOptions::default()
        };
        let p = BenchParams::from_options(&o).unwrap();
        assert_eq!(
            p.banner(),
            "Sending 10 write requests, 4096 bytes each, 2 in parallel (starting at offset 4096, step size 8192)\nSending flush every 3 requests\n"
        );
        let offs: Vec<u64> = p.offsets(32768).collect();
        assert_eq!(offs[..5], [4096, 12288, 20480, 28672, 4096]);
        assert_eq!(p.pattern, 0x5a);
    }

    fn params(count: u64, depth: u64, step: u64, flush: u64) -> BenchParams {
        BenchParams {
            count,
            depth,
            offset: 0,
            bufsize: 4096,
            step,
            write: true,
            pattern: 0,
            flush_interval: flush,
            drain: true,
        }
    }

    fn subs(p: &BenchParams, size: u64) -> Vec<Result<(u64, u64, u64), ()>> {
        p.submissions(size)
            .map(|s| s.map(|s| (s.offset, s.len, s.requests)))
            .collect()
    }

    #[test]
    fn requests_in_flight_merge_when_contiguous() {
        const K: u64 = 4096;
        // Batches of `depth`, the last one short.
        assert_eq!(
            subs(&params(10, 4, K, 0), 1 << 20),
            [
                Ok((0, 4 * K, 4)),
                Ok((4 * K, 4 * K, 4)),
                Ok((8 * K, 2 * K, 2))
            ]
        );
        // A flush point cuts a batch: flushes stay after requests 6 and 12.
        assert_eq!(
            subs(&params(12, 4, K, 6), 1 << 20),
            [
                Ok((0, 4 * K, 4)),
                Ok((4 * K, 2 * K, 2)),
                Ok((6 * K, 4 * K, 4)),
                Ok((10 * K, 2 * K, 2))
            ]
        );
        // Scattered requests are never merged.
        assert_eq!(
            subs(&params(3, 64, 3 * K, 0), 1 << 20),
            [Ok((0, K, 1)), Ok((3 * K, K, 1)), Ok((6 * K, K, 1))]
        );
        // Wrapping at the end of the image starts a new call.
        assert_eq!(
            subs(&params(4, 64, K, 0), 3 * K),
            [Ok((0, 3 * K, 3)), Ok((0, K, 1))]
        );
        // A request past the end fails after the ones before it.
        assert_eq!(
            subs(&params(3, 64, K, 0), 5 * K / 2),
            [Ok((0, 2 * K, 2)), Err(())]
        );
        // Each request is counted exactly once, and no call exceeds the merge limit.
        let p = params(5000, 64, K, 0);
        let all: Vec<_> = p.submissions(1 << 30).map(|s| s.unwrap()).collect();
        assert_eq!(all.iter().map(|s| s.requests).sum::<u64>(), 5000);
        assert!(all
            .iter()
            .all(|s| s.len <= MERGE_BYTES && s.len == s.requests * K));
    }

    #[test]
    fn option_errors() {
        let err = |o: BenchOptions| BenchParams::from_options(&o).unwrap_err().msg;
        assert_eq!(
            err(BenchOptions {
                count: Some("0".into()),
                ..Default::default()
            }),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(BenchOptions {
                count: Some("abc".into()),
                ..Default::default()
            }),
            "Invalid request count specified: 'abc'."
        );
        assert_eq!(
            err(BenchOptions {
                flush_interval: Some("2".into()),
                ..Default::default()
            }),
            "--flush-interval is only available in write tests"
        );
        assert_eq!(
            err(BenchOptions {
                write: true,
                flush_interval: Some("3".into()),
                ..Default::default()
            }),
            "Flush interval can't be smaller than depth"
        );
        assert_eq!(
            err(BenchOptions {
                write: true,
                pattern: Some("300".into()),
                ..Default::default()
            }),
            "Invalid pattern byte specified. Must be between 0 and 255."
        );
    }
}
