//! qemu-io's command language (`qcow2 io`, or the binary called as `qemu-io`): the command
//! table, option parsing (glibc getopt with permutation), and every command's behaviour,
//! messages and output as qemu-io 10 prints them.
//!
//! Commands: `read`, `readv`, `write`, `writev`, `aio_read`, `aio_write`, `aio_flush`,
//! `discard`, `flush`, `truncate`, `length`, `info`, `map`, `alloc`, `open`, `close`,
//! `reopen`, `help`, `quit`, `sleep`, `sigraise`, `abort`; the blkdebug (`break` ...) and
//! zoned (`zone_*`) commands fail as on a device without that support. AIO commands run
//! synchronously, in order (qemu-io may complete them in any order; scripts wait with
//! `aio_flush`). The session (which device is open, how to open another) is the caller's
//! [`Shell`]; the command loop and the global options live in `ioshell`.

use std::time::{Duration, Instant};

use crate::size::{parse_size, SizeError};

/// What the `io` commands need from an opened image. Errors are `errno` values.
pub trait BlockDev {
    /// Format name for `info` ("raw", "qcow2").
    fn format_name(&self) -> &'static str;
    /// Virtual size in bytes.
    fn length(&mut self) -> Result<u64, i32>;
    /// Reads `buf.len()` bytes at `offset` (inside the device).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Writes `buf` at `offset` (inside the device).
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    /// Writes a compressed cluster (EINVAL when unaligned, ENOTSUP when unsupported).
    fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    /// Makes a range read as zeros; `unmap` allows deallocating it.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32>;
    /// Discards a range.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32>;
    /// Flushes to stable storage.
    fn flush(&mut self) -> Result<(), i32>;
    /// Changes the virtual size.
    fn truncate(&mut self, len: u64) -> Result<(), i32>;
    /// Whether the range starting at `offset` is allocated in this layer, and for how many
    /// bytes (at most `len`) that answer holds.
    fn is_allocated(&mut self, offset: u64, len: u64) -> Result<(bool, u64), i32>;
    /// Cluster size and VM-state offset for `info` (zeros for raw).
    fn info(&mut self) -> (u64, u64);
    /// Lines of "Format specific information" for `info` (without the heading).
    fn specific_info(&mut self) -> Vec<String>;
    /// Whether writes are refused (opened read-only).
    fn read_only(&self) -> bool;
    /// The protocol name of a protocol driver, which `info` prints as a second "format
    /// name" line, as QEMU's does (`null-co`); `None` for format drivers.
    fn protocol_name(&self) -> Option<&'static str> {
        None
    }
    /// Whether the driver has cluster information for `info` (QEMU's `bdrv_get_info`);
    /// without it `info` stops after the names and fails.
    fn has_info(&self) -> bool {
        true
    }
    /// The driver of the backing image, if there is one (for `reopen`'s unchanged
    /// `backing.driver`).
    fn backing_driver(&self) -> Option<String> {
        None
    }
    /// Zeroes a range only if that needs no data write (qemu-io's `write -z -n`,
    /// `BDRV_REQ_NO_FALLBACK`); `ENOTSUP` otherwise (the default).
    fn write_zeroes_fast(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        let _ = (offset, len, unmap);
        Err(ENOTSUP)
    }
    /// False once the device cannot serve anything (QEMU drops the driver of an image a
    /// corruption was found in); `info` then prints nothing.
    fn usable(&self) -> bool {
        true
    }
    /// Reads the VM state area (`read -b`); `ENOTSUP` by default.
    fn load_vmstate(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let _ = (offset, buf);
        Err(ENOTSUP)
    }
    /// Writes the VM state area (`write -b`); `ENOTSUP` by default.
    fn save_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        let _ = (offset, buf);
        Err(ENOTSUP)
    }
}

/// `ENOTSUP`.
pub const ENOTSUP: i32 = 95;
/// `EIO`.
pub const EIO: i32 = 5;
/// `ENOMEDIUM` (a device a corruption made unusable).
pub const ENOMEDIUM: i32 = 123;

/// `strerror` text for the errno values the engine reports.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// qemu-io's `cvtstr`: "%.3f" with a binary unit, ".000" dropped ("64 KiB", "1.125 MiB",
/// "512 bytes").
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (mut s, suffix) = match UNITS.iter().find(|(u, _)| value >= *u) {
        Some((u, suffix)) => (format!("{:.3}", value / u), *suffix),
        None => (format!("{value:.6}"), " bytes"),
    };
    match s.find(".000") {
        Some(i) => {
            s.truncate(i);
            s.push_str(suffix);
        }
        None => s.push_str(suffix),
    }
    s
}

/// qemu-io's `timestr` without flags: "00.00 sec" under a second, "H:MM:SS.ss" above.
pub fn timestr(t: Duration) -> String {
    timestr_with(t, false)
}

/// qemu-io's `timestr`; `fixed` is `VERBOSE_FIXED_TIME` ("H:MM:SS.ss" always).
fn timestr_with(t: Duration, fixed: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if secs == 0 && !fixed {
        format!("{frac:05.2} sec")
    } else {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    }
}

/// The two report lines of read/write/discard.
pub fn report(op: &str, t: Duration, offset: u64, count: u64, total: u64, ops: u64) -> String {
    let secs = t.as_secs_f64().max(1e-9);
    format!(
        "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(total as f64),
        timestr(t),
        cvtstr(total as f64 / secs),
        ops as f64 / secs
    )
}

/// The `-C` report: "bytes,ops,H:MM:SS.ss,bytes/sec,ops/sec".
pub fn report_machine(t: Duration, total: u64, ops: u64) -> String {
    let secs = t.as_secs_f64().max(1e-9);
    format!(
        "{total},{ops},{},{:.3},{:.3}\n",
        timestr_with(t, true),
        total as f64 / secs,
        ops as f64 / secs
    )
}

/// qemu-io's `dump_buffer` (`read -v`).
pub fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut s = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        s.push_str(&format!("{:08x}:  ", offset + (i as u64) * 16));
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

