//! `cargo xtask bench`: the `qcow2` command against `qemu-img`, side by side.
//!
//! For each workload both programs run the same command line on fresh copies of the same
//! qemu-img-made image, alternately (ours, QEMU, ours, QEMU, ...), after a warm-up pair.
//! The medians, the ratio ours / QEMU with the spread of the per-pair ratios, and the plain
//! file floor go to a table on stdout, a JSON file, a Markdown table and an SVG chart.

mod files;
mod machine;
mod nbd;
mod process;
mod report;
mod scaling;
mod svg;
mod workloads;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use machine::Machine;
use process::Outcome;
use workloads::{Kind, Params, Workload};

const HELP: &str = "\
usage: cargo xtask bench [options]

Builds the qcow2 command (cargo build --release -p qcow2-cli), then times it against
qemu-img workload by workload: the same command line on fresh copies of identical images
made by qemu-img, run alternately (ours, QEMU, ours, QEMU, ...) after a warm-up pair.
Prints a table (medians, ratio ours/QEMU with the min-max of the per-pair ratios, fraction
of the plain-file floor) and writes results.json, results.md and ratios.svg.
A workload whose qcow2 subcommand is not available yet is reported as such, never timed.

options:
  --workloads a,b,c  workloads to run, by name or name prefix (default: all); the floors
                     they are read against are added
  --list             list the workloads and exit
  --size F           multiply every workload's size by F (default 1; --quick: 1/256)
  --pairs N          measured pairs per workload (default 5; --quick: 1)
  --warmup N         warm-up pairs, not recorded (default 1; --quick: 0)
  --quick            smoke run for CI: tiny sizes, 1 pair, no warm-up (under a minute)
  --depth N          queue depth for bench workloads, -d (default 64, qemu-img's)
  --cache MODE       cache mode for bench workloads, -t (default none, i.e. O_DIRECT; falls
                     back to writeback where the filesystem refuses O_DIRECT); with none,
                     the read workload's image is dropped from the page cache before each run
  --timeout SECS     time limit of one run, which is then killed (default 600; --quick 60)
  --out DIR          where results go (default: <workspace>/target/xtask-bench)
  --tmp DIR          parent of the temporary work directory (default: $TMPDIR or /tmp);
                     its filesystem is what is measured
  --no-build         do not run cargo build; use the existing release binary
  --ours PATH        use this qcow2 binary (implies --no-build)
  --qemu-img PATH    use this qemu-img (default: qemu-img on PATH)
  --no-verify        skip the qemu-img check / compare of our outputs
  --threads 1,2,4    thread-scaling mode instead of the workloads: cached random 4 KiB
                     reads of one image with N requests in flight (ours: N worker threads
                     on one shared image), requests/s per N for ours and qemu-img, written
                     to scaling.md; --size scales it, --pairs is the runs per N (default 3)
  -h, --help         print this text
";

/// Parsed command-line options.
#[derive(Debug, Clone)]
struct Options {
    workloads: Option<Vec<String>>,
    list: bool,
    scale: Option<f64>,
    pairs: Option<usize>,
    warmup: Option<usize>,
    quick: bool,
    depth: u32,
    timeout: Option<u64>,
    out: Option<PathBuf>,
    tmp: Option<PathBuf>,
    build: bool,
    ours: Option<PathBuf>,
    qemu_img: String,
    verify: bool,
    cache: Option<String>,
    threads: Option<Vec<u32>>,
}

fn parse_options(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        workloads: None,
        list: false,
        scale: None,
        pairs: None,
        warmup: None,
        quick: false,
        depth: 64,
        timeout: None,
        out: None,
        tmp: None,
        build: true,
        ours: None,
        qemu_img: "qemu-img".to_string(),
        verify: true,
        cache: None,
        threads: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: '{v}' is not a valid number"))
        }
        match flag {
            "-h" | "--help" => return Ok(None),
            "--workloads" | "-w" => {
                o.workloads = Some(
                    value()?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                );
            }
            "--list" => o.list = true,
            "--size" => {
                let v = value()?;
                let f = if let Some((a, b)) = v.split_once('/') {
                    num::<f64>(flag, a.to_string())? / num::<f64>(flag, b.to_string())?
                } else {
                    num(flag, v)?
                };
                if !(f.is_finite() && f > 0.0) {
                    return Err("--size must be a positive factor".to_string());
                }
                o.scale = Some(f);
            }
            "--pairs" => {
                let n: usize = num(flag, value()?)?;
                if n == 0 {
                    return Err("--pairs must be at least 1".to_string());
                }
                o.pairs = Some(n);
            }
            "--warmup" => o.warmup = Some(num(flag, value()?)?),
            "--quick" => o.quick = true,
            "--depth" => {
                o.depth = num(flag, value()?)?;
                if o.depth == 0 {
                    return Err("--depth must be at least 1".to_string());
                }
            }
            "--timeout" => o.timeout = Some(num(flag, value()?)?),
            "--out" => o.out = Some(PathBuf::from(value()?)),
            "--tmp" => o.tmp = Some(PathBuf::from(value()?)),
            "--no-build" => o.build = false,
            "--ours" => {
                o.ours = Some(PathBuf::from(value()?));
                o.build = false;
            }
            "--qemu-img" => o.qemu_img = value()?,
            "--no-verify" => o.verify = false,
            "--cache" | "-t" => {
                let v = value()?;
                if !["none", "writeback", "writethrough", "directsync", "unsafe"]
                    .contains(&v.as_str())
                {
                    return Err(format!("--cache: unknown cache mode '{v}'"));
                }
                o.cache = Some(v);
            }
            "--threads" => o.threads = Some(scaling::parse_threads(&value()?)?),
            other => return Err(format!("unknown option '{other}' (see --help)")),
        }
    }
    Ok(Some(o))
}

