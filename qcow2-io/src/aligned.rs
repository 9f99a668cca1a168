//! Page-aligned buffers: what `O_DIRECT` and io_uring transfers require of memory, and
//! what makes the kernel's copies between the page cache and user memory fastest (a buffer
//! from `malloc` starts a few bytes into its page). Carved out of an ordinary allocation,
//! without unsafe code. The one buffer type of the storage layer: bounce buffers, queued
//! transfers and the copy loops of rebase, commit and convert all use it.

use crate::file::DIRECT_ALIGN;

/// A zeroed byte buffer whose start is aligned to [`DIRECT_ALIGN`], carved out of an
/// ordinary allocation; its memory never moves while the buffer lives, even when the
/// `IoBuf` itself is moved (what a transfer in flight in the kernel relies on).
#[derive(Default)]
pub struct IoBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let mem = vec![0u8; len + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        IoBuf { mem, start, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = IoBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Shortens the buffer to `len` bytes (no-op when it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes the buffer `len` bytes long, keeping the allocation (and so the aligned
    /// start) when it is large enough. Bytes that come back into view after a shrink hold
    /// their earlier content; a new allocation is zeroed. Callers fill what they use.
    pub fn resize(&mut self, len: usize) {
        if self.start + len > self.mem.len() {
            *self = IoBuf::new(len);
        } else {
            self.len = len;
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_resizable() {
        let mut b = IoBuf::new(10_000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(b.len(), 10_000);
        b[9_999] = 1;
        b.resize(100);
        assert_eq!(b.len(), 100);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        b.resize(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        let d = IoBuf::default();
        assert!(d.is_empty());
        let c = IoBuf::from_slice(&[1, 2, 3]);
        assert_eq!(&c[..], &[1, 2, 3]);
    }
}