/// Which standard stream a piece of output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (buffered by the shell as C's stdio buffers it).
    Out,
    /// Standard error (written at once).
    Err,
}

/// How a command ends the program, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `quit`: stop reading commands.
    Quit,
    /// `sigraise N`: flush the standard streams, then raise signal N.
    Raise(i32),
    /// `abort`: abort(3) at once (buffered output is lost, as in C).
    Abort,
}

/// One command's result: its output in the order written, and whether it failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Output pieces in order.
    pub chunks: Vec<(Stream, String)>,
    /// Whether the command failed (the exit status becomes 1).
    pub failed: bool,
    /// Whether the command ends the program.
    pub exit: Option<Exit>,
    /// Where the completion output of an AIO request starts in `chunks`.
    completion_at: Option<usize>,
    /// Output of an AIO request's completion, which qemu-io prints later: when requests
    /// are drained (`aio_flush`, `close`, `reopen`, exit), or after the next prompt when
    /// reading standard input.
    pub deferred: Vec<(Stream, String)>,
    /// The command drains AIO requests: earlier completions print after its output.
    pub drains: bool,
}

impl Outcome {
    /// Appends text for standard output.
    pub fn out(&mut self, s: impl AsRef<str>) {
        self.push(Stream::Out, s.as_ref());
    }
    /// Appends text for standard error.
    pub fn err(&mut self, s: impl AsRef<str>) {
        self.push(Stream::Err, s.as_ref());
    }
    /// Appends an `error_report` line: "PROG: MSG\n" on standard error.
    pub fn error_report(&mut self, msg: impl AsRef<str>) {
        let line = format!("{}{}\n", crate::prog::prefix(), msg.as_ref());
        self.push(Stream::Err, &line);
    }
    /// Marks the start of an AIO request's completion output.
    fn complete(&mut self) {
        self.completion_at = Some(self.chunks.len());
    }
    fn push(&mut self, stream: Stream, s: &str) {
        if self.completion_at == Some(self.chunks.len()) {
            // A new chunk begins the completion; never merge into the submission's.
            self.chunks.push((stream, s.to_string()));
            return;
        }
        if s.is_empty() {
            return;
        }
        match self.chunks.last_mut() {
            Some((st, text)) if *st == stream => text.push_str(s),
            _ => self.chunks.push((stream, s.to_string())),
        }
    }
}

/// The session a command runs in: the open device, and opening, closing and reopening
/// (which the command loop owns).
pub trait Shell {
    /// The open device, if any.
    fn device(&mut self) -> Option<&mut dyn BlockDev>;
    /// `open [-rsCnkU] [-t cache] [-d discard] [-i aio] [-o options] [path]`, options
    /// already parsed; the messages go to `o`. `Err(Fail::Usage)` prints the usage line.
    fn open(&mut self, p: &Parsed, o: &mut Outcome) -> Result<(), Fail>;
    /// `close`.
    fn close(&mut self);
    /// `reopen [-r|-w] [-c cache] [-o options]`, options already parsed.
    fn reopen(&mut self, p: &Parsed, o: &mut Outcome) -> Result<(), Fail>;
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// Print the command's usage line (qemu-io's `qemuio_command_usage`).
    Usage,
    /// The command printed its message already.
    Done,
}

type CmdResult = Result<(), Fail>;

/// May the command run without an open device (`CMD_NOFILE_OK`, `CMD_FLAG_GLOBAL`)?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoFile {
    /// Needs an open device.
    No,
    /// Runs without one.
    Ok,
}

/// One entry of the command table (qemu-io's `cmdinfo_t`).
struct Spec {
    name: &'static str,
    altname: Option<&'static str>,
    /// getopt option string (a letter followed by ':' takes an argument).
    opts: &'static str,
    argmin: usize,
    /// `None`: no upper bound.
    argmax: Option<usize>,
    /// `false`: the argument count is never checked (`quit`).
    check_args: bool,
    /// `None` prints as "(null)" in a usage line, as qemu-io does.
    args: Option<&'static str>,
    oneline: &'static str,
    /// Needs write permission (`BLK_PERM_WRITE`).
    writes: bool,
    nofile: NoFile,
}

const fn spec(name: &'static str, args: Option<&'static str>, oneline: &'static str) -> Spec {
    Spec {
        name,
        altname: None,
        opts: "",
        argmin: 0,
        argmax: Some(0),
        check_args: true,
        args,
        oneline,
        writes: false,
        nofile: NoFile::No,
    }
}