/// Which side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Ours,
    Qemu,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Qemu => "qemu",
        }
    }
}

/// How one side of a workload ended up.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Every run succeeded.
    Ok,
    /// Our binary does not offer what the workload needs (yet); never timed.
    NotAvailable(String),
    /// A run failed or timed out; earlier times are kept but not reported as a result.
    Failed(String),
    /// The workload's preparation failed, so nothing ran.
    SetupFailed(String),
}

/// The runs of one program on one workload.
#[derive(Debug, Clone)]
pub struct SideResult {
    /// Final status.
    pub status: Status,
    /// Measured (non-warm-up) run times in seconds, in run order.
    pub times: Vec<f64>,
    /// CPU time (user + system, 10 ms resolution) of each measured run, when known.
    pub cpu: Vec<f64>,
    /// The command line, with IMG/OUT placeholders.
    pub command: String,
}

impl SideResult {
    fn new(command: String) -> SideResult {
        SideResult {
            status: Status::Ok,
            times: Vec::new(),
            cpu: Vec::new(),
            command,
        }
    }

    /// The median time, only if the side completed.
    pub fn median(&self) -> Option<f64> {
        if self.status == Status::Ok {
            crate::util::median(&self.times)
        } else {
            None
        }
    }
}

/// Everything measured for one workload.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// The workload.
    pub workload: Workload,
    /// Our side (pair workloads).
    pub ours: Option<SideResult>,
    /// QEMU's side (pair workloads).
    pub qemu: Option<SideResult>,
    /// The in-process plain-file run (floor workloads).
    pub plain: Option<SideResult>,
    /// Outcome of checking our output with qemu-img (check, compare against QEMU's output).
    pub verification: Option<Result<String, String>>,
    /// Host file sizes of our and QEMU's result files (output, or the modified image) in
    /// the verified pair.
    pub output_bytes: Option<(u64, u64)>,
    /// Remarks worth reading next to the numbers.
    pub notes: Vec<String>,
}

