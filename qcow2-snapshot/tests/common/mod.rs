//! Shared helpers of the integration tests.
#![allow(dead_code, unused_imports)]

pub use qcow2_snapshot::test_utils::{qemu_create, qemu_io, qemu_list, run, TestImage};
use std::path::{Path, PathBuf};

/// A temp dir with an image path in it.
pub fn tmp_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    (dir, p)
}

/// `qemu-img check` must be strictly clean (no leak, no corruption).
pub fn assert_clean(path: &Path) {
    let (code, out, err) = run("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check not clean:\n{out}{err}");
}

/// What `qemu-img check` found, with COPIED mismatches split into the benign kind (flag
/// missing on a cluster whose refcount is 1: forces a needless COW, never corrupts) and the
/// rest.
#[derive(Debug, Default)]
pub struct Findings {
    pub code: i32,
    pub leaks: u64,
    pub benign_copied: u64,
    pub harmful: Vec<String>,
}

pub fn findings(path: &Path) -> Findings {
    let (code, out, err) = run("qemu-img", &["check", path.to_str().unwrap()]);
    let mut f = Findings {
        code,
        ..Default::default()
    };
    for line in out.lines().chain(err.lines()) {
        if line.starts_with("Leaked cluster") {
            f.leaks += 1;
        } else if line.starts_with("ERROR OFLAG_COPIED") {
            // "... l2_entry=HEX refcount=N" or "... l1_entry=HEX refcount=N"
            let entry = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("l2_entry=").or(w.strip_prefix("l1_entry=")))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(u64::MAX);
            let refcount = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("refcount="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            if refcount == 1 && entry & (1 << 63) == 0 {
                f.benign_copied += 1;
            } else {
                f.harmful.push(line.to_owned());
            }
        } else if line.starts_with("ERROR") || line.contains("Check failed") {
            f.harmful.push(line.to_owned());
        }
    }
    if code != 0 && code != 3 && f.harmful.is_empty() && f.benign_copied == 0 {
        f.harmful.push(format!("exit code {code}: {out}{err}"));
    }
    f
}

/// The image may leak (and miss COPIED flags, which only cost a COW), nothing else.
pub fn assert_leaks_at_most(path: &Path, what: &str) -> Findings {
    let f = findings(path);
    assert!(
        f.harmful.is_empty(),
        "{what}: harmful findings {:?}",
        f.harmful
    );
    f
}

/// Writes bytes to `path` and returns it.
pub fn write_image(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// qemu-io verifies `pattern` over `[off, off+len)`.
pub fn verify(path: &Path, pattern: u8, off: &str, len: &str) {
    qemu_io(path, &[&format!("read -P {pattern:#x} {off} {len}")]);
}
