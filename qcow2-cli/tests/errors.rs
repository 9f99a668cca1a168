//! Bad command lines and bad files: one error line on stderr, nothing on stdout, a nonzero
//! exit status that is never a panic's 101. Subcommands whose engine has not landed say so.

mod common;

use common::{have_qemu, qcow2, qemu_img};

#[test]
fn bad_options_are_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["create", "-x", "t.img", "1M"][..],
        &["create", "-f"][..],
        &["create"][..],
        &["create", "-f", "qcow2", "t.img", "1M", "extra"][..],
        &["info"][..],
        &["info", "a", "b"][..],
        &["info", "--output=xml", "t.img"][..],
        &["info", "--bogus", "t.img"][..],
        &["check", "--output=xml", "t.img"][..],
        &["check", "-r", "foo", "t.img"][..],
        &["snapshot", "-l", "-c", "x", "t.img"][..],
        &["snapshot", "-c", "x", "-d", "y", "t.img"][..],
        &["snapshot"][..],
        &["frobnicate"][..],
        &[][..],
    ] {
        let r = qcow2(dir.path(), args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert_eq!(r.stdout, "", "{args:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("qcow2: "), "{args:?}: {r:?}");
    }
}

#[test]
fn option_errors_use_qemu_img_wording() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        qemu_img(dir.path(), &["create", "-q", "-f", "qcow2", "t.img", "1M"]).code,
        0
    );
    for args in [
        &["info", "--output=xml", "t.img"][..],
        &["check", "--output=xml", "t.img"][..],
        &["check", "-r", "foo", "t.img"][..],
        &["info", "t.img", "extra"][..],
        &["snapshot", "-l", "-c", "x", "t.img"][..],
    ] {
        let ours = qcow2(dir.path(), args);
        let qemu = qemu_img(dir.path(), args);
        assert_eq!(ours.code, qemu.code, "{args:?}");
        let first = qemu
            .stderr
            .lines()
            .next()
            .unwrap_or("")
            .replace("qemu-img: ", "qcow2: ");
        assert!(
            ours.stderr.starts_with(&first),
            "{args:?}: ours {ours:?}, qemu {first}"
        );
    }
}

#[test]
fn help_has_examples_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["--help"][..],
        &["create", "--help"][..],
        &["info", "--help"][..],
        &["check", "--help"][..],
    ] {
        let r = qcow2(dir.path(), args);
        assert_eq!(r.code, 0, "{args:?}");
        assert!(r.stdout.contains("Examples:"), "{args:?}: {}", r.stdout);
    }
    assert_eq!(qcow2(dir.path(), &["--version"]).code, 0);
}

/// Subcommands waiting on an engine crate: they check their arguments, then refuse with a
/// clear message instead of pretending.
#[test]
fn unfinished_subcommands_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["check", "t.img"][..],
        &["snapshot", "-c", "s", "t.img"][..],
        &["snapshot", "-a", "s", "t.img"][..],
        &["snapshot", "-d", "s", "t.img"][..],
        &["map", "t.img"][..],
        &["convert", "-O", "qcow2", "a.img", "b.img"][..],
        &["amend", "-o", "refcount_bits=64", "t.img"][..],
        &["resize", "t.img", "-1G"][..],
        &["bench", "t.img"][..],
        &["io", "-c", "read 0 512", "t.img"][..],
    ] {
        let r = qcow2(dir.path(), args);
        if r.code == 0 {
            // It landed: the subcommand's own tests cover it.
            continue;
        }
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("not available yet") || r.stderr.contains("Could not open"),
            "{args:?}: {r:?}"
        );
    }
}

/// Garbage after a valid magic, and single-byte pokes all over a real header: every run
/// ends with 0 or 1, never with a panic.
#[test]
fn no_panic_on_damaged_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("base"), [0u8; 512]).expect("write");
    let r = qemu_img(
        dir.path(),
        &[
            "create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", "-u", "t.img", "1G",
        ],
    );
    assert_eq!(r.code, 0);
    assert_eq!(
        qemu_img(dir.path(), &["snapshot", "-c", "s1", "t.img"]).code,
        0
    );
    let good = std::fs::read(dir.path().join("t.img")).expect("read");
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..60 {
        let mut bad = good.clone();
        match i % 3 {
            0 => {
                let at = 4 + (next() % 120) as usize;
                bad[at] = next() as u8;
            }
            1 => {
                let at = (8 + (next() % 104) as usize) & !7;
                bad[at..at + 8].copy_from_slice(&next().to_be_bytes());
            }
            _ => {
                bad.truncate((next() % 300) as usize + 8);
            }
        }
        std::fs::write(dir.path().join("bad.img"), &bad).expect("write");
        for args in [
            &["info", "bad.img"][..],
            &["info", "--output=json", "bad.img"][..],
            &["snapshot", "-l", "bad.img"][..],
        ] {
            let r = qcow2(dir.path(), args);
            assert!(r.code == 0 || r.code == 1, "{args:?} on case {i}: {r:?}");
            assert!(
                !r.stderr.contains("internal error"),
                "{args:?} on case {i}: {r:?}"
            );
        }
    }
}
