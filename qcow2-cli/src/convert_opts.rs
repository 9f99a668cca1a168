//! The options of `qcow2 convert` beyond format, compression and create options: qemu-img
//! convert's `-B`/`-F` (target on a backing file), `-n` and `--target-is-zero` (existing
//! target), `-S` (zero detection granularity), `-l` (internal snapshot of the source),
//! `-m`/`-W` (parallelism), `-t`/`-T` (cache modes), `-C` (copy offloading), `--salvage`,
//! `-r` (rate limit), parsed and checked with qemu-img's messages into [`ConvertSettings`].

use clap::Args;
use qcow2_io::CacheMode;

use crate::size::parse_size;
use crate::CliError;

/// qemu-img's default `-S`: 4 KiB of zeros make a hole.
const DEFAULT_MIN_SPARSE: u64 = 4096;

/// The largest `-S` qemu-img accepts (its 16 MiB buffer).
const MAX_MIN_SPARSE: u64 = 16 << 20;

/// The command-line options.
#[derive(Args, Debug, Default)]
pub struct ConvertExtraArgs {
    /// Make the target an overlay of this backing file; only what the source's top image
    /// allocates is written.
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the backing file (required with -B).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Write into an existing target instead of creating it.
    #[arg(short = 'n', long = "no-create")]
    skip_create: bool,
    /// With -n: the existing target already reads as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Zero detection granularity (0: write everything, fully allocating the target).
    #[arg(short = 'S', long = "sparse-size", value_name = "SPARSE_SIZE")]
    sparse: Option<String>,
    /// Convert the source's internal snapshot (id or name, or snapshot.id=..,snapshot.name=..).
    #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT_PARAMS")]
    snapshot: Option<String>,
    /// Parallel copy streams (1..16; accepted, the copy here is one stream).
    #[arg(short = 'm', long = "parallel", value_name = "NUM_COROUTINES")]
    parallel: Option<String>,
    /// Allow out-of-order writes (accepted; writes here are in order).
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Cache mode of the target.
    #[arg(short = 't', long = "target-cache", value_name = "TGT_CACHE")]
    cache: Option<String>,
    /// Cache mode of the sources.
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Copy offloading: data is copied as read, without zero detection inside it.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_offload: bool,
    /// Read errors become zeros (with a message) instead of failing the conversion.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Limit the copy to this many bytes per second.
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    rate: Option<String>,
}

/// What the options ask for, checked.
#[derive(Debug, Clone)]
pub struct ConvertSettings {
    /// `-B`: the backing file name to record in the target.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_format: Option<String>,
    /// `-n`.
    pub skip_create: bool,
    /// The target reads as zeros before the copy (created here, or `--target-is-zero`).
    pub target_is_zero: bool,
    /// `-S` in bytes; 0 turns zero detection off.
    pub min_sparse: u64,
    /// `-l`.
    pub snapshot: Option<String>,
    /// `-r` in bytes per second.
    pub rate: Option<u64>,
    /// `--salvage`.
    pub salvage: bool,
    /// `-t` as given; checked by [`ConvertSettings::cache`] after the target was created,
    /// as qemu-img checks it.
    pub cache_spec: Option<String>,
    /// `-C`: data is copied as it is read (no zero detection inside data runs).
    pub copy_offload: bool,
}

impl ConvertSettings {
    /// The target's cache mode (`-t`), with qemu-img's message for a bad one.
    pub fn cache(&self) -> Result<CacheMode, CliError> {
        match self.cache_spec.as_deref() {
            None => Ok(CacheMode::Writeback),
            Some(c) => CacheMode::parse(c)
                .ok_or_else(|| CliError::new(format!("Invalid cache option: {c}"))),
        }
    }
}

impl Default for ConvertSettings {
    fn default() -> Self {
        ConvertSettings {
            backing: None,
            backing_format: None,
            skip_create: false,
            target_is_zero: true,
            min_sparse: DEFAULT_MIN_SPARSE,
            snapshot: None,
            rate: None,
            salvage: false,
            cache_spec: None,
            copy_offload: false,
        }
    }
}

impl ConvertExtraArgs {
    /// Checks the options in qemu-img's order: values as they are parsed, then the
    /// combinations (`compress`: `-c` was given; `sources`: how many source files).
    pub fn settings(&self, compress: bool, sources: usize) -> Result<ConvertSettings, CliError> {
        let min_sparse = match self.sparse.as_deref() {
            None => DEFAULT_MIN_SPARSE,
            Some(s) => {
                let v = parse_size(s).map_err(|_| {
                    CliError::new(format!(
                        "Invalid buffer size for sparse output specified: '{s}'."
                    ))
                })?;
                if v % 512 != 0 || v > MAX_MIN_SPARSE {
                    return Err(CliError::new(
                        "Invalid buffer size for sparse output specified. Valid sizes are \
                         multiples of 512 up to 16777216. Select 0 to disable sparse detection \
                         (fully allocates output).",
                    ));
                }
                v
            }
        };
        if let Some(m) = self.parallel.as_deref() {
            if !matches!(m.parse::<u32>(), Ok(1..=16)) {
                return Err(CliError::new(
                    "Invalid number of coroutines specified. Must be between 1 and 16.",
                ));
            }
        }
        let rate = match self.rate.as_deref() {
            None => None,
            Some(r) => Some(
                parse_size(r)
                    .ok()
                    .filter(|&v| v <= i64::MAX as u64)
                    .ok_or_else(|| {
                        CliError::new(format!("Invalid rate limit specified: '{r}'."))
                    })?,
            ),
        };
        if self.target_is_zero && !self.skip_create {
            return Err(CliError::new("--target-is-zero requires use of -n flag"));
        }
        if self.copy_offload && compress {
            return Err(CliError::new(
                "Cannot enable copy offloading when -c is used",
            ));
        }
        if self.snapshot.is_some() && sources > 1 {
            return Err(CliError::new(
                "No support for concatenating multiple snapshot",
            ));
        }
        if self.backing.is_some() && sources > 1 {
            return Err(CliError::new(
                "Having a backing file for the target makes no sense when concatenating \
                 multiple input images",
            ));
        }
        if let Some(t) = self.source_cache.as_deref() {
            if CacheMode::parse(t).is_none() {
                return Err(CliError::new(format!("Invalid source cache option: {t}")));
            }
        }
        // -m and -W only tune how QEMU schedules the copy; the result is the same.
        let _ = self.out_of_order;
        Ok(ConvertSettings {
            backing: self.backing.clone(),
            backing_format: self.backing_format.clone(),
            skip_create: self.skip_create,
            target_is_zero: !self.skip_create || self.target_is_zero,
            min_sparse,
            snapshot: self.snapshot.clone(),
            rate,
            salvage: self.salvage,
            cache_spec: self.cache.clone(),
            copy_offload: self.copy_offload,
        })
    }
}
