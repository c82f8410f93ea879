//! Headless Chromium (Debian's `chromium`, which `scripts/install-deps test` installs) loading a
//! page as a person's browser would: the DOM after its scripts ran ([`Chromium::dump_dom`]) and a
//! screenshot ([`Chromium::screenshot`]) kept under `target/test-artifacts/`.
//!
//! Basic auth goes in the URL (`http://user:password@host/`): Chromium sends it for the page and
//! keeps it for the origin. A page loaded that way must fetch with absolute URLs
//! (`location.origin + "/v0/status"`): Chromium refuses `fetch("/v0/status")` there, because
//! the relative URL resolves against a base that holds the credentials.
//!
//! Every run has its own profile directory and a deadline; `--virtual-time-budget` lets the
//! page's timers and fetches run before the DOM is taken, without the test sleeping.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long one Chromium run may take.
const RUN_WITHIN: Duration = Duration::from_secs(60);

/// A headless Chromium.
#[derive(Debug, Clone)]
pub struct Chromium {
    program: PathBuf,
    /// Virtual time given to the page's scripts before the DOM or screenshot is taken.
    pub budget: Duration,
    /// The window size of screenshots.
    pub window: (u32, u32),
}

impl Chromium {
    /// Finds `chromium` (or `chromium-browser`, `google-chrome`) on PATH; panics with the
    /// install hint when there is none.
    pub fn find() -> Self {
        let program = ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|name| {
                std::env::var("PATH")
                    .unwrap_or_default()
                    .split(':')
                    .chain(["/usr/bin"])
                    .map(|d| Path::new(d).join(name))
                    .find(|p| p.is_file())
            })
            .expect("chromium not found: run scripts/install-deps test (Debian's chromium)");
        Self {
            program,
            budget: Duration::from_secs(3),
            window: (1280, 900),
        }
    }

    /// The same browser with `budget` of virtual time for the page's scripts.
    pub fn with_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// The same browser with a window of `width` x `height` (a phone: 390 x 844).
    pub fn with_window(mut self, width: u32, height: u32) -> Self {
        self.window = (width, height);
        self
    }

    /// Loads `url` and returns the serialized DOM after the page's scripts ran.
    pub async fn dump_dom(&self, url: &str) -> String {
        let out = self.run(&["--dump-dom".to_owned()], url).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Loads `url` and writes a PNG screenshot to `path` (its directory made if missing);
    /// returns `path`.
    pub async fn screenshot(&self, url: &str, path: &Path) -> PathBuf {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        let _ = std::fs::remove_file(path);
        self.run(
            &[
                format!("--screenshot={}", path.display()),
                format!("--window-size={},{}", self.window.0, self.window.1),
                "--hide-scrollbars".to_owned(),
            ],
            url,
        )
        .await;
        let meta = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
        assert!(meta.len() > 1000, "screenshot {} is empty", path.display());
        path.to_owned()
    }

    async fn run(&self, args: &[String], url: &str) -> Vec<u8> {
        let profile = tempfile::Builder::new()
            .prefix("postern-chromium")
            .tempdir()
            .expect("profile dir");
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", self.budget.as_millis()))
        .args(args)
        .arg(url)
        // The machine's proxy settings must not send loopback requests elsewhere.
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn chromium");
        let out = tokio::time::timeout(RUN_WITHIN, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("chromium did not finish {url} within {RUN_WITHIN:?}"))
            .expect("chromium runs");
        assert!(
            out.status.success(),
            "chromium failed on {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// `target/test-artifacts/` (next to the test executable's profile directory), made if
/// missing: screenshots and other files a person looks at after a run.
pub fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-HASH -> target/
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir");
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("test artifact dir");
    dir
}
