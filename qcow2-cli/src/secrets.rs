//! QEMU's `secret` objects (`--object secret,id=ID,data=...|file=...[,format=raw|base64]`)
//! and their lookup by `encrypt.key-secret=ID`.
//!
//! Secrets are kept for the life of the process in buffers zeroized when dropped; they are
//! never printed. A secret file is read as it is (QEMU drops nothing either), with the
//! permissions the user gave it.

use qcow2_image::Secret;
use std::sync::Mutex;

static SECRETS: Mutex<Vec<(String, Secret)>> = Mutex::new(Vec::new());

/// The key secret the command's `--image-opts` named (`encrypt.key-secret=ID`): every
/// image the command opens through the library is opened with it.
static COMMAND_SECRET: Mutex<Option<Secret>> = Mutex::new(None);

/// The key secret of the command's images, if `--image-opts` named one.
pub fn command_secret() -> Option<Secret> {
    COMMAND_SECRET
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// qcow2 runtime options of a qemu-img `--image-opts` list (`l2-cache-entry-size=...`),
/// applied by the command's qcow2 opens as the key secret is.
static COMMAND_RUNTIME: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The command's qcow2 runtime options (see [`image_opts`]).
pub fn command_runtime() -> Vec<(String, String)> {
    COMMAND_RUNTIME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// What a qemu-img `--image-opts` option list says: the file name and the driver, and
/// `encrypt.key-secret` (looked up now and kept as the command's key secret). Options
/// this tool does not take are refused with QEMU's message.
pub fn image_opts(list: &str) -> Result<(String, Option<String>), String> {
    let mut file = None;
    let mut driver = None;
    let mut items = crate::ioshell::split_opts(list, None);
    if items.iter().any(|(k, v)| k == "driver" && v == "blkdebug") {
        // blkdebug above the format: its own options are checked and, with no engine
        // events reaching that level, change nothing a qemu-img command reads; the
        // format's options are those under `image.`.
        let mut node = crate::blkdebug::Blkdebug::default();
        let mut pending = Vec::new();
        let mut below = Vec::new();
        for (k, v) in items {
            if k == "driver" {
                continue;
            }
            match k.strip_prefix("image.") {
                Some(ik) => below.push((ik.to_string(), v)),
                None => {
                    if !node.apply_option(&k, &v, &mut pending)? {
                        return Err(format!(
                            "Block format 'blkdebug' does not support the option '{k}'"
                        ));
                    }
                }
            }
        }
        node.finish_options(pending)?;
        if let Some(f) = node.image.take() {
            below.push(("file.filename".to_string(), f));
        }
        items = below;
    }
    for (k, v) in items {
        match k.as_str() {
            "driver" => driver = Some(v),
            "file" | "file.filename" | "filename" => file = Some(v),
            "file.driver" if v == "file" => {}
            "file.driver" => return Err(format!("Unknown protocol driver '{v}'")),
            "encrypt.key-secret" => {
                let s = lookup(&v)?;
                *COMMAND_SECRET.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
            }
            _ => {
                let d = driver.as_deref().unwrap_or("qcow2");
                // qcow2's runtime options go to the command's qcow2 opens.
                let mut probe = qcow2_image::OpenOptions::default();
                if d != "qcow2" || !crate::qcowdev::apply_runtime_option(&mut probe, &k, &v)? {
                    return Err(format!(
                        "Block format '{d}' does not support the option '{k}'"
                    ));
                }
                COMMAND_RUNTIME
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((k, v));
            }
        }
    }
    let file = file.ok_or_else(|| "Must specify either driver or file".to_string())?;
    Ok((file, driver))
}

/// Decodes standard base64 (with or without padding; whitespace refused, as glib's
/// decoder in QEMU's strict mode).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let t = s.trim_end_matches('=');
    if s.len() - t.len() > 2 || t.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(t.len() * 3 / 4);
    for chunk in t.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Defines a secret from the properties of a `--object secret,...` (`id` already taken
/// out); QEMU's messages for bad definitions.
pub fn define(id: &str, props: &[(String, String)]) -> Result<(), String> {
    let mut data = None;
    let mut file = None;
    let mut format = "raw".to_string();
    for (k, v) in props {
        match k.as_str() {
            "data" => data = Some(v.clone()),
            "file" => file = Some(v.clone()),
            "format" => format = v.clone(),
            "keyid" | "iv" => {
                return Err("Encrypted secrets are not supported by this tool".into());
            }
            "loaded" => {}
            _ => return Err(format!("Parameter '{k}' is unexpected")),
        }
    }
    let raw = match (data, file) {
        (Some(_), Some(_)) => {
            return Err("'file' and 'data' are mutually exclusive".into());
        }
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            format!(
                "Unable to read {f}: Failed to open file “{f}”: {}",
                crate::image::strerror(&e)
            )
        })?,
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
    };
    let raw = zeroize::Zeroizing::new(raw);
    let bytes = match format.as_str() {
        "raw" => raw.to_vec(),
        "base64" => {
            let bad = || "Base64 data contains invalid characters".to_string();
            let text = std::str::from_utf8(&raw).map_err(|_| bad())?;
            base64_decode(text).ok_or_else(bad)?
        }
        other => {
            return Err(format!(
                "Parameter 'format' does not accept value '{other}'"
            ))
        }
    };
    let mut all = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    if all.iter().any(|(i, _)| i == id) {
        return Err(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        ));
    }
    all.push((id.to_string(), Secret::new(bytes)));
    Ok(())
}

/// The secret named `id`: QEMU's "No secret with id 'ID'" when there is none.
pub fn lookup(id: &str) -> Result<Secret, String> {
    let all = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    all.iter()
        .find(|(i, _)| i == id)
        .map(|(_, s)| s.clone())
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// Every secret defined so far, by id (for the engine's `encrypt.new-secret` /
/// `encrypt.old-secret` lookups).
pub fn all() -> Vec<(String, Secret)> {
    SECRETS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Defines the secret of a qemu-img style `--object` argument.
pub fn define_object(def: &str) -> Result<(), String> {
    let obj = crate::ioshell::parse_object(def)?;
    define(&obj.id, &obj.props)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YQ").unwrap(), b"a");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("Y$==").is_none());
    }

    #[test]
    fn define_and_lookup() {
        define("t-a", &[("data".into(), "abc".into())]).unwrap();
        define(
            "t-b",
            &[
                ("data".into(), "YWJj".into()),
                ("format".into(), "base64".into()),
            ],
        )
        .unwrap();
        assert_eq!(lookup("t-a").unwrap(), lookup("t-b").unwrap());
        assert_eq!(lookup("t-a").unwrap().as_bytes(), b"abc");
        assert!(lookup("t-none").is_err());
        assert!(define("t-c", &[]).is_err());
        assert!(define("t-a", &[("data".into(), "x".into())]).is_err());
    }
}
