//! `qcow2 serve` with QEMU and libnbd as the clients: qemu-io scripts over NBD against the
//! same script on a local copy, qemu-img convert / map / info on the export, two clients
//! at once, nbdinfo, a read-only export, and the lifecycle (last client leaving, SIGTERM)
//! leaving a clean, closed image.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::served::{clean, have_nbdinfo, io_args, nbdinfo, uri, Served};
use common::{have_qemu, ok, qemu_img, qemu_io};

/// Writes, partial-cluster writes, zero writes, discards and verifying reads.
const SCRIPT: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 65536 1m",
    "write -P 0x33 5000 3000",
    "write -P 0x44 200k 1k",
    "write -z 512k 128k",
    "write -z 1030k 10k",
    "write -P 0x55 3m 4k",
    "discard 3m 64k",
    "discard 2m 1k",
    "write -P 0x66 8m 256k",
    "write -z 8m 64k",
    "aio_write -P 0x77 10m 64k",
    "aio_write -P 0x78 11m 64k",
    "aio_flush",
    "read -P 0x11 0 4k",
    "read -P 0x33 5000 3000",
    "read -P 0 512k 128k",
    "read -P 0x66 8256k 192k",
    "flush",
];

fn image(dir: &Path, name: &str, size: &str) {
    ok(qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]));
}

#[test]
fn qemu_io_script_over_nbd_matches_a_local_run() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "served.qcow2", "32M");
    std::fs::copy(dir.join("served.qcow2"), dir.join("local.qcow2")).unwrap();
    let sock = dir.join("s.sock");
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "disk",
            "--discard=unmap",
            "served.qcow2",
        ],
    );
    let u = uri(&sock, "disk");
    let mut args = vec!["-f", "raw", u.as_str()];
    args.extend(io_args(SCRIPT));
    let r = qemu_io(dir, &args);
    ok(&r);
    assert!(
        !r.text().contains("Pattern verification failed"),
        "{}",
        r.text()
    );
    let mut args = vec!["-f", "qcow2", "local.qcow2"];
    args.extend(io_args(SCRIPT));
    ok(qemu_io(dir, &args));
    // Without --persistent the server leaves with its only client, image closed.
    assert_eq!(server.wait(), 0);
    assert!(!sock.exists(), "socket removed at exit");
    clean(dir, "served.qcow2");
    ok(qemu_img(dir, &["compare", "served.qcow2", "local.qcow2"]));
}

/// (start, length, data, zero) runs of `qemu-img map --output=json`, merged.
fn runs(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match out.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, data, zero)),
        }
    }
    out
}

#[test]
fn map_convert_and_info_over_nbd() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "16M");
    let mut args = vec!["-f", "qcow2", "img.qcow2"];
    let cmds = [
        "write -P 0xa1 0 128k",
        "write -z 1m 1m",
        "write -P 0xa2 5m 4k",
        "write -P 0xa3 9m 1m",
    ];
    args.extend(io_args(&cmds));
    ok(qemu_io(dir, &args));
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "target.qcow2", "16M"],
    ));

    // TCP on 127.0.0.1: a port the kernel just handed out.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut src = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "-r",
            "img.qcow2",
        ],
    );
    let tcp = format!("nbd://127.0.0.1:{port}");
    let info = qemu_img(dir, &["info", &tcp]);
    ok(&info);
    assert!(
        info.stdout
            .contains("virtual size: 16 MiB (16777216 bytes)"),
        "{}",
        info.stdout
    );
    let nbd_map = qemu_img(dir, &["map", "--output=json", "-f", "raw", &tcp]);
    ok(&nbd_map);
    ok(qemu_img(
        dir,
        &["convert", "-f", "raw", "-O", "raw", &tcp, "out.raw"],
    ));
    assert_eq!(src.terminate(), 0);
    clean(dir, "img.qcow2");
    let img_map = qemu_img(dir, &["map", "--output=json", "img.qcow2"]);
    ok(&img_map);
    assert_eq!(runs(&nbd_map.stdout), runs(&img_map.stdout));
    ok(qemu_img(
        dir,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "out.raw",
            "img.qcow2",
        ],
    ));

    // Convert into an export (unix socket), then the target equals the source.
    let sock = dir.join("t.sock");
    let mut dst = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "t",
            "target.qcow2",
        ],
    );
    ok(qemu_img(
        dir,
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "img.qcow2",
            &uri(&sock, "t"),
        ],
    ));
    assert_eq!(dst.wait(), 0);
    clean(dir, "target.qcow2");
    ok(qemu_img(dir, &["compare", "img.qcow2", "target.qcow2"]));
}

/// A qemu-io process driven line by line on stdin.
struct Interactive {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Interactive {
    fn start(dir: &Path, uri: &str) -> Interactive {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Interactive {
            child,
            stdin,
            stdout,
        }
    }

    /// Runs one command; the first output line that starts with `want`.
    fn cmd(&mut self, cmd: &str, want: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "qemu-io ended"
            );
            if line.contains("fail") || line.contains("error") {
                panic!("{cmd}: {line}");
            }
            if line.trim_start_matches("qemu-io> ").starts_with(want) {
                return line;
            }
        }
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        drop(self.stdin);
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn two_clients_at_once_with_shared_2() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "8M");
    let sock = dir.join("s.sock");
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-e",
            "2",
            "-t",
            "img.qcow2",
        ],
    );
    let u = uri(&sock, "");
    let mut a = Interactive::start(dir, &u);
    a.cmd("write -P 0x11 0 64k", "wrote");
    let mut b = Interactive::start(dir, &u);
    b.cmd("write -P 0x22 64k 64k", "wrote");
    b.cmd("read -P 0x11 0 64k", "read");
    a.cmd("read -P 0x22 64k 64k", "read");
    a.cmd("flush", "");
    a.quit();
    b.quit();
    // With --persistent the server stays after both left; SIGTERM closes the image.
    assert!(server.child.try_wait().unwrap().is_none());
    assert_eq!(server.terminate(), 0);
    assert!(!server.pid_file.exists(), "pid file removed at exit");
    clean(dir, "img.qcow2");
    let r = qemu_io(
        dir,
        &["-f", "qcow2", "-c", "read -P 0x22 64k 64k", "img.qcow2"],
    );
    ok(&r);
    assert!(!r.text().contains("failed"), "{}", r.text());
}

