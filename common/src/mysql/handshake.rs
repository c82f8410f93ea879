//! The first three messages of the connection phase: the server's greeting, the client's
//! SSLRequest and its HandshakeResponse41.
//!
//! ```text
//! HandshakeV10 (server, seq 0)
//!   0x0a | server version NUL | connection id u32 | auth data part 1 [8] | 0x00
//!   | capabilities low u16 | charset u8 | status u16 | capabilities high u16
//!   | auth data length u8 | reserved [10] (MariaDB: its capabilities in the last 4 when
//!     CLIENT_MYSQL is clear) | auth data part 2 [max(13, len - 8)] (if SECURE_CONNECTION)
//!   | auth plugin name NUL (if PLUGIN_AUTH)
//!
//! SSLRequest (client, seq 1): exactly 32 bytes, CLIENT_SSL set
//!   capabilities u32 | max packet u32 | charset u8 | filler [23] (MariaDB: its capabilities in
//!   the last 4 when CLIENT_MYSQL is clear)
//!
//! HandshakeResponse41 (client, seq 2 after TLS, 1 without)
//!   the same 32 bytes | username NUL
//!   | auth response: lenenc (PLUGIN_AUTH_LENENC_CLIENT_DATA), else u8 length
//!     (SECURE_CONNECTION), else NUL-terminated
//!   | database NUL (CONNECT_WITH_DB) | client plugin NUL (PLUGIN_AUTH)
//!   | attributes: lenenc length, then lenenc key, lenenc value pairs (CONNECT_ATTRS)
//!   | zstd level u8 (ZSTD)
//! ```
//!
//! The greeting is rewritten in place (only capability bits change, everything else goes to the
//! client byte for byte: the scramble, the connection id that `KILL` uses, MariaDB's
//! capabilities). The handshake response is parsed into fields and encoded again; encoding an
//! unchanged response gives the bytes the client sent.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{
    Reader, owned, put_attributes, put_lenenc_bytes, put_nul_terminated, read_attributes,
};
use super::err::ErrPacket;
use super::{
    CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS, CLIENT_COMPRESS, CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB, CLIENT_MYSQL, CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, CLIENT_PROTOCOL_41, CLIENT_REMEMBER_OPTIONS,
    CLIENT_SECURE_CONNECTION, CLIENT_SSL, CLIENT_SSL_VERIFY_SERVER_CERT, CLIENT_ZSTD, MysqlError,
};

/// The length of an SSLRequest payload, and of the fixed start of a handshake response.
pub const SSL_REQUEST_LEN: usize = 32;

/// A server's HandshakeV10 greeting.
///
/// Read-only: the fields describe the greeting, and the rewriting methods patch the original
/// bytes, so nothing Postern does not mean to change can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    raw: Bytes,
    caps_low_at: usize,
    caps_high_at: usize,
    connection_id_at: usize,
    /// Where the scramble's two parts are in `raw` (the second without its NUL).
    scramble_at: [(usize, usize); 2],
    server_version: Bytes,
    connection_id: u32,
    capabilities: u32,
    mariadb_capabilities: Option<u32>,
    charset: u8,
    status: u16,
    scramble: Bytes,
    auth_plugin: Option<Bytes>,
}

impl Greeting {
    /// Parses a greeting payload.
    ///
    /// A server that refuses the connection sends an ERR packet instead; that is
    /// [`MysqlError::Refused`], and the packet can go to the client as it is.
    pub fn parse(payload: Bytes) -> Result<Self, MysqlError> {
        let mut r = Reader::new(&payload, "server greeting");
        match r.u8()? {
            10 => {}
            0xff => {
                let err = ErrPacket::parse(&payload).ok_or(r.truncated())?;
                return Err(MysqlError::Refused(err));
            }
            v => return Err(MysqlError::ProtocolVersion(v)),
        }
        let server_version = owned(r.nul_terminated()?);
        let connection_id_at = r.pos();
        let connection_id = r.u32()?;
        let auth1_at = r.pos();
        let auth1 = r.take(8)?;
        r.u8()?;
        let caps_low_at = r.pos();
        let low = r.u16()?;
        let charset = r.u8()?;
        let status = r.u16()?;
        let caps_high_at = r.pos();
        let high = r.u16()?;
        let capabilities = u32::from(low) | u32::from(high) << 16;
        if capabilities & CLIENT_PROTOCOL_41 == 0 {
            return Err(MysqlError::Unsupported(
                "server does not speak protocol 4.1",
            ));
        }
        let auth_len = r.u8()?;
        let reserved: [u8; 10] = r.array()?;
        let mariadb_capabilities = (capabilities & CLIENT_MYSQL == 0).then(|| {
            let [.., a, b, c, d] = reserved;
            u32::from_le_bytes([a, b, c, d])
        });
        let mut scramble = auth1.to_vec();
        let mut part2_at = (r.pos(), 0);
        if capabilities & CLIENT_SECURE_CONNECTION != 0 {
            let len = usize::from(auth_len.saturating_sub(8)).max(13);
            // Some servers send fewer bytes than announced; the scramble is what is there.
            let part2 = r.take(len.min(r.remaining()))?;
            let part2 = part2.strip_suffix(&[0]).unwrap_or(part2);
            part2_at.1 = part2.len();
            scramble.extend_from_slice(part2);
        }
        let auth_plugin = (capabilities & CLIENT_PLUGIN_AUTH != 0 && !r.is_empty())
            .then(|| owned(r.nul_terminated_or_rest()));
        Ok(Self {
            raw: payload.clone(),
            caps_low_at,
            caps_high_at,
            connection_id_at,
            scramble_at: [(auth1_at, 8), part2_at],
            server_version,
            connection_id,
            capabilities,
            mariadb_capabilities,
            charset,
            status,
            scramble: scramble.into(),
            auth_plugin,
        })
    }

