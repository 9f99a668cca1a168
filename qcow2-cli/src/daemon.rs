//! qemu-nbd's `--fork`: the server goes on in a child process, and the command returns
//! once the child listens.
//!
//! The child starts a new session and drops the terminal (stdin and stdout on
//! `/dev/null`); until it is ready its stderr is a pipe to the parent, which copies what
//! arrives to its own stderr and exits when the pipe closes: with 0 when the child said
//! nothing (it is listening), 1 when it printed an error (it failed to start). Once ready
//! the child gets the original stderr back, as qemu-nbd does.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::CliError;

/// The forked server process, until it reports that it is ready.
#[derive(Debug)]
pub struct Forked {
    /// The original stderr, put back in place by [`Forked::ready`] (which also closes the
    /// pipe to the parent).
    old_stderr: OwnedFd,
}

fn os_error(what: &str) -> CliError {
    CliError::new(format!(
        "{what}: {}",
        crate::image::strerror(&std::io::Error::last_os_error())
    ))
}

/// Forks. Returns in the child only; the parent waits for the child to be ready (or to
/// fail) and exits.
///
/// Must be called while the process has one thread: after `fork` only the calling thread
/// exists in the child, and any lock another thread held would stay locked for ever.
pub fn fork() -> Result<Forked, CliError> {
    let mut fds = [0 as libc::c_int; 2];
    #[allow(unsafe_code)]
    // SAFETY: `fds` is a valid array of two ints that pipe2 fills.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("Error setting up communication pipe"));
    }
    #[allow(unsafe_code)]
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[allow(unsafe_code)]
    // SAFETY: the caller guarantees the process is single-threaded here, so the child
    // (a copy of this one thread) inherits no lock held by another thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_error("Failed to fork"));
    }
    if pid > 0 {
        drop(write_end);
        parent(read_end);
    }
    drop(read_end);
    child(write_end)
}

/// The parent: copies the child's messages until the pipe closes, then exits.
fn parent(read_end: OwnedFd) -> ! {
    let mut pipe = std::fs::File::from(read_end);
    let mut buf = [0u8; 1024];
    let mut errors = false;
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                errors = true;
                let mut err = std::io::stderr().lock();
                if err.write_all(&buf[..n]).and_then(|()| err.flush()).is_err() {
                    std::process::exit(1);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!(
                    "{}Cannot read from daemon: {}",
                    crate::prog::prefix(),
                    crate::image::strerror(&e)
                );
                std::process::exit(1);
            }
        }
    }
    std::process::exit(i32::from(errors))
}

/// The child: a new session, stdin/stdout on /dev/null, stderr on the pipe.
fn child(write_end: OwnedFd) -> Result<Forked, CliError> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| CliError::new(format!("Failed to daemonize: {e}")))?;
    #[allow(unsafe_code)]
    // SAFETY: plain system calls on descriptors that are open for the duration (the
    // standard ones, `null`, and the pipe's write end); dup's result is checked before it
    // is owned.
    let old_stderr = unsafe {
        libc::setsid();
        libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO);
        libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        let old = libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3);
        if old < 0 {
            return Err(os_error("Failed to daemonize"));
        }
        let old = OwnedFd::from_raw_fd(old);
        libc::dup2(write_end.as_raw_fd(), libc::STDERR_FILENO);
        old
    };
    // The pipe stays open only as this process's stderr.
    drop(write_end);
    Ok(Forked { old_stderr })
}

impl Forked {
    /// The server listens: stderr goes back to where it was, which closes the pipe and
    /// lets the parent exit with success.
    pub fn ready(self) {
        #[allow(unsafe_code)]
        // SAFETY: both descriptors are open; dup2 replaces stderr atomically.
        unsafe {
            libc::dup2(self.old_stderr.as_raw_fd(), libc::STDERR_FILENO);
        }
    }
}
