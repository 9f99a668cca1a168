//! TLS from a raw socket (credentials made by `tests/data/make-certs.sh` with openssl):
//! FORCEDTLS refusals before `NBD_OPT_STARTTLS`, then a rustls client that starts TLS,
//! chooses the export and writes and reads through it; a client certificate from an
//! unknown authority, and a subject the identity check does not admit, are turned away;
//! the server goes on serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qcow2_image::{CreateOptions, Image, SharedImage};
use qcow2_io::MemStorage;
use qcow2_nbd::proto::{self, cmd, opt, rep, Request};
use qcow2_nbd::{Export, Listener, Server, ServerConfig, ServerHandle, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Makes the credentials in `dir`; `false` (with a message) when openssl is missing.
fn make_certs(dir: &Path) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/make-certs.sh");
    match std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .status()
    {
        Ok(s) if s.success() => true,
        _ => {
            eprintln!("openssl not available: skipping the TLS tests");
            false
        }
    }
}

struct Harness {
    sock: PathBuf,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    fn new(dir: &Path, tls: TlsConfig) -> Harness {
        let sock = dir.join("nbd.sock");
        let img = Image::create(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 20)).unwrap();
        let export = Export::new("disk", Arc::new(SharedImage::new(img))).unwrap();
        let config = ServerConfig {
            max_connections: 4,
            persistent: true,
            handshake_timeout: Some(Duration::from_secs(5)),
            tls: Some(tls),
            ..ServerConfig::default()
        };
        let server = Server::new(vec![export], config);
        let handle = server.handle();
        let listener = Listener::bind_unix(&sock).unwrap();
        let thread = std::thread::spawn(move || server.serve(&listener).unwrap());
        Harness {
            sock,
            handle,
            thread: Some(thread),
        }
    }

    /// A plain connection after the greeting.
    fn connect(&self) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 18];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b[0..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn option<S: Write>(s: &mut S, option: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// Whether the server turned the client away after the TLS handshake: sending an option
/// fails (the server may close before the client writes: EPIPE) or no reply comes.
fn refused<S: Read + Write>(s: &mut S) -> bool {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    if s.write_all(&b).and_then(|()| s.flush()).is_err() {
        return true;
    }
    let mut h = [0u8; 20];
    s.read_exact(&mut h).is_err()
}

/// (reply type, payload) of one option reply.
fn option_reply<S: Read>(s: &mut S) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], &proto::REPLY_MAGIC.to_be_bytes());
    let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut p).unwrap();
    (u32::from_be_bytes(h[12..16].try_into().unwrap()), p)
}

fn closed<S: Read>(s: &mut S) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// A rustls client configuration with the credentials in `dir` (QEMU's client layout).
fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

/// STARTTLS, then the TLS handshake as a client of `dir`'s credentials.
fn start_tls(mut s: UnixStream, dir: &Path) -> Tls {
    option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(dir), name).unwrap();
    rustls::StreamOwned::new(conn, s)
}

fn name_and(name: &str, rest: &[u8]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(rest);
    v
}

/// Over TLS: GO, then a write, a read back, and a disconnect.
fn write_and_read(t: &mut Tls) {
    option(t, opt::GO, &name_and("disk", &[0, 0]));
    loop {
        let (kind, _) = option_reply(t);
        if kind == rep::ACK {
            break;
        }
        assert_eq!(kind, rep::INFO);
    }
    let data = vec![0x3cu8; 4096];
    let req = |kind, cookie, length| Request {
        flags: 0,
        kind,
        cookie,
        offset: 8192,
        length,
    };
    t.write_all(&req(cmd::WRITE, 1, 4096).encode()).unwrap();
    t.write_all(&data).unwrap();
    t.flush().unwrap();
    let mut r = [0u8; 16];
    t.read_exact(&mut r).unwrap();
    assert_eq!(
        &r[0..8],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
        "simple reply, no error"
    );
    t.write_all(&req(cmd::READ, 2, 4096).encode()).unwrap();
    t.flush().unwrap();
    t.read_exact(&mut r).unwrap();
    assert_eq!(&r[4..8], &[0, 0, 0, 0]);
    let mut got = vec![0u8; 4096];
    t.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
    t.write_all(&req(cmd::DISC, 3, 0).encode()).unwrap();
    t.flush().unwrap();
}

