//! C stdio's buffering of standard output, which QEMU's tools have and scripts see: on a
//! terminal stdout is line-buffered; on a pipe or file it is written in 4096-byte blocks
//! (and at exit), so everything printed on stderr meanwhile comes first. QEMU's iotests
//! capture both streams through one pipe and compare the order.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// A C-stdio-like standard output buffer.
pub struct Stdout {
    buf: Vec<u8>,
    line_buffered: bool,
}

/// glibc's buffer size for pipes and files (`st_blksize`).
const STDIO_BUF: usize = 4096;

impl Stdout {
    /// Line-buffered on a terminal, block-buffered otherwise.
    pub fn new() -> Self {
        Stdout {
            buf: Vec::new(),
            line_buffered: std::io::stdout().is_terminal(),
        }
    }

    fn emit(bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        // QEMU's tools ignore SIGPIPE and write errors; so does this.
        let _ = out.write_all(bytes).and_then(|_| out.flush());
    }

    /// Appends `s`, writing out what C stdio would write at this point.
    pub fn write(&mut self, s: &str) {
        let data = s.as_bytes();
        if self.line_buffered {
            self.buf.extend_from_slice(data);
            if data.contains(&b'\n') {
                self.flush();
            }
            return;
        }
        let space = STDIO_BUF - self.buf.len();
        if data.len() <= space {
            self.buf.extend_from_slice(data);
            return;
        }
        // As glibc's fwrite: fill the buffer, write it, write whole blocks directly,
        // keep the rest.
        self.buf.extend_from_slice(&data[..space]);
        self.flush();
        let rest = &data[space..];
        let whole = rest.len() - rest.len() % STDIO_BUF;
        if whole > 0 {
            Self::emit(&rest[..whole]);
        }
        self.buf.extend_from_slice(&rest[whole..]);
    }

    /// Writes out everything buffered (`fflush`).
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            Self::emit(&self.buf);
            self.buf.clear();
        }
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's standard output for the qemu-img-like commands ([`crate::out`]).
static OUT: Mutex<Option<Stdout>> = Mutex::new(None);

/// Appends to the process's standard output buffer.
pub fn out(text: &str) {
    let mut g = OUT.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(Stdout::new).write(text);
}

/// Writes out the process's standard output buffer; called before the process exits.
/// Never blocks: from the panic hook, the panicking thread may hold the buffer (then what
/// it holds is lost, as C stdio's buffer is on a crash).
pub fn flush() {
    let mut g = match OUT.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Some(o) = g.as_mut() {
        o.flush();
    }
}
