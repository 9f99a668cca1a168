//! `qcow2 serve` with TLS (`--object tls-creds-x509`, `--tls-creds`, `--tls-authz`), with
//! QEMU's client (`tls-creds-x509` object, endpoint=client) and libnbd's (`nbds://`,
//! `tls-certificates=`) reading and writing, clients without TLS or with an untrusted
//! certificate turned away, and the command line's refusals against qemu-nbd's.
//! Credentials come from qcow2-nbd's `tests/data/make-certs.sh` (openssl).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::served::{clean, have_nbdinfo, io_args, Served};
use common::{have_qemu, ok, qemu_img, qemu_io, Run};

/// Makes the credentials under `dir` (server/, client/, other/); `false` when openssl
/// is missing.
fn make_certs(dir: &Path) -> bool {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qcow2-nbd/tests/data/make-certs.sh");
    let ok = Command::new("bash")
        .arg(script)
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("openssl not available: skipping the TLS tests");
    }
    ok
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

/// The server's TLS options for credentials in `dir/server`.
fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            dir.join("server").display()
        ),
        "--tls-creds".into(),
        "tls0".into(),
    ]
}

/// qemu-io over TLS with QEMU's client credentials in `creds`.
fn qemu_io_tls(dir: &Path, creds: &Path, port: &str, cmds: &[&str]) -> Run {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        creds.display()
    );
    let image = format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0");
    let mut args = vec!["--object", &object, "--image-opts", &image];
    args.extend(io_args(cmds));
    qemu_io(dir, &args)
}

fn start(dir: &Path, port: &str, extra: &[String]) -> Served {
    let mut args: Vec<String> = vec![
        "-t".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.into(),
    ];
    args.extend(extra.iter().cloned());
    args.push("img.qcow2".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Served::start(dir, &args)
}

#[test]
fn qemu_and_libnbd_read_and_write_over_tls() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    if !make_certs(dir) {
        return;
    }
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
    ));
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "local.qcow2", "8M"],
    ));
    let port = free_port();
    let mut s = start(dir, &port, &tls_args(dir));
    let client = dir.join("client");
    // QEMU's client: info, then writes and verifying reads.
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    );
    let info = qemu_img(
        dir,
        &[
            "info",
            "--object",
            &object,
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"),
        ],
    );
    ok(&info);
    assert!(info.stdout.contains("virtual size: 8 MiB"), "{info:?}");
    let script = [
        "write -P 0x41 0 1M",
        "write -P 0x42 3M 64k",
        "write -z 512k 64k",
        "read -P 0x41 0 512k",
        "read -P 0 512k 64k",
        "read -P 0x42 3M 64k",
    ];
    let r = qemu_io_tls(dir, &client, &port, &script);
    ok(&r);
    assert!(!r.text().contains("verification failed"), "{r:?}");
    let mut local = vec!["-f", "qcow2", "local.qcow2"];
    local.extend(io_args(&script));
    ok(qemu_io(dir, &local));
    // libnbd: nbdcopy writes a file into the export and reads the export back.
    if have_nbdinfo() {
        let uri = format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            client.display()
        );
        let info = common::served::nbdinfo(&[&uri]);
        assert!(info.contains("with TLS"), "{info}");
        assert!(info.contains("export-size: 8388608"), "{info}");
        let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
        std::fs::write(dir.join("in.raw"), &pattern).unwrap();
        let st = Command::new("nbdcopy")
            .args([dir.join("in.raw").to_str().unwrap(), &uri])
            .status()
            .unwrap();
        assert!(st.success());
        let out = dir.join("out.raw");
        let st = Command::new("nbdcopy")
            .args([&uri, out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
        let back = std::fs::read(&out).unwrap();
        assert_eq!(back.len(), 8 << 20);
        assert_eq!(&back[..1 << 20], &pattern[..]);
        assert_eq!(&back[3 << 20..(3 << 20) + 65536], &[0x42u8; 65536][..]);
    }
    // Without TLS, or with a certificate the server does not trust: refused.
    let plain = qemu_img(dir, &["info", &format!("nbd://127.0.0.1:{port}")]);
    assert_ne!(plain.code, 0);
    assert!(
        plain.text().contains("TLS negotiation required"),
        "{plain:?}"
    );
    let r = qemu_io_tls(dir, &dir.join("other"), &port, &["read 0 4k"]);
    assert_ne!(r.code, 0, "{r:?}");
    // Still serving; then a clean close.
    let r = qemu_io_tls(dir, &client, &port, &["read -P 0x42 3M 64k"]);
    ok(&r);
    assert_eq!(s.terminate(), 0);
    clean(dir, "img.qcow2");
    if have_nbdinfo() {
        // nbdcopy's megabyte at 0, qemu-io's writes elsewhere.
        ok(qemu_img(
            dir,
            &["convert", "-O", "raw", "img.qcow2", "final.raw"],
        ));
        let f = std::fs::read(dir.join("final.raw")).unwrap();
        assert_eq!(
            &f[..1 << 20],
            &std::fs::read(dir.join("in.raw")).unwrap()[..]
        );
        assert_eq!(&f[3 << 20..(3 << 20) + 65536], &[0x42u8; 65536][..]);
    } else {
        ok(qemu_img(dir, &["compare", "img.qcow2", "local.qcow2"]));
    }
}

#[test]
fn authz_and_command_line_refusals_match_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    if !make_certs(dir) {
        return;
    }
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"],
    ));
    let client = dir.join("client");
    for (identity, admitted) in [("C=GB,,O=Test,,CN=client", true), ("CN=client", false)] {
        for server in ["ours", "qemu"] {
            let port = free_port();
            let mut extra = tls_args(dir);
            extra.extend([
                "--object".into(),
                format!("authz-simple,id=auth0,identity={identity}"),
                "--tls-authz".into(),
                "auth0".into(),
            ]);
            let mut s = if server == "ours" {
                start(dir, &port, &extra)
            } else {
                let mut args: Vec<String> = ["-t", "-f", "qcow2", "-b", "127.0.0.1", "-p", &port]
                    .map(String::from)
                    .to_vec();
                args.extend(extra);
                args.push("img.qcow2".into());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Served::start_qemu_nbd(dir, &args)
            };
            let r = qemu_io_tls(dir, &client, &port, &["read 0 4k"]);
            assert_eq!(r.code == 0, admitted, "{server} {identity}: {r:?}");
            s.terminate();
        }
    }
    // Refusals at start, with qemu-nbd's words.
    let srv = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        dir.join("server").display()
    );
    let cli = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    );
    let bogus = format!("{srv},bogus=1");
    let nodir = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        dir.join("none").display()
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["--object", &bogus, "--tls-creds", "tls0"],
        vec!["--object", &nodir, "--tls-creds", "tls0"],
        vec!["--object", &cli, "--tls-creds", "tls0"],
        vec!["--object", &srv, "--tls-creds", "tls1"],
        vec!["--tls-authz", "auth0"],
        vec!["--object", "nonsense,id=x"],
    ];
    for case in cases {
        let mut args = case.clone();
        args.extend(["-f", "qcow2", "-b", "127.0.0.1", "-p", "1", "img.qcow2"]);
        let ours = common::qcow2(dir, &[&["serve"][..], &args].concat());
        let theirs = common::run_in("qemu-nbd", dir, &args);
        assert_eq!(
            (ours.code, theirs.code),
            (1, 1),
            "{case:?}: {ours:?} {theirs:?}"
        );
        assert_eq!(
            ours.stderr,
            theirs.stderr.replace("qemu-nbd: ", "qcow2: "),
            "{case:?}"
        );
    }
}