/// The command table, sorted by name as qemu-io sorts it for `help`.
const SPECS: &[Spec] = &[
    Spec {
        nofile: NoFile::Ok,
        ..spec("abort", None, "simulate a program crash using abort(3)")
    },
    spec("aio_flush", None, "completes all outstanding aio requests"),
    Spec {
        opts: "CiP:qrv",
        argmin: 2,
        argmax: None,
        ..spec(
            "aio_read",
            Some("[-Ciqrv] [-P pattern] off len [len..]"),
            "asynchronously reads a number of bytes",
        )
    },
    Spec {
        opts: "CfiP:qruz",
        argmin: 2,
        argmax: None,
        writes: true,
        ..spec(
            "aio_write",
            Some("[-Cfiqruz] [-P pattern] off len [len..]"),
            "asynchronously writes a number of bytes",
        )
    },
    Spec {
        argmin: 1,
        argmax: Some(2),
        ..spec(
            "alloc",
            Some("offset [count]"),
            "checks if offset is allocated in the file",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        ..spec(
            "break",
            Some("event tag"),
            "sets a breakpoint on event and tags the stopped request as tag",
        )
    },
    Spec {
        altname: Some("c"),
        ..spec("close", None, "close the current open file")
    },
    Spec {
        altname: Some("d"),
        opts: "Cq",
        argmin: 2,
        argmax: None,
        writes: true,
        ..spec(
            "discard",
            Some("[-Cq] off len"),
            "discards a number of bytes at a specified offset",
        )
    },
    Spec {
        altname: Some("f"),
        ..spec("flush", None, "flush all in-core file state to disk")
    },
    Spec {
        altname: Some("?"),
        argmax: Some(1),
        nofile: NoFile::Ok,
        ..spec("help", Some("[command]"), "help for one or all commands")
    },
    Spec {
        altname: Some("i"),
        ..spec("info", None, "prints information about the current file")
    },
    Spec {
        altname: Some("l"),
        ..spec("length", None, "gets the length of the current file")
    },
    spec("map", Some(""), "prints the allocated areas of a file"),
    Spec {
        altname: Some("o"),
        opts: "snCro:ki:t:d:U",
        argmin: 1,
        argmax: None,
        nofile: NoFile::Ok,
        ..spec(
            "open",
            Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
            "open the file specified by path",
        )
    },
    Spec {
        altname: Some("q"),
        check_args: false,
        nofile: NoFile::Ok,
        ..spec("quit", None, "exit the program")
    },
    Spec {
        altname: Some("r"),
        opts: "bCl:pP:qrs:v",
        argmin: 2,
        argmax: None,
        ..spec(
            "read",
            Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
            "reads a number of bytes at a specified offset",
        )
    },
    Spec {
        opts: "CP:qrv",
        argmin: 2,
        argmax: None,
        ..spec(
            "readv",
            Some("[-Cqrv] [-P pattern] off len [len..]"),
            "reads a number of bytes at a specified offset",
        )
    },
    Spec {
        argmin: 1,
        argmax: Some(1),
        ..spec("remove_break", Some("tag"), "remove a breakpoint by tag")
    },
    Spec {
        opts: "c:o:rw",
        argmin: 0,
        argmax: None,
        ..spec(
            "reopen",
            Some("[(-r|-w)] [-c cache] [-o options]"),
            "reopens an image with new options",
        )
    },
    Spec {
        argmin: 1,
        argmax: Some(1),
        ..spec("resume", Some("tag"), "resumes the request tagged as tag")
    },
    Spec {
        argmin: 1,
        argmax: Some(1),
        nofile: NoFile::Ok,
        ..spec("sigraise", Some("signal"), "raises a signal")
    },
    Spec {
        argmin: 1,
        argmax: Some(1),
        nofile: NoFile::Ok,
        ..spec("sleep", None, "waits for the given value in milliseconds")
    },
    Spec {
        altname: Some("t"),
        opts: "m:",
        argmin: 1,
        argmax: Some(3),
        writes: true,
        ..spec(
            "truncate",
            Some("[-m prealloc_mode] off"),
            "truncates the current file at the given offset",
        )
    },
    Spec {
        argmin: 1,
        argmax: Some(1),
        ..spec(
            "wait_break",
            Some("tag"),
            "waits for the suspension of a request",
        )
    },
    Spec {
        altname: Some("w"),
        opts: "bcCfnpP:qrs:uz",
        argmin: 2,
        argmax: None,
        writes: true,
        ..spec(
            "write",
            Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
            "writes a number of bytes at a specified offset",
        )
    },
    Spec {
        opts: "CfqrP:",
        argmin: 2,
        argmax: None,
        writes: true,
        ..spec(
            "writev",
            Some("[-Cfqr] [-P pattern] off len [len..]"),
            "writes a number of bytes at a specified offset",
        )
    },
    Spec {
        argmin: 3,
        argmax: Some(4),
        writes: true,
        ..spec(
            "zone_append",
            Some("offset len [len..]"),
            "append write a number of bytes at a specified offset",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        writes: true,
        ..spec(
            "zone_close",
            Some("offset len"),
            "close a range of zones in zone block device",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        writes: true,
        ..spec(
            "zone_finish",
            Some("offset len"),
            "finish a range of zones in zone block device",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        writes: true,
        ..spec(
            "zone_open",
            Some("offset len"),
            "explicit open a range of zones in zone block device",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        ..spec(
            "zone_report",
            Some("offset number"),
            "report zone information",
        )
    },
    Spec {
        argmin: 2,
        argmax: Some(2),
        writes: true,
        ..spec(
            "zone_reset",
            Some("offset len"),
            "reset a zone write pointer in zone block device",
        )
    },
];

fn find_spec(name: &str) -> Option<&'static Spec> {
    SPECS
        .iter()
        .find(|s| s.name == name || s.altname == Some(name))
}

/// `help`'s line for one command: "NAME [ARGS ]-- ONELINE".
fn help_line(name: &str, spec: &Spec) -> String {
    match spec.args {
        Some(a) => format!("{name} {a} -- {}\n", spec.oneline),
        None => format!("{name} -- {}\n", spec.oneline),
    }
}

/// qemu-io's usage line of a command (an absent args string prints as "(null)").
fn usage_line(spec: &Spec) -> String {
    format!(
        "{} {} -- {}\n",
        spec.name,
        spec.args.unwrap_or("(null)"),
        spec.oneline
    )
}

/// Parsed options and operands of one command (GNU getopt with permutation).
#[derive(Debug, Default)]
pub struct Parsed {
    flags: Vec<(char, Option<String>)>,
    operands: Vec<String>,
}

impl Parsed {
    /// Whether option `c` was given.
    pub fn has(&self, c: char) -> bool {
        self.flags.iter().any(|(f, _)| *f == c)
    }
    /// The last value of option `c`.
    pub fn value(&self, c: char) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| *f == c)
            .and_then(|(_, v)| v.as_deref())
    }
    /// Every option in order, with its value.
    pub fn flags(&self) -> &[(char, Option<String>)] {
        &self.flags
    }
    /// The operands (non-option words) in order.
    pub fn operands(&self) -> &[String] {
        &self.operands
    }
}

/// glibc getopt with argument permutation over `args` (without the command name); errors
/// are getopt's messages, naming the command as `cmd`.
pub fn getopt(cmd: &str, opts: &str, args: &[String]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            p.operands.extend(args[i + 1..].iter().cloned());
            break;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                let pos = opts.find(c).filter(|_| c != ':');
                let Some(pos) = pos else {
                    return Err(format!("{cmd}: invalid option -- '{c}'\n"));
                };
                let takes_arg = opts[pos + c.len_utf8()..].starts_with(':');
                if takes_arg {
                    let rest: String = chars[j + 1..].iter().collect();
                    let value = if !rest.is_empty() {
                        rest
                    } else {
                        i += 1;
                        match args.get(i) {
                            Some(v) => v.clone(),
                            None => {
                                return Err(format!(
                                    "{cmd}: option requires an argument -- '{c}'\n"
                                ))
                            }
                        }
                    };
                    p.flags.push((c, Some(value)));
                    break;
                }
                p.flags.push((c, None));
                j += 1;
            }
        } else {
            p.operands.push(a.clone());
        }
        i += 1;
    }
    Ok(p)
}

