//! Image locking against real QEMU, both ways: while `qemu-nbd` (or a `qemu-io` session)
//! holds an image for writing, our writable commands fail with qemu-img's message and
//! leave the file byte-identical, and `-U` readers work; while our process holds an image,
//! `qemu-io` and `qemu-img` refuse it and `qemu-img info -U` works. Every message is
//! compared with what qemu-img / qemu-io print in the same situation. Holders are killed
//! and waited for within bounded time.

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io, Run};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bytes of every OFD lock on `path`, from `/proc/locks`.
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let ino = std::fs::metadata(path).unwrap().ino();
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "OFDLCK" {
            continue;
        }
        let Some(file_ino) = f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) else {
            continue;
        };
        if file_ino != ino {
            continue;
        }
        if let (Ok(s), Ok(e)) = (f[6].parse::<u64>(), f[7].parse::<u64>()) {
            bytes.extend(s..=e);
        }
    }
    bytes
}

/// A process holding an image; killed and reaped on drop.
struct Holder(Child);

impl Holder {
    /// Starts `program args` in `dir` and waits (at most 10 s) until `path` carries
    /// exactly `bytes`.
    fn start(dir: &Path, program: &str, args: &[&str], path: &Path, bytes: &[u64]) -> Holder {
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let holder = Holder(child);
        let want: BTreeSet<u64> = bytes.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = locked_bytes(path);
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{program} {args:?}: locks {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        holder
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU's bytes for a read-write qcow2 open, a read-only one, and a force-sharing one.
const RW: &[u64] = &[100, 101, 103, 201, 203];
const RO: &[u64] = &[100, 201, 203];
const SHARED: &[u64] = &[100];

fn assert_same_failure(ours: &Run, theirs: &Run, what: &str) {
    assert_ne!(theirs.code, 0, "{what}: QEMU succeeded: {theirs:?}");
    assert_ne!(ours.code, 0, "{what}: we succeeded: {ours:?}");
    assert_eq!(ours.text(), theirs.text(), "{what}");
}

fn make_image(dir: &Path, name: &str) {
    let r = qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "16M"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = qemu_io(dir, &["-c", "write -P 0x11 0 64k", name]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_qemu_writer_keeps_our_writers_out_and_lets_force_share_readers_in() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_image(d, "img.qcow2");
    let img = d.join("img.qcow2");
    let sock = d.join("nbd.sock");
    let sock = sock.to_str().unwrap();
    let nbd = Holder::start(
        d,
        "qemu-nbd",
        &["-t", "-k", sock, "-f", "qcow2", "img.qcow2"],
        &img,
        RW,
    );
    let before = std::fs::read(&img).unwrap();

    // Writers: ours against qemu-img's / qemu-io's own refusal of the same command.
    let writers: [(&[&str], &str, &[&str]); 7] = [
        (
            &["io", "-c", "write 0 4k"],
            "qemu-io",
            &["-c", "write 0 4k"],
        ),
        (
            &["snapshot", "-c", "s1"],
            "qemu-img",
            &["snapshot", "-c", "s1"],
        ),
        (
            &["amend", "-o", "lazy_refcounts=on"],
            "qemu-img",
            &["amend", "-o", "lazy_refcounts=on"],
        ),
        (&["check", "-r", "all"], "qemu-img", &["check", "-r", "all"]),
        (
            &["bench", "-w", "-c", "1"],
            "qemu-img",
            &["bench", "-w", "-c", "1"],
        ),
        (&["snapshot", "-l"], "qemu-img", &["snapshot", "-l"]),
        (&["info"], "qemu-img", &["info"]),
    ];
    for (ours, peer, theirs) in writers {
        let o = qcow2(d, &[ours, &["img.qcow2"]].concat());
        let t = if peer == "qemu-io" {
            qemu_io(d, &[theirs, &["img.qcow2"]].concat())
        } else {
            qemu_img(d, &[theirs, &["img.qcow2"]].concat())
        };
        assert_same_failure(&o, &t, &format!("{ours:?}"));
        assert!(
            o.stderr
                .contains("Is another process using the image [img.qcow2]?"),
            "{o:?}"
        );
    }
    // resize takes the size last; compare separately.
    let o = qcow2(d, &["resize", "img.qcow2", "+1M"]);
    let t = qemu_img(d, &["resize", "img.qcow2", "+1M"]);
    assert_same_failure(&o, &t, "resize");
    assert_eq!(
        o.stderr,
        "qcow2: Could not open 'img.qcow2': Failed to get \"write\" lock\n\
         Is another process using the image [img.qcow2]?\n"
    );
    // Creating over it is refused before anything is truncated.
    let o = qcow2(d, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    let t = qemu_img(d, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    assert_same_failure(&o, &t, "create");
    // -U on a writable open is refused as qemu-img refuses it.
    let o = qcow2(d, &["snapshot", "-U", "-c", "s1", "img.qcow2"]);
    let t = qemu_img(d, &["snapshot", "-U", "-c", "s1", "img.qcow2"]);
    assert_same_failure(&o, &t, "snapshot -U -c");
    let o = qcow2(d, &["io", "-U", "-c", "read 0 4k", "img.qcow2"]);
    let t = qemu_io(d, &["-U", "-c", "read 0 4k", "img.qcow2"]);
    assert_same_failure(&o, &t, "io -U (writable)");

    assert_eq!(std::fs::read(&img).unwrap(), before, "the image changed");

    // Force-share readers work next to the writer.
    let o = qcow2(d, &["info", "-U", "img.qcow2"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("file format: qcow2"), "{o:?}");
    let t = qemu_img(d, &["info", "-U", "img.qcow2"]);
    assert_eq!(o.stdout, t.stdout);
    for args in [
        &["map", "-U", "img.qcow2"][..],
        &["snapshot", "-U", "-l", "img.qcow2"],
        &["check", "-U", "img.qcow2"],
        &["io", "-r", "-U", "-c", "read -P 0x11 0 64k", "img.qcow2"],
    ] {
        let o = qcow2(d, args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
    }
    drop(nbd);
    assert!(locked_bytes(&img).is_empty());
    let c = qemu_img(d, &["check", "img.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
}

#[test]
fn our_writer_keeps_qemu_out_and_lets_force_share_readers_in() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_image(d, "img.qcow2");
    let img = d.join("img.qcow2");
    let bin = env!("CARGO_BIN_EXE_qcow2");
    let holder = Holder::start(
        d,
        bin,
        &[
            "io",
            "-c",
            "write -P 0x22 64k 64k",
            "-c",
            "sleep 60000",
            "img.qcow2",
        ],
        &img,
        RW,
    );

    let t = qemu_io(d, &["-c", "write 0 4k", "img.qcow2"]);
    assert_ne!(t.code, 0, "{t:?}");
    assert_eq!(
        t.stderr,
        "qemu-io: can't open device img.qcow2: Failed to get \"write\" lock\n\
         Is another process using the image [img.qcow2]?\n"
    );
    let t = qemu_img(d, &["snapshot", "-c", "s1", "img.qcow2"]);
    assert_ne!(t.code, 0, "{t:?}");
    assert!(t.stderr.contains("Failed to get \"write\" lock"), "{t:?}");
    let t = qemu_img(d, &["info", "img.qcow2"]);
    assert!(
        t.stderr.contains("Failed to get shared \"write\" lock"),
        "{t:?}"
    );
    let t = qemu_img(d, &["info", "-U", "img.qcow2"]);
    assert_eq!(t.code, 0, "{t:?}");
    let t = qemu_io(d, &["-r", "-U", "-c", "read -P 0x11 0 64k", "img.qcow2"]);
    assert_eq!(t.code, 0, "{t:?}");
    drop(holder);
    assert!(locked_bytes(&img).is_empty());
}

#[test]
fn our_readers_hold_what_qemus_readers_hold() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_image(d, "img.qcow2");
    let img = d.join("img.qcow2");
    let bin = env!("CARGO_BIN_EXE_qcow2");

    // A read-only open of ours: the same bytes as qemu-io -r; QEMU's writers stay out.
    let holder = Holder::start(
        d,
        bin,
        &["io", "-r", "-c", "sleep 60000", "img.qcow2"],
        &img,
        RO,
    );
    let t = qemu_io(d, &["-c", "write 0 4k", "img.qcow2"]);
    assert!(t.stderr.contains("Failed to get \"write\" lock"), "{t:?}");
    let t = qemu_io(d, &["-r", "-c", "read 0 4k", "img.qcow2"]);
    assert_eq!(t.code, 0, "{t:?}");
    drop(holder);

    // A force-sharing reader of ours refuses nothing: QEMU's writer gets in.
    let holder = Holder::start(
        d,
        bin,
        &["io", "-r", "-U", "-c", "sleep 60000", "img.qcow2"],
        &img,
        SHARED,
    );
    let t = qemu_io(d, &["-c", "write -P 0x33 0 4k", "img.qcow2"]);
    assert_eq!(t.code, 0, "{t:?}");
    drop(holder);

    // And QEMU's holders carry the bytes ours do (the same table, seen from QEMU).
    for (args, bytes) in [
        (&["-c", "sleep 60000", "img.qcow2"][..], RW),
        (&["-r", "-c", "sleep 60000", "img.qcow2"], RO),
        (&["-r", "-U", "-c", "sleep 60000", "img.qcow2"], SHARED),
    ] {
        let h = Holder::start(d, "qemu-io", args, &img, bytes);
        drop(h);
    }
}

#[test]
fn sleep_reads_its_operand_as_qemu_io_does() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_image(d, "img.qcow2");
    for cmd in [
        "sleep abc",
        "sleep -5",
        "sleep",
        "sleep 1 2",
        "sleep 0x10",
        "sleep 010",
        "sleep 09",
        "sleep +3",
    ] {
        let o = qcow2(d, &["io", "-c", cmd, "img.qcow2"]);
        let t = qemu_io(d, &["-c", cmd, "img.qcow2"]);
        assert_eq!((o.code, o.text()), (t.code, t.text()), "{cmd}");
    }
}

/// Backing files and data files: our holders lock the same bytes on them as qemu-io's.
#[test]
fn backing_and_data_files_are_locked_as_qemu_locks_them() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_image(d, "base.qcow2");
    let r = qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let r = qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "dd.qcow2",
            "4M",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let bin = env!("CARGO_BIN_EXE_qcow2");
    let (base, data) = (d.join("base.qcow2"), d.join("d.raw"));
    // (our io options, qemu-io's, image, file inspected, its bytes).
    let cases: [(&[&str], &str, &Path, &[u64]); 6] = [
        (&[], "top.qcow2", &base, RO),
        (&["-r"], "top.qcow2", &base, RO),
        (&["-r", "-U"], "top.qcow2", &base, SHARED),
        (&[], "dd.qcow2", &data, &[100, 101, 103, 203]),
        (&["-r"], "dd.qcow2", &data, &[100, 203]),
        (&["-r", "-U"], "dd.qcow2", &data, SHARED),
    ];
    for (opts, image, file, bytes) in cases {
        for program in [bin, "qemu-io"] {
            let mut args: Vec<&str> = Vec::new();
            if program == bin {
                args.push("io");
            }
            args.extend(opts);
            args.extend(["-c", "sleep 60000", image]);
            // Killed with SIGKILL on drop: a crashed holder's locks go with its fds.
            drop(Holder::start(d, program, &args, file, bytes));
            assert!(locked_bytes(file).is_empty(), "{program} {args:?}");
        }
    }
    // A writer on the backing file keeps our overlay out as it keeps qemu-io out.
    let w = Holder::start(
        d,
        "qemu-io",
        &["-c", "sleep 60000", "base.qcow2"],
        &base,
        RW,
    );
    let o = qcow2(d, &["io", "-c", "read 0 4k", "top.qcow2"]);
    let t = qemu_io(d, &["-c", "read 0 4k", "top.qcow2"]);
    assert_same_failure(&o, &t, "overlay of a held backing file");
    drop(w);
    // A data file held by a qcow2 writer (a qcow2 file used as data file): QEMU finds the
    // holder of "resize" first, because it attaches the data file holding nothing.
    std::fs::copy(&base, &data).unwrap();
    let w = Holder::start(d, "qemu-io", &["-c", "sleep 60000", "d.raw"], &data, RW);
    for ro in [false, true] {
        let flag: &[&str] = if ro { &["-r"] } else { &[] };
        let o = qcow2(
            d,
            &[&["io"], flag, &["-c", "read 0 4k", "dd.qcow2"]].concat(),
        );
        let t = qemu_io(d, &[flag, &["-c", "read 0 4k", "dd.qcow2"]].concat());
        assert_same_failure(&o, &t, "image of a held data file");
        assert!(o.stderr.contains("shared \"resize\""), "{o:?}");
    }
    drop(w);
}
