//! The login of an authorised client and its command phase: relaying the authentication
//! exchange ([`AuthRelay`]), then splicing bytes, with the client's commands judged by the
//! service's policy ([`judge_command`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::ids::ConnIds;
use super::io::{Conn, Failure, Judgement, Leg, Side, Watched};
use super::serve::{REFUSAL_WRITE_TIMEOUT, refuse, within};
use super::{CLIENT_ATTRIBUTE, Front};
use crate::events::Tunnel;
use crate::mysql::{
    self, AuthOutcome, AuthRelay, ChangeUser, Command, CommandWatch, ErrPacket, Turn,
    unknown_thread,
};
use crate::pki::Identity;
use crate::policy::Users;
use crate::protocol::{Code, Refusal};
use crate::splice;

/// Where `KILL`s are resolved: this front end's connection ids, and the database server the
/// connection reached.
#[derive(Clone, Copy)]
pub(super) struct Kills<'a> {
    pub(super) ids: &'a ConnIds,
    pub(super) node: &'a str,
}

/// The login and the command phase of one authorised client.
pub(super) struct Login<'a> {
    pub(super) front: &'a Front<'a>,
    pub(super) identity: &'a Identity,
    /// What this end knows of the connection, for its events and audit record.
    pub(super) record: Tunnel,
    /// What the backend takes the client to speak, for reading its later `COM_CHANGE_USER`.
    pub(super) capabilities: u32,
    /// Set when the client was greeted with a connection id of this front end's.
    pub(super) kills: Option<Kills<'a>>,
}

impl Login<'_> {
    /// Sends `to_backend` (the handshake response), relays the rest of the authentication
    /// exchange, then splices bytes until either side ends.
    pub(super) async fn run<C: Conn, B: Conn>(
        self,
        mut client: Leg<C>,
        mut backend: Leg<B>,
        mut relay: AuthRelay,
        to_backend: BytesMut,
    ) {
        let timeout = self.front.rules.handshake_timeout;
        if let Err(e) = backend.write(&to_backend).await {
            self.failed(&e);
            return fail(client.io, backend.io);
        }
        loop {
            match relay.turn() {
                Turn::Done(AuthOutcome::Accepted) => break,
                Turn::Done(AuthOutcome::Denied) => {
                    // The database's ERR went to the client; it closes the connection itself.
                    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, client.io.shutdown()).await;
                    return;
                }
                Turn::Backend => {
                    let step = within(
                        deadline(timeout),
                        "the database's login answer",
                        backend.read(),
                    );
                    let packet = match step.await {
                        Ok(p) => p,
                        Err(e) => {
                            self.failed(&e);
                            return fail(client.io, backend.io);
                        }
                    };
                    let out = match relay.from_backend(&packet) {
                        Ok(out) => out,
                        Err(e) => {
                            let r = Refusal::new(Code::NotAuthorized, format!("login failed: {e}"));
                            self.front.refused(Some(self.identity), &r);
                            backend.io.fail();
                            return refuse(&mut client.io, relay.client_seq(), &r).await;
                        }
                    };
                    if relay.turn() == Turn::Done(AuthOutcome::Denied)
                        && let Some(err) = ErrPacket::parse(&packet.payload)
                    {
                        // A wrong password is the database's refusal; any client can cause it.
                        let r = Refusal::new(
                            Code::NotAuthorized,
                            format!("the database refused the login: {err}"),
                        );
                        self.front.refused(Some(self.identity), &r);
                    }
                    if let Err(e) = client.write(&out).await {
                        self.failed(&e);
                        return fail(client.io, backend.io);
                    }
                }
                Turn::Client => {
                    let step = within(
                        deadline(timeout),
                        "the client's login answer",
                        client.read(),
                    );
                    let out = match step.await.and_then(|p| {
                        relay.from_client(&p).map_err(|source| Failure::Protocol {
                            side: Side::Client,
                            source,
                        })
                    }) {
                        Ok(out) => out,
                        Err(e) => {
                            self.failed(&e);
                            return fail(client.io, backend.io);
                        }
                    };
                    if let Err(e) = backend.write(&out).await {
                        self.failed(&e);
                        return fail(client.io, backend.io);
                    }
                }
            }
        }
        debug!(plugin = %String::from_utf8_lossy(relay.plugin()), "logged in");
        let mut record = self.record.clone();
        record.identity = Some(self.identity.uri());
        let tunnel = record.open(self.front.events);
        self.splice(client, backend, tunnel).await;
    }

    /// Records a failure of the login exchange: the client's as a refusal, the backend's as
    /// a warning (an operator should see a database that fails logins).
    fn failed(&self, e: &Failure) {
        match (e.refusal(), e.side()) {
            (Some(r), _) => self.front.refused(Some(self.identity), &r),
            (None, Some(Side::Backend)) => {
                warn!(reason = %e, "backend connection failed during the login")
            }
            _ => debug!(reason = %e, "client went away during the login"),
        }
    }

    /// The command phase: bytes pass unchanged, or through a [`Watched`] reader when a
    /// `COM_CHANGE_USER` must be checked against the policy (and keep the identity attribute)
    /// or a `KILL` may name a connection id of this front end's.
    async fn splice<C: Conn, B: Conn>(self, client: Leg<C>, backend: Leg<B>, tunnel: Arc<Tunnel>) {
        let Leg {
            io: mut client_io,
            buf: client_ahead,
            ..
        } = client;
        let Leg {
            io: mut backend_io,
            buf: backend_ahead,
            ..
        } = backend;
        if !backend_ahead.is_empty() && client_io.write_all(&backend_ahead).await.is_err() {
            return fail(client_io, backend_io);
        }
        let rules = &self.front.rules;
        let users = rules.allowed_users.for_client(self.identity.name());
        let result = if users == Users::Any && !rules.client_attribute && self.kills.is_none() {
            if !client_ahead.is_empty() && backend_io.write_all(&client_ahead).await.is_err() {
                return fail(client_io, backend_io);
            }
            splice::splice(&mut client_io, &mut backend_io).await
        } else {
            let watch = match self.kills {
                Some(_) => CommandWatch::default().watching_kills(),
                None => CommandWatch::default(),
            };
            let judge = |command: &Command, packet: &[u8]| self.judge(command, packet);
            let mut watched = Watched::new(&mut client_io, watch, client_ahead, judge);
            let result = splice::splice(&mut watched, &mut backend_io).await;
            if let Some(r) = watched.refused.take() {
                // A command was refused: its answer (sequence id 1) is the refusal.
                self.front.refused(Some(self.identity), &r);
                backend_io.fail();
                return refuse(&mut client_io, 1, &r).await;
            }
            result
        };
        let (up, down, failure) = match result {
            Ok(t) => (t.a_to_b, t.b_to_a, None),
            Err(e) => {
                fail(&mut client_io, &mut backend_io);
                (
                    e.transferred.a_to_b,
                    e.transferred.b_to_a,
                    Some(e.to_string()),
                )
            }
        };
        tunnel.closed(self.front.events, up, down, failure);
    }

    fn judge(&self, command: &Command, packet: &[u8]) -> Judgement {
        judge_command(
            self.front,
            self.identity,
            self.capabilities,
            self.kills,
            command,
            packet,
        )
    }
}