    /// The greeting for a client: CLIENT_SSL set when `tls` (the client must upgrade) and
    /// cleared otherwise; COMPRESS and ZSTD always cleared, because Postern reads the command
    /// phase (for `COM_CHANGE_USER`) and does not decompress it. Everything else is unchanged.
    pub fn for_client(&self, tls: bool) -> Bytes {
        let caps = self.capabilities & !(CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD);
        self.with_capabilities(if tls { caps | CLIENT_SSL } else { caps })
    }

    /// The greeting payload with its capability flags replaced by `capabilities`.
    pub fn with_capabilities(&self, capabilities: u32) -> Bytes {
        let mut out = BytesMut::from(&self.raw[..]);
        let [a, b, c, d] = capabilities.to_le_bytes();
        // The offsets were read from this same payload, so both slices exist.
        if let Some(s) = out.get_mut(self.caps_low_at..self.caps_low_at + 2) {
            s.copy_from_slice(&[a, b]);
        }
        if let Some(s) = out.get_mut(self.caps_high_at..self.caps_high_at + 2) {
            s.copy_from_slice(&[c, d]);
        }
        out.freeze()
    }

    /// The same greeting with another connection id and scramble, for a side that greets
    /// clients itself (with a copy of its backend's greeting) before it has a backend
    /// connection; `None` when `scramble` is not as long as this greeting's.
    ///
    /// Everything else (server version, capabilities, MariaDB's capabilities, character set,
    /// status, plugin name) stays byte for byte, so drivers see what they would see directly.
    pub fn reissue(&self, connection_id: u32, scramble: &[u8]) -> Option<Self> {
        if scramble.len() != self.scramble.len() || scramble.contains(&0) {
            return None;
        }
        let mut out = BytesMut::from(&self.raw[..]);
        let at = self.connection_id_at;
        out.get_mut(at..at + 4)?
            .copy_from_slice(&connection_id.to_le_bytes());
        let mut rest = scramble;
        for (at, len) in self.scramble_at {
            let (part, tail) = rest.split_at_checked(len)?;
            out.get_mut(at..at + len)?.copy_from_slice(part);
            rest = tail;
        }
        Self::parse(out.freeze()).ok()
    }

    /// The payload as the server sent it.
    pub fn payload(&self) -> &Bytes {
        &self.raw
    }

    /// The server version string (MariaDB prefixes `5.5.5-` for old clients).
    pub fn server_version(&self) -> &[u8] {
        &self.server_version
    }

    /// The server's id for this connection (what `KILL` takes).
    pub fn connection_id(&self) -> u32 {
        self.connection_id
    }

    /// The capability flags, low and high halves joined.
    pub fn capabilities(&self) -> u32 {
        self.capabilities
    }

    /// MariaDB's extended capabilities, present when CLIENT_MYSQL is clear.
    pub fn mariadb_capabilities(&self) -> Option<u32> {
        self.mariadb_capabilities
    }

    /// The server's default character set (collation id).
    pub fn charset(&self) -> u8 {
        self.charset
    }

    /// The server status flags.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The authentication data (both parts joined, without the trailing NUL).
    pub fn scramble(&self) -> &[u8] {
        &self.scramble
    }

    /// The default authentication plugin, if the server named one.
    pub fn auth_plugin(&self) -> Option<&[u8]> {
        self.auth_plugin.as_deref()
    }
}

/// A client's SSLRequest: the fixed start of a handshake response, sent alone before TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRequest {
    /// The client's capability flags (CLIENT_SSL set).
    pub capabilities: u32,
    /// The largest packet the client wants to receive.
    pub max_packet: u32,
    /// The client's character set (collation id).
    pub charset: u8,
    /// Reserved bytes; MariaDB puts its extended capabilities in the last 4.
    pub filler: [u8; 23],
}

impl SslRequest {
    /// Parses a 32-byte SSLRequest payload.
    pub fn parse(payload: &[u8]) -> Result<Self, MysqlError> {
        let mut r = Reader::new(payload, "ssl request");
        let req = Self::read(&mut r)?;
        if !r.is_empty() {
            return Err(r.malformed("longer than 32 bytes"));
        }
        if req.capabilities & CLIENT_SSL == 0 {
            return Err(r.malformed("CLIENT_SSL is not set"));
        }
        Ok(req)
    }

