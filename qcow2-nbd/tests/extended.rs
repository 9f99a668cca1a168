//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`) from a raw socket: the negotiation and
//! its refusals, 32-byte requests with 64-bit lengths on an export larger than 4 GiB,
//! replies that are always extended chunks (the request's offset in the header), 64-bit
//! block-status descriptors, payloads on commands that take none, and the disconnects
//! for a wrong magic or an oversized payload, after which the server still serves.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qcow2_image::{CreateOptions, Image, SharedImage};
use qcow2_io::MemStorage;
use qcow2_nbd::proto::{self, cflag, chunk, cmd, opt, rep, Request};
use qcow2_nbd::{Export, Listener, Server, ServerConfig, ServerHandle};

const GIB: u64 = 1 << 30;
/// Larger than 4 GiB, so that lengths need 64 bits.
const SIZE: u64 = 8 * GIB;

struct Harness {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let img = Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap();
        let export = Export::new("big", Arc::new(SharedImage::new(img)))
            .unwrap()
            .with_allocation_depth(true);
        let config = ServerConfig {
            max_connections: 4,
            persistent: true,
            handshake_timeout: Some(Duration::from_secs(5)),
            ..ServerConfig::default()
        };
        let server = Server::new(vec![export], config);
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

    /// A connection after the greeting (fixed newstyle, no zeroes).
    fn connect(&self) -> Client {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s };
        let mut b = [0u8; 18];
        c.s.read_exact(&mut b).unwrap();
        assert_eq!(&b[0..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    /// A client in transmission with extended headers and both metadata contexts.
    fn client(&self) -> Client {
        let mut c = self.connect();
        c.option(opt::EXTENDED_HEADERS, &[]);
        assert_eq!(c.option_reply().0, rep::ACK);
        let mut q = name("big");
        q.extend_from_slice(&2u32.to_be_bytes());
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            q.extend_from_slice(&name(ctx));
        }
        c.option(opt::SET_META_CONTEXT, &q);
        assert_eq!(c.option_reply().0, rep::META_CONTEXT);
        assert_eq!(c.option_reply().0, rep::META_CONTEXT);
        assert_eq!(c.option_reply().0, rep::ACK);
        let mut g = name("big");
        g.extend_from_slice(&0u16.to_be_bytes());
        c.option(opt::GO, &g);
        loop {
            let (kind, p) = c.option_reply();
            if kind == rep::ACK {
                break;
            }
            assert_eq!(kind, rep::INFO);
            if p[0..2] == [0, 0] {
                assert_eq!(u64::from_be_bytes(p[2..10].try_into().unwrap()), SIZE);
            }
        }
        c
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

fn name(n: &str) -> Vec<u8> {
    let mut v = (n.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(n.as_bytes());
    v
}

struct Client {
    s: UnixStream,
}

/// One reply chunk with an extended header.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

impl Client {
    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (reply type, payload).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            proto::REPLY_MAGIC
        );
        let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.s.read_exact(&mut p).unwrap();
        (u32::from_be_bytes(h[12..16].try_into().unwrap()), p)
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode_extended()).unwrap();
    }

    fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 32];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            proto::EXTENDED_REPLY_MAGIC,
            "every reply is an extended chunk"
        );
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
        assert!(len < 64 << 20, "{len}");
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        Chunk {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            payload,
        }
    }

    /// The chunks of one reply, up to the one flagged DONE; all of request `cookie` at
    /// `offset`.
    fn reply(&mut self, cookie: u64, offset: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!((c.cookie, c.offset), (cookie, offset), "{c:?}");
            let done = c.flags & proto::REPLY_FLAG_DONE != 0;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// The NBD error of a reply (0 when it has no error chunk).
    fn error(chunks: &[Chunk]) -> u32 {
        chunks
            .iter()
            .find(|c| c.kind == chunk::ERROR)
            .map_or(0, |c| {
                u32::from_be_bytes(c.payload[0..4].try_into().unwrap())
            })
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(
            cmd::WRITE,
            cflag::PAYLOAD_LEN,
            cookie,
            offset,
            data.len() as u64,
        );
        self.s.write_all(data).unwrap();
        Client::error(&self.reply(cookie, offset))
    }

    /// A read reassembled from its data and hole chunks.
    fn read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        self.send(cmd::READ, 0, cookie, offset, len as u64);
        let mut out = vec![0xeeu8; len];
        for c in self.reply(cookie, offset) {
            let at = || (u64::from_be_bytes(c.payload[0..8].try_into().unwrap()) - offset) as usize;
            match c.kind {
                chunk::OFFSET_DATA => {
                    out[at()..at() + c.payload.len() - 8].copy_from_slice(&c.payload[8..])
                }
                chunk::OFFSET_HOLE => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    out[at()..at() + n].fill(0);
                }
                chunk::NONE => {}
                k => panic!("read reply chunk {k}"),
            }
        }
        out
    }

    /// Block status: per context id, the (length, flags) descriptors.
    fn block_status(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<(u32, Vec<(u64, u64)>)> {
        self.send(cmd::BLOCK_STATUS, 0, cookie, offset, len);
        let mut out = Vec::new();
        for c in self.reply(cookie, offset) {
            assert_eq!(c.kind, chunk::BLOCK_STATUS_EXT, "{c:?}");
            let p = &c.payload;
            let id = u32::from_be_bytes(p[0..4].try_into().unwrap());
            let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
            assert_eq!(p.len(), 8 + 16 * count, "16-byte descriptors");
            let d = (0..count)
                .map(|i| {
                    let b = &p[8 + 16 * i..];
                    (
                        u64::from_be_bytes(b[0..8].try_into().unwrap()),
                        u64::from_be_bytes(b[8..16].try_into().unwrap()),
                    )
                })
                .collect();
            out.push((id, d));
        }
        out
    }

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

#[test]
fn negotiation_and_its_refusals() {
    let h = Harness::new();
    let mut c = h.connect();
    c.option(opt::EXTENDED_HEADERS, &[1]);
    assert_eq!(c.option_reply().0, rep::ERR_INVALID, "no data allowed");
    c.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().0, rep::ACK);
    c.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().0, rep::ERR_INVALID, "already negotiated");
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, rep::ERR_EXT_HEADER_REQD);
    // SET_META_CONTEXT needs structured replies, which extended headers imply.
    let mut q = name("big");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&name("base:allocation"));
    c.option(opt::SET_META_CONTEXT, &q);
    assert_eq!(c.option_reply().0, rep::META_CONTEXT);
    assert_eq!(c.option_reply().0, rep::ACK);
    // EXPORT_NAME cannot enter transmission with extended headers: disconnect.
    c.option(opt::EXPORT_NAME, b"big");
    assert!(c.closed());
    // Without extended headers nothing changes: compact requests, simple replies.
    let mut c = h.connect();
    c.option(opt::EXPORT_NAME, b"big");
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), SIZE);
    let r = Request {
        flags: 0,
        kind: cmd::FLUSH,
        cookie: 5,
        offset: 0,
        length: 0,
    };
    c.s.write_all(&r.encode()).unwrap();
    let mut b = [0u8; 16];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[0..4].try_into().unwrap()),
        proto::SIMPLE_REPLY_MAGIC
    );
}

