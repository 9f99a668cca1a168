//! Comparing the guest contents of two images, as `qemu-img compare` does: only runs that
//! either side holds are read (block status of both whole chains), a shorter image reads
//! as zeros beyond its end, and a difference is reported at the start of the first
//! 512-byte sector that differs.

use crate::backing::BackingImage;
use crate::error::ImageError;
use crate::status::BlockStatus;

/// Bytes read per step (qemu-img's `IO_BUF_SIZE`).
const IO_BUF_SIZE: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Which of the two images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first image (FILENAME1).
    A,
    /// The second image (FILENAME2).
    B,
}

/// The options of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompareOptions {
    /// `-s`: sizes and block status must be equal too.
    pub strict: bool,
}

/// How two images compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOutcome {
    /// Same guest contents.
    Identical,
    /// The first sector that differs starts at `offset`.
    ContentMismatch {
        /// Guest offset of the differing sector.
        offset: u64,
    },
    /// Strict mode: the virtual sizes differ.
    StrictSizeMismatch,
    /// Strict mode: the block status of the two images differs at `offset`.
    StrictStatusMismatch {
        /// Guest offset where the status differs.
        offset: u64,
    },
}

/// Why a comparison could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The block status of an image could not be determined (qemu-img exit status 3).
    #[error("Sector allocation test failed for image {side:?}: {source}")]
    Status {
        /// The image.
        side: Side,
        /// The cause.
        #[source]
        source: ImageError,
    },
    /// Reading an image failed (qemu-img exit status 4).
    #[error("Error while reading offset {offset} of image {side:?}: {source}")]
    Read {
        /// The image.
        side: Side,
        /// Guest offset of the read.
        offset: u64,
        /// The cause.
        #[source]
        source: ImageError,
    },
}

impl CompareError {
    /// qemu-img's exit status for the error (3: block status, 4: read).
    pub fn exit_code(&self) -> u8 {
        match self {
            CompareError::Status { .. } => 3,
            CompareError::Read { .. } => 4,
        }
    }
}

/// The result of [`compare`]: the outcome or error, and whether qemu-img would have
/// printed "Warning: Image size mismatch!" before it (sizes differ and the common part
/// is identical).
#[derive(Debug)]
pub struct CompareReport {
    /// The sizes differ and the common part compared equal (the warning comes first).
    pub size_mismatch_warning: bool,
    /// What was found.
    pub result: Result<CompareOutcome, CompareError>,
}

/// QEMU's `compare_buffers`: the sector-granular offset of the first difference.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

/// QEMU's `find_nonzero`: the sector-granular offset of the first non-zero byte.
fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .position(|x| x.iter().any(|&v| v != 0))
        .map(|i| i * SECTOR)
}

fn status(
    side: Side,
    disk: &mut dyn BackingImage,
    offset: u64,
    len: u64,
) -> Result<BlockStatus, CompareError> {
    let st = disk
        .status_above(offset, len)
        .map_err(|source| CompareError::Status { side, source })?;
    // A status must make progress; a zero-length answer would loop forever.
    if st.length == 0 {
        return Err(CompareError::Status {
            side,
            source: ImageError::io(
                crate::Op::Map,
                "block status",
                offset,
                std::io::Error::from_raw_os_error(qcow2_io::errno::EIO),
            ),
        });
    }
    Ok(st)
}

fn read(
    side: Side,
    disk: &mut dyn BackingImage,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), CompareError> {
    disk.read(offset, buf).map_err(|source| CompareError::Read {
        side,
        offset,
        source,
    })
}

/// The flags strict mode compares (QEMU compares the whole status word, including
/// `BDRV_BLOCK_EOF`).
fn strict_flags(st: &BlockStatus) -> (bool, bool, bool, bool, bool) {
    (st.data, st.zero, st.allocated, st.offset_valid, st.eof)
}

