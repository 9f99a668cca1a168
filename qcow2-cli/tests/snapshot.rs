//! `qcow2 snapshot -l/-c/-a/-d` against `qemu-img snapshot`: the same command sequence on
//! twin images gives the same exit statuses, the same stdout (snapshot dates masked: the two
//! runs are not in the same second) and the same messages; snapshots made by either tool are
//! listed, applied and deleted by the other, and every image checks clean.

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io, Pair};

/// Replaces every "YYYY-MM-DD HH:MM:SS" with a fixed text.
fn mask_dates(s: &str) -> String {
    let b = s.as_bytes();
    let shape = b"dddd-dd-dd dd:dd:dd";
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let fits = i + shape.len() <= b.len()
            && shape.iter().zip(&b[i..]).all(|(p, c)| match p {
                b'd' => c.is_ascii_digit(),
                other => other == c,
            });
        if fits {
            out.push_str("<date>");
            i += shape.len();
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Our stderr with the usage pointer dropped (qemu-img prints "Try 'qemu-img snapshot
/// --help' for more info" on a second line instead), and qemu-img's first line (the
/// second is that pointer or the raw-probing warning).
fn messages(ours: &str, qemu: &str) -> (String, String) {
    let ours = ours.replace(" (see 'qcow2 snapshot --help')", "");
    let qemu = qemu
        .lines()
        .find(|l| l.starts_with("qemu-img: "))
        .map(|l| format!("{}\n", l.replace("qemu-img: ", "qcow2: ")))
        .unwrap_or_default();
    (ours, qemu)
}

#[test]
fn snapshot_commands_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    for dir in [p.ours(), p.qemu()] {
        assert_eq!(
            qemu_img(&dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]).code,
            0
        );
        std::fs::write(dir.join("r.raw"), vec![0u8; 65536]).expect("write");
    }
    let steps: &[&[&str]] = &[
        &["-c", "s1", "t.qcow2"],
        &["-c", "s1", "t.qcow2"],
        &["-l", "t.qcow2"],
        &["t.qcow2"],
        &["-a", "nosuch", "t.qcow2"],
        &["-d", "2", "t.qcow2"],
        &["-a", "2", "t.qcow2"],
        &["-a", "s1", "t.qcow2"],
        &["-d", "s1", "t.qcow2"],
        &["-l", "t.qcow2"],
        &["-q", "-c", "s3", "t.qcow2"],
        &["-c", "", "t.qcow2"],
        &["-ca very long snapshot name", "t.qcow2"],
        &["-c", "x", "-d", "y", "t.qcow2"],
        &["-l", "-l", "t.qcow2"],
        &["-c", "x", "-c", "y", "t.qcow2"],
        &["-c", "x"],
        &["-c", "x", "t.qcow2", "u.qcow2"],
        &["-c", "x", "missing.qcow2"],
        &["-f", "raw", "-c", "x", "r.raw"],
        &["-f", "raw", "-a", "x", "r.raw"],
        &["-f", "raw", "-d", "x", "r.raw"],
        &["-f", "raw", "-l", "r.raw"],
        &["-f", "raw", "-l", "t.qcow2"],
        &["-a", "3", "t.qcow2"],
        &["-d", "s3", "t.qcow2"],
        &["--list", "t.qcow2"],
    ];
    for step in steps {
        let mut args = vec!["snapshot"];
        args.extend_from_slice(step);
        let (ours, qemu) = p.both(&args);
        assert_eq!(ours.code, qemu.code, "{step:?}: {ours:?} {qemu:?}");
        assert_eq!(
            mask_dates(&ours.stdout),
            mask_dates(&qemu.stdout),
            "{step:?}"
        );
        let (a, b) = messages(&ours.stderr, &qemu.stderr);
        assert_eq!(a, b, "{step:?}");
    }
    for dir in [p.ours(), p.qemu()] {
        let r = qemu_img(&dir, &["check", "t.qcow2"]);
        assert_eq!(r.code, 0, "{r:?}");
    }
    // info shows our snapshots exactly as qemu-img shows them (human and JSON).
    let d = p.ours();
    for extra in [&[][..], &["--output=json"][..]] {
        let mut args = vec!["info"];
        args.extend_from_slice(extra);
        args.push("t.qcow2");
        let ours = qcow2(&d, &args);
        let qemu = qemu_img(&d, &args);
        assert_eq!(ours.code, 0);
        assert_eq!(ours.stdout, qemu.stdout, "{extra:?}");
    }
}

/// Snapshots made by qemu-img are applied and deleted by us, and ours by qemu-img; the guest
/// data follows (qemu-io pattern reads) and every step checks clean.
#[test]
fn snapshots_interoperate_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ok = |r: common::Run| assert_eq!(r.code, 0, "{r:?}");
    let clean = || {
        let r = qemu_img(d, &["check", "t.qcow2"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.starts_with("No errors were found"), "{r:?}");
    };
    let read = |pat: u8, off: &str| {
        let cmd = format!("read -P {pat} {off} 64k");
        let r = qemu_io(d, &["-c", &cmd, "t.qcow2"]);
        assert_eq!(r.code, 0, "{cmd}: {r:?}");
        assert!(
            !r.stdout.contains("Pattern verification failed"),
            "{cmd}: {r:?}"
        );
    };
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "t.qcow2", "16M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -c -P 2 1M 64k",
            "t.qcow2",
        ],
    ));
    // Ours first, then qemu-img's on top.
    ok(qcow2(d, &["snapshot", "-c", "ours", "t.qcow2"]));
    clean();
    ok(qemu_io(d, &["-c", "write -P 3 0 64k", "t.qcow2"]));
    ok(qemu_img(d, &["snapshot", "-c", "theirs", "t.qcow2"]));
    ok(qemu_io(
        d,
        &["-c", "write -P 4 0 64k", "-c", "write -z 1M 64k", "t.qcow2"],
    ));
    let ours = qcow2(d, &["snapshot", "-l", "t.qcow2"]);
    let qemu = qemu_img(d, &["snapshot", "-l", "t.qcow2"]);
    assert_eq!(ours.stdout, qemu.stdout);
    assert!(qemu.stdout.contains(" ours ") && qemu.stdout.contains(" theirs "));
    // qemu-img applies ours (by name), we apply theirs (by id).
    ok(qemu_img(d, &["snapshot", "-a", "ours", "t.qcow2"]));
    read(1, "0");
    read(2, "1M");
    clean();
    ok(qcow2(d, &["snapshot", "-a", "2", "t.qcow2"]));
    read(3, "0");
    read(2, "1M");
    clean();
    // We delete theirs, qemu-img deletes ours.
    ok(qcow2(d, &["snapshot", "-d", "theirs", "t.qcow2"]));
    clean();
    ok(qemu_img(d, &["snapshot", "-d", "ours", "t.qcow2"]));
    clean();
    read(3, "0");
    assert_eq!(qcow2(d, &["snapshot", "-l", "t.qcow2"]).stdout, "");
}

/// refcount_bits=1 cannot count a second reference: both tools refuse the snapshot with
/// "Invalid argument" (iotest 112). qemu-img leaks the L1 copy; we undo it (documented).
#[test]
fn snapshot_refused_with_one_bit_refcounts() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    for dir in [p.ours(), p.qemu()] {
        let r = qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=1",
                "t.qcow2",
                "1M",
            ],
        );
        assert_eq!(r.code, 0);
        assert_eq!(qemu_io(&dir, &["-c", "write 0 64k", "t.qcow2"]).code, 0);
    }
    let (ours, qemu) = p.both(&["snapshot", "-c", "foo", "t.qcow2"]);
    assert_eq!(ours.code, 1);
    assert_eq!(qemu.code, 1);
    assert_eq!(ours.text(), qemu.text());
    assert_eq!(
        ours.stderr,
        "qcow2: Could not create snapshot 'foo': Invalid argument\n"
    );
    let r = qemu_img(&p.ours(), &["check", "t.qcow2"]);
    assert_eq!(r.code, 0, "{r:?}");
}
