//! `cargo xtask crash`: the long crash-state exploration of the `reliability` crate.
//!
//! Seeds are units of work (a workload and seeded state choices, see
//! `reliability::crash::seeded_case`); a run covers `--seed-start S` onwards until
//! `--states N` states were verified (or `--seeds K` seeds ran), so a run is resumed or split
//! by seed range. Reports states, opens, repairs and corruptions; exits 1 on any corruption.

use reliability::crash::{explore, seeded_case, CrashStats};
use std::process::ExitCode;

const HELP: &str = "\
usage: cargo xtask crash [--states N] [--seed-start S] [--seeds K] [--json FILE]

  --states N      stop once N crash states were verified (default 100000)
  --seed-start S  first seed (default 0); resume a run with the next seed it printed
  --seeds K       run at most K seeds
  --json FILE     write the totals as JSON
";

/// Runs the task with the arguments after `crash`.
pub fn main(args: &[String]) -> ExitCode {
    let mut states: u64 = 100_000;
    let mut seed_start: u64 = 0;
    let mut seeds: u64 = u64::MAX;
    let mut json: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Option<u64> {
            let v = it.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("xtask crash: {name} expects a number");
            }
            v
        };
        match a.as_str() {
            "--states" => match num("--states") {
                Some(v) => states = v,
                None => return ExitCode::from(2),
            },
            "--seed-start" => match num("--seed-start") {
                Some(v) => seed_start = v,
                None => return ExitCode::from(2),
            },
            "--seeds" => match num("--seeds") {
                Some(v) => seeds = v,
                None => return ExitCode::from(2),
            },
            "--json" => json = it.next().cloned(),
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("xtask crash: unknown option '{other}'\n{HELP}");
                return ExitCode::from(2);
            }
        }
    }
    let mut total = CrashStats::default();
    let mut seed = seed_start;
    let mut ran = 0;
    while total.states < states && ran < seeds {
        let (w, mut cfg) = seeded_case(seed);
        cfg.max_states = states - total.states;
        let st = explore(&w, &cfg);
        println!("seed {seed:>6} {:<20} {}", w.name, st.summary());
        for f in &st.failures {
            println!("  FAILURE {f}");
        }
        total.merge(&st);
        seed += 1;
        ran += 1;
    }
    println!(
        "crash: seeds {seed_start}..{seed} (resume with --seed-start {seed}): {}",
        total.summary()
    );
    if let Some(path) = json {
        let v = serde_json::json!({
            "seed_start": seed_start,
            "seed_end": seed,
            "states": total.states,
            "torn_states": total.torn_states,
            "boundaries": total.boundaries,
            "opens": total.opens,
            "repairs": total.repairs,
            "leaky": total.leaky,
            "qemu_checks": total.qemu_checks,
            "reopens": total.reopens,
            "corruptions": total.corruptions,
            "failures": total.failures,
        });
        if let Err(e) = std::fs::write(&path, format!("{v:#}\n")) {
            eprintln!("xtask crash: write {path}: {e}");
            return ExitCode::from(1);
        }
    }
    if total.corruptions > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
