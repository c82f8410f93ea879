//! The `mysql` check: the agent logs in as a monitor user, as MaxScale and ProxySQL do, and
//! reads the node's Galera state, so that no health process is needed on the nodes.
//!
//! One connection per node is kept open between checks (a login per check would cost the
//! node more than the check); a check that fails or times out drops it, and the next one
//! reconnects. A Galera node is healthy when it is in the Primary component, ready, Synced
//! (or a Donor that still serves), not desynced or rejecting queries, and not read-only; a
//! node without wsrep (plain MariaDB or MySQL) is healthy when it answers and is writable.

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};

use super::{Probe, first_line};
use crate::config::Secret;

/// The status variables the check reads.
const STATUS: &str = "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state', \
     'wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_local_index', 'wsrep_ready')";
/// The server variables the check reads.
const VARIABLES: &str = "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'wsrep_on', \
     'wsrep_desync', 'wsrep_reject_queries')";

/// `wsrep_local_state` of a Donor/Desynced node.
const DONOR: &str = "2";
/// `wsrep_local_state` of a Synced node.
const SYNCED: &str = "4";

/// The login options for the monitor user at `address` (`host:port`).
pub(crate) fn opts(address: &str, user: &str, password: &Secret) -> Opts {
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().unwrap_or(3306)),
        None => (address, 3306),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password.expose()))
        .prefer_socket(false)
        .stmt_cache_size(0)
        .into()
}

/// A node's monitor connection.
pub(crate) struct Monitor {
    opts: Opts,
    conn: Option<Conn>,
}

impl Monitor {
    /// A monitor for the node at `address`; nothing is connected until the first check.
    pub(crate) fn new(address: &str, user: &str, password: &Secret) -> Self {
        Self {
            opts: opts(address, user, password),
            conn: None,
        }
    }

    /// Forgets the connection (after a timeout left it in an unknown state).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }

    /// Logs out of the node, if logged in.
    pub(crate) async fn close(mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.disconnect().await;
        }
    }

    /// Reads the node's state; the caller bounds the time. A connection that fails is
    /// dropped (and so is one this future is cancelled with).
    pub(crate) async fn probe(&mut self) -> Probe {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => match Conn::new(self.opts.clone()).await {
                Ok(c) => c,
                Err(e) => return Probe::failed(first_line(&format!("cannot log in: {e}"))),
            },
        };
        let read = async {
            let status = conn.query::<(String, Option<String>), _>(STATUS).await?;
            let vars = conn.query::<(String, Option<String>), _>(VARIABLES).await?;
            Ok::<_, mysql_async::Error>((status, vars))
        };
        match read.await {
            Ok((status, vars)) => {
                self.conn = Some(conn);
                judge(&to_map(status), &to_map(vars))
            }
            Err(e) => Probe::failed(first_line(&e.to_string())),
        }
    }
}

fn to_map(rows: Vec<(String, Option<String>)>) -> BTreeMap<String, String> {
    rows.into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.unwrap_or_default()))
        .collect()
}

fn on(value: Option<&String>) -> bool {
    value.is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1")
}

