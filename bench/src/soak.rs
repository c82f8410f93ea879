//! `postern-bench soak`: many tunneled connections held for a long time, each asking a small
//! query every few seconds, through QUIC and through WebSocket at once, or through one of them
//! (`--transport`; issue 13, item 3).
//!
//! The stack is the benchmark's (see [`crate::stack`]): one `mariadbd`, and per transport a
//! relay, a `postern-agent run` and a `postern-agent connect`, each its own release process. The
//! soak tunes it for tens of thousands of connections ([`Tuning`]): `mariadbd` with a pool of
//! threads and room for every connection, a per-service connection limit above N at the
//! relays when the default is not, and the relays' API and the agents' `NOTIFY_SOCKET` so that
//! their tokio task counts can be read.
//!
//! The run, in order:
//! 1. raise this process's open-files limit (the children inherit it) to fit a socket per
//!    connection of every transport, and more (here and in mariadbd);
//! 2. start the stack; one probe connection through each tunnel; **baseline** sample;
//! 3. open N connections per transport through `connect`, 100 at a time (timed);
//!    **start** sample;
//! 4. hold them for the duration: each connection runs `SELECT <counter>, <index>,
//!    CONNECTION_ID()` every interval, its first one at a random point of the first interval
//!    so the load is smooth, and checks the answer is exactly what it asked on the session it
//!    opened; samples every `--sample-every` seconds and in the **middle**;
//! 5. **end** sample, then close every connection gracefully (`COM_QUIT`), wait until the
//!    processes settle (polled), and take the **after close** sample, to compare with the
//!    baseline;
//! 6. write the report ([`crate::soak_report`]).
//!
//! A sample reads, for each relay, agent and `connect`, `mariadbd` and this process: resident
//! memory, open file descriptors, OS threads, CPU time and (relay, agent) tokio tasks; and the
//! query counters and latency histogram of each transport.
//!
//! An error or a wrong answer never stops the soak: it is counted, the first few are kept
//! verbatim, a failed connection is opened again at its next turn, and the command exits
//! non-zero at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row, Value, from_value_opt};
use rand::Rng as _;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::histogram::{Histogram, Snapshot};
use crate::probe::{self, Reading};
use crate::soak_report::{self, Outcome, Settle, TransportSummary};
use crate::stack::{self, Transport, TunedStack, Tuning, Tunnel};
use crate::workload;

/// The relay's default per-service `max_connections` (`DEFAULT_MAX_CONNECTIONS` in
/// `relay/src/config/mod.rs`).
const RELAY_DEFAULT_SERVICE_MAX_CONNECTIONS: usize = 10_000;
/// Connections a service must have room for beyond the soak's own: the probes, and
/// connections opened again while their failed predecessor is still being torn down.
const SERVICE_HEADROOM: usize = 1_000;
/// Opening attempts per connection before the soak starts without it (it then tries again at
/// each of its turns).
const OPEN_ATTEMPTS: usize = 3;
/// How many error messages per transport the report quotes verbatim.
pub(crate) const MAX_MESSAGES: usize = 10;
/// How often a progress line goes to stderr during the hold.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);
/// How long the processes get to settle after the connections are closed.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// How often settling is polled.
const SETTLE_POLL: Duration = Duration::from_millis(500);
/// How long a sample waits for a status line from each agent that is newer than the sample
/// (they come every 2 s).
const STATUS_FRESH_WITHIN: Duration = Duration::from_secs(6);
/// Polls in a row with unchanged descriptor counts that count as settled.
const SETTLE_STABLE_POLLS: usize = 6;

/// Hold many tunneled connections through QUIC and WebSocket for a long time, each with a
/// query every few seconds; report errors, latency, and memory, descriptors, threads and tasks
/// of every process over time.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SoakArgs {
    /// Which tunnels to soak: both at once against one mariadbd, or one (with a mariadbd of its
    /// own; run two soaks side by side where one process may not hold 2 × N sockets).
    #[arg(long, value_enum, default_value_t = Which::Both)]
    transport: Which,
    /// Connections per transport.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    connections: u32,
    /// How long to hold them, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(10..))]
    duration: u64,
    /// Seconds between two queries on one connection.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Seconds between two samples of the time series.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..))]
    sample_every: u64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    open_parallel: u32,
    /// Seconds a query, an open or a close may take before it counts as an error.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    query_timeout: u64,
    /// Where postern-relay and postern-agent are [default: the directory of this program].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write the markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// The tunnels a soak runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Quic,
    Websocket,
    Both,
}

impl Which {
    fn transports(self) -> Vec<Transport> {
        match self {
            Self::Quic => vec![Transport::Quic],
            Self::Websocket => vec![Transport::WebSocket],
            Self::Both => vec![Transport::Quic, Transport::WebSocket],
        }
    }
}