#[test]
fn read_only_export_refuses_writes_and_nbdinfo_describes_it() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "4M");
    let mut args = vec!["-f", "qcow2", "img.qcow2"];
    args.extend(io_args(&["write -P 0x5a 1m 64k"]));
    ok(qemu_io(dir, &args));
    std::fs::copy(dir.join("img.qcow2"), dir.join("orig.qcow2")).unwrap();
    let sock = dir.join("s.sock");
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "ro",
            "-D",
            "a read-only disk",
            "-r",
            "-t",
            "-A",
            "img.qcow2",
        ],
    );
    let u = uri(&sock, "ro");
    let r = qemu_io(dir, &["-f", "raw", "-c", "write -P 1 0 4k", &u]);
    assert!(!r.text().contains("wrote"), "{}", r.text());
    let r = qemu_io(dir, &["-f", "raw", "-r", "-c", "read -P 0x5a 1m 64k", &u]);
    ok(&r);
    assert!(!r.text().contains("failed"), "{}", r.text());
    if have_nbdinfo() {
        let run = nbdinfo;
        let list = run(&["--list", &u]);
        assert!(list.contains("export=\"ro\""), "{list}");
        assert!(list.contains("description: a read-only disk"), "{list}");
        assert!(list.contains("is_read_only: true"), "{list}");
        assert_eq!(run(&["--size", &u]).trim(), "4194304");
        let map = run(&["--map", &u]);
        let rows: Vec<Vec<&str>> = map
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{map}");
        assert_eq!(&rows[0][..3], ["0", "1048576", "3"]);
        assert_eq!(&rows[1][..3], ["1048576", "65536", "0"]);
        assert_eq!(&rows[2][..3], ["1114112", "3080192", "3"]);
        let depth = run(&["--map=qemu:allocation-depth", &u]);
        let rows: Vec<Vec<&str>> = depth
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{depth}");
        assert_eq!(&rows[1][..3], ["1048576", "65536", "1"]);
        assert_eq!(&rows[2][..3], ["1114112", "3080192", "0"]);
    }
    assert_eq!(server.terminate(), 0);
    ok(qemu_img(dir, &["compare", "img.qcow2", "orig.qcow2"]));
    clean(dir, "img.qcow2");
}

#[test]
fn nbdcopy_from_and_to_an_export() {
    if !have_qemu()
        || !Command::new("nbdcopy")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        eprintln!("qemu or nbdcopy not installed: skipping");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image(dir, "img.qcow2", "8M");
    let mut args = vec!["-f", "qcow2", "img.qcow2"];
    args.extend(io_args(&["write -P 0x3c 0 1m", "write -P 0x3d 6m 100k"]));
    ok(qemu_io(dir, &args));
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "copy.qcow2", "8M"],
    ));
    let sock = dir.join("s.sock");
    let u = uri(&sock, "");
    let nbdcopy = |args: &[&str]| {
        let o = Command::new("nbdcopy")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // From an export to a file, then from that file into another export.
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-t",
            "img.qcow2",
        ],
    );
    nbdcopy(&[&u, "out.raw"]);
    assert_eq!(server.terminate(), 0);
    ok(qemu_img(
        dir,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "out.raw",
            "img.qcow2",
        ],
    ));
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-t",
            "copy.qcow2",
        ],
    );
    nbdcopy(&["out.raw", &u]);
    assert_eq!(server.terminate(), 0);
    clean(dir, "copy.qcow2");
    ok(qemu_img(dir, &["compare", "img.qcow2", "copy.qcow2"]));
}

#[test]
fn raw_export_matches_a_local_run_and_its_map() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let f = std::fs::File::create(dir.join("served.raw")).unwrap();
    f.set_len(32 << 20).unwrap();
    std::fs::copy(dir.join("served.raw"), dir.join("local.raw")).unwrap();
    let sock = dir.join("s.sock");
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "--discard=unmap",
            "served.raw",
        ],
    );
    let u = uri(&sock, "");
    let mut args = vec!["-f", "raw", u.as_str()];
    args.extend(io_args(SCRIPT));
    let r = qemu_io(dir, &args);
    ok(&r);
    assert!(
        !r.text().contains("Pattern verification failed"),
        "{}",
        r.text()
    );
    let mut args = vec!["-f", "raw", "local.raw"];
    args.extend(io_args(SCRIPT));
    ok(qemu_io(dir, &args));
    assert_eq!(server.wait(), 0);
    ok(qemu_img(
        dir,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "served.raw",
            "local.raw",
        ],
    ));
    // Block status over NBD agrees with the file's own holes.
    let mut server = Served::start(
        dir,
        &[
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "-r",
            "served.raw",
        ],
    );
    let nbd_map = qemu_img(dir, &["map", "--output=json", "-f", "raw", &u]);
    ok(&nbd_map);
    assert_eq!(server.wait(), 0);
    let file_map = qemu_img(dir, &["map", "--output=json", "-f", "raw", "served.raw"]);
    assert_eq!(runs(&nbd_map.stdout), runs(&file_map.stdout));
}
