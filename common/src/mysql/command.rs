//! Recognising the commands a policy cares about once the client is logged in.
//!
//! Every command is a packet with sequence id 0 whose first byte names it. `COM_CHANGE_USER`
//! logs in as another user on the same connection, so a policy that limits users must see it;
//! `COM_RESET_CONNECTION` keeps the user but resets the session; a `KILL` names another
//! connection by id ([`Kill`](super::Kill)).
//!
//! ```text
//! COM_CHANGE_USER
//!   0x11 | username NUL
//!   | auth response: u8 length (SECURE_CONNECTION), else NUL-terminated
//!   | database NUL | charset u16 (if more data) | auth plugin NUL (PLUGIN_AUTH)
//!   | attributes: lenenc length, then lenenc key, lenenc value pairs (CONNECT_ATTRS)
//! ```

use bytes::Bytes;

use super::codec::{Reader, owned, put_attributes, put_nul_terminated, read_attributes};
use super::kill::{COM_PROCESS_KILL, COM_QUERY, Kill};
use super::packet::Packet;
use super::{CLIENT_CONNECT_ATTRS, CLIENT_PLUGIN_AUTH, CLIENT_SECURE_CONNECTION, MysqlError};

/// `COM_QUIT`: the client is closing the connection.
pub const COM_QUIT: u8 = 0x01;
/// `COM_CHANGE_USER`: log in again as another user.
pub const COM_CHANGE_USER: u8 = 0x11;
/// `COM_RESET_CONNECTION`: reset the session, keeping the user.
pub const COM_RESET_CONNECTION: u8 = 0x1f;

/// What a command packet is, as far as policy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `COM_CHANGE_USER` to this user name.
    ChangeUser {
        /// The user the client wants to become.
        username: Bytes,
    },
    /// A command that names a connection by id: `KILL ...` or `COM_PROCESS_KILL`.
    Kill(Kill),
    /// `COM_RESET_CONNECTION`.
    ResetConnection,
    /// `COM_QUIT`.
    Quit,
    /// Any other command, by its first byte.
    Other(u8),
}

impl Command {
    /// Recognises the command that starts with `packet`.
    ///
    /// `Ok(None)` when the packet cannot start a command: its sequence id is not 0 (it continues
    /// an exchange, such as the file contents of `LOAD DATA LOCAL`) or it is empty. A
    /// `COM_CHANGE_USER` whose user name cannot be read is an error, so it can be refused.
    pub fn parse(packet: &Packet) -> Result<Option<Self>, MysqlError> {
        if packet.seq != 0 {
            return Ok(None);
        }
        let Some((&first, rest)) = packet.payload.split_first() else {
            return Ok(None);
        };
        Ok(Some(match first {
            COM_CHANGE_USER => Self::ChangeUser {
                username: owned(Reader::new(rest, "change user").nul_terminated()?),
            },
            COM_RESET_CONNECTION => Self::ResetConnection,
            COM_QUIT => Self::Quit,
            COM_QUERY | COM_PROCESS_KILL => match Kill::parse(&packet.payload) {
                Some(kill) => Self::Kill(kill),
                None => Self::Other(first),
            },
            other => Self::Other(other),
        }))
    }
}

/// A whole `COM_CHANGE_USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeUser {
    /// The user the client wants to become.
    pub username: Bytes,
    /// The authentication plugin's answer to the connection's scramble.
    pub auth_response: Bytes,
    /// The database to switch to (empty for none).
    pub database: Bytes,
    /// The character set (collation id), when sent.
    pub charset: Option<u16>,
    /// The client's authentication plugin (PLUGIN_AUTH).
    pub auth_plugin: Option<Bytes>,
    /// Connection attributes (CONNECT_ATTRS).
    pub attributes: Option<Vec<(Bytes, Bytes)>>,
    /// Bytes after the last known field, kept so the command re-encodes unchanged.
    pub rest: Bytes,
}

