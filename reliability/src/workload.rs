//! Deterministic guest workloads that drive every engine event, and the data model that says
//! which guest bytes must read back after an error or a crash.

use qcow2_image::{CreateOptions, Image, ImageError};
use qcow2_io::crash::SplitMix64;

/// One guest operation of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `write(off, pattern(seed, len))`.
    Write {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Seed of the data pattern.
        seed: u64,
    },
    /// `write_zeroes(off, len, unmap)`.
    WriteZeroes {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the clusters may be deallocated.
        unmap: bool,
    },
    /// `discard(off, len)`; workloads keep it cluster-aligned so it reads back as zeros.
    Discard {
        /// Guest offset (cluster-aligned).
        off: u64,
        /// Length in bytes (whole clusters).
        len: u64,
    },
    /// `write_compressed(off, pattern(seed, cluster_size))`.
    WriteCompressed {
        /// Guest offset (cluster-aligned).
        off: u64,
        /// Seed of the (compressible) data pattern.
        seed: u64,
    },
    /// `flush()`.
    Flush,
    /// `resize(size)` (grows the L1 table).
    Resize {
        /// The new virtual size.
        size: u64,
    },
    /// `close()` then a read-write open of the same storage.
    Reopen,
    /// `snapshot_create(name)`.
    SnapshotCreate(&'static str),
    /// `snapshot_apply(name)`: the guest contents revert to the snapshot's.
    SnapshotApply(&'static str),
    /// `snapshot_delete(name)`.
    SnapshotDelete(&'static str),
}

impl Step {
    /// The guest range the step changes, if any.
    pub fn range(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Step::Write { off, len, .. }
            | Step::WriteZeroes { off, len, .. }
            | Step::Discard { off, len } => Some((off, len)),
            Step::WriteCompressed { off, .. } => Some((off, cluster_size)),
            _ => None,
        }
    }

    /// Runs the step on `img` (a [`Step::Reopen`] is the runner's business and does
    /// nothing here).
    pub fn apply(&self, img: &mut Image) -> Result<(), ImageError> {
        let cs = img.cluster_size();
        match *self {
            Step::Write { off, len, seed } => img.write(off, &pattern(seed, len as usize)),
            Step::WriteZeroes { off, len, unmap } => img.write_zeroes(off, len, unmap),
            Step::Discard { off, len } => img.discard(off, len),
            Step::WriteCompressed { off, seed } => {
                img.write_compressed(off, &pattern(seed, cs as usize))
            }
            Step::Flush => img.flush(),
            Step::Resize { size } => img.resize(size),
            Step::Reopen => Ok(()),
            Step::SnapshotCreate(name) => img.snapshot_create(name).map(|_| ()),
            Step::SnapshotApply(name) => img.snapshot_apply(name),
            Step::SnapshotDelete(name) => img.snapshot_delete(name).map(|_| ()),
        }
    }

    /// The bytes the step leaves at its range when it succeeds.
    pub fn data(&self, cluster_size: u64) -> Option<Vec<u8>> {
        match *self {
            Step::Write { len, seed, .. } => Some(pattern(seed, len as usize)),
            Step::WriteZeroes { len, .. } | Step::Discard { len, .. } => {
                Some(vec![0; len as usize])
            }
            Step::WriteCompressed { seed, .. } => Some(pattern(seed, cluster_size as usize)),
            _ => None,
        }
    }

    /// A short name of the operation (for reports).
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Write { .. } => "write",
            Step::WriteZeroes { .. } => "write_zeroes",
            Step::Discard { .. } => "discard",
            Step::WriteCompressed { .. } => "write_compressed",
            Step::Flush => "flush",
            Step::Resize { .. } => "resize",
            Step::Reopen => "reopen",
            Step::SnapshotCreate(_) => "snapshot_create",
            Step::SnapshotApply(_) => "snapshot_apply",
            Step::SnapshotDelete(_) => "snapshot_delete",
        }
    }
}

