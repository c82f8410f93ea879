//! Private `mariadbd` instances: own data directory in a temp dir, own ephemeral port.
//!
//! The system tables are created once per test process (`mariadb-install-db`) and copied for
//! each instance, so starting one costs well under a second.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

/// A running private MariaDB server. Killed and removed on drop.
pub struct MariaDb {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
    /// Its options beyond the defaults, for [`relaunch`](Self::relaunch).
    extra: Vec<String>,
}

/// The initialised data directory that instances copy. Made once per machine and MariaDB
/// version (in the temp dir, so a clean machine makes its own), reused by later test runs.
pub(crate) fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let version = Command::new(find("mariadbd"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let tag: u32 = version
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let path = std::env::temp_dir().join(format!("postern-mariadb-template-{tag:08x}"));
        if path.join("mysql").is_dir() {
            return path;
        }
        // Build next to it and rename into place, so concurrent test processes never see a
        // half-made template (the loser of a race just removes its copy).
        let work = tempfile::Builder::new()
            .prefix("postern-mariadb-template-work")
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir");
        let data = work.path().join("data");
        let out = Command::new(find("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg("--user=root")
            .arg("--innodb-log-file-size=8M")
            .output()
            .expect("run mariadb-install-db (install mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::rename(&data, &path);
        assert!(
            path.join("mysql").is_dir(),
            "template data directory at {}",
            path.display()
        );
        path
    })
}

/// Finds a MariaDB program in PATH or /usr/sbin, /usr/bin.
pub fn find(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install mariadb-server and mariadb-client");
}

impl MariaDb {
    /// Starts a fresh server and waits until it accepts connections.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a fresh server that also offers TLS with certificate `cert` and key `key` (PEM),
    /// trusting CA `ca` for client certificates; e.g. with
    /// [`TestPki::issue_server`](crate::TestPki::issue_server). TLS stays optional, as with
    /// [`start`](Self::start): plaintext clients connect as before.
    pub async fn start_with_tls(ca: &Path, cert: &Path, key: &Path) -> Self {
        let tls = [
            format!("--ssl-ca={}", ca.display()),
            format!("--ssl-cert={}", cert.display()),
            format!("--ssl-key={}", key.display()),
        ];
        let args: Vec<&str> = tls.iter().map(String::as_str).collect();
        Self::start_with(&args).await
    }

    /// Starts a fresh server with extra `mariadbd` options (later options win).
    pub async fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-mariadb")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-r")
            .arg(template())
            .arg(&data)
            .status()
            .expect("cp");
        assert!(status.success(), "copy template datadir");
        let extra: Vec<String> = extra.iter().map(|e| (*e).to_owned()).collect();
        for attempt in 0..5 {
            let port = free_port();
            let mut child = spawn(dir.path(), port, &extra);
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if greets(addr).await {
                    return Self {
                        addr,
                        child,
                        dir,
                        extra,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // probably the port was taken meanwhile: try another
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "mariadbd did not start: {}",
                        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.wait();
            eprintln!("mariadbd exited on attempt {attempt}; retrying on another port");
        }
        panic!(
            "mariadbd failed to start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
    }

    /// Starts the server again on its port and data directory, after [`kill`](Self::kill) or
    /// [`shutdown`](Self::shutdown), and waits until it accepts connections. Does not return
    /// before the server runs (a crashed InnoDB recovers first).
    pub async fn relaunch(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            self.child = spawn(self.dir.path(), self.addr.port(), &self.extra);
            loop {
                if greets(self.addr).await {
                    return;
                }
                if let Ok(Some(_)) = self.child.try_wait() {
                    // The port may still be held by the old process's sockets in TIME_WAIT for
                    // a moment (mariadbd sets SO_REUSEADDR, so rarely): try again.
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "mariadbd did not start again: {}",
                    std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mariadbd did not start again: {}",
                std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server cleanly (SIGTERM, as `systemctl stop` does) and waits for it to exit.
    pub fn shutdown(&mut self) {
        crate::procs::signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `mariadbd` on `port` with the data directory in `dir`.
fn spawn(dir: &Path, port: u16, extra: &[String]) -> Child {
    let data = dir.join("data");
    Command::new(find("mariadbd"))
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
        .arg("--user=root")
        .arg("--skip-log-bin")
        .arg("--skip-name-resolve")
        .arg("--innodb-buffer-pool-size=32M")
        .arg("--innodb-log-file-size=8M")
        .arg("--max-allowed-packet=256M")
        .arg("--max-connections=2000")
        .arg("--performance-schema=OFF")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("error.log"))
                .expect("log file"),
        )
        .spawn()
        .expect("spawn mariadbd")
}

impl MariaDb {
    /// `host:port` for configs.
    pub fn backend(&self) -> String {
        self.addr.to_string()
    }

    /// A direct (untunneled) connection URL for mysql_async as root.
    pub fn url(&self) -> String {
        format!("mysql://root@{}/mysql", self.addr)
    }

    /// Runs SQL directly with the `mariadb` CLI and returns stdout (batch mode).
    pub fn sql(&self, sql: &str) -> String {
        crate::Cli::at(self.addr.port())
            .query(sql)
            .unwrap_or_else(|e| panic!("sql {sql:?} failed: {e}"))
    }

    /// The `mariadb` client aimed straight at this server, as root.
    pub fn cli(&self) -> crate::Cli {
        crate::Cli::at(self.addr.port())
    }

    /// Creates database `src` with table `t` of 5,000 rows (text and binary columns) to dump,
    /// and an empty database `dst` to restore into.
    pub fn create_dump_source(&self) {
        self.sql(
            "CREATE DATABASE src; USE src; CREATE TABLE src.t (id INT PRIMARY KEY, v VARCHAR(64), b BLOB); \
             INSERT INTO src.t SELECT seq, CONCAT('row ', seq), UNHEX(SHA2(seq, 256)) FROM seq_1_to_5000; \
             CREATE DATABASE dst;",
        );
    }

    /// Restores `dump` (the run of a `mysqldump` of `src`, which must have succeeded: see
    /// [`create_dump_source`](Self::create_dump_source)) into `dst` directly, and asserts both
    /// hold the same 5,000 rows.
    pub fn assert_restores_identically(&self, dump: &std::process::Output) {
        use std::io::Write;
        let dump = crate::client::ok_bytes(dump);
        assert!(
            dump.len() > 100_000,
            "dump has the rows ({} bytes)",
            dump.len()
        );
        let mut restore = self
            .cli()
            .command()
            .arg("dst")
            .stdin(Stdio::piped())
            .spawn()
            .expect("run mariadb");
        restore
            .stdin
            .take()
            .expect("stdin")
            .write_all(&dump)
            .expect("write the dump");
        assert!(restore.wait().expect("mariadb exits").success());
        let sum = |db: &str| {
            self.sql(&format!(
                "SELECT COUNT(*), SUM(CRC32(CONCAT(id, v, HEX(b)))) FROM {db}.t"
            ))
        };
        assert_eq!(sum("src"), sum("dst"));
        assert!(sum("dst").starts_with("5000\t"));
    }

    /// Stops the server abruptly (the process is killed).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The data directory (for logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a MySQL greeting arrives from `addr`.
async fn greets(addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    else {
        return false;
    };
    let mut b = [0u8; 5];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await, Ok(Ok(_)) if b[4] == 10)
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
