//! The audit of ARCHITECTURE.md ("QEMU state a writable open may touch"), one test per
//! row. Every test starts from an image made by qemu-img / qemu-io (sometimes with bytes
//! patched in the header, as a newer QEMU or another program would leave them), copies it
//! twice, runs the same operation with QEMU on one copy and with `qcow2` on the other, and
//! compares the row's state in both results: header fields, feature bits and extensions
//! read byte by byte from the first cluster, plus `qemu-img check` and `qemu-img info`.
//!
//! The operations are the audit's columns: read-only open (`info`, `io -r`), writable
//! open with a guest write (`io`), amend (`lazy_refcounts=on`, which rewrites the header,
//! and `refcount_bits=8`, which rebuilds the refcounts and reopens), resize (grow),
//! internal snapshot create, and repair (`check -r all`). An operation that one tool
//! refuses the other must refuse too, and a refusal of ours must leave every file
//! untouched.

mod common;

use common::{have_qemu, ok, qcow2, qemu_img, qemu_io, Run};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The image every test works on.
const IMG: &str = "img.qcow2";

/// Header offsets (qcow2.txt).
const OFF_INCOMPAT: usize = 72;
const OFF_COMPAT: usize = 80;
const OFF_AUTOCLEAR: usize = 88;
const OFF_HEADER_LENGTH: usize = 100;

