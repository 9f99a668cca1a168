//! The fixed newstyle handshake: greeting, client flags, then options until the client
//! chooses an export (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`) or leaves.

use std::io::{self, Read, Write};

use crate::net::Stream;
use crate::proto::{self, info, opt, rep, Cursor};
use crate::server::{ConnError, Export, Server, MAX_REQUEST};

/// The longest option payload read into memory (names and queries are at most 4 KiB each
/// by the specification; a few of them fit).
const MAX_OPTION: u32 = 64 << 10;
/// The longest option payload skipped with `NBD_REP_ERR_TOO_BIG`; longer ones disconnect.
const MAX_SKIPPED_OPTION: u32 = 16 << 20;
/// Options accepted before an export is chosen.
const MAX_OPTIONS: usize = 4096;
/// The longest export name or metadata query.
const MAX_STRING: usize = 4096;
/// The metadata context ID of `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
const BASE_ALLOCATION: &str = "base:allocation";
/// The metadata context ID of `qemu:allocation-depth`.
pub(crate) const ALLOCATION_DEPTH_ID: u32 = 2;
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The metadata context ID of `qemu:dirty-bitmap:NAME`.
pub(crate) const DIRTY_BITMAP_ID: u32 = 3;
const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// What the handshake agreed on.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Index of the chosen export.
    pub export: usize,
    /// Structured replies were negotiated (also true with extended headers).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests with 64-bit lengths, every
    /// reply an extended chunk.
    pub extended: bool,
    /// `base:allocation` was selected for block status.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` was selected for block status.
    pub allocation_depth: bool,
    /// `qemu:dirty-bitmap:NAME` was selected for block status.
    pub dirty_bitmap: bool,
}

/// The metadata contexts selected (or listed).
#[derive(Debug, Clone, Copy, Default)]
struct Selected {
    base: bool,
    depth: bool,
    bitmap: bool,
}

struct Negotiation<'a> {
    server: &'a Server,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// TLS is running (only with a TLS-configured server).
    tls_active: bool,
    /// The export `SET_META_CONTEXT` selected contexts for, and which.
    meta: Option<(usize, Selected)>,
}

/// Runs the handshake on `stream`; `Ok(None)` when the client aborted. Returns the
/// stream transmission goes on: `stream` itself, or its TLS session.
pub(crate) fn negotiate(
    server: &Server,
    mut stream: Stream,
) -> Result<Option<(Session, Stream)>, ConnError> {
    let s = &mut stream;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    let client = u32::from_be_bytes(b);
    if client & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::BadClientFlags(client));
    }
    let mut n = Negotiation {
        server,
        fixed: client & proto::FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client & proto::FLAG_C_NO_ZEROES != 0,
        structured: false,
        extended: false,
        tls_active: false,
        meta: None,
    };
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let magic = proto::be64(&h[0..8]);
        if magic != proto::IHAVEOPT {
            return Err(ConnError::BadOptionMagic(magic));
        }
        let option = proto::be32(&h[8..12]);
        let length = proto::be32(&h[12..16]);
        if length > MAX_OPTION {
            if length > MAX_SKIPPED_OPTION || !n.fixed {
                return Err(ConnError::OptionTooLong { option, length });
            }
            io::copy(
                &mut Read::by_ref(s).take(u64::from(length)),
                &mut io::sink(),
            )?;
            reply_error(s, option, rep::ERR_TOO_BIG, "option too long")?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        s.read_exact(&mut data)?;
        if let (Some(tls), false) = (&server.config().tls, n.tls_active) {
            // FORCEDTLS: nothing but STARTTLS (or ABORT) before TLS.
            match option {
                _ if !n.fixed => return Err(ConnError::TlsRequired(option)),
                opt::STARTTLS if data.is_empty() => {
                    reply(s, option, rep::ACK, &[])?;
                    // The handshake runs on another handle of the socket; the plain
                    // handle is dropped when the TLS stream takes its place.
                    let plain = s.try_clone()?;
                    *s = Stream::Tls(tls.accept(plain).map_err(ConnError::Tls)?);
                    n.tls_active = true;
                }
                opt::STARTTLS | opt::EXPORT_NAME => return Err(ConnError::TlsRequired(option)),
                _ => {
                    let msg = format!("Option {option:#x} not permitted before TLS");
                    // The client may already be gone after ABORT.
                    let sent = reply_error(s, option, rep::ERR_TLS_REQD, &msg);
                    if option == opt::ABORT {
                        return Ok(None);
                    }
                    sent?;
                }
            }
            continue;
        }
        if let Some(end) = n.option(s, option, &data)? {
            return Ok(end.map(|session| (session, stream)));
        }
    }
    Err(ConnError::TooManyOptions)
}

