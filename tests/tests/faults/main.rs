//! The fault suite: each part of a running tunnel killed, frozen or cut off in the middle of
//! transfers and handshakes, with real processes throughout (`postern-relay`, `postern-agent
//! run`, `mariadbd`, nginx; `connect` in-process, as a laptop's).
//!
//! Every case starts a fresh world ([`world`]) and clients that keep transferring a known 2 MiB
//! result and keep opening connections, through the relay's MySQL listener and through
//! `connect` ([`load`]). Then:
//!
//! 1. warm-up under the load, then the holdings of the relay and the agent (open file
//!    descriptors, tasks of the async runtime, resident memory) and the database's client
//!    connections, once idle: the baseline;
//! 2. the load again; the fault, while transfers and handshakes are in flight;
//! 3. the failed part comes back (restarted on the same ports and data, or continued after
//!    SIGSTOP); the time until a new connection is served on both paths is the recovery;
//! 4. the load runs on until both paths completed a transfer started after the recovery, then
//!    stops; every attempt must have ended (none hung), and every completed transfer must have
//!    the SHA-256 of the data (no short, corrupt or reordered result, ever);
//! 5. idle again, the holdings must come back to the baseline: what a process holds once
//!    everything has settled is what it held before (processes the case restarted excepted).
//!
//! The suite writes its table to `target/fault-suite.md`; with `POSTERN_WRITE_README=1` also
//! into README.md between its markers, which is how the README's table is made:
//! `POSTERN_WRITE_README=1 cargo test -p postern-tests --test faults`.

mod load;
mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use postern_tests::*;
use tokio::time::Instant;

use load::{Attempt, Job, Load, Outcome, Path};
use world::{Part, Readings, Setup, World};

/// Service must be back within this long after the failed part is (README).
const RECOVERED_WITHIN: Duration = Duration::from_secs(5);
/// `connect` must notice a dead relay within this long (keep-alive 1 s + idle 2 s), with a
/// quarter second for a loaded machine's scheduling.
const CONNECT_NOTICES_WITHIN: Duration = Duration::from_millis(3_250);
/// After UDP is cut, the agent notices the silent QUIC session (two heartbeats of 1 s) and
/// dials WebSocket: service is back within this long of the cut.
const FALLBACK_WITHIN: Duration = Duration::from_secs(8);
/// A killed active node is left within this (the agent's `mysql` check at its defaults; the
/// failover tests' bound).
const FAILOVER_WITHIN: Duration = Duration::from_millis(3_500);
/// A frozen part stays frozen this long: three heartbeat intervals, so its peers give up on it.
const FROZEN_FOR: Duration = Duration::from_secs(3);
/// A killed part stays dead this long before it is started again; the relay longer, so that
/// `connect` has to notice it is gone by itself.
const DEAD_FOR: Duration = Duration::from_secs(2);
const RELAY_DEAD_FOR: Duration = Duration::from_secs(4);
/// How long holdings may take to come back once the load has stopped.
const SETTLE_WITHIN: Duration = Duration::from_secs(20);
/// Resident memory may grow this much over a case (allocator caches, not leaks).
const RSS_SLACK_KIB: u64 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL mid-transfer and mid-handshake, dead for a while, started again.
    Kill(Part),
    /// SIGSTOP for [`FROZEN_FOR`], then SIGCONT.
    Freeze(Part),
    /// The UDP path between agent and relay drops everything from now on.
    CutUdp,
    /// The database shut down cleanly (SIGTERM) and started again.
    RestartDatabase,
    /// The Galera node traffic goes to killed (SIGKILL); started again once traffic has moved.
    KillActiveNode,
}

