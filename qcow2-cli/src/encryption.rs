//! The `encrypt.*` create options of qcow2 (`qemu-img create -o` and convert targets):
//! checked in QEMU's order with its messages, then the LUKS header area built with
//! `qcow2-crypto` (OS randomness, QEMU's PBKDF2 benchmark) for the layout to store.

use qcow2_crypto::cipher::{CipherAlg, CipherMode, IvGenAlg};
use qcow2_crypto::keyslot::{self, CpuTimeBench, LuksCreateOptions, OsRandom};
use qcow2_crypto::HashAlg;
use qcow2_format::layout::LuksArea;
use qcow2_image::Secret;

/// The LUKS create options of qcow2 besides `encrypt.format` (their types and help texts
/// are in `create`'s option table).
const LUKS_OPTS: &[&str] = &[
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// A new image's encryption: the LUKS area to store and the secret to open it with.
pub struct Encryption {
    /// The LUKS header area.
    pub area: LuksArea,
    /// The passphrase of key slot 0.
    pub secret: Secret,
}

/// QEMU's cipher algorithm names; `None` for names QEMU knows that this tool cannot
/// encrypt with.
fn cipher_alg(v: &str) -> Result<Option<CipherAlg>, String> {
    Ok(match v {
        "aes-128" => Some(CipherAlg::Aes128),
        "aes-192" => Some(CipherAlg::Aes192),
        "aes-256" => Some(CipherAlg::Aes256),
        "des" | "3des" | "cast5-128" | "serpent-128" | "serpent-192" | "serpent-256"
        | "twofish-128" | "twofish-192" | "twofish-256" | "sm4" => None,
        _ => {
            return Err(format!(
                "Parameter 'cipher-alg' does not accept value '{v}'"
            ))
        }
    })
}

fn cipher_mode(v: &str) -> Result<Option<CipherMode>, String> {
    Ok(match v {
        "xts" => Some(CipherMode::Xts),
        "cbc" => Some(CipherMode::Cbc),
        "ecb" | "ctr" => None,
        _ => {
            return Err(format!(
                "Parameter 'cipher-mode' does not accept value '{v}'"
            ))
        }
    })
}

fn hash_alg(param: &str, v: &str) -> Result<Option<HashAlg>, String> {
    match HashAlg::from_name(v) {
        Some(h) => Ok(Some(h)),
        None if matches!(v, "md5" | "ripemd160" | "sm3") => Ok(None),
        None => Err(format!("Parameter '{param}' does not accept value '{v}'")),
    }
}

fn not_here(what: &str, v: &str) -> String {
    format!("{what} '{v}' is not supported by this tool")
}

/// Reads the encryption options (`get` gives an option's value text) and, when they ask
/// for LUKS, builds the area. `Ok(None)`: no encryption. Errors are QEMU's messages (and
/// this tool's for algorithms QEMU has and it has not, and for creating legacy AES).
pub fn from_options(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Encryption>, String> {
    let Some((o, secret)) = luks_options(get)? else {
        return Ok(None);
    };
    let new = keyslot::create(&o, secret.as_bytes(), &mut OsRandom, &mut CpuTimeBench)
        .map_err(|e| e.to_string())?;
    Ok(Some(Encryption {
        area: LuksArea(new.area),
        secret,
    }))
}

/// The LUKS options and the secret the encryption options ask for (`Ok(None)`: no
/// encryption), checked as [`from_options`] checks them, without building anything.
pub fn luks_options(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(LuksCreateOptions, Secret)>, String> {
    let legacy_flag = get("encryption").map(|v| crate::opts::parse_bool(&v) == Some(true));
    let format = get("encrypt.format");
    if legacy_flag.is_some() && format.is_some() {
        return Err(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
        );
    }
    let format = match (legacy_flag, format) {
        (Some(true), _) => Some("aes".to_string()),
        (_, f) => f,
    };
    let any = LUKS_OPTS.iter().any(|n| get(n).is_some());
    let Some(format) = format else {
        if any {
            return Err("Parameter 'encrypt.format' is missing".into());
        }
        return Ok(None);
    };
    match format.as_str() {
        "luks" => {}
        "aes" => {
            return Err(
                "Creating images with the legacy AES encryption is not supported by this tool \
                 (QEMU's system emulators refuse such images; use encrypt.format=luks)"
                    .into(),
            )
        }
        other => {
            return Err(format!(
                "Parameter 'format' does not accept value '{other}'"
            ))
        }
    }
    // The QAPI visitor's order: enum values first.
    let alg = get("encrypt.cipher-alg")
        .map(|v| cipher_alg(&v).map(|a| (a, v)))
        .transpose()?;
    let mode = get("encrypt.cipher-mode")
        .map(|v| cipher_mode(&v).map(|m| (m, v)))
        .transpose()?;
    let ivgen = match get("encrypt.ivgen-alg").as_deref() {
        None => None,
        Some(v @ ("plain" | "plain64" | "essiv")) => Some(v.to_string()),
        Some(v) => return Err(format!("Parameter 'ivgen-alg' does not accept value '{v}'")),
    };
    let ivgen_hash = get("encrypt.ivgen-hash-alg")
        .map(|v| hash_alg("ivgen-hash-alg", &v).map(|h| (h, v)))
        .transpose()?;
    let hash = get("encrypt.hash-alg")
        .map(|v| hash_alg("hash-alg", &v).map(|h| (h, v)))
        .transpose()?;
    let iter_time = match get("encrypt.iter-time") {
        None => keyslot::DEFAULT_ITER_TIME_MS,
        Some(v) => crate::opts::parse_number(&v)
            .ok_or_else(|| "Parameter 'encrypt.iter-time' expects a number".to_string())?,
    };
    let Some(secret_id) = get("encrypt.key-secret") else {
        return Err("Parameter 'encrypt.key-secret' is required for cipher".into());
    };
    let secret = crate::secrets::lookup(&secret_id)?;
    let mut o = LuksCreateOptions {
        iter_time_ms: iter_time,
        ..LuksCreateOptions::default()
    };
    if let Some((a, name)) = alg {
        o.cipher_alg = a.ok_or_else(|| not_here("Cipher algorithm", &name))?;
    }
    if let Some((m, name)) = mode {
        o.cipher_mode = m.ok_or_else(|| not_here("Cipher mode", &name))?;
    }
    if let Some((h, name)) = hash {
        o.hash = h.ok_or_else(|| not_here("Hash algorithm", &name))?;
    }
    if let Some((h, name)) = &ivgen_hash {
        o.ivgen_hash = Some(h.ok_or_else(|| not_here("Hash algorithm", name))?);
    }
    o.ivgen = match ivgen.as_deref() {
        Some("plain") => IvGenAlg::Plain,
        Some("essiv") => {
            // QEMU's default ESSIV hash is sha256.
            let h = o.ivgen_hash.take().unwrap_or(HashAlg::Sha256);
            IvGenAlg::Essiv(h)
        }
        _ => IvGenAlg::Plain64,
    };
    if let IvGenAlg::Essiv(h) = o.ivgen {
        if CipherAlg::aes_for_key(h.digest_len()).is_none() {
            return Err(format!(
                "No AES cipher with key size {} available",
                h.digest_len()
            ));
        }
    }
    Ok(Some((o, secret)))
}
