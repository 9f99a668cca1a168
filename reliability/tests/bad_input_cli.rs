//! Bad-input catalogue through the command line: every malformed header, table and entry
//! case of the reference (§6.2 iotest 080, §6.3 iotest 060, iotests 036, 138 and 261) gives
//! a clear error through `qcow2 info`, `qcow2 io -r -c "read 0 512"` and `qcow2 check`, with
//! a nonzero exit (for check: the exit code `qemu-img check` gives on the same file), no
//! panic, and no change to the file.

use qcow2_image::{CreateOptions, Image};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// The `qcow2` binary, built once into the target directory of this test binary.
fn qcow2_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CARGO_BIN_EXE_qcow2") {
            return PathBuf::from(p);
        }
        // <target>/debug/deps/bad_input_cli-xxxx -> <target>
        let exe = std::env::current_exe().expect("current exe");
        let target = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "qcow2-cli",
                "--bin",
                "qcow2",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build -p qcow2-cli failed");
        target.join("debug").join("qcow2")
    })
}

/// Runs `qcow2 args... file`: (exit code, stdout, stderr).
fn qcow2(args: &[&str], file: &Path) -> (i32, String, String) {
    let out = Command::new(qcow2_bin())
        .args(args)
        .arg(file)
        .output()
        .expect("run qcow2");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_img_check_code(file: &Path) -> Option<i32> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(file)
        .output()
        .ok()?;
    out.status.code()
}

