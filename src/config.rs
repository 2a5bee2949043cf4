//! Node settings: the TOML file first, then `SCALABLE_CHAT__<SECTION>__<KEY>`
//! environment overrides, checked once at start-up.
//!
//! Every key is documented here and in `config/default.toml`; a test keeps
//! the two in step. An unknown key, a malformed value or an inconsistent
//! combination stops start-up with a message that names the key.

use std::collections::BTreeMap;
use std::fmt;
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
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// The Redis server; with `cluster`, one seed node of the Redis Cluster.
    /// `rediss://` for TLS; credentials as `redis://user:password@host`.
    pub url: String,
    /// A Redis Cluster: follow `MOVED`/`ASK`, and relay each room over
    /// sharded pub/sub on a channel in the room's slot, so a message touches
    /// one shard.
    #[serde(default)]
    pub cluster: bool,
    /// More seed nodes of the Redis Cluster, tried when `url` does not
    /// answer at start-up.
    #[serde(default)]
    pub urls: Vec<String>,
    /// With `rediss://`: a PEM file of the certificate authority to trust
    /// instead of the system's roots (a private CA, or a self-signed one).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Messages per room kept in the recent-history cache (never dropping
    /// one MongoDB does not hold yet).
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// How long a room remembers the cids it has accepted.
    #[serde(default = "default_cid_ttl")]
    pub cid_ttl_secs: u64,
    /// A room with no new message for this long leaves Redis entirely
    /// (seq, cache, cids, watermarks); its next message seeds it again from
    /// what is durable.
    #[serde(default = "default_room_idle_ttl")]
    pub room_idle_ttl_secs: u64,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("cluster", &self.cluster)
            .field("urls", &urls)
            .field("ca_file", &self.ca_file)
            .field("cache_size", &self.cache_size)
            .field("cid_ttl_secs", &self.cid_ttl_secs)
            .field("room_idle_ttl_secs", &self.room_idle_ttl_secs)
            .finish()
    }
}

fn default_cache_size() -> usize {
    500
}

fn default_cid_ttl() -> u64 {
    7 * 24 * 3600
}

fn default_room_idle_ttl() -> u64 {
    30 * 24 * 3600
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
    /// Start even when the topic could lose an acked message (replication
    /// factor 1, `min.insync.replicas` below 2, unclean leader election):
    /// for a single development broker only.
    #[serde(default)]
    pub allow_unsafe_durability: bool,
    /// librdkafka properties given to every Kafka client of the node
    /// (`[kafka.client]`): security, SASL, TLS, timeouts.
    #[serde(default)]
    pub client: KafkaClientProperties,
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
    3
}

/// The librdkafka properties of `[kafka.client]`, for example
/// `"security.protocol" = "SASL_SSL"`. Values may be secrets (passwords,
/// keys), so `Debug` shows the keys only, and no message of the node
/// quotes a value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaClientProperties(BTreeMap<String, String>);

impl KafkaClientProperties {
    /// The properties, as librdkafka takes them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<const N: usize> From<[(&str, &str); N]> for KafkaClientProperties {
    fn from(pairs: [(&str, &str); N]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl fmt::Debug for KafkaClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted;
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted)))
            .finish()
    }
}

impl<'de> Deserialize<'de> for KafkaClientProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, PropertyValue>::deserialize(deserializer)?;
        Ok(Self(map.into_iter().map(|(k, v)| (k, v.0)).collect()))
    }
}

/// A librdkafka property value: librdkafka takes strings, and TOML numbers
/// and booleans are written as it expects them. Errors never quote it.
struct PropertyValue(String);

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PropertyValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, integer, float or boolean")
            }
            fn visit_str<E>(self, v: &str) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// librdkafka properties the node sets itself because the log's guarantees
