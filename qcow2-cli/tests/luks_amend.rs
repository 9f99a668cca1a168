//! LUKS key-slot management with `amend -o encrypt.*` against qemu-img: the same sequence
//! of additions, erasures and refusals on two copies of a qemu-img image gives the same
//! messages, exit codes and key-slot states; slots added by either tool open with the
//! other, slots erased by either tool no longer open with the other.

mod common;

use common::luks::{assert_ok, create, qemu_check_clean, run_io};
use common::{have_qemu, qcow2, qemu_img, qemu_io, Pair, Run};
use std::path::Path;

const SECRETS: [&str; 4] = [
    "--object",
    "secret,id=sec0,data=abc",
    "--object",
    "secret,id=s1,data=new",
];

fn amend(ours: bool, dir: &Path, file: &str, opts: &str, force: bool) -> Run {
    let spec = format!("driver=qcow2,file.filename={file},encrypt.key-secret=sec0");
    let mut a = vec!["amend"];
    a.extend(SECRETS);
    a.extend(["--image-opts", &spec, "-o", opts]);
    if force {
        a.push("--force");
    }
    if ours {
        qcow2(dir, &a)
    } else {
        qemu_img(dir, &a)
    }
}

/// The key-slot lines of `qemu-img info` (active flags, offsets, stripes; iterations
/// are benchmarked, so only their presence).
fn slots(dir: &Path, file: &str) -> String {
    let r = qemu_img(dir, &["info", file]);
    assert_eq!(r.code, 0, "{}", r.text());
    let s = r.stdout.split("slots:").nth(1).unwrap_or("").to_string();
    s.lines()
        .take_while(|l| !l.contains("payload offset"))
        .map(|l| {
            if l.contains("iters:") {
                "iters".to_string()
            } else {
                l.trim().to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens `file` with secret `data` through qemu-io or ours and reads the pattern.
fn read_with(ours: bool, dir: &Path, file: &str, data: &str) -> Run {
    let obj = format!("secret,id=k,data={data}");
    let spec = format!("driver=qcow2,file.filename={file},encrypt.key-secret=k");
    let a = [
        "--object",
        &obj,
        "--image-opts",
        &spec,
        "-c",
        "read -P 0x5a 0 64k",
    ];
    if ours {
        let mut v = vec!["io"];
        v.extend(a);
        qcow2(dir, &v)
    } else {
        qemu_io(dir, &a)
    }
}

#[test]
fn keyslot_changes_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    create(&p.qemu(), "c.qcow2", "", "1M");
    assert_ok(
        &run_io(&p.qemu(), false, "c.qcow2", &["write -P 0x5a 0 64k"]),
        "qemu writes",
    );
    p.copy_to_ours("c.qcow2");
    let steps: &[(&str, bool)] = &[
        ("encrypt.new-secret=s1", false),
        ("encrypt.state=active", false),
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.old-secret=sec0",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=9",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=0",
            false,
        ),
        ("encrypt.state=active,encrypt.new-secret=s9", false),
        ("encrypt.state=bogus", false),
        ("encrypt.state=inactive,encrypt.keyslot=0", false),
        ("encrypt.state=inactive,encrypt.keyslot=3", false),
        ("encrypt.state=inactive,encrypt.old-secret=sec0", false),
        ("encrypt.state=inactive", false),
        (
            "encrypt.state=inactive,encrypt.iter-time=10,encrypt.keyslot=1",
            false,
        ),
        ("encrypt.state=inactive,encrypt.new-secret=s1", false),
        // Adds "new" into slot 1, then into slot 3 explicitly.
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10,encrypt.keyslot=3",
            false,
        ),
        ("encrypt.state=inactive,encrypt.keyslot=3", false),
        // Erases every slot holding "new" (slot 1).
        ("encrypt.state=inactive,encrypt.old-secret=s1", false),
        ("encrypt.state=inactive,encrypt.old-secret=s1", false),
        (
            "encrypt.state=inactive,encrypt.old-secret=sec0,encrypt.keyslot=1",
            false,
        ),
        ("encrypt.state=inactive,encrypt.old-secret=s9", false),
        // --force: overwrite the only active slot with "new" ("abc" opens nothing then).
        (
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=0,encrypt.iter-time=10",
            true,
        ),
    ];
    for (o, force) in steps {
        let ours = amend(true, &p.ours(), "c.qcow2", o, *force);
        let qemu = amend(false, &p.qemu(), "c.qcow2", o, *force);
        assert_eq!(
            ours.code,
            qemu.code,
            "{o}: {} / {}",
            ours.text(),
            qemu.text()
        );
        assert_eq!(ours.text(), qemu.text(), "{o}");
        assert_eq!(
            slots(&p.ours(), "c.qcow2"),
            slots(&p.qemu(), "c.qcow2"),
            "{o}"
        );
    }
    for dir in [p.ours(), p.qemu()] {
        // The overwritten slot 0 holds "new" now, in both.
        assert_eq!(read_with(false, &dir, "c.qcow2", "abc").code, 1);
        assert_ok(
            &read_with(false, &dir, "c.qcow2", "new"),
            "new secret in slot 0",
        );
        assert_ok(
            &read_with(true, &dir, "c.qcow2", "new"),
            "new secret in slot 0",
        );
    }
    // A plain image: QEMU's refusal.
    let r = Pair::new();
    for (ours, dir) in [(true, r.ours()), (false, r.qemu())] {
        let c = qemu_img(&dir, &["create", "-q", "-f", "qcow2", "p.qcow2", "1M"]);
        assert_eq!(c.code, 0);
        let mut a = vec!["amend"];
        a.extend(SECRETS);
        a.extend([
            "-o",
            "encrypt.state=active,encrypt.new-secret=s1",
            "p.qcow2",
        ]);
        let run = if ours {
            qcow2(&dir, &a)
        } else {
            qemu_img(&dir, &a)
        };
        assert_eq!(run.code, 1);
        assert!(
            run.text()
                .contains("Can't amend encryption options - encryption not present"),
            "{}",
            run.text()
        );
    }
}

/// Slots added by one tool open with the other; slots erased by one tool no longer do.
#[test]
fn keyslots_interop_both_ways() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "k.qcow2", "", "1M");
    assert_ok(
        &run_io(dir, false, "k.qcow2", &["write -P 0x5a 0 64k"]),
        "qemu writes",
    );
    for (adder, reader) in [(false, true), (true, false)] {
        let add = "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10";
        let r = amend(adder, dir, "k.qcow2", add, false);
        assert_eq!(r.code, 0, "add by ours={adder}: {}", r.text());
        assert_ok(&read_with(reader, dir, "k.qcow2", "new"), "new secret");
        assert_ok(&read_with(reader, dir, "k.qcow2", "abc"), "old secret");
        qemu_check_clean(dir, "k.qcow2");
        // The other tool erases it again by its passphrase.
        let r = amend(
            reader,
            dir,
            "k.qcow2",
            "encrypt.state=inactive,encrypt.old-secret=s1",
            false,
        );
        assert_eq!(r.code, 0, "erase by ours={reader}: {}", r.text());
        for tool in [false, true] {
            let r = read_with(tool, dir, "k.qcow2", "new");
            assert_eq!(r.code, 1, "{}", r.text());
            assert!(r.text().contains("Invalid password"), "{}", r.text());
            assert_ok(&read_with(tool, dir, "k.qcow2", "abc"), "old secret");
        }
    }
    qemu_check_clean(dir, "k.qcow2");
}
