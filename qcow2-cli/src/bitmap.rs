//! `qcow2 bitmap`: qemu-img's `bitmap` command. Several operations per call, run in the
//! order given (`--add [-g SIZE] [--disable]`, `--remove`, `--clear`, `--enable`,
//! `--disable`, `--merge SOURCE [-b FILE [-F FMT]]`) on one bitmap of one image, with
//! qemu-img's option parsing (getopt: options and the two names in any order), checks,
//! messages and exit status. The image is opened read-write and closed at the end, also
//! after a failed operation, so what succeeded before is stored (as qemu-img does).

use qcow2_image::{BitmapAddOptions, Image, ImageError};

use crate::image::{self, Format};
use crate::{qcowdev, secrets, CliError};

/// One operation of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// What the command line says.
#[derive(Debug, Default)]
struct Request {
    actions: Vec<Action>,
    format: Option<String>,
    source_file: Option<String>,
    source_format: Option<String>,
    granularity: u64,
    image_opts: bool,
    objects: Vec<String>,
    positional: Vec<String>,
    help: bool,
}

const HELP: &str = "\
Usage: qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
       [-f FMT | --image-opts] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE] [--object OBJDEF]
       FILENAME BITMAP

Changes the persistent dirty bitmap BITMAP of the image FILENAME; the operations run in
the order given.

  --add                    create BITMAP (enabled: it records every later write)
  -g, --granularity SIZE   bytes per bit for --add (a power of two, 512 to 2G)
  --remove                 delete BITMAP
  --clear                  clear every bit of BITMAP
  --enable, --disable      start or stop recording writes in BITMAP
  --merge SOURCE           set in BITMAP every bit set in bitmap SOURCE
  -b, --source-file FILE   take SOURCE from the image FILE for --merge
  -F, --source-format FMT  the format of FILE
  -f, --format FMT         the format of FILENAME
  --image-opts             FILENAME is an option list (driver=qcow2,file.filename=...)
  --object OBJDEF          define an object (secrets of encrypted images)
  -h, --help               print this help
";

/// getopt_long's "option requires an argument" and "unrecognized option" lines.
fn usage_error(text: String) -> CliError {
    let p = crate::prog::name();
    eprintln!("{p} bitmap: {text}\nTry '{p} bitmap --help' for more info");
    // Already reported: an empty message prints nothing more.
    CliError::new("")
}

/// Parses the arguments after `bitmap` as qemu-img's getopt_long does
/// (`":b:f:F:g:h"` and the long options; non-options are collected in order).
fn parse(args: &[String]) -> Result<Request, CliError> {
    let mut r = Request::default();
    let mut i = 0;
    let takes_value = |long: &str| {
        matches!(
            long,
            "object" | "merge" | "granularity" | "source-file" | "source-format"
        )
    };
    const LONGS: [&str; 13] = [
        "help",
        "object",
        "image-opts",
        "add",
        "remove",
        "clear",
        "enable",
        "disable",
        "merge",
        "granularity",
        "source-file",
        "source-format",
        "format",
    ];
    let mut only_positional = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if only_positional || a == "-" || !a.starts_with('-') {
            r.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        let (key, value): (String, Option<String>) = if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            // getopt_long accepts unambiguous prefixes; qemu-img's names are distinct enough
            // that exact names and unique prefixes cover real use.
            let matches: Vec<&str> = LONGS
                .iter()
                .copied()
                .filter(|l| l.starts_with(name))
                .collect();
            let name = match matches.as_slice() {
                [one] => *one,
                _ if LONGS.contains(&name) => name,
                _ => return Err(usage_error(format!("unrecognized option '{a}'"))),
            };
            // qemu-img has no --format long option (only -f).
            if name == "format" {
                return Err(usage_error(format!("unrecognized option '{a}'")));
            }
            let value = if takes_value(name) {
                match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        return Err(usage_error(format!(
                            "option '--{name}' requires an argument"
                        )))
                    }
                }
            } else if inline.is_some() {
                return Err(usage_error(format!(
                    "option '--{name}' doesn't allow an argument"
                )));
            } else {
                None
            };
            (name.to_string(), value)
        } else {
            let c = a.chars().nth(1).unwrap_or('?');
            let rest: String = a.chars().skip(2).collect();
            let name = match c {
                'b' => "source-file",
                'f' => "format",
                'F' => "source-format",
                'g' => "granularity",
                'h' => "help",
                _ => return Err(usage_error(format!("invalid option -- '{c}'"))),
            };
            if name == "help" {
                r.help = true;
                continue;
            }
            let value = if !rest.is_empty() {
                rest
            } else if i < args.len() {
                i += 1;
                args[i - 1].clone()
            } else {
                return Err(usage_error(format!("option requires an argument -- '{c}'")));
            };
            (name.to_string(), Some(value))
        };
        let v = value.unwrap_or_default();
        match key.as_str() {
            "help" => r.help = true,
            "object" => r.objects.push(v),
            "image-opts" => r.image_opts = true,
            "add" => r.actions.push(Action::Add),
            "remove" => r.actions.push(Action::Remove),
            "clear" => r.actions.push(Action::Clear),
            "enable" => r.actions.push(Action::Enable),
            "disable" => r.actions.push(Action::Disable),
            "merge" => r.actions.push(Action::Merge(v)),
            "source-file" => r.source_file = Some(v),
            "source-format" => r.source_format = Some(v),
            "format" => r.format = Some(v),
            "granularity" => r.granularity = parse_granularity(&v)?,
            _ => {}
        }
    }
    Ok(r)
}