/// The run's parameters, checked.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) transports: Vec<Transport>,
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) interval: Duration,
    pub(crate) sample_every: Duration,
    pub(crate) open_parallel: usize,
    pub(crate) query_timeout: Duration,
    /// The open-files limit this process sets for itself and its children.
    pub(crate) fd_limit: u64,
    /// The per-service `max_connections` set at the relays, if the default is too low.
    pub(crate) service_max_connections: Option<usize>,
    /// The extra `mariadbd` options.
    pub(crate) mariadbd: Vec<String>,
}

impl Settings {
    fn new(a: &SoakArgs) -> Result<Self> {
        ensure!(
            a.interval.is_finite() && (0.1..=3600.0).contains(&a.interval),
            "--interval must be between 0.1 and 3600 seconds, got {}",
            a.interval
        );
        let n = a.connections as usize;
        let transports = a.transport.transports();
        // This process and mariadbd each hold a socket per connection of every transport (each
        // agent and connect one per connection of its own), and a few dozen files besides.
        let total = transports.len() * n;
        let fd_limit = total as u64 + 1000;
        let service_max_connections = (n + SERVICE_HEADROOM
            > RELAY_DEFAULT_SERVICE_MAX_CONNECTIONS)
            .then_some(n + SERVICE_HEADROOM);
        let mariadbd = vec![
            format!("--max-connections={}", total + 100),
            // One thread per connection would be 2N threads; a pool serves them all.
            "--thread-handling=pool-of-threads".into(),
            format!("--open-files-limit={fd_limit}"),
            // Aborted handshakes from 127.0.0.1 must never get it blocked.
            "--max-connect-errors=1000000000".into(),
        ];
        Ok(Self {
            transports,
            connections: n,
            duration: Duration::from_secs(a.duration),
            interval: Duration::from_secs_f64(a.interval),
            sample_every: Duration::from_secs(a.sample_every),
            open_parallel: a.open_parallel as usize,
            query_timeout: Duration::from_secs(a.query_timeout),
            fd_limit,
            service_max_connections,
            mariadbd,
        })
    }

    /// About how many queries each transport should send.
    pub(crate) fn planned_queries(&self) -> u64 {
        (self.connections as f64 * self.duration.as_secs_f64() / self.interval.as_secs_f64()) as u64
    }
}

/// Runs the soak; `Ok(true)` when it saw no error, no wrong answer, and every query was
/// answered.
pub(crate) async fn run(args: SoakArgs) -> Result<bool> {
    let settings = Settings::new(&args)?;
    raise_fd_limit(settings.fd_limit)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => stack::default_bin_dir()?,
    };
    let signals = Signals::listen()?;

    let n = settings.connections;
    let names: Vec<&str> = settings.transports.iter().map(|t| t.name()).collect();
    eprintln!(
        "soak: {n} connections per transport ({}) for {} s, a query on each every \
         {:.1} s; open-files limit {}",
        names.join(", "),
        settings.duration.as_secs(),
        settings.interval.as_secs_f64(),
        settings.fd_limit
    );
    if let Some(m) = settings.service_max_connections {
        eprintln!(
            "the relays' per-service max_connections is set to {m} (default \
             {RELAY_DEFAULT_SERVICE_MAX_CONNECTIONS}, no room above {n} connections)"
        );
    }
    let tuning = Tuning {
        mariadbd: settings.mariadbd.clone(),
        service_max_connections: settings.service_max_connections,
        observe: true,
    };
    eprintln!("starting mariadbd and the tunnels ({})", names.join(", "));
    let stack = signals
        .abort_on_first(TunedStack::start(&bin_dir, &settings.transports, &tuning))
        .await??;
    let outcome = signals
        .abort_on_second(soak(&stack, &settings, &signals))
        .await;
    let problems = stack.shutdown();
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    let mut outcome = outcome??;
    outcome.shutdown_problems = problems;
    let text = soak_report::markdown(&outcome);
    println!("{text}");
    if let Some(path) = &args.output {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(outcome.clean())
}

