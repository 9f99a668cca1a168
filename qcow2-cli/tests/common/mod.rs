//! Helpers for running `qcow2` and its peers `qemu-img` / `qemu-io` side by side.
#![allow(dead_code)]

pub mod qemu_io_setup;
pub mod served;

use std::path::Path;
use std::process::Command;

pub mod luks;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Exit status (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// stdout and stderr joined, with qemu-img's and qemu-io's program prefix replaced by
    /// ours, for comparing messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
            .replace("qemu-img: ", "qcow2: ")
            .replace("qemu-io: ", "qcow2: ")
    }
}

/// Runs `program ARGS` in `dir`.
pub fn run_in(program: &str, dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        // qemu-img prints snapshot dates in the local time zone, we print UTC.
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs our binary in `dir`.
pub fn qcow2(dir: &Path, args: &[&str]) -> Run {
    run_in(env!("CARGO_BIN_EXE_qcow2"), dir, args)
}

/// Runs qemu-img in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    run_in("qemu-img", dir, args)
}

/// Runs qemu-io in `dir`.
pub fn qemu_io(dir: &Path, args: &[&str]) -> Run {
    run_in("qemu-io", dir, args)
}

/// Whether qemu-img and qemu-io are installed (CI installs them; a machine without them
/// skips the comparisons with a message rather than failing).
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img/qemu-io not found: skipping the comparison with QEMU");
    }
    ok
}

/// Two scratch directories, one for our files and one for qemu-img's, so that both tools
/// see the same relative file names.
pub struct Pair {
    /// Holds both directories.
    pub root: tempfile::TempDir,
}

impl Pair {
    /// Fresh directories `ours/` and `qemu/`.
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("ours")).expect("mkdir");
        std::fs::create_dir(root.path().join("qemu")).expect("mkdir");
        Pair { root }
    }

    /// Our directory.
    pub fn ours(&self) -> std::path::PathBuf {
        self.root.path().join("ours")
    }

    /// qemu-img's directory.
    pub fn qemu(&self) -> std::path::PathBuf {
        self.root.path().join("qemu")
    }

    /// Runs `qcow2 args` in ours and `qemu-img args` in qemu's.
    pub fn both(&self, args: &[&str]) -> (Run, Run) {
        (qcow2(&self.ours(), args), qemu_img(&self.qemu(), args))
    }

    /// Copies a file from qemu's directory into ours.
    pub fn copy_to_ours(&self, name: &str) {
        std::fs::copy(self.qemu().join(name), self.ours().join(name)).expect("copy");
    }
}

/// Asserts that a command succeeded (exit status 0), showing what it printed otherwise.
pub fn ok(r: impl std::borrow::Borrow<Run>) {
    let r = r.borrow();
    assert_eq!(r.code, 0, "{r:?}");
}

/// A two-image qcow2 chain made by QEMU in `d`: `base.qcow2` (4 KiB clusters, 64 MiB; data,
/// a zero range, a compressed cluster and a short write far out) under `top.qcow2` (data
/// and a zero write over the base).
pub fn backing_chain_fixture(d: &Path) {
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.qcow2",
            "64M",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 0 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -c -P 3 2M 64k",
            "-c",
            "write -P 5 40M 3000",
            "base.qcow2",
        ],
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
            "top.qcow2",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 7 10M 1M",
            "-c",
            "write -z 0 4k",
            "top.qcow2",
        ],
    ));
}

/// `qemu-img map --output=json` of `file` in `d`. Without `offsets`, host offsets are
/// dropped and neighbours that then look alike are merged: QEMU's commit job copies with
/// several requests in flight, so where (and how contiguously) the base's new clusters
/// land varies from run to run (and so with convert -W).
pub fn map_json(d: &Path, file: &str, offsets: bool) -> String {
    let r = qemu_img(d, &["map", "--output=json", file]);
    ok(&r);
    if offsets {
        return r.stdout;
    }
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in v {
        e.as_object_mut().unwrap().remove("offset");
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == e[k]);
            let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
            if same && end == e["start"].as_u64().unwrap() {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    serde_json::to_string_pretty(&out).unwrap()
}

/// Same exit code and text; a usage error differs only in the pointer to the help
/// ("(see 'qcow2 CMD --help')" where qemu-img adds a "Try ..." line).
pub fn same_output(ours: &Run, qemu: &Run, what: &str) {
    assert_eq!(ours.code, qemu.code, "{what}: {ours:?} vs {qemu:?}");
    let q = qemu.text();
    if let Some((first, _)) = q.split_once("\nTry 'qemu-img ") {
        assert!(
            ours.text().starts_with(&format!("{first} (see 'qcow2 ")),
            "{what}: {ours:?} vs {qemu:?}"
        );
    } else {
        assert_eq!(ours.text(), q, "{what}");
    }
}
