//! Image locking that interoperates with QEMU's (`block/file-posix.c`).
//!
//! QEMU coordinates every process that opens an image through **OFD byte-range locks** on
//! the image file. For each block permission (bit `i` of [`Perms`]) two bytes matter:
//! - byte `100 + i`: a shared (read) lock there says "this open holds permission `i`";
//! - byte `200 + i`: a shared lock there says "this open does not share permission `i`".
//!
//! An open that wants permission `i` probes byte `200 + i` for a conflicting write lock
//! (`F_OFD_GETLK`): another open's read lock there means someone refuses to share it
//! ("Failed to get \"write\" lock"). An open that refuses to share permission `i` probes
//! byte `100 + i` ("Failed to get shared \"write\" lock"). Everybody only ever *takes* read
//! locks, so takers never block each other; only the probes see conflicts.
//!
//! OFD locks belong to the open file description, not to the process: two opens of one
//! file in one process conflict exactly as two processes do (as in QEMU), and the locks go
//! away when the last descriptor of the description closes — at drop, or when a crashed
//! holder's descriptors are closed by the kernel. POSIX (`F_SETLK`) locks are never used:
//! closing *any* descriptor of the file in the process would silently drop them.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// QEMU's block permissions (`BLK_PERM_*` of `include/block/block-common.h`, QEMU 10), as a
/// bit set. Bit `i` is locked at bytes `100 + i` and `200 + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// `BLK_PERM_WRITE`: the data may change.
    pub const WRITE: Perms = Perms(1 << 1);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that do not change what reads return.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// `BLK_PERM_RESIZE`: the length may change.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// `BLK_PERM_ALL`.
    pub const ALL: Perms = Perms(0x0f);

    /// The number of permission bits (QEMU's `PERM_FOREACH`).
    const BITS: u8 = 4;

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The permissions of `bits` that QEMU knows (others are dropped).
    pub const fn from_bits_truncate(bits: u8) -> Perms {
        Perms(bits & Self::ALL.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the permissions of `other` added.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// `self` without the permissions of `other`.
    pub const fn without(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    /// The permissions not in `self` (within [`Perms::ALL`]).
    pub const fn complement(self) -> Perms {
        Perms(!self.0 & Self::ALL.0)
    }

    /// The single permission of bit `i`.
    const fn bit(i: u8) -> Perms {
        Perms(1 << i)
    }

    /// QEMU's name of a single permission (`bdrv_perm_names`), as its messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Perms::CONSISTENT_READ => "consistent read",
            Perms::WRITE => "write",
            Perms::WRITE_UNCHANGED => "write unchanged",
            Perms::RESIZE => "resize",
            _ => "permissions",
        }
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        self.union(rhs)
    }
}

/// First byte of the "holds permission" locks (`RAW_LOCK_PERM_BASE`).
pub const LOCK_PERM_BASE: u64 = 100;
/// First byte of the "does not share permission" locks (`RAW_LOCK_SHARED_BASE`).
pub const LOCK_SHARED_BASE: u64 = 200;

/// QEMU's `locking` option of the file driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Always lock; an open fails if OFD locks do not work on the file.
    On,
    /// Never lock (for storage where locks do not work or are handled elsewhere).
    Off,
    /// Lock when OFD locks work on the file, else open unlocked (QEMU's default).
    #[default]
    Auto,
}

/// Why permissions could not be taken. The `Display` texts are QEMU's.
#[derive(Debug)]
pub enum LockError {
    /// Another open (any process, or this one through another open file description)
    /// holds a permission this open does not share, or does not share one it wants.
    /// QEMU: `Failed to get "write" lock` (`shared` false: we want the permission) or
    /// `Failed to get shared "write" lock` (`shared` true: we refuse to share it).
    Conflict {
        /// The single permission in conflict.
        perm: Perms,
        /// Whether the conflict is on a permission this open refuses to share.
        shared: bool,
    },
    /// Probing a lock byte failed for another reason than a conflict.
    Probe {
        /// The single permission probed.
        perm: Perms,
        /// Whether it was probed as one this open refuses to share.
        shared: bool,
        /// The `fcntl` error.
        source: io::Error,
    },
    /// A lock byte could not be locked or unlocked (QEMU: "Failed to lock byte 100").
    Byte {
        /// The byte offset.
        byte: u64,
        /// Whether it was an unlock.
        unlock: bool,
        /// The `fcntl` error.
        source: io::Error,
    },
    /// `Locking::On` on a file where OFD locks do not work.
    Unsupported {
        /// The `fcntl` error of the probe.
        source: io::Error,
    },
}

