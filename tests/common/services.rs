//! The shared services of the cluster tests: where the local Redis, Kafka and
//! MongoDB listen (`Services`, `require()`), the settings and unique names that
//! keep one cluster test apart from the others (`ClusterOpts`, `unique_tag`),
//! and a MongoDB client (`mongo_client`, `bson_int`) for checking what was
//! stored.

use std::path::PathBuf;
use std::time::Duration;

use scalable_chat::config::RedisSettings;
use scalable_chat::store::redis::RedisConn;
use tokio::net::TcpStream;

use super::node::toml_escape;

/// The services topology the tests run against, chosen like
/// `scripts/services` by `TOPOLOGY`: `single` (the default: one Redis, one
/// Kafka broker) or `cluster` (a Redis Cluster of three masters and three
/// replicas, three Kafka brokers). MongoDB is the same in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
}

impl Topology {
    pub fn current() -> Topology {
        match std::env::var("TOPOLOGY").as_deref() {
            Ok("cluster") => Topology::Cluster,
            _ => Topology::Single,
        }
    }
}

/// Where the local cluster services listen: 127.0.0.1 on the ports that
/// `scripts/services` uses for the topology (moved by the same REDIS_PORT,
/// KAFKA_PORT, MONGO_PORT, REDIS_CLUSTER_PORT and KAFKA_CLUSTER_PORT
/// variables).
#[derive(Clone, Debug)]
pub struct Services {
    pub topology: Topology,
    /// Every Redis node the node may be given as a seed: one server, or
    /// the masters of the cluster as it was created.
    pub redis_ports: Vec<u16>,
    pub kafka_ports: Vec<u16>,
    pub mongo_port: u16,
}

impl Services {
    pub fn local() -> Services {
        let port = |var: &str, default: u16| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let mongo_port = port("MONGO_PORT", 27017);
        match Topology::current() {
            Topology::Single => Services {
                topology: Topology::Single,
                redis_ports: vec![port("REDIS_PORT", 6379)],
                kafka_ports: vec![port("KAFKA_PORT", 9092)],
                mongo_port,
            },
            Topology::Cluster => {
                let redis = port("REDIS_CLUSTER_PORT", 7000);
                let kafka = port("KAFKA_CLUSTER_PORT", 9192);
                Services {
                    topology: Topology::Cluster,
                    redis_ports: (redis..redis + 6).collect(),
                    kafka_ports: (kafka..kafka + 3).collect(),
                    mongo_port,
                }
            }
        }
    }

    /// The first Redis node: the server, or a seed of the cluster.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_ports[0])
    }

    /// The other seeds of a cluster (none for one server).
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_ports[1..]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    pub fn kafka_brokers(&self) -> String {
        let brokers: Vec<String> = self
            .kafka_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        brokers.join(",")
    }

    pub fn mongo_url(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.mongo_port)
    }

    /// The node's `[redis]` settings for this topology.
    pub fn redis_settings(&self) -> RedisSettings {
        RedisSettings {
            url: self.redis_url(),
            cluster: self.topology == Topology::Cluster,
            urls: self.redis_urls(),
            ca_file: None,
            cache_size: 500,
            cid_ttl_secs: 3600,
            room_idle_ttl_secs: 30 * 24 * 3600,
        }
    }

    /// A command connection to Redis, as the node makes it (one server, or
    /// the cluster); panics with a hint when Redis does not answer.
    pub async fn redis(&self) -> RedisConn {
        match self.try_redis().await {
            Ok(conn) => conn,
            Err(e) => panic!("{e}"),
        }
    }

    /// The same, or why not (for clean-ups, which must not panic).
    pub async fn try_redis(&self) -> Result<RedisConn, String> {
        let settings = self.redis_settings();
        scalable_chat::store::redis::connect(&settings)
            .await
            .map_err(|e| {
                format!(
                    "Redis must run on {} (TOPOLOGY={:?}; scripts/services up): {e:?}",
                    settings.url, self.topology
                )
            })
    }

    /// Panics, saying how to start them, unless Redis, Kafka and MongoDB all
    /// accept TCP connections.
    pub async fn require(&self) {
        let mut down = Vec::new();
        let listeners = self
            .redis_ports
            .iter()
            .map(|p| ("Redis", *p))
            .chain(self.kafka_ports.iter().map(|p| ("Kafka", *p)))
            .chain(std::iter::once(("MongoDB", self.mongo_port)));
        for (name, port) in listeners {
            let addr = format!("127.0.0.1:{port}");
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&addr)).await,
                Ok(Ok(_))
            );
            if !ok {
                down.push(format!("{name} ({addr})"));
            }
        }
        assert!(
            down.is_empty(),
            "cluster tests need the local services, but {} did not answer: run `TOPOLOGY={} scripts/services up` first",
            down.join(", "),
            match self.topology {
                Topology::Single => "single",
                Topology::Cluster => "cluster",
            }
        );
    }
}

