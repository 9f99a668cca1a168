//! External data files (`data_file=`, `data_file_raw=`) against qemu-img and qemu-io: the
//! same files from `create` (image and data file byte-identical), the same files after the
//! same qemu-io script (writes, partial-cluster COW, zero writes with and without unmap,
//! discards), the same `info` (human and JSON), clean checks, images made by QEMU read back
//! by us and the other way round, and QEMU's refusals (snapshots, compression, compat 0.10).

mod common;

use common::{have_qemu, qcow2, qemu_img, qemu_io, Pair};

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// `create -q -f qcow2 -o OPTS i.qcow2 SIZE`.
fn create_args<'a>(opts: &'a str, size: &'a str) -> [&'a str; 8] {
    ["create", "-q", "-f", "qcow2", "-o", opts, "i.qcow2", size]
}

/// A qemu-io style run that must succeed with every pattern verified.
fn verified(r: common::Run) {
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("Pattern verification failed"), "{r:?}");
}

fn same_files(p: &Pair, what: &str) {
    for name in ["i.qcow2", "d.raw"] {
        let (a, b) = (read(&p.ours(), name), read(&p.qemu(), name));
        assert_eq!(a.len(), b.len(), "{what}: {name} lengths");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{what}: {name} differs first at byte {i:#x}");
        }
    }
}

#[test]
fn create_matches_qemu_img_byte_for_byte() {
    if !have_qemu() {
        return;
    }
    for o in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
        "data_file=d.raw,cluster_size=4096,lazy_refcounts=on",
        "data_file=d.raw,extended_l2=on",
    ] {
        let p = Pair::new();
        let (ours, qemu) = p.both(&["create", "-f", "qcow2", "-o", o, "i.qcow2", "3M"]);
        assert_eq!(ours.code, 0, "{o}: {ours:?}");
        assert_eq!(ours.text(), qemu.text(), "{o}");
        same_files(&p, o);
        for fmt in ["human", "json"] {
            let args = ["info", "--output", fmt, "i.qcow2"];
            let (a, b) = (qcow2(&p.ours(), &args), qemu_img(&p.qemu(), &args));
            assert_eq!(a.stdout, b.stdout, "{o}: info {fmt}");
        }
        let c = qemu_img(&p.ours(), &["check", "i.qcow2"]);
        assert_eq!(c.code, 0, "{o}: {c:?}");
    }
    // qemu-img's option errors.
    for o in ["data_file_raw=on", "data_file=d.raw,compat=0.10"] {
        let p = Pair::new();
        let (ours, qemu) = p.both(&["create", "-f", "qcow2", "-o", o, "i.qcow2", "1M"]);
        assert_eq!((ours.code, ours.text()), (qemu.code, qemu.text()), "{o}");
    }
}

/// One qemu-io script through our `io` and through qemu-io: both files end identical.
#[test]
fn writes_zeroes_and_discards_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let script = [
        "write -P 7 0 100k",
        "write -P 9 300k 4k",
        "write -z 1M 64k",
        "write -P 3 2M 128k",
        "discard 2M 64k",
        "write -P 5 4M 64k",
        "write -z -u 4M 64k",
        "write -P 1 6M 4k",
        "discard 6M 64k",
        "write -P 2 7341056 70k",
    ];
    let mut args = Vec::new();
    for c in script {
        args.extend(["-c", c]);
    }
    args.push("i.qcow2");
    for o in [
        "data_file=d.raw,data_file_raw=off",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,extended_l2=on",
        "data_file=d.raw,extended_l2=on,data_file_raw=on",
        "data_file=d.raw,cluster_size=4096",
        "data_file=d.raw,lazy_refcounts=on",
    ] {
        let p = Pair::new();
        let create = create_args(o, "8M");
        let (a, b) = p.both(&create);
        assert_eq!((a.code, b.code), (0, 0), "{a:?} {b:?}");
        let ours = qcow2(&p.ours(), &[&["io"][..], &args].concat());
        let qemu = qemu_io(&p.qemu(), &[&["-f", "qcow2"][..], &args].concat());
        assert_eq!(ours.code, 0, "{ours:?}");
        assert_eq!(qemu.code, 0, "{qemu:?}");
        same_files(&p, o);
        assert_eq!(qemu_img(&p.ours(), &["check", "i.qcow2"]).code, 0);
        // A raw data file is the disk itself.
        if o.contains("data_file_raw=on") {
            let cmp = qemu_img(
                &p.ours(),
                &["compare", "-f", "qcow2", "-F", "raw", "i.qcow2", "d.raw"],
            );
            assert_eq!(cmp.code, 0, "{cmp:?}");
        }
    }
}

