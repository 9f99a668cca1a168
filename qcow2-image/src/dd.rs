//! `qemu-img dd`: the output size and the copy loop, with qemu-img's arithmetic (`count`
//! limits the input from its start, before `skip` is taken off; a `skip` beyond the input
//! gives an empty output).

use crate::backing::BackingImage;
use crate::error::ImageError;

/// Bytes moved per read/write step at most (a large `bs` is copied in pieces of this
/// size, so memory stays bounded whatever the block size).
const MAX_STEP: u64 = 4 << 20;

/// The operands of `dd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdParams {
    /// `bs=`: block size in bytes (1..=i32::MAX in qemu-img).
    pub block_size: u64,
    /// `count=`: blocks to copy, if given.
    pub count: Option<u64>,
    /// `skip=`: input blocks to skip, if given.
    pub skip: Option<u64>,
}

/// What a `dd` run copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdPlan {
    /// First input byte copied.
    pub in_offset: u64,
    /// End of the copied input range.
    pub in_end: u64,
    /// Size of the output image.
    pub out_size: u64,
    /// `skip` lies beyond the input: qemu-img warns "cannot skip to specified offset" and
    /// writes an empty output.
    pub skip_beyond_end: bool,
}

impl DdParams {
    /// The copy of an input of `input_size` bytes, with qemu-img's arithmetic (sizes are
    /// at most `i64::MAX`, as in QEMU).
    pub fn plan(&self, input_size: u64) -> DdPlan {
        let bs = self.block_size.max(1);
        let max = i64::MAX as u64;
        let mut size = input_size.min(max);
        if let Some(count) = self.count {
            if count <= max / bs && count * bs < size {
                size = count * bs;
            }
        }
        match self.skip {
            Some(skip) if skip > max / bs || size < skip * bs => DdPlan {
                in_offset: size,
                in_end: size,
                out_size: 0,
                skip_beyond_end: true,
            },
            skip => {
                let start = skip.unwrap_or(0) * bs;
                DdPlan {
                    in_offset: start,
                    in_end: size,
                    out_size: size - start,
                    skip_beyond_end: false,
                }
            }
        }
    }
}

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum DdError<E: std::error::Error + 'static> {
    /// Reading the input failed.
    #[error("error while reading from input image file: {0}")]
    Read(#[source] ImageError),
    /// Writing the output failed.
    #[error("error while writing to output image file: {0}")]
    Write(#[source] E),
}

/// Where [`dd_copy`] writes: `(output offset, data)`.
pub type DdWrite<'a, E> = dyn FnMut(u64, &[u8]) -> Result<(), E> + 'a;

/// Copies `plan`'s input range from `input` to output offset 0 on, through `write(offset,
/// data)`, in blocks of `block_size` bytes (each moved in bounded pieces).
pub fn dd_copy<E: std::error::Error + 'static>(
    input: &mut dyn BackingImage,
    plan: &DdPlan,
    block_size: u64,
    write: &mut DdWrite<'_, E>,
) -> Result<(), DdError<E>> {
    let step = block_size.clamp(1, MAX_STEP);
    let mut buf = vec![0u8; step.min(plan.in_end - plan.in_offset) as usize];
    let mut pos = plan.in_offset;
    while pos < plan.in_end {
        let n = step.min(plan.in_end - pos) as usize;
        let chunk = &mut buf[..n];
        input.read(pos, chunk).map_err(DdError::Read)?;
        write(pos - plan.in_offset, chunk).map_err(DdError::Write)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bs: u64, count: Option<u64>, skip: Option<u64>) -> DdParams {
        DdParams {
            block_size: bs,
            count,
            skip,
        }
    }

    #[test]
    fn qemu_img_arithmetic() {
        // qemu-img 10: 300000-byte input, bs=4k count=10 skip=2 gives 32768 bytes.
        let x = p(4096, Some(10), Some(2)).plan(300_000);
        assert_eq!((x.in_offset, x.in_end, x.out_size), (8192, 40960, 32768));
        let x = p(1000, None, Some(3)).plan(300_000);
        assert_eq!(x.out_size, 297_000);
        let x = p(512, None, Some(1000)).plan(300_000);
        assert!(x.skip_beyond_end);
        assert_eq!(x.out_size, 0);
        let x = p(512, Some(u64::MAX), Some(u64::MAX)).plan(300_000);
        assert!(x.skip_beyond_end);
        let x = p(512, Some(0), None).plan(300_000);
        assert_eq!(x.out_size, 0);
    }

    #[test]
    fn copies_in_bounded_pieces() {
        use crate::{CreateOptions, Image};
        use std::sync::Arc;
        let mut img = Image::create(
            Arc::new(qcow2_io::MemStorage::new()),
            &CreateOptions::new(1 << 20),
        )
        .unwrap();
        img.write(5000, &[7; 3000]).unwrap();
        let plan = p(1 << 30, None, None).plan(1 << 20);
        let mut out = vec![0u8; 1 << 20];
        let mut calls = 0;
        dd_copy(&mut img, &plan, 1 << 30, &mut |off, data| {
            calls += 1;
            out[off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(&out[5000..8000], &[7; 3000][..]);
        assert_eq!(out[4999], 0);
    }
}
