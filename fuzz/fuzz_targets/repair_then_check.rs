//! (b) Repair an arbitrary image with `-r all`, then check it again. The repair must finish
//! (no loop, no panic); when it completed, a fresh check must agree with the repair's own
//! double check: the same corruptions, leaks and check errors remain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_check::{check, CheckOptions, RepairMode};
use qcow2_io::SparseStorage;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(SparseStorage::from_bytes(data));
    let Ok(repaired) = check(
        storage.clone(),
        &CheckOptions {
            repair: Some(RepairMode::All),
        },
    ) else {
        return;
    };
    if repaired.failure.is_some() {
        return;
    }
    let again = check(storage, &CheckOptions::default()).expect("a repaired image opens for check");
    assert!(again.failure.is_none(), "check of the repaired image failed");
    let (a, b) = (&repaired.result, &again.result);
    assert_eq!(
        (a.corruptions, a.leaks, a.check_errors),
        (b.corruptions, b.leaks, b.check_errors),
        "the repair's double check and a fresh check disagree"
    );
});
