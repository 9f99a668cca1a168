//! Unit tests of the cache mechanics against a recording, failure-injecting storage.

use crate::*;
use qcow2_io::{errno, Event, MemStorage, Storage};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Event(Event),
    Read(u64),
    Write(u64, usize),
    Flush,
}

/// MemStorage that logs every operation and fails writes at chosen offsets.
#[derive(Default)]
struct Recorder {
    mem: MemStorage,
    log: Mutex<Vec<Rec>>,
    fail_write: Mutex<HashMap<u64, i32>>,
    fail_read: Mutex<Option<u64>>,
    fail_flush: Mutex<bool>,
}

impl Recorder {
    fn take(&self) -> Vec<Rec> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    fn writes(log: &[Rec]) -> Vec<u64> {
        log.iter()
            .filter_map(|r| match r {
                Rec::Write(o, _) => Some(*o),
                _ => None,
            })
            .collect()
    }
    fn fail_write_at(&self, offset: u64, code: i32) {
        self.fail_write.lock().unwrap().insert(offset, code);
    }
    fn heal(&self) {
        self.fail_write.lock().unwrap().clear();
        *self.fail_read.lock().unwrap() = None;
        *self.fail_flush.lock().unwrap() = false;
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Rec::Read(offset));
        if *self.fail_read.lock().unwrap() == Some(offset) {
            return Err(errno::error(errno::EIO));
        }
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(&code) = self.fail_write.lock().unwrap().get(&offset) {
            return Err(errno::error(code));
        }
        self.log.lock().unwrap().push(Rec::Write(offset, buf.len()));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if *self.fail_flush.lock().unwrap() {
            return Err(errno::error(errno::EIO));
        }
        self.log.lock().unwrap().push(Rec::Flush);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
    fn event(&self, event: Event) {
        self.log.lock().unwrap().push(Rec::Event(event));
    }
}

const ES: usize = 512;

fn setup(l2_cap: usize, rb_cap: usize) -> (Arc<Recorder>, Caches) {
    let rec = Arc::new(Recorder::default());
    // Recognisable on-disk contents: every 512-byte block starts with its offset.
    for off in (0..64u64).map(|i| i * ES as u64) {
        rec.mem.write_at(&off.to_be_bytes(), off).unwrap();
    }
    let caches = Caches::new(
        rec.clone(),
        CacheOptions::new(ES, l2_cap),
        CacheOptions::new(ES, rb_cap),
    )
    .unwrap();
    (rec, caches)
}

fn off(i: u64) -> u64 {
    i * ES as u64
}

/// get, set byte 8 to `v`, mark dirty, put.
fn dirty(c: &mut Caches, id: CacheId, offset: u64, v: u8) {
    let h = c.get(id, offset).unwrap();
    c.data_mut(&h)[8] = v;
    c.mark_dirty(&h);
    c.put(h).unwrap();
}

fn disk_byte(rec: &Recorder, offset: u64) -> u8 {
    rec.mem.to_bytes()[offset as usize + 8]
}

#[test]
fn get_loads_once_and_hits_afterwards() {
    let (rec, mut c) = setup(2, 2);
    let h = c.get(CacheId::L2, off(3)).unwrap();
    assert_eq!(h.cache(), CacheId::L2);
    assert_eq!(h.offset(), off(3));
    assert_eq!(&c.data(&h)[..8], &off(3).to_be_bytes());
    assert_eq!(c.data(&h).len(), ES);
    c.put(h).unwrap();
    assert_eq!(
        rec.take(),
        vec![Rec::Event(Event::L2Load), Rec::Read(off(3))]
    );
    let h = c.get(CacheId::L2, off(3)).unwrap();
    c.put(h).unwrap();
    assert!(rec.take().is_empty(), "a hit does no I/O");
    let s = c.stats(CacheId::L2);
    assert_eq!((s.hits, s.misses, s.loads), (1, 1, 1));
    assert!(c.is_cached(CacheId::L2, off(3)));
    assert!(!c.is_cached(CacheId::Refblock, off(3)));
    let h = c.get(CacheId::Refblock, off(4)).unwrap();
    c.put(h).unwrap();
    assert_eq!(
        rec.take(),
        vec![Rec::Event(Event::RefblockLoad), Rec::Read(off(4))]
    );
}

