//! Node settings: the TOML file first, then `SCALABLE_CHAT__<SECTION>__<KEY>`
//! environment overrides, checked once at start-up.
//!
//! Every key is documented here and in `config/default.toml`; a test keeps
//! the two in step. An unknown key, a malformed value or an inconsistent
//! combination stops start-up with a message that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of the environment variables that override file keys.
pub const ENV_PREFIX: &str = "SCALABLE_CHAT__";

/// Why the settings could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("environment variable {var}: expected {ENV_PREFIX}<SECTION>__<KEY>")]
    EnvName { var: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

/// All settings of one node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub node: NodeSettings,
    #[serde(default)]
    pub http: HttpSettings,
    pub auth: AuthSettings,
    #[serde(default)]
    pub limits: Limits,
    /// Cluster mode: these three sections come together or not at all.
    pub redis: Option<RedisSettings>,
    pub kafka: Option<KafkaSettings>,
    pub mongo: Option<MongoSettings>,
}

/// What a node does besides serving clients.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs consumer-group workers that store the Kafka log in MongoDB.
    Persist,
    /// Runs the cluster-wide scheduled jobs (dead-node sweep, cache warming).
    Sweep,
}

/// Redis: sequencing, de-duplication, the recent-history cache, presence
/// and the relay between nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    /// Messages per room kept in the recent-history cache (never dropping
    /// one MongoDB does not hold yet).
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// How long a room remembers the cids it has accepted.
    #[serde(default = "default_cid_ttl")]
    pub cid_ttl_secs: u64,
}

fn default_cache_size() -> usize {
    500
}

fn default_cid_ttl() -> u64 {
    7 * 24 * 3600
}

/// Kafka: the durable log of accepted messages.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    /// Partitions of the topic when the node creates it.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topic when the node creates it.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// How long the producer waits to fill a batch.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// How long a produce may take before the sender gets `unavailable`.
    #[serde(default = "default_message_timeout")]
    pub message_timeout_ms: u64,
    /// Consumer group of the persist workers.
    #[serde(default = "default_group")]
    pub group: String,
    /// Consumer-group workers per node with the persist role.
    #[serde(default = "default_persist_workers")]
    pub persist_workers: usize,
}

fn default_persist_workers() -> usize {
    1
}

fn default_partitions() -> i32 {
    12
}

fn default_replication() -> i32 {
    1
}

fn default_linger() -> u64 {
    2
}

fn default_message_timeout() -> u64 {
    10_000
}

fn default_group() -> String {
    "scalable-chat-persist".into()
}

/// MongoDB: long-term message storage and history.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    pub url: String,
    pub database: String,
    /// Most messages a persist worker writes in one insert.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_batch() -> usize {
    500
}

/// The three services of cluster mode, once checked to be all present.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    pub redis: RedisSettings,
    pub kafka: KafkaSettings,
    pub mongo: MongoSettings,
}

/// Identity and local storage of this node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Unique per node; shown to clients in `welcome` and used in logs.
    pub id: String,
    /// Where the embedded store keeps its database file.
    pub data_dir: PathBuf,
    /// Extra jobs this node takes on in cluster mode.
    pub roles: Vec<Role>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            id: "node-1".into(),
            data_dir: PathBuf::from("./data/node-1"),
            roles: vec![Role::Persist, Role::Sweep],
        }
    }
}

/// The HTTP listener and what browsers may connect.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address and port to listen on.
    pub bind: SocketAddr,
    /// Origins allowed to open a WebSocket; a request without `Origin` is
    /// allowed (it does not come from a browser page).
    pub allowed_origins: Vec<String>,
    /// The built web client, served at `/` when the folder exists.
    pub static_dir: PathBuf,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Seconds a draining node waits for in-flight messages before it exits.
    pub shutdown_timeout_secs: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allowed_origins: vec![
                "http://127.0.0.1:8080".into(),
                "http://localhost:8080".into(),
            ],
            static_dir: PathBuf::from("frontend/dist"),
            workers: 0,
            shutdown_timeout_secs: 20,
        }
    }
}

/// Guest tokens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// HMAC key of the tokens; the same on every node of a cluster.
    pub secret: String,
    /// How long a guest token stays valid.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
}

fn default_token_ttl() -> u64 {
    7 * 24 * 3600
}

