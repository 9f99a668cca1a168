//! Safe rebase and commit under error injection: every write, zero write, discard, length
//! change and flush of the image being changed fails in turn (EIO and ENOSPC, the disk
//! staying failed from then on). Afterwards every image of the chain opens, the overlay
//! reads exactly as before (rebase: through whichever backing file its header names;
//! commit: through the base, which already holds what it committed), the base of a commit
//! holds in every cluster either its old contents or the overlay's, and `qemu-img check`
//! finds no corruption in any of them (leaks allowed).

mod common;

use common::assert_clean;
use qcow2_image::{
    BackingImage, BackingPolicy, CommitOptions, CreateOptions, Image, OpenOptions, RebaseOptions,
    SharedTarget,
};
use qcow2_io::fault::{FaultStorage, IoKinds, Rule};
use qcow2_io::{errno, MemStorage};
use std::sync::Arc;

type Fs = Arc<FaultStorage<MemStorage>>;

const SIZE: u64 = 1 << 20;
const CS: u64 = 4096;

/// base.qcow2 <- mid.qcow2 <- top.qcow2, and other.qcow2 (another base), in memory.
struct Chain {
    base: Fs,
    mid: Fs,
    top: Fs,
    other: Fs,
}

fn create(backing: Option<&str>, fill: &dyn Fn(&mut Image)) -> Fs {
    let fs: Fs = Arc::new(FaultStorage::new(MemStorage::new()));
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = CS;
    o.layout.backing_file = backing.map(str::to_string);
    o.layout.backing_format = backing.map(|_| "qcow2".to_string());
    let mut img = Image::create(fs.clone(), &o).unwrap();
    fill(&mut img);
    img.close().unwrap();
    fs
}

fn chain() -> Chain {
    let base = create(None, &|i| {
        i.write(0, &[1; 256 << 10]).unwrap();
        i.write_compressed(512 << 10, &[2; CS as usize]).unwrap();
        i.write(700 << 10, &[3; 8192]).unwrap();
    });
    let mid = create(Some("base.qcow2"), &|i| {
        i.write(128 << 10, &[4; 64 << 10]).unwrap();
        i.write_zeroes(700 << 10, CS, false).unwrap();
        i.write_compressed(800 << 10, &[5; CS as usize]).unwrap();
    });
    let top = create(Some("mid.qcow2"), &|i| {
        i.write(4096, &[6; 12288]).unwrap();
        i.write_zeroes(160 << 10, 2 * CS, false).unwrap();
        i.write_compressed(900 << 10, &[7; CS as usize]).unwrap();
    });
    let other = create(None, &|i| {
        i.write(0, &[1; 64 << 10]).unwrap();
        i.write(600 << 10, &[8; 32 << 10]).unwrap();
    });
    Chain {
        base,
        mid,
        top,
        other,
    }
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        backing: BackingPolicy::Ignore,
        ..OpenOptions::default()
    }
}

fn open(fs: &Fs, read_only: bool) -> Image {
    Image::open(fs.clone(), &opts(read_only)).unwrap()
}

/// `file` opened read-only with the chain below it wired by the names in the headers.
fn open_chain(c: &Chain, fs: &Fs) -> Image {
    let mut img = open(fs, true);
    let below = match img.backing_file().as_deref() {
        None => None,
        Some("base.qcow2") => Some(open_chain(c, &c.base)),
        Some("mid.qcow2") => Some(open_chain(c, &c.mid)),
        Some("other.qcow2") => Some(open_chain(c, &c.other)),
        Some(other) => panic!("unexpected backing file {other}"),
    };
    img.set_backing(below.map(|b| Box::new(b) as Box<dyn BackingImage>));
    img
}

fn contents(img: &mut Image) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    img.read(0, &mut v).unwrap();
    v
}

/// Writes the chain's files into a directory and runs `qemu-img check` on each.
fn check_all(c: &Chain, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    for (name, fs) in [
        ("base.qcow2", &c.base),
        ("mid.qcow2", &c.mid),
        ("top.qcow2", &c.top),
        ("other.qcow2", &c.other),
    ] {
        std::fs::write(dir.path().join(name), fs.inner().to_bytes()).unwrap();
    }
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        assert_clean(&dir.path().join(name), false, &format!("{what}: {name}"));
    }
}

/// The kinds of request failed in turn, each with both errnos.
fn faults() -> Vec<(&'static str, IoKinds, i32)> {
    let mut v = Vec::new();
    for (name, kinds) in [
        ("write", IoKinds::WRITE),
        ("flush", IoKinds::FLUSH),
        ("zero/discard", IoKinds::DISCARD_OR_ZEROES),
        ("set_len", IoKinds::SET_LEN),
    ] {
        for code in [errno::EIO, errno::ENOSPC] {
            v.push((name, kinds, code));
        }
    }
    v
}

