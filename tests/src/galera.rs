//! A real three-node MariaDB Galera cluster on loopback (galera-4 ships with Debian's
//! `mariadb-server`), for the failover tests: every port ephemeral, every node its own data
//! directory in one temp dir, started as `/work/shared/recipes/galera-loopback.sh` does.
//!
//! ```ignore
//! let mut g = Galera::start().await;
//! g.create_monitor_user(MONITOR_USER, MONITOR_PASSWORD);
//! assert_eq!(g.sql("n2", "SELECT @@wsrep_node_name").unwrap().trim(), "n2");
//! g.stop_node("n1").await;           // graceful; kill_node is SIGKILL
//! g.start_node("n1").await;          // rejoins (IST or a full SST) and waits for Synced
//! ```
//!
//! What the recipe learnt, and this keeps:
//! - The temp dir is made traversable (`mktemp -d` makes it 0700) and every node's directory is
//!   owned by `mysql`: nodes run as `mysql` (`--user=mysql`), because rsync SST started by root
//!   runs its daemon as `nobody`, which could not write the joiner's datadir.
//! - Node 1 bootstraps (`--wsrep-new-cluster`) from a copy of the initialised data directory that
//!   [`MariaDb`](crate::MariaDb) makes once; the others start from an EMPTY datadir and receive a
//!   full copy (SST). A node started again later never bootstraps: it rejoins the others.
//! - Readiness is `wsrep_local_state_comment = Synced`, polled; never a fixed sleep.
//!
//! Galera's group timeouts are shortened (a killed node is evicted in about 2 s instead of 5 to
//! 15 s), so that the surviving nodes do not stall writes for long after a `kill -9`. Node
//! processes of a test process that died without cleaning up (their temp dir gone) are killed
//! when the next cluster starts. On any failure to start, the error logs of every node are in the
//! panic message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::mariadb::{find, free_port};

/// The monitor user the stacks give the agent's `mysql` check.
pub const MONITOR_USER: &str = "postern_monitor";
/// Its password (the agent reads it from a file or the environment, never the config).
pub const MONITOR_PASSWORD: &str = "monitor-Secret-1";
/// The application user clients log in as through the tunnel.
pub const APP_USER: &str = "app";
/// Its password.
pub const APP_PASSWORD: &str = "app-Secret-1";

/// How long a node may take to become Synced (a joiner receives a full copy first).
pub const SYNC_WITHIN: Duration = Duration::from_secs(90);

/// Group communication timeouts: a node that stops answering is suspected after 1.5 s and
/// evicted by 3 s; the defaults (5 s, 15 s) would stall the other nodes' commits for that long
/// after a `kill -9`. `gcache.size` is kept small: every node has one on disk.
const PROVIDER_OPTIONS: &str = "evs.keepalive_period=PT0.3S;evs.inactive_check_period=PT0.5S;\
     evs.suspect_timeout=PT1.5S;evs.inactive_timeout=PT3S;evs.install_timeout=PT3S;\
     gcache.size=32M";

/// A running Galera cluster. Every node is stopped and the directory removed on drop.
pub struct Galera {
    nodes: Vec<GaleraNode>,
    cluster_address: String,
    /// Dropped last (after the nodes are stopped).
    dir: TempDir,
}

/// One node of a [`Galera`] cluster.
pub struct GaleraNode {
    /// `n1`, `n2`, `n3` (its `wsrep_node_name`).
    pub name: String,
    /// Where it takes SQL clients (TCP, loopback).
    pub addr: SocketAddr,
    gcomm: u16,
    ist: u16,
    sst: u16,
    base: PathBuf,
    child: Option<Child>,
}

impl GaleraNode {
    /// `host:port` for configs.
    pub fn backend(&self) -> String {
        self.addr.to_string()
    }

    /// Its Unix socket (root logs in there without a password).
    pub fn socket(&self) -> PathBuf {
        self.base.join("sock")
    }

    /// Whether its process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.base.join("err.log")).unwrap_or_default()
    }
}

impl Galera {
    /// Starts three nodes, `n1` to `n3`, and waits until all are Synced.
    pub async fn start() -> Self {
        Self::start_nodes(3).await
    }

