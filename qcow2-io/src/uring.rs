//! io_uring queues for [`FileStorage`](crate::FileStorage) (QEMU's `aio=io_uring`): one
//! ring per queue, so each thread that drives a queue submits and reaps its own transfers
//! without sharing a ring with the others.
//!
//! Transfers go through the `O_DIRECT` descriptor when the storage has one and the range
//! is aligned (the buffers always are), through the buffered descriptor otherwise, as the
//! synchronous calls do. Short transfers are continued; a read that meets the end of the
//! file fills the rest with zeros (the [`Storage`](crate::Storage) contract).

use crate::file::DIRECT_ALIGN;
use crate::queue::{Completion, Dir, IoQueue, Transfer};
use crate::IoBuf;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

/// Most submission-queue entries of one ring.
const MAX_ENTRIES: usize = 4096;
/// Most bytes one entry moves (a longer transfer continues in further entries).
const MAX_CHUNK: usize = 1 << 30;

/// Checks that io_uring can be used here: a ring can be set up and it knows the `READ`
/// and `WRITE` operations (Linux 5.6). The error is the kernel's (`ENOSYS` on old kernels
/// and under seccomp filters, `EPERM` where `kernel.io_uring_disabled` forbids it).
pub(crate) fn probe() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    if !p.is_supported(opcode::Read::CODE) || !p.is_supported(opcode::Write::CODE) {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    Ok(())
}

/// A transfer in flight (or waiting for room in the submission queue).
struct Op {
    tag: u64,
    dir: Dir,
    offset: u64,
    buf: IoBuf,
    /// Bytes already moved by earlier (short) completions.
    done: usize,
}

/// Which descriptor an entry names.
#[derive(Clone, Copy)]
enum Target {
    Raw(i32),
}

/// An io_uring ring with the transfers it carries.
pub(crate) struct UringQueue {
    ring: IoUring,
    // The descriptors the entries name stay open while the queue lives.
    _file: Arc<File>,
    direct: Option<Arc<File>>,
    buffered_target: Target,
    direct_target: Option<Target>,
    /// Transfers by slot (the entries' `user_data`); `None`: a free slot.
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Slots to submit (new, or continuing after a short or interrupted completion).
    backlog: VecDeque<usize>,
    /// Entries in the kernel's hands: their buffers must not be touched or freed.
    in_kernel: usize,
    entries: usize,
    /// Transfers pushed and not yet returned.
    pending: usize,
    /// Empty transfers: complete at once.
    instant: Vec<Completion>,
    cqes: Vec<(u64, i32)>,
}