/// qemu-io's `cvtnum` with `print_cvtnum_err`'s messages.
fn cvtnum(arg: &str) -> Result<u64, String> {
    match parse_size(arg) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(SizeError::Overflow) => {
            Err(format!("Parsing error: argument too large -- {arg}\n"))
        }
        Err(SizeError::Invalid) => Err(format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        )),
    }
}

/// [`cvtnum`], printing the error on standard output.
fn num(o: &mut Outcome, arg: &str) -> Result<u64, Fail> {
    cvtnum(arg).map_err(|m| {
        o.out(m);
        Fail::Done
    })
}

/// qemu-io's `parse_pattern`: a C integer (decimal, 0x hex, 0 octal) in 0..=255.
fn parse_pattern(arg: &str) -> Result<u8, String> {
    let bad = || format!("{arg} is not a valid pattern byte\n");
    let t = arg.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<i64>()
    }
    .map_err(|_| bad())?;
    if neg && v != 0 {
        return Err(bad());
    }
    u8::try_from(v).map_err(|_| bad())
}

fn pattern(o: &mut Outcome, p: &Parsed) -> Result<Option<u8>, Fail> {
    p.value('P').map(parse_pattern).transpose().map_err(|m| {
        o.out(m);
        Fail::Done
    })
}

/// C's `strtol(s, &end, 0)` accepting the whole string (for `sleep`).
fn strtol_whole(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let signed = t.starts_with(['-', '+']);
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else if t.is_empty() {
        // strtol converts nothing: "" is a valid 0 (the end pointer is at the end), a lone
        // sign is not (the end pointer stays on it).
        if signed {
            return None;
        }
        0
    } else {
        t.parse::<i64>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// Splits a command line into words as qemu-io's `breakline` does: at single spaces, empty
/// words dropped; quotes and tabs are ordinary characters.
pub fn split_words(line: &str) -> Vec<String> {
    line.split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs one command line in `shell`.
pub fn run_command(shell: &mut dyn Shell, line: &str) -> Outcome {
    let mut o = Outcome::default();
    let words = split_words(line);
    let Some((name, args)) = words.split_first() else {
        return o;
    };
    let Some(spec) = find_spec(name) else {
        o.err(format!("command \"{name}\" not found\n"));
        o.failed = true;
        return o;
    };
    if spec.nofile == NoFile::No && shell.device().is_none() {
        o.err("no file open, try 'help open'\n");
        o.failed = true;
        return o;
    }
    let n = args.len();
    if spec.check_args && (n < spec.argmin || spec.argmax.is_some_and(|m| n > m)) {
        let msg = match spec.argmax {
            None => format!(
                "bad argument count {n} to {name}, expected at least {} arguments\n",
                spec.argmin
            ),
            Some(m) if m == spec.argmin => {
                format!("bad argument count {n} to {name}, expected {m} arguments\n")
            }
            Some(m) => format!(
                "bad argument count {n} to {name}, expected between {} and {m} arguments\n",
                spec.argmin
            ),
        };
        o.err(msg);
        o.failed = true;
        return o;
    }
    if spec.writes && shell.device().is_some_and(|d| d.read_only()) {
        o.error_report("Block node is read-only");
        o.failed = true;
        return o;
    }
    // Only the commands with options run getopt; the others take every word as it is
    // ("sleep -5", "alloc -1").
    let parsed = if spec.opts.is_empty() {
        Ok(Parsed {
            flags: Vec::new(),
            operands: args.to_vec(),
        })
    } else {
        getopt(name, spec.opts, args)
    };
    let result = match parsed {
        Ok(p) => dispatch(shell, spec, name, &p, &mut o),
        Err(e) => {
            o.err(e);
            Err(Fail::Usage)
        }
    };
    match result {
        Ok(()) => {}
        Err(Fail::Usage) => {
            o.out(usage_line(spec));
            o.failed = true;
        }
        Err(Fail::Done) => o.failed = true,
    }
    o.drains = matches!(spec.name, "aio_flush" | "close" | "reopen");
    o
}

fn dispatch(
    shell: &mut dyn Shell,
    spec: &Spec,
    typed: &str,
    p: &Parsed,
    o: &mut Outcome,
) -> CmdResult {
    match spec.name {
        "help" => return cmd_help(p, o),
        "quit" => {
            o.exit = Some(Exit::Quit);
            return Ok(());
        }
        "sleep" => return cmd_sleep(p, o),
        "sigraise" => return cmd_sigraise(shell, p, o),
        "abort" => {
            o.exit = Some(Exit::Abort);
            return Ok(());
        }
        "open" => return shell.open(p, o),
        "close" => {
            shell.close();
            return Ok(());
        }
        "reopen" => return shell.reopen(p, o),
        _ => {}
    }
    let Some(dev) = shell.device() else {
        o.err("no file open, try 'help open'\n");
        return Err(Fail::Done);
    };
    match spec.name {
        "read" => cmd_read(dev, p, o),
        "readv" => cmd_readv(dev, p, o, false),
        "aio_read" => aio(o, |o| cmd_readv(dev, p, o, true)),
        "write" => cmd_write(dev, p, o),
        "writev" => cmd_writev(dev, p, o, false),
        "aio_write" => aio(o, |o| cmd_writev(dev, p, o, true)),
        "aio_flush" => Ok(()),
        "discard" => cmd_discard(dev, p, o),
        // qemu-io's flush prints nothing, also when it fails.
        "flush" => dev.flush().map_err(|_| Fail::Done),
        "map" => cmd_map(dev, o),
        "alloc" => cmd_alloc(dev, p, o),
        "info" => cmd_info(dev, o),
        "truncate" => cmd_truncate(dev, p, o),
        "length" => match dev.length() {
            Ok(l) => {
                o.out(format!("{}\n", cvtstr(l as f64)));
                Ok(())
            }
            Err(e) => {
                o.out(format!("getlength: {}\n", strerror(e)));
                Err(Fail::Done)
            }
        },
        "break" => {
            o.out(format!("Could not set breakpoint: {}\n", strerror(ENOTSUP)));
            Err(Fail::Done)
        }
        "remove_break" => {
            o.out(format!(
                "Could not remove breakpoint {}: {}\n",
                p.operands.first().map(String::as_str).unwrap_or(""),
                strerror(ENOTSUP)
            ));
            Err(Fail::Done)
        }
        "resume" => {
            o.out(format!("Could not resume request: {}\n", strerror(ENOTSUP)));
            Err(Fail::Done)
        }
        "wait_break" => {
            // qemu-io waits forever on a device without blkdebug; this one says why it
            // cannot wait instead of hanging.
            o.error_report(format!(
                "{typed}: no blkdebug breakpoints on this device: {}",
                strerror(ENOTSUP)
            ));
            Err(Fail::Done)
        }
        zone if zone.starts_with("zone_") => {
            let what = &zone["zone_".len()..];
            o.out(format!("zone {what} failed: {}\n", strerror(ENOTSUP)));
            Err(Fail::Done)
        }
        _ => Ok(()),
    }
}

/// Runs an AIO command: what it prints up to its submission is printed now, what its
/// completion prints (after [`Outcome::complete`]) is deferred.
fn aio(o: &mut Outcome, f: impl FnOnce(&mut Outcome) -> CmdResult) -> CmdResult {
    let before = o.chunks.len();
    let r = f(o);
    let split = o.completion_at.take().unwrap_or(o.chunks.len()).max(before);
    o.deferred = o.chunks.split_off(split);
    r
}

fn cmd_help(p: &Parsed, o: &mut Outcome) -> CmdResult {
    match p.operands.first() {
        None => {
            for s in SPECS {
                o.out(help_line(s.name, s));
            }
            o.out("\nUse 'help commandname' for extended help.\n");
            Ok(())
        }
        Some(name) => match find_spec(name) {
            Some(s) => {
                o.out(help_line(name, s));
                if let Some(text) = long_help(s.name) {
                    o.out(text);
                }
                Ok(())
            }
            None => {
                o.out(format!("command {name} not found\n"));
                Err(Fail::Done)
            }
        },
    }
}

/// The extended help of `help COMMAND` (this tool's own wording; the options are
/// qemu-io's).
fn long_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "read" | "readv" | "aio_read" => {
            "
 Reads OFF..OFF+LEN of the open image (readv: the lengths of several buffers
 read as one request; aio_read: the same, reported when it completes).

 -b, -- the VM state area instead of the guest disk (read only)
 -C, -- one machine-readable statistics line: bytes,ops,time,bytes/s,ops/s
 -i, -- (aio_read) count an invalid request instead of reading
 -l, -- how many bytes the pattern check covers (with -P)
 -p, -- ignored
 -P, -- check that every byte read equals this pattern byte
 -q, -- no statistics
 -r, -- ignored (buffer registration)
 -s, -- where in the buffer the pattern check starts (with -P)
 -v, -- hex dump of the data read

"
        }
        "write" | "writev" | "aio_write" => {
            "
 Writes OFF..OFF+LEN of the open image with the byte 0xcd unless told otherwise
 (writev: the lengths of several buffers written as one request; aio_write: the
 same, reported when it completes).

 -b, -- the VM state area instead of the guest disk (write only)
 -c, -- write compressed clusters
 -C, -- one machine-readable statistics line: bytes,ops,time,bytes/s,ops/s
 -f, -- Force Unit Access: the data is flushed before the command completes
 -i, -- (aio_write) count an invalid request instead of writing
 -n, -- with -z: fail rather than write zeroes as data
 -p, -- ignored
 -P, -- fill with this pattern byte
 -q, -- no statistics
 -r, -- ignored (buffer registration)
 -s, -- fill with the contents of this file, repeated
 -u, -- with -z: the range may be deallocated
 -z, -- write zeroes without data

"
        }
        "open" => {
            "
 Opens an image for the other commands (one at a time; 'close' first).

 -r, -- read-only
 -s, -- writes go to a temporary overlay that is thrown away
 -C, -- copy-on-read: data read from a backing file is copied into the image
 -n, -- no host cache (-t none)
 -U, -- share the image with other writers
 -k, -- native AIO (-i native)
 -i, -- AIO mode: threads, native or io_uring
 -t, -- cache mode: none, writeback, writethrough, directsync or unsafe
 -d, -- discard mode: ignore or unmap
 -o, -- block driver options, e.g. driver=qcow2,lazy-refcounts=on

"
        }
        "reopen" => {
            "
 Opens the current image again with other settings.

 -r, -- read-only
 -w, -- read-write
 -c, -- another cache mode
 -o, -- other qcow2 options (e.g. lazy-refcounts=on, l2-cache-size=1M)

"
        }
        "discard" => {
            "
 Discards OFF..OFF+LEN of the open image.

 -C, -- one machine-readable statistics line: bytes,ops,time,bytes/s,ops/s
 -q, -- no statistics

"
        }
        "sigraise" => {
            "
 Raises the signal numbered SIGNAL in this process (e.g. 'sigraise 9' kills it
 as a crash would, after what was written so far has reached the image file).

"
        }
        _ => return None,
    })
}

