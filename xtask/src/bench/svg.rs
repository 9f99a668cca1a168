//! A self-made SVG chart: one horizontal bar per workload, from 1.0 to the ratio ours / QEMU
//! on a log2 axis, with the min–max of the per-pair ratios as a whisker.

use std::fmt::Write as _;

use super::report::Meta;
use super::{Status, WorkloadResult};
use crate::util::{fmt_ratio, min_max};

const WIDTH: f64 = 980.0;
const LABEL_W: f64 = 300.0;
const RIGHT_PAD: f64 = 120.0;
const TOP: f64 = 92.0;
const ROW: f64 = 38.0;
const BOTTOM: f64 = 70.0;

/// Escapes text for XML content and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `s` cut to at most `n` characters, with an ellipsis if cut.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Label of an axis tick at 2^k.
fn tick_label(k: i32) -> String {
    let v = 2f64.powi(k);
    if k >= 0 {
        format!("{v:.0}×")
    } else {
        let s = format!("{v:.4}");
        format!("{}×", s.trim_end_matches('0'))
    }
}

/// The chart for the pair workloads in `results`.
pub fn chart(meta: &Meta, results: &[WorkloadResult]) -> String {
    let rows: Vec<&WorkloadResult> = results.iter().filter(|r| r.plain.is_none()).collect();
    // Axis range in powers of two, always including 0.5..2.
    let mut lo = 0.5f64;
    let mut hi = 2.0f64;
    for r in &rows {
        if let Some(x) = r.ratio() {
            lo = lo.min(x);
            hi = hi.max(x);
        }
        if let Some((a, b)) = min_max(&r.pair_ratios()) {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    let lo_k = lo.log2().floor().max(-12.0) as i32;
    let hi_k = hi.log2().ceil().min(16.0) as i32;
    let x0 = LABEL_W;
    let x1 = WIDTH - RIGHT_PAD;
    let xr = |r: f64| {
        let k = r
            .max(f64::MIN_POSITIVE)
            .log2()
            .clamp(f64::from(lo_k), f64::from(hi_k));
        x0 + (k - f64::from(lo_k)) / f64::from(hi_k - lo_k) * (x1 - x0)
    };
    let height = TOP + ROW * rows.len().max(1) as f64 + BOTTOM;
    let plot_bottom = TOP + ROW * rows.len().max(1) as f64;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="26" font-size="17" font-weight="bold" fill="#222">qcow2 vs qemu-img: time ours / QEMU per workload (log scale, lower is better for ours)</text>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="46" font-size="11" fill="#555">{}</text>"##,
        esc(&cut(
            &format!(
                "{} {} UTC — {}",
                meta.date,
                meta.time,
                meta.machine.one_line()
            ),
            160
        ))
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="62" font-size="11" fill="#555">{}</text>"##,
        esc(&cut(
            &format!(
                "{}; ours at {}; {} pair(s) after {} warm-up; bench -t {} -d {}",
                meta.qemu_version, meta.git, meta.pairs, meta.warmup, meta.cache, meta.depth
            ),
            160
        ))
    );

    // Grid and axis labels.
    for k in lo_k..=hi_k {
        let x = xr(2f64.powi(k));
        let (stroke, w) = if k == 0 { ("#222", 2.0) } else { ("#ddd", 1.0) };
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{w}"/>"#,
            TOP - 6.0,
            plot_bottom + 4.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#333">{}</text>"##,
            plot_bottom + 18.0,
            tick_label(k)
        );
    }
    let one = xr(1.0);
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#3a8f5c">← ours faster</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#d0643b">ours slower →</text>"##,
        one - 6.0,
        TOP - 10.0,
        one + 6.0,
        TOP - 10.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#333">ours / QEMU (bar: ratio of medians; whisker: min–max of per-pair ratios). Left of 1×: ours is faster.</text>"##,
        (x0 + x1) / 2.0,
        plot_bottom + 38.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#777">command: {}</text>"##,
        16.0,
        plot_bottom + 58.0,
        esc(&cut(&meta.command, 120))
    );

    for (i, r) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let cy = y + ROW / 2.0;
        if i % 2 == 1 {
            let _ = writeln!(
                s,
                r##"<rect x="8" y="{y:.1}" width="{:.1}" height="{ROW}" fill="#f6f6f6"/>"##,
                WIDTH - 16.0
            );
        }
        let w = &r.workload;
        let _ = writeln!(
            s,
            r##"<text x="16" y="{:.1}" font-size="13" font-family="DejaVu Sans Mono, monospace" font-weight="bold" fill="#222">{}<title>{}</title></text>"##,
            cy - 2.0,
            esc(w.name),
            esc(&w.title)
        );
        let _ = writeln!(
            s,
            r##"<text x="16" y="{:.1}" font-size="9.5" fill="#666">{}</text>"##,
            cy + 11.0,
            esc(&cut(&w.title, 52))
        );
        match r.ratio() {
            Some(x) => {
                let xe = xr(x);
                let (left, width) = if xe < one {
                    (xe, one - xe)
                } else {
                    (one, xe - one)
                };
                let fill = if x < 1.0 { "#3a8f5c" } else { "#d0643b" };
                let _ = writeln!(
                    s,
                    r#"<rect x="{left:.1}" y="{:.1}" width="{:.1}" height="16" fill="{fill}" opacity="0.85"/>"#,
                    cy - 8.0,
                    width.max(1.5)
                );
                let mut label_x = one.max(xe);
                if let Some((a, b)) = min_max(&r.pair_ratios()) {
                    let (xa, xb) = (xr(a), xr(b));
                    let _ = writeln!(
                        s,
                        r##"<line x1="{xa:.1}" y1="{cy:.1}" x2="{xb:.1}" y2="{cy:.1}" stroke="#222" stroke-width="1.3"/><line x1="{xa:.1}" y1="{:.1}" x2="{xa:.1}" y2="{:.1}" stroke="#222" stroke-width="1.3"/><line x1="{xb:.1}" y1="{:.1}" x2="{xb:.1}" y2="{:.1}" stroke="#222" stroke-width="1.3"/>"##,
                        cy - 5.0,
                        cy + 5.0,
                        cy - 5.0,
                        cy + 5.0
                    );
                    label_x = label_x.max(xb);
                }
                let verify_mark = match &r.verification {
                    Some(Err(_)) => " ⚠ output failed check",
                    _ => "",
                };
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#222">{}×{}</text>"##,
                    label_x + 6.0,
                    cy + 4.0,
                    fmt_ratio(x),
                    verify_mark
                );
            }
            None => {
                let why = |side: &str, st: &Status| match st {
                    Status::Ok => None,
                    Status::NotAvailable(_) => Some(format!("{side}: not available")),
                    Status::Failed(_) => Some(format!("{side}: failed")),
                    Status::SetupFailed(_) => Some(format!("{side}: setup failed")),
                };
                let mut parts = Vec::new();
                if let Some(o) = &r.ours {
                    parts.extend(why("ours", &o.status));
                }
                if let Some(q) = &r.qemu {
                    parts.extend(why("QEMU", &q.status));
                }
                if parts.is_empty() {
                    parts.push("no ratio".to_string());
                }
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" font-size="12" font-style="italic" fill="#888">{}</text>"##,
                    one + 8.0,
                    cy + 4.0,
                    esc(&parts.join(", "))
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_escaping() {
        assert_eq!(tick_label(0), "1×");
        assert_eq!(tick_label(3), "8×");
        assert_eq!(tick_label(-1), "0.5×");
        assert_eq!(tick_label(-2), "0.25×");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
