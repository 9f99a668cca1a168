//! `qcow2 serve`'s modes against qemu-nbd's: `--detect-zeroes off|on|unmap`,
//! `-s/--snapshot` (a temporary overlay), `-l/--load-snapshot` (an internal snapshot,
//! read-only) and `--fork`, each with QEMU's or libnbd's client, the same client run
//! against qemu-nbd on a copy of the same image.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::served::{clean, have_nbdinfo, io_args, nbdinfo, uri, Served};
use common::{have_qemu, ok, qemu_img, qemu_io, Run};

fn image(dir: &Path, name: &str, size: &str) {
    ok(qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]));
}

/// (start, length, present, zero, data, has a host offset) of each `qemu-img map` entry.
type MapRow = (u64, u64, bool, bool, bool, bool);

fn map_rows(dir: &Path, image: &str) -> Vec<MapRow> {
    let r = qemu_img(dir, &["map", "--output=json", image]);
    ok(&r);
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    v.iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e.get("offset").is_some(),
            )
        })
        .collect()
}

/// The map entry that covers `offset`.
fn row_at(rows: &[MapRow], offset: u64) -> MapRow {
    *rows
        .iter()
        .find(|r| r.0 <= offset && offset < r.0 + r.1)
        .unwrap()
}

/// A qemu-io script over NBD, asserting that every verifying read matched.
fn io_over_nbd(dir: &Path, u: &str, read_only: bool, cmds: &[&str]) -> Run {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.push(u);
    args.extend(io_args(cmds));
    let r = qemu_io(dir, &args);
    ok(&r);
    assert!(!r.text().contains("verification failed"), "{}", r.text());
    r
}

/// qemu-io's output without its timing lines (which differ from run to run).
fn without_timings(r: &Run) -> String {
    r.stdout
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Zero payloads over data, over unallocated clusters, unaligned inside a data cluster,
/// and a short one; a payload that is not zero.
const ZERO_SCRIPT: &[&str] = &[
    "write -P 0 0 64k",
    "write -P 0 100k 10k",
    "write -P 0 1m 128k",
    "write -P 0 2m 3k",
    "write -P 0 3m 512",
    "write -P 0x5c 3200k 4k",
    "read -P 0 0 64k",
    "read -P 0x11 64k 36k",
    "read -P 0 100k 10k",
    "read -P 0x5c 3200k 4k",
];

#[test]
fn detect_zeroes_maps_as_qemu_nbd_does() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for mode in ["off", "on", "unmap"] {
        let mut rows = Vec::new();
        for server in ["ours", "qemu"] {
            let name = format!("{server}-{mode}.qcow2");
            image(dir, &name, "4M");
            ok(qemu_io(dir, &["-c", "write -P 0x11 0 256k", &name]));
            let sock = dir.join(format!("{server}.sock"));
            let detect = format!("--detect-zeroes={mode}");
            let args = [
                "-f",
                "qcow2",
                "-k",
                sock.to_str().unwrap(),
                "--discard=unmap",
                &detect,
                &name,
            ];
            let mut s = if server == "ours" {
                Served::start(dir, &args)
            } else {
                Served::start_qemu_nbd(dir, &args)
            };
            io_over_nbd(dir, &uri(&sock, ""), false, ZERO_SCRIPT);
            assert_eq!(s.wait(), 0);
            clean(dir, &name);
            rows.push(map_rows(dir, &name));
        }
        assert_eq!(rows[0], rows[1], "--detect-zeroes={mode}: ours vs qemu-nbd");
        ok(qemu_img(
            dir,
            &[
                "compare",
                &format!("ours-{mode}.qcow2"),
                &format!("qemu-{mode}.qcow2"),
            ],
        ));
        // What the mode does to the zeros written over data at 0..64k: kept as data,
        // a zero cluster that keeps its host cluster, or one that lets it go.
        let (_, _, present, zero, data, offset) = row_at(&rows[0], 0);
        assert!(present);
        match mode {
            "off" => assert!(data && !zero && offset),
            "on" => assert!(zero && !data && offset),
            _ => assert!(zero && !data && !offset),
        }
        // Unallocated zeros written at 1m: data without detection, zero clusters with it.
        let (_, _, present, zero, _, _) = row_at(&rows[0], 1 << 20);
        assert!(present);
        assert_eq!(zero, mode != "off", "{mode}");
    }
}

