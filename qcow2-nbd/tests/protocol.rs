//! Protocol-level tests from a raw socket: a well-behaved client, then bad input (garbage,
//! wrong magics, oversized options and requests, unknown commands and flags, requests past
//! the end, writes to a read-only export, clients that vanish mid-request). After each
//! bad client the server must still serve a good one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qcow2_image::{CreateOptions, Image, SharedImage};
use qcow2_io::MemStorage;
use qcow2_nbd::proto::{self, cflag, chunk, cmd, opt, rep, Request};
use qcow2_nbd::{Export, Listener, Server, ServerConfig};

const SIZE: u64 = 16 << 20;

struct Harness {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    handle: qcow2_nbd::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(ServerConfig {
            max_connections: 8,
            persistent: true,
            max_requests_in_flight: 16,
            handshake_timeout: Some(Duration::from_secs(5)),
            ..ServerConfig::default()
        })
    }

    fn with(config: ServerConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let img = Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap();
        let shared = Arc::new(SharedImage::new(img));
        let rw = Export::new("rw", shared.clone())
            .unwrap()
            .with_description("read-write")
            .with_allocation_depth(true);
        let ro = Export::new("ro", shared).unwrap().with_read_only(true);
        let server = Server::new(vec![rw, ro], config);
        let handle = server.handle();
        let listener = Listener::bind_unix(&sock).unwrap();
        let thread = std::thread::spawn(move || server.serve(&listener).unwrap());
        Harness {
            _dir: dir,
            sock,
            handle,
            thread: Some(thread),
        }
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A client in transmission on `name` with structured replies and base:allocation.
    fn client(&self, name: &str) -> Client {
        let mut c = Client { s: self.raw() };
        c.greeting();
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, rep::ACK);
        let mut q = Vec::new();
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name.as_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        c.option(opt::SET_META_CONTEXT, &q);
        assert_eq!(c.option_reply().1, rep::META_CONTEXT);
        assert_eq!(c.option_reply().1, rep::ACK);
        let mut g = Vec::new();
        g.extend_from_slice(&(name.len() as u32).to_be_bytes());
        g.extend_from_slice(name.as_bytes());
        g.extend_from_slice(&0u16.to_be_bytes());
        c.option(opt::GO, &g);
        loop {
            let (_, kind, _) = c.option_reply();
            if kind == rep::ACK {
                break;
            }
            assert_eq!(kind, rep::INFO);
        }
        c
    }

    /// The server still serves: a fresh client writes, reads back and disconnects.
    fn assert_alive(&self) {
        let mut c = self.client("rw");
        let data = vec![0x5au8; 4096];
        assert_eq!(c.write(77, 8192, &data, 0), 0);
        let (err, got) = c.read(78, 8192, 4096);
        assert_eq!(err, 0);
        assert_eq!(got, data);
        c.disc();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

struct Client {
    s: UnixStream,
}

impl Client {
    fn greeting(&mut self) {
        let mut b = [0u8; 18];
        self.s.read_exact(&mut b).unwrap();
        assert_eq!(&b[0..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        self.s.write_all(&3u32.to_be_bytes()).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (option, reply type, payload).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..8], &proto::REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            p,
        )
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length: u64::from(length),
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    /// One reply: a simple reply (cookie, error, no payload) or a structured reply's
    /// chunks up to DONE (cookie, error, data chunks as (offset, bytes), holes).
    fn reply(&mut self) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        let magic = u32::from_be_bytes(m);
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let mut b = [0u8; 12];
            self.s.read_exact(&mut b).unwrap();
            return Reply {
                cookie: u64::from_be_bytes(b[4..12].try_into().unwrap()),
                error: u32::from_be_bytes(b[0..4].try_into().unwrap()),
                chunks: Vec::new(),
            };
        }
        let mut r = Reply {
            cookie: 0,
            error: 0,
            chunks: Vec::new(),
        };
        let mut magic = magic;
        loop {
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
            let mut b = [0u8; 16];
            self.s.read_exact(&mut b).unwrap();
            let flags = u16::from_be_bytes(b[0..2].try_into().unwrap());
            let kind = u16::from_be_bytes(b[2..4].try_into().unwrap());
            r.cookie = u64::from_be_bytes(b[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).unwrap();
            if kind & (1 << 15) != 0 {
                r.error = u32::from_be_bytes(p[0..4].try_into().unwrap());
            } else if kind != chunk::NONE {
                r.chunks.push((kind, p));
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                return r;
            }
            self.s.read_exact(&mut m).unwrap();
            magic = u32::from_be_bytes(m);
        }
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(cmd::WRITE, flags, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error
    }

    /// Reads through structured chunks, reassembled.
    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send(cmd::READ, 0, cookie, offset, len);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        (r.error, assemble(&r, offset, len))
    }

    fn disc(mut self) {
        self.send(cmd::DISC, 0, 0, 0, 0);
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0, "server closes after DISC");
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

struct Reply {
    cookie: u64,
    error: u32,
    chunks: Vec<(u16, Vec<u8>)>,
}

fn assemble(r: &Reply, offset: u64, len: u32) -> Vec<u8> {
    let mut out = vec![0xeeu8; len as usize];
    for (kind, p) in &r.chunks {
        let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
        match *kind {
            chunk::OFFSET_DATA => out[at..at + p.len() - 8].copy_from_slice(&p[8..]),
            chunk::OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                out[at..at + n].fill(0);
            }
            k => panic!("unexpected chunk type {k}"),
        }
    }
    out
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn good_client_reads_writes_zeroes_and_block_status() {
    let h = Harness::new();
    assert!(exists(&h.sock));
    let mut c = h.client("rw");
    // A partly written range reads back as data and hole chunks.
    assert_eq!(c.write(1, 65536, &vec![7u8; 4096], cflag::FUA), 0);
    let (err, got) = c.read(2, 0, 256 << 10);
    assert_eq!(err, 0);
    let mut want = vec![0u8; 256 << 10];
    want[65536..65536 + 4096].fill(7);
    assert_eq!(got, want);
    // DF: one data chunk.
    c.send(cmd::READ, cflag::DF, 3, 0, 256 << 10);
    let r = c.reply();
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(assemble(&r, 0, 256 << 10), want);
    // Block status: hole+zero, data, hole+zero.
    c.send(cmd::BLOCK_STATUS, 0, 4, 0, 256 << 10);
    let r = c.reply();
    assert_eq!(r.error, 0);
    let p = &r.chunks[0].1;
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext, [(65536, 3), (65536, 0), (131072, 3)]);
    c.send(cmd::BLOCK_STATUS, cflag::REQ_ONE, 5, 0, 256 << 10);
    assert_eq!((c.reply().chunks[0].1.len() - 4) / 8, 1);
    // Write zeroes, trim, flush, cache.
    c.send(cmd::WRITE_ZEROES, cflag::NO_HOLE, 6, 65536, 4096);
    assert_eq!(c.reply().error, 0);
    c.send(cmd::TRIM, 0, 7, 0, 65536);
    assert_eq!(c.reply().error, 0);
    c.send(cmd::FLUSH, 0, 8, 0, 0);
    assert_eq!(c.reply().error, 0);
    c.send(cmd::CACHE, 0, 9, 0, 65536);
    assert_eq!(c.reply().error, 0);
    let (_, got) = c.read(10, 65536, 4096);
    assert_eq!(got, vec![0u8; 4096]);
    c.disc();
}

#[test]
fn many_requests_in_flight_are_all_answered() {
    let h = Harness::new();
    let mut c = h.client("rw");
    // 200 writes sent without reading a reply: the server stops reading when its budget is
    // full and resumes as replies drain (the socket buffers hold the rest).
    let n = 200u64;
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let r = Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: 1000 + i,
                offset: i * 65536,
                length: 65536,
            };
            w.write_all(&r.encode()).unwrap();
            w.write_all(&vec![i as u8; 65536]).unwrap();
        }
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = c.reply();
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie));
    }
    writer.join().unwrap();
    for i in (0..n).step_by(37) {
        let (_, got) = c.read(5000 + i, i * 65536, 65536);
        assert!(got.iter().all(|&b| b == i as u8));
    }
    c.disc();
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let h = Harness::new();
    let mut c = h.client("rw");
    let einval = proto::NbdErrno::Inval as u32;
    // Unknown command, unknown flag, flag of another command.
    c.send(99, 0, 1, 0, 512);
    assert_eq!(c.reply().error, einval);
    c.send(cmd::READ, 1 << 9, 2, 0, 512);
    assert_eq!(c.reply().error, einval);
    c.send(cmd::FLUSH, cflag::REQ_ONE, 3, 0, 0);
    assert_eq!(c.reply().error, einval);
    // Past the end.
    c.send(cmd::READ, 0, 4, SIZE - 512, 1024);
    assert_eq!(c.reply().error, einval);
    c.send(cmd::READ, 0, 5, u64::MAX - 10, 512);
    assert_eq!(c.reply().error, einval);
    assert_eq!(
        c.write(6, SIZE - 512, &[1u8; 1024], 0),
        proto::NbdErrno::NoSpc as u32
    );
    c.send(cmd::BLOCK_STATUS, 0, 7, SIZE, 512);
    assert_eq!(c.reply().error, einval);
    c.send(cmd::BLOCK_STATUS, 0, 8, 0, 0);
    assert_eq!(c.reply().error, einval);
    // Larger than 32 MiB: a read is refused, a write's payload is consumed and refused.
    c.send(cmd::READ, 0, 9, 0, (32 << 20) + 1);
    assert_eq!(c.reply().error, einval);
    assert_eq!(c.write(10, 0, &vec![3u8; (32 << 20) + 4096], 0), einval);
    // Still in sync.
    assert_eq!(c.write(11, 0, &[9u8; 512], 0), 0);
    assert_eq!(c.read(12, 0, 512).1, vec![9u8; 512]);
    c.disc();

    // Read-only export: writes, zeroes and trims are refused with EPERM.
    let mut c = h.client("ro");
    let eperm = proto::NbdErrno::Perm as u32;
    assert_eq!(c.write(1, 0, &[1u8; 512], 0), eperm);
    c.send(cmd::WRITE_ZEROES, 0, 2, 0, 512);
    assert_eq!(c.reply().error, eperm);
    c.send(cmd::TRIM, 0, 3, 0, 512);
    assert_eq!(c.reply().error, eperm);
    assert_eq!(c.read(4, 0, 512), (0, vec![9u8; 512]));
    c.disc();
    h.assert_alive();
}