/// The policy for commands after the login:
///
/// * a `COM_CHANGE_USER` must name a user the client may log in as, and with
///   `client_attribute` it gets the client's identity as its attribute too (the new session's
///   attributes are the ones in that command);
/// * with `kills`, a `KILL` of a connection id this front end handed out names the real id
///   instead, when the connection is the same client's on the same database server; any other
///   id in that range gets the database's own "Unknown thread id".
pub(super) fn judge_command(
    front: &Front<'_>,
    identity: &Identity,
    capabilities: u32,
    kills: Option<Kills<'_>>,
    command: &Command,
    packet: &[u8],
) -> Judgement {
    match command {
        Command::ChangeUser { username } => {
            front.rules.check_user(identity, username)?;
            if !front.rules.client_attribute {
                return Ok(None);
            }
            let payload = packet.get(4..).unwrap_or_default();
            let mut change = ChangeUser::parse(payload, capabilities).map_err(|e| {
                Refusal::new(Code::BadRequest, format!("unreadable COM_CHANGE_USER: {e}"))
            })?;
            change.set_attribute(CLIENT_ATTRIBUTE, identity.uri(), capabilities);
            let mut out = BytesMut::new();
            mysql::encode(0, &change.encode(capabilities), &mut out);
            Ok(Some(out))
        }
        Command::Kill(kill) => {
            let Some(kills) = kills.filter(|_| ConnIds::in_range(kill.id)) else {
                return Ok(None);
            };
            let payload = packet.get(4..).unwrap_or_default();
            let out = match kills.ids.resolve(kill.id, &identity.uri(), kills.node) {
                Some(real) => kill.with_id(payload, real),
                None => unknown_thread(kill.id),
            };
            let mut bytes = BytesMut::new();
            mysql::encode(0, &out, &mut bytes);
            Ok(Some(bytes))
        }
        _ => Ok(None),
    }
}

fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Ends both sides of a connection as failures.
pub(super) fn fail<C: Conn, B: Conn>(mut client: C, mut backend: B) {
    backend.fail();
    client.fail();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Events, Origin};
    use crate::mysql::server::Rules;
    use crate::policy::{Acl, AllowedUsers};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn change_user(user: &[u8]) -> Vec<u8> {
        let mut p = vec![mysql::COM_CHANGE_USER];
        p.extend_from_slice(user);
        p.extend_from_slice(b"\0\x00\0");
        p
    }

    fn judge(command: &Command, packet: &[u8]) -> Judgement {
        match command {
            Command::ChangeUser { username } if &username[..] != b"app" => {
                Err(Refusal::new(Code::NotAuthorized, "not app"))
            }
            Command::Kill(k) => {
                let mut out = BytesMut::new();
                mysql::encode(0, &k.with_id(&packet[4..], 7), &mut out);
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }

    /// Sends `wire` through a [`Watched`] reader in writes of `chunk` bytes, read with a
    /// buffer of `read` bytes; returns what came out and the refusal that stopped it, if any.
    async fn watch(wire: Vec<u8>, chunk: usize, read: usize) -> (Vec<u8>, Option<Refusal>) {
        let (mut client, relay_side) = duplex(1024);
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(chunk) {
                if client.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = client.shutdown().await;
        });
        let mut watched = Watched::new(
            relay_side,
            CommandWatch::default().watching_kills(),
            BytesMut::new(),
            judge,
        );
        let mut out = Vec::new();
        let mut buf = vec![0u8; read];
        loop {
            match watched.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
                    break;
                }
            }
        }
        let refused = watched.refused.take();
        drop(watched);
        let _ = writer.await;
        (out, refused)
    }

    #[tokio::test]
    async fn allowed_commands_pass_unchanged_and_kills_are_rewritten_in_place() {
        let mut wire = BytesMut::new();
        mysql::encode(0, b"\x03SELECT 1", &mut wire);
        mysql::encode(0, &change_user(b"app"), &mut wire);
        let before_kill = wire.len();
        mysql::encode(0, &[mysql::COM_PROCESS_KILL, 9, 0, 0, 0x80], &mut wire);
        let after_kill = wire.len();
        mysql::encode(0, b"\x03SELECT 2", &mut wire);
        mysql::encode(0, &[mysql::COM_QUIT], &mut wire);
        let mut want = wire[..before_kill].to_vec();
        let mut kill = BytesMut::new();
        mysql::encode(0, &[mysql::COM_PROCESS_KILL, 7, 0, 0, 0], &mut kill);
        want.extend_from_slice(&kill);
        want.extend_from_slice(&wire[after_kill..]);
        for (chunk, read) in [(7, 100), (1, 3), (1024, 1024), (5, 7)] {
            let (out, refused) = watch(wire.to_vec(), chunk, read).await;
            assert_eq!(out, want, "chunks of {chunk}, reads of {read}");
            assert!(refused.is_none());
        }
    }

    #[tokio::test]
    async fn a_refused_change_of_user_never_comes_out() {
        let mut wire = BytesMut::new();
        mysql::encode(0, b"\x03SELECT 1", &mut wire);
        let before = wire.len();
        mysql::encode(0, &change_user(b"root"), &mut wire);
        mysql::encode(0, b"\x03SELECT 2", &mut wire);
        for (chunk, read) in [(7, 100), (1, 3), (1024, 1024)] {
            let (out, refused) = watch(wire.to_vec(), chunk, read).await;
            assert_eq!(out, wire[..before].to_vec(), "only what came before it");
            assert_eq!(refused.map(|r| r.message).as_deref(), Some("not app"));
        }
    }

    proptest::proptest! {
        #[test]
        fn whatever_the_chunking_only_kills_change(
            chunk in 1usize..40,
            read in 1usize..40,
            order in proptest::collection::vec(0usize..4, 0..8),
        ) {
            let mut wire = BytesMut::new();
            let mut want = BytesMut::new();
            for i in order {
                let (sent, got): (&[u8], &[u8]) = match i {
                    0 => (b"\x03SELECT 1", b"\x03SELECT 1"),
                    1 => (b"\x03 KILL QUERY 3000000001;", b"\x03 KILL QUERY 7;"),
                    2 => (&[mysql::COM_PROCESS_KILL, 1, 0, 0, 0x80], &[mysql::COM_PROCESS_KILL, 7, 0, 0, 0]),
                    _ => (b"\x03KILLER", b"\x03KILLER"),
                };
                mysql::encode(0, sent, &mut wire);
                mysql::encode(0, got, &mut want);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (out, refused) = rt.block_on(watch(wire.to_vec(), chunk, read));
            proptest::prop_assert_eq!(out, want.to_vec());
            proptest::prop_assert!(refused.is_none());
        }
    }

    fn front<'a>(
        events: &'a Events,
        acl: &'a Acl,
        users: &'a AllowedUsers,
        client_attribute: bool,
    ) -> Front<'a> {
        Front {
            rules: Rules {
                service: "orders",
                clients: acl,
                allowed_users: users,
                bindings: const { &crate::policy::Bindings(std::collections::BTreeMap::new()) },
                client_attribute,
                handshake_timeout: Duration::from_secs(1),
            },
            events,
            origin: Origin::MysqlListener,
            peer: None,
        }
    }

    #[test]
    fn a_change_of_user_is_judged_and_keeps_the_identity_attribute() {
        let caps = mysql::CLIENT_PROTOCOL_41
            | mysql::CLIENT_SECURE_CONNECTION
            | mysql::CLIENT_PLUGIN_AUTH
            | mysql::CLIENT_CONNECT_ATTRS;
        let alice = Identity::Client("alice".into());
        let events = Events::new();
        let (acl, users) = (
            Acl::Any,
            AllowedUsers::Policy {
                clients: Default::default(),
                others: Some(Users::Only(["app".to_owned()].into())),
            },
        );
        let forged = ChangeUser {
            username: "app".into(),
            auth_response: vec![7; 20].into(),
            database: "shop".into(),
            charset: Some(45),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: Some(vec![(
                "postern_client".into(),
                "postern://client/mallory".into(),
            )]),
            rest: Default::default(),
        };
        let mut packet = BytesMut::new();
        mysql::encode(0, &forged.encode(caps), &mut packet);
        let command = Command::ChangeUser {
            username: "app".into(),
        };
        // Without the attribute the packet passes as it is.
        let plain = front(&events, &acl, &users, false);
        assert!(matches!(
            judge_command(&plain, &alice, caps, None, &command, &packet),
            Ok(None)
        ));
        let tagged = front(&events, &acl, &users, true);
        let Ok(Some(out)) = judge_command(&tagged, &alice, caps, None, &command, &packet) else {
            panic!("rewritten");
        };
        assert_eq!(out[3], 0, "still a command");
        let again = ChangeUser::parse(&out[4..], caps).unwrap();
        assert_eq!(
            again.attributes.unwrap(),
            vec![("postern_client".into(), "postern://client/alice".into())]
        );
        assert_eq!(again.username, forged.username);
        assert_eq!(again.auth_response, forged.auth_response);
        // A user outside the policy is refused, whatever else the packet says.
        let root = Command::ChangeUser {
            username: "root".into(),
        };
        let refused = judge_command(&tagged, &alice, caps, None, &root, &packet).unwrap_err();
        assert!(
            refused.message.contains("as MySQL user \"root\""),
            "{}",
            refused.message
        );
    }

    #[test]
    fn kills_reach_only_the_same_clients_connections_on_the_same_server() {
        let events = Events::new();
        let (acl, users) = (Acl::Any, AllowedUsers::Any);
        let f = front(&events, &acl, &users, false);
        let ids = ConnIds::new();
        let target = ids.issue();
        target.bind("postern://client/alice", "db1", 17);
        let kills = Some(Kills {
            ids: &ids,
            node: "db1",
        });
        let kill_of = |id: u64| {
            let mut p = BytesMut::new();
            mysql::encode(0, format!("\x03KILL QUERY {id}").as_bytes(), &mut p);
            let command = Command::parse(&mysql::Packet {
                seq: 0,
                payload: p.clone().split_off(4).freeze(),
            })
            .unwrap()
            .unwrap();
            (command, p)
        };
        let run = |who: &str, id: u64, kills| {
            let (command, packet) = kill_of(id);
            let identity = Identity::Client(who.into());
            judge_command(&f, &identity, 0, kills, &command, &packet).unwrap()
        };
        let fake = u64::from(target.id());
        let out = run("alice", fake, kills).expect("rewritten");
        assert_eq!(&out[4..], b"\x03KILL QUERY 17");
        // Another client, another server, or an id nobody was given: the database's own error.
        for (who, id, node) in [
            ("mallory", fake, "db1"),
            ("alice", fake, "db2"),
            ("alice", fake + 1, "db1"),
        ] {
            let kills = Some(Kills { ids: &ids, node });
            let out = run(who, id, kills).expect("replaced");
            let text = String::from_utf8_lossy(&out[5..]).into_owned();
            assert!(text.contains(&format!("Unknown thread id: {id}")), "{text}");
        }
        // Real ids, and connections greeted with the database's own id, pass unchanged.
        assert!(run("alice", 17, kills).is_none());
        assert!(run("alice", fake, None).is_none());
    }
}
