//! An NBD server for the qcow2 engine: export a qcow2 image ([`qcow2_image::SharedImage`]),
//! a raw file ([`RawExport`]) or any [`NbdExport`] to QEMU, libnbd, the kernel's nbd client
//! and everything else that speaks the Network Block Device protocol.
//!
//! Protocol (NetworkBlockDevice/nbd `doc/proto.md`): fixed newstyle handshake with
//! `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`/`GO` (export, name, description and
//! block-size information), `STRUCTURED_REPLY`, `EXTENDED_HEADERS` (32-byte requests with
//! 64-bit lengths, extended reply chunks, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`),
//! `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`, `qemu:allocation-depth`,
//! `qemu:dirty-bitmap:NAME`); other options get `NBD_REP_ERR_UNSUP`. Commands `READ` (structured
//! replies with data and hole chunks), `WRITE` (FUA), `WRITE_ZEROES` (`NO_HOLE`,
//! `FAST_ZERO`), `TRIM`, `FLUSH`, `CACHE`, `BLOCK_STATUS` (`REQ_ONE`) and `DISC`.
//!
//! Each connection reads requests on one thread and serves them on a bounded pool of
//! worker threads, replying in completion order; requests in flight and buffered bytes
//! are limited per connection (the server stops reading from a client that is over its
//! budget). Bad input gets the specification's error reply or a disconnect of that client
//! alone; nothing a client sends makes the server panic.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qcow2_nbd::{Export, Listener, RawExport, Server, ServerConfig};
//!
//! let disk = Arc::new(RawExport::open("disk.raw", false)?);
//! let export = Export::new("disk", disk)?.with_description("a raw disk");
//! let server = Server::new(vec![export], ServerConfig::default());
//! let listener = Listener::bind_unix("/tmp/nbd.sock")?;
//! server.serve(&listener)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod conn;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod net;
pub mod proto;
mod server;
mod tls;

pub use export::{Allocation, ExportError, NbdExport, RawExport};
pub use net::{Listener, Stream};
pub use server::{
    ConnError, DetectZeroes, Export, Server, ServerConfig, ServerError, ServerHandle, MAX_REQUEST,
};
pub use tls::{TlsConfig, TlsError, TlsStream};
