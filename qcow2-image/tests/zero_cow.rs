//! Zero copy-on-write (QEMU's `is_zero_cow`): a small write into a fresh cluster whose
//! copy-on-write areas read as zero is written as one fast zeroing of the new cluster plus
//! the guest data, never as a whole cluster of mostly zeros; where the COW areas hold data
//! (a backing file) the full cluster is still written.

use qcow2_image::{BackingPolicy, CreateOptions, ExtentKind, Image, OpenOptions};
use qcow2_io::{MemStorage, Storage};
use std::io;
use std::sync::{Arc, Mutex};

type Ranges = Vec<(u64, u64)>;

/// Memory storage that can zero fast and records every data write.
#[derive(Default)]
struct Recording {
    mem: MemStorage,
    writes: Mutex<Vec<(u64, u64)>>,
    fast_zeroes: Mutex<Vec<(u64, u64)>>,
}

impl Recording {
    fn take(&self) -> (Ranges, Ranges) {
        (
            std::mem::take(&mut *self.writes.lock().unwrap()),
            std::mem::take(&mut *self.fast_zeroes.lock().unwrap()),
        )
    }
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.fast_zeroes.lock().unwrap().push((offset, len));
        self.mem.write_zeroes(offset, len).map(|()| true)
    }
}

const K: u64 = 1024;

fn host_of(img: &mut Image, guest: u64) -> u64 {
    let e = img.block_status(guest, 4 * K).unwrap();
    assert_eq!(e.kind, ExtentKind::Data, "{e:?}");
    e.host_offset.unwrap()
}

fn touching(list: &[(u64, u64)], at: u64, len: u64) -> Vec<(u64, u64)> {
    list.iter()
        .copied()
        .filter(|&(o, l)| o < at + len && at < o + l)
        .collect()
}

#[test]
fn small_write_into_fresh_cluster_writes_only_the_data() {
    for extended_l2 in [false, true] {
        let s = Arc::new(Recording::default());
        let mut o = CreateOptions::new(16 << 20);
        o.extended_l2 = extended_l2;
        let mut img = Image::create(s.clone(), &o).unwrap();
        img.flush().unwrap();
        s.take();
        // 4 KiB in the middle of cluster 3, unaligned to the subcluster on purpose.
        let at = 3 * 64 * K + 9 * K;
        img.write(at, &[0xab; 4096]).unwrap();
        img.flush().unwrap();
        let host = host_of(&mut img, at) - 9 * K;
        let (writes, zeroes) = s.take();
        let data = touching(&writes, host, 64 * K);
        assert_eq!(data, vec![(host + 9 * K, 4 * K)], "ext-l2 {extended_l2}");
        let z = touching(&zeroes, host, 64 * K);
        // Whole cluster zeroed (plain L2) or the subclusters the write touches (ext L2).
        let expect = if extended_l2 {
            (host + 8 * K, 6 * K)
        } else {
            (host, 64 * K)
        };
        assert_eq!(z, vec![expect], "ext-l2 {extended_l2}");
        let mut back = vec![0u8; 64 * K as usize];
        img.read(3 * 64 * K, &mut back).unwrap();
        assert!(back[..9 * K as usize].iter().all(|&b| b == 0));
        assert!(back[9 * K as usize..13 * K as usize]
            .iter()
            .all(|&b| b == 0xab));
        assert!(back[13 * K as usize..].iter().all(|&b| b == 0));
        img.close().unwrap();
    }
}

#[test]
fn cow_areas_with_data_are_still_copied() {
    // A backing file's data in the COW areas must be copied into the new cluster.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mut b = Image::create_path(&base, &CreateOptions::new(1 << 20)).unwrap();
    b.write(0, &[0x55; 64 * 1024]).unwrap();
    b.close().unwrap();

    let s = Arc::new(Recording::default());
    let mut o = CreateOptions::new(1 << 20);
    o.layout.backing_file = Some("base.qcow2".into());
    o.layout.backing_format = Some("qcow2".into());
    Image::create(s.clone(), &o).unwrap().close().unwrap();
    let opts = OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.path().to_path_buf(),
            max_depth: 2,
            allowed_dirs: vec![dir.path().to_path_buf()],
        },
        ..OpenOptions::default()
    };
    let mut img = Image::open(s.clone(), &opts).unwrap();
    s.take();
    img.write(8 * K, &[0xcd; 4096]).unwrap();
    img.flush().unwrap();
    let host = host_of(&mut img, 8 * K) - 8 * K;
    let (writes, zeroes) = s.take();
    assert!(touching(&zeroes, host, 64 * K).is_empty());
    assert_eq!(touching(&writes, host, 64 * K), vec![(host, 64 * K)]);
    let mut back = vec![0u8; 64 * K as usize];
    img.read(0, &mut back).unwrap();
    assert!(back[..8 * K as usize].iter().all(|&b| b == 0x55));
    assert!(back[8 * K as usize..12 * K as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(back[12 * K as usize..].iter().all(|&b| b == 0x55));
    img.close().unwrap();
}
