//! Statistics over rounds and the markdown report: the main table (direct, tunnel, ratio,
//! target, pass or fail), the memory detail, CPU use per process, and the machine it ran on.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What a ratio tunnel/direct must satisfy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// The tunnel must reach at least this fraction of direct (throughput).
    AtLeast(f64),
    /// The tunnel may take at most this multiple of direct (time).
    AtMost(f64),
    /// Shown for context only.
    None,
}

impl Target {
    fn describe(self) -> String {
        match self {
            Self::AtLeast(x) => format!("≥ {x:.2}×"),
            Self::AtMost(x) => format!("≤ {x:.2}×"),
            Self::None => "—".into(),
        }
    }

    fn verdict(self, ratio: f64) -> &'static str {
        match self {
            Self::AtLeast(x) if ratio >= x => "pass",
            Self::AtMost(x) if ratio <= x => "pass",
            Self::None => "—",
            _ => "**FAIL**",
        }
    }
}

/// One row of a table: a value per round for each of the table's paths.
#[derive(Debug)]
pub(crate) struct Metric {
    /// What is measured, with its unit.
    pub(crate) name: String,
    /// Decimal places to print.
    pub(crate) decimals: usize,
    /// The condition on each path's ratio to the table's first path.
    pub(crate) target: Target,
    /// Per path of the table (the first is the baseline), one value per round.
    pub(crate) values: Vec<Vec<f64>>,
}

impl Metric {
    pub(crate) fn new(name: impl Into<String>, decimals: usize, target: Target) -> Self {
        Self {
            name: name.into(),
            decimals,
            target,
            values: Vec::new(),
        }
    }

    /// Adds the value of path `column` for the current round.
    pub(crate) fn record(&mut self, column: usize, value: f64) {
        if self.values.len() <= column {
            self.values.resize_with(column + 1, Vec::new);
        }
        self.values[column].push(value);
    }

    /// The per-round ratios path `column` / baseline (rounds are paired: every path ran in
    /// each round, back to back), finite ones only.
    fn ratios(&self, column: usize) -> Vec<f64> {
        let (Some(base), Some(other)) = (self.values.first(), self.values.get(column)) else {
            return Vec::new();
        };
        base.iter()
            .zip(other)
            .map(|(d, t)| t / d)
            .filter(|r| r.is_finite())
            .collect()
    }
}

/// Metrics measured on several paths, the first being the baseline.
#[derive(Debug)]
pub(crate) struct Table {
    /// A heading, or empty for none.
    pub(crate) title: String,
    /// The paths, as column names; the first is the baseline.
    pub(crate) columns: Vec<&'static str>,
    /// The rows.
    pub(crate) metrics: Vec<Metric>,
    /// With the idle-memory row, one [`Memory`] per column after the first.
    pub(crate) memory_row: bool,
}

/// RSS of one process around the idle-connections test, in KiB.
#[derive(Debug)]
pub(crate) struct Rss {
    /// The process.
    pub(crate) name: &'static str,
    /// Before opening the connections.
    pub(crate) before: u64,
    /// With all of them open and idle.
    pub(crate) held: u64,
    /// After closing them again.
    pub(crate) closed: u64,
}

/// The idle-connections memory test.
#[derive(Debug)]
pub(crate) struct Memory {
    /// Which tunnel (QUIC, WebSocket).
    pub(crate) tunnel: &'static str,
    /// How many tunneled connections were held.
    pub(crate) connections: usize,
    /// relay, agent, connect, mariadbd.
    pub(crate) rss: Vec<Rss>,
    /// The limit on (Δ relay + Δ agent) / connections, in KiB.
    pub(crate) target_kib: f64,
}

impl Memory {
    fn delta(&self, name: &str) -> f64 {
        self.rss
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.held as f64 - r.before as f64)
            .unwrap_or(0.0)
    }

    /// (Δ relay + Δ agent) / connections, in KiB.
    pub(crate) fn per_connection_kib(&self) -> f64 {
        (self.delta("relay") + self.delta("agent")) / self.connections.max(1) as f64
    }
}

/// The processes whose CPU time is followed, in table order.
pub(crate) const PROCESSES: [&str; 5] = ["client", "mariadbd", "connect", "relay", "agent"];

