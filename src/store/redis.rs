//! The node's connections to Redis: one server, or a Redis Cluster
//! (`redis.cluster`). The store, the persist workers and the relay talk to
//! either through [`RedisConn`], which routes each command to the node that
//! owns its key's slot in a cluster (following `MOVED` and `ASK`) and
//! reconnects by itself.
//!
//! A room's messages, presence and typing travel over its channel
//! ([`super::keys::channel`]). On one server that is classic pub/sub; on a
//! cluster it is sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`), which Redis
//! routes by the channel's slot like a key, so a message touches the one
//! shard that holds its room instead of every node of the cluster.

use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value,
};

use crate::config::RedisSettings;
use crate::error::ChatError;

/// How long one attempt at connecting to a Redis node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a command may wait for its answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at the first connection, at start-up.
const START_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const START_PAUSE: Duration = Duration::from_millis(300);
/// Retries of a cluster command that met a moved slot, a failover or a lost
/// connection. A failover takes the cluster's node timeout and an election,
/// a few seconds: the sender hears `unavailable` within the overall bound
/// and retries its `cid`, rather than waiting out the election here.
const CLUSTER_RETRIES: u32 = 3;
/// Longest time one cluster command may take, its retries included.
const CLUSTER_OVERALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How a room's channel is published to: the command and its pub/sub kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// `PUBLISH`, on one server.
    Classic,
    /// `SPUBLISH`, on a cluster: routed by the channel's slot.
    Sharded,
}

impl Publish {
    pub fn of(settings: &RedisSettings) -> Self {
        if settings.cluster {
            Publish::Sharded
        } else {
            Publish::Classic
        }
    }

    /// The command that publishes.
    pub fn command(self) -> &'static str {
        match self {
            Publish::Classic => "PUBLISH",
            Publish::Sharded => "SPUBLISH",
        }
    }
}

/// A command connection to one server or to a cluster; cheap to clone
/// (clones share the connection).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// How long a write may wait for a replica to confirm it.
const REPLICATION_WAIT_MS: u64 = 500;

impl RedisConn {
    /// On a cluster, waits until a replica of `key`'s shard holds every
    /// write made so far on this connection to that shard, so that a
    /// failover keeps them. A shard with no replica connected has none to
    /// fail over to, and passes; one whose replicas do not confirm in time
    /// answers `unavailable`. One server has no replica here and passes.
    ///
    /// The master is asked for its replicas before `WAIT` is sent: `WAIT`
    /// holds the connection it comes on for as long as it waits, and every
    /// command of this node to that shard shares the connection, so a
    /// `WAIT` that no replica can answer would stall all of them for its
    /// whole timeout, send after send.
    pub async fn wait_replicated(&mut self, key: &str) -> Result<(), ChatError> {
        let RedisConn::Cluster(conn) = self else {
            return Ok(());
        };
        let shard = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            key,
            SlotAddr::Master,
        )));
        // ROLE answers ["master", offset, [[host, port, offset], ...]].
        let role = conn
            .route_command(redis::cmd("ROLE"), shard.clone())
            .await
            .map_err(unavailable)?;
        let replicas = match &role {
            Value::Array(parts) if parts.first().is_some_and(is_master) => match parts.get(2) {
                Some(Value::Array(replicas)) => replicas.len(),
                _ => 0,
            },
            // A replica or a node on its way out: the slot moved under us,
            // and the sender's retry goes to the master.
            _ => {
                return Err(ChatError::Unavailable(format!(
                    "redis: the node serving the shard of {key} is not a master"
                )))
            }
        };
        if replicas == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(REPLICATION_WAIT_MS);
        let acked = conn.route_command(wait, shard).await.map_err(unavailable)?;
        if redis::from_redis_value::<i64>(acked).unwrap_or(0) >= 1 {
            return Ok(());
        }
        Err(ChatError::Unavailable(format!(
            "redis: no replica confirmed a write to the shard of {key} within {REPLICATION_WAIT_MS} ms"
        )))
    }
}

/// The first element of a ROLE reply names a master.
fn is_master(role: &Value) -> bool {
    redis::from_redis_value_ref::<String>(role).is_ok_and(|r| r == "master")
}

fn unavailable(e: redis::RedisError) -> ChatError {
    ChatError::Unavailable(format!("redis: {e}"))
}

/// The settings of the command connection to one server. While Redis is
/// away a send should get `unavailable` within seconds, so every reconnect
/// is a single attempt: the connection manager makes each command issued
/// during a reconnect wait for all of it, retries and their backoff
/// included, before the command's own response timeout even starts, and a
/// send issues several commands. Without retries a command waits for at
/// most one connect attempt, and the next command after a failed attempt
/// starts a new one.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(0)
}