/// One operation of the audit, as both tools spell it.
struct OpSpec {
    name: &'static str,
    /// Our arguments (`IMG` is the image).
    ours: &'static [&'static str],
    /// QEMU's program and arguments.
    qemu: (&'static str, &'static [&'static str]),
    /// Further steps, the same arguments for `qcow2` and `qemu-img`, run while both tools
    /// succeed.
    then: &'static [&'static [&'static str]],
}

const OPS: &[OpSpec] = &[
    OpSpec {
        name: "ro open (info)",
        ours: &["info", IMG],
        qemu: ("qemu-img", &["info", IMG]),
        then: &[],
    },
    OpSpec {
        name: "ro open (io -r)",
        ours: &["io", "-r", "-c", "read 0 4k", IMG],
        qemu: ("qemu-io", &["-r", "-c", "read 0 4k", IMG]),
        then: &[],
    },
    OpSpec {
        name: "rw open + write",
        ours: &["io", "-c", "write -P 7 0 4k", IMG],
        qemu: ("qemu-io", &["-c", "write -P 7 0 4k", IMG]),
        then: &[],
    },
    OpSpec {
        name: "rw open + zero, discard, compressed write",
        ours: &[
            "io",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "write -c -P 3 256k 64k",
            IMG,
        ],
        qemu: (
            "qemu-io",
            &[
                "-c",
                "write -z 64k 64k",
                "-c",
                "discard 128k 64k",
                "-c",
                "write -c -P 3 256k 64k",
                IMG,
            ],
        ),
        then: &[],
    },
    OpSpec {
        name: "amend lazy_refcounts=on",
        ours: &["amend", "-o", "lazy_refcounts=on", IMG],
        qemu: ("qemu-img", &["amend", "-o", "lazy_refcounts=on", IMG]),
        then: &[],
    },
    OpSpec {
        name: "amend refcount_bits=8",
        ours: &["amend", "-o", "refcount_bits=8", IMG],
        qemu: ("qemu-img", &["amend", "-o", "refcount_bits=8", IMG]),
        then: &[],
    },
    OpSpec {
        name: "amend compat=0.10",
        ours: &["amend", "-o", "compat=0.10", IMG],
        qemu: ("qemu-img", &["amend", "-o", "compat=0.10", IMG]),
        then: &[],
    },
    OpSpec {
        name: "amend compat=1.1",
        ours: &["amend", "-o", "compat=1.1", IMG],
        qemu: ("qemu-img", &["amend", "-o", "compat=1.1", IMG]),
        then: &[],
    },
    OpSpec {
        name: "resize +1M",
        ours: &["resize", IMG, "+1M"],
        qemu: ("qemu-img", &["resize", IMG, "+1M"]),
        then: &[],
    },
    OpSpec {
        name: "snapshot -c",
        ours: &["snapshot", "-c", "s1", IMG],
        qemu: ("qemu-img", &["snapshot", "-c", "s1", IMG]),
        then: &[],
    },
    OpSpec {
        name: "resize --shrink",
        ours: &["resize", "--shrink", IMG, "-1M"],
        qemu: ("qemu-img", &["resize", "--shrink", IMG, "-1M"]),
        then: &[],
    },
    OpSpec {
        name: "snapshot -c, -a, -d",
        ours: &["snapshot", "-c", "s1", IMG],
        qemu: ("qemu-img", &["snapshot", "-c", "s1", IMG]),
        then: &[
            &["io", "-c", "write -P 9 0 64k", IMG],
            &["snapshot", "-a", "s1", IMG],
            &["snapshot", "-d", "s1", IMG],
        ],
    },
    OpSpec {
        name: "check -r all",
        ours: &["check", "-r", "all", IMG],
        qemu: ("qemu-img", &["check", "-r", "all", IMG]),
        then: &[],
    },
];

/// The first cluster of an image, decoded as far as the audit needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hdr {
    raw: Vec<u8>,
    version: u32,
    header_length: usize,
    /// Extensions in on-disk order: (magic, data without padding).
    exts: Vec<(u32, Vec<u8>)>,
    backing: Option<Vec<u8>>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Hdr {
    fn read(path: &Path) -> Hdr {
        let all = std::fs::read(path).expect("read image");
        let cs = 1usize << be32(&all, 20);
        let raw = all[..cs.min(all.len())].to_vec();
        let version = be32(&raw, 4);
        let header_length = if version >= 3 {
            be32(&raw, OFF_HEADER_LENGTH) as usize
        } else {
            72
        };
        let mut exts = Vec::new();
        let mut off = header_length;
        while off + 8 <= raw.len() {
            let magic = be32(&raw, off);
            let len = be32(&raw, off + 4) as usize;
            if magic == 0 {
                break;
            }
            exts.push((magic, raw[off + 8..off + 8 + len].to_vec()));
            off += 8 + len.div_ceil(8) * 8;
        }
        let bo = be64(&raw, 8) as usize;
        let bl = be32(&raw, 16) as usize;
        let backing = (bo != 0).then(|| raw[bo..bo + bl].to_vec());
        Hdr {
            raw,
            version,
            header_length,
            exts,
            backing,
        }
    }

    fn u64_at(&self, off: usize) -> u64 {
        if self.version < 3 && off >= 72 {
            return 0;
        }
        be64(&self.raw, off)
    }

    fn ext(&self, magic: u32) -> Option<&[u8]> {
        self.exts
            .iter()
            .find(|(m, _)| *m == magic)
            .map(|(_, d)| d.as_slice())
    }
}

/// Extension magics (qcow2.txt).
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Patches the first cluster of `dir/IMG` in place.
fn patch(dir: &Path, f: impl FnOnce(&mut Hdr)) {
    let path = dir.join(IMG);
    let mut h = Hdr::read(&path);
    f(&mut h);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut file, &h.raw).expect("write");
}

/// Rewrites the extension area of `h.raw` from `h.exts` (no backing file name allowed).
fn write_exts(h: &mut Hdr) {
    assert!(h.backing.is_none(), "patching images with a backing file");
    let mut body = Vec::new();
    for (m, d) in &h.exts {
        body.extend_from_slice(&m.to_be_bytes());
        body.extend_from_slice(&(d.len() as u32).to_be_bytes());
        body.extend_from_slice(d);
        body.resize(body.len().div_ceil(8) * 8, 0);
    }
    body.extend_from_slice(&[0; 8]);
    let start = h.header_length;
    for b in &mut h.raw[start..] {
        *b = 0;
    }
    h.raw[start..start + body.len()].copy_from_slice(&body);
}

fn or_u64(h: &mut Hdr, off: usize, bits: u64) {
    let v = be64(&h.raw, off) | bits;
    h.raw[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn and_u64(h: &mut Hdr, off: usize, mask: u64) {
    let v = be64(&h.raw, off) & mask;
    h.raw[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Every regular file of `dir` (image, data file, backing file).
fn snapshot_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_type().expect("type").is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for (name, bytes) in snapshot_dir(from) {
        std::fs::write(to.join(name), bytes).expect("write");
    }
}

fn run_qemu(dir: &Path, program: &str, args: &[&str]) -> Run {
    match program {
        "qemu-io" => qemu_io(dir, args),
        _ => qemu_img(dir, args),
    }
}

/// `qemu-img info --output=json`'s bitmaps: (name, flags).
fn qemu_bitmaps(dir: &Path) -> Vec<(String, Vec<String>)> {
    let r = qemu_img(dir, &["info", "-U", "--output=json", IMG]);
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let name = b["name"].as_str().unwrap_or_default().to_string();
                    let flags = b["flags"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .map(|x| x.as_str().unwrap_or_default().to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    (name, flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What one operation left behind, for one tool.
struct Outcome {
    run: Run,
    hdr: Hdr,
    dir: PathBuf,
    /// `qemu-img check`'s exit code on the result.
    check: i32,
}

/// One audit row: the base image, and what must hold after every operation.
struct Row {
    /// Builds the QEMU-made base image in the directory.
    setup: fn(&Path),
    /// The row's state; must be equal in QEMU's and our result after every operation
    /// (unless `compare` is replaced).
    state: fn(&Hdr) -> String,
    /// Extra expectations on (operation, QEMU's outcome, ours).
    extra: fn(&str, &Outcome, &Outcome),
    /// Operations QEMU refuses and ours may do, provided they change no file.
    ours_may_succeed: &'static [&'static str],
    /// Operations after which QEMU 10 leaves an image it cannot open again (its bug): ours
    /// must succeed and leave an image `qemu-img check` finds clean.
    qemu_breaks: &'static [&'static str],
}

fn no_extra(_: &str, _: &Outcome, _: &Outcome) {}

/// Runs every operation of the audit on copies of the row's base image with both tools.
fn run_row(row: &Row) {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    std::fs::create_dir(&base).expect("mkdir");
    (row.setup)(&base);
    let before = snapshot_dir(&base);
    for (i, op) in OPS.iter().enumerate() {
        let qd = root.path().join(format!("q{i}"));
        let od = root.path().join(format!("o{i}"));
        copy_dir(&base, &qd);
        copy_dir(&base, &od);
        let mut q = run_qemu(&qd, op.qemu.0, op.qemu.1);
        let mut o = qcow2(&od, op.ours);
        let mut before = before.clone();
        for step in op.then {
            if q.code != 0 || o.code != 0 {
                break;
            }
            before = snapshot_dir(&od);
            let (program, args) = match step.split_first() {
                Some((&"io", rest)) => ("qemu-io", rest),
                _ => ("qemu-img", *step),
            };
            q = run_qemu(&qd, program, args);
            o = qcow2(&od, step);
        }
        let ctx = format!("[{}]\nqemu: {q:?}\nours: {o:?}", op.name);
        if row.qemu_breaks.contains(&op.name) {
            assert_ne!(qemu_img(&qd, &["check", IMG]).code, 0, "QEMU fixed? {ctx}");
            assert_eq!(o.code, 0, "{ctx}");
            let c = qemu_img(&od, &["check", IMG]);
            assert_eq!(c.code, 0, "{ctx} {c:?}");
            continue;
        }
        if q.code != 0 && o.code == 0 && row.ours_may_succeed.contains(&op.name) {
            assert!(snapshot_dir(&od) == before, "a tolerated op wrote {ctx}");
            continue;
        }
        assert_eq!(q.code == 0, o.code == 0, "success differs {ctx}");
        // qemu-io reports some failed commands with exit code 0 and a message.
        assert_eq!(
            q.stderr.is_empty(),
            o.stderr.is_empty(),
            "stderr presence differs {ctx}"
        );
        // qemu-io runs every command and fails if one did: the messages must agree.
        let untimed = |r: &Run| {
            r.stdout
                .lines()
                .filter(|l| !l.contains("ops/sec"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(untimed(&q), untimed(&o), "output differs {ctx}");
        if o.code != 0 && o.stdout.is_empty() {
            assert!(snapshot_dir(&od) == before, "a refused op wrote {ctx}");
        }
        let check = |d: &Path| qemu_img(d, &["check", "-U", IMG]).code;
        let qo = Outcome {
            hdr: Hdr::read(&qd.join(IMG)),
            check: check(&qd),
            dir: qd,
            run: q,
        };
        let oo = Outcome {
            hdr: Hdr::read(&od.join(IMG)),
            check: check(&od),
            dir: od,
            run: o,
        };
        assert_eq!(
            (row.state)(&qo.hdr),
            (row.state)(&oo.hdr),
            "row state differs {ctx}"
        );
        assert_eq!(qo.check, oo.check, "qemu-img check differs {ctx}");
        (row.extra)(op.name, &qo, &oo);
    }
}

fn create(dir: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([IMG, size]);
    ok(qemu_img(dir, &args));
}

fn plain(dir: &Path) {
    create(dir, "", "64M");
    ok(qemu_io(dir, &["-c", "write -P 1 0 128k", IMG]));
}

// ------------------------------------------------------------------ header fields

#[test]
fn row_version_and_fixed_geometry() {
    run_row(&Row {
        setup: plain,
        // magic, version, cluster_bits, crypt_method
        state: |h| {
            format!(
                "{:?} {:?} {:?}",
                &h.raw[0..8],
                &h.raw[20..24],
                &h.raw[32..36]
            )
        },
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_version_2_image() {
    run_row(&Row {
        setup: |d| {
            create(d, "compat=0.10", "64M");
            ok(qemu_io(d, &["-c", "write -P 1 0 128k", IMG]));
        },
        state: |h| format!("v{} exts {:?}", h.version, h.exts),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_size() {
    run_row(&Row {
        setup: plain,
        state: |h| format!("{}", h.u64_at(24)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_l1_refcount_table_and_snapshot_table_locations() {
    // Where the engine places its tables is its own business; what matters is that QEMU
    // finds them consistent (the row compares `qemu-img check`) and that the snapshot
    // table lists the same snapshots.
    run_row(&Row {
        setup: |d| {
            plain(d);
            ok(qemu_img(d, &["snapshot", "-c", "base-snap", IMG]));
        },
        state: |h| format!("nb_snapshots {}", be32(&h.raw, 60)),
        extra: |_, q, o| {
            let list = |d: &Path| {
                let r = qemu_img(d, &["snapshot", "-U", "-l", IMG]);
                r.stdout
                    .lines()
                    .skip(2)
                    .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(list(&q.dir), list(&o.dir));
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_refcount_order() {
    run_row(&Row {
        setup: |d| create(d, "refcount_bits=4", "64M"),
        state: |h| format!("{}", be32(&h.raw, 96)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_header_length_104() {
    // A v3 header without the compression type field (QEMU before 5.1 wrote 104 bytes).
    run_row(&Row {
        setup: |d| {
            create(d, "", "64M");
            patch(d, |h| {
                h.raw.copy_within(112..4096, 104);
                h.raw[OFF_HEADER_LENGTH..OFF_HEADER_LENGTH + 4]
                    .copy_from_slice(&104u32.to_be_bytes());
                h.header_length = 104;
            });
        },
        state: |h| format!("{} {:?}", h.header_length, h.exts),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_additional_header_fields() {
    // A header longer than QEMU knows: the unknown fields are kept as they are.
    run_row(&Row {
        setup: |d| {
            create(d, "", "64M");
            patch(d, |h| {
                h.raw.copy_within(112..4000, 120);
                h.raw[112..120].copy_from_slice(&[0x11; 8]);
                h.raw[OFF_HEADER_LENGTH..OFF_HEADER_LENGTH + 4]
                    .copy_from_slice(&120u32.to_be_bytes());
            });
        },
        state: |h| format!("{} {:?}", h.header_length, &h.raw[104..h.header_length]),
        extra: no_extra,
        ours_may_succeed: &[],
        // QEMU's downgrade writes the unknown fields after the 72-byte v2 header,
        // where a v2 reader expects the extensions ("Header extension too large"); ours
        // drops them with the v3 header.
        qemu_breaks: &["amend compat=0.10"],
    });
}

fn backing_setup(d: &Path) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            IMG,
        ],
    ));
}

#[test]
fn row_backing_file_name() {
    run_row(&Row {
        setup: backing_setup,
        // The name and where it sits (offset and size fields).
        state: |h| {
            format!(
                "{:?} at {} len {}",
                h.backing,
                be64(&h.raw, 8),
                be32(&h.raw, 16)
            )
        },
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_backing_format_extension() {
    run_row(&Row {
        setup: backing_setup,
        state: |h| format!("{:?}", h.ext(EXT_BACKING_FORMAT)),
        extra: |op, _, o| {
            if op == "rw open + write" {
                // Amending the backing file or its format is refused (use rebase).
                let r = qcow2(&o.dir, &["amend", "-o", "backing_fmt=raw", IMG]);
                assert_ne!(r.code, 0, "{r:?}");
                assert!(r.stderr.contains("Cannot amend the backing file"), "{r:?}");
                assert_eq!(
                    Hdr::read(&o.dir.join(IMG)).ext(EXT_BACKING_FORMAT),
                    o.hdr.ext(EXT_BACKING_FORMAT)
                );
            }
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

// ------------------------------------------------------------------ feature bits

#[test]
fn row_incompat_dirty_with_lazy_refcounts() {
    run_row(&Row {
        setup: |d| {
            create(d, "lazy_refcounts=on", "64M");
            // Killed with the dirty bit set and refcounts behind.
            let r = qemu_io(d, &["-c", "write -P 1 0 128k", "-c", "sigraise 9", IMG]);
            assert_ne!(r.code, 0);
            assert_eq!(Hdr::read(&d.join(IMG)).u64_at(OFF_INCOMPAT) & 1, 1);
        },
        state: |h| {
            format!(
                "incompat {:#x} compat {:#x}",
                h.u64_at(OFF_INCOMPAT),
                h.u64_at(OFF_COMPAT)
            )
        },
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_incompat_corrupt() {
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| or_u64(h, OFF_INCOMPAT, 2));
        },
        state: |h| format!("incompat {:#x}", h.u64_at(OFF_INCOMPAT)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_incompat_unknown_bit() {
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| or_u64(h, OFF_INCOMPAT, 1 << 40));
        },
        state: |h| format!("incompat {:#x}", h.u64_at(OFF_INCOMPAT)),
        extra: |op, q, o| {
            assert_ne!(q.run.code, 0, "{op}");
            assert_ne!(o.run.code, 0, "{op}");
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

fn data_file_setup(d: &Path, raw: bool) {
    let opts = format!(
        "data_file=data.raw,data_file_raw={}",
        if raw { "on" } else { "off" }
    );
    create(d, &opts, "4M");
    ok(qemu_io(d, &["-c", "write -P 1 0 1M", IMG]));
}

fn data_file_extra(op: &str, q: &Outcome, o: &Outcome) {
    let qd = std::fs::read(q.dir.join("data.raw")).expect("data");
    let od = std::fs::read(o.dir.join("data.raw")).expect("data");
    assert!(qd == od, "[{op}] data files differ");
    let r = qemu_img(
        &o.dir,
        &["compare", "-U", &q.dir.join(IMG).to_string_lossy(), IMG],
    );
    assert_eq!(r.code, 0, "[{op}] {r:?}");
}

#[test]
fn row_incompat_external_data_file() {
    run_row(&Row {
        setup: |d| data_file_setup(d, false),
        state: |h| {
            format!(
                "incompat {:#x} autoclear {:#x}",
                h.u64_at(OFF_INCOMPAT),
                h.u64_at(OFF_AUTOCLEAR)
            )
        },
        extra: data_file_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_external_data_file_name_extension() {
    run_row(&Row {
        setup: |d| data_file_setup(d, false),
        state: |h| format!("{:?}", h.ext(EXT_DATA_FILE)),
        extra: |op, _, o| {
            if op == "rw open + write" {
                // Renaming through amend rewrites the extension, as QEMU's amend does.
                ok(qcow2(&o.dir, &["amend", "-o", "data_file=new.raw", IMG]));
                std::fs::rename(o.dir.join("data.raw"), o.dir.join("new.raw")).expect("mv");
                let h = Hdr::read(&o.dir.join(IMG));
                assert_eq!(h.ext(EXT_DATA_FILE), Some(&b"new.raw"[..]));
                ok(qemu_img(&o.dir, &["check", IMG]));
            }
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_autoclear_raw_external_data() {
    run_row(&Row {
        setup: |d| data_file_setup(d, true),
        state: |h| {
            format!(
                "incompat {:#x} autoclear {:#x}",
                h.u64_at(OFF_INCOMPAT),
                h.u64_at(OFF_AUTOCLEAR)
            )
        },
        extra: |op, q, o| {
            data_file_extra(op, q, o);
            // data_file_raw stays a promise kept: the data file alone reads as the disk.
            let r = qemu_img(
                &o.dir,
                &["compare", "-U", "-f", "raw", "-F", "qcow2", "data.raw", IMG],
            );
            assert_eq!(r.code, 0, "[{op}] {r:?}");
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_incompat_compression_type_zstd() {
    run_row(&Row {
        setup: |d| create(d, "compression_type=zstd", "64M"),
        state: |h| format!("incompat {:#x} type {}", h.u64_at(OFF_INCOMPAT), h.raw[104]),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_incompat_extended_l2() {
    run_row(&Row {
        setup: |d| {
            create(d, "extended_l2=on,cluster_size=128k", "64M");
            ok(qemu_io(d, &["-c", "write -P 1 4k 4k", IMG]));
        },
        state: |h| format!("incompat {:#x}", h.u64_at(OFF_INCOMPAT)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_compat_lazy_refcounts_clean() {
    run_row(&Row {
        setup: |d| create(d, "lazy_refcounts=on", "64M"),
        state: |h| {
            format!(
                "incompat {:#x} compat {:#x}",
                h.u64_at(OFF_INCOMPAT),
                h.u64_at(OFF_COMPAT)
            )
        },
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_compat_unknown_bit() {
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| or_u64(h, OFF_COMPAT, 1 << 33));
        },
        state: |h| format!("compat {:#x}", h.u64_at(OFF_COMPAT)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_autoclear_unknown_bits() {
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| or_u64(h, OFF_AUTOCLEAR, (1 << 40) | (1 << 5)));
        },
        state: |h| format!("autoclear {:#x}", h.u64_at(OFF_AUTOCLEAR)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

// ------------------------------------------------------------------ extensions

/// Two unknown extensions added after QEMU's own (the order matters to the byte-level
/// comparison: QEMU writes them back reversed on a header rewrite).
fn add_unknown_exts(h: &mut Hdr) {
    h.exts.push((0x1234_5678, b"hello".to_vec()));
    h.exts.push((0xabcd_ef01, b"abc".to_vec()));
    write_exts(h);
}

#[test]
fn row_unknown_extensions() {
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, add_unknown_exts);
        },
        state: |h| format!("{:?}", h.exts),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_unknown_extensions_with_unknown_autoclear() {
    // The writable open rewrites the header: QEMU reverses the unknown extensions then,
    // and a later header rewrite in the same process keeps that order.
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| {
                add_unknown_exts(h);
                or_u64(h, OFF_AUTOCLEAR, 1 << 40);
            });
        },
        state: |h| format!("autoclear {:#x} {:?}", h.u64_at(OFF_AUTOCLEAR), h.exts),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_feature_name_table() {
    // A table that is not QEMU's (renamed entries): kept until QEMU rewrites the header,
    // which writes its own.
    run_row(&Row {
        setup: |d| {
            plain(d);
            patch(d, |h| {
                for (m, data) in &mut h.exts {
                    if *m == EXT_FEATURE_TABLE {
                        data[2..11].copy_from_slice(b"DIRTY BIT");
                    }
                }
                write_exts(h);
            });
        },
        state: |h| format!("{:?}", h.ext(EXT_FEATURE_TABLE)),
        extra: no_extra,
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

fn bitmaps_setup(d: &Path) {
    plain(d);
    ok(qemu_img(d, &["bitmap", "--add", IMG, "enabled"]));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "--disable", IMG, "disabled"],
    ));
}

#[test]
fn row_bitmaps_extension_and_autoclear_bit() {
    run_row(&Row {
        setup: bitmaps_setup,
        state: |h| {
            format!(
                "autoclear {:#x} nb {:?}",
                h.u64_at(OFF_AUTOCLEAR),
                h.ext(EXT_BITMAPS).map(|b| be32(b, 0))
            )
        },
        extra: |op, q, o| {
            let qb = qemu_bitmaps(&q.dir);
            let ob = qemu_bitmaps(&o.dir);
            let names =
                |b: &[(String, Vec<String>)]| b.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
            assert_eq!(names(&qb), names(&ob), "[{op}]");
            // Both maintain the bitmaps: the same flags after every operation (none left
            // in use; resized with the disk).
            for ((name, qf), (_, of)) in qb.iter().zip(&ob) {
                assert_eq!(qf, of, "[{op}] {name}");
            }
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_bitmaps_extension_without_autoclear_bit() {
    // A program without bitmap support changed the image: QEMU ignores the bitmaps and a
    // writable open drops the extension (its clusters leak until `check -r`).
    run_row(&Row {
        setup: |d| {
            bitmaps_setup(d);
            patch(d, |h| and_u64(h, OFF_AUTOCLEAR, !1));
        },
        state: |h| {
            format!(
                "autoclear {:#x} ext {:?}",
                h.u64_at(OFF_AUTOCLEAR),
                h.ext(EXT_BITMAPS).is_some()
            )
        },
        extra: |op, q, o| {
            // QEMU warns at every open that still finds the extension, once.
            let stderr = |r: &Run| {
                r.stderr
                    .replace("qemu-img: ", "qcow2: ")
                    .replace("qemu-io: ", "qcow2: ")
            };
            assert_eq!(stderr(&q.run), stderr(&o.run), "[{op}]");
        },
        ours_may_succeed: &[],
        qemu_breaks: &[],
    });
}

#[test]
fn row_full_disk_encryption_header_pointer() {
    // LUKS: no I/O without a secret (QEMU) or at all (ours, not supported yet); metadata
    // operations that need no key and the read-only open must leave it alone.
    run_row(&Row {
        setup: |d| {
            ok(qemu_img(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    "secret,id=sec0,data=abc",
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                    IMG,
                    "16M",
                ],
            ));
        },
        state: |h| format!("crypt {} {:?}", be32(&h.raw, 32), h.ext(EXT_CRYPTO)),
        extra: no_extra,
        // qemu-img check opens the LUKS layer and needs the key; our checker needs no
        // key (it reads metadata only) and finds nothing to repair.
        ours_may_succeed: &["check -r all"],
        qemu_breaks: &[],
    });
}

#[test]
fn row_legacy_aes_encryption() {
    // crypt_method 1 (AES-CBC): no extension, the key from a secret; no I/O without it
    // in QEMU, none at all in ours; nothing written either way.
    run_row(&Row {
        setup: |d| {
            ok(qemu_img(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    "secret,id=sec0,data=abc",
                    "-o",
                    "encrypt.format=aes,encrypt.key-secret=sec0",
                    IMG,
                    "16M",
                ],
            ));
        },
        state: |h| format!("crypt {} exts {:?}", be32(&h.raw, 32), h.exts),
        extra: no_extra,
        ours_may_succeed: &["check -r all"],
        qemu_breaks: &[],
    });
}

#[test]
fn snapshot_apply_with_bitmaps_is_refused_as_qemu_does() {
    // QEMU refuses to revert a node that has dirty bitmaps (`bdrv_snapshot_goto`:
    // "Device has active dirty bitmaps"), enabled or not: a revert changes the guest
    // content under every bitmap's feet.
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    std::fs::create_dir(&base).expect("mkdir");
    plain(&base);
    ok(qemu_img(&base, &["snapshot", "-c", "s1", IMG]));
    ok(qemu_img(
        &base,
        &["bitmap", "--add", "--disable", IMG, "disabled"],
    ));
    let (qd, od) = (root.path().join("q"), root.path().join("o"));
    copy_dir(&base, &qd);
    copy_dir(&base, &od);
    let q = qemu_img(&qd, &["snapshot", "-a", "s1", IMG]);
    let o = qcow2(&od, &["snapshot", "-a", "s1", IMG]);
    assert_ne!(q.code, 0);
    assert_eq!(q.code, o.code, "{o:?}");
    assert_eq!(q.text(), o.text());
    assert!(snapshot_dir(&od) == snapshot_dir(&base));
}

#[test]
fn row_snapshot_table_after_repair() {
    // A snapshot whose L1 offset is not cluster aligned: `check -r all` reports it, cannot
    // repair it, repairs the leaks around it, and keeps the table (nb_snapshots, entries)
    // as QEMU does, byte for byte.
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    std::fs::create_dir(&base).expect("mkdir");
    plain(&base);
    for s in ["a", "b", "c"] {
        ok(qemu_img(&base, &["snapshot", "-c", s, IMG]));
    }
    let path = base.join(IMG);
    let mut bytes = std::fs::read(&path).expect("read");
    let nb = be32(&bytes, 60);
    let mut entry = be64(&bytes, 64) as usize;
    assert_eq!(nb, 3);
    // Skip to the second entry (fixed part 40 bytes, extra data, id, name, padding to 8).
    let len = |b: &[u8], o: usize| {
        let n = 40
            + be32(b, o + 36) as usize
            + usize::from(u16::from_be_bytes([b[o + 12], b[o + 13]]))
            + usize::from(u16::from_be_bytes([b[o + 14], b[o + 15]]));
        n.div_ceil(8) * 8
    };
    entry += len(&bytes, entry);
    let l1 = be64(&bytes, entry) + 1;
    bytes[entry..entry + 8].copy_from_slice(&l1.to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");

    let (qd, od) = (root.path().join("q"), root.path().join("o"));
    copy_dir(&base, &qd);
    copy_dir(&base, &od);
    let q = qemu_img(&qd, &["check", "-r", "all", IMG]);
    let o = qcow2(&od, &["check", "-r", "all", IMG]);
    assert_eq!(q.code, o.code, "{q:?}\n{o:?}");
    assert_eq!(q.stdout, o.stdout);
    assert!(
        snapshot_dir(&qd) == snapshot_dir(&od),
        "files differ after repair"
    );
    let list = |d: &Path| qemu_img(d, &["snapshot", "-l", IMG]).stdout;
    assert_eq!(list(&qd), list(&od));
    assert_eq!(be32(&Hdr::read(&od.join(IMG)).raw, 60), 3);
}