    /// The 32-byte payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SSL_REQUEST_LEN);
        self.put(&mut out);
        out
    }

    /// MariaDB's extended capabilities, present when CLIENT_MYSQL is clear.
    pub fn mariadb_capabilities(&self) -> Option<u32> {
        mariadb_capabilities(self.capabilities, &self.filler)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, MysqlError> {
        let capabilities = r.u32()?;
        if capabilities & CLIENT_PROTOCOL_41 == 0 {
            return Err(MysqlError::Unsupported(
                "client does not speak protocol 4.1",
            ));
        }
        Ok(Self {
            capabilities,
            max_packet: r.u32()?,
            charset: r.u8()?,
            filler: r.array()?,
        })
    }

    fn put(&self, out: &mut impl BufMut) {
        out.put_u32_le(self.capabilities);
        out.put_u32_le(self.max_packet);
        out.put_u8(self.charset);
        out.put_slice(&self.filler);
    }
}

/// A client's HandshakeResponse41.
///
/// Optional fields are `None` when the client did not send them, even if it set the capability
/// that announces them (the payload may end early); [`HandshakeResponse::encode`] writes a
/// field only when its capability is set, as an empty value when a later field needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The client's capability flags.
    pub capabilities: u32,
    /// The largest packet the client wants to receive.
    pub max_packet: u32,
    /// The client's character set (collation id).
    pub charset: u8,
    /// Reserved bytes; MariaDB puts its extended capabilities in the last 4.
    pub filler: [u8; 23],
    /// The MySQL user name.
    pub username: Bytes,
    /// The authentication plugin's answer to the scramble.
    pub auth_response: Bytes,
    /// The initial database (CONNECT_WITH_DB).
    pub database: Option<Bytes>,
    /// The client's authentication plugin (PLUGIN_AUTH).
    pub auth_plugin: Option<Bytes>,
    /// Connection attributes in the client's order (CONNECT_ATTRS).
    pub attributes: Option<Vec<(Bytes, Bytes)>>,
    /// The zstd compression level (ZSTD).
    pub zstd_level: Option<u8>,
    /// Bytes after the last known field, kept so the response re-encodes unchanged.
    pub rest: Bytes,
}