/// Limits that protect the node and every client from any one client.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket message, in bytes, after joining continuation
    /// frames; larger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Longest message text, in Unicode characters.
    pub max_text_chars: usize,
    /// Frames a connection may send per second (token bucket refill).
    pub rate_per_sec: f64,
    /// Frames a connection may send in a burst (token bucket size).
    pub rate_burst: u32,
    /// The node pings each connection this often.
    pub heartbeat_interval_secs: u64,
    /// A connection silent this long is closed.
    pub client_timeout_secs: u64,
    /// Outbound bytes queued for one connection above which typing and
    /// presence frames to it are dropped.
    pub outbound_soft_bytes: usize,
    /// Outbound bytes queued for one connection above which it is closed
    /// (a reader this slow would hold the node's memory hostage).
    pub outbound_hard_bytes: usize,
    /// Rooms one connection may have joined at once.
    pub max_rooms_per_session: usize,
    /// Frames one user may send per second over all of their connections
    /// to this node, and over the REST API (token bucket refill).
    pub user_rate_per_sec: f64,
    /// Frames one user may send in a burst (token bucket size).
    pub user_rate_burst: u32,
    /// WebSocket connections open at once from one client address (one
    /// IPv4 address, or one IPv6 /64); more are refused with 429.
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_text_chars: 4000,
            rate_per_sec: 20.0,
            rate_burst: 40,
            heartbeat_interval_secs: 10,
            client_timeout_secs: 30,
            outbound_soft_bytes: 256 * 1024,
            outbound_hard_bytes: 1024 * 1024,
            max_rooms_per_session: 100,
            user_rate_per_sec: 30.0,
            user_rate_burst: 60,
            max_connections_per_address: 256,
        }
    }
}

impl Settings {
    /// Loads the file, applies the environment overrides in `env` and checks
    /// the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), env)
    }

    /// Like [`Settings::load`], from the text of a file named `origin`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.to_string(),
                    message: e.message().to_string(),
                })?;
        // Overrides read as TOML but not as strings: if one of them is where
        // a string belongs, it is retried as the plain string it also is.
        let mut retypable: Vec<(String, String, String)> = Vec::new();
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let mut parts = rest.split("__");
            let (Some(section), Some(key), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(ConfigError::EnvName { var });
            };
            if section.is_empty() || key.is_empty() {
                return Err(ConfigError::EnvName { var });
            }
            let section = section.to_ascii_lowercase();
            let key = key.to_ascii_lowercase();
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section_table) = entry else {
                return Err(ConfigError::Key {
                    key: section,
                    message: "must be a table".into(),
                });
            };
            let value = env_value(&raw);
            if !value.is_str() {
                retypable.push((section.clone(), key.clone(), raw.clone()));
            }
            section_table.insert(key, value);
        }
        let settings: Settings = loop {
            match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(s) => break s,
                Err(e) => {
                    let path = e.path().to_string();
                    let found = retypable
                        .iter()
                        .position(|(sec, key, _)| path == format!("{sec}.{key}"));
                    let Some(i) = found else {
                        return Err(ConfigError::Key {
                            key: path,
                            message: e.inner().message().to_string(),
                        });
                    };
                    let (sec, key, raw) = retypable.swap_remove(i);
                    if let Some(toml::Value::Table(t)) = table.get_mut(&sec) {
                        t.insert(key, toml::Value::String(raw));
                    }
                }
            }
        };
        settings.check()?;
        Ok(settings)
    }

    /// Checks what the types alone cannot.
    fn check(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.node.id.is_empty() || self.node.id.len() > 64 {
            return fail("node.id", "must be 1-64 characters");
        }
        if self.auth.secret.len() < 16 {
            return fail("auth.secret", "must be at least 16 bytes");
        }
        if self.auth.token_ttl_secs == 0 {
            return fail("auth.token_ttl_secs", "must be positive");
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return fail("limits.max_frame_bytes", "must be at least 1024");
        }
        if l.max_text_chars == 0 {
            return fail("limits.max_text_chars", "must be positive");
        }
        if !(l.rate_per_sec.is_finite() && l.rate_per_sec > 0.0) {
            return fail("limits.rate_per_sec", "must be a positive number");
        }
        if l.rate_burst == 0 {
            return fail("limits.rate_burst", "must be positive");
        }
        if l.heartbeat_interval_secs == 0 {
            return fail("limits.heartbeat_interval_secs", "must be positive");
        }
        if l.client_timeout_secs <= l.heartbeat_interval_secs {
            return fail(
                "limits.client_timeout_secs",
                "must be longer than limits.heartbeat_interval_secs",
            );
        }
        if l.outbound_soft_bytes == 0 || l.outbound_hard_bytes <= l.outbound_soft_bytes {
            return fail(
                "limits.outbound_hard_bytes",
                "must be larger than limits.outbound_soft_bytes, which must be positive",
            );
        }
        if l.max_rooms_per_session == 0 {
            return fail("limits.max_rooms_per_session", "must be positive");
        }
        if !(l.user_rate_per_sec.is_finite() && l.user_rate_per_sec > 0.0) {
            return fail("limits.user_rate_per_sec", "must be a positive number");
        }
        if l.user_rate_burst == 0 {
            return fail("limits.user_rate_burst", "must be positive");
        }
        if l.max_connections_per_address == 0 {
            return fail("limits.max_connections_per_address", "must be positive");
        }
        let present = [
            ("redis", self.redis.is_some()),
            ("kafka", self.kafka.is_some()),
            ("mongo", self.mongo.is_some()),
        ];
        if present.iter().any(|(_, p)| *p) {
            if let Some((missing, _)) = present.iter().find(|(_, p)| !*p) {
                return fail(
                    missing,
                    "cluster mode needs the [redis], [kafka] and [mongo] sections together",
                );
            }
        }
        if let Some(k) = &self.kafka {
            if k.partitions < 1 {
                return fail("kafka.partitions", "must be positive");
            }
            if k.topic.is_empty() {
                return fail("kafka.topic", "must not be empty");
            }
            if k.persist_workers == 0 {
                return fail("kafka.persist_workers", "must be positive");
            }
            if k.message_timeout_ms == 0 {
                return fail("kafka.message_timeout_ms", "must be positive");
            }
            if k.replication_factor < 1 {
                return fail("kafka.replication_factor", "must be positive");
            }
        }
        if let Some(r) = &self.redis {
            if r.cache_size == 0 {
                return fail("redis.cache_size", "must be positive");
            }
            if r.cid_ttl_secs == 0 {
                return fail("redis.cid_ttl_secs", "must be positive");
            }
        }
        if let Some(m) = &self.mongo {
            if m.batch_size == 0 {
                return fail("mongo.batch_size", "must be positive");
            }
        }
        Ok(())
    }

    /// The cluster services, or `None` in standalone mode.
    pub fn cluster(&self) -> Option<ClusterSettings> {
        Some(ClusterSettings {
            redis: self.redis.clone()?,
            kafka: self.kafka.clone()?,
            mongo: self.mongo.clone()?,
        })
    }
}

