//! HTTP CONNECT through a forward proxy, for agents whose only way out is a corporate proxy.
//!
//! The proxy comes either from the agent's config or from the usual environment variables
//! (`HTTPS_PROXY`, `NO_PROXY`, ...), read through a lookup closure so that nothing here touches
//! the process environment. After a `200` answer the TCP connection is a plain byte pipe to the
//! relay; the WebSocket and both TLS layers run through it unchanged.
//!
//! Only `http://` proxies are supported (the CONNECT request itself is not encrypted, which is
//! how almost every corporate proxy is reached); credentials go out as HTTP basic auth.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::addr::{Scheme, authority, split_host_port};

/// The largest proxy answer head we read before giving up.
const MAX_RESPONSE: usize = 16 * 1024;

/// A forward proxy that tunnels with HTTP CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Proxy host name or address (without brackets).
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// Basic-auth credentials, if the proxy wants them.
    pub auth: Option<ProxyAuth>,
}

/// Basic-auth credentials for a proxy. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAuth {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth)
            .finish()
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&authority(&self.host, self.port))
    }
}

/// Errors finding or using a proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A proxy setting could not be understood.
    #[error("invalid proxy setting {value:?} in {key}: {reason}")]
    Invalid {
        /// Where the setting came from (an environment variable or a config key).
        key: String,
        /// The setting, with any password masked.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The proxy could not be reached or the tunnel failed on the way.
    #[error("proxy {proxy}: {source}")]
    Io {
        /// The proxy.
        proxy: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The proxy answered something that is not HTTP.
    #[error("proxy {proxy} sent an invalid answer: {reason}")]
    BadAnswer {
        /// The proxy.
        proxy: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// The proxy wants credentials (407), or refused the ones we sent.
    #[error("proxy {proxy} requires authentication (407 {reason}){hint}", hint = if *.sent_credentials { ": the credentials were refused" } else { ": no credentials configured" })]
    AuthRequired {
        /// The proxy.
        proxy: String,
        /// The reason phrase of the answer.
        reason: String,
        /// Whether we sent credentials.
        sent_credentials: bool,
    },
    /// The proxy refused to open the tunnel.
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// Where we asked to go.
        target: String,
        /// The HTTP status.
        status: u16,
        /// The reason phrase.
        reason: String,
    },
}

impl Proxy {
    /// Parses a proxy URL: `http://[user[:password]@]host[:port][/]` or `host:port`.
    /// The port defaults to 80. `key` names where the value came from, for error messages.
    pub fn parse(key: &str, value: &str) -> Result<Self, ProxyError> {
        let invalid = |reason: &str| ProxyError::Invalid {
            key: key.to_owned(),
            value: mask_password(value),
            reason: reason.to_owned(),
        };
        let value = value.trim();
        let rest = match split_scheme(value) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(invalid(&format!(
                    "unsupported proxy scheme {scheme:?}: only http:// proxies (HTTP CONNECT) are supported"
                )));
            }
            None => value,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(invalid("a proxy url has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| invalid("bad host or port"))?;
        let auth = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or_else(|| invalid("bad %-escape in user"))?;
                let password =
                    percent_decode(password).ok_or_else(|| invalid("bad %-escape in password"))?;
                if user.is_empty() {
                    return Err(invalid("empty user name"));
                }
                Some(ProxyAuth { user, password })
            }
        };
        Ok(Self {
            host,
            port: port.unwrap_or(80),
            auth,
        })
    }
}

/// Picks the proxy for reaching `host:port` over `scheme` from environment-style settings.
///
/// `lookup` returns the value of a variable (pass `|k| std::env::var(k).ok()` in a binary, a map
/// in tests). `wss` uses `HTTPS_PROXY`, then `https_proxy`; `ws` uses `HTTP_PROXY`, then
/// `http_proxy` (QUIC never goes through a proxy). Empty values count as unset.
///
/// `NO_PROXY` (then `no_proxy`) is a comma-separated list; the target bypasses the proxy when an
/// entry matches:
/// * `*` matches everything;
/// * `example.com` and `.example.com` match `example.com` and every name below it
///   (case-insensitive, at a label boundary);
/// * an IP address matches that address; `10.0.0.0/8` or `fd00::/8` match a range;
/// * any entry may end with `:port`, and then matches only that port.
pub fn proxy_from_env(
    lookup: impl Fn(&str) -> Option<String>,
    scheme: Scheme,
    host: &str,
    port: u16,
) -> Result<Option<Proxy>, ProxyError> {
    let keys: &[&str] = match scheme {
        Scheme::Wss => &["HTTPS_PROXY", "https_proxy"],
        Scheme::Ws => &["HTTP_PROXY", "http_proxy"],
        Scheme::Quic => return Ok(None),
    };
    let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
    let Some((key, value)) = keys.iter().find_map(|k| get(k).map(|v| (*k, v))) else {
        return Ok(None);
    };
    let no_proxy = get("NO_PROXY").or_else(|| get("no_proxy"));
    if no_proxy.is_some_and(|list| bypasses(&list, host, port)) {
        return Ok(None);
    }
    Proxy::parse(key, &value).map(Some)
}

