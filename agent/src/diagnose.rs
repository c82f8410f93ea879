//! `postern-agent diagnose`: where a broken setup breaks, step by step.
//!
//! The checks follow the order in which the agent builds a session, and each is a [`Step`] with
//! a verdict (ok, warn, fail, or skipped because a step it needs failed) and, when it is not ok,
//! a hint that says what to do:
//!
//! * the config, read as `check-config` and `run` read it (exit status 64 when it does not
//!   parse, and nothing else is checked);
//! * the certificates: the CA, the agent's certificate, whether the key belongs to it, whether
//!   it chains to the CA, how long it is valid; the certificates of services whose TLS ends here;
//! * each relay, over each transport the agent would use: DNS; over QUIC the handshake (a UDP
//!   black hole shows as a timeout); over WebSocket TCP, the proxy's CONNECT, the outer TLS and
//!   the upgrade, each from the same connect code the agent runs ([`ws::Progress`]); then the
//!   mutual TLS, and the relay's answer to a hello. That hello is a probe
//!   ([`FEATURE_PROBE`](postern_common::protocol::FEATURE_PROBE)): the relay says whether it
//!   would accept this agent and its services, and registers nothing, so a running agent keeps
//!   its session;
//! * each backend node: a TCP connect and the server's MySQL greeting, when it sends one; for
//!   services with health checks, each node's check, once.
//!
//! A certificate that has expired or comes from another CA does not stop the network steps:
//! they still show whether the path to the relay works, and the relay's own refusal confirms
//! what the certificate steps found. Every network step is bounded by `--timeout`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_common::config::{EXIT_CONFIG, HumanDuration, TlsFiles};
use postern_common::mysql::server::{GreetingError, read_greeting};
use postern_common::pki;
use postern_common::protocol::Code;
use postern_common::tls::{self, RefusedBy, TlsCause, TlsFailure};
use postern_common::transport::addr::{RelayUrl, Scheme, authority};
use postern_common::transport::proxy::{Proxy, ProxyError};
use postern_common::transport::ws::{self, Progress, Reached};
use postern_common::transport::{
    CloseReason, ConnectError, Liveness, Session, TransportError, quic,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::cli::DiagnoseArgs;
use crate::config::{CheckKind, Config, Service, TransportChoice};
use crate::dial::Dialer;
use crate::health::{Outcome, Prober};
use crate::session::{self, SessionError};

/// A certificate that expires within this many days gets a warning.
pub const WARN_DAYS: i64 = 14;

/// How long a backend may take to send its greeting (a server that speaks first sends it at
/// once; one that does not is not a MySQL server, which is fine).
const GREETING_WAIT: Duration = Duration::from_secs(2);

/// What a step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It works.
    Ok,
    /// It works, but something needs attention (a certificate about to expire).
    Warn,
    /// It does not work.
    Fail,
    /// Not tried, because a step it needs failed.
    Skipped,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
            Self::Skipped => "skipped",
        }
    }
}

/// One check and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was checked: `config`, `ca`, `certificate`, `key`, `chain`, `validity`,
    /// `service-cert`, `dns`, `quic`, `tcp`, `proxy`, `outer-tls`, `websocket`, `tls`,
    /// `session`, `backend`, `health`.
    pub step: String,
    /// What it was checked on: a file, a host, a relay URL, `service/node address`.
    pub target: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it, when the verdict is not ok.
    pub hint: Option<String>,
    /// How long the step took.
    pub elapsed_ms: u64,
}

impl Step {
    fn new(
        step: &str,
        target: impl Into<String>,
        verdict: Verdict,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            step: step.to_owned(),
            target: target.into(),
            verdict,
            detail: detail.into(),
            hint: None,
            elapsed_ms: 0,
        }
    }

    fn ok(step: &str, target: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(step, target, Verdict::Ok, detail)
    }

    fn fail(step: &str, target: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(step, target, Verdict::Fail, detail)
    }

    fn skipped(step: &str, target: impl Into<String>, because: &str) -> Self {
        Self::new(
            step,
            target,
            Verdict::Skipped,
            format!("not tried: {because}"),
        )
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn maybe_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    fn since(mut self, started: Instant) -> Self {
        self.elapsed_ms = millis(started.elapsed());
        self
    }

    fn took(mut self, elapsed: Duration) -> Self {
        self.elapsed_ms = millis(elapsed);
        self
    }
}

/// Everything `diagnose` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The config file.
    pub config: String,
    /// The agent's name, once the config is read.
    pub agent: Option<String>,
    /// The worst verdict of all steps (skipped steps do not count).
    pub verdict: Verdict,
    /// The steps, in the order they ran.
    pub steps: Vec<Step>,
    #[serde(skip)]
    config_failed: bool,
}

impl Report {
    fn new(config: &Path) -> Self {
        Self {
            config: config.display().to_string(),
            agent: None,
            verdict: Verdict::Ok,
            steps: Vec::new(),
            config_failed: false,
        }
    }

    fn push(&mut self, step: Step) -> Verdict {
        let verdict = step.verdict;
        self.steps.push(step);
        verdict
    }

    fn finish(mut self) -> Self {
        let has = |v| self.steps.iter().any(|s| s.verdict == v);
        self.verdict = if has(Verdict::Fail) {
            Verdict::Fail
        } else if has(Verdict::Warn) {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        self
    }

    /// The exit status: 0 when no step failed (warnings allowed), 1 when one did, 64 when the
    /// config does not parse.
    pub fn exit_status(&self) -> u8 {
        if self.config_failed {
            EXIT_CONFIG
        } else if self.steps.iter().any(|s| s.verdict == Verdict::Fail) {
            1
        } else {
            0
        }
    }

    /// The report as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot write the report: {e}\"}}"))
    }

    /// The report as an aligned table for people; verdicts in colour when `colour`.
    pub fn text(&self, colour: bool) -> String {
        let mut out = format!("postern-agent diagnose {}", self.config);
        if let Some(a) = &self.agent {
            out.push_str(&format!(" (agent {a})"));
        }
        out.push_str("\n\n");
        let width = |f: fn(&Step) -> usize, title: &str, cap: usize| {
            self.steps
                .iter()
                .map(f)
                .max()
                .unwrap_or(0)
                .max(title.len())
                .min(cap)
        };
        let w_step = width(|s| s.step.len(), "STEP", 16);
        let w_target = width(|s| s.target.chars().count(), "TARGET", 44);
        let w_verdict = "skipped".len();
        let w_time = 8;
        let indent = " ".repeat(w_verdict + w_step + w_target + w_time + 8);
        out.push_str(&format!(
            "{:<w_verdict$}  {:<w_step$}  {:<w_target$}  {:>w_time$}  DETAIL\n",
            "VERDICT", "STEP", "TARGET", "TIME"
        ));
        for s in &self.steps {
            let verdict = format!("{:<w_verdict$}", s.verdict.as_str());
            let verdict = if colour {
                paint(s.verdict, &verdict)
            } else {
                verdict
            };
            let time = if s.verdict == Verdict::Skipped {
                String::new()
            } else {
                format!("{}ms", s.elapsed_ms)
            };
            let mut lines = s.detail.lines();
            out.push_str(&format!(
                "{verdict}  {:<w_step$}  {:<w_target$}  {time:>w_time$}  {}\n",
                s.step,
                s.target,
                lines.next().unwrap_or_default()
            ));
            for line in lines {
                out.push_str(&format!("{indent}{line}\n"));
            }
            if let Some(h) = &s.hint {
                out.push_str(&format!("{indent}hint: {h}\n"));
            }
        }
        let count = |v| self.steps.iter().filter(|s| s.verdict == v).count();
        let (failed, warned) = (count(Verdict::Fail), count(Verdict::Warn));
        out.push('\n');
        out.push_str(&match (failed, warned) {
            (0, 0) => format!("All {} checks passed.\n", self.steps.len()),
            (0, w) => format!("No check failed; {w} warning(s): see the hints.\n"),
            (f, w) => format!("{f} check(s) failed, {w} warning(s): see the hints.\n"),
        });
        out
    }
}

