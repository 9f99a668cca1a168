//! NBD servers under test: `qcow2 serve` and, for comparison, `qemu-nbd`, started with a
//! pid file and killed when dropped; and the checks the NBD tests share.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ok, qemu_img};

/// A running NBD server; killed and reaped when dropped.
pub struct Served {
    pub child: Child,
    pub pid_file: PathBuf,
}

impl Served {
    /// Starts `qcow2 serve ARGS` in `dir` and waits until it listens (its pid file exists).
    pub fn start(dir: &Path, args: &[&str]) -> Served {
        Served::spawn(
            env!("CARGO_BIN_EXE_qcow2"),
            &["serve"],
            dir,
            args,
            &[],
            None,
        )
    }

    /// Starts `qemu-nbd ARGS` in `dir` (the reference server), as [`Served::start`].
    pub fn start_qemu_nbd(dir: &Path, args: &[&str]) -> Served {
        Served::spawn("qemu-nbd", &[], dir, args, &[], None)
    }

    /// Starts `program PRE --pid-file F ARGS` in `dir` with extra environment variables
    /// (and stderr into `log` when given), and waits until its pid file exists.
    pub fn spawn(
        program: &str,
        pre: &[&str],
        dir: &Path,
        args: &[&str],
        envs: &[(&str, &OsStr)],
        log: Option<&Path>,
    ) -> Served {
        let tag = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid_file = dir.join(format!("{tag}-{}.pid", args.len()));
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = Command::new(program);
        cmd.args(pre)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).expect("log file"));
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let mut s = Served { child, pid_file };
        let t = Instant::now();
        while !s.pid_file.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{program} exited early: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Waits (at most 20 s) for the server to exit by itself; its exit code.
    pub fn wait(&mut self) -> i32 {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(t.elapsed() < Duration::from_secs(20), "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> i32 {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        self.wait()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `nbd+unix://` URI of export `name` on socket `sock`.
pub fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// `qemu-img check` finds no error and the dirty bit is clear.
pub fn clean(dir: &Path, image: &str) {
    let r = qemu_img(dir, &["check", image]);
    assert_eq!(r.code, 0, "{}", r.text());
    let r = qemu_img(dir, &["info", "--output=json", image]);
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["dirty-flag"], serde_json::Value::Bool(false));
}

/// `-c CMD` for each command of a qemu-io script.
pub fn io_args<'a>(cmds: &'a [&'a str]) -> Vec<&'a str> {
    cmds.iter().flat_map(|c| ["-c", *c]).collect()
}

/// Whether libnbd's `nbdinfo` is installed (CI installs it; elsewhere those checks are
/// skipped with a message).
pub fn have_nbdinfo() -> bool {
    let ok = Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("nbdinfo not installed: skipping the libnbd checks");
    }
    ok
}

/// Runs `nbdinfo ARGS`, asserting success; its stdout.
pub fn nbdinfo(args: &[&str]) -> String {
    let o = Command::new("nbdinfo").args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}
