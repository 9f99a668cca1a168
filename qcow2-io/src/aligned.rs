//! Page-aligned buffers: what `O_DIRECT` requires of memory, and what makes the kernel's
//! copies between the page cache and user memory fastest (a buffer from `malloc` starts a
//! few bytes into its page). Carved out of an ordinary allocation, without unsafe code.

use crate::file::DIRECT_ALIGN;

/// A zeroed buffer of `len` bytes whose first byte is [`DIRECT_ALIGN`]-aligned.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed, aligned buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let mem = vec![0u8; len + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { mem, start, len }
    }

    /// Makes the buffer `len` bytes long (new bytes are zero; the allocation is kept when
    /// it is large enough, so the start stays aligned).
    pub fn resize(&mut self, len: usize) {
        if self.start + len > self.mem.len() {
            *self = AlignedBuf::new(len);
        } else {
            self.len = len;
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_resizable() {
        let mut b = AlignedBuf::new(10_000);
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
    }
}
