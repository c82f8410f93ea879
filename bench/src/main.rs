//! `postern-bench`: what the tunnel costs, measured side by side with a direct connection.
//!
//! One run starts a private `mariadbd` and the release `postern-relay`, `postern-agent run` and
//! `postern-agent connect` as separate processes on loopback, twice (see [`stack`]), then
//! measures, with mysql_async as the client, the same workloads on several paths to the same
//! server:
//!
//! - **direct**: client → mariadbd;
//! - **QUIC**: client → `connect` → QUIC → relay → QUIC → agent → mariadbd;
//! - **WebSocket**: the same with a second relay, agent and `connect` that use WebSocket;
//! - **direct TLS**: client → mariadbd, MySQL with TLS and a client certificate;
//! - **relay MySQL-TLS**: the same driver settings at the relay's MySQL-native listener → QUIC →
//!   agent → mariadbd.
//!
//! The workloads (see [`workload`]) are bulk transfer of a large LONGBLOB, sysbench-style
//! point selects on one and on several connections (with latency percentiles), the time to open a
//! connection, and the memory the relay and agent hold per idle tunneled connection. The first
//! three paths run all of them (baseline: direct); the two TLS paths run the point selects and
//! connection setup (baseline: direct TLS).
//!
//! **Why ratios.** Absolute figures say more about the machine than about Postern: on loopback
//! the direct path is as fast as it will ever be, and all paths share the same few cores with the
//! database and the client. What carries over to other machines is the ratio of each path to its
//! direct baseline, measured in the same run. To keep background noise from landing on one path
//! only, every round runs each workload on every path back to back (rotating which goes first),
//! and the report gives the median over rounds and the median of the per-round ratios.
//!
//! Everything runs on loopback, so the tunnel's extra hops cost CPU and scheduling, not network
//! latency; the CPU table in the report shows which process is busy on each path.
//!
//! `postern-bench soak` (see [`soak`]) runs the same stack for a long time instead: many
//! connections through each tunnel, a query on each every few seconds, and the memory,
//! descriptors, threads and tasks of every process followed over time.

mod failover;
mod histogram;
mod probe;
mod report;
mod soak;
mod soak_report;
mod stack;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use mysql_async::prelude::Queryable;
use tokio::time::Instant;

use mysql_async::Opts;
use report::{Context, CpuUse, Memory, Metric, Report, Rss, Table, Target};
use stack::{Stack, Tunnel, cpu_ticks, rss_kib};
use workload::Path;

/// The memory target: (Δ relay RSS + Δ agent RSS) per idle connection.
const TARGET_KIB_PER_CONNECTION: f64 = 24.0;
/// Time given to the processes to settle before RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

/// Benchmark a direct MariaDB connection against the same through Postern.
///
/// Build first: `cargo build --release -p postern-relay -p postern-agent -p postern-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "postern-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Without a command: the benchmark.
    #[command(subcommand)]
    command: Option<Command>,
    /// Rounds; each runs every workload on every path [default: 4, --quick: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Seconds per point-select measurement; bulk transfers run for half of it
    /// [default: 4, --quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// A short smoke-test run (1 round of 1 s, 50 connection setups, 200 idle connections).
    #[arg(long)]
    quick: bool,
    /// New connections timed per path and round [default: 100, --quick: 50].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connects: Option<u32>,
    /// Idle connections held through each tunnel for the memory test [default: 1000,
    /// --quick: 200];
    /// below 1900, as the test server allows 2000 connections.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..1900))]
    idle: Option<u32>,
    /// Concurrent connections for the concurrent point-select test.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=256))]
    threads: u32,
    /// Size of the blob for the bulk tests, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=200))]
    blob_mib: u32,
    /// Rows in the point-select table.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    rows: u32,
    /// Worker threads of the relay, agent and connect runtimes (sets TOKIO_WORKER_THREADS for
    /// them) [default: as deployed: one per CPU in the relay and agent, one in connect].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    postern_threads: Option<u32>,
    /// Where postern-relay and postern-agent are [default: the directory of this program].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Failover trials per fault (503, hang) on a stack of their own: two nodes behind one
    /// agent at its default check settings; 0 skips them [default: 10, --quick: 3].
    #[arg(long)]
    failover_trials: Option<u32>,
    /// Measure only the failover time.
    #[arg(long)]
    failover_only: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// What else the bench can run.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Hold many tunneled connections through QUIC and WebSocket for a long time, a query on
    /// each every few seconds; report errors, latency, and every process's memory,
    /// descriptors, threads and tasks over time (not for CI: an hour by default).
    Soak(soak::SoakArgs),
}

