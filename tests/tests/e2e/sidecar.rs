//! Bound apps and `cf tunnel` with today's Cloud Foundry: the real `postern-agent connect`
//! reading its binding (`--binding` from `VCAP_SERVICES`, `VCAP_SERVICES_FILE_PATH` and
//! `SERVICE_BINDING_ROOT`; `--service-key` from a file or stdin), an "app" process that knows
//! only its `VCAP_SERVICES` and speaks plain MySQL to the sidecar's loopback port, and the
//! interactive chooser driven through a pseudo-terminal (`script` from util-linux).
//!
//! The credentials are built as the broker builds them ([`Credentials::new`]) around a client
//! certificate the test issues; the relay allows that identity for the service. `broker.rs`
//! runs the same sidecar and `--service-key` with the broker's real bindings.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_common::binding::{Credentials, Spec};
use postern_tests::mariadb::free_port;
use postern_tests::procs::{LOG_WAIT, Proc, bin};
use postern_tests::*;
use serde_json::{Value, json};

/// The client identity of the binding: a certificate issued by hand, as for a user-provided
/// service (the broker's own bindings, `binding-<id>`, are tested in `broker.rs`).
const IDENTITY: &str = "sidecar-app";
/// The MySQL login in the credentials.
const USER: &str = "app";
const PASSWORD: &str = "s3cret pass";

/// A stack whose relay allows the binding's identity, and a database user for the app.
async fn setup() -> Stack {
    let s = Stack::builder().mariadb().clients([IDENTITY]).start().await;
    s.db().sql(&format!(
        "CREATE DATABASE appdb; \
         CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
         CREATE USER '{USER}'@'localhost' IDENTIFIED BY '{PASSWORD}'; \
         CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; \
         GRANT ALL ON *.* TO '{USER}'@'%'; GRANT ALL ON *.* TO '{USER}'@'localhost'; \
         GRANT ALL ON *.* TO '{USER}'@'127.0.0.1';"
    ));
    s
}

/// The credentials the broker would hand out for this stack: the sidecar shape (the app at
/// `127.0.0.1:local_port`) when `local_port` is given, else the direct shape (a service key).
fn credentials(s: &Stack, local_port: Option<u16>, database: &str) -> Value {
    let base = s.pki.issue(postern_common::pki::Kind::Client, IDENTITY);
    let (cert, key) = s.pki.files(&base);
    let read = |p: &Path| std::fs::read_to_string(p).expect("read pem");
    Credentials::new(&Spec {
        service: "orders".into(),
        identity: IDENTITY.into(),
        host: "127.0.0.1".into(),
        port: local_port.unwrap_or_else(|| s.port()),
        local_port,
        database: database.into(),
        username: USER.into(),
        password: PASSWORD.into(),
        ca_pem: read(&s.pki.ca()),
        cert_pem: read(&cert),
        key_pem: read(&key),
        relays: vec![format!("quic://{}", s.relay().quic())],
        server_name: Some("localhost".into()),
        jdbc_url: true,
        expires_at: None,
    })
    .to_value()
}

/// `VCAP_SERVICES` with `credentials` bound as `db`, next to another service's binding.
pub(crate) fn vcap_services(credentials: &Value) -> String {
    json!({
        "postern": [{
            "name": "db", "binding_name": "db", "instance_name": "orders-db",
            "binding_guid": "7f3a", "instance_guid": "44c1", "label": "postern",
            "tags": ["mysql", "relational"], "plan": "orders", "credentials": credentials,
            "syslog_drain_url": null, "volume_mounts": [],
        }],
        "user-provided": [{
            "name": "logs", "binding_name": null, "instance_name": "logs",
            "label": "user-provided", "tags": [], "credentials": {"url": "syslog://x"},
        }],
    })
    .to_string()
}

/// The "app": finds binding `db` in whichever of the three places the platform used, and
/// with nothing but its `host`, `port`, `username`, `password` and `name` writes a row over
/// plain TCP and reads it back (the `mariadb` CLI, password in `MYSQL_PWD`).
const APP: &str = r#"
import json, os, subprocess, sys
if os.environ.get("VCAP_SERVICES"):
    vcap = json.loads(os.environ["VCAP_SERVICES"])
elif os.environ.get("VCAP_SERVICES_FILE_PATH"):
    vcap = json.load(open(os.environ["VCAP_SERVICES_FILE_PATH"]))
else:
    vcap = None
if vcap is not None:
    c = [b for bs in vcap.values() for b in bs if b.get("binding_name") == "db"][0]["credentials"]
else:
    d = os.path.join(os.environ["SERVICE_BINDING_ROOT"], "db")
    c = {k: open(os.path.join(d, k)).read() for k in os.listdir(d)}
