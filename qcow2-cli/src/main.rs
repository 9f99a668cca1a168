//! The `qcow2` command: qemu-img's habits (command names, options, output and messages) on
//! top of the qcow2 engine crates, so that scripts can switch from `qemu-img` without edits.
//!
//! Each subcommand lives in its own module. Options the engine cannot honour yet (resize
//! --preallocation other than off, encrypted or external-data-file images) are refused with
//! a clear message and a nonzero exit status; nothing pretends to work.

mod amend;
mod bench;
mod bitmap;
mod blkdebug;
mod check;
mod commit;
mod compare;
mod convert;
mod convert_opts;
mod create;
mod daemon;
mod dd;
mod encryption;
mod image;
mod info;
mod io;
mod ioshell;
mod json;
mod jsonname;
mod map;
mod measure;
mod nulldev;
mod opts;
mod prog;
mod progress;
mod qcowdev;
mod rawdev;
mod rebase;
mod resize;
mod secrets;
mod serve;
mod size;
mod snapshot;
mod source;
mod stdio;
mod tlsopts;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::image::Format;

/// A failure to report: one line on stderr ("qcow2: ...") and an exit status.
#[derive(Debug)]
pub struct CliError {
    /// The message, without the "qcow2: " prefix.
    pub msg: String,
    /// The exit status (1 unless a command defines others, like `check`).
    pub code: u8,
}

impl CliError {
    /// An error with exit status 1.
    pub fn new(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
        }
    }

    /// A usage error of `cmd`, pointing at its help.
    pub fn usage(cmd: &str, msg: &str) -> Self {
        CliError::new(format!("{msg} (see 'qcow2 {cmd} --help')"))
    }

    /// A subcommand whose engine crate has not landed yet.
    pub fn unavailable(cmd: &str, needs: &str) -> Self {
        CliError::new(format!(
            "{cmd}: not available yet (waiting on the {needs} crate)"
        ))
    }
}

/// Writes to stdout, buffered as C stdio buffers it (see [`stdio`]); a closed pipe is
/// ignored, as QEMU's tools ignore it.
pub fn out(text: &str) {
    stdio::out(text);
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people (the default).
    Human,
    /// qemu-img's JSON.
    Json,
}

impl OutputFormat {
    /// Parses `--output`, with qemu-img's message for anything else.
    pub fn parse(v: Option<&str>) -> Result<Self, CliError> {
        match v {
            None | Some("human") => Ok(OutputFormat::Human),
            Some("json") => Ok(OutputFormat::Json),
            Some(other) => Err(CliError::new(format!(
                "--output expects 'human' or 'json' not '{other}'"
            ))),
        }
    }
}

const EXAMPLES: &str = "\
Examples:
  qcow2 create -f qcow2 disk.qcow2 10G
  qcow2 create -f qcow2 -o cluster_size=4k,refcount_bits=64 small.qcow2 512M
  qcow2 create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  qcow2 info --output=json disk.qcow2
  qcow2 snapshot -l disk.qcow2

Sizes take qemu-img's suffixes: b, k/K, M, G, T, P, E (powers of 1024), e.g. 1G, 1.5M.
Exit status: 0 on success, 1 on any error (check: 0 clean, 1 not completed,
2 corruptions, 3 leaks only).";

/// qcow2 images the qemu-img way.
#[derive(Parser, Debug)]
#[command(
    name = "qcow2",
    version,
    about = "Create, inspect, check and modify qcow2 disk images (qemu-img compatible)",
    after_help = EXAMPLES,
    disable_help_subcommand = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new image (qcow2 or raw).
    #[command(after_help = "\
Examples:
  qcow2 create -f qcow2 disk.qcow2 1G
  qcow2 create -f qcow2 -o compat=0.10 old.qcow2 512M
  qcow2 create -f qcow2 -o cluster_size=2M,lazy_refcounts=on big.qcow2 1T
  qcow2 create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  qcow2 create -f qcow2 -o help")]
    Create(CreateArgs),
    /// Show information about an image.
    #[command(after_help = "\