/// Everything from the probes to the settled end, on a started stack.
async fn soak(stack: &TunedStack, s: &Settings, signals: &Signals) -> Result<Outcome> {
    let db_opts = workload::opts(stack.db.addr, None);
    let mut monitor = Conn::new(db_opts)
        .await
        .context("connect to mariadbd directly (monitoring session)")?;
    let server: Option<(String, String, u64, u64)> = monitor
        .query_first("SELECT VERSION(), @@thread_handling, @@max_connections, @@open_files_limit")
        .await
        .context("read the server's settings")?;
    let (version, thread_handling, max_connections, open_files) =
        server.context("no answer to the settings query")?;
    let total = s.transports.len() * s.connections;
    ensure!(
        max_connections >= total as u64 + 10,
        "mariadbd allows {max_connections} connections, the soak needs {}",
        total + 10
    );
    let server = format!(
        "MariaDB {version}, thread_handling {thread_handling}, max_connections \
         {max_connections}, open_files_limit {open_files}"
    );
    eprintln!("{server}");

    let tunnels: Vec<(&str, &Tunnel)> = stack
        .tunnels
        .iter()
        .map(|(t, tun)| (t.name(), tun))
        .collect();
    for &(name, tunnel) in &tunnels {
        let mut probe = Conn::new(workload::opts(tunnel.addr, None))
            .await
            .with_context(|| format!("first connection through the {name} tunnel"))?;
        let one: Option<u32> = probe.query_first("SELECT 1").await?;
        ensure!(one == Some(1), "SELECT 1 through {name} gave {one:?}");
        probe.disconnect().await?;
    }
    let mut observer = Observer::new(stack, monitor);
    let epoch = Instant::now();
    let traffic: Vec<Arc<Traffic>> = tunnels
        .iter()
        .enumerate()
        .map(|(i, (name, _))| Arc::new(Traffic::new(name, i, epoch)))
        .collect();

    eprintln!("waiting for the processes to settle before the baseline");
    let baseline_settle = observer.settle(None, SETTLE_WITHIN).await;
    let baseline = observer.sample("baseline", None, &traffic).await;
    eprintln!("{}", baseline.progress_line(&observer.names));

    // Open every connection, one transport after the other, so each one's time is its own.
    let mut clients = Vec::new();
    let mut open_times = Vec::new();
    for ((name, tunnel), t) in tunnels.iter().zip(&traffic) {
        let opts = workload::opts(tunnel.addr, None);
        eprintln!(
            "opening {} connections through {name}, {} at a time",
            s.connections, s.open_parallel
        );
        let started = Instant::now();
        let opened = signals
            .abort_on_first(open_all(t, &opts, s))
            .await?
            .with_context(|| format!("opening connections through {name}"))?;
        let took = started.elapsed();
        eprintln!(
            "{name}: {} of {} connections open in {:.1} s ({} failed attempts)",
            t.open.load(Ordering::Relaxed),
            s.connections,
            took.as_secs_f64(),
            t.open_failures.load(Ordering::Relaxed)
        );
        open_times.push(took);
        clients.push((opts, opened));
    }
    let open_total: u64 = traffic.iter().map(|t| t.open.load(Ordering::Relaxed)).sum();
    eprintln!(
        "all {open_total} of {total} connections open; holding them for {} s",
        s.duration.as_secs()
    );

    let start = observer
        .sample("start", Some(Duration::ZERO), &traffic)
        .await;
    eprintln!("{}", start.progress_line(&observer.names));
    let queries_start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut drivers = JoinSet::new();
    for ((opts, opened), t) in clients.into_iter().zip(&traffic) {
        let ctx = Arc::new(Drive {
            opts,
            traffic: t.clone(),
            interval: s.interval,
            query_timeout: s.query_timeout,
        });
        let n = opened.len().max(1) as f64;
        let mut rng = rand::rng();
        for client in opened {
            // Spread the first queries over the first interval: slot `index`, jittered within.
            let slot = (client.index as f64 + rng.random::<f64>()) / n;
            let first = queries_start + s.interval.mul_f64(slot);
            drivers.spawn(drive(client, ctx.clone(), first, stop_rx.clone()));
        }
    }

    // Hold: sample on schedule, print progress, stop early on a signal.
    let mut samples = vec![baseline, start];
    let mut interrupted = None;
    let mut hold = Hold {
        queries_start,
        next_progress: queries_start + PROGRESS_EVERY,
        traffic: &traffic,
        signals,
    };
    for (at, label) in schedule(s.duration, s.sample_every) {
        interrupted = hold.until(queries_start + at).await;
        if interrupted.is_some() {
            break;
        }
        let sample = observer.sample(label, Some(at), &traffic).await;
        eprintln!("{}", sample.progress_line(&observer.names));
        samples.push(sample);
    }
    if interrupted.is_none() {
        interrupted = hold.until(queries_start + s.duration).await;
    }
    if let Some(sig) = interrupted {
        eprintln!(
            "interrupted by {sig} after {:.0} s: ending the soak early (again to abort)",
            queries_start.elapsed().as_secs_f64()
        );
    }

    let _ = stop_tx.send(true);
    let mut held = Vec::with_capacity(total);
    while let Some(joined) = drivers.join_next().await {
        held.push(joined.context("a connection's task failed")?);
    }
    let held_for = queries_start.elapsed();
    let end_sample = observer.sample("end", Some(held_for), &traffic).await;
    eprintln!("{}", end_sample.progress_line(&observer.names));
    samples.push(end_sample);

    eprintln!("closing every connection");
    let mut close_times = Vec::new();
    for t in &traffic {
        let (mine, rest): (Vec<Client>, Vec<Client>) =
            held.into_iter().partition(|c| c.traffic.column == t.column);
        held = rest;
        let started = Instant::now();
        close_all(mine, s).await;
        close_times.push(started.elapsed());
    }
    eprintln!("waiting for the processes to settle");
    let settle = observer.settle(Some(&samples[0]), SETTLE_WITHIN).await;
    let after = observer
        .sample("after close", Some(queries_start.elapsed()), &traffic)
        .await;
    eprintln!("{}", after.progress_line(&observer.names));
    samples.push(after);

    let context =
        crate::report::Context::gather(&stack::workspace_root(), server, soak_report::describe(s));
    let transports = traffic
        .iter()
        .zip(open_times.iter().zip(&close_times))
        .map(|(t, (open, close))| t.summary(*open, *close, held_for))
        .collect();
    Ok(Outcome {
        context,
        settings: s.clone(),
        transports,
        samples,
        processes: observer.names.clone(),
        baseline_settle,
        settle,
        interrupted: interrupted.map(|sig| (sig, held_for)),
        notes: observer.notes.clone(),
        shutdown_problems: Vec::new(),
        ticks_per_second: stack::ticks_per_second(),
    })
}