/// The certificate authority `redis.ca_file` names, if any. Only with
/// `rediss://` URLs: given a CA, redis-rs refuses a `redis://` URL of one
/// server but switches a cluster's connections to TLS, and the URL should
/// say alike in both modes whether TLS is on.
fn certificates(settings: &RedisSettings) -> Result<Option<TlsCertificates>, ChatError> {
    let Some(path) = &settings.ca_file else {
        return Ok(None);
    };
    for url in seeds(settings) {
        let info = url.as_str().into_connection_info().map_err(unavailable)?;
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(ChatError::Unavailable(
                "redis.ca_file is set, but a Redis URL does not start with rediss:// (TLS)".into(),
            ));
        }
    }
    let pem = std::fs::read(path)
        .map_err(|e| ChatError::Unavailable(format!("redis.ca_file {}: {e}", path.display())))?;
    // An empty trust store would only fail later, as an unknown issuer.
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ChatError::Unavailable(format!(
            "redis.ca_file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A client of one server with `TCP_NODELAY`: the command connection
/// pipelines many small requests, and with Nagle's algorithm one written
/// while an earlier one is unacknowledged waits for that acknowledgement.
pub fn single_client(settings: &RedisSettings) -> Result<redis::Client, ChatError> {
    let info = settings
        .url
        .as_str()
        .into_connection_info()
        .map_err(unavailable)?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let info = info.set_tcp_settings(tcp);
    match certificates(settings)? {
        Some(certs) => redis::Client::build_with_tls(info, certs).map_err(unavailable),
        None => redis::Client::open(info).map_err(unavailable),
    }
}

/// The seed nodes of a cluster: `url`, then `urls`.
fn seeds(settings: &RedisSettings) -> Vec<String> {
    std::iter::once(settings.url.clone())
        .chain(settings.urls.iter().cloned())
        .collect()
}

/// A cluster client builder with the node's timeouts and retries; the
/// relay adds RESP3 and its push channel to it.
pub fn cluster_builder(settings: &RedisSettings) -> Result<ClusterClientBuilder, ChatError> {
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let builder = ClusterClientBuilder::new(seeds(settings))
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .overall_response_timeout(Some(CLUSTER_OVERALL_TIMEOUT))
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(100)
        .max_retry_wait(1000)
        .tcp_settings(tcp);
    Ok(match certificates(settings)? {
        Some(certs) => builder.certs(certs),
        None => builder,
    })
}

/// Connects the command connection, with a few attempts (the connection's
/// own reconnects make one each).
pub async fn connect(settings: &RedisSettings) -> Result<RedisConn, ChatError> {
    let mut attempt = 1;
    loop {
        match connect_once(settings).await {
            Ok(conn) => return Ok(conn),
            Err(e) if attempt < START_ATTEMPTS => {
                log::warn!("Redis does not answer yet ({}); trying again.", e.detail());
                attempt += 1;
                tokio::time::sleep(START_PAUSE).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_once(settings: &RedisSettings) -> BoxFuture<'static, Result<RedisConn, ChatError>> {
    let settings = settings.clone();
    Box::pin(async move {
        if settings.cluster {
            let client = cluster_builder(&settings)?.build().map_err(unavailable)?;
            let conn = client.get_async_connection().await.map_err(unavailable)?;
            Ok(RedisConn::Cluster(conn))
        } else {
            let client = single_client(&settings)?;
            let conn = ConnectionManager::new_with_config(client, manager_config())
                .await
                .map_err(unavailable)?;
            Ok(RedisConn::Single(conn))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, urls: &[&str]) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            cluster: !urls.is_empty(),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            // Never read: the URLs are checked first.
            ca_file: Some("/nonexistent/ca.pem".into()),
            cache_size: 500,
            cid_ttl_secs: 3600,
            room_idle_ttl_secs: 3600,
        }
    }

    fn refusal(settings: &RedisSettings) -> String {
        match certificates(settings) {
            Err(e) => e.detail(),
            Ok(_) => String::from("accepted"),
        }
    }

    #[test]
    fn a_ca_file_needs_rediss_urls() {
        for s in [
            settings("redis://:pw@h:6379", &[]),
            settings("redis://:pw@h:7000", &["redis://:pw@h:7001"]),
            settings("rediss://:pw@h:7000", &["redis://:pw@h:7001"]),
        ] {
            let why = refusal(&s);
            assert!(why.contains("rediss://"), "{s:?}: {why}");
            assert!(!why.contains("pw"), "{why}");
        }
        let tls = settings("rediss://:pw@h:7000", &["REDISS://:pw@h:7001"]);
        let why = refusal(&tls);
        assert!(
            why.starts_with("redis.ca_file /nonexistent/ca.pem"),
            "{why}"
        );
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temporary directory");
        };
        let path = dir.path().join("key.pem");
        let written = std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAAAA\n");
        assert!(written.is_ok());
        let mut tls = settings("rediss://:pw@h:7000", &[]);
        tls.ca_file = Some(path);
        assert!(refusal(&tls).contains("holds no PEM certificate"));
    }
}
