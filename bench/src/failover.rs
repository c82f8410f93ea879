//! Failover time: how long after the active database node turns bad the first query runs on
//! another node, through the tunnel, at the agent's default health-check settings.
//!
//! The stack is its own: two private `mariadbd` nodes, each with a galera-agent compatible health
//! endpoint this program controls ([`HealthServer`]), and the release relay, agent (`nodes:`
//! with an `http` check and nothing else set, so every default applies) and `connect` over
//! QUIC. A trial waits a random fraction of the check interval (so trials do not line up with
//! the check schedule), notes the time, turns the active node's endpoint bad, and runs probe
//! loops that each open a new connection through `connect`, ask `SELECT @@port` and close, with
//! no pause. The failover time is from the switch to the first answer from the other node. Then
//! the bad node is made healthy again and left to recover, and the next trial fails the node
//! that is now active, so traffic goes back and forth without waiting for a failback (the
//! agent's choice is sticky).
//!
//! Two kinds of bad are measured: an explicit unhealthy answer (HTTP 503), which the agent acts
//! on at its next check, and a hung endpoint (accepts and never answers), which needs `fall`
//! timeouts in a row.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mysql_async::prelude::Queryable;
use postern_common::pki::Kind;
use postern_tests::TestPki;
use postern_tests::config::{Check, CheckKind, ServiceNode};
use postern_tests::health::{HealthMode, HealthServer};
use rand::Rng as _;
use tokio::time::Instant;

use crate::report;
use crate::stack::{self, Transport, Tunnel};

/// The agent's default check interval (a trial starts at a random point within it).
const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// Concurrent probe loops: each connection setup takes a few milliseconds, so several loops
/// started at once see the change sooner than one would.
const PROBES: usize = 3;
/// A trial that takes longer than this has failed.
const TRIAL_LIMIT: Duration = Duration::from_secs(20);

/// What makes the active node bad.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Unhealthy,
    Hang,
}

impl Fault {
    fn mode(self) -> HealthMode {
        match self {
            Self::Unhealthy => HealthMode::Status(503),
            Self::Hang => HealthMode::Hang,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Unhealthy => "health endpoint answers 503",
            Self::Hang => "health endpoint hangs",
        }
    }

    /// The project's target for this fault, and the anchors' figures for comparison.
    fn target(self) -> (&'static str, Duration) {
        match self {
            Self::Unhealthy => ("Switchboard ≈ 1 s", Duration::from_secs(1)),
            Self::Hang => (
                "MaxScale ≈ 5 s, Switchboard 6 s, HAProxy 6–8 s, ProxySQL 10–15 s",
                Duration::from_secs(3),
            ),
        }
    }
}

/// Two nodes with their health endpoints, and a tunnel whose agent fails over between them.
struct FailoverStack {
    tunnel: Tunnel,
    health: [HealthServer; 2],
    ports: [u16; 2],
    _nodes: [postern_tests::MariaDb; 2],
    _pki: TestPki,
}

/// Runs `trials` trials of each fault and returns the report's markdown section.
pub(crate) async fn measure(
    bin_dir: &std::path::Path,
    env: &[(&str, String)],
    trials: usize,
) -> Result<String> {
    eprintln!("failover: starting two mariadbd nodes, their health endpoints and a tunnel");
    let stack = start(bin_dir, env).await?;
    let opts = crate::workload::opts(stack.tunnel.addr, None);
    let mut active = wait_for_a_node(&opts, &stack.ports).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Failover time (active node made bad → first query on the other node)\n"
    );
    let _ = writeln!(
        out,
        "Two `mariadbd` nodes behind one agent (`nodes:` with `check: {{type: http}}` and the \
         default interval 500 ms, timeout 750 ms, rise 2, fall 2), reached through `connect` \
         over QUIC; {trials} trial(s) per fault, {PROBES} probe loops opening a connection and \
         asking `SELECT @@port` back to back.\n"
    );
    let _ = writeln!(
        out,
        "| fault | median (ms) | p90 (ms) | max (ms) | target | anchors | failed probes |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for fault in [Fault::Unhealthy, Fault::Hang] {
        let mut times = Vec::with_capacity(trials);
        let mut failed = 0;
        for trial in 0..trials {
            let (took, errors, now_active) = trial_once(&stack, &opts, active, fault)
                .await
                .with_context(|| format!("failover trial {} ({})", trial + 1, fault.label()))?;
            eprintln!(
                "  {}: node {} → {} in {:.0} ms ({errors} failed probe(s))",
                fault.label(),
                active + 1,
                now_active + 1,
                took.as_secs_f64() * 1e3
            );
            times.push(took);
            failed += errors;
            recover(&stack, active).await?;
            active = now_active;
        }
        times.sort_unstable();
        let (anchors, target) = fault.target();
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
        let max = times.last().copied().unwrap_or_default();
        let verdict = if max <= target { "pass" } else { "NOT MET" };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | ≤ {} ms: {verdict} | {anchors} | {failed} |",
            fault.label(),
            ms(report::percentile(&times, 50.0)),
            ms(report::percentile(&times, 90.0)),
            ms(max),
            target.as_millis(),
        );
    }
    let _ = writeln!(
        out,
        "\nA failed probe is a connection that was open on the old node when traffic moved \
         (severed, as every connection to a node that leaves service is) or one opened in the \
         instant of the switch; each probe opens its next connection at once.\n"
    );
    for problem in stack.tunnel_shutdown() {
        eprintln!("warning: {problem}");
    }
    Ok(out)
}

