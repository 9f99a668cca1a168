//! `qcow2 measure`: qemu-img measure's command line, numbers, output (human and JSON) and
//! messages; the computation is [`qcow2_format::measure`], fed with the source's block
//! status through its whole backing chain.

use qcow2_format::measure::{
    bitmaps_size, measure, BitmapSize, DataClusterCounter, MeasureOptions, MeasureSource,
};

use crate::create::target_options;
use crate::image::Format;
use crate::source::{self, Disk};
use crate::{out, CliError, OutputFormat};

/// The arguments of `measure`.
pub struct MeasureRequest {
    /// `--output`.
    pub output: OutputFormat,
    /// `-O`: target format (raw when absent).
    pub target_format: Option<String>,
    /// `-o` lists.
    pub options: Vec<String>,
    /// `-l`: internal snapshot of the source.
    pub snapshot: Option<String>,
    /// `--size`, parsed.
    pub size: Option<u64>,
    /// `-f`: source format.
    pub format: Option<String>,
    /// The source file names (at most one is allowed).
    pub files: Vec<String>,
}

/// What `measure` found.
struct Info {
    required: u64,
    fully_allocated: u64,
    bitmaps: Option<u64>,
}

fn print(info: &Info, output: OutputFormat) {
    match output {
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                info.required, info.fully_allocated
            );
            if let Some(b) = info.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            out(&s);
        }
        OutputFormat::Json => {
            // QEMU's QDict order for these keys.
            let mut s = String::from("{\n");
            if let Some(b) = info.bitmaps {
                s.push_str(&format!("    \"bitmaps\": {b},\n"));
            }
            s.push_str(&format!(
                "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
                info.required, info.fully_allocated
            ));
            out(&s);
        }
    }
}