#[test]
fn block_status_needs_a_meta_context() {
    let h = Harness::new();
    let mut c = Client { s: h.raw() };
    c.greeting();
    let mut g = Vec::new();
    g.extend_from_slice(&2u32.to_be_bytes());
    g.extend_from_slice(b"rw");
    g.extend_from_slice(&0u16.to_be_bytes());
    c.option(opt::GO, &g);
    while c.option_reply().1 != rep::ACK {}
    c.send(cmd::BLOCK_STATUS, 0, 1, 0, 512);
    assert_eq!(c.reply().error, proto::NbdErrno::Inval as u32);
    // Without structured replies a read is a simple reply with the data.
    c.send(cmd::READ, 0, 2, 0, 512);
    let r = c.reply();
    assert_eq!(r.error, 0);
    let mut data = [0u8; 512];
    c.s.read_exact(&mut data).unwrap();
    c.disc();
}

#[test]
fn handshake_errors() {
    let h = Harness::new();
    // Unknown option, option too long to read, unknown export, malformed GO.
    let mut c = Client { s: h.raw() };
    c.greeting();
    c.option(1234, &[1, 2, 3]);
    assert_eq!(c.option_reply().1, rep::ERR_UNSUP);
    // A server without TLS credentials refuses STARTTLS by policy, as qemu-nbd.
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().1, rep::ERR_POLICY);
    c.option(opt::INFO, &vec![0u8; 100 << 10]);
    assert_eq!(c.option_reply().1, rep::ERR_TOO_BIG);
    let mut g = Vec::new();
    g.extend_from_slice(&4u32.to_be_bytes());
    g.extend_from_slice(b"nope");
    g.extend_from_slice(&0u16.to_be_bytes());
    c.option(opt::GO, &g);
    assert_eq!(c.option_reply().1, rep::ERR_UNKNOWN);
    c.option(opt::GO, &[0, 0, 0, 9, 1]);
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);
    c.option(opt::SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        c.option_reply().1,
        rep::ERR_INVALID,
        "SET_META_CONTEXT before STRUCTURED_REPLY"
    );
    c.option(opt::STRUCTURED_REPLY, &[1]);
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);
    // LIST shows both exports, with the description.
    c.option(opt::LIST, &[]);
    let (_, kind, p) = c.option_reply();
    assert_eq!(kind, rep::SERVER);
    assert_eq!(&p[4..6], b"rw");
    assert_eq!(&p[6..], b"read-write");
    assert_eq!(c.option_reply().1, rep::SERVER);
    assert_eq!(c.option_reply().1, rep::ACK);
    c.option(opt::ABORT, &[]);
    assert_eq!(c.option_reply().1, rep::ACK);
    assert!(c.closed());

    // Disconnects: garbage greeting, bad option magic, a huge option, an unknown export
    // by EXPORT_NAME, unknown client flags.
    let mut s = h.raw();
    let mut b = [0u8; 18];
    s.read_exact(&mut b).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    assert!(Client { s }.closed());

    let mut c = Client { s: h.raw() };
    c.greeting();
    c.s.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(c.closed());

    let mut c = Client { s: h.raw() };
    c.greeting();
    let mut b = Vec::new();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&b).unwrap();
    assert!(c.closed());

    let mut c = Client { s: h.raw() };
    c.greeting();
    c.option(opt::EXPORT_NAME, b"missing");
    assert!(c.closed());

    // A client that vanishes mid-handshake and one that connects and says nothing.
    let mut s = h.raw();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    drop(s);
    let _silent = h.raw();

    h.assert_alive();
}

