//! What the Debian packages rely on: the agent and the relay under systemd's `Type=notify`
//! (a real `NOTIFY_SOCKET` the test reads: READY=1, STATUS=, WATCHDOG=1, STOPPING=1), and man
//! pages that say what the command lines say. `scripts/check-package` checks the packages
//! themselves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use clap::CommandFactory;
use postern_tests::notify::Notifications;
use postern_tests::*;
use tokio::time::Instant;

/// The agent's watchdog interval in the test, as systemd passes it (`WATCHDOG_USEC`).
const WATCHDOG: Duration = Duration::from_millis(400);

/// The agent started while no relay answers sends no READY=1, only a status line that says it
/// is disconnected, and feeds the watchdog every half interval all along; once the relay is up,
/// READY=1 comes with a status line naming the transport. With `WATCHDOG_PID` naming another
/// process the watchdog is not for it, and it sends none. The relay says READY=1 once its
/// listeners are bound; both say STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_ready_for_systemd_only_in_session_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_sock = Notifications::bind(&dir.path().join("relay.sock"));
    let relay_path = relay_sock.path_str();
    let mut s = Stack::builder()
        .relay_process()
        .relay(|r| {
            r.pin_ports();
            r.agent("db2", &["orders"]);
        })
        .relay_env([("NOTIFY_SOCKET", relay_path.as_str())])
        .no_agent()
        .start()
        .await;
    let ready = relay_sock
        .wait_for("READY=1", Duration::from_secs(10))
        .await;
    let listening = format!("STATUS=listening: quic {}", s.relay().quic());
    assert!(ready.contains(&listening), "{ready:?}");

    // No relay answers when the agent starts.
    s.relay_mut().proc_mut().proc.kill();
    let agent_sock = Notifications::bind(&dir.path().join("agent.sock"));
    let usec = WATCHDOG.as_micros().to_string();
    let agent_path = agent_sock.path_str();
    let mut agent = s.start_agent_process(
        &s.agent_config(),
        &[("NOTIFY_SOCKET", &agent_path), ("WATCHDOG_USEC", &usec)],
    );
    // The first ping comes as the agent starts; then a bounded window with no relay.
    let (first, mut before) = agent_sock
        .wait_with("WATCHDOG=1", Duration::from_secs(10))
        .await;
    before.push(first);
    let window = Duration::from_secs(2);
    let timed = agent_sock.collect_timed(window).await;
    let pinged: Vec<Instant> = timed
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    let seen = [before, timed.into_iter().map(|(_, m)| m).collect()].concat();
    let lines: Vec<&str> = seen.iter().flat_map(|m| m.lines()).collect();
    assert!(
        !lines.contains(&"READY=1"),
        "READY=1 without a relay session: {seen:?}"
    );
    // Every WATCHDOG/2 = 200 ms: about 10 in the window. The median gap tells half the interval
    // from the whole (400 ms) even when a noisy machine stalls the agent now and then; the count
    // bounds are generous.
    let pings = pinged.len();
    let mut gaps: Vec<Duration> = pinged.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps.get(gaps.len() / 2).copied().unwrap_or_default();
    assert!(
        (5..=16).contains(&pings) && median >= WATCHDOG / 4 && median <= WATCHDOG * 3 / 4,
        "{pings} WATCHDOG=1 in {window:?}, median gap {median:?}, at WATCHDOG_USEC={usec}: \
         {seen:?}"
    );
    let statuses: Vec<&&str> = lines.iter().filter(|l| l.starts_with("STATUS=")).collect();
    assert!(
        !statuses.is_empty()
            && statuses
                .iter()
                .all(|l| l.starts_with("STATUS=disconnected")),
        "{statuses:?}"
    );
    eprintln!(
        "no relay: {pings} watchdog pings in {window:?}, median gap {median:?}, statuses \
         {statuses:?}"
    );

    // The relay comes up (on the same addresses): READY=1, with the transport.
    let config = s.relay_config.clone();
    let started = Instant::now();
    s.relay_mut().proc_mut().restart(&config).await;
    relay_sock
        .wait_for("READY=1", Duration::from_secs(10))
        .await;
    let ready = agent_sock
        .wait_for("READY=1", Duration::from_secs(40))
        .await;
    eprintln!(
        "agent ready {:?} after the relay restarted",
        started.elapsed()
    );
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=connected to relay ") && l.contains(" over quic; ")),
        "{ready:?}"
    );
    // The status line ends with what the agent holds: tasks, descriptors, memory.
    let status = ready
        .lines()
        .find(|l| l.starts_with("STATUS=connected"))
        .unwrap_or_default();
    let counts = status.split_once("; ").map(|(_, c)| c).unwrap_or_default();
    let parts: Vec<&str> = counts.split(", ").collect();
    assert!(
        parts.len() == 3
            && [" tasks", " fds", " MiB"]
                .iter()
                .zip(&parts)
                .all(|(unit, p)| p
                    .strip_suffix(unit)
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)),
        "{status:?}"
    );
    // The relay has the session READY=1 announced.
    s.relay().wait_agent("db1").await;
    // Readiness is said once.
    let later = agent_sock.collect(Duration::from_millis(600)).await;
    assert!(
        later.iter().all(|m| !m.lines().any(|l| l == "READY=1")),
        "{later:?}"
    );

    // WATCHDOG_PID names another process: the watchdog is not this one's.
    let other_sock = Notifications::bind(&dir.path().join("other.sock"));
    let other_path = other_sock.path_str();
    let mut other = s.start_agent_process(
        &s.agent_config_as("db2"),
        &[
            ("NOTIFY_SOCKET", &other_path),
            ("WATCHDOG_USEC", &usec),
            ("WATCHDOG_PID", "1"),
        ],
    );
    other_sock
        .wait_for("READY=1", Duration::from_secs(20))
        .await;
    let seen = other_sock.collect(Duration::from_secs(1)).await;
    assert!(
        seen.iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog pings for another process's watchdog: {seen:?}"
    );

    // SIGTERM: STOPPING=1 before the drain.
    agent.proc.terminate();
    agent_sock
        .wait_for("STOPPING=1", Duration::from_secs(10))
        .await;
    assert!(
        agent
            .proc
            .wait_exit(Duration::from_secs(20))
            .await
            .is_some()
    );
    s.relay().proc().proc.terminate();
    relay_sock
        .wait_for("STOPPING=1", Duration::from_secs(10))
        .await;
    other.kill();
    agent.proc.stop();
    s.stop().await;
}