/// CPU time used by each process during all rounds of one workload on one path.
#[derive(Debug)]
pub(crate) struct CpuUse {
    /// The workload.
    pub(crate) workload: &'static str,
    /// The path (direct, QUIC, ...).
    pub(crate) path: &'static str,
    /// Wall time summed over rounds.
    pub(crate) wall: Duration,
    /// Clock ticks per process, in [`PROCESSES`] order.
    pub(crate) ticks: [u64; 5],
}

/// Where and how the benchmark ran.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) memory: String,
    pub(crate) load: String,
    pub(crate) mariadb: String,
    pub(crate) settings: String,
    pub(crate) command: String,
}

impl Context {
    /// Reads the machine's description and the git commit of `workspace`.
    pub(crate) fn gather(workspace: &Path, mariadb: String, settings: String) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let commit = match output(Command::new("git").arg("-C").arg(workspace).args([
            "rev-parse",
            "--short=12",
            "HEAD",
        ])) {
            Some(c) => {
                let dirty = output(Command::new("git").arg("-C").arg(workspace).args([
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ]))
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c} (with uncommitted changes)")
                } else {
                    c
                }
            }
            None => "unknown".into(),
        };
        Self {
            date: output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .unwrap_or_else(|| "unknown".into()),
            commit,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|k| k.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            memory,
            load: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".into()),
            mariadb,
            settings,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

/// Everything measured.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) context: Context,
    pub(crate) rounds: usize,
    pub(crate) tables: Vec<Table>,
    /// One per tunnel, in the order of the first table's columns after the first.
    pub(crate) memory: Vec<Memory>,
    pub(crate) cpu: Vec<CpuUse>,
    pub(crate) ticks_per_second: f64,
    pub(crate) elapsed: Duration,
}

impl Report {
    /// The report as markdown.
    pub(crate) fn markdown(&self) -> String {
        let c = &self.context;
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "## Postern benchmark: direct MariaDB vs. through Postern\n"
        );
        let _ = writeln!(w, "- date: {}", c.date);
        let _ = writeln!(w, "- commit: {}", c.commit);
        let _ = writeln!(
            w,
            "- machine: {} CPUs ({}), {} RAM, Linux {}, load average at start {}",
            c.cpus, c.cpu_model, c.memory, c.kernel, c.load
        );
        let _ = writeln!(w, "- server: {}", c.mariadb);
        let _ = writeln!(w, "- settings: {}", c.settings);
        let _ = writeln!(w, "- command: `{}`", c.command);
        let _ = writeln!(w, "- total run time: {:.0} s\n", self.elapsed.as_secs_f64());

        for table in &self.tables {
            self.table(w, table);
        }
        let _ = writeln!(
            w,
            "Values are medians over {} round(s); each round runs every workload on every path \
             of a table back to back (rotating which goes first), and a ratio is the median of \
             the per-round ratios to the table's first column, with their range in brackets. \
             Throughput ratios should be high, time ratios low. Where a table compares several \
             paths, the result column gives one verdict per ratio, in column order.\n",
            self.rounds
        );

