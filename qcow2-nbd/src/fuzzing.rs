//! The body of the `nbd_session` fuzz target, shared with the CI-sized replay test: one
//! client session of arbitrary bytes against a fresh in-memory qcow2 export.
#![allow(clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use qcow2_image::{CreateOptions, Image, SharedImage};
use qcow2_io::MemStorage;

use crate::{Export, Server, ServerConfig, Stream};

/// Size of the fuzzed export.
pub const EXPORT_SIZE: u64 = 1 << 20;

/// Sends `input` as everything a client says (then half-closes), and returns everything
/// the server answered. The exports are `"rw"` (1 MiB qcow2 in memory) and `"ro"` (the
/// same image, read-only). Panics only if the server hangs (no end of its output within
/// 20 seconds) or the image cannot be created.
pub fn session(input: &[u8]) -> Vec<u8> {
    let img = Image::create(
        Arc::new(MemStorage::new()),
        &CreateOptions::new(EXPORT_SIZE),
    )
    .expect("in-memory image");
    let shared = Arc::new(SharedImage::new(img));
    let exports = vec![
        Export::new("rw", shared.clone()).expect("export"),
        Export::new("ro", shared)
            .expect("export")
            .with_read_only(true)
            .with_description("read-only"),
    ];
    let config = ServerConfig {
        workers_per_connection: 2,
        max_requests_in_flight: 8,
        max_buffered_bytes: 0,
        handshake_timeout: Some(Duration::from_secs(5)),
        reply_timeout: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let server = Server::new(exports, config);
    let (server_end, mut client) = UnixStream::pair().expect("socket pair");
    let mut writer = client.try_clone().expect("clone");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut out = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = server.serve_stream(Stream::Unix(server_end));
        });
        s.spawn(move || {
            let _ = writer.write_all(input);
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let mut buf = [0u8; 64 << 10];
        loop {
            match client.read(&mut buf) {
                Ok(0) => break,
                // Keep only the head of big replies: the point is that they end.
                Ok(n) => out.extend_from_slice(&buf[..n.min((1 << 20) - out.len().min(1 << 20))]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the server hung or failed: {e}"),
            }
        }
    });
    out
}