/// The run's parameters, with defaults filled in.
#[derive(Debug)]
struct Settings {
    rounds: usize,
    duration: Duration,
    connects: usize,
    idle: usize,
    threads: usize,
    blob_bytes: usize,
    rows: u32,
    postern_threads: Option<u32>,
    failover_trials: usize,
}

impl Settings {
    fn new(args: &Args) -> Result<Self> {
        let q = args.quick;
        let seconds = args.seconds.unwrap_or(if q { 1.0 } else { 4.0 });
        if !(seconds.is_finite() && (0.1..=600.0).contains(&seconds)) {
            bail!("--seconds must be between 0.1 and 600, got {seconds}");
        }
        let idle = args.idle.unwrap_or(if q { 200 } else { 1000 }) as usize;
        Ok(Self {
            rounds: args.rounds.unwrap_or(if q { 1 } else { 4 }) as usize,
            duration: Duration::from_secs_f64(seconds),
            connects: args.connects.unwrap_or(if q { 50 } else { 100 }) as usize,
            idle,
            threads: args.threads as usize,
            blob_bytes: args.blob_mib as usize * 1024 * 1024,
            rows: args.rows,
            postern_threads: args.postern_threads,
            failover_trials: args.failover_trials.unwrap_or(if q { 3 } else { 10 }) as usize,
        })
    }

    fn describe(&self) -> String {
        let threads = match self.postern_threads {
            Some(n) => format!("; relay, agent and connect with {n} runtime worker thread(s)"),
            None => String::new(),
        };
        format!(
            "{} round(s); point selects {:.1} s per path and round on 1 and {} connections, \
             {} rows; bulk {} MiB blob, ≥ {:.1} s per path and round; {} connection setups \
             per path and round; {} idle connections{threads}",
            self.rounds,
            self.duration.as_secs_f64(),
            self.threads,
            self.rows,
            self.blob_bytes / (1024 * 1024),
            self.bulk_duration().as_secs_f64(),
            self.connects,
            self.idle
        )
    }