/// A deterministic data pattern: compressible runs of random bytes, never all zero, so a
/// lost write or a cluster read from the wrong place shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_da7a);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let b = (rng.next_u64() as u8) | 1;
        let run = 1 + rng.below(48) as usize;
        for _ in 0..run.min(len - v.len()) {
            v.push(b);
        }
    }
    v
}

/// A named workload: how the image is created, a fault-free setup phase, and the steps under
/// test.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Name used in reports.
    pub name: &'static str,
    /// Create options of the image.
    pub create: CreateOptions,
    /// Guest size the model covers (the largest virtual size the workload reaches).
    pub guest_size: u64,
    /// Steps run before faults are armed (the image is closed cleanly after them).
    pub setup: Vec<Step>,
    /// The steps under test.
    pub steps: Vec<Step>,
    /// iotest 026 parts 4/5: a temporary `write_aio` failure must leave no leak at all.
    pub strict_write_aio_once: bool,
}

fn create(size: u64, cluster_size: u64, refcount_bits: u32, lazy: bool) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    o.lazy_refcounts = lazy;
    o
}

/// Allocating writes with 512-byte clusters and 64-bit refcounts: L2 allocation, refcount
/// block allocation, L1 growth (resize) and refcount-table growth (more than 2 MiB of host
/// clusters).
pub fn alloc_growth() -> Workload {
    let mut steps = vec![
        Step::Write {
            off: 0,
            len: 4096,
            seed: 1,
        },
        Step::Write {
            off: 100_000,
            len: 700,
            seed: 2,
        },
        Step::Flush,
        Step::Resize { size: 4 << 20 },
    ];
    // 40 x 64 KiB spread over 4 MiB: new L2 tables in the grown L1, many refcount blocks,
    // and a host file beyond the 2 MiB one reftable cluster describes.
    for i in 0..40u64 {
        steps.push(Step::Write {
            off: 256 * 1024 + i * 96 * 1024 + (i % 7) * 512,
            len: 64 * 1024,
            seed: 100 + i,
        });
        if i % 8 == 7 {
            steps.push(Step::Flush);
        }
    }
    steps.push(Step::Flush);
    Workload {
        name: "alloc-growth-512",
        create: create(256 << 10, 512, 64, false),
        guest_size: 4 << 20,
        setup: vec![],
        steps,
        strict_write_aio_once: false,
    }
}

/// Rewrites with copy-on-write: partial writes into allocated clusters (in place), into
/// compressed clusters (COW from the compressed data), and into unallocated clusters (COW
/// padding), after a reopen so that L2 tables are loaded from disk.
pub fn cow_rewrite() -> Workload {
    let cs = 4096;
    let mut setup = Vec::new();
    for c in 0..8u64 {
        setup.push(Step::WriteCompressed {
            off: c * cs,
            seed: 10 + c,
        });
    }
    setup.push(Step::Write {
        off: 16 * cs,
        len: 8 * cs,
        seed: 30,
    });
    let steps = vec![
        // In place into allocated clusters.
        Step::Write {
            off: 16 * cs + 100,
            len: 300,
            seed: 40,
        },
        // Into compressed clusters: COW of the compressed data, head and tail.
        Step::Write {
            off: cs + 512,
            len: 1024,
            seed: 41,
        },
        Step::Write {
            off: 3 * cs + 3000,
            len: 2 * cs,
            seed: 42,
        },
        Step::Flush,
        // Unallocated clusters: head and tail padding.
        Step::Write {
            off: 40 * cs + 777,
            len: 5000,
            seed: 43,
        },
        // Spanning allocated, compressed and unallocated clusters.
        Step::Write {
            off: 7 * cs + 10,
            len: 10 * cs,
            seed: 44,
        },
        Step::Flush,
        Step::Write {
            off: 200 * cs + 1,
            len: 100,
            seed: 45,
        },
        Step::Flush,
    ];
    Workload {
        name: "cow-rewrite-4k",
        create: create(2 << 20, cs, 16, false),
        guest_size: 2 << 20,
        setup,
        steps,
        strict_write_aio_once: false,
    }
}

