//! The dashboard at `GET /`, loaded in headless Chromium as an operator's browser would (basic
//! auth in the URL): after its scripts ran it shows the service, its nodes, the term and which
//! node is active, and shows the new one after a failover. Screenshots (desktop and phone
//! width) are kept under `target/test-artifacts/`.
//!
//! The page marks the active node of each service with `data-active-node="NAME"` on an element
//! (that is how this test, and any other tool, finds it without reading the layout).

use std::time::Duration;

use postern_tests::browser::{Chromium, artifact_dir};
use postern_tests::*;

/// The DOM after the page's scripts ran, once it shows `node` as active (the page polls
/// `/v0/status` every second; a load that came too early is retried, within 20 s).
async fn dom_showing(browser: &Chromium, url: &str, node: &str) -> String {
    let marker = format!(r#"data-active-node="{node}""#);
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        last = browser.dump_dom(url).await;
        if last.contains(&marker) {
            return last;
        }
    }
    panic!("the dashboard never showed {marker}; last DOM:\n{last}");
}

/// The dashboard behind basic auth shows `orders`, both nodes, the term and `n1` as active;
/// after n1 answers 503 it shows `n2` active and the new term; screenshots are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_active_node_and_follows_a_failover() {
    let s = Stack::builder().http_nodes(2).api().start().await;
    let api = s.api(0);
    let term = eventually(Duration::from_secs(10), "n1 active", || {
        let api = api.clone();
        async move {
            let (term, active) = api.active(None).await;
            (active.as_deref() == Some("n1")).then_some(term)
        }
    })
    .await;
    let r = api.without_auth().get("/").await;
    assert_eq!(r.status, 401, "the dashboard needs credentials");
    let page = api.get("/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    assert!(
        page.body.contains("viewport"),
        "a viewport meta tag, for phones"
    );

    let browser = Chromium::find();
    let url = api.url_with_credentials("/");
    let dom = dom_showing(&browser, &url, "n1").await;
    for text in ["orders", "n1", "n2", &term.to_string()] {
        assert!(dom.contains(text), "the dashboard shows {text:?}:\n{dom}");
    }
    let dir = artifact_dir();
    browser
        .screenshot(&url, &dir.join("dashboard-before-failover.png"))
        .await;

    s.http_node("n1").health.set(HealthMode::Status(503));
    let t2 = eventually(Duration::from_secs(10), "n2 active", || {
        let api = api.clone();
        async move {
            let (term, active) = api.active(None).await;
            (active.as_deref() == Some("n2")).then_some(term)
        }
    })
    .await;
    let dom = dom_showing(&browser, &url, "n2").await;
    assert!(
        !dom.contains(r#"data-active-node="n1""#),
        "n1 is no longer shown active:\n{dom}"
    );
    assert!(dom.contains(&t2.to_string()), "the new term {t2}:\n{dom}");
    assert!(dom.contains("503"), "n1's reason:\n{dom}");
    let desktop = browser
        .screenshot(&url, &dir.join("dashboard-after-failover.png"))
        .await;
    let phone = browser
        .clone()
        .with_window(390, 844)
        .screenshot(&url, &dir.join("dashboard-phone.png"))
        .await;
    eprintln!(
        "dashboard screenshots: {} {}",
        desktop.display(),
        phone.display()
    );
    s.stop().await;
}
