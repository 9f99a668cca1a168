//! An incremental backup round trip without QEMU in the data path: a full backup of an
//! image (our `convert`), writes through our engine (`qcow2 io`, and writes over our own
//! NBD server, tracked live), then only the ranges the bitmap marks dirty copied over our
//! NBD server (`qcow2 serve -B`, dirty map read by libnbd's `nbdinfo`, data read by a
//! small NBD client here), and the backup equal to the image. QEMU's client reads the same
//! dirty map (`qemu-img map` with `x-dirty-bitmap`).

mod common;

use common::{have_qemu, ok, qcow2, qemu_img};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 32 << 20;

/// A running `qcow2 serve`; stopped (SIGTERM, so the image is closed) when dropped.
struct Served {
    child: Child,
}

impl Served {
    fn start(dir: &Path, args: &[&str]) -> Served {
        let pid = dir.join("serve.pid");
        let _ = std::fs::remove_file(&pid);
        let child = Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .arg("serve")
            .arg("--pid-file")
            .arg(&pid)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qcow2 serve");
        let mut s = Served { child };
        let t = Instant::now();
        while !pid.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("qcow2 serve exited early: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn stop(mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(t.elapsed() < Duration::from_secs(20), "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal NBD client: fixed newstyle handshake with `NBD_OPT_GO` on the default export,
/// simple replies, reads and writes.
struct Client {
    s: UnixStream,
    cookie: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        // Client flags: fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&6u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes()); // export name ""
        opt.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        s.write_all(&opt).expect("go");
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            let kind = be32(&h[12..16]);
            let mut data = vec![0u8; be32(&h[16..20]) as usize];
            s.read_exact(&mut data).expect("option data");
            assert!(kind < 1 << 31, "option refused: {kind:#x}");
            if kind == 1 {
                break;
            }
        }
        Client { s, cookie: 0 }
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r).expect("request");
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply");
        assert_eq!(be32(&h[..4]), 0x6744_6698, "simple reply magic");
        assert_eq!(be32(&h[4..8]), 0, "NBD error");
        let mut out = Vec::new();
        if kind == 0 {
            out.resize(len as usize, 0);
            self.s.read_exact(&mut out).expect("read data");
        }
        out
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, offset, len, &[])
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(1, offset, data.len() as u32, data);
    }
}

fn have_nbdinfo() -> bool {
    Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The dirty extents of the export's `qemu:dirty-bitmap:NAME` context, read by libnbd.
fn dirty_map(sock: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("list")
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| {
            (
                e["offset"].as_u64().expect("o"),
                e["length"].as_u64().expect("l"),
            )
        })
        .collect()
}

/// The same map through QEMU's NBD client (`qemu-img map`, dirty = "data": false).
fn dirty_map_qemu(dir: &Path, sock: &Path, name: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let r = qemu_img(dir, &["map", "--output=json", "--image-opts", &opts]);
    ok(&r);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    v.as_array()
        .expect("list")
        .iter()
        .filter(|e| e["data"] == serde_json::Value::Bool(false))
        .map(|e| {
            (
                e["start"].as_u64().expect("s"),
                e["length"].as_u64().expect("l"),
            )
        })
        .collect()
}

/// Copies the dirty ranges from the export into `backup`; returns the bytes copied.
fn apply_increment(sock: &Path, ranges: &[(u64, u64)], backup: &Path) -> u64 {
    let mut c = Client::connect(sock);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(backup)
        .expect("backup");
    let mut copied = 0;
    for &(off, len) in ranges {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(1 << 20);
            let data = c.read(pos, n as u32);
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(pos)).expect("seek");
            file.write_all(&data).expect("write backup");
            pos += n;
            copied += n;
        }
    }
    copied
}

fn covers(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    ranges.iter().any(|&(s, l)| s <= off && off + len <= s + l)
}

fn guest_bytes(dir: &Path, img: &str) -> Vec<u8> {
    ok(qcow2(
        dir,
        &["convert", "-f", "qcow2", "-O", "raw", img, "now.raw"],
    ));
    std::fs::read(dir.join("now.raw")).expect("read")
}

