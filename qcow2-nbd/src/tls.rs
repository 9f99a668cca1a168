//! TLS for the NBD server (`NBD_OPT_STARTTLS`), with rustls and the ring provider.
//!
//! [`TlsConfig`] loads x509 credentials as QEMU's `tls-creds-x509` object lays them out
//! in a directory: `ca-cert.pem` (the authority client certificates are checked
//! against), `server-cert.pem` and `server-key.pem`. A server with a `TlsConfig` runs in
//! the specification's FORCEDTLS mode, as qemu-nbd does: every option but `STARTTLS`
//! (and `ABORT`) is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up.
//!
//! [`TlsStream`] is a connection after the TLS handshake. The transmission phase reads
//! requests on one thread and writes replies from others, so one rustls connection is
//! shared under a lock that is never held across socket I/O: the reader decrypts what
//! it read from the socket, writers encrypt under a send lock (which keeps records in
//! the order they were made) and write the records out after releasing the connection.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::net::Stream;

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("Unable to access credentials {}: {}", path.display(), strerror(source))]
    Access {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A credentials file holds no usable PEM object of the kind expected.
    #[error("Unable to load credentials {}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the credentials (a key that does not match the certificate, say).
    #[error("Unable to use the TLS credentials: {0}")]
    Rustls(String),
}