Examples:
  qcow2 info disk.qcow2
  qcow2 info --output=json disk.qcow2")]
    Info(InfoArgs),
    /// Check an image for consistency (and repair it).
    #[command(after_help = "\
Exit status: 0 clean, 1 check not completed, 2 corruptions, 3 leaked clusters only.
Examples:
  qcow2 check disk.qcow2
  qcow2 check -r leaks disk.qcow2
  qcow2 check --output=json disk.qcow2")]
    Check(CheckArgs),
    /// List, create, apply or delete internal snapshots.
    #[command(after_help = "\
Examples:
  qcow2 snapshot -l disk.qcow2
  qcow2 snapshot -c before-upgrade disk.qcow2
  qcow2 snapshot -a before-upgrade disk.qcow2
  qcow2 snapshot -d before-upgrade disk.qcow2")]
    Snapshot(SnapshotArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (qemu-img's
    /// options; several operations per call, in order).
    #[command(disable_help_flag = true)]
    Bitmap(BitmapArgs),
    /// Show how guest ranges map to the image file.
    #[command(after_help = "\
Examples:
  qcow2 map disk.qcow2
  qcow2 map --output=json disk.qcow2")]
    Map(MapArgs),
    /// Copy an image, possibly to another format or compressed.
    #[command(after_help = "\
Examples:
  qcow2 convert -f raw -O qcow2 disk.raw disk.qcow2
  qcow2 convert -c -O qcow2 -p disk.qcow2 small.qcow2")]
    Convert(ConvertArgs),
    /// Change format options of an existing image.
    #[command(after_help = "\
Examples:
  qcow2 amend -o refcount_bits=64 disk.qcow2
  qcow2 amend -o compat=0.10 disk.qcow2")]
    Amend(AmendArgs),
    /// Grow or shrink an image's virtual size.
    #[command(after_help = "\
Examples:
  qcow2 resize disk.qcow2 +1G
  qcow2 resize --shrink disk.qcow2 512M")]
    Resize(ResizeArgs),
    /// Run a simple read or write benchmark.
    #[command(after_help = "\
Examples:
  qcow2 bench -c 10000 -s 4k disk.qcow2
  qcow2 bench -w -c 1000 -d 8 --pattern=0x5a disk.qcow2")]
    Bench(BenchArgs),
    /// Run qemu-io style commands on an image.
    #[command(after_help = "\
Examples:
  qcow2 io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' disk.qcow2
  qcow2 io -r -c map disk.qcow2")]
    Io(IoArgs),
    /// Check whether two images have the same guest contents.
    #[command(after_help = "\
Exit status: 0 identical, 1 different, 2 open error, 3 block status error, 4 read error.
Examples:
  qcow2 compare disk.qcow2 copy.qcow2
  qcow2 compare -f raw -F qcow2 disk.raw disk.qcow2")]
    Compare(CompareArgs),
    /// Calculate the file size a new image needs.
    #[command(after_help = "\
Examples:
  qcow2 measure -O qcow2 --size 10G
  qcow2 measure -O qcow2 -o cluster_size=4k --output=json disk.raw")]
    Measure(MeasureArgs),
    /// Copy input to output with optional format conversion, dd-style.
    #[command(after_help = "\
Examples:
  qcow2 dd if=disk.qcow2 of=disk.raw bs=1M
  qcow2 dd -O qcow2 bs=4k count=256 skip=16 if=disk.raw of=part.qcow2")]
    Dd(DdArgs),
    /// Export an image over NBD (qemu-nbd's command line).
    #[command(after_help = "\
Examples:
  qcow2 serve -f qcow2 -k /tmp/disk.sock -x disk disk.qcow2
  qcow2 serve -f qcow2 -p 10809 -e 4 -t --discard=unmap disk.qcow2
  qemu-io -f raw 'nbd+unix:///disk?socket=/tmp/disk.sock' -c 'read 0 64k'")]
    Serve(serve::ServeArgs),
    /// Change the backing file of an image (copying what differs unless -u).
    #[command(after_help = "\
Examples:
  qcow2 rebase -b new-base.qcow2 -F qcow2 overlay.qcow2
  qcow2 rebase -u -b renamed-base.qcow2 -F qcow2 overlay.qcow2
  qcow2 rebase -b '' overlay.qcow2")]
    Rebase(rebase::RebaseArgs),
    /// Write an image's data into its backing file (then empty it unless -d or -b).
    #[command(after_help = "\
Examples:
  qcow2 commit overlay.qcow2
  qcow2 commit -d -p overlay.qcow2
  qcow2 commit -b base.qcow2 top.qcow2")]
    Commit(commit::CommitArgs),
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    format_b: Option<String>,
    /// Cache mode (validated, then accepted for compatibility).
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Strict mode: sizes and block status must match too.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Open without locking (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The two image files.
    files: Vec<String>,
}

#[derive(Args, Debug)]
struct MeasureArgs {
    /// Output format: human or json.
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,
    /// Target format (raw or qcow2; raw when absent).
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    target_format: Option<String>,
    /// Target format options.
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    options: Vec<String>,
    /// Measure this internal snapshot of FILE.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Measure an empty image of this size.
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    size: Option<String>,
    /// Format of FILE.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Open without locking (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define a secret for encrypt.key-secret: `secret,id=ID,data=PASSPHRASE` or
    /// `secret,id=ID,file=FILE[,format=raw|base64]` (repeatable).
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// The source image.
    files: Vec<String>,
}

#[derive(Args, Debug)]
struct DdArgs {
    /// Input format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (raw when absent).
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    output_format: Option<String>,
    /// Open without locking (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Operands: bs=BLOCK_SIZE count=BLOCKS skip=BLOCKS if=INPUT of=OUTPUT.
    operands: Vec<String>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Image format (qcow2 or raw); qemu-img's default is raw.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Format options, e.g. cluster_size=64k,refcount_bits=16 ('-o help' lists them).
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    options: Vec<String>,
    /// Backing file of the new image.
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (a size is then required).
    #[arg(short = 'u', long = "backing-unsafe")]
    backing_unsafe: bool,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Define a secret for encrypt.key-secret: `secret,id=ID,data=PASSPHRASE` or
    /// `secret,id=ID,file=FILE[,format=raw|base64]` (repeatable).
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// The image file to create (it is overwritten if it exists).
    filename: Option<String>,
    /// Virtual size with an optional suffix (b, k, M, G, T, P, E).
    size: Option<String>,
    #[arg(hide = true)]
    extra: Vec<String>,
}

/// qemu-img's `--object` and `--image-opts` (secrets for encrypted images).
#[derive(Args, Debug)]
struct ObjectArgs {
    /// Define an object: `secret,id=ID,data=PASSPHRASE` or
    /// `secret,id=ID,file=FILE[,format=raw|base64]` (repeatable).
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// The image argument is an option list:
    /// `driver=qcow2,file.filename=FILE,encrypt.key-secret=ID`.
    #[arg(long = "image-opts")]
    image_opts: bool,
}

impl ObjectArgs {
    /// Defines the objects; with `--image-opts`, turns the option lists in `files` into
    /// file names (the key secret becomes the command's) and returns the driver named.
    fn apply(&self, files: &mut [String]) -> Result<Option<String>, CliError> {
        for def in &self.object {
            secrets::define_object(def).map_err(CliError::new)?;
        }
        let mut driver = None;
        if self.image_opts {
            for f in files.iter_mut() {
                let (file, d) = secrets::image_opts(f).map_err(CliError::new)?;
                *f = file;
                driver = driver.or(d);
            }
        }
        Ok(driver)
    }
}

/// `-f`, or the driver an option list named.
fn format_or_driver(f: Option<String>, driver: Option<String>) -> Option<String> {
    f.or(driver)
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,
    /// Show the whole backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Force-share: open even while another process writes the image (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Repair: leaks or all.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,
    /// Quiet: print nothing on stdout.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Force-share: open even while another process writes the image (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

#[derive(Args, Debug)]
struct SnapshotArgs {
    /// List snapshots (the default).
    #[arg(short = 'l', long = "list", action = clap::ArgAction::Count)]
    list: u8,
    /// Create a snapshot named NAME (names need not be unique).
    #[arg(short = 'c', long = "create", value_name = "NAME", action = clap::ArgAction::Append)]
    create: Vec<String>,
    /// Revert the image to a snapshot (looked up by ID first, then by name).
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT", action = clap::ArgAction::Append)]
    apply: Vec<String>,
    /// Delete the first snapshot named NAME (names only, as qemu-img).
    #[arg(short = 'd', long = "delete", value_name = "NAME", action = clap::ArgAction::Append)]
    delete: Vec<String>,
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Force-share: open even while another process writes the image (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

/// `bitmap`: parsed by the command itself, as qemu-img's getopt does (the order of the
/// operations matters).
#[derive(Args, Debug)]
struct BitmapArgs {
    /// Operations, options, FILENAME and BITMAP (see `qcow2 bitmap --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct MapArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,
    /// First guest offset to map.
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Length to map.
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Force-share: open even while another process writes the image (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Source format.
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    format: Option<String>,
    /// Target format (qcow2 or raw).
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    output_format: Option<String>,
    /// Compress the target (qcow2 only).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Target format options.
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Force-share: open the sources even while another process writes them (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Copy the persistent bitmaps of the (single) source.
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps, skip inconsistent bitmaps instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Source file(s) and the target file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
    #[command(flatten)]
    extra: convert_opts::ConvertExtraArgs,
}

#[derive(Args, Debug)]
struct AmendArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Options to change, e.g. refcount_bits=64 or compat=0.10.
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Allow changes that may lose data.
    #[arg(long = "force")]
    force: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

#[derive(Args, Debug)]
struct ResizeArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Allow shrinking (data beyond the new size is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation mode for the new area.
    #[arg(long = "preallocation", value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file, then the size (always the last argument): absolute, +N to grow or
    /// -N to shrink.
    #[arg(value_name = "FILE [+-]SIZE")]
    args: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Number of requests.
    #[arg(
        short = 'c',
        long = "count",
        allow_hyphen_values = true,
        value_name = "COUNT"
    )]
    count: Option<String>,
    /// Requests in flight.
    #[arg(
        short = 'd',
        long = "depth",
        allow_hyphen_values = true,
        value_name = "DEPTH"
    )]
    depth: Option<String>,
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Starting offset.
    #[arg(
        short = 'o',
        long = "offset",
        allow_hyphen_values = true,
        value_name = "OFFSET"
    )]
    offset: Option<String>,
    /// Request size.
    #[arg(
        short = 's',
        long = "buffer-size",
        allow_hyphen_values = true,
        value_name = "SIZE"
    )]
    buffer_size: Option<String>,
    /// Distance between requests.
    #[arg(
        short = 'S',
        long = "step-size",
        allow_hyphen_values = true,
        value_name = "STEP"
    )]
    step_size: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte pattern for writes.
    #[arg(long = "pattern", value_name = "PATTERN")]
    pattern: Option<String>,
    /// Flush after every INTERVAL writes.
    #[arg(long = "flush-interval", value_name = "INTERVAL")]
    flush_interval: Option<String>,
    /// Do not wait for in-flight requests before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// AIO engine: threads (a worker thread per request in flight), io_uring (one ring,
    /// every request in flight from one thread), native (as io_uring; needs -t none).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Native AIO (-i native).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Quiet (qemu-img bench prints its lines anyway; so does this).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Force-share: open even while another process writes the image (read-only opens
    /// only, as qemu-img's -U; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    files: Vec<String>,
    #[command(flatten)]
    objects: ObjectArgs,
}