/// What a node's status and variables say about it.
pub(crate) fn judge(status: &BTreeMap<String, String>, vars: &BTreeMap<String, String>) -> Probe {
    if on(vars.get("read_only")) {
        return Probe::down("read_only=ON");
    }
    let galera = on(vars.get("wsrep_on")) && status.contains_key("wsrep_local_state");
    if !galera {
        return Probe::up("answered (no wsrep)", None);
    }
    let cluster = status
        .get("wsrep_cluster_status")
        .map_or("", String::as_str);
    if cluster != "Primary" {
        return Probe::down(format!("wsrep_cluster_status {}", first_line(cluster)));
    }
    if status.get("wsrep_ready").is_some_and(|v| !on(Some(v))) {
        return Probe::down("wsrep_ready=OFF");
    }
    if on(vars.get("wsrep_desync")) {
        return Probe::down("wsrep_desync=ON");
    }
    if let Some(reject) = vars.get("wsrep_reject_queries")
        && !reject.eq_ignore_ascii_case("NONE")
        && !reject.is_empty()
    {
        return Probe::down(format!("wsrep_reject_queries={}", first_line(reject)));
    }
    let state = status.get("wsrep_local_state").map_or("", String::as_str);
    if state != SYNCED && state != DONOR {
        let comment = status
            .get("wsrep_local_state_comment")
            .map(|c| format!(" ({})", first_line(c)))
            .unwrap_or_default();
        return Probe::down(format!("wsrep_local_state {}{comment}", first_line(state)));
    }
    let index = status
        .get("wsrep_local_index")
        .and_then(|i| i.parse::<u32>().ok());
    let comment = status
        .get("wsrep_local_state_comment")
        .map_or_else(|| "Synced".to_owned(), |c| first_line(c));
    Probe::up(comment, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Outcome;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn synced() -> BTreeMap<String, String> {
        map(&[
            ("wsrep_local_state", "4"),
            ("wsrep_local_state_comment", "Synced"),
            ("wsrep_cluster_status", "Primary"),
            ("wsrep_local_index", "1"),
            ("wsrep_ready", "ON"),
        ])
    }

    fn galera_vars() -> BTreeMap<String, String> {
        map(&[
            ("read_only", "OFF"),
            ("wsrep_on", "ON"),
            ("wsrep_desync", "OFF"),
            ("wsrep_reject_queries", "NONE"),
        ])
    }

    #[test]
    fn a_synced_primary_node_is_up_with_its_index() {
        assert_eq!(
            judge(&synced(), &galera_vars()),
            Probe::up("Synced", Some(1))
        );
    }

    #[test]
    fn each_unfit_state_is_an_explicit_down() {
        let cases: Vec<(&str, &str, &str, &str)> = vec![
            ("var", "read_only", "ON", "read_only=ON"),
            ("var", "wsrep_desync", "ON", "wsrep_desync=ON"),
            (
                "var",
                "wsrep_reject_queries",
                "ALL",
                "wsrep_reject_queries=ALL",
            ),
            (
                "status",
                "wsrep_cluster_status",
                "non-Primary",
                "wsrep_cluster_status non-Primary",
            ),
            ("status", "wsrep_ready", "OFF", "wsrep_ready=OFF"),
            (
                "status",
                "wsrep_local_state",
                "1",
                "wsrep_local_state 1 (Synced)",
            ),
        ];
        for (which, key, value, want) in cases {
            let (mut status, mut vars) = (synced(), galera_vars());
            let m = if which == "var" {
                &mut vars
            } else {
                &mut status
            };
            m.insert(key.to_owned(), value.to_owned());
            let p = judge(&status, &vars);
            assert_eq!(p.outcome, Outcome::Down, "{key}");
            assert_eq!(p.detail, want);
        }
        let mut status = synced();
        status.insert("wsrep_local_state".into(), "2".into());
        assert_eq!(
            judge(&status, &galera_vars()).outcome,
            Outcome::Up,
            "a donor serves"
        );
    }

    #[test]
    fn a_node_without_wsrep_is_up_when_writable() {
        // MariaDB without a provider still shows some wsrep status; wsrep_on=OFF says to
        // ignore it.
        let status = map(&[
            ("wsrep_cluster_status", "Disconnected"),
            ("wsrep_local_state", "0"),
        ]);
        let vars = map(&[("read_only", "OFF"), ("wsrep_on", "OFF")]);
        assert_eq!(judge(&status, &vars).outcome, Outcome::Up);
        assert_eq!(
            judge(&map(&[]), &map(&[("read_only", "OFF")])).outcome,
            Outcome::Up
        );
        assert_eq!(
            judge(&map(&[]), &map(&[("read_only", "ON")])).outcome,
            Outcome::Down
        );
    }
}