impl UringQueue {
    /// A ring sized for `depth` transfers in flight on `file` (and `direct`, its
    /// `O_DIRECT` twin).
    pub(crate) fn new(
        depth: usize,
        file: Arc<File>,
        direct: Option<Arc<File>>,
    ) -> io::Result<Self> {
        let entries = depth.clamp(1, MAX_ENTRIES).next_power_of_two();
        let n = u32::try_from(entries).unwrap_or(MAX_ENTRIES as u32);
        // Cooperative task running (Linux 5.19) saves an interrupt per completion; older
        // kernels refuse the flag and get a plain ring.
        let ring = match IoUring::builder().setup_coop_taskrun().build(n) {
            Ok(r) => r,
            Err(_) => IoUring::new(n)?,
        };
        // Plain descriptors, not registered ones: the kernel drops a ring's registered
        // files only when it tears the ring down, asynchronously after close, and until
        // then the file description (and QEMU's OFD locks on it) would outlive the image.
        let buffered_target = Target::Raw(file.as_raw_fd());
        let direct_target = direct.as_ref().map(|d| Target::Raw(d.as_raw_fd()));
        Ok(UringQueue {
            ring,
            _file: file,
            direct,
            buffered_target,
            direct_target,
            ops: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            entries,
            pending: 0,
            instant: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// The submission entry for what is left of the transfer in `slot`.
    fn entry(&mut self, slot: usize) -> Option<squeue::Entry> {
        let op = self.ops.get_mut(slot)?.as_mut()?;
        let at = op.offset.checked_add(op.done as u64)?;
        let rest = &mut op.buf[op.done..];
        let len = rest.len().min(MAX_CHUNK);
        let a = DIRECT_ALIGN as u64;
        // The buffer starts aligned, so the rest of it is aligned where `done` is.
        let direct = self.direct.is_some()
            && at % a == 0
            && len as u64 % a == 0
            && op.done % DIRECT_ALIGN == 0;
        let target = match (direct, self.direct_target) {
            (true, Some(t)) => t,
            _ => self.buffered_target,
        };
        let ptr = rest.as_mut_ptr();
        let len32 = len as u32;
        let e = match (op.dir, target) {
            (Dir::Read, Target::Raw(fd)) => opcode::Read::new(types::Fd(fd), ptr, len32)
                .offset(at)
                .build(),
            (Dir::Write, Target::Raw(fd)) => opcode::Write::new(types::Fd(fd), ptr, len32)
                .offset(at)
                .build(),
        };
        Some(e.user_data(slot as u64))
    }

    /// Moves backlog entries into the submission queue while there is room.
    fn fill(&mut self) {
        while let Some(&slot) = self.backlog.front() {
            if self.in_kernel >= self.entries {
                break;
            }
            let Some(e) = self.entry(slot) else {
                // An offset overflow: fail the transfer rather than submit it.
                self.backlog.pop_front();
                self.finish(
                    slot,
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "offset overflow",
                    )),
                );
                continue;
            };
            let mut sq = self.ring.submission();
            #[allow(unsafe_code)]
            // SAFETY: the entry points into the buffer of `self.ops[slot]`, whose heap memory
            // stays allocated and untouched by us until its completion is reaped (the slot
            // is only taken in `finish`, after the completion; `Drop` waits for every entry
            // in the kernel's hands); the descriptors it names stay open (`_file`/`direct`
            // are held by the queue).
            let pushed = unsafe { sq.push(&e) };
            drop(sq);
            if pushed.is_err() {
                break;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Returns the transfer in `slot` to the caller.
    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        if let Some(op) = self.ops.get_mut(slot).and_then(Option::take) {
            self.free.push(slot);
            self.pending -= 1;
            self.instant.push(Completion {
                tag: op.tag,
                buf: op.buf,
                result,
            });
        }
    }

    /// Handles the completions the kernel posted.
    fn reap(&mut self) {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let cqes = std::mem::take(&mut self.cqes);
        for &(user_data, res) in &cqes {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            let slot = user_data as usize;
            let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if res < 0 {
                let errno = -res;
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    self.backlog.push_back(slot);
                } else {
                    self.finish(slot, Err(io::Error::from_raw_os_error(errno)));
                }
                continue;
            }
            let n = res as usize;
            let was_direct = self.direct.is_some() && op.done % DIRECT_ALIGN == 0;
            match op.dir {
                Dir::Read if n == 0 => {
                    // End of file: the rest reads as zeros.
                    op.buf[op.done..].fill(0);
                    self.finish(slot, Ok(()));
                }
                Dir::Write if n == 0 => {
                    self.finish(slot, Err(io::ErrorKind::WriteZero.into()));
                }
                dir => {
                    op.done += n;
                    if op.done >= op.buf.len() {
                        self.finish(slot, Ok(()));
                    } else if dir == Dir::Read && was_direct && n % DIRECT_ALIGN != 0 {
                        // A direct read comes back short mid-block only at the end of
                        // the file.
                        op.buf[op.done..].fill(0);
                        self.finish(slot, Ok(()));
                    } else {
                        self.backlog.push_back(slot);
                    }
                }
            }
        }
        self.cqes = cqes;
    }

    /// Submits what is queued and, with `block`, waits for at least one completion.
    fn enter(&mut self, block: bool) -> io::Result<()> {
        let want = usize::from(block && self.in_kernel > 0);
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl IoQueue for UringQueue {
    fn push(&mut self, t: Transfer) {
        self.pending += 1;
        let op = Op {
            tag: t.tag,
            dir: t.dir,
            offset: t.offset,
            buf: t.buf,
            done: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.ops[s] = Some(op);
                s
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        if self.ops[slot].as_ref().is_some_and(|o| o.buf.is_empty()) {
            self.finish(slot, Ok(()));
        } else {
            self.backlog.push_back(slot);
        }
    }

    fn pending(&self) -> usize {
        self.pending + self.instant.len()
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        let min = min.min(self.pending());
        let mut got = 0;
        loop {
            got += self.instant.len();
            out.append(&mut self.instant);
            if got >= min && self.backlog.is_empty() {
                // Everything pushed is in the kernel's hands: make sure it was submitted.
                return self.enter(false);
            }
            self.fill();
            self.enter(got < min || !self.backlog.is_empty())?;
            self.reap();
        }
    }

    fn is_async(&self) -> bool {
        true
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // Entries in the kernel's hands may still write into their buffers: wait for them.
        while self.in_kernel > 0 {
            if self.enter(true).is_err() {
                // The ring broke: the kernel may still use the buffers, so never free them.
                for op in self.ops.drain(..).flatten() {
                    std::mem::forget(op.buf);
                }
                return;
            }
            let n = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileStorage, Storage};

    fn storage(direct: bool) -> Option<(tempfile::TempDir, Arc<dyn Storage>)> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 3 * 4096 + 100]).unwrap();
        let mode = if direct {
            crate::CacheMode::None
        } else {
            crate::CacheMode::Writeback
        };
        let mut s = match FileStorage::open_cached(&p, true, mode) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return None,
            Err(e) => panic!("{e}"),
        };
        if let Err(e) = s.enable_io_uring() {
            // No io_uring here (seccomp, old kernel): the error is the kernel's.
            assert!(e.raw_os_error().is_some(), "{e}");
            return None;
        }
        Some((dir, Arc::new(s)))
    }

    #[test]
    fn many_transfers_in_flight_read_what_was_written() {
        for direct in [false, true] {
            let Some((_dir, s)) = storage(direct) else {
                return;
            };
            let mut q = crate::queue(&s, 8).unwrap();
            assert!(q.is_async());
            // 64 writes with depth 8: aligned ones (direct), unaligned ones (buffered),
            // some past the end of the file.
            for i in 0..64u64 {
                let (off, len) = if i % 3 == 0 {
                    (i * 4096, 4096)
                } else {
                    (i * 4096 + 7, 1000)
                };
                q.push(Transfer {
                    tag: i,
                    dir: Dir::Write,
                    offset: off,
                    buf: IoBuf::from_slice(&vec![i as u8 + 1; len]),
                });
            }
            let mut out = Vec::new();
            while q.pending() > 0 {
                q.wait(1, &mut out).unwrap();
            }
            assert_eq!(out.len(), 64);
            assert!(out.iter().all(|c| c.result.is_ok()));
            for i in 0..64u64 {
                let mut b = vec![0u8; 4096];
                s.read_at(&mut b, i * 4096).unwrap();
                let (a, l) = if i % 3 == 0 { (0, 4096) } else { (7, 1000) };
                assert!(b[a..a + l].iter().all(|&x| x == i as u8 + 1), "{i}");
            }
            // Reads through the ring, one crossing the end of the file.
            let end = s.len().unwrap();
            out.clear();
            q.push(Transfer {
                tag: 1,
                dir: Dir::Read,
                offset: 4096 * 3,
                buf: IoBuf::new(8192),
            });
            q.push(Transfer {
                tag: 2,
                dir: Dir::Read,
                offset: end - 4,
                buf: IoBuf::new(4096),
            });
            q.push(Transfer {
                tag: 3,
                dir: Dir::Read,
                offset: 0,
                buf: IoBuf::new(0),
            });
            q.wait(3, &mut out).unwrap();
            out.sort_by_key(|c| c.tag);
            assert!(out[0].buf[..4096].iter().all(|&x| x == 4));
            assert_eq!(&out[0].buf[4096..4096 + 7], &[0u8; 7]);
            assert!(out[0].buf[4096 + 7..4096 + 1007].iter().all(|&x| x == 5));
            assert!(out[1].buf[..4].iter().all(|&x| x == 64));
            assert!(out[1].buf[4..].iter().all(|&x| x == 0));
            assert!(out[2].result.is_ok() && out[2].buf.is_empty());
        }
    }

    #[test]
    fn errors_come_back_with_their_transfer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8; 10]).unwrap();
        // A read-only file: writes fail with EBADF, reads succeed.
        let mut s = FileStorage::open(&p, false).unwrap();
        if s.enable_io_uring().is_err() {
            return;
        }
        let s: Arc<dyn Storage> = Arc::new(s);
        let mut q = crate::queue(&s, 2).unwrap();
        q.push(Transfer {
            tag: 7,
            dir: Dir::Write,
            offset: 0,
            buf: IoBuf::new(10),
        });
        q.push(Transfer {
            tag: 8,
            dir: Dir::Read,
            offset: 0,
            buf: IoBuf::new(10),
        });
        let mut out = Vec::new();
        q.wait(2, &mut out).unwrap();
        out.sort_by_key(|c| c.tag);
        assert_eq!(
            out[0].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(&*out[1].buf, &[1u8; 10]);
        // Dropping a queue with transfers still pushed waits for them.
        q.push(Transfer {
            tag: 9,
            dir: Dir::Read,
            offset: 0,
            buf: IoBuf::new(10),
        });
        drop(q);
    }
}
