//! Running commands: timed runs with a time limit, and untimed helpers for preparation.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How one timed run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Exit status 0, in this many seconds (spawn to exit).
    Ok(f64),
    /// A non-zero exit (or a signal), with the tail of its stderr and stdout.
    Failed {
        /// Exit status as text.
        status: String,
        /// The last lines of the command's stderr, then stdout.
        message: String,
    },
    /// It ran past the time limit and was killed.
    TimedOut(f64),
    /// It could not be started at all.
    SpawnError(String),
}

/// CPU seconds (user + system) of this process's reaped children, from /proc/self/stat
/// (cutime + cstime, in USER_HZ = 100 ticks per second).
pub fn children_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command name start at field 3 (state); cutime and cstime are 16, 17.
    let cutime: f64 = f.get(13)?.parse().ok()?;
    let cstime: f64 = f.get(14)?.parse().ok()?;
    Some((cutime + cstime) / 100.0)
}

/// Runs `program args` with stdout and stderr going to `log_base.{out,err}`, measuring the
/// wall time from spawn to exit, and killing it (by its process id) after `limit`.
pub fn run_timed(program: &Path, args: &[OsString], log_base: &Path, limit: Duration) -> Outcome {
    let out_path = log_base.with_extension("out");
    let err_path = log_base.with_extension("err");
    let (out, err) = match (File::create(&out_path), File::create(&err_path)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return Outcome::SpawnError(format!("log file: {e}")),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::SpawnError(format!("{}: {e}", program.display())),
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<(std::io::Result<ExitStatus>, Instant)>();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let result = match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            // The waiter has not reaped the child, so the id still names our child.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = rx.recv();
            let _ = waiter.join();
            return Outcome::TimedOut(start.elapsed().as_secs_f64());
        }
    };
    let _ = waiter.join();
    let (status, end) = result;
    let secs = end.duration_since(start).as_secs_f64();
    match status {
        Ok(s) if s.success() => Outcome::Ok(secs),
        Ok(s) => Outcome::Failed {
            status: s.to_string(),
            message: tail_of_logs(&err_path, &out_path),
        },
        Err(e) => Outcome::SpawnError(format!("wait: {e}")),
    }
}

/// The last few non-empty lines of stderr (or stdout if stderr is empty), joined by " / ".
fn tail_of_logs(err: &Path, out: &Path) -> String {
    let read = |p: &Path| {
        let mut s = String::new();
        if let Ok(mut f) = File::open(p) {
            let _ = f.read_to_string(&mut s);
        }
        s
    };
    let e = read(err);
    let text = if e.trim().is_empty() { read(out) } else { e };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(4);
    let mut msg = lines[start..].join(" / ");
    if msg.len() > 400 {
        let mut cut = 400;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    if msg.is_empty() {
        msg = "(no output)".to_string();
    }
    msg
}

/// An untimed helper command; fails with its output if it exits non-zero.
pub fn run_checked(program: &Path, args: &[OsString]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{} {}` failed ({}): {}{}",
            program.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        ))
    }
}

/// Like [`run_checked`] for `&str` arguments.
pub fn run_str(program: &Path, args: &[&str]) -> Result<String, String> {
    let v: Vec<OsString> = args.iter().map(OsString::from).collect();
    run_checked(program, &v)
}

/// Output (stdout, stderr, success) of a command that may fail, for probing.
pub fn probe(program: &Path, args: &[&str]) -> Option<(String, String, bool)> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    ))
}

/// Finds `name` on PATH (or takes it as a path if it contains a slash).
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