#[test]
fn incremental_backup_round_trip_over_our_nbd_server() {
    if !have_qemu() || !have_nbdinfo() {
        eprintln!("qemu or nbdinfo not installed: skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = "disk.qcow2";
    let sock: PathBuf = d.join("nbd.sock");
    ok(qcow2(d, &["create", "-q", "-f", "qcow2", img, "32M"]));
    ok(qcow2(
        d,
        &[
            "io",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 20M 1M",
            img,
        ],
    ));
    ok(qcow2(d, &["bitmap", "--add", img, "inc"]));
    // Full backup.
    ok(qcow2(
        d,
        &["convert", "-f", "qcow2", "-O", "raw", img, "backup.raw"],
    ));

    // Cycle 1: writes, zero writes and discards through the engine.
    let changes = [
        (1u64 << 20, 4096u64),
        (3 << 20, 200 << 10),
        (9 << 20, 64 << 10),
        (20 << 20, 512),
        (31 << 20, 1 << 20),
    ];
    ok(qcow2(
        d,
        &[
            "io",
            "-c",
            "write -P 0x33 1M 4k",
            "-c",
            "write -P 0x44 3M 200k",
            "-c",
            "write -z 9M 64k",
            "-c",
            "discard 20M 512",
            "-c",
            "write -P 0x55 31M 1M",
            img,
        ],
    ));
    let server = Served::start(d, &["-r", "-t", "-B", "inc", "-k", "nbd.sock", img]);
    let ranges = dirty_map(&sock, "inc");
    assert_eq!(
        dirty_map_qemu(d, &sock, "inc"),
        ranges,
        "libnbd and QEMU disagree"
    );
    for &(o, l) in &changes {
        assert!(covers(&ranges, o, l), "{o:#x}+{l:#x} not dirty: {ranges:?}");
    }
    let copied = apply_increment(&sock, &ranges, &d.join("backup.raw"));
    assert_eq!(server.stop(), 0);
    assert!(
        copied < SIZE / 4,
        "an increment of {copied} bytes is not incremental"
    );
    assert!(
        std::fs::read(d.join("backup.raw")).expect("backup") == guest_bytes(d, img),
        "the backup differs from the image after the first increment"
    );

    // Cycle 2: a new epoch (cleared bitmap); writes over our own writable NBD server are
    // tracked live and show up in the same server's dirty map at once.
    ok(qcow2(d, &["bitmap", "--clear", img, "inc"]));
    let server = Served::start(d, &["-t", "-B", "inc", "-k", "nbd.sock", img]);
    assert!(dirty_map(&sock, "inc").is_empty());
    let mut c = Client::connect(&sock);
    c.write(5 << 20, &[0x66; 8192]);
    c.write((17 << 20) + 100, &[0x77; 1000]);
    drop(c);
    let ranges = dirty_map(&sock, "inc");
    assert!(covers(&ranges, 5 << 20, 8192) && covers(&ranges, (17 << 20) + 100, 1000));
    assert!(
        ranges.iter().map(|r| r.1).sum::<u64>() <= 4 << 16,
        "{ranges:?}"
    );
    apply_increment(&sock, &ranges, &d.join("backup.raw"));
    assert_eq!(server.stop(), 0);
    assert!(
        std::fs::read(d.join("backup.raw")).expect("backup") == guest_bytes(d, img),
        "the backup differs from the image after the second increment"
    );
    // The stored bitmap holds the live writes; QEMU agrees the image is clean.
    let r = qemu_img(d, &["check", img]);
    assert_eq!(r.code, 0, "{}", r.text());
    let info = qemu_img(d, &["info", "--output=json", img]);
    assert!(!info.stdout.contains("in-use"), "{}", info.stdout);
}

#[test]
fn serve_refuses_missing_and_inconsistent_bitmaps_as_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "i.qcow2", "1M"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "i.qcow2", "b"]));
    let sock = d.join("x.sock");
    let sock = sock.to_str().expect("utf-8");
    let compare = |bitmap: &str| {
        let args = ["-r", "-B", bitmap, "-k", sock, "-f", "qcow2", "i.qcow2"];
        let q = Command::new("qemu-nbd")
            .args(args)
            .current_dir(d)
            .output()
            .expect("qemu-nbd");
        let o = Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .arg("serve")
            .args(args)
            .current_dir(d)
            .output()
            .expect("qcow2");
        assert_eq!(o.status.code(), q.status.code(), "{bitmap}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("qcow2: ", "qemu-nbd: "),
            String::from_utf8_lossy(&q.stderr),
            "{bitmap}"
        );
    };
    compare("nope");
    // In use, as a crashed writer leaves it: both refuse it.
    let mut bytes = std::fs::read(d.join("i.qcow2")).expect("read");
    let hl = be32(&bytes[100..104]) as usize;
    let mut off = hl;
    let dir_off = loop {
        let (magic, len) = (be32(&bytes[off..off + 4]), be32(&bytes[off + 4..off + 8]));
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(bytes[off + 24..off + 32].try_into().expect("8")) as usize;
        }
        assert_ne!(magic, 0, "no bitmaps extension");
        off += 8 + (len as usize).div_ceil(8) * 8;
    };
    bytes[dir_off + 15] |= 1;
    std::fs::write(d.join("i.qcow2"), &bytes).expect("write");
    compare("b");
}
