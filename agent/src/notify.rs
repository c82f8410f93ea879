//! systemd integration for `postern-agent run` under `Type=notify`: ready, watchdog, status
//! line. Every call is a no-op outside systemd.
//!
//! The status line ends with what the process holds (tokio tasks, open file descriptors,
//! resident memory), refreshed every few seconds, so `systemctl status` shows a leak as a
//! count that grows while the load does not.
//!
//! Ready means "in session with a relay": `systemctl start` (and units ordered after the agent)
//! wait until the agent serves, and `TimeoutStartSec=` in the packaged unit bounds that wait.
//! Sessions that end later do not take readiness back (the agent reconnects by itself); the
//! status line says what is going on.
//!
//! Messages go out on a non-blocking socket: a service manager that stops reading its socket
//! (its queue full) must not stop a runtime worker. A status line that finds the queue full is
//! sent again at the next refresh; a watchdog ping is not (the next one follows).

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use postern_common::procstat;
use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::Status;

/// Keeps the watchdog fed from the start (`WATCHDOG_USEC`, half the interval, when
/// `WATCHDOG_PID` is unset or this process), sends READY=1 once the first relay session is up,
/// and publishes the status line (`systemctl status` shows it) at every change.
pub async fn run(mut status: watch::Receiver<Status>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not under systemd (or another manager that reads the protocol): nobody to tell.
        return;
    }
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = notify(&[NotifyState::Watchdog]);
            }
        });
    }
    let mut ready = false;
    let mut sent = String::new();
    // The counts at the end of the line change without a status change: refreshed on a timer.
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.reset();
    loop {
        let (line, connected) = match &*status.borrow_and_update() {
            Status::Connected {
                relay_instance,
                transport,
                ..
            } => (
                format!("connected to relay {relay_instance} over {transport}"),
                true,
            ),
            Status::Disconnected(why) => (format!("disconnected: {why}"), false),
        };
        let line = with_counts(line);
        // Only news is sent: an agent at rest sends nothing.
        if line != sent || (connected && !ready) {
            let state = NotifyState::Status(&line);
            let becomes_ready = connected && !ready;
            let told = if becomes_ready {
                notify(&[NotifyState::Ready, state])
            } else {
                notify(&[state])
            };
            // Not told (the manager's queue is full): the refresh tries again.
            if told.is_ok() {
                ready |= becomes_ready;
                sent = line;
            }
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = refresh.tick() => {}
        }
    }
}

/// How often the status line's counts are read (and sent, when they changed).
const REFRESH: Duration = Duration::from_secs(2);

/// `line` with what the process holds: `…; 41 tasks, 17 fds, 12 MiB` (what can be read).
fn with_counts(line: String) -> String {
    let mut counts = Vec::new();
    if let Some(n) = procstat::runtime_tasks() {
        counts.push(format!("{n} tasks"));
    }
    if let Some(n) = procstat::open_fds() {
        counts.push(format!("{n} fds"));
    }
    if let Some(n) = procstat::resident_bytes() {
        counts.push(format!("{} MiB", n / (1024 * 1024)));
    }
    if counts.is_empty() {
        line
    } else {
        format!("{line}; {}", counts.join(", "))
    }
}

/// Tells systemd the agent is stopping (it drains its connections first).
pub fn stopping() {
    let _ = notify(&[NotifyState::Stopping]);
}

/// Sends `states` to the service manager at `NOTIFY_SOCKET` (nothing when it is unset).
fn notify(states: &[NotifyState<'_>]) -> io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send(&socket, states),
        None => Ok(()),
    }
}

/// One datagram, `KEY=value` lines, to the socket named `socket`: a path, or on Linux an
/// abstract name written `@name`. `WouldBlock` when the receiver's queue is full.
fn send(socket: &OsStr, states: &[NotifyState<'_>]) -> io::Result<()> {
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    connect(&sock, socket)?;
    let n = sock.send(message.as_bytes())?;
    if n == message.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notify message cut short",
        ))
    }
}

#[cfg(target_os = "linux")]
fn connect(sock: &UnixDatagram, socket: &OsStr) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::SocketAddr;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => sock.connect_addr(&SocketAddr::from_abstract_name(name)?),
        None => sock.connect(socket),
    }
}

#[cfg(not(target_os = "linux"))]
fn connect(sock: &UnixDatagram, socket: &OsStr) -> io::Result<()> {
    sock.connect(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_at_a_path_and_at_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        send(
            path.as_os_str(),
            &[
                NotifyState::Ready,
                NotifyState::Status("connected; 3 tasks"),
            ],
        )
        .unwrap();
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=connected; 3 tasks\n");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            use std::os::unix::net::SocketAddr;
            let name = format!("postern-notify-test-{}", std::process::id());
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let manager = UnixDatagram::bind_addr(&addr).unwrap();
            send(OsStr::new(&format!("@{name}")), &[NotifyState::Watchdog]).unwrap();
            let n = manager.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        }
    }

    /// A manager that does not read: once its queue is full, a send fails at once with
    /// `WouldBlock` instead of waiting for room (the test would hang otherwise).
    #[test]
    fn a_manager_that_does_not_read_never_blocks_a_send() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _manager = UnixDatagram::bind(&path).unwrap();
        let status = "x".repeat(1024);
        let mut sent = 0;
        let error = loop {
            match send(path.as_os_str(), &[NotifyState::Status(&status)]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the queue never filled");
        };
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "{error}");
        assert!(sent > 0);
    }
}
