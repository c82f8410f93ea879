//! The soak's markdown report: the verdict, the queries per transport, the processes at the
//! named samples (baseline, start, middle, end, after close) with their drift, and the time
//! series.

use std::fmt::Write as _;
use std::time::Duration;

use crate::probe::Reading;
use crate::report::Context;
use crate::soak::{Sample, Settings, TrafficSnapshot, show};

/// Everything the soak measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) context: Context,
    pub(crate) settings: Settings,
    /// QUIC, WebSocket.
    pub(crate) transports: Vec<TransportSummary>,
    /// baseline, start, the series and middle, end, after close.
    pub(crate) samples: Vec<Sample>,
    /// The processes of each sample's readings, in order.
    pub(crate) processes: Vec<String>,
    /// Settling before the baseline.
    pub(crate) baseline_settle: Settle,
    /// Settling after the connections were closed.
    pub(crate) settle: Settle,
    /// The signal that ended the hold early, and when.
    pub(crate) interrupted: Option<(&'static str, Duration)>,
    /// Readings that could not be made (once each).
    pub(crate) notes: Vec<String>,
    /// Processes that did not exit cleanly when the stack was stopped.
    pub(crate) shutdown_problems: Vec<String>,
    pub(crate) ticks_per_second: f64,
}

/// How waiting for the processes to settle went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settle {
    pub(crate) took: Duration,
    pub(crate) settled: bool,
}

/// One transport's queries over the whole soak.
#[derive(Debug)]
pub(crate) struct TransportSummary {
    pub(crate) name: &'static str,
    /// The counters at the end of the hold.
    pub(crate) snapshot: TrafficSnapshot,
    pub(crate) reopened: u64,
    pub(crate) close_failures: u64,
    pub(crate) open_time: Duration,
    pub(crate) close_time: Duration,
    /// How long the queries ran.
    pub(crate) held: Duration,
    /// Problems of every kind (opens, queries, wrong answers, closes).
    pub(crate) problems: u64,
    /// The first few, verbatim.
    pub(crate) messages: Vec<String>,
}

impl Outcome {
    /// What makes the soak fail; empty when it passed.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((sig, at)) = self.interrupted {
            out.push(format!(
                "interrupted by {sig} after {:.0} s of {} s",
                at.as_secs_f64(),
                self.settings.duration.as_secs()
            ));
        }
        let n = self.settings.connections as u64;
        let start = self.samples.iter().find(|s| s.label == "start");
        for (i, t) in self.transports.iter().enumerate() {
            let s = &t.snapshot;
            let name = t.name;
            if let Some(open) = start.map(|st| st.traffic[i].open)
                && open < n
            {
                out.push(format!("{name}: only {open} of {n} connections opened"));
            }
            for (count, what) in [
                (s.open_failures, "failed opening attempts"),
                (s.errors, "queries failed or went unanswered"),
                (s.wrong, "wrong answers"),
                (t.close_failures, "connections did not close cleanly"),
            ] {
                if count > 0 {
                    out.push(format!("{name}: {count} {what}"));
                }
            }
            if s.sent != s.answered {
                out.push(format!(
                    "{name}: {} queries sent, {} answered",
                    s.sent, s.answered
                ));
            }
            if s.sent == 0 {
                out.push(format!("{name}: no query was sent"));
            }
        }
        for (p, name) in self.processes.iter().enumerate() {
            if let Some(gone) = self
                .samples
                .iter()
                .find(|s| s.procs.get(p).is_some_and(|r| !r.alive()))
            {
                out.push(format!("{name} was gone at the {} sample", label(gone)));
            }
        }
        out.extend(self.shutdown_problems.iter().cloned());
        out
    }

    pub(crate) fn clean(&self) -> bool {
        self.failures().is_empty()
    }
}

