//! Crash-state exploration: a workload runs on [`CrashStorage`]; before every storage flush
//! (a flush epoch boundary) post-crash images are built from the pending writes (prefixes,
//! seeded random subsets, torn 512-byte sector writes) and each must open (after a repair if
//! lazy refcounts left it dirty), check without corruption, and hold every guest byte that
//! a successful guest flush made durable.

use crate::verify;
use crate::workload::{Model, Step, Workload};
use qcow2_image::{Image, ImageError, OpenOptions};
use qcow2_io::crash::{Checkpoint, CrashStateKind, CrashStorage, Op, SplitMix64};
use qcow2_io::Storage;
use std::sync::{Arc, Mutex};

/// How many crash states to build and how deeply to verify them.
#[derive(Debug, Clone)]
pub struct CrashConfig {
    /// Seed of every random choice (subsets, torn sectors, samples).
    pub seed: u64,
    /// Explore the flush boundaries `k` with `k % flush_stride == flush_phase`.
    pub flush_stride: u64,
    /// See [`CrashConfig::flush_stride`].
    pub flush_phase: u64,
    /// At most this many prefixes per boundary (evenly spaced, both ends included).
    pub max_prefixes: usize,
    /// Random subsets of the pending writes per boundary.
    pub subsets: usize,
    /// Torn writes per boundary (a random multi-sector pending write, random sectors).
    pub torn: usize,
    /// Run `qemu-img check` on every n-th verified state (0: never).
    pub qemu_every: u64,
    /// Reopen read-write, write and re-check every n-th state (0: never).
    pub reopen_every: u64,
    /// Also crash after the last step, without a close.
    pub final_crash: bool,
    /// Stop after this many states (the run reports how far it got).
    pub max_states: u64,
}

impl Default for CrashConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            flush_stride: 1,
            flush_phase: 0,
            max_prefixes: 6,
            subsets: 2,
            torn: 2,
            qemu_every: 0,
            reopen_every: 7,
            final_crash: true,
            max_states: u64::MAX,
        }
    }
}

/// Counters of an exploration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashStats {
    /// Flush boundaries at which states were built.
    pub boundaries: u64,
    /// Post-crash images verified.
    pub states: u64,
    /// Of which torn-write states.
    pub torn_states: u64,
    /// Images that opened and whose data was compared with the model.
    pub opens: u64,
    /// Dirty images (lazy refcounts) that needed a repair.
    pub repairs: u64,
    /// Images with leaked clusters (allowed).
    pub leaky: u64,
    /// `qemu-img check` runs.
    pub qemu_checks: u64,
    /// Read-write reopen + write + check runs.
    pub reopens: u64,
    /// States that failed a verdict (corruption, lost data, open failure).
    pub corruptions: u64,
    /// The first failure messages.
    pub failures: Vec<String>,
}

impl CrashStats {
    /// Adds `other`'s counters (and failure messages, up to a bound).
    pub fn merge(&mut self, other: &CrashStats) {
        self.boundaries += other.boundaries;
        self.states += other.states;
        self.torn_states += other.torn_states;
        self.opens += other.opens;
        self.repairs += other.repairs;
        self.leaky += other.leaky;
        self.qemu_checks += other.qemu_checks;
        self.reopens += other.reopens;
        self.corruptions += other.corruptions;
        for f in &other.failures {
            if self.failures.len() < 20 {
                self.failures.push(f.clone());
            }
        }
    }

    /// One summary line.
    pub fn summary(&self) -> String {
        format!(
            "{} states ({} torn) at {} flush boundaries: {} opened, {} repaired (dirty), {} with leaks, {} qemu-img checks, {} reopened+written, {} corruptions",
            self.states,
            self.torn_states,
            self.boundaries,
            self.opens,
            self.repairs,
            self.leaky,
            self.qemu_checks,
            self.reopens,
            self.corruptions
        )
    }
}

