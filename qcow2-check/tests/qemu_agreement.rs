//! Agreement with `qemu-img check` 10.0.2: a corpus of images made with qemu-img/qemu-io and
//! damaged by targeted pokes (iotests 039, 060, 108, 112, 138, 217, 261 and friends) plus
//! seeded random pokes. For every image and every mode (check, `-r leaks`, `-r all`), one
//! copy is checked by qemu-img and another by us; the JSON counters, the exit code, the
//! stderr lines and the human stdout must be identical, and so must `qemu-img check` of
//! both copies afterwards (the repairs left the same state).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use qcow2_check::{check, CheckOptions, CheckReport, RepairMode};
use qcow2_io::{FileStorage, Storage};

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

fn run(cmd: &str, args: &[&str]) -> (String, String, i32) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// An image under construction in a temporary directory.
struct Img {
    path: PathBuf,
}

impl Img {
    fn create(dir: &Path, name: &str, opts: &str, size: &str) -> Img {
        let path = dir.join(format!("{name}.qcow2"));
        let p = path.to_str().unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p, size]);
        let (_, err, code) = run("qemu-img", &args);
        assert_eq!(code, 0, "create {name}: {err}");
        Img { path }
    }

    fn p(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// qemu-io commands (each `-c`); failures of the commands themselves are allowed.
    fn io(&self, cmds: &[&str]) -> &Self {
        let mut args = Vec::new();
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(self.p());
        let _ = run("qemu-io", &args);
        self
    }

    fn snapshot(&self, name: &str) -> &Self {
        let (_, err, code) = run("qemu-img", &["snapshot", "-c", name, self.p()]);
        assert_eq!(code, 0, "snapshot: {err}");
        self
    }

    fn poke(&self, offset: u64, bytes: &[u8]) -> &Self {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.write_all_at(bytes, offset).unwrap();
        self
    }

    fn poke64(&self, offset: u64, v: u64) -> &Self {
        self.poke(offset, &v.to_be_bytes())
    }

    fn peek64(&self, offset: u64) -> u64 {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, offset).unwrap();
        u64::from_be_bytes(b)
    }

    fn truncate(&self, len: u64) -> &Self {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.set_len(len).unwrap();
        self
    }
}

fn ours(path: &Path, repair: Option<RepairMode>) -> CheckReport {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, repair.is_some()).unwrap());
    check(storage, &CheckOptions { repair }).expect("check runs")
}

fn json_values(s: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("filename");
    }
    v
}

/// Runs one comparison; returns a description of every disagreement.
fn compare(src: &Path, work: &Path, repair: Option<RepairMode>, human: bool) -> Vec<String> {
    let mut diffs = Vec::new();
    let a = work.join("a.qcow2");
    let b = work.join("b.qcow2");
    std::fs::copy(src, &a).unwrap();
    std::fs::copy(src, &b).unwrap();
    let mut args = vec!["check"];
    match repair {
        Some(RepairMode::Leaks) => args.extend(["-r", "leaks"]),
        Some(RepairMode::All) => args.extend(["-r", "all"]),
        None => {}
    }
    if !human {
        args.push("--output=json");
    }
    args.push(a.to_str().unwrap());
    let (q_out, q_err, q_code) = run("qemu-img", &args);
    let report = ours(&b, repair);
    let name = a.to_str().unwrap();
    let o_out = if human {
        report.render_human()
    } else {
        report.render_json(name)
    };
    let o_err = report.render_stderr();
    if q_code != report.exit_code() {
        diffs.push(format!(
            "exit code: qemu {q_code}, ours {}",
            report.exit_code()
        ));
    }
    if human {
        if q_out != o_out {
            diffs.push(format!("stdout:\n--- qemu\n{q_out}--- ours\n{o_out}"));
        }
    } else if json_values(&q_out) != json_values(&o_out) {
        diffs.push(format!("json:\n--- qemu\n{q_out}--- ours\n{o_out}"));
    }
    if q_err != o_err {
        diffs.push(format!("stderr:\n--- qemu\n{q_err}--- ours\n{o_err}"));
    }
    // qemu-img's read-write open of an image with persistent bitmaps marks them in use and
    // stores them again at close (moving the bitmap directory): that is the image layer's
    // business, not the checker's, so the state after repair is compared without bitmaps.
    let has_bitmaps = src.to_str().is_some_and(|p| p.contains("bitmaps"));
    if repair.is_some() && !has_bitmaps {
        // The repaired images must look the same to qemu-img.
        let (qa, _, ca) = run("qemu-img", &["check", "--output=json", a.to_str().unwrap()]);
        let (qb, _, cb) = run("qemu-img", &["check", "--output=json", b.to_str().unwrap()]);
        if ca != cb || json_values(&qa) != json_values(&qb) {
            diffs.push(format!(
                "after repair: qemu's copy {ca} {qa}\n our copy {cb} {qb}"
            ));
        }
        if repair == Some(RepairMode::All) && !matches!(cb, 0 | 3) && ca != cb {
            diffs.push(format!("after our -r all, qemu-img check exits {cb}"));
        }
    }
    diffs
}