impl WorkloadResult {
    /// Per-pair ratios ours / QEMU, when both sides completed every run.
    pub fn pair_ratios(&self) -> Vec<f64> {
        match (&self.ours, &self.qemu) {
            (Some(o), Some(q))
                if o.status == Status::Ok
                    && q.status == Status::Ok
                    && o.times.len() == q.times.len() =>
            {
                o.times.iter().zip(&q.times).map(|(a, b)| a / b).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Ratio of the medians ours / QEMU.
    pub fn ratio(&self) -> Option<f64> {
        let o = self.ours.as_ref()?.median()?;
        let q = self.qemu.as_ref()?.median()?;
        (q > 0.0).then(|| o / q)
    }
}

/// Removes the work directory when dropped (also on panic).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes work directories left behind by runs that were killed (their process is gone).
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("xtask-bench-") {
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What our binary says it can do: the subcommands listed by `qcow2 --help`, or why none.
#[derive(Debug, Clone)]
struct Capabilities {
    subcommands: BTreeSet<String>,
    problem: Option<String>,
    version: String,
}

impl Capabilities {
    fn probe(ours: &Path) -> Capabilities {
        let version = process::probe(ours, &["--version"])
            .filter(|(_, _, ok)| *ok)
            .map(|(o, _, _)| first_line(&o))
            .unwrap_or_default();
        match process::probe(ours, &["--help"]) {
            None => Capabilities {
                subcommands: BTreeSet::new(),
                problem: Some(format!("cannot run {}", ours.display())),
                version,
            },
            Some((out, err, ok)) => {
                let subcommands = parse_subcommands(&out);
                let problem = if subcommands.is_empty() {
                    let said = first_line(if ok { &out } else { &err });
                    Some(format!("`qcow2 --help` lists no subcommands ({said})"))
                } else {
                    None
                };
                Capabilities {
                    subcommands,
                    problem,
                    version,
                }
            }
        }
    }

    /// `None` if `sub` is available, else why not.
    fn lacks(&self, ours: &Path, sub: &str) -> Option<String> {
        if !self.subcommands.contains(sub) {
            return Some(match &self.problem {
                Some(p) => p.clone(),
                None => format!("`qcow2 --help` does not list `{sub}`"),
            });
        }
        match process::probe(ours, &[sub, "--help"]) {
            Some((_, _, true)) => None,
            Some((out, err, false)) => Some(format!(
                "`qcow2 {sub} --help` fails: {}",
                first_line(if err.trim().is_empty() { &out } else { &err })
            )),
            None => Some(format!("cannot run {}", ours.display())),
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .to_string()
}

/// Subcommand names from clap-style help: the indented first words after `Commands:`.
fn parse_subcommands(help: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut inside = false;
    for line in help.lines() {
        let t = line.trim();
        if t.eq_ignore_ascii_case("commands:") || t.eq_ignore_ascii_case("subcommands:") {
            inside = true;
            continue;
        }
        if inside {
            if t.is_empty() || !line.starts_with(' ') {
                inside = false;
                continue;
            }
            if let Some(word) = t.split_whitespace().next() {
                let word = word.trim_end_matches(',');
                if word != "help" {
                    set.insert(word.to_string());
                }
            }
        }
    }
    set
}

/// Whether a failure message says the feature is missing rather than broken.
fn says_not_available(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "not available",
        "not implemented",
        "not yet",
        "unsupported",
        "not supported",
        "unrecognized subcommand",
        "unexpected argument",
        "unknown argument",
        "unrecognized option",
        "no subcommand",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// Everything a run needs to know about its surroundings.
struct Context {
    ours: PathBuf,
    qemu_img: PathBuf,
    work: PathBuf,
    templates: BTreeMap<String, PathBuf>,
    timeout: Duration,
    verify: bool,
    pairs: usize,
    warmup: usize,
}

impl Context {
    /// The template file for `w`, built on first use.
    fn template(&mut self, w: &Workload) -> Result<Option<PathBuf>, String> {
        let Some(t) = &w.template else {
            return Ok(None);
        };
        let key = t.key();
        if let Some(p) = self.templates.get(&key) {
            return Ok(Some(p.clone()));
        }
        let dir = self.work.join("templates");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(&key);
        eprintln!("   preparing {}", t.describe());
        t.build(&self.qemu_img, &path)?;
        files::sync_fs(&self.work);
        self.templates.insert(key, path.clone());
        Ok(Some(path))
    }
}

/// Puts the companions of `template` into `run_dir`: fresh copies of the ones a run
/// modifies, links to the others.
fn place_companions(
    template: &Path,
    companions: &[(String, String, bool)],
    run_dir: &Path,
) -> Result<(), String> {
    let dir = template.parent().unwrap_or(Path::new("."));
    for (file, name, writable) in companions {
        let src = dir.join(file);
        let dst = run_dir.join(name);
        let _ = std::fs::remove_file(&dst);
        if *writable {
            files::fresh_copy(&src, &dst)?;
        } else {
            std::os::unix::fs::symlink(&src, &dst)
                .map_err(|e| format!("{}: {e}", dst.display()))?;
        }
    }
    Ok(())
}

/// Fingerprint of a shared read-only input, to notice a run that modified it.
fn fingerprint(p: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Runs one pair workload: warm-up and measured pairs, alternating ours and QEMU.
fn run_pair(ctx: &mut Context, w: &Workload, ours_lacks: Option<String>) -> WorkloadResult {
    let (fresh_copy, has_output, evict_input, served) = match &w.kind {
        Kind::Pair {
            fresh_copy,
            output,
            evict_input,
            ..
        } => (*fresh_copy, *output, *evict_input, None),
        // A served workload writes into its export unless it is read-only.
        Kind::Served { args, read_only } => (!*read_only, false, false, Some((args, *read_only))),
        _ => unreachable!("run_pair is only called for pair and served workloads"),
    };
    let mut ours = SideResult::new(w.command_text("qcow2"));
    let mut qemu = SideResult::new(w.command_text("qemu-img"));
    let mut result = WorkloadResult {
        workload: w.clone(),
        ours: None,
        qemu: None,
        plain: None,
        verification: None,
        output_bytes: None,
        notes: Vec::new(),
    };
    if let Some(why) = ours_lacks {
        ours.status = Status::NotAvailable(why);
    }
    let template = match ctx.template(w) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("   setup failed: {e}");
            for s in [&mut ours, &mut qemu] {
                if s.status == Status::Ok {
                    s.status = Status::SetupFailed(e.clone());
                }
            }
            result.ours = Some(ours);
            result.qemu = Some(qemu);
            return result;
        }
    };
    let run_dir = ctx.work.join("run");
    let _ = std::fs::create_dir_all(&run_dir);
    let shared_print = template.as_deref().and_then(fingerprint);
    let total = ctx.warmup + ctx.pairs;
    let mut modified_input = false;
    for pair in 0..total {
        let measured = pair >= ctx.warmup;
        for side in [Side::Ours, Side::Qemu] {
            let (res, program) = match side {
                Side::Ours => (&mut ours, ctx.ours.clone()),
                Side::Qemu => (&mut qemu, ctx.qemu_img.clone()),
            };
            if res.status != Status::Ok {
                continue;
            }
            // Images the input names relatively sit beside it in the run directory.
            if let (Some(t), Some(spec)) = (&template, &w.template) {
                if let Err(e) = place_companions(t, &spec.companions(), &run_dir) {
                    res.status = Status::SetupFailed(e);
                    continue;
                }
            }
            let image = match (&template, fresh_copy) {
                (Some(t), true) => {
                    let copy = run_dir.join(format!("{}.img", side.label()));
                    if let Err(e) = files::fresh_copy(t, &copy) {
                        res.status = Status::SetupFailed(e);
                        continue;
                    }
                    copy
                }
                (Some(t), false) => t.clone(),
                (None, _) => run_dir.join("none"),
            };
            if evict_input {
                if let Err(e) = files::evict_from_page_cache(&image) {
                    res.status = Status::SetupFailed(e);
                    continue;
                }
            }
            let out = run_dir.join(format!("{}.out.qcow2", side.label()));
            let _ = std::fs::remove_file(&out);
            let args = w.command_args(side == Side::Qemu, &image, &out);
            let log = run_dir.join(format!("{}-{}", w.name, side.label()));
            let cpu_before = process::children_cpu_secs();
            let outcome = match served {
                Some((client_args, read_only)) => {
                    let server = match side {
                        Side::Ours => program.clone(),
                        Side::Qemu => PathBuf::from("qemu-nbd"),
                    };
                    nbd::run_served(
                        &server,
                        side == Side::Ours,
                        &ctx.qemu_img,
                        client_args,
                        read_only,
                        &image,
                        &log,
                        ctx.timeout,
                    )
                }
                None => process::run_timed(&program, &args, &log, ctx.timeout),
            };
            let cpu = match (cpu_before, process::children_cpu_secs()) {
                (Some(a), Some(b)) => Some(((b - a) * 100.0).round() / 100.0),
                _ => None,
            };
            let outcome = match outcome {
                Outcome::Ok(secs) if has_output => {
                    // The output's fsync belongs to the timed region: a run ends when its
                    // output is durable (qemu-img convert itself does not flush by default).
                    let t0 = std::time::Instant::now();
                    match files::fsync_path(&out) {
                        Ok(()) => Outcome::Ok(secs + t0.elapsed().as_secs_f64()),
                        Err(e) => Outcome::Failed {
                            status: "exit status: 0".into(),
                            message: format!("no usable output file: {e}"),
                        },
                    }
                }
                o => o,
            };
            match outcome {
                Outcome::Ok(secs) => {
                    if measured {
                        res.times.push(secs);
                        if let Some(c) = cpu {
                            res.cpu.push(c);
                        }
                    }
                    eprintln!(
                        "   {} {:<4} {}{}",
                        if measured { "run   " } else { "warmup" },
                        side.label(),
                        crate::util::fmt_secs(secs),
                        if measured { "" } else { " (not recorded)" }
                    );
                }
                Outcome::Failed { status, message } => {
                    let msg = format!("{status}: {message}");
                    res.status = if side == Side::Ours && says_not_available(&message) {
                        eprintln!("   ours: not available ({message})");
                        Status::NotAvailable(message)
                    } else {
                        eprintln!("   {} FAILED: {msg}", side.label());
                        Status::Failed(msg)
                    };
                }
                Outcome::TimedOut(secs) => {
                    eprintln!("   {} timed out after {secs:.0} s", side.label());
                    res.status = Status::Failed(format!(
                        "timed out after {secs:.0} s (limit {} s)",
                        ctx.timeout.as_secs()
                    ));
                }
                Outcome::SpawnError(e) => {
                    eprintln!("   {} could not run: {e}", side.label());
                    res.status = Status::Failed(e);
                }
            }
            if !fresh_copy && template.as_deref().and_then(fingerprint) != shared_print {
                modified_input = true;
            }
        }
        if pair == ctx.warmup && ctx.verify && ours.status == Status::Ok {
            let target = if has_output {
                Some("out.qcow2")
            } else if fresh_copy {
                Some("img")
            } else {
                None
            };
            if let Some(suffix) = target {
                let o = run_dir.join(format!("ours.{suffix}"));
                let q = (qemu.status == Status::Ok).then(|| run_dir.join(format!("qemu.{suffix}")));
                if let (Ok(a), Some(Ok(b))) =
                    (std::fs::metadata(&o), q.as_ref().map(std::fs::metadata))
                {
                    result.output_bytes = Some((a.len(), b.len()));
                }
                result.verification = Some(verify(&ctx.qemu_img, &o, q.as_deref()));
                if let Some(Err(e)) = &result.verification {
                    eprintln!("   verification of our output FAILED: {e}");
                }
            }
        }
        files::sync_fs(&ctx.work);
    }
    if modified_input {
        result.notes.push(
            "a run changed the shared read-only input (size or mtime); later runs read the changed file"
                .to_string(),
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    result.ours = Some(ours);
    result.qemu = Some(qemu);
    result
}

/// qemu-img check of our output, and qemu-img compare against QEMU's output if there is one.
fn verify(qemu_img: &Path, ours: &Path, qemu: Option<&Path>) -> Result<String, String> {
    let o = ours.to_string_lossy().into_owned();
    process::run_str(qemu_img, &["check", "-q", &o])
        .map_err(|e| format!("qemu-img check of our output: {e}"))?;
    let Some(q) = qemu else {
        return Ok("qemu-img check clean".to_string());
    };
    let q = q.to_string_lossy().into_owned();
    process::run_str(qemu_img, &["compare", "-q", &o, &q])
        .map_err(|e| format!("qemu-img compare with QEMU's output: {e}"))?;
    Ok("qemu-img check clean, same guest content as QEMU's output".to_string())
}

/// Runs one floor workload in-process, as many times as a side of a pair runs.
fn run_floor(ctx: &mut Context, w: &Workload) -> WorkloadResult {
    let mut plain = SideResult::new(w.command_text(""));
    let template = ctx.template(w);
    let run_dir = ctx.work.join("run");
    let _ = std::fs::create_dir_all(&run_dir);
    match template {
        Err(e) => plain.status = Status::SetupFailed(e),
        Ok(template) => {
            for i in 0..(ctx.warmup + ctx.pairs) {
                let r = match (&w.kind, &template) {
                    (Kind::FloorWrite, _) => files::floor_write(&run_dir.join("plain"), w.bytes),
                    (Kind::FloorRead, Some(t)) => files::floor_read(t),
                    _ => Err("floor workload without input".to_string()),
                };
                let _ = std::fs::remove_file(run_dir.join("plain"));
                files::sync_fs(&ctx.work);
                match r {
                    Ok(s) => {
                        if i >= ctx.warmup {
                            plain.times.push(s);
                        }
                        eprintln!("   plain {}", crate::util::fmt_secs(s));
                    }
                    Err(e) => {
                        plain.status = Status::Failed(e);
                        break;
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    WorkloadResult {
        workload: w.clone(),
        ours: None,
        qemu: None,
        plain: Some(plain),
        verification: None,
        output_bytes: None,
        notes: Vec::new(),
    }
}

/// Selects workloads by name or name prefix, adding the floors they refer to.
fn select(all: Vec<Workload>, wanted: Option<&[String]>) -> Result<Vec<Workload>, String> {
    let Some(wanted) = wanted else {
        return Ok(all);
    };
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for want in wanted {
        let hits: Vec<&Workload> = all
            .iter()
            .filter(|w| w.name == want || w.name.starts_with(want.as_str()))
            .collect();
        if hits.is_empty() {
            let known: Vec<&str> = all.iter().map(|w| w.name).collect();
            return Err(format!(
                "no workload named '{want}' (known: {})",
                known.join(", ")
            ));
        }
        for h in hits {
            names.insert(h.name);
            if let Some(f) = h.floor {
                names.insert(f);
            }
        }
    }
    let names: BTreeSet<String> = names.into_iter().map(str::to_string).collect();
    Ok(all.into_iter().filter(|w| names.contains(w.name)).collect())
}

/// Entry point of `cargo xtask bench`.
pub fn main(args: &[String]) -> ExitCode {
    let opts = match parse_options(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("xtask bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> Result<ExitCode, String> {
    let scale = opts
        .scale
        .unwrap_or(if opts.quick { 1.0 / 256.0 } else { 1.0 });
    let pairs = opts.pairs.unwrap_or(if opts.quick { 1 } else { 5 });
    let warmup = opts.warmup.unwrap_or(if opts.quick { 0 } else { 1 });
    let timeout = opts.timeout.unwrap_or(if opts.quick { 60 } else { 600 });

    if opts.list {
        let params = Params {
            scale,
            cache: "none".into(),
            depth: opts.depth,
        };
        for w in workloads::all(&params) {
            println!(
                "{:<16} {}{}",
                w.name,
                w.title,
                w.needs()
                    .map(|n| format!(" [qcow2 {n}]"))
                    .unwrap_or_default()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let qemu_img = process::which(&opts.qemu_img).ok_or_else(|| {
        format!(
            "'{}' not found: install qemu-utils (apt-get install qemu-utils) or pass --qemu-img PATH",
            opts.qemu_img
        )
    })?;
    let qemu_version = process::run_str(&qemu_img, &["--version"])
        .map(|v| first_line(&v))
        .map_err(|e| format!("qemu-img does not run: {e}"))?;

    let root = crate::util::workspace_root();
    let ours = match (&opts.ours, opts.build) {
        (Some(p), _) => p.clone(),
        (None, true) => crate::util::build_ours(&root, true)?,
        (None, false) => crate::util::default_binary(&root, true),
    };
    if !ours.is_file() {
        return Err(format!(
            "our binary {} does not exist (build it, or drop --no-build)",
            ours.display()
        ));
    }
    let ours = ours.canonicalize().unwrap_or(ours);

    let tmp_parent = opts.tmp.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&tmp_parent)
        .map_err(|e| format!("temp dir {}: {e}", tmp_parent.display()))?;
    remove_stale_dirs(&tmp_parent);
    let work = tmp_parent.join(format!("xtask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let _guard = TempDir(work.clone());

    let machine = Machine::probe(&work);
    if let Some(threads) = &opts.threads {
        eprintln!("== machine: {}", machine.one_line());
        let runs = opts.pairs.unwrap_or(3);
        let (_, table) = scaling::run(&ours, &qemu_img, &work, threads, scale, runs)?;
        let out_dir = opts
            .out
            .clone()
            .unwrap_or_else(|| root.join("target").join("xtask-bench"));
        std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let p = out_dir.join("scaling.md");
        let body = format!("Measured on {}.\n\n{table}", machine.one_line());
        std::fs::write(&p, &body).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("{body}");
        eprintln!("== wrote {}", p.display());
        return Ok(ExitCode::SUCCESS);
    }
    let wanted = opts.cache.as_deref().unwrap_or("none");
    let direct = matches!(wanted, "none" | "directsync");
    let cache = if direct && !files::supports_o_direct(&work) {
        "writeback"
    } else {
        wanted
    };
    let params = Params {
        scale,
        cache: cache.to_string(),
        depth: opts.depth,
    };
    let selected = select(workloads::all(&params), opts.workloads.as_deref())?;
    let caps = Capabilities::probe(&ours);
    let (date, time) = crate::util::utc_now();
    let load_start = machine::load_average();
    let git = git_describe(&root);

    eprintln!("== machine: {}", machine.one_line());
    if let Some(l) = load_start.filter(|l| *l > 0.5) {
        eprintln!(
            "   note: load average {l:.2} before starting: other work on the machine will make the timings noisy"
        );
    }
    eprintln!("== qemu-img: {qemu_version}; ours: {}", ours.display());
    eprintln!(
        "== scale {scale}, {pairs} measured pair(s) after {warmup} warm-up pair(s), bench cache mode '{cache}', depth {}",
        opts.depth
    );
    if cache != wanted {
        eprintln!(
            "   (the temp dir's filesystem refuses O_DIRECT, so both sides use -t writeback)"
        );
    }
    if let Some(p) = &caps.problem {
        eprintln!("== ours: {p}");
    } else {
        eprintln!(
            "== ours offers: {}",
            caps.subcommands
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let mut ctx = Context {
        ours: ours.clone(),
        qemu_img: qemu_img.clone(),
        work: work.clone(),
        templates: BTreeMap::new(),
        timeout: Duration::from_secs(timeout.max(1)),
        verify: opts.verify,
        pairs,
        warmup,
    };
    let mut results = Vec::new();
    for w in &selected {
        eprintln!("== {}: {}", w.name, w.title);
        let r = match w.needs() {
            Some(sub) => {
                let lacks = caps.lacks(&ours, sub);
                if let Some(why) = &lacks {
                    eprintln!("   ours: not available ({why})");
                }
                run_pair(&mut ctx, w, lacks)
            }
            None => run_floor(&mut ctx, w),
        };
        results.push(r);
    }

    let command_line = std::iter::once("cargo xtask bench".to_string())
        .chain(args_of(opts))
        .collect::<Vec<_>>()
        .join(" ");
    let meta = report::Meta {
        date,
        time,
        machine,
        qemu_version,
        ours_binary: ours.display().to_string(),
        ours_version: caps.version.clone(),
        git,
        command: command_line,
        scale,
        pairs,
        warmup,
        cache: cache.to_string(),
        depth: opts.depth,
        load: (load_start, machine::load_average()),
    };
    let table = report::markdown(&meta, &results);
    println!("{table}");

    let out_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("xtask-bench"));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let json = report::json(&meta, &results);
    let write = |name: &str, body: &str| -> Result<PathBuf, String> {
        let p = out_dir.join(name);
        std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    let j = write(
        "results.json",
        &serde_json::to_string_pretty(&json).unwrap_or_default(),
    )?;
    let m = write("results.md", &table)?;
    let s = write("ratios.svg", &svg::chart(&meta, &results))?;
    eprintln!("== wrote {}, {}, {}", j.display(), m.display(), s.display());

    let qemu_failures: Vec<&str> = results
        .iter()
        .filter(|r| {
            r.qemu.as_ref().is_some_and(|q| q.status != Status::Ok)
                || r.plain.as_ref().is_some_and(|p| p.status != Status::Ok)
        })
        .map(|r| r.workload.name)
        .collect();
    if qemu_failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "xtask bench: QEMU's side or the floor failed for {} (a harness problem; see above)",
            qemu_failures.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The options as they would be typed again.
fn args_of(o: &Options) -> Vec<String> {
    let mut v = Vec::new();
    if o.quick {
        v.push("--quick".to_string());
    }
    if let Some(w) = &o.workloads {
        v.push(format!("--workloads {}", w.join(",")));
    }
    if let Some(s) = o.scale {
        v.push(format!("--size {s}"));
    }
    if let Some(p) = o.pairs {
        v.push(format!("--pairs {p}"));
    }
    if let Some(p) = o.warmup {
        v.push(format!("--warmup {p}"));
    }
    if o.depth != 64 {
        v.push(format!("--depth {}", o.depth));
    }
    if let Some(t) = o.timeout {
        v.push(format!("--timeout {t}"));
    }
    if !o.verify {
        v.push("--no-verify".to_string());
    }
    if let Some(c) = &o.cache {
        v.push(format!("--cache {c}"));
    }
    v
}

/// `git describe`-like identification of the workspace state.
fn git_describe(root: &Path) -> String {
    let head = process::probe(
        Path::new("git"),
        &[
            "-C",
            &root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .filter(|(_, _, ok)| *ok)
    .map(|(o, _, _)| o.trim().to_string());
    match head {
        Some(h) => {
            let dirty = process::probe(
                Path::new("git"),
                &[
                    "-C",
                    &root.to_string_lossy(),
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ],
            )
            .is_some_and(|(o, _, ok)| ok && !o.trim().is_empty());
            if dirty {
                format!("{h} (with uncommitted changes)")
            } else {
                h
            }
        }
        None => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_help_subcommands() {
        let help = "The qcow2 command\n\nUsage: qcow2 <COMMAND>\n\nCommands:\n  create    Create an image\n  check     Check it\n  help      Print this message\n\nOptions:\n  -h, --help  Print help\n";
        let s = parse_subcommands(help);
        assert_eq!(
            s.into_iter().collect::<Vec<_>>(),
            vec!["check".to_string(), "create".to_string()]
        );
        assert!(parse_subcommands("qcow2: no subcommand is implemented yet").is_empty());
    }

    #[test]
    fn not_available_messages() {
        assert!(says_not_available(
            "qcow2: bench is not available yet in this build"
        ));
        assert!(says_not_available("error: unexpected argument '-S' found"));
        assert!(!says_not_available("qcow2: I/O error at offset 65536"));
    }

    #[test]
    fn options() {
        let o = parse_options(&[
            "--quick".into(),
            "--size=1/4".into(),
            "--workloads".into(),
            "seq,check-500k".into(),
        ])
        .unwrap()
        .unwrap();
        assert!(o.quick);
        assert_eq!(o.scale, Some(0.25));
        assert_eq!(o.workloads.as_deref().map(<[String]>::len), Some(2));
        assert!(parse_options(&["--pairs".into(), "0".into()]).is_err());
        assert!(parse_options(&["--bogus".into()]).is_err());
        assert!(parse_options(&["--help".into()]).unwrap().is_none());
    }

    #[test]
    fn selection_adds_floors() {
        let params = Params {
            scale: 1.0,
            cache: "none".into(),
            depth: 64,
        };
        let sel = select(workloads::all(&params), Some(&["seq-read".to_string()])).unwrap();
        let names: Vec<_> = sel.iter().map(|w| w.name).collect();
        assert_eq!(names, vec!["floor-read", "seq-read-64k"]);
        assert!(select(workloads::all(&params), Some(&["nope".to_string()])).is_err());
    }
}
