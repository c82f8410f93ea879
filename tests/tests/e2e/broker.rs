//! The relay's service broker as Cloud Foundry uses it: the Open Service Broker API calls with
//! their documented codes and bodies, bindings whose credentials connect with the `mariadb`
//! CLI and PyMySQL, unbinding that closes open connections and refuses the certificate at every
//! relay instance, and bindings kept in PostgreSQL across a restart (SQLite for one relay).

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{ClientIdentity, OptsBuilder, SslOpts};
use postern_tests::broker::{self, BindingFiles, Osb, Postgres};
use postern_tests::stack::{BROKER_APP_PASSWORD, BROKER_PASSWORD};
use postern_tests::*;
use serde_json::{Value, json};
use tokio::time::Instant;

const INSTANCE: &str = "5a0cf4a1-54d5-4fb4-a9a7-3e6d1f1b6f10";
const BINDING: &str = "8d2e38f3-9f5b-4a53-9c36-2f0f1b1e5a77";

/// The plan every service of these stacks offers: the operator's user `app` on `appdb`.
fn plan() -> Value {
    json!({"database": "appdb", "username": "app"})
}

/// Makes `appdb` and the plan's user on the stack's MariaDB.
fn create_app_user(stack: &Stack) {
    stack.db().sql(&format!(
        "CREATE DATABASE IF NOT EXISTS appdb; \
         CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY '{BROKER_APP_PASSWORD}'; \
         GRANT ALL ON appdb.* TO 'app'@'%'"
    ));
}

/// mysql_async options that use a binding's files and credentials against `port`.
fn binding_opts(files: &BindingFiles, creds: &Value, port: u16) -> OptsBuilder {
    let ssl = SslOpts::default()
        .with_root_certs(vec![files.ca.clone().into()])
        .with_disable_built_in_roots(true)
        .with_client_identity(Some(ClientIdentity::new(
            files.cert.clone().into(),
            files.key.clone().into(),
        )));
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(creds["username"].as_str())
        .pass(creds["password"].as_str())
        .db_name(creds["name"].as_str())
        .prefer_socket(false)
        .ssl_opts(ssl)
}

/// A PyMySQL program that reads a binding's credentials (JSON, as an app finds them in
/// `VCAP_SERVICES`), writes the TLS material to files for its SSL context, connects to
/// `hostname:port` and prints a query's result.
const PYMYSQL_BOUND_APP: &str = r#"
import json, os, ssl, sys, tempfile
import pymysql
c = json.load(open(sys.argv[1]))
d = tempfile.mkdtemp()
for name in ("ca.crt", "tls.crt", "tls.key"):
    with open(os.path.join(d, name), "w") as f:
        f.write(c[name])
ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.crt"))
ctx.check_hostname = False
ctx.load_cert_chain(os.path.join(d, "tls.crt"), os.path.join(d, "tls.key"))
try:
    conn = pymysql.connect(host=c["hostname"], port=int(sys.argv[2]), user=c["username"],
                           password=c["password"], database=c["name"], ssl=ctx)
    with conn.cursor() as cur:
        cur.execute("SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7)")
        print(cur.fetchone()[0])
    conn.close()
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
"#;