fn paint(verdict: Verdict, text: &str) -> String {
    let code = match verdict {
        Verdict::Ok => "32",
        Verdict::Warn => "33",
        Verdict::Fail => "1;31",
        Verdict::Skipped => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// `postern-agent diagnose`: runs the checks, prints the report, returns the exit status.
pub async fn main(args: DiagnoseArgs) -> ExitCode {
    let report = run(&args.config, args.timeout.0).await;
    if args.json {
        println!("{}", report.json());
    } else {
        let stdout = std::io::stdout();
        let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", report.text(colour));
    }
    ExitCode::from(report.exit_status())
}

/// Runs every check for the agent config at `path`, each network step bounded by `timeout`.
pub async fn run(path: &Path, timeout: Duration) -> Report {
    let timeout = timeout.max(Duration::from_millis(1));
    let mut report = Report::new(path);
    let started = Instant::now();
    let loaded = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || (Config::load(&path), tls_files(&path))).await
    };
    let (config, files) = match loaded {
        Ok((Ok(c), files)) => (c, files),
        Ok((Err(errors), _)) => {
            report.push(
                Step::fail(
                    "config",
                    path.display().to_string(),
                    errors.to_string().trim_end(),
                )
                .hint("fix the errors above (`postern-agent check-config` lists the same)")
                .since(started),
            );
            report.config_failed = true;
            return report.finish();
        }
        Err(e) => {
            report.push(Step::fail(
                "config",
                path.display().to_string(),
                format!("cannot read the config: {e}"),
            ));
            report.config_failed = true;
            return report.finish();
        }
    };
    report.agent = Some(config.name.clone());
    report.push(
        Step::ok(
            "config",
            path.display().to_string(),
            format!(
                "agent {}, {} service(s) ({}), {} relay(s)",
                config.name,
                config.services.len(),
                config
                    .services
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                config.relays.len()
            ),
        )
        .since(started),
    );

    let usable = certificates(&mut report, &config, files.as_ref());
    for svc in config.services.values() {
        if let Some(material) = &svc.tls {
            service_certificate(&mut report, svc, material);
        }
    }

    let dialer = if config.transport == TransportChoice::Quic {
        None
    } else {
        match Dialer::load(
            config.tls.clone(),
            config.server_name.clone(),
            config.transport,
            config.websocket.clone(),
        )
        .await
        {
            Ok(d) => Some(Ok(d)),
            Err(e) => Some(Err(e.to_string())),
        }
    };
    let diag = Diag {
        config: &config,
        timeout,
        usable,
    };
    for relay in &config.relays {
        let mut quic_timed_out = None;
        if let Some(url) = relay
            .quic
            .as_ref()
            .filter(|_| config.transport != TransportChoice::Websocket)
        {
            let fallback = relay
                .websocket
                .as_ref()
                .filter(|_| config.transport == TransportChoice::Auto);
            quic_timed_out = diag.quic(&mut report, url, fallback).await;
        }
        if let Some(url) = relay
            .websocket
            .as_ref()
            .filter(|_| config.transport != TransportChoice::Quic)
        {
            let works = match &dialer {
                Some(Ok(d)) => diag.websocket(&mut report, d, url).await,
                Some(Err(e)) => {
                    report.push(
                        Step::fail("websocket", url.to_string(), e.clone())
                            .hint("websocket.ca must name a readable PEM file of CA certificates"),
                    );
                    false
                }
                None => false,
            };
            // With `transport: auto` the agent serves over WebSocket when UDP is blocked: the
            // QUIC failure is worth knowing, not a broken setup.
            if let (Some(i), true) = (quic_timed_out, works)
                && config.transport == TransportChoice::Auto
                && let Some(step) = report.steps.get_mut(i)
            {
                step.verdict = Verdict::Warn;
                step.detail
                    .push_str("; the agent serves over WebSocket meanwhile");
            }
        }
    }
    diag.backends(&mut report).await;
    report.finish()
}

/// The `tls` block's file names, read again from the config (the validated config keeps the
/// certificates, not where they came from).
fn tls_files(path: &Path) -> Option<TlsFiles> {
    #[derive(serde::Deserialize)]
    struct Files {
        tls: TlsFiles,
    }
    let mut files = postern_common::config::load_yaml::<Files>(path).ok()?.tls;
    files.rebase(path.parent().unwrap_or(Path::new("")));
    Some(files)
}

fn file_or(files: Option<&TlsFiles>, pick: fn(&TlsFiles) -> &Path, key: &str) -> String {
    files.map_or_else(|| key.to_owned(), |f| pick(f).display().to_string())
}

/// The certificate steps; whether the certificate and key can be used for TLS at all (an
/// expired certificate can: the relay's refusal then confirms what was found here).
fn certificates(report: &mut Report, config: &Config, files: Option<&TlsFiles>) -> bool {
    let ca_target = file_or(files, |f| &f.ca.value, "tls.ca");
    let cert_target = file_or(files, |f| &f.cert.value, "tls.cert");
    let key_target = file_or(files, |f| &f.key.value, "tls.key");
    let now = unix_now();

    // The CA.
    let ca_names = match files.map(|f| read_certs(&f.ca.value)) {
        Some(Ok(cas)) if !cas.is_empty() => {
            let mut verdict = Verdict::Ok;
            let mut details = Vec::new();
            let mut hint = None;
            let mut names = Vec::new();
            for ca in &cas {
                let name = pki::subject_name(ca).unwrap_or_else(|| "(unnamed)".into());
                match pki::validity_of(ca) {
                    Ok(v) => {
                        let (v_verdict, text) = validity_words(v, now);
                        details.push(format!("{name:?}: {text}"));
                        if v_verdict != Verdict::Ok {
                            verdict = Verdict::Warn;
                            hint = Some(
                                "a CA past its end is refused by MySQL clients and other TLS \
                                 stacks: make a new CA (postern-relay certs init) and issue \
                                 every certificate again from it"
                                    .to_owned(),
                            );
                        }
                    }
                    Err(e) => details.push(format!("{name:?}: {e}")),
                }
                names.push(name);
            }
            report.push(Step::new("ca", &ca_target, verdict, details.join("\n")).maybe_hint(hint));
            names
        }
        Some(Ok(_)) => {
            report.push(Step::fail("ca", &ca_target, "no certificate in the file"));
            Vec::new()
        }
        Some(Err(e)) => {
            report.push(Step::fail("ca", &ca_target, e));
            Vec::new()
        }
        None => {
            report.push(Step::ok(
                "ca",
                &ca_target,
                format!("{} CA certificate(s) loaded", config.tls.roots.len()),
            ));
            Vec::new()
        }
    };

    // The certificate.
    let chain = &config.tls.chain;
    let Some(leaf) = chain.first() else {
        report.push(Step::fail(
            "certificate",
            &cert_target,
            "no certificate in the file",
        ));
        return false;
    };
    let issuer = pki::issuer_name(leaf).unwrap_or_else(|| "(unknown)".into());
    let mut detail = format!(
        "{}, issued by {issuer:?}",
        pki::Identity::Agent(config.name.clone()).uri()
    );
    if chain.len() > 1 {
        detail.push_str(&format!(
            " (with {} intermediate CA certificate(s))",
            chain.len() - 1
        ));
    }
    report.push(Step::ok("certificate", &cert_target, detail));

    // The key.
    let key = key_matches(&config.tls);
    let usable = key.verdict == Verdict::Ok;
    report.push(key.into_step("key", &key_target));

    // The chain to the CA, whatever the dates.
    report.push(chains_to_ca(&config.tls, &ca_names).into_step("chain", &cert_target));

    // The dates.
    report.push(dates(chain, now).into_step("validity", &cert_target));
    usable
}