fn cmd_sleep(p: &Parsed, o: &mut Outcome) -> CmdResult {
    let arg = p.operands.first().map(String::as_str).unwrap_or("");
    match strtol_whole(arg) {
        Some(ms) if ms >= 0 => {
            std::thread::sleep(Duration::from_millis(ms as u64));
            Ok(())
        }
        _ => {
            o.out(format!("{arg} is not a valid number\n"));
            Err(Fail::Done)
        }
    }
}

/// The highest signal number plus one (Linux `NSIG`).
const NSIG: u64 = 65;

fn cmd_sigraise(shell: &mut dyn Shell, p: &Parsed, o: &mut Outcome) -> CmdResult {
    let arg = p.operands.first().map(String::as_str).unwrap_or("");
    let sig = num(o, arg)?;
    if sig > NSIG {
        o.out(format!(
            "signal argument '{arg}' is too large to be a valid signal\n"
        ));
        return Err(Fail::Done);
    }
    // What qemu-io wrote before the signal is in the image file (its metadata cache
    // writes through to the OS); write ours out so that the same data survives.
    if let Some(dev) = shell.device() {
        let _ = dev.flush();
    }
    o.exit = Some(Exit::Raise(sig as i32));
    Ok(())
}

/// Checks `[offset, offset + len)` against the device like the block layer (EIO beyond the
/// end).
fn in_range(dev: &mut dyn BlockDev, offset: u64, len: u64) -> Result<(), i32> {
    let size = dev.length()?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(EIO),
    }
}

