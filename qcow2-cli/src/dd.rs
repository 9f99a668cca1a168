//! `qcow2 dd`: qemu-img dd's operands (`bs=`, `count=`, `skip=`, `if=`, `of=`), output
//! creation (raw by default, or qcow2 with `-O`), arithmetic and messages, over
//! [`qcow2_image::dd_copy`].

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use qcow2_image::{dd_copy, CreateOptions, DdError, DdParams, DdWrite, Image};

use crate::image::{strerror, Format};
use crate::size::{parse_size, SizeError};
use crate::{source, CliError};

/// The arguments of `dd`.
pub struct DdRequest {
    /// `-f`: input format.
    pub format: Option<String>,
    /// `-O`: output format (raw when absent).
    pub output_format: Option<String>,
    /// The `name=value` operands.
    pub operands: Vec<String>,
}

/// C's `strtoll(s, &end, 0)` over the whole string, as QEMU's `qemu_strtoi64`: optional
/// leading white space and sign, then decimal, `0x` hex or `0` octal digits.
fn parse_c_int(s: &str) -> Result<i128, SizeError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    let v = i128::from_str_radix(digits, radix).map_err(|_| SizeError::Overflow)?;
    if v > i128::from(i64::MAX) + i128::from(neg) {
        return Err(SizeError::Overflow);
    }
    Ok(if neg { -v } else { v })
}

fn invalid(name: &str, value: &str) -> CliError {
    CliError::new(format!("Invalid {name} specified: '{value}'."))
}

fn range(name: &str, min: i64, max: i64) -> CliError {
    CliError::new(format!(
        "Invalid {name} specified. Must be between {min} and {max}."
    ))
}

/// `count=` and `skip=`: integers in 0..=i64::MAX.
fn parse_count(name: &str, value: &str) -> Result<u64, CliError> {
    match parse_c_int(value) {
        Ok(v) if (0..=i128::from(i64::MAX)).contains(&v) => {
            u64::try_from(v).map_err(|_| range(name, 0, i64::MAX))
        }
        Ok(_) | Err(SizeError::Overflow) => Err(range(name, 0, i64::MAX)),
        Err(SizeError::Invalid) => Err(invalid(name, value)),
    }
}

/// `bs=`: a size in 1..=i32::MAX.
fn parse_bs(value: &str) -> Result<u64, CliError> {
    let max = i32::MAX as u64;
    match parse_size(value) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        Ok(_) | Err(SizeError::Overflow) => Err(range("bs", 1, i32::MAX.into())),
        Err(SizeError::Invalid) => Err(invalid("bs", value)),
    }
}

/// Runs `dd`.
pub fn run(req: DdRequest) -> Result<(), CliError> {
    let mut params = DdParams {
        block_size: 512,
        count: None,
        skip: None,
    };
    let (mut input, mut output) = (None, None);
    for arg in &req.operands {
        let Some((name, value)) = arg.split_once('=') else {
            return Err(CliError::new(format!("unrecognized operand {arg}")));
        };
        match name {
            "bs" => params.block_size = parse_bs(value)?,
            "count" => params.count = Some(parse_count("count", value)?),
            "skip" => params.skip = Some(parse_count("skip", value)?),
            "if" => input = Some(value.to_string()),
            "of" => output = Some(value.to_string()),
            _ => return Err(CliError::new(format!("unrecognized operand {name}"))),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(CliError::new("Must specify both input and output files"));
    };
    let mut src = source::open(&input, req.format.as_deref())?;
    let out_format = match req.output_format.as_deref() {
        None => Format::Raw,
        Some(f) if source::QEMU_ONLY_FORMATS.contains(&f) => {
            return Err(CliError::new(format!(
                "output format '{f}' is not available in this tool"
            )))
        }
        Some(f) => Format::parse(f).map_err(|_| CliError::new("Unknown file format"))?,
    };
    let plan = params.plan(src.disk.size());
    let create_err = |detail: String| {
        CliError::new(format!(
            "{output}: error while creating output image: {detail}"
        ))
    };
    let write_err = |e: &dyn std::fmt::Display| {
        CliError::new(format!("error while writing to output image file: {e}"))
    };
    let copy =
        |src: &mut source::Disk, write: &mut DdWrite<'_, std::io::Error>| -> Result<(), CliError> {
            if plan.skip_beyond_end {
                eprintln!(
                    "{}{input}: cannot skip to specified offset",
                    crate::prog::prefix()
                );
            }
            dd_copy(src.disk.as_mut(), &plan, params.block_size, write).map_err(|e| match e {
                DdError::Read(e) => CliError::new(format!(
                    "error while reading from input image file: {}",
                    crate::io::strerror(e.errno())
                )),
                DdError::Write(e) => write_err(&strerror(&e)),
            })
        };
    match out_format {
        Format::Raw => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&output)
                .map_err(|e| {
                    create_err(format!("Could not create '{output}': {}", strerror(&e)))
                })?;
            // QEMU creates raw files in whole sectors.
            file.set_len(plan.out_size.next_multiple_of(512))
                .map_err(|e| create_err(format!("Could not resize file: {}", strerror(&e))))?;
            copy(&mut src, &mut |off, data| file.write_all_at(data, off))?;
            file.sync_all().map_err(|e| write_err(&strerror(&e)))
        }
        Format::Qcow2 => {
            let storage =
                qcow2_io::FileStorage::create(std::path::Path::new(&output)).map_err(|e| {
                    create_err(format!("Could not create '{output}': {}", strerror(&e)))
                })?;
            let mut img = Image::create(
                std::sync::Arc::new(storage),
                &CreateOptions::new(plan.out_size),
            )
            .map_err(|e| create_err(crate::qcowdev::error_text(&e)))?;
            copy(&mut src, &mut |off, data| {
                img.write(off, data)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            })?;
            img.close().map_err(|e| {
                CliError::new(format!(
                    "Error while closing the image: {}",
                    crate::qcowdev::error_text(&e)
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_integers() {
        assert_eq!(parse_c_int("010"), Ok(8));
        assert_eq!(parse_c_int("0x10"), Ok(16));
        assert_eq!(parse_c_int(" -1"), Ok(-1));
        assert_eq!(parse_c_int("1k"), Err(SizeError::Invalid));
        assert_eq!(parse_c_int(""), Err(SizeError::Invalid));
        assert_eq!(parse_c_int("1.5"), Err(SizeError::Invalid));
        assert_eq!(
            parse_c_int("99999999999999999999"),
            Err(SizeError::Overflow)
        );
        assert!(parse_count("count", "-1").is_err());
        assert_eq!(parse_bs("1.5k").ok(), Some(1536));
        assert!(parse_bs("2G").is_err());
    }
}