fn reply<S: Write>(s: &mut S, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&proto::option_reply(option, kind, len));
    b.extend_from_slice(payload);
    s.write_all(&b)
}

fn reply_error<S: Write>(s: &mut S, option: u32, kind: u32, msg: &str) -> io::Result<()> {
    reply(s, option, kind, msg.as_bytes())
}

/// A length-prefixed string (u32 length) read from an option payload.
fn string(c: &mut Cursor<'_>) -> Option<String> {
    let n = c.u32()? as usize;
    if n > MAX_STRING {
        return None;
    }
    c.take(n).map(|b| String::from_utf8_lossy(b).into_owned())
}

impl Negotiation<'_> {
    fn find(&self, name: &str) -> Option<usize> {
        let exports = self.server.exports();
        exports
            .iter()
            .position(|e| e.name == name)
            .or(if name.is_empty() && !exports.is_empty() {
                Some(0)
            } else {
                None
            })
    }

    /// Handles one option; `Some(end)` ends the handshake.
    fn option<S: Read + Write>(
        &mut self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Option<Session>>, ConnError> {
        match option {
            opt::EXPORT_NAME if self.extended => {
                // Its reply cannot say that transmission uses extended headers.
                Err(ConnError::ExportNameWithExtendedHeaders)
            }
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some(i) = self.find(&name) else {
                    return Err(ConnError::UnknownExport(name));
                };
                let e = &self.server.exports()[i];
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&e.size.to_be_bytes());
                b.extend_from_slice(
                    &e.transmission_flags(
                        self.structured,
                        self.server.config().max_connections > 1,
                    )
                    .to_be_bytes(),
                );
                if !self.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                Ok(Some(Some(self.session(i))))
            }
            opt::ABORT => {
                // The client may already be gone; the reply is a courtesy.
                let _ = reply(s, option, rep::ACK, &[]);
                Ok(Some(None))
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_error(s, option, rep::ERR_INVALID, "LIST takes no data")?;
                    return Ok(None);
                }
                for e in self.server.exports() {
                    let mut p = Vec::new();
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        p.extend_from_slice(d.as_bytes());
                    }
                    reply(s, option, rep::SERVER, &p)?;
                }
                reply(s, option, rep::ACK, &[])?;
                Ok(None)
            }
            opt::INFO | opt::GO => self.info_go(s, option, data),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )?;
                } else if self.extended {
                    reply_error(
                        s,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )?;
                } else {
                    self.structured = true;
                    reply(s, option, rep::ACK, &[])?;
                }
                Ok(None)
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_error(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    )?;
                } else if self.extended {
                    reply_error(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "extended headers already negotiated",
                    )?;
                } else {
                    // Extended headers imply structured replies.
                    self.extended = true;
                    self.structured = true;
                    reply(s, option, rep::ACK, &[])?;
                }
                Ok(None)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta(s, option, data),
            opt::STARTTLS => {
                let (kind, msg) = if !data.is_empty() {
                    (rep::ERR_INVALID, "STARTTLS takes no data")
                } else if self.tls_active {
                    (rep::ERR_INVALID, "TLS already enabled")
                } else {
                    (rep::ERR_POLICY, "TLS not configured")
                };
                reply_error(s, option, kind, msg)?;
                Ok(None)
            }
            _ => {
                if !self.fixed {
                    return Err(ConnError::UnknownOption(option));
                }
                reply_error(s, option, rep::ERR_UNSUP, "option not supported")?;
                Ok(None)
            }
        }
    }

    fn session(&self, export: usize) -> Session {
        Session {
            export,
            structured: self.structured,
            extended: self.extended,
            base_allocation: self.structured
                && matches!(self.meta, Some((e, m)) if e == export && m.base),
            allocation_depth: self.structured
                && matches!(self.meta, Some((e, m)) if e == export && m.depth),
            dirty_bitmap: self.structured
                && matches!(self.meta, Some((e, m)) if e == export && m.bitmap),
        }
    }

    fn info_go<S: Read + Write>(
        &mut self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Option<Session>>, ConnError> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = string(&mut c)?;
            let n = c.u16()? as usize;
            let mut wanted = Vec::with_capacity(n);
            for _ in 0..n {
                wanted.push(c.u16()?);
            }
            (c.remaining() == 0).then_some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            reply_error(s, option, rep::ERR_INVALID, "malformed INFO/GO request")?;
            return Ok(None);
        };
        let Some(i) = self.find(&name) else {
            reply_error(s, option, rep::ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        };
        let e: &Export = &self.server.exports()[i];
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&info::EXPORT.to_be_bytes());
        p.extend_from_slice(&e.size.to_be_bytes());
        p.extend_from_slice(
            &e.transmission_flags(self.structured, self.server.config().max_connections > 1)
                .to_be_bytes(),
        );
        reply(s, option, rep::INFO, &p)?;
        if wanted.contains(&info::NAME) {
            let mut p = info::NAME.to_be_bytes().to_vec();
            p.extend_from_slice(e.name.as_bytes());
            reply(s, option, rep::INFO, &p)?;
        }
        if let (true, Some(d)) = (wanted.contains(&info::DESCRIPTION), &e.description) {
            let mut p = info::DESCRIPTION.to_be_bytes().to_vec();
            p.extend_from_slice(d.as_bytes());
            reply(s, option, rep::INFO, &p)?;
        }
        // Block sizes are sent whether asked or not: any alignment works, 4 KiB is best.
        let mut p = info::BLOCK_SIZE.to_be_bytes().to_vec();
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&MAX_REQUEST.to_be_bytes());
        reply(s, option, rep::INFO, &p)?;
        reply(s, option, rep::ACK, &[])?;
        if option == opt::GO {
            Ok(Some(Some(self.session(i))))
        } else {
            Ok(None)
        }
    }

    fn meta<S: Read + Write>(
        &mut self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Option<Session>>, ConnError> {
        let set = option == opt::SET_META_CONTEXT;
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = string(&mut c)?;
            let n = c.u32()? as usize;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(string(&mut c)?);
            }
            (c.remaining() == 0).then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            reply_error(
                s,
                option,
                rep::ERR_INVALID,
                "malformed meta context request",
            )?;
            return Ok(None);
        };
        if set && !self.structured {
            reply_error(
                s,
                option,
                rep::ERR_INVALID,
                "structured replies are needed first",
            )?;
            return Ok(None);
        }
        let Some(i) = self.find(&name) else {
            reply_error(s, option, rep::ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        };
        let depth_offered = self.server.exports()[i].allocation_depth;
        let bitmap_context = self.server.exports()[i]
            .dirty_bitmap
            .as_ref()
            .map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}"));
        let is_bitmap = |q: &str| bitmap_context.as_deref() == Some(q);
        let sel = if set {
            Selected {
                base: queries.iter().any(|q| q == BASE_ALLOCATION),
                depth: depth_offered && queries.iter().any(|q| q == ALLOCATION_DEPTH),
                bitmap: queries.iter().any(|q| is_bitmap(q)),
            }
        } else {
            let all = queries.is_empty();
            Selected {
                base: all || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION),
                depth: depth_offered
                    && (all
                        || queries
                            .iter()
                            .any(|q| q == "qemu:" || q == ALLOCATION_DEPTH)),
                bitmap: bitmap_context.is_some()
                    && (all
                        || queries
                            .iter()
                            .any(|q| q == "qemu:" || q == DIRTY_BITMAP_PREFIX || is_bitmap(q))),
            }
        };
        if set {
            self.meta = Some((i, sel));
        }
        let bitmap_name = bitmap_context.unwrap_or_default();
        for (on, id, name) in [
            (sel.base, BASE_ALLOCATION_ID, BASE_ALLOCATION),
            (sel.depth, ALLOCATION_DEPTH_ID, ALLOCATION_DEPTH),
            (sel.bitmap, DIRTY_BITMAP_ID, bitmap_name.as_str()),
        ] {
            if on {
                let mut p = id.to_be_bytes().to_vec();
                p.extend_from_slice(name.as_bytes());
                reply(s, option, rep::META_CONTEXT, &p)?;
            }
        }
        reply(s, option, rep::ACK, &[])?;
        Ok(None)
    }
}