/// rest on them, with their librdkafka aliases, and what sets them instead.
/// `[kafka.client]` may not name them: a value there would be overridden,
/// or would break an ack or the persist workers' offsets.
pub const KAFKA_NODE_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("metadata.broker.list", "kafka.brokers"),
    ("group.id", "kafka.group"),
    ("linger.ms", "kafka.linger_ms"),
    ("queue.buffering.max.ms", "kafka.linger_ms"),
    ("message.timeout.ms", "kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "kafka.message_timeout_ms"),
    ("enable.idempotence", "the node (always true)"),
    ("acks", "the node (always all)"),
    ("request.required.acks", "the node (always all)"),
    (
        "transactional.id",
        "the node (the producer is not transactional)",
    ),
    (
        "enable.auto.commit",
        "the node (offsets are committed once stored)",
    ),
    (
        "auto.commit.enable",
        "the node (offsets are committed once stored)",
    ),
    (
        "enable.auto.offset.store",
        "the node (offsets are committed once stored)",
    ),
    ("auto.offset.reset", "the node (always earliest)"),
    ("enable.partition.eof", "the node"),
    (
        "partition.assignment.strategy",
        "the node (cooperative-sticky)",
    ),
    (
        "group.protocol",
        "the node (classic, with cooperative-sticky)",
    ),
    ("session.timeout.ms", "the node"),
    ("client.id", "the node"),
    ("socket.nagle.disable", "the node"),
];

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
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    /// `mongodb://` or `mongodb+srv://` URL. It may carry a password and
    /// TLS options, so it is printed only through [`redact_url`] (the
    /// `Debug` output does that too).
    pub url: String,
    pub database: String,
    /// Most messages a persist worker writes in one insert.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// How many replica set members must have a write before MongoDB
    /// acknowledges it (`w`).
    #[serde(default)]
    pub write_concern: WriteConcern,
    /// Whether an acknowledged write must also be in the on-disk journal
    /// of those members (`j`).
    #[serde(default = "default_journal")]
    pub journal: bool,
}

impl MongoSettings {
    /// `url` and `database` with every other key at its default.
    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: database.into(),
            batch_size: default_batch(),
            write_concern: WriteConcern::default(),
            journal: default_journal(),
        }
    }
}

impl std::fmt::Debug for MongoSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoSettings")
            .field("url", &redact_url(&self.url))
            .field("database", &self.database)
            .field("batch_size", &self.batch_size)
            .field("write_concern", &self.write_concern)
            .field("journal", &self.journal)
            .finish()
    }
}

fn default_batch() -> usize {
    500
}

fn default_journal() -> bool {
    true
}

/// Largest `mongo.write_concern` number: a replica set has at most 50
/// members, and a write waiting for more would never be acknowledged.
pub const MAX_WRITE_MEMBERS: u32 = 50;

/// `mongo.write_concern`: `"majority"` (the default), or a number of
/// members from 1 to [`MAX_WRITE_MEMBERS`]. Anything else, 0 (a write
/// nobody acknowledges) included, is refused at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteConcern {
    /// A majority of the voting members: what survives a failover.
    #[default]
    Majority,
    /// This many members, the primary included.
    Members(u32),
}