/// `BDRV_REQUEST_MAX_BYTES`: the largest request qemu-io passes on.
const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

fn alloc_buffer(len: u64, fill: u8) -> Vec<u8> {
    vec![fill; len as usize]
}

fn sector_aligned(o: &mut Outcome, v: u64, what: &str) -> CmdResult {
    if v % 512 != 0 {
        o.out(format!("{v} is not a sector-aligned value for '{what}'\n"));
        return Err(Fail::Done);
    }
    Ok(())
}

fn print_report(
    o: &mut Outcome,
    p: &Parsed,
    op: &str,
    t: Duration,
    offset: u64,
    count: u64,
    total: u64,
) {
    if p.has('C') {
        o.out(report_machine(t, total, 1));
    } else {
        o.out(report(op, t, offset, count, total, 1));
    }
}

fn cmd_read(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> CmdResult {
    let mut pattern_count: Option<u64> = None;
    let mut pattern_offset = 0u64;
    let mut pat = None;
    for (c, v) in &p.flags {
        let v = v.as_deref().unwrap_or("");
        match c {
            'l' => pattern_count = Some(num(o, v)?),
            's' => pattern_offset = num(o, v)?,
            'P' => {
                pat = Some(parse_pattern(v).map_err(|m| {
                    o.out(m);
                    Fail::Done
                })?)
            }
            _ => {}
        }
    }
    if p.operands.len() != 2 {
        return Err(Fail::Usage);
    }
    let offset = num(o, &p.operands[0])?;
    let count = num(o, &p.operands[1])?;
    if count > MAX_REQUEST {
        o.out(format!(
            "length cannot exceed {MAX_REQUEST}, given {}\n",
            p.operands[1]
        ));
        return Err(Fail::Done);
    }
    if pat.is_none() && (p.has('l') || p.has('s')) {
        return Err(Fail::Usage);
    }
    let pattern_count = match pattern_count {
        Some(c) => Some(c),
        None => count.checked_sub(pattern_offset),
    };
    let pattern_count = match pattern_count {
        Some(c) if c.checked_add(pattern_offset).is_some_and(|e| e <= count) => c,
        _ => {
            o.out("pattern verification range exceeds end of read data\n");
            return Err(Fail::Done);
        }
    };
    let vmstate = p.has('b');
    if vmstate {
        sector_aligned(o, offset, "offset")?;
        sector_aligned(o, count, "count")?;
    }
    let mut buf = alloc_buffer(count, 0xab);
    let start = Instant::now();
    let res = if vmstate {
        dev.load_vmstate(offset, &mut buf)
    } else {
        in_range(dev, offset, count).and_then(|_| dev.read(offset, &mut buf))
    };
    let t = start.elapsed();
    if let Err(e) = res {
        o.out(format!("read failed: {}\n", strerror(e)));
        return Err(Fail::Done);
    }
    let mut result = Ok(());
    if let Some(pat) = pat {
        let lo = pattern_offset as usize;
        let hi = lo + pattern_count as usize;
        if buf[lo..hi].iter().any(|&b| b != pat) {
            o.out(format!(
                "Pattern verification failed at offset {}, {pattern_count} bytes\n",
                offset + pattern_offset
            ));
            result = Err(Fail::Done);
        }
    }
    if p.has('q') {
        return result;
    }
    if p.has('v') {
        o.out(dump_buffer(&buf, offset));
    }
    print_report(o, p, "read", t, offset, count, count);
    result
}

/// qemu-io's `create_iovec`: the total length of the vector `args`.
fn iovec_len(o: &mut Outcome, args: &[String]) -> Result<u64, Fail> {
    let mut total = 0u64;
    for a in args {
        let len = num(o, a)?;
        if len > MAX_REQUEST {
            o.out(format!(
                "Argument '{a}' exceeds maximum size {MAX_REQUEST}\n"
            ));
            return Err(Fail::Done);
        }
        if total > MAX_REQUEST - len {
            o.out(format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST}\n"
            ));
            return Err(Fail::Done);
        }
        total += len;
    }
    Ok(total)
}

/// `readv` and `aio_read` (run at once; an AIO request's own failures do not fail the
/// command, as in qemu-io where the command succeeds once submitted).
fn cmd_readv(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome, aio: bool) -> CmdResult {
    let pat = pattern(o, p)?;
    if p.operands.len() < 2 {
        return Err(Fail::Usage);
    }
    let offset = num(o, &p.operands[0])?;
    if aio && p.has('i') {
        o.out("injecting invalid read request\n");
        return Ok(());
    }
    let count = iovec_len(o, &p.operands[1..])?;
    if aio {
        o.complete();
    }
    let mut buf = alloc_buffer(count, 0xab);
    let start = Instant::now();
    let res = in_range(dev, offset, count).and_then(|_| dev.read(offset, &mut buf));
    let t = start.elapsed();
    let fail = if aio { Ok(()) } else { Err(Fail::Done) };
    if let Err(e) = res {
        o.out(format!("readv failed: {}\n", strerror(e)));
        return fail;
    }
    let mut result = Ok(());
    if let Some(pat) = pat {
        if buf.iter().any(|&b| b != pat) {
            o.out(format!(
                "Pattern verification failed at offset {offset}, {count} bytes\n"
            ));
            result = fail;
        }
    }
    if p.has('q') {
        return result;
    }
    if p.has('v') {
        o.out(dump_buffer(&buf, offset));
    }
    print_report(o, p, "read", t, offset, count, count);
    result
}