#[test]
fn bad_offsets_are_typed_errors_naming_the_cache() {
    let (rec, mut c) = setup(2, 2);
    let e = c.get(CacheId::L2, 0x1234).unwrap_err();
    assert!(matches!(
        e,
        CacheError::UnalignedOffset {
            cache: CacheId::L2,
            offset: 0x1234
        }
    ));
    assert_eq!(
        e.to_string(),
        "Cannot get entry from L2 table cache: Offset 0x1234 is unaligned"
    );
    let e = c.get_empty(CacheId::Refblock, 0x100).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot get entry from refcount block cache: Offset 0x100 is unaligned"
    );
    assert!(matches!(
        c.get(CacheId::L2, 0).unwrap_err(),
        CacheError::InvalidOffset { offset: 0, .. }
    ));
    assert!(matches!(
        c.get(CacheId::L2, 1 << 60).unwrap_err(),
        CacheError::InvalidOffset { .. }
    ));
    assert!(rec.take().is_empty());
    assert_eq!(c.cached_count(CacheId::L2), 0);
}

#[test]
fn pinned_entries_are_never_evicted_and_all_pinned_is_an_error() {
    let (rec, mut c) = setup(2, 2);
    let a = c.get(CacheId::L2, off(1)).unwrap();
    let b = c.get(CacheId::L2, off(2)).unwrap();
    assert_eq!(c.pinned_count(CacheId::L2), 2);
    let e = c.get(CacheId::L2, off(3)).unwrap_err();
    assert!(matches!(
        e,
        CacheError::AllPinned {
            cache: CacheId::L2,
            capacity: 2
        }
    ));
    // A second pin of a cached entry is a hit, not a new slot.
    let a2 = c.get(CacheId::L2, off(1)).unwrap();
    c.put(a).unwrap();
    assert_eq!(c.pinned_count(CacheId::L2), 2, "still pinned by a2");
    assert!(c.get(CacheId::L2, off(3)).is_err());
    c.put(a2).unwrap();
    // Now off(1) is the only unpinned entry: it is the victim, off(2) survives.
    let d = c.get(CacheId::L2, off(3)).unwrap();
    assert!(!c.is_cached(CacheId::L2, off(1)));
    assert!(c.is_cached(CacheId::L2, off(2)));
    assert_eq!(&c.data(&b)[..8], &off(2).to_be_bytes());
    c.put(b).unwrap();
    c.put(d).unwrap();
    assert_eq!(c.pinned_count(CacheId::L2), 0);
    assert!(Recorder::writes(&rec.take()).is_empty());
}

#[test]
fn replacement_is_least_recently_released() {
    let (_rec, mut c) = setup(3, 2);
    for i in [1, 2, 3] {
        let h = c.get(CacheId::L2, off(i)).unwrap();
        c.put(h).unwrap();
    }
    // Release order now 1, 2, 3; touching 1 makes 2 the oldest.
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.put(h).unwrap();
    let h = c.get(CacheId::L2, off(4)).unwrap();
    c.put(h).unwrap();
    assert!(!c.is_cached(CacheId::L2, off(2)));
    assert!(c.is_cached(CacheId::L2, off(1)) && c.is_cached(CacheId::L2, off(3)));
    // The stamp is taken at release, not at get: pin 3 first, release it last.
    let h3 = c.get(CacheId::L2, off(3)).unwrap();
    let h1 = c.get(CacheId::L2, off(1)).unwrap();
    c.put(h1).unwrap();
    c.put(h3).unwrap();
    let h = c.get(CacheId::L2, off(5)).unwrap();
    c.put(h).unwrap();
    assert!(!c.is_cached(CacheId::L2, off(4)));
    let h = c.get(CacheId::L2, off(6)).unwrap();
    c.put(h).unwrap();
    assert!(!c.is_cached(CacheId::L2, off(1)));
    assert!(c.is_cached(CacheId::L2, off(3)));
    assert_eq!(c.stats(CacheId::L2).evictions, 3);
}