/// Whether `NO_PROXY`-style `list` says that `host:port` is reached directly.
pub fn bypasses(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip: Option<IpAddr> = host.parse().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = split_entry_port(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(ip) = host_ip {
                if let Some((net, bits)) = name.split_once('/') {
                    return match (net.parse::<IpAddr>(), bits.parse::<u8>()) {
                        (Ok(net), Ok(bits)) => in_cidr(ip, net, bits),
                        _ => false,
                    };
                }
                return name.parse::<IpAddr>().is_ok_and(|n| n == ip);
            }
            let name = name.trim_start_matches("*.").trim_start_matches('.');
            !name.is_empty()
                && (host == name
                    || host
                        .strip_suffix(name)
                        .is_some_and(|prefix| prefix.ends_with('.')))
        })
}

/// Opens a CONNECT tunnel to `host:port` through `proxy` on an already connected stream.
///
/// Reads the answer head byte-exactly (never past its blank line), so that whatever the relay
/// sends next stays in the stream.
pub(crate) async fn tunnel<S>(
    stream: &mut S,
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = authority(host, port);
    let io = |source| ProxyError::Io {
        proxy: proxy.to_string(),
        source,
    };
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: postern/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(auth) = &proxy.auth {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", auth.user, auth.password));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;

    let head = read_head(stream).await.map_err(|e| match e {
        HeadError::Io(e) => io(e),
        HeadError::TooLong => ProxyError::BadAnswer {
            proxy: proxy.to_string(),
            reason: format!("answer head longer than {MAX_RESPONSE} bytes"),
        },
        HeadError::Eof => ProxyError::BadAnswer {
            proxy: proxy.to_string(),
            reason: "connection closed before a complete answer".into(),
        },
    })?;
    let (status, reason) = parse_status(&head).ok_or_else(|| ProxyError::BadAnswer {
        proxy: proxy.to_string(),
        reason: format!(
            "not an http status line: {:?}",
            String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default())
                .trim_end()
        ),
    })?;
    match status {
        200..=299 => Ok(()),
        407 => Err(ProxyError::AuthRequired {
            proxy: proxy.to_string(),
            reason,
            sent_credentials: proxy.auth.is_some(),
        }),
        _ => Err(ProxyError::Refused {
            proxy: proxy.to_string(),
            target,
            status,
            reason,
        }),
    }
}

enum HeadError {
    Io(std::io::Error),
    TooLong,
    Eof,
}

/// Reads up to and including the first `\r\n\r\n`. Each read asks for at most as many bytes as
/// could still belong to the head, so nothing after it is consumed.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HeadError> {
    const END: &[u8] = b"\r\n\r\n";
    let mut head = Vec::with_capacity(256);
    loop {
        // How much of END the head already ends with; the rest is the most we may read.
        let matched = (1..=END.len())
            .rev()
            .find(|&k| head.ends_with(&END[..k]))
            .unwrap_or(0);
        if matched == END.len() {
            return Ok(head);
        }
        if head.len() >= MAX_RESPONSE {
            return Err(HeadError::TooLong);
        }
        let want = END.len() - matched;
        let mut chunk = [0u8; 4];
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

/// What the CONNECT answer reader makes of the bytes a proxy sends: the head (up to and including
/// its blank line) and its status, or why there is none; and how many bytes it left unread.
#[cfg(feature = "fuzzing")]
#[allow(clippy::type_complexity)] // plain tuples, for a fuzz target to compare
pub fn fuzz_answer(bytes: &[u8]) -> (Result<(Vec<u8>, Option<(u16, String)>), String>, usize) {
    use futures_util::FutureExt;
    let mut rest = bytes;
    let head = read_head(&mut rest)
        .now_or_never()
        .expect("an in-memory reader never waits");
    let outcome = match head {
        Ok(head) => {
            let status = parse_status(&head);
            Ok((head, status))
        }
        Err(HeadError::TooLong) => Err("too long".into()),
        Err(HeadError::Eof) => Err("eof".into()),
        Err(HeadError::Io(e)) => Err(e.to_string()),
    };
    (outcome, rest.len())
}

/// Parses `HTTP/1.x CODE reason` from the first line of `head`.
fn parse_status(head: &[u8]) -> Option<(u16, String)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    // Three digits, the first 1 to 5 (RFC 9110 section 15): "047" or "999" is not a status.
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    if !(100..=599).contains(&code) {
        return None;
    }
    Some((code, parts.next().unwrap_or("").trim().to_owned()))
}