env = dict(os.environ, MYSQL_PWD=c["password"])
sql = ("CREATE TABLE IF NOT EXISTS notes (id INT PRIMARY KEY, body TEXT); "
       "INSERT INTO notes VALUES (%s, 'from the app'); "
       "SELECT body FROM notes WHERE id = %s;" % (sys.argv[1], sys.argv[1]))
r = subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "-N", "-B",
                    "-h", c["host"], "-P", str(c["port"]), "-u", c["username"], c["name"],
                    "-e", sql], env=env, capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
sys.exit(r.returncode)
"#;

/// Runs the app with `env` (row `id`) and asserts it wrote and read its row.
pub(crate) fn run_app(env: &[(&str, &str)], id: u32) {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", APP, &id.to_string()])
        .env_remove("VCAP_SERVICES")
        .env_remove("VCAP_SERVICES_FILE_PATH")
        .env_remove("SERVICE_BINDING_ROOT")
        .envs(env.iter().copied())
        .output()
        .expect("run the app");
    assert!(
        out.status.success(),
        "app failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the app\n");
}

/// Starts the sidecar as Cloud Foundry would (`connect --binding db`, the binding in `env`)
/// and waits until its port is open.
pub(crate) async fn sidecar(s: &Stack, env: &[(&str, &str)]) -> Proc {
    let p = Proc::spawn_env(
        "postern-agent",
        &["connect", "--binding", "db"],
        env,
        s.file("sidecar", "log"),
    );
    p.wait_log("is available at", LOG_WAIT).await;
    p
}