impl HandshakeResponse {
    /// Parses a handshake response payload.
    pub fn parse(payload: &[u8]) -> Result<Self, MysqlError> {
        let mut r = Reader::new(payload, "handshake response");
        let SslRequest {
            capabilities,
            max_packet,
            charset,
            filler,
        } = SslRequest::read(&mut r)?;
        let caps = capabilities;
        let username = owned(r.nul_terminated()?);
        let auth_response = if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            r.lenenc_bytes()?
        } else if caps & CLIENT_SECURE_CONNECTION != 0 {
            let len = r.u8()?;
            r.take(usize::from(len))?
        } else {
            r.nul_terminated()?
        };
        let auth_response = owned(auth_response);
        let database = (caps & CLIENT_CONNECT_WITH_DB != 0 && !r.is_empty())
            .then(|| owned(r.nul_terminated_or_rest()));
        let auth_plugin = (caps & CLIENT_PLUGIN_AUTH != 0 && !r.is_empty())
            .then(|| owned(r.nul_terminated_or_rest()));
        let attributes = if caps & CLIENT_CONNECT_ATTRS != 0 && !r.is_empty() {
            Some(read_attributes(r.lenenc_bytes()?)?)
        } else {
            None
        };
        let zstd_level = if caps & CLIENT_ZSTD != 0 && !r.is_empty() {
            Some(r.u8()?)
        } else {
            None
        };
        Ok(Self {
            capabilities,
            max_packet,
            charset,
            filler,
            username,
            auth_response,
            database,
            auth_plugin,
            attributes,
            zstd_level,
            rest: owned(r.rest()),
        })
    }

    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let caps = self.capabilities;
        let mut out = Vec::with_capacity(128);
        self.ssl_request().put(&mut out);
        put_nul_terminated(&mut out, &self.username);
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            put_lenenc_bytes(&mut out, &self.auth_response);
        } else if caps & CLIENT_SECURE_CONNECTION != 0 {
            // The one-byte length cannot say more; a longer response needs the lenenc form.
            let len = self.auth_response.len().min(255);
            out.put_u8(len as u8);
            out.put_slice(self.auth_response.get(..len).unwrap_or_default());
        } else {
            put_nul_terminated(&mut out, &self.auth_response);
        }

        // Optional fields from the end: each is written if present or if a later one was.
        let zstd = self.zstd_level.filter(|_| caps & CLIENT_ZSTD != 0);
        let attrs = self
            .attributes
            .as_ref()
            .filter(|_| caps & CLIENT_CONNECT_ATTRS != 0);
        let later = !self.rest.is_empty() || zstd.is_some();
        let attrs_out = attrs.map(|a| a.as_slice()).or_else(|| {
            (later && caps & CLIENT_CONNECT_ATTRS != 0).then_some(&[] as &[(Bytes, Bytes)])
        });
        let later = later || attrs_out.is_some();
        let plugin = self
            .auth_plugin
            .as_deref()
            .filter(|_| caps & CLIENT_PLUGIN_AUTH != 0)
            .or_else(|| (later && caps & CLIENT_PLUGIN_AUTH != 0).then_some(&[] as &[u8]));
        let later = later || plugin.is_some();
        let database = self
            .database
            .as_deref()
            .filter(|_| caps & CLIENT_CONNECT_WITH_DB != 0)
            .or_else(|| (later && caps & CLIENT_CONNECT_WITH_DB != 0).then_some(&[] as &[u8]));

        if let Some(db) = database {
            put_nul_terminated(&mut out, db);
        }
        if let Some(plugin) = plugin {
            put_nul_terminated(&mut out, plugin);
        }
        if let Some(attrs) = attrs_out {
            put_attributes(&mut out, attrs);
        }
        if let Some(level) = zstd {
            out.put_u8(level);
        } else if !self.rest.is_empty() && caps & CLIENT_ZSTD != 0 {
            // Only reachable for a hand-built value: a zstd byte must precede `rest`.
            out.put_u8(0);
        }
        out.put_slice(&self.rest);
        out
    }

    /// Sets connection attribute `key` to `value`, replacing any the client sent under that
    /// key (so a client cannot pose as someone else through it).
    ///
    /// A client that sent no attributes gets CONNECT_ATTRS set, but only if the server's
    /// greeting (`server_capabilities`) advertised it; returns whether the attribute was set.
    pub fn set_attribute(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        server_capabilities: u32,
    ) -> bool {
        if self.capabilities & CLIENT_CONNECT_ATTRS == 0 {
            if server_capabilities & CLIENT_CONNECT_ATTRS == 0 {
                return false;
            }
            self.capabilities |= CLIENT_CONNECT_ATTRS;
        }
        let key = key.into();
        let attrs = self.attributes.get_or_insert_with(Vec::new);
        attrs.retain(|(k, _)| *k != key);
        attrs.push((key, value.into()));
        true
    }

    /// The response for a backend whose greeting is `backend`, from a client that was shown
    /// `offered` (a copy of some earlier greeting of that backend): the capabilities (and
    /// MariaDB's, in the filler) become what the client negotiated with `offered` and the
    /// backend also has, so the backend uses no capability the client does not expect. Check
    /// [`Negotiated::missing_in`] first: what the client negotiated and the backend lacks is
    /// dropped here.
    pub fn for_backend(&self, offered: &Greeting, backend: &Greeting) -> Self {
        let mut out = self.clone();
        out.capabilities = self.capabilities & offered.capabilities() & backend.capabilities();
        if out.capabilities & CLIENT_MYSQL == 0
            && let (Some(client), Some(offered), Some(server)) = (
                self.mariadb_capabilities(),
                offered.mariadb_capabilities(),
                backend.mariadb_capabilities(),
            )
        {
            let [.., a, b, c, d] = &mut out.filler;
            [*a, *b, *c, *d] = (client & offered & server).to_le_bytes();
        }
        out
    }

    /// The SSLRequest a client with these capabilities sends before this response (CLIENT_SSL
    /// set), for a side that opens TLS towards the server on the client's behalf.
    pub fn ssl_request(&self) -> SslRequest {
        SslRequest {
            capabilities: self.capabilities,
            max_packet: self.max_packet,
            charset: self.charset,
            filler: self.filler,
        }
    }

    /// MariaDB's extended capabilities, present when CLIENT_MYSQL is clear.
    pub fn mariadb_capabilities(&self) -> Option<u32> {
        mariadb_capabilities(self.capabilities, &self.filler)
    }

    /// The user name as text, if it is UTF-8.
    pub fn username_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.username).ok()
    }
}

/// Capability bits that only shape the connection phase (or mean something to the client
/// alone): a backend that lacks one can still serve a client that negotiated it, because the
/// handshake response sent to the backend is encoded for the backend's capabilities.
const HANDSHAKE_ONLY: u32 = CLIENT_SSL
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
    | CLIENT_SSL_VERIFY_SERVER_CERT
    | CLIENT_REMEMBER_OPTIONS;

/// What a client and the greeting it was shown agreed on: the capabilities that decide how the
/// command phase looks (result set framing, session tracking, MariaDB's bulk operations and
/// metadata caching, ...).
///
/// A client that was greeted with a copy of its backend's greeting must find the same on the
/// backend: bytes of the command phase pass unchanged, so a capability the client uses and the
/// backend lacks would corrupt result sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The capability flags both sides set.
    pub capabilities: u32,
    /// MariaDB's extended capabilities both sides set (0 unless both are MariaDB: CLIENT_MYSQL
    /// clear on both).
    pub mariadb: u32,
}

/// Capabilities a client negotiated and a backend lacks; see [`Negotiated::missing_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// Capability flags.
    pub capabilities: u32,
    /// MariaDB's extended capabilities.
    pub mariadb: u32,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "capabilities {:#x}", self.capabilities)?;
        if self.mariadb != 0 {
            write!(f, ", MariaDB capabilities {:#x}", self.mariadb)?;
        }
        Ok(())
    }
}

impl Negotiated {
    /// What a client with `capabilities` (and MariaDB's `mariadb` capabilities, if it sent
    /// them) takes from `greeting`: a server serves a client with the capabilities both have.
    pub fn between(greeting: &Greeting, capabilities: u32, mariadb: Option<u32>) -> Self {
        let mariadb = match (greeting.mariadb_capabilities(), mariadb) {
            (Some(server), Some(client)) => server & client,
            _ => 0,
        };
        Self {
            capabilities: greeting.capabilities() & capabilities,
            mariadb,
        }
    }