#[test]
fn detect_zeroes_refusals_are_qemu_nbds() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "1M");
    for args in [
        &["--detect-zeroes=unmap", "img.qcow2"][..],
        &["--detect-zeroes=sometimes", "img.qcow2"][..],
        &["--discard=ignore", "--detect-zeroes=unmap", "img.qcow2"][..],
    ] {
        let ours = common::qcow2(dir, &[&["serve"][..], args].concat());
        let theirs = common::run_in("qemu-nbd", dir, args);
        assert_eq!(ours.code, 1, "{ours:?}");
        assert_eq!(theirs.code, 1, "{theirs:?}");
        assert_eq!(ours.stderr, theirs.stderr.replace("qemu-nbd: ", "qcow2: "));
    }
}

/// The writes of a `-s` session, verified on the same connection.
const OVERLAY_SCRIPT: &[&str] = &[
    "read -P 0x21 0 64k",
    "write -P 0x99 4k 8k",
    "write -z 32k 16k",
    "discard 1m 64k",
    "write -P 0x98 2m 100k",
    "read -P 0x21 0 4k",
    "read -P 0x99 4k 8k",
    "read -P 0x21 12k 20k",
    "read -P 0 32k 16k",
    "read -P 0x98 2m 100k",
    "flush",
];

#[test]
fn snapshot_mode_writes_to_a_temporary_overlay() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "base.qcow2", "4M");
    ok(qemu_io(dir, &["-c", "write -P 0x21 0 64k", "base.qcow2"]));
    ok(qemu_img(
        dir,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "base.qcow2",
            "base.raw",
        ],
    ));
    std::fs::copy(dir.join("base.qcow2"), dir.join("orig.qcow2")).unwrap();
    std::fs::copy(dir.join("base.raw"), dir.join("orig.raw")).unwrap();
    for (fmt, file, orig) in [
        ("qcow2", "base.qcow2", "orig.qcow2"),
        ("raw", "base.raw", "orig.raw"),
    ] {
        let mut outputs = Vec::new();
        for server in ["ours", "qemu"] {
            // The overlay goes to $TMPDIR, as QEMU's temporary files do.
            let tmp = tempfile::tempdir().unwrap();
            let sock = dir.join(format!("{server}.sock"));
            let args = ["-f", fmt, "-k", sock.to_str().unwrap(), "-s", file];
            let envs = [("TMPDIR", tmp.path().as_os_str())];
            let mut s = if server == "ours" {
                Served::spawn(
                    env!("CARGO_BIN_EXE_qcow2"),
                    &["serve"],
                    dir,
                    &args,
                    &envs,
                    None,
                )
            } else {
                Served::spawn("qemu-nbd", &[], dir, &args, &envs, None)
            };
            let r = io_over_nbd(dir, &uri(&sock, ""), false, OVERLAY_SCRIPT);
            outputs.push(without_timings(&r));
            assert_eq!(s.wait(), 0);
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
            assert!(left.is_empty(), "{server}: overlay left behind: {left:?}");
            // The image itself never changed, and it is still fine.
            ok(qemu_img(
                dir,
                &["compare", "-f", fmt, "-F", fmt, file, orig],
            ));
            if fmt == "qcow2" {
                clean(dir, file);
            }
        }
        assert_eq!(outputs[0], outputs[1], "{fmt}: ours vs qemu-nbd");
    }
}