/// The shared services of a cluster test, and the names that keep one test
/// apart from the others (its own topic, consumer group and database; rooms
/// are the tests' own business).
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub services: Services,
    pub redis_url: String,
    /// `redis.cluster` and `redis.urls`: the topology's, unless a test
    /// brings a Redis of its own.
    pub redis_cluster: bool,
    pub redis_urls: Vec<String>,
    /// `redis.ca_file`, for a test's own Redis over TLS.
    pub redis_ca_file: Option<PathBuf>,
    pub cache_size: usize,
    pub kafka_brokers: String,
    pub topic: String,
    pub partitions: i32,
    /// `kafka.replication_factor`, and whether the node may start on a
    /// topic that could lose acked messages. The local Kafka is a single
    /// broker: one replica, allowed; the cluster topology has three.
    pub replication_factor: i32,
    pub allow_unsafe_durability: bool,
    pub group: String,
    pub mongo_url: String,
    pub database: String,
    pub roles: Vec<String>,
}

impl ClusterOpts {
    /// Settings for a new, isolated cluster on the local services: a fresh
    /// topic, consumer group and database, every node with both roles.
    pub fn isolated() -> ClusterOpts {
        let tag = unique_tag();
        let services = Services::local();
        let single = services.topology == Topology::Single;
        ClusterOpts {
            redis_url: services.redis_url(),
            redis_cluster: services.topology == Topology::Cluster,
            redis_urls: services.redis_urls(),
            redis_ca_file: None,
            cache_size: 500,
            kafka_brokers: services.kafka_brokers(),
            topic: format!("test.{tag}"),
            partitions: 3,
            replication_factor: if single { 1 } else { 3 },
            allow_unsafe_durability: single,
            group: format!("test-{tag}"),
            mongo_url: services.mongo_url(),
            database: format!("test_{tag}"),
            roles: vec!["persist".into(), "sweep".into()],
            services,
        }
    }

    /// A command connection to the test's Redis (see [`Services::redis`]).
    pub async fn redis(&self) -> RedisConn {
        self.services.redis().await
    }

    pub(super) fn to_toml(&self) -> String {
        let ca_file = match &self.redis_ca_file {
            Some(path) => format!(
                "ca_file = \"{}\"\n",
                toml_escape(&path.display().to_string())
            ),
            None => String::new(),
        };
        format!(
            r#"
[redis]
url = "{redis}"
cluster = {redis_cluster}
urls = {redis_urls}
{ca_file}cache_size = {cache}

[kafka]
brokers = "{brokers}"
topic = "{topic}"
partitions = {partitions}
replication_factor = {replication_factor}
allow_unsafe_durability = {allow_unsafe_durability}
group = "{group}"

[mongo]
url = "{mongo}"
database = "{database}"
"#,
            redis = toml_escape(&self.redis_url),
            redis_cluster = self.redis_cluster,
            redis_urls = super::node::toml_string_list(&self.redis_urls),
            cache = self.cache_size,
            brokers = toml_escape(&self.kafka_brokers),
            topic = toml_escape(&self.topic),
            partitions = self.partitions,
            replication_factor = self.replication_factor,
            allow_unsafe_durability = self.allow_unsafe_durability,
            group = toml_escape(&self.group),
            mongo = toml_escape(&self.mongo_url),
            database = toml_escape(&self.database),
        )
    }
}