/// A service certificate (`services.NAME.tls`, for end-to-end TLS): key, chain and dates in one
/// step.
fn service_certificate(report: &mut Report, svc: &Service, material: &tls::Material) {
    let target = format!("services.{}.tls", svc.name);
    let checks = [
        key_matches(material),
        chains_to_ca(material, &[]),
        dates(&material.chain, unix_now()),
    ];
    let verdict = checks
        .iter()
        .map(|c| c.verdict)
        .max_by_key(|v| match v {
            Verdict::Fail => 3,
            Verdict::Warn => 2,
            Verdict::Skipped => 1,
            Verdict::Ok => 0,
        })
        .unwrap_or(Verdict::Ok);
    let name = material
        .chain
        .first()
        .and_then(pki::subject_name)
        .unwrap_or_else(|| "(unnamed)".into());
    let detail = format!(
        "{name:?}: {}",
        checks
            .iter()
            .map(|c| c.detail.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    let hint = checks.into_iter().find_map(|c| c.hint).map(|h| {
        format!(
            "{h} (MySQL clients of service {:?} see this certificate)",
            svc.name
        )
    });
    report.push(Step::new("service-cert", target, verdict, detail).maybe_hint(hint));
}

/// A verdict, its words and a hint, before it is a step.
struct Finding {
    verdict: Verdict,
    detail: String,
    hint: Option<String>,
}

impl Finding {
    fn ok(detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Ok,
            detail: detail.into(),
            hint: None,
        }
    }

    fn bad(verdict: Verdict, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            verdict,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    fn into_step(self, step: &str, target: &str) -> Step {
        Step::new(step, target, self.verdict, self.detail).maybe_hint(self.hint)
    }
}

fn key_matches(material: &tls::Material) -> Finding {
    match rustls::sign::CertifiedKey::from_der(
        material.chain.clone(),
        material.key.clone_key(),
        &tls::provider(),
    ) {
        Ok(_) => Finding::ok("the key belongs to the certificate"),
        Err(rustls::Error::InconsistentKeys(_)) => Finding::bad(
            Verdict::Fail,
            "the key is not the certificate's key",
            "use the key file made with this certificate (NAME-key.pem beside NAME.pem)",
        ),
        Err(e) => Finding::bad(
            Verdict::Fail,
            format!("the key cannot be used: {e}"),
            "give the private key (PEM) that was issued with the certificate",
        ),
    }
}

fn chains_to_ca(material: &tls::Material, ca_names: &[String]) -> Finding {
    let Some(leaf) = material.chain.first() else {
        return Finding::bad(Verdict::Fail, "no certificate", "give a certificate");
    };
    let verifier = match rustls::server::WebPkiClientVerifier::builder_with_provider(
        material.roots.clone(),
        tls::provider(),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            return Finding::bad(
                Verdict::Fail,
                format!("the CA cannot verify certificates: {e}"),
                "tls.ca must hold the Postern CA's certificate (ca.pem)",
            );
        }
    };
    // Checked at a time the certificate is valid: its dates are the next step's.
    let at = match pki::validity_of(leaf) {
        Ok(v) => v.not_before / 2 + v.not_after / 2,
        Err(e) => {
            return Finding::bad(
                Verdict::Fail,
                e.to_string(),
                "give a certificate from postern-relay certs issue",
            );
        }
    };
    let at = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)));
    let issuer = pki::issuer_name(leaf).unwrap_or_else(|| "(unknown)".into());
    let trusted = if ca_names.is_empty() {
        String::new()
    } else {
        format!(
            "; tls.ca holds {}",
            ca_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match verifier.verify_client_cert(leaf, &material.chain[1..], at) {
        Ok(_) => Finding::ok(format!("chains to {issuer:?}, a CA in tls.ca")),
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            Finding::bad(
                Verdict::Fail,
                format!("not issued by a CA in tls.ca: issued by {issuer:?}{trusted}"),
                "the relay refuses certificates from another CA: issue the certificate with the \
                 relay's CA (postern-relay certs issue agent NAME) and make tls.ca that CA's \
                 ca.pem",
            )
        }
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)) => {
            Finding::bad(
                Verdict::Fail,
                format!(
                    "its signature does not verify against tls.ca (another CA also named \
                     {issuer:?}?){trusted}"
                ),
                "issue the certificate with the relay's CA, and make tls.ca that CA's ca.pem",
            )
        }
        Err(e) => Finding::bad(
            Verdict::Fail,
            TlsFailure::from_rustls(&e).to_string(),
            "issue the agent's certificate with postern-relay certs issue agent NAME",
        ),
    }
}