/// Verifies one post-crash image against `model`; counts into `stats`; returns the reason
/// on failure.
fn verify_state(
    image: &[u8],
    model: &Model,
    cfg: &CrashConfig,
    index: u64,
    stats: &mut CrashStats,
) -> Result<(), String> {
    let (image, repaired) = verify::settle(image)?;
    if repaired {
        stats.repairs += 1;
    }
    let report = verify::assert_our_check_clean(&image, false)?;
    if report.result.leaks > 0 {
        stats.leaky += 1;
    }
    if cfg.qemu_every > 0 && index % cfg.qemu_every == 0 && verify::have_qemu_img() {
        stats.qemu_checks += 1;
        verify::qemu_check(&image, false)?;
    }
    verify::verify_data(&image, model, false)?;
    stats.opens += 1;
    if cfg.reopen_every > 0 && index % cfg.reopen_every == 0 {
        stats.reopens += 1;
        verify::reopen_and_write(&image)?;
    }
    Ok(())
}

/// The crash states chosen for one boundary: evenly spaced prefixes, random subsets and
/// random torn writes.
pub fn choose_states(
    cp: &Checkpoint,
    cfg: &CrashConfig,
    rng: &mut SplitMix64,
) -> Vec<CrashStateKind> {
    let pending = cp.pending();
    let n = pending.len();
    let mut kinds = Vec::new();
    let p = cfg.max_prefixes.max(1);
    if n < p {
        kinds.extend((0..=n).map(|applied| CrashStateKind::Prefix { applied }));
    } else {
        // Both ends, and seeded interior prefixes (so different seeds cover different ones).
        let mut chosen = vec![0, n];
        while chosen.len() < p {
            chosen.push(1 + rng.below(n as u64 - 1) as usize);
        }
        chosen.sort_unstable();
        chosen.dedup();
        kinds.extend(
            chosen
                .into_iter()
                .map(|applied| CrashStateKind::Prefix { applied }),
        );
    }
    if n >= 2 {
        for _ in 0..cfg.subsets {
            let applied = (0..n).map(|_| rng.coin()).collect();
            kinds.push(CrashStateKind::Subset { applied });
        }
    }
    let torn: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match &p.op {
            Op::Write { offset, data } if !data.is_empty() => {
                let end = offset + data.len() as u64;
                let pieces = ((end - 1) / 512 - offset / 512 + 1) as usize;
                (pieces >= 2).then_some((i, pieces))
            }
            _ => None,
        })
        .collect();
    if !torn.is_empty() {
        for _ in 0..cfg.torn {
            let (op, pieces) = torn[rng.below(torn.len() as u64) as usize];
            let mut sectors: Vec<bool> = (0..pieces).map(|_| rng.coin()).collect();
            if sectors.iter().all(|&b| b) {
                sectors[rng.below(pieces as u64) as usize] = false;
            } else if sectors.iter().all(|&b| !b) {
                sectors[rng.below(pieces as u64) as usize] = true;
            }
            kinds.push(CrashStateKind::Torn { op, sectors });
        }
    }
    kinds
}

struct Shared {
    model: Model,
    stats: CrashStats,
    rng: SplitMix64,
    flushes: u64,
    armed: bool,
    label: String,
}

fn explore_checkpoint(sh: &mut Shared, cp: &Checkpoint, cfg: &CrashConfig, at: &str) {
    let kinds = choose_states(cp, cfg, &mut sh.rng);
    sh.stats.boundaries += 1;
    for kind in kinds {
        if sh.stats.states >= cfg.max_states {
            return;
        }
        let image = cp.state(&kind, 512);
        let index = sh.stats.states;
        sh.stats.states += 1;
        if matches!(kind, CrashStateKind::Torn { .. }) {
            sh.stats.torn_states += 1;
        }
        let model = &sh.model;
        let mut local = CrashStats::default();
        let r = verify_state(&image, model, cfg, index, &mut local);
        sh.stats.merge(&CrashStats {
            failures: Vec::new(),
            ..local
        });
        if let Err(e) = r {
            sh.stats.corruptions += 1;
            if sh.stats.failures.len() < 20 {
                sh.stats.failures.push(format!(
                    "{} seed {} {at} epoch {} ({} pending) state {kind}: {e}",
                    sh.label,
                    cfg.seed,
                    cp.epoch(),
                    cp.pending().len()
                ));
            }
        }
    }
}

