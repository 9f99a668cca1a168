//! The workloads: what is timed, on which prepared image, with which command line.
//!
//! Both sides run the same argument list; only the program differs (`qcow2` or `qemu-img`).
//! Input images are made once per benchmark by qemu-img (a "template") and each mutating run
//! gets a fresh sparse copy of it, made and fsynced outside the timed region.

use std::ffi::OsString;
use std::path::Path;

use super::files;
use super::process::run_str;
use crate::util::fmt_bytes;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The bench pattern byte (decimal, so that any parser accepts it): never all-zero data.
const PATTERN: &str = "165";

/// A prepared input file, built once with qemu-img (or plain Rust for raw files).
#[derive(Debug, Clone, PartialEq)]
pub enum Template {
    /// A fresh, empty qcow2 image.
    Empty {
        /// Cluster size in bytes.
        cluster: u64,
        /// Virtual size in bytes.
        size: u64,
    },
    /// A qcow2 image with every cluster allocated (`preallocation=metadata`: L2 entries and
    /// refcounts for the whole disk, data clusters left sparse in the host file).
    Prealloc {
        /// Cluster size in bytes.
        cluster: u64,
        /// Virtual size in bytes.
        size: u64,
        /// Internal snapshot to take after preallocating, if any.
        snapshot: Option<&'static str>,
    },
    /// A qcow2 image whose whole virtual size was written with real data.
    Written {
        /// Cluster size in bytes.
        cluster: u64,
        /// Virtual size in bytes.
        size: u64,
    },
    /// A 64 KiB-cluster image written in full, then `count` rounds of (internal snapshot,
    /// rewrite of a tenth of the disk at a moving offset).
    Snapshots {
        /// Virtual size in bytes.
        size: u64,
        /// Number of internal snapshots.
        count: u32,
    },
    /// A raw file of compressible, text-like data.
    Compressible {
        /// File size in bytes.
        size: u64,
    },
    /// A raw file of one repeated non-zero byte, written to disk.
    Raw {
        /// File size in bytes.
        size: u64,
    },
    /// A backing chain (64 KiB clusters): the template file is the overlay; the other
    /// images sit beside it and are named relatively (see [`Template::companions`]).
    Chain {
        /// Which chain.
        kind: ChainKind,
        /// Virtual size of every image in bytes.
        size: u64,
    },
}

/// The chains of the rebase, commit and convert -B workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// `rb-old` (written in full) <- overlay (an eighth written); `rb-new` (the first half
    /// as `rb-old`, the second half different) to rebase onto.
    Rebase,
    /// `cm-base` (the first half written) <- overlay (a quarter written across the middle),
    /// committed into the base.
    Commit,
}

impl ChainKind {
    fn prefix(self) -> &'static str {
        match self {
            ChainKind::Rebase => "rb",
            ChainKind::Commit => "cm",
        }
    }
}

impl Template {
    /// A file name that identifies this template (templates are shared between workloads).
    pub fn key(&self) -> String {
        match self {
            Template::Empty { cluster, size } => format!("empty-c{cluster}-{size}.qcow2"),
            Template::Prealloc {
                cluster,
                size,
                snapshot,
            } => format!(
                "prealloc-c{cluster}-{size}{}.qcow2",
                snapshot.map(|s| format!("-snap-{s}")).unwrap_or_default()
            ),
            Template::Written { cluster, size } => format!("written-c{cluster}-{size}.qcow2"),
            Template::Snapshots { size, count } => format!("snapshots-{count}-{size}.qcow2"),
            Template::Compressible { size } => format!("compressible-{size}.raw"),
            Template::Raw { size } => format!("pattern-{size}.raw"),
            Template::Chain { kind, size } => format!("{}-top-{size}.qcow2", kind.prefix()),
        }
    }

