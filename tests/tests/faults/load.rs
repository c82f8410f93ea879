//! The clients of the fault suite: workers that keep transferring a known result and keep
//! opening connections, through the relay's MySQL listener and through `connect`, and record
//! how every attempt ended.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;
use postern_tests::sha256_hex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The paced transfer: 32 rows of 64 KiB, 20 ms apart (about 0.7 s), so every fault finds
/// transfers under way.
pub(crate) const TRANSFER: &str = "SELECT b FROM f.blobs WHERE SLEEP(0.02) = 0 ORDER BY id";
/// The same rows unpaced, read straight from the database for the expected digest.
pub(crate) const TRANSFER_DIRECT: &str = "SELECT b FROM f.blobs ORDER BY id";
/// What the database holds for the transfer.
pub(crate) const SETUP: &str = "CREATE DATABASE f; CREATE TABLE f.blobs (id INT PRIMARY KEY, b LONGBLOB); USE f; \
     INSERT INTO f.blobs SELECT seq, REPEAT(UNHEX(SHA2(seq, 256)), 2048) FROM seq_1_to_32;";
/// An attempt that has not ended after this long hangs: a failure of the suite.
pub(crate) const HUNG_AFTER: Duration = Duration::from_secs(20);
/// Transfer workers per path.
const TRANSFERS: usize = 3;
/// Workers per path that open a connection, ask `SELECT 1` and close, over and over.
const HANDSHAKES: usize = 2;

/// How a client reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Path {
    /// The relay's MySQL-native listener, with TLS and a client certificate.
    Listener,
    /// `connect`'s local port.
    Connect,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Job {
    /// The paced transfer, on a connection kept open between transfers.
    Transfer,
    /// A new connection, `SELECT 1`, close.
    Handshake,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed with exactly the expected result.
    Ok,
    /// Completed with another result: short, corrupt or reordered. Must never happen.
    Wrong(String),
    /// Ended in an error (its text).
    Failed(String),
    /// Did not end within [`HUNG_AFTER`]. Must never happen.
    Hung,
}

/// One attempt of a worker.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) path: Path,
    pub(crate) job: Job,
    pub(crate) started: Instant,
    /// When the result or the error came (before the result was checked).
    pub(crate) ended: Instant,
    pub(crate) outcome: Outcome,
}

const IDLE: u8 = 0;
const HANDSHAKING: u8 = 1;
const TRANSFERRING: u8 = 2;

/// The running workers.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    states: Vec<Arc<AtomicU8>>,
    completed: BTreeMap<Path, Arc<AtomicUsize>>,
    workers: Vec<JoinHandle<Vec<Attempt>>>,
}

impl Load {
    /// Starts the workers on both paths; `digest` is the transfer's expected SHA-256.
    pub(crate) fn start(
        listener: &mysql_async::Opts,
        connect: &mysql_async::Opts,
        digest: &str,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = Self {
            stop: stop.clone(),
            states: Vec::new(),
            completed: BTreeMap::new(),
            workers: Vec::new(),
        };
        for (path, opts) in [(Path::Listener, listener), (Path::Connect, connect)] {
            let completed = Arc::new(AtomicUsize::new(0));
            me.completed.insert(path, completed.clone());
            for job in [Job::Transfer; TRANSFERS]
                .into_iter()
                .chain([Job::Handshake; HANDSHAKES])
            {
                let state = Arc::new(AtomicU8::new(IDLE));
                me.states.push(state.clone());
                let w = Worker {
                    path,
                    job,
                    opts: opts.clone(),
                    digest: digest.to_owned(),
                    stop: stop.clone(),
                    state,
                    completed: completed.clone(),
                };
                me.workers.push(tokio::spawn(w.run()));
            }
        }
        me
    }

    /// Transfers and handshakes under way now.
    pub(crate) fn in_flight(&self) -> (usize, usize) {
        let count = |s: u8| {
            self.states
                .iter()
                .filter(|x| x.load(Ordering::Relaxed) == s)
                .count()
        };
        (count(TRANSFERRING), count(HANDSHAKING))
    }

    /// Transfers completed whole on `path` so far.
    pub(crate) fn completed(&self, path: Path) -> usize {
        self.completed[&path].load(Ordering::Relaxed)
    }

    /// Stops the workers after their current attempt and returns every attempt.
    pub(crate) async fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("a load worker panicked"));
        }
        all.sort_by_key(|a| a.started);
        all
    }
}

struct Worker {
    path: Path,
    job: Job,
    opts: mysql_async::Opts,
    digest: String,
    stop: Arc<AtomicBool>,
    state: Arc<AtomicU8>,
    completed: Arc<AtomicUsize>,
}