fn python_with_pymysql() -> &'static str {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|py| {
            std::process::Command::new(py)
                .args(["-c", "import pymysql"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a python3 with pymysql (scripts/install-deps installs python3-pymysql)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osb_calls_get_the_documented_codes_and_bodies_and_a_binding_connects() {
    let stack = Stack::builder()
        .service("orders")
        .service("billing")
        .mariadb()
        .broker(None, plan())
        .start()
        .await;
    create_app_user(&stack);
    let osb = stack.osb(0);

    // Authentication and the API version come first.
    let anonymous = Osb::new(osb.api.without_auth());
    let r = anonymous.call("GET", "/v2/catalog", None).await.expect(401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"Authorization Required\"")
    );
    Osb::new(osb.api.with_auth(broker::BROKER_USER, "wrong"))
        .call("GET", "/v2/catalog", None)
        .await
        .expect(401);
    for version in [None, Some("1.0"), Some("2.10"), Some("3.0")] {
        let mut o = osb.clone();
        o.version = version.map(str::to_owned);
        let r = o.call("GET", "/v2/catalog", None).await.expect(412);
        assert!(
            r.json::<Value>()["description"]
                .as_str()
                .unwrap()
                .contains("X-Broker-API-Version"),
            "{}",
            r.body
        );
    }

    // The catalog: one bindable offering tagged mysql, one plan per service.
    let (catalog, ids) = osb.catalog().await;
    let service = &catalog["services"][0];
    assert_eq!(service["name"], "postern");
    assert_eq!(service["bindable"], true);
    assert!(
        service["tags"]
            .as_array()
            .unwrap()
            .contains(&json!("mysql"))
    );
    let mut plans: Vec<&str> = ids.plans.iter().map(|(n, _)| n.as_str()).collect();
    plans.sort_unstable();
    assert_eq!(plans, ["billing", "orders"]);
    assert_eq!(
        osb.catalog().await.1.plan("orders"),
        ids.plan("orders"),
        "ids are stable"
    );

    // Provision: 400 for unknown ids and parameters, 201, 200 when identical, 409 otherwise.
    let bad_service = osb
        .call(
            "PUT",
            &format!("/v2/service_instances/{INSTANCE}"),
            Some(&json!({"service_id": "nope", "plan_id": ids.plan("orders")})),
        )
        .await
        .expect(400);
    assert!(
        bad_service.body.contains("unknown service_id"),
        "{}",
        bad_service.body
    );
    osb.call(
        "PUT",
        &format!("/v2/service_instances/{INSTANCE}"),
        Some(&json!({"service_id": ids.service_id, "plan_id": "nope"})),
    )
    .await
    .expect(400);
    osb.call(
        "PUT",
        &format!("/v2/service_instances/{INSTANCE}"),
        Some(&json!({"service_id": ids.service_id, "plan_id": ids.plan("orders"), "parameters": {"size": 1}})),
    )
    .await
    .expect(400);
    osb.call(
        "PUT",
        &format!("/v2/service_instances/{INSTANCE}"),
        Some(&json!([1])),
    )
    .await
    .expect(400);
    let created = osb.provision(&ids, INSTANCE, "orders").await.expect(201);
    assert_eq!(created.json::<Value>(), json!({}));
    assert_eq!(
        created.header("x-broker-api-request-identity"),
        Some("e26cea32-0ac3-4d10-9a49-3c2aa4c6cf3b"),
        "the request identity is echoed"
    );
    osb.provision(&ids, INSTANCE, "orders").await.expect(200);
    osb.provision(&ids, INSTANCE, "billing").await.expect(409);
    let got: Value = osb
        .call("GET", &format!("/v2/service_instances/{INSTANCE}"), None)
        .await
        .expect(200)
        .json();
    assert_eq!(got["plan_id"], ids.plan("orders"));
    osb.call("GET", "/v2/service_instances/unknown", None)
        .await
        .expect(404);
    let op: Value = osb
        .call(
            "GET",
            &format!("/v2/service_instances/{INSTANCE}/last_operation"),
            None,
        )
        .await
        .expect(200)
        .json();
    assert_eq!(op["state"], "succeeded");
    osb.call("GET", "/v2/service_instances/unknown/last_operation", None)
        .await
        .expect(410);

    // Bind: 422 for an unknown instance, 400 for unknown parameters, 201, 200, 409.
    osb.bind(&ids, "unknown", BINDING, "orders", json!({}))
        .await
        .expect(422);
    let r = osb
        .bind(
            &ids,
            INSTANCE,
            BINDING,
            "orders",
            json!({"local_prot": 3306}),
        )
        .await
        .expect(400);
    assert!(r.body.contains("local_prot"), "{}", r.body);
    let bound: Value = osb
        .bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let creds = &bound["credentials"];
    let port = stack.relays[0].mysql("orders").port();
    for (key, want) in [
        ("hostname", json!("127.0.0.1")),
        ("host", json!("127.0.0.1")),
        ("port", json!(port)),
        ("name", json!("appdb")),
        ("database", json!("appdb")),
        ("username", json!("app")),
        ("password", json!(BROKER_APP_PASSWORD)),
        (
            "uri",
            json!(format!(
                "mysql://app:{BROKER_APP_PASSWORD}@127.0.0.1:{port}/appdb?ssl-mode=VERIFY_IDENTITY"
            )),
        ),
    ] {
        assert_eq!(creds[key], want, "credentials.{key}");
    }
    assert!(
        creds["jdbcUrl"]
            .as_str()
            .unwrap()
            .starts_with(&format!("jdbc:mysql://127.0.0.1:{port}/appdb?user=app&")),
        "{}",
        creds["jdbcUrl"]
    );
    for key in ["ca_certificate", "ca.crt", "tls.crt", "tls.key"] {
        assert!(creds[key].as_str().unwrap().contains("-----BEGIN"), "{key}");
    }
    assert_eq!(creds["tls"]["cert"]["ca"], creds["ca_certificate"]);
    assert_eq!(
        creds["tls.crt"]
            .as_str()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the leaf and the broker's intermediate CA"
    );
    assert_eq!(
        creds["postern"]["identity"],
        format!("binding-{BINDING}"),
        "the identity names the binding"
    );
    assert_eq!(bound["endpoints"][0]["ports"][0], port.to_string());
    assert!(bound["metadata"]["expires_at"].as_str().is_some());
    // The same bind again: the binding stands (200); other parameters conflict (409).
    osb.bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(200);
    osb.bind(
        &ids,
        INSTANCE,
        BINDING,
        "orders",
        json!({"jdbc_url": false}),
    )
    .await
    .expect(409);

    // The credentials connect: the mariadb CLI with the files written from the JSON, and
    // PyMySQL reading the JSON as an app reads VCAP_SERVICES.
    let dir = tempfile::tempdir().unwrap();
    let files = BindingFiles::write(creds, dir.path());
    let cli = files.cli(port, creds).arg("appdb");
    cli.ok("CREATE TABLE IF NOT EXISTS t (v INT); INSERT INTO t VALUES (42)");
    assert_eq!(cli.ok("SELECT v FROM t").trim(), "42");
    let creds_file = dir.path().join("credentials.json");
    std::fs::write(&creds_file, creds.to_string()).unwrap();
    let program = dir.path().join("app.py");
    std::fs::write(&program, PYMYSQL_BOUND_APP).unwrap();
    let out = std::process::Command::new(python_with_pymysql())
        .arg(&program)
        .arg(&creds_file)
        .arg(port.to_string())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "app@% appdb 42",
        "pymysql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A binding reaches only its own service.
    let billing = stack.relays[0].mysql("billing").port();
    let refused = files.cli(billing, creds).fails("SELECT 1");
    assert!(refused.contains("not allowed to use service"), "{refused}");

    // Unbind: 400 without the ids, 200, then 410; the certificate is refused from then on.
    osb.call(
        "DELETE",
        &format!("/v2/service_instances/{INSTANCE}/service_bindings/{BINDING}"),
        None,
    )
    .await
    .expect(400);
    assert_eq!(
        osb.unbind(&ids, INSTANCE, BINDING, "orders")
            .await
            .expect(200)
            .json::<Value>(),
        json!({})
    );
    osb.unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(410);
    let refused = cli.fails("SELECT 1");
    assert!(refused.contains("not allowed to use service"), "{refused}");
    // A deleted binding's id is not reused.
    osb.bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(409);

    // Deprovision: 200, then 410.
    osb.deprovision(&ids, INSTANCE, "orders").await.expect(200);
    osb.deprovision(&ids, INSTANCE, "orders").await.expect(410);
    osb.call("GET", "/v2/nothing-here", None).await.expect(404);
    stack.stop().await;
}

/// A connection with a binding's credentials through the listener at `port`, once it admits
/// the binding (an instance that did not take the bind learns it within a poll); fails after
/// 5 s with the last error.
async fn admitted(files: &BindingFiles, creds: &Value, port: u16) -> mysql_async::Conn {
    let started = Instant::now();
    loop {
        match mysql_async::Conn::new(binding_opts(files, creds, port)).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the listener on {port} does not admit the binding: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits until `conn` fails a query; how long that took from `since`.
async fn closed_within(conn: &mut mysql_async::Conn, since: Instant, limit: Duration) -> Duration {
    loop {
        if conn.query_drop("SELECT 1").await.is_err() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "the revoked binding's connection is still open after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_bindings_in_postgres_and_unbind_closes_connections_at_both() {
    let pg = Postgres::create();
    let stack = Stack::builder()
        .mariadb()
        .cloud_foundry("7c1e2f4a-1111-4a8b-9c3d-5e6f7a8b9c0d", 2)
        .broker(Some(pg.url()), plan())
        .start()
        .await;
    create_app_user(&stack);
    let (_, ids) = stack.osb(0).catalog().await;
    // Provision and bind through instance 0 ...
    stack
        .osb(0)
        .provision(&ids, INSTANCE, "orders")
        .await
        .expect(201);
    let bound: Value = stack
        .osb(0)
        .bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let creds = &bound["credentials"];
    let dir = tempfile::tempdir().unwrap();
    let files = BindingFiles::write(creds, dir.path());
    // ... and instance 1 knows the instance and admits the binding.
    stack
        .osb(1)
        .provision(&ids, INSTANCE, "orders")
        .await
        .expect(200);
    let ports = [0, 1].map(|i| stack.relays[i].mysql("orders").port());
    let mut conns = Vec::new();
    for port in ports {
        conns.push(admitted(&files, creds, port).await);
    }
    for c in &mut conns {
        let v: Option<String> = c.query_first("SELECT CURRENT_USER()").await.unwrap();
        assert_eq!(v.as_deref(), Some("app@%"));
    }
    // The store holds the binding (and no key or password).
    let stored = pg.sql("SELECT identity, username FROM postern_broker_bindings");
    assert_eq!(stored.trim(), format!("binding-{BINDING}|"));

    // Unbind through instance 0: both open connections are closed, on both instances.
    let unbound = Instant::now();
    stack
        .osb(0)
        .unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(200);
    let mut took = Vec::new();
    for c in &mut conns {
        took.push(closed_within(c, unbound, Duration::from_secs(5)).await);
    }
    eprintln!("revoked binding's connections closed after {took:?} (instance 0, instance 1)");
    for port in ports {
        let refused = files.cli(port, creds).fails("SELECT 1");
        assert!(
            refused.contains("not allowed to use service"),
            "{port}: {refused}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_survive_a_relay_restart_with_postgres() {
    let pg = Postgres::create();
    let mut stack = Stack::builder()
        .mariadb()
        .relay_process()
        .relay(|r| r.pin_ports())
        .broker(Some(pg.url()), plan())
        .start()
        .await;
    create_app_user(&stack);
    let (_, ids) = stack.osb(0).catalog().await;
    stack
        .osb(0)
        .provision(&ids, INSTANCE, "orders")
        .await
        .expect(201);
    let bound: Value = stack
        .osb(0)
        .bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let creds = bound["credentials"].clone();
    let dir = tempfile::tempdir().unwrap();
    let files = BindingFiles::write(&creds, dir.path());
    let port = stack.relays[0].mysql("orders").port();
    assert_eq!(files.cli(port, &creds).ok("SELECT 1").trim(), "1");

    let config = stack.relay_config.clone();
    stack.relays[0].proc_mut().restart(&config).await;
    stack.relays[0].wait_agent("db1").await;
    // The restarted relay knows the instance and the binding from the store.
    stack
        .osb(0)
        .provision(&ids, INSTANCE, "orders")
        .await
        .expect(200);
    assert_eq!(files.cli(port, &creds).ok("SELECT 7 * 6").trim(), "42");
    stack
        .osb(0)
        .unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(200);
    // The relay's log holds neither the binding's key, nor a password, nor the store's URL.
    let log = stack.relays[0].proc().proc.log_text();
    let key = creds["tls.key"].as_str().unwrap();
    for secret in [
        key.lines().nth(1).unwrap(),
        BROKER_APP_PASSWORD,
        BROKER_PASSWORD,
        pg.url().as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} in the relay's log:\n{log}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_store_keeps_bindings_too() {
    let db = MariaDb::start().await;
    db.sql("CREATE DATABASE broker");
    let url = format!(
        "mysql://root@127.0.0.1:{}/broker?reconnect=true",
        db.addr.port()
    );
    let stack = Stack::builder()
        .with_mariadb(db)
        .broker(Some(url), plan())
        .start()
        .await;
    create_app_user(&stack);
    let osb = stack.osb(0);
    let (_, ids) = osb.catalog().await;
    osb.provision(&ids, INSTANCE, "orders").await.expect(201);
    let bound: Value = osb
        .bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let creds = &bound["credentials"];
    let dir = tempfile::tempdir().unwrap();
    let files = BindingFiles::write(creds, dir.path());
    let port = stack.relays[0].mysql("orders").port();
    assert_eq!(files.cli(port, creds).ok("SELECT 1").trim(), "1");
    assert_eq!(
        stack
            .db()
            .sql("SELECT identity FROM broker.postern_broker_bindings WHERE revoked_ms IS NULL")
            .trim(),
        format!("binding-{BINDING}")
    );
    osb.unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(200);
    assert!(
        files
            .cli(port, creds)
            .fails("SELECT 1")
            .contains("not allowed to use service")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_binding_users_log_in_only_through_their_own_binding_and_go_with_unbind() {
    let db = MariaDb::start().await;
    db.sql(
        "CREATE DATABASE appdb; \
         CREATE USER postern_admin@'%' IDENTIFIED BY 'admin-pw'; \
         GRANT ALL ON *.* TO postern_admin@'%' WITH GRANT OPTION;",
    );
    let admin_password = db.dir().join("admin-password");
    std::fs::write(&admin_password, "admin-pw\n").unwrap();
    let stack = Stack::builder()
        .with_mariadb(db)
        .agent(move |a| {
            a.service_mut("orders").users = Some(config::AgentUsers {
                admin: "postern_admin".into(),
                password_file: Some(admin_password),
                grants: vec!["SELECT, INSERT, CREATE ON appdb.*".into()],
                ..Default::default()
            });
        })
        .broker(None, json!({"database": "appdb", "users": "per_binding"}))
        .start()
        .await;
    let osb = stack.osb(0);
    let (_, ids) = osb.catalog().await;
    osb.provision(&ids, INSTANCE, "orders").await.expect(201);
    let other = "0b7c9e21-3d4f-4e5a-8b6c-7d8e9f0a1b2c";
    let mut bound = Vec::new();
    for id in [BINDING, other] {
        let b: Value = osb
            .bind(&ids, INSTANCE, id, "orders", json!({}))
            .await
            .expect(201)
            .json();
        bound.push(b["credentials"].clone());
    }
    let user_a = bound[0]["username"].as_str().unwrap().to_owned();
    assert!(user_a.starts_with("pb_"), "{user_a}");
    assert_ne!(user_a, bound[1]["username"].as_str().unwrap());
    assert_eq!(
        stack
            .db()
            .sql(&format!(
                "SELECT COUNT(*) FROM mysql.user WHERE user = '{user_a}'"
            ))
            .trim(),
        "1",
        "bind made the user"
    );
    let port = stack.relays[0].mysql("orders").port();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let files: Vec<BindingFiles> = bound
        .iter()
        .zip(&dirs)
        .map(|(c, d)| BindingFiles::write(c, d.path()))
        .collect();
    let a = files[0].cli(port, &bound[0]).arg("appdb");
    assert_eq!(
        a.ok("SELECT CURRENT_USER()").trim(),
        format!("{user_a}@%"),
        "the binding logs in as its own user"
    );
    a.ok("CREATE TABLE t (v INT); INSERT INTO t VALUES (1)");
    // The other binding's certificate with this binding's user and password: refused.
    let stolen = files[1].cli(port, &bound[0]).fails("SELECT 1");
    assert!(stolen.contains("may not log in"), "{stolen}");
    let b = files[1].cli(port, &bound[1]).arg("appdb");
    assert_eq!(b.ok("SELECT COUNT(*) FROM t").trim(), "1");

    osb.unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(200);
    assert_eq!(
        stack
            .db()
            .sql(&format!(
                "SELECT COUNT(*) FROM mysql.user WHERE user = '{user_a}'"
            ))
            .trim(),
        "0",
        "unbind dropped the user"
    );
    assert!(a.fails("SELECT 1").contains("not allowed to use service"));
    assert_eq!(
        b.ok("SELECT COUNT(*) FROM t").trim(),
        "1",
        "the other binding stays"
    );
    osb.deprovision(&ids, INSTANCE, "orders").await.expect(200);
    assert_eq!(
        stack
            .db()
            .sql("SELECT COUNT(*) FROM mysql.user WHERE user LIKE 'pb\\_%'")
            .trim(),
        "0",
        "deprovision removed what was left"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_app_uses_the_sidecar_and_a_deleted_service_key_is_revoked() {
    let stack = Stack::builder()
        .mariadb()
        .relay(|r| r.pin_ports())
        .broker(None, plan())
        .start()
        .await;
    create_app_user(&stack);
    let osb = stack.osb(0);
    let (_, ids) = osb.catalog().await;
    osb.provision(&ids, INSTANCE, "orders").await.expect(201);

    // `cf bind-service my-app db -c '{"local_port": PORT}'`: the app sees only its
    // VCAP_SERVICES and speaks plain MySQL to the sidecar on loopback.
    let local_port = mariadb::free_port();
    let bound: Value = osb
        .bind(
            &ids,
            INSTANCE,
            BINDING,
            "orders",
            json!({"local_port": local_port}),
        )
        .await
        .expect(201)
        .json();
    let creds = &bound["credentials"];
    assert_eq!(creds["host"], "127.0.0.1");
    assert_eq!(creds["port"], local_port);
    assert!(
        creds["jdbcUrl"]
            .as_str()
            .unwrap()
            .contains("sslMode=DISABLED")
    );
    let vcap = super::sidecar::vcap_services(creds);
    let sidecar = super::sidecar::sidecar(&stack, &[("VCAP_SERVICES", &vcap)]).await;
    super::sidecar::run_app(&[("VCAP_SERVICES", &vcap)], 7);
    assert_eq!(
        stack.db().sql("SELECT body FROM appdb.notes WHERE id = 7"),
        "from the app\n"
    );
    sidecar.stop();

    // `cf create-service-key db laptop` is a binding too; `connect --service-key` uses it,
    // and `cf delete-service-key` revokes it.
    let key_id = "c0ffee00-1234-4abc-8def-0123456789ab";
    let key: Value = osb
        .bind(&ids, INSTANCE, key_id, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let printed = format!(
        "Getting key laptop for service instance db as dev@example.com...\n\n{}\n",
        serde_json::to_string_pretty(&json!({"credentials": key["credentials"]})).unwrap()
    );
    let out = super::sidecar::run_service_key(&printed, "SELECT CURRENT_USER(), DATABASE()");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "app@%\tappdb\n");
    osb.unbind(&ids, INSTANCE, key_id, "orders")
        .await
        .expect(200);
    let out = super::sidecar::run_service_key(&printed, "SELECT 1");
    assert!(!out.status.success(), "a deleted service key still works");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not allowed") || err.contains("refused"),
        "{err}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_tls_unbind_closes_the_connection_at_the_agent() {
    let stack = Stack::builder()
        .mariadb()
        .tls_termination("orders", postern_relay::config::TlsTermination::Agent)
        .broker(None, plan())
        .start()
        .await;
    create_app_user(&stack);
    let osb = stack.osb(0);
    let (_, ids) = osb.catalog().await;
    osb.provision(&ids, INSTANCE, "orders").await.expect(201);
    let bound: Value = osb
        .bind(&ids, INSTANCE, BINDING, "orders", json!({}))
        .await
        .expect(201)
        .json();
    let creds = &bound["credentials"];
    let dir = tempfile::tempdir().unwrap();
    let files = BindingFiles::write(creds, dir.path());
    let port = stack.relays[0].mysql("orders").port();
    // TLS ends at the agent, which checks the binding with the relay's policy.
    let mut conn = admitted(&files, creds, port).await;
    let v: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(v.as_deref(), Some("app@%"));
    let unbound = Instant::now();
    osb.unbind(&ids, INSTANCE, BINDING, "orders")
        .await
        .expect(200);
    let took = closed_within(&mut conn, unbound, Duration::from_secs(5)).await;
    eprintln!("end-to-end binding connection closed {took:?} after unbind");
    let refused = files.cli(port, creds).fails("SELECT 1");
    assert!(refused.contains("not allowed to use service"), "{refused}");
    stack.stop().await;
}
