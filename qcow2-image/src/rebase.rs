//! `qemu-img rebase`: giving an overlay another backing file.
//!
//! Safe mode (QEMU's `img_rebase` without `-u`) keeps the overlay's guest contents: every
//! range the overlay does not allocate itself reads through the backing chain, so where
//! the old chain and the new backing file read differently, the old data is first copied
//! into the overlay (compared in steps of the overlay's subcluster size, or its cluster
//! size when `-c` compresses the copies; ranges beyond the end of the old backing file,
//! which read as zeros, become zero writes). Only then is the header switched to the new
//! backing file name and format. Header-only mode (`-u`) does the switch alone.
//!
//! Crash safety: until the header switch, the overlay reads as before at every instant (a
//! copy only allocates clusters with the bytes the old chain shows there, through the
//! normal write path, invariants 1 and 3); the copies are flushed before the header is
//! rewritten, so a crash after the switch cannot expose a range whose copy was lost.

use crate::backing::{BackingImage, Held};
use crate::error::{ImageError, Op, Result};
use crate::image::MapKind;
use crate::Image;
use qcow2_io::errno::EINVAL;

/// Bytes handled per step (qemu-img's `IO_BUF_SIZE`).
const IO_BUF_SIZE: u64 = 2 << 20;

/// `ENOSPC`: "No space left on device".
const ENOSPC: i32 = 28;

/// The longest backing file name QEMU's qcow2 driver accepts when changing it.
const MAX_BACKING_NAME: usize = 1023;

/// What `qemu-img rebase` is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebaseOptions {
    /// `-b`: the new backing file name as it is to be stored (`None` or empty: no backing
    /// file, the overlay becomes standalone).
    pub backing_file: Option<String>,
    /// `-F`: the new backing file's format, recorded in the backing-format extension.
    pub backing_format: Option<String>,
    /// `-u`: only rewrite the header; nothing is compared or copied.
    pub header_only: bool,
    /// `-c`: data copied into the overlay is written compressed.
    pub compress: bool,
}

impl RebaseOptions {
    fn new_name(&self) -> Option<&str> {
        self.backing_file.as_deref().filter(|n| !n.is_empty())
    }
}