/// Compares the guest contents of `a` and `b` as `qemu-img compare` does; `progress` is
/// told the bytes done out of the larger size (once with 0 at the start, then after each
/// step).
pub fn compare(
    a: &mut dyn BackingImage,
    b: &mut dyn BackingImage,
    opts: CompareOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> CompareReport {
    let mut warned = false;
    let result = compare_inner(a, b, opts, progress, &mut warned);
    CompareReport {
        size_mismatch_warning: warned,
        result,
    }
}

fn compare_inner(
    a: &mut dyn BackingImage,
    b: &mut dyn BackingImage,
    opts: CompareOptions,
    progress: &mut dyn FnMut(u64, u64),
    warned: &mut bool,
) -> Result<CompareOutcome, CompareError> {
    let (size_a, size_b) = (a.size(), b.size());
    let total = size_a.min(size_b);
    let base = size_a.max(size_b);
    progress(0, base);
    if opts.strict && size_a != size_b {
        return Ok(CompareOutcome::StrictSizeMismatch);
    }
    let mut buf_a = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf_b = vec![0u8; IO_BUF_SIZE as usize];
    let mut offset = 0u64;
    while offset < total {
        let sa = status(Side::A, a, offset, size_a - offset)?;
        let sb = status(Side::B, b, offset, size_b - offset)?;
        let mut chunk = sa.length.min(sb.length).min(total - offset);
        if opts.strict && strict_flags(&sa) != strict_flags(&sb) {
            return Ok(CompareOutcome::StrictStatusMismatch { offset });
        }
        if sa.zero && sb.zero {
            // Both read as zeros.
        } else if sa.allocated == sb.allocated {
            if sa.allocated {
                chunk = chunk.min(IO_BUF_SIZE);
                let n = chunk as usize;
                read(Side::A, a, offset, &mut buf_a[..n])?;
                read(Side::B, b, offset, &mut buf_b[..n])?;
                if let Some(i) = first_difference(&buf_a[..n], &buf_b[..n]) {
                    return Ok(CompareOutcome::ContentMismatch {
                        offset: offset + i as u64,
                    });
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let n = chunk as usize;
            let (side, disk): (Side, &mut dyn BackingImage) = if sa.allocated {
                (Side::A, &mut *a)
            } else {
                (Side::B, &mut *b)
            };
            read(side, disk, offset, &mut buf_a[..n])?;
            if let Some(i) = first_nonzero(&buf_a[..n]) {
                return Ok(CompareOutcome::ContentMismatch {
                    offset: offset + i as u64,
                });
            }
        }
        offset += chunk;
        progress(offset, base);
    }
    if size_a != size_b {
        *warned = true;
        let (side, over): (Side, &mut dyn BackingImage) = if size_a > size_b {
            (Side::A, a)
        } else {
            (Side::B, b)
        };
        while offset < base {
            let st = status(side, over, offset, base - offset)?;
            let mut chunk = st.length.min(base - offset);
            if st.allocated && !st.zero {
                chunk = chunk.min(IO_BUF_SIZE);
                let n = chunk as usize;
                read(side, over, offset, &mut buf_a[..n])?;
                if let Some(i) = first_nonzero(&buf_a[..n]) {
                    return Ok(CompareOutcome::ContentMismatch {
                        offset: offset + i as u64,
                    });
                }
            }
            offset += chunk;
            progress(offset, base);
        }
    }
    Ok(CompareOutcome::Identical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Image};
    use qcow2_io::MemStorage;
    use std::sync::Arc;

    fn image(size: u64) -> Image {
        Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(size)).unwrap()
    }

    fn run(a: &mut Image, b: &mut Image, strict: bool) -> CompareReport {
        compare(a, b, CompareOptions { strict }, &mut |_, _| {})
    }

    #[test]
    fn identical_and_mismatch() {
        let (mut a, mut b) = (image(4 << 20), image(4 << 20));
        assert!(matches!(
            run(&mut a, &mut b, false).result,
            Ok(CompareOutcome::Identical)
        ));
        b.write(3 << 20 | 700, &[1]).unwrap();
        assert!(matches!(
            run(&mut a, &mut b, false).result,
            Ok(CompareOutcome::ContentMismatch { offset }) if offset == 3 << 20 | 512
        ));
        a.write(3 << 20 | 700, &[1]).unwrap();
        assert!(matches!(
            run(&mut a, &mut b, false).result,
            Ok(CompareOutcome::Identical)
        ));
        // Zeros written as data equal unallocated space.
        a.write(1 << 20, &[0; 4096]).unwrap();
        assert!(matches!(
            run(&mut a, &mut b, false).result,
            Ok(CompareOutcome::Identical)
        ));
        assert!(matches!(
            run(&mut a, &mut b, true).result,
            Ok(CompareOutcome::StrictStatusMismatch { .. })
        ));
    }

    #[test]
    fn sizes_differ() {
        let (mut a, mut b) = (image(1 << 20), image(2 << 20));
        let r = run(&mut a, &mut b, false);
        assert!(r.size_mismatch_warning);
        assert!(matches!(r.result, Ok(CompareOutcome::Identical)));
        assert!(matches!(
            run(&mut a, &mut b, true).result,
            Ok(CompareOutcome::StrictSizeMismatch)
        ));
        b.write((1 << 20) + 5000, &[9]).unwrap();
        let r = run(&mut b, &mut a, false);
        assert!(r.size_mismatch_warning);
        assert!(matches!(
            r.result,
            Ok(CompareOutcome::ContentMismatch { offset }) if offset == (1 << 20) + 4608
        ));
    }

    #[test]
    fn read_errors_are_typed_with_qemu_img_exit_code() {
        use qcow2_io::fault::{FaultStorage, Rule};
        use qcow2_io::Event;
        let storage = Arc::new(FaultStorage::new(MemStorage::new()));
        let mut a = Image::create(storage.clone(), &CreateOptions::new(4 << 20)).unwrap();
        a.write(1 << 20, &[3; 4096]).unwrap();
        let mut b = image(4 << 20);
        storage.add_rule(Rule::on_event(Event::ReadAio, qcow2_io::errno::EIO));
        let r = run(&mut a, &mut b, false);
        match r.result {
            Err(
                e @ CompareError::Read {
                    side: Side::A,
                    offset,
                    ..
                },
            ) => {
                assert_eq!(offset, 1 << 20);
                assert_eq!(e.exit_code(), 4);
                if let CompareError::Read { source, .. } = &e {
                    assert_eq!(source.errno(), qcow2_io::errno::EIO);
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.size_mismatch_warning);
    }

    #[test]
    fn sector_offsets() {
        assert_eq!(first_difference(&[0; 1024], &[0; 1024]), None);
        let mut x = [0u8; 1500];
        x[1499] = 1;
        assert_eq!(first_nonzero(&x), Some(1024));
        assert_eq!(first_difference(&x, &[0; 1500]), Some(1024));
    }
}
