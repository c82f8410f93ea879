//! The middleboxes themselves start and pass traffic (a sanity check for the harness).

use postern_common::pki::Kind;
use postern_tests::router::{Nginx, Tinyproxy, Upstreams};
use postern_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_and_tinyproxy_pass_http_to_the_relay() {
    init_logging();
    let pki = TestPki::new();
    pki.issue(Kind::Agent, "db1");
    let relay = RelayRun::start(pki.dir(), &relay_yaml(&pki, "db1", "orders", &["alice"])).await;
    let http = relay.http.unwrap();
    let (cert, key) = pki.files("server-relay");
    let nginx = Nginx::start(
        &cert,
        &key,
        Upstreams {
            relays: vec![http],
            app_guid: Some("abc".into()),
        },
    )
    .await;
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(pki.ca())
        .arg(format!("https://localhost:{}/healthz", nginx.addr.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "X-Cf-App-Instance: abc:7",
            "--cacert",
        ])
        .arg(pki.ca())
        .arg(format!("https://localhost:{}/healthz", nginx.addr.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    let proxy = Tinyproxy::start(Some(("user", "secret"))).await;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--proxy-user",
            "user:secret",
            "--proxytunnel",
            "--proxy",
        ])
        .arg(format!("http://{}", proxy.addr))
        .arg("--cacert")
        .arg(pki.ca())
        .arg(format!("https://localhost:{}/healthz", nginx.addr.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        proxy.log()
    );
    relay.stop().await;
}
