//! Check results: QEMU's `BdrvCheckResult` counters and the report `qemu-img check` prints.

use core::fmt::Write as _;

use crate::finding::{errno_text, Finding};

/// The counters of one check run (QEMU's `BdrvCheckResult`, including `BlockFragInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CheckCounts {
    /// Corruptions found and not repaired.
    pub corruptions: u64,
    /// Leaked clusters found and not repaired.
    pub leaks: u64,
    /// Internal errors (I/O errors, failed repairs) during the check.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters repaired.
    pub leaks_fixed: u64,
    /// One past the last byte of the last cluster with a refcount or a reference.
    pub image_end_offset: u64,
    /// Guest clusters (virtual size in clusters).
    pub total_clusters: u64,
    /// Guest clusters mapped to host clusters (active L1 only).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
}

/// Why a check did not complete (qemu-img prints "Check failed: <strerror>" and exits 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckFailure {
    /// The errno QEMU's check returned.
    pub errno: i32,
}

impl CheckFailure {
    /// C's `strerror` of the errno.
    pub fn message(&self) -> String {
        errno_text(self.errno)
    }
}

/// The outcome of `check` as `qemu-img check` reports it.
///
/// With a repair mode that fixed something, `qemu-img` checks the image a second time and
/// reports that second result with the first run's `*_fixed` counts; [`CheckReport::result`]
/// is that merged result, [`CheckReport::first_run`] the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Everything reported on stderr, in order, over all runs.
    pub findings: Vec<Finding>,
    /// Counters of the first run (the one that repairs).
    pub first_run: CheckCounts,
    /// The reported counters (second run with the first run's fixed counts merged, or the
    /// first run if nothing was fixed). Meaningless if [`CheckReport::failure`] is set.
    pub result: CheckCounts,
    /// Whether a second check ran ("Double checking the fixed image now...").
    pub double_checked: bool,
    /// The check could not complete (qemu-img prints no result, only "Check failed: ...").
    pub failure: Option<CheckFailure>,
}

impl CheckReport {
    /// qemu-img's exit status: 0 clean, 1 check failed or internal errors, 2 corruptions
    /// remain, 3 only leaks remain.
    pub fn exit_code(&self) -> i32 {
        if self.failure.is_some() || self.result.check_errors > 0 {
            1
        } else if self.result.corruptions > 0 {
            2
        } else if self.result.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether the image is consistent: no corruptions, no leaks, no errors.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// The stderr text qemu-img prints: every finding, then "qemu-img: Check failed..." if
    /// the check failed. Each line ends with `\n`.
    pub fn render_stderr(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(out, "{f}");
        }
        if let Some(fail) = &self.failure {
            let _ = writeln!(out, "qemu-img: Check failed: {}", fail.message());
        } else if self.result.check_errors > 0 {
            out.push_str("qemu-img: Check failed\n");
        }
        out
    }

    /// The stdout text of `qemu-img check` (human output format).
    pub fn render_human(&self) -> String {
        let mut out = String::new();
        if self.double_checked {
            let _ = write!(
                out,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.first_run.leaks_fixed, self.first_run.corruptions_fixed
            );
        }
        if self.failure.is_some() {
            return out;
        }
        let c = &self.result;
        if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
            out.push_str("No errors were found on the image.\n");
        } else {
            if c.corruptions > 0 {
                let _ = write!(
                    out,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    c.corruptions
                );
            }
            if c.leaks > 0 {
                let _ = write!(
                    out,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    c.leaks
                );
            }
            if c.check_errors > 0 {
                let _ = write!(
                    out,
                    "\n{} internal errors have occurred during the check.\n",
                    c.check_errors
                );
            }
        }
        if c.total_clusters != 0 && c.allocated_clusters != 0 {
            let alloc = c.allocated_clusters as f64;
            let _ = writeln!(
                out,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                c.allocated_clusters,
                c.total_clusters,
                alloc * 100.0 / c.total_clusters as f64,
                c.fragmented_clusters as f64 * 100.0 / alloc,
                c.compressed_clusters as f64 * 100.0 / alloc,
            );
        }
        if c.image_end_offset != 0 {
            let _ = writeln!(out, "Image end offset: {}", c.image_end_offset);
        }
        out
    }

    /// The stdout text of `qemu-img check --output=json` for an image called `filename`
    /// (QAPI `ImageCheck`: optional keys only when nonzero, in the order qemu-img 10.0
    /// prints them, 4-space indentation). Empty if the check failed, as qemu-img prints
    /// nothing then.
    pub fn render_json(&self, filename: &str) -> String {
        if self.failure.is_some() {
            return String::new();
        }
        let c = &self.result;
        let mut fields: Vec<(&str, String)> = Vec::new();
        let opt = |key: &'static str, v: u64, fields: &mut Vec<(&str, String)>| {
            if v != 0 {
                fields.push((key, v.to_string()));
            }
        };
        opt("image-end-offset", c.image_end_offset, &mut fields);
        opt("compressed-clusters", c.compressed_clusters, &mut fields);
        opt("total-clusters", c.total_clusters, &mut fields);
        opt("corruptions", c.corruptions, &mut fields);
        opt("corruptions-fixed", c.corruptions_fixed, &mut fields);
        fields.push(("check-errors", c.check_errors.to_string()));
        opt("leaks", c.leaks, &mut fields);
        opt("leaks-fixed", c.leaks_fixed, &mut fields);
        opt("allocated-clusters", c.allocated_clusters, &mut fields);
        fields.push(("filename", json_string(filename)));
        fields.push(("format", "\"qcow2\"".into()));
        opt("fragmented-clusters", c.fragmented_clusters, &mut fields);
        let mut out = String::from("{\n");
        for (i, (k, v)) in fields.iter().enumerate() {
            let comma = if i + 1 < fields.len() { "," } else { "" };
            let _ = writeln!(out, "    \"{k}\": {v}{comma}");
        }
        out.push_str("}\n");
        out
    }
}

/// A JSON string literal with QEMU's escaping (quotes, backslashes and control characters).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
