//! External data files (incompatible feature bit 2): guest data lives in another file at
//! the guest offset itself, the image file keeps only metadata, and data clusters are not
//! refcounted (reference §1; QEMU's `data_file` / `data_file_raw`).

use std::io;
use std::sync::Arc;

use qcow2_io::{Event, FileStorage, Storage};

use crate::error::{ImageError, Result};
use crate::options::{BackingPolicy, OpenOptions};

/// The image file's storage for an image with an external data file: every request goes
/// to the image file, but a flush makes the data file durable first. Every barrier the
/// engine issues (cache dependency flushes included) then orders guest data before the L2
/// entries that reference it, as invariant 1 requires when the data is in another file.
pub(crate) struct FlushesDataFirst {
    pub(crate) meta: Arc<dyn Storage>,
    pub(crate) data: Arc<dyn Storage>,
}

impl Storage for FlushesDataFirst {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.meta.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.meta.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.data.flush()?;
        self.meta.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.meta.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.meta.set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.meta.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.meta.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.meta.allocate(offset, len)
    }
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.meta.zero_fast(offset, len)
    }
    fn event(&self, event: Event) {
        self.meta.event(event)
    }
    fn extent_at(&self, offset: u64) -> io::Result<Option<qcow2_io::FileExtent>> {
        self.meta.extent_at(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.meta.allocated_size()
    }
}

/// Opens the data file `name` (as stored in the image) the way `opts` allows: the
/// caller's storage, or the name (relative to the working directory, as QEMU) checked
/// against the allowed directories of [`BackingPolicy::Open`]. Names from the image are untrusted, so nothing else is opened.
pub(crate) fn open(name: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
    if let Some(d) = &opts.data_file {
        return Ok(d.0.clone());
    }
    let err = |reason: String| ImageError::DataFile {
        name: name.to_string(),
        reason,
    };
    // QEMU's "Could not open 'NAME': strerror".
    let could_not_open = |e: &io::Error| {
        let text = e.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text).to_string();
        err(format!("Could not open '{name}': {text}"))
    };
    match &opts.backing {
        BackingPolicy::Open { allowed_dirs, .. } => {
            // QEMU opens the data file by its name as stored: a relative name is relative
            // to the working directory (unlike a backing file name, which is relative to
            // the image), so images made by qemu-img are found where QEMU finds them.
            let plain = std::path::Path::new(name);
            if let Err(e) = std::fs::metadata(plain) {
                return Err(could_not_open(&e));
            }
            let cwd = std::path::Path::new(".");
            let path = crate::backing::resolve(name, cwd, allowed_dirs).map_err(|e| {
                err(match e {
                    ImageError::Backing { reason, .. } => {
                        format!("data file '{name}': {reason}")
                    }
                    other => other.to_string(),
                })
            })?;
            let storage =
                FileStorage::open(&path, !opts.read_only).map_err(|e| could_not_open(&e))?;
            Ok(Arc::new(storage))
        }
        _ => Err(err(format!(
            "data file '{name}': no data file storage was given and the open options follow \
             no file names"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, DataFileStorage, Image, ImageError};
    use qcow2_io::MemStorage;
    use std::sync::Mutex;

    /// A memory storage that records its flushes in a shared log.
    struct Recorded {
        inner: MemStorage,
        name: &'static str,
        log: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Storage for Recorded {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.log.lock().unwrap().push(self.name);
            self.inner.flush()
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn every_image_flush_makes_the_data_durable_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rec = |name| {
            Arc::new(Recorded {
                inner: MemStorage::new(),
                name,
                log: log.clone(),
            })
        };
        let (meta, data) = (rec("meta"), rec("data"));
        let mut o = CreateOptions::new(4 << 20);
        o.data_file = Some("d.raw".into());
        let open = OpenOptions {
            data_file: Some(DataFileStorage(data.clone())),
            ..OpenOptions::default()
        };
        let mut img = Image::create_with(meta.clone(), &o, &open).unwrap();
        assert_eq!(
            data.len().unwrap(),
            4 << 20,
            "the data file covers the disk"
        );
        img.write(65536, &[7u8; 8192]).unwrap();
        img.flush().unwrap();
        img.close().unwrap();
        let log = log.lock().unwrap().clone();
        assert!(log.contains(&"meta"));
        // The first flush writes the fresh layout, before the data file is attached.
        assert_eq!(log.first(), Some(&"meta"));
        for (i, name) in log.iter().enumerate().skip(1) {
            if *name == "meta" {
                assert!(i > 0 && log[i - 1] == "data", "flush order {log:?}");
            }
        }
        // The guest data is in the data file at the guest offset; the image file holds
        // only metadata.
        let mut buf = [0u8; 8192];
        data.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [7u8; 8192]);
        let mut all = vec![0u8; meta.len().unwrap() as usize];
        meta.read_at(&mut all, 0).unwrap();
        assert!(
            !all.windows(64).any(|w| w == [7u8; 64]),
            "data in the image file"
        );

        // Without a data file storage or a path policy, the open refuses the image.
        let e = Image::open(meta.clone(), &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(e, ImageError::DataFile { ref name, .. } if name == "d.raw"),
            "{e}"
        );
        // With it, the data reads back.
        let mut img = Image::open(meta, &open).unwrap();
        let mut back = [0u8; 8192];
        img.read(65536, &mut back).unwrap();
        assert_eq!(back, [7u8; 8192]);
        assert_eq!(img.data_file().as_deref(), Some("d.raw"));
    }
}