/// Zero writes (with and without unmap) and discards, then writes that reuse the freed
/// clusters.
pub fn zero_discard() -> Workload {
    let cs = 65536;
    let setup = vec![Step::Write {
        off: 0,
        len: 16 * cs,
        seed: 50,
    }];
    let steps = vec![
        Step::WriteZeroes {
            off: 0,
            len: 2 * cs,
            unmap: true,
        },
        Step::WriteZeroes {
            off: 2 * cs + 512,
            len: 1024,
            unmap: false,
        },
        Step::WriteZeroes {
            off: 3 * cs,
            len: cs,
            unmap: false,
        },
        Step::Discard {
            off: 5 * cs,
            len: 3 * cs,
        },
        Step::Flush,
        Step::Write {
            off: 20 * cs,
            len: 3 * cs,
            seed: 51,
        },
        Step::Write {
            off: 3 * cs + 4096,
            len: 4096,
            seed: 52,
        },
        Step::Discard {
            off: 20 * cs,
            len: cs,
        },
        Step::WriteZeroes {
            off: 8 * cs,
            len: 4 * cs,
            unmap: true,
        },
        Step::Flush,
        Step::Write {
            off: 0,
            len: cs + 512,
            seed: 53,
        },
        Step::Flush,
    ];
    Workload {
        name: "zero-discard-64k",
        create: create(4 << 20, cs, 16, false),
        guest_size: 4 << 20,
        setup,
        steps,
        strict_write_aio_once: false,
    }
}

/// Compressed writes: fresh clusters, over compressed clusters (freeing compressed bytes),
/// over normal clusters, with a 1 KiB cluster size so the byte allocator fills clusters.
pub fn compressed() -> Workload {
    let cs = 1024;
    let setup = vec![Step::Write {
        off: 32 * cs,
        len: 4 * cs,
        seed: 60,
    }];
    let mut steps = Vec::new();
    for c in 0..12u64 {
        steps.push(Step::WriteCompressed {
            off: c * cs,
            seed: 61 + c,
        });
    }
    steps.push(Step::Flush);
    for c in [0u64, 3, 33, 34] {
        steps.push(Step::WriteCompressed {
            off: c * cs,
            seed: 80 + c,
        });
    }
    steps.push(Step::Discard {
        off: 5 * cs,
        len: cs,
    });
    steps.push(Step::Flush);
    Workload {
        name: "compressed-1k",
        create: create(1 << 20, cs, 16, false),
        guest_size: 1 << 20,
        setup,
        steps,
        strict_write_aio_once: false,
    }
}

/// iotest 026 parts 1 and 4: 128 KiB writes with 1 KiB clusters (an existing L2, a new L2
/// and refcount block far away), and 1 MiB writes with 64 KiB clusters. A temporary data
/// write failure must leak nothing.
pub fn iotest026() -> Workload {
    let setup = vec![Step::Write {
        off: 0,
        len: 512,
        seed: 90,
    }];
    let steps = vec![
        Step::Write {
            off: 0,
            len: 128 << 10,
            seed: 91,
        },
        Step::Write {
            off: 48 << 20,
            len: 128 << 10,
            seed: 92,
        },
        Step::Flush,
    ];
    Workload {
        name: "iotest026-1k",
        create: create(64 << 20, 1024, 16, false),
        guest_size: 64 << 20,
        setup,
        steps,
        strict_write_aio_once: true,
    }
}

/// Lazy refcounts: the dirty bit is set before postponed refcount updates; a crash leaves
/// a dirty image that must be repaired.
pub fn lazy_refcounts() -> Workload {
    let cs = 4096;
    let setup = vec![Step::Write {
        off: 0,
        len: 4 * cs,
        seed: 70,
    }];
    let mut steps = Vec::new();
    for i in 0..10u64 {
        steps.push(Step::Write {
            off: (i * 37 % 200) * cs + 100,
            len: 3 * cs,
            seed: 71 + i,
        });
        if i % 3 == 2 {
            steps.push(Step::Flush);
        }
    }
    steps.push(Step::Discard {
        off: 0,
        len: 2 * cs,
    });
    steps.push(Step::Flush);
    Workload {
        name: "lazy-refcounts-4k",
        create: create(1 << 20, cs, 16, true),
        guest_size: 1 << 20,
        setup,
        steps,
        strict_write_aio_once: false,
    }
}