/// `strerror` text without Rust's " (os error N)".
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Whether `e` means "somebody else holds the lock" (QEMU prints no errno text then).
fn is_busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Conflict { perm, shared } => {
                let sh = if *shared { "shared " } else { "" };
                write!(f, "Failed to get {sh}\"{}\" lock", perm.name())
            }
            LockError::Probe {
                perm,
                shared,
                source,
            } => {
                let sh = if *shared { "shared " } else { "" };
                write!(
                    f,
                    "Failed to get {sh}\"{}\" lock: {}",
                    perm.name(),
                    strerror(source)
                )
            }
            LockError::Byte {
                byte,
                unlock,
                source,
            } => {
                let verb = if *unlock { "unlock" } else { "lock" };
                if is_busy(source) && !unlock {
                    write!(f, "Failed to {verb} byte {byte}")
                } else {
                    write!(f, "Failed to {verb} byte {byte}: {}", strerror(source))
                }
            }
            LockError::Unsupported { source } => write!(
                f,
                "File lock requested but OFD locking is unavailable: {}",
                strerror(source)
            ),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Probe { source, .. }
            | LockError::Byte { source, .. }
            | LockError::Unsupported { source } => Some(source),
            LockError::Conflict { .. } => None,
        }
    }
}

impl LockError {
    /// The errno QEMU returns (`EAGAIN` for a conflict).
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Conflict { .. } => libc::EAGAIN,
            LockError::Probe { source, .. }
            | LockError::Byte { source, .. }
            | LockError::Unsupported { source } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Whether another open holds the image (as opposed to locks not working).
    pub fn is_conflict(&self) -> bool {
        matches!(self, LockError::Conflict { .. })
    }
}

/// The locks one open file description holds: what QEMU's `BDRVRawState` keeps
/// (`perm`, `shared_perm`, `locked_perm`, `locked_shared_perm`).
#[derive(Debug, Default)]
pub(crate) struct LockState {
    /// `None` until the first [`set_permissions`]; then whether locks are used at all.
    enabled: Option<bool>,
    /// The permissions held (after the last successful change).
    perm: Perms,
    /// The permissions shared (after the last successful change).
    shared: Perms,
    /// Bytes `100 + i` locked.
    locked_perm: Perms,
    /// Bytes `200 + i` locked.
    locked_unshared: Perms,
}

impl LockState {
    pub(crate) fn new() -> Self {
        LockState {
            enabled: None,
            perm: Perms::NONE,
            shared: Perms::ALL,
            locked_perm: Perms::NONE,
            locked_unshared: Perms::NONE,
        }
    }

    /// The permissions held and shared, if locks are in use.
    pub(crate) fn current(&self) -> Option<(Perms, Perms)> {
        (self.enabled == Some(true)).then_some((self.perm, self.shared))
    }
}

/// `fcntl(F_OFD_SETLK / F_OFD_GETLK)` on one byte. For `F_OFD_GETLK` the returned type is
/// the conflicting lock's (`F_UNLCK` when none).
fn ofd(file: &File, cmd: libc::c_int, byte: u64, ty: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    #[allow(unsafe_code)]
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // OFD locks require l_pid 0 (zeroed above).
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is borrowed from `file` and open for the call; `fl` is a valid
    // `flock` that lives across it, and F_OFD_* only read/write that struct.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type))
}

/// QEMU's `qemu_lock_fd` (shared lock) / `qemu_unlock_fd` on one byte.
fn lock_byte(file: &File, byte: u64, unlock: bool) -> Result<(), LockError> {
    let ty = if unlock { libc::F_UNLCK } else { libc::F_RDLCK };
    ofd(file, libc::F_OFD_SETLK, byte, ty)
        .map(drop)
        .map_err(|source| LockError::Byte {
            byte,
            unlock,
            source,
        })
}

/// QEMU's `qemu_lock_fd_test(fd, byte, 1, true)`: whether another open file description
/// holds a lock that would conflict with an exclusive lock on `byte`. Our own locks never
/// conflict with our probes.
fn byte_taken(file: &File, byte: u64) -> io::Result<bool> {
    ofd(file, libc::F_OFD_GETLK, byte, libc::F_WRLCK).map(|ty| ty != libc::F_UNLCK)
}

/// Whether OFD locks work on `file` (a probe that changes nothing).
fn ofd_works(file: &File) -> io::Result<()> {
    byte_taken(file, LOCK_PERM_BASE).map(drop)
}

/// QEMU's `raw_apply_lock_bytes`: takes the bytes of `perm` (100 + i) and `unshared`
/// (200 + i) not yet taken; with `unlock`, releases the ones no longer wanted.
fn apply(
    file: &File,
    st: &mut LockState,
    perm: Perms,
    unshared: Perms,
    unlock: bool,
) -> Result<(), LockError> {
    for (base, want, locked) in [
        (LOCK_PERM_BASE, perm, &mut st.locked_perm),
        (LOCK_SHARED_BASE, unshared, &mut st.locked_unshared),
    ] {
        for i in 0..Perms::BITS {
            let bit = Perms::bit(i);
            let byte = base + u64::from(i);
            if want.contains(bit) && !locked.contains(bit) {
                lock_byte(file, byte, false)?;
                *locked = locked.union(bit);
            } else if unlock && locked.contains(bit) && !want.contains(bit) {
                lock_byte(file, byte, true)?;
                *locked = locked.without(bit);
            }
        }
    }
    Ok(())
}

