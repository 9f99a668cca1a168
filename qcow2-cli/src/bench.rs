//! `qcow2 bench`: qemu-img bench's workload, options, messages and output.
//!
//! The workload: COUNT requests of SIZE bytes, the first at OFFSET, each next one STEP bytes
//! further, wrapping at the end of the image (offset modulo the virtual size); reads, or
//! writes of a buffer filled with PATTERN; with `--flush-interval N` a flush after every N
//! completed requests. qemu-img keeps DEPTH requests in flight through its AIO engine; the
//! engine here is synchronous, so the requests run one after another in qemu-img's
//! submission order (same offsets, same bytes, same number of flushes); DEPTH only limits
//! what the flush interval may be, as in qemu-img.

use std::time::Instant;

use crate::io::{strerror, BlockDev};
use crate::size::{parse_size, SizeError};
use crate::{out, CliError};

/// The benchmark's parameters, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchParams {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight in qemu-img.
    pub depth: u64,
    /// First offset.
    pub offset: u64,
    /// Request size.
    pub bufsize: u64,
    /// Distance between requests.
    pub step: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written.
    pub pattern: u8,
    /// Flush after this many requests (0: never).
    pub flush_interval: u64,
    /// Wait for in-flight requests before a flush (always true here: requests are serial).
    pub drain: bool,
}

/// The raw option values of `bench`.
#[derive(Debug, Default, Clone)]
pub struct BenchOptions {
    /// `-c`.
    pub count: Option<String>,
    /// `-d`.
    pub depth: Option<String>,
    /// `-o`.
    pub offset: Option<String>,
    /// `-s`.
    pub buffer_size: Option<String>,
    /// `-S`.
    pub step_size: Option<String>,
    /// `-w`.
    pub write: bool,
    /// `--pattern`.
    pub pattern: Option<String>,
    /// `--flush-interval`.
    pub flush_interval: Option<String>,
    /// `--no-drain`.
    pub no_drain: bool,
}

/// qemu-img's `cvtnum_full(name, value, min, max)` with its messages.
fn cvtnum_full(name: &str, value: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match parse_size(value) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) | Err(SizeError::Overflow) => Err(CliError::new(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))),
        Err(SizeError::Invalid) => Err(CliError::new(format!(
            "Invalid {name} specified: '{value}'."
        ))),
    }
}

impl BenchParams {
    /// Checks the options in qemu-img's order, with its messages.
    pub fn from_options(o: &BenchOptions) -> Result<Self, CliError> {
        const INT_MAX: u64 = i32::MAX as u64;
        let num = |v: &Option<String>, name: &str, min: u64, max: u64, default: u64| {
            v.as_deref()
                .map(|s| cvtnum_full(name, s, min, max))
                .transpose()
                .map(|x| x.unwrap_or(default))
        };
        let count = num(&o.count, "request count", 1, INT_MAX, 75000)?;
        let depth = num(&o.depth, "queue depth", 1, INT_MAX, 64)?;
        let offset = num(&o.offset, "offset", 0, i64::MAX as u64, 0)?;
        let bufsize = num(&o.buffer_size, "buffer size", 1, INT_MAX, 4096)?;
        let step = num(&o.step_size, "step size", 0, INT_MAX, 0)?;
        let pattern = match o.pattern.as_deref() {
            None => 0,
            Some(p) => {
                let v = crate::opts::parse_number(p).ok_or_else(|| {
                    CliError::new(format!("Invalid pattern byte specified: '{p}'."))
                })?;
                u8::try_from(v).map_err(|_| {
                    CliError::new("Invalid pattern byte specified. Must be between 0 and 255.")
                })?
            }
        };
        let flush_interval = num(&o.flush_interval, "flush interval", 0, INT_MAX, 0)?;
        if !o.write && flush_interval > 0 {
            return Err(CliError::new(
                "--flush-interval is only available in write tests",
            ));
        }
        if flush_interval > 0 && flush_interval < depth {
            return Err(CliError::new("Flush interval can't be smaller than depth"));
        }
        Ok(BenchParams {
            count,
            depth,
            offset,
            bufsize,
            step: if step == 0 { bufsize } else { step },
            write: o.write,
            pattern,
            flush_interval,
            drain: !o.no_drain,
        })
    }

    /// The "Sending ..." line(s).
    pub fn banner(&self) -> String {
        let mut s = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.step
        );
        if self.flush_interval > 0 {
            s.push_str(&format!(
                "Sending flush every {} requests\n",
                self.flush_interval
            ));
        }
        s
    }

    /// Request offsets in submission order.
    pub fn offsets(&self, image_size: u64) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.offset;
        (0..self.count).map(move |_| {
            let this = next;
            next = if image_size == 0 {
                0
            } else {
                (next + self.step) % image_size
            };
            this
        })
    }
}

/// Runs the benchmark on `dev`; prints qemu-img's lines.
pub fn run(dev: &mut dyn BlockDev, p: &BenchParams) -> Result<(), CliError> {
    out(&p.banner());
    let size = dev
        .length()
        .map_err(|e| CliError::new(format!("Failed request: {}", strerror(e))))?;
    let mut buf = vec![p.pattern; p.bufsize as usize];
    let start = Instant::now();
    for (done, off) in p.offsets(size).enumerate() {
        let r = match off.checked_add(p.bufsize) {
            Some(end) if end <= size => {
                if p.write {
                    dev.write(off, &buf)
                } else {
                    dev.read(off, &mut buf)
                }
            }
            _ => Err(5),
        };
        r.map_err(|e| CliError::new(format!("Failed request: {}", strerror(e))))?;
        if p.flush_interval > 0 && (done as u64 + 1) % p.flush_interval == 0 {
            dev.flush()
                .map_err(|e| CliError::new(format!("Failed flush request: {}", strerror(e))))?;
        }
    }
    out(&format!(
        "Run completed in {:.3} seconds.\n",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_and_offsets() {
        let o = BenchOptions {
            count: Some("10".into()),
            depth: Some("2".into()),
            offset: Some("4k".into()),
            step_size: Some("8k".into()),
            write: true,
            pattern: Some("0x5a".into()),
            flush_interval: Some("3".into()),
            ..BenchOptions::default()
        };
        let p = BenchParams::from_options(&o).unwrap();
        assert_eq!(
            p.banner(),
            "Sending 10 write requests, 4096 bytes each, 2 in parallel (starting at offset 4096, step size 8192)\nSending flush every 3 requests\n"
        );
        let offs: Vec<u64> = p.offsets(32768).collect();
        assert_eq!(offs[..5], [4096, 12288, 20480, 28672, 4096]);
        assert_eq!(p.pattern, 0x5a);
    }

    #[test]
    fn option_errors() {
        let err = |o: BenchOptions| BenchParams::from_options(&o).unwrap_err().msg;
        assert_eq!(
            err(BenchOptions {
                count: Some("0".into()),
                ..Default::default()
            }),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(BenchOptions {
                count: Some("abc".into()),
                ..Default::default()
            }),
            "Invalid request count specified: 'abc'."
        );
        assert_eq!(
            err(BenchOptions {
                flush_interval: Some("2".into()),
                ..Default::default()
            }),
            "--flush-interval is only available in write tests"
        );
        assert_eq!(
            err(BenchOptions {
                write: true,
                flush_interval: Some("3".into()),
                ..Default::default()
            }),
            "Flush interval can't be smaller than depth"
        );
        assert_eq!(
            err(BenchOptions {
                write: true,
                pattern: Some("300".into()),
                ..Default::default()
            }),
            "Invalid pattern byte specified. Must be between 0 and 255."
        );
    }
}