/// The sample times after the start, with their labels: every `every` before the end, and
/// the middle (which takes the label of a series point that falls on it).
fn schedule(duration: Duration, every: Duration) -> Vec<(Duration, &'static str)> {
    let middle = duration / 2;
    let mut points: Vec<(Duration, &'static str)> = (1..)
        .map(|k| every * k)
        .take_while(|at| *at < duration)
        .map(|at| (at, ""))
        .collect();
    match points
        .iter_mut()
        .find(|(at, _)| at.abs_diff(middle) < Duration::from_secs(1))
    {
        Some(p) => p.1 = "middle",
        None => points.push((middle, "middle")),
    }
    points.sort_by_key(|(at, _)| *at);
    points
}

/// The wait between samples: progress lines every [`PROGRESS_EVERY`], and the first signal.
struct Hold<'a> {
    queries_start: Instant,
    next_progress: Instant,
    traffic: &'a [Arc<Traffic>],
    signals: &'a Signals,
}

impl Hold<'_> {
    /// Waits until `due`; `Some(signal)` if a signal came first.
    async fn until(&mut self, due: Instant) -> Option<&'static str> {
        loop {
            let wake = due.min(self.next_progress);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                sig = self.signals.wait(1) => return Some(sig),
            }
            if wake < due {
                eprintln!("{}", progress(self.traffic, self.queries_start.elapsed()));
                self.next_progress += PROGRESS_EVERY;
            } else {
                return None;
            }
        }
    }
}

/// One progress line: counters so far per transport.
fn progress(traffic: &[Arc<Traffic>], elapsed: Duration) -> String {
    let parts: Vec<String> = traffic
        .iter()
        .map(|t| {
            format!(
                "{}: {} open, {} sent, {} answered, {} errors, {} wrong",
                t.name,
                t.open.load(Ordering::Relaxed),
                t.sent.load(Ordering::Relaxed),
                t.answered.load(Ordering::Relaxed),
                t.errors.load(Ordering::Relaxed),
                t.wrong.load(Ordering::Relaxed)
            )
        })
        .collect();
    format!("  [{:>5.0} s] {}", elapsed.as_secs_f64(), parts.join(" | "))
}

/// Counters, latency and the first messages of one transport; shared by its connections.
pub(crate) struct Traffic {
    pub(crate) name: &'static str,
    /// Its place among the transports of the run.
    column: usize,
    epoch: Instant,
    /// Connections open now.
    open: AtomicU64,
    sent: AtomicU64,
    /// Answers, right or wrong.
    answered: AtomicU64,
    wrong: AtomicU64,
    /// Queries with an error or no answer in time.
    errors: AtomicU64,
    /// Failed attempts to open a connection (at the start or again later).
    open_failures: AtomicU64,
    /// Connections opened again after an error.
    reopened: AtomicU64,
    close_failures: AtomicU64,
    latency: Histogram,
    messages: Mutex<(u64, Vec<String>)>,
}

/// What is wrong, for [`Traffic::problem`].
#[derive(Debug, Clone, Copy)]
enum Problem {
    Open,
    Query,
    Wrong,
    Close,
}

impl Traffic {
    fn new(name: &'static str, column: usize, epoch: Instant) -> Self {
        Self {
            name,
            column,
            epoch,
            open: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            wrong: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            open_failures: AtomicU64::new(0),
            reopened: AtomicU64::new(0),
            close_failures: AtomicU64::new(0),
            latency: Histogram::new(),
            messages: Mutex::new((0, Vec::new())),
        }
    }