#[test]
fn images_cross_between_qemu_and_us() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let q = p.qemu();
    let create = create_args("data_file=d.raw", "4M");
    assert_eq!(qemu_img(&q, &create).code, 0);
    let w = qemu_io(
        &q,
        &["-f", "qcow2", "-c", "write -P 0x11 64k 192k", "i.qcow2"],
    );
    assert_eq!(w.code, 0, "{w:?}");
    // QEMU's image: we read its data and write more; QEMU reads ours back.
    let read_ours = ["-c", "read -P 0x11 64k 192k", "-c", "read -P 0 0 64k"];
    verified(qcow2(&q, &[&["io"][..], &read_ours, &["i.qcow2"]].concat()));
    verified(qcow2(&q, &["io", "-c", "write -P 0x22 100k 8k", "i.qcow2"]));
    let read_qemu = ["-c", "read -P 0x22 100k 8k", "-c", "read -P 0x11 64k 36k"];
    verified(qemu_io(
        &q,
        &[&["-f", "qcow2"][..], &read_qemu, &["i.qcow2"]].concat(),
    ));
    // Our checker and qemu-img's agree on it.
    let (a, b) = (
        qcow2(&q, &["check", "--output=json", "i.qcow2"]),
        qemu_img(&q, &["check", "--output=json", "i.qcow2"]),
    );
    assert_eq!((a.code, a.stdout), (b.code, b.stdout));
    // Convert reads through the data file.
    let c = qcow2(&q, &["convert", "-O", "raw", "i.qcow2", "out.raw"]);
    assert_eq!(c.code, 0, "{c:?}");
    let cmp = qemu_img(
        &q,
        &["compare", "-f", "qcow2", "-F", "raw", "i.qcow2", "out.raw"],
    );
    assert_eq!(cmp.code, 0, "{cmp:?}");
    // Growing keeps the data file covering the disk.
    let a = qcow2(&q, &["resize", "i.qcow2", "8M"]);
    assert_eq!(a.code, 0, "{a:?}");
    assert_eq!(qemu_img(&q, &["check", "i.qcow2"]).code, 0);
    assert_eq!(
        std::fs::metadata(q.join("d.raw")).map(|m| m.len()).ok(),
        Some(8 << 20)
    );
}