/// `io` takes qemu-io's command line verbatim; `ioshell` parses it (`qcow2 io -h` lists
/// the options, `-U` included).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
struct IoArgs {
    /// qemu-io's options, commands and image file (see 'qcow2 io -h').
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

/// The single FILE of a command, with qemu-img's message otherwise.
fn one_file(cmd: &str, files: &[String]) -> Result<String, CliError> {
    match files {
        [f] => Ok(f.clone()),
        _ => Err(CliError::usage(cmd, "Expecting one image file name")),
    }
}

fn parse_format(f: Option<&str>) -> Result<Option<Format>, CliError> {
    f.map(|f| Format::parse(f).map_err(CliError::new))
        .transpose()
}

/// `run` with the size argument of `resize` taken off the command line beforehand (as
/// qemu-img does, so that "-1G" is not read as an option).
fn run(cli: Cli, size_arg: Option<String>) -> Result<(), CliError> {
    match cli.command {
        Command::Create(a) => {
            if let Some(x) = a.extra.first() {
                return Err(CliError::usage(
                    "create",
                    &format!("Unexpected argument: {x}"),
                ));
            }
            for def in &a.object {
                secrets::define_object(def).map_err(CliError::new)?;
            }
            create::run(create::CreateRequest {
                format: a.format,
                options: a.options,
                backing: a.backing,
                backing_format: a.backing_format,
                backing_unsafe: a.backing_unsafe,
                quiet: a.quiet,
                filename: a.filename,
                size: a.size,
            })
        }
        Command::Info(mut a) => {
            let output = OutputFormat::parse(a.output.as_deref())?;
            let driver = a.objects.apply(&mut a.files)?;
            let format = format_or_driver(a.format, driver);
            let file = one_file("info", &a.files)?;
            if a.backing_chain {
                return Err(CliError::new("info: --backing-chain is not available yet"));
            }
            image::set_force_share(a.force_share);
            info::run(&file, parse_format(format.as_deref())?, output)
        }
        Command::Check(mut a) => {
            let output = OutputFormat::parse(a.output.as_deref())?;
            let repair = check::parse_repair(a.repair.as_deref())?;
            let driver = a.objects.apply(&mut a.files)?;
            let format = format_or_driver(a.format, driver);
            let file = one_file("check", &a.files)?;
            let _ = a.cache;
            image::set_force_share(a.force_share);
            check::run(check::CheckRequest {
                file,
                format: parse_format(format.as_deref())?,
                repair,
                output,
                quiet: a.quiet,
                progress: a.progress,
            })
        }
        Command::Snapshot(a) => {
            // qemu-img counts every operation option, repeated ones included, before it
            // looks at the file name.
            let ops = usize::from(a.list) + a.create.len() + a.apply.len() + a.delete.len();
            if ops > 1 {
                return Err(CliError::usage(
                    "snapshot",
                    "Cannot mix '-l', '-a', '-c', '-d'",
                ));
            }
            let mut files = a.files;
            let driver = a.objects.apply(&mut files)?;
            let file = one_file("snapshot", &files)?;
            let _ = a.quiet;
            image::set_force_share(a.force_share);
            let format = parse_format(format_or_driver(a.format, driver).as_deref())?;
            let op = if let Some(n) = a.create.into_iter().next() {
                snapshot::SnapshotOp::Create(n)
            } else if let Some(n) = a.apply.into_iter().next() {
                snapshot::SnapshotOp::Apply(n)
            } else if let Some(n) = a.delete.into_iter().next() {
                snapshot::SnapshotOp::Delete(n)
            } else {
                snapshot::SnapshotOp::List
            };
            snapshot::run(&file, format, &op)
        }
        Command::Bitmap(a) => bitmap::run(&a.args),
        Command::Map(mut a) => {
            let output = OutputFormat::parse(a.output.as_deref())?;
            let driver = a.objects.apply(&mut a.files)?;
            let file = one_file("map", &a.files)?;
            image::set_force_share(a.force_share);
            map::run(
                &file,
                parse_format(format_or_driver(a.format, driver).as_deref())?,
                output,
                a.start_offset.as_deref(),
                a.max_length.as_deref(),
            )
        }
        Command::Convert(mut a) => {
            // --image-opts describes the sources; the target (last) is a file name.
            let n = a.files.len().saturating_sub(1);
            let driver = a.objects.apply(&mut a.files[..n])?;
            let source_format = parse_format(format_or_driver(a.format, driver).as_deref())?;
            image::set_force_share(a.force_share);
            convert::run(convert::ConvertRequest {
                source_format,
                target_format: a.output_format,
                compress: a.compress,
                options: a.options,
                progress: a.progress,
                quiet: a.quiet,
                files: a.files,
                bitmaps: a.bitmaps,
                skip_broken_bitmaps: a.skip_broken_bitmaps,
                extra: a.extra,
            })
        }
        Command::Amend(mut a) => {
            if a.options.is_empty() {
                return Err(CliError::usage("amend", "Must specify options (-o)"));
            }
            let driver = a.objects.apply(&mut a.files)?;
            let format = format_or_driver(a.format, driver);
            let file = one_file("amend", &a.files)?;
            amend::run(amend::AmendRequest {
                file,
                format: parse_format(format.as_deref())?,
                options: a.options,
                progress: a.progress,
                quiet: a.quiet,
                force: a.force,
            })
        }
        Command::Resize(mut a) => {
            let driver = a.objects.apply(&mut a.args)?;
            let format = format_or_driver(a.format, driver);
            let (Some(size), [file]) = (size_arg, a.args.as_slice()) else {
                return Err(CliError::usage(
                    "resize",
                    "Expecting image file name and size",
                ));
            };
            match a.preallocation.as_deref() {
                None | Some("off") => {}
                Some(p @ ("metadata" | "falloc" | "full")) => {
                    return Err(CliError::new(format!(
                        "resize: --preallocation={p} is not available yet"
                    )))
                }
                Some(p) => return Err(CliError::new(format!("Invalid preallocation mode '{p}'"))),
            }
            resize::run(
                file,
                parse_format(format.as_deref())?,
                &size,
                a.shrink,
                a.quiet,
            )
        }
        Command::Bench(mut a) => {
            let driver = a.objects.apply(&mut a.files)?;
            a.format = format_or_driver(a.format, driver);
            let params = bench::BenchParams::from_options(&bench::BenchOptions {
                count: a.count,
                depth: a.depth,
                offset: a.offset,
                buffer_size: a.buffer_size,
                step_size: a.step_size,
                write: a.write,
                pattern: a.pattern,
                flush_interval: a.flush_interval,
                no_drain: a.no_drain,
            })?;
            let file = one_file("bench", &a.files)?;
            // qemu-img bench prints its lines even with -q.
            let _ = a.quiet;
            let cache = bench::cache_mode(a.cache.as_deref())?;
            let aio = bench::Aio::parse(a.aio.as_deref(), a.native)?;
            aio.check(&file, cache)?;
            image::set_force_share(a.force_share);
            // Probe only: the lock that matters (and its message) is the benchmark's open.
            let format = match parse_format(a.format.as_deref())? {
                Some(f) => f,
                None => image::probe(&file)?,
            };
            match format {
                Format::Raw => {
                    let storage = qcow2_io::FileStorage::open_cached(&file, params.write, cache);
                    let storage = storage.map_err(|_| {
                        image::open(&file, Some(Format::Raw), params.write)
                            .err()
                            .unwrap_or_else(|| CliError::new(format!("Could not open '{file}'")))
                    })?;
                    image::lock(
                        &storage,
                        &file,
                        image::FileRole::Raw { resize: false },
                        params.write,
                    )
                    .map_err(|e| image::open_error(&file, e))?;
                    bench::run(&bench::RawFile(storage), &params)
                }
                Format::Qcow2 => {
                    let extras = qcowdev::OpenExtras {
                        io_uring: aio.queued(),
                        ..Default::default()
                    };
                    let (image, uring) = qcowdev::open_image_extras_uring(
                        &file,
                        !params.write,
                        false,
                        cache,
                        qcow2_io::Locking::Auto,
                        &[],
                        extras,
                    )
                    .map_err(|e| image::open_error(&file, e))?;
                    let shared = qcow2_image::SharedImage::new(image);
                    // Without a usable io_uring (the message is printed), the thread pool.
                    if aio.queued() && uring {
                        bench::run_queued(&shared, &params)?;
                    } else {
                        bench::run(&shared, &params)?;
                    }
                    shared
                        .close()
                        .map_err(|e| CliError::new(format!("Error while closing the image: {e}")))
                }
            }
        }
        Command::Serve(a) => serve::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Compare(a) => {
            image::set_force_share(a.force_share);
            compare::run(compare::CompareRequest {
                format_a: a.format_a,
                format_b: a.format_b,
                cache: a.cache,
                progress: a.progress,
                quiet: a.quiet,
                strict: a.strict,
                files: a.files,
            })
        }
        Command::Measure(a) => {
            let output = OutputFormat::parse(a.output.as_deref())?;
            let size = a
                .size
                .as_deref()
                .map(create::parse_image_size)
                .transpose()?;
            image::set_force_share(a.force_share);
            for def in &a.object {
                secrets::define_object(def).map_err(CliError::new)?;
            }
            measure::run(measure::MeasureRequest {
                output,
                target_format: a.target_format,
                options: a.options,
                snapshot: a.snapshot,
                size,
                format: a.format,
                files: a.files,
            })
        }
        Command::Dd(a) => {
            image::set_force_share(a.force_share);
            dd::run(dd::DdRequest {
                format: a.format,
                output_format: a.output_format,
                operands: a.operands,
            })
        }
        Command::Io(a) => match ioshell::main(&a.args) {
            0 => Ok(()),
            code => Err(CliError {
                msg: String::new(),
                code,
            }),
        },
    }
}

/// Turns a clap error into one line (qemu-img exits with 1 on bad options; so do we).
fn clap_error(e: clap::Error, args: &[String]) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!(
                    "{}Not enough arguments (see 'qcow2 --help')",
                    prog::prefix()
                );
                return ExitCode::from(1);
            }
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let sub = args
                .iter()
                .skip(1)
                .find(|a| !a.starts_with('-'))
                .map(String::as_str);
            match sub {
                Some(s) if Cli::command_names().contains(&s) => {
                    eprintln!("{}{s}: {first} (see 'qcow2 {s} --help')", prog::prefix())
                }
                _ => eprintln!("{}{first} (see 'qcow2 --help')", prog::prefix()),
            }
            ExitCode::from(1)
        }
    }
}