    /// Images the template's file names by relative name, as (file name in the templates
    /// directory, name the run directory needs it under, whether a run modifies it: then
    /// each run gets a fresh copy, else a symbolic link).
    pub fn companions(&self) -> Vec<(String, String, bool)> {
        match self {
            Template::Chain {
                kind: ChainKind::Rebase,
                size,
            } => vec![
                (format!("rb-old-{size}.qcow2"), "rb-old.qcow2".into(), false),
                (format!("rb-new-{size}.qcow2"), "rb-new.qcow2".into(), false),
            ],
            Template::Chain {
                kind: ChainKind::Commit,
                size,
            } => vec![(
                format!("cm-base-{size}.qcow2"),
                "cm-base.qcow2".into(),
                true,
            )],
            _ => Vec::new(),
        }
    }

    /// What the template is, in words.
    pub fn describe(&self) -> String {
        match self {
            Template::Empty { cluster, size } => format!(
                "empty {} image, {} clusters",
                fmt_bytes(*size),
                fmt_bytes(*cluster)
            ),
            Template::Prealloc {
                cluster,
                size,
                snapshot,
            } => format!(
                "{} image, {} clusters, all {} allocated (preallocation=metadata){}",
                fmt_bytes(*size),
                fmt_bytes(*cluster),
                size / cluster,
                snapshot
                    .map(|s| format!(", snapshot '{s}'"))
                    .unwrap_or_default()
            ),
            Template::Written { cluster, size } => format!(
                "{} image, {} clusters, fully written",
                fmt_bytes(*size),
                fmt_bytes(*cluster)
            ),
            Template::Snapshots { size, count } => format!(
                "{} image, 64 KiB clusters, fully written, {count} snapshots each followed by a rewrite of a tenth",
                fmt_bytes(*size)
            ),
            Template::Compressible { size } => {
                format!("{} raw file of compressible text", fmt_bytes(*size))
            }
            Template::Raw { size } => format!("{} raw file", fmt_bytes(*size)),
            Template::Chain {
                kind: ChainKind::Rebase,
                size,
            } => format!(
                "{0} overlay (an eighth written) on a fully written {0} base, and a second {0} base differing in its second half",
                fmt_bytes(*size)
            ),
            Template::Chain {
                kind: ChainKind::Commit,
                size,
            } => format!(
                "{0} overlay (a quarter written) on a {0} base (first half written)",
                fmt_bytes(*size)
            ),
        }
    }

