//! Persistent dirty bitmaps made by QEMU are maintained by our engine: after writes, zero
//! writes and discards through `qcow2`, the enabled bitmap holds exactly the ranges QEMU's
//! own tracking gives for the same operations, the disabled one is unchanged, and none is
//! left `in-use`. Read through QEMU itself: `qemu-img info`, `qemu-img check`, and the
//! bitmap's dirty extents exported by `qemu-nbd -B` and read with `qemu-img map`
//! (`x-dirty-bitmap`). `qcow2 info` lists bitmaps exactly as qemu-img does.

mod common;

use common::{have_qemu, ok, qcow2, qemu_img, qemu_io};
use std::path::Path;
use std::process::Command;

/// Dirty extents `(start, length)` of bitmap `name` as QEMU's NBD export reports them, or
/// the error qemu-nbd printed when it refuses to export the bitmap.
fn dirty_extents(dir: &Path, img: &str, name: &str) -> Result<Vec<(u64, u64)>, String> {
    let sock = dir.join(format!("nbd-{name}.sock"));
    let pid = dir.join("nbd.pid");
    let _ = std::fs::remove_file(&sock);
    // Without -t the server exits after its first client disconnects.
    let out = Command::new("qemu-nbd")
        .args(["--fork", "-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg(img)
        .current_dir(dir)
        .output()
        .expect("run qemu-nbd");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let map = qemu_img(dir, &["map", "--output=json", "--image-opts", &opts]);
    // The server may still hold the image's locks for a moment after the client left:
    // stop it and wait until it is gone (at most 10 s).
    if let Ok(p) = std::fs::read_to_string(&pid) {
        let p = p.trim().to_string();
        let _ = Command::new("kill").arg(&p).status();
        for _ in 0..200 {
            // Gone, or a zombie nobody reaps (it holds no file any more).
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            if stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert_eq!(map.code, 0, "{map:?}");
    // A dirty range reads as "data": false through x-dirty-bitmap.
    let v: serde_json::Value = serde_json::from_str(&map.stdout).expect("map json");
    let mut dirty = Vec::new();
    for e in v.as_array().expect("list") {
        if e["data"] == serde_json::Value::Bool(false) {
            let start = e["start"].as_u64().expect("start");
            let length = e["length"].as_u64().expect("length");
            dirty.push((start, length));
        }
    }
    Ok(dirty)
}

fn covers(extents: &[(u64, u64)], start: u64, len: u64) -> bool {
    let mut pos = start;
    let mut sorted = extents.to_vec();
    sorted.sort_unstable();
    for (s, l) in sorted {
        if s <= pos && pos < s + l {
            pos = s + l;
        }
    }
    pos >= start + len
}

/// Bitmaps of `img` as `qemu-img info` lists them: (name, flags).
fn qemu_bitmaps(dir: &Path, img: &str) -> Vec<(String, Vec<String>)> {
    let info = qemu_img(dir, &["info", "--output=json", img]);
    ok(&info);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .expect("flags")
                        .iter()
                        .map(|f| f.as_str().expect("flag").to_string())
                        .collect();
                    (b["name"].as_str().expect("name").to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn our_writes_update_bitmaps_as_qemus_writes_do() {
    if !have_qemu() {
        return;
    }
    // (cluster size, granularity of the bitmaps)
    for (cluster, granularity) in [("64k", None), ("4k", None), ("64k", Some("16k"))] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let img = "img.qcow2";
        ok(qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                img,
                "8M",
            ],
        ));
        for name in ["enabled", "disabled"] {
            let mut args = vec!["bitmap", "--add"];
            if let Some(g) = granularity {
                args.extend_from_slice(&["-g", g]);
            }
            args.extend_from_slice(&[img, name]);
            ok(qemu_img(d, &args));
        }
        // QEMU records a write in both, then the second is frozen.
        ok(qemu_io(d, &["-c", "write -P 1 1M 64k", img]));
        ok(qemu_img(d, &["bitmap", "--disable", img, "disabled"]));
        let frozen = dirty_extents(d, img, "disabled").expect("export disabled bitmap");
        assert!(covers(&frozen, 1 << 20, 64 << 10), "{frozen:?}");

        // Read-only use changes nothing at all.
        let before = std::fs::read(d.join(img)).expect("read");
        ok(qcow2(d, &["info", img]));
        ok(qcow2(d, &["check", img]));
        ok(qcow2(d, &["io", "-r", "-c", "read 0 64k", img]));
        ok(qcow2(d, &["map", img]));
        assert!(std::fs::read(d.join(img)).expect("read") == before);

        // Our engine writes, zero-writes and discards; QEMU does the same on a copy.
        let written = [
            (3u64 << 20, 64u64 << 10),
            (5 << 20, 64 << 10),
            (1 << 20, 64 << 10),
            (7 << 20, 512),
        ];
        let cmds = [
            "-c",
            "write -P 2 3M 64k",
            "-c",
            "write -z 5M 64k",
            "-c",
            "discard 1M 64k",
            "-c",
            "write 7M 512",
        ];
        std::fs::copy(d.join(img), d.join("q.qcow2")).expect("copy");
        let mut args = vec!["io"];
        args.extend_from_slice(&cmds);
        args.push(img);
        ok(qcow2(d, &args));
        let mut args = cmds.to_vec();
        args.push("q.qcow2");
        ok(qemu_io(d, &args));

        let check = qemu_img(d, &["check", img]);
        ok(&check);
        assert!(check.stdout.contains("No errors were found"), "{check:?}");
        let bitmaps = qemu_bitmaps(d, img);
        assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");
        for (name, flags) in &bitmaps {
            let in_use = flags.iter().any(|f| f == "in-use");
            let auto = flags.iter().any(|f| f == "auto");
            match dirty_extents(d, img, name) {
                Err(e) => assert!(in_use, "{name}: qemu-nbd refused a consistent bitmap: {e}"),
                Ok(ext) if auto => {
                    for &(s, l) in &written {
                        assert!(covers(&ext, s, l), "{name} misses {s:#x}+{l:#x}: {ext:?}");
                    }
                }
                Ok(ext) => assert_eq!(ext, frozen, "{name}: a disabled bitmap changed"),
            }
            // Maintained and stored at close: consistent, with QEMU's own ranges.
            assert!(!in_use, "{name}: {flags:?}");
            assert_eq!(
                dirty_extents(d, img, name),
                dirty_extents(d, "q.qcow2", name),
                "{name}: ours and QEMU's"
            );
        }
        assert_eq!(qemu_bitmaps(d, img), qemu_bitmaps(d, "q.qcow2"));

        // QEMU keeps using them: its next write lands in the bitmap we stored.
        ok(qemu_io(d, &["-c", "write 6M 4k", img]));
        let ext = dirty_extents(d, img, "enabled").expect("export");
        assert!(covers(&ext, 6 << 20, 4096), "{ext:?}");
        let check = qemu_img(d, &["check", img]);
        ok(&check);
    }
}

#[test]
fn resize_keeps_bitmaps_and_revert_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = "img.qcow2";
    ok(qemu_img(d, &["create", "-q", "-f", "qcow2", img, "8M"]));
    ok(qemu_img(d, &["bitmap", "--add", img, "enabled"]));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "--disable", img, "disabled"],
    ));

    // A snapshot create changes no guest content: bitmaps stay consistent.
    ok(qcow2(d, &["snapshot", "-c", "s1", img]));
    assert!(qemu_bitmaps(d, img)
        .iter()
        .all(|(_, f)| !f.contains(&"in-use".into())));
    // Reverting would change content under every bitmap: refused as QEMU refuses it
    // (`bdrv_snapshot_goto`), before the lookup, with nothing written.
    let before = std::fs::read(d.join(img)).expect("read");
    for name in ["s1", "nope"] {
        let r = qcow2(d, &["snapshot", "-a", name, img]);
        assert_eq!(r.code, 1, "{r:?}");
        assert_eq!(
            r.stderr,
            format!("qcow2: Could not apply snapshot '{name}': Device has active dirty bitmaps\n")
        );
        assert!(std::fs::read(d.join(img)).expect("read") == before);
    }
    let b = qemu_bitmaps(d, img);
    assert!(
        b.iter().all(|(_, f)| !f.contains(&"in-use".into())),
        "{b:?}"
    );
    // A size change resizes every bitmap (QEMU's loader checks the table size against
    // the disk): all consistent, QEMU opens and exports them, the same as QEMU's resize.
    std::fs::copy(d.join(img), d.join("q.qcow2")).expect("copy");
    ok(qcow2(d, &["resize", img, "1G"]));
    ok(qemu_img(d, &["resize", "q.qcow2", "1G"]));
    let b = qemu_bitmaps(d, img);
    assert!(
        b.iter().all(|(_, f)| !f.contains(&"in-use".to_string())),
        "{b:?}"
    );
    assert_eq!(b, qemu_bitmaps(d, "q.qcow2"));
    ok(qcow2(d, &["io", "-c", "write 900M 4k", img]));
    let ext = dirty_extents(d, img, "enabled").expect("export");
    assert_eq!(ext, [(900 << 20, 64 << 10)]);
    ok(qemu_io(d, &["-c", "read 0 4k", img]));
    let check = qemu_img(d, &["check", img]);
    ok(&check);
    assert!(check.stdout.contains("No errors were found"), "{check:?}");
}