/// The sidecar's log must never hold the key or the password.
fn assert_no_secrets(p: &Proc, credentials: &Value) {
    let log = p.log_text();
    let key = credentials["tls.key"].as_str().expect("key");
    let key_body = key.lines().nth(1).expect("a key line");
    assert!(!log.contains(key_body), "the key is in the log:\n{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_reaches_the_database_through_the_sidecar_from_vcap_services() {
    let s = setup().await;
    let port = free_port();
    let creds = credentials(&s, Some(port), "appdb");
    assert_eq!(creds["host"], "127.0.0.1");
    assert_eq!(creds["port"], port);
    let vcap = vcap_services(&creds);
    let p = sidecar(&s, &[("VCAP_SERVICES", &vcap)]).await;
    let line = p.wait_log("is available at", LOG_WAIT).await;
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    run_app(&[("VCAP_SERVICES", &vcap)], 1);
    // The row is in the private server.
    assert_eq!(s.db().sql("SELECT body FROM appdb.notes"), "from the app\n");
    // No certificate, key or file on disk: the sidecar kept them in memory.
    assert_no_secrets(&p, &creds);
    p.stop();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_reaches_the_database_through_the_sidecar_from_file_based_bindings() {
    let s = setup().await;

    // file-based-vcap-services: the same JSON in a file.
    let port = free_port();
    let creds = credentials(&s, Some(port), "appdb");
    let file = s.file("vcap-services", "json");
    std::fs::write(&file, vcap_services(&creds)).expect("write VCAP_SERVICES file");
    let file = file.to_str().expect("utf-8").to_owned();
    let env = [("VCAP_SERVICES_FILE_PATH", file.as_str())];
    let p = sidecar(&s, &env).await;
    run_app(&env, 1);
    assert_no_secrets(&p, &creds);
    p.stop();

    // service-binding-k8s: a directory per binding, a file per key, nested values as JSON.
    let port = free_port();
    let creds = credentials(&s, Some(port), "appdb");
    let root = s.file("bindings", "d");
    for (binding, creds, kind) in [
        ("db", &creds, "postern"),
        ("logs", &json!({"url": "syslog://x"}), "user-provided"),
    ] {
        let dir = root.join(binding);
        std::fs::create_dir_all(&dir).expect("binding dir");
        std::fs::write(dir.join("type"), kind).expect("type");
        for (key, value) in creds.as_object().expect("object") {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            std::fs::write(dir.join(key), text).expect("key file");
        }
    }
    let root = root.to_str().expect("utf-8").to_owned();
    let env = [("SERVICE_BINDING_ROOT", root.as_str())];
    let p = sidecar(&s, &env).await;
    run_app(&env, 2);
    assert_no_secrets(&p, &creds);
    p.stop();

    assert_eq!(
        s.db().sql("SELECT id FROM appdb.notes ORDER BY id"),
        "1\n2\n"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_foreign_binding_is_named_in_the_error() {
    let s = setup().await;
    let vcap = vcap_services(&credentials(&s, None, "appdb"));
    let run = |args: &[&str], vcap: Option<&str>| {
        let mut c = Command::new(bin("postern-agent"));
        c.args(["connect"])
            .args(args)
            .env_remove("VCAP_SERVICES")
            .env_remove("VCAP_SERVICES_FILE_PATH")
            .env_remove("SERVICE_BINDING_ROOT")
            .stdin(Stdio::null());
        if let Some(v) = vcap {
            c.env("VCAP_SERVICES", v);
        }
        let out = c.output().expect("run connect");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--binding", "orders"], Some(&vcap));
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("no binding named \"orders\"")
            && err.contains("db (label postern, Postern credentials), logs (label user-provided)"),
        "{err}"
    );
    let (code, err) = run(&["--binding", "logs"], Some(&vcap));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("binding \"logs\" is not usable"), "{err}");
    let (code, err) = run(&["--binding"], None);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("VCAP_SERVICES"), "{err}");
    s.stop().await;
}

/// `connect --service-key -` with `key` (what `cf service-key` printed) on stdin, running
/// `mariadb -e sql` against the local port.
pub(crate) fn run_service_key(key: &str, sql: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin("postern-agent"))
        .args(["connect", "--service-key", "-", "--exec", "mariadb"])
        .args(["--no-defaults", "-N", "-B", "-e", sql])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run connect --service-key -");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(key.as_bytes())
        .expect("write the key");
    child.wait_with_output().expect("connect exits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_key_on_stdin_reaches_the_database() {
    let s = setup().await;
    // What `cf service-key db laptop` prints (cf CLI v8: the credentials wrapped).
    let key = format!(
        "Getting key laptop for service instance db as dev@example.com...\n\n{}\n",
        serde_json::to_string_pretty(&json!({"credentials": credentials(&s, None, "appdb")}))
            .expect("json")
    );
    let out = run_service_key(&key, "SELECT CURRENT_USER(), 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key's user logged in (its password went through MYSQL_PWD).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{USER}@")), "{stdout}");
    assert!(stdout.ends_with("\t1\n"), "{stdout}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chooser_on_a_terminal_runs_mysqldump_into_the_file_given() {
    let s = setup().await;
    s.db().create_dump_source();
    let key = s.file("laptop-key", "json");
    std::fs::write(
        &key,
        serde_json::to_string_pretty(&credentials(&s, None, "src")).expect("json"),
    )
    .expect("write the service key");
    let work = tempfile::tempdir().expect("tempdir");
    // `script` gives `connect` a pseudo-terminal for stdin, stdout and stderr; `-e` returns
    // its status.
    let cmd = format!(
        "'{}' connect --service-key '{}'",
        bin("postern-agent").display(),
        key.display()
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .current_dir(work.path())
        // No option files of the machine or the user: only what `connect` passes.
        .env("HOME", work.path())
        .env("TERM", "dumb")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    // Typed ahead: the terminal holds the lines until `connect` reads them, one at a time.
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"3\norders.sql\n")
        .await
        .expect("type the answers");
    let reading = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("connect exits after mysqldump")
        .expect("wait");
    drop(stdin);
    let screen = reading.await.expect("screen");
    assert!(status.success(), "{status:?}:\n{screen}");
    for prompt in [
        "1: none",
        "2: mariadb",
        "3: mysqldump",
        "Which client would you like to start?",
        "Output file:",
    ] {
        assert!(
            screen.contains(prompt),
            "{prompt:?} not on the screen:\n{screen}"
        );
    }
    assert!(
        !screen.contains("CREATE TABLE"),
        "the dump went to the file, not the terminal:\n{screen}"
    );
    let dump = std::fs::read(work.path().join("orders.sql")).expect("the dump file");
    s.db().assert_restores_identically(&Output {
        status: std::process::ExitStatus::from_raw(0),
        stdout: dump,
        stderr: Vec::new(),
    });
    s.stop().await;
}

#[test]
fn the_app_manifest_example_runs_the_sidecar_with_a_valid_command_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/cf/app-manifest.yml");
    let text = std::fs::read_to_string(&path).expect("read the app manifest");
    let manifest: Value = serde_saphyr::from_str(&text).expect("the manifest is YAML");
    let app = &manifest["applications"][0];
    assert_eq!(app["services"][0]["parameters"]["local_port"], 3306);
    let sidecar = &app["sidecars"][0];
    assert_eq!(sidecar["process_types"], json!(["web"]));
    let command = sidecar["command"].as_str().expect("a command");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[0], "./postern-agent");
    // The real binary takes the command line and goes looking for the binding (which this
    // environment does not have): the words are right.
    let out = Command::new(bin("postern-agent"))
        .args(&words[1..])
        .env_remove("VCAP_SERVICES")
        .env_remove("VCAP_SERVICES_FILE_PATH")
        .env_remove("SERVICE_BINDING_ROOT")
        .stdin(Stdio::null())
        .output()
        .expect("run the sidecar command");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{command}: {err}");
    assert!(
        err.contains("no bindings in the environment"),
        "{command}: {err}"
    );
}