impl Fault {
    fn describe(self) -> String {
        match self {
            Self::Kill(p) => format!(
                "{} killed (SIGKILL), dead {} s",
                p.name(),
                if p == Part::Relay {
                    RELAY_DEAD_FOR
                } else {
                    DEAD_FOR
                }
                .as_secs()
            ),
            Self::Freeze(p) => format!("{} frozen (SIGSTOP) {} s", p.name(), FROZEN_FOR.as_secs()),
            Self::CutUdp => "UDP black-holed mid-session (agent on `auto`)".into(),
            Self::RestartDatabase => "database restarted (SIGTERM, start)".into(),
            Self::KillActiveNode => "active Galera node killed (SIGKILL), of three".into(),
        }
    }

    /// Processes whose holdings cannot be compared: they were started anew.
    fn restarted(self) -> Vec<Part> {
        match self {
            Self::Kill(p) => vec![p],
            _ => Vec::new(),
        }
    }
}

struct Case {
    transport: Transport,
    fault: Fault,
}

/// What a case found.
struct Row {
    transport: &'static str,
    fault: String,
    /// Transfers, and connections being opened, under way at the fault.
    in_flight: (usize, usize),
    /// What the clients saw, in words.
    saw: String,
    /// Transfers completed (all with the right SHA-256) and those with another result.
    completed: usize,
    wrong: usize,
    hung: usize,
    recovery: Option<Duration>,
    connect_noticed: Option<Duration>,
    leaks: String,
    before: Readings,
    after: Readings,
    problems: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing_and_service_comes_back() {
    use Part::*;
    use Transport::{Quic, Websocket};
    let cases = [
        (Quic, Fault::Kill(Relay)),
        (Quic, Fault::Kill(Agent)),
        (Quic, Fault::Kill(Database)),
        (Quic, Fault::Freeze(Relay)),
        (Quic, Fault::Freeze(Agent)),
        (Quic, Fault::Freeze(Database)),
        (Quic, Fault::RestartDatabase),
        (Quic, Fault::CutUdp),
        (Quic, Fault::KillActiveNode),
        (Websocket, Fault::Kill(Relay)),
        (Websocket, Fault::Kill(Agent)),
        (Websocket, Fault::Kill(Router)),
        (Websocket, Fault::Freeze(Relay)),
        (Websocket, Fault::Freeze(Agent)),
        (Websocket, Fault::Freeze(Router)),
    ];
    let only = std::env::var("POSTERN_FAULTS").ok();
    let mut rows = Vec::new();
    for (transport, fault) in cases {
        let case = Case { transport, fault };
        let name = format!("{} {}", transport_name(transport), fault.describe());
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        eprintln!("--- {name}");
        let row = run(case).await;
        eprintln!("{}", render_row(&row));
        for p in &row.problems {
            eprintln!("    PROBLEM: {p}");
        }
        rows.push(row);
    }
    let table = render(&rows);
    eprintln!("\n{table}");
    let target = procs::bin_dir()
        .parent()
        .expect("target dir")
        .join("fault-suite.md");
    std::fs::write(&target, &table).expect("write the table");
    if std::env::var_os("POSTERN_WRITE_README").is_some() && only.is_none() {
        write_readme(&table);
    }
    let problems: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.problems
                .iter()
                .map(move |p| format!("{} {}: {p}", r.transport, r.fault))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

async fn run(case: Case) -> Row {
    let Case { transport, fault } = case;
    let setup = match fault {
        Fault::CutUdp => Setup::UdpGate,
        Fault::KillActiveNode => Setup::Galera,
        _ => Setup::Single,
    };
    let mut w = World::start(transport, setup).await;
    let mut problems = Vec::new();

    // Warm-up: allocations a first load makes are not leaks. Nothing may fail here.
    let warm = Load::start(&w.listener, &w.via_connect, &w.digest);
    until_transfers(&warm, 1, "the warm-up").await;
    for a in warm.finish().await {
        assert_eq!(a.outcome, Outcome::Ok, "warm-up attempt {a:?}");
    }
    let restarted = fault.restarted();
    let before = settled(&w, None, &restarted).await.0;

    // The fault, with transfers and handshakes in flight.
    let load = Load::start(&w.listener, &w.via_connect, &w.digest);
    until_transfers(&load, 1, "transfers before the fault").await;
    eventually(Duration::from_secs(10), "transfers in flight", || {
        let (t, _) = load.in_flight();
        async move { (t >= 4).then_some(()) }
    })
    .await;
    let at = Instant::now();
    let mut killed_node = None;
    let restored = match fault {
        Fault::Kill(part) => {
            w.kill(part);
            tokio::time::sleep(if part == Part::Relay {
                RELAY_DEAD_FOR
            } else {
                DEAD_FOR
            })
            .await;
            w.start_again(part).await;
            Instant::now()
        }
        Fault::Freeze(part) => {
            w.signal(part, "STOP");
            tokio::time::sleep(FROZEN_FOR).await;
            w.signal(part, "CONT");
            Instant::now()
        }
        Fault::CutUdp => {
            w.udp_open
                .as_ref()
                .expect("a UDP gate")
                .store(false, std::sync::atomic::Ordering::Relaxed);
            at
        }
        Fault::RestartDatabase => {
            w.shut_database_down();
            w.start_again(Part::Database).await;
            Instant::now()
        }
        Fault::KillActiveNode => {
            let node = w.active_node().await;
            w.kill_node(&node);
            killed_node = Some(node);
            at
        }
    };
    let bound = match fault {
        Fault::CutUdp => FALLBACK_WITHIN,
        Fault::KillActiveNode => FAILOVER_WITHIN,
        _ => RECOVERED_WITHIN,
    };
    let recovery = w
        .serving(bound + Duration::from_secs(10))
        .await
        .map(|t| t.saturating_duration_since(restored));
    match recovery {
        Some(r) if r <= bound => {}
        Some(r) => problems.push(format!("service back after {r:.2?}, over {bound:?}")),
        None => problems.push("service did not come back".into()),
    }
    if fault == Fault::CutUdp {
        let t = w.agent_transport().await;
        if t.as_deref() != Some("websocket") {
            problems.push(format!(
                "the agent is on {t:?} after UDP was cut, not websocket"
            ));
        }
    }
    // The load runs on until both paths completed a transfer begun after the recovery.
    let done_before = [
        load.completed(Path::Listener),
        load.completed(Path::Connect),
    ];
    let resumed = tokio::time::timeout(Duration::from_secs(15), async {
        while load.completed(Path::Listener) <= done_before[0] + 1
            || load.completed(Path::Connect) <= done_before[1] + 1
        {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    if resumed.is_err() {
        problems.push("the clients' transfers did not resume".into());
    }
    let attempts = load.finish().await;
    // The killed node rejoins (traffic stays where it moved).
    if let Some(node) = killed_node {
        w.start_node(&node).await;
    }

    let (saw, completed, wrong, hung) = summarise(&attempts, at);
    let spanning = |job: Job| {
        attempts
            .iter()
            .filter(|a| a.job == job && a.started <= at && a.ended >= at)
            .count()
    };
    let in_flight = (spanning(Job::Transfer), spanning(Job::Handshake));
    if wrong > 0 {
        let first = attempts.iter().find_map(|a| match &a.outcome {
            Outcome::Wrong(w) => Some(w.clone()),
            _ => None,
        });
        problems.push(format!(
            "{wrong} transfers completed with a wrong result, e.g. {first:?}"
        ));
    }
    if hung > 0 {
        problems.push(format!("{hung} attempts hung"));
    }
    let connect_noticed = match fault {
        Fault::Kill(Part::Relay) | Fault::Freeze(Part::Relay) => {
            let n = noticed(&attempts, Path::Connect, at);
            match n {
                Some(n) if n > CONNECT_NOTICES_WITHIN => {
                    problems.push(format!("connect noticed the relay after {n:.2?}"))
                }
                None => problems.push("no connect transfer was cut by the relay's fault".into()),
                _ => {}
            }
            n
        }
        _ => None,
    };

    // Once UDP is cut, the agent's session is a TCP connection (through nginx) to the relay:
    // one descriptor more there, for as long as the session lasts.
    let mut expected = before;
    if fault == Fault::CutUdp
        && let Some(r) = expected.relay.as_mut()
    {
        r.fds += 1;
    }
    let (after, leaks) = settled(&w, Some(&expected), &restarted).await;
    if let Some(l) = &leaks {
        problems.push(format!("holdings did not come back: {l}"));
    }
    w.stop().await;
    Row {
        transport: transport_name(transport),
        fault: fault.describe(),
        in_flight,
        saw,
        completed,
        wrong,
        hung,
        recovery,
        connect_noticed,
        leaks: leaks.unwrap_or_else(|| "none".into()),
        before,
        after,
        problems,
    }
}

/// Waits until both paths completed `n` transfers.
async fn until_transfers(load: &Load, n: usize, what: &str) {
    eventually(Duration::from_secs(30), what, || {
        let done = load.completed(Path::Listener) >= n && load.completed(Path::Connect) >= n;
        async move { done.then_some(()) }
    })
    .await;
}

/// Waits for the world to be idle and returns its holdings: with `baseline`, until they are
/// back to it (or [`SETTLE_WITHIN`] passed: then also what stayed above it).
async fn settled(
    w: &World,
    baseline: Option<&Readings>,
    restarted: &[Part],
) -> (Readings, Option<String>) {
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let now = w.readings(restarted).await;
        let over = match baseline {
            Some(b) => excess(b, &now),
            // The baseline: the database holds no client connection any more.
            None => (now.backend > 0).then(|| format!("{} backend connections", now.backend)),
        };
        match over {
            None => return (now, None),
            Some(o) if Instant::now() >= deadline => return (now, Some(o)),
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What `now` holds beyond `before`, in words, if anything.
fn excess(before: &Readings, now: &Readings) -> Option<String> {
    let mut over = Vec::new();
    for (name, b, n) in [
        ("relay", before.relay, now.relay),
        ("agent", before.agent, now.agent),
    ] {
        let (Some(b), Some(n)) = (b, n) else { continue };
        if n.fds > b.fds {
            over.push(format!("{name} fds {} → {}", b.fds, n.fds));
        }
        if n.tasks > b.tasks {
            over.push(format!("{name} tasks {} → {}", b.tasks, n.tasks));
        }
        if n.rss_kib > b.rss_kib + RSS_SLACK_KIB {
            over.push(format!("{name} RSS {} → {} KiB", b.rss_kib, n.rss_kib));
        }
    }
    if now.backend > before.backend {
        over.push(format!(
            "backend connections {} → {}",
            before.backend, now.backend
        ));
    }
    (!over.is_empty()).then(|| over.join(", "))
}

/// The clients' view: how the transfers in flight at the fault ended, what new connections
/// met meanwhile; then completed transfers, wrong results and hung attempts.
fn summarise(attempts: &[Attempt], fault: Instant) -> (String, usize, usize, usize) {
    let mut cut: BTreeMap<String, usize> = BTreeMap::new();
    let mut met: BTreeMap<String, usize> = BTreeMap::new();
    let (mut completed, mut wrong, mut hung, mut whole) = (0, 0, 0, 0);
    for a in attempts {
        let in_flight = a.started <= fault && a.ended >= fault && a.job == Job::Transfer;
        match &a.outcome {
            Outcome::Ok if a.job == Job::Transfer => {
                completed += 1;
                whole += usize::from(in_flight);
            }
            Outcome::Ok => {}
            Outcome::Wrong(_) => wrong += 1,
            Outcome::Hung => hung += 1,
            Outcome::Failed(e) if in_flight => *cut.entry(e.clone()).or_default() += 1,
            Outcome::Failed(e) => *met.entry(e.clone()).or_default() += 1,
        }
    }
    let kinds = |m: BTreeMap<String, usize>| {
        let mut k: Vec<(String, usize)> = m.into_iter().collect();
        k.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let more = if k.len() > 3 { ", …" } else { "" };
        k.iter()
            .take(3)
            .map(|(e, n)| format!("`{}` ×{n}", e.replace('`', "'").replace('|', "/")))
            .collect::<Vec<_>>()
            .join(", ")
            + more
    };
    let n_cut: usize = cut.values().sum();
    let mut saw = match (n_cut, whole) {
        (0, 0) => String::new(),
        (0, w) => format!("transfers in flight: {w} completed whole"),
        (c, 0) => format!("transfers in flight: {c} failed with {}", kinds(cut)),
        (c, w) => format!(
            "transfers in flight: {w} completed whole, {c} failed with {}",
            kinds(cut)
        ),
    };
    if !met.is_empty() {
        if !saw.is_empty() {
            saw.push_str("; ");
        }
        let _ = write!(saw, "later attempts: {}", kinds(met));
    }
    if saw.is_empty() {
        saw = "no error".into();
    }
    if hung > 0 {
        let _ = write!(saw, "; {hung} hung");
    }
    (saw, completed, wrong, hung)
}

/// How long after the fault `path`'s first transfer in flight at the fault ended in an error.
fn noticed(attempts: &[Attempt], path: Path, fault: Instant) -> Option<Duration> {
    attempts
        .iter()
        .filter(|a| a.path == path && a.job == Job::Transfer && a.started <= fault)
        .filter(|a| matches!(a.outcome, Outcome::Failed(_)) && a.ended >= fault)
        .map(|a| a.ended - fault)
        .min()
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Quic => "QUIC",
        Transport::Websocket => "WebSocket",
        Transport::DirectWebsocket => "WebSocket (direct)",
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn render_row(r: &Row) -> String {
    let back = match r.connect_noticed {
        Some(n) => format!("{}; connect noticed in {}", secs(r.recovery), secs(Some(n))),
        None => secs(r.recovery),
    };
    format!(
        "| {} | {} | {} transfers, {} connections opening | {} | {} / {} | {} | {} |",
        r.transport,
        r.fault,
        r.in_flight.0,
        r.in_flight.1,
        r.saw,
        r.completed,
        r.wrong + r.hung,
        back,
        r.leaks,
    )
}

/// The table, and the holdings behind its last column.
fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| transport | fault | in flight at the fault | what the clients saw | transfers completed (SHA-256 right) / short, corrupt or hung | service back after | leaks |\n\
         | --- | --- | --- | --- | ---: | --- | --- |\n",
    );
    for r in rows {
        out.push_str(&render_row(r));
        out.push('\n');
    }
    out.push_str(
        "\nHoldings, idle, before the fault → after it (fds, runtime tasks, resident MiB; \
         database client connections); a process the case restarted is not compared:\n\n\
         | transport | fault | relay | agent | backend connections |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let proc = |b: Option<world::Reading>, a: Option<world::Reading>| match (b, a) {
            (Some(b), Some(a)) => format!(
                "{} → {} fds, {} → {} tasks, {:.1} → {:.1} MiB",
                b.fds,
                a.fds,
                b.tasks,
                a.tasks,
                b.rss_kib as f64 / 1024.0,
                a.rss_kib as f64 / 1024.0
            ),
            _ => "restarted".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} → {} |",
            r.transport,
            r.fault,
            proc(r.before.relay, r.after.relay),
            proc(r.before.agent, r.after.agent),
            r.before.backend,
            r.after.backend
        );
    }
    out
}

/// Puts `table` into README.md between the fault suite's markers.
fn write_readme(table: &str) {
    const BEGIN: &str = "<!-- fault-suite:begin (written by the fault suite) -->\n";
    const END: &str = "<!-- fault-suite:end -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).expect("read README.md");
    let start = text.find(BEGIN).expect("the begin marker in README.md") + BEGIN.len();
    let end = text.find(END).expect("the end marker in README.md");
    let mut new = String::with_capacity(text.len() + table.len());
    new.push_str(&text[..start]);
    new.push_str(table);
    new.push_str(&text[end..]);
    std::fs::write(&path, new).expect("write README.md");
}
