//! One case's world: a relay and an agent as real processes, a private MariaDB, nginx in front
//! of the relay for WebSocket, `connect`, and what the suite reads of them: recovery probes and
//! the processes' holdings.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::config::AgentTransport;
use postern_tests::galera::{APP_PASSWORD, APP_USER};
use postern_tests::notify::Notifications;
use postern_tests::procs::{self, holdings};
use postern_tests::stack::AgentNode;
use postern_tests::*;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::load;

/// Which part a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Relay,
    Agent,
    Database,
    Router,
}

impl Part {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Agent => "agent",
            Self::Database => "database",
            Self::Router => "nginx",
        }
    }
}

/// What one of our processes holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    pub(crate) fds: usize,
    pub(crate) rss_kib: u64,
    pub(crate) tasks: u64,
}

/// The holdings the suite compares before and after a case.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Readings {
    /// `None` for a process the case restarted.
    pub(crate) relay: Option<Reading>,
    pub(crate) agent: Option<Reading>,
    /// Client connections the database holds (the reading's own excluded).
    pub(crate) backend: u64,
}

pub(crate) struct World {
    pub(crate) s: Stack,
    notify: Notifications,
    /// The agent's last status line.
    status: std::sync::Mutex<Option<String>>,
    /// `connect` to the service (in-process, as a laptop's would be).
    pub(crate) connect: Option<ConnectRun>,
    pub(crate) listener: mysql_async::Opts,
    pub(crate) via_connect: mysql_async::Opts,
    /// The transfer's SHA-256.
    pub(crate) digest: String,
    /// The UDP path between agent and relay, when the case cuts it.
    pub(crate) udp_open: Option<Arc<AtomicBool>>,
    _dir: TempDir,
}

/// What the agent serves, and how it reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setup {
    /// One MariaDB, the case's transport.
    Single,
    /// One MariaDB; the agent races QUIC through a UDP path the case can cut against
    /// WebSocket through nginx (`transport: auto`).
    UdpGate,
    /// A three-node Galera cluster behind the agent's `mysql` health check.
    Galera,
}

impl World {
    /// Starts everything for `transport` and `setup`.
    pub(crate) async fn start(transport: Transport, setup: Setup) -> Self {
        let udp_gate = setup == Setup::UdpGate;
        let dir = tempfile::tempdir().expect("tempdir");
        let notify = Notifications::bind(&dir.path().join("agent-notify.sock"));
        let b = Stack::builder()
            .relay_process()
            .api()
            .transport(if udp_gate {
                Transport::Websocket
            } else {
                transport
            })
            .relay(|r| r.pin_ports())
            .no_agent();
        let b = if setup == Setup::Galera {
            b.galera()
        } else {
            b.mariadb()
        };
        let mut s = b.start().await;
        if let Some(g) = &s.galera {
            let first = &g.names()[0];
            g.ok(first, load::SETUP);
            g.ok(first, &format!("GRANT SELECT ON f.* TO '{APP_USER}'@'%'"));
        } else {
            s.db().sql(load::SETUP);
        }
        let mut config = s.agent_config();
        let udp_open = if udp_gate {
            let open = Arc::new(AtomicBool::new(true));
            let gate = udp::gate(s.relay().quic(), open.clone()).await;
            config.relay = Some(RelaySpec::Both {
                quic: format!("quic://{gate}"),
                websocket: s.ws_url(),
            });
            config.transport = Some(AgentTransport::Auto);
            Some(open)
        } else {
            None
        };
        let agent = s.start_agent_process(&config, &[("NOTIFY_SOCKET", &notify.path_str())]);
        s.agent = Some(AgentNode::Process(agent));
        s.relay().wait_agent("db1").await;
        let connect = s.connect("alice").await;
        let (via_connect, listener, direct) = match &s.galera {
            Some(g) => {
                let first = &g.names()[0];
                (
                    format!(
                        "mysql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/app?prefer_socket=false",
                        connect.addr.port()
                    ),
                    s.app_opts(0, "alice"),
                    format!("mysql://{APP_USER}:{APP_PASSWORD}@{}/app", g.addr(first)),
                )
            }
            None => (connect.url(), s.mysql_opts("alice"), s.db().url()),
        };
        let via_connect = mysql_async::Opts::from_url(&via_connect).expect("connect url");
        let listener = listener.into();
        let digest = load::expected_digest(&direct).await;
        let w = Self {
            s,
            notify,
            status: std::sync::Mutex::new(None),
            connect: Some(connect),
            listener,
            via_connect,
            digest,
            udp_open,
            _dir: dir,
        };
        if w.udp_open.is_some() {
            assert_eq!(w.agent_transport().await.as_deref(), Some("quic"));
        }
        w
    }

    /// The agent's transport as the relay's `/v0/agents` shows it.
    pub(crate) async fn agent_transport(&self) -> Option<String> {
        let agents: serde_json::Value = self.s.api(0).get("/v0/agents").await.expect(200).json();
        agents
            .as_array()?
            .iter()
            .find(|a| a["name"] == "db1")
            .and_then(|a| a["transport"].as_str().map(str::to_owned))
    }

    fn pid(&self, part: Part) -> u32 {
        match part {
            Part::Relay => self.s.relay().proc().proc.id(),
            Part::Agent => self.s.agent_proc().proc.id(),
            Part::Database => self.s.db().pid(),
            Part::Router => self.s.nginx.as_ref().expect("nginx").pid(),
        }
    }

