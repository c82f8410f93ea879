//! Every client setting that README.md documents for the relay's MySQL listener, run with the
//! real client or driver: the `mariadb` CLI and `mysqldump`, MariaDB Connector/J 2 (Debian's
//! `libmariadb-java`, compiled with `javac`), go-sql-driver/mysql (Debian's, built with Debian's
//! `go`), Node's `mysql2` (from npm), mysqlclient and PyMySQL (Debian's, run with the Python that
//! has them).
//!
//! Each program under `tests/drivers/` uses the README's option names and values, and each test
//! first checks that the README still shows exactly those settings, so the two cannot drift
//! apart. Each client is then run
//! - against a relay whose certificate carries the address it dials: it must log in as the
//!   README's user and print the query's result;
//! - against a relay whose certificate lacks that address (it carries `localhost`, so a driver
//!   that checked some default name instead of the dialled one would be caught): it must refuse,
//!   naming the certificate or its names;
//! - where the driver allows it, without TLS: the relay must refuse with its explanation.
//!
//! A missing driver or toolchain fails the test (`scripts/install-deps` installs them all). The
//! programs are built once per test run and cached under `target/tmp/drivers/`, keyed by their
//! source and the toolchain's version, so later runs only start them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use postern_common::pki::{Kind, LeafSpec};
use postern_tests::config::Tls;
use postern_tests::mariadb::find;
use postern_tests::*;
use sha2::{Digest, Sha256};
use tokio::process::Command;

const README: &str = include_str!("../../../README.md");
const JAVA_SOURCE: &str = include_str!("../../drivers/java/PosternJdbc.java");
const GO_SOURCE: &str = include_str!("../../drivers/go/postern_go.go");
const NODE_SOURCE: &str = include_str!("../../drivers/node/connect.js");
const NODE_PACKAGE: &str = include_str!("../../drivers/node/package.json");
const NODE_LOCK: &str = include_str!("../../drivers/node/package-lock.json");
const PYMYSQL_SOURCE: &str = include_str!("../../drivers/python/pymysql_connect.py");
const MYSQLCLIENT_SOURCE: &str = include_str!("../../drivers/python/mysqlclient_connect.py");

/// The README's options for `mariadb` and `mysqldump`.
const CLI_OPTIONS: &str = "--ssl-ca=ca.pem --ssl-cert=client-alice.pem --ssl-key=client-alice-key.pem --ssl-verify-server-cert";
/// The README's JDBC URL for MariaDB Connector/J 2.x (also read by 3.x).
const JDBC_2: &str = "jdbc:mariadb://relay.example.com:13306/shop?useSsl=true&serverSslCert=/etc/app/ca.pem&keyStore=/etc/app/client-alice.p12&keyStorePassword=...&keyStoreType=PKCS12";
/// The README's JDBC URL for MariaDB Connector/J 3.x, which a 2.x driver does not understand.
const JDBC_3: &str = "jdbc:mariadb://relay.example.com:13306/shop?sslMode=verify-full&serverSslCert=/etc/app/ca.pem&keyStore=/etc/app/client-alice.p12&keyStorePassword=...&keyStoreType=PKCS12";
/// The README's command that makes the Java key store.
const P12_EXPORT: &str = "openssl pkcs12 -export -in client-alice.pem -inkey client-alice-key.pem -out client-alice.p12 -passout pass:...";
/// The README's mysql2 `ssl` options.
const NODE_SSL: &str = r#"ssl: {ca: fs.readFileSync("ca.pem"), cert: fs.readFileSync("client-alice.pem"), key: fs.readFileSync("client-alice-key.pem"), verifyIdentity: true}"#;
/// The README's warning that mysql2 must dial a name.
const NODE_BY_NAME: &str = "`host` must be a DNS name";
/// The README's PyMySQL settings.
const PYMYSQL_SETTINGS: [&str; 3] = [
    r#"ctx = ssl.create_default_context(cafile="ca.pem")"#,
    r#"ctx.load_cert_chain("client-alice.pem", "client-alice-key.pem")"#,
    "ssl=ctx",
];
/// The README's mysqlclient 1.4 settings, and the option file they name.
const MYSQLCLIENT_SETTINGS: [&str; 2] = [
    r#"ssl={"ca": "ca.pem", "cert": "client-alice.pem", "key": "client-alice-key.pem"}"#,
    r#"read_default_file="postern.cnf""#,
];
const MYSQLCLIENT_CNF: &str = "[client]\nssl-verify-server-cert=1\n";
/// The README's Go settings.
const GO_SETTINGS: [&str; 5] = [
    r#"mysql.RegisterTLSConfig("postern", &tls.Config{"#,
    "RootCAs:      pool,",
    "Certificates: []tls.Certificate{cert},",
    "ServerName:   ",
    "?tls=postern",
];