/// Removes what a test left in Redis: the keys of its rooms (their cid
/// buckets for the nodes' default cid lifetime, 7 days, included) and the
/// traces of its nodes. One command at a time: on a cluster they live in
/// different slots, which one pipeline cannot span.
pub async fn forget_in_redis<'a>(
    conn: &mut RedisConn,
    rooms: impl IntoIterator<Item = &'a String>,
    nodes: impl IntoIterator<Item = &'a str>,
) -> redis::RedisResult<()> {
    use scalable_chat::store::keys;
    let now_secs = scalable_chat::protocol::now_ms() as u64 / 1000;
    for room in rooms {
        redis::cmd("DEL")
            .arg(&keys::of_room(room)[..])
            .arg(keys::live_cid_buckets(room, now_secs, 7 * 24 * 3600))
            .query_async::<()>(conn)
            .await?;
        redis::cmd("ZREM")
            .arg(keys::ROOMS)
            .arg(room)
            .query_async::<()>(conn)
            .await?;
    }
    for node in nodes {
        redis::cmd("DEL")
            .arg(keys::node_rooms(node))
            .query_async::<()>(conn)
            .await?;
        redis::cmd("ZREM")
            .arg(keys::NODES)
            .arg(node)
            .query_async::<()>(conn)
            .await?;
    }
    Ok(())
}

impl ClusterOpts {
    /// Polls the test database until it holds at least `want` messages of
    /// `room`, for up to `within`; returns them sorted by seq, or fails
    /// saying the persist workers did not store them.
    pub async fn wait_stored(
        &self,
        room: &str,
        want: usize,
        within: Duration,
    ) -> Vec<mongodb::bson::Document> {
        use futures_util::TryStreamExt;
        use mongodb::bson::{doc, Document};
        let coll = mongo_client(self)
            .await
            .database(&self.database)
            .collection::<Document>("messages");
        let started = std::time::Instant::now();
        loop {
            let mut docs: Vec<Document> = coll
                .find(doc! { "room": room })
                .await
                .expect("MongoDB find")
                .try_collect()
                .await
                .expect("MongoDB cursor");
            if docs.len() >= want {
                docs.sort_by_key(|d| bson_int(d.get("seq")));
                return docs;
            }
            assert!(
                started.elapsed() < within,
                "MongoDB database {} holds {} of the {want} acked messages of room {room} \
                 after {within:?}: the persist workers did not store them",
                self.database,
                docs.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Removes what a test of these settings left in the services: its
    /// MongoDB database, Kafka topic and consumer group, and the Redis keys
    /// of `rooms` and `nodes`. Failures are only reported (the test has
    /// passed or failed by then), and it gives up after 30 s.
    pub async fn remove_leftovers<'a>(
        &self,
        rooms: impl IntoIterator<Item = &'a String>,
        nodes: impl IntoIterator<Item = &'a str>,
    ) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::ClientConfig;
        let work = async {
            let client = mongo_client(self).await;
            if let Err(e) = client.database(&self.database).drop().await {
                eprintln!("cleanup: dropping {}: {e}", self.database);
            }
            let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
                .set("bootstrap.servers", &self.kafka_brokers)
                .create();
            match admin {
                Ok(admin) => {
                    let options =
                        AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                    if let Err(e) = admin.delete_topics(&[&self.topic], &options).await {
                        eprintln!("cleanup: deleting topic {}: {e}", self.topic);
                    }
                    let _ = admin.delete_groups(&[&self.group], &options).await;
                }
                Err(e) => eprintln!("cleanup: Kafka admin client: {e}"),
            }
            match self.services.try_redis().await {
                Ok(mut conn) => {
                    if let Err(e) = forget_in_redis(&mut conn, rooms, nodes).await {
                        eprintln!("cleanup: Redis keys: {e}");
                    }
                }
                Err(e) => eprintln!("cleanup: Redis: {e}"),
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .is_err()
        {
            eprintln!("cleanup did not finish within 30 s");
        }
    }
}

/// A short lowercase unique tag (a ULID) for names of topics, databases,
/// rooms and nodes.
pub fn unique_tag() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

/// A MongoDB client for the test database of `opts`, failing fast when the
/// server does not answer.
pub async fn mongo_client(opts: &ClusterOpts) -> mongodb::Client {
    let mut options = mongodb::options::ClientOptions::parse(&opts.mongo_url)
        .await
        .expect("MongoDB URL");
    options.server_selection_timeout = Some(Duration::from_secs(5));
    mongodb::Client::with_options(options).expect("MongoDB client")
}

/// A BSON integer (Int32 or Int64) as i64; panics on anything else.
pub fn bson_int(v: Option<&mongodb::bson::Bson>) -> i64 {
    use mongodb::bson::Bson;
    match v {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        other => panic!("expected a BSON integer, got {other:?}"),
    }
}
