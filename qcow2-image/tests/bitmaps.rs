//! QEMU-made persistent bitmaps under our engine: at every instant on disk, whatever
//! crashes, an enabled bitmap that still reads as consistent has seen no guest change (it
//! is marked IN_USE, durably, before the first one); read-only opens never touch it.

use qcow2_image::{Image, OpenOptions};
use qcow2_io::crash::{CrashOptions, CrashStorage};
use qcow2_io::MemStorage;
use std::process::Command;
use std::sync::{Arc, Mutex};

fn qemu_image_with_bitmaps(dir: &std::path::Path) -> Vec<u8> {
    let p = dir.join("b.qcow2");
    let run = |args: &[&str]| {
        let st = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img");
        assert!(st.success(), "{args:?}");
    };
    let ps = p.to_str().expect("utf-8 path");
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        ps,
        "4M",
    ]);
    run(&["bitmap", "--add", ps, "enabled"]);
    run(&["bitmap", "--add", "--disable", ps, "disabled"]);
    std::fs::read(&p).expect("read")
}

/// (name, in_use, auto) of every bitmap, through our own reader.
fn bitmaps(image: &[u8]) -> Vec<(String, bool, bool)> {
    let img = Image::open(
        Arc::new(MemStorage::from_bytes(image.to_vec())),
        &OpenOptions::read_only(),
    )
    .expect("open");
    img.bitmaps()
        .expect("bitmaps")
        .into_iter()
        .map(|b| (b.name, b.in_use, b.auto))
        .collect()
}

fn guest(image: &[u8], offset: u64, len: usize) -> Vec<u8> {
    let mut img = Image::open(
        Arc::new(MemStorage::from_bytes(image.to_vec())),
        &OpenOptions::read_only(),
    )
    .expect("open");
    let mut buf = vec![0u8; len];
    img.read(offset, &mut buf).expect("read");
    buf
}

#[test]
fn read_only_open_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = qemu_image_with_bitmaps(dir.path());
    let storage = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let mut img = Image::open(storage.clone(), &OpenOptions::read_only()).expect("open");
    let mut buf = vec![0u8; 4096];
    img.read(0, &mut buf).expect("read");
    assert_eq!(img.bitmaps().expect("bitmaps").len(), 2);
    img.close().expect("close");
    assert!(storage.to_bytes() == bytes);
    // A writable open that changes no guest data leaves the bitmaps consistent too.
    let mut img = Image::open(storage.clone(), &OpenOptions::default()).expect("open");
    img.flush().expect("flush");
    img.close().expect("close");
    assert_eq!(
        bitmaps(&storage.to_bytes()),
        [
            ("enabled".into(), false, true),
            ("disabled".into(), false, false)
        ]
    );
}

#[test]
fn no_crash_state_shows_a_consistent_enabled_bitmap_with_new_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = qemu_image_with_bitmaps(dir.path());
    let storage = Arc::new(CrashStorage::from_bytes(bytes));
    let cps = Arc::new(Mutex::new(Vec::new()));
    {
        let cps = cps.clone();
        storage.on_flush(move |cp| {
            cps.lock().expect("lock").push(cp.clone());
            Ok(())
        });
    }
    let mut img = Image::open(storage.clone(), &OpenOptions::default()).expect("open");
    img.write(64 << 10, &[0x5a; 8192]).expect("write");
    img.write_zeroes(1 << 20, 64 << 10, false).expect("zero");
    img.flush().expect("flush");
    let last = storage.checkpoint();
    img.close().expect("close");
    let mut all = cps.lock().expect("lock").clone();
    all.push(last);
    all.push(storage.checkpoint());
    let mut states = 0;
    let mut changed = 0;
    for cp in &all {
        let opts = CrashOptions::thorough(4, 7);
        for st in cp.crash_states(&opts) {
            states += 1;
            let data_changed = guest(&st.image, 64 << 10, 8192) != vec![0u8; 8192];
            let b = bitmaps(&st.image);
            let enabled = b.iter().find(|x| x.0 == "enabled").expect("enabled bitmap");
            let disabled = b
                .iter()
                .find(|x| x.0 == "disabled")
                .expect("disabled bitmap");
            assert!(
                !disabled.1,
                "the disabled bitmap was invalidated: {:?}",
                st.kind
            );
            if data_changed {
                changed += 1;
                assert!(
                    enabled.1,
                    "new data under a consistent bitmap: {:?}",
                    st.kind
                );
            }
        }
    }
    assert!(
        states > 10 && changed > 0,
        "{states} states, {changed} with new data"
    );
}