/// The address most clients dial; mysql2 dials [`LOCALHOST`] (see its test).
const DIALLED: &str = "127.0.0.1";
const LOCALHOST: &str = "localhost";
/// The README's MySQL user `app` logs in with this password to database `shop`.
const PASSWORD: &str = "app-secret";
/// What every program prints: `CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7)`.
const RESULT: &str = "app@% shop 42";
/// The Java key store's password (the README's `...`).
const P12_PASSWORD: &str = "p12-secret";
/// What mysql2 (through Node's TLS) says of a certificate without the name it checked.
const NODE_NAME_REFUSAL: &str = "Hostname/IP does not match certificate's altnames";
/// What the relay says to a client that did not start TLS.
const PLAINTEXT_REFUSAL: &str = "TLS with a client certificate is required";

/// Fails unless README.md, and the program `source` that runs them (if any), show every one of
/// `settings` verbatim.
fn documented(settings: &[&str], source: Option<&str>) {
    for s in settings {
        assert!(
            README.contains(s),
            "README.md no longer shows {s:?}: change tests/drivers and this test with it"
        );
        if let Some(source) = source {
            assert!(
                source.contains(s),
                "the test program does not use the README's {s:?}"
            );
        }
    }
}

/// A database with the README's user `app` and database `shop`, served by two relays: `good`,
/// whose server certificate carries the dialled address, and `wrong`, whose certificate does
/// not. Each relay has its own agent in front of the same database.
struct Relays {
    /// What clients dial: [`DIALLED`] or [`LOCALHOST`].
    dialled: &'static str,
    /// The good relay, its agent and the database.
    good: Stack,
    wrong: RelayRun,
    wrong_agent: AgentRun,
}

/// The relays for clients that dial `dialled` (the good relay's certificate carries both
/// `localhost` and `127.0.0.1`).
async fn relays(dialled: &'static str) -> Relays {
    let pki = TestPki::new();
    // The wrong certificate carries the other form of the same address, so that a driver that
    // checked something else than what it dialled (an IP address for a name, or a default name
    // such as `localhost`) would be caught accepting it.
    let mut spec = LeafSpec::new(Kind::Server, "elsewhere", 1);
    spec.dns = vec!["relay.invalid".into()];
    if dialled == LOCALHOST {
        spec.ips = vec![DIALLED.parse().expect("ip")];
    } else {
        spec.dns.push(LOCALHOST.into());
    }
    pki.write("server-elsewhere", &spec);
    // Heartbeats far apart: a JVM starting on a loaded machine must not starve an agent into
    // being taken for a dead one.
    let good = Stack::builder()
        .pki(pki)
        .mariadb()
        .heartbeat(Duration::from_secs(5))
        .start()
        .await;
    good.db().sql(&format!(
        "CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT); \
         INSERT INTO shop.items VALUES (1, 'anvil'); \
         CREATE USER 'app'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT ALL ON shop.* TO 'app'@'%';"
    ));
    // The same relay with the wrong certificate, and an agent that checks it by a name that
    // certificate carries.
    let mut config = good.relay_config.clone();
    config.tls = Tls::of(&good.pki, "server-elsewhere");
    let wrong = RelayRun::start(&good.file("relay", "yaml"), &config, &[]).await;
    let mut agent = good.agent_config();
    agent.relay = Some(RelaySpec::quic(wrong.quic.expect("QUIC")));
    agent.server_name = Some("relay.invalid".into());
    let mut wrong_agent = good.start_agent(&agent);
    wrong_agent.wait_connected().await;
    wrong.wait_agent("db1").await;
    let relays = Relays {
        dialled,
        good,
        wrong,
        wrong_agent,
    };
    // The wrong relay works for a client that checks the CA but not the name: so each refusal
    // below is the name check, and nothing else.
    let mut cli = relays.mariadb(relays.wrong_port());
    cli.args([
        "--ssl-ca=ca.pem",
        "--ssl-cert=client-alice.pem",
        "--ssl-key=client-alice-key.pem",
        "--skip-ssl-verify-server-cert",
    ]);
    assert_eq!(run(cli).await.result(), RESULT);
    relays
}

impl Relays {
    fn good_port(&self) -> u16 {
        self.good.port()
    }

    fn wrong_port(&self) -> u16 {
        self.wrong.service("orders").port()
    }

