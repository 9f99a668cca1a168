//! Page-cache-bypassing (`O_DIRECT`) transfers: the kernel wants the offset, the length and
//! the memory address aligned, so a caller's unaligned buffer goes through an aligned bounce
//! buffer ([`IoBuf`]).

use crate::file::DIRECT_ALIGN;
use crate::IoBuf;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

fn aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize) % DIRECT_ALIGN == 0
}

/// Reads `buf.len()` bytes at `offset` (both aligned); what lies beyond the end of the file
/// reads as zeros, as the buffered path.
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if aligned(buf) {
        return read_aligned(file, buf, offset);
    }
    let mut b = IoBuf::new(buf.len());
    read_aligned(file, &mut b, offset)?;
    buf.copy_from_slice(&b);
    Ok(())
}

fn read_aligned(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        match file.read_at(&mut buf[done..], at) {
            Ok(n) if n > 0 && n % DIRECT_ALIGN == 0 => done += n,
            // A direct read of a regular file comes back short only at the end of the file
            // (possibly mid-block): the rest reads as zeros.
            Ok(n) => {
                buf[done + n..].fill(0);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `buf` at `offset` (both aligned).
pub(crate) fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    if aligned(buf) {
        return file.write_all_at(buf, offset);
    }
    file.write_all_at(&IoBuf::from_slice(buf), offset)
}

#[cfg(test)]
mod tests {
    use crate::{FileStorage, Storage};

    #[test]
    fn direct_and_buffered_requests_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 3 * 4096 + 100]).unwrap();
        let s = match FileStorage::open_direct(&p, true) {
            Ok(s) => s,
            // A file system without O_DIRECT (old tmpfs): nothing to test here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        assert!(s.is_direct());
        // Unaligned memory, aligned offset and length: through the bounce buffer.
        let mut src = vec![0u8; 8192 + 1];
        src[1..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        s.write_at(&src[1..], 4096).unwrap();
        // A buffered (unaligned) write next to it, then direct reads of both.
        s.write_at(&[7u8; 10], 100).unwrap();
        let mut back = vec![0u8; 4096 * 3 + 1];
        s.read_at(&mut back[1..], 0).unwrap();
        assert_eq!(&back[101..111], &[7u8; 10]);
        assert_eq!(&back[1 + 4096..], &src[1..]);
        // A direct read past the end of the file: the tail reads as zeros.
        let mut tail = vec![0xffu8; 8192];
        s.read_at(&mut tail, 3 * 4096).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
        // What the buffered descriptor reads equals what went through the direct one.
        let plain = FileStorage::open(&p, false).unwrap();
        let mut again = vec![0u8; 8192];
        plain.read_at(&mut again, 4096).unwrap();
        assert_eq!(again, src[1..]);
    }
}