impl Worker {
    async fn run(self) -> Vec<Attempt> {
        let mut attempts = Vec::new();
        let mut conn: Option<mysql_async::Conn> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let mut ended = None;
            let outcome =
                match tokio::time::timeout(HUNG_AFTER, self.attempt(&mut conn, &mut ended)).await {
                    Ok(o) => o,
                    Err(_) => Outcome::Hung,
                };
            self.state.store(IDLE, Ordering::Relaxed);
            let ok = outcome == Outcome::Ok;
            if !ok {
                // A connection that failed once is not used again.
                conn = None;
            }
            if ok && self.job == Job::Transfer {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            attempts.push(Attempt {
                path: self.path,
                job: self.job,
                started,
                ended: ended.unwrap_or_else(Instant::now),
                outcome,
            });
            // Paced: the suite is about faults, not throughput; a failure is not retried in a
            // tight loop.
            let pause = if ok { 20 } else { 100 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        if let Some(c) = conn {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.disconnect()).await;
        }
        attempts
    }

    /// One attempt; `ended` is set to when the result (or the error) came, before it is
    /// checked.
    async fn attempt(
        &self,
        conn: &mut Option<mysql_async::Conn>,
        ended: &mut Option<Instant>,
    ) -> Outcome {
        if conn.is_none() || self.job == Job::Handshake {
            self.state.store(HANDSHAKING, Ordering::Relaxed);
            match mysql_async::Conn::new(self.opts.clone()).await {
                Ok(c) => *conn = Some(c),
                Err(e) => return Outcome::Failed(describe(&e)),
            }
        }
        let Some(c) = conn.as_mut() else {
            return Outcome::Failed("no connection".into());
        };
        match self.job {
            Job::Handshake => {
                let one: Result<Option<i64>, _> = c.query_first("SELECT 1").await;
                let outcome = match one {
                    Ok(Some(1)) => Outcome::Ok,
                    Ok(other) => Outcome::Wrong(format!("SELECT 1 answered {other:?}")),
                    Err(e) => Outcome::Failed(describe(&e)),
                };
                if let Some(c) = conn.take()
                    && let Err(e) = c.disconnect().await
                    && outcome == Outcome::Ok
                {
                    return Outcome::Failed(format!("closing: {}", describe(&e)));
                }
                outcome
            }
            Job::Transfer => {
                self.state.store(TRANSFERRING, Ordering::Relaxed);
                let result = c.query::<Vec<u8>, _>(TRANSFER).await;
                *ended = Some(Instant::now());
                match result {
                    Ok(rows) => {
                        let got = sha256_hex(&rows.concat());
                        if got == self.digest {
                            Outcome::Ok
                        } else {
                            Outcome::Wrong(format!(
                                "{} rows, {} bytes, SHA-256 {got}",
                                rows.len(),
                                rows.iter().map(Vec::len).sum::<usize>()
                            ))
                        }
                    }
                    Err(e) => Outcome::Failed(describe(&e)),
                }
            }
        }
    }
}

/// The SHA-256 of the transfer's result, read straight from the database at `url`.
pub(crate) async fn expected_digest(url: &str) -> String {
    let mut c = mysql_async::Conn::from_url(url)
        .await
        .expect("direct connection");
    let rows: Vec<Vec<u8>> = c.query(TRANSFER_DIRECT).await.expect("direct transfer");
    assert_eq!(rows.len(), 32);
    c.disconnect().await.expect("disconnect");
    sha256_hex(&rows.concat())
}

/// A driver error in a few words: the MySQL error's code and text, or what happened to the
/// connection.
fn describe(e: &mysql_async::Error) -> String {
    use mysql_async::{Error, IoError};
    match e {
        Error::Server(s) => {
            // Before the handshake, mysql_async reads an ERR packet as pre-4.1 servers sent
            // it, so the SQLSTATE marker stays in the text; and "postern: service "orders" is"
            // is the same in every refusal.
            let text = s.message.trim_start_matches('#');
            let text = match text.get(..5) {
                Some(state) if s.message.starts_with('#') && state.is_ascii() => &text[5..],
                _ => text,
            };
            let text = text
                .trim_start_matches("postern: ")
                .trim_start_matches("service \"orders\" is ");
            let text: String = text.chars().take(60).collect();
            format!("MySQL {}: {text}", s.code)
        }
        Error::Io(IoError::Io(io)) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => "connection reset".into(),
            std::io::ErrorKind::UnexpectedEof => "connection closed mid-result".into(),
            std::io::ErrorKind::BrokenPipe => "broken pipe".into(),
            _ => format!("I/O: {io}"),
        },
        Error::Io(other) => format!("TLS: {other}"),
        Error::Driver(d) => format!("driver: {d}"),
        other => other.to_string(),
    }
}