/// The settings in one paragraph, for the report's header.
pub(crate) fn describe(s: &Settings) -> String {
    let n = s.connections;
    let rate = n as f64 / s.interval.as_secs_f64();
    let cap = match s.service_max_connections {
        Some(m) => format!(
            "the relays' per-service `max_connections` set to {m} (the default, 10000, leaves \
             no room above {n})"
        ),
        None => "the relays' limits at their defaults".into(),
    };
    format!(
        "{n} connections through {} held for {} s, a query on each every {:.1} s ({rate:.0} q/s \
         per transport), the first ones spread over the first interval; opened {} at a time; a \
         query, open or close counts as failed after {} s; samples every {} s; open-files limit \
         {}; one relay, agent and `connect` per transport, and one mariadbd for all, with \
         `{}`; {cap}",
        transports(s),
        s.duration.as_secs(),
        s.interval.as_secs_f64(),
        s.open_parallel,
        s.query_timeout.as_secs(),
        s.sample_every.as_secs(),
        s.fd_limit,
        s.mariadbd.join(" "),
    )
}

/// "QUIC", or "each of QUIC and WebSocket (20000 in all)".
fn transports(s: &Settings) -> String {
    let names: Vec<&str> = s.transports.iter().map(|t| t.name()).collect();
    if names.len() == 1 {
        names[0].to_owned()
    } else {
        format!(
            "each of {} ({} in all)",
            names.join(" and "),
            names.len() * s.connections
        )
    }
}

/// The whole report.
pub(crate) fn markdown(o: &Outcome) -> String {
    let mut w = String::new();
    let c = &o.context;
    let s = &o.settings;
    let _ = writeln!(
        w,
        "## Soak: {} tunneled connections through {} for {} s\n",
        s.connections,
        transports(s),
        s.duration.as_secs()
    );
    let load_end = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(w, "- date: {}", c.date);
    let _ = writeln!(w, "- commit: {}", c.commit);
    let _ = writeln!(
        w,
        "- machine: {} CPUs ({}), {} RAM, Linux {}, load average at start {}, at the end {}",
        c.cpus, c.cpu_model, c.memory, c.kernel, c.load, load_end
    );
    let _ = writeln!(w, "- server: {}", c.mariadb);
    let _ = writeln!(w, "- settings: {}", c.settings);
    let _ = writeln!(w, "- command: `{}`", c.command);
    let _ = writeln!(w);

    let failures = o.failures();
    if failures.is_empty() {
        let _ = writeln!(
            w,
            "**Result: pass.** Every connection opened, no query failed, no answer was wrong, \
             every query sent was answered, every process ran to the end and stopped cleanly.\n"
        );
    } else {
        let _ = writeln!(w, "**Result: FAIL.**\n");
        for f in &failures {
            let _ = writeln!(w, "- {f}");
        }
        let _ = writeln!(w);
    }

    queries(&mut w, o);
    drift(&mut w, o);
    processes(&mut w, o);
    series(&mut w, o);
    notes(&mut w, o);
    w
}

