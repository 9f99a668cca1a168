//! The results as a Markdown table and as JSON.

use serde_json::{json, Value};

use super::machine::Machine;
use super::workloads::Kind;
use super::{SideResult, Status, WorkloadResult};
use crate::util::{fmt_bytes, fmt_rate, fmt_ratio, fmt_secs, min_max};

/// How and where a benchmark ran.
#[derive(Debug, Clone)]
pub struct Meta {
    /// UTC date, YYYY-MM-DD.
    pub date: String,
    /// UTC time, HH:MM.
    pub time: String,
    /// The machine.
    pub machine: Machine,
    /// `qemu-img --version`, first line.
    pub qemu_version: String,
    /// Path of our binary.
    pub ours_binary: String,
    /// `qcow2 --version`, if it answers.
    pub ours_version: String,
    /// Git revision of the workspace.
    pub git: String,
    /// The command line that produced these results.
    pub command: String,
    /// Size multiplier.
    pub scale: f64,
    /// Measured pairs per workload.
    pub pairs: usize,
    /// Warm-up pairs per workload.
    pub warmup: usize,
    /// Cache mode of bench workloads.
    pub cache: String,
    /// Queue depth of bench workloads.
    pub depth: u32,
    /// 1-minute load average when the benchmark started and when it ended (other work on
    /// the machine makes the numbers noisier).
    pub load: (Option<f64>, Option<f64>),
}

/// Throughput of `bytes` moved in `secs`.
fn rate(bytes: u64, secs: f64) -> Option<f64> {
    (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs)
}

/// The floor's throughput for a workload, if it has a floor that completed.
fn floor_rate(all: &[WorkloadResult], r: &WorkloadResult) -> Option<f64> {
    let name = r.workload.floor?;
    let f = all.iter().find(|x| x.workload.name == name)?;
    rate(f.workload.bytes, f.plain.as_ref()?.median()?)
}

/// Fraction of the floor's throughput that `side` reached.
fn of_floor(all: &[WorkloadResult], r: &WorkloadResult, side: Option<&SideResult>) -> Option<f64> {
    let fr = floor_rate(all, r)?;
    let sr = rate(r.workload.bytes, side?.median()?)?;
    Some(sr / fr)
}

/// A table cell for one side, and a footnote if it did not complete.
fn cell(side: Option<&SideResult>, bytes: u64, notes: &mut Vec<String>, who: &str) -> String {
    let Some(s) = side else {
        return "—".to_string();
    };
    let mut note = |label: &str, why: &str| {
        notes.push(format!("{who}: {why}"));
        format!("{label} [{}]", notes.len())
    };
    match &s.status {
        Status::Ok => match s.median() {
            Some(m) => match rate(bytes, m) {
                Some(r) => format!("{} ({})", fmt_secs(m), fmt_rate(r)),
                None => fmt_secs(m),
            },
            None => "—".to_string(),
        },
        Status::NotAvailable(why) => note("not available", why),
        Status::Failed(why) => note("failed", why),
        Status::SetupFailed(why) => note("setup failed", why),
    }
}