/// The contents of `write -s FILE`: the file's bytes repeated to `len`.
fn buffer_from_file(o: &mut Outcome, file: &str, len: u64) -> Result<Vec<u8>, Fail> {
    use std::io::Read;
    let perror = |o: &mut Outcome, e: std::io::Error| {
        let text = e
            .raw_os_error()
            .map(strerror)
            .unwrap_or_else(|| e.to_string());
        o.err(format!("{file}: {text}\n"));
        Fail::Done
    };
    let f = std::fs::File::open(file).map_err(|e| perror(o, e))?;
    let mut head = Vec::new();
    f.take(len)
        .read_to_end(&mut head)
        .map_err(|e| perror(o, e))?;
    if head.is_empty() {
        o.err(format!("{file}: file is empty\n"));
        return Err(Fail::Done);
    }
    let mut buf = Vec::with_capacity(len as usize);
    while buf.len() < len as usize {
        let take = head.len().min(len as usize - buf.len());
        buf.extend_from_slice(&head[..take]);
    }
    Ok(buf)
}

fn cmd_write(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> CmdResult {
    let pat = pattern(o, p)?;
    if p.operands.len() != 2 {
        return Err(Fail::Usage);
    }
    let (vmstate, zero, compressed) = (p.has('b'), p.has('z'), p.has('c'));
    let (fua, no_fallback, unmap) = (p.has('f'), p.has('n'), p.has('u'));
    let source = p.value('s');
    let checks = [
        (
            vmstate && zero,
            "-b and -z cannot be specified at the same time",
        ),
        (
            fua && vmstate,
            "-f and -b cannot be specified at the same time",
        ),
        (
            compressed && vmstate,
            "-c and -b cannot be specified at the same time",
        ),
        (no_fallback && !zero, "-n requires -z to be specified"),
        (unmap && !zero, "-u requires -z to be specified"),
        (
            usize::from(zero) + usize::from(pat.is_some()) + usize::from(source.is_some()) > 1,
            "Only one of -z, -P, and -s can be specified at the same time",
        ),
    ];
    if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
        o.out(format!("{msg}\n"));
        return Err(Fail::Done);
    }
    let offset = num(o, &p.operands[0])?;
    let count = num(o, &p.operands[1])?;
    if count > MAX_REQUEST && !no_fallback {
        o.out(format!(
            "length cannot exceed {MAX_REQUEST}, given {}\n",
            p.operands[1]
        ));
        return Err(Fail::Done);
    }
    if vmstate || compressed {
        sector_aligned(o, offset, "offset")?;
        sector_aligned(o, count, "count")?;
    }
    let buf = if zero {
        Vec::new()
    } else if let Some(file) = source {
        buffer_from_file(o, file, count)?
    } else {
        alloc_buffer(count, pat.unwrap_or(0xcd))
    };
    let start = Instant::now();
    let res = if vmstate {
        dev.save_vmstate(offset, &buf)
    } else {
        in_range(dev, offset, count).and_then(|_| {
            if zero && no_fallback {
                dev.write_zeroes_fast(offset, count, unmap)
            } else if zero {
                dev.write_zeroes(offset, count, unmap)
            } else if compressed {
                dev.write_compressed(offset, &buf)
            } else {
                dev.write(offset, &buf)
            }
        })
    }
    .and_then(|_| if fua { dev.flush() } else { Ok(()) });
    let t = start.elapsed();
    if let Err(e) = res {
        o.out(format!("write failed: {}\n", strerror(e)));
        return Err(Fail::Done);
    }
    if !p.has('q') {
        print_report(o, p, "wrote", t, offset, count, count);
    }
    Ok(())
}

/// `writev` and `aio_write` (see [`cmd_readv`] for AIO).
fn cmd_writev(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome, aio: bool) -> CmdResult {
    let pat = pattern(o, p)?;
    if p.operands.len() < 2 {
        return Err(Fail::Usage);
    }
    let zero = aio && p.has('z');
    if aio && p.has('u') && !zero {
        o.out("-u requires -z to be specified\n");
        return Err(Fail::Done);
    }
    let offset = num(o, &p.operands[0])?;
    if aio && p.has('i') {
        o.out("injecting invalid write request\n");
        return Ok(());
    }
    let count = if zero {
        if p.operands.len() != 2 {
            return Err(Fail::Usage);
        }
        num(o, &p.operands[1])?
    } else {
        iovec_len(o, &p.operands[1..])?
    };
    if aio {
        o.complete();
    }
    let start = Instant::now();
    let res = in_range(dev, offset, count)
        .and_then(|_| {
            if zero {
                dev.write_zeroes(offset, count, p.has('u'))
            } else {
                dev.write(offset, &alloc_buffer(count, pat.unwrap_or(0xcd)))
            }
        })
        .and_then(|_| if p.has('f') { dev.flush() } else { Ok(()) });
    let t = start.elapsed();
    if let Err(e) = res {
        let what = if aio { "aio_write" } else { "writev" };
        o.out(format!("{what} failed: {}\n", strerror(e)));
        return if aio { Ok(()) } else { Err(Fail::Done) };
    }
    if !p.has('q') {
        print_report(o, p, "wrote", t, offset, count, count);
    }
    Ok(())
}