impl ChangeUser {
    /// Parses a `COM_CHANGE_USER` payload (command byte included) from a client that logged in
    /// with `client_capabilities`.
    pub fn parse(payload: &[u8], client_capabilities: u32) -> Result<Self, MysqlError> {
        let mut r = Reader::new(payload, "change user");
        if r.u8()? != COM_CHANGE_USER {
            return Err(r.malformed("not a COM_CHANGE_USER"));
        }
        let username = owned(r.nul_terminated()?);
        let auth_response = if client_capabilities & CLIENT_SECURE_CONNECTION != 0 {
            let len = r.u8()?;
            r.take(usize::from(len))?
        } else {
            r.nul_terminated()?
        };
        let auth_response = owned(auth_response);
        let database = owned(r.nul_terminated_or_rest());
        // The server reads the character set only when at least two bytes follow.
        let charset = if r.remaining() >= 2 {
            Some(r.u16()?)
        } else {
            None
        };
        let auth_plugin = (client_capabilities & CLIENT_PLUGIN_AUTH != 0 && !r.is_empty())
            .then(|| owned(r.nul_terminated_or_rest()));
        let attributes = if client_capabilities & CLIENT_CONNECT_ATTRS != 0 && !r.is_empty() {
            Some(read_attributes(r.lenenc_bytes()?)?)
        } else {
            None
        };
        Ok(Self {
            username,
            auth_response,
            database,
            charset,
            auth_plugin,
            attributes,
            rest: owned(r.rest()),
        })
    }

    /// The payload (command byte included) for a server that takes `client_capabilities`.
    ///
    /// Optional fields are written when present, or as empty values when a later one needs
    /// them; a command parsed with the same capabilities encodes to the bytes it came from.
    pub fn encode(&self, client_capabilities: u32) -> Vec<u8> {
        let caps = client_capabilities;
        let mut out = Vec::with_capacity(64);
        out.push(COM_CHANGE_USER);
        put_nul_terminated(&mut out, &self.username);
        if caps & CLIENT_SECURE_CONNECTION != 0 {
            // The one-byte length cannot say more.
            let len = self.auth_response.len().min(255);
            out.push(len as u8);
            out.extend_from_slice(self.auth_response.get(..len).unwrap_or_default());
        } else {
            put_nul_terminated(&mut out, &self.auth_response);
        }
        put_nul_terminated(&mut out, &self.database);
        let attrs = self
            .attributes
            .as_deref()
            .filter(|_| caps & CLIENT_CONNECT_ATTRS != 0);
        let plugin = self
            .auth_plugin
            .as_deref()
            .filter(|_| caps & CLIENT_PLUGIN_AUTH != 0)
            .or_else(|| {
                (attrs.is_some() && caps & CLIENT_PLUGIN_AUTH != 0).then_some(&[] as &[u8])
            });
        // Nothing follows the database unless the character set does.
        let Some(charset) = self.charset else {
            return out;
        };
        out.extend_from_slice(&charset.to_le_bytes());
        if let Some(plugin) = plugin {
            put_nul_terminated(&mut out, plugin);
        }
        if let Some(attrs) = attrs {
            put_attributes(&mut out, attrs);
        }
        out.extend_from_slice(&self.rest);
        out
    }

