//! Reading the snapshot table as the checker does (QEMU's `qcow2_do_read_snapshots` in
//! repair or strict mode) and rewriting it (`qcow2_write_snapshots`).

use std::io;

use qcow2_cache::{CacheId, CacheOptions, Caches};
use qcow2_format::limits::{MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA};
use qcow2_format::snapshot::{RawSnapshotHeader, ICOUNT_DISABLED};
use qcow2_format::{SnapshotEntry, SnapshotTable};
use qcow2_io::Storage;
use qcow2_refcount::{DiscardType, RefcountEngine};
use zerocopy::FromBytes;

use crate::engine::Run;
use crate::finding::{errno_of, strerror, Finding, EFBIG, EIO};
use crate::image::{Snapshot, SNAPSHOT_POINTER_OFFSET};
use crate::io::{pread, pwrite, pwrite_sync};

/// Size of QEMU's known extra data (`QCowSnapshotExtraData`).
const KNOWN_EXTRA: u64 = 24;

/// Sequential reads through a window, so that a table of many small entries costs a few
/// large reads.
struct Reader<'a> {
    storage: &'a dyn Storage,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> Reader<'a> {
    const WINDOW: usize = 256 << 10;

    fn new(storage: &'a dyn Storage) -> Self {
        Reader {
            storage,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Reads `len` bytes at `offset` (QEMU's limits apply; zeros past EOF).
    fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.checked_add(len as u64);
        let within =
            offset >= self.start && end.is_some_and(|e| e <= self.start + self.buf.len() as u64);
        if !within {
            let want = len.max(Self::WINDOW);
            let mut b = vec![0u8; want];
            // A window reaching past the limit is retried at the exact size, so that only
            // a request that really fails reports the error.
            if pread(self.storage, &mut b, offset).is_err() {
                b.truncate(len);
                pread(self.storage, &mut b, offset)?;
            }
            self.start = offset;
            self.buf = b;
        }
        let s = (offset - self.start) as usize;
        Ok(self.buf[s..s + len].to_vec())
    }
}

/// A C string view of raw bytes (up to the first NUL), as QEMU prints ids and names.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

type ReadError = (String, Option<String>, i32);

fn read_failed(e: &io::Error) -> ReadError {
    (
        format!("Failed to read snapshot table: {}", strerror(e)),
        None,
        errno_of(e),
    )
}

/// `qcow2_do_read_snapshots` with repair = `-r all`. Returns the snapshots kept and the
/// table's size in bytes (`snapshots_size`); counts dropped snapshots in `reduced` and
/// truncated extra data in `dropped`.
pub(crate) fn read_snapshots(
    run: &mut Run<'_, '_>,
    nb: u32,
    reduced: &mut u64,
    dropped: &mut u64,
) -> Result<(Vec<Snapshot>, u64), ReadError> {
    if nb == 0 {
        return Ok((Vec::new(), 0));
    }
    let repair = run.fix().errors;
    let base = run.image().snapshots_offset;
    let virtual_size = run.image().virtual_size;
    let storage = run.image().storage.clone();
    let mut reader = Reader::new(&*storage);
    let mut list: Vec<Snapshot> = Vec::new();
    let mut offset = base;
    let mut table_length = 0u64;
    for i in 0..nb {
        let pre = offset;
        table_length = table_length.div_ceil(8) * 8;
        offset = offset.div_ceil(8).saturating_mul(8);
        let hb = reader.read(offset, 40).map_err(|e| read_failed(&e))?;
        let Ok(h) = RawSnapshotHeader::read_from_bytes(&hb) else {
            return Err(("Failed to read snapshot table".into(), None, EIO));
        };
        offset += 40;
        let mut extra_data_size = h.extra_data_size.get();
        let id_size = u64::from(h.id_str_size.get());
        let name_size = u64::from(h.name_size.get());
        let mut truncate = false;
        if u64::from(extra_data_size) > MAX_SNAPSHOT_EXTRA_DATA {
            if !repair {
                return Err((
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    Some(
                        "You can force-remove this extra metadata with qemu-img check -r all"
                            .into(),
                    ),
                    EFBIG,
                ));
            }
            run.report(Finding::DiscardingExtraData {
                index: i,
                extra_data_size,
            });
            *dropped += 1;
            truncate = true;
        }
        let known = u64::from(extra_data_size).min(KNOWN_EXTRA) as usize;
        let extra = reader.read(offset, known).map_err(|e| read_failed(&e))?;
        offset += known as u64;
        let field = |at: usize| -> Option<u64> {
            let b: [u8; 8] = extra.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        };
        let vm_state_size = field(0).unwrap_or(u64::from(h.vm_state_size.get()));
        let disk_size = field(8).unwrap_or(virtual_size);
        let icount = field(16).unwrap_or(ICOUNT_DISABLED);
        let mut unknown = Vec::new();
        if u64::from(extra_data_size) > KNOWN_EXTRA {
            let extra_end = offset + (u64::from(extra_data_size) - KNOWN_EXTRA);
            if truncate {
                extra_data_size = MAX_SNAPSHOT_EXTRA_DATA as u32;
            }
            let n = (u64::from(extra_data_size) - KNOWN_EXTRA) as usize;
            unknown = reader.read(offset, n).map_err(|e| read_failed(&e))?;
            offset = extra_end;
        }
        let id = reader
            .read(offset, id_size as usize)
            .map_err(|e| read_failed(&e))?;
        offset += id_size;
        let name = reader
            .read(offset, name_size as usize)
            .map_err(|e| read_failed(&e))?;
        offset += name_size;
        table_length += 40 + u64::from(extra_data_size) + id_size + name_size;
        if table_length > MAX_SNAPSHOTS_SIZE || offset - base > i32::MAX as u64 {
            let overhanging = u64::from(nb - i);
            if !repair {
                return Err((
                    "Snapshot table is too big".into(),
                    Some(format!(
                        "You can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
                    )),
                    EFBIG,
                ));
            }
            run.report(Finding::DiscardingTooBigSnapshots { count: overhanging });
            *reduced += overhanging;
            offset = pre;
            break;
        }
        let id_str = c_string(&id);
        let name_str = c_string(&name);
        let entry = SnapshotEntry {
            l1_table_offset: h.l1_table_offset.get(),
            l1_size: h.l1_size.get(),
            // QEMU keeps C strings: what follows a NUL is lost on rewrite.
            id: id.split(|&c| c == 0).next().unwrap_or(&[]).to_vec(),
            name: name.split(|&c| c == 0).next().unwrap_or(&[]).to_vec(),
            date_sec: h.date_sec.get(),
            date_nsec: h.date_nsec.get(),
            vm_clock_nsec: h.vm_clock_nsec.get(),
            vm_state_size,
            disk_size,
            icount,
            extra_data_size,
            unknown_extra_data: unknown,
        };
        list.push(Snapshot {
            entry,
            id: id_str,
            name: name_str,
        });
    }
    Ok((list, offset - base))
}

/// `qcow2_write_snapshots`: writes the snapshot list as a new table at the first free
/// clusters, switches the header to it, then frees the old table. Returns an errno.
pub(crate) fn write_snapshots(run: &mut Run<'_, '_>) -> Result<(), i32> {
    let table = SnapshotTable {
        entries: run
            .image()
            .snapshots
            .iter()
            .map(|s| s.entry.clone())
            .collect(),
    };
    let bytes = table.to_bytes().map_err(|_| EFBIG)?;
    let size = bytes.len() as u64;
    // The allocation below reads refcounts through QEMU's cache; ours is on disk.
    run.flush_pending()?;
    let img = run.image();
    let storage = img.storage.clone();
    let cs = img.cs;
    let mut engine = RefcountEngine::open(
        img.geo,
        img.reftable_offset,
        (img.reftable.len() as u64 * 8 / cs) as u32,
        &*storage,
    )
    .map_err(|e| e.errno())?;
    engine.set_quarantine(false);
    let opts = CacheOptions::new(cs as usize, 4);
    let mut caches =
        Caches::new(storage.clone(), CacheOptions::new(cs as usize, 2), opts).map_err(|_| EIO)?;
    // A table of no snapshots has no clusters: QEMU's allocator hands out offset 0 for it
    // (its free-cluster index is still 0 during a check).
    let new_offset = if size == 0 {
        0
    } else {
        let count = size.div_ceil(cs);
        let off = engine
            .alloc_clusters(&mut caches, count)
            .map_err(|e| e.errno())?;
        caches.flush(CacheId::Refblock).map_err(|_| EIO)?;
        off
    };
    let fail = |engine: &mut RefcountEngine, caches: &mut Caches, errno: i32| -> i32 {
        if new_offset > 0 {
            let _ = engine.free_clusters(caches, new_offset, size, DiscardType::Always);
            let _ = caches.flush(CacheId::Refblock);
        }
        errno
    };
    if let Err(e) = storage.flush() {
        return Err(fail(&mut engine, &mut caches, errno_of(&e)));
    }
    if let Some(ol) = run.image().overlap(&[], new_offset, size) {
        run.signal(format!(
            "Preventing invalid write on metadata (overlaps with {})",
            ol.name()
        ));
        return Err(fail(&mut engine, &mut caches, EIO));
    }
    if size > 0 {
        if let Err(e) = pwrite(&*storage, &bytes, new_offset) {
            return Err(fail(&mut engine, &mut caches, errno_of(&e)));
        }
    }
    if let Err(e) = storage.flush() {
        return Err(fail(&mut engine, &mut caches, errno_of(&e)));
    }
    let mut ptr = [0u8; 12];
    ptr[..4].copy_from_slice(&(table.entries.len() as u32).to_be_bytes());
    ptr[4..].copy_from_slice(&new_offset.to_be_bytes());
    if let Err(e) = pwrite_sync(&*storage, &ptr, SNAPSHOT_POINTER_OFFSET) {
        return Err(fail(&mut engine, &mut caches, errno_of(&e)));
    }
    let (old_offset, old_size) = (run.image().snapshots_offset, run.image().snapshots_size);
    if old_size > 0 {
        let r = engine
            .free_clusters(&mut caches, old_offset, old_size, DiscardType::Snapshot)
            .and_then(|()| caches.flush(CacheId::Refblock).map_err(Into::into));
        if let Err(e) = r {
            run.report(Finding::FreeClustersFailed {
                error: crate::finding::errno_text(e.errno()),
            });
        }
    }
    let _ = storage.flush();
    let img = run.image_mut();
    img.snapshots_offset = new_offset;
    img.snapshots_size = size;
    Ok(())
}