/// Compares every mode for one image; panics with all disagreements.
fn agree(img: &Img, work: &Path, human: bool) -> usize {
    let mut all = Vec::new();
    let mut n = 0;
    for mode in [None, Some(RepairMode::Leaks), Some(RepairMode::All)] {
        for d in compare(&img.path, work, mode, false) {
            all.push(format!("[{} {mode:?} json] {d}", img.p()));
        }
        n += 1;
        if human {
            for d in compare(&img.path, work, mode, true) {
                all.push(format!("[{} {mode:?} human] {d}", img.p()));
            }
            n += 1;
        }
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
    n
}

/// 64 KiB clusters: reftable 0x10000, refblock 0x20000, L1 0x30000, first L2 0x40000,
/// first data 0x50000.
fn written(dir: &Path, name: &str) -> Img {
    let img = Img::create(dir, name, "", "64M");
    img.io(&["write -P 0x11 0 64k"]);
    img
}

#[test]
fn corpus_agrees_with_qemu_img() {
    if !have_qemu() {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut images: Vec<(Img, bool)> = Vec::new();

    // Clean images of several shapes.
    let i = Img::create(d, "fresh", "", "1G");
    images.push((i, true));
    let i = Img::create(d, "mixed", "", "1G");
    i.io(&[
        "write 0 64k",
        "write 128k 64k",
        "write -c 256k 64k",
        "write -z 512k 64k",
        "write 1M 192k",
    ]);
    images.push((i, true));
    let i = Img::create(d, "small4k", "cluster_size=4k,refcount_bits=8", "16M");
    i.io(&["write 0 100k", "write -c 1M 12k", "write 3M 4k"]);
    i.snapshot("a");
    i.io(&["write 8k 8k"]);
    images.push((i, true));
    let i = Img::create(d, "v2", "compat=0.10", "16M");
    i.io(&["write 0 128k"]).snapshot("s");
    images.push((i, false));
    let i = Img::create(d, "extl2", "extended_l2=on,cluster_size=64k", "4M");
    i.io(&[
        "write 0 1k",
        "write 6k 2k",
        "write -z 2k 2k",
        "write -c 128k 64k",
    ]);
    images.push((i, false));

    // Mismatched refcounts (217-style leaks, raised and lowered counts).
    let i = written(d, "leaks");
    i.poke(0x20000 + 5 * 2, &[0, 2])
        .poke(0x20000 + 9 * 2, &[0, 1]);
    images.push((i, true));
    let i = written(d, "undercount");
    i.io(&["write 64k 64k"]).snapshot("s");
    i.poke(0x20000 + 5 * 2, &[0, 1]);
    images.push((i, true));

    // 039: lazy refcounts and a crash leave a dirty image missing a data refcount.
    let i = Img::create(d, "dirty039", "lazy_refcounts=on", "128M");
    i.io(&["write -P 0x5a 0 512", "sigraise 9"]);
    images.push((i, true));

    // 060 table.
    let i = written(d, "l2_is_l1");
    i.poke64(0x30000, 0x8000_0000_0003_0000);
    images.push((i, true));
    let i = written(d, "data_in_refblock");
    i.truncate(0x50000).poke64(0x40000, 0x8000_0000_0002_0000);
    images.push((i, true));
    let i = Img::create(d, "inactive_l2", "", "64M");
    i.io(&["write -P 1 0 64k"])
        .snapshot("s")
        .io(&["write -P 2 0 64k"]);
    let l2 = i.peek64(0x30000) & 0x00ff_ffff_ffff_fe00;
    i.poke64(l2, 0x8000_0000_0004_0000);
    images.push((i, true));
    let i = written(d, "empty_reftable");
    i.poke64(0x10000, 0);
    images.push((i, false));
    let i = written(d, "empty_refblock");
    i.poke(0x20000, &vec![0u8; 65536]);
    images.push((i, false));
    let i = written(d, "reftable_clusters0");
    i.poke(56, &[0, 0, 0, 0]);
    images.push((i, false));
    let i = written(d, "unaligned_l1");
    i.poke64(0x30000, 0x8000_0000_0004_2a00);
    images.push((i, false));
    let i = written(d, "unaligned_l2");
    i.poke64(0x40000, 0x8000_0000_0005_2a00);
    images.push((i, false));
    let i = written(d, "unaligned_reftable");
    i.poke64(0x10000, 0x22a00);
    images.push((i, true));
    let i = written(d, "dirty_unaligned_reftable");
    i.poke64(0x10000, 0xffff_2a00).poke(79, &[1]);
    images.push((i, false));
    let i = written(d, "unaligned_zero");
    i.poke64(0x40000, 0x8000_0000_0000_2a01);
    images.push((i, true));
    let i = written(d, "reserved_bits");
    i.poke64(0x30000, 0x8000_0000_0004_0001)
        .poke64(0x40008, 0x0000_0000_0006_0002)
        .poke64(0x10008, 0x100);
    images.push((i, false));
    let i = written(d, "compressed_copied");
    i.io(&["write -c 64k 64k"]);
    let e = i.peek64(0x40008);
    i.poke64(0x40008, e | 1 << 63);
    images.push((i, false));

    // 108: refcount blocks beyond the end of the file.
    let i = written(d, "refblock_outside");
    i.poke64(0x10008, 0x10_0000);
    images.push((i, true));
    let i = written(d, "refblock_outside_huge");
    i.poke64(0x10008, 0x80ff_ffff_0000_0000);
    images.push((i, false));
    let i = written(d, "refblock_refcount2");
    i.poke64(0x10008, 0x20000);
    images.push((i, false));

    // 138.
    let i = Img::create(d, "c138a", "cluster_size=512", "512");
    i.io(&["write 0 512"]);
    let l2 = i.peek64(i.peek64(40)) & 0x00ff_ffff_ffff_fe00;
    i.poke64(l2, 0x0080_0000_0000_0000);
    images.push((i, false));
    let i = written(d, "c138b");
    i.poke(0x20000, &[0, 2]).poke(0x30000, &[0]);
    images.push((i, true));

    // 112: refcount widths and overflow.
    let i = Img::create(d, "rc1", "refcount_bits=1", "64M");
    i.io(&["write 0 64k"]);
    i.poke64(0x40008, 0x8000_0000_0005_0000);
    images.push((i, false));
    let i = Img::create(d, "rc2_snap", "refcount_bits=2", "64M");
    i.io(&["write 0 64k"]).snapshot("a").snapshot("b");
    images.push((i, false));
    let i = Img::create(d, "rc64", "refcount_bits=64", "64M");
    i.io(&["write 0 64k"]);
    i.poke64(0x20000 + 5 * 8, u64::MAX);
    images.push((i, false));

    // Snapshot L1 checks and the 261 snapshot-table cases.
    let base = Img::create(d, "snapbase", "", "64M");
    base.io(&["write 0 64k"])
        .snapshot("test")
        .io(&["write 0 64k"]);
    let so = base.peek64(64);
    let variants: [(&str, u64, &[u8]); 6] = [
        ("sn_l1_unaligned", so, &0x40_0200u64.to_be_bytes()),
        ("sn_l1_too_large", so + 8, &[0x10, 0, 0, 0]),
        ("sn_incomplete", so + 36, &[0, 0, 0, 0]),
        ("sn_extra_too_big", so + 36, &[0, 1, 0, 0]),
        ("sn_too_many", 60, &[0, 1, 0, 1]),
        ("sn_count_2", 60, &[0, 0, 0, 2]),
    ];
    for (name, off, bytes) in variants {
        let p = d.join(format!("{name}.qcow2"));
        std::fs::copy(&base.path, &p).unwrap();
        let i = Img { path: p };
        i.poke(off, bytes);
        images.push((i, false));
    }
    // A snapshot table that grows beyond 64 MiB (261): the last entries hang over.
    let i = Img::create(d, "sn_table_too_big", "", "64M");
    i.io(&["write 0 64k"]).snapshot("x");
    let so = i.peek64(64);
    let n: u32 = 520;
    let mut table = Vec::new();
    let sn = {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&i.peek64(so).to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        e[36..40].copy_from_slice(&64u32.to_be_bytes());
        e.extend_from_slice(&[0u8; 64]);
        e.push(b'1');
        e.extend(std::iter::repeat_n(b'n', 0xffff));
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    };
    for _ in 0..n {
        table.extend_from_slice(&sn);
    }
    let new_so = 0x100_0000u64;
    i.poke(new_so, &table)
        .poke(60, &n.to_be_bytes())
        .poke64(64, new_so);
    images.push((i, false));

    // Bitmaps (counted when the extension is present).
    let i = Img::create(d, "bitmaps", "", "64M");
    i.io(&["write 0 64k"]);
    let (_, err, code) = run("qemu-img", &["bitmap", "--add", i.p(), "b0"]);
    assert_eq!(code, 0, "{err}");
    images.push((i, false));

    let mut compared = 0;
    let n_images = images.len();
    for (img, human) in &images {
        compared += agree(img, w, *human);
    }
    eprintln!("{n_images} images, {compared} comparisons agree with qemu-img");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A plausible-but-wrong 64-bit metadata word: small offsets (aligned or not) with
    /// random flag bits, zero, or noise, so the checker meets every class of problem
    /// without huge file growth.
    fn word(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => self.below(0x40) << 16,
            2 => (self.below(0x40) << 16) | (self.below(0x200) & !1),
            3 => (self.below(0x40) << 16) | 1 << 63,
            4 => (self.below(0x40) << 16) | 1 << 62 | self.below(256) << 54,
            _ => self.next() & 0x0000_00ff_ffff_ffff,
        }
    }
}

#[test]
fn random_pokes_agree_with_qemu_img() {
    if !have_qemu() {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A base with data, a compressed cluster, a zero cluster and a snapshot whose L2 tables
    // are shared with the active L1.
    let base = Img::create(d, "base", "", "64M");
    base.io(&["write 0 192k", "write -c 1M 64k", "write -z 2M 64k"])
        .snapshot("s1")
        .io(&["write 64k 64k"]);
    let so = base.peek64(64);
    let l1 = base.peek64(40);
    let l2 = base.peek64(l1) & 0x00ff_ffff_ffff_fe00;
    let sn_l1 = base.peek64(so);
    // QCOW2_CHECK_SEED / QCOW2_CHECK_IMAGES explore further seeds by hand.
    let seed = std::env::var("QCOW2_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0fc0_ffee_u64);
    let count: u64 = std::env::var("QCOW2_CHECK_IMAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut rng = Rng(seed);
    let mut compared = 0;
    for k in 0..count {
        let p = d.join(format!("rand{k}.qcow2"));
        std::fs::copy(&base.path, &p).unwrap();
        let img = Img { path: p };
        let pokes = 1 + rng.below(2);
        for _ in 0..pokes {
            let (off, val) = match rng.below(7) {
                0 => (l1 + 8 * rng.below(2), rng.word()),
                1 => (l2 + 8 * rng.below(24), rng.word()),
                // A well-formed entry (aligned offset, maybe COPIED) pointing anywhere in
                // or past the 64 KiB-cluster file: the checker's fast path must report
                // metadata hits, double references and beyond-EOF exactly as QEMU does.
                6 => (
                    l2 + 8 * rng.below(24),
                    (rng.below(2) << 63) | (rng.below(160) << 16),
                ),
                2 => (0x10000 + 8 * rng.below(2), rng.word() & !(1 << 62)),
                3 => {
                    let at = 0x20000 + 2 * rng.below(16);
                    img.poke(at, &(rng.below(4) as u16).to_be_bytes());
                    continue;
                }
                4 => (sn_l1 + 8 * rng.below(2), rng.word()),
                _ => {
                    // The snapshot table header: L1 offset/size, extra data size.
                    match rng.below(3) {
                        0 => (so, rng.word()),
                        1 => {
                            img.poke(so + 8, &(rng.below(5) as u32).to_be_bytes());
                            continue;
                        }
                        _ => {
                            img.poke(so + 36, &(rng.below(40) as u32).to_be_bytes());
                            continue;
                        }
                    }
                }
            };
            img.poke64(off, val);
        }
        compared += agree(&img, w, false);
    }
    eprintln!("{count} random images (seed {seed}), {compared} comparisons agree with qemu-img");
}