    /// Builds the template at `path` with `qemu_img`, and makes it durable.
    pub fn build(&self, qemu_img: &Path, path: &Path) -> Result<(), String> {
        let p = path.to_string_lossy().into_owned();
        let create = |opts: String, size: u64| {
            run_str(
                qemu_img,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    &p,
                    &size.to_string(),
                ],
            )
        };
        // qemu-img writes `pattern` in 64 KiB requests over [from, from + len) of `file`.
        let fill_at = |file: &str, from: u64, len: u64, pattern: u32| {
            run_str(
                qemu_img,
                &[
                    "bench",
                    "-q",
                    "-w",
                    "-t",
                    "writeback",
                    "-s",
                    "65536",
                    "-o",
                    &from.to_string(),
                    "-c",
                    &(len / (64 * KIB)).to_string(),
                    "--pattern",
                    &pattern.to_string(),
                    file,
                ],
            )
        };
        let fill = |from: u64, len: u64, pattern: u32| fill_at(&p, from, len, pattern);
        match self {
            Template::Empty { cluster, size } => {
                create(format!("cluster_size={cluster}"), *size)?;
            }
            Template::Prealloc {
                cluster,
                size,
                snapshot,
            } => {
                create(
                    format!("cluster_size={cluster},preallocation=metadata"),
                    *size,
                )?;
                if let Some(s) = snapshot {
                    run_str(qemu_img, &["snapshot", "-c", s, &p])?;
                }
            }
            Template::Written { cluster, size } => {
                create(format!("cluster_size={cluster}"), *size)?;
                fill(0, *size, 165)?;
            }
            Template::Snapshots { size, count } => {
                create("cluster_size=65536".to_string(), *size)?;
                fill(0, *size, 1)?;
                let len = (size / 10).next_multiple_of(64 * KIB).min(*size);
                let span = (size - len).max(1);
                for i in 1..=*count {
                    run_str(qemu_img, &["snapshot", "-c", &format!("snap{i}"), &p])?;
                    let from = (u64::from(i) * (size / 20) % span) / (64 * KIB) * (64 * KIB);
                    fill(from, len, (i % 250) + 2)?;
                }
            }
            Template::Compressible { size } => files::write_compressible(path, *size)?,
            Template::Raw { size } => files::write_pattern(path, *size, 0xa5)?,
            Template::Chain { kind, size } => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let other = |name: &str| dir.join(name).to_string_lossy().into_owned();
                let create_in = |file: &str, backing: Option<&str>| {
                    let mut a = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"];
                    if let Some(b) = backing {
                        a.extend(["-b", b, "-F", "qcow2"]);
                    }
                    let sz = size.to_string();
                    a.extend([file, sz.as_str()]);
                    run_str(qemu_img, &a)
                };
                let companions = self.companions();
                let (cfile, cname) = (&companions[0].0, &companions[0].1);
                let base = other(cfile);
                create_in(&base, None)?;
                let half = (size / 2) / (64 * KIB) * (64 * KIB);
                match kind {
                    ChainKind::Rebase => {
                        fill_at(&base, 0, *size, 1)?;
                        let new = other(&companions[1].0);
                        create_in(&new, None)?;
                        fill_at(&new, 0, half, 1)?;
                        fill_at(&new, half, size - half, 2)?;
                    }
                    ChainKind::Commit => {
                        fill_at(&base, 0, half, 1)?;
                    }
                }
                // The overlay names its base by the name it has in the run directory; the
                // templates directory holds the same name as a link.
                let link = dir.join(cname);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(cfile, &link)
                    .map_err(|e| format!("{}: {e}", link.display()))?;
                create_in(&p, Some(cname))?;
                let (from, len) = match kind {
                    ChainKind::Rebase => (size / 4, size / 8),
                    ChainKind::Commit => (size * 3 / 8, size / 4),
                };
                let from = from / (64 * KIB) * (64 * KIB);
                let len = (len / (64 * KIB) * (64 * KIB)).max(64 * KIB);
                fill(from, len, 3)?;
                for (file, _, _) in &companions {
                    files::fsync_path(&dir.join(file))?;
                }
            }
        }
        files::fsync_path(path)
    }
}

/// One argument of a workload's command line.
#[derive(Debug, Clone)]
pub enum Arg {
    /// A literal argument.
    Lit(String),
    /// The run's input image (a fresh copy, or the shared read-only template).
    Image,
    /// The run's output file (created by the command).
    Output,
    /// A literal that differs between the sides (our engine and QEMU's named differently,
    /// e.g. `-i io_uring` against `-i native`).
    PerSide {
        /// Our argument.
        ours: String,
        /// qemu-img's argument.
        qemu: String,
    },
}

/// What a workload times.
#[derive(Debug, Clone)]
pub enum Kind {
    /// The same command line run by `qcow2` and by `qemu-img`.
    Pair {
        /// The `qcow2` subcommand it needs.
        needs: &'static str,
        /// The argument list, starting with the subcommand.
        args: Vec<Arg>,
        /// Whether each run gets a fresh copy of the template (it modifies it) or shares
        /// the template read-only.
        fresh_copy: bool,
        /// Whether the command creates an output file; its fsync is then part of the timed
        /// region (qemu-img convert does not flush by default, so both sides pay the same).
        output: bool,
        /// Whether the input is dropped from the page cache before each run (reads with cache
        /// mode `none`: a side that reads through the page cache reads from the disk too).
        evict_input: bool,
    },
    /// The same client command line (`qemu-img bench` on an NBD URI, `Arg::Image` standing
    /// for it) timed against `qcow2 serve` and `qemu-nbd`, each serving a fresh copy of the
    /// template (see `nbd.rs`).
    Served {
        /// The client's argument list.
        args: Vec<Arg>,
        /// The export is read-only (`-r`); its template is then shared, not copied.
        read_only: bool,
    },
    /// The physical floor: a plain file written with buffered writes plus fdatasync.
    FloorWrite,
    /// The physical floor: the template raw file read from a cold page cache.
    FloorRead,
}