#[test]
fn dirty_entries_are_written_on_eviction_clean_ones_never() {
    let (rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::L2, off(1), 0xaa);
    let h = c.get(CacheId::L2, off(2)).unwrap();
    c.put(h).unwrap();
    rec.take();
    // Evicts off(1) (dirty): written with its event, then off(3) is loaded.
    let h = c.get(CacheId::L2, off(3)).unwrap();
    c.put(h).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Event(Event::L2Update),
            Rec::Write(off(1), ES),
            Rec::Event(Event::L2Load),
            Rec::Read(off(3)),
        ]
    );
    assert_eq!(disk_byte(&rec, off(1)), 0xaa);
    // Evicts off(2) (clean): no write at all.
    let h = c.get(CacheId::L2, off(4)).unwrap();
    c.put(h).unwrap();
    assert!(Recorder::writes(&rec.take()).is_empty());
    let s = c.stats(CacheId::L2);
    assert_eq!((s.evictions, s.dirty_evictions, s.writes), (2, 1, 1));
    // Flushing clean entries writes nothing but still issues the barrier.
    c.flush(CacheId::L2).unwrap();
    assert_eq!(rec.take(), vec![Rec::Flush]);
    // The written-back change survives a reload.
    let h = c.get(CacheId::L2, off(1)).unwrap();
    assert_eq!(c.data(&h)[8], 0xaa);
    c.put(h).unwrap();
}

#[test]
fn discard_drops_without_writing() {
    let (rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::Refblock, off(5), 0x55);
    assert_eq!(c.dirty_count(CacheId::Refblock), 1);
    c.discard(CacheId::Refblock, off(5));
    c.discard(CacheId::Refblock, off(9)); // not cached: no-op
    assert!(!c.is_cached(CacheId::Refblock, off(5)));
    assert_eq!(c.dirty_count(CacheId::Refblock), 0);
    c.flush(CacheId::Refblock).unwrap();
    assert_eq!(Recorder::writes(&rec.take()), Vec::<u64>::new());
    assert_eq!(disk_byte(&rec, off(5)), 0);
    // A later get reads the on-disk table again.
    let h = c.get(CacheId::Refblock, off(5)).unwrap();
    assert_eq!(c.data(&h)[8], 0);
    c.put(h).unwrap();
}

#[test]
fn discard_of_a_pinned_entry_detaches_it() {
    let (rec, mut c) = setup(2, 2);
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.data_mut(&h)[8] = 1;
    c.mark_dirty(&h);
    c.discard(CacheId::L2, off(1));
    assert!(!c.is_cached(CacheId::L2, off(1)));
    assert_eq!(c.dirty_count(CacheId::L2), 0);
    c.mark_dirty(&h); // freed cluster: ignored
    assert_eq!(c.dirty_count(CacheId::L2), 0);
    // A fresh get loads a second copy while the detached one is still pinned.
    let h2 = c.get(CacheId::L2, off(1)).unwrap();
    assert_eq!(c.data(&h2)[8], 0);
    assert_eq!(c.data(&h)[8], 1);
    c.put(h).unwrap();
    c.put(h2).unwrap();
    assert_eq!(c.cached_count(CacheId::L2), 1);
    c.flush(CacheId::L2).unwrap();
    assert!(Recorder::writes(&rec.take()).is_empty());
    // Both slots are usable again.
    for i in [2, 3] {
        let h = c.get(CacheId::L2, off(i)).unwrap();
        c.put(h).unwrap();
    }
}

#[test]
fn failed_write_back_keeps_the_entry_dirty_and_flush_retries() {
    let (rec, mut c) = setup(1, 2);
    dirty(&mut c, CacheId::L2, off(1), 0x11);
    rec.fail_write_at(off(1), errno::EIO);
    let e = c.get(CacheId::L2, off(2)).unwrap_err();
    assert!(matches!(
        e,
        CacheError::WriteBack {
            cache: CacheId::L2,
            offset,
            ..
        } if offset == off(1)
    ));
    assert_eq!(e.io_error().unwrap().raw_os_error(), Some(errno::EIO));
    assert!(c.is_cached(CacheId::L2, off(1)));
    assert!(!c.is_cached(CacheId::L2, off(2)));
    assert_eq!(c.dirty_count(CacheId::L2), 1);
    assert!(c.flush(CacheId::L2).is_err());
    assert_eq!(c.stats(CacheId::L2).write_errors, 2);
    rec.heal();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(c.dirty_count(CacheId::L2), 0);
    assert_eq!(disk_byte(&rec, off(1)), 0x11);
    // A failed barrier is reported too.
    *rec.fail_flush.lock().unwrap() = true;
    assert!(matches!(
        c.flush(CacheId::L2).unwrap_err(),
        CacheError::Flush {
            cache: CacheId::L2,
            ..
        }
    ));
}