/// Splits `name:port` or `[v6]:port` off a `NO_PROXY` entry; bare IPv6 addresses and CIDRs
/// have no port.
fn split_entry_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `(scheme, rest)` of `scheme://rest`, when what comes before `://` is a URL scheme (a letter,
/// then letters, digits, `+`, `-` or `.`). In `user:password@host` with a `://` somewhere after
/// it, the part before is not a scheme: it holds the password.
fn split_scheme(value: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = value.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

/// The proxy URL with its password replaced, for error messages.
fn mask_password(value: &str) -> String {
    let (prefix, rest) = match split_scheme(value) {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), value),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{prefix}{user}:***@{hostport}"),
            None => value.to_owned(),
        },
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn proxy_urls_parse() {
        let p = Proxy::parse("x", "http://proxy.corp:3128").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.auth),
            ("proxy.corp", 3128, None)
        );
        let p = Proxy::parse("x", "http://u%40corp:p%3Ass@[fd00::1]:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", 8080));
        let auth = p.auth.unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.as_str()),
            ("u@corp", "p:ss")
        );
        assert_eq!(Proxy::parse("x", "10.1.2.3").unwrap().port, 80);
        for bad in [
            "https://p:1",
            "socks5://p:1",
            "http://p:99999",
            "http://:1",
            "http://p:1/x",
            "http://@p:1",
        ] {
            assert!(Proxy::parse("x", bad).is_err(), "{bad}");
        }
        let e = Proxy::parse("HTTPS_PROXY", "https://u:secret@p:1").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let p = Proxy::parse("x", "http://u:secret@p:1").unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }

    /// Found by the `proxy_settings` fuzz target: in a setting without a scheme, a `://` after
    /// the password made everything before it the "scheme", and the error showed it whole.
    #[test]
    fn a_password_before_a_stray_scheme_separator_is_not_shown() {
        for value in [
            "alice:S3cretPw@proxy.corp:3128/http://x",
            "alice:S3cretPw@http://proxy.corp:3128",
        ] {
            let e = Proxy::parse("HTTPS_PROXY", value).unwrap_err();
            assert!(!e.to_string().contains("S3cretPw"), "{e}");
            assert!(e.to_string().contains("alice:***@"), "{e}");
        }
        // A real scheme is still named.
        let e = Proxy::parse("HTTPS_PROXY", "socks5://alice:S3cretPw@p:1").unwrap_err();
        assert!(e.to_string().contains("\"socks5\""), "{e}");
        assert!(!e.to_string().contains("S3cretPw"), "{e}");
    }

    #[test]
    fn env_picks_the_scheme_variable_and_honours_no_proxy() {
        let e = env(&[
            ("HTTPS_PROXY", "http://big:1"),
            ("https_proxy", "http://small:2"),
            ("http_proxy", "http://plain:3"),
        ]);
        let p = proxy_from_env(&e, Scheme::Wss, "relay.example.com", 443).unwrap();
        assert_eq!(p.unwrap().host, "big");
        let p = proxy_from_env(&e, Scheme::Ws, "relay.example.com", 80).unwrap();
        assert_eq!(p.unwrap().host, "plain");
        assert_eq!(
            proxy_from_env(&e, Scheme::Quic, "relay.example.com", 1).unwrap(),
            None
        );

        let e = env(&[("https_proxy", "http://small:2"), ("HTTPS_PROXY", "")]);
        let p = proxy_from_env(&e, Scheme::Wss, "r", 443).unwrap();
        assert_eq!(p.unwrap().host, "small");

        let e = env(&[
            ("HTTPS_PROXY", "http://p:1"),
            (
                "no_proxy",
                "localhost, .internal,example.org:8443,10.0.0.0/8,::1",
            ),
        ]);
        let direct = |h: &str, port| proxy_from_env(&e, Scheme::Wss, h, port).unwrap().is_none();
        assert!(direct("localhost", 443));
        assert!(direct("relay.internal", 443));
        assert!(direct("internal", 443));
        assert!(!direct("notinternal", 443));
        assert!(direct("EXAMPLE.org", 8443));
        assert!(!direct("example.org", 443));
        assert!(direct("10.2.3.4", 443));
        assert!(!direct("11.2.3.4", 443));
        assert!(direct("::1", 443));
        assert!(!direct("relay.example.com", 443));

        let e = env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]);
        assert!(
            proxy_from_env(&e, Scheme::Wss, "anything", 443)
                .unwrap()
                .is_none()
        );
        let e = env(&[("HTTPS_PROXY", "ftp://p:1")]);
        assert!(proxy_from_env(&e, Scheme::Wss, "r", 443).is_err());
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            parse_status(b"HTTP/1.0 200 Connection established\r\n\r\n"),
            Some((200, "Connection established".into()))
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n"),
            Some((407, "Proxy Authentication Required".into()))
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 200\r\n\r\n"),
            Some((200, String::new()))
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20x ok\r\n\r\n"), None);
        // Not statuses, though three characters that parse as a number (found by the
        // connect_answer fuzz target: "047" was taken for status 47).
        for head in [
            &b"HTTP/1.0 047 x\r\n\r\n"[..],
            b"HTTP/1.1 +20 x\r\n\r\n",
            b"HTTP/1.1 999 x\r\n\r\n",
        ] {
            assert_eq!(
                parse_status(head),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(parse_status(&[0xff, 0xfe, b'\n']), None);
    }

    #[tokio::test]
    async fn the_answer_head_is_read_exactly() {
        let (mut client, mut proxy) = tokio::io::duplex(64);
        let p = Proxy::parse("x", "http://alice:pw@p:1").unwrap();
        let server = tokio::spawn(async move {
            let head = read_head(&mut proxy).await.ok().unwrap();
            let head = String::from_utf8(head).unwrap();
            proxy
                .write_all(b"HTTP/1.1 200 OK\r\nProxy-agent: t\r\n\r\nfirst bytes")
                .await
                .unwrap();
            head
        });
        tunnel(&mut client, &p, "::1", 443).await.unwrap();
        let head = server.await.unwrap();
        assert!(head.starts_with("CONNECT [::1]:443 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"),
            "{head}"
        );
        let mut rest = [0u8; 11];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"first bytes");
    }

    #[tokio::test]
    async fn refusals_are_typed() {
        for (answer, check) in [
            (
                &b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"[..],
                (|e: &ProxyError| {
                    matches!(
                        e,
                        ProxyError::AuthRequired {
                            sent_credentials: false,
                            ..
                        }
                    )
                }) as fn(&ProxyError) -> bool,
            ),
            (b"HTTP/1.1 403 Forbidden\r\n\r\n", |e| {
                matches!(e, ProxyError::Refused { status: 403, .. })
            }),
            (b"garbage\r\n\r\n", |e| {
                matches!(e, ProxyError::BadAnswer { .. })
            }),
            (b"HTTP/1.1 200 OK\r\n", |e| {
                matches!(e, ProxyError::BadAnswer { .. })
            }),
        ] {
            let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
            let p = Proxy::parse("x", "http://p:1").unwrap();
            let server = tokio::spawn(async move {
                let _ = read_head(&mut proxy).await;
                proxy.write_all(answer).await.unwrap();
            });
            let e = tunnel(&mut client, &p, "relay", 443).await.unwrap_err();
            assert!(check(&e), "{e}");
            server.await.unwrap();
        }

        let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
        let p = Proxy::parse("x", "http://p:1").unwrap();
        let flood = tokio::spawn(async move {
            let chunk = [b'a'; 1024];
            while proxy.write_all(&chunk).await.is_ok() {}
        });
        let e = tunnel(&mut client, &p, "relay", 443).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        drop(client);
        flood.await.unwrap();
    }
}