fn cmd_discard(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> CmdResult {
    if p.operands.len() != 2 {
        return Err(Fail::Usage);
    }
    let offset = num(o, &p.operands[0])?;
    let count = num(o, &p.operands[1])?;
    if count > MAX_REQUEST {
        o.out(format!(
            "length cannot exceed {MAX_REQUEST}, given {}\n",
            p.operands[1]
        ));
        return Err(Fail::Done);
    }
    let start = Instant::now();
    let res = in_range(dev, offset, count).and_then(|_| dev.discard(offset, count));
    let t = start.elapsed();
    if let Err(e) = res {
        o.out(format!("discard failed: {}\n", strerror(e)));
        return Err(Fail::Done);
    }
    if !p.has('q') {
        print_report(o, p, "discard", t, offset, count, count);
    }
    Ok(())
}

fn cmd_map(dev: &mut dyn BlockDev, o: &mut Outcome) -> CmdResult {
    let mut offset = 0u64;
    let mut bytes = dev.length().map_err(|e| {
        o.error_report(format!("Failed to query image length: {}", strerror(e)));
        Fail::Done
    })?;
    let status_err = |o: &mut Outcome, e: i32| {
        o.out(format!(
            "Failed to get allocation status: {}\n",
            strerror(e)
        ));
        Fail::Done
    };
    while bytes > 0 {
        // Merge runs with the same answer, as qemu-io's map_is_allocated does.
        let (alloc, mut num) = dev
            .is_allocated(offset, bytes)
            .map_err(|e| status_err(o, e))?;
        if num == 0 {
            o.error_report("Unexpected end of image");
            return Err(Fail::Done);
        }
        while num < bytes {
            let (next, n) = dev
                .is_allocated(offset + num, bytes - num)
                .map_err(|e| status_err(o, e))?;
            if next != alloc || n == 0 {
                break;
            }
            num += n;
        }
        o.out(format!(
            "{} ({num:#x}) bytes {} at offset {} ({offset:#x})\n",
            cvtstr(num as f64),
            if alloc {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64)
        ));
        offset += num;
        bytes -= num;
    }
    Ok(())
}

fn cmd_alloc(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> CmdResult {
    let start = num(o, &p.operands[0])?;
    let mut count = match p.operands.get(1) {
        Some(c) => num(o, c)?,
        None => 512,
    };
    let mut offset = start;
    let mut remaining = count;
    let mut sum = 0u64;
    let size = dev.length().map_err(|e| {
        o.out(format!("is_allocated failed: {}\n", strerror(e)));
        Fail::Done
    })?;
    while remaining > 0 {
        let avail = size.saturating_sub(offset).min(remaining);
        let (alloc, num) = if avail == 0 {
            (false, 0)
        } else {
            dev.is_allocated(offset, avail).map_err(|e| {
                o.out(format!("is_allocated failed: {}\n", strerror(e)));
                Fail::Done
            })?
        };
        offset += num;
        remaining -= num;
        if alloc {
            sum += num;
        }
        if num == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    o.out(format!(
        "{sum}/{count} bytes allocated at offset {}\n",
        cvtstr(start as f64)
    ));
    Ok(())
}

fn cmd_info(dev: &mut dyn BlockDev, o: &mut Outcome) -> CmdResult {
    if !dev.usable() {
        return Err(Fail::Done);
    }
    o.out(format!("format name: {}\n", dev.format_name()));
    if let Some(p) = dev.protocol_name() {
        o.out(format!("format name: {p}\n"));
    }
    if !dev.has_info() {
        return Err(Fail::Done);
    }
    let (cluster, vm_state) = dev.info();
    o.out(format!("cluster size: {}\n", cvtstr(cluster as f64)));
    o.out(format!("vm state offset: {}\n", cvtstr(vm_state as f64)));
    let lines = dev.specific_info();
    if !lines.is_empty() {
        o.out("Format specific information:\n");
        for l in lines {
            o.out(format!("    {l}\n"));
        }
    }
    Ok(())
}

fn cmd_truncate(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> CmdResult {
    if let Some(mode) = p.value('m') {
        match mode {
            "off" => {}
            "metadata" | "falloc" | "full" => {
                o.error_report(format!(
                    "Preallocation mode '{mode}' is not supported by this qemu-io"
                ));
                return Err(Fail::Done);
            }
            other => {
                o.error_report(format!("Invalid preallocation mode '{other}'"));
                return Err(Fail::Done);
            }
        }
    }
    if p.operands.len() != 1 {
        return Err(Fail::Usage);
    }
    let len = num(o, &p.operands[0])?;
    dev.truncate(len).map_err(|e| {
        if e == ENOMEDIUM {
            o.error_report("No medium inserted");
        } else {
            o.error_report(format!("truncate: {}", strerror(e)));
        }
        Fail::Done
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_like_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(1_179_648.0), "1.125 MiB");
        assert_eq!(cvtstr(64_946_176.0), "61.938 MiB");
        assert_eq!(cvtstr(2_162_688.0), "2.062 MiB");
        assert_eq!(cvtstr(33_554_432.0), "32 MiB");
    }

    #[test]
    fn times_and_dumps() {
        assert_eq!(timestr(Duration::from_millis(3)), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(61_500)), "0:01:01.50");
        assert_eq!(
            dump_buffer(&[0u8; 20], 65530),
            "0000fffa:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................\n0001000a:  00 00 00 00  ....\n"
        );
        assert_eq!(dump_buffer(b"Ab", 0), "00000000:  41 62  Ab\n");
    }

    #[test]
    fn patterns_and_numbers() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("171"), Ok(171));
        assert_eq!(parse_pattern("010"), Ok(8));
        assert!(parse_pattern("300").is_err());
        assert!(parse_pattern("0xzz").is_err());
        assert_eq!(cvtnum("4k"), Ok(4096));
        assert_eq!(
            cvtnum("foo"),
            Err(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- foo\n"
                    .into()
            )
        );
        assert_eq!(
            cvtnum("99E"),
            Err("Parsing error: argument too large -- 99E\n".into())
        );
        assert_eq!(
            split_words("write  -P 0xab 0 '64k'"),
            ["write", "-P", "0xab", "0", "'64k'"]
        );
        assert_eq!(strtol_whole("0x10"), Some(16));
        assert_eq!(strtol_whole("x"), None);
        assert_eq!(strtol_whole("-"), None);
        assert_eq!(strtol_whole("-5"), Some(-5));
    }
}