    fn dir(&self) -> &Path {
        self.good.pki.dir()
    }

    /// A command run in the directory that holds `ca.pem` and `client-alice*.pem`, as the
    /// README's relative paths expect.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.current_dir(self.dir());
        c
    }

    /// `mariadb` logging in as `app` at the relay on `port`, running the test query, with no
    /// TLS options yet.
    fn mariadb(&self, port: u16) -> Command {
        let mut c = self.command(find("mariadb"));
        c.args([
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "-h",
            DIALLED,
        ])
        .arg(format!("-P{port}"))
        .args(["-u", "app", &format!("--password={PASSWORD}"), "shop"])
        .args([
            "-e",
            "SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7)",
        ]);
        c
    }

    async fn stop(self) {
        self.wrong_agent.stop().await;
        self.wrong.stop().await;
        self.good.stop().await;
    }
}

/// What a client program did.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The printed result of a run that must have succeeded.
    fn result(&self) -> &str {
        assert!(self.ok, "the client failed: {}{}", self.stderr, self.stdout);
        self.stdout.trim()
    }

    /// The error of a run that must have failed, which must contain each of `words`.
    fn refused(&self, words: &[&str]) -> &str {
        assert!(
            !self.ok,
            "the client succeeded where it must be refused: {}",
            self.stdout
        );
        for w in words {
            assert!(
                self.stderr.contains(w),
                "the refusal does not say {w:?}: {}",
                self.stderr
            );
        }
        eprintln!("refused as expected: {}", self.stderr.trim());
        &self.stderr
    }
}

/// Runs a client program to its end (at most a minute: a hung driver fails the test).
async fn run(mut cmd: Command) -> Ran {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A program on PATH (or in /usr/bin), or a failure that says how to install it.
fn tool(name: &str, package: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: install {package} (scripts/install-deps does)")
        })
}

/// A file that must exist, or a failure that says how to install it.
fn installed(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{path} is missing: install {package} (scripts/install-deps does)"
    );
    p
}

/// The first line a program prints about its version (part of the cache key).
fn version(program: &Path, arg: &str) -> String {
    let out = std::process::Command::new(program)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("{} {arg}: {e}", program.display()));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().unwrap_or_default().to_owned()
}

/// A built program's directory under `target/tmp/drivers/`, named after `kind` and a hash of
/// `inputs`. `build` fills a fresh directory, which then takes the final name at once, so that
/// concurrent test runs never see half a build and a finished one is reused.
fn cached(kind: &str, inputs: &[&str], build: impl FnOnce(&Path)) -> PathBuf {
    let mut hash = Sha256::new();
    for i in inputs {
        hash.update(i.as_bytes());
        hash.update([0]);
    }
    let key: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("drivers");
    let done = root.join(format!("{kind}-{key}"));
    if done.is_dir() {
        return done;
    }
    std::fs::create_dir_all(&root).expect("create target/tmp/drivers");
    let work = tempfile::Builder::new()
        .prefix(&format!("{kind}-build"))
        .tempdir_in(&root)
        .expect("build dir");
    let started = tokio::time::Instant::now();
    build(work.path());
    eprintln!("built the {kind} test program in {:?}", started.elapsed());
    let work = work.keep();
    if std::fs::rename(&work, &done).is_err() {
        // Another test process finished the same build first.
        let _ = std::fs::remove_dir_all(&work);
    }
    done
}

/// Runs a build step, failing with its output.
fn build_step(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const CONNECTOR_J: &str = "/usr/share/java/mariadb-java-client.jar";

/// The compiled JDBC program's class directory.
fn java_classes() -> &'static Path {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let javac = tool("javac", "openjdk-17-jdk-headless");
        installed(CONNECTOR_J, "libmariadb-java");
        let inputs = [JAVA_SOURCE, &version(&javac, "-version")];
        cached("java", &inputs, |dir| {
            let src = dir.join("PosternJdbc.java");
            std::fs::write(&src, JAVA_SOURCE).expect("write source");
            build_step(
                std::process::Command::new(&javac)
                    .arg("-d")
                    .arg(dir)
                    .arg(&src),
            );
        })
    })
}

