//! `cargo xtask iotests`: QEMU's own iotests (the bash tests that need no virtual machine)
//! run by QEMU's own `check` script against our `qcow2` binary under QEMU's names.
//!
//! The suite comes from Debian's source package of the installed qemu-utils release
//! ([`fetch`]). Our binary is laid out as `qemu-img`, `qemu-io` and `qemu-nbd` (symlinks: the
//! binary picks its personality from `argv[0]`), `check` is pointed at them through
//! `QEMU_IMG_PROG`/`QEMU_IO_PROG`/`QEMU_NBD_PROG`, and the results are compared with the list
//! of tests expected to pass kept in `xtask/iotests/expected-pass.txt`. `--reference` runs the
//! same tests with QEMU's installed binaries: the baseline.

mod fetch;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

const HELP: &str = "\
usage: cargo xtask iotests [options] [TEST...]

Runs QEMU's iotests (tests/qemu-iotests of the installed qemu-utils release, from Debian's
source package, downloaded once with apt into $QCOW2_IOTESTS_CACHE, $XDG_CACHE_HOME/
qcow2-iotests or ~/.cache/qcow2-iotests) with QEMU's own `check -qcow2 -file`, on the bash
tests that need no virtual machine, with our qcow2 binary as qemu-img, qemu-io and qemu-nbd.
Prints pass / fail / not run per test and the totals, and fails when a test listed in
xtask/iotests/expected-pass.txt does not pass.

options:
  --reference     run QEMU's installed qemu-img/qemu-io/qemu-nbd instead (the baseline);
                  never fails on the expected list, reports the difference from it
  --debug         use the debug build of qcow2 (default: release)
  --no-build      do not run cargo build; use the existing binary
  -j N            tests run in parallel (default: the number of CPUs)
  --list          print the selected tests and exit
  --only-expected run only the tests in the expected list
  -h, --help      this text

TEST...           run only these tests (names as in QEMU's tree: 001, qemu-img-bitmaps)

Failures leave the test's output and a diff in <target>/iotests/ours (or reference)/NAME.diff.
";

/// The list of tests expected to pass with our binary, relative to the workspace root.
const EXPECTED: &str = "xtask/iotests/expected-pass.txt";

/// Text in a test script that shows it needs QEMU's system emulator or storage daemon,
/// neither of which is installed (or emulated) here.
const VM_MARKERS: &[&str] = &[
    "common.qemu",
    "_launch_qemu",
    "_send_qemu_cmd",
    "run_qemu",
    "QEMU_PROG",
    "$QEMU ",
    "${QEMU}",
    "_require_devices",
    "QSD",
];

#[derive(Debug, Default)]
struct Options {
    reference: bool,
    release: bool,
    build: bool,
    jobs: Option<usize>,
    list: bool,
    only_expected: bool,
    tests: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        release: true,
        build: true,
        ..Options::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--reference" => o.reference = true,
            "--debug" => o.release = false,
            "--no-build" => o.build = false,
            "--list" => o.list = true,
            "--only-expected" => o.only_expected = true,
            "-j" => {
                let v = it.next().ok_or("-j needs a number")?;
                let n: usize = v.parse().map_err(|_| format!("-j: bad number '{v}'"))?;
                o.jobs = Some(n.max(1));
            }
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s => o.tests.push(s.to_string()),
        }
    }
    Ok(Some(o))
}

/// Entry point of `cargo xtask iotests`.
pub fn main(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("xtask iotests: {e}\n");
            eprint!("{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask iotests: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A test's outcome as `check` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    NotRun,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::NotRun => "not run",
        }
    }
}

