//! NBD workloads: each side serves its own copy of the image (`qcow2 serve` against
//! `qemu-nbd`, both with their defaults, on a Unix socket, `-t`), and the same client —
//! `qemu-img bench -f raw` on the `nbd+unix://` URI — is timed against each. Only the
//! client run is timed; the server starts before and is stopped (SIGTERM, which flushes
//! and closes the image) after.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{self, Outcome};
use super::workloads::{coprime_multiplier, lits, scaled, Arg, Kind, Params, Template, Workload};
use crate::util::fmt_bytes;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The NBD workloads: random 4 KiB reads at depth 32 and sequential 64 KiB allocating
/// writes, sized like the local ones (256 MiB at scale 1).
pub fn workloads(params: &Params) -> Vec<Workload> {
    let size = scaled(256 * MIB, params.scale, MIB, MIB);
    let mut w = Vec::new();
    let blocks = size / (4 * KIB);
    let reads = (blocks / 2).max(16);
    let step = 4 * KIB * coprime_multiplier(blocks);
    let mut args = lits(&[
        "bench",
        "-f",
        "raw",
        "-t",
        "none",
        "-d",
        "32",
        "-s",
        "4096",
        "-S",
        &step.to_string(),
        "-c",
        &reads.to_string(),
    ]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "nbd-rand-read-4k",
        title: format!(
            "NBD: random 4 KiB reads, 32 in flight, {reads} of them, of a written {} image served read-only",
            fmt_bytes(size)
        ),
        template: Some(Template::Written {
            cluster: 64 * KIB,
            size,
        }),
        kind: Kind::Served {
            args,
            read_only: true,
        },
        bytes: reads * 4 * KIB,
        floor: None,
    });
    let count = (size / (64 * KIB)).to_string();
    let mut args = lits(&[
        "bench",
        "-w",
        "-f",
        "raw",
        "-t",
        "none",
        "-d",
        "32",
        "-s",
        "65536",
        "-c",
        &count,
        "--pattern",
        "165",
    ]);
    args.push(Arg::Image);
    w.push(Workload {
        name: "nbd-seq-write-64k",
        title: format!(
            "NBD: sequential allocating 64 KiB writes, 32 in flight, into an empty {} image",
            fmt_bytes(size)
        ),
        template: Some(Template::Empty {
            cluster: 64 * KIB,
            size,
        }),
        kind: Kind::Served {
            args,
            read_only: false,
        },
        bytes: size,
        floor: None,
    });
    w
}

/// The server's command line, without the program: ours is `qcow2 serve ...`, QEMU's
/// `qemu-nbd ...`.
fn server_args(
    ours: bool,
    sock: &Path,
    pid: &Path,
    read_only: bool,
    image: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if ours {
        a.push("serve".into());
    }
    for s in ["-t", "-f", "qcow2", "-k"] {
        a.push(s.into());
    }
    a.push(sock.into());
    a.push("--pid-file".into());
    a.push(pid.into());
    if read_only {
        a.push("-r".into());
    }
    a.push(image.into());
    a
}

/// Stops a server with SIGTERM (it flushes and closes its image) and reaps it; SIGKILL
/// after 60 s.
fn stop(mut child: Child) -> Result<(), String> {
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| e.to_string())?;
    #[allow(unsafe_code)]
    // SAFETY: kill takes a pid and a signal number; the pid is our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("server exited with {st}")),
            Ok(None) if t.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("server did not stop within 60 s".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One timed run: starts the server (`server`, ours when `ours`) on `image`, times
/// `client args` with the image argument replaced by the export's URI, stops the server.
#[allow(clippy::too_many_arguments)]
pub fn run_served(
    server: &Path,
    ours: bool,
    client: &Path,
    args: &[Arg],
    read_only: bool,
    image: &Path,
    log: &Path,
    limit: Duration,
) -> Outcome {
    let sock = log.with_extension("sock");
    let pid = log.with_extension("pid");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&pid);
    let server_log = match std::fs::File::create(log.with_extension("server.err")) {
        Ok(f) => f,
        Err(e) => return Outcome::SpawnError(format!("log file: {e}")),
    };
    let mut child = match Command::new(server)
        .args(server_args(ours, &sock, &pid, read_only, image))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(server_log)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::SpawnError(format!("{}: {e}", server.display())),
    };
    // Listening once the pid file exists (both servers write it after binding).
    let t = Instant::now();
    while !pid.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Outcome::Failed {
                status: st.to_string(),
                message: format!("the server {} did not start", server.display()),
            };
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Failed {
                status: "timeout".into(),
                message: "the server did not listen within 30 s".into(),
            };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let client_args: Vec<OsString> = args
        .iter()
        .map(|a| match a {
            Arg::Lit(s) => OsString::from(s),
            // The client is the same program for both servers; a per-side argument
            // follows the server under test.
            Arg::PerSide { ours: o, qemu } => OsString::from(if ours { o } else { qemu }),
            Arg::Image | Arg::Output => OsString::from(&uri),
        })
        .collect();
    let outcome = process::run_timed(client, &client_args, log, limit);
    match (stop(child), outcome) {
        (Err(e), Outcome::Ok(_)) => Outcome::Failed {
            status: "server".into(),
            message: e,
        },
        (_, o) => o,
    }
}