    /// Counts a problem and keeps its message if it is one of the first.
    fn problem(&self, kind: Problem, index: usize, message: String) {
        let counter = match kind {
            Problem::Open => &self.open_failures,
            Problem::Query => &self.errors,
            Problem::Wrong => &self.wrong,
            Problem::Close => &self.close_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let at = self.epoch.elapsed().as_secs_f64();
        let line = format!(
            "{at:.1} s, {} connection {index}: {kind:?}: {message}",
            self.name
        );
        let mut m = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        m.0 += 1;
        if m.1.len() < MAX_MESSAGES {
            eprintln!("  {line}");
            m.1.push(line);
        }
    }

    fn snapshot(&self) -> TrafficSnapshot {
        TrafficSnapshot {
            open: self.open.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
            wrong: self.wrong.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            open_failures: self.open_failures.load(Ordering::Relaxed),
            latency: self.latency.snapshot(),
        }
    }

    fn summary(
        &self,
        open_time: Duration,
        close_time: Duration,
        held: Duration,
    ) -> TransportSummary {
        let messages = self
            .messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        TransportSummary {
            name: self.name,
            snapshot: self.snapshot(),
            reopened: self.reopened.load(Ordering::Relaxed),
            close_failures: self.close_failures.load(Ordering::Relaxed),
            open_time,
            close_time,
            held,
            problems: messages.0,
            messages: messages.1,
        }
    }
}

/// The counters of one transport at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrafficSnapshot {
    pub(crate) open: u64,
    pub(crate) sent: u64,
    pub(crate) answered: u64,
    pub(crate) wrong: u64,
    pub(crate) errors: u64,
    pub(crate) open_failures: u64,
    pub(crate) latency: Snapshot,
}

/// One soak connection.
struct Client {
    index: usize,
    conn: Option<Conn>,
    traffic: Arc<Traffic>,
}

/// What every connection of one transport shares while it runs.
struct Drive {
    opts: Opts,
    traffic: Arc<Traffic>,
    interval: Duration,
    query_timeout: Duration,
}

/// Opens a connection, within `within`.
async fn open_one(opts: &Opts, within: Duration) -> Result<Conn, String> {
    match tokio::time::timeout(within, Conn::new(opts.clone())).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not open within {within:?}")),
    }
}

/// Opens `s.connections` connections through `opts`, `s.open_parallel` at a time; one that
/// fails [`OPEN_ATTEMPTS`] times is left closed (it tries again during the soak).
async fn open_all(traffic: &Arc<Traffic>, opts: &Opts, s: &Settings) -> Result<Vec<Client>> {
    let limit = Arc::new(Semaphore::new(s.open_parallel));
    let mut tasks = JoinSet::new();
    for index in 0..s.connections {
        let (opts, limit, traffic) = (opts.clone(), limit.clone(), traffic.clone());
        let within = s.query_timeout;
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.ok();
            let mut conn = None;
            for _ in 0..OPEN_ATTEMPTS {
                match open_one(&opts, within).await {
                    Ok(c) => {
                        traffic.open.fetch_add(1, Ordering::Relaxed);
                        conn = Some(c);
                        break;
                    }
                    Err(e) => traffic.problem(Problem::Open, index, e),
                }
            }
            Client {
                index,
                conn,
                traffic,
            }
        });
    }
    let mut clients = Vec::with_capacity(s.connections);
    while let Some(joined) = tasks.join_next().await {
        clients.push(joined.context("an opening task failed")?);
    }
    clients.sort_by_key(|c| c.index);
    Ok(clients)
}

