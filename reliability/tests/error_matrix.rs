//! Error-injection matrix: for every workload (allocating writes with L2 allocation, L1
//! growth, refcount-block allocation and refcount-table growth on 512-byte clusters; COW
//! rewrites into allocated, compressed and unallocated clusters; zero writes; discards;
//! compressed writes; iotest 026; lazy refcounts), every engine event the workload reports
//! is injected with EIO and ENOSPC, once and always, at its first occurrence and at one in
//! the middle of the workload. Each case must:
//! - fail the operation with exactly the injected errno (a `once` failure then succeeds on a
//!   retry unless the image is poisoned);
//! - after a failed flush, refuse writes until reopened;
//! - leave an image (copied out of the `FaultStorage`) that opens, shows no corruption under
//!   our checker (all cases) and `qemu-img check` (a deterministic sample), with no leak at
//!   all where iotest 026 expects none (a temporary `write_aio` failure);
//! - read back every byte acknowledged by a successful flush (every acknowledged byte after
//!   a clean close), and accept writes again after a reopen.
//!
//! `check -r all` on damaged images is injected by request number (the checker reports no
//! events): a failed repair must say so, and never leave the image worse than repairable.

use qcow2_check::{check, CheckOptions, RepairMode};
use qcow2_image::{Image, ImageError, OpenOptions};
use qcow2_io::fault::{FaultStorage, IoKind, IoKinds, Rule};
use qcow2_io::{errno, Event, MemStorage};
use reliability::verify;
use reliability::workload::{self, Model, Step, Workload};
use std::collections::BTreeMap;
use std::sync::Arc;

type Fs = Arc<FaultStorage<MemStorage>>;

/// Creates the workload's image on a fault storage and runs its setup, fault-free.
fn prepare(w: &Workload) -> (Fs, Model) {
    let fs: Fs = Arc::new(FaultStorage::new(MemStorage::new()));
    let mut model = Model::new(w.guest_size);
    let mut img = Image::create(fs.clone(), &w.create).expect("create");
    let cs = w.create.cluster_size;
    for step in &w.setup {
        step.apply(&mut img).expect("setup step");
        model.finish(step, cs, true);
    }
    img.close().expect("close after setup");
    model.closed();
    fs.clear_events();
    (fs, model)
}

/// The events the workload's steps report, with their counts (a fault-free dry run).
fn events_of(w: &Workload) -> BTreeMap<Event, u64> {
    let (fs, _) = prepare(w);
    let mut img = Image::open(fs.clone(), &OpenOptions::read_write()).expect("open");
    for step in &w.steps {
        if *step == Step::Reopen {
            img.close().expect("close");
            img = Image::open(fs.clone(), &OpenOptions::read_write()).expect("reopen");
        } else {
            step.apply(&mut img).expect("dry run");
        }
    }
    img.close().expect("close");
    let mut m = BTreeMap::new();
    for e in fs.events() {
        *m.entry(e).or_insert(0) += 1;
    }
    m.remove(&Event::None);
    m
}

#[derive(Debug, Default)]
struct Outcome {
    /// An operation failed with the injected errno.
    failed_as_injected: bool,
    /// The rule fired but no operation failed (allowed when a free failure was reported).
    swallowed: bool,
    /// The image ended poisoned by the failure.
    poisoned: bool,
    /// The rule never fired (the event did not occur again with this skip).
    not_fired: bool,
    qemu_checked: bool,
    repaired_dirty: bool,
}

struct Case<'a> {
    w: &'a Workload,
    event: Event,
    errno: i32,
    once: bool,
    skip: u64,
}

impl Case<'_> {
    fn name(&self) -> String {
        format!(
            "{} {} errno {} once {} skip {}",
            self.w.name, self.event, self.errno, self.once, self.skip
        )
    }

    fn strict(&self) -> bool {
        self.w.strict_write_aio_once && self.event == Event::WriteAio && self.once
    }
}

