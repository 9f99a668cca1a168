//! (d) One NBD client session of arbitrary bytes (handshake, options, requests, payloads)
//! against `qcow2 serve`'s server on an in-memory qcow2 export: never a panic or a hang,
//! and the server always greets and then closes. The CI-sized replay is
//! `qcow2-nbd/tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = qcow2_nbd::fuzzing::session(data);
    assert!(out.starts_with(b"NBDMAGIC"));
});
