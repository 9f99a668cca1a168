//! qemu-nbd's TLS command line: `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server
//! [,verify-peer=on|off]`, `--object authz-simple,id=ID,identity=DN`, `--tls-creds ID`
//! and `--tls-authz ID`. `--object secret,...` is passed on to [`crate::secrets`].
//!
//! Credentials are loaded when their object is defined, as QEMU loads them, so a missing
//! file is reported before anything listens.

use qcow2_nbd::TlsConfig;

use crate::CliError;

/// A `tls-creds-x509` object.
struct X509Creds {
    id: String,
    server: bool,
    config: Option<TlsConfig>,
}

/// The TLS-related objects of the command line.
#[derive(Default)]
pub struct TlsObjects {
    creds: Vec<X509Creds>,
    /// `authz-simple` objects: (id, identity).
    authz: Vec<(String, String)>,
}

fn on_off(key: &str, v: &str) -> Result<bool, CliError> {
    crate::opts::parse_bool(v)
        .ok_or_else(|| CliError::new(format!("Parameter '{key}' expects 'on' or 'off'")))
}

/// Defines every `--object`: secrets, x509 credentials (loaded now) and simple
/// authorisations; other types are refused.
pub fn define(defs: &[String]) -> Result<TlsObjects, CliError> {
    let mut out = TlsObjects::default();
    for def in defs {
        let props = crate::ioshell::split_opts(def, Some("qom-type"));
        let get = |k: &str| props.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        let kind = get("qom-type").unwrap_or_default();
        let id = || {
            get("id")
                .map(str::to_string)
                .ok_or_else(|| CliError::new("Parameter 'id' is missing"))
        };
        match kind {
            "secret" => crate::secrets::define_object(def).map_err(CliError::new)?,
            "tls-creds-x509" => {
                let id = id()?;
                let (mut dir, mut server, mut verify) = (None, false, true);
                for (k, v) in &props {
                    match k.as_str() {
                        "qom-type" | "id" => {}
                        "dir" => dir = Some(v.clone()),
                        "endpoint" => {
                            server = match v.as_str() {
                                "server" => true,
                                "client" => false,
                                _ => {
                                    return Err(CliError::new(format!(
                                        "Parameter 'endpoint' does not accept value '{v}'"
                                    )))
                                }
                            }
                        }
                        "verify-peer" => verify = on_off(k, v)?,
                        // QEMU's sanity check of its own certificates and cipher priority
                        // strings are GnuTLS matters: accepted, nothing to do.
                        "sanity-check" => {
                            on_off(k, v)?;
                        }
                        "priority" => {}
                        _ => return Err(CliError::new(format!("Parameter '{k}' is unexpected"))),
                    }
                }
                // A client endpoint is no use to a server; its files are not loaded.
                let config = match (server, dir) {
                    (false, _) => None,
                    (true, None) => {
                        return Err(CliError::new(
                            "Unable to access credentials: no directory given (dir=)",
                        ))
                    }
                    (true, Some(dir)) => Some(
                        TlsConfig::from_x509_dir(&dir, verify)
                            .map_err(|e| CliError::new(e.to_string()))?,
                    ),
                };
                out.creds.push(X509Creds { id, server, config });
            }
            "authz-simple" => {
                let id = id()?;
                if let Some((k, _)) = props
                    .iter()
                    .find(|(k, _)| !matches!(k.as_str(), "qom-type" | "id" | "identity"))
                {
                    // A comma inside the identity must be doubled (",,").
                    return Err(CliError::new(format!("Parameter '{k}' is unexpected")));
                }
                let identity = get("identity")
                    .ok_or_else(|| CliError::new("Parameter 'identity' is missing"))?;
                out.authz.push((id, identity.to_string()));
            }
            "" => return Err(CliError::new("Parameter 'qom-type' is missing")),
            other => {
                return Err(CliError::new(format!(
                    "Parameter 'qom-type' does not accept value '{other}'"
                )))
            }
        }
    }
    Ok(out)
}

impl TlsObjects {
    /// The server's TLS configuration from `--tls-creds` (and `--tls-authz`), with
    /// qemu-nbd's refusals; `None` without `--tls-creds`. TLS works on TCP and, as in
    /// QEMU 10, on Unix sockets (the client then names the host it expects).
    pub fn server_config(
        &self,
        creds: Option<&str>,
        authz: Option<&str>,
    ) -> Result<Option<TlsConfig>, CliError> {
        let Some(id) = creds else {
            if authz.is_some() {
                return Err(CliError::new(
                    "--tls-authz is not permitted without --tls-creds",
                ));
            }
            return Ok(None);
        };
        let fail = |m: String| CliError::new(format!("Failed to get TLS creds: {m}"));
        let c = self.creds.iter().find(|c| c.id == id).ok_or_else(|| {
            if self.authz.iter().any(|(a, _)| a == id) {
                fail(format!("Object with id '{id}' is not TLS credentials"))
            } else {
                fail(format!("No TLS credentials with id '{id}'"))
            }
        })?;
        let config = match (&c.config, c.server) {
            (Some(cfg), true) => cfg.clone(),
            _ => {
                return Err(fail(
                    "Expected TLS credentials for a server endpoint".into(),
                ))
            }
        };
        match authz {
            None => Ok(Some(config)),
            Some(a) => {
                let (_, identity) = self.authz.iter().find(|(i, _)| i == a).ok_or_else(|| {
                    CliError::new(format!("No authorization object with id '{a}'"))
                })?;
                Ok(Some(config.with_allowed_identity(identity.clone())))
            }
        }
    }
}