/// One connection's loop: a query at every tick from `first` on, until `stop`. A connection
/// that fails is dropped and opened again at its next tick. An in-flight query is finished
/// before the loop ends, so every query sent is answered or counted as an error.
async fn drive(
    mut client: Client,
    ctx: Arc<Drive>,
    first: Instant,
    mut stop: watch::Receiver<bool>,
) -> Client {
    let t = &ctx.traffic;
    let mut tick = tokio::time::interval_at(first, ctx.interval);
    // A late query does not make the next ones bunch up.
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut counter = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let Some(conn) = client.conn.as_mut() else {
            match open_one(&ctx.opts, ctx.query_timeout).await {
                Ok(c) => {
                    t.open.fetch_add(1, Ordering::Relaxed);
                    t.reopened.fetch_add(1, Ordering::Relaxed);
                    client.conn = Some(c);
                }
                Err(e) => t.problem(Problem::Open, client.index, format!("again: {e}")),
            }
            continue;
        };
        counter += 1;
        let session = conn.id();
        let sql = format!("SELECT {counter}, {}, CONNECTION_ID()", client.index);
        t.sent.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answer = tokio::time::timeout(ctx.query_timeout, conn.query_first::<Row, _>(sql)).await;
        let failure = match answer {
            Ok(Ok(row)) => {
                t.latency.record(started.elapsed());
                t.answered.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = check_answer(
                    row.map(Row::unwrap),
                    counter,
                    client.index as u64,
                    u64::from(session),
                ) {
                    t.problem(Problem::Wrong, client.index, why);
                }
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", ctx.query_timeout)),
        };
        if let Some(why) = failure {
            t.problem(Problem::Query, client.index, why);
            // The session's state is unknown: drop it (mysql_async closes it in the
            // background) and open a new one at the next tick.
            client.conn = None;
            t.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
    client
}

/// Whether the answer to `SELECT counter, index, CONNECTION_ID()` is exactly one row of
/// those three values, the last being the session the connection opened; otherwise what is
/// wrong with it.
fn check_answer(
    row: Option<Vec<Value>>,
    counter: u64,
    index: u64,
    session: u64,
) -> Result<(), String> {
    let row = row.ok_or("no row")?;
    let got: Vec<Option<u64>> = row
        .iter()
        .map(|v| from_value_opt::<u64>(v.clone()).ok())
        .collect();
    let expected = [Some(counter), Some(index), Some(session)];
    if got == expected {
        Ok(())
    } else {
        Err(format!(
            "asked for ({counter}, {index}, session {session}), got {row:?}"
        ))
    }
}

/// Closes every connection gracefully, `s.open_parallel` at a time.
async fn close_all(clients: Vec<Client>, s: &Settings) {
    let limit = Arc::new(Semaphore::new(s.open_parallel));
    let mut tasks = JoinSet::new();
    for client in clients {
        let Some(conn) = client.conn else { continue };
        let limit = limit.clone();
        let within = s.query_timeout;
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.ok();
            let t = &client.traffic;
            let failure = match tokio::time::timeout(within, conn.disconnect()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("not closed within {within:?}")),
            };
            t.open.fetch_sub(1, Ordering::Relaxed);
            if let Some(why) = failure {
                t.problem(Problem::Close, client.index, why);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The processes a sample reads, in report order, and how to read their task counts.
struct Observer<'a> {
    stack: &'a TunedStack,
    /// Each process's name and pid: per tunnel its relay, agent and connect, then mariadbd and
    /// this process.
    names: Vec<String>,
    pids: Vec<u32>,
    /// A direct session to mariadbd, for `Threads_connected`.
    monitor: Conn,
    started: Instant,
    notes: Vec<String>,
}

/// One sample of everything.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// "baseline", "start", "middle", "end", "after close", or empty for a series point.
    pub(crate) label: &'static str,
    /// Since the queries started (`None`: before).
    pub(crate) at: Option<Duration>,
    /// When it was taken, from the observer's start (for CPU rates).
    pub(crate) taken: Duration,
    /// Per process, in [`Observer::names`] order.
    pub(crate) procs: Vec<Reading>,
    /// The relays' `postern_connections_current`, per transport.
    pub(crate) relay_connections: Vec<Option<u64>>,
    /// mariadbd's `Threads_connected` (with the monitoring session).
    pub(crate) db_sessions: Option<u64>,
    /// Per transport.
    pub(crate) traffic: Vec<TrafficSnapshot>,
}

impl Sample {
    fn progress_line(&self, names: &[String]) -> String {
        let label = if self.label.is_empty() {
            "sample"
        } else {
            self.label
        };
        let at = self
            .at
            .map(|d| format!("{:.0} s", d.as_secs_f64()))
            .unwrap_or_else(|| "before".into());
        let procs: Vec<String> = names
            .iter()
            .zip(&self.procs)
            .map(|(name, r)| {
                format!(
                    "{name} {} KiB/{} fds/{} tasks",
                    show(r.rss_kib),
                    show(r.fds),
                    show(r.tasks)
                )
            })
            .collect();
        let relays: Vec<String> = self.relay_connections.iter().map(|c| show(*c)).collect();
        format!(
            "{label} ({at}): relay connections {}, db sessions {}, {}",
            relays.join("/"),
            show(self.db_sessions),
            procs.join("; ")
        )
    }
}

/// A figure or "n/a".
pub(crate) fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

impl<'a> Observer<'a> {
    fn new(stack: &'a TunedStack, monitor: Conn) -> Self {
        let mut names = Vec::new();
        let mut pids = Vec::new();
        for (t, tunnel) in &stack.tunnels {
            for (role, pid) in [
                ("relay", tunnel.relay.pid()),
                ("agent", tunnel.agent.pid()),
                ("connect", tunnel.connect.pid()),
            ] {
                names.push(format!("{} {role}", t.name()));
                pids.push(pid);
            }
        }
        names.push("mariadbd".into());
        pids.push(stack.db_pid);
        names.push("client (postern-bench)".into());
        pids.push(std::process::id());
        Self {
            stack,
            names,
            pids,
            monitor,
            started: Instant::now(),
            notes: Vec::new(),
        }
    }

    /// Notes a reading that failed, once per kind.
    fn note(&mut self, what: String) {
        if !self.notes.contains(&what) {
            eprintln!("note: {what}");
            self.notes.push(what);
        }
    }

    async fn sample(
        &mut self,
        label: &'static str,
        at: Option<Duration>,
        traffic: &[Arc<Traffic>],
    ) -> Sample {
        // The agents refresh their status line every few seconds: wait for one from after now.
        self.fresh_status(Instant::now(), STATUS_FRESH_WITHIN).await;
        let taken = self.started.elapsed();
        let mut procs: Vec<Reading> = self.pids.iter().map(|&p| probe::read_proc(p)).collect();
        let mut relay_connections = vec![None; self.stack.tunnels.len()];
        for (i, (_, tunnel)) in self.stack.tunnels.iter().enumerate() {
            if let Some(api) = &tunnel.api {
                match probe::relay_metrics(api).await {
                    Ok(m) => {
                        procs[3 * i].tasks = m.tasks;
                        relay_connections[i] = m.connections;
                        if m.tasks.is_none() {
                            self.note("the relay's /metrics has no postern_runtime_tasks".into());
                        }
                    }
                    Err(e) => self.note(format!("relay /metrics: {e:#}")),
                }
            }
            match tunnel.status.as_ref().and_then(|s| s.latest()) {
                Some((_, line)) => {
                    procs[3 * i + 1].tasks = probe::tasks_in_status(&line);
                    if procs[3 * i + 1].tasks.is_none() {
                        self.note(format!(
                            "the agent's status line has no task count: {line:?}"
                        ));
                    }
                }
                None => self.note("no status line from the agent yet".into()),
            }
        }
        let db_sessions = self.db_sessions().await;
        Sample {
            label,
            at,
            taken,
            procs,
            relay_connections,
            db_sessions,
            traffic: traffic.iter().map(|t| t.snapshot()).collect(),
        }
    }

    async fn db_sessions(&mut self) -> Option<u64> {
        let q = self.monitor.query_first::<Row, _>(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
             WHERE VARIABLE_NAME = 'THREADS_CONNECTED'",
        );
        match tokio::time::timeout(Duration::from_secs(30), q).await {
            Ok(Ok(Some(row))) => row
                .unwrap()
                .into_iter()
                .next()
                .and_then(|v| from_value_opt::<u64>(v).ok()),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                self.note(format!("mariadbd Threads_connected: {e}"));
                None
            }
            Err(_) => {
                self.note("mariadbd Threads_connected: no answer within 30 s".into());
                None
            }
        }
    }

    /// Waits (up to `within`) until each agent has sent a status line at or after `since`.
    async fn fresh_status(&self, since: Instant, within: Duration) {
        let deadline = since + within;
        while Instant::now() < deadline {
            let fresh = self.stack.tunnels.iter().all(|(_, t)| {
                t.status
                    .as_ref()
                    .and_then(|s| s.latest())
                    .is_some_and(|(at, _)| at >= since)
            });
            if fresh {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the tunnels carry no connection (the relays' gauge), mariadbd has no more
    /// sessions than at `baseline` (if given), and the descriptor counts of every process have
    /// not moved for [`SETTLE_STABLE_POLLS`] polls.
    async fn settle(&mut self, baseline: Option<&Sample>, within: Duration) -> Settle {
        let started = Instant::now();
        let deadline = started + within;
        let mut last: Option<Vec<Option<u64>>> = None;
        let mut stable = 0;
        let settled = loop {
            // Every process but this one (whose descriptors the settling itself moves).
            let fds: Vec<Option<u64>> = self.pids[..self.pids.len() - 1]
                .iter()
                .map(|&p| probe::read_proc(p).fds)
                .collect();
            let mut quiet = true;
            for (_, tunnel) in &self.stack.tunnels {
                if let Some(api) = &tunnel.api
                    && let Ok(m) = probe::relay_metrics(api).await
                    && m.connections.is_some_and(|c| c > 0)
                {
                    quiet = false;
                }
            }
            if let Some(b) = baseline.and_then(|b| b.db_sessions)
                && self.db_sessions().await.is_some_and(|now| now > b)
            {
                quiet = false;
            }
            if last.as_ref() == Some(&fds) {
                stable += 1;
            } else {
                stable = 0;
            }
            last = Some(fds);
            if quiet && stable >= SETTLE_STABLE_POLLS {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        };
        let took = started.elapsed();
        if !settled {
            eprintln!(
                "warning: the processes did not settle within {} s",
                within.as_secs()
            );
        }
        Settle { took, settled }
    }
}

/// The first and the second SIGINT or SIGTERM: the first ends the hold early (or aborts
/// setup), the second aborts whatever runs.
struct Signals {
    count: watch::Receiver<(u32, &'static str)>,
}

impl Signals {
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        let (tx, rx) = watch::channel((0, ""));
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                tx.send_modify(|(n, last)| {
                    *n += 1;
                    *last = name;
                });
            }
        });
        Ok(Self { count: rx })
    }

    /// Waits until `n` signals have come; returns the last one's name.
    async fn wait(&self, n: u32) -> &'static str {
        let mut rx = self.count.clone();
        match rx.wait_for(|(count, _)| *count >= n).await {
            Ok(v) => v.1,
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs `work`, or fails at the first signal.
    async fn abort_on_first<T>(&self, work: impl Future<Output = T>) -> Result<T> {
        tokio::select! {
            out = work => Ok(out),
            sig = self.wait(1) => bail!("interrupted by {sig}"),
        }
    }

    /// Runs `work`, or fails at the second signal.
    async fn abort_on_second<T>(&self, work: impl Future<Output = T>) -> Result<T> {
        tokio::select! {
            out = work => Ok(out),
            sig = self.wait(2) => bail!("interrupted twice ({sig})"),
        }
    }
}

/// Raises this process's open-files limit (soft, and hard if needed) to at least `need`, so
/// that it and the processes it starts can hold every socket; fails when it cannot.
fn raise_fd_limit(need: u64) -> Result<()> {
    let read = || -> Result<(u64, u64)> {
        let limits =
            std::fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
        open_files_limits(&limits).context("no \"Max open files\" in /proc/self/limits")
    };
    let (soft, hard) = read()?;
    if soft >= need {
        return Ok(());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(max) = nr_open
        && max < need
    {
        bail!(
            "the soak needs {need} open files, above the kernel's maximum fs.nr_open = {max}: \
             raise it (sysctl fs.nr_open={need}) or lower --connections"
        );
    }
    // `prlimit` sets another process's limits, here this one's: no unsafe setrlimit here.
    let new_hard = hard.max(need);
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={need}:{new_hard}"))
        .stderr(std::process::Stdio::piped())
        .output();
    let (soft_now, hard_now) = read()?;
    if soft_now >= need {
        eprintln!("open-files limit raised from {soft}/{hard} to {soft_now}/{hard_now}");
        return Ok(());
    }
    let why = match status {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        Err(e) => format!("cannot run prlimit (util-linux): {e}"),
    };
    bail!(
        "the soak needs {need} open files (--connections × transports + 1000) but the limit is \
         {soft} (hard {hard}) and could not be raised{}: run it as root (with CAP_SYS_RESOURCE), \
         or raise the limit first (`ulimit -n {need}`, LimitNOFILE= in a unit), or run one soak \
         per transport side by side (`--transport quic` and `--transport websocket`: half the \
         descriptors each), or lower --connections",
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        }
    )
}

/// The soft and hard "Max open files" of a `/proc/PID/limits` text ("unlimited" is
/// `u64::MAX`).
fn open_files_limits(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let parse = |v: &str| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    Some((parse(fields.next()?)?, parse(fields.next()?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limits_are_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n\
                      Max locked memory         8388608              8388608              bytes     \n";
        assert_eq!(open_files_limits(limits), Some((20000, 20000)));
        assert_eq!(
            open_files_limits(
                "Max open files            1024                 unlimited            files\n"
            ),
            Some((1024, u64::MAX))
        );
        assert_eq!(open_files_limits("Max processes 1 1\n"), None);
    }

    #[test]
    fn answers_are_checked_exactly() {
        let bytes = |s: &str| Value::Bytes(s.as_bytes().to_vec());
        assert_eq!(
            check_answer(
                Some(vec![bytes("7"), bytes("42"), bytes("1234")]),
                7,
                42,
                1234
            ),
            Ok(())
        );
        assert_eq!(
            check_answer(
                Some(vec![Value::UInt(7), Value::Int(42), Value::UInt(1234)]),
                7,
                42,
                1234
            ),
            Ok(())
        );
        // Another session, another connection's query, a stale answer, a short row, nothing.
        for row in [
            Some(vec![bytes("7"), bytes("42"), bytes("1235")]),
            Some(vec![bytes("7"), bytes("43"), bytes("1234")]),
            Some(vec![bytes("6"), bytes("42"), bytes("1234")]),
            Some(vec![bytes("7"), bytes("42")]),
            Some(vec![bytes("7"), bytes("42"), bytes("1234"), bytes("0")]),
            Some(vec![bytes("7"), bytes("42"), Value::NULL]),
            None,
        ] {
            assert!(check_answer(row.clone(), 7, 42, 1234).is_err(), "{row:?}");
        }
    }

    #[test]
    fn the_schedule_has_the_middle_once() {
        let s = |d: u64, e: u64| -> Vec<(u64, &str)> {
            schedule(Duration::from_secs(d), Duration::from_secs(e))
                .into_iter()
                .map(|(at, l)| (at.as_secs(), l))
                .collect()
        };
        assert_eq!(s(90, 300), vec![(45, "middle")]);
        assert_eq!(
            s(3600, 300)
                .iter()
                .filter(|(_, l)| *l == "middle")
                .collect::<Vec<_>>(),
            vec![&(1800, "middle")]
        );
        assert_eq!(s(3600, 300).len(), 11);
        assert_eq!(
            s(100, 30),
            vec![(30, ""), (50, "middle"), (60, ""), (90, "")]
        );
    }
}
