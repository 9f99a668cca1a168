//! The server: exports, limits, the accept loop, connection bookkeeping and shutdown.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::export::{ExportError, NbdExport};
use crate::net::{Listener, Stream};
use crate::proto::tflag;

/// The largest read or write request served (and advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;

/// One export: a name, an optional description, and the device behind it.
#[derive(Clone)]
pub struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) backend: Arc<dyn NbdExport>,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) trim: bool,
    pub(crate) allocation_depth: bool,
    /// The persistent bitmap offered as `qemu:dirty-bitmap:NAME` (qemu-nbd's `-B`).
    pub(crate) dirty_bitmap: Option<String>,
    pub(crate) detect_zeroes: DetectZeroes,
}

/// QEMU's `detect-zeroes`: what a write whose payload is all zeros becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as it is.
    #[default]
    Off,
    /// A zero write that keeps the range allocated.
    On,
    /// A zero write that may deallocate the range (when trims reach the backend, see
    /// [`Export::with_trim`]; otherwise as [`DetectZeroes::On`]).
    Unmap,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Registers `backend` under `name`; its size and read-only state are read now.
    /// Trims are passed to the backend (see [`Export::with_trim`]).
    pub fn new(name: impl Into<String>, backend: Arc<dyn NbdExport>) -> Result<Self, ExportError> {
        Ok(Export {
            name: name.into(),
            description: None,
            size: backend.size()?,
            read_only: backend.read_only()?,
            backend,
            trim: true,
            allocation_depth: false,
            dirty_bitmap: None,
            detect_zeroes: DetectZeroes::Off,
        })
    }

    /// Sets the description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Refuses writes even if the backend takes them.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only |= read_only;
        self
    }

    /// Whether trims (and write-zeroes that may deallocate) reach the backend; when not,
    /// they succeed without effect (qemu-nbd's `--discard=ignore`).
    pub fn with_trim(mut self, trim: bool) -> Self {
        self.trim = trim;
        self
    }

    /// Offers the `qemu:allocation-depth` metadata context (qemu-nbd's `-A`).
    pub fn with_allocation_depth(mut self, on: bool) -> Self {
        self.allocation_depth = on;
        self
    }

    /// Offers bitmap `name` of the backend as the `qemu:dirty-bitmap:NAME` metadata
    /// context (qemu-nbd's `-B NAME`); its status comes from [`NbdExport::dirty_bitmap`].
    pub fn with_dirty_bitmap(mut self, name: Option<String>) -> Self {
        self.dirty_bitmap = name;
        self
    }

    /// Turns writes of all-zero payloads into zero writes (qemu-nbd's `--detect-zeroes`).
    pub fn with_detect_zeroes(mut self, mode: DetectZeroes) -> Self {
        self.detect_zeroes = mode;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags advertised for it. `multi_conn`: the server accepts more
    /// than one client at a time (otherwise a client that opens several connections
    /// because of `NBD_FLAG_CAN_MULTI_CONN` would wait for ever on the second one).
    pub(crate) fn transmission_flags(&self, structured: bool, multi_conn: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
        if structured {
            f |= tflag::SEND_DF;
        }
        if multi_conn && self.backend.can_multi_conn() {
            f |= tflag::CAN_MULTI_CONN;
        }
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
            if self.backend.can_fast_zero() {
                f |= tflag::SEND_FAST_ZERO;
            }
        }
        f
    }
}

/// Limits and behaviour of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Clients served at once (qemu-nbd's `--shared`); more wait to be accepted.
    pub max_connections: usize,
    /// Keep serving after the last client leaves (qemu-nbd's `--persistent`).
    pub persistent: bool,
    /// Worker threads per connection (requests served in parallel).
    pub workers_per_connection: usize,
    /// Requests in flight per connection before the server stops reading requests.
    pub max_requests_in_flight: usize,
    /// Payload and reply bytes buffered per connection before the server stops reading
    /// requests (at least one request of [`MAX_REQUEST`] is always admitted).
    pub max_buffered_bytes: usize,
    /// How long the handshake may take.
    pub handshake_timeout: Option<Duration>,
    /// How long a reply may make no progress because the client does not read its
    /// socket; the client is then disconnected (its requests in flight still complete).
    pub reply_timeout: Option<Duration>,
    /// Log connections and protocol errors on stderr.
    pub verbose: bool,
    /// TLS credentials: clients must start TLS before any other option (FORCEDTLS, as
    /// qemu-nbd with `--tls-creds`).
    pub tls: Option<crate::TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 1,
            persistent: false,
            workers_per_connection: 8,
            max_requests_in_flight: 64,
            max_buffered_bytes: 64 << 20,
            handshake_timeout: Some(Duration::from_secs(10)),
            reply_timeout: Some(Duration::from_secs(60)),
            verbose: false,
            tls: None,
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client sent the wrong magic in the handshake.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// The client set flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// An option longer than the server accepts.
    #[error("option {option} of {length} bytes is too long")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its length.
        length: u32,
    },
    /// Too many options without choosing an export.
    #[error("too many options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` with a name that is not exported.
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// A TLS server got an option that cannot be refused (`NBD_OPT_EXPORT_NAME`), a
    /// malformed `NBD_OPT_STARTTLS`, or a client without fixed newstyle.
    #[error("option {0} not permitted before TLS")]
    TlsRequired(u32),
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    /// An unknown option without fixed newstyle (no way to answer).
    #[error("unknown option {0} without fixed newstyle")]
    UnknownOption(u32),
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated.
    #[error("NBD_OPT_EXPORT_NAME after extended headers")]
    ExportNameWithExtendedHeaders,
    /// With extended headers, a request announced a payload longer than any request
    /// the server takes.
    #[error("request payload of {0} bytes is too long")]
    PayloadTooLong(u64),
    /// A request header with the wrong magic.
    #[error(transparent)]
    BadRequest(#[from] crate::proto::BadMagic),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Shutdown,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Accepting connections failed.
    #[error("accept: {0}")]
    Accept(#[source] io::Error),
}

#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    active: HashMap<u64, Stream>,
    ever: bool,
}

