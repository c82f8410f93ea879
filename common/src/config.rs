//! Config plumbing shared by the agent and the relay: strict YAML loading with errors that name
//! the file, line and key; human durations; the TLS file triple.
//!
//! Each binary's config is two types: the YAML shape (`deny_unknown_fields`, `Spanned` where a
//! later check must point at a line) and the validated runtime type built from it. Validation
//! collects every problem before failing, so one run of `check-config` lists them all.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
pub use serde_saphyr::Spanned;

use crate::tls::Material;

/// The exit status for a bad config or command line (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// The key, when known (a dotted path or the last key).
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors about one file while it is validated.
pub struct Check<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl<'a> Check<'a> {
    /// Starts checking `file`.
    pub fn new(file: &'a Path) -> Self {
        Self {
            file,
            errors: Vec::new(),
        }
    }

    /// Records a problem at `line` with `key`.
    pub fn error(&mut self, line: Option<u32>, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            key: Some(key.to_owned()),
            message: message.into(),
        });
    }

    /// Records a problem at the place `value` came from.
    pub fn at<T>(&mut self, value: &Spanned<T>, key: &str, message: impl Into<String>) {
        self.error(line_of(value), key, message);
    }

    /// Checks that a file named in the config can be read.
    pub fn file_exists(&mut self, path: &Spanned<PathBuf>, key: &str) {
        if let Err(e) = std::fs::metadata(&path.value) {
            self.at(
                path,
                key,
                format!("cannot read {}: {e}", path.value.display()),
            );
        }
    }

    /// Loads the TLS triple, recording errors against the keys that named the files.
    pub fn tls(&mut self, tls: &TlsFiles, key: &str) -> Option<Material> {
        let before = self.errors.len();
        self.file_exists(&tls.ca, &format!("{key}.ca"));
        self.file_exists(&tls.cert, &format!("{key}.cert"));
        self.file_exists(&tls.key, &format!("{key}.key"));
        if let Some(crl) = &tls.crl {
            self.file_exists(crl, &format!("{key}.crl"));
        }
        if self.errors.len() > before {
            return None;
        }
        let material = match Material::load(&tls.ca.value, &tls.cert.value, &tls.key.value) {
            Ok(m) => m,
            Err(e) => {
                self.at(&tls.cert, key, e.to_string());
                return None;
            }
        };
        match &tls.crl {
            None => Some(material),
            Some(crl) => match material.with_crl_file(&crl.value) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.at(crl, &format!("{key}.crl"), e.to_string());
                    None
                }
            },
        }
    }

    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// Ends the check: `Ok(value)` if nothing was recorded.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// Ends a check that cannot build its value. Callers reach this only after recording an
    /// error; should one forget, the file is still refused with a message that says so, rather
    /// than a panic.
    pub fn fail(mut self) -> ConfigErrors {
        if self.errors.is_empty() {
            self.error(None, "", "invalid configuration (no detail recorded)");
        }
        ConfigErrors(self.errors)
    }

    /// A duration setting: `default` when absent, an error naming its line and key when outside
    /// `range` (every duration is bounded, so no later arithmetic on it can overflow).
    pub fn duration(
        &mut self,
        value: Option<&Spanned<HumanDuration>>,
        key: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Duration {
        let Some(v) = value else { return default };
        if range.contains(&v.value.0) {
            v.value.0
        } else {
            self.at(
                v,
                key,
                format!(
                    "{} is out of range: use a value from {} to {}",
                    v.value,
                    HumanDuration(*range.start()),
                    HumanDuration(*range.end())
                ),
            );
            default
        }
    }
}

/// Where configuration reads the process environment: [`ProcessEnv`] in the binaries, a map in
/// tests (which share one process and must not change its environment). Every variable a config
/// looks at (`${PORT}` in addresses, Cloud Foundry's `VCAP_APPLICATION`, proxy settings) is read
/// through this, and only while the config is loaded.
pub trait Env {
    /// The value of variable `name`, if it is set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<K: std::borrow::Borrow<str> + Ord, V: AsRef<str>> Env for std::collections::BTreeMap<K, V> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| v.as_ref().to_owned())
    }
}