#[test]
fn load_snapshot_exports_an_internal_snapshot_read_only() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "4M");
    ok(qemu_io(dir, &["-c", "write -P 0x41 0 128k", "img.qcow2"]));
    ok(qemu_img(dir, &["snapshot", "-c", "first", "img.qcow2"]));
    ok(qemu_io(dir, &["-c", "write -P 0x42 64k 128k", "img.qcow2"]));
    ok(qemu_img(dir, &["snapshot", "-c", "second", "img.qcow2"]));
    ok(qemu_io(dir, &["-c", "write -P 0x43 0 4k", "img.qcow2"]));
    std::fs::copy(dir.join("img.qcow2"), dir.join("orig.qcow2")).unwrap();
    let first: &[&str] = &["read -P 0x41 0 128k", "read -P 0 128k 64k"];
    let second: &[&str] = &[
        "read -P 0x41 0 64k",
        "read -P 0x42 64k 128k",
        "read -P 0 192k 64k",
    ];
    for (spec, script) in [
        ("first", first),
        ("1", first),
        ("snapshot.id=2", second),
        ("snapshot.name=second", second),
        ("snapshot.id=1,snapshot.name=first", first),
    ] {
        let mut outputs = Vec::new();
        for server in ["ours", "qemu"] {
            let sock = dir.join(format!("{server}.sock"));
            let args = [
                "-f",
                "qcow2",
                "-k",
                sock.to_str().unwrap(),
                "-l",
                spec,
                "-t",
            ];
            let args = [&args[..], &["img.qcow2"]].concat();
            let mut s = if server == "ours" {
                Served::start(dir, &args)
            } else {
                Served::start_qemu_nbd(dir, &args)
            };
            let u = uri(&sock, "");
            let r = io_over_nbd(dir, &u, true, script);
            outputs.push(without_timings(&r));
            // Read-only: a writable open is refused.
            let w = qemu_io(dir, &["-f", "raw", "-c", "write -P 1 0 4k", &u]);
            assert_ne!(w.code, 0, "{w:?}");
            assert!(!w.stdout.contains("wrote"), "{w:?}");
            if server == "ours" && have_nbdinfo() {
                let info = nbdinfo(&[&u]);
                assert!(info.contains("is_read_only: true"), "{info}");
            }
            assert_eq!(s.terminate(), 0);
        }
        assert_eq!(outputs[0], outputs[1], "-l {spec}: ours vs qemu-nbd");
    }
    ok(qemu_img(dir, &["compare", "img.qcow2", "orig.qcow2"]));
    clean(dir, "img.qcow2");
    // Snapshots that do not exist, and a bad parameter: qemu-nbd's messages.
    for spec in [
        "third",
        "snapshot.id=1,snapshot.name=second",
        "snapshot.size=1",
    ] {
        let args = ["-f", "qcow2", "-l", spec, "img.qcow2"];
        let ours = common::qcow2(dir, &[&["serve"][..], &args].concat());
        let theirs = common::run_in("qemu-nbd", dir, &args);
        assert_eq!(ours.code, 1, "{ours:?}");
        assert_eq!(theirs.code, 1, "{theirs:?}");
        assert_eq!(
            ours.stderr.replace('\'', "`"),
            theirs
                .stderr
                .replace("qemu-nbd: ", "qcow2: ")
                .replace('\'', "`"),
            "-l {spec}"
        );
    }
}