/// A named, sized workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name used on the command line and in the outputs.
    pub name: &'static str,
    /// What it does, with its sizes.
    pub title: String,
    /// The input it starts from.
    pub template: Option<Template>,
    /// What is timed.
    pub kind: Kind,
    /// Guest (or file) bytes moved, for throughput; 0 when not meaningful.
    pub bytes: u64,
    /// The floor workload to read this one against.
    pub floor: Option<&'static str>,
}

impl Workload {
    /// The `qcow2` subcommand this workload needs, if it runs one.
    pub fn needs(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::Pair { needs, .. } => Some(needs),
            Kind::Served { .. } => Some("serve"),
            _ => None,
        }
    }

    /// The command line (after the program) for the given side, input and output paths.
    pub fn command_args(&self, qemu: bool, image: &Path, output: &Path) -> Vec<OsString> {
        match &self.kind {
            Kind::Pair { args, .. } => args
                .iter()
                .map(|a| match a {
                    Arg::Lit(s) => OsString::from(s),
                    Arg::Image => image.as_os_str().to_owned(),
                    Arg::Output => output.as_os_str().to_owned(),
                    Arg::PerSide { ours, qemu: q } => OsString::from(if qemu { q } else { ours }),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The command line as text, with `IMG` / `OUT` placeholders.
    pub fn command_text(&self, program: &str) -> String {
        match &self.kind {
            Kind::Served { args, read_only } => {
                let server = if program == "qcow2" {
                    "qcow2 serve"
                } else {
                    "qemu-nbd"
                };
                let mut s = String::from("qemu-img");
                for a in args {
                    s.push(' ');
                    s.push_str(match a {
                        Arg::Lit(l) => l,
                        Arg::PerSide { ours, qemu } => {
                            if program == "qcow2" {
                                ours
                            } else {
                                qemu
                            }
                        }
                        Arg::Image | Arg::Output => "nbd+unix:///?socket=SOCK",
                    });
                }
                s.push_str(&format!(
                    " (SOCK: {server} -t -f qcow2 -k SOCK{} IMG)",
                    if *read_only { " -r" } else { "" }
                ));
                s
            }
            Kind::Pair { args, .. } => {
                let mut s = program.to_string();
                for a in args {
                    s.push(' ');
                    s.push_str(match a {
                        Arg::Lit(l) => l,
                        Arg::Image => "IMG",
                        Arg::Output => "OUT",
                        Arg::PerSide { ours, qemu } => {
                            if program == "qemu-img" {
                                qemu
                            } else {
                                ours
                            }
                        }
                    });
                }
                s
            }
            Kind::FloorWrite => {
                "(in-process) create OUT, buffered 1 MiB writes, fdatasync".to_string()
            }
            Kind::FloorRead => {
                "(in-process) drop IMG from the page cache, read it in 1 MiB requests".to_string()
            }
        }
    }
}

/// Benchmark-wide parameters the workloads depend on.
#[derive(Debug, Clone)]
pub struct Params {
    /// Size multiplier applied to every workload's base size.
    pub scale: f64,
    /// Cache mode for `bench` (`none` if the temp dir supports O_DIRECT, else `writeback`).
    pub cache: String,
    /// Queue depth for `bench` (`-d`).
    pub depth: u32,
}

/// `base * scale`, rounded to a multiple of `align` and at least `min`.
pub(super) fn scaled(base: u64, scale: f64, align: u64, min: u64) -> u64 {
    let v = (base as f64 * scale).round() as u64;
    (v / align * align).max(min)
}

pub(super) fn lits(items: &[&str]) -> Vec<Arg> {
    items.iter().map(|s| Arg::Lit((*s).to_string())).collect()
}

/// A multiplier for the scattering step of random writes that is coprime to `m` (small
/// enough that 64 KiB times it fits qemu-img bench's step limit of 2^31 - 1).
pub(super) fn coprime_multiplier(m: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    [7_919u64, 1_009, 101, 13, 7, 5, 3]
        .into_iter()
        .find(|p| gcd(*p, m) == 1 && p % m.max(1) > 1)
        .unwrap_or(1)
}

/// Every workload, sized by `params`, in the order they run.
pub fn all(params: &Params) -> Vec<Workload> {
    let s = params.scale;
    let big = scaled(GIB, s, MIB, MIB);
    let c512 = scaled(64 * MIB, s, MIB, MIB);
    let huge = scaled(2 * GIB, s, MIB, 2 * MIB);
    let cache = params.cache.as_str();
    let depth = params.depth.to_string();
    let mut w = Vec::new();

    let seq_write = |name: &'static str, cluster: u64, size: u64| {
        let count = (size / (64 * KIB)).to_string();
        let mut args = lits(&[
            "bench", "-w", "-t", cache, "-d", &depth, "-s", "65536", "-c", &count,
        ]);
        args.extend(lits(&["--pattern", PATTERN]));
        args.push(Arg::Image);
        Workload {
            name,
            title: format!(
                "sequential allocating writes, 64 KiB requests, {} clusters, {}",
                fmt_bytes(cluster),
                fmt_bytes(size)
            ),
            template: Some(Template::Empty { cluster, size }),
            kind: Kind::Pair {
                needs: "bench",
                args,
                fresh_copy: true,
                output: false,
                evict_input: false,
            },
            bytes: size,
            floor: Some("floor-write"),
        }
    };
    w.push(Workload {
        name: "floor-write",
        title: format!(
            "physical floor: plain file, buffered writes + fdatasync, {}",
            fmt_bytes(big)
        ),
        template: None,
        kind: Kind::FloorWrite,
        bytes: big,
        floor: None,
    });
    w.push(Workload {
        name: "floor-read",
        title: format!(
            "physical floor: plain file, cold page cache, buffered reads, {}",
            fmt_bytes(big)
        ),
        template: Some(Template::Raw { size: big }),
        kind: Kind::FloorRead,
        bytes: big,
        floor: None,
    });
    w.push(seq_write("seq-write-c64k", 64 * KIB, big));
    w.push(seq_write("seq-write-c4k", 4 * KIB, big));
    w.push(seq_write("seq-write-c512", 512, c512));

    // Random 4 KiB writes, one per 64 KiB cluster, in a scattered order: with an image of
    // m clusters plus 4 KiB, qemu-img bench's offset (k * step) mod (size - 4 KiB) visits
    // cluster starts (k * p) mod m, all distinct for a p coprime to m.
    let clusters = big / (64 * KIB);
    let writes = (clusters / 2).max(1);
    let step = 64 * KIB * coprime_multiplier(clusters);
    let mut args = lits(&[
        "bench",
        "-w",
        "-t",
        cache,
        "-d",
        &depth,
        "-s",
        "4096",
        "-S",
        &step.to_string(),
        "-c",
        &writes.to_string(),
        "--pattern",
        PATTERN,
    ]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "rand-write-4k",
        title: format!(
            "random allocating 4 KiB writes, {writes} of them, one per 64 KiB cluster, {} image",
            fmt_bytes(big)
        ),
        template: Some(Template::Empty {
            cluster: 64 * KIB,
            size: big + 4 * KIB,
        }),
        kind: Kind::Pair {
            needs: "bench",
            args,
            fresh_copy: true,
            output: false,
            evict_input: false,
        },
        bytes: writes * 4 * KIB,
        floor: Some("floor-write"),
    });

    let count = (big / (64 * KIB)).to_string();
    let mut args = lits(&[
        "bench",
        "-w",
        "-t",
        cache,
        "-d",
        &depth,
        "-s",
        "65536",
        "-c",
        &count,
        "--pattern",
        PATTERN,
    ]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "rewrite-64k",
        title: format!(
            "sequential 64 KiB rewrites of an allocated image (preallocation=metadata), {}",
            fmt_bytes(big)
        ),
        template: Some(Template::Prealloc {
            cluster: 64 * KIB,
            size: big,
            snapshot: None,
        }),
        kind: Kind::Pair {
            needs: "bench",
            args,
            fresh_copy: true,
            output: false,
            evict_input: false,
        },
        bytes: big,
        floor: Some("floor-write"),
    });

    let mut args = lits(&[
        "bench", "-t", cache, "-d", &depth, "-s", "65536", "-c", &count,
    ]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "seq-read-64k",
        title: format!(
            "sequential 64 KiB reads of a written image, {}",
            fmt_bytes(big)
        ),
        template: Some(Template::Written {
            cluster: 64 * KIB,
            size: big,
        }),
        kind: Kind::Pair {
            needs: "bench",
            args,
            fresh_copy: false,
            output: false,
            evict_input: cache == "none",
        },
        bytes: big,
        floor: Some("floor-read"),
    });

    // Random 4 KiB reads of a written image with one and with 32 requests in flight: what
    // concurrent I/O buys (the engine's data reads run outside its metadata lock). The step
    // is 4 KiB times an odd number, so every request reads a block no other request read
    // (the image size is a power of two).
    let blocks = big / (4 * KIB);
    let reads = (blocks / 8).max(16);
    let step = 4 * KIB * coprime_multiplier(blocks);
    for (name, d) in [("rand-read-4k-d1", "1"), ("rand-read-4k-d32", "32")] {
        let mut args = lits(&[
            "bench",
            "-t",
            cache,
            "-d",
            d,
            "-s",
            "4096",
            "-S",
            &step.to_string(),
            "-c",
            &reads.to_string(),
        ]);
        args.push(Arg::Image);
        w.push(Workload {
            name,
            title: format!(
                "random 4 KiB reads of a written image, {d} in flight, {reads} of them, {}",
                fmt_bytes(big)
            ),
            template: Some(Template::Written {
                cluster: 64 * KIB,
                size: big,
            }),
            kind: Kind::Pair {
                needs: "bench",
                args,
                fresh_copy: false,
                output: false,
                evict_input: cache == "none",
            },
            bytes: reads * 4 * KIB,
            floor: Some("floor-read"),
        });
    }

    // The same random reads with few threads and many requests in flight: ours through
    // io_uring (`-i io_uring`: a ring per CPU, requests planned under the metadata lock,
    // data through the ring) against qemu-img with io_uring and with Linux native AIO, at
    // 8 and 64 in flight.
    for (name, d, qemu_aio) in [
        ("rand-read-4k-uring-d8", "8", "io_uring"),
        ("rand-read-4k-uring-native-d8", "8", "native"),
        ("rand-read-4k-uring-d64", "64", "io_uring"),
        ("rand-read-4k-uring-native-d64", "64", "native"),
    ] {
        let mut args = lits(&["bench", "-i"]);
        args.push(Arg::PerSide {
            ours: "io_uring".into(),
            qemu: qemu_aio.into(),
        });
        args.extend(lits(&[
            "-t",
            cache,
            "-d",
            d,
            "-s",
            "4096",
            "-S",
            &step.to_string(),
            "-c",
            &reads.to_string(),
        ]));
        args.push(Arg::Image);
        w.push(Workload {
            name,
            title: format!(
                "random 4 KiB reads of a written image, {d} in flight, {reads} of them, {}; ours -i io_uring, qemu-img -i {qemu_aio}",
                fmt_bytes(big)
            ),
            template: Some(Template::Written {
                cluster: 64 * KIB,
                size: big,
            }),
            kind: Kind::Pair {
                needs: "bench",
                args,
                fresh_copy: false,
                output: false,
                evict_input: cache == "none",
            },
            bytes: reads * 4 * KIB,
            floor: Some("floor-read"),
        });
    }

    // Serving over NBD (issue 16): the same QEMU client against qcow2 serve and qemu-nbd.
    w.extend(super::nbd::workloads(params));

    // compare and measure (issue 18): whole-image reads and block-status walks.
    for (name, what, mut args) in [
        (
            "compare",
            "compare of a written image with itself (two opens, every byte read twice)",
            lits(&["compare"]),
        ),
        (
            "measure",
            "measure -O qcow2 of a written image",
            lits(&["measure", "-O", "qcow2"]),
        ),
    ] {
        args.push(Arg::Image);
        if name == "compare" {
            args.push(Arg::Image);
        }
        w.push(Workload {
            name,
            title: format!("{what}, {}", fmt_bytes(big)),
            template: Some(Template::Written {
                cluster: 64 * KIB,
                size: big,
            }),
            kind: Kind::Pair {
                needs: name,
                args,
                fresh_copy: false,
                output: false,
                evict_input: false,
            },
            bytes: if name == "compare" { 2 * big } else { 0 },
            floor: None,
        });
    }

    // rebase, commit and convert -B (issue 18): backing chains.
    let chain = |kind| Template::Chain { kind, size: big };
    let mut args = lits(&["rebase", "-b", "rb-new.qcow2", "-F", "qcow2"]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "rebase",
        title: format!(
            "safe rebase of an overlay onto a different base (half of it differs), {}",
            fmt_bytes(big)
        ),
        template: Some(chain(ChainKind::Rebase)),
        kind: Kind::Pair {
            needs: "rebase",
            args,
            fresh_copy: true,
            output: false,
            evict_input: false,
        },
        bytes: big,
        floor: None,
    });
    let mut args = lits(&["commit"]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "commit",
        title: format!(
            "commit of an overlay with {} written into its base, {}",
            fmt_bytes(big / 4),
            fmt_bytes(big)
        ),
        template: Some(chain(ChainKind::Commit)),
        kind: Kind::Pair {
            needs: "commit",
            args,
            fresh_copy: true,
            output: false,
            evict_input: false,
        },
        bytes: big / 4,
        floor: None,
    });
    let mut args = lits(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "cm-base.qcow2",
        "-F",
        "qcow2",
    ]);
    args.push(Arg::Image);
    args.push(Arg::Output);
    w.push(Workload {
        name: "convert-B",
        title: format!(
            "convert -B of an overlay ({} written) onto its base, output fsynced, {}",
            fmt_bytes(big / 4),
            fmt_bytes(big)
        ),
        template: Some(chain(ChainKind::Commit)),
        kind: Kind::Pair {
            needs: "convert",
            args,
            fresh_copy: false,
            output: true,
            evict_input: false,
        },
        bytes: big / 4,
        floor: None,
    });

    for (name, zstd) in [("convert-zlib", false), ("convert-zstd", true)] {
        let mut args = lits(&["convert", "-c", "-O", "qcow2"]);
        if zstd {
            args.extend(lits(&["-o", "compression_type=zstd"]));
        }
        args.push(Arg::Image);
        args.push(Arg::Output);
        w.push(Workload {
            name,
            title: format!(
                "compressed convert ({}) of a {} compressible raw file, output fsynced",
                if zstd { "zstd" } else { "zlib" },
                fmt_bytes(big)
            ),
            template: Some(Template::Compressible { size: big }),
            kind: Kind::Pair {
                needs: "convert",
                args,
                fresh_copy: false,
                output: true,
                evict_input: false,
            },
            bytes: big,
            floor: None,
        });
    }

    let check = |name: &'static str, title: String, template: Template| {
        let mut args = lits(&["check"]);
        args.push(Arg::Image);
        Workload {
            name,
            title,
            template: Some(template),
            kind: Kind::Pair {
                needs: "check",
                args,
                fresh_copy: false,
                output: false,
                evict_input: false,
            },
            bytes: 0,
            floor: None,
        }
    };
    let prealloc = |snapshot| Template::Prealloc {
        cluster: 4 * KIB,
        size: huge,
        snapshot,
    };
    w.push(check(
        "check-500k",
        format!(
            "check of a {}-cluster image (4 KiB clusters, {} allocated)",
            huge / (4 * KIB),
            fmt_bytes(huge)
        ),
        prealloc(None),
    ));
    // The same number of clusters at 512 bytes: tables are small and scattered between
    // the data, so this is the case where batching reads must not read the data too.
    w.push(check(
        "check-500k-c512",
        format!(
            "check of a {}-cluster image (512 B clusters, {} allocated)",
            huge / (4 * KIB),
            fmt_bytes(huge / 8)
        ),
        Template::Prealloc {
            cluster: 512,
            size: huge / 8,
            snapshot: None,
        },
    ));
    w.push(check(
        "check-20snap",
        format!(
            "check of a {} image with 20 internal snapshots",
            fmt_bytes(big)
        ),
        Template::Snapshots {
            size: big,
            count: 20,
        },
    ));

    for (name, flag, snap, template) in [
        ("snapshot-create", "-c", "bench", prealloc(None)),
        ("snapshot-delete", "-d", "s1", prealloc(Some("s1"))),
    ] {
        let mut args = lits(&["snapshot", flag, snap]);
        args.push(Arg::Image);
        w.push(Workload {
            name,
            title: format!(
                "internal snapshot {} on a {}-cluster image (4 KiB clusters, {} allocated)",
                if flag == "-c" { "create" } else { "delete" },
                huge / (4 * KIB),
                fmt_bytes(huge)
            ),
            template: Some(template),
            kind: Kind::Pair {
                needs: "snapshot",
                args,
                fresh_copy: true,
                output: false,
                evict_input: false,
            },
            bytes: 0,
            floor: None,
        });
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scale: f64) -> Params {
        Params {
            scale,
            cache: "none".into(),
            depth: 64,
        }
    }

    #[test]
    fn names_are_unique_and_floors_exist() {
        let w = all(&params(1.0));
        let mut names: Vec<_> = w.iter().map(|w| w.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), w.len());
        for x in &w {
            if let Some(f) = x.floor {
                assert!(names.contains(&f), "{} refers to missing floor {f}", x.name);
            }
        }
    }

    #[test]
    fn full_size_check_image_has_half_a_million_clusters() {
        let w = all(&params(1.0));
        let c = w.iter().find(|w| w.name == "check-500k").unwrap();
        assert_eq!(
            c.template,
            Some(Template::Prealloc {
                cluster: 4096,
                size: 2 * GIB,
                snapshot: None
            })
        );
    }

    #[test]
    fn quick_sizes_are_small_but_valid() {
        for w in all(&params(1.0 / 256.0)) {
            assert!(w.bytes <= 8 * MIB, "{} moves {} bytes", w.name, w.bytes);
        }
    }

    #[test]
    fn scattering_step_fits_qemu_img_limit() {
        for scale in [1.0 / 256.0, 0.3, 1.0, 4.0] {
            let w = all(&params(scale));
            let r = w.iter().find(|w| w.name == "rand-write-4k").unwrap();
            let Kind::Pair { args, .. } = &r.kind else {
                panic!("rand-write-4k is a pair workload")
            };
            let pos = args
                .iter()
                .position(|a| matches!(a, Arg::Lit(s) if s == "-S"))
                .unwrap();
            let Arg::Lit(step) = &args[pos + 1] else {
                panic!("-S takes a literal")
            };
            let step: u64 = step.parse().unwrap();
            assert!(step > 0 && step < (1 << 31), "step {step} at scale {scale}");
        }
    }

    #[test]
    fn scattered_writes_visit_distinct_clusters() {
        let size = 64 * MIB + 4 * KIB;
        let m = (size - 4 * KIB) / (64 * KIB);
        let step = 64 * KIB * coprime_multiplier(m);
        let mut seen = std::collections::HashSet::new();
        let mut off = 0u64;
        for _ in 0..m / 2 {
            assert_eq!(off % (64 * KIB), 0);
            assert!(seen.insert(off));
            off = (off + step) % (size - 4 * KIB);
        }
    }
}