/// The results as Markdown: a header naming machine, date and command, the table, and
/// footnotes.
pub fn markdown(meta: &Meta, results: &[WorkloadResult]) -> String {
    let mut out = String::new();
    let mut notes: Vec<String> = Vec::new();
    let load = |l: Option<f64>| l.map_or("?".to_string(), |x| format!("{x:.2}"));
    out.push_str(&format!(
        "Measured {} {} UTC on {}; 1-minute load average {} at the start, {} at the end.\n\n",
        meta.date,
        meta.time,
        meta.machine.one_line(),
        load(meta.load.0),
        load(meta.load.1)
    ));
    out.push_str(&format!(
        "`{}` — {}; ours: `qcow2` at {}{}. Each workload: {} measured pair(s) after {} warm-up pair(s), runs alternating ours, QEMU; bench cache mode `-t {}`, depth `-d {}`. Times are medians; the ratio is ours / QEMU of the medians (below 1: ours is faster), with the min–max of the per-pair ratios; \"of floor\" is the throughput as a fraction of the plain-file floor's.\n\n",
        meta.command,
        meta.qemu_version,
        meta.git,
        if meta.ours_version.is_empty() { String::new() } else { format!(" ({})", meta.ours_version) },
        meta.pairs,
        meta.warmup,
        meta.cache,
        meta.depth
    ));
    out.push_str("| workload | ours | QEMU | ours / QEMU (min–max) | of floor: ours / QEMU |\n");
    out.push_str("| --- | ---: | ---: | :---: | :---: |\n");
    for r in results {
        let w = &r.workload;
        let name = format!("`{}` {}", w.name, w.title);
        if let Some(p) = &r.plain {
            let c = cell(Some(p), w.bytes, &mut notes, w.name);
            out.push_str(&format!("| {name} | {c} | — | — | (floor) |\n"));
            for n in &r.notes {
                notes.push(format!("{}: {n}", w.name));
            }
            continue;
        }
        let ours = cell(
            r.ours.as_ref(),
            w.bytes,
            &mut notes,
            &format!("{} ours", w.name),
        );
        let qemu = cell(
            r.qemu.as_ref(),
            w.bytes,
            &mut notes,
            &format!("{} QEMU", w.name),
        );
        let ratio = match (r.ratio(), min_max(&r.pair_ratios())) {
            (Some(x), Some((lo, hi))) => {
                format!("**{}** ({}–{})", fmt_ratio(x), fmt_ratio(lo), fmt_ratio(hi))
            }
            (Some(x), None) => format!("**{}**", fmt_ratio(x)),
            _ => "—".to_string(),
        };
        let floor = match (
            of_floor(results, r, r.ours.as_ref()),
            of_floor(results, r, r.qemu.as_ref()),
        ) {
            (None, None) => "—".to_string(),
            (o, q) => format!(
                "{} / {}",
                o.map_or("—".to_string(), |x| format!("{:.0}%", x * 100.0)),
                q.map_or("—".to_string(), |x| format!("{:.0}%", x * 100.0))
            ),
        };
        let mut ratio = ratio;
        if let Some(Err(e)) = &r.verification {
            notes.push(format!("{}: our output failed verification: {e}", w.name));
            ratio.push_str(&format!(" ⚠[{}]", notes.len()));
        }
        for n in &r.notes {
            notes.push(format!("{}: {n}", w.name));
            ratio.push_str(&format!(" [{}]", notes.len()));
        }
        if let (Some((o, q)), Kind::Pair { output: true, .. }) = (r.output_bytes, &w.kind) {
            notes.push(format!(
                "{}: output file {} (ours) vs {} (QEMU), {:.1}% of the input",
                w.name,
                fmt_bytes(o),
                fmt_bytes(q),
                o as f64 * 100.0 / w.bytes.max(1) as f64
            ));
            ratio.push_str(&format!(" [{}]", notes.len()));
        }
        out.push_str(&format!(
            "| {name} | {ours} | {qemu} | {ratio} | {floor} |\n"
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        for (i, n) in notes.iter().enumerate() {
            out.push_str(&format!("{}. {}\n", i + 1, n.replace('|', "\\|")));
        }
    }
    out
}

fn side_json(s: Option<&SideResult>) -> Value {
    let Some(s) = s else {
        return Value::Null;
    };
    let (status, reason) = match &s.status {
        Status::Ok => ("ok", None),
        Status::NotAvailable(w) => ("not available", Some(w)),
        Status::Failed(w) => ("failed", Some(w)),
        Status::SetupFailed(w) => ("setup failed", Some(w)),
    };
    json!({
        "status": status,
        "reason": reason,
        "command": s.command,
        "times_s": s.times,
        "median_s": s.median(),
        "cpu_s": s.cpu,
        "median_cpu_s": crate::util::median(&s.cpu),
    })
}

/// The results as a JSON document.
pub fn json(meta: &Meta, results: &[WorkloadResult]) -> Value {
    let workloads: Vec<Value> = results
        .iter()
        .map(|r| {
            let w = &r.workload;
            let ratios = r.pair_ratios();
            let mm = min_max(&ratios);
            json!({
                "name": w.name,
                "title": w.title,
                "needs_subcommand": w.needs(),
                "input": w.template.as_ref().map(|t| t.describe()),
                "bytes": w.bytes,
                "floor": w.floor,
                "ours": side_json(r.ours.as_ref()),
                "qemu": side_json(r.qemu.as_ref()),
                "plain": side_json(r.plain.as_ref()),
                "ratio_of_medians": r.ratio(),
                "pair_ratios": ratios,
                "pair_ratio_min": mm.map(|m| m.0),
                "pair_ratio_max": mm.map(|m| m.1),
                "fraction_of_floor": {
                    "ours": of_floor(results, r, r.ours.as_ref()),
                    "qemu": of_floor(results, r, r.qemu.as_ref()),
                },
                "verification": match &r.verification {
                    None => Value::Null,
                    Some(Ok(s)) => json!({"ok": true, "detail": s}),
                    Some(Err(e)) => json!({"ok": false, "detail": e}),
                },
                "result_file_bytes": r.output_bytes.map(|(o, q)| json!({"ours": o, "qemu": q})),
                "notes": r.notes,
            })
        })
        .collect();
    json!({
        "date": meta.date,
        "time_utc": meta.time,
        "command": meta.command,
        "machine": meta.machine.to_json(),
        "load_average_1min": { "start": meta.load.0, "end": meta.load.1 },
        "qemu_img": meta.qemu_version,
        "ours": {
            "binary": meta.ours_binary,
            "version": meta.ours_version,
            "git": meta.git,
        },
        "settings": {
            "scale": meta.scale,
            "measured_pairs": meta.pairs,
            "warmup_pairs": meta.warmup,
            "order": "alternating: ours then QEMU in every pair",
            "bench_cache_mode": meta.cache,
            "bench_depth": meta.depth,
            "ratio": "ours median / QEMU median; pair_ratios are ours/QEMU per pair",
        },
        "workloads": workloads,
    })
}