/// Where a rebase failed, with qemu-img's message for each step.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// The overlay's own allocation could not be read.
    #[error("error while reading image metadata: {}", crate::image::strerror(.0.errno()))]
    Metadata(#[source] ImageError),
    /// Reading the old backing chain failed.
    #[error("error while reading from old backing file")]
    ReadOld(#[source] ImageError),
    /// Reading the new backing file failed.
    #[error("error while reading from new backing file")]
    ReadNew(#[source] ImageError),
    /// Copying into the overlay failed.
    #[error("Error while writing to COW image: {}", crate::image::strerror(.0.errno()))]
    Write(#[source] ImageError),
    /// The header could not be switched (`errno` as QEMU's `bdrv_change_backing_file`).
    #[error("{}", change_message(.name, *.errno, *.missing_format))]
    ChangeBacking {
        /// The new name (empty when the backing file was to be removed).
        name: String,
        /// QEMU's errno for the failure.
        errno: i32,
        /// The refusal was for a name without a format.
        missing_format: bool,
        /// The underlying error, if there was one.
        #[source]
        source: Option<ImageError>,
    },
}

fn change_message(name: &str, errno: i32, missing_format: bool) -> String {
    if errno == ENOSPC {
        format!("Could not change the backing file to '{name}': No space left in the file header")
    } else if missing_format {
        format!("Could not change the backing file to '{name}': backing format must be specified")
    } else {
        format!(
            "Could not change the backing file to '{name}': {}",
            crate::image::strerror(errno)
        )
    }
}

/// QEMU's `compare_buffers`: whether the first `chunk` bytes of `a` and `b` differ, and
/// how far (in whole chunks) that answer holds.
fn compare_run(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let chunk = chunk.max(1);
    let first = chunk.min(a.len());
    let differs = a[..first] != b[..first];
    let mut i = first;
    while i < a.len() {
        let end = (i + chunk).min(a.len());
        if (a[i..end] != b[i..end]) != differs {
            break;
        }
        i = end;
    }
    (differs, i)
}

impl Image {
    /// Changes the backing file recorded in the header (QEMU's
    /// `qcow2_change_backing_file`): `name` `None` removes it (and the format); a name
    /// requires a format when `require_format`, as qemu-img's rebase requires one. Caches
    /// are flushed first, so that data written before is durable before the header names
    /// another backing file; the header is then rewritten as QEMU writes it.
    pub fn change_backing_file(
        &mut self,
        name: Option<&str>,
        format: Option<&str>,
        require_format: bool,
    ) -> Result<(), RebaseError> {
        let fail = |errno: i32, missing_format: bool, source: Option<ImageError>| {
            RebaseError::ChangeBacking {
                name: name.unwrap_or("").to_string(),
                errno,
                missing_format,
                source,
            }
        };
        if format.is_some() && name.is_none() {
            return Err(fail(EINVAL, false, None));
        }
        if require_format && name.is_some() && format.is_none() {
            return Err(fail(EINVAL, true, None));
        }
        if name.is_some() && self.data_file_raw {
            return Err(fail(EINVAL, false, None));
        }
        if name.is_some_and(|n| n.len() > MAX_BACKING_NAME) {
            return Err(fail(EINVAL, false, None));
        }
        let op = Op::Rebase;
        self.check_writable(op)
            .map_err(|e| fail(e.errno(), false, Some(e)))?;
        self.flush_caches(op, true)
            .map_err(|e| fail(e.errno(), false, Some(e)))?;
        let old = (
            self.fc.backing_file.clone(),
            self.fc.extensions.backing_format.clone(),
        );
        self.fc.backing_file = name.map(|n| n.as_bytes().to_vec());
        self.fc.extensions.backing_format = name.and(format).map(|f| f.as_bytes().to_vec());
        if let Err(e) = self.rewrite_header(op) {
            let errno = match &e {
                ImageError::InvalidArgument { .. } => ENOSPC,
                other => other.errno(),
            };
            (self.fc.backing_file, self.fc.extensions.backing_format) = old;
            return Err(fail(errno, false, Some(e)));
        }
        Ok(())
    }

    /// `qemu-img rebase`: see the module documentation. `new_backing` is the new backing
    /// image opened read-only (`None` with an empty name, or in header-only mode).
    /// `new_in_chain` is its depth in the current chain (1: the current backing file) when
    /// the new backing file is one of the images below: ranges that no image above it
    /// allocates then read the same through both and are not compared. `progress` is
    /// told qemu-img's progress increments (percent) for each step that compared data.
    pub fn rebase(
        &mut self,
        new_backing: Option<&mut dyn BackingImage>,
        new_in_chain: Option<u32>,
        opts: &RebaseOptions,
        progress: &mut dyn FnMut(f32),
    ) -> Result<(), RebaseError> {
        if !opts.header_only {
            self.copy_differences(new_backing, new_in_chain, opts, progress)?;
        }
        match opts.new_name() {
            Some(name) => {
                self.change_backing_file(Some(name), opts.backing_format.as_deref(), true)?
            }
            None => self.change_backing_file(None, None, false)?,
        }
        // Reads from now on go through the new chain.
        if opts.header_only || opts.new_name().is_none() {
            self.backing = None;
        }
        Ok(())
    }

    fn copy_differences(
        &mut self,
        mut new_backing: Option<&mut dyn BackingImage>,
        new_in_chain: Option<u32>,
        opts: &RebaseOptions,
        progress: &mut dyn FnMut(f32),
    ) -> Result<(), RebaseError> {
        let size = self.virtual_size();
        let align = if opts.compress {
            self.geo.cluster_size()
        } else {
            self.geo.subcluster_size()
        };
        let old_size = self.backing.as_ref().map_or(0, |b| b.size());
        let new_size = new_backing.as_ref().map_or(0, |b| b.size());
        // A step grows by at most one alignment unit at each end.
        let cap = (IO_BUF_SIZE + 2 * align) as usize;
        // Page-aligned: the kernel copies from the page cache fastest into those.
        let mut buf_old = qcow2_io::IoBuf::new(cap);
        let mut buf_new = qcow2_io::IoBuf::new(cap);
        // qemu-img's step: 100 divided by the (integer) number of buffer-sized steps.
        let step = if size == 0 {
            0.0
        } else {
            100.0 / (size / size.min(IO_BUF_SIZE)) as f32
        };
        let mut offset = 0u64;
        while offset < size {
            let mut n = IO_BUF_SIZE.min(size - offset);
            // Ranges the overlay allocates read the same whatever lies below.
            let chunk = self
                .lookup(Op::Map, offset, n)
                .map_err(RebaseError::Metadata)?;
            n = chunk.len.clamp(1, n);
            if !matches!(chunk.kind, MapKind::Unallocated(_)) {
                offset += n;
                continue;
            }
            if let (Some(depth), Some(old)) = (new_in_chain, self.backing.as_mut()) {
                let want = n;
                let (held, m) = old
                    .held_above(offset, n, depth.saturating_sub(1))
                    .map_err(RebaseError::Metadata)?;
                if m > 0 && held == Held::No {
                    offset += m;
                    continue;
                }
                // Beyond the old backing file (m == 0) the whole range is compared: it
                // read as zeros and must keep doing so.
                n = if m == 0 { want } else { m };
            }
            // Whole (sub)clusters, so that no copy needs copy-on-write in the overlay.
            let mut align = align;
            let mut compress = opts.compress;
            let mut start = offset - offset % align;
            let mut end = (offset + n).next_multiple_of(align).min(size);
            if compress
                && self
                    .allocates_any(start, end)
                    .map_err(RebaseError::Metadata)?
            {
                // A whole cluster would cover subclusters the overlay allocates (extended
                // L2): copying them from the old chain would overwrite the overlay's own
                // data (qemu-img aborts on an assertion here). Copy this step by
                // subclusters, uncompressed.
                align = self.geo.subcluster_size();
                compress = false;
                start = offset - offset % align;
                end = (offset + n).next_multiple_of(align).min(size);
            }
            offset = start;
            n = end - start;
            let len = n as usize;
            let n_old = n.min(old_size.saturating_sub(offset)) as usize;
            let n_new = n.min(new_size.saturating_sub(offset)) as usize;
            buf_old[n_old..len].fill(0);
            let mut old_eof = n_old == 0;
            if n_old > 0 {
                crate::backing::read_backing(&mut self.backing, offset, &mut buf_old[..n_old])
                    .map_err(RebaseError::ReadOld)?;
            }
            buf_new[n_new..len].fill(0);
            if n_new > 0 {
                if let Some(b) = new_backing.as_deref_mut() {
                    b.read(offset, &mut buf_new[..n_new])
                        .map_err(RebaseError::ReadNew)?;
                }
            }
            let mut done = 0usize;
            while done < len {
                let (differs, run) =
                    compare_run(&buf_old[done..len], &buf_new[done..len], align as usize);
                if differs {
                    let at = offset + done as u64;
                    if old_eof {
                        self.write_zeroes(at, run as u64, false)
                    } else {
                        self.write_copy(at, &buf_old[done..done + run], compress)
                    }
                    .map_err(RebaseError::Write)?;
                }
                done += run;
                if offset + done as u64 >= old_size {
                    old_eof = true;
                }
            }
            progress(step);
            offset += n;
        }
        Ok(())
    }

    /// Whether the overlay itself allocates anything in `[start, end)`.
    fn allocates_any(&mut self, start: u64, end: u64) -> Result<bool> {
        let mut at = start;
        while at < end {
            let c = self.lookup(Op::Map, at, end - at)?;
            if !matches!(c.kind, MapKind::Unallocated(_)) {
                return Ok(true);
            }
            at += c.len.max(1);
        }
        Ok(false)
    }

    /// Writes `data` at `offset`, compressed cluster by cluster when asked.
    fn write_copy(&mut self, offset: u64, data: &[u8], compress: bool) -> Result<()> {
        if !compress {
            return self.write(offset, data);
        }
        let cs = self.geo.cluster_size() as usize;
        for (i, c) in data.chunks(cs).enumerate() {
            self.write_compressed(offset + (i * cs) as u64, c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;
    use qcow2_io::MemStorage;
    use std::sync::Arc;

    fn image(size: u64) -> Image {
        let mut o = CreateOptions::new(size);
        o.cluster_size = 4096;
        Image::create(Arc::new(MemStorage::new()), &o).unwrap()
    }

    fn contents(img: &mut Image) -> Vec<u8> {
        let mut v = vec![0u8; img.virtual_size() as usize];
        img.read(0, &mut v).unwrap();
        v
    }

    #[test]
    fn compare_run_counts_whole_chunks() {
        let a = [0u8; 4096 * 3];
        let mut b = a;
        b[5000] = 1;
        assert_eq!(compare_run(&a, &b, 4096), (false, 4096));
        assert_eq!(compare_run(&a[4096..], &b[4096..], 4096), (true, 4096));
        assert_eq!(compare_run(&a[..100], &b[..100], 4096), (false, 100));
    }

    #[test]
    fn safe_rebase_keeps_contents_and_copies_only_differences() {
        let mut old = image(1 << 20);
        old.write(0, &[1; 8192]).unwrap();
        old.write(65536, &[2; 4096]).unwrap();
        let mut new = image(1 << 20);
        new.write(0, &[1; 4096]).unwrap();
        new.write(200_000, &[3; 10]).unwrap();
        let mut top = image(1 << 20);
        top.write(65536, &[9; 4096]).unwrap();
        top.backing = Some(Box::new(old));
        let before = contents(&mut top);
        top.rebase(
            Some(&mut new),
            None,
            &RebaseOptions {
                backing_file: Some("new.qcow2".into()),
                backing_format: Some("qcow2".into()),
                ..RebaseOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(top.backing_file().as_deref(), Some("new.qcow2"));
        top.backing = Some(Box::new(new));
        assert_eq!(contents(&mut top), before);
        // Copied: the second cluster of old's data and new's cluster at 200000 (now
        // zeros), nothing else.
        let allocated: Vec<_> = top
            .map_metadata(0, 1 << 20)
            .unwrap()
            .into_iter()
            .filter(|e| e.is_allocated())
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(allocated, vec![(4096, 4096), (65536, 4096), (196608, 4096)]);
    }

    #[test]
    fn a_name_without_format_is_refused_after_copying() {
        let mut top = image(1 << 20);
        let err = top
            .change_backing_file(Some("b.qcow2"), None, true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not change the backing file to 'b.qcow2': backing format must be specified"
        );
        assert_eq!(top.backing_file(), None);
        let long = "x".repeat(2000);
        assert!(top
            .change_backing_file(Some(&long), Some("raw"), true)
            .is_err());
        top.change_backing_file(Some("b.raw"), Some("raw"), true)
            .unwrap();
        assert_eq!(top.backing_file().as_deref(), Some("b.raw"));
        top.change_backing_file(None, None, false).unwrap();
        assert_eq!(top.backing_file(), None);
    }

    #[test]
    fn flatten_beyond_a_short_backing_writes_zeros() {
        // The old backing file is shorter than the overlay; the new one has data there.
        let mut old = image(64 << 10);
        old.write(0, &[4; 4096]).unwrap();
        let mut new = image(1 << 20);
        new.write(512 << 10, &[5; 4096]).unwrap();
        let mut top = image(1 << 20);
        top.backing = Some(Box::new(old));
        let before = contents(&mut top);
        top.rebase(
            Some(&mut new),
            None,
            &RebaseOptions {
                backing_file: Some("n".into()),
                backing_format: Some("qcow2".into()),
                ..RebaseOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
        top.backing = Some(Box::new(new));
        assert_eq!(contents(&mut top), before);
        let e = top.map_metadata(512 << 10, 4096).unwrap();
        assert_eq!(e[0].kind, crate::ExtentKind::Zero);
    }
}