fn run(opts: &Options) -> Result<bool, String> {
    let root = crate::util::workspace_root();
    let expected = read_expected(&root.join(EXPECTED))?;
    let cache = fetch::cache_dir()?;
    let suite = fetch::obtain(&cache)?;
    let candidates = select_tests(&suite.iotests)?;

    let tests: Vec<String> = if !opts.tests.is_empty() {
        for t in &opts.tests {
            if !candidates.contains(t) {
                return Err(format!(
                    "'{t}' is not one of the selected tests (bash, no VM); see --list"
                ));
            }
        }
        opts.tests.clone()
    } else if opts.only_expected {
        expected.keys().cloned().collect()
    } else {
        candidates.iter().cloned().collect()
    };
    for t in expected.keys() {
        if !candidates.contains(t) {
            return Err(format!(
                "{EXPECTED} lists '{t}', which is not a selected test of QEMU {}",
                suite.version
            ));
        }
    }
    if opts.list {
        for t in &tests {
            println!("{t}");
        }
        return Ok(true);
    }

    let label = if opts.reference { "reference" } else { "ours" };
    let run_dir = run_dir(&root, label)?;
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .map_err(|e| format!("cannot clean {}: {e}", run_dir.display()))?;
    }
    let bin = run_dir.join("bin");
    fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    let programs = if opts.reference {
        reference_programs()?
    } else {
        let exe = if opts.build {
            crate::util::build_ours(&root, opts.release)?
        } else {
            crate::util::default_binary(&root, opts.release)
        };
        if !exe.is_file() {
            return Err(format!(
                "{} does not exist (build it or drop --no-build)",
                exe.display()
            ));
        }
        [exe.clone(), exe.clone(), exe]
    };
    let progs = layout(&bin, &programs)?;

    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "== QEMU {} iotests: check -qcow2 -file, {} tests, -j {jobs}, {label} ({})",
        suite.version,
        tests.len(),
        progs.img.display()
    );
    let started = Instant::now();
    let results = run_check(&suite.iotests, &run_dir, &progs, jobs, &tests)?;
    let elapsed = started.elapsed().as_secs_f64();

    // Keep a diff per failed test beside the run, for reading after CI.
    for (name, r) in &results {
        if r.status == Status::Fail {
            write_diff(&suite.iotests, &run_dir, name);
        }
    }
    Ok(report(
        opts.reference,
        &tests,
        &results,
        &expected,
        &run_dir,
        elapsed,
    ))
}

/// Where a run's programs, scratch files and diffs go: `<target>/iotests/<label>`. Some tests
/// refuse to run in a directory whose path has characters other than letters, digits, `-`,
/// `_` and `/` (197 and 215 test names with such characters and want a clean base), so a
/// target path with a dot (or worse) falls back to `/tmp/qcow2-iotests-<uid>/<label>`.
fn run_dir(root: &Path, label: &str) -> Result<PathBuf, String> {
    let target = crate::util::default_binary(root, true)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"));
    let clean = |p: &Path| {
        p.to_str().is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/'))
        })
    };
    let dir = target.join("iotests").join(label);
    if clean(&dir) {
        return Ok(dir);
    }
    let user = std::env::var("USER").unwrap_or_default();
    let user: String = user.chars().filter(char::is_ascii_alphanumeric).collect();
    let dir = PathBuf::from(format!("/tmp/qcow2-iotests-{user}")).join(label);
    if clean(&dir) {
        Ok(dir)
    } else {
        Err(format!(
            "no run directory without special characters ({})",
            dir.display()
        ))
    }
}

/// The tests expected to pass: one name per line, `#` starts a comment.
fn read_expected(path: &Path) -> Result<BTreeMap<String, ()>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(parse_expected(&text).into_iter().map(|t| (t, ())).collect())
}

fn parse_expected(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split('#').next())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// QEMU's bash tests that need no virtual machine: numbered tests and named ones under
/// `tests/`, whose script is bash and shows none of [`VM_MARKERS`].
fn select_tests(iotests: &Path) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for dir in [iotests.to_path_buf(), iotests.join("tests")] {
        let rd = fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let numbered = name.len() == 3 && name.bytes().all(|b| b.is_ascii_digit());
            if dir == iotests && !numbered {
                continue;
            }
            if name.contains('.') || !e.path().is_file() {
                continue;
            }
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            if is_vmless_bash(&text) {
                out.insert(name);
            }
        }
    }
    Ok(out)
}

fn is_vmless_bash(script: &str) -> bool {
    let first = script.lines().next().unwrap_or("");
    first.starts_with("#!")
        && first.contains("bash")
        && !VM_MARKERS.iter().any(|m| script.contains(m))
}

/// QEMU's own qemu-img, qemu-io and qemu-nbd, found on PATH.
fn reference_programs() -> Result<[PathBuf; 3], String> {
    let find = |name: &str| -> Result<PathBuf, String> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{name} not found on PATH (apt-get install qemu-utils)"))
    };
    Ok([find("qemu-img")?, find("qemu-io")?, find("qemu-nbd")?])
}

/// The programs `check` is pointed at.
struct Programs {
    img: PathBuf,
    io: PathBuf,
    nbd: PathBuf,
    system: PathBuf,
    storage_daemon: PathBuf,
}