    fn bulk_duration(&self) -> Duration {
        self.duration / 2
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Soak(soak_args)) = args.command.take() {
        // The soak handles signals itself: the first ends the hold early and still reports.
        return match runtime.block_on(soak::run(soak_args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("error: the soak failed (see the report's result)");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // On a signal the benchmark future is dropped, which stops every child process.
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(args) => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let settings = Settings::new(&args)?;
    check_fd_limit(settings.idle)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => stack::default_bin_dir()?,
    };
    let env: Vec<(&str, String)> = settings
        .postern_threads
        .map(|n| ("TOKIO_WORKER_THREADS", n.to_string()))
        .into_iter()
        .collect();
    let text = if args.failover_only {
        stack::check_binaries(&bin_dir)?;
        failover::measure(&bin_dir, &env, settings.failover_trials.max(1)).await?
    } else {
        eprintln!(
            "starting mariadbd and two tunnels (QUIC, WebSocket) of postern-relay, \
             postern-agent run and postern-agent connect"
        );
        let stack = Stack::start(&bin_dir, settings.postern_threads).await?;
        let measured = measure(&stack, &settings).await;
        for problem in stack.shutdown() {
            eprintln!("warning: {problem}");
        }
        let mut text = measured?.markdown();
        if settings.failover_trials > 0 {
            text.push_str(&failover::measure(&bin_dir, &env, settings.failover_trials).await?);
        }
        text
    };
    println!("{text}");
    if let Some(path) = &args.output {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Connection options of every path.
struct Paths {
    direct: Opts,
    quic: Opts,
    ws: Opts,
    direct_tls: Opts,
    relay_tls: Opts,
}

impl Paths {
    fn get(&self, p: Path) -> &Opts {
        match p {
            Path::Direct => &self.direct,
            Path::Quic => &self.quic,
            Path::WebSocket => &self.ws,
            Path::DirectTls => &self.direct_tls,
            Path::RelayTls => &self.relay_tls,
        }
    }
}

/// The paths of the first table (plaintext MySQL; direct is the baseline).
const TUNNEL_PATHS: [Path; 3] = [Path::Direct, Path::Quic, Path::WebSocket];
/// The paths of the second table (MySQL with TLS; direct TLS is the baseline).
const TLS_PATHS: [Path; 2] = [Path::DirectTls, Path::RelayTls];

/// The column of `path` in its table.
fn column(path: Path) -> usize {
    match path {
        Path::Direct | Path::DirectTls => 0,
        Path::Quic | Path::RelayTls => 1,
        Path::WebSocket => 2,
    }
}

/// The point-select and connection-setup rows, which both tables have.
struct Common {
    select1: Metric,
    select1_p50: Metric,
    select1_p99: Metric,
    select_n: Metric,
    setup_mean: Metric,
    setup_p50: Metric,
}

impl Common {
    fn new(threads: usize, tls: bool) -> Self {
        let setup = if tls {
            "connection setup incl. TLS handshake"
        } else {
            "connection setup"
        };
        Self {
            select1: Metric::new("point select, 1 connection (q/s)", 0, Target::AtLeast(0.60)),
            select1_p50: Metric::new(
                "point select latency p50, 1 connection (µs)",
                0,
                Target::None,
            ),
            select1_p99: Metric::new(
                "point select latency p99, 1 connection (µs)",
                0,
                Target::None,
            ),
            select_n: Metric::new(
                format!("point select, {threads} connections (q/s)"),
                0,
                Target::AtLeast(0.55),
            ),
            setup_mean: Metric::new(format!("{setup}, mean (ms)"), 2, Target::AtMost(1.5)),
            setup_p50: Metric::new(format!("{setup}, p50 (ms)"), 2, Target::AtMost(1.5)),
        }
    }

    fn into_rows(self) -> Vec<Metric> {
        vec![
            self.select1,
            self.select1_p50,
            self.select1_p99,
            self.select_n,
            self.setup_mean,
            self.setup_p50,
        ]
    }

    /// Point selects on one and on several connections, then connection setups, each on every
    /// path in `paths` back to back.
    async fn run(
        &mut self,
        meter: &mut Meter,
        opts: &Paths,
        paths: &[Path],
        s: &Settings,
        seed: u64,
    ) -> Result<()> {
        for &path in paths {
            let r = meter
                .run(
                    "point select, 1 conn",
                    path,
                    workload::point_select(opts.get(path), s.rows, s.duration, seed),
                )
                .await?;
            progress("point select, 1 conn", path, r.qps, "q/s");
            let c = column(path);
            self.select1.record(c, r.qps);
            self.select1_p50
                .record(c, micros(report::percentile(&r.latencies, 50.0)));
            self.select1_p99
                .record(c, micros(report::percentile(&r.latencies, 99.0)));
        }
        for &path in paths {
            let v = meter
                .run(
                    "point select, concurrent",
                    path,
                    workload::point_select_concurrent(
                        opts.get(path),
                        s.rows,
                        s.threads,
                        s.duration,
                        seed,
                    ),
                )
                .await?;
            progress("point select, concurrent", path, v, "q/s");
            self.select_n.record(column(path), v);
        }
        for &path in paths {
            let mut samples = meter
                .run(
                    "connection setup",
                    path,
                    workload::connection_setup(opts.get(path), s.connects),
                )
                .await?;
            samples.sort_unstable();
            let mean = millis(report::mean(&samples));
            progress("connection setup", path, mean, "ms mean");
            self.setup_mean.record(column(path), mean);
            self.setup_p50
                .record(column(path), millis(report::percentile(&samples, 50.0)));
        }
        Ok(())
    }
}

/// Runs every measurement against a started stack.
async fn measure(stack: &Stack, s: &Settings) -> Result<Report> {
    let started = Instant::now();
    eprintln!(
        "creating the bench database ({} rows, {} MiB blob)",
        s.rows,
        s.blob_bytes >> 20
    );
    workload::prepare(stack.db.addr, s.rows, s.blob_bytes).await?;
    let db = Some("bench");
    let mysql = stack
        .quic
        .mysql
        .context("the QUIC relay has no MySQL listener")?;
    let opts = Paths {
        direct: workload::opts(stack.db.addr, db),
        quic: workload::opts(stack.quic.addr, db),
        ws: workload::opts(stack.ws.addr, db),
        direct_tls: workload::tls_opts(stack.db.addr, db, &stack.ca, &stack.client_cert),
        relay_tls: workload::tls_opts(mysql, db, &stack.ca, &stack.client_cert),
    };

    // Every path reaches the same server; the TLS paths really use TLS (mysql_async refuses a
    // server that offers none), and the direct one ends at mariadbd.
    let mut version = None;
    for path in TUNNEL_PATHS.into_iter().chain(TLS_PATHS) {
        let mut probe = mysql_async::Conn::new(opts.get(path).clone())
            .await
            .with_context(|| format!("first connection ({})", path.as_str()))?;
        let v: Option<String> = probe.query_first("SELECT VERSION()").await?;
        version = version.or(v);
        if path == Path::DirectTls {
            let cipher: Option<(String, String)> = probe
                .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
                .await?;
            ensure!(
                cipher.is_some_and(|(_, c)| !c.is_empty()),
                "the direct TLS connection has no cipher"
            );
        }
        probe.disconnect().await?;
    }
    let context = Context::gather(
        &stack::workspace_root(),
        format!("MariaDB {}", version.unwrap_or_default()),
        s.describe(),
    );

    // Memory first, while the processes are fresh: after a bulk transfer the allocator keeps
    // freed megabytes around, and new connections would fill those instead of growing RSS.
    // A few connections first, so that one-time setup is not counted per connection.
    let mut memory = Vec::new();
    for (name, tunnel, path) in [
        ("QUIC", &stack.quic, Path::Quic),
        ("WebSocket", &stack.ws, Path::WebSocket),
    ] {
        workload::connection_setup(opts.get(path), 10).await?;
        eprintln!(
            "memory ({name}): holding {} idle tunneled connections",
            s.idle
        );
        let m = idle_memory(stack, tunnel, name, opts.get(path), s.idle).await?;
        eprintln!(
            "  relay + agent: {:.1} KiB per connection",
            m.per_connection_kib()
        );
        memory.push(m);
    }

    eprintln!("warming up every path");
    for path in TUNNEL_PATHS.into_iter().chain(TLS_PATHS) {
        workload::point_select(opts.get(path), s.rows, Duration::from_millis(300), 0).await?;
        if TUNNEL_PATHS.contains(&path) {
            workload::bulk_read(opts.get(path), Duration::ZERO, s.blob_bytes).await?;
        }
        workload::connection_setup(opts.get(path), 10).await?;
    }

    let mut meter = Meter::new(stack);
    let mib = s.blob_bytes >> 20;
    let mut bulk_read = Metric::new(
        format!("bulk read, {mib} MiB LONGBLOB (MiB/s)"),
        0,
        Target::AtLeast(0.20),
    );
    let mut bulk_write = Metric::new(
        format!("bulk write, {mib} MiB parameter (MiB/s)"),
        0,
        Target::None,
    );
    let mut plain = Common::new(s.threads, false);
    let mut tls = Common::new(s.threads, true);

    for round in 0..s.rounds {
        // Rotate which path goes first, so none always runs right after another's load.
        let mut paths = TUNNEL_PATHS;
        paths.rotate_left(round % TUNNEL_PATHS.len());
        let mut tls_paths = TLS_PATHS;
        tls_paths.rotate_left(round % TLS_PATHS.len());
        let seed = round as u64 + 1;
        eprintln!(
            "round {}/{} ({} and {} first)",
            round + 1,
            s.rounds,
            paths[0].as_str(),
            tls_paths[0].as_str()
        );
        for path in paths {
            let v = meter
                .run(
                    "bulk read",
                    path,
                    workload::bulk_read(opts.get(path), s.bulk_duration(), s.blob_bytes),
                )
                .await?;
            progress("bulk read", path, v, "MiB/s");
            bulk_read.record(column(path), v);
        }
        for path in paths {
            let v = meter
                .run(
                    "bulk write",
                    path,
                    workload::bulk_write(opts.get(path), s.bulk_duration(), s.blob_bytes),
                )
                .await?;
            progress("bulk write", path, v, "MiB/s");
            bulk_write.record(column(path), v);
        }
        plain.run(&mut meter, &opts, &paths, s, seed).await?;
        tls.run(&mut meter, &opts, &tls_paths, s, seed).await?;
    }

    let mut main_rows = vec![bulk_read, bulk_write];
    main_rows.extend(plain.into_rows());
    Ok(Report {
        context,
        rounds: s.rounds,
        tables: vec![
            Table {
                title: String::new(),
                columns: TUNNEL_PATHS.iter().map(|p| p.as_str()).collect(),
                metrics: main_rows,
                memory_row: true,
            },
            Table {
                title: "MySQL-native TLS: a stock driver at the relay's MySQL listener vs. \
                        TLS straight to mariadbd"
                    .into(),
                columns: TLS_PATHS.iter().map(|p| p.as_str()).collect(),
                metrics: tls.into_rows(),
                memory_row: false,
            },
        ],
        memory,
        cpu: meter.cpu,
        ticks_per_second: stack::ticks_per_second(),
        elapsed: started.elapsed(),
    })
}

/// RSS of `tunnel`'s relay, agent and connect, and of mariadbd, before, while and after holding
/// `n` idle connections through it.
async fn idle_memory(
    stack: &Stack,
    tunnel: &Tunnel,
    name: &'static str,
    opts: &Opts,
    n: usize,
) -> Result<Memory> {
    let procs: [(&'static str, u32); 4] = [
        ("relay", tunnel.relay.pid()),
        ("agent", tunnel.agent.pid()),
        ("connect", tunnel.connect.pid()),
        ("mariadbd", stack.db_pid),
    ];
    let read = || -> Result<Vec<u64>> { procs.iter().map(|(_, pid)| rss_kib(*pid)).collect() };
    tokio::time::sleep(SETTLE).await;
    let before = read()?;
    let conns = workload::open_idle(opts, n).await?;
    tokio::time::sleep(SETTLE).await;
    let held = read()?;
    workload::close_all(conns).await?;
    tokio::time::sleep(SETTLE).await;
    let closed = read()?;
    Ok(Memory {
        tunnel: name,
        connections: n,
        rss: procs
            .iter()
            .enumerate()
            .map(|(i, (name, _))| Rss {
                name,
                before: before[i],
                held: held[i],
                closed: closed[i],
            })
            .collect(),
        target_kib: TARGET_KIB_PER_CONNECTION,
    })
}

/// Follows the CPU time of every process while workloads run.
struct Meter {
    /// The client (this process) and mariadbd.
    common: [u32; 2],
    /// connect, relay and agent of the QUIC tunnel (also the relay of the MySQL-native path).
    quic: [u32; 3],
    /// connect, relay and agent of the WebSocket tunnel.
    ws: [u32; 3],
    cpu: Vec<CpuUse>,
}

impl Meter {
    fn new(stack: &Stack) -> Self {
        let pids = |t: &Tunnel| [t.connect.pid(), t.relay.pid(), t.agent.pid()];
        Self {
            common: [std::process::id(), stack.db_pid],
            quic: pids(&stack.quic),
            ws: pids(&stack.ws),
            cpu: Vec::new(),
        }
    }

    /// Runs `work`, adding its wall time and every process's CPU time to `workload`/`path`.
    async fn run<T>(
        &mut self,
        workload: &'static str,
        path: Path,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let before = self.ticks(path)?;
        let start = Instant::now();
        let out = work
            .await
            .with_context(|| format!("{workload} ({})", path.as_str()))?;
        let wall = start.elapsed();
        let after = self.ticks(path)?;
        let path = path.as_str();
        let entry = match self
            .cpu
            .iter_mut()
            .position(|u| u.workload == workload && u.path == path)
        {
            Some(i) => &mut self.cpu[i],
            None => {
                self.cpu.push(CpuUse {
                    workload,
                    path,
                    wall: Duration::ZERO,
                    ticks: [0; 5],
                });
                self.cpu.last_mut().context("just pushed")?
            }
        };
        entry.wall += wall;
        for (i, t) in entry.ticks.iter_mut().enumerate() {
            *t += after[i].saturating_sub(before[i]);
        }
        Ok(out)
    }

    /// CPU ticks of the processes of `path`, in report::PROCESSES order: for the WebSocket path
    /// that tunnel's connect, relay and agent, for every other path the QUIC tunnel's.
    fn ticks(&self, path: Path) -> Result<[u64; 5]> {
        let tunnel = if path == Path::WebSocket {
            self.ws
        } else {
            self.quic
        };
        let mut t = [0; 5];
        for (slot, pid) in t.iter_mut().zip(self.common.into_iter().chain(tunnel)) {
            *slot = cpu_ticks(pid)?;
        }
        Ok(t)
    }
}

fn progress(what: &str, path: Path, value: f64, unit: &str) {
    eprintln!("  {what:<24} {:<15} {value:>10.2} {unit}", path.as_str());
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Fails early when this process (and so its children, which inherit the limit) cannot open
/// enough sockets for the idle-connections test.
fn check_fd_limit(idle: usize) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    let need = idle + 256;
    match soft {
        Some(soft) if soft < need => bail!(
            "the open-files limit is {soft}, the idle test needs about {need}: \
             raise it (`ulimit -n {need}`) or lower --idle"
        ),
        _ => Ok(()),
    }
}

/// Waits for SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
