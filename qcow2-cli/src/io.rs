//! `qcow2 io`: a subset of qemu-io's command language with its messages and output.
//!
//! Commands: `read [-qv] [-P pattern] off len`, `write [-cquz] [-P pattern] off len`,
//! `discard [-q] off len`, `flush`, `map`, `alloc off [count]`, `info`, `truncate off`,
//! `length`. Every command runs even after one failed; the exit status is 1 if any failed
//! (as qemu-io). The commands work on a [`BlockDev`]; raw files are one, qcow2 images become
//! one when the image facade lands.

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
}

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
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if secs == 0 {
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

/// One command's result: text for stdout and stderr, and whether it failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Standard output text.
    pub stdout: String,
    /// Standard error text.
    pub stderr: String,
    /// Whether the command failed (the exit status becomes 1).
    pub failed: bool,
}

impl Outcome {
    fn out(&mut self, s: impl AsRef<str>) {
        self.stdout.push_str(s.as_ref());
    }
    fn err(&mut self, s: impl AsRef<str>) {
        self.stderr.push_str(s.as_ref());
    }
    fn fail(mut self) -> Self {
        self.failed = true;
        self
    }
}

struct Spec {
    name: &'static str,
    /// getopt option string (a letter followed by ':' takes an argument).
    opts: &'static str,
    argmin: usize,
    argmax: Option<usize>,
    args: &'static str,
    oneline: &'static str,
    writes: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "read",
        opts: "P:qv",
        argmin: 2,
        argmax: None,
        args: "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
    },
    Spec {
        name: "write",
        opts: "cP:quz",
        argmin: 2,
        argmax: None,
        args: "[-bcCfnquz] [-P pattern | -s source_file] off len",
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
    },
    Spec {
        name: "discard",
        opts: "q",
        argmin: 2,
        argmax: None,
        args: "[-Cq] off len",
        oneline: "discards a number of bytes at a specified offset",
        writes: true,
    },
    Spec {
        name: "flush",
        opts: "",
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "flush all in-core file state to disk",
        writes: false,
    },
    Spec {
        name: "map",
        opts: "",
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "prints the allocated areas of a file",
        writes: false,
    },
    Spec {
        name: "alloc",
        opts: "",
        argmin: 1,
        argmax: Some(2),
        args: "offset [count]",
        oneline: "checks if offset is allocated in the file",
        writes: false,
    },
    Spec {
        name: "info",
        opts: "",
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "prints information about the current file",
        writes: false,
    },
    Spec {
        name: "truncate",
        opts: "",
        argmin: 1,
        argmax: Some(1),
        args: "off",
        oneline: "truncates the current file at the given offset",
        writes: true,
    },
    Spec {
        name: "length",
        opts: "",
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "gets the length of the current file",
        writes: false,
    },
    Spec {
        name: "sleep",
        opts: "",
        argmin: 1,
        argmax: Some(1),
        args: "milliseconds",
        oneline: "waits for the given value in milliseconds",
        writes: false,
    },
];

/// Parsed options and operands of one command (GNU getopt with permutation).
struct Parsed {
    flags: Vec<(char, Option<String>)>,
    operands: Vec<String>,
}

impl Parsed {
    fn has(&self, c: char) -> bool {
        self.flags.iter().any(|(f, _)| *f == c)
    }
    fn value(&self, c: char) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| *f == c)
            .and_then(|(_, v)| v.as_deref())
    }
}

