//! Inputs that crashed a fuzz target (`fuzz/`), kept as regression tests: each must check
//! (with and without repair) without a panic.

use qcow2_check::{check, CheckOptions, RepairMode};
use qcow2_io::MemStorage;
use std::sync::Arc;

fn run_all_modes(bytes: &[u8]) {
    for repair in [None, Some(RepairMode::Leaks), Some(RepairMode::All)] {
        let storage = Arc::new(MemStorage::from_bytes(bytes.to_vec()));
        let _ = check(storage, &CheckOptions { repair });
    }
}

/// An L2 table offset so close to 2^64 that the batched read's run arithmetic saturated and
/// the table slice came out one byte short (open_read_map_check, first run).
#[test]
fn table_offset_near_the_end_of_the_address_space() {
    run_all_modes(include_bytes!("fuzz/table-offset-overflow.bin"));
}