/// Kills the process whose id a `--fork`ed server wrote to its pid file (the test started
/// it), unless it has gone.
struct Daemon(u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Whether process `pid` runs (a zombie, exited but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Runs `program ARGS` with stdout and stderr in files (a forked server keeps its
/// stderr: a pipe would never reach end of file while it runs).
fn run_detached(program: &str, dir: &Path, args: &[&str]) -> Run {
    let out = dir.join("fork.out");
    let err = dir.join("fork.err");
    let st = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    Run {
        code: st.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(out).unwrap(),
        stderr: std::fs::read_to_string(err).unwrap(),
    }
}

#[test]
fn fork_returns_once_the_server_listens() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "2M");
    ok(qemu_io(dir, &["-c", "write -P 0x61 0 64k", "img.qcow2"]));
    for program in [env!("CARGO_BIN_EXE_qcow2"), "qemu-nbd"] {
        let sock = dir.join("f.sock");
        let pid_file = dir.join("f.pid");
        let mut args = vec![
            "--fork",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "img.qcow2",
        ];
        if program != "qemu-nbd" {
            args.insert(0, "serve");
        }
        let r = run_detached(program, dir, &args);
        assert_eq!(r.code, 0, "{program}: {r:?}");
        assert_eq!(r.stderr, "", "{program}");
        // Ready when the parent returned: the pid file names a live server and the
        // socket accepts a client at once.
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _daemon = Daemon(pid);
        assert!(alive(pid), "{program}");
        io_over_nbd(dir, &uri(&sock, ""), false, &["read -P 0x61 0 64k"]);
        // Without --persistent the daemon leaves with its client and removes its socket
        // (qemu-nbd leaves its pid file, we remove ours).
        let t = Instant::now();
        while alive(pid) || sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{program} did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if program != "qemu-nbd" {
            assert!(!pid_file.exists());
        }
        clean(dir, "img.qcow2");
    }
    // A server that cannot start: the parent says why and fails.
    let args = [
        "--fork",
        "-f",
        "qcow2",
        "-k",
        "/nonexistent-dir/s.sock",
        "img.qcow2",
    ];
    let ours = run_detached(
        env!("CARGO_BIN_EXE_qcow2"),
        dir,
        &[&["serve"][..], &args].concat(),
    );
    assert_eq!(ours.code, 1, "{ours:?}");
    assert!(
        ours.stderr.contains("/nonexistent-dir/s.sock") && ours.stderr.contains("No such file"),
        "{ours:?}"
    );
    let ours = run_detached(
        env!("CARGO_BIN_EXE_qcow2"),
        dir,
        &["serve", "--fork", "-f", "qcow2", "missing.qcow2"],
    );
    let theirs = run_detached("qemu-nbd", dir, &["--fork", "-f", "qcow2", "missing.qcow2"]);
    assert_eq!((ours.code, theirs.code), (1, 1), "{ours:?} {theirs:?}");
    assert_eq!(ours.stderr, theirs.stderr.replace("qemu-nbd: ", "qcow2: "));
}

#[test]
fn extended_headers_with_qemu_compact_headers_with_libnbd() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "big.qcow2", "8G");
    let sock = dir.join("x.sock");
    let log = dir.join("serve.log");
    let args = [
        "-v",
        "-t",
        "-f",
        "qcow2",
        "-k",
        sock.to_str().unwrap(),
        "big.qcow2",
    ];
    let mut s = Served::spawn(
        env!("CARGO_BIN_EXE_qcow2"),
        &["serve"],
        dir,
        &args,
        &[],
        Some(&log),
    );
    let u = uri(&sock, "");
    // Past 4 GiB (offsets need 64 bits either way; the 64-bit lengths of extended
    // requests are tested from a raw socket in qcow2-nbd's tests/extended.rs).
    io_over_nbd(
        dir,
        &u,
        false,
        &[
            "write -P 0x71 5G 64k",
            "write -P 0x72 7G 4k",
            "write -P 0x73 1G 64k",
            "write -z 512M 1536M",
            "write -z 2G 1536M",
            "write -z 3584M 1536M",
            "read -P 0x71 5G 64k",
            "read -P 0 1G 64k",
            "read -P 0x72 7G 4k",
        ],
    );
    let nbd_map = qemu_img(dir, &["map", "--output=json", "-f", "raw", &u]);
    ok(&nbd_map);
    if have_nbdinfo() {
        let map = nbdinfo(&["--map", &u]);
        let rows: Vec<Vec<&str>> = map
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        // Data in the clusters at 5G and 7G; everything else reads as zeros.
        let data: Vec<_> = rows
            .iter()
            .filter(|r| r[2] == "0")
            .map(|r| (r[0], r[1]))
            .collect();
        assert_eq!(
            data,
            [("5368709120", "65536"), ("7516192768", "65536")],
            "{map}"
        );
    }
    assert_eq!(s.terminate(), 0);
    clean(dir, "big.qcow2");
    // QEMU's map through the export (BLOCK_STATUS_EXT) agrees with the image's.
    let local = qemu_img(dir, &["map", "--output=json", "big.qcow2"]);
    ok(&local);
    let zeroish = |json: &str| -> Vec<(u64, u64, bool)> {
        let v: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for e in v {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let data = e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap();
            match out.last_mut() {
                Some(l) if l.2 == data => l.1 += len,
                _ => out.push((start, len, data)),
            }
        }
        out
    };
    assert_eq!(zeroish(&nbd_map.stdout), zeroish(&local.stdout));
    // Who negotiated what: QEMU 10 asks for extended headers; libnbd before 1.18 does
    // not know them and gets structured replies with compact headers.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("with extended headers"), "{text}");
    if have_nbdinfo() {
        let v = nbdinfo(&["--version"]);
        let minor: Option<u32> = v
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').nth(1))
            .and_then(|m| m.parse().ok());
        if minor.is_some_and(|m| m < 18) {
            assert!(text.contains("with structured replies"), "{text}");
        }
    }
}