fn getopt(spec: &Spec, args: &[String]) -> Result<Parsed, String> {
    let mut p = Parsed {
        flags: Vec::new(),
        operands: Vec::new(),
    };
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
                let pos = spec.opts.find(c).filter(|_| c != ':');
                let Some(pos) = pos else {
                    return Err(format!("{}: invalid option -- '{c}'\n", spec.name));
                };
                let takes_arg = spec.opts[pos + c.len_utf8()..].starts_with(':');
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
                                    "{}: option requires an argument -- '{c}'\n",
                                    spec.name
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

/// Splits a command line at blanks (qemu-io's `breakline`; quotes group words).
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c == ' ' || c == '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Runs one command line on `dev`.
pub fn run_command(dev: &mut dyn BlockDev, line: &str) -> Outcome {
    let mut o = Outcome::default();
    let words = split_words(line);
    let Some((name, args)) = words.split_first() else {
        return o;
    };
    let Some(spec) = SPECS.iter().find(|s| s.name == name.as_str()) else {
        o.err(format!("command \"{name}\" not found\n"));
        return o.fail();
    };
    if spec.writes && dev.read_only() {
        o.err("qcow2: Block node is read-only\n");
        return o.fail();
    }
    let n = args.len();
    if n < spec.argmin || spec.argmax.is_some_and(|m| n > m) {
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
        return o.fail();
    }
    let usage = |o: &mut Outcome| {
        o.out(format!("{} {} -- {}\n", spec.name, spec.args, spec.oneline));
    };
    // qemu-io's sleep takes its operand without getopt ("-5 is not a valid number").
    let parsed = if spec.name == "sleep" {
        Ok(Parsed {
            flags: Vec::new(),
            operands: args.to_vec(),
        })
    } else {
        getopt(spec, args)
    };
    let p = match parsed {
        Ok(p) => p,
        Err(e) => {
            o.err(e);
            usage(&mut o);
            return o.fail();
        }
    };
    let result = match spec.name {
        "read" => cmd_read(dev, &p, &mut o),
        "write" => cmd_write(dev, &p, &mut o),
        "discard" => cmd_discard(dev, &p, &mut o),
        "flush" => dev
            .flush()
            .map_err(|e| format!("flush failed: {}\n", strerror(e))),
        "map" => cmd_map(dev, &mut o),
        "alloc" => cmd_alloc(dev, &p, &mut o),
        "info" => cmd_info(dev, &mut o),
        "truncate" => cmd_truncate(dev, &p),
        "length" => match dev.length() {
            Ok(l) => {
                o.out(format!("{}\n", cvtstr(l as f64)));
                Ok(())
            }
            Err(e) => Err(format!("getlength: {}\n", strerror(e))),
        },
        // The image stays open (and locked) meanwhile: how scripts hold an image.
        "sleep" => cmd_sleep(&p),
        _ => Ok(()),
    };
    match result {
        Ok(()) => o,
        Err(msg) if msg == "usage" => {
            usage(&mut o);
            o.fail()
        }
        Err(msg) => {
            o.out(msg);
            o.fail()
        }
    }
}

/// qemu-io's `sleep MS`: the number as C's `strtol(.., 0)` reads it (decimal, 0x hex,
/// leading-0 octal), refused when negative or not a number.
fn cmd_sleep(p: &Parsed) -> Result<(), String> {
    let arg = p.operands.first().map(String::as_str).unwrap_or("");
    let bad = || format!("{arg} is not a valid number\n");
    let t = arg.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    // strtol saturates; so does this (a sleep that long is what was asked for).
    let ms = u64::from_str_radix(digits, radix).unwrap_or(u64::MAX);
    if neg && ms != 0 {
        return Err(bad());
    }
    std::thread::sleep(std::time::Duration::from_millis(ms));
    Ok(())
}

/// Checks `[offset, offset + len)` against the device like the block layer (EIO beyond the
/// end).
fn in_range(dev: &mut dyn BlockDev, offset: u64, len: u64) -> Result<(), i32> {
    let size = dev.length()?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(libc_eio()),
    }
}

fn libc_eio() -> i32 {
    5
}

fn buffer(len: u64) -> Result<Vec<u8>, String> {
    // qemu-io refuses requests above BDRV_REQUEST_MAX_BYTES (just under 2 GiB).
    const MAX: u64 = (i32::MAX as u64) & !511;
    if len > MAX {
        return Err(format!("length cannot exceed {MAX}, given {len}\n"));
    }
    Ok(vec![0u8; len as usize])
}

fn offset_len(p: &Parsed) -> Result<(u64, u64), String> {
    if p.operands.len() != 2 {
        return Err("usage".into());
    }
    Ok((cvtnum(&p.operands[0])?, cvtnum(&p.operands[1])?))
}