#[test]
fn failed_load_caches_nothing() {
    let (rec, mut c) = setup(1, 2);
    *rec.fail_read.lock().unwrap() = Some(off(7));
    let e = c.get(CacheId::L2, off(7)).unwrap_err();
    assert!(matches!(e, CacheError::Load { offset, .. } if offset == off(7)));
    assert!(!c.is_cached(CacheId::L2, off(7)));
    assert_eq!(c.pinned_count(CacheId::L2), 0);
    rec.heal();
    let h = c.get(CacheId::L2, off(7)).unwrap();
    c.put(h).unwrap();
}

#[test]
fn write_tries_every_entry_and_enospc_wins() {
    let (rec, mut c) = setup(2, 4);
    for i in 1..=4 {
        dirty(&mut c, CacheId::Refblock, off(i), i as u8);
    }
    rec.take();
    rec.fail_write_at(off(1), errno::EIO);
    rec.fail_write_at(off(3), errno::ENOSPC);
    let e = c.write(CacheId::Refblock).unwrap_err();
    assert!(e.is_no_space(), "{e:?}");
    assert!(matches!(e, CacheError::WriteBack { offset, .. } if offset == off(3)));
    // The healthy entries were written anyway, in offset order, and no barrier was issued.
    let log = rec.take();
    assert_eq!(Recorder::writes(&log), vec![off(2), off(4)]);
    assert!(!log.contains(&Rec::Flush));
    assert_eq!(c.dirty_count(CacheId::Refblock), 2);
    // Only EIO: the first error is kept.
    rec.fail_write_at(off(3), errno::EIO);
    let e = c.flush(CacheId::Refblock).unwrap_err();
    assert!(matches!(e, CacheError::WriteBack { offset, .. } if offset == off(1)));
    assert!(
        !rec.take().contains(&Rec::Flush),
        "no barrier after a failed write"
    );
}

#[test]
fn writethrough_writes_on_put() {
    let rec = Arc::new(Recorder::default());
    let mut c = Caches::new(
        rec.clone(),
        CacheOptions::new(ES, 2).with_writethrough(true),
        CacheOptions::new(ES, 2),
    )
    .unwrap();
    assert!(c.writethrough(CacheId::L2) && !c.writethrough(CacheId::Refblock));
    dirty(&mut c, CacheId::Refblock, off(2), 2);
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    rec.take();
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.data_mut(&h)[8] = 1;
    c.mark_dirty(&h);
    assert!(Recorder::writes(&rec.take()).is_empty());
    c.put(h).unwrap();
    // Same ordering as a write-back: dependency written, barrier, then the entry.
    assert_eq!(
        rec.take(),
        vec![
            Rec::Event(Event::RefblockUpdatePart),
            Rec::Write(off(2), ES),
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(1), ES),
        ]
    );
    assert_eq!(c.dirty_count(CacheId::L2), 0);
    // A clean put writes nothing.
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.put(h).unwrap();
    assert!(rec.take().is_empty());
    // A failing write-through put still releases the pin and keeps the entry dirty.
    rec.fail_write_at(off(1), errno::EIO);
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.data_mut(&h)[8] = 9;
    c.mark_dirty(&h);
    assert!(c.put(h).is_err());
    assert_eq!(c.pinned_count(CacheId::L2), 0);
    assert_eq!(c.dirty_count(CacheId::L2), 1);
    rec.heal();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(disk_byte(&rec, off(1)), 9);
}

struct Veto(u64);
impl OverlapCheck for Veto {
    fn check_write(&self, id: CacheId, offset: u64, len: u64) -> Result<(), OverlapError> {
        assert_eq!(len, ES as u64);
        if id == CacheId::L2 && offset == self.0 {
            Err(OverlapError {
                offset,
                len,
                region: "active L1 table",
            })
        } else {
            Ok(())
        }
    }
}