/// The dates of every certificate in `chain` (the leaf, then intermediates): the worst.
fn dates(chain: &[CertificateDer<'static>], now: i64) -> Finding {
    let mut worst: Option<Finding> = None;
    for (i, cert) in chain.iter().enumerate() {
        let what = if i == 0 {
            String::new()
        } else {
            format!(
                "intermediate CA {:?}: ",
                pki::subject_name(cert).unwrap_or_default()
            )
        };
        let finding = match pki::validity_of(cert) {
            Ok(v) => {
                let (verdict, words) = validity_words(v, now);
                let hint = match verdict {
                    Verdict::Ok | Verdict::Skipped => None,
                    _ if now < v.not_before => Some(
                        "the certificate is not valid yet: check the clock of this host (and of \
                         the host that issued it)"
                            .to_owned(),
                    ),
                    Verdict::Fail => Some(
                        "issue a new certificate (postern-relay certs issue agent NAME --force), \
                         install it and its key, and restart or reload the agent"
                            .to_owned(),
                    ),
                    Verdict::Warn => Some(
                        "renew the certificate before it expires (postern-relay certs issue agent \
                         NAME --force), then reload the agent"
                            .to_owned(),
                    ),
                };
                Finding {
                    verdict,
                    detail: format!("{what}{words}"),
                    hint,
                }
            }
            Err(e) => Finding::bad(
                Verdict::Fail,
                format!("{what}{e}"),
                "give a certificate from postern-relay certs issue",
            ),
        };
        let rank = |f: &Finding| match f.verdict {
            Verdict::Fail => 2,
            Verdict::Warn => 1,
            _ => 0,
        };
        if worst.as_ref().is_none_or(|w| rank(&finding) > rank(w)) {
            worst = Some(finding);
        }
    }
    worst.unwrap_or_else(|| Finding::bad(Verdict::Fail, "no certificate", "give a certificate"))
}

/// How `v` stands at `now`: expired or not yet valid (fail), ending within [`WARN_DAYS`]
/// (warn), or fine.
fn validity_words(v: pki::Validity, now: i64) -> (Verdict, String) {
    const DAY: i64 = 86_400;
    let end = pki::rfc3339_unix(v.not_after);
    if now < v.not_before {
        let days = (v.not_before - now + DAY - 1) / DAY;
        (
            Verdict::Fail,
            format!(
                "not valid yet: valid from {} (in {days} day(s))",
                pki::rfc3339_unix(v.not_before)
            ),
        )
    } else if now > v.not_after {
        let days = (now - v.not_after) / DAY;
        (
            Verdict::Fail,
            format!("expired on {end} ({days} day(s) ago)"),
        )
    } else {
        let days = (v.not_after - now) / DAY;
        let verdict = if days < WARN_DAYS {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        (verdict, format!("valid until {end} ({days} day(s) left)"))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The network checks' shared settings.
struct Diag<'a> {
    config: &'a Config,
    timeout: Duration,
    /// The agent's certificate and key can be used for TLS.
    usable: bool,
}

/// The stages of a WebSocket connect, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Tcp,
    Proxy,
    OuterTls,
    Upgrade,
    Tls,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Proxy => "proxy",
            Self::OuterTls => "outer-tls",
            Self::Upgrade => "websocket",
            Self::Tls => "tls",
        }
    }
}