    /// Starts `n` nodes (1 to 9), `n1` bootstrapping, and waits until all are Synced.
    pub async fn start_nodes(n: usize) -> Self {
        assert!((1..=9).contains(&n), "1 to 9 nodes, not {n}");
        reap_orphans();
        let galera = provider();
        let dir = tempfile::Builder::new()
            .prefix("postern-galera")
            .tempdir()
            .expect("tempdir");
        // Traversable by `mysql` (a temp dir is 0700 and owned by root).
        set_mode(dir.path(), 0o755);
        let mut ports = Vec::new();
        while ports.len() < n * 4 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let nodes: Vec<GaleraNode> = (0..n)
            .map(|i| GaleraNode {
                name: format!("n{}", i + 1),
                addr: SocketAddr::from(([127, 0, 0, 1], ports[i * 4])),
                gcomm: ports[i * 4 + 1],
                ist: ports[i * 4 + 2],
                sst: ports[i * 4 + 3],
                base: dir.path().join(format!("n{}", i + 1)),
                child: None,
            })
            .collect();
        let cluster_address = format!(
            "gcomm://{}",
            nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.gcomm))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut me = Self {
            nodes,
            cluster_address,
            dir,
        };
        let started = tokio::time::Instant::now();
        for (i, node) in me.nodes.iter().enumerate() {
            std::fs::create_dir_all(node.base.join("data")).expect("node dir");
            if i == 0 {
                copy_dir(crate::mariadb::template(), &node.base.join("data"));
            }
            chown_mysql(&node.base);
        }
        me.launch(0, true, &galera);
        me.wait_synced("n1").await;
        for i in 1..n {
            me.launch(i, false, &galera);
        }
        for i in 1..n {
            let name = me.nodes[i].name.clone();
            me.wait_synced(&name).await;
        }
        let size = me.status("n1", "wsrep_cluster_size");
        assert_eq!(
            size.as_deref(),
            Some(n.to_string().as_str()),
            "cluster size\n{}",
            me.logs()
        );
        tracing::info!(nodes = n, took = ?started.elapsed(), "galera cluster synced");
        me
    }

    fn launch(&mut self, i: usize, bootstrap: bool, provider: &Path) {
        let cluster = self.cluster_address.clone();
        let node = &mut self.nodes[i];
        let base = &node.base;
        let mut cmd = Command::new(find("mariadbd"));
        cmd.arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", base.join("data").display()))
            .arg(format!("--port={}", node.addr.port()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", base.join("sock").display()))
            .arg(format!("--pid-file={}", base.join("pid").display()))
            .arg(format!("--log-error={}", base.join("err.log").display()))
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--innodb-log-file-size=8M")
            .arg("--performance-schema=OFF")
            .arg("--max-connections=1000")
            .arg("--binlog-format=ROW")
            .arg("--default-storage-engine=InnoDB")
            .arg("--innodb-autoinc-lock-mode=2")
            .arg("--wsrep-on=ON")
            .arg(format!("--wsrep-provider={}", provider.display()))
            .arg("--wsrep-cluster-name=postern-test")
            .arg(format!("--wsrep-cluster-address={cluster}"))
            .arg(format!("--wsrep-node-address=127.0.0.1:{}", node.gcomm))
            .arg(format!("--wsrep-node-name={}", node.name))
            .arg("--wsrep-sst-method=rsync")
            .arg(format!("--wsrep-sst-receive-address=127.0.0.1:{}", node.sst))
            .arg(format!(
                "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{};ist.recv_addr=127.0.0.1:{};{PROVIDER_OPTIONS}",
                node.gcomm, node.ist
            ));
        if bootstrap {
            cmd.arg("--wsrep-new-cluster");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(base.join("stderr.log")).expect("node stderr log file"))
            .spawn()
            .expect("spawn mariadbd (install mariadb-server and galera-4)");
        node.child = Some(child);
    }

    /// The nodes, in order (`n1` first).
    pub fn nodes(&self) -> &[GaleraNode] {
        &self.nodes
    }

    /// The node names, in order.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Node `name`.
    pub fn node(&self, name: &str) -> &GaleraNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no galera node {name}"))
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no galera node {name}"))
    }

    /// The SQL address of node `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.node(name).addr
    }

    /// The name of the node whose SQL address is `addr`, if any.
    pub fn name_of(&self, addr: SocketAddr) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.addr == addr)
            .map(|n| n.name.as_str())
    }

    /// The cluster's directory (every node's `err.log` is under `nN/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sql` on node `name` as root over its Unix socket (batch mode: tab-separated, no
    /// column names); the output, or the client's error text.
    pub fn sql(&self, name: &str, sql: &str) -> Result<String, String> {
        let out = self.run_sql(name, sql);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// [`sql`](Self::sql), which must succeed (panics with the node's log otherwise).
    pub fn ok(&self, name: &str, sql: &str) -> String {
        self.sql(name, sql).unwrap_or_else(|e| {
            panic!(
                "sql {sql:?} on {name} failed: {e}\n{}",
                self.node(name).error_log()
            )
        })
    }

    fn run_sql(&self, name: &str, sql: &str) -> Output {
        let node = self.node(name);
        Command::new(find("mariadb"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", node.socket().display()))
            .args([
                "-uroot",
                "--connect-timeout=2",
                "--batch",
                "--skip-column-names",
            ])
            .args(["-e", sql])
            .output()
            .expect("run the mariadb client")
    }

    /// A status variable of node `name` (`SHOW STATUS LIKE ...`), or `None` if the node does
    /// not answer.
    pub fn status(&self, name: &str, variable: &str) -> Option<String> {
        let out = self
            .sql(name, &format!("SHOW STATUS LIKE '{variable}'"))
            .ok()?;
        out.trim()
            .split_once('\t')
            .map(|(_, v)| v.trim().to_owned())
    }

    /// `wsrep_local_state_comment` of node `name` (`Synced`, `Donor/Desynced`, `Joining`, ...),
    /// or `None` if it does not answer.
    pub fn state(&self, name: &str) -> Option<String> {
        self.status(name, "wsrep_local_state_comment")
    }

    /// `wsrep_local_index` of node `name`.
    pub fn local_index(&self, name: &str) -> Option<u32> {
        self.status(name, "wsrep_local_index")
            .and_then(|v| v.parse().ok())
    }

    /// Waits until node `name` is Synced and in the Primary component ([`SYNC_WITHIN`]);
    /// panics with every node's log if it is not, or if its process exits.
    pub async fn wait_synced(&mut self, name: &str) {
        let started = tokio::time::Instant::now();
        let i = self.index(name);
        loop {
            if self.state(name).as_deref() == Some("Synced")
                && self.status(name, "wsrep_cluster_status").as_deref() == Some("Primary")
            {
                return;
            }
            if !self.nodes[i].is_running() {
                panic!("galera node {name} exited while starting\n{}", self.logs());
            }
            if started.elapsed() > SYNC_WITHIN {
                panic!(
                    "galera node {name} not Synced after {SYNC_WITHIN:?} (state {:?})\n{}",
                    self.state(name),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node sees a cluster of `size` nodes.
    pub async fn wait_cluster_size(&mut self, size: usize) {
        let running: Vec<String> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| n.name.clone()))
            .collect();
        let running: Vec<&str> = running.iter().map(String::as_str).collect();
        self.wait_cluster_size_on(&running, size).await;
    }

    /// Waits until each of `nodes` sees a cluster of `size` nodes.
    pub async fn wait_cluster_size_on(&self, nodes: &[&str], size: usize) {
        let started = tokio::time::Instant::now();
        let running = nodes;
        loop {
            let sizes: Vec<Option<String>> = running
                .iter()
                .map(|n| self.status(n, "wsrep_cluster_size"))
                .collect();
            if sizes
                .iter()
                .all(|s| s.as_deref() == Some(&*size.to_string()))
            {
                return;
            }
            if started.elapsed() > SYNC_WITHIN {
                panic!(
                    "cluster size not {size} after {SYNC_WITHIN:?}: {running:?} see {sizes:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops node `name` cleanly (SIGTERM; it leaves the group) and waits for it to exit.
    pub async fn stop_node(&mut self, name: &str) {
        let i = self.index(name);
        let Some(pid) = self.nodes[i].pid() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let started = tokio::time::Instant::now();
        while self.nodes[i].is_running() {
            if started.elapsed() > Duration::from_secs(30) {
                eprintln!("galera node {name} ignored SIGTERM for 30 s: killing it");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_node(name);
    }

    /// Kills node `name` at once (SIGKILL: no goodbye to the group).
    pub fn kill_node(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes node `name` (SIGSTOP): its process stays, its sockets stay open, nothing
    /// answers — a hung node, as a health check meets one. [`thaw`](Self::thaw) resumes it.
    pub fn freeze(&self, name: &str) {
        self.signal(name, "-STOP");
    }

    /// Resumes node `name` after [`freeze`](Self::freeze) (SIGCONT); if the others evicted it
    /// meanwhile, it rejoins by itself.
    pub fn thaw(&self, name: &str) {
        self.signal(name, "-CONT");
    }

    fn signal(&self, name: &str, signal: &str) {
        let pid = self
            .node(name)
            .pid()
            .unwrap_or_else(|| panic!("galera node {name} is not running"));
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts node `name` again (after [`stop_node`](Self::stop_node) or
    /// [`kill_node`](Self::kill_node)): it rejoins the running nodes (it never bootstraps) and
    /// this waits until it is Synced.
    pub async fn start_node(&mut self, name: &str) {
        let i = self.index(name);
        assert!(
            !self.nodes[i].is_running(),
            "galera node {name} is running already"
        );
        self.launch(i, false, &provider());
        self.wait_synced(name).await;
    }

    /// `SET GLOBAL wsrep_desync = ON|OFF` on node `name` (ON takes it out of flow control: a
    /// health check must treat it as unhealthy, as Switchboard's galera-agent does).
    pub fn desync(&self, name: &str, on: bool) {
        let v = if on { "ON" } else { "OFF" };
        self.ok(name, &format!("SET GLOBAL wsrep_desync = {v}"));
    }

    /// Creates (on `n1`; Galera replicates it) the monitor user the agent's `mysql` check logs in
    /// as: it reads status variables, and keeps the cluster's decision record in `postern.*`.
    pub fn create_monitor_user(&self, user: &str, password: &str) {
        let first = self.first_running();
        self.ok(
            &first,
            &format!(
                "CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}'; \
                 GRANT SELECT ON *.* TO '{user}'@'%'; \
                 GRANT CREATE, SELECT, INSERT, UPDATE ON postern.* TO '{user}'@'%';"
            ),
        );
    }

    /// Creates (on a running node) an application user with every privilege on `app.*` and a
    /// database `app` with table `app.t (id INT AUTO_INCREMENT, node VARCHAR(16), at DATETIME)`
    /// for write loops.
    pub fn create_app_user(&self, user: &str, password: &str) {
        let first = self.first_running();
        self.ok(
            &first,
            &format!(
                "CREATE DATABASE IF NOT EXISTS app; \
                 CREATE TABLE IF NOT EXISTS app.t (id INT AUTO_INCREMENT PRIMARY KEY, \
                   node VARCHAR(64) NOT NULL, at DATETIME(6) NOT NULL DEFAULT NOW(6)) \
                   ENGINE=InnoDB; \
                 CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}'; \
                 GRANT ALL ON app.* TO '{user}'@'%';"
            ),
        );
    }

    fn first_running(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.name.clone())
            .expect("a running galera node")
    }

    /// The end of every node's error log (the last 60 lines each), for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = n.error_log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            out.push_str(&format!(
                "---- {} ({}) err.log, last {} lines ----\n{}\n",
                n.name,
                n.base.display(),
                tail.len(),
                tail.join("\n")
            ));
        }
        out
    }
}

impl Drop for Galera {
    fn drop(&mut self) {
        // SIGTERM all at once (after SIGCONT, for frozen ones), then wait; whatever is left
        // after 20 s gets SIGKILL.
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                for signal in ["-CONT", "-TERM"] {
                    let _ = Command::new("kill")
                        .args([signal, &pid.to_string()])
                        .status();
                }
            }
        }
        let deadline = std::time::SystemTime::now() + Duration::from_secs(20);
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                loop {
                    if !matches!(c.try_wait(), Ok(None)) {
                        break;
                    }
                    if std::time::SystemTime::now() > deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("galera cluster logs:\n{}", self.logs());
        }
    }
}

/// The Galera provider library.
fn provider() -> PathBuf {
    let p = PathBuf::from("/usr/lib/galera/libgalera_smm.so");
    assert!(
        p.is_file(),
        "{} is missing: install galera-4 (scripts/install-deps test)",
        p.display()
    );
    p
}

/// Kills `mariadbd` processes left by an earlier test process that died without cleaning up:
/// those whose data directory is in a `postern-galera` temp dir that no longer exists. Once per
/// test process.
fn reap_orphans() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args.first().is_some_and(|a| a.ends_with("mariadbd")) {
                continue;
            }
            let Some(datadir) = args.iter().find_map(|a| a.strip_prefix("--datadir=")) else {
                continue;
            };
            if datadir.contains("postern-galera") && !Path::new(datadir).exists() {
                eprintln!("killing an orphaned galera node (pid {pid}, {datadir})");
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    });
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-rT")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "copy {} to {}",
        from.display(),
        to.display()
    );
}

fn chown_mysql(path: &Path) {
    let out = Command::new("chown")
        .args(["-R", "mysql:mysql"])
        .arg(path)
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "chown -R mysql:mysql {} (the tests run as root; the `mysql` user comes with \
         mariadb-server): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