/// The man pages the packages ship (`agent/man/`, `relay/man/`, one per command and
/// subcommand) are what clap_mangen makes of the command lines today. After a change to a
/// command line, write them again with
/// `POSTERN_WRITE_MAN=1 cargo test -p postern-tests --test e2e man_pages`.
#[test]
fn the_man_pages_match_the_command_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let write = std::env::var_os("POSTERN_WRITE_MAN").is_some();
    let mut stale = Vec::new();
    for (cmd, dir) in [
        (postern_agent::cli::Cli::command(), root.join("agent/man")),
        (postern_relay::cli::Cli::command(), root.join("relay/man")),
    ] {
        let fresh = tempfile::tempdir().expect("temp dir");
        clap_mangen::generate_to(cmd, fresh.path()).expect("generate man pages");
        let want = pages(fresh.path());
        assert!(
            want.contains_key(&format!("{}.1", dir_bin(&dir))),
            "{want:?}"
        );
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("man dir");
            for (name, text) in &want {
                std::fs::write(dir.join(name), text).expect("write man page");
            }
        }
        let have = if dir.is_dir() {
            pages(&dir)
        } else {
            BTreeMap::new()
        };
        for name in want.keys().chain(have.keys()) {
            if want.get(name) != have.get(name) && !stale.contains(name) {
                stale.push(name.clone());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale man pages: {stale:?}; write them again with \
         POSTERN_WRITE_MAN=1 cargo test -p postern-tests --test e2e man_pages"
    );
}

/// `postern-agent` for `.../agent/man`.
fn dir_bin(dir: &Path) -> String {
    let crate_dir = dir.parent().and_then(Path::file_name).expect("crate dir");
    format!("postern-{}", crate_dir.to_string_lossy())
}

/// The `*.1` files in `dir`, by name.
fn pages(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .expect("man dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read man page"))
        })
        .collect()
}