#[test]
fn overlap_hook_vetoes_the_write() {
    let (rec, mut c) = setup(2, 2);
    c.set_overlap_check(Some(Arc::new(Veto(off(1)))));
    dirty(&mut c, CacheId::L2, off(1), 1);
    dirty(&mut c, CacheId::L2, off(2), 2);
    rec.take();
    let e = c.flush(CacheId::L2).unwrap_err();
    assert!(matches!(
        &e,
        CacheError::Overlap { cache: CacheId::L2, offset, source }
            if *offset == off(1) && source.region == "active L1 table"
    ));
    assert_eq!(
        std::error::Error::source(&e).unwrap().to_string(),
        "Preventing invalid write on metadata (overlaps with active L1 table)"
    );
    // Not even the event was reported for the vetoed entry.
    assert_eq!(
        rec.take(),
        vec![Rec::Event(Event::L2Update), Rec::Write(off(2), ES)]
    );
    assert_eq!(c.dirty_count(CacheId::L2), 1);
    assert_eq!(disk_byte(&rec, off(1)), 0);
    c.set_overlap_check(None);
    c.flush(CacheId::L2).unwrap();
    assert_eq!(disk_byte(&rec, off(1)), 1);
}

// The guard exists only with debug assertions (it costs a CRC per load and write-back).
#[cfg(debug_assertions)]
#[test]
fn crc_guard_catches_an_undeclared_modification() {
    let (rec, mut c) = setup(1, 2);
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.data_mut(&h)[8] = 0x42; // no mark_dirty
    c.put(h).unwrap();
    let e = c.flush(CacheId::L2).unwrap_err();
    assert!(
        matches!(e, CacheError::UndeclaredModification { cache: CacheId::L2, offset, expected, found }
            if offset == off(1) && expected != found),
        "{e:?}"
    );
    // Eviction checks too, and keeps the entry (nothing is silently dropped).
    assert!(matches!(
        c.get(CacheId::L2, off(2)).unwrap_err(),
        CacheError::UndeclaredModification { .. }
    ));
    assert!(c.is_cached(CacheId::L2, off(1)));
    assert_eq!(c.clean_unused(CacheId::L2), 0);
    assert_eq!(c.clean_unused(CacheId::L2), 0);
    assert!(Recorder::writes(&rec.take()).is_empty());
    // Declaring the change repairs the state.
    let h = c.get(CacheId::L2, off(1)).unwrap();
    c.mark_dirty(&h);
    c.put(h).unwrap();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(disk_byte(&rec, off(1)), 0x42);
}

#[test]
fn dependency_flushes_writes_and_a_barrier_first() {
    let (rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::Refblock, off(10), 1);
    dirty(&mut c, CacheId::L2, off(20), 2);
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    assert_eq!(c.dependency(CacheId::L2), Some(CacheId::Refblock));
    rec.take();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Event(Event::RefblockUpdatePart),
            Rec::Write(off(10), ES),
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(20), ES),
            Rec::Flush,
        ]
    );
    assert_eq!(c.dependency(CacheId::L2), None, "the edge is consumed");
    assert_eq!(c.stats(CacheId::Refblock).barriers, 1);
    // A dependency already satisfied (clean and behind a barrier) costs nothing.
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    dirty(&mut c, CacheId::L2, off(20), 3);
    c.write(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![Rec::Event(Event::L2Update), Rec::Write(off(20), ES)]
    );
    // Written but not yet behind a barrier: only the barrier is added.
    dirty(&mut c, CacheId::Refblock, off(10), 4);
    c.write(CacheId::Refblock).unwrap();
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    dirty(&mut c, CacheId::L2, off(20), 5);
    rec.take();
    c.write(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(20), ES)
        ]
    );
}