/// Runs `op` with the `n`-th request of `kinds` on `target` failing (and every one after),
/// for n = 1, 2, ... until the operation no longer meets the fault; `verify` checks the
/// chain after each failure. Returns how many runs failed.
fn sweep(
    what: &str,
    kinds: IoKinds,
    code: i32,
    target: fn(&Chain) -> &Fs,
    op: &dyn Fn(&Chain) -> bool,
    verify: &dyn Fn(&Chain, &str),
) -> u64 {
    let mut failed = 0;
    for n in 1.. {
        let c = chain();
        let fs = target(&c);
        let id = fs.add_rule(Rule::on_request(n, code).kinds(kinds));
        let ok = op(&c);
        let fired = fs.fired(id) > 0;
        fs.clear_rules();
        let what = format!("{what} request {n}");
        if fired {
            // Failed discards only leak (QEMU ignores them too); writes and flushes must
            // fail the operation.
            let must_fail = kinds == IoKinds::WRITE || kinds == IoKinds::FLUSH;
            assert!(
                !ok || !must_fail,
                "{what}: the injected error was swallowed"
            );
            failed += 1;
        } else {
            assert!(ok, "{what}: failed without an injected error");
        }
        verify(&c, &what);
        if !fired {
            break;
        }
        assert!(n < 2000, "{what}: no end to the requests");
    }
    failed
}

#[test]
fn safe_rebase_survives_every_failed_request() {
    let mut total = 0;
    for (name, kinds, code) in faults() {
        let what = format!("rebase onto other.qcow2, {name} errno {code}");
        let before = {
            let c = chain();
            contents(&mut open_chain(&c, &c.top))
        };
        let op = |c: &Chain| {
            let mut top = open(&c.top, false);
            top.set_backing(Some(Box::new(open_chain(c, &c.mid))));
            let mut new = open_chain(c, &c.other);
            let r = top.rebase(
                Some(&mut new),
                None,
                &RebaseOptions {
                    backing_file: Some("other.qcow2".into()),
                    backing_format: Some("qcow2".into()),
                    ..RebaseOptions::default()
                },
                &mut |_| {},
            );
            let closed = top.close();
            r.is_ok() && closed.is_ok()
        };
        let verify = |c: &Chain, what: &str| {
            let mut top = open_chain(c, &c.top);
            assert!(
                contents(&mut top) == before,
                "{what}: the overlay reads differently"
            );
            check_all(c, what);
        };
        total += sweep(&what, kinds, code, |c| &c.top, &op, &verify);
    }
    eprintln!("{total} runs met an injected failure");
    assert!(total > 10, "too few injected failures: {total}");
}

#[test]
fn commit_survives_every_failed_request() {
    let mut total = 0;
    for target in ["mid (the base)", "top (emptied)"] {
        for (name, kinds, code) in faults() {
            let what = format!("commit, {target} {name} errno {code}");
            let (before_top, before_mid) = {
                let c = chain();
                (
                    contents(&mut open_chain(&c, &c.top)),
                    contents(&mut open_chain(&c, &c.mid)),
                )
            };
            let op = |c: &Chain| {
                let mut top = open(&c.top, false);
                let mut mid = open(&c.mid, false);
                mid.set_backing(Some(Box::new(open_chain(c, &c.base))));
                let shared = SharedTarget::new(Box::new(mid));
                top.set_backing(Some(Box::new(shared.clone())));
                let r = top.commit(&shared, 1, &CommitOptions::default(), &mut |_, _| {});
                let closed = top.close();
                let base_closed = shared.close();
                r.is_ok() && closed.is_ok() && base_closed.is_ok()
            };
            let verify = |c: &Chain, what: &str| {
                let mut top = open_chain(c, &c.top);
                assert!(
                    contents(&mut top) == before_top,
                    "{what}: the overlay reads differently"
                );
                let mid = contents(&mut open_chain(c, &c.mid));
                for (i, got) in mid.chunks(CS as usize).enumerate() {
                    let r = i * CS as usize..(i + 1) * CS as usize;
                    assert!(
                        got == &before_mid[r.clone()] || got == &before_top[r],
                        "{what}: base cluster {i} is neither old nor committed data"
                    );
                }
                check_all(c, what);
            };
            let pick: fn(&Chain) -> &Fs = if target.starts_with("mid") {
                |c| &c.mid
            } else {
                |c| &c.top
            };
            total += sweep(&what, kinds, code, pick, &op, &verify);
        }
    }
    eprintln!("{total} runs met an injected failure");
    assert!(total > 10, "too few injected failures: {total}");
}