/// Internal snapshots: create, rewrites of clusters shared with a snapshot (COW, COPIED
/// cleared), apply (revert) and delete.
pub fn snapshots() -> Workload {
    let cs = 4096;
    let setup = vec![
        Step::Write {
            off: 0,
            len: 16 * cs,
            seed: 200,
        },
        Step::WriteCompressed {
            off: 20 * cs,
            seed: 201,
        },
    ];
    let steps = vec![
        Step::SnapshotCreate("s1"),
        // Partial and whole writes into clusters shared with s1.
        Step::Write {
            off: 100,
            len: 300,
            seed: 202,
        },
        Step::Write {
            off: 4 * cs,
            len: 2 * cs,
            seed: 203,
        },
        Step::Write {
            off: 20 * cs + 10,
            len: 100,
            seed: 204,
        },
        Step::Flush,
        Step::SnapshotCreate("s2"),
        Step::Discard {
            off: 8 * cs,
            len: 2 * cs,
        },
        Step::Write {
            off: 30 * cs,
            len: cs,
            seed: 205,
        },
        Step::SnapshotApply("s1"),
        Step::Write {
            off: 2 * cs + 5,
            len: 500,
            seed: 206,
        },
        Step::Flush,
        Step::SnapshotDelete("s2"),
        Step::Write {
            off: 6 * cs,
            len: cs,
            seed: 207,
        },
        Step::SnapshotDelete("s1"),
        Step::Flush,
    ];
    Workload {
        name: "snapshots-4k",
        create: create(1 << 20, cs, 16, false),
        guest_size: 1 << 20,
        setup,
        steps,
        strict_write_aio_once: false,
    }
}

/// A seeded random mix of every operation (used by the long crash run).
pub fn random_mix(seed: u64) -> Workload {
    let mut rng = SplitMix64::new(seed);
    let cs = [512u64, 1024, 4096, 65536][rng.below(4) as usize];
    let refcount_bits = [1u32, 2, 4, 8, 16, 32, 64][rng.below(7) as usize];
    let lazy = rng.below(4) == 0;
    let size = 2u64 << 20;
    let mut steps = Vec::new();
    let n = 12 + rng.below(20);
    for i in 0..n {
        let off = rng.below(size - 1);
        let max = (size - off).min(4 * cs + 8192);
        let len = 1 + rng.below(max);
        let c_off = rng.below(size / cs) * cs;
        let step = match rng.below(100) {
            0..=49 => Step::Write {
                off,
                len,
                seed: seed.wrapping_mul(1000) + i,
            },
            50..=59 => Step::WriteZeroes {
                off,
                len,
                unmap: rng.coin(),
            },
            60..=69 => Step::Discard {
                off: c_off,
                len: (1 + rng.below(4)).min((size - c_off) / cs) * cs,
            },
            70..=79 => Step::WriteCompressed {
                off: c_off,
                seed: seed.wrapping_mul(1000) + i,
            },
            80..=95 => Step::Flush,
            _ => Step::Reopen,
        };
        steps.push(step);
    }
    steps.push(Step::Flush);
    Workload {
        name: "random-mix",
        create: create(size, cs, refcount_bits, lazy),
        guest_size: size,
        setup: vec![],
        steps,
        strict_write_aio_once: false,
    }
}

/// Every fixed workload of the matrix and the crash exploration.
pub fn all() -> Vec<Workload> {
    vec![
        alloc_growth(),
        cow_rewrite(),
        zero_discard(),
        compressed(),
        iotest026(),
        lazy_refcounts(),
        snapshots(),
    ]
}