/// QEMU's `raw_check_lock_bytes`: whether another open refuses to share a permission of
/// `perm`, or holds one that `shared` does not share. The first conflict in QEMU's order
/// is reported (wanted permissions first, then unshared ones, lowest bit first), so the
/// message is the one QEMU prints in the same situation.
fn check(file: &File, perm: Perms, shared: Perms) -> Result<(), LockError> {
    for (base, probe, is_shared) in [
        (LOCK_SHARED_BASE, perm, false),
        (LOCK_PERM_BASE, shared.complement(), true),
    ] {
        for i in 0..Perms::BITS {
            let bit = Perms::bit(i);
            if !probe.contains(bit) {
                continue;
            }
            match byte_taken(file, base + u64::from(i)) {
                Ok(false) => {}
                Ok(true) => {
                    return Err(LockError::Conflict {
                        perm: bit,
                        shared: is_shared,
                    })
                }
                Err(source) => {
                    return Err(LockError::Probe {
                        perm: bit,
                        shared: is_shared,
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Changes the permissions held through `file` to `perm`, sharing `shared`, as QEMU's
/// `raw_handle_perm_lock` does (prepare, then commit or abort): the new bytes are taken
/// before the check so that two racing opens cannot both pass it; on a conflict everything
/// returns to the previous state. Dropping permissions cannot conflict.
pub(crate) fn set_permissions(
    file: &File,
    st: &mut LockState,
    locking: Locking,
    perm: Perms,
    shared: Perms,
) -> Result<(), LockError> {
    let enabled = match st.enabled {
        Some(e) => e,
        None => {
            let e = match locking {
                Locking::Off => false,
                Locking::On => {
                    ofd_works(file).map_err(|source| LockError::Unsupported { source })?;
                    true
                }
                // QEMU's auto probes OFD support on /dev/null; probing the file itself
                // also covers file systems that refuse locks (some network and FUSE
                // file systems), for which `locking=auto` is meant.
                Locking::Auto => ofd_works(file).is_ok(),
            };
            st.enabled = Some(e);
            e
        }
    };
    if !enabled {
        st.perm = perm;
        st.shared = shared;
        return Ok(());
    }
    // Only taking a permission or refusing to share one more can conflict (QEMU skips
    // the prepare step otherwise).
    let unshared = st.shared.complement();
    let widening =
        st.perm.union(perm) != st.perm || unshared.union(shared.complement()) != unshared;
    if widening {
        let prepared = apply(
            file,
            st,
            st.perm.union(perm),
            st.shared.complement().union(shared.complement()),
            false,
        )
        .and_then(|()| check(file, perm, shared));
        if let Err(e) = prepared {
            // Abort: back to the bytes of the previous permissions. An unlock failure here
            // leaves extra read locks (only ever stricter); the first error is the one
            // that matters.
            let (p, s) = (st.perm, st.shared);
            let _ = apply(file, st, p, s.complement(), true);
            return Err(e);
        }
    }
    // Commit: drop the bytes the new permissions no longer need.
    apply(file, st, perm, shared.complement(), true)?;
    st.perm = perm;
    st.shared = shared;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    const RO: (Perms, Perms) = (
        Perms::CONSISTENT_READ,
        Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
    );
    const RW: (Perms, Perms) = (
        Perms::CONSISTENT_READ
            .union(Perms::WRITE)
            .union(Perms::RESIZE),
        Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
    );

    #[test]
    fn writers_and_readers_conflict_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let (a, b) = (open(&path), open(&path));
        let (mut sa, mut sb) = (LockState::new(), LockState::new());
        set_permissions(&a, &mut sa, Locking::On, RW.0, RW.1).unwrap();
        let e = set_permissions(&b, &mut sb, Locking::On, RW.0, RW.1).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        let e = set_permissions(&b, &mut sb, Locking::On, RO.0, RO.1).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        // Force-share: nothing refused, so a reader coexists with the writer.
        set_permissions(&b, &mut sb, Locking::On, RO.0, Perms::ALL).unwrap();
        // Dropping back to read-only releases the bytes of "write" and "resize".
        set_permissions(&a, &mut sa, Locking::On, RO.0, RO.1).unwrap();
        assert_eq!(sa.locked_perm, Perms::CONSISTENT_READ);
        // An upgrade of the force-sharing reader to a writer conflicts with `a` not
        // sharing "write".
        let e = set_permissions(&b, &mut sb, Locking::On, RW.0, RW.1).unwrap_err();
        assert!(e.is_conflict());
        // The failed upgrade left `b` as it was.
        assert_eq!(sb.current(), Some((RO.0, Perms::ALL)));
        drop(a);
        set_permissions(&b, &mut sb, Locking::On, RW.0, RW.1).unwrap();
    }

    #[test]
    fn locking_off_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let (a, b) = (open(&path), open(&path));
        let (mut sa, mut sb) = (LockState::new(), LockState::new());
        set_permissions(&a, &mut sa, Locking::Off, RW.0, RW.1).unwrap();
        set_permissions(&b, &mut sb, Locking::Auto, RW.0, RW.1).unwrap();
        assert_eq!(sa.current(), None);
        assert_eq!(sb.current(), Some(RW));
    }
}