impl Diag<'_> {
    fn wait(&self) -> String {
        HumanDuration(self.timeout).to_string()
    }

    /// The name the relay's certificate must carry.
    fn relay_name(&self, url: &RelayUrl) -> String {
        self.config
            .server_name
            .clone()
            .unwrap_or_else(|| url.host.clone())
    }

    /// Resolves `host`; the step's verdict when it does not (`soft`: a warning, for a name
    /// that a proxy resolves).
    async fn dns(
        &self,
        report: &mut Report,
        host: &str,
        port: u16,
        what: &str,
        soft: bool,
    ) -> Option<Vec<std::net::SocketAddr>> {
        let started = Instant::now();
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            report.push(Step::ok("dns", host, "an address, nothing to resolve").since(started));
            return Some(vec![std::net::SocketAddr::new(ip, port)]);
        }
        let found = tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port))).await;
        let failed = |detail: String| {
            let (verdict, hint) = if soft {
                (
                    Verdict::Warn,
                    "this host cannot resolve it; the proxy resolves it for the tunnel, so this \
                     matters only without the proxy"
                        .to_owned(),
                )
            } else {
                (
                    Verdict::Fail,
                    format!(
                        "check the host name in {what}, and this host's DNS (/etc/resolv.conf, \
                         /etc/hosts)"
                    ),
                )
            };
            Step::new("dns", host, verdict, detail)
                .hint(hint)
                .since(started)
        };
        match found {
            Err(_) => {
                report.push(failed(format!("no answer within {}", self.wait())));
                None
            }
            Ok(Err(e)) => {
                report.push(failed(format!("cannot resolve {host}: {e}")));
                None
            }
            Ok(Ok(addrs)) => {
                let addrs: Vec<_> = addrs.collect();
                if addrs.is_empty() {
                    report.push(failed(format!("{host} resolves to no address")));
                    return None;
                }
                let shown: Vec<String> = addrs.iter().take(4).map(|a| a.ip().to_string()).collect();
                let more = if addrs.len() > 4 {
                    format!(" and {} more", addrs.len() - 4)
                } else {
                    String::new()
                };
                report.push(
                    Step::ok("dns", host, format!("{}{more}", shown.join(", "))).since(started),
                );
                Some(addrs)
            }
        }
    }

    /// A relay over QUIC: DNS, the handshake, mutual TLS, the relay's answer. Returns the index
    /// of the `quic` step when UDP got no answer (so a working WebSocket can soften it).
    async fn quic(
        &self,
        report: &mut Report,
        url: &RelayUrl,
        fallback: Option<&RelayUrl>,
    ) -> Option<usize> {
        let target = url.to_string();
        let skip_rest = |report: &mut Report, from: &[&str], because: &str| {
            for s in from {
                report.push(Step::skipped(s, &target, because));
            }
        };
        let Some(addrs) = self
            .dns(report, &url.host, url.port, "the relay url", false)
            .await
        else {
            skip_rest(report, &["quic", "tls", "session"], "dns failed");
            return None;
        };
        if !self.usable {
            skip_rest(
                report,
                &["quic", "tls", "session"],
                "the agent's key cannot be used (see key)",
            );
            return None;
        }
        let name = self.relay_name(url);
        let started = Instant::now();
        let mut last: Option<Step> = None;
        for addr in addrs {
            let client = match quic::client(addr, &self.config.tls, Liveness::AGENT) {
                Ok(c) => c,
                Err(e) => {
                    last = Some(Step::fail(
                        "quic",
                        &target,
                        format!("cannot make a quic endpoint: {e}"),
                    ));
                    continue;
                }
            };
            let attempt = tokio::time::timeout(self.timeout, client.connect(addr, &name)).await;
            match attempt {
                Ok(Ok(session)) => {
                    report.push(
                        Step::ok("quic", &target, format!("handshake with {addr} done"))
                            .since(started),
                    );
                    self.session(report, &target, &session, Some(&name)).await;
                    session.close("diagnose done");
                    // Let the close reach the relay before the endpoint goes.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), client.endpoint().wait_idle())
                            .await;
                    return None;
                }
                Ok(Err(e)) => {
                    if let Some(f) = tls_failure(&e) {
                        report.push(
                            Step::ok("quic", &target, format!("{addr} answered over udp"))
                                .since(started),
                        );
                        report.push(self.tls_step(&target, f, &name));
                        skip_rest(report, &["session"], "tls failed");
                        return None;
                    }
                    if let Some(CloseReason::Peer(reason)) = e.close_reason() {
                        report.push(
                            Step::ok("quic", &target, format!("{addr} answered over udp"))
                                .since(started),
                        );
                        report.push(Step::ok("tls", &target, "mutual TLS done"));
                        report.push(refused_by_relay(&target, reason, &self.config.name));
                        return None;
                    }
                    let timed_out = matches!(e.close_reason(), Some(CloseReason::TimedOut { .. }));
                    last = Some(if timed_out {
                        self.udp_silent(&target, addr, fallback)
                    } else {
                        Step::fail("quic", &target, e.to_string())
                            .hint("the relay url must name the relay's listen.quic address (quic://host:port)")
                    });
                }
                Err(_) => last = Some(self.udp_silent(&target, addr, fallback)),
            }
        }
        let step = last
            .unwrap_or_else(|| Step::fail("quic", &target, "no address to try"))
            .since(started);
        let silent = step.detail.starts_with("no answer");
        report.push(step);
        let index = report.steps.len() - 1;
        skip_rest(report, &["tls", "session"], "quic failed");
        silent.then_some(index)
    }

    fn udp_silent(
        &self,
        target: &str,
        addr: std::net::SocketAddr,
        fallback: Option<&RelayUrl>,
    ) -> Step {
        let hint = match fallback {
            Some(ws) => format!(
                "UDP port blocked? a firewall must let udp/{} out to the relay and its answers \
                 back; the agent uses WebSocket ({ws}) instead while that works (see its steps)",
                addr.port()
            ),
            None => format!(
                "UDP port blocked? a firewall must let udp/{} out to the relay and its answers \
                 back; the agent will use WebSocket if configured (relay: {{quic: ..., \
                 websocket: wss://...}})",
                addr.port()
            ),
        };
        Step::fail(
            "quic",
            target,
            format!("no answer over udp from {addr} within {}", self.wait()),
        )
        .hint(hint)
    }

    /// The `tls` step for a failed mutual TLS handshake with the relay.
    fn tls_step(&self, target: &str, f: &TlsFailure, name: &str) -> Step {
        Step::fail("tls", target, f.to_string()).maybe_hint(tls_hint(f, name, &self.config.name))
    }

    /// The relay's answer to a probe hello: the `tls` step when `tls_pending` (QUIC, where the
    /// relay's refusal of our certificate may come only now), then the `session` step.
    async fn session(
        &self,
        report: &mut Report,
        target: &str,
        session: &Session,
        tls_pending: Option<&str>,
    ) {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.timeout,
            session::hello(self.config, session, false, true),
        )
        .await;
        let mutual = || {
            Step::ok(
                "tls",
                target,
                format!(
                    "the relay's certificate is valid for {:?}, and the relay accepted ours ({})",
                    tls_pending.unwrap_or_default(),
                    pki::Identity::Agent(self.config.name.clone()).uri()
                ),
            )
        };
        let step = match answer {
            Err(_) => Step::fail(
                "session",
                target,
                format!("no answer to the hello within {}", self.wait()),
            )
            .hint("is this a Postern relay, and is it overloaded?"),
            Ok(Ok(mut ready)) => {
                let _ = ready.control.shutdown().await;
                let w = &ready.welcome;
                let mut detail = format!(
                    "relay {:?} accepts agent {} (protocol {})",
                    w.relay_instance, self.config.name, w.version
                );
                if !w.accepted.is_empty() {
                    detail.push_str(&format!("; services: {}", w.accepted.join(", ")));
                }
                let mut step = Step::ok("session", target, detail);
                if !w.rejected.is_empty() {
                    let why: Vec<String> = w
                        .rejected
                        .iter()
                        .map(|r| format!("{}: {}", r.service, r.reason))
                        .collect();
                    step.verdict = Verdict::Warn;
                    step.detail
                        .push_str(&format!("\nrefused: {}", why.join("; ")));
                    step.hint = Some(format!(
                        "offer only the services the relay allows this agent \
                         (agents.{}.services in relay.yaml), or allow them there",
                        self.config.name
                    ));
                }
                if !w.probe {
                    step.verdict = Verdict::Warn;
                    step.detail.push_str(
                        "\nthe relay does not know diagnose probes: it took this check for the \
                         agent's session, so a running agent of this name reconnects",
                    );
                    step.hint = Some("upgrade the relay".into());
                }
                step
            }
            Ok(Err(e)) => {
                if let (Some(name), Some(f)) = (tls_pending, session_tls_failure(&e)) {
                    report.push(self.tls_step(target, f, name).since(started));
                    report.push(Step::skipped("session", target, "tls failed"));
                    return;
                }
                let closed = match &e {
                    SessionError::Closed(r) => Some(r),
                    SessionError::Open(t) => t.close_reason(),
                    _ => None,
                };
                if let Some(CloseReason::Peer(reason)) = closed {
                    let step = refused_by_relay(target, reason, &self.config.name);
                    if tls_pending.is_some() {
                        report.push(mutual());
                    }
                    report.push(step.since(started));
                    return;
                }
                match e {
                    SessionError::Refused { code, message } => {
                        let hint = match code {
                            Code::UnsupportedVersion => Some(
                                "install an agent and a relay that share a protocol version"
                                    .to_owned(),
                            ),
                            Code::ShuttingDown => {
                                Some("the relay is shutting down: try again".into())
                            }
                            Code::NotAuthorized => Some(format!(
                                "list the agent under agents.{} in relay.yaml, with its services",
                                self.config.name
                            )),
                            _ => None,
                        };
                        Step::fail(
                            "session",
                            target,
                            format!("the relay refused this agent ({code}): {message}"),
                        )
                        .maybe_hint(hint)
                    }
                    other => Step::fail("session", target, other.to_string())
                        .hint("is this a Postern relay of a compatible version?"),
                }
            }
        };
        if tls_pending.is_some() {
            report.push(mutual());
        }
        report.push(step.since(started));
    }

    /// A relay over WebSocket: DNS, TCP, the proxy, the outer TLS, the upgrade, mutual TLS and
    /// the relay's answer. Whether it all works.
    async fn websocket(&self, report: &mut Report, dialer: &Dialer, url: &RelayUrl) -> bool {
        let target = url.to_string();
        let proxy = match self.config.websocket.proxy.for_url(url) {
            Ok(p) => p,
            Err(e) => {
                report.push(
                    Step::fail("proxy", &target, e.to_string())
                        .hint("fix websocket.proxy, or HTTPS_PROXY in the agent's environment"),
                );
                return false;
            }
        };
        let mut stages = vec![Stage::Tcp];
        if proxy.is_some() {
            stages.push(Stage::Proxy);
        }
        if url.scheme == Scheme::Wss {
            stages.push(Stage::OuterTls);
        }
        stages.extend([Stage::Upgrade, Stage::Tls]);
        let skip_from = |report: &mut Report, from: usize, because: &str| {
            for s in &stages[from..] {
                report.push(Step::skipped(s.name(), &target, because));
            }
            report.push(Step::skipped("session", &target, because));
        };

        if let Some(p) = &proxy
            && self
                .dns(
                    report,
                    &p.host,
                    p.port,
                    "websocket.proxy (or HTTPS_PROXY)",
                    false,
                )
                .await
                .is_none()
        {
            skip_from(report, 0, "the proxy's name does not resolve");
            return false;
        }
        let resolved = self
            .dns(
                report,
                &url.host,
                url.port,
                "the relay url",
                proxy.is_some(),
            )
            .await;
        if resolved.is_none() && proxy.is_none() {
            skip_from(report, 0, "dns failed");
            return false;
        }
        if !self.usable {
            skip_from(report, 0, "the agent's key cannot be used (see key)");
            return false;
        }

        let mut opts = match dialer.ws_options(url, &[]) {
            Ok(o) => o,
            Err(e) => {
                report.push(Step::fail("tcp", &target, e.to_string()));
                skip_from(report, 1, "the connection cannot be set up");
                return false;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        opts.progress = Some(Progress::new(move |stage| {
            let _ = tx.send((stage, Instant::now()));
        }));
        // Each stage gets its own deadline below; this one only backs them up.
        opts.connect_timeout = self.timeout.saturating_mul(8);
        let dial = ws::connect(&opts, &self.config.tls);
        tokio::pin!(dial);
        let started = Instant::now();
        let mut reached: Vec<(Reached, Instant)> = Vec::new();
        let mut deadline = started + self.timeout;
        let result = loop {
            tokio::select! {
                r = &mut dial => break Some(r),
                Some(stage) = rx.recv() => {
                    reached.push(stage);
                    deadline = Instant::now() + self.timeout;
                }
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        while let Ok(stage) = rx.try_recv() {
            reached.push(stage);
        }

        let mut last = started;
        for (i, (stage, at)) in reached.iter().enumerate() {
            let Some(kind) = stages.get(i) else { break };
            let detail = match stage {
                Reached::Tcp { remote } => match &proxy {
                    Some(p) => format!("connected to the proxy {p} ({remote})"),
                    None => format!("connected to {remote}"),
                },
                Reached::Proxy => format!(
                    "the proxy opened a tunnel to {}",
                    authority(&url.host, url.port)
                ),
                Reached::OuterTls { subject, issuer } => format!(
                    "certificate of {:?} verified for {:?}, issued by {:?}",
                    subject.as_deref().unwrap_or("?"),
                    self.config.websocket.sni.as_deref().unwrap_or(&url.host),
                    issuer.as_deref().unwrap_or("?")
                ),
                Reached::Upgraded => format!("101 Switching Protocols at {}", url.path),
            };
            report.push(Step::ok(kind.name(), &target, detail).took(at.duration_since(last)));
            last = *at;
        }
        let next = reached.len().min(stages.len() - 1);
        let stage = stages[next];
        match result {
            Some(Ok(session)) => {
                let name = self.relay_name(url);
                report.push(
                    Step::ok(
                        "tls",
                        &target,
                        format!(
                            "the relay's certificate is valid for {name:?}, and the relay \
                             accepted ours ({})",
                            pki::Identity::Agent(self.config.name.clone()).uri()
                        ),
                    )
                    .took(last.elapsed()),
                );
                let before = report.steps.len();
                self.session(report, &target, &session, None).await;
                session.close("diagnose done");
                // The close travels as a WebSocket Close: give it a moment to leave.
                let _ = tokio::time::timeout(Duration::from_millis(500), session.closed()).await;
                report.steps[before..]
                    .iter()
                    .all(|s| s.verdict != Verdict::Fail)
            }
            Some(Err(e)) => {
                let step = self
                    .ws_failure(stage, &target, url, proxy.as_ref(), &e)
                    .took(last.elapsed());
                report.push(step);
                skip_from(report, next + 1, &format!("{} failed", stage.name()));
                false
            }
            None => {
                let step = self
                    .ws_silent(stage, &target, url, proxy.as_ref())
                    .took(last.elapsed());
                report.push(step);
                skip_from(report, next + 1, &format!("{} failed", stage.name()));
                false
            }
        }
    }

    fn ws_failure(
        &self,
        stage: Stage,
        target: &str,
        url: &RelayUrl,
        proxy: Option<&Proxy>,
        e: &TransportError,
    ) -> Step {
        let step = stage.name();
        let there = authority(&url.host, url.port);
        match (stage, e) {
            (_, TransportError::Proxy(p)) => {
                let hint = match p {
                    ProxyError::AuthRequired { .. } => {
                        "give the proxy's credentials in websocket.proxy \
                         (http://USER:PASSWORD@host:port) or HTTPS_PROXY"
                            .to_owned()
                    }
                    ProxyError::Refused { status: 403, .. } => format!(
                        "the proxy does not allow CONNECT to {there}: ask its administrators to \
                         allow this host and port (many proxies allow CONNECT to port 443 only: \
                         serve the relay, or its router, on 443)"
                    ),
                    ProxyError::Refused { status, .. } => format!(
                        "the proxy refused the tunnel with HTTP {status}: see the proxy's log, \
                         or ask its administrators"
                    ),
                    ProxyError::BadAnswer { .. } => {
                        "is this an HTTP proxy? websocket.proxy takes http://host:port".to_owned()
                    }
                    ProxyError::Io { proxy, source } if stage == Stage::Tcp => {
                        return Step::fail(
                            "tcp",
                            target,
                            format!("proxy {proxy}: {}", io_words(source)),
                        )
                        .hint(format!(
                            "nothing answers at the proxy {proxy}: check websocket.proxy (or \
                             HTTPS_PROXY) and that the proxy runs"
                        ));
                    }
                    ProxyError::Io { .. } | ProxyError::Invalid { .. } => {
                        "the proxy closed the connection: see the proxy's log".to_owned()
                    }
                };
                Step::fail("proxy", target, p.to_string()).hint(hint)
            }
            (
                Stage::Tcp,
                TransportError::Connect {
                    source: ConnectError::Io(io),
                    ..
                },
            ) => {
                let hint = if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    format!(
                        "nothing listens on {there}, or a firewall refuses it: check the url's \
                         port (the relay serves WebSocket on its listen.http; a router usually \
                         on 443)"
                    )
                } else {
                    format!(
                        "outbound TCP to {there} must be allowed; where it is not, go through a \
                         proxy (websocket.proxy)"
                    )
                };
                Step::fail("tcp", target, format!("{there}: {}", io_words(io))).hint(hint)
            }
            (
                _,
                TransportError::Connect {
                    source: ConnectError::OuterTls(io),
                    ..
                },
            ) => {
                let sni = self.config.websocket.sni.as_deref().unwrap_or(&url.host);
                let failure = TlsFailure::from_io(io);
                let hint = match failure.as_ref().map(|f| &f.cause) {
                    Some(TlsCause::UnknownCa { .. } | TlsCause::BadSignature { .. }) => format!(
                        "the certificate {there} presents is not signed by a CA this host \
                         trusts: add that CA to websocket.ca (a TLS-inspecting proxy's CA goes \
                         there too)"
                    ),
                    Some(TlsCause::WrongName { .. }) => format!(
                        "the certificate {there} presents is not valid for {sni:?}: dial a name \
                         it carries, or set websocket.sni to one"
                    ),
                    Some(TlsCause::Expired | TlsCause::NotValidNow | TlsCause::NotYetValid) => {
                        "the router's certificate is expired or not valid yet: its operators \
                         must renew it (or this host's clock is wrong)"
                            .to_owned()
                    }
                    _ => {
                        format!("is {there} a TLS port? use ws:// for plain HTTP, wss:// for HTTPS")
                    }
                };
                Step::fail("outer-tls", target, tls::describe_handshake_error(io)).hint(hint)
            }
            (
                _,
                TransportError::Rejected {
                    status,
                    router_error,
                    ..
                },
            ) => {
                let hint = match (status, router_error) {
                    (404, _) => format!(
                        "nothing serves {} there: check the url's path (the relay's is \
                         /v1/tunnel) and that the router sends it to the relay's listen.http",
                        url.path
                    ),
                    (400, Some(r)) => format!("the router does not route this request ({r})"),
                    (502..=504, _) => "the router cannot reach the relay: is the relay running, \
                                       and is its route mapped to it?"
                        .to_owned(),
                    (401 | 403, _) => "the router or a proxy refuses the upgrade: it must allow \
                                       WebSocket to the relay"
                        .to_owned(),
                    _ => "a router in between does not pass WebSocket upgrades, or this is not \
                          the relay's address"
                        .to_owned(),
                };
                Step::fail("websocket", target, e.to_string()).hint(hint)
            }
            (
                _,
                TransportError::Connect {
                    source: ConnectError::Upgrade(_) | ConnectError::Request(_),
                    ..
                },
            ) => Step::fail("websocket", target, e.to_string()).hint(
                "the server did not answer the upgrade as HTTP/1.1: is this the relay's (or the \
                 router's) HTTP port? (ws:// for plain HTTP, wss:// for HTTPS)",
            ),
            (_, e) if tls_failure(e).is_some() => {
                let name = self.relay_name(url);
                tls_failure(e).map_or_else(
                    || Step::fail("tls", target, e.to_string()),
                    |f| self.tls_step(target, f, &name),
                )
            }
            (_, e) => {
                let hint = match e {
                    TransportError::Connect {
                        source: ConnectError::NotPostern,
                        ..
                    } => {
                        "something that is not a Postern relay answered the upgrade: check the url"
                    }
                    TransportError::Connect {
                        source: ConnectError::Refused(_),
                        ..
                    } => {
                        "the relay closed the connection during the handshake: see the relay's log"
                    }
                    _ if stage == Stage::Tcp && proxy.is_none() => {
                        "check the relay url's host and port"
                    }
                    _ => "see the relay's (and the router's) log for this connection",
                };
                Step::fail(step, target, e.to_string()).hint(hint)
            }
        }
    }

    fn ws_silent(&self, stage: Stage, target: &str, url: &RelayUrl, proxy: Option<&Proxy>) -> Step {
        let there = authority(&url.host, url.port);
        let hint = match (stage, proxy) {
            (Stage::Tcp, Some(p)) => format!(
                "the proxy {p} does not answer: a firewall drops the packets, or the proxy is down"
            ),
            (Stage::Tcp, None) => format!(
                "{there} does not answer: a firewall drops the packets? outbound TCP to it must \
                 be allowed, or go through a proxy (websocket.proxy)"
            ),
            (Stage::Proxy, _) => {
                "the proxy does not answer the CONNECT: it may be trying to reach \
                                  the relay and failing; see its log"
                    .to_owned()
            }
            (Stage::OuterTls, _) => {
                format!("no TLS answer from {there}: is it a TLS port? (ws:// for plain HTTP)")
            }
            (Stage::Upgrade, _) => "no answer to the upgrade: is this the relay's (or the \
                                    router's) HTTP port?"
                .to_owned(),
            (Stage::Tls, _) => "the relay did not complete the mutual TLS: is this a Postern \
                                relay, and does the router pass WebSocket messages both ways?"
                .to_owned(),
        };
        Step::fail(
            stage.name(),
            target,
            format!("no answer within {}", self.wait()),
        )
        .hint(hint)
    }

    /// Every node of every service: connect, greeting, and its health check.
    async fn backends(&self, report: &mut Report) {
        for svc in self.config.services.values() {
            let first = report.steps.len();
            let mut nodes_ok = 0;
            for node in &svc.nodes {
                let target = if svc.nodes.len() == 1 && svc.check.is_none() {
                    format!("{} {}", svc.name, node.address)
                } else {
                    format!("{}/{} {}", svc.name, node.name, node.address)
                };
                let before = report.steps.len();
                report.push(self.backend(&target, &node.address).await);
                if let Some(check) = &svc.check
                    && !matches!(check.kind, CheckKind::Tcp)
                {
                    report.push(health(&target, check, node).await);
                }
                if report.steps[before..]
                    .iter()
                    .all(|s| s.verdict != Verdict::Fail)
                {
                    nodes_ok += 1;
                }
            }
            // A service with several nodes works while one of them does.
            if svc.nodes.len() > 1 && nodes_ok > 0 {
                for s in &mut report.steps[first..] {
                    if s.verdict == Verdict::Fail {
                        s.verdict = Verdict::Warn;
                        s.detail.push_str(&format!(
                            " (service {} has other nodes that work)",
                            svc.name
                        ));
                    }
                }
            }
        }
    }

    /// A backend: TCP connect, and the MySQL greeting when the server sends one.
    async fn backend(&self, target: &str, address: &str) -> Step {
        let started = Instant::now();
        let connected =
            tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(address)).await;
        let mut tcp = match connected {
            Err(_) => {
                return Step::fail(
                    "backend",
                    target,
                    format!("no answer within {}", self.wait()),
                )
                .hint(format!(
                    "{address} does not answer: the host is down, or a firewall drops \
                         connections from this host to it"
                ))
                .since(started);
            }
            Ok(Err(e)) => {
                let hint = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    format!(
                        "nothing listens at {address}: is the database running, and listening \
                         on this address and port (bind-address, port)?"
                    )
                } else {
                    "check the service's address in agent.yaml".to_owned()
                };
                return Step::fail("backend", target, io_words(&e))
                    .hint(hint)
                    .since(started);
            }
            Ok(Ok(t)) => t,
        };
        let wait = GREETING_WAIT.min(self.timeout);
        let greeting = read_greeting(&mut tcp, wait).await;
        let _ = tcp.shutdown().await;
        let step = match greeting {
            Ok(g) => Step::ok(
                "backend",
                target,
                format!(
                    "connected; MySQL server {}",
                    String::from_utf8_lossy(g.server_version())
                ),
            ),
            Err(GreetingError::Timeout) => Step::ok(
                "backend",
                target,
                format!(
                    "connected (no MySQL greeting within {}: fine for a service that is not MySQL)",
                    HumanDuration(wait)
                ),
            ),
            Err(GreetingError::Refused(err)) => {
                let message = String::from_utf8_lossy(&err.message).into_owned();
                let hint = match err.code {
                    1129 => "the database blocked this host after too many broken connections: \
                             run FLUSH HOSTS (mariadb-admin flush-hosts) and raise \
                             max_connect_errors"
                        .to_owned(),
                    1130 => "the database does not let this host in: allow the users who log in \
                             through Postern from the agent's address"
                        .to_owned(),
                    1040 => "the database has no connection to spare (max_connections)".to_owned(),
                    _ => "see the database's error log".to_owned(),
                };
                Step::fail(
                    "backend",
                    target,
                    format!(
                        "connected, but the database refuses this host: ERROR {}: {message}",
                        err.code
                    ),
                )
                .hint(hint)
            }
            Err(GreetingError::Closed) => Step::new(
                "backend",
                target,
                Verdict::Warn,
                "connected, but the server closed the connection without a word",
            )
            .hint(
                "a MySQL server sends a greeting at once; one that closes at once may be \
                 refusing this host (see its error log)",
            ),
            Err(e) => Step::new(
                "backend",
                target,
                Verdict::Warn,
                format!("connected, but the server did not send a MySQL greeting: {e}"),
            )
            .hint("fine for a service that is not MySQL; for MySQL, check the address"),
        };
        step.since(started)
    }
}