/// What the guest may expect to read back: the acknowledged contents, the contents made
/// durable by the last successful flush, and which bytes are uncertain.
#[derive(Debug, Clone)]
pub struct Model {
    /// The contents after every acknowledged operation.
    pub current: Vec<u8>,
    /// `current[i]` is certain: false after a failed operation touched byte `i`.
    pub current_known: Vec<bool>,
    /// The contents at the last successful flush.
    pub durable: Vec<u8>,
    /// `durable[i]` is certain.
    pub durable_known: Vec<bool>,
    /// Byte `i` was touched (by any operation, failed or not, or in flight) since the last
    /// successful flush: after a crash it may hold the old, the new or a mix.
    pub touched: Vec<bool>,
    /// Guest contents (and certainty) of each internal snapshot, by name.
    pub snapshots: std::collections::BTreeMap<&'static str, (Vec<u8>, Vec<bool>)>,
}

impl Model {
    /// A model of a guest of `size` zero bytes, all durable.
    pub fn new(size: u64) -> Self {
        let n = size as usize;
        Self {
            current: vec![0; n],
            current_known: vec![true; n],
            durable: vec![0; n],
            durable_known: vec![true; n],
            touched: vec![false; n],
            snapshots: Default::default(),
        }
    }

    fn span(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let n = self.current.len() as u64;
        let s = off.min(n) as usize;
        let e = off.saturating_add(len).min(n) as usize;
        s..e
    }

    /// Marks the range of `step` as in flight (call before running it).
    pub fn begin(&mut self, step: &Step, cluster_size: u64) {
        if let Step::SnapshotApply(_) = step {
            self.touched.fill(true);
        }
        if let Some((off, len)) = step.range(cluster_size) {
            let r = self.span(off, len);
            self.touched[r].fill(true);
        }
    }

    /// Records the outcome of `step`.
    pub fn finish(&mut self, step: &Step, cluster_size: u64, ok: bool) {
        match step {
            Step::Flush if ok => self.flushed(),
            Step::Flush | Step::SnapshotCreate(_) | Step::SnapshotDelete(_) if !ok => {}
            Step::SnapshotCreate(name) => {
                let snap = (self.current.clone(), self.current_known.clone());
                self.snapshots.insert(name, snap);
            }
            Step::SnapshotDelete(name) => {
                self.snapshots.remove(name);
            }
            Step::SnapshotApply(name) => match self.snapshots.get(name) {
                Some((data, known)) if ok => {
                    self.current.copy_from_slice(data);
                    self.current_known.copy_from_slice(known);
                }
                _ => self.current_known.fill(false),
            },
            _ => {
                if let (Some((off, len)), Some(data)) =
                    (step.range(cluster_size), step.data(cluster_size))
                {
                    let r = self.span(off, len);
                    let k = r.len();
                    if ok {
                        self.current[r.clone()].copy_from_slice(&data[..k]);
                        self.current_known[r].fill(true);
                    } else {
                        self.current_known[r].fill(false);
                    }
                }
            }
        }
    }

    /// A successful flush: everything acknowledged is durable.
    pub fn flushed(&mut self) {
        self.durable.copy_from_slice(&self.current);
        self.durable_known.copy_from_slice(&self.current_known);
        self.touched.fill(false);
    }

    /// A clean close succeeded: the same as a flush.
    pub fn closed(&mut self) {
        self.flushed();
    }

    /// First byte where `read` (the guest contents from 0) disagrees with what must have
    /// survived: with `after_clean_close`, every certain acknowledged byte; otherwise every
    /// certain durable byte not touched since the last flush.
    pub fn first_mismatch(&self, read: &[u8], after_clean_close: bool) -> Option<usize> {
        let n = read.len().min(self.current.len());
        (0..n).find(|&i| {
            if after_clean_close {
                self.current_known[i] && read[i] != self.current[i]
            } else {
                self.durable_known[i] && !self.touched[i] && read[i] != self.durable[i]
            }
        })
    }
}