/// A `${NAME}` whose variable is not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {0} is not set")]
pub struct UnsetVar(pub String);

/// Replaces `${NAME}` in `text` with the variable's value from `env`. Text without `${` is
/// returned as it is.
pub fn expand_env(text: &str, env: &dyn Env) -> Result<String, UnsetVar> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &rest[start + 2..start + end];
        out.push_str(&env.var(name).ok_or_else(|| UnsetVar(name.to_owned()))?);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The line a spanned value came from.
pub fn line_of<T>(value: &Spanned<T>) -> Option<u32> {
    let line = value.referenced.line();
    (line > 0).then_some(line as u32)
}

/// Reads and parses a YAML file strictly (unknown keys, duplicate keys and wrong types are
/// errors). Relative paths inside the file are the caller's business.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    parse_yaml(path, &text)
}

/// Parses YAML text that came from `path`.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_saphyr::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line() as u32).filter(|l| *l > 0);
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default();
        // "error: line 5 column 3: unknown field ..." -> "unknown field ..."
        let message = first
            .strip_prefix("error: ")
            .unwrap_or(first)
            .split_once(": ")
            .filter(|(loc, _)| loc.starts_with("line "))
            .map(|(_, m)| m)
            .unwrap_or(first)
            .to_owned();
        let key = line.and_then(|l| key_on_line(text, l)).or_else(|| {
            // "unknown field `x`" names the key itself.
            message
                .split('`')
                .nth(1)
                .filter(|_| message.contains("field"))
                .map(str::to_owned)
        });
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line,
            key,
            message,
        }])
    })
}

/// The mapping key written on `line` (1-based), if the line is `key: ...`.
fn key_on_line(text: &str, line: u32) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let l = l.trim_start().trim_start_matches("- ");
    let (key, _) = l.split_once(':')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.contains(' ')).then(|| key.to_owned())
}

/// A YAML mapping whose keys remember their line, in file order.
#[derive(Debug, Clone)]
pub struct Entries<V>(pub Vec<(Spanned<String>, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> Entries<V> {
    /// Iterates over the entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = &(Spanned<String>, V)> {
        self.0.iter()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Spanned<String>, V>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The three PEM files of one side's TLS identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate that peers must chain to.
    pub ca: Spanned<PathBuf>,
    /// This side's certificate.
    pub cert: Spanned<PathBuf>,
    /// This side's private key.
    pub key: Spanned<PathBuf>,
    /// A revocation list (PEM, from `postern-relay certs revoke`): peers listed in it are refused.
    #[serde(default)]
    pub crl: Option<Spanned<PathBuf>>,
}

impl TlsFiles {
    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .chain(self.crl.as_mut())
        {
            if p.value.is_relative() {
                p.value = base.join(&p.value);
            }
        }
    }
}

/// A duration written as `500ms`, `10s`, `5m`, `1h`, `2d` (or a bare number of seconds), at most
/// [`HumanDuration::MAX`]; each setting also has its own range ([`Check::duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A duration that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number with a known unit.
    #[error("invalid duration {0:?}: use e.g. 500ms, 10s, 5m, 1h")]
    Invalid(String),
    /// Longer than [`HumanDuration::MAX`].
    #[error("duration {0:?} is too long (at most 365d)")]
    TooLong(String),
}

