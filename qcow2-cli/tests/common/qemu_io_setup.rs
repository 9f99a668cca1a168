//! Running our binary as `qemu-io`/`qemu-img` (symlinks) beside QEMU's, with stdout and
//! stderr merged in write order, for comparing what both print.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Exit status, or 128 + the signal that ended it.
    pub code: i32,
    /// stdout and stderr as one stream, in write order, timings masked.
    pub merged: String,
}

/// QEMU's project links at the end of its usage text (not ours to print).
pub const QEMU_LINKS: &str =
    "\n\nSee <https://qemu.org/contribute/report-a-bug> for how to report \
                          bugs.\nMore information on the QEMU project at <https://qemu.org>.";

/// Masks what differs between runs by definition: timings and rates (and QEMU's links).
pub fn mask(s: &str) -> String {
    s.replace(QEMU_LINKS, "")
        .lines()
        .map(|l| {
            if let Some(i) = l.find(" ops; ") {
                return format!("{} ops; <time>", &l[..i]);
            }
            // The -C line: bytes,ops,time,rate,rate.
            let f: Vec<&str> = l.split(',').collect();
            if f.len() == 5 && f[..2].iter().all(|x| x.parse::<u64>().is_ok()) {
                return format!("{},{},<time>", f[0], f[1]);
            }
            l.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A scratch area: `bin/` with our binary behind QEMU's names, and `ours/` and `qemu/`
/// holding the same files.
pub struct Setup {
    pub root: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        for d in ["bin", "ours", "qemu"] {
            std::fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        let exe = Path::new(env!("CARGO_BIN_EXE_qcow2"));
        for name in ["qemu-io", "qemu-img"] {
            std::os::unix::fs::symlink(exe, root.path().join("bin").join(name)).expect("symlink");
        }
        Setup { root }
    }

    pub fn dir(&self, side: &str) -> PathBuf {
        self.root.path().join(side)
    }

    pub fn ours_bin(&self, name: &str) -> PathBuf {
        self.root.path().join("bin").join(name)
    }

    /// Creates `name` in both directories with qemu-img's `args` (e.g. `-f qcow2 x 1M`).
    pub fn qemu_img_both(&self, args: &[&str]) {
        for side in ["ours", "qemu"] {
            let st = Command::new("qemu-img")
                .args(args)
                .current_dir(self.dir(side))
                .stdout(Stdio::null())
                .status()
                .expect("qemu-img");
            assert!(st.success(), "qemu-img {args:?}");
        }
    }

    /// Writes `bytes` to `name` in both directories.
    pub fn file_both(&self, name: &str, bytes: &[u8]) {
        for side in ["ours", "qemu"] {
            std::fs::write(self.dir(side).join(name), bytes).expect("write");
        }
    }

    /// Runs `program` in `side`'s directory with `stdin` piped in (or closed).
    pub fn run(&self, program: &Path, side: &str, args: &[&str], stdin: Option<&str>) -> Out {
        let log_path = self.root.path().join(format!("{side}.log"));
        let log = File::create(&log_path).expect("log");
        let stdin_path = self.root.path().join(format!("{side}.stdin"));
        std::fs::write(&stdin_path, stdin.unwrap_or("")).expect("stdin");
        let mut child = Command::new(program)
            .args(args)
            .current_dir(self.dir(side))
            .stdin(File::open(&stdin_path).expect("stdin"))
            // One open file description for both: writes interleave as they happen.
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} {args:?} did not finish", program.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let text = std::fs::read(&log_path).expect("log");
        Out {
            code,
            merged: mask(&String::from_utf8_lossy(&text)),
        }
    }

    /// Runs our `qemu-io` in `ours/` and QEMU's in `qemu/` and asserts that they print
    /// the same and exit the same way; returns our output.
    pub fn same(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let ours = self.run(&self.ours_bin("qemu-io"), "ours", args, stdin);
        let qemu = self.run(Path::new("qemu-io"), "qemu", args, stdin);
        // Past C's 4 KiB stdout buffer, where standard error lands in the merged stream
        // depends on the lengths of the (masked) timing lines: keep scripts below it.
        assert!(
            stdin.is_some() || qemu.merged.len() < 3800 || !qemu.merged.contains("<time>"),
            "script too long for a deterministic merged comparison: {args:?}"
        );
        assert_eq!(
            ours.merged, qemu.merged,
            "output differs for {args:?} (stdin {stdin:?})"
        );
        assert_eq!(ours.code, qemu.code, "exit code differs for {args:?}");
        ours
    }

    /// Asserts that `name` has the same bytes on both sides.
    pub fn same_file(&self, name: &str) {
        let a = std::fs::read(self.dir("ours").join(name)).expect("read ours");
        let b = std::fs::read(self.dir("qemu").join(name)).expect("read qemu");
        assert!(a == b, "{name} differs between ours and qemu-io's");
    }
}

pub fn c_args<'a>(cmds: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    for c in cmds {
        v.push("-c");
        v.push(*c);
    }
    v.extend_from_slice(tail);
    v
}
