//! An intermediate CA, as an operator makes one with `postern-relay certs issue intermediate`
//! (the service broker's signing key, with the root key offline): its client certificates reach
//! a MySQL service with the stock `mariadb` CLI given the chain file, while the root's
//! revocation list is in force; the intermediate's own list revokes one, and revoking the
//! intermediate in the root's list refuses them all. And the
//! user-provided service JSON of `certs issue client --cf-ups`: every credential field, and TLS
//! material that works.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use postern_common::binding::SidecarView;
use postern_common::pki::Identity;
use postern_common::tls::Material;
use postern_tests::client::ok;
use postern_tests::procs::bin;
use postern_tests::*;
use serde_json::Value;

/// `postern-relay certs ARGS --dir DIR`.
fn certs(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("postern-relay"));
    c.arg("certs").args(args).arg("--dir").arg(dir);
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run postern-relay certs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pem_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_an_intermediate_ca_reaches_mysql_until_the_intermediate_is_revoked() {
    let pki = TestPki::from_certs_init();
    ok(&run(&mut certs(
        pki.dir(),
        &["issue", "intermediate", "broker"],
    )));
    // The root's revocation list is in force from the start (it revokes bob).
    let s = Stack::builder()
        .pki(pki)
        .clients(["alice", "carol", "dave"])
        .revoked(["bob"])
        .mariadb()
        .heartbeat(Duration::from_secs(5))
        .start()
        .await;
    let dir = s.pki.dir();

    // carol's certificate from the intermediate (replacing the root's), with her credentials.
    let port = s.port().to_string();
    let quic = format!("quic://{}", s.relay().quic());
    let mut issue = certs(
        dir,
        &[
            "issue",
            "client",
            "carol",
            "--issuer",
            "broker",
            "--force",
            "--cf-ups",
            "orders",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--username",
            "root",
            "--password-file",
            "/dev/null",
            "--relay",
            &quic,
        ],
    );
    let out = run(issue.arg("--server-name").arg("localhost"));
    let credentials: Value = serde_json::from_str(&ok(&out)).expect("the JSON alone on stdout");
    let chain = std::fs::read_to_string(dir.join("client-carol.pem")).unwrap();
    assert_eq!(pem_count(&chain), 2, "leaf, then intermediate");
    assert_eq!(credentials["tls.crt"], chain.as_str());

    // The stock client with the chain file, as `certs issue` wrote it.
    let cli = s.cli(Some("carol"));
    assert_eq!(cli.ok("SELECT 1"), "1\n");
    // And with the files written from the credentials, as a bound app would.
    std::fs::write(
        dir.join("ups-carol.pem"),
        credentials["tls.crt"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("ups-carol-key.pem"),
        credentials["tls.key"].as_str().unwrap(),
    )
    .unwrap();
    let app = Cli::at(credentials["port"].as_u64().unwrap() as u16)
        .user(credentials["username"].as_str().unwrap())
        .tls(&s.pki, Some("ups-carol"));
    assert_eq!(app.ok("SELECT 2"), "2\n");
    // The leaf alone, without the intermediate, cannot be verified.
    std::fs::write(
        dir.join("leaf-carol.pem"),
        chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    std::fs::copy(
        dir.join("client-carol-key.pem"),
        dir.join("leaf-carol-key.pem"),
    )
    .unwrap();
    Cli::at(s.port())
        .tls(&s.pki, Some("leaf-carol"))
        .fails("SELECT 1");

    // The root's list still refuses what it revoked, and serves the rest.
    s.cli(Some("bob")).fails("SELECT 1");
    let alice = s.cli(Some("alice"));
    assert_eq!(alice.ok("SELECT 3"), "3\n");

    // The intermediate's own list, kept in crl.pem beside the root's, revokes one of its leaves.
    ok(&run(&mut certs(
        dir,
        &["issue", "client", "dave", "--issuer", "broker", "--force"],
    )));
    let dave = s.cli(Some("dave"));
    assert_eq!(dave.ok("SELECT 5"), "5\n");
    let refused = run(certs(dir, &["revoke"]).arg(dir.join("client-dave.pem")));
    assert!(
        !refused.status.success() && stderr(&refused).contains("--issuer"),
        "the root's list cannot revoke it, and says so: {}",
        stderr(&refused)
    );
    ok(&run(
        certs(dir, &["revoke", "--issuer", "broker"]).arg(dir.join("client-dave.pem"))
    ));
    let lists = std::fs::read_to_string(s.pki.crl_path()).unwrap();
    assert_eq!(
        lists.matches("-----BEGIN X509 CRL-----").count(),
        2,
        "{lists}"
    );
    eventually(Duration::from_secs(6), "dave to be refused", || async {
        dave.query_async("SELECT 1").await.is_err().then_some(())
    })
    .await;
    assert_eq!(cli.query_async("SELECT 6").await.as_deref(), Ok("6\n"));
    s.cli(Some("bob")).fails("SELECT 1");

    // Revoke the intermediate in the root's list: carol is refused, alice still served.
    s.pki.revoke(&["intermediate-broker"]);
    eventually(Duration::from_secs(6), "carol to be refused", || async {
        cli.query_async("SELECT 1").await.is_err().then_some(())
    })
    .await;
    assert_eq!(alice.query_async("SELECT 4").await.as_deref(), Ok("4\n"));
    s.stop().await;
}

#[test]
fn cf_ups_prints_the_credentials_of_a_binding_with_working_tls_material() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&run(&mut certs(dir, &["init"])));
    ok(&run(&mut certs(dir, &["issue", "intermediate", "broker"])));
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();

    // Direct: apps reach the relay's MySQL listener; the password comes from the environment.
    let mut c = certs(
        dir,
        &[
            "issue",
            "client",
            "app",
            "--issuer",
            "broker",
            "--cf-ups",
            "orders",
            "--host",
            "relay.apps.internal",
            "--database",
            "shop",
            "--username",
            "app",
            "--password-env",
            "UPS_PASSWORD",
            "--relay",
            "wss://relay.example.com",
            "--relay",
            "quic://relay.example.com:7443",
        ],
    );
    let out = run(c.env("UPS_PASSWORD", "s3cret/pw"));
    let v: Value = serde_json::from_str(&ok(&out)).expect("stdout is the JSON alone");
    for (key, want) in [
        ("hostname", "relay.apps.internal"),
        ("host", "relay.apps.internal"),
        ("name", "shop"),
        ("database", "shop"),
        ("username", "app"),
        ("password", "s3cret/pw"),
        (
            "uri",
            "mysql://app:s3cret%2Fpw@relay.apps.internal:3306/shop?ssl-mode=VERIFY_IDENTITY",
        ),
        ("ca_certificate", ca.as_str()),
        ("ca.crt", ca.as_str()),
    ] {
        assert_eq!(v[key], want, "{key}");
    }
    assert_eq!(v["port"], 3306);
    assert!(
        v["jdbcUrl"].as_str().is_some_and(|u| u
            .starts_with("jdbc:mysql://relay.apps.internal:3306/shop?")
            && u.contains("sslMode=VERIFY_IDENTITY")),
        "{v}"
    );
    let cert = std::fs::read_to_string(dir.join("client-app.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("client-app-key.pem")).unwrap();
    assert_eq!(v["tls.crt"], cert.as_str());
    assert_eq!(v["tls.key"], key.as_str());
    assert_eq!(v["tls"]["cert"]["ca"], ca.as_str());
    assert_eq!(v["tls"]["cert"]["certificate"], cert.as_str());
    assert_eq!(v["tls"]["cert"]["private_key"], key.as_str());
    let postern = &v["postern"];
    assert_eq!(postern["service"], "orders");
    assert_eq!(postern["identity"], "app");
    assert_eq!(
        postern["relays"],
        serde_json::json!(["wss://relay.example.com", "quic://relay.example.com:7443"])
    );
    assert!(postern.get("local_port").is_none());
    assert!(
        postern["expires_at"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "{postern}"
    );

    // The PEMs make TLS material: the chain (leaf, intermediate) and the client's identity.
    let m = Material::from_pem(
        v["ca.crt"].as_str().unwrap(),
        v["tls.crt"].as_str().unwrap(),
        v["tls.key"].as_str().unwrap(),
    )
    .expect("working TLS material");
    assert_eq!(m.chain.len(), 2);
    assert_eq!(m.identity(), Some(Identity::Client("app".into())));
    postern_common::tls::listener_client(&m).expect("a client config");
    let view = SidecarView::from_credentials(&v).unwrap();
    assert_eq!((view.service.as_str(), view.relays.len()), ("orders", 2));

    // The hint names the exact command; nothing secret goes to stderr.
    let hint = stderr(&out);
    assert!(
        hint.contains("cf create-user-provided-service orders -t mysql -p FILE"),
        "{hint}"
    );
    assert!(
        !hint.contains("PRIVATE KEY") && !hint.contains("s3cret"),
        "{hint}"
    );

    // Sidecar mode, from the root, password from a file, no jdbcUrl; stdout to a file names it.
    let pw = dir.join("pw");
    std::fs::write(&pw, "from-file\n").unwrap();
    let json = dir.join("ups.json");
    let mut c = certs(
        dir,
        &[
            "issue",
            "client",
            "side",
            "--cf-ups",
            "orders",
            "--cf-instance",
            "orders-db",
            "--local-port",
            "3307",
            "--username",
            "app",
            "--relay",
            "wss://relay.example.com",
            "--server-name",
            "relay.internal",
            "--no-jdbc-url",
        ],
    );
    c.arg("--password-file")
        .arg(&pw)
        .stdout(std::fs::File::create(&json).unwrap());
    let out = run(&mut c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cf create-user-provided-service orders-db -t mysql -p {}",
            json.display()
        )),
        "{}",
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (v["host"].as_str(), v["port"].as_u64()),
        (Some("127.0.0.1"), Some(3307))
    );
    assert_eq!(v["password"], "from-file");
    assert!(v.get("jdbcUrl").is_none());
    assert_eq!(v["postern"]["local_port"], 3307);
    assert_eq!(v["postern"]["server_name"], "relay.internal");
    assert_eq!(
        pem_count(v["tls.crt"].as_str().unwrap()),
        1,
        "a root's leaf alone"
    );

    // Refusals name what is missing and write nothing.
    for (args, words) in [
        (
            vec![
                "issue", "client", "x", "--cf-ups", "orders", "--host", "h", "--relay", "wss://r",
            ],
            "--password-env",
        ),
        (
            vec![
                "issue",
                "client",
                "x",
                "--cf-ups",
                "orders",
                "--password-file",
                "/dev/null",
                "--username",
                "u",
                "--relay",
                "wss://r",
            ],
            "--host",
        ),
        (
            vec![
                "issue",
                "client",
                "x",
                "--cf-ups",
                "orders",
                "--host",
                "h",
                "--password-file",
                "/dev/null",
                "--username",
                "u",
            ],
            "--relay",
        ),
        (
            vec![
                "issue", "server", "x", "--dns", "x", "--cf-ups", "orders", "--host", "h",
            ],
            "client certificates",
        ),
        (
            vec!["issue", "client", "x", "--issuer", "nope"],
            "intermediate CA \"nope\"",
        ),
    ] {
        let out = run(&mut certs(dir, &args));
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(words), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains('{'));
        assert!(!dir.join("client-x.pem").exists() && !dir.join("server-x.pem").exists());
    }
}