fn queries(w: &mut String, o: &Outcome) {
    let s = &o.settings;
    let t = &o.transports;
    let _ = writeln!(w, "### Queries\n");
    let _ = writeln!(
        w,
        "| | {} |\n|---|{}",
        t.iter().map(|t| t.name).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(t.len())
    );
    let start = o.samples.iter().find(|s| s.label == "start");
    let row = |w: &mut String, name: &str, f: &dyn Fn(usize, &TransportSummary) -> String| {
        let cells: Vec<String> = t.iter().enumerate().map(|(i, t)| f(i, t)).collect();
        let _ = writeln!(w, "| {name} | {} |", cells.join(" | "));
    };
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    row(w, "connections open at the start / asked for", &|i, _| {
        format!(
            "{} / {}",
            start.map_or_else(|| "n/a".into(), |st| st.traffic[i].open.to_string()),
            s.connections
        )
    });
    row(w, "time to open them all (s)", &|_, t| {
        format!("{:.1}", t.open_time.as_secs_f64())
    });
    row(w, "failed opening attempts", &|_, t| {
        t.snapshot.open_failures.to_string()
    });
    row(w, "queries ran for (s)", &|_, t| {
        format!("{:.0}", t.held.as_secs_f64())
    });
    row(
        w,
        "queries planned (connections × duration / interval)",
        &|_, _| s.planned_queries().to_string(),
    );
    row(w, "queries sent", &|_, t| t.snapshot.sent.to_string());
    row(w, "answered", &|_, t| t.snapshot.answered.to_string());
    row(w, "wrong answers", &|_, t| t.snapshot.wrong.to_string());
    row(w, "failed or unanswered", &|_, t| {
        t.snapshot.errors.to_string()
    });
    row(w, "connections opened again after a failure", &|_, t| {
        t.reopened.to_string()
    });
    row(w, "queries per second", &|_, t| {
        format!(
            "{:.0}",
            t.snapshot.answered as f64 / t.held.as_secs_f64().max(1e-9)
        )
    });
    row(w, "latency p50 (ms)", &|_, t| {
        ms(t.snapshot.latency.percentile(50.0))
    });
    row(w, "latency p99 (ms)", &|_, t| {
        ms(t.snapshot.latency.percentile(99.0))
    });
    row(w, "latency p99.9 (ms)", &|_, t| {
        ms(t.snapshot.latency.percentile(99.9))
    });
    row(w, "latency max (ms)", &|_, t| ms(t.snapshot.latency.max()));
    row(w, "time to close them all (s)", &|_, t| {
        format!("{:.1}", t.close_time.as_secs_f64())
    });
    row(w, "connections that did not close cleanly", &|_, t| {
        t.close_failures.to_string()
    });
    let _ = writeln!(
        w,
        "\nEach query is `SELECT <counter>, <connection index>, CONNECTION_ID()` and must come \
         back exactly, on the session the connection opened. Latency is from sending a query \
         to its answer as the client sees it: through `connect`, the relay, the agent and \
         mariadbd and back, with every process on the same {} CPUs.\n",
        o.context.cpus
    );
    for t in t.iter().filter(|t| t.problems > 0) {
        let _ = writeln!(
            w,
            "{}: {} problem(s); the first {}:\n\n```text",
            t.name,
            t.problems,
            t.messages.len()
        );
        for m in &t.messages {
            let _ = writeln!(w, "{m}");
        }
        let _ = writeln!(w, "```\n");
    }
}

/// The indices of the named samples, in column order.
fn named(o: &Outcome) -> Vec<(&'static str, Option<&Sample>)> {
    ["baseline", "start", "middle", "end", "after close"]
        .into_iter()
        .map(|l| (l, o.samples.iter().find(|s| s.label == l)))
        .collect()
}

fn drift(w: &mut String, o: &Outcome) {
    let find = |l: &str| o.samples.iter().find(|s| s.label == l);
    let (Some(base), Some(start), Some(end), after) = (
        find("baseline"),
        find("start"),
        find("end"),
        find("after close"),
    ) else {
        return;
    };
    let _ = writeln!(w, "### Drift\n");
    let _ = writeln!(
        w,
        "From the start (every connection open, no query yet) to the end (the last query \
         answered, every connection still open), and from the baseline (before the soak's \
         connections) to after closing them.\n"
    );
    let _ = writeln!(
        w,
        "| process | RSS start (KiB) | RSS end (KiB) | RSS end − start | fds start → end | \
         tasks start → end | fds baseline → after close | tasks baseline → after close |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (p, name) in o.processes.iter().enumerate() {
        let get = |s: &Sample| s.procs.get(p).copied().unwrap_or_default();
        let (b, st, e) = (get(base), get(start), get(end));
        let a = after.map(get).unwrap_or_default();
        let change = match (st.rss_kib, e.rss_kib) {
            (Some(x), Some(y)) => format!(
                "{:+} ({:+.1} %)",
                y as i64 - x as i64,
                (y as f64 - x as f64) / (x as f64).max(1.0) * 100.0
            ),
            _ => "n/a".into(),
        };
        let arrow = |x: Option<u64>, y: Option<u64>| {
            if x.is_none() && y.is_none() {
                "n/a".to_owned()
            } else {
                format!("{} → {}", show(x), show(y))
            }
        };
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {change} | {} | {} | {} | {} |",
            show(st.rss_kib),
            show(e.rss_kib),
            arrow(st.fds, e.fds),
            arrow(st.tasks, e.tasks),
            arrow(b.fds, a.fds),
            arrow(b.tasks, a.tasks),
        );
    }
    let _ = writeln!(w);
}