/// A 64 MiB image with 64 KiB clusters (QEMU's layout: reftable 0x10000, refblock 0x20000,
/// L1 0x30000, L2 0x40000, data 0x50000), one data cluster written; optionally a snapshot.
fn base(cluster_size: u64, snapshot: bool) -> Vec<u8> {
    let s = Arc::new(qcow2_io::MemStorage::new());
    let mut o = CreateOptions::new(64 << 20);
    o.cluster_size = cluster_size;
    let mut img = Image::create(s.clone(), &o).expect("create");
    img.write(0, &vec![0x11; cluster_size as usize])
        .expect("write");
    if snapshot {
        img.snapshot_create("test").expect("snapshot");
    }
    img.close().expect("close");
    s.to_bytes()
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// One catalogue entry.
struct Case {
    name: &'static str,
    image: Vec<u8>,
    /// Expected in the stderr of `info` and `io -r read`, or in `io`'s output; `None` when
    /// the image opens (the damage is found by the read or the check).
    open_error: Option<&'static str>,
    /// Expected (stdout or stderr) of `io -r -c "read 0 512"` when the open succeeds.
    read_error: Option<&'static str>,
    /// qemu-img check exit code when qemu-img is not installed.
    check_code: i32,
}

fn poke(mut b: Vec<u8>, pokes: &[(usize, &[u8])]) -> Vec<u8> {
    for (off, bytes) in pokes {
        if b.len() < off + bytes.len() {
            b.resize(off + bytes.len(), 0);
        }
        b[*off..off + bytes.len()].copy_from_slice(bytes);
    }
    b
}

fn catalogue() -> Vec<Case> {
    let b = base(65536, false);
    let snap = base(65536, true);
    let c = |name, image, open_error, read_error, check_code| Case {
        name,
        image,
        open_error,
        read_error,
        check_code,
    };
    let u32b = |v: u32| v.to_be_bytes().to_vec();
    let u64b = |v: u64| v.to_be_bytes().to_vec();
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let snap_table = be64(&snap, 64) as usize;
    let mut v = vec![
        // iotest 080
        c(
            "080 header_length 0xffffffff",
            poke(b.clone(), &[(100, &u32b(0xffff_ffff))]),
            Some("qcow2 header exceeds cluster size"),
            None,
            1,
        ),
        c(
            "080 header_length 0x7fffffff",
            poke(b.clone(), &[(100, &u32b(0x7fff_ffff))]),
            Some("qcow2 header exceeds cluster size"),
            None,
            1,
        ),
        c(
            "080 backing_file_offset ~0",
            poke(b.clone(), &[(8, &u64b(u64::MAX)), (16, &u32b(8))]),
            Some("Invalid backing file offset"),
            None,
            1,
        ),
        c(
            "080 refcount_table_clusters 0xffffffff",
            poke(b.clone(), &[(56, &u32b(0xffff_ffff))]),
            Some("Reference count table too large"),
            None,
            1,
        ),
        c(
            "080 refcount_table_clusters 0x00020001",
            poke(b.clone(), &[(56, &u32b(0x0002_0001))]),
            Some("Reference count table too large"),
            None,
            1,
        ),
        c(
            "080 refcount_table_offset unaligned",
            poke(b.clone(), &[(48, &u64b(0x1234_5678_90ab_cdef))]),
            Some("Reference count table offset invalid"),
            None,
            1,
        ),
        c(
            "080 refcount table beyond 2^64",
            poke(
                b.clone(),
                &[(48, &u64b(0xffff_ffff_ffff_0000)), (56, &u32b(0x7f))],
            ),
            Some("Reference count table offset invalid"),
            None,
            1,
        ),
        c(
            "080 nb_snapshots 0xffffffff",
            poke(b.clone(), &[(60, &u32b(0xffff_ffff))]),
            Some("Snapshot table too large"),
            None,
            1,
        ),
        c(
            "080 nb_snapshots 0x7fffffff",
            poke(b.clone(), &[(60, &u32b(0x7fff_ffff))]),
            Some("Snapshot table too large"),
            None,
            1,
        ),
        c(
            "080 snapshots_offset beyond 2^64",
            poke(
                b.clone(),
                &[(64, &u64b(0xffff_ffff_ffff_0000)), (60, &u32b(0xffff))],
            ),
            Some("Snapshot table offset invalid"),
            None,
            1,
        ),
        c(
            "080 snapshots_offset unaligned",
            poke(
                b.clone(),
                &[(64, &u64b(0x1234_5678_90ab_cdef)), (60, &u32b(0))],
            ),
            Some("Snapshot table offset invalid"),
            None,
            1,
        ),
        c(
            "080 l1_size 0xffffffff",
            poke(b.clone(), &[(36, &u32b(0xffff_ffff))]),
            Some("Active L1 table too large"),
            None,
            1,
        ),
        c(
            "080 l1_size 0x7fffffff",
            poke(b.clone(), &[(36, &u32b(0x7fff_ffff))]),
            Some("Active L1 table too large"),
            None,
            1,
        ),
        c(
            "080 l1 table beyond 2^63",
            poke(
                b.clone(),
                &[(40, &u64b(0x7fff_ffff_ffff_0000)), (36, &u32b(0xffff))],
            ),
            Some("Active L1 table offset invalid"),
            None,
            1,
        ),
        c(
            "080 l1_table_offset unaligned",
            poke(
                b.clone(),
                &[(40, &u64b(0x1234_5678_90ab_cdef)), (36, &u32b(1))],
            ),
            Some("Active L1 table offset invalid"),
            None,
            1,
        ),
        c(
            "080 backing file name too long",
            poke(b.clone(), &[(8, &u64b(0x1000)), (16, &u32b(0xffff_ffff))]),
            Some("Backing file name too long"),
            None,
            1,
        ),
        c(
            "080 snapshot with l1_size 0",
            poke(snap.clone(), &[(36, &u32b(0))]),
            Some("L1 table is too small"),
            None,
            1,
        ),
        // iotest 036
        c(
            "036 unknown incompatible bit 63",
            poke(b.clone(), &[(72, &u64b(1 << 63))]),
            Some("Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"),
            None,
            1,
        ),
        c(
            "036 unknown incompatible bits 61-63",
            poke(b.clone(), &[(72, &u64b(0xe000_0000_0000_0000))]),
            Some("e000000000000000"),
            None,
            1,
        ),
        // iotest 060
        c(
            "060 refcount_table_clusters 0",
            poke(b.clone(), &[(56, &u32b(0))]),
            Some("Image does not contain a reference count table"),
            None,
            1,
        ),
        c(
            "060 unaligned L1 entry",
            poke(b.clone(), &[(l1, &u64b(0x8000_0000_0004_2a00))]),
            None,
            Some("L2 table offset 0x42a00 unaligned (L1 index: 0)"),
            2,
        ),
        c(
            "060 unaligned L2 entry",
            poke(b.clone(), &[(l2, &u64b(0x8000_0000_0005_2a00))]),
            None,
            Some("Cluster allocation offset 0x52a00 unaligned (L2 offset: 0x40000, L2 index: 0)"),
            2,
        ),
        c(
            "060 L2 entry points at the L1 table",
            poke(b.clone(), &[(l1, &u64b(0x8000_0000_0003_0000))]),
            None,
            None,
            2,
        ),
        c(
            "060 empty refcount table",
            poke(b.clone(), &[(0x10000, &u64b(0))]),
            None,
            None,
            2,
        ),
        // iotest 138: an L2 entry far beyond the end of the file.
        c(
            "138 L2 entry beyond EOF",
            poke(b.clone(), &[(l2, &u64b(0x0080_0000_0000_0000))]),
            None,
            None,
            2,
        ),
        // iotest 261: too much extra data in a snapshot table entry.
        c(
            "261 snapshot extra_data_size 65536",
            poke(snap.clone(), &[(snap_table + 36, &u32b(65536))]),
            Some("Too much extra metadata in snapshot table entry"),
            None,
            1,
        ),
        // A refcount of an unreferenced cluster inside the file: a leak (check exit 3).
        c(
            "leaked cluster",
            poke(b.clone(), &[(0x20000 + 2 * 4, &[0, 2])]),
            None,
            None,
            3,
        ),
        // A truncated image: the L1 table lies beyond the end of the file.
        c("truncated file", b[..0x30000].to_vec(), None, None, 1),
    ];
    // Corrupt bit: read-only works, a read-write open is refused.
    v.push(c(
        "060 corrupt bit set",
        poke(b.clone(), &[(72, &u64b(2))]),
        None,
        None,
        0,
    ));
    v
}

#[test]
fn bad_input_catalogue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let have_qemu = reliability::verify::have_qemu_img();
    let mut failures = Vec::new();
    let cases = catalogue();
    for case in &cases {
        let p = dir
            .path()
            .join(format!("{}.qcow2", case.name.replace(' ', "_")));
        std::fs::write(&p, &case.image).expect("write image");
        let unchanged = |what: &str, failures: &mut Vec<String>| {
            let now = std::fs::read(&p).expect("read image");
            if now != case.image {
                failures.push(format!("{}: `{what}` changed the file", case.name));
            }
        };
        let judge = |failures: &mut Vec<String>,
                     what: &str,
                     code: i32,
                     out: &str,
                     want_nonzero: bool,
                     msg: Option<&str>| {
            if out.contains("panicked") {
                failures.push(format!("{}: `{what}` panicked: {out}", case.name));
            }
            if want_nonzero && code == 0 {
                failures.push(format!("{}: `{what}` exited 0: {out}", case.name));
            }
            if !(0..=3).contains(&code) && code != 63 {
                failures.push(format!("{}: `{what}` exit {code}: {out}", case.name));
            }
            if let Some(m) = msg {
                if !out.contains(m) {
                    failures.push(format!(
                        "{}: `{what}` does not say \"{m}\": {out}",
                        case.name
                    ));
                }
            }
        };
        // info
        let (code, o, e) = qcow2(&["info", "-f", "qcow2"], &p);
        judge(
            &mut failures,
            "info",
            code,
            &format!("{o}{e}"),
            case.open_error.is_some(),
            case.open_error,
        );
        unchanged("info", &mut failures);
        // io read, read-only
        let (code, o, e) = qcow2(&["io", "-r", "-f", "qcow2", "-c", "read 0 512"], &p);
        let out = format!("{o}{e}");
        let read_fails = case.open_error.is_some() || case.read_error.is_some();
        let msg = case.open_error.or(case.read_error);
        if read_fails && code == 0 && !out.contains("failed") {
            failures.push(format!("{}: `io read` reported success: {out}", case.name));
        }
        judge(&mut failures, "io -r read", code, &out, false, msg);
        unchanged("io -r read", &mut failures);
        // check
        let (code, o, e) = qcow2(&["check", "-f", "qcow2"], &p);
        let want = if have_qemu {
            qemu_img_check_code(&p).unwrap_or(case.check_code)
        } else {
            case.check_code
        };
        if code != want {
            failures.push(format!(
                "{}: `check` exit {code}, qemu-img check gives {want}: {o}{e}",
                case.name
            ));
        }
        judge(
            &mut failures,
            "check",
            code,
            &format!("{o}{e}"),
            false,
            // Check mode reports header problems as findings, in its own words; the exit
            // code is compared with qemu-img's above.
            None,
        );
        unchanged("check", &mut failures);
    }
    // The corrupt bit refuses a read-write open without writing.
    let p = dir.path().join("060_corrupt_bit_set.qcow2");
    let before = std::fs::read(&p).expect("read");
    let (code, o, e) = qcow2(&["io", "-f", "qcow2", "-c", "write 0 512"], &p);
    if code == 0 && !format!("{o}{e}").contains("corrupt") {
        failures.push(format!("corrupt bit: read-write io was allowed: {o}{e}"));
    }
    assert_eq!(
        std::fs::read(&p).expect("read"),
        before,
        "corrupt image written"
    );
    println!(
        "bad-input catalogue: {} cases x 3 commands, {} failures",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
