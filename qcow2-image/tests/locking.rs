//! Image locking in the library: QEMU's OFD permission locks are taken by every open by
//! name and belong to the open file description, so two opens of one image in one process
//! conflict exactly as two processes do (as in QEMU). The bytes locked are checked in
//! `/proc/locks` against the ones QEMU 10 takes for the same opens.

use qcow2_image::locking::{lock_file, FileRole};
use qcow2_image::{BackingPolicy, CreateOptions, Image, ImageError, Locking, OpenOptions};
use qcow2_io::FileStorage;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The bytes of every OFD lock on `path` (any holder), from `/proc/locks`.
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let meta = std::fs::metadata(path).unwrap();
    let ino = meta.ino();
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: OFDLCK ADVISORY READ -1 fe:00:123 100 101" (blocked waiters start "->").
        if f.len() < 8 || f[1] != "OFDLCK" {
            continue;
        }
        let Some(file_ino) = f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) else {
            continue;
        };
        if file_ino != ino {
            continue;
        }
        let (Ok(start), Ok(end)) = (f[6].parse::<u64>(), f[7].parse::<u64>()) else {
            continue;
        };
        bytes.extend(start..=end);
    }
    bytes
}

fn new_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    Image::create_path(&path, &CreateOptions::new(4 << 20))
        .unwrap()
        .close()
        .unwrap();
    path
}

fn ro() -> OpenOptions {
    OpenOptions::read_only()
}

fn force_share() -> OpenOptions {
    OpenOptions {
        force_share: true,
        ..OpenOptions::read_only()
    }
}

fn locked_text(e: &ImageError) -> (String, String) {
    assert!(e.is_locked(), "not a lock conflict: {e:?}");
    (e.to_string(), e.hint().unwrap_or_default().to_string())
}

#[test]
fn two_opens_in_one_process_conflict_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2");
    let hint = format!("Is another process using the image [{}]?", path.display());

    let mut writer = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    writer.write(0, &[0x5a; 4096]).unwrap();
    writer.flush().unwrap();
    // QEMU's bytes for a read-write qcow2 open: holds consistent read, write, resize;
    // does not share write, resize.
    assert_eq!(
        locked_bytes(&path),
        BTreeSet::from([100, 101, 103, 201, 203])
    );

    let e = Image::open_path(&path, &OpenOptions::read_write()).unwrap_err();
    assert_eq!(
        locked_text(&e),
        ("Failed to get \"write\" lock".into(), hint.clone())
    );
    let e = Image::open_path(&path, &ro()).unwrap_err();
    assert_eq!(
        locked_text(&e),
        ("Failed to get shared \"write\" lock".into(), hint.clone())
    );
    // Force-share: a reader next to the writer (what it reads may change under it).
    let mut reader = Image::open_path(&path, &force_share()).unwrap();
    let mut buf = [0u8; 4096];
    reader.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 4096]);
    drop(reader);

    // The locks go with the image: after close a writer opens again.
    writer.close().unwrap();
    assert!(locked_bytes(&path).is_empty());
    Image::open_path(&path, &OpenOptions::read_write())
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn readers_share_and_keep_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2");
    let r1 = Image::open_path(&path, &ro()).unwrap();
    let r2 = Image::open_path(&path, &ro()).unwrap();
    // QEMU's bytes for a read-only qcow2 open: holds consistent read; does not share
    // write, resize.
    assert_eq!(locked_bytes(&path), BTreeSet::from([100, 201, 203]));
    let e = Image::open_path(&path, &OpenOptions::read_write()).unwrap_err();
    assert_eq!(locked_text(&e).0, "Failed to get \"write\" lock");
    drop((r1, r2));
    // A force-sharing reader refuses nothing: only byte 100.
    let r3 = Image::open_path(&path, &force_share()).unwrap();
    assert_eq!(locked_bytes(&path), BTreeSet::from([100]));
    let w = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    drop((r3, w));
}

#[test]
fn force_share_is_for_read_only_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2");
    let opts = OpenOptions {
        force_share: true,
        ..OpenOptions::read_write()
    };
    let e = Image::open_path(&path, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "force-share=on can only be used with read-only images"
    );
    assert!(locked_bytes(&path).is_empty());
}