/// The node's configured health check, once.
async fn health(
    target: &str,
    check: &crate::config::HealthCheck,
    node: &crate::config::Node,
) -> Step {
    let started = Instant::now();
    let mut prober = Prober::new(&check.kind, node);
    let probe = prober.probe(check.timeout).await;
    prober.close().await;
    let kind = check.kind.name();
    let step = match probe.outcome {
        Outcome::Up => Step::ok("health", target, format!("{kind} check: {}", probe.detail)),
        Outcome::Down => Step::fail(
            "health",
            target,
            format!("{kind} check: unhealthy: {}", probe.detail),
        )
        .hint("the agent sends no client to this node while its check says so"),
        Outcome::Failed => {
            let hint = match &check.kind {
                CheckKind::Mysql { user, .. } => format!(
                    "the agent logs in as {user:?} to check the node: check check.user, its \
                     password (check.password_file or password_env), and that it may log in from \
                     this host"
                ),
                CheckKind::Http => match &node.http {
                    Some(url) => format!(
                        "{url} must answer 200 within {}",
                        HumanDuration(check.timeout)
                    ),
                    None => "the node's health endpoint must answer 200".to_owned(),
                },
                CheckKind::Tcp => "the node must accept connections".to_owned(),
            };
            Step::fail(
                "health",
                target,
                format!("{kind} check failed: {}", probe.detail),
            )
            .hint(hint)
        }
    };
    step.since(started)
}