#[test]
fn dependency_is_honoured_on_eviction() {
    let (rec, mut c) = setup(1, 2);
    dirty(&mut c, CacheId::L2, off(1), 1);
    dirty(&mut c, CacheId::Refblock, off(2), 2);
    c.set_dependency(CacheId::Refblock, CacheId::L2).unwrap();
    dirty(&mut c, CacheId::L2, off(1), 3);
    rec.take();
    // Refblock cache has room: no eviction, no write.
    dirty(&mut c, CacheId::Refblock, off(3), 3);
    assert!(Recorder::writes(&rec.take()).is_empty());
    // Third refblock evicts off(2) (dirty), which needs the L2 cache flushed first.
    let h = c.get(CacheId::Refblock, off(4)).unwrap();
    c.put(h).unwrap();
    let log = rec.take();
    assert_eq!(
        &log[..5],
        &[
            Rec::Event(Event::L2Update),
            Rec::Write(off(1), ES),
            Rec::Flush,
            Rec::Event(Event::RefblockUpdatePart),
            Rec::Write(off(2), ES),
        ]
    );
}

#[test]
fn depends_on_flush_issues_a_barrier_before_the_write() {
    let (rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::L2, off(1), 1);
    c.set_depends_on_flush(CacheId::L2);
    assert!(c.depends_on_flush(CacheId::L2));
    rec.take();
    c.write(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(1), ES)
        ]
    );
    assert!(!c.depends_on_flush(CacheId::L2));
    // Any barrier we issue satisfies it, e.g. a flush of the other cache.
    c.set_depends_on_flush(CacheId::L2);
    c.flush(CacheId::Refblock).unwrap();
    assert!(!c.depends_on_flush(CacheId::L2));
    // A dependency flush that needs no barrier does not count as one.
    c.set_depends_on_flush(CacheId::L2);
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    dirty(&mut c, CacheId::L2, off(1), 2);
    rec.take();
    c.write(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(1), ES)
        ]
    );
}

#[test]
fn reversing_a_dependency_flushes_the_old_one_first() {
    let (rec, mut c) = setup(2, 2);
    assert!(matches!(
        c.set_dependency(CacheId::L2, CacheId::L2),
        Err(CacheError::SelfDependency { cache: CacheId::L2 })
    ));
    dirty(&mut c, CacheId::Refblock, off(10), 1);
    dirty(&mut c, CacheId::L2, off(20), 1);
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    rec.take();
    // Refblock must now wait for L2, but L2 waits for Refblock: the existing edge is
    // satisfied first (refblock written + barrier), never a cycle.
    c.set_dependency(CacheId::Refblock, CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Event(Event::RefblockUpdatePart),
            Rec::Write(off(10), ES),
            Rec::Flush,
        ]
    );
    assert_eq!(c.dependency(CacheId::L2), None);
    assert_eq!(c.dependency(CacheId::Refblock), Some(CacheId::L2));
    // Setting the same edge again is free.
    c.set_dependency(CacheId::Refblock, CacheId::L2).unwrap();
    assert!(rec.take().is_empty());
    dirty(&mut c, CacheId::Refblock, off(10), 2);
    c.flush(CacheId::Refblock).unwrap();
    assert_eq!(
        Recorder::writes(&rec.take()),
        vec![off(20), off(10)],
        "L2 first, then the refblock"
    );
}

#[test]
fn failed_dependency_flush_keeps_the_edge_and_writes_nothing() {
    let (rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::Refblock, off(10), 1);
    dirty(&mut c, CacheId::L2, off(20), 1);
    c.set_dependency(CacheId::L2, CacheId::Refblock).unwrap();
    rec.fail_write_at(off(10), errno::ENOSPC);
    rec.take();
    let e = c.flush(CacheId::L2).unwrap_err();
    assert!(e.is_no_space());
    assert_eq!(e.cache(), CacheId::Refblock);
    assert!(Recorder::writes(&rec.take()).is_empty());
    assert_eq!(c.dependency(CacheId::L2), Some(CacheId::Refblock));
    assert_eq!(c.dirty_count(CacheId::L2), 1);
    rec.heal();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            Rec::Event(Event::RefblockUpdatePart),
            Rec::Write(off(10), ES),
            Rec::Flush,
            Rec::Event(Event::L2Update),
            Rec::Write(off(20), ES),
            Rec::Flush,
        ]
    );
}

