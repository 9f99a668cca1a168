//! `qemu-img check`-like front end for comparing output by hand:
//! `qcheck [-r leaks|all] [--output=json] FILE`.

use std::sync::Arc;

use qcow2_check::{check, CheckOptions, RepairMode};
use qcow2_io::{FileStorage, Storage};

fn main() {
    let mut repair = None;
    let mut json = false;
    let mut file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-r" => {
                repair = match args.next().as_deref() {
                    Some("leaks") => Some(RepairMode::Leaks),
                    Some("all") => Some(RepairMode::All),
                    _ => {
                        eprintln!("bad -r");
                        std::process::exit(1)
                    }
                }
            }
            "--output=json" => json = true,
            f => file = Some(f.to_string()),
        }
    }
    let Some(file) = file else {
        eprintln!("usage: qcheck [-r leaks|all] [--output=json] FILE");
        std::process::exit(1)
    };
    let storage: Arc<dyn Storage> = match FileStorage::open(&file, repair.is_some()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("qemu-img: Could not open '{file}': {e}");
            std::process::exit(1)
        }
    };
    let t = std::time::Instant::now();
    match check(storage, &CheckOptions { repair }) {
        Ok(report) => {
            if json {
                print!("{}", report.render_json(&file));
            } else {
                print!("{}", report.render_human());
            }
            eprint!("{}", report.render_stderr());
            if std::env::var_os("QCHECK_TIME").is_some() {
                eprintln!("time: {:?}", t.elapsed());
            }
            std::process::exit(report.exit_code())
        }
        Err(e) => {
            eprintln!("qemu-img: Could not open '{file}': {e}");
            std::process::exit(1)
        }
    }
}
