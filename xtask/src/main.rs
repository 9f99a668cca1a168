//! Project tasks, run as `cargo xtask <task>` (an alias for
//! `cargo run --package xtask --release --`).
//!
//! - `bench`: side-by-side timings of the `qcow2` command against `qemu-img` on the same
//!   machine, the same images and the same command lines, with the plain-file physical floor
//!   for reference. See `cargo xtask bench --help`.
//! - `iotests`: QEMU's own iotests run by QEMU's `check` against our binary under QEMU's
//!   names. See `cargo xtask iotests --help`.

mod bench;
mod crash;
mod iotests;
mod util;

use std::process::ExitCode;

const HELP: &str = "\
usage: cargo xtask <task> [options]

tasks:
  bench    time the qcow2 command against qemu-img, workload by workload, on fresh copies of
           identical images (alternating runs, medians, ratios), and write a table, a JSON
           file and an SVG chart of the ratios (see `cargo xtask bench --help`)
  crash    explore post-crash images of the reliability workloads at every flush boundary
           (seeded, resumable: see `cargo xtask crash --help`)
  iotests  run QEMU's own iotests (bash, no VM) with QEMU's check script against our binary
           as qemu-img/qemu-io/qemu-nbd, against the list of tests expected to pass
           (see `cargo xtask iotests --help`)
  help     print this text

`cargo xtask` is an alias for `cargo run --package xtask --release --`.
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    match task.as_deref() {
        Some("bench") => bench::main(&rest),
        Some("crash") => crash::main(&rest),
        Some("iotests") => iotests::main(&rest),
        Some("help" | "--help" | "-h") => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some(t) => {
            eprintln!("xtask: unknown task '{t}'\n");
            eprint!("{HELP}");
            ExitCode::from(2)
        }
        None => {
            eprint!("{HELP}");
            ExitCode::from(2)
        }
    }
}