#[test]
fn options_before_tls_are_refused_then_tls_serves() {
    let d = tempfile::tempdir().unwrap();
    if !make_certs(d.path()) {
        return;
    }
    let tls = TlsConfig::from_x509_dir(d.path().join("server"), true).unwrap();
    let h = Harness::new(d.path(), tls);
    // FORCEDTLS: every option but STARTTLS is refused until TLS is up.
    let mut s = h.connect();
    for (o, data) in [
        (opt::LIST, vec![]),
        (opt::INFO, name_and("disk", &[0, 0])),
        (opt::GO, name_and("disk", &[0, 0])),
        (opt::STRUCTURED_REPLY, vec![]),
        (4242, vec![1, 2]),
    ] {
        option(&mut s, o, &data);
        let (kind, msg) = option_reply(&mut s);
        assert_eq!(kind, rep::ERR_TLS_REQD, "option {o}");
        assert!(String::from_utf8_lossy(&msg).contains("not permitted before TLS"));
    }
    // EXPORT_NAME cannot be refused: the server hangs up. So does a STARTTLS with data.
    option(&mut s, opt::EXPORT_NAME, b"disk");
    assert!(closed(&mut s));
    let mut s = h.connect();
    option(&mut s, opt::STARTTLS, &[0]);
    assert!(closed(&mut s));
    // ABORT gets its refusal, then the end.
    let mut s = h.connect();
    option(&mut s, opt::ABORT, &[]);
    assert_eq!(option_reply(&mut s).0, rep::ERR_TLS_REQD);
    assert!(closed(&mut s));
    // A client with the right credentials: STARTTLS, then everything works; a second
    // STARTTLS is invalid.
    let mut t = start_tls(h.connect(), &d.path().join("client"));
    option(&mut t, opt::STARTTLS, &[]);
    assert_eq!(option_reply(&mut t).0, rep::ERR_INVALID);
    option(&mut t, opt::LIST, &[]);
    assert_eq!(option_reply(&mut t).0, rep::SERVER);
    assert_eq!(option_reply(&mut t).0, rep::ACK);
    write_and_read(&mut t);
    // A client certificate from an authority the server does not trust: no session.
    let mut t = start_tls(h.connect(), &d.path().join("other"));
    assert!(refused(&mut t), "the server answered a refused client");
    // Still serving.
    let mut t = start_tls(h.connect(), &d.path().join("client"));
    write_and_read(&mut t);
}

#[test]
fn identity_check_admits_only_the_named_subject() {
    let d = tempfile::tempdir().unwrap();
    if !make_certs(d.path()) {
        return;
    }
    let server = d.path().join("server");
    let client = d.path().join("client");
    let allowed = TlsConfig::from_x509_dir(&server, true)
        .unwrap()
        .with_allowed_identity("C=GB,O=Test,CN=client");
    let h = Harness::new(d.path(), allowed);
    let mut t = start_tls(h.connect(), &client);
    write_and_read(&mut t);
    drop(h);
    let denied = TlsConfig::from_x509_dir(&server, true)
        .unwrap()
        .with_allowed_identity("CN=client");
    let h = Harness::new(d.path(), denied);
    let mut t = start_tls(h.connect(), &client);
    assert!(refused(&mut t), "the server answered a refused client");
    // Missing files are reported by name.
    let e = TlsConfig::from_x509_dir(d.path().join("nowhere"), true).unwrap_err();
    assert!(e.to_string().contains("nowhere/ca-cert.pem"), "{e}");
}
