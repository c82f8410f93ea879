//! The YAML shape of `relay.yaml`: what the file may say, before validation. Unknown keys are
//! errors; values a later check must point at keep their line (`Spanned`).

use postern_common::config::{Entries, HumanDuration, Spanned, TlsFiles};
use serde::Deserialize;

use super::{Protocol, TlsTermination};

/// The YAML shape of `relay.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub(super) listen: Listen,
    pub(super) tls: TlsFiles,
    #[serde(default)]
    pub(super) heartbeat_interval: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub(super) handshake_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub(super) first_packet_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub(super) max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) instance: Option<String>,
    #[serde(default)]
    pub(super) agents: Entries<AgentFile>,
    #[serde(default)]
    pub(super) services: Entries<ServiceFile>,
    #[serde(default)]
    pub(super) api: Option<Spanned<ApiFile>>,
    #[serde(default)]
    pub(super) health_listen: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) audit_log: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    pub(super) broker: Option<Spanned<super::broker::BrokerFile>>,
}

/// `api`: who may use `/v0/*`, the dashboard and `/metrics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiFile {
    pub(super) username: Spanned<String>,
    #[serde(default)]
    pub(super) password_file: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    pub(super) password_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Listen {
    #[serde(default)]
    pub(super) quic: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) http: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentFile {
    pub(super) services: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceFile {
    #[serde(default)]
    pub(super) listen: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tls_listen: Option<Spanned<String>>,
    pub(super) clients: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) protocol: Option<Spanned<Protocol>>,
    #[serde(default)]
    pub(super) max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) max_handshakes: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) tls_termination: Option<Spanned<TlsTermination>>,
    #[serde(default)]
    pub(super) allowed_users: Option<Spanned<UsersFile>>,
    #[serde(default)]
    pub(super) client_attribute: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) broker: Option<Spanned<super::broker::PlanFile>>,
}

/// `allowed_users`: a list for every client, or a mapping from client name (or `"*"`) to a list.
#[derive(Debug)]
pub(super) enum UsersFile {
    List(Vec<Spanned<String>>),
    Map(Entries<Vec<Spanned<String>>>),
}

impl<'de> Deserialize<'de> for UsersFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UsersFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a list of MySQL user names, or a mapping from client name to such a list",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(UsersFile::List(out))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                Entries::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(UsersFile::Map)
            }
        }
        d.deserialize_any(Visit)
    }
}