#[test]
fn refusals_match_qemu() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let create = create_args("data_file=d.raw", "1M");
    let (a, b) = p.both(&create);
    assert_eq!((a.code, b.code), (0, 0));
    let (a, b) = p.both(&["snapshot", "-c", "s", "i.qcow2"]);
    assert_eq!((a.code, a.text()), (b.code, b.text()), "snapshot");
    let a = qcow2(&p.ours(), &["io", "-c", "write -c 0 64k", "i.qcow2"]);
    let b = qemu_io(
        &p.qemu(),
        &["-f", "qcow2", "-c", "write -c 0 64k", "i.qcow2"],
    );
    assert_eq!(a.text(), b.text(), "compressed write");
    // A missing data file: the open fails with QEMU's message, nothing is written.
    std::fs::remove_file(p.ours().join("d.raw")).expect("rm");
    std::fs::remove_file(p.qemu().join("d.raw")).expect("rm");
    let before = read(&p.ours(), "i.qcow2");
    let r = qcow2(&p.ours(), &["io", "-c", "write 0 4k", "i.qcow2"]);
    let q = qemu_io(&p.qemu(), &["-f", "qcow2", "-c", "write 0 4k", "i.qcow2"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(r.text(), q.text());
    assert_eq!(read(&p.ours(), "i.qcow2"), before);
    // The name is relative to the working directory, as in QEMU: from elsewhere, both fail.
    let (a, b) = (
        qcow2(p.root.path(), &["map", "ours/i.qcow2"]),
        qemu_img(p.root.path(), &["map", "qemu/i.qcow2"]),
    );
    assert_eq!(
        (a.code, a.text().replace("ours/", "")),
        (b.code, b.text().replace("qemu/", ""))
    );
}

#[test]
fn amend_renames_and_drops_raw_like_qemu() {
    if !have_qemu() {
        return;
    }
    let p = Pair::new();
    let o = "data_file=d.raw,data_file_raw=on";
    let (a, b) = p.both(&["create", "-q", "-f", "qcow2", "-o", o, "i.qcow2", "1M"]);
    assert_eq!((a.code, b.code), (0, 0));
    let args = [
        "amend",
        "-o",
        "data_file=e.raw,data_file_raw=off",
        "i.qcow2",
    ];
    let (a, b) = p.both(&args);
    assert_eq!((a.code, a.text()), (b.code, b.text()));
    assert_eq!(read(&p.ours(), "i.qcow2"), read(&p.qemu(), "i.qcow2"));
    // Setting the raw promise again is refused by both.
    let args = ["amend", "-o", "data_file_raw=on", "i.qcow2"];
    std::fs::rename(p.ours().join("d.raw"), p.ours().join("e.raw")).expect("mv");
    std::fs::rename(p.qemu().join("d.raw"), p.qemu().join("e.raw")).expect("mv");
    let (a, b) = p.both(&args);
    assert_eq!((a.code, a.text()), (b.code, b.text()));
    // Downgrading is refused with QEMU's message; a refcount-width change (which reopens
    // the image) keeps the data file and the data.
    let (a, b) = p.both(&["amend", "-o", "compat=0.10", "i.qcow2"]);
    assert_eq!((a.code, a.text()), (b.code, b.text()));
    verified(qcow2(
        &p.ours(),
        &["io", "-c", "write -P 6 0 100k", "i.qcow2"],
    ));
    for bits in ["64", "1"] {
        let o = format!("refcount_bits={bits}");
        let a = qcow2(&p.ours(), &["amend", "-o", &o, "i.qcow2"]);
        assert_eq!(a.code, 0, "{bits}: {a:?}");
        assert_eq!(qemu_img(&p.ours(), &["check", "i.qcow2"]).code, 0, "{bits}");
        let r = qemu_io(
            &p.ours(),
            &["-f", "qcow2", "-c", "read -P 6 0 100k", "i.qcow2"],
        );
        verified(r);
    }
}

#[test]
fn convert_to_a_data_file_target_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    for o in ["data_file=d.raw", "data_file=d.raw,data_file_raw=on"] {
        let p = Pair::new();
        for dir in [p.ours(), p.qemu()] {
            assert_eq!(
                qemu_img(&dir, &["create", "-q", "-f", "raw", "src.raw", "4M"]).code,
                0
            );
            let w = qemu_io(&dir, &["-f", "raw", "-c", "write -P 3 64k 1M", "src.raw"]);
            assert_eq!(w.code, 0, "{w:?}");
        }
        let args = ["convert", "-O", "qcow2", "-o", o, "src.raw", "i.qcow2"];
        let (a, b) = p.both(&args);
        assert_eq!((a.code, a.text()), (b.code, b.text()), "{o}");
        same_files(&p, o);
        let cmp = qemu_img(
            &p.ours(),
            &["compare", "-f", "raw", "-F", "qcow2", "src.raw", "i.qcow2"],
        );
        assert_eq!(cmp.code, 0, "{o}: {cmp:?}");
    }
    // Compression cannot go to a data file: both fail the same way.
    let p = Pair::new();
    for dir in [p.ours(), p.qemu()] {
        assert_eq!(
            qemu_img(&dir, &["create", "-q", "-f", "raw", "src.raw", "1M"]).code,
            0
        );
        let w = qemu_io(&dir, &["-f", "raw", "-c", "write -P 3 0 64k", "src.raw"]);
        assert_eq!(w.code, 0, "{w:?}");
    }
    let args = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "src.raw",
        "i.qcow2",
    ];
    let (a, b) = p.both(&args);
    assert_eq!((a.code, a.text()), (b.code, b.text()));
}
