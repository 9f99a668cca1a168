//! File preparation and the physical floor: sparse copies, syncs, compressible data, and the
//! plain-file write and read that the image workloads are compared against.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Request size of the floor's plain-file I/O.
const FLOOR_CHUNK: usize = 1 << 20;

/// Copies `src` to `dst` keeping holes (`cp --sparse=always`, else a plain copy), then makes
/// the copy durable so that no later flush inside a timed region pays for it.
pub fn fresh_copy(src: &Path, dst: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(dst);
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(cp, Ok(s) if s.success()) {
        std::fs::copy(src, dst)
            .map_err(|e| format!("copy {} -> {}: {e}", src.display(), dst.display()))?;
    }
    fsync_path(dst)
}

/// fsync of one file.
pub fn fsync_path(p: &Path) -> Result<(), String> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", p.display()))
}

/// Writes back the whole filesystem holding `dir` (`sync -f`, else `sync`), so that one run's
/// dirty pages are not written back during the next run.
pub fn sync_fs(dir: &Path) {
    let ok = Command::new("sync")
        .arg("-f")
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("sync").status();
    }
}

/// Drops `p`'s pages from the page cache (`dd iflag=nocache count=0`, i.e.
/// posix_fadvise DONTNEED on the whole file); clean pages only, so sync first.
pub fn evict_from_page_cache(p: &Path) -> Result<(), String> {
    let mut arg = std::ffi::OsString::from("if=");
    arg.push(p);
    let ok = Command::new("dd")
        .arg(arg)
        .args(["iflag=nocache", "count=0", "status=none"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "could not drop {} from the page cache (dd iflag=nocache)",
            p.display()
        ))
    }
}

/// Whether files in `dir` can be opened with O_DIRECT (cache mode `none`) (older tmpfs cannot).
pub fn supports_o_direct(dir: &Path) -> bool {
    let p = dir.join(".o_direct_probe");
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)?;
        let buf = vec![0u8; 8192];
        let off = align_offset(&buf, 4096);
        f.write_all(&buf[off..off + 4096])?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&p);
    result.is_ok()
}

/// Offset into `buf` at which its memory is aligned to `align` bytes.
fn align_offset(buf: &[u8], align: usize) -> usize {
    let addr = buf.as_ptr() as usize;
    (align - addr % align) % align
}

/// Writes `size` bytes of compressible, text-like data (words from a small vocabulary, with
/// numbers) to `path`: zlib gets roughly 3-4x on it, and no block is all zeros.
pub fn write_compressible(path: &Path, size: u64) -> Result<(), String> {
    const WORDS: [&str; 48] = [
        "the",
        "cluster",
        "refcount",
        "table",
        "image",
        "snapshot",
        "write",
        "read",
        "guest",
        "host",
        "offset",
        "allocation",
        "metadata",
        "cache",
        "flush",
        "of",
        "and",
        "to",
        "a",
        "block",
        "disk",
        "qemu",
        "data",
        "zero",
        "compressed",
        "header",
        "entry",
        "l1",
        "l2",
        "virtual",
        "machine",
        "kernel",
        "file",
        "system",
        "page",
        "buffer",
        "request",
        "queue",
        "sector",
        "backing",
        "chain",
        "commit",
        "layer",
        "index",
        "bitmap",
        "format",
        "is",
        "in",
    ];
    let file = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut line = Vec::with_capacity(256);
    let mut written = 0u64;
    while written < size {
        line.clear();
        let r = next();
        line.extend_from_slice(format!("{:08} ", r % 100_000_000).as_bytes());
        for i in 0..(6 + (r >> 40) % 10) {
            let word = WORDS[(next() % WORDS.len() as u64) as usize];
            line.extend_from_slice(word.as_bytes());
            line.push(if i % 7 == 6 { b',' } else { b' ' });
        }
        line.push(b'\n');
        let take = usize::try_from((size - written).min(line.len() as u64)).unwrap_or(0);
        w.write_all(&line[..take])
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        written += take as u64;
    }
    let f = w
        .into_inner()
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

/// Writes `size` bytes of the byte `pattern` to a new file at `path` with buffered writes,
/// without any sync.
pub fn write_pattern(path: &Path, size: u64, pattern: u8) -> Result<(), String> {
    let mut f = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let chunk = vec![pattern; FLOOR_CHUNK];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(FLOOR_CHUNK as u64)).unwrap_or(FLOOR_CHUNK);
        f.write_all(&chunk[..n])
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// The write floor: `size` bytes written to a new plain file with buffered 1 MiB writes, then
/// fdatasync. Returns the seconds from create to the end of the fdatasync.
pub fn floor_write(path: &Path, size: u64) -> Result<f64, String> {
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    write_pattern(path, size, 0xa5)?;
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
    Ok(start.elapsed().as_secs_f64())
}

/// The read floor: the whole of `path` read sequentially with buffered 1 MiB requests from a
/// cold page cache (the file's pages are dropped first, outside the timing), so that the
/// kernel's readahead makes it as fast as the disk allows. Returns the seconds of the read.
pub fn floor_read(path: &Path) -> Result<f64, String> {
    evict_from_page_cache(path)?;
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; FLOOR_CHUNK];
    let start = Instant::now();
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}