fn lock(sh: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    sh.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `workload` on a [`CrashStorage`] and verifies post-crash images at the chosen flush
/// boundaries (and after the last step, without a close). Operations of the workload must
/// succeed (the storage never fails); an operation error is reported as a failure.
pub fn explore(workload: &Workload, cfg: &CrashConfig) -> CrashStats {
    let storage = Arc::new(CrashStorage::new());
    let cs = workload.create.cluster_size;
    let shared = Arc::new(Mutex::new(Shared {
        model: Model::new(workload.guest_size),
        stats: CrashStats::default(),
        rng: SplitMix64::new(cfg.seed ^ 0xc4a5_4000),
        flushes: 0,
        armed: false,
        label: workload.name.to_string(),
    }));
    let fail = |msg: String| {
        let mut st = lock(&shared).stats.clone();
        st.corruptions += 1;
        st.failures
            .push(format!("{} seed {}: {msg}", workload.name, cfg.seed));
        st
    };
    {
        let shared = shared.clone();
        let cfg = cfg.clone();
        storage.on_flush(move |cp| {
            let mut sh = lock(&shared);
            if !sh.armed {
                return Ok(());
            }
            let k = sh.flushes;
            sh.flushes += 1;
            if k % cfg.flush_stride.max(1) == cfg.flush_phase % cfg.flush_stride.max(1)
                && sh.stats.states < cfg.max_states
            {
                explore_checkpoint(&mut sh, cp, &cfg, &format!("flush #{k}"));
            }
            Ok(())
        });
    }
    let dynst: Arc<dyn Storage> = storage.clone();
    let mut img = match Image::create(dynst.clone(), &workload.create) {
        Ok(i) => i,
        Err(e) => return fail(format!("create: {e}")),
    };
    // Setup, fault-free and unobserved.
    for step in &workload.setup {
        let r = if *step == Step::Reopen {
            img.flush()
        } else {
            step.apply(&mut img)
        };
        if let Err(e) = r {
            return fail(format!("setup {}: {e}", step.kind()));
        }
        let mut sh = lock(&shared);
        sh.model.finish(step, cs, true);
    }
    img = match reopen(img, &dynst) {
        Ok(i) => i,
        Err(e) => return fail(format!("reopen after setup: {e}")),
    };
    {
        let mut sh = lock(&shared);
        sh.model.closed();
        sh.armed = true;
    }
    for (i, step) in workload.steps.iter().enumerate() {
        lock(&shared).model.begin(step, cs);
        let r = if *step == Step::Reopen {
            match img.close() {
                Ok(()) => {
                    lock(&shared).model.closed();
                    match Image::open(dynst.clone(), &OpenOptions::read_write()) {
                        Ok(n) => {
                            img = n;
                            Ok(())
                        }
                        Err(e) => return fail(format!("step {i} reopen: {e}")),
                    }
                }
                Err(e) => return fail(format!("step {i} close: {e}")),
            }
        } else {
            step.apply(&mut img)
        };
        if let Err(e) = r {
            return fail(format!("step {i} {}: {e}", step.kind()));
        }
        lock(&shared).model.finish(step, cs, true);
        if lock(&shared).stats.states >= cfg.max_states {
            break;
        }
    }
    if cfg.final_crash {
        let cp = storage.checkpoint();
        img.abandon();
        let mut sh = lock(&shared);
        explore_checkpoint(&mut sh, &cp, cfg, "final crash");
    } else {
        drop(img);
    }
    storage.clear_hooks();
    let st = lock(&shared).stats.clone();
    st
}

fn reopen(img: Image, storage: &Arc<dyn Storage>) -> Result<Image, ImageError> {
    img.close()?;
    Image::open(storage.clone(), &OpenOptions::read_write())
}

/// The long run's unit of work: the workload and configuration of seed `seed`. Seeds cycle
/// through the fixed workloads and seeded random mixes, with seeded state choices.
pub fn seeded_case(seed: u64) -> (Workload, CrashConfig) {
    let fixed = crate::workload::all();
    let k = fixed.len() as u64 + 2;
    let w = match seed % k {
        i if (i as usize) < fixed.len() => fixed[i as usize].clone(),
        _ => crate::workload::random_mix(seed),
    };
    let cfg = CrashConfig {
        seed,
        flush_stride: 1,
        flush_phase: 0,
        max_prefixes: 8,
        subsets: 4,
        torn: 3,
        qemu_every: 997,
        reopen_every: 13,
        final_crash: true,
        max_states: u64::MAX,
    };
    (w, cfg)
}
