//! `qcow2 resize` against `qemu-img resize` on raw files (`-f raw`: qemu-img prints a
//! three-line warning when it has to probe a raw image for writing; we do not). Same exit
//! status, same stdout, same first stderr line (qemu-img's second line is a warning or a
//! hint), same file length afterwards. qcow2 images wait on qcow2-image.

mod common;

use common::{have_qemu, qcow2, qemu_img};

#[test]
fn raw_resize_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["ours.raw", "qemu.raw"] {
        std::fs::write(dir.path().join(name), vec![3u8; 1 << 20]).expect("write");
    }
    for args in [
        &["X", "2M"][..],
        &["X", "+1M"][..],
        &["X", "-1M"][..],
        &["--shrink", "X", "-1M"][..],
        &["X", "1X"][..],
        &["X", "--shrink", "1000"][..],
        &["-q", "X", "4M"][..],
        &["X", "-100M"][..],
        &["--shrink", "X", "-100M"][..],
        &["X", "9E"][..],
        &["-f", "qcow2", "X", "1M"][..],
        &["X", "+0"][..],
        &["X", "1.5"][..],
        &["--shrink", "X", "0"][..],
        &["missing.raw", "1M"][..],
    ] {
        fn with<'a>(args: &[&'a str], name: &'a str) -> Vec<&'a str> {
            let mut v = vec!["resize", "-f", "raw"];
            v.extend(args.iter().map(|a| if *a == "X" { name } else { *a }));
            v
        }
        let ours = qcow2(dir.path(), &with(args, "ours.raw"));
        let qemu = qemu_img(dir.path(), &with(args, "qemu.raw"));
        assert_eq!(ours.code, qemu.code, "{args:?}: {ours:?} {qemu:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        let first = qemu
            .stderr
            .lines()
            .next()
            .map(|l| format!("{l}\n"))
            .unwrap_or_default();
        assert_eq!(
            ours.stderr.replace("ours.raw", "X"),
            first
                .replace("qemu-img: ", "qcow2: ")
                .replace("qemu.raw", "X"),
            "{args:?}"
        );
        let len = |n: &str| std::fs::metadata(dir.path().join(n)).expect("stat").len();
        assert_eq!(len("ours.raw"), len("qemu.raw"), "{args:?}");
    }
}

/// Growing a qcow2 image: same message and a byte-identical file as qemu-img resize;
/// shrinking without --shrink refuses the same way. (Shrinking qcow2 is not available yet.)
#[test]
fn qcow2_grow_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for size in ["+1G", "3G", "+1M", "-1M", "1000"] {
        for name in ["ours.qcow2", "qemu.qcow2"] {
            assert_eq!(
                qemu_img(d, &["create", "-q", "-f", "qcow2", name, "1G"]).code,
                0
            );
            assert_eq!(
                common::qemu_io(d, &["-c", "write -P 5 0 64k", name]).code,
                0
            );
        }
        let ours = qcow2(d, &["resize", "ours.qcow2", size]);
        let qemu = qemu_img(d, &["resize", "qemu.qcow2", size]);
        assert_eq!(ours.code, qemu.code, "{size}: {ours:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{size}");
        let first = qemu
            .stderr
            .lines()
            .next()
            .map(|l| format!("{l}\n"))
            .unwrap_or_default();
        assert_eq!(
            ours.stderr,
            first.replace("qemu-img: ", "qcow2: "),
            "{size}"
        );
        let a = std::fs::read(d.join("ours.qcow2")).expect("read");
        let b = std::fs::read(d.join("qemu.qcow2")).expect("read");
        assert!(a == b, "{size}: files differ");
    }
}