#[test]
fn sixty_four_bit_requests_past_four_gib() {
    let h = Harness::new();
    let mut c = h.client();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let far = 5 * GIB + 4096;
    assert_eq!(c.write(1, far, &data), 0);
    assert_eq!(c.write(2, GIB - 65536, &data), 0);
    assert_eq!(c.read(3, far, data.len()), data);
    // FLUSH: no simple reply exists any more, a NONE chunk with DONE.
    c.send(cmd::FLUSH, 0, 4, 0, 0);
    let r = c.reply(4, 0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, chunk::NONE);
    // One zero write of 6 GiB (a length no compact header holds) over both writes.
    c.send(cmd::WRITE_ZEROES, 0, 5, GIB - 65536, 6 * GIB);
    assert_eq!(Client::error(&c.reply(5, GIB - 65536)), 0);
    assert_eq!(c.read(6, far, data.len()), vec![0u8; data.len()]);
    assert_eq!(c.read(7, GIB - 65536, data.len()), vec![0u8; data.len()]);
    // Block status of 7 GiB: 16-byte descriptors per context, covering at most the
    // request, starting with the right state.
    assert_eq!(c.write(8, 0, &data), 0);
    let st = c.block_status(9, 0, 7 * GIB);
    assert_eq!(st.len(), 2);
    for (id, d) in &st {
        let total: u64 = d.iter().map(|x| x.0).sum();
        assert!(total > 0 && total <= 7 * GIB, "{id}: {d:?}");
        // 0..64k was written: data (base:allocation 0), allocated here (depth 1).
        assert_eq!(d[0], (65536, if *id == st[0].0 { 0 } else { 1 }), "{id}");
        // What follows reads as zeros / is not allocated in this image.
        assert!(d.len() >= 2, "{d:?}");
    }
    assert_eq!(
        st[0].1[1].1,
        u64::from(proto::STATE_HOLE | proto::STATE_ZERO)
    );
    // REQ_ONE: a single descriptor.
    c.send(cmd::BLOCK_STATUS, cflag::REQ_ONE, 10, 0, 7 * GIB);
    for ch in c.reply(10, 0) {
        assert_eq!(u32::from_be_bytes(ch.payload[4..8].try_into().unwrap()), 1);
    }
    // Past the end with a 64-bit length: refused, the stream goes on.
    c.send(cmd::TRIM, 0, 11, GIB, SIZE);
    assert_eq!(Client::error(&c.reply(11, GIB)), 22);
    assert_eq!(c.read(12, 0, 4096), data[..4096].to_vec());
}

#[test]
fn payloads_where_none_belong_and_disconnects() {
    let h = Harness::new();
    let mut c = h.client();
    // A payload on a trim: read and refused (EINVAL); the stream stays in step.
    c.send(cmd::TRIM, cflag::PAYLOAD_LEN, 1, 0, 10);
    c.s.write_all(&[7u8; 10]).unwrap();
    assert_eq!(Client::error(&c.reply(1, 0)), 22);
    // A write without the PAYLOAD_LEN flag is still a write (QEMU's tolerance).
    c.send(cmd::WRITE, 0, 2, 8192, 4);
    c.s.write_all(&[9u8; 4]).unwrap();
    assert_eq!(Client::error(&c.reply(2, 8192)), 0);
    assert_eq!(c.read(3, 8192, 4), vec![9u8; 4]);
    // A write larger than any request: EINVAL for a compact header, but a 64-bit one
    // could announce any amount, so the server hangs up.
    c.send(cmd::WRITE, cflag::PAYLOAD_LEN, 4, 0, 1 << 40);
    assert!(c.closed());
    // A compact header on an extended connection: the stream is lost, hang up.
    let mut c = h.client();
    let r = Request {
        flags: 0,
        kind: cmd::FLUSH,
        cookie: 1,
        offset: 0,
        length: 0,
    };
    c.s.write_all(&r.encode()).unwrap();
    c.s.write_all(&[0u8; 4]).unwrap();
    assert!(c.closed());
    // The server still serves.
    let mut c = h.client();
    assert_eq!(c.write(1, 4 * GIB, &[1u8; 512]), 0);
    assert_eq!(c.read(2, 4 * GIB, 512), vec![1u8; 512]);
}