/// qemu-img's `cvtnum("granularity", ...)`: a size with an optional suffix.
fn parse_granularity(v: &str) -> Result<u64, CliError> {
    match crate::size::parse_size(v) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => Err(CliError::new(
            "Invalid granularity specified. Must be between 0 and 9223372036854775807.",
        )),
        Err(_) if v.trim_start().starts_with('-') || v.chars().all(|c| c.is_ascii_digit()) => {
            Err(CliError::new(
                "Invalid granularity specified. Must be between 0 and 9223372036854775807.",
            ))
        }
        Err(_) => Err(CliError::new(format!(
            "Invalid granularity specified: '{v}'."
        ))),
    }
}

/// Runs `qcow2 bitmap ARGS...`.
pub fn run(args: &[String]) -> Result<(), CliError> {
    let mut r = parse(args)?;
    if r.help {
        print!("{HELP}");
        return Ok(());
    }
    for def in &r.objects {
        secrets::define_object(def).map_err(CliError::new)?;
    }
    if r.actions.is_empty() {
        return Err(CliError::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let add = r.actions.contains(&Action::Add);
    let merge = r.actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if r.granularity != 0 && !add {
        return Err(CliError::new("granularity only supported with --add"));
    }
    if r.source_format.is_some() && r.source_file.is_none() {
        return Err(CliError::new("-F only supported with -b"));
    }
    if r.source_file.is_some() && !merge {
        return Err(CliError::new(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    if r.positional.len() != 2 {
        return Err(CliError::new("Expecting filename and bitmap name"));
    }
    let bitmap = r.positional[1].clone();
    let mut file = r.positional[0].clone();
    let mut format = r.format.clone();
    if r.image_opts {
        let (f, driver) = secrets::image_opts(&file).map_err(CliError::new)?;
        file = f;
        format = format.or(driver);
    }
    let format = match format {
        Some(f) => Format::parse(&f).map_err(CliError::new)?,
        None => image::probe(&file)?,
    };
    if format == Format::Raw {
        // The raw driver keeps no persistent bitmaps: the first action fails as in qemu-img.
        image::open(&file, Some(Format::Raw), true)?;
        let first = &r.actions[0];
        let detail = match first {
            Action::Add => {
                "Can't store persistent bitmaps to #block0: Operation not supported".to_string()
            }
            _ => format!("Dirty bitmap '{bitmap}' not found"),
        };
        return Err(CliError::new(format!(
            "Operation {} on bitmap {bitmap} failed: {detail}",
            first.name()
        )));
    }
    let mut img: Image =
        qcowdev::open_image(&file, false).map_err(|e| image::open_error(&file, e))?;
    // QEMU's open loads and marks the bitmaps before any operation runs.
    img.begin_bitmap_session().map_err(|e| {
        CliError::new(format!(
            "Can't update bitmap directory: {}",
            qcowdev::error_text(&e)
        ))
    })?;
    let source = match r.source_file.take() {
        Some(src) => {
            let sf = r
                .source_format
                .as_deref()
                .map(Format::parse)
                .transpose()
                .map_err(CliError::new)?;
            if sf == Some(Format::Raw) || (sf.is_none() && image::probe(&src)? == Format::Raw) {
                Some(None)
            } else {
                let s = qcowdev::open_image(&src, true).map_err(|e| image::open_error(&src, e))?;
                Some(Some(s))
            }
        }
        None => None,
    };
    let granularity = (r.granularity != 0).then_some(r.granularity);
    let mut failure = None;
    for act in &r.actions {
        let result = match act {
            Action::Add => img.bitmap_add(
                &bitmap,
                &BitmapAddOptions {
                    granularity,
                    disabled: false,
                },
            ),
            Action::Remove => img.bitmap_remove(&bitmap),
            Action::Clear => img.bitmap_clear(&bitmap),
            Action::Enable => img.bitmap_enable(&bitmap),
            Action::Disable => img.bitmap_disable(&bitmap),
            Action::Merge(src) => match &source {
                None => img.bitmap_merge_from(&bitmap, src),
                Some(other) => merge_from_other(&mut img, &bitmap, other.as_ref(), src),
            },
        };
        if let Err(e) = result {
            failure = Some(operation_failed(act, &bitmap, &e));
            break;
        }
    }
    let closed = img.close();
    if let Some(f) = failure {
        return Err(f);
    }
    closed.map_err(|e| {
        CliError::new(format!(
            "Lost persistent bitmaps during inactivation of node '#block0': {}",
            qcowdev::error_text(&e)
        ))
    })
}

/// `--merge SRC -b FILE`: the target is looked up first, then the source bitmap in FILE
/// (a raw FILE has none).
fn merge_from_other(
    img: &mut Image,
    target: &str,
    source_image: Option<&Image>,
    source: &str,
) -> qcow2_image::Result<()> {
    // The target's own checks come first (not found, inconsistent).
    img.bitmap(target)?;
    let bits = match source_image {
        Some(s) => s.bitmap(source)?,
        None => {
            return Err(ImageError::Refused {
                op: qcow2_image::Op::Bitmap,
                message: format!("Dirty bitmap '{source}' not found"),
                hint: None,
                errno: 22,
            })
        }
    };
    img.bitmap_merge(target, &bits)
}

/// qemu-img's "Operation OP on bitmap NAME failed: REASON" (and QEMU's hint line).
fn operation_failed(act: &Action, bitmap: &str, e: &ImageError) -> CliError {
    let mut msg = format!(
        "Operation {} on bitmap {bitmap} failed: {}",
        act.name(),
        qcowdev::error_text(e)
    );
    if let Some(h) = e.hint() {
        msg.push('\n');
        msg.push_str(h);
    }
    CliError::new(msg)
}

/// `convert --bitmaps` before the copy (QEMU's `convert_check_bitmaps`): the source keeps
/// persistent bitmaps (qcow2) and, unless `skip_broken`, none of them is inconsistent.
pub fn check_source(source: Option<&Image>, skip_broken: bool) -> Result<(), CliError> {
    let Some(src) = source else {
        return Err(CliError::new("Source lacks bitmap support"));
    };
    if src.header().version < 3 {
        return Err(CliError::new("Source lacks bitmap support"));
    }
    let list = src
        .bitmaps()
        .map_err(|e| CliError::new(qcowdev::error_text(&e)))?;
    // QEMU walks its in-memory list: newest (last in the directory) first.
    if let Some(b) = list.iter().rev().find(|b| b.in_use && !skip_broken) {
        return Err(CliError::new(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img \
             bitmap --remove' to delete it",
            b.name
        )));
    }
    Ok(())
}

/// `convert --bitmaps` after the copy (QEMU's `convert_copy_bitmaps`): every persistent
/// bitmap of `src` is made in `dst` with its granularity and enabled state and its bits
/// merged in; inconsistent ones are skipped with QEMU's warning when `skip_broken`. They
/// are stored when `dst` is closed, in the source's directory order (as QEMU's).
pub fn copy_bitmaps(src: &Image, dst: &mut Image, skip_broken: bool) -> Result<(), CliError> {
    let list = src
        .bitmaps()
        .map_err(|e| CliError::new(qcowdev::error_text(&e)))?;
    for b in list.iter().rev() {
        if b.in_use && skip_broken {
            eprintln!(
                "{}warning: Skipping inconsistent bitmap '{}'",
                crate::prog::prefix(),
                b.name
            );
            continue;
        }
        let opts = BitmapAddOptions {
            granularity: Some(b.granularity),
            disabled: !b.auto,
        };
        dst.bitmap_add(&b.name, &opts).map_err(|e| {
            CliError::new(format!(
                "Failed to create bitmap {}: {}",
                b.name,
                qcowdev::error_text(&e)
            ))
        })?;
        let merged = src
            .bitmap(&b.name)
            .and_then(|bits| dst.bitmap_merge(&b.name, &bits));
        if let Err(e) = merged {
            let _ = dst.bitmap_remove(&b.name);
            return Err(CliError::new(format!(
                "Failed to populate bitmap {}: {}",
                b.name,
                qcowdev::error_text(&e)
            )));
        }
    }
    Ok(())
}
