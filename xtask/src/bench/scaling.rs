//! `cargo xtask bench --threads 1,2,4,...`: thread scaling. Cached random 4 KiB reads of
//! one fully allocated image with N requests in flight: `qcow2 bench -d N` runs N worker
//! threads on one shared image, so its throughput per N shows how the engine scales on
//! this machine's cores; qemu-img bench with the same `-d N` runs beside it for reference
//! (its requests are coroutines on one thread).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use super::process;

/// Requests per run at scale 1.
const REQUESTS: u64 = 400_000;
/// Image size at scale 1.
const IMAGE: u64 = 256 << 20;

/// One row of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Requests in flight (our worker threads).
    pub threads: u32,
    /// Our median requests per second.
    pub ours: f64,
    /// qemu-img's median requests per second.
    pub qemu: f64,
}

/// The run time qemu-img bench (and ours) print: "Run completed in X seconds.".
fn run_time(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|r| r.strip_suffix(" seconds."))
        .and_then(|t| t.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the scaling measurement in `work`; returns the rows and a Markdown table.
pub fn run(
    ours: &Path,
    qemu_img: &Path,
    work: &Path,
    threads: &[u32],
    scale: f64,
    runs: usize,
) -> Result<(Vec<Row>, String), String> {
    let size = (((IMAGE as f64 * scale) as u64) / (1 << 20)).max(4) << 20;
    let count = ((REQUESTS as f64 * scale) as u64).max(1000);
    let img = work.join("scaling.qcow2");
    let img_s = img.to_string_lossy().into_owned();
    let size_s = size.to_string();
    process::run_str(
        qemu_img,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            &img_s,
            &size_s,
        ],
    )?;
    // A step of 4 KiB times an odd number visits every block of the power-of-two-sized
    // image once before it repeats: random-looking, and no request merges with another.
    let step = ((4096 * 2_654_435u64 % size / 4096) | 1) * 4096;
    let bench = |program: &Path, first: &[&str], n: u32| -> Result<f64, String> {
        let mut args: Vec<OsString> = first.iter().map(OsString::from).collect();
        for a in [
            "-t",
            "writeback",
            "-d",
            &n.to_string(),
            "-s",
            "4096",
            "-S",
            &step.to_string(),
            "-c",
            &count.to_string(),
            &img_s,
        ] {
            args.push(a.into());
        }
        let out = process::run_checked(program, &args)?;
        run_time(&out).ok_or_else(|| format!("no run time in the output of {}", program.display()))
    };
    // Warm the page cache: every measured read is a cached one.
    bench(ours, &["bench"], 1)?;
    let mut rows = Vec::new();
    for &n in threads {
        let mut o = Vec::new();
        let mut q = Vec::new();
        for _ in 0..runs.max(1) {
            o.push(bench(ours, &["bench"], n)?);
            q.push(bench(qemu_img, &["bench"], n)?);
        }
        let row = Row {
            threads: n,
            ours: count as f64 / median(o).max(1e-9),
            qemu: count as f64 / median(q).max(1e-9),
        };
        eprintln!(
            "   -d {n:<3} ours {:>10.0} req/s   qemu-img {:>10.0} req/s",
            row.ours, row.qemu
        );
        rows.push(row);
    }
    Ok((rows.clone(), table(&rows, count, size)))
}

/// The Markdown table of `rows` (speedups against the first row).
pub fn table(rows: &[Row], count: u64, size: u64) -> String {
    let mut s = format!(
        "Cached random 4 KiB reads, {count} per run, {} MiB fully allocated image, \
         `bench -t writeback -d N`; medians.\n\n\
         | N (threads / requests in flight) | ours req/s | ours speedup | qemu-img req/s | ours / qemu-img throughput |\n\
         | ---: | ---: | ---: | ---: | ---: |\n",
        size >> 20
    );
    let base = rows.first().map(|r| r.ours).unwrap_or(1.0).max(1e-9);
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2}x | {:.0} | {:.2} |",
            r.threads,
            r.ours,
            r.ours / base,
            r.qemu,
            r.ours / r.qemu.max(1e-9)
        );
    }
    s
}

/// Parses `--threads 1,2,4`.
pub fn parse_threads(v: &str) -> Result<Vec<u32>, String> {
    let list: Result<Vec<u32>, _> = v.split(',').map(|t| t.trim().parse::<u32>()).collect();
    match list {
        Ok(l) if !l.is_empty() && l.iter().all(|&n| (1..=1024).contains(&n)) => Ok(l),
        _ => Err(format!(
            "--threads: expected a list of numbers 1..1024 like 1,2,4, got '{v}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thread_lists_and_run_times() {
        assert_eq!(parse_threads("1,2,4").unwrap(), vec![1, 2, 4]);
        assert!(parse_threads("0").is_err());
        assert!(parse_threads("1,,2").is_err());
        assert_eq!(
            run_time("Sending ...\nRun completed in 0.250 seconds.\n"),
            Some(0.25)
        );
        assert_eq!(run_time("nothing"), None);
    }

    #[test]
    fn table_shows_speedup_against_the_first_row() {
        let rows = [
            Row {
                threads: 1,
                ours: 100.0,
                qemu: 50.0,
            },
            Row {
                threads: 2,
                ours: 180.0,
                qemu: 50.0,
            },
        ];
        let t = table(&rows, 1000, 4 << 20);
        assert!(t.contains("| 2 | 180 | 1.80x | 50 | 3.60 |"), "{t}");
    }
}