    /// Sets connection attribute `key` to `value`, replacing any the client sent under that key
    /// (a change of user replaces the session's attributes, so a client could otherwise pose as
    /// someone else through them).
    ///
    /// Returns whether the attribute was set: not when the server does not take attributes from
    /// this client (`client_capabilities` lack CONNECT_ATTRS), nor when the command carries no
    /// character set, after which nothing can follow; in both cases the command carries no
    /// attributes at all.
    pub fn set_attribute(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        client_capabilities: u32,
    ) -> bool {
        if client_capabilities & CLIENT_CONNECT_ATTRS == 0 || self.charset.is_none() {
            return false;
        }
        let key = key.into();
        let attrs = self.attributes.get_or_insert_with(Vec::new);
        attrs.retain(|(k, _)| *k != key);
        attrs.push((key, value.into()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::HandshakeResponse;
    use crate::mysql::vectors::{self, payload};
    use proptest::prelude::*;

    /// A `COM_CHANGE_USER` as libmariadb's `mysql_change_user` builds it.
    fn change_user(user: &[u8], caps: u32) -> Vec<u8> {
        let mut p = vec![COM_CHANGE_USER];
        p.extend_from_slice(user);
        p.push(0);
        p.push(20);
        p.extend_from_slice(&[0x5a; 20]);
        p.extend_from_slice(b"shop\0");
        p.extend_from_slice(&45u16.to_le_bytes());
        if caps & CLIENT_PLUGIN_AUTH != 0 {
            p.extend_from_slice(b"mysql_native_password\0");
        }
        if caps & CLIENT_CONNECT_ATTRS != 0 {
            p.extend_from_slice(b"\x0b\x04_pid\x0512345");
        }
        p
    }

    fn command(seq: u8, payload: &[u8]) -> Result<Option<Command>, MysqlError> {
        Command::parse(&Packet {
            seq,
            payload: Bytes::copy_from_slice(payload),
        })
    }

    #[test]
    fn change_user_is_recognised_with_its_user() {
        let caps = HandshakeResponse::parse(&payload(vectors::RESPONSE_PLAIN))
            .unwrap()
            .capabilities;
        let p = change_user(b"bob", caps);
        assert_eq!(
            command(0, &p).unwrap(),
            Some(Command::ChangeUser {
                username: Bytes::from_static(b"bob")
            })
        );
        let full = ChangeUser::parse(&p, caps).unwrap();
        assert_eq!(&full.username[..], b"bob");
        assert_eq!(full.auth_response.len(), 20);
        assert_eq!(&full.database[..], b"shop");
        assert_eq!(full.charset, Some(45));
        assert_eq!(
            full.auth_plugin.as_deref(),
            Some(&b"mysql_native_password"[..])
        );
        assert_eq!(
            full.attributes,
            Some(vec![(Bytes::from("_pid"), Bytes::from("12345"))])
        );

        let old = ChangeUser::parse(&change_user(b"bob", 0), CLIENT_SECURE_CONNECTION).unwrap();
        assert_eq!(old.auth_plugin, None);
        assert_eq!(old.attributes, None);
    }

    #[test]
    fn change_user_reencodes_unchanged_and_takes_an_attribute() {
        let caps = HandshakeResponse::parse(&payload(vectors::RESPONSE_PLAIN))
            .unwrap()
            .capabilities;
        for c in [caps, caps & !CLIENT_CONNECT_ATTRS, CLIENT_SECURE_CONNECTION] {
            let p = change_user(b"bob", c);
            assert_eq!(ChangeUser::parse(&p, c).unwrap().encode(c), p);
        }
        // A forged attribute is replaced, the others kept.
        let mut p = change_user(b"bob", caps & !CLIENT_CONNECT_ATTRS);
        p.extend_from_slice(b"\x22\x0epostern_client\x07mallory\x04_pid\x0512345");
        let mut cu = ChangeUser::parse(&p, caps).unwrap();
        assert!(cu.set_attribute("postern_client", "alice", caps));
        let again = ChangeUser::parse(&cu.encode(caps), caps).unwrap();
        assert_eq!(
            again.attributes.unwrap(),
            vec![
                (Bytes::from("_pid"), Bytes::from("12345")),
                (Bytes::from("postern_client"), Bytes::from("alice")),
            ]
        );
        assert_eq!(again.username, cu.username);
        assert_eq!(again.auth_plugin, cu.auth_plugin);
        // Added where the client sent none; refused where the server takes none.
        let c = caps & !CLIENT_CONNECT_ATTRS;
        let mut cu = ChangeUser::parse(&change_user(b"bob", c), c).unwrap();
        assert!(!cu.set_attribute("postern_client", "alice", c));
        assert!(cu.set_attribute("postern_client", "alice", caps));
        let again = ChangeUser::parse(&cu.encode(caps), caps).unwrap();
        assert_eq!(again.attributes.unwrap().len(), 1);
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            command(0, &[COM_RESET_CONNECTION]).unwrap(),
            Some(Command::ResetConnection)
        );
        assert_eq!(command(0, &[COM_QUIT]).unwrap(), Some(Command::Quit));
        assert_eq!(
            command(0, b"\x03select 1").unwrap(),
            Some(Command::Other(3))
        );
        // Not the start of a command: a continuation, or nothing.
        assert_eq!(command(1, &change_user(b"bob", 0)).unwrap(), None);
        assert_eq!(command(0, &[]).unwrap(), None);
        // A change of user whose name cannot be read is refused, not waved through.
        assert!(command(0, b"\x11bob").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200),
                                       caps in any::<u32>(), seq in 0u8..2) {
            let _ = command(seq, &data);
            let _ = ChangeUser::parse(&data, caps);
            let mut p = vec![COM_CHANGE_USER];
            p.extend_from_slice(&data);
            if let Ok(cu) = ChangeUser::parse(&p, caps) {
                let _ = cu.encode(caps);
            }
        }
    }
}