/// Lays out `programs` (qemu-img, qemu-io, qemu-nbd) in `bin` under QEMU's names, and the
/// stand-ins for the system emulator and storage daemon that `check` insists exist.
fn layout(bin: &Path, programs: &[PathBuf; 3]) -> Result<Programs, String> {
    let names = ["qemu-img", "qemu-io", "qemu-nbd"];
    for (name, target) in names.iter().zip(programs) {
        let link = bin.join(name);
        std::os::unix::fs::symlink(target, &link).map_err(|e| {
            format!(
                "cannot link {} -> {}: {e}",
                link.display(),
                target.display()
            )
        })?;
    }
    // `check` requires QEMU_PROG and QSD_PROG to be executables and asks QEMU_PROG for its
    // machine list. None is installed: these answer the machine query with an empty list
    // and refuse everything else, so a test that would start one fails loudly.
    let stand_in = |name: &str| -> Result<PathBuf, String> {
        let p = bin.join(name);
        let script = format!(
            "#!/bin/sh\n# Stand-in written by cargo xtask iotests: {name} is not installed.\nif [ \"$1\" = \"-machine\" ] && [ \"$2\" = \"help\" ]; then exit 0; fi\necho \"{name}: not installed (stand-in of cargo xtask iotests)\" >&2\nexit 1\n"
        );
        fs::write(&p, script).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", p.display()))?;
        Ok(p)
    };
    Ok(Programs {
        img: bin.join("qemu-img"),
        io: bin.join("qemu-io"),
        nbd: bin.join("qemu-nbd"),
        system: stand_in(&format!("qemu-system-{}", std::env::consts::ARCH))?,
        storage_daemon: stand_in("qemu-storage-daemon")?,
    })
}

/// One test's result.
#[derive(Debug, Clone)]
struct TestResult {
    status: Status,
    /// Why it did not run (QEMU's `.notrun` text).
    reason: Option<String>,
}

/// Runs `check -tap -j JOBS -qcow2 -file TESTS`, printing each result as it arrives.
fn run_check(
    iotests: &Path,
    run_dir: &Path,
    progs: &Programs,
    jobs: usize,
    tests: &[String],
) -> Result<BTreeMap<String, TestResult>, String> {
    let scratch = run_dir.join("scratch");
    let sock = run_dir.join("sock");
    let mut child = Command::new(iotests.join("check"))
        .current_dir(iotests)
        .env("QEMU_PROG", &progs.system)
        .env("QSD_PROG", &progs.storage_daemon)
        .env("QEMU_IMG_PROG", &progs.img)
        .env("QEMU_IO_PROG", &progs.io)
        .env("QEMU_NBD_PROG", &progs.nbd)
        .env("TEST_DIR", &scratch)
        .env("SOCK_DIR", &sock)
        .args(["-tap", "-j", &jobs.to_string(), "-qcow2", "-file"])
        .args(tests)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}/check: {e}", iotests.display()))?;
    let stderr = child.stderr.take();
    // check prints the diffs of failures on stderr; keep them out of our summary but on
    // disk (they are also rebuilt per test by write_diff).
    let err_log = run_dir.join("check.stderr");
    let err_thread = stderr.map(|s| {
        let path = err_log.clone();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = std::io::Read::read_to_end(&mut BufReader::new(s), &mut text);
            let _ = fs::write(path, text);
        })
    });
    let mut results = BTreeMap::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some((name, status)) = parse_tap(&line) {
                let reason = (status == Status::NotRun)
                    .then(|| not_run_reason(&scratch, &name))
                    .flatten();
                eprintln!(
                    "  {:<8} {name}{}",
                    status.word(),
                    reason
                        .as_deref()
                        .map(|r| format!("  ({r})"))
                        .unwrap_or_default()
                );
                results.insert(name, TestResult { status, reason });
            }
        }
    }
    let status = child.wait().map_err(|e| format!("check: {e}"))?;
    if let Some(t) = err_thread {
        let _ = t.join();
    }
    if results.is_empty() {
        return Err(format!(
            "check reported no results ({status}); see {}",
            err_log.display()
        ));
    }
    Ok(results)
}

/// `ok qcow2 NAME`, `ok qcow2 NAME # SKIP`, `not ok qcow2 NAME`.
fn parse_tap(line: &str) -> Option<(String, Status)> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("not ok ") {
        (false, r)
    } else {
        (true, line.strip_prefix("ok ")?)
    };
    let mut words = rest.split_whitespace();
    let _fmt = words.next()?;
    let name = words.next()?.to_string();
    let skipped = rest.contains("# SKIP");
    let status = match (ok, skipped) {
        (false, _) => Status::Fail,
        (true, true) => Status::NotRun,
        (true, false) => Status::Pass,
    };
    Some((name, status))
}

/// Where check keeps a test's files: `TEST_DIR/qcow2-file-NAME`.
fn test_dir(scratch: &Path, name: &str) -> PathBuf {
    scratch.join(format!("qcow2-file-{name}"))
}

fn not_run_reason(scratch: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(test_dir(scratch, name).join(format!("{name}.notrun"))).ok()?;
    Some(text.trim().to_string())
}