#[test]
fn info_lists_bitmaps_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = "img.qcow2";
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            img,
            "64M",
        ],
    ));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "128k", img, "first"],
    ));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "--disable", img, "a-longer-bitmap-name"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", img, "third"]));
    // The first one in use, as a crashed writer leaves it.
    let mut bytes = std::fs::read(d.join(img)).expect("read");
    let ext = find_bitmaps_ext(&bytes).expect("bitmaps extension");
    let dir_off = u64::from_be_bytes(bytes[ext + 24..ext + 32].try_into().unwrap()) as usize;
    bytes[dir_off + 15] |= 1;
    std::fs::write(d.join(img), &bytes).expect("write");
    for args in [&["info", img][..], &["info", "--output=json", img][..]] {
        let ours = qcow2(d, args);
        let qemu = qemu_img(d, args);
        assert_eq!(ours, qemu, "{args:?}");
    }
}

#[test]
fn broken_directory_is_refused_as_qemu_refuses_it() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = "img.qcow2";
    ok(qemu_img(d, &["create", "-q", "-f", "qcow2", img, "8M"]));
    ok(qemu_img(d, &["bitmap", "--add", img, "b0"]));
    // Set a reserved flag bit in the (only) directory entry: QEMU's loader refuses it.
    let mut bytes = std::fs::read(d.join(img)).expect("read");
    let ext = find_bitmaps_ext(&bytes).expect("bitmaps extension");
    let dir_off = u64::from_be_bytes(bytes[ext + 24..ext + 32].try_into().unwrap()) as usize;
    bytes[dir_off + 15] |= 4;
    std::fs::write(d.join(img), &bytes).expect("write");
    let ours = qcow2(d, &["io", "-c", "write 0 4k", img]);
    let qemu = qemu_io(d, &["-c", "write 0 4k", img]);
    assert_eq!(ours.code, qemu.code);
    assert!(
        ours.stderr
            .contains("Bitmap 'b0' doesn't satisfy the constraints"),
        "{ours:?} / {qemu:?}"
    );
    assert!(
        std::fs::read(d.join(img)).expect("read") == bytes,
        "the image changed"
    );
    let ours = qcow2(d, &["info", img]);
    let qemu = qemu_img(d, &["info", img]);
    assert_eq!((ours.code, ours.text()), (qemu.code, qemu.text()));
}

/// Offset of the bitmaps extension's header (magic) in a v3 image.
fn find_bitmaps_ext(b: &[u8]) -> Option<usize> {
    let hl = u32::from_be_bytes(b[100..104].try_into().ok()?) as usize;
    let mut off = hl;
    loop {
        let magic = u32::from_be_bytes(b[off..off + 4].try_into().ok()?);
        let len = u32::from_be_bytes(b[off + 4..off + 8].try_into().ok()?) as usize;
        match magic {
            0 => return None,
            0x2385_2875 => return Some(off),
            _ => off += 8 + len.div_ceil(8) * 8,
        }
    }
}