/// One figure of a [`Reading`].
type Field = fn(&Reading) -> Option<u64>;

fn processes(w: &mut String, o: &Outcome) {
    let cols = named(o);
    let _ = writeln!(w, "### Processes\n");
    let _ = writeln!(
        w,
        "baseline: the stack started and one connection went through each tunnel and closed \
         (settled in {:.1} s); start: every soak connection open, no query yet; middle: \
         halfway through the hold; end: the last query answered, every connection still \
         open; after close: every connection closed and the processes settled ({}). Tasks are \
         tokio tasks alive: the relay's `postern_runtime_tasks` from `/metrics`, the agent's \
         from its systemd status line; `connect`, mariadbd and the client have none to \
         report.\n",
        o.baseline_settle.took.as_secs_f64(),
        if o.settle.settled {
            format!("in {:.1} s", o.settle.took.as_secs_f64())
        } else {
            format!(
                "**not settled** after {:.0} s; read then",
                o.settle.took.as_secs_f64()
            )
        }
    );
    let heads: Vec<&str> = cols.iter().map(|(l, _)| *l).collect();
    for (p, name) in o.processes.iter().enumerate() {
        let _ = writeln!(w, "#### {name}\n");
        let _ = writeln!(
            w,
            "| | {} | end − start |\n|---|{}---:|",
            heads.join(" | "),
            "---:|".repeat(heads.len())
        );
        let readings: Vec<Option<Reading>> = cols
            .iter()
            .map(|(_, s)| s.and_then(|s| s.procs.get(p).copied()))
            .collect();
        let rows: [(&str, Field); 4] = [
            ("RSS (KiB)", |r| r.rss_kib),
            ("open fds", |r| r.fds),
            ("OS threads", |r| r.threads),
            ("tokio tasks", |r| r.tasks),
        ];
        for (what, f) in rows {
            let values: Vec<Option<u64>> =
                readings.iter().map(|r| r.as_ref().and_then(f)).collect();
            if what == "tokio tasks" && values.iter().all(Option::is_none) {
                continue;
            }
            let delta = match (values[1], values[3]) {
                (Some(a), Some(b)) => format!("{:+}", b as i64 - a as i64),
                _ => "n/a".into(),
            };
            let cells: Vec<String> = values.iter().map(|v| show(*v)).collect();
            let _ = writeln!(w, "| {what} | {} | {delta} |", cells.join(" | "));
        }
        let _ = writeln!(w);
    }
}