/// The Go program, built offline against Debian's go-sql-driver/mysql in GOPATH mode.
fn go_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let go = tool("go", "golang-go");
        installed(
            "/usr/share/gocode/src/github.com/go-sql-driver/mysql",
            "golang-github-go-sql-driver-mysql-dev",
        );
        let inputs = [GO_SOURCE, &version(&go, "version")];
        let gocache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("drivers/go-build-cache");
        cached("go", &inputs, |dir| {
            let src = dir.join("postern_go.go");
            std::fs::write(&src, GO_SOURCE).expect("write source");
            build_step(
                std::process::Command::new(&go)
                    .arg("build")
                    .arg("-o")
                    .arg(dir.join("postern_go"))
                    .arg(&src)
                    .current_dir(dir)
                    .env("GO111MODULE", "off")
                    .env("GOPATH", "/usr/share/gocode")
                    .env("GOCACHE", &gocache)
                    .env("GOPROXY", "off")
                    .env_remove("GOFLAGS"),
            );
        })
        .join("postern_go")
    })
}

/// The Node program, with mysql2 installed from the lock file beside it.
fn node_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let node = tool("node", "nodejs");
        let npm = tool("npm", "npm");
        let inputs = [
            NODE_SOURCE,
            NODE_PACKAGE,
            NODE_LOCK,
            &version(&node, "--version"),
        ];
        cached("node", &inputs, |dir| {
            std::fs::write(dir.join("connect.js"), NODE_SOURCE).expect("write source");
            std::fs::write(dir.join("package.json"), NODE_PACKAGE).expect("write package");
            std::fs::write(dir.join("package-lock.json"), NODE_LOCK).expect("write lock");
            build_step(
                std::process::Command::new(&npm)
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(dir),
            );
        })
        .join("connect.js")
    })
}

/// A Python that can import `module`: Debian's /usr/bin/python3 first (where apt installs the
/// drivers), then `python3` on PATH.
fn python_with(module: &str, package: &str) -> PathBuf {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|py| {
            std::process::Command::new(py)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!("no python3 can import {module}: install {package} (scripts/install-deps does)")
        })
}

