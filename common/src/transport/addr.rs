//! Where a relay is: `quic://`, `wss://` and `ws://` URLs, and the one `host[:port]` splitter
//! that relay URLs, proxy URLs and request authorities share (IPv6 literals in brackets).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;

/// The WebSocket path of a relay URL that names none.
pub const DEFAULT_PATH: &str = "/v1/tunnel";

/// How a relay is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// The transport.
    pub scheme: Scheme,
    /// Host name or address literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path (WebSocket only; [`DEFAULT_PATH`] unless the URL names one).
    pub path: String,
}

/// The scheme of a [`RelayUrl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `quic://host:port`
    Quic,
    /// `wss://host[:port][/path]`
    Wss,
    /// `ws://host[:port][/path]` (behind a TLS-terminating router)
    Ws,
}

impl Scheme {
    /// The scheme as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Wss => "wss",
            Self::Ws => "ws",
        }
    }

    /// The port a URL of this scheme means when it names none.
    pub fn default_port(self) -> Option<u16> {
        match self {
            Self::Quic => None,
            Self::Wss => Some(443),
            Self::Ws => Some(80),
        }
    }
}

/// A relay URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay url {url:?}: {problem}")]
pub struct UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it.
    pub problem: UrlProblem,
}

/// What is wrong with a relay URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    /// No `scheme://`.
    #[error("expected quic://host:port")]
    NoScheme,
    /// A scheme other than quic, wss and ws.
    #[error("unknown scheme {0:?} (use quic, wss or ws)")]
    UnknownScheme(String),
    /// The host or port does not parse (an IPv6 address needs brackets).
    #[error("bad host or port")]
    HostPort,
    /// `quic://` without a port.
    #[error("quic needs a port")]
    NoPort,
}

impl FromStr for RelayUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |problem| UrlError {
            url: s.to_owned(),
            problem,
        };
        let (scheme, rest) = s.split_once("://").ok_or(fail(UrlProblem::NoScheme))?;
        let scheme = match scheme {
            "quic" => Scheme::Quic,
            "wss" => Scheme::Wss,
            "ws" => Scheme::Ws,
            other => return Err(fail(UrlProblem::UnknownScheme(other.to_owned()))),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, String::new()),
        };
        // A bare IPv6 address would be ambiguous with a port: URLs need the brackets.
        if !authority.starts_with('[') && authority.matches(':').count() > 1 {
            return Err(fail(UrlProblem::HostPort));
        }
        let (host, port) = split_host_port(authority).ok_or(fail(UrlProblem::HostPort))?;
        let port = port
            .or(scheme.default_port())
            .ok_or(fail(UrlProblem::NoPort))?;
        let path = if path.is_empty() && scheme != Scheme::Quic {
            DEFAULT_PATH.to_owned()
        } else {
            path
        };
        Ok(Self {
            scheme,
            host,
            port,
            path,
        })
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            authority(&self.host, self.port),
            self.path
        )
    }
}

impl<'de> Deserialize<'de> for RelayUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl RelayUrl {
    /// Resolves the host to socket addresses.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        Ok(tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect())
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address (no port) into the
/// host (without brackets) and the port, if any. `None` for an empty host, a port that is not a
/// number, or colons that make neither an IPv6 address nor a port.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return (!host.is_empty()).then(|| (host.to_owned(), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p.parse().ok()?)),
        _ => (s, None),
    };
    (!host.is_empty() && (!host.contains(':') || host.parse::<IpAddr>().is_ok()))
        .then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_parse() {
        let u: RelayUrl = "quic://relay.example.com:7443".parse().unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Quic, "relay.example.com", 7443)
        );
        let u: RelayUrl = "wss://r.example.com".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, DEFAULT_PATH));
        let u: RelayUrl = "ws://r.example.com:8080/t".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/t"));
        let u: RelayUrl = "quic://[::1]:9".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.to_string(), "quic://[::1]:9");
        let problem = |s: &str| s.parse::<RelayUrl>().unwrap_err().problem;
        assert_eq!(problem("quic://host"), UrlProblem::NoPort);
        assert_eq!(
            problem("http://host:1"),
            UrlProblem::UnknownScheme("http".into())
        );
        assert_eq!(problem("quic://:1"), UrlProblem::HostPort);
        assert_eq!(problem("quic://::1:9"), UrlProblem::HostPort);
        assert_eq!(problem("relay:7443"), UrlProblem::NoScheme);
        assert_eq!(
            "quic://host".parse::<RelayUrl>().unwrap_err().to_string(),
            "invalid relay url \"quic://host\": quic needs a port"
        );
    }

    #[test]
    fn hosts_and_ports_split() {
        let split = |s: &str| split_host_port(s);
        assert_eq!(split("h"), Some(("h".into(), None)));
        assert_eq!(split("h:1"), Some(("h".into(), Some(1))));
        assert_eq!(split("[::1]"), Some(("::1".into(), None)));
        assert_eq!(split("[::1]:8"), Some(("::1".into(), Some(8))));
        assert_eq!(split("::1"), Some(("::1".into(), None)));
        assert_eq!(split(""), None);
        assert_eq!(split("h:x"), None);
        assert_eq!(split("h:99999"), None);
        assert_eq!(split("[::1]x"), None);
        assert_eq!(split("[]:1"), None);
        assert_eq!(split("a:b:c"), None);
        assert_eq!(authority("::1", 3), "[::1]:3");
        assert_eq!(authority("h", 3), "h:3");
    }
}