    /// Kills `part` at once (SIGKILL).
    pub(crate) fn kill(&mut self, part: Part) {
        match part {
            Part::Relay => self.s.relay_mut().proc_mut().proc.kill(),
            Part::Agent => self.s.agent_proc_mut().kill(),
            Part::Database => self.s.db.as_mut().expect("db").kill(),
            Part::Router => self.s.nginx_mut().kill(),
        }
    }

    /// Starts `part` again (same ports, same data) and waits until it serves.
    pub(crate) async fn start_again(&mut self, part: Part) {
        match part {
            Part::Relay => {
                let config = self.s.relay_config.clone();
                self.s.relay_mut().proc_mut().restart(&config).await;
            }
            Part::Agent => self.s.agent_proc_mut().restart(),
            Part::Database => self.s.db.as_mut().expect("db").relaunch().await,
            Part::Router => self.s.nginx_mut().restart().await,
        }
    }

    /// Sends `part` signal `name` (`STOP`, `CONT`).
    pub(crate) fn signal(&self, part: Part, name: &str) {
        procs::signal(self.pid(part), name);
    }

    /// Stops the database cleanly (SIGTERM) and waits for it to exit.
    pub(crate) fn shut_database_down(&mut self) {
        self.s.db.as_mut().expect("db").shutdown();
    }

    /// Waits until a new connection answers `SELECT 1` on both paths; when it did, or `None`
    /// if not within `within`.
    pub(crate) async fn serving(&self, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        let mut last = Instant::now();
        for opts in [&self.listener, &self.via_connect] {
            loop {
                if probe(opts).await {
                    last = last.max(Instant::now());
                    break;
                }
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(last)
    }

    /// The holdings now; `restarted` lists the parts the case restarted (not compared).
    pub(crate) async fn readings(&self, restarted: &[Part]) -> Readings {
        let relay = if restarted.contains(&Part::Relay) {
            None
        } else {
            self.relay_reading().await
        };
        let agent = if restarted.contains(&Part::Agent) {
            None
        } else {
            self.agent_reading().await
        };
        Readings {
            relay,
            agent,
            backend: self.backend_connections(),
        }
    }

    async fn relay_reading(&self) -> Option<Reading> {
        let held = holdings(self.pid(Part::Relay))?;
        let metrics = self.s.api(0).metrics().await;
        let tasks = metrics.sum("postern_runtime_tasks", &[]);
        Some(Reading {
            fds: held.fds,
            rss_kib: held.rss_kib,
            tasks: tasks as u64,
        })
    }

    async fn agent_reading(&self) -> Option<Reading> {
        let held = holdings(self.pid(Part::Agent))?;
        // The agent reads its counts every 2 s and sends them when they changed: what came
        // last, after waiting a little longer than that for news, is what it holds now.
        let mut fresh = self.notify.latest_status(Duration::ZERO).await;
        if let Some(s) = self
            .notify
            .latest_status(Duration::from_millis(2_500))
            .await
        {
            fresh = Some(s);
        }
        let status = {
            let mut last = self.status.lock().expect("status lock");
            if fresh.is_some() {
                *last = fresh;
            }
            last.clone()?
        };
        let tasks = status
            .rsplit_once("; ")?
            .1
            .split(", ")
            .find_map(|p| p.strip_suffix(" tasks"))?
            .parse()
            .ok()?;
        Some(Reading {
            fds: held.fds,
            rss_kib: held.rss_kib,
            tasks,
        })
    }

    /// Client connections the clients' users hold at the database (every running node of a
    /// cluster); not the health checks', nor the one that asks.
    pub(crate) fn backend_connections(&self) -> u64 {
        const COUNT: &str = "SELECT COUNT(*) FROM information_schema.processlist \
             WHERE user IN ('root', 'app') AND id <> CONNECTION_ID()";
        let parse = |out: &str| -> u64 { out.trim().parse().expect("a count") };
        match &self.s.galera {
            Some(g) => g
                .names()
                .iter()
                .filter_map(|n| g.sql(n, COUNT).ok())
                .map(|out| parse(&out))
                .sum(),
            None => parse(&self.s.db().sql(COUNT)),
        }
    }

    /// The node new connections go to, as the relay's `/v0/backends` says.
    pub(crate) async fn active_node(&self) -> String {
        self.s.api(0).active(None).await.1.expect("an active node")
    }

    /// Kills Galera node `name` (SIGKILL).
    pub(crate) fn kill_node(&mut self, name: &str) {
        self.s.galera_mut().kill_node(name);
    }

    /// Starts Galera node `name` again and waits until it has rejoined (Synced).
    pub(crate) async fn start_node(&mut self, name: &str) {
        self.s.galera_mut().start_node(name).await;
    }

    /// Stops everything; fails on a panic in any process's log.
    pub(crate) async fn stop(mut self) {
        if let Some(c) = self.connect.take() {
            c.stop().await;
        }
        self.s.stop().await;
    }
}

/// Whether a new connection with `opts` answers `SELECT 1` within two seconds.
async fn probe(opts: &mysql_async::Opts) -> bool {
    let attempt = async {
        let mut c = mysql_async::Conn::new(opts.clone()).await.ok()?;
        let one: Option<i64> = c.query_first("SELECT 1").await.ok()?;
        c.disconnect().await.ok()?;
        one
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(1))
    )
}