#[test]
fn get_empty_reads_nothing_and_zero_fills() {
    let (rec, mut c) = setup(2, 2);
    let h = c.get_empty(CacheId::Refblock, off(3)).unwrap();
    assert!(c.data(&h).iter().all(|&b| b == 0));
    c.put(h).unwrap();
    assert!(rec.take().is_empty(), "no event, no read");
    // Not dirty until the caller says so: an abandoned entry is never written.
    assert_eq!(c.dirty_count(CacheId::Refblock), 0);
    c.flush(CacheId::Refblock).unwrap();
    assert_eq!(rec.take(), vec![Rec::Flush]);
    // On a hit the cached contents are zeroed too.
    let h = c.get(CacheId::L2, off(4)).unwrap();
    assert_ne!(c.data(&h)[..8], [0; 8]);
    c.put(h).unwrap();
    let h = c.get_empty(CacheId::L2, off(4)).unwrap();
    assert!(c.data(&h).iter().all(|&b| b == 0));
    c.data_mut(&h)[0] = 7;
    c.mark_dirty(&h);
    c.put(h).unwrap();
    c.flush(CacheId::L2).unwrap();
    assert_eq!(
        rec.mem.to_bytes()[off(4) as usize..][..8],
        [7, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn empty_flushes_then_forgets_unpinned_entries() {
    let (rec, mut c) = setup(3, 2);
    dirty(&mut c, CacheId::L2, off(1), 1);
    let h = c.get(CacheId::L2, off(2)).unwrap();
    c.empty(CacheId::L2).unwrap();
    assert_eq!(Recorder::writes(&rec.take()), vec![off(1)]);
    assert!(!c.is_cached(CacheId::L2, off(1)));
    assert!(c.is_cached(CacheId::L2, off(2)), "pinned entries stay");
    c.put(h).unwrap();
    assert_eq!(c.cached_count(CacheId::L2), 1);
}

#[test]
fn clean_unused_drops_only_idle_clean_unpinned_entries() {
    let (_rec, mut c) = setup(4, 2);
    for i in 1..=3 {
        let h = c.get(CacheId::L2, off(i)).unwrap();
        c.put(h).unwrap();
    }
    // First pass: everything was used since "the beginning" (stamp 0).
    assert_eq!(c.clean_unused(CacheId::L2), 0);
    dirty(&mut c, CacheId::L2, off(1), 1); // used, dirty
    let pinned = c.get(CacheId::L2, off(2)).unwrap(); // pinned
    let h = c.get(CacheId::L2, off(4)).unwrap(); // used since
    c.put(h).unwrap();
    // Only off(3) is idle, clean and unpinned.
    assert_eq!(c.clean_unused(CacheId::L2), 1);
    assert!(!c.is_cached(CacheId::L2, off(3)));
    c.put(pinned).unwrap();
    c.flush(CacheId::L2).unwrap();
    // off(1) is clean now and idle since the last pass, as is off(4); off(2) was released
    // after it.
    assert_eq!(c.clean_unused(CacheId::L2), 2);
    assert!(c.is_cached(CacheId::L2, off(2)));
    assert_eq!(c.clean_unused(CacheId::L2), 1);
    assert_eq!(c.cached_count(CacheId::L2), 0);
}

#[test]
#[should_panic(expected = "another Caches")]
fn handles_are_tied_to_their_caches() {
    let (_rec, mut a) = setup(2, 2);
    let (_rec2, b) = setup(2, 2);
    let h = a.get(CacheId::L2, off(1)).unwrap();
    let _ = b.data(&h);
}

#[test]
fn invalid_options_are_refused() {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let e = Caches::new(
        s.clone(),
        CacheOptions::new(512, 2),
        CacheOptions::new(3000, 2),
    )
    .unwrap_err();
    assert_eq!(e.cache(), CacheId::Refblock);
    assert!(Caches::new(s, CacheOptions::new(512, 0), CacheOptions::new(512, 1)).is_err());
}

#[test]
fn debug_output_summarises_state() {
    let (_rec, mut c) = setup(2, 2);
    dirty(&mut c, CacheId::L2, off(1), 1);
    let s = format!("{c:?}");
    assert!(s.contains("dirty: 1"), "{s}");
    assert!(Arc::ptr_eq(c.storage(), c.storage()));
    assert_eq!(c.entry_size(CacheId::L2), ES);
    assert_eq!(c.capacity(CacheId::Refblock), 2);
}