fn cmd_read(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> Result<(), String> {
    let pattern = p.value('P').map(parse_pattern).transpose()?;
    let (offset, count) = offset_len(p)?;
    let mut buf = buffer(count)?;
    let start = Instant::now();
    let res = in_range(dev, offset, count).and_then(|_| dev.read(offset, &mut buf));
    let t = start.elapsed();
    res.map_err(|e| format!("read failed: {}\n", strerror(e)))?;
    let mut failed = false;
    if let Some(pat) = pattern {
        if buf.iter().any(|&b| b != pat) {
            o.out(format!(
                "Pattern verification failed at offset {offset}, {count} bytes\n"
            ));
            failed = true;
        }
    }
    if !p.has('q') {
        if p.has('v') {
            o.out(dump_buffer(&buf, offset));
        }
        o.out(report("read", t, offset, count, count, 1));
    }
    if failed {
        o.failed = true;
    }
    Ok(())
}

fn cmd_write(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> Result<(), String> {
    let zero = p.has('z');
    let pattern = p.value('P').map(parse_pattern).transpose()?;
    if zero && pattern.is_some() {
        return Err("Only one of -z, -P, and -s can be specified at the same time\n".into());
    }
    if !zero && p.has('u') {
        return Err("-u requires -z to be specified\n".into());
    }
    let (offset, count) = offset_len(p)?;
    if p.has('c') {
        if offset % 512 != 0 {
            return Err(format!(
                "{offset} is not a sector-aligned value for 'offset'\n"
            ));
        }
        if count % 512 != 0 {
            return Err(format!(
                "{count} is not a sector-aligned value for 'count'\n"
            ));
        }
    }
    let buf = if zero {
        Vec::new()
    } else {
        let mut b = buffer(count)?;
        b.fill(pattern.unwrap_or(0xcd));
        b
    };
    let start = Instant::now();
    let res = in_range(dev, offset, count).and_then(|_| {
        if zero {
            dev.write_zeroes(offset, count, p.has('u'))
        } else if p.has('c') {
            dev.write_compressed(offset, &buf)
        } else {
            dev.write(offset, &buf)
        }
    });
    let t = start.elapsed();
    res.map_err(|e| format!("write failed: {}\n", strerror(e)))?;
    if !p.has('q') {
        o.out(report("wrote", t, offset, count, count, 1));
    }
    Ok(())
}

fn cmd_discard(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> Result<(), String> {
    let (offset, count) = offset_len(p)?;
    let start = Instant::now();
    let res = in_range(dev, offset, count).and_then(|_| dev.discard(offset, count));
    let t = start.elapsed();
    res.map_err(|e| format!("discard failed: {}\n", strerror(e)))?;
    if !p.has('q') {
        o.out(report("discard", t, offset, count, count, 1));
    }
    Ok(())
}

fn cmd_map(dev: &mut dyn BlockDev, o: &mut Outcome) -> Result<(), String> {
    let mut offset = 0u64;
    let mut bytes = dev
        .length()
        .map_err(|e| format!("getlength: {}\n", strerror(e)))?;
    while bytes > 0 {
        // Merge runs with the same answer, as qemu-io's map_is_allocated does.
        let (alloc, mut num) = dev
            .is_allocated(offset, bytes)
            .map_err(|e| format!("Failed to get allocation status: {}\n", strerror(e)))?;
        if num == 0 {
            o.err("qcow2: Unexpected end of image\n");
            return Err(String::new());
        }
        while num < bytes {
            let (next, n) = dev
                .is_allocated(offset + num, bytes - num)
                .map_err(|e| format!("Failed to get allocation status: {}\n", strerror(e)))?;
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

fn cmd_alloc(dev: &mut dyn BlockDev, p: &Parsed, o: &mut Outcome) -> Result<(), String> {
    let start = cvtnum(&p.operands[0])?;
    if start % 512 != 0 {
        return Err(format!(
            "{start} is not a sector-aligned value for 'offset'\n"
        ));
    }
    let mut count = match p.operands.get(1) {
        Some(c) => cvtnum(c)?,
        None => 512,
    };
    let mut offset = start;
    let mut remaining = count;
    let mut sum = 0u64;
    let size = dev.length().unwrap_or(0);
    while remaining > 0 {
        let avail = size.saturating_sub(offset).min(remaining);
        let (alloc, num) = if avail == 0 {
            (false, 0)
        } else {
            dev.is_allocated(offset, avail)
                .map_err(|e| format!("is_allocated failed: {}\n", strerror(e)))?
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

fn cmd_info(dev: &mut dyn BlockDev, o: &mut Outcome) -> Result<(), String> {
    o.out(format!("format name: {}\n", dev.format_name()));
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

fn cmd_truncate(dev: &mut dyn BlockDev, p: &Parsed) -> Result<(), String> {
    let len = cvtnum(&p.operands[0])?;
    dev.truncate(len)
        .map_err(|e| format!("truncate: {}\n", strerror(e)))
}

/// Runs every command, printing as it goes; returns whether all succeeded.
pub fn run_all(dev: &mut dyn BlockDev, commands: &[String]) -> bool {
    let mut ok = true;
    for c in commands {
        let o = run_command(dev, c);
        crate::out(&o.stdout);
        if !o.stderr.is_empty() {
            eprint!("{}", o.stderr);
        }
        ok &= !o.failed;
    }
    ok
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
            ["write", "-P", "0xab", "0", "64k"]
        );
    }
}
