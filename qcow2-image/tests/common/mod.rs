//! Shared helpers of the integration tests: a seeded RNG, qemu-img drivers, a raw mirror.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// splitmix64: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A buffer with a pattern that compresses somewhat (runs) or not at all.
    pub fn data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        if self.chance(50) {
            let mut i = 0;
            while i < len {
                let b = self.next() as u8;
                let run = (1 + self.below(300)) as usize;
                for x in v.iter_mut().skip(i).take(run) {
                    *x = b;
                }
                i += run;
            }
        } else {
            for c in v.chunks_mut(8) {
                let r = self.next().to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
        }
        v
    }
}

/// `qemu-img check --output=json` result: (exit code, parsed json).
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img");
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (code, v)
}

/// Asserts `qemu-img check` finds no error, no corruption and (if `strict`) no leak.
pub fn assert_clean(path: &Path, strict: bool, what: &str) {
    let (code, v) = qemu_check(path);
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    let leaks = v["leaks"].as_u64().unwrap_or(0);
    let ok = if strict {
        code == 0
    } else {
        (code == 0 || code == 3) && corruptions == 0 && errors == 0
    };
    if !ok || v.is_null() {
        let human = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path)
            .output()
            .expect("qemu-img");
        panic!(
            "{what}: qemu-img check exit {code} (corruptions {corruptions}, errors {errors}, leaks {leaks}):\n{}{}",
            String::from_utf8_lossy(&human.stdout),
            String::from_utf8_lossy(&human.stderr)
        );
    }
}

/// `qemu-img compare` of a qcow2 image with a raw file (exit 0 = identical).
pub fn assert_compare(img: &Path, raw: &Path, what: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(img)
        .arg(raw)
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "{what}: qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `qemu-io` with commands on an image; panics on failure; returns stdout.
pub fn qemu_io(img: &Path, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(img).output().expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && !stdout.contains("failed") && stderr.is_empty(),
        "qemu-io failed: {stdout}{stderr}"
    );
    stdout
}

/// `qemu-img create` with options.
pub fn qemu_create(img: &Path, opts: &str, size: u64, backing: Option<(&Path, &str)>) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    if let Some((b, fmt)) = backing {
        c.arg("-b").arg(b).args(["-F", fmt]);
    }
    let out = c.arg(img).arg(size.to_string()).output().expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seeded random guest workload shared by the interop tests.
pub struct Workload {
    pub name: &'static str,
    pub size: u64,
    pub cs: u64,
    /// v2 with a backing file: QEMU ignores guest discards.
    pub discard_ignored: bool,
}

impl Workload {
    /// Runs `ops` random operations on `img`, mirroring them; `reopen` reopens the image.
    pub fn run(
        &self,
        mut img: qcow2_image::Image,
        mirror: &mut [u8],
        rng: &mut Rng,
        ops: u32,
        reopen: &dyn Fn() -> qcow2_image::Image,
    ) -> qcow2_image::Image {
        let (size, cs, name) = (self.size, self.cs, self.name);
        for i in 0..ops {
            let what = rng.below(100);
            let off = rng.below(size);
            let maxlen = (size - off).min(3 * cs + rng.below(2 * cs));
            let len = (1 + rng.below(maxlen.max(1))).min(size - off);
            match what {
                0..=44 => {
                    let (off, len) = if rng.chance(30) {
                        let o = off / 512 * 512;
                        (o, (len.div_ceil(512) * 512).min(size - o))
                    } else {
                        (off, len)
                    };
                    let data = rng.data(len as usize);
                    img.write(off, &data)
                        .unwrap_or_else(|e| panic!("{name}: op {i} write: {e}"));
                    mirror[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                45..=59 => {
                    let unmap = rng.chance(50);
                    img.write_zeroes(off, len, unmap)
                        .unwrap_or_else(|e| panic!("{name}: op {i} zero: {e}"));
                    mirror[off as usize..(off + len) as usize].fill(0);
                }
                60..=71 => {
                    img.discard(off, len)
                        .unwrap_or_else(|e| panic!("{name}: op {i} discard: {e}"));
                    if !self.discard_ignored {
                        let start = off.div_ceil(cs) * cs;
                        let end = if off + len == size {
                            size
                        } else {
                            (off + len) / cs * cs
                        };
                        if start < end {
                            mirror[start as usize..end as usize].fill(0);
                        }
                    }
                }
                72..=83 => {
                    let o = off / cs * cs;
                    let l = cs.min(size - o);
                    let data = rng.data(l as usize);
                    img.write_compressed(o, &data)
                        .unwrap_or_else(|e| panic!("{name}: op {i} compressed: {e}"));
                    mirror[o as usize..(o + l) as usize].copy_from_slice(&data);
                }
                84..=89 => img.flush().unwrap(),
                90..=93 => {
                    img.close().unwrap();
                    img = reopen();
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    img.read(off, &mut buf).unwrap();
                    assert!(
                        buf == mirror[off as usize..(off + len) as usize],
                        "{name}: op {i}: read mismatch at {off:#x}+{len:#x}"
                    );
                }
            }
        }
        img
    }
}

/// A post-crash image: `qemu-img check` finds no corruption (leaks allowed), and every
/// byte not marked `unstable` (written since the last completed flush) reads as `stable`.
pub fn check_crash_state(image: &[u8], stable: &[u8], unstable: &[bool], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crash.qcow2");
    std::fs::write(&p, image).unwrap();
    let (code, v) = qemu_check(&p);
    let corrupt = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    assert!(
        (code == 0 || code == 3) && corrupt == 0 && errors == 0,
        "{what}: qemu-img check exit {code}: {v}"
    );
    let mut img = qcow2_image::Image::open(
        std::sync::Arc::new(qcow2_io::MemStorage::from_bytes(image.to_vec())),
        &qcow2_image::OpenOptions::read_only(),
    )
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let n = img.virtual_size().min(stable.len() as u64) as usize;
    let mut buf = vec![0u8; n];
    img.read(0, &mut buf).unwrap();
    for i in 0..n {
        // Bytes not written since the last completed flush must be the flushed ones.
        if !unstable[i] && buf[i] != stable[i] {
            panic!(
                "{what}: flushed byte at {i:#x} lost ({:#x} != {:#x})",
                buf[i], stable[i]
            );
        }
    }
}