impl FailoverStack {
    fn tunnel_shutdown(mut self) -> Vec<String> {
        self.tunnel.shutdown()
    }
}

async fn start(bin_dir: &std::path::Path, env: &[(&str, String)]) -> Result<FailoverStack> {
    let pki = TestPki::new();
    pki.issue(Kind::Agent, stack::NAME);
    pki.issue(Kind::Client, stack::NAME);
    let n1 = stack::start_mariadb(&pki).await?;
    let n2 = stack::start_mariadb(&pki).await?;
    let health = [HealthServer::start(0).await, HealthServer::start(1).await];
    let nodes: Vec<ServiceNode> = [&n1, &n2]
        .iter()
        .zip(&health)
        .enumerate()
        .map(|(i, (db, h))| ServiceNode {
            name: format!("n{}", i + 1),
            address: db.backend(),
            health_url: Some(h.url()),
        })
        .collect();
    let state_dir = pki.dir().join("failover-state");
    let tunnel = stack::start_tunnel_with(bin_dir, &pki, Transport::Quic, env, &|agent| {
        agent.state_dir = Some(state_dir.clone());
        agent.nodes_service(
            stack::SERVICE,
            nodes.clone(),
            Check {
                kind: Some(CheckKind::Http),
                ..Check::default()
            },
        );
    })
    .await?;
    let ports = [port_of(&n1.backend())?, port_of(&n2.backend())?];
    Ok(FailoverStack {
        tunnel,
        health,
        ports,
        _nodes: [n1, n2],
        _pki: pki,
    })
}

fn port_of(addr: &str) -> Result<u16> {
    let a: SocketAddr = addr
        .parse()
        .with_context(|| format!("node address {addr}"))?;
    Ok(a.port())
}

/// Which node (0 or 1) a new connection reaches.
async fn which(opts: &mysql_async::Opts, ports: &[u16; 2]) -> Result<usize> {
    let mut conn = mysql_async::Conn::new(opts.clone()).await?;
    let port: Option<u16> = conn.query_first("SELECT @@port").await?;
    let _ = conn.disconnect().await;
    ports
        .iter()
        .position(|p| Some(*p) == port)
        .with_context(|| format!("a connection reached port {port:?}, not a node"))
}

/// Waits until a connection goes through, and says which node it reached.
async fn wait_for_a_node(opts: &mysql_async::Opts, ports: &[u16; 2]) -> Result<usize> {
    let deadline = Instant::now() + TRIAL_LIMIT;
    loop {
        match which(opts, ports).await {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("no query went through the tunnel");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One trial: makes node `active` bad and times the first query on the other one. Returns the
/// time, the probes that failed, and the node now active.
async fn trial_once(
    stack: &FailoverStack,
    opts: &mysql_async::Opts,
    active: usize,
    fault: Fault,
) -> Result<(Duration, usize, usize)> {
    let other = 1 - active;
    let offset = rand::rng().random_range(0..DEFAULT_INTERVAL.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let t0 = Instant::now();
    stack.health[active].set(fault.mode());
    let mut probes = tokio::task::JoinSet::new();
    for i in 0..PROBES {
        let (opts, ports) = (opts.clone(), stack.ports);
        let stagger = Duration::from_millis(i as u64);
        probes.spawn(async move {
            tokio::time::sleep(stagger).await;
            let mut failed = 0;
            loop {
                match which(&opts, &ports).await {
                    Ok(n) if n == other => return Ok::<_, anyhow::Error>((t0.elapsed(), failed)),
                    Ok(_) => {}
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if t0.elapsed() > TRIAL_LIMIT {
                    bail!("no query reached the other node within {TRIAL_LIMIT:?}");
                }
            }
        });
    }
    let first = probes
        .join_next()
        .await
        .context("no probe ran")?
        .context("a probe panicked")?;
    probes.abort_all();
    let (took, failed) = first?;
    Ok((took, failed, other))
}

/// Makes node `n` healthy again and waits until the agent has seen it answer well enough times
/// to count it healthy (`rise` = 2, plus one).
async fn recover(stack: &FailoverStack, n: usize) -> Result<()> {
    let h = &stack.health[n];
    h.set(HealthMode::Healthy);
    let since = h.requests();
    let deadline = Instant::now() + TRIAL_LIMIT;
    while h.requests() < since + 3 {
        if Instant::now() >= deadline {
            bail!("the agent did not check node {} again", n + 1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