/// Runs `measure`.
pub fn run(req: MeasureRequest) -> Result<(), CliError> {
    if req.files.len() > 1 {
        return Err(CliError::new("At most one filename argument is allowed."));
    }
    let file = req.files.first();
    if file.is_none() && (req.format.is_some() || req.snapshot.is_some()) {
        return Err(CliError::new(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    if file.is_some() && req.size.is_some() {
        return Err(CliError::new(
            "--size N cannot be used together with a filename.",
        ));
    }
    let Some(size_or_file) = file.map(Ok).or(req.size.map(Err)) else {
        return Err(CliError::new(
            "Either --size N or one filename must be specified.",
        ));
    };
    let mut src = match size_or_file {
        Ok(path) => Some(source::open_at(
            path,
            req.format.as_deref(),
            req.snapshot.as_deref(),
        )?),
        Err(_) => None,
    };
    let out_name = req.target_format.as_deref().unwrap_or("raw");
    let target = match Format::parse(out_name) {
        Ok(f) => f,
        Err(_) if out_name == "luks" => {
            return Err(CliError::new(
                "Parameter 'key-secret' is required for cipher",
            ))
        }
        Err(_) if matches!(out_name, "dmg" | "bochs" | "cloop") => {
            return Err(CliError::new(format!(
                "Format driver '{out_name}' does not support image creation"
            )))
        }
        Err(_) if crate::source::QEMU_ONLY_FORMATS.contains(&out_name) => {
            return Err(CliError::new(format!(
                "Block driver '{out_name}' does not support size measurement"
            )))
        }
        Err(_) => return Err(CliError::new(format!("Unknown file format '{out_name}'"))),
    };
    // measure has no "-o help": QEMU parses it as an unknown option.
    if crate::opts::OptList::parse(&req.options).is_ok_and(|l| l.help) {
        return Err(CliError::new(format!(
            "Invalid parameter 'help'\n{}Invalid options for file format '{}'",
            crate::prog::prefix(),
            target.name()
        )));
    }
    // encrypt.* options: only LUKS changes the numbers (its header area, in whole
    // clusters, is added to both sizes, as qcow2_measure does); it needs its secret object.
    let mut lists = req.options.clone();
    let mut luks_area = 0u64;
    if target == Format::Qcow2 {
        if let Ok(list) = crate::opts::OptList::parse(&req.options) {
            let get = |n: &str| {
                list.items
                    .iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            if get("encrypt.format").is_some_and(|f| f == "luks") {
                let (o, _) = crate::encryption::luks_options(&get)
                    .map_err(CliError::new)?
                    .ok_or_else(|| CliError::new("encrypt.format without options"))?;
                luks_area = qcow2_crypto::keyslot::area_len(&o);
            }
            let rest: Vec<String> = list
                .items
                .iter()
                .filter(|(k, _)| !k.starts_with("encrypt."))
                .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
                .collect();
            lists = if rest.is_empty() {
                Vec::new()
            } else {
                vec![rest.join(",")]
            };
        }
    }
    let opts = target_options(target, &lists).map_err(|e| {
        CliError::new(format!(
            "{}\n{}Invalid options for file format '{}'",
            e.msg,
            crate::prog::prefix(),
            target.name()
        ))
    })?;
    let opt = |name: &str| opts.iter().find(|o| o.name == name);
    let size_option = req.size.or(opt("size").map(|o| o.num)).unwrap_or(0);
    let info = match target {
        Format::Raw => {
            let required = match &src {
                Some(s) => s.disk.size(),
                None => size_option.next_multiple_of(512),
            };
            Info {
                required,
                fully_allocated: required,
                bitmaps: None,
            }
        }
        Format::Qcow2 => {
            let mut m = MeasureOptions::default();
            if let Some(o) = opt("extended_l2") {
                m.extended_l2 = o.flag;
            }
            if let Some(o) = opt("cluster_size") {
                m.cluster_size = o.num;
            }
            if let Some(o) = opt("compat") {
                m.v3 = match o.text.as_str() {
                    "0.10" => false,
                    "1.1" => true,
                    other => {
                        return Err(CliError::new(format!(
                            "Invalid compatibility level: '{other}'"
                        )))
                    }
                };
            }
            if let Some(o) = opt("refcount_bits") {
                m.refcount_bits = o.num;
            }
            // Validate in QEMU's order before the preallocation mode is looked at.
            m.validate().map_err(|e| CliError::new(e.to_string()))?;
            if let Some(o) = opt("preallocation") {
                m.preallocate_data = match o.text.as_str() {
                    "off" | "metadata" => false,
                    "falloc" | "full" => true,
                    other => {
                        return Err(CliError::new(format!("invalid parameter value: {other}")))
                    }
                };
            }
            m.has_backing_file = opt("backing_file").is_some();
            let mut info = qcow2_info(&m, size_option, src.as_mut())?;
            let luks = luks_area.next_multiple_of(m.cluster_size);
            info.required += luks;
            info.fully_allocated += luks;
            info
        }
    };
    print(&info, req.output);
    Ok(())
}

fn qcow2_info(
    m: &MeasureOptions,
    size_option: u64,
    src: Option<&mut Disk>,
) -> Result<Info, CliError> {
    let err = |e: qcow2_format::measure::MeasureError| CliError::new(e.to_string());
    let Some(src) = src else {
        let r = measure(m, MeasureSource::Size(size_option)).map_err(err)?;
        return Ok(Info {
            required: r.required,
            fully_allocated: r.fully_allocated,
            bitmaps: None,
        });
    };
    let size = src.disk.size();
    let mut counter = DataClusterCounter::new(m.cluster_size);
    if !m.has_backing_file {
        let mut offset = 0u64;
        while offset < size {
            let st = src.disk.status_above(offset, size - offset).map_err(|e| {
                CliError::new(format!(
                    "Unable to get block status: {}",
                    crate::io::strerror(e.errno())
                ))
            })?;
            let n = st.length.clamp(1, size - offset);
            if !st.zero && st.data && st.allocated {
                counter.add(offset, n);
            }
            offset += n;
        }
    }
    let r = measure(
        m,
        MeasureSource::Image {
            virtual_size: size,
            data_clusters: counter.clusters(),
            size_option,
        },
    )
    .map_err(err)?;
    // Bitmaps are shown when both source and target support persistent bitmaps.
    let bitmaps = match &src.opened.qcow2 {
        Some(q) if m.v3 && q.first.header.version >= 3 => {
            let list: Vec<BitmapSize> = q
                .bitmaps
                .iter()
                .map(|b| BitmapSize {
                    name_len: b.name.len() as u64,
                    granularity: b.granularity(),
                })
                .collect();
            Some(bitmaps_size(&list, size, m.cluster_size).map_err(err)?)
        }
        _ => None,
    };
    Ok(Info {
        required: r.required,
        fully_allocated: r.fully_allocated,
        bitmaps,
    })
}
