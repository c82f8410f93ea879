//! The middleboxes themselves start and pass traffic (a sanity check for the harness).

use postern_tests::router::Tinyproxy;
use postern_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_and_tinyproxy_pass_http_to_the_relay() {
    // One relay instance of app "abc": nginx answers 400 to a pin on another instance.
    let s = Stack::builder()
        .no_agent()
        .cloud_foundry("abc", 1)
        .start()
        .await;
    let nginx = s.nginx.as_ref().unwrap();
    let pki = &s.pki;
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
    s.stop().await;
}