/// An environment value is read as a TOML value when it is one (numbers,
/// booleans, arrays), else taken as a plain string.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = "[auth]\nsecret = \"0123456789abcdef0123\"\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_default_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config/default.toml");
        let s = Settings::parse(text, "default.toml", Vec::new()).unwrap();
        assert_eq!(s.node, NodeSettings::default());
        assert_eq!(s.http, HttpSettings::default());
        assert_eq!(s.limits, Limits::default());
        assert_eq!(s.auth.token_ttl_secs, default_token_ttl());
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = Settings::parse(
            MINIMAL,
            "t",
            env(&[
                ("SCALABLE_CHAT__HTTP__BIND", "0.0.0.0:9000"),
                ("SCALABLE_CHAT__LIMITS__RATE_BURST", "7"),
                ("SCALABLE_CHAT__NODE__ID", "7"),
                ("SCALABLE_CHAT__HTTP__ALLOWED_ORIGINS", "[\"http://a\"]"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(s.limits.rate_burst, 7);
        assert_eq!(s.node.id, "7");
        assert_eq!(s.http.allowed_origins, vec!["http://a".to_string()]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Settings::parse(&format!("{MINIMAL}[limits]\nfoo = 1\n"), "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo"), "{e}");
    }

    #[test]
    fn malformed_value_is_named() {
        let e = Settings::parse(&format!("{MINIMAL}[http]\nbind = 5\n"), "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.bind"), "{e}");
        let e = Settings::parse(
            MINIMAL,
            "t",
            env(&[("SCALABLE_CHAT__LIMITS__MAX_TEXT_CHARS", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.max_text_chars"), "{e}");
    }

    #[test]
    fn missing_or_short_secret_is_refused() {
        let e = Settings::parse("", "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth"), "{e}");
        let e = Settings::parse("[auth]\nsecret = \"short\"\n", "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.secret"), "{e}");
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let e = Settings::parse(
            &format!("{MINIMAL}[limits]\nheartbeat_interval_secs = 30\nclient_timeout_secs = 10\n"),
            "t",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.client_timeout_secs"), "{e}");
    }

    #[test]
    fn per_user_and_per_address_limits_must_be_positive() {
        for (key, value) in [
            ("user_rate_per_sec", "0.0"),
            ("user_rate_per_sec", "nan"),
            ("user_rate_per_sec", "-1.0"),
            ("user_rate_burst", "0"),
            ("max_connections_per_address", "0"),
        ] {
            let e = Settings::parse(
                &format!("{MINIMAL}[limits]\n{key} = {value}\n"),
                "t",
                Vec::new(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("limits.{key}")), "{key} = {value}: {e}");
        }
    }

    #[test]
    fn half_configured_cluster_names_the_missing_section() {
        let text = format!(
            "{MINIMAL}[redis]\nurl = \"redis://127.0.0.1\"\n[kafka]\nbrokers = \"b\"\ntopic = \"t\"\n"
        );
        let e = Settings::parse(&text, "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mongo`"), "{e}");
        let full = format!("{text}[mongo]\nurl = \"mongodb://x\"\ndatabase = \"d\"\n");
        let s = Settings::parse(&full, "t", Vec::new()).unwrap();
        let c = s.cluster().unwrap();
        assert_eq!(c.kafka.partitions, 12);
        assert_eq!(c.redis.cache_size, 500);
    }

    #[test]
    fn shipped_cluster_configs_parse() {
        for text in [
            include_str!("../config/node-1.toml"),
            include_str!("../config/node-2.toml"),
            include_str!("../config/node-3.toml"),
        ] {
            let s = Settings::parse(text, "node", Vec::new()).unwrap();
            assert!(s.cluster().is_some());
        }
    }

    #[test]
    fn badly_named_environment_variable_is_refused() {
        let e = Settings::parse(MINIMAL, "t", env(&[("SCALABLE_CHAT__BIND", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SCALABLE_CHAT__BIND"), "{e}");
    }
}