/// `diff -u` of the reference output and the test's output, into `RUN/NAME.diff`.
fn write_diff(iotests: &Path, run_dir: &Path, name: &str) {
    // check's choice of reference output: a format-specific one first.
    let reference = [iotests.to_path_buf(), iotests.join("tests")]
        .into_iter()
        .flat_map(|d| {
            [
                d.join(format!("{name}.out.qcow2")),
                d.join(format!("{name}.out")),
            ]
        })
        .find(|p| p.is_file());
    let bad = test_dir(&run_dir.join("scratch"), name).join(format!("{name}.out.bad"));
    let Some(reference) = reference else { return };
    if let Ok(out) = Command::new("diff")
        .arg("-u")
        .arg(&reference)
        .arg(&bad)
        .output()
    {
        let _ = fs::write(run_dir.join(format!("{name}.diff")), out.stdout);
    }
}

/// Prints the table and the totals; returns whether every expected test passed (always
/// true for the reference run, which is a baseline, not a gate).
fn report(
    reference: bool,
    tests: &[String],
    results: &BTreeMap<String, TestResult>,
    expected: &BTreeMap<String, ()>,
    run_dir: &Path,
    elapsed: f64,
) -> bool {
    let mut counts = [0usize; 3];
    let mut regressions = Vec::new();
    let mut newly = Vec::new();
    println!("\n{:<26} {:<8} in {EXPECTED}", "test", "result");
    for t in tests {
        let (status, reason) = match results.get(t) {
            Some(r) => (r.status, r.reason.clone()),
            None => (Status::NotRun, Some("no result from check".to_string())),
        };
        counts[status as usize] += 1;
        let listed = expected.contains_key(t);
        let note = match (status, listed) {
            (Status::Pass, false) => {
                newly.push(t.clone());
                "not listed: add it".to_string()
            }
            (Status::Pass, true) => "listed".to_string(),
            (_, true) => {
                regressions.push(t.clone());
                "listed  <-- EXPECTED TO PASS".to_string()
            }
            (_, false) => "-".to_string(),
        };
        let why = match (status, reason) {
            (Status::NotRun, Some(r)) => format!("  ({r})"),
            _ => String::new(),
        };
        println!("{t:<26} {:<8} {note}{why}", status.word());
    }
    println!(
        "\ntotal {}: {} pass, {} fail, {} not run ({:.0} s); expected list: {} tests",
        tests.len(),
        counts[Status::Pass as usize],
        counts[Status::Fail as usize],
        counts[Status::NotRun as usize],
        elapsed,
        expected.len()
    );
    if counts[Status::Fail as usize] > 0 {
        println!("diffs of the failures: {}/NAME.diff", run_dir.display());
    }
    if !newly.is_empty() {
        println!("passing but not in {EXPECTED}: {}", newly.join(" "));
    }
    if reference {
        if !regressions.is_empty() {
            println!(
                "listed tests that QEMU itself does not pass: {}",
                regressions.join(" ")
            );
        }
        return true;
    }
    if regressions.is_empty() {
        println!("every listed test that ran passed");
        true
    } else {
        println!(
            "FAILED: listed tests that did not pass: {}",
            regressions.join(" ")
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_lines() {
        assert_eq!(
            parse_tap("ok qcow2 001"),
            Some(("001".into(), Status::Pass))
        );
        assert_eq!(
            parse_tap("not ok qcow2 049"),
            Some(("049".into(), Status::Fail))
        );
        assert_eq!(
            parse_tap("ok qcow2 parallels-checks # SKIP"),
            Some(("parallels-checks".into(), Status::NotRun))
        );
        assert_eq!(parse_tap("# running qcow2 001"), None);
        assert_eq!(parse_tap("TAP version 13"), None);
    }

    #[test]
    fn vm_tests_are_left_out() {
        assert!(is_vmless_bash(
            "#!/usr/bin/env bash\n$QEMU_IO -c 'read 0 1' x\n"
        ));
        assert!(!is_vmless_bash("#!/usr/bin/env python3\nimport iotests\n"));
        assert!(!is_vmless_bash("#!/usr/bin/env bash\n. ./common.qemu\n"));
        assert!(!is_vmless_bash(
            "#!/usr/bin/env bash\n$QSD --chardev stdio\n"
        ));
        assert!(!is_vmless_bash(
            "#!/usr/bin/env bash\nrun_qemu <<EOF\nEOF\n"
        ));
    }

    #[test]
    fn expected_list_comments() {
        assert_eq!(
            parse_expected("# header\n001\n002  # why\n\n  tests-x \n"),
            vec!["001", "002", "tests-x"]
        );
    }
}