fn series(w: &mut String, o: &Outcome) {
    let _ = writeln!(w, "### Time series\n");
    let _ = writeln!(
        w,
        "Each row covers the window since the row above: queries answered per second and their \
         latency in that window; `problems` counts failed opening attempts, failed queries and \
         wrong answers so far; `open` is the client's open connections and the relay's \
         (`postern_connections_current`); `db` is mariadbd's `Threads_connected` (with the \
         bench's monitoring session).\n"
    );
    let names: Vec<&str> = o.transports.iter().map(|t| t.name).collect();
    let mut head = String::from("| at (s) | sample |");
    let mut rule = String::from("|---:|---|");
    for n in &names {
        let _ = write!(
            head,
            " {n} open | {n} q/s | {n} p50 ms | {n} p99 ms | {n} max ms | {n} problems |"
        );
        rule.push_str("---:|---:|---:|---:|---:|---:|");
    }
    head.push_str(" db |");
    rule.push_str("---:|");
    let _ = writeln!(w, "{head}\n{rule}");
    for pair in o.samples.windows(2) {
        let (prev, s) = (&pair[0], &pair[1]);
        let secs = (s.taken.saturating_sub(prev.taken)).as_secs_f64().max(1e-9);
        let mut line = format!("| {} | {} |", at(s), label(s));
        for (i, _) in names.iter().enumerate() {
            let (a, b) = (&prev.traffic[i], &s.traffic[i]);
            let win = b.latency.since(&a.latency);
            let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
            let _ = write!(
                line,
                " {} / {} | {:.0} | {} | {} | {} | {} |",
                b.open,
                show(s.relay_connections[i]),
                (b.answered - a.answered.min(b.answered)) as f64 / secs,
                ms(win.percentile(50.0)),
                ms(win.percentile(99.0)),
                ms(win.max()),
                b.open_failures + b.errors + b.wrong
            );
        }
        let _ = write!(line, " {} |", show(s.db_sessions));
        let _ = writeln!(w, "{line}");
    }
    let _ = writeln!(w);

    let _ = writeln!(
        w,
        "Per process, each cell is `RSS MiB · open fds · tokio tasks · CPU %` (CPU in % of one \
         core over the window since the row above; – where there is nothing to read).\n"
    );
    let _ = writeln!(
        w,
        "| at (s) | sample | {} |\n|---:|---|{}",
        o.processes.join(" | "),
        "---:|".repeat(o.processes.len())
    );
    let mut prev: Option<&Sample> = None;
    for s in &o.samples {
        let secs = prev.map(|p| s.taken.saturating_sub(p.taken).as_secs_f64());
        let cells: Vec<String> = s
            .procs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cpu = match (prev.and_then(|p| p.procs.get(i)), secs) {
                    (Some(before), Some(secs)) if secs > 0.0 => {
                        match (before.cpu_ticks, r.cpu_ticks) {
                            (Some(a), Some(b)) => format!(
                                "{:.0} %",
                                b.saturating_sub(a) as f64 / o.ticks_per_second / secs * 100.0
                            ),
                            _ => "–".into(),
                        }
                    }
                    _ => "–".into(),
                };
                format!(
                    "{} · {} · {} · {cpu}",
                    r.rss_kib
                        .map_or_else(|| "–".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
                    r.fds.map_or_else(|| "–".into(), |v| v.to_string()),
                    r.tasks.map_or_else(|| "–".into(), |v| v.to_string()),
                )
            })
            .collect();
        let _ = writeln!(w, "| {} | {} | {} |", at(s), label(s), cells.join(" | "));
        prev = Some(s);
    }
    let _ = writeln!(w);
}

fn notes(w: &mut String, o: &Outcome) {
    let mut notes: Vec<String> = Vec::new();
    if let Some(m) = o.settings.service_max_connections {
        notes.push(format!(
            "The relays' per-service `max_connections` was raised to {m} for this run: its \
             default, 10000, would refuse any connection of a service beyond 10000 (and at \
             exactly 10000 leaves none for a connection opened again while its predecessor \
             is torn down)."
        ));
    }
    notes.extend(o.notes.iter().map(|n| format!("Could not read: {n}.")));
    if o.shutdown_problems.is_empty() {
        notes.push("Every relay, agent and `connect` exited cleanly on SIGTERM at the end.".into());
    }
    if notes.is_empty() {
        return;
    }
    let _ = writeln!(w, "### Notes\n");
    for n in notes {
        let _ = writeln!(w, "- {n}");
    }
    let _ = writeln!(w);
}

fn label(s: &Sample) -> &'static str {
    if s.label.is_empty() { "·" } else { s.label }
}

fn at(s: &Sample) -> String {
    s.at.map_or_else(|| "–".into(), |d| format!("{:.0}", d.as_secs_f64()))
}