/// A Python test program's path, written under `target/tmp/drivers/`.
fn python_program(name: &str, source: &str) -> PathBuf {
    cached(name, &[source], |dir| {
        std::fs::write(dir.join(format!("{name}.py")), source).expect("write source");
    })
    .join(format!("{name}.py"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cli_and_mysqldump_with_the_documented_options() {
    documented(&[CLI_OPTIONS], None);
    let r = relays(DIALLED).await;
    let tls: Vec<&str> = CLI_OPTIONS.split(' ').collect();

    let mut good = r.mariadb(r.good_port());
    good.args(&tls);
    assert_eq!(run(good).await.result(), RESULT);
    let mut wrong = r.mariadb(r.wrong_port());
    wrong.args(&tls);
    run(wrong)
        .await
        .refused(&["2026", "Validation of SSL server certificate failed"]);
    let mut plain = r.mariadb(r.good_port());
    plain.arg("--skip-ssl");
    run(plain).await.refused(&["1045", PLAINTEXT_REFUSAL]);

    let dump = |port: u16| {
        let mut c = r.command(find("mysqldump"));
        c.args(["--no-defaults", "-h", DIALLED])
            .arg(format!("-P{port}"))
            .args(["-u", "app", &format!("--password={PASSWORD}")])
            .args(&tls)
            .args(["shop", "items"]);
        c
    };
    let dumped = run(dump(r.good_port())).await;
    let sql = dumped.result();
    assert!(
        sql.contains("CREATE TABLE `items`") && sql.contains("(1,'anvil')"),
        "{sql}"
    );
    run(dump(r.wrong_port()))
        .await
        .refused(&["2026", "Validation of SSL server certificate failed"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_connector_j_2_with_the_documented_url() {
    documented(&[JDBC_2, JDBC_3, P12_EXPORT], None);
    let classes = java_classes();
    let java = tool("java", "openjdk-17-jre-headless");
    let r = relays(DIALLED).await;
    // The key store, made with the README's command.
    let mut export = r.command(tool("openssl", "openssl"));
    export.args(P12_EXPORT.replace("...", P12_PASSWORD).split(' ').skip(1));
    run(export).await.result();

    let jdbc = |url: &str, port: u16| {
        let url = url
            .replace("relay.example.com:13306", &format!("{}:{port}", r.dialled))
            .replace("/etc/app/", &format!("{}/", r.dir().display()))
            .replace("...", P12_PASSWORD);
        let mut c = r.command(&java);
        c.arg("-cp")
            .arg(format!("{}:{CONNECTOR_J}", classes.display()))
            .args(["PosternJdbc", &url, PASSWORD]);
        c
    };
    assert_eq!(run(jdbc(JDBC_2, r.good_port())).await.result(), RESULT);
    run(jdbc(JDBC_2, r.wrong_port())).await.refused(&[
        "SSL hostname verification failed",
        "IPv4 host \"127.0.0.1\"",
    ]);
    // Connector/J 2 ignores the 3.x `sslMode` and logs in without TLS: the relay refuses, and
    // the driver shows why.
    run(jdbc(JDBC_3, r.good_port()))
        .await
        .refused(&[PLAINTEXT_REFUSAL]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sql_driver_with_the_documented_tls_config() {
    documented(&GO_SETTINGS, Some(GO_SOURCE));
    let program = go_program();
    let r = relays(DIALLED).await;
    let go = |port: u16, plain: bool| {
        let mut c = r.command(program);
        c.args([r.dialled, &port.to_string(), PASSWORD]);
        if plain {
            c.arg("plain");
        }
        c
    };
    assert_eq!(run(go(r.good_port(), false)).await.result(), RESULT);
    run(go(r.wrong_port(), false))
        .await
        .refused(&["x509: cannot validate certificate for 127.0.0.1"]);
    run(go(r.good_port(), true))
        .await
        .refused(&["1045", PLAINTEXT_REFUSAL]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_mysql2_with_the_documented_ssl_options() {
    documented(&[NODE_SSL], Some(NODE_SOURCE));
    documented(&[NODE_BY_NAME], None);
    let program = node_program();
    let node = tool("node", "nodejs");
    // mysql2 checks the name only when it dials a name (see below), so it dials `localhost`.
    let r = relays(LOCALHOST).await;
    let connect = |host: &str, port: u16, plain: bool| {
        let mut c = r.command(&node);
        c.arg(program).args([host, &port.to_string(), PASSWORD]);
        if plain {
            c.arg("plain");
        }
        c
    };
    assert_eq!(
        run(connect(r.dialled, r.good_port(), false)).await.result(),
        RESULT
    );
    run(connect(r.dialled, r.wrong_port(), false))
        .await
        .refused(&[NODE_NAME_REFUSAL, "Host: localhost."]);
    run(connect(r.dialled, r.good_port(), true))
        .await
        .refused(&[PLAINTEXT_REFUSAL]);
    // What the README warns of: dialled by IP address, mysql2 checks the certificate for the
    // name `localhost` instead, so it refuses the wrong relay's certificate, which carries
    // exactly the dialled 127.0.0.1 (and would accept any certificate for `localhost`).
    run(connect(DIALLED, r.wrong_port(), false))
        .await
        .refused(&[NODE_NAME_REFUSAL, "Host: localhost."]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mysqlclient_with_the_documented_ssl_and_option_file() {
    documented(&MYSQLCLIENT_SETTINGS, Some(MYSQLCLIENT_SOURCE));
    documented(&[MYSQLCLIENT_CNF], None);
    let python = python_with("MySQLdb", "python3-mysqldb");
    let program = python_program("mysqlclient_connect", MYSQLCLIENT_SOURCE);
    let r = relays(DIALLED).await;
    std::fs::write(r.dir().join("postern.cnf"), MYSQLCLIENT_CNF).expect("write postern.cnf");
    let connect = |port: u16, plain: bool| {
        let mut c = r.command(&python);
        c.arg(&program)
            .args([r.dialled, &port.to_string(), PASSWORD]);
        if plain {
            c.arg("plain");
        }
        c
    };
    assert_eq!(run(connect(r.good_port(), false)).await.result(), RESULT);
    run(connect(r.wrong_port(), false))
        .await
        .refused(&["2026", "Validation of SSL server certificate failed"]);
    run(connect(r.good_port(), true))
        .await
        .refused(&["1045", PLAINTEXT_REFUSAL]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_pymysql_connects_with_an_ssl_context() {
    documented(&PYMYSQL_SETTINGS, Some(PYMYSQL_SOURCE));
    let python = python_with("pymysql", "python3-pymysql");
    let program = python_program("pymysql_connect", PYMYSQL_SOURCE);
    let r = relays(DIALLED).await;
    let connect = |port: u16, plain: bool| {
        let mut c = r.command(&python);
        c.arg(&program)
            .args([r.dialled, &port.to_string(), PASSWORD]);
        if plain {
            c.arg("plain");
        }
        c
    };
    assert_eq!(run(connect(r.good_port(), false)).await.result(), RESULT);
    run(connect(r.wrong_port(), false))
        .await
        .refused(&["CERTIFICATE_VERIFY_FAILED", "IP address mismatch"]);
    run(connect(r.good_port(), true))
        .await
        .refused(&["1045", PLAINTEXT_REFUSAL]);
    r.stop().await;
}