/// The relay closed the session after the handshake: the `session` step.
fn refused_by_relay(target: &str, reason: &str, agent: &str) -> Step {
    let step = Step::fail(
        "session",
        target,
        format!("the relay closed the session: {reason}"),
    );
    if reason.contains("not known") {
        step.hint(format!(
            "list this agent under agents.{agent} in the relay's relay.yaml, with the services \
             it may offer, and reload or restart the relay"
        ))
    } else {
        step.hint("see the relay's log for this agent")
    }
}

/// The TLS failure inside a transport error, if that is what it is.
fn tls_failure(e: &TransportError) -> Option<&TlsFailure> {
    match e {
        TransportError::Connect {
            source: ConnectError::Tls(f),
            ..
        } => Some(f),
        _ => match e.close_reason() {
            Some(CloseReason::Tls(f)) => Some(f),
            _ => None,
        },
    }
}

/// The TLS failure behind a failed hello (a relay that refused our certificate after a QUIC
/// handshake that looked complete).
fn session_tls_failure(e: &SessionError) -> Option<&TlsFailure> {
    match e {
        SessionError::Closed(CloseReason::Tls(f)) => Some(f),
        SessionError::Open(t) => tls_failure(t),
        _ => None,
    }
}

/// What to do about a failed mutual TLS handshake with the relay.
fn tls_hint(f: &TlsFailure, relay_name: &str, agent: &str) -> Option<String> {
    let renew = format!("postern-relay certs issue agent {agent} --force");
    Some(match (f.by, &f.cause) {
        (RefusedBy::Us, TlsCause::UnknownCa { .. } | TlsCause::BadSignature { .. }) => {
            "the relay's certificate is not signed by the CA in tls.ca: make tls.ca the CA that \
             issued the relay's certificate (the relay's ca.pem)"
                .to_owned()
        }
        (RefusedBy::Us, TlsCause::WrongName { .. }) => format!(
            "the relay's certificate does not carry the name {relay_name:?}: set server_name in \
             agent.yaml to a name it carries, or issue the relay's certificate with that name \
             (certs issue server relay --dns/--ip)"
        ),
        (RefusedBy::Us, TlsCause::Expired | TlsCause::NotValidNow) => {
            "the relay's certificate has expired: renew it on the relay (or this host's clock is \
             wrong)"
                .to_owned()
        }
        (RefusedBy::Us, TlsCause::NotYetValid) => {
            "the relay's certificate is not valid yet: check this host's clock".to_owned()
        }
        (RefusedBy::Peer, TlsCause::UnknownCa { .. } | TlsCause::BadSignature { .. }) => format!(
            "the relay does not trust the CA that issued the agent's certificate: issue it with \
             the relay's CA ({renew})"
        ),
        (RefusedBy::Peer, TlsCause::Expired | TlsCause::NotYetValid | TlsCause::NotValidNow) => {
            format!(
                "the relay refuses the agent's certificate as expired or not yet valid: renew it \
                 ({renew}) and check this host's clock"
            )
        }
        (RefusedBy::Peer, TlsCause::Revoked) => format!(
            "the relay revoked this agent's certificate: if the agent should still serve, issue \
             a new one ({renew})"
        ),
        (RefusedBy::Peer, TlsCause::NoCertificate | TlsCause::WrongPurpose) => format!(
            "the agent needs its own certificate from postern-relay certs issue agent {agent}"
        ),
        _ => return None,
    })
}

