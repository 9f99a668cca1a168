//! qcow2 images (through the qcow2-image facade) as a [`BlockDev`] for `io` and `bench`.

use qcow2_image::{BackingPolicy, Image, ImageError, OpenOptions};
use qcow2_io::{CacheMode, FileStorage};

use crate::info::format_specific_lines;
use crate::io::BlockDev;

/// `EPERM`, QEMU's answer to a write on a read-only node.
const EPERM: i32 = 1;

/// An opened qcow2 image.
pub struct QcowDev {
    image: Option<Image>,
    read_only: bool,
}

/// Opens `path` with the backing chain resolved next to it (as qemu-io and qemu-img do).
/// The error is the text qemu-img prints after "Could not open 'FILE': ".
pub fn open_image(path: &str, read_only: bool) -> Result<Image, String> {
    open_image_with(path, read_only, false)
}

/// [`open_image`]; `unmap` passes guest discards down to the files (QEMU's `BDRV_O_UNMAP`,
/// which qemu-io sets by default).
pub fn open_image_with(path: &str, read_only: bool, unmap: bool) -> Result<Image, String> {
    open_image_cached(path, read_only, unmap, CacheMode::Writeback)
}

/// [`open_image_with`] with one of QEMU's cache modes on the image file.
pub fn open_image_cached(
    path: &str,
    read_only: bool,
    unmap: bool,
    cache: CacheMode,
) -> Result<Image, String> {
    let storage = FileStorage::open_cached(path, !read_only, cache);
    let storage =
        storage.map_err(|e| format!("Could not open '{path}': {}", crate::image::strerror(&e)))?;
    let base_dir = std::path::Path::new(path)
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let opts = OpenOptions {
        read_only,
        force_share: crate::image::force_share(),
        backing: BackingPolicy::Open {
            base_dir,
            max_depth: 16,
            // qemu-img follows backing file names anywhere; so does this command-line tool
            // (the restriction is for services that open untrusted images).
            allowed_dirs: vec![std::path::PathBuf::from("/")],
        },
        pass_discard_request: unmap,
        ..OpenOptions::default()
    };
    let image =
        Image::open_file(storage, std::path::Path::new(path), &opts).map_err(|e| error_text(&e))?;
    for m in image.messages() {
        if m.starts_with("warning: ") {
            // QEMU's warnings carry the program prefix; printed once per command.
            crate::image::print_warning(m);
        } else {
            eprintln!("{m}");
        }
    }
    Ok(image)
}

/// The message of an image error without the engine's operation prefix where QEMU has none
/// (a lock conflict with qemu-img's hint line after it).
pub fn error_text(e: &ImageError) -> String {
    crate::image::image_error_text(e)
}

impl QcowDev {
    /// Opens `path`; errors are qemu-io's "can't open device" messages.
    pub fn open(path: &str, read_only: bool) -> Result<Self, String> {
        // qemu-io opens with BDRV_O_UNMAP.
        let image = open_image_with(path, read_only, true)
            .map_err(|e| format!("can't open device {path}: {e}"))?;
        Ok(QcowDev {
            image: Some(image),
            read_only,
        })
    }

    fn img(&mut self) -> Result<&mut Image, i32> {
        self.image.as_mut().ok_or(5)
    }

    fn writable(&mut self) -> Result<&mut Image, i32> {
        if self.read_only {
            return Err(EPERM);
        }
        self.img()
    }

    /// Flushes and closes the image, reporting the error text if that fails.
    pub fn close(&mut self) -> Result<(), String> {
        match self.image.take() {
            Some(img) => img.close().map_err(|e| error_text(&e)),
            None => Ok(()),
        }
    }
}

impl Drop for QcowDev {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn errno(e: ImageError) -> i32 {
    if e.is_corruption() {
        eprintln!("qcow2: {}", error_text(&e));
    }
    e.errno()
}

impl BlockDev for QcowDev {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn length(&mut self) -> Result<u64, i32> {
        Ok(self.img()?.virtual_size())
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.img()?.read(offset, buf).map_err(errno)
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        self.writable()?.write(offset, buf).map_err(errno)
    }
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        let img = self.writable()?;
        let cs = img.cluster_size() as usize;
        // qemu-io splits a compressed write into whole clusters.
        for (i, chunk) in buf.chunks(cs.max(1)).enumerate() {
            img.write_compressed(offset + (i * cs) as u64, chunk)
                .map_err(errno)?;
        }
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        self.writable()?
            .write_zeroes(offset, len, unmap)
            .map_err(errno)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.writable()?.discard(offset, len).map_err(errno)
    }
    fn flush(&mut self) -> Result<(), i32> {
        self.img()?.flush().map_err(errno)
    }
    fn truncate(&mut self, len: u64) -> Result<(), i32> {
        self.writable()?.resize(len).map_err(errno)
    }
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32> {
        let e = self.img()?.block_status(offset, len).map_err(errno)?;
        Ok((e.is_allocated(), e.length))
    }
    fn info(&mut self) -> (u64, u64) {
        match self.img() {
            Ok(img) => {
                let g = *img.geometry();
                let l1 = g.l1_entries_for(img.virtual_size());
                (g.cluster_size(), l1.saturating_mul(g.l2_coverage()))
            }
            Err(_) => (0, 0),
        }
    }
    fn specific_info(&mut self) -> Vec<String> {
        match self.img() {
            Ok(img) => format_specific_lines(img.header(), img.data_file().as_deref()),
            Err(_) => Vec::new(),
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}