impl WriteConcern {
    fn members<E: serde::de::Error>(n: i128) -> Result<Self, E> {
        match u32::try_from(n) {
            Ok(n @ 1..=MAX_WRITE_MEMBERS) => Ok(Self::Members(n)),
            _ => Err(E::custom(format!(
                "{n} members: must be \"majority\" or a number of members from 1 to {MAX_WRITE_MEMBERS}"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for WriteConcern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WriteConcern;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "\"majority\" or a number of members from 1 to {MAX_WRITE_MEMBERS}"
                )
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<WriteConcern, E> {
                WriteConcern::members(i128::from(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<WriteConcern, E> {
                WriteConcern::members(i128::from(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<WriteConcern, E> {
                if s == "majority" {
                    return Ok(WriteConcern::Majority);
                }
                // An environment override "0" that failed as a number is
                // retried as a string: give it the same answer.
                match s.parse::<i128>() {
                    Ok(n) => WriteConcern::members(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What stands in for a secret in anything printed.
pub const REDACTED: &str = "***";

/// `url` fit to print: the password of its user info and the values of
/// query options that carry secrets (`…password…`, `…secret…`,
/// `…token…`, `authMechanismProperties`) become `***`. For service URLs of
/// any scheme (`mongodb://`, `mongodb+srv://`, `redis://`, `rediss://`)
/// and for lists without a scheme (Kafka's `host:port,host:port`). A user
/// info without `:` is hidden whole, since some clients read it as a
/// password. The user info is taken to end at the last `@`, so that a
/// password with unencoded `@`, `/` or `?` is still hidden whole; a `@`
/// in the query therefore hides everything before it too.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut from = 0;
    for span in secret_spans(url) {
        out.push_str(&url[from..span.start]);
        out.push_str(REDACTED);
        from = span.end;
    }
    out.push_str(&url[from..]);
    out
}

/// `text` (an error message, say) with `url` replaced by
/// [`redact_url`]`(url)`, and every secret of `url`, as written and
/// percent-decoded, replaced by `***` wherever else it appears.
pub fn redact_secrets(text: &str, url: &str) -> String {
    let mut out = if url.is_empty() {
        text.to_string()
    } else {
        text.replace(url, &redact_url(url))
    };
    let mut secrets: Vec<String> = Vec::new();
    for span in secret_spans(url) {
        let raw = &url[span];
        secrets.push(raw.to_string());
        secrets.push(percent_decode(raw));
    }
    // Longest first, so a secret that contains another goes whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), REDACTED);
    }
    out
}

/// Byte ranges of `url` that hold secrets, in order, not overlapping.
fn secret_spans(url: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    // The user info ends at the last `@`: an unencoded password may hold
    // `@`, `/` or `?`, and hiding too much beats showing a secret.
    let mut after_userinfo = start;
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        let secret = match userinfo.find(':') {
            Some(colon) => start + colon + 1..start + at,
            None => start..start + at,
        };
        if !secret.is_empty() {
            spans.push(secret);
        }
        after_userinfo = start + at + 1;
    }
    let Some(q) = url[after_userinfo..].find('?') else {
        return spans;
    };
    let query_start = after_userinfo + q + 1;
    let query_end = url[query_start..]
        .find('#')
        .map_or(url.len(), |i| query_start + i);
    let mut offset = query_start;
    for option in url[query_start..query_end].split(['&', ';']) {
        if let Some((key, value)) = option.split_once('=') {
            if is_secret_option(key) && !value.is_empty() {
                let value_start = offset + key.len() + 1;
                spans.push(value_start..value_start + value.len());
            }
        }
        offset += option.len() + 1;
    }
    spans
}

/// Whether a URL query option carries a secret.
fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
        || key == "authmechanismproperties"
}

/// `%XX` sequences decoded (invalid UTF-8 replaced), everything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    /// A second listener that serves `/metrics` alone; when set, the main
    /// listener does not serve `/metrics`.
    pub metrics_bind: Option<SocketAddr>,
}

impl HttpSettings {
    /// Whether every listener of the node is on a loopback address, so
    /// that only this machine can reach it.
    pub fn loopback_only(&self) -> bool {
        self.bind.ip().is_loopback() && self.metrics_bind.is_none_or(|m| m.ip().is_loopback())
    }
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
            metrics_bind: None,
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
    /// The least time between two fan-outs of one room's messages, in
    /// milliseconds: a message after a quiet spell goes out at once, and
    /// those that follow within this time go out together, in one write to
    /// each member. 0: no window; a fan-out goes as soon as the room has
    /// taken the messages already waiting for it.
    pub fanout_window_ms: u64,
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
    /// What a `ping` frame, or a WebSocket ping, costs of the connection's
    /// bucket (every other frame costs one token).
    pub ping_cost: f64,
    /// A user's `typing` in one room is relayed at most once per this many
    /// milliseconds; more often is dropped silently.
    pub typing_interval_ms: u64,
    /// Tokens of the user's bucket that opening a new room costs (on top of
    /// the frame's own token).
    pub room_create_cost: u32,
    /// New rooms one user may open per hour (a token bucket of this size,
    /// refilled over the hour).
    pub new_rooms_per_hour: u32,
    /// REST requests per second from one client address, and burst size.
    pub address_rate_per_sec: f64,
    pub address_rate_burst: u32,
    /// Guest sign-ins per second from one client address, and burst size.
    pub signin_rate_per_sec: f64,
    pub signin_rate_burst: u32,
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
            fanout_window_ms: 10,
            max_rooms_per_session: 100,
            user_rate_per_sec: 30.0,
            user_rate_burst: 60,
            max_connections_per_address: 256,
            ping_cost: 0.25,
            typing_interval_ms: 3000,
            room_create_cost: 10,
            new_rooms_per_hour: 30,
            address_rate_per_sec: 10.0,
            address_rate_burst: 60,
            signin_rate_per_sec: 0.2,
            signin_rate_burst: 10,
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
                        // Serde's messages quote the value, and those of
                        // [kafka.client] may be secrets.
                        let message = if path.starts_with("kafka.client") {
                            "must be a table of librdkafka properties, each a string, integer, float or boolean".into()
                        } else {
                            e.inner().message().to_string()
                        };
                        return Err(ConfigError::Key { key: path, message });
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
        if let Some(why) = weak_secret(&self.auth.secret) {
            if self.auth.secret.len() < 16 || !self.http.loopback_only() {
                return fail(
                    "auth.secret",
                    &format!(
                        "{why}: anyone who knows it can sign in as any user. A node that \
                         listens beyond loopback needs a random secret of at least \
                         {MIN_SECRET_BYTES} bytes, the same on every node, e.g. from \
                         `openssl rand -base64 48`"
                    ),
                );
            }
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
        if l.fanout_window_ms > 1000 {
            return fail("limits.fanout_window_ms", "must be at most 1000");
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
        if !(l.ping_cost.is_finite() && l.ping_cost > 0.0 && l.ping_cost <= 1.0) {
            return fail("limits.ping_cost", "must be a number above 0 and at most 1");
        }
        if l.new_rooms_per_hour == 0 {
            return fail("limits.new_rooms_per_hour", "must be positive");
        }
        if u64::from(l.room_create_cost) > u64::from(l.user_rate_burst) {
            return fail(
                "limits.room_create_cost",
                "must be at most limits.user_rate_burst",
            );
        }
        for (key, rate, burst) in [
            ("address_rate", l.address_rate_per_sec, l.address_rate_burst),
            ("signin_rate", l.signin_rate_per_sec, l.signin_rate_burst),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return fail(
                    &format!("limits.{key}_per_sec"),
                    "must be a positive number",
                );
            }
            if burst == 0 {
                return fail(&format!("limits.{key}_burst"), "must be positive");
            }
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
            for (key, _) in k.client.iter() {
                let name = format!("kafka.client.{key}");
                if key.trim().is_empty() {
                    return fail(&name, "a librdkafka property name must not be empty");
                }
                let lower = key.trim().to_ascii_lowercase();
                if let Some((_, by)) = KAFKA_NODE_PROPERTIES.iter().find(|(p, _)| *p == lower) {
                    return fail(
                        &name,
                        &format!("is set by {by} and cannot be overridden in [kafka.client]"),
                    );
                }
            }
        }
        if let Some(r) = &self.redis {
            if r.cache_size == 0 {
                return fail("redis.cache_size", "must be positive");
            }
            if r.cid_ttl_secs == 0 {
                return fail("redis.cid_ttl_secs", "must be positive");
            }
            if r.room_idle_ttl_secs == 0 {
                return fail("redis.room_idle_ttl_secs", "must be positive");
            }
            if !r.urls.is_empty() && !r.cluster {
                return fail(
                    "redis.urls",
                    "lists seed nodes of a Redis Cluster: set redis.cluster = true",
                );
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

/// The shortest `auth.secret` a node reachable beyond loopback accepts.
pub const MIN_SECRET_BYTES: usize = 32;

/// The example secrets this project ships (config files, compose file):
/// public, so they protect nothing.
const SHIPPED_SECRETS: [&str; 3] = [
    "dev-only-secret-change-me-0123456789",
    "cluster-dev-secret-change-me-0123456789",
    "compose-dev-secret-change-me-0123456789",
];

/// Why `secret` is not fit to sign tokens anyone else can reach, if it is
/// not.
fn weak_secret(secret: &str) -> Option<String> {
    if SHIPPED_SECRETS.contains(&secret) {
        Some("is an example secret shipped with ScalableChat".into())
    } else if secret.len() < MIN_SECRET_BYTES {
        Some(format!("is {} bytes long", secret.len()))
    } else {
        None
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

    const MINIMAL: &str = "[auth]\nsecret = \"0123456789abcdef0123456789abcdef-test\"\n";

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
    fn weak_secrets_only_on_loopback() {
        let public = |secret: &str| {
            format!("[http]\nbind = \"0.0.0.0:8080\"\n[auth]\nsecret = \"{secret}\"\n")
        };
        let loopback = |secret: &str| format!("[auth]\nsecret = \"{secret}\"\n");
        let shipped = [
            "dev-only-secret-change-me-0123456789",
            "cluster-dev-secret-change-me-0123456789",
            "compose-dev-secret-change-me-0123456789",
        ];
        for secret in shipped.iter().copied().chain(["0123456789abcdef0123"]) {
            let e = Settings::parse(&public(secret), "t", Vec::new())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("auth.secret") && e.contains("openssl rand"),
                "{e}"
            );
            assert!(!e.contains(secret), "the message repeats the secret: {e}");
            Settings::parse(&loopback(secret), "t", Vec::new()).unwrap();
        }
        // A strong secret listens anywhere.
        Settings::parse(&public(&"k".repeat(32)), "t", Vec::new()).unwrap();
        // A public metrics listener is a public node.
        let metrics = format!(
            "{}[http]\nmetrics_bind = \"0.0.0.0:9100\"\n",
            loopback("0123456789abcdef0123")
        );
        assert!(Settings::parse(&metrics, "t", Vec::new()).is_err());
        // The example configs are loopback-only, so they still start.
        for file in ["config/default.toml", "config/node-1.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let s = Settings::load(&path, Vec::new()).unwrap();
            assert!(s.http.loopback_only(), "{file}");
        }
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

    const CLUSTER: &str = "[redis]\nurl = \"redis://r\"\n[mongo]\nurl = \"mongodb://m\"\ndatabase = \"d\"\n[kafka]\nbrokers = \"b:9092\"\ntopic = \"t\"\n";

    fn kafka_of(text: &str, vars: &[(&str, &str)]) -> Result<KafkaSettings, ConfigError> {
        Settings::parse(&format!("{MINIMAL}{CLUSTER}{text}"), "t", env(vars))
            .map(|s| s.kafka.unwrap())
    }

    /// The `[kafka]` keys shown commented out in default.toml are the
    /// built-in defaults (the section cannot be live there: it would select
    /// cluster mode).
    #[test]
    fn shipped_default_config_documents_the_kafka_defaults() {
        let text = include_str!("../config/default.toml");
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| l.trim() != "# [kafka]")
            .skip(1)
            .take_while(|l| !l.starts_with("# ["))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            })
            .collect();
        assert!(block.len() >= 9, "{block:?}");
        let documented: KafkaSettings = toml::from_str(&block.join("\n")).unwrap();
        let defaults = kafka_of("", &[]).unwrap();
        assert_eq!(
            documented,
            KafkaSettings {
                brokers: documented.brokers.clone(),
                topic: documented.topic.clone(),
                ..defaults.clone()
            }
        );
        assert_eq!(defaults.replication_factor, 3);
        assert!(!defaults.allow_unsafe_durability);
        assert!(defaults.client.is_empty());
    }

    #[test]
    fn kafka_client_properties_reach_the_settings_but_not_debug() {
        let k = kafka_of(
            "allow_unsafe_durability = true\n[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2-secret\"\n\"socket.timeout.ms\" = 30000\n\"ssl.endpoint.identification.algorithm\" = \"none\"\n\"socket.keepalive.enable\" = true\n",
            &[],
        )
        .unwrap();
        assert!(k.allow_unsafe_durability);
        let props: Vec<_> = k.client.iter().collect();
        assert!(
            props.contains(&("security.protocol", "SASL_SSL")),
            "{props:?}"
        );
        assert!(props.contains(&("sasl.password", "hunter2-secret")));
        assert!(props.contains(&("socket.timeout.ms", "30000")));
        assert!(props.contains(&("socket.keepalive.enable", "true")));
        let s = Settings::parse(
            &format!("{MINIMAL}{CLUSTER}[kafka.client]\n\"sasl.password\" = \"hunter2-secret\"\n"),
            "t",
            Vec::new(),
        )
        .unwrap();
        for shown in [
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{:?}", s.cluster()),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("sasl.password"), "{shown}");
        }
    }

    #[test]
    fn kafka_client_table_comes_whole_from_the_environment() {
        let k = kafka_of(
            "[kafka.client]\n\"sasl.username\" = \"from-file\"\n",
            &[(
                "SCALABLE_CHAT__KAFKA__CLIENT",
                r#"{ "sasl.mechanism" = "SCRAM-SHA-512", "sasl.password" = "p" }"#,
            )],
        )
        .unwrap();
        let props: Vec<_> = k.client.iter().collect();
        assert_eq!(
            props,
            vec![("sasl.mechanism", "SCRAM-SHA-512"), ("sasl.password", "p")]
        );
    }

    #[test]
    fn kafka_client_errors_never_quote_a_value() {
        for (text, vars, key) in [
            ("client = \"hunter2-secret\"\n", vec![], "kafka.client"),
            (
                "[kafka.client]\n\"sasl.password\" = [\"hunter2-secret\"]\n",
                vec![],
                "kafka.client.sasl.password",
            ),
            (
                "",
                vec![(
                    "SCALABLE_CHAT__KAFKA__CLIENT",
                    "sasl.password=hunter2-secret",
                )],
                "kafka.client",
            ),
        ] {
            let e = kafka_of(text, &vars).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains(&format!("`{key}`")), "{shown}");
        }
    }

    #[test]
    fn kafka_client_may_not_override_what_the_node_sets() {
        for key in [
            "enable.idempotence",
            "acks",
            "request.required.acks",
            "enable.auto.commit",
            "group.id",
            "bootstrap.servers",
            "Metadata.Broker.List",
            "partition.assignment.strategy",
            "auto.offset.reset",
            "message.timeout.ms",
        ] {
            let e = kafka_of(&format!("[kafka.client]\n\"{key}\" = \"x\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`kafka.client.{key}`")), "{e}");
            assert!(e.contains("cannot be overridden"), "{e}");
        }
        let e = kafka_of("[kafka.client]\n\"\" = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.client"), "{e}");
    }

    #[test]
    fn badly_named_environment_variable_is_refused() {
        let e = Settings::parse(MINIMAL, "t", env(&[("SCALABLE_CHAT__BIND", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SCALABLE_CHAT__BIND"), "{e}");
    }

    /// A cluster config whose `[mongo]` section ends with `extra`.
    fn cluster_with_mongo(extra: &str) -> String {
        format!(
            "{MINIMAL}[redis]\nurl = \"redis://127.0.0.1\"\n[kafka]\nbrokers = \"b\"\ntopic = \"t\"\n\
             [mongo]\nurl = \"mongodb://x\"\ndatabase = \"d\"\n{extra}"
        )
    }

    #[test]
    fn mongo_write_concern_defaults_to_majority_with_journal() {
        let s = Settings::parse(&cluster_with_mongo(""), "t", Vec::new()).unwrap();
        let m = s.mongo.unwrap();
        assert_eq!(m.write_concern, WriteConcern::Majority);
        assert!(m.journal);
        assert_eq!(m, MongoSettings::new("mongodb://x", "d"));
    }

    #[test]
    fn mongo_write_concern_takes_majority_or_a_number_of_members() {
        for (text, want) in [
            ("\"majority\"", WriteConcern::Majority),
            ("1", WriteConcern::Members(1)),
            ("3", WriteConcern::Members(3)),
            ("50", WriteConcern::Members(50)),
        ] {
            let s = Settings::parse(
                &cluster_with_mongo(&format!("write_concern = {text}\njournal = false\n")),
                "t",
                Vec::new(),
            )
            .unwrap();
            let m = s.mongo.unwrap();
            assert_eq!(m.write_concern, want, "{text}");
            assert!(!m.journal);
        }
        for (raw, want) in [
            ("majority", WriteConcern::Majority),
            ("2", WriteConcern::Members(2)),
            ("\"2\"", WriteConcern::Members(2)),
        ] {
            let s = Settings::parse(
                &cluster_with_mongo(""),
                "t",
                env(&[("SCALABLE_CHAT__MONGO__WRITE_CONCERN", raw)]),
            )
            .unwrap();
            assert_eq!(s.mongo.unwrap().write_concern, want, "{raw}");
        }
    }

    #[test]
    fn invalid_mongo_write_concern_is_refused_naming_the_key() {
        for text in [
            "0",
            "-1",
            "51",
            "99999999999",
            "\"Majority\"",
            "\"most\"",
            "\"\"",
            "true",
            "1.5",
            "[1]",
        ] {
            let e = Settings::parse(
                &cluster_with_mongo(&format!("write_concern = {text}\n")),
                "t",
                Vec::new(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("mongo.write_concern"), "{text}: {e}");
        }
        for raw in ["0", "most", "-3"] {
            let e = Settings::parse(
                &cluster_with_mongo(""),
                "t",
                env(&[("SCALABLE_CHAT__MONGO__WRITE_CONCERN", raw)]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("mongo.write_concern"), "{raw}: {e}");
        }
        let e = Settings::parse(&cluster_with_mongo("journal = \"yes\"\n"), "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mongo.journal"), "{e}");
    }

    /// The `key = value` lines of one commented-out section of the shipped
    /// file (`# [mongo]` up to the next `# [...]` or the end), uncommented.
    fn commented_section(text: &str, section: &str) -> String {
        let header = format!("# [{section}]");
        let mut lines = text.lines().skip_while(|l| l.trim() != header).skip(1);
        let mut out = String::new();
        for line in lines.by_ref() {
            if line.starts_with("# [") {
                break;
            }
            let Some(body) = line.strip_prefix("# ") else {
                continue;
            };
            let is_key = body.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c == '_' || c.is_ascii_lowercase())
            });
            if is_key {
                out.push_str(body);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn shipped_default_config_documents_the_mongo_defaults() {
        let text = include_str!("../config/default.toml");
        let section = commented_section(text, "mongo");
        let shown: MongoSettings = toml::from_str(&section).unwrap();
        assert_eq!(
            shown,
            MongoSettings::new(shown.url.clone(), shown.database.clone()),
            "the [mongo] values in default.toml are not the defaults:\n{section}"
        );
        for key in ["url", "database", "batch_size", "write_concern", "journal"] {
            assert!(
                section.contains(&format!("{key} = ")),
                "default.toml does not show mongo.{key}"
            );
        }
    }

    #[test]
    fn redact_url_hides_passwords_and_secret_options() {
        for (url, want) in [
            (
                "mongodb://chat:s3cret@db1:27017,db2:27017/?tls=true&authSource=admin",
                "mongodb://chat:***@db1:27017,db2:27017/?tls=true&authSource=admin",
            ),
            (
                "mongodb+srv://chat:p%40ss%2Fw0rd@cluster0.example.net/chat?retryWrites=true",
                "mongodb+srv://chat:***@cluster0.example.net/chat?retryWrites=true",
            ),
            // Unencoded `@`, `/` and `?` in the password still go whole.
            ("mongodb://u:a@b/c?d@host/db", "mongodb://u:***@host/db"),
            ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
            ("rediss://default:pw@cache:6380", "rediss://default:***@cache:6380"),
            // A bare user info may be a password: hidden whole.
            ("redis://tok3n@cache", "redis://***@cache"),
            ("mongodb://u:@h", "mongodb://u:@h"),
            (
                "mongodb://h/?tlsCertificateKeyFilePassword=kp&authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tt&appName=x",
                "mongodb://h/?tlsCertificateKeyFilePassword=***&authMechanism=MONGODB-AWS&authMechanismProperties=***&appName=x",
            ),
            ("redis://h/?password=pw;db=1", "redis://h/?password=***;db=1"),
            // A `@` in the query: more is hidden, never less.
            ("mongodb://h/?appName=a@b", "mongodb://***@b"),
            // Nothing secret: unchanged.
            ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017"),
            ("127.0.0.1:9092,127.0.0.2:9092", "127.0.0.1:9092,127.0.0.2:9092"),
            ("sasl_ssl://user:pw@k1:9093", "sasl_ssl://user:***@k1:9093"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn redact_secrets_scrubs_the_url_and_its_decoded_password() {
        let url = "mongodb://chat:p%40ss%2Fw0rd@db:27017/?authSource=admin";
        let text =
            format!("cannot connect to {url}: auth failed for chat with p@ss/w0rd (p%40ss%2Fw0rd)");
        let scrubbed = redact_secrets(&text, url);
        assert_eq!(
            scrubbed,
            "cannot connect to mongodb://chat:***@db:27017/?authSource=admin: auth failed for chat with *** (***)"
        );
        assert_eq!(
            redact_secrets("no secrets here", "mongodb://h"),
            "no secrets here"
        );
    }

    #[test]
    fn mongo_settings_debug_hides_the_password() {
        let m = MongoSettings::new("mongodb://chat:s3cret@db/?tls=true", "d");
        let shown = format!("{m:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("mongodb://chat:***@db/?tls=true"), "{shown}");
    }
}
