//! Helpers for LUKS-encrypted images: the secret and `--image-opts` arguments, images
//! made by qemu-img, qemu-io/`qcow2 io` runs, and the data pattern both tools check.

use super::{qcow2, qemu_img, qemu_io, Run};
use std::path::Path;

/// The secret `sec0` (passphrase `abc`).
pub const SECRET: &str = "secret,id=sec0,data=abc";

/// `--object ... --image-opts driver=qcow2,file.filename=FILE,encrypt.key-secret=sec0`.
pub fn opts(file: &str) -> Vec<String> {
    vec![
        "--object".into(),
        SECRET.into(),
        "--image-opts".into(),
        format!("driver=qcow2,file.filename={file},encrypt.key-secret=sec0"),
    ]
}

/// Creates `name` with qemu-img, LUKS with `extra` encrypt options (a short iter-time:
/// PBKDF2 at QEMU's default two seconds would make every open slow).
pub fn create(dir: &Path, name: &str, extra: &str, size: &str) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
    let r = qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, name, size,
        ],
    );
    assert_eq!(r.code, 0, "{}", r.text());
}

pub fn run_io(dir: &Path, ours: bool, file: &str, cmds: &[&str]) -> Run {
    let mut args: Vec<String> = opts(file);
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if ours {
        let mut a = vec!["io"];
        a.extend(args);
        qcow2(dir, &a)
    } else {
        qemu_io(dir, &args)
    }
}

pub fn assert_ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what}: {}", r.text());
    assert!(!r.text().contains("failed"), "{what}: {}", r.text());
    assert!(
        !r.text().contains("Pattern verification"),
        "{what}: {}",
        r.text()
    );
}

pub fn qemu_check_clean(dir: &Path, file: &str) {
    let mut a = vec!["check".to_string()];
    a.extend(opts(file));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let r = qemu_img(dir, &a);
    assert_eq!(r.code, 0, "qemu-img check {file}: {}", r.text());
    assert!(r.stdout.contains("No errors were found"), "{}", r.text());
}

pub const WRITES: &[&str] = &[
    "write -P 0x5a 0 128k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 200k 10k",
    "write -P 0x44 70000 5",
    "write -P 0x66 1M 64k",
    "write -z 300k 64k",
];

pub const READS: &[&str] = &[
    "read -P 0x5a 0 1000",
    "read -P 0x22 1000 3000",
    "read -P 0x5a 4000 66000",
    "read -P 0x44 70000 5",
    "read -P 0x5a 70005 61067",
    "read -P 0 128k 72k",
    "read -P 0x33 200k 10k",
    "read -P 0 300k 64k",
    "read -P 0x66 1M 64k",
    "read -P 0 2M 1M",
];
