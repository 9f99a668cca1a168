//! Block status and `map` as QEMU's block status answers them (what `qemu-img map` prints,
//! compared with qemu-img itself in `qcow2-cli/tests/map.rs`):
//! - data clusters whose host range is a hole are `DataHole` when the image looks
//!   preallocated with `preallocation=metadata` (QEMU's heuristic), and only then; a backend
//!   that cannot tell its allocation, or fails the hole query, leaves them data;
//! - runs split where QEMU's do: preallocated zero clusters at scattered host offsets, and
//!   unallocated subclusters of allocated clusters (extended L2) with their host offsets;
//! - `block_status` is the first extent of `map`.

use qcow2_image::{CreateOptions, Extent, ExtentKind, Image, Preallocation};
use qcow2_io::{FileStorage, MemStorage, SparseStorage, Storage};
use std::io;
use std::sync::Arc;

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// A 4 MiB `preallocation=metadata` image on `storage` with 4 KiB written at 1 MiB.
fn preallocated(storage: Arc<dyn Storage>) -> Image {
    let mut o = CreateOptions::new(4 * M);
    o.preallocation = Preallocation::Metadata;
    let mut img = Image::create(storage, &o).expect("create");
    img.write(M, &[7u8; 4096]).expect("write");
    img.flush().expect("flush");
    img
}

fn kinds(ext: &[Extent]) -> Vec<(u64, u64, ExtentKind)> {
    ext.iter().map(|x| (x.offset, x.length, x.kind)).collect()
}

/// A storage that answers only the required methods (no hole or allocation knowledge),
/// or fails every hole query.
struct Plain {
    inner: SparseStorage,
    failing_status: bool,
}

impl Storage for Plain {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if self.failing_status {
            Err(io::Error::other("no hole information"))
        } else {
            self.inner.data_status(offset, len)
        }
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        if self.failing_status {
            self.inner.allocated_size()
        } else {
            Ok(None)
        }
    }
}

#[test]
fn holes_in_data_clusters_of_a_metadata_preallocated_image_read_as_zero() {
    let mut img = preallocated(Arc::new(SparseStorage::default()));
    let ext = img.map(0, 4 * M).expect("map");
    assert_eq!(
        kinds(&ext),
        vec![
            (0, M, ExtentKind::DataHole),
            (M, 4 * K, ExtentKind::Data),
            (M + 4 * K, 3 * M - 4 * K, ExtentKind::DataHole),
        ]
    );
    // The host offsets continue across the pieces of one host run.
    let h = ext[0].host_offset.expect("host");
    assert_eq!(ext[1].host_offset, Some(h + M));
    assert_eq!(ext[2].host_offset, Some(h + M + 4 * K));
    assert!(ext.iter().all(Extent::is_allocated));
    assert!(ext[0].reads_as_zero() && !ext[1].reads_as_zero());
    // The metadata view knows no holes: one run of data.
    let meta = img.map_metadata(0, 4 * M).expect("map_metadata");
    assert_eq!(kinds(&meta), vec![(0, 4 * M, ExtentKind::Data)]);
    assert_eq!(img.allocated_bytes(0, 4 * M).expect("alloc"), 4 * M);
    // Block status: the run at the offset, cut at the end of the request.
    let bs = img.block_status(M + 100, 4 * M).expect("block_status");
    assert_eq!(
        (bs.offset, bs.length, bs.kind),
        (M + 100, 4 * K - 100, ExtentKind::Data)
    );
    let bs = img.block_status(2 * M, K).expect("block_status");
    assert_eq!((bs.length, bs.kind), (K, ExtentKind::DataHole));
    // What reads as zero does read as zero.
    let mut buf = vec![1u8; 8192];
    img.read(M - 4096, &mut buf).expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 7));
}

#[test]
fn hole_queries_only_when_qemu_would_ask() {
    // A byte vector has no holes: every cluster in use is allocated in memory, so the
    // heuristic never takes it for preallocated.
    let mut img = preallocated(Arc::new(MemStorage::new()));
    let ext = img.map(0, 4 * M).expect("map");
    assert_eq!(kinds(&ext), vec![(0, 4 * M, ExtentKind::Data)]);
    // A backend that cannot tell its allocation: QEMU's detection fails, no host query.
    let mut img = preallocated(Arc::new(Plain {
        inner: SparseStorage::default(),
        failing_status: false,
    }));
    assert_eq!(
        kinds(&img.map(0, 4 * M).expect("map")),
        vec![(0, 4 * M, ExtentKind::Data)]
    );
    // A failed hole query is ignored: the range stays data.
    let mut img = preallocated(Arc::new(Plain {
        inner: SparseStorage::default(),
        failing_status: true,
    }));
    assert_eq!(
        kinds(&img.map(0, 4 * M).expect("map")),
        vec![(0, 4 * M, ExtentKind::Data)]
    );
}

