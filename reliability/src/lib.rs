//! Reliability harness of the qcow2 engine, shared by the tests of this crate and by
//! `cargo xtask crash`:
//!
//! - [`workload`]: deterministic guest workloads that reach every engine event (allocation,
//!   L1 and refcount-table growth, copy-on-write, zero writes, discards, compressed writes,
//!   lazy refcounts), and the [`workload::Model`] of which guest bytes must survive;
//! - [`verify`]: verdicts (our checker, `qemu-img check`, guest data against the model);
//! - [`crash`]: post-crash state exploration on `CrashStorage` at every flush boundary.

pub mod crash;
pub mod verify;
pub mod workload;
