//! What the numbers were measured on: CPU, cores, memory, kernel, and the filesystem under
//! the temporary directory.

use std::path::Path;
use std::process::Command;

/// A description of the machine a benchmark ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs (processor entries in /proc/cpuinfo, or available parallelism).
    pub cores: usize,
    /// Total memory in bytes (/proc/meminfo), 0 if unknown.
    pub memory: u64,
    /// Kernel release.
    pub kernel: String,
    /// Filesystem type of the temporary directory (/proc/mounts or `stat -f`).
    pub fs_type: String,
    /// Device or source of that filesystem.
    pub fs_source: String,
    /// Mount point of that filesystem.
    pub fs_mount: String,
}

impl Machine {
    /// Probes the running machine; `tmp` is the directory the images live in.
    pub fn probe(tmp: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                let k = k.trim();
                (k == "model name" || k == "Model" || k == "cpu model")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        let cores_cpuinfo = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
            .count();
        let cores = if cores_cpuinfo > 0 {
            cores_cpuinfo
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        };
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let rest = l.strip_prefix("MemTotal:")?;
                    let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
                    Some(kib * 1024)
                })
            })
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let (fs_type, fs_source, fs_mount) = filesystem_of(tmp);
        Machine {
            cpu,
            cores,
            memory,
            kernel,
            fs_type,
            fs_source,
            fs_mount,
        }
    }

    /// One line for tables and chart subtitles.
    pub fn one_line(&self) -> String {
        let mem = if self.memory > 0 {
            format!(", {:.0} GiB RAM", self.memory as f64 / (1u64 << 30) as f64)
        } else {
            String::new()
        };
        format!(
            "{}, {} cores{mem}, Linux {}, temp dir on {} ({})",
            self.cpu, self.cores, self.kernel, self.fs_type, self.fs_source
        )
    }

    /// The machine as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cpu": self.cpu,
            "cores": self.cores,
            "memory_bytes": self.memory,
            "kernel": self.kernel,
            "tmp_fs_type": self.fs_type,
            "tmp_fs_source": self.fs_source,
            "tmp_fs_mount": self.fs_mount,
        })
    }
}

/// The 1-minute load average from /proc/loadavg, if readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The (type, source, mount point) of the filesystem holding `path`: the longest mount point
/// in /proc/mounts that prefixes its canonical path, else `stat -f -c %T`.
fn filesystem_of(path: &Path) -> (String, String, String) {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String, String)> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(src), Some(mnt), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        // /proc/mounts escapes spaces and friends as octal.
        let mnt = mnt.replace("\\040", " ");
        if canon.starts_with(&mnt) && best.as_ref().is_none_or(|b| mnt.len() >= b.0) {
            best = Some((mnt.len(), ty.to_string(), src.to_string(), mnt));
        }
    }
    if let Some((_, ty, src, mnt)) = best {
        return (ty, src, mnt);
    }
    let ty = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&canon)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    (ty, "unknown".to_string(), "unknown".to_string())
}