#[test]
fn an_image_written_in_full_is_not_taken_for_preallocated() {
    let s = Arc::new(SparseStorage::default());
    let mut img = Image::create(s, &CreateOptions::new(M)).expect("create");
    img.write(0, &vec![3u8; M as usize]).expect("write");
    img.write_zeroes(64 * K, 64 * K, false).expect("zero");
    let ext = img.map(0, M).expect("map");
    assert!(
        ext.iter().all(|x| x.kind != ExtentKind::DataHole),
        "{ext:?}"
    );
}

#[test]
fn block_status_is_the_first_extent_of_map() {
    let mut img = preallocated(Arc::new(SparseStorage::default()));
    img.write_zeroes(2 * M, 64 * K, false).expect("zero");
    img.discard(3 * M, 128 * K).expect("discard");
    img.write(3 * M + 64 * K, &[9u8; 512]).expect("write");
    let size = img.virtual_size();
    let mut off = 0;
    while off < size {
        let first = img.map(off, size - off).expect("map")[0];
        let bs = img.block_status(off, size - off).expect("block_status");
        assert_eq!(bs, first, "at {off:#x}");
        off += 37 * K + 512;
    }
    let end = img
        .block_status(size, 4096)
        .expect("block_status at the end");
    assert_eq!(end.length, 0);
}

#[test]
fn zero_clusters_split_where_their_host_clusters_do() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(M);
    o.cluster_size = 512;
    let mut img = Image::create(s, &o).expect("create");
    // Written backwards: each cluster's host cluster comes before the previous one's.
    img.write(3 * K, &[1u8; 512]).expect("write");
    img.write(2 * K, &[1u8; 512]).expect("write");
    img.write(K, &[1u8; 1024]).expect("write");
    let host = |img: &mut Image, at: u64| img.block_status(at, 512).expect("bs").host_offset;
    let (h1, h2, h3) = (
        host(&mut img, K),
        host(&mut img, 2 * K),
        host(&mut img, 3 * K),
    );
    img.write_zeroes(K, 3 * K, false).expect("zero");
    let ext = img.map(K, 3 * K).expect("map");
    let got: Vec<_> = ext
        .iter()
        .map(|x| (x.offset, x.length, x.kind, x.host_offset))
        .collect();
    assert_eq!(
        got,
        vec![
            (K, K, ExtentKind::Zero, h1),
            (2 * K, 512, ExtentKind::Zero, h2),
            // Never allocated: a zero cluster without a host cluster.
            (2 * K + 512, 512, ExtentKind::Zero, None),
            (3 * K, 512, ExtentKind::Zero, h3),
            (3 * K + 512, 512, ExtentKind::Zero, None),
        ]
    );
    // Reads do not care how the runs split.
    let mut buf = vec![1u8; 3 * K as usize];
    img.read(K, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn unallocated_subclusters_of_allocated_clusters_keep_their_host_offset() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(M);
    o.extended_l2 = true;
    let mut img = Image::create(s, &o).expect("create");
    img.write(0, &[1u8; 4096]).expect("write");
    img.write(12 * K, &[2u8; 2048]).expect("write");
    let ext = img.map(0, 128 * K).expect("map");
    let h = ext[0].host_offset.expect("host");
    let got: Vec<_> = ext
        .iter()
        .map(|x| (x.offset, x.length, x.kind, x.host_offset))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 4 * K, ExtentKind::Data, Some(h)),
            (4 * K, 8 * K, ExtentKind::Unallocated, Some(h + 4 * K)),
            (12 * K, 2 * K, ExtentKind::Data, Some(h + 12 * K)),
            (14 * K, 50 * K, ExtentKind::Unallocated, Some(h + 14 * K)),
            (64 * K, 64 * K, ExtentKind::Unallocated, None),
        ]
    );
    assert!(!ext[1].is_allocated() && ext[1].reads_as_zero());
}

#[test]
fn a_preallocated_image_file_maps_its_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pm.qcow2");
    let probe = FileStorage::create(dir.path().join("probe")).expect("probe");
    probe.set_len(M).expect("set_len");
    if probe.data_status(0, M).expect("status") != (false, M) {
        eprintln!("the file system reports no holes: nothing to check");
        return;
    }
    let f = FileStorage::create(&path).expect("create file");
    let img = preallocated(Arc::new(f));
    img.close().expect("close");
    let mut img = Image::open_path(&path, &Default::default()).expect("open");
    let ext = img.map(0, 4 * M).expect("map");
    assert_eq!(
        kinds(&ext),
        vec![
            (0, M, ExtentKind::DataHole),
            (M, 4 * K, ExtentKind::Data),
            (M + 4 * K, 3 * M - 4 * K, ExtentKind::DataHole),
        ]
    );
}