#[derive(Debug, Default)]
struct Control {
    stopping: AtomicBool,
    conns: Mutex<Connections>,
    changed: Condvar,
}

impl Control {
    fn conns(&self) -> MutexGuard<'_, Connections> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops a running [`Server`] from another thread (a signal handler thread, say).
#[derive(Debug, Clone)]
pub struct ServerHandle(Arc<Control>);

impl ServerHandle {
    /// Stops accepting, disconnects every client (their requests in flight complete
    /// first) and makes [`Server::serve`] return.
    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        let c = self.0.conns();
        for s in c.active.values() {
            s.shutdown();
        }
        drop(c);
        self.0.changed.notify_all();
    }
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Export>,
    config: ServerConfig,
    ctl: Arc<Control>,
}

/// How often the accept loop looks at the stop flag.
const TICK: Duration = Duration::from_millis(100);

impl Server {
    /// A server for `exports` (the first is the default export, chosen by the empty name).
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Self {
        Server {
            exports,
            config,
            ctl: Arc::default(),
        }
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(self.ctl.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub(crate) fn exports(&self) -> &[Export] {
        &self.exports
    }

    pub(crate) fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.config.verbose {
            eprintln!("qcow2-nbd: {msg}");
        }
    }

    fn stopping(&self) -> bool {
        self.ctl.stopping.load(Ordering::SeqCst)
    }

    /// Accepts and serves clients (each on its own threads) until [`ServerHandle::stop`],
    /// or, without [`ServerConfig::persistent`], until the last client has left. Returns
    /// once every connection has ended, so that the caller can close the exports.
    pub fn serve(&self, listener: &Listener) -> Result<(), ServerError> {
        let max = self.config.max_connections.max(1);
        std::thread::scope(|scope| loop {
            {
                let mut c = self.ctl.conns();
                while c.active.len() >= max && !self.stopping() {
                    c = self
                        .ctl
                        .changed
                        .wait_timeout(c, TICK)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if self.stopping() || (!self.config.persistent && c.ever && c.active.is_empty()) {
                    return Ok(());
                }
            }
            let stream = match listener.accept_timeout(TICK) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    std::thread::sleep(TICK);
                    continue;
                }
                Err(e) => {
                    self.handle().stop();
                    return Err(ServerError::Accept(e));
                }
            };
            let id = {
                let mut c = self.ctl.conns();
                if self.stopping() {
                    continue;
                }
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                let id = c.next_id;
                c.next_id += 1;
                c.active.insert(id, clone);
                c.ever = true;
                id
            };
            self.log(format_args!("client {id} connected"));
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn_scoped(scope, move || {
                    match self.serve_stream(stream) {
                        Ok(()) => self.log(format_args!("client {id} disconnected")),
                        Err(e) => self.log(format_args!("client {id}: {e}")),
                    }
                    self.ctl.conns().active.remove(&id);
                    self.ctl.changed.notify_all();
                });
            if spawned.is_err() {
                self.ctl.conns().active.remove(&id);
            }
        })
    }

    /// Serves one connected client in this thread (handshake, then transmission) until it
    /// disconnects. For embedding with a custom accept loop.
    pub fn serve_stream(&self, stream: Stream) -> Result<(), ConnError> {
        if self.stopping() {
            return Err(ConnError::Shutdown);
        }
        stream.set_read_timeout(self.config.handshake_timeout)?;
        // The handshake may replace the stream (by its TLS session).
        let Some((session, stream)) = crate::handshake::negotiate(self, stream)? else {
            return Ok(());
        };
        self.log(format_args!(
            "transmission on export {:?} with {}",
            self.exports
                .get(session.export)
                .map_or("", |e| e.name.as_str()),
            if session.extended {
                "extended headers"
            } else if session.structured {
                "structured replies"
            } else {
                "simple replies"
            }
        ));
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(self.config.reply_timeout)?;
        crate::conn::transmission(self, stream, session)
    }
}