#[test]
fn locking_off_takes_and_checks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2");
    let writer = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    let off = OpenOptions {
        locking: Locking::Off,
        ..OpenOptions::read_only()
    };
    let reader = Image::open_path(&path, &off).unwrap();
    // Only the writer's bytes.
    assert_eq!(
        locked_bytes(&path),
        BTreeSet::from([100, 101, 103, 201, 203])
    );
    drop((reader, writer));
    // `On` works where OFD locks do (every local Linux file system).
    let on = OpenOptions {
        locking: Locking::On,
        ..OpenOptions::read_only()
    };
    drop(Image::open_path(&path, &on).unwrap());
}

#[test]
fn create_refuses_a_held_image_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2");
    let mut writer = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    writer.write(0, &[1; 512]).unwrap();
    writer.flush().unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = Image::create_path(&path, &CreateOptions::new(1 << 20)).unwrap_err();
    assert_eq!(locked_text(&e).0, "Failed to get \"write\" lock");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    writer.close().unwrap();
}

#[test]
fn backing_files_hold_read_only_locks() {
    let dir = tempfile::tempdir().unwrap();
    let base = new_image(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut c = CreateOptions::new(4 << 20);
    c.backing_file = Some("base.qcow2".into());
    c.backing_format = Some("qcow2".into());
    Image::create_path(&top, &c).unwrap().close().unwrap();
    let policy = BackingPolicy::Open {
        base_dir: dir.path().to_path_buf(),
        max_depth: 4,
        allowed_dirs: vec![dir.path().to_path_buf()],
    };
    let rw = OpenOptions {
        backing: policy.clone(),
        ..OpenOptions::read_write()
    };

    // The overlay opened for writing holds its backing file as a read-only qcow2 open.
    let img = Image::open_path(&top, &rw).unwrap();
    assert_eq!(locked_bytes(&base), BTreeSet::from([100, 201, 203]));
    let e = Image::open_path(&base, &OpenOptions::read_write()).unwrap_err();
    assert_eq!(locked_text(&e).0, "Failed to get \"write\" lock");
    drop(img);

    // A writer on the backing file keeps the overlay out, with QEMU's prefix and the
    // backing file's name as QEMU combines it.
    let w = Image::open_path(&base, &OpenOptions::read_write()).unwrap();
    let e = Image::open_path(&top, &rw).unwrap_err();
    let (msg, hint) = locked_text(&e);
    assert_eq!(
        msg,
        "Could not open backing file: Failed to get shared \"write\" lock"
    );
    assert_eq!(
        hint,
        format!("Is another process using the image [{}]?", base.display())
    );
    // Force-share is inherited by the backing file.
    let fs = OpenOptions {
        backing: policy,
        force_share: true,
        ..OpenOptions::read_only()
    };
    drop(Image::open_path(&top, &fs).unwrap());
    drop(w);
}

#[test]
fn data_file_holds_qemus_data_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a.data");
    let path = dir.path().join("a.qcow2");
    std::fs::write(&data, b"").unwrap();
    let mut c = CreateOptions::new(4 << 20);
    c.data_file = Some(data.display().to_string());
    let data_storage = std::sync::Arc::new(FileStorage::open(&data, true).unwrap());
    let open = OpenOptions {
        data_file: Some(qcow2_image::DataFileStorage(data_storage)),
        backing: BackingPolicy::Ignore,
        ..OpenOptions::read_write()
    };
    let storage = std::sync::Arc::new(FileStorage::create(&path).unwrap());
    Image::create_with(storage, &c, &open)
        .unwrap()
        .close()
        .unwrap();

    let by_name = OpenOptions {
        backing: BackingPolicy::Open {
            base_dir: dir.path().to_path_buf(),
            max_depth: 1,
            allowed_dirs: vec![dir.path().to_path_buf()],
        },
        ..OpenOptions::read_write()
    };
    let img = Image::open_path(&path, &by_name).unwrap();
    // QEMU's data child of a writer: holds consistent read, write, resize; shares all but
    // resize.
    assert_eq!(locked_bytes(&data), BTreeSet::from([100, 101, 103, 203]));
    // So a raw writer may share it, but nobody may resize it.
    let other = FileStorage::open(&data, true).unwrap();
    lock_file(
        &other,
        &data,
        FileRole::Raw { resize: false },
        true,
        Locking::On,
        false,
    )
    .unwrap();
    drop(other);
    let other = FileStorage::open(&data, true).unwrap();
    let e = lock_file(
        &other,
        &data,
        FileRole::Raw { resize: true },
        true,
        Locking::On,
        false,
    )
    .unwrap_err();
    assert_eq!(locked_text(&e).0, "Failed to get \"resize\" lock");
    drop(img);
    assert!(locked_bytes(&data).is_empty());
}
