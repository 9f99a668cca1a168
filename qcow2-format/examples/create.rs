//! Writes a fresh qcow2 image with the layout builder, then parses it back.
//!
//! Usage: `cargo run -p qcow2-format --example create -- PATH SIZE [CLUSTER_SIZE]`
//! (sizes accept K/M/G/T suffixes, powers of 1024). The result is byte-identical to
//! `qemu-img create -f qcow2 -o cluster_size=CLUSTER_SIZE PATH SIZE` and checks clean.

use std::process::ExitCode;

use qcow2_format::header::{open_first_cluster, OpenOptions};
use qcow2_format::layout::{fresh_image, CreateOptions};

/// Parses `123`, `64K`, `1G`, ... (binary multiples, like qemu-img).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (s.get(..i)?, shift)
        }
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, size) = match args.as_slice() {
        [path, size] | [path, size, _] => (path, size),
        _ => return Err("usage: create PATH SIZE [CLUSTER_SIZE]".into()),
    };
    let size = parse_size(size).ok_or_else(|| format!("invalid size '{size}'"))?;
    let mut opts = CreateOptions::new(size);
    if let Some(cs) = args.get(2) {
        opts.cluster_size = parse_size(cs).ok_or_else(|| format!("invalid cluster size '{cs}'"))?;
    }
    let image = fresh_image(&opts).map_err(|e| e.to_string())?;
    std::fs::write(path, image.to_bytes()).map_err(|e| format!("{path}: {e}"))?;

    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let fc = open_first_cluster(
        &bytes,
        &OpenOptions {
            read_write: true,
            check_mode: false,
        },
    )
    .map_err(|e| format!("{path}: {e}"))?;
    let h = &fc.header;
    println!("Wrote {path} ({} bytes)", bytes.len());
    println!("version:                 {}", h.version);
    println!("virtual size:            {}", h.size);
    println!("cluster size:            {}", h.cluster_size());
    println!("refcount bits:           {}", 1u64 << h.refcount_order);
    println!("compression type:        {:?}", h.compression());
    println!(
        "L1 table:                {} entries at {:#x}",
        h.l1_size, h.l1_table_offset
    );
    println!(
        "refcount table:          {} cluster(s) at {:#x}",
        h.refcount_table_clusters, h.refcount_table_offset
    );
    println!("incompatible features:   {:#x}", h.incompatible_features);
    println!("compatible features:     {:#x}", h.compatible_features);
    println!("autoclear features:      {:#x}", h.autoclear_features);
    println!("header length:           {}", h.header_length);
    if let Some(t) = &fc.extensions.feature_table {
        println!("feature table:           {} entries", t.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("create: {e}");
            ExitCode::FAILURE
        }
    }
}