fn run_case(c: &Case, qemu: bool) -> Result<Outcome, String> {
    let w = c.w;
    let cs = w.create.cluster_size;
    let (fs, mut model) = prepare(w);
    let mut img = Image::open(fs.clone(), &OpenOptions::read_write())
        .map_err(|e| format!("open before injection: {e}"))?;
    let id = fs.add_rule(
        Rule::on_event(c.event, c.errno)
            .once(c.once)
            .skip_events(c.skip),
    );
    let mut out = Outcome::default();
    let check_err = |e: &ImageError, out: &mut Outcome, what: &str| -> Result<(), String> {
        if matches!(e, ImageError::Poisoned { .. }) {
            return Ok(());
        }
        if e.errno() != c.errno {
            return Err(format!(
                "{what} failed with errno {} ({e}), injected {}",
                e.errno(),
                c.errno
            ));
        }
        out.failed_as_injected = true;
        Ok(())
    };
    let mut free_failed = false;
    for (i, step) in w.steps.iter().enumerate() {
        model.begin(step, cs);
        let fired_before = fs.fired(id);
        let r = if *step == Step::Reopen {
            match img.flush() {
                Ok(()) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            step.apply(&mut img)
        };
        free_failed |= img
            .messages()
            .iter()
            .any(|m| m.starts_with("qcow2_free_clusters failed"));
        match r {
            Ok(()) => model.finish(step, cs, true),
            Err(e) => {
                if fs.fired(id) == fired_before && !matches!(e, ImageError::Poisoned { .. }) {
                    return Err(format!(
                        "step {i} {} failed without an injection: {e}",
                        step.kind()
                    ));
                }
                check_err(&e, &mut out, &format!("step {i} {}", step.kind()))?;
                model.finish(step, cs, false);
                if *step == Step::Flush || img.poisoned().is_some() {
                    // Invariant 7: a failed flush (or metadata write) poisons until reopen.
                    if *step == Step::Flush && img.poisoned().is_none() {
                        return Err(format!("step {i}: failed flush did not poison the image"));
                    }
                    match img.write(0, &[0x77]) {
                        Err(ImageError::Poisoned { .. }) => {}
                        other => {
                            return Err(format!(
                                "step {i}: write after a failed flush/metadata write: {other:?}"
                            ))
                        }
                    }
                    out.poisoned = true;
                    break;
                }
                if c.once {
                    // The rule removed itself: the retry succeeds.
                    model.begin(step, cs);
                    step.apply(&mut img).map_err(|e| {
                        format!("step {i} {} retry after a once failure: {e}", step.kind())
                    })?;
                    model.finish(step, cs, true);
                }
            }
        }
    }
    let clean_close = if out.poisoned {
        drop(img);
        false
    } else {
        match img.close() {
            Ok(()) => {
                model.closed();
                true
            }
            Err(e) => {
                if fs.fired(id) == 0 {
                    return Err(format!("close failed without an injection: {e}"));
                }
                check_err(&e, &mut out, "close")?;
                false
            }
        }
    };
    let fired = fs.fired(id);
    fs.clear_rules();
    if fired == 0 {
        out.not_fired = true;
    } else if !out.failed_as_injected {
        let st = fs.stats();
        let failed_writes = st.failed(IoKind::Write)
            + st.failed(IoKind::Flush)
            + st.failed(IoKind::Discard)
            + st.failed(IoKind::WriteZeroes);
        // Swallowed by design: a failure while freeing clusters (they leak, with QEMU's
        // message), or a failed read whose only effect is conservative (the refcount
        // engine keeps quarantined clusters when it cannot re-read their refcounts). The
        // verdicts below still hold the image and the data to account.
        if free_failed || failed_writes == 0 {
            out.swallowed = true;
        } else {
            return Err(format!(
                "the injected error fired {fired} times but no operation failed"
            ));
        }
    }
    // Verdicts on a clean storage holding the bytes.
    let bytes = fs.inner().to_bytes();
    let (bytes, repaired) = verify::settle(&bytes)?;
    out.repaired_dirty = repaired;
    let strict = c.strict() && out.failed_as_injected && !repaired;
    verify::assert_our_check_clean(&bytes, strict).map_err(|e| format!("our checker: {e}"))?;
    if qemu || strict {
        verify::qemu_check(&bytes, strict)?;
        out.qemu_checked = true;
    }
    verify::verify_data(&bytes, &model, clean_close)?;
    verify::reopen_and_write(&bytes)?;
    Ok(out)
}

#[test]
fn error_injection_matrix() {
    let qemu = verify::have_qemu_img();
    let workloads = workload::all();
    let mut cases = 0u64;
    let mut failed_as_injected = 0u64;
    let mut swallowed = 0u64;
    let mut poisoned = 0u64;
    let mut not_fired = 0u64;
    let mut qemu_checks = 0u64;
    let mut repaired = 0u64;
    let mut failures = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for w in &workloads {
        let events = events_of(w);
        for (&event, &count) in &events {
            covered.insert(event);
            let mut skips = vec![0];
            if count >= 3 {
                skips.push(count / 2);
            }
            for &skip in &skips {
                // First occurrence: EIO/ENOSPC x once/always; mid-workload: EIO once and
                // ENOSPC always (CI-sized).
                let combos: &[(i32, bool)] = if skip == 0 {
                    &[
                        (errno::EIO, true),
                        (errno::EIO, false),
                        (errno::ENOSPC, true),
                        (errno::ENOSPC, false),
                    ]
                } else {
                    &[(errno::EIO, true), (errno::ENOSPC, false)]
                };
                {
                    for &(code, once) in combos {
                        let c = Case {
                            w,
                            event,
                            errno: code,
                            once,
                            skip,
                        };
                        // qemu-img check on a deterministic sample (and every strict case).
                        let sample = qemu && cases % 5 == 0;
                        cases += 1;
                        match run_case(&c, sample) {
                            Ok(o) => {
                                failed_as_injected += o.failed_as_injected as u64;
                                swallowed += o.swallowed as u64;
                                poisoned += o.poisoned as u64;
                                not_fired += o.not_fired as u64;
                                qemu_checks += o.qemu_checked as u64;
                                repaired += o.repaired_dirty as u64;
                            }
                            Err(e) => failures.push(format!("{}: {e}", c.name())),
                        }
                    }
                }
            }
        }
    }
    println!(
        "error matrix: {cases} cases, {failed_as_injected} failed as injected, {} corruptions \
         ({swallowed} swallowed by design, {poisoned} poisoned, {not_fired} not reached, \
         {repaired} dirty images repaired, {qemu_checks} qemu-img checks)",
        failures.len()
    );
    println!(
        "events covered: {}",
        covered
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every event the engine reports on the write paths is reached by some workload.
    for e in [
        Event::L1Update,
        Event::L1GrowAllocTable,
        Event::L1GrowWriteTable,
        Event::L1GrowActivateTable,
        Event::L2Load,
        Event::L2Update,
        Event::L2UpdateCompressed,
        Event::L2AllocWrite,
        Event::WriteAio,
        Event::WriteCompressed,
        Event::ReadCompressed,
        Event::CowRead,
        Event::CowWrite,
        Event::RefblockLoad,
        Event::RefblockUpdatePart,
        Event::RefblockAlloc,
        Event::RefblockAllocHookup,
        Event::RefblockAllocWrite,
        Event::RefblockAllocWriteBlocks,
        Event::RefblockAllocWriteTable,
        Event::RefblockAllocSwitchTable,
        Event::ReftableGrow,
        Event::ClusterAlloc,
        Event::ClusterAllocBytes,
        Event::ClusterFree,
        Event::FlushToOs,
        Event::FlushToDisk,
    ] {
        assert!(covered.contains(&e), "no workload reaches event {e}");
    }
    assert!(
        failed_as_injected * 2 > cases,
        "too few injections took effect"
    );
}

/// A 64 KiB-cluster image with four data clusters, damaged: `refcounts` zeroes the refcount
/// of the first data cluster (corruption) and doubles the second (leak); `reftable` clears
/// the first refcount-table entry (the refcount structure must be rebuilt).
fn damaged_image(kind: &str) -> (Vec<u8>, Model) {
    let s = Arc::new(MemStorage::new());
    let w = workload::Workload {
        name: "damaged",
        create: qcow2_image::CreateOptions::new(8 << 20),
        guest_size: 8 << 20,
        setup: vec![],
        steps: vec![],
        strict_write_aio_once: false,
    };
    let mut model = Model::new(w.guest_size);
    let mut img = Image::create(s.clone(), &w.create).expect("create");
    let step = Step::Write {
        off: 0,
        len: 4 << 16,
        seed: 5,
    };
    step.apply(&mut img).expect("write");
    model.finish(&step, 65536, true);
    img.close().expect("close");
    model.closed();
    let mut b = s.to_bytes();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let reftable = be64(&b, 48) as usize;
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data0 = (be64(&b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    match kind {
        "refcounts" => {
            let rb = be64(&b, reftable) as usize;
            let c = data0 >> 16;
            b[rb + 2 * c..rb + 2 * c + 2].copy_from_slice(&0u16.to_be_bytes());
            b[rb + 2 * c + 2..rb + 2 * c + 4].copy_from_slice(&2u16.to_be_bytes());
        }
        _ => b[reftable..reftable + 8].fill(0),
    }
    (b, model)
}

#[test]
fn failing_repair_is_reported_and_stays_repairable() {
    let mut cases = 0;
    let mut failed_as_injected = 0;
    let mut failures = Vec::new();
    for kind in ["refcounts", "reftable"] {
        let (image, model) = damaged_image(kind);
        let (before, _) = verify::our_check(&image, None).expect("check");
        assert!(before.result.corruptions > 0, "{kind}: damage not seen");
        // Fault-free repair: how many write and flush requests it makes.
        let dry = Arc::new(FaultStorage::new(MemStorage::from_bytes(image.clone())));
        let rep = check(
            dry.clone(),
            &CheckOptions {
                repair: Some(RepairMode::All),
            },
        )
        .expect("repair");
        assert_eq!(
            rep.result.corruptions, 0,
            "{kind}: fault-free repair failed"
        );
        let st = dry.stats();
        let requests = st.requests(IoKind::Write) + st.requests(IoKind::Flush);
        assert!(requests > 0);
        let step = (requests / 10).max(1);
        let mut n = 1;
        while n <= requests {
            for (code, once) in [(errno::EIO, true), (errno::ENOSPC, false)] {
                cases += 1;
                let what = format!(
                    "check -r all on {kind} image, request {n}/{requests} errno {code} once {once}"
                );
                let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(image.clone())));
                let id = fs.add_rule(
                    Rule::on_request(n, code)
                        .kinds(IoKinds::WRITE | IoKinds::FLUSH)
                        .once(once),
                );
                let r = check(
                    fs.clone(),
                    &CheckOptions {
                        repair: Some(RepairMode::All),
                    },
                );
                let fired = fs.fired(id) > 0;
                fs.clear_rules();
                let bytes = fs.inner().to_bytes();
                let reported_failure = match &r {
                    Err(_) => true,
                    Ok(rep) => {
                        rep.failure.is_some()
                            || rep.result.check_errors > 0
                            || rep.result.corruptions > 0
                    }
                };
                if fired && reported_failure {
                    failed_as_injected += 1;
                } else if fired {
                    let st = fs.stats();
                    println!(
                        "{what}: injected failure not reported (failed writes {}, flushes {})",
                        st.failed(IoKind::Write),
                        st.failed(IoKind::Flush)
                    );
                }
                // An honest report: a repair that reports a clean image left a clean image.
                if let Ok(rep) = &r {
                    if rep.failure.is_none()
                        && rep.result.corruptions == 0
                        && rep.result.check_errors == 0
                    {
                        // Leaks count too: the report says what a fresh check will find.
                        if let Err(e) =
                            verify::assert_our_check_clean(&bytes, rep.result.leaks == 0)
                        {
                            failures.push(format!(
                                "{what}: repair reported success, image is not: {e}"
                            ));
                            continue;
                        }
                    }
                }
                // A fault-free repair afterwards fixes everything, the data is intact and
                // the image accepts writes again.
                let res =
                    verify::our_check(&bytes, Some(RepairMode::All)).and_then(|(rep, fixed)| {
                        if rep.result.corruptions > 0 || rep.failure.is_some() {
                            return Err(format!("second repair left: {}", verify::describe(&rep)));
                        }
                        verify::assert_our_check_clean(&fixed, false)?;
                        verify::verify_data(&fixed, &model, true)?;
                        verify::reopen_and_write(&fixed)?;
                        Ok(())
                    });
                if let Err(e) = res {
                    failures.push(format!("{what}: {e}"));
                }
            }
            n += step;
        }
    }
    println!("repair error matrix: {cases} cases, {failed_as_injected} failed as injected, {} corruptions", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        failed_as_injected > 0,
        "no injected failure reached the repair's report"
    );
}