impl HumanDuration {
    /// The longest duration any setting accepts.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let (secs, ms) = (d.as_secs(), d.subsec_millis());
        if ms != 0 || secs == 0 {
            write!(f, "{}ms", d.as_millis())
        } else if secs % 86_400 == 0 {
            write!(f, "{}d", secs / 86_400)
        } else if secs % 3600 == 0 {
            write!(f, "{}h", secs / 3600)
        } else if secs % 60 == 0 {
            write!(f, "{}m", secs / 60)
        } else {
            write!(f, "{secs}s")
        }
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || DurationError::Invalid(s.to_owned());
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| {
            if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) {
                DurationError::TooLong(s.to_owned())
            } else {
                invalid()
            }
        })?;
        let millis_per_unit: u64 = match unit.trim() {
            "ms" => 1,
            "" | "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let d = n
            .checked_mul(millis_per_unit)
            .map(Duration::from_millis)
            .filter(|d| *d <= Self::MAX)
            .ok_or_else(|| DurationError::TooLong(s.to_owned()))?;
        Ok(Self(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Str(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: String,
        port: Option<u16>,
        timeout: Option<HumanDuration>,
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("x.yaml");
        let e = parse_yaml::<Sample>(p, "listen: a\nbogus: 1\n").unwrap_err();
        assert_eq!(e.0[0].line, Some(2));
        assert_eq!(e.0[0].key.as_deref(), Some("bogus"));
        assert!(
            e.to_string()
                .contains("x.yaml:2: key `bogus`: unknown field"),
            "{e}"
        );

        let e = parse_yaml::<Sample>(p, "listen: a\nport: abc\n").unwrap_err();
        assert_eq!(
            (e.0[0].line, e.0[0].key.as_deref()),
            (Some(2), Some("port"))
        );

        let e = parse_yaml::<Sample>(p, "listen: a\ntimeout: 5 parsecs\n").unwrap_err();
        assert_eq!(e.0[0].key.as_deref(), Some("timeout"));
        assert!(e.0[0].message.contains("invalid duration"), "{e}");

        let e = parse_yaml::<Sample>(p, "listen: [a\n").unwrap_err();
        assert!(e.0[0].line.is_some());

        let e = parse_yaml::<Sample>(p, "listen: a\nlisten: b\n").unwrap_err();
        assert!(e.0[0].message.contains("duplicate"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "2m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(120)
        );
        assert!("2 weeks".parse::<HumanDuration>().is_err());
        assert!("".parse::<HumanDuration>().is_err());
        assert_eq!(
            "3d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(3 * 86_400)
        );
    }

    #[test]
    fn huge_durations_are_refused_not_overflowed() {
        for s in [
            "100000000000h",
            "18446744073709551615",
            "18446744073709551616s",
            "99999999999999999999ms",
            "366d",
        ] {
            assert!(
                matches!(s.parse::<HumanDuration>(), Err(DurationError::TooLong(_))),
                "{s}"
            );
        }
        assert_eq!(
            "365d".parse::<HumanDuration>().unwrap().0,
            HumanDuration::MAX
        );
        let p = Path::new("x.yaml");
        let e = parse_yaml::<Sample>(p, "listen: a\ntimeout: 100000000000h\n").unwrap_err();
        assert_eq!(e.0[0].key.as_deref(), Some("timeout"));
        assert!(e.0[0].message.contains("too long"), "{e}");
        let e = parse_yaml::<Sample>(p, "listen: a\ntimeout: 18446744073709551615\n").unwrap_err();
        assert!(e.0[0].message.contains("too long"), "{e}");
    }

    #[test]
    fn settings_have_ranges_and_durations_print_as_written() {
        let p = Path::new("x.yaml");
        let mut check = Check::new(p);
        let v: Spanned<HumanDuration> = serde_saphyr::from_str("2h").unwrap();
        let range = Duration::from_millis(100)..=Duration::from_secs(3600);
        let got = check.duration(
            Some(&v),
            "heartbeat_interval",
            Duration::from_secs(10),
            range,
        );
        assert_eq!(got, Duration::from_secs(10), "the default stands in");
        let e = check.fail();
        assert_eq!(e.0[0].key.as_deref(), Some("heartbeat_interval"));
        assert!(
            e.0[0]
                .message
                .contains("2h is out of range: use a value from 100ms to 1h"),
            "{e}"
        );
        assert!(
            Check::new(p).fail().0.len() == 1,
            "a failed check always says something"
        );
    }

    #[test]
    fn environment_expansion_reads_the_given_env() {
        let env = std::collections::BTreeMap::from([("PORT", "8080")]);
        assert_eq!(expand_env("0.0.0.0:${PORT}", &env).unwrap(), "0.0.0.0:8080");
        assert_eq!(expand_env("plain", &env).unwrap(), "plain");
        assert_eq!(
            expand_env("${NOPE}:1", &env).unwrap_err(),
            UnsetVar("NOPE".into())
        );
    }
}