    /// What of this the server that sent `backend` lacks, apart from bits that only shape the
    /// handshake; `None` when it can serve the client as negotiated.
    pub fn missing_in(&self, backend: &Greeting) -> Option<Missing> {
        let missing = Missing {
            capabilities: self.capabilities & !backend.capabilities() & !HANDSHAKE_ONLY,
            mariadb: self.mariadb & !backend.mariadb_capabilities().unwrap_or(0),
        };
        (missing.capabilities != 0 || missing.mariadb != 0).then_some(missing)
    }
}

/// The first packet a client sends after the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFirst {
    /// The client asks for TLS; its ClientHello follows on the same connection.
    SslRequest(SslRequest),
    /// The client went on without TLS and sent its whole handshake response in the clear.
    Response(HandshakeResponse),
}

impl ClientFirst {
    /// Tells an SSLRequest (exactly 32 bytes, CLIENT_SSL set) from a plaintext response.
    pub fn parse(payload: &[u8]) -> Result<Self, MysqlError> {
        if payload.len() == SSL_REQUEST_LEN {
            SslRequest::parse(payload).map(Self::SslRequest)
        } else {
            HandshakeResponse::parse(payload).map(Self::Response)
        }
    }
}

fn mariadb_capabilities(capabilities: u32, filler: &[u8; 23]) -> Option<u32> {
    let [.., a, b, c, d] = *filler;
    (capabilities & CLIENT_MYSQL == 0).then(|| u32::from_le_bytes([a, b, c, d]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::CLIENT_SESSION_TRACK;
    use crate::mysql::vectors::{self, payload};
    use proptest::prelude::*;

    fn greeting() -> Greeting {
        Greeting::parse(payload(vectors::GREETING).into()).unwrap()
    }

    #[test]
    fn captured_mariadb_greeting_parses() {
        let g = greeting();
        assert_eq!(g.server_version(), b"5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.connection_id(), 10);
        assert_eq!(g.capabilities(), 0x81ff_f7fe);
        assert_eq!(g.capabilities() & CLIENT_SSL, 0);
        assert_eq!(g.mariadb_capabilities(), Some(0x1d));
        assert_eq!(g.charset(), 0x2d);
        assert_eq!(g.status(), 2);
        assert_eq!(g.scramble(), b"\"<G2atF<=Z/x48Z<\\<X$");
        assert_eq!(g.auth_plugin(), Some(&b"mysql_native_password"[..]));
    }

    #[test]
    fn greeting_for_a_tls_client_changes_only_capability_bits() {
        let g = greeting();
        let original = payload(vectors::GREETING);
        let out = g.for_client(true);
        let diff: Vec<usize> = (0..original.len())
            .filter(|&i| original[i] != out[i])
            .collect();
        // MariaDB offers compression (0x20 in the first byte) and no TLS (0x08 in the second).
        let at = g.caps_low_at;
        assert_eq!(diff, vec![at, at + 1]);
        assert_eq!((original[at], out[at]), (0xfe, 0xde));
        assert_eq!((original[at + 1], out[at + 1]), (0xf7, 0xff));
        let again = Greeting::parse(out).unwrap();
        assert_eq!(
            again.capabilities(),
            (g.capabilities() | CLIENT_SSL) & !CLIENT_COMPRESS
        );
        assert_eq!(again.connection_id(), g.connection_id());
        assert_eq!(again.scramble(), g.scramble());
        assert_eq!(again.mariadb_capabilities(), g.mariadb_capabilities());
        assert_eq!(again.auth_plugin(), g.auth_plugin());
        // Asking for no change gives the server's bytes back.
        assert_eq!(g.with_capabilities(g.capabilities()), original[..]);
    }

    #[test]
    fn greeting_for_a_client_clears_compression_and_can_hide_tls() {
        let g = Greeting::parse(vectors::mysql8_greeting().into()).unwrap();
        assert_eq!(g.mariadb_capabilities(), None);
        assert_eq!(g.auth_plugin(), Some(&b"caching_sha2_password"[..]));
        assert_eq!(g.scramble(), b"abcdefghijklmnopqrst");
        let tls = Greeting::parse(g.for_client(true)).unwrap();
        assert_eq!(
            tls.capabilities(),
            (g.capabilities() | CLIENT_SSL) & !(CLIENT_COMPRESS | CLIENT_ZSTD)
        );
        let plain = Greeting::parse(g.for_client(false)).unwrap();
        assert_eq!(
            plain.capabilities() & (CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD),
            0
        );
    }

    #[test]
    fn a_reissued_greeting_changes_only_the_id_and_the_scramble() {
        let g = greeting();
        let original = payload(vectors::GREETING);
        let copy = g.reissue(0x8000_0001, b"ABCDEFGHIJKLMNOPQRST").unwrap();
        assert_eq!(copy.connection_id(), 0x8000_0001);
        assert_eq!(copy.scramble(), b"ABCDEFGHIJKLMNOPQRST");
        let out = copy.payload();
        let diff: Vec<usize> = (0..original.len())
            .filter(|&i| original[i] != out[i])
            .collect();
        // The id (4 bytes after the version), 8 + 12 scramble bytes, nothing else.
        let id_at = 1 + g.server_version().len() + 1;
        let mut want: Vec<usize> = (id_at..id_at + 4).collect();
        want.extend(id_at + 4..id_at + 12);
        let part2 = original.len() - b"mysql_native_password\0".len() - 13;
        want.extend(part2..part2 + 12);
        want.retain(|&i| original[i] != out[i]);
        assert_eq!(diff, want);
        assert_eq!(copy.capabilities(), g.capabilities());
        assert_eq!(copy.mariadb_capabilities(), g.mariadb_capabilities());
        // Wrong lengths and NULs are refused: the scramble is a C string to some clients.
        assert!(g.reissue(1, b"short").is_none());
        assert!(g.reissue(1, &[0; 20]).is_none());
        let mysql8 = Greeting::parse(vectors::mysql8_greeting().into()).unwrap();
        let copy = mysql8.reissue(7, b"01234567890123456789").unwrap();
        assert_eq!(copy.scramble(), b"01234567890123456789");
        assert_eq!(copy.auth_plugin(), Some(&b"caching_sha2_password"[..]));
    }

    #[test]
    fn what_a_client_negotiated_must_be_on_the_backend() {
        let g = greeting();
        let offered = Greeting::parse(g.for_client(true)).unwrap();
        let client = HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_PASSWORD)).unwrap();
        let n = Negotiated::between(&offered, client.capabilities, client.mariadb_capabilities());
        assert_eq!(n.mariadb, 0x1d);
        assert_eq!(n.missing_in(&g), None, "the same server");
        // A backend without session tracking, or without MariaDB's metadata cache.
        let older =
            Greeting::parse(g.with_capabilities(g.capabilities() & !CLIENT_SESSION_TRACK)).unwrap();
        assert_eq!(
            n.missing_in(&older),
            Some(Missing {
                capabilities: CLIENT_SESSION_TRACK,
                mariadb: 0
            })
        );
        let mut raw = payload(vectors::GREETING);
        let ext_at = raw.len() - b"mysql_native_password\0".len() - 13 - 4;
        raw[ext_at] = 0x0d;
        let no_cache = Greeting::parse(raw.into()).unwrap();
        assert_eq!(no_cache.mariadb_capabilities(), Some(0x0d));
        assert_eq!(n.missing_in(&no_cache).map(|m| m.mariadb), Some(0x10));
        // What only shapes the handshake may differ; so may what the client did not choose.
        let plain = Greeting::parse(g.with_capabilities(
            g.capabilities() & !(CLIENT_CONNECT_ATTRS | crate::mysql::CLIENT_DEPRECATE_EOF),
        ))
        .unwrap();
        assert_eq!(n.missing_in(&plain), None);
        // A MySQL server behind a MariaDB template: the client's MariaDB capabilities are gone.
        let mysql8 = Greeting::parse(vectors::mysql8_greeting().into()).unwrap();
        assert_eq!(n.missing_in(&mysql8).map(|m| m.mariadb), Some(0x1d));
    }

    #[test]
    fn the_response_for_the_backend_keeps_to_what_all_three_have() {
        let g = greeting();
        let offered = Greeting::parse(g.for_client(true)).unwrap();
        let mut client =
            HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_PASSWORD)).unwrap();
        // The client asks for compression (which the offered greeting does not have), as some
        // drivers do whatever the server says.
        client.capabilities |= CLIENT_COMPRESS | CLIENT_SSL;
        let older =
            Greeting::parse(g.with_capabilities(g.capabilities() & !CLIENT_CONNECT_ATTRS)).unwrap();
        let out = client.for_backend(&offered, &older);
        // TLS is for the legs to decide (the relay sets or clears it per leg).
        assert_eq!(
            out.capabilities & (CLIENT_COMPRESS | CLIENT_CONNECT_ATTRS | CLIENT_SSL),
            0
        );
        assert_eq!(out.mariadb_capabilities(), Some(0x1d));
        assert_eq!(out.username, client.username);
        // Without CONNECT_ATTRS the attributes are not encoded.
        let again = HandshakeResponse::parse(&out.encode()).unwrap();
        assert_eq!(again.attributes, None);
        // Unchanged against the same server, apart from what the offer lacked.
        let same = client.for_backend(&offered, &g);
        assert_eq!(
            same.capabilities,
            client.capabilities & !(CLIENT_COMPRESS | CLIENT_SSL)
        );
        assert_eq!(same.filler, client.filler);
    }

    #[test]
    fn greeting_that_is_an_error_is_a_refusal() {
        let err = crate::mysql::err_packet(0, 1040, "08004", "Too many connections");
        assert!(matches!(
            Greeting::parse(Bytes::copy_from_slice(&err[4..])),
            Err(MysqlError::Refused(e)) if e.code == 1040
        ));
        assert!(matches!(
            Greeting::parse(Bytes::from_static(b"\x09old")),
            Err(MysqlError::ProtocolVersion(9))
        ));
    }

    #[test]
    fn captured_ssl_request_is_classified() {
        let p = payload(vectors::SSL_REQUEST);
        let ClientFirst::SslRequest(req) = ClientFirst::parse(&p).unwrap() else {
            panic!("not an ssl request");
        };
        assert_ne!(req.capabilities & CLIENT_SSL, 0);
        assert_eq!(req.max_packet, 0x10_0000);
        assert_eq!(req.charset, 0x21);
        assert_eq!(req.mariadb_capabilities(), Some(0x1d));
        assert_eq!(req.encode(), p);
    }

    #[test]
    fn captured_plaintext_response_is_classified_and_parsed() {
        let p = payload(vectors::RESPONSE_PLAIN);
        let ClientFirst::Response(r) = ClientFirst::parse(&p).unwrap() else {
            panic!("not a response");
        };
        assert_eq!(r.capabilities & CLIENT_SSL, 0);
        assert_eq!(r.username_str(), Some("root"));
        assert!(r.auth_response.is_empty());
        assert_eq!(r.database, None);
        assert_eq!(
            r.auth_plugin.as_deref(),
            Some(&b"mysql_native_password"[..])
        );
        let attrs = r.attributes.as_ref().unwrap();
        assert_eq!(attrs.len(), 7);
        assert_eq!(attrs[0], (Bytes::from("_os"), Bytes::from("Linux")));
        assert_eq!(
            attrs[5],
            (Bytes::from("program_name"), Bytes::from("mysql"))
        );
        assert_eq!(r.zstd_level, None);
        assert!(r.rest.is_empty());
    }

    #[test]
    fn captured_responses_roundtrip_exactly() {
        for v in [
            vectors::RESPONSE_PLAIN,
            vectors::RESPONSE_WITH_DB,
            vectors::RESPONSE_WITH_PASSWORD,
        ] {
            let p = payload(v);
            assert_eq!(HandshakeResponse::parse(&p).unwrap().encode(), p);
        }
        let r = HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_DB)).unwrap();
        assert_eq!(r.database.as_deref(), Some(&b"mysql"[..]));
        assert_eq!(r.auth_plugin.as_deref(), Some(&b"client_ed25519"[..]));
        let r = HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_PASSWORD)).unwrap();
        assert_eq!(r.auth_response.len(), 20);
    }

    #[test]
    fn clearing_ssl_changes_one_bit() {
        // What a TLS client sends after the upgrade: the plaintext capture with CLIENT_SSL set.
        let mut p = payload(vectors::RESPONSE_PLAIN);
        p[1] |= 0x08;
        let mut r = HandshakeResponse::parse(&p).unwrap();
        assert_eq!(r.ssl_request().encode(), p[..32]);
        r.capabilities &= !CLIENT_SSL;
        assert_eq!(r.encode(), payload(vectors::RESPONSE_PLAIN));
    }

    #[test]
    fn attribute_is_added_or_replaced() {
        let mut r = HandshakeResponse::parse(&payload(vectors::RESPONSE_PLAIN)).unwrap();
        r.attributes
            .as_mut()
            .unwrap()
            .insert(0, ("postern_client".into(), "mallory".into()));
        assert!(r.set_attribute("postern_client", "alice", 0));
        let again = HandshakeResponse::parse(&r.encode()).unwrap();
        let attrs = again.attributes.unwrap();
        assert_eq!(attrs.len(), 8);
        assert_eq!(
            attrs.last().unwrap(),
            &(Bytes::from("postern_client"), Bytes::from("alice"))
        );
        assert!(!attrs.iter().any(|(_, v)| v == "mallory"));
    }

    #[test]
    fn attribute_for_a_client_without_attributes_needs_the_server() {
        let mut r = HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_DB)).unwrap();
        r.capabilities &= !CLIENT_CONNECT_ATTRS;
        r.attributes = None;
        let g = greeting();
        assert!(!r.set_attribute(
            "postern_client",
            "alice",
            g.capabilities() & !CLIENT_CONNECT_ATTRS
        ));
        assert!(r.set_attribute("postern_client", "alice", g.capabilities()));
        let again = HandshakeResponse::parse(&r.encode()).unwrap();
        assert_ne!(again.capabilities & CLIENT_CONNECT_ATTRS, 0);
        assert_eq!(again.database.as_deref(), Some(&b"mysql"[..]));
        assert_eq!(again.auth_plugin.as_deref(), Some(&b"client_ed25519"[..]));
        assert_eq!(
            again.attributes.unwrap(),
            vec![(Bytes::from("postern_client"), Bytes::from("alice"))]
        );
    }

    #[test]
    fn short_and_old_auth_response_forms() {
        let base = HandshakeResponse::parse(&payload(vectors::RESPONSE_WITH_PASSWORD)).unwrap();
        for caps in [
            base.capabilities & !CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
            base.capabilities & !(CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | CLIENT_SECURE_CONNECTION),
        ] {
            let mut r = base.clone();
            r.capabilities = caps;
            let bytes = r.encode();
            assert_eq!(HandshakeResponse::parse(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn fields_announced_but_not_sent_stay_absent() {
        let mut r = HandshakeResponse::parse(&payload(vectors::RESPONSE_PLAIN)).unwrap();
        r.capabilities |= CLIENT_CONNECT_WITH_DB | CLIENT_ZSTD;
        r.auth_plugin = None;
        r.attributes = None;
        let bytes = r.encode();
        assert_eq!(bytes.len(), 32 + 5 + 1);
        assert_eq!(HandshakeResponse::parse(&bytes).unwrap(), r);
        // A later field forces the earlier ones out as empty values.
        r.zstd_level = Some(3);
        let again = HandshakeResponse::parse(&r.encode()).unwrap();
        assert_eq!(again.database.as_deref(), Some(&b""[..]));
        assert_eq!(again.attributes, Some(vec![]));
        assert_eq!(again.zstd_level, Some(3));
    }

    #[test]
    fn bad_first_packets_are_errors() {
        let mut p = payload(vectors::SSL_REQUEST);
        p[1] &= !0x08;
        assert!(matches!(
            ClientFirst::parse(&p),
            Err(MysqlError::Malformed {
                why: "CLIENT_SSL is not set",
                ..
            })
        ));
        assert!(ClientFirst::parse(&p[..31]).is_err());
        assert!(ClientFirst::parse(&[]).is_err());
        let mut old = payload(vectors::RESPONSE_PLAIN);
        old[1] &= !0x02;
        assert!(matches!(
            ClientFirst::parse(&old),
            Err(MysqlError::Unsupported(_))
        ));
    }

    fn bytes_up_to(n: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from)
    }

    fn nul_free(n: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(1u8..=255, 0..n).prop_map(Bytes::from)
    }

    prop_compose! {
        fn response()(
            caps in any::<u32>(),
            max_packet in any::<u32>(),
            charset in any::<u8>(),
            filler in any::<[u8; 23]>(),
            username in nul_free(20),
            auth in bytes_up_to(300),
            auth_nul_free in nul_free(40),
            database in proptest::option::of(nul_free(20)),
            auth_plugin in proptest::option::of(nul_free(30)),
            attributes in proptest::option::of(proptest::collection::vec((bytes_up_to(300), bytes_up_to(20)), 0..4)),
            zstd_level in proptest::option::of(any::<u8>()),
        ) -> HandshakeResponse {
            let caps = caps | CLIENT_PROTOCOL_41;
            // Give each optional field the shape parse produces: present only with its flag,
            // and absent only when nothing follows it.
            let zstd_level = zstd_level.filter(|_| caps & CLIENT_ZSTD != 0);
            let mut attributes = attributes.filter(|_| caps & CLIENT_CONNECT_ATTRS != 0);
            if zstd_level.is_some() && caps & CLIENT_CONNECT_ATTRS != 0 {
                attributes.get_or_insert_with(Vec::new);
            }
            let mut auth_plugin = auth_plugin.filter(|_| caps & CLIENT_PLUGIN_AUTH != 0);
            if (attributes.is_some() || zstd_level.is_some()) && caps & CLIENT_PLUGIN_AUTH != 0 {
                auth_plugin.get_or_insert_with(Bytes::new);
            }
            let mut database = database.filter(|_| caps & CLIENT_CONNECT_WITH_DB != 0);
            if (auth_plugin.is_some() || attributes.is_some() || zstd_level.is_some())
                && caps & CLIENT_CONNECT_WITH_DB != 0 {
                database.get_or_insert_with(Bytes::new);
            }
            let auth_response = if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
                auth
            } else if caps & CLIENT_SECURE_CONNECTION != 0 {
                auth.slice(..auth.len().min(255))
            } else {
                auth_nul_free
            };
            HandshakeResponse {
                capabilities: caps,
                max_packet,
                charset,
                filler,
                username,
                auth_response,
                database,
                auth_plugin,
                attributes,
                zstd_level,
                rest: Bytes::new(),
            }
        }
    }

    proptest! {
        #[test]
        fn responses_roundtrip(r in response()) {
            let bytes = r.encode();
            let parsed = HandshakeResponse::parse(&bytes).unwrap();
            prop_assert_eq!(&parsed, &r);
            prop_assert_eq!(parsed.encode(), bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Greeting::parse(Bytes::copy_from_slice(&data));
            let _ = SslRequest::parse(&data);
            let _ = ClientFirst::parse(&data);
            if let Ok(r) = HandshakeResponse::parse(&data) {
                // Whatever parses encodes to something that parses to the same value.
                let again = HandshakeResponse::parse(&r.encode()).unwrap();
                prop_assert_eq!(again, r);
            }
        }

        #[test]
        fn damaged_greetings_never_panic(cut in 0usize..100, at in 0usize..100, byte in any::<u8>()) {
            let mut p = payload(vectors::GREETING);
            if let Some(b) = p.get_mut(at) {
                *b = byte;
            }
            p.truncate(cut);
            if let Ok(g) = Greeting::parse(p.into()) {
                let _ = Greeting::parse(g.for_client(true));
            }
        }

        #[test]
        fn responses_with_valid_prefix_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200),
                                                   caps in any::<u32>()) {
            let mut p = (caps | CLIENT_PROTOCOL_41).to_le_bytes().to_vec();
            p.extend_from_slice(&[0; 28]);
            p.extend_from_slice(&tail);
            if let Ok(r) = HandshakeResponse::parse(&p) {
                let _ = r.encode();
            }
        }
    }
}