/// An OS error's text without Rust's " (os error N)" suffix (QEMU prints strerror).
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Server-side TLS credentials.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
    /// QEMU's `authz-simple`: the only client certificate subject let in.
    identity: Option<String>,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Access {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            path: path.to_path_buf(),
            reason: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Access {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl TlsConfig {
    /// Loads QEMU's layout from `dir`: `server-cert.pem` (the chain sent to clients),
    /// `server-key.pem`, and with `verify_peer` `ca-cert.pem`, against which every client
    /// must then present a valid certificate (QEMU's `verify-peer=on`, its default).
    pub fn from_x509_dir(dir: impl AsRef<Path>, verify_peer: bool) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rustls = |e: rustls::Error| TlsError::Rustls(e.to_string());
        // QEMU reads the CA certificate whether it verifies peers or not.
        let ca = load_certs(&dir.join("ca-cert.pem"))?;
        let chain = load_certs(&dir.join("server-cert.pem"))?;
        let key = load_key(&dir.join("server-key.pem"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls)?;
        let builder = if verify_peer {
            let mut roots = RootCertStore::empty();
            for c in ca {
                roots.add(c).map_err(rustls)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(rustls)?;
        Ok(TlsConfig {
            config: Arc::new(config),
            identity: None,
        })
    }

    /// Admits only clients whose certificate's subject, written as QEMU's GnuTLS writes
    /// it for its authorisation check (the RDNs in certificate order, `C=GB,O=Example,
    /// CN=client`, RFC 4514 escaping), is `identity` (qemu-nbd's `--tls-authz` with an
    /// `authz-simple` object). Needs client certificates, so `verify_peer` at load time.
    pub fn with_allowed_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Whether the verified client certificate chain passes the identity check.
    fn authorize(&self, conn: &ServerConnection) -> io::Result<()> {
        let Some(want) = &self.identity else {
            return Ok(());
        };
        let denied = |who: &str| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("TLS x509 authz check for {who} is denied"),
            )
        };
        let dn = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| x509_name::subject(c.as_ref()))
            .ok_or_else(|| denied("a client without a certificate"))?;
        if &dn == want {
            Ok(())
        } else {
            Err(denied(&dn))
        }
    }

    /// Runs the TLS handshake on `sock` (after `NBD_OPT_STARTTLS` was acknowledged).
    pub(crate) fn accept(&self, mut sock: Stream) -> io::Result<TlsStream> {
        let mut conn = ServerConnection::new(self.config.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        self.authorize(&conn)?;
        Ok(TlsStream(Arc::new(Shared {
            conn: Mutex::new(conn),
            reader: Mutex::new(Reader {
                sock: sock.try_clone()?,
                pending: Vec::new(),
            }),
            ctl: sock.try_clone()?,
            writer: Mutex::new(sock),
        })))
    }
}

/// Plaintext at most encrypted in one go (the records then go out before the next piece
/// is encrypted, so memory stays bounded for large replies).
const ENCRYPT_CHUNK: usize = 256 << 10;
/// Bytes read from the socket at a time.
const SOCKET_READ: usize = 64 << 10;

struct Reader {
    sock: Stream,
    /// Bytes read from the socket, not yet given to rustls.
    pending: Vec<u8>,
}

struct Shared {
    conn: Mutex<ServerConnection>,
    /// The socket's read side (the one reading thread).
    reader: Mutex<Reader>,
    /// The socket's write side; held from encrypting a piece to writing its records.
    writer: Mutex<Stream>,
    /// The socket for shutdown and timeouts, which must not wait for either side.
    ctl: Stream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A connection after the TLS handshake; clones share it (one reads, many write).
#[derive(Clone)]
pub struct TlsStream(Arc<Shared>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl TlsStream {
    /// Reads decrypted bytes (0 at the end of the stream).
    pub(crate) fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rd = lock(&self.0.reader);
        loop {
            {
                let mut conn = lock(&self.0.conn);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if !rd.pending.is_empty() {
                    // Never an empty slice: rustls takes a zero-length read as the end.
                    let mut slice = &rd.pending[..];
                    let n = conn.read_tls(&mut slice)?;
                    rd.pending.drain(..n);
                    conn.process_new_packets().map_err(tls_error)?;
                    continue;
                }
            }
            // Nothing decrypted and nothing pending: wait for the socket, unlocked.
            let mut chunk = vec![0u8; SOCKET_READ];
            let n = loop {
                match rd.sock.read(&mut chunk) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                // The peer closed without close_notify: the end, as for a plain socket.
                return Ok(0);
            }
            rd.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// Encrypts and sends every byte of every part.
    pub(crate) fn write_all_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut sock = lock(&self.0.writer);
        let mut records = Vec::new();
        for part in parts {
            let mut at = 0;
            while at < part.len() {
                {
                    let mut conn = lock(&self.0.conn);
                    let end = part.len().min(at + ENCRYPT_CHUNK);
                    let n = conn.writer().write(&part[at..end])?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    at += n;
                    while conn.wants_write() {
                        conn.write_tls(&mut records)?;
                    }
                }
                if records.len() >= ENCRYPT_CHUNK {
                    sock.write_all(&records)?;
                    records.clear();
                }
            }
        }
        if !records.is_empty() {
            sock.write_all(&records)?;
        }
        Ok(())
    }

    /// Sends close_notify when the socket is free, then shuts the socket down (a blocked
    /// read or write returns).
    pub(crate) fn shutdown(&self) {
        if let Ok(mut sock) = self.0.writer.try_lock() {
            let mut records = Vec::new();
            if let Ok(mut conn) = self.0.conn.try_lock() {
                conn.send_close_notify();
                while conn.wants_write() {
                    if conn.write_tls(&mut records).is_err() {
                        break;
                    }
                }
            }
            let _ = sock.write_all(&records);
        }
        self.0.ctl.shutdown();
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.ctl.set_read_timeout(t)
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.ctl.set_write_timeout(t)
    }
}

/// The subject of an X.509 certificate as GnuTLS prints a distinguished name, for
/// `authz-simple` identities. A small DER walk over the certificate: every length is
/// checked against what is left, nothing is trusted.
mod x509_name {
    /// One DER element: (tag, contents, rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }

    /// The subject Name of a DER certificate, formatted; `None` if malformed.
    pub(super) fn subject(cert: &[u8]) -> Option<String> {
        let (0x30, cert, _) = tlv(cert)? else {
            return None;
        };
        let (0x30, tbs, _) = tlv(cert)? else {
            return None;
        };
        let mut rest = tbs;
        // [0] version, serial, signature algorithm, issuer, validity, then subject.
        if rest.first() == Some(&0xa0) {
            rest = tlv(rest)?.2;
        }
        for want in [0x02, 0x30, 0x30, 0x30] {
            let (tag, _, r) = tlv(rest)?;
            if tag != want {
                return None;
            }
            rest = r;
        }
        let (0x30, name, _) = tlv(rest)? else {
            return None;
        };
        format_name(name)
    }

    /// RDNs in certificate order (as GnuTLS 3.7 prints them for QEMU's authz check),
    /// attributes of one RDN joined by `+`.
    pub(super) fn format_name(mut name: &[u8]) -> Option<String> {
        let mut rdns = Vec::new();
        while !name.is_empty() {
            let (0x31, mut set, r) = tlv(name)? else {
                return None;
            };
            name = r;
            let mut attrs = Vec::new();
            while !set.is_empty() {
                let (0x30, atv, r) = tlv(set)? else {
                    return None;
                };
                set = r;
                let (0x06, oid, value) = tlv(atv)? else {
                    return None;
                };
                attrs.push(attribute(oid, value)?);
            }
            rdns.push(attrs.join("+"));
        }
        Some(rdns.join(","))
    }

    fn attribute(oid: &[u8], value: &[u8]) -> Option<String> {
        let dotted = oid_string(oid)?;
        let short = match dotted.as_str() {
            "2.5.4.3" => "CN",
            "2.5.4.6" => "C",
            "2.5.4.7" => "L",
            "2.5.4.8" => "ST",
            "2.5.4.9" => "street",
            "2.5.4.10" => "O",
            "2.5.4.11" => "OU",
            "2.5.4.12" => "title",
            "2.5.4.5" => "serialNumber",
            "0.9.2342.19200300.100.1.25" => "DC",
            "0.9.2342.19200300.100.1.1" => "UID",
            "1.2.840.113549.1.9.1" => "EMAIL",
            _ => "",
        };
        let (tag, text, _) = tlv(value)?;
        let text = match tag {
            // UTF8String, PrintableString, T61String, IA5String, VisibleString.
            0x0c | 0x13 | 0x14 | 0x16 | 0x1a => String::from_utf8_lossy(text).into_owned(),
            // BMPString: UTF-16BE.
            0x1e if text.len() % 2 == 0 => {
                let units: Vec<u16> = text
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            }
            _ => String::new(),
        };
        if short.is_empty() || (text.is_empty() && tag != 0x0c && tag != 0x13) {
            // Unknown attribute or value type: the dotted OID and the DER value in hex.
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            return Some(format!("{dotted}=#{hex}"));
        }
        Some(format!("{short}={}", escape(&text)))
    }

    /// RFC 4514 escaping.
    fn escape(v: &str) -> String {
        let mut out = String::with_capacity(v.len());
        let last = v.chars().count().saturating_sub(1);
        for (i, c) in v.chars().enumerate() {
            let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                || (i == 0 && (c == '#' || c == ' '))
                || (i == last && c == ' ');
            if special {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    fn oid_string(oid: &[u8]) -> Option<String> {
        let (&first, rest) = oid.split_first()?;
        let mut parts = vec![u64::from(first / 40).min(2), 0];
        parts[1] = u64::from(first) - parts[0] * 40;
        let mut acc: u64 = 0;
        for &b in rest {
            acc = acc.checked_mul(128)?.checked_add(u64::from(b & 0x7f))?;
            if b & 0x80 == 0 {
                parts.push(acc);
                acc = 0;
            }
        }
        Some(
            parts
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("."),
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn der(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.extend_from_slice(&[0x82, (content.len() >> 8) as u8, content.len() as u8]);
            }
            v.extend_from_slice(content);
            v
        }

        fn rdn(oid: &[u8], tag: u8, text: &str) -> Vec<u8> {
            let mut atv = der(0x06, oid);
            atv.extend(der(tag, text.as_bytes()));
            der(0x31, &der(0x30, &atv))
        }

        #[test]
        fn names_print_as_gnutls_prints_them() {
            let mut name = rdn(&[0x55, 4, 6], 0x13, "GB");
            name.extend(rdn(&[0x55, 4, 10], 0x0c, "Example, Inc"));
            name.extend(rdn(&[0x55, 4, 3], 0x0c, " client"));
            assert_eq!(
                format_name(&name).unwrap(),
                "C=GB,O=Example\\, Inc,CN=\\ client"
            );
            // An unknown attribute: dotted OID and hex.
            let odd = rdn(&[0x2a, 0x03], 0x0c, "x");
            assert_eq!(format_name(&odd).unwrap(), "1.2.3=#0c0178");
            // Truncated or mistagged input is refused, never read past its end.
            assert!(format_name(&name[..name.len() - 1]).is_none());
            assert!(format_name(&[0x30, 0x00]).is_none());
            assert!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        }
    }
}
