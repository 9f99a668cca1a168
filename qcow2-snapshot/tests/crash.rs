//! Crash safety: at every flush boundary of create, delete and apply, every crash state
//! (every prefix of the writes since the last flush, and random subsets of them, since a
//! volatile cache may reorder them) is an image `qemu-img check` finds leaks at most in
//! (missing COPIED flags on refcount-1 clusters tolerated: they only cost a COW).

mod common;
use common::*;
use qcow2_io::crash::{Checkpoint, CrashOptions, CrashStorage};
use qcow2_io::Storage;
use std::sync::{Arc, Mutex};

fn base() -> Vec<u8> {
    let (_d, p) = tmp_image();
    let ps = p.to_str().unwrap();
    qemu_create(&p, "cluster_size=512", "4M");
    qemu_io(
        &p,
        &[
            "write -P 1 0 24k",
            "write -P 2 1M 8k",
            "write -c -P 3 2M 4k",
        ],
    );
    assert_eq!(run("qemu-img", &["snapshot", "-c", "a", ps]).0, 0);
    qemu_io(&p, &["write -P 4 8k 8k", "write -P 5 3M 4k"]);
    std::fs::read(&p).unwrap()
}

fn crash_states_are_safe(name: &str, op: impl FnOnce(&mut TestImage)) {
    let crash = Arc::new(CrashStorage::from_bytes(base()));
    let storage: Arc<dyn Storage> = crash.clone();
    let mut img = TestImage::open_with(storage, 2, 2).unwrap();
    let seen: Arc<Mutex<Vec<Checkpoint>>> = Arc::default();
    let sink = seen.clone();
    crash.on_flush(move |cp| {
        sink.lock().unwrap().push(cp.clone());
        Ok(())
    });
    op(&mut img);
    img.close().unwrap();
    crash.clear_hooks();
    let mut checkpoints = seen.lock().unwrap().clone();
    checkpoints.push(crash.checkpoint());
    let opts = CrashOptions::default().with_random_subsets(3).with_seed(7);
    let (_d, p) = tmp_image();
    let mut states = 0;
    for (i, cp) in checkpoints.iter().enumerate() {
        for st in cp.crash_states(&opts) {
            write_image(&p, &st.image);
            assert_leaks_at_most(&p, &format!("{name}: flush {i}, {}", st.kind));
            states += 1;
        }
    }
    assert!(states > checkpoints.len(), "{name}: {states} states");
}

#[test]
fn create_is_crash_safe() {
    crash_states_are_safe("create", |img| {
        img.create("new").unwrap();
    });
}

#[test]
fn delete_is_crash_safe() {
    crash_states_are_safe("delete", |img| {
        img.delete("a").unwrap();
    });
}

#[test]
fn apply_is_crash_safe() {
    crash_states_are_safe("apply", |img| {
        img.apply("a").unwrap();
    });
}