/// An I/O error in a few words ("connection refused").
fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".to_owned(),
        K::ConnectionReset => "connection reset".to_owned(),
        K::TimedOut => "timed out".to_owned(),
        K::HostUnreachable => "host unreachable".to_owned(),
        K::NetworkUnreachable => "network unreachable".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_say_expired_soon_and_fine() {
        let v = |b, a| pki::Validity {
            not_before: b,
            not_after: a,
        };
        let day = 86_400;
        let (verdict, words) = validity_words(v(0, 10 * day), 20 * day);
        assert_eq!(verdict, Verdict::Fail);
        assert!(
            words.starts_with("expired on 1970-01-11T00:00:00Z (10 day(s) ago)"),
            "{words}"
        );
        let (verdict, words) = validity_words(v(5 * day, 10 * day), day);
        assert_eq!(verdict, Verdict::Fail);
        assert!(words.contains("not valid yet"), "{words}");
        let (verdict, words) = validity_words(v(0, 10 * day), day);
        assert_eq!(verdict, Verdict::Warn);
        assert!(words.contains("(9 day(s) left)"), "{words}");
        let (verdict, _) = validity_words(v(0, 100 * day), day);
        assert_eq!(verdict, Verdict::Ok);
    }

    #[test]
    fn the_exit_status_follows_the_worst_step() {
        let mut r = Report::new(Path::new("agent.yaml"));
        r.push(Step::ok("config", "agent.yaml", "fine"));
        r.push(Step::new("validity", "cert.pem", Verdict::Warn, "soon"));
        let r = r.finish();
        assert_eq!((r.exit_status(), r.verdict), (0, Verdict::Warn));
        let mut r = r;
        r.push(Step::fail(
            "backend",
            "orders 127.0.0.1:1",
            "connection refused",
        ));
        r.push(Step::skipped("session", "quic://x:1", "quic failed"));
        let r = r.finish();
        assert_eq!((r.exit_status(), r.verdict), (1, Verdict::Fail));
        let text = r.text(false);
        assert!(text.contains("fail     backend"), "{text}");
        assert!(text.contains("1 check(s) failed, 1 warning(s)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(json["steps"][2]["verdict"], "fail");
        assert_eq!(json["steps"][3]["hint"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn a_config_that_does_not_parse_is_status_64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "relay: quic://r:1\nservices: [\n").unwrap();
        let r = run(&path, Duration::from_secs(1)).await;
        assert_eq!(r.exit_status(), 64);
        assert_eq!(r.steps.len(), 1);
        assert!(r.steps[0].detail.contains("agent.yaml"), "{:?}", r.steps[0]);
        let missing = run(&dir.path().join("nope.yaml"), Duration::from_secs(1)).await;
        assert_eq!(missing.exit_status(), 64);
    }
}