#[test]
fn bad_transmission_input_disconnects_only_that_client() {
    let h = Harness::new();
    let mut other = h.client("rw");
    // Wrong request magic.
    let mut c = h.client("rw");
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
    // A write whose payload never comes, then the client leaves.
    let mut c = h.client("rw");
    c.send(cmd::WRITE, 0, 1, 0, 65536);
    c.s.write_all(&[1u8; 100]).unwrap();
    drop(c);
    // A truncated header.
    let mut c = h.client("rw");
    c.s.write_all(&[0x25, 0x60]).unwrap();
    drop(c);
    // A client that sends reads and never reads the replies, then leaves.
    let mut c = h.client("rw");
    for i in 0..64 {
        c.send(cmd::READ, 0, i, 0, 1 << 20);
    }
    drop(c);
    // The existing connection and new ones still work.
    assert_eq!(other.write(1, 4096, &[4u8; 4096], 0), 0);
    assert_eq!(other.read(2, 4096, 4096).1, vec![4u8; 4096]);
    other.disc();
    h.assert_alive();
}

#[test]
fn both_meta_contexts_give_one_chunk_each() {
    let h = Harness::new();
    let mut c = Client { s: h.raw() };
    c.greeting();
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, rep::ACK);
    // LIST with no query shows both; "qemu:" only the depth.
    let mut q = Vec::new();
    q.extend_from_slice(&2u32.to_be_bytes());
    q.extend_from_slice(b"rw");
    q.extend_from_slice(&0u32.to_be_bytes());
    c.option(opt::LIST_META_CONTEXT, &q);
    let names: Vec<Vec<u8>> = (0..2).map(|_| c.option_reply().2[4..].to_vec()).collect();
    assert_eq!(
        names,
        [
            b"base:allocation".to_vec(),
            b"qemu:allocation-depth".to_vec()
        ]
    );
    assert_eq!(c.option_reply().1, rep::ACK);
    let mut q = Vec::new();
    q.extend_from_slice(&2u32.to_be_bytes());
    q.extend_from_slice(b"rw");
    q.extend_from_slice(&2u32.to_be_bytes());
    for name in ["qemu:allocation-depth", "base:allocation"] {
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name.as_bytes());
    }
    c.option(opt::SET_META_CONTEXT, &q);
    assert_eq!(c.option_reply().1, rep::META_CONTEXT);
    assert_eq!(c.option_reply().1, rep::META_CONTEXT);
    assert_eq!(c.option_reply().1, rep::ACK);
    let mut g = Vec::new();
    g.extend_from_slice(&2u32.to_be_bytes());
    g.extend_from_slice(b"rw");
    g.extend_from_slice(&0u16.to_be_bytes());
    c.option(opt::GO, &g);
    while c.option_reply().1 != rep::ACK {}
    assert_eq!(c.write(1, 65536, &[1u8; 512], 0), 0);
    c.send(cmd::BLOCK_STATUS, 0, 2, 0, 196608);
    let r = c.reply();
    assert_eq!(r.error, 0);
    let decode = |p: &[u8]| -> (u32, Vec<(u32, u32)>) {
        let id = u32::from_be_bytes(p[0..4].try_into().unwrap());
        let d = p[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..8].try_into().unwrap()),
                )
            })
            .collect();
        (id, d)
    };
    let got: Vec<_> = r.chunks.iter().map(|(_, p)| decode(p)).collect();
    assert_eq!(
        got,
        [
            (1, vec![(65536, 3), (65536, 0), (65536, 3)]),
            (2, vec![(65536, 0), (65536, 1), (65536, 0)]),
        ]
    );
    c.disc();
}

#[test]
fn a_client_that_stops_reading_replies_is_dropped_alone() {
    let h = Harness::with(ServerConfig {
        max_connections: 8,
        persistent: true,
        max_requests_in_flight: 16,
        reply_timeout: Some(Duration::from_secs(1)),
        ..ServerConfig::default()
    });
    let mut stuck = h.client("rw");
    assert_eq!(stuck.write(1, 0, &vec![8u8; 1 << 20], 0), 0);
    // 64 MiB of read replies that the client never reads: the socket buffers fill, the
    // server's budget fills, and it stops reading this client's requests.
    for i in 0..64 {
        stuck.send(cmd::READ, 0, i, 0, 1 << 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile other clients are served.
    h.assert_alive();
    // After the reply timeout (a second without progress, twice: the first send returns
    // what fitted) the stuck client is disconnected: draining its socket ends
    // with end of file before all 64 replies have come.
    std::thread::sleep(Duration::from_millis(3500));
    let mut total = 0usize;
    let mut b = vec![0u8; 1 << 20];
    loop {
        match stuck.s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still connected after the reply timeout: {e} after {total} bytes"),
        }
    }
    assert!(total < 64 << 20, "every reply arrived: {total} bytes");
    h.assert_alive();
}