        let n = self.memory.first().map_or(0, |m| m.connections);
        let _ = writeln!(
            w,
            "### Memory: RSS with {n} idle tunneled connections (KiB)\n"
        );
        let _ = writeln!(
            w,
            "| tunnel | process | before | held open | per connection | after closing |"
        );
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|");
        for mem in &self.memory {
            for r in &mem.rss {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {:.1} | {} |",
                    mem.tunnel,
                    r.name,
                    r.before,
                    r.held,
                    (r.held as f64 - r.before as f64) / mem.connections.max(1) as f64,
                    r.closed
                );
            }
        }
        let _ = writeln!(
            w,
            "\nEach tunnel has its own relay, agent and `connect`, measured fresh, one tunnel after \
             the other. The target counts relay + agent, the two long-running Postern processes; \
             `connect` runs on the user's machine and mariadbd's own cost is there for scale.\n"
        );

        let _ = writeln!(
            w,
            "### CPU use during the measurements (% of one core; {} CPUs = {}%)\n",
            c.cpus,
            c.cpus * 100
        );
        let _ = write!(w, "| workload | path |");
        for p in PROCESSES {
            let _ = write!(w, " {p} |");
        }
        let _ = writeln!(w, " total |");
        let _ = writeln!(w, "|---|---|{}---:|", "---:|".repeat(PROCESSES.len()));
        for u in &self.cpu {
            let wall = u.wall.as_secs_f64().max(1e-9);
            let pct = |t: u64| t as f64 / self.ticks_per_second / wall * 100.0;
            let _ = write!(w, "| {} | {} |", u.workload, u.path);
            for t in u.ticks {
                let _ = write!(w, " {:.0} |", pct(t));
            }
            let total: u64 = u.ticks.iter().sum();
            let _ = writeln!(w, " {:.0} |", pct(total));
        }
        out
    }

    /// One table: values per path, ratios to the first path, target and verdicts.
    fn table(&self, w: &mut String, t: &Table) {
        let Some((base, others)) = t.columns.split_first() else {
            return;
        };
        if !t.title.is_empty() {
            let _ = writeln!(w, "### {}\n", t.title);
        }
        let _ = write!(w, "| metric |");
        for c in &t.columns {
            let _ = write!(w, " {c} |");
        }
        for c in others {
            let _ = write!(w, " {c}/{base} (range) |");
        }
        let _ = writeln!(w, " target | result |");
        let _ = writeln!(
            w,
            "|---|{}{}---|---|",
            "---:|".repeat(t.columns.len()),
            "---:|".repeat(others.len())
        );
        for m in &t.metrics {
            let _ = write!(w, "| {} |", m.name);
            for i in 0..t.columns.len() {
                let v = m.values.get(i).map(|v| median(v)).unwrap_or(f64::NAN);
                let _ = write!(w, " {v:.*} |", m.decimals);
            }
            let mut verdicts = Vec::new();
            for i in 1..t.columns.len() {
                let ratios = m.ratios(i);
                if ratios.is_empty() {
                    let _ = write!(w, " — |");
                    continue;
                }
                let ratio = median(&ratios);
                let (lo, hi) = min_max(&ratios);
                let _ = write!(w, " {ratio:.2}× ({lo:.2}–{hi:.2}) |");
                verdicts.push(m.target.verdict(ratio));
            }
            let _ = writeln!(
                w,
                " {} | {} |",
                m.target.describe(),
                verdict_list(&verdicts)
            );
        }
        if t.memory_row {
            let _ = write!(
                w,
                "| memory per idle tunneled connection, relay + agent RSS (KiB) | — |"
            );
            let mut verdicts = Vec::new();
            let mut target = 0.0;
            for i in 0..others.len() {
                match self.memory.get(i) {
                    Some(mem) => {
                        let per_conn = mem.per_connection_kib();
                        target = mem.target_kib;
                        let _ = write!(w, " {per_conn:.1} |");
                        verdicts.push(if per_conn <= mem.target_kib {
                            "pass"
                        } else {
                            "**FAIL**"
                        });
                    }
                    None => {
                        let _ = write!(w, " — |");
                    }
                }
            }
            let _ = writeln!(
                w,
                "{} ≤ {target:.0} KiB | {} |",
                " — |".repeat(others.len()),
                verdict_list(&verdicts)
            );
        }
        let _ = writeln!(w);
    }
}

/// Verdicts joined with " / ", or "—" when all are "—".
fn verdict_list(verdicts: &[&str]) -> String {
    if verdicts.iter().all(|v| *v == "—") {
        "—".into()
    } else {
        verdicts.join(" / ")
    }
}

/// The median of `values` (0 when empty).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of sorted `values`, nearest rank.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The mean of `values`.
pub(crate) fn mean(values: &[Duration]) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.iter().sum::<Duration>() / values.len() as u32
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn verdicts() {
        assert_eq!(Target::AtLeast(0.2).verdict(0.25), "pass");
        assert_eq!(Target::AtLeast(0.2).verdict(0.15), "**FAIL**");
        assert_eq!(Target::AtMost(1.5).verdict(1.2), "pass");
        assert_eq!(Target::AtMost(1.5).verdict(1.6), "**FAIL**");
    }
}