impl Cli {
    fn command_names() -> [&'static str; 17] {
        [
            "create", "info", "check", "snapshot", "map", "convert", "amend", "resize", "bench",
            "io", "compare", "measure", "dd", "serve", "rebase", "commit", "bitmap",
        ]
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{}internal error: {info}", prog::prefix());
        stdio::flush();
        std::process::exit(1);
    }));
    let code = run_main();
    stdio::flush();
    code
}

/// The program after the panic hook: the personality's command line and command.
fn run_main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Called as qemu-io, the binary is `qcow2 io`; as qemu-img, `qcow2` with that name.
    if prog::init(args.first().map(String::as_str).unwrap_or("")) == prog::Personality::QemuIo {
        return ExitCode::from(ioshell::main(args.get(1..).unwrap_or(&[])));
    }
    let mut args = args;
    if prog::personality() == prog::Personality::QemuNbd {
        // Called as qemu-nbd, the binary is `qcow2 serve` (qemu-nbd's command line).
        args.insert(1, "serve".to_string());
    }
    // qemu-img takes the size off the end of a resize command line before parsing options.
    let size_arg = if args.get(1).map(String::as_str) == Some("resize")
        && args.len() > 3
        && !args.iter().skip(2).any(|a| a == "-h" || a == "--help")
    {
        args.pop()
    } else {
        None
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return clap_error(e, &args),
    };
    match run(cli, size_arg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An empty message means the command already reported what failed.
            if !e.msg.is_empty() {
                eprintln!("{}{}", prog::prefix(), e.msg);
            }
            ExitCode::from(e.code)
        }
    }
}
