//! The CI-sized run of the `nbd_session` fuzz target (`fuzz/fuzz_targets/nbd_session.rs`):
//! generated client sessions (greeting, options, requests with payloads), each also
//! mutated (flipped bytes, truncation, inserted garbage), run through the same body; a
//! third of them with extended headers. The server must answer every session and close
//! it: no panic, no hang.

use qcow2_nbd::fuzzing::{session, EXPORT_SIZE};
use qcow2_nbd::proto::{self, cmd, opt, Request};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name_and(name: &str, rest: &[u8]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(rest);
    v
}

/// A plausible session: mostly valid, with random choices.
fn transcript(r: &mut Rng) -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    let name = if r.below(4) == 0 { "ro" } else { "rw" };
    for _ in 0..r.below(4) {
        match r.below(4) {
            0 => option(&mut out, opt::LIST, &[]),
            1 => option(&mut out, opt::INFO, &name_and(name, &[0, 1, 0, 2])),
            2 => option(&mut out, r.below(20) as u32, &[1, 2, 3]),
            _ => option(
                &mut out,
                opt::LIST_META_CONTEXT,
                &name_and(name, &[0, 0, 0, 0]),
            ),
        }
    }
    // Extended headers in a third of the sessions (then requests are 32 bytes with
    // 64-bit lengths).
    let extended = r.below(3) == 0;
    if extended {
        option(&mut out, opt::EXTENDED_HEADERS, &[]);
    }
    if r.below(5) > 0 {
        if !extended {
            option(&mut out, opt::STRUCTURED_REPLY, &[]);
        }
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        option(&mut out, opt::SET_META_CONTEXT, &name_and(name, &q));
    }
    if r.below(4) == 0 {
        option(&mut out, opt::EXPORT_NAME, name.as_bytes());
    } else {
        option(&mut out, opt::GO, &name_and(name, &[0, 0]));
    }
    for i in 0..r.below(24) {
        let kind = match r.below(10) {
            0 | 1 => cmd::READ,
            2 | 3 => cmd::WRITE,
            4 => cmd::WRITE_ZEROES,
            5 => cmd::TRIM,
            6 => cmd::FLUSH,
            7 => cmd::BLOCK_STATUS,
            8 => cmd::CACHE,
            _ => r.below(12) as u16,
        };
        let length = match r.below(8) {
            0 => 0,
            1 if extended => r.next(),
            1 => u64::from(r.next() as u32),
            _ => r.below(128 << 10).max(1),
        };
        let offset = match r.below(8) {
            0 => r.next(),
            1 => EXPORT_SIZE - length.min(4096),
            _ => r.below(EXPORT_SIZE),
        };
        let flags = if r.below(4) == 0 {
            r.below(64) as u16
        } else {
            0
        };
        let req = Request {
            flags,
            kind,
            cookie: i,
            offset,
            length,
        };
        if extended {
            out.extend_from_slice(&req.encode_extended());
        } else {
            out.extend_from_slice(&req.encode());
        }
        if req.has_payload(extended) {
            // Usually the full payload, sometimes a short one.
            let n = if r.below(6) == 0 {
                r.below(length)
            } else {
                length
            };
            let n = n.min(256 << 10) as usize;
            out.extend(std::iter::repeat_n(i as u8, n));
        }
    }
    if r.below(2) == 0 {
        let req = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 999,
            offset: 0,
            length: 0,
        };
        if extended {
            out.extend_from_slice(&req.encode_extended());
        } else {
            out.extend_from_slice(&req.encode());
        }
    }
    out
}

fn mutate(r: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    match r.below(3) {
        0 => {
            for _ in 0..=r.below(8) {
                let i = r.below(v.len() as u64) as usize;
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << r.below(8);
                }
            }
        }
        1 => v.truncate(r.below(v.len() as u64) as usize),
        _ => {
            let at = r.below(v.len() as u64) as usize;
            let junk: Vec<u8> = (0..r.below(64)).map(|_| r.next() as u8).collect();
            v.splice(at..at, junk);
        }
    }
    v
}

#[test]
fn generated_and_mutated_sessions_end_cleanly() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut answered = 0;
    for _ in 0..60 {
        let t = transcript(&mut r);
        let out = session(&t);
        assert!(out.starts_with(b"NBDMAGIC"));
        answered += 1;
        let m = mutate(&mut r, t);
        let out = session(&m);
        assert!(out.starts_with(b"NBDMAGIC"));
        answered += 1;
    }
    // Pure garbage and the empty session.
    for n in [0usize, 1, 4, 17, 100, 5000] {
        let junk: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
        assert!(session(&junk).starts_with(b"NBDMAGIC"));
        answered += 1;
    }
    assert_eq!(answered, 126);
}

#[test]
fn seed_corpus_sessions_end_cleanly() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/nbd");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("nbd seed corpus") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let out = session(&data);
        assert!(out.starts_with(b"NBDMAGIC"));
        // Every seed gets more than the greeting: option replies or an export.
        assert!(out.len() > 18);
        n += 1;
    }
    assert!(n >= 3);
}
