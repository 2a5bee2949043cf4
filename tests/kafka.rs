//! Kafka for real: the node's start-up check of the topic's durability,
//! the topic it creates, and, on brokers the tests start themselves from
//! the jars of `scripts/services`, sends while too few replicas are in sync
//! (two brokers, one stopped) and the `[kafka.client]` properties (SASL
//! SCRAM over TLS).
//!
//! Needs Redis, Kafka and MongoDB (`scripts/services up`); the single
//! local broker holds one replica. The parts about three replicas need the
//! brokers of `TOPOLOGY=cluster scripts/services up` (127.0.0.1, from
//! KAFKA_CLUSTER_PORT, 9192 by default), which `make test` starts beside
//! the single topology's, and fail when those do not answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::TryStreamExt;
use mongodb::bson::doc;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// The consumer group, topic and database of a test are its own; this
/// removes them. Failures are only reported.
async fn cleanup(opts: &ClusterOpts, client: &[(&str, &str)]) {
    let admin = admin(&opts.kafka_brokers, client);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = admin.delete_topics(&[&opts.topic], &options).await {
        eprintln!("cleanup: deleting topic {}: {e}", opts.topic);
    }
    let _ = admin.delete_groups(&[&opts.group], &options).await;
    let mongo = mongo_client(opts).await;
    if let Err(e) = mongo.database(&opts.database).drop().await {
        eprintln!("cleanup: dropping {}: {e}", opts.database);
    }
}

fn admin(brokers: &str, client: &[(&str, &str)]) -> AdminClient<DefaultClientContext> {
    let mut config = ClientConfig::new();
    for (k, v) in client {
        config.set(*k, *v);
    }
    config.set("bootstrap.servers", brokers).create().unwrap()
}

/// Creates a topic as someone other than the node would.
async fn create_topic(opts: &ClusterOpts, replicas: i32, config: &[(&str, &str)]) {
    let admin = admin(&opts.kafka_brokers, &[]);
    let topic = config.iter().fold(
        NewTopic::new(
            &opts.topic,
            opts.partitions,
            TopicReplication::Fixed(replicas),
        ),
        |t, (k, v)| t.set(k, v),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &options).await.unwrap();
    for r in results {
        r.unwrap_or_else(|(name, code)| panic!("cannot create topic {name}: {code}"));
    }
}

/// The topic's settings as the brokers report them: the fewest replicas of
/// a partition, `min.insync.replicas` and `unclean.leader.election.enable`.
async fn described(opts: &ClusterOpts) -> (usize, String, String) {
    let admin = admin(&opts.kafka_brokers, &[]);
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&opts.topic), Duration::from_secs(10))
        .unwrap();
    let replicas = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .min()
        .unwrap();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let resource = admin
        .describe_configs([&ResourceSpecifier::Topic(&opts.topic)], &options)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let value = |name: &str| resource.get(name).unwrap().value.clone().unwrap();
    (
        replicas,
        value("min.insync.replicas"),
        value("unclean.leader.election.enable"),
    )
}

/// Whether the topology under test has one Kafka broker (`TOPOLOGY=single`);
/// else says which test runs only there.
fn single_broker(opts: &ClusterOpts, test: &str) -> bool {
    let single = opts.services.kafka_ports.len() == 1;
    if !single {
        eprintln!("SKIPPED: {test} runs with TOPOLOGY=single (one Kafka broker)");
    }
    single
}

/// Whether the test may start brokers of its own: once, in the single
/// topology (they do not depend on the topology's Kafka).
fn own_brokers(test: &str) -> bool {
    let single = Topology::current() == Topology::Single;
    if !single {
        eprintln!("SKIPPED: {test} starts its own brokers, and does so with TOPOLOGY=single");
    }
    single
}

/// A config file for a cluster node on `opts` (for a start that must fail).
fn config_text(opts: &ClusterOpts) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = NodeOpts {
        node_id: format!("k-{}", unique_tag()),
        cluster: Some(opts.clone()),
        ..NodeOpts::default()
    }
    .to_toml(&dir.path().join("data"), free_port());
    (dir, text)
}

async fn start_node(opts: &ClusterOpts, env: &[(&str, &str)]) -> TestNode {
    TestNode::start(NodeOpts {
        node_id: format!("k-{}", unique_tag()),
        cluster: Some(opts.clone()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..NodeOpts::default()
    })
    .await
}

/// The answer to a `send`: its `ack` or its `error`, and how long it took.
async fn send_answer(client: &mut TestClient, room: &str, cid: &str) -> (Value, Duration) {
    let sent = Instant::now();
    client
        .send_json(&json!({"op": "send", "room": room, "text": "durable?", "cid": cid}))
        .await;
    let (answer, _) = client
        .recv_until_pred(|v| {
            (v["op"] == "ack" && v["cid"] == cid) || (v["op"] == "error" && v["ref"] == cid)
        })
        .await;
    (answer, sent.elapsed())
}

/// Sends `cid` again until it is acked, as a client retries `unavailable`;
/// panics after `within`. A broker just started may still be loading the
/// group coordinator that the seeding of a new room asks.
async fn send_until_acked(
    client: &mut TestClient,
    room: &str,
    cid: &str,
    within: Duration,
    node: &TestNode,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (answer, _) = send_answer(client, room, cid).await;
        if answer["op"] == "ack" {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{cid} never acked: {answer}; log:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------- one broker

/// On a topic with one replica, which losing its broker would lose, the
/// node refuses to start and names the setting, the value and the way out.
#[tokio::test]
async fn refuses_a_single_replica_topic_naming_the_setting() {
    Services::local().require().await;
    let mut opts = ClusterOpts::isolated();
    create_topic(&opts, 1, &[]).await;
    opts.replication_factor = 3;
    opts.allow_unsafe_durability = false;
    let (_dir, text) = config_text(&opts);
    let stderr = start_expect_failure(&text, &[]).await;
    assert!(stderr.contains("replication factor 1"), "{stderr}");
    assert!(stderr.contains(&opts.topic), "{stderr}");
    assert!(
        stderr.contains("kafka.allow_unsafe_durability = true"),
        "{stderr}"
    );
    cleanup(&opts, &[]).await;
}

/// The default replication factor (3) cannot be had from one broker: the
/// node says so rather than starting on a lesser topic.
#[tokio::test]
async fn the_default_replication_factor_is_refused_by_a_single_broker() {
    Services::local().require().await;
    let mut opts = ClusterOpts::isolated();
    if !single_broker(
        &opts,
        "the_default_replication_factor_is_refused_by_a_single_broker",
    ) {
        return;
    }
    opts.replication_factor = 3;
    opts.allow_unsafe_durability = false;
    let (_dir, text) = config_text(&opts);
    let stderr = start_expect_failure(&text, &[]).await;
    assert!(
        stderr.to_lowercase().contains("replication factor"),
        "{stderr}"
    );
    cleanup(&opts, &[]).await;
}

/// With `allow_unsafe_durability` the node starts on the same topic, says
/// so in its log, and `/readyz` reports the unsafe settings while the node
/// stays ready.
#[tokio::test]
async fn starts_on_an_unsafe_topic_when_allowed_and_reports_it() {
    Services::local().require().await;
    let mut opts = ClusterOpts::isolated();
    create_topic(&opts, 1, &[("min.insync.replicas", "1")]).await;
    opts.allow_unsafe_durability = true;
    let node = start_node(&opts, &[]).await;
    let (status, body) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["dependencies"]["kafka"], "ok", "{body}");
    assert_eq!(
        body["kafka"]["durability"], "unsafe: replication factor 1, min.insync.replicas 1",
        "{body}"
    );
    assert_eq!(body["kafka"]["replication_factor"], 1, "{body}");
    assert_eq!(body["kafka"]["min_insync_replicas"], 1, "{body}");
    assert_eq!(body["kafka"]["unclean_leader_election"], false, "{body}");
    let log = node.log_tail();
    assert!(
        log.contains("WARN") && log.contains("kafka.allow_unsafe_durability = true"),
        "{log}"
    );
    drop(node);
    cleanup(&opts, &[]).await;
}

/// The topic a node creates on the single broker has the one replica the
/// broker can hold, never an unclean election, and a minimum of in-sync
/// replicas it can meet.
#[tokio::test]
async fn a_topic_created_on_one_broker_gets_one_replica() {
    Services::local().require().await;
    let opts = ClusterOpts::isolated();
    if !single_broker(&opts, "a_topic_created_on_one_broker_gets_one_replica") {
        return;
    }
    assert_eq!(opts.replication_factor, 1);
    let node = start_node(&opts, &[]).await;
    assert_eq!(
        described(&opts).await,
        (1, "1".to_string(), "false".to_string())
    );
    let (status, body) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["kafka"]["durability"]
            .as_str()
            .unwrap()
            .starts_with("unsafe: replication factor 1"),
        "{body}"
    );
    drop(node);
    cleanup(&opts, &[]).await;
}

// ---------------------------------------------------------------- three brokers

/// The brokers of the cluster topology; panics, saying why, when they do
/// not all answer.
async fn three_brokers() -> String {
    let first: u16 = std::env::var("KAFKA_CLUSTER_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9192);
    let mut brokers = Vec::new();
    for port in first..first + 3 {
        let addr = format!("127.0.0.1:{port}");
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await,
            Ok(Ok(_))
        );
        assert!(
            up,
            "the three-broker tests need the cluster topology's Kafka \
             (TOPOLOGY=cluster scripts/services up; `make test` starts it), \
             and {addr} does not answer"
        );
        brokers.push(addr);
    }
    brokers.join(",")
}

/// On three brokers, with the defaults, the node creates its topic with
/// three replicas, `min.insync.replicas` 2 and no unclean election, and
/// starts without `allow_unsafe_durability`.
#[tokio::test]
async fn on_three_brokers_the_topic_is_replicated_and_the_node_starts() {
    Services::local().require().await;
    let brokers = three_brokers().await;
    let mut opts = ClusterOpts::isolated();
    opts.kafka_brokers = brokers;
    opts.replication_factor = 3;
    opts.allow_unsafe_durability = false;
    let node = start_node(&opts, &[]).await;
    assert_eq!(
        described(&opts).await,
        (3, "2".to_string(), "false".to_string())
    );
    let (status, body) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kafka"]["durability"], "ok", "{body}");
    assert_eq!(body["kafka"]["replication_factor"], 3, "{body}");
    let (mut client, _, _) = node.user("replicated").await;
    let room = format!("rf3-{}", unique_tag());
    client.join(&room).await;
    send_until_acked(&mut client, &room, "c1", Duration::from_secs(60), &node).await;
    drop(node);
    cleanup(&opts, &[]).await;
}

/// Three replicas are not enough when one in sync may ack alone.
#[tokio::test]
async fn on_three_brokers_one_in_sync_replica_is_refused() {
    Services::local().require().await;
    let brokers = three_brokers().await;
    let mut opts = ClusterOpts::isolated();
    opts.kafka_brokers = brokers;
    create_topic(&opts, 3, &[("min.insync.replicas", "1")]).await;
    opts.replication_factor = 3;
    opts.allow_unsafe_durability = false;
    let (_dir, text) = config_text(&opts);
    let stderr = start_expect_failure(&text, &[]).await;
    assert!(stderr.contains("min.insync.replicas 1"), "{stderr}");
    assert!(!stderr.contains("replication factor 3"), "{stderr}");
    cleanup(&opts, &[]).await;
}

// ---------------------------------------------------------------- brokers of the test's own

/// How to run Kafka: the jars `scripts/services` installed, Java, and its
/// logging config.
struct KafkaJars {
    java: PathBuf,
    libs: PathBuf,
    log4j: PathBuf,
}

impl KafkaJars {
    /// `Err` says what is missing.
    fn find() -> Result<KafkaJars, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let libs = root.join(".services/kafka/libs");
        if !libs.is_dir() {
            return Err("the Kafka jars of scripts/services (scripts/services up)".into());
        }
        let java = std::env::var("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .unwrap_or_else(|_| PathBuf::from("java"));
        if Command::new(&java).arg("-version").output().is_err() {
            return Err("java".into());
        }
        Ok(KafkaJars {
            java,
            libs,
            log4j: root.join("scripts/services.d/log4j2.xml"),
        })
    }

    fn command(&self, main: &str, dir: &Path) -> Command {
        let mut cmd = Command::new(&self.java);
        // A short-lived test broker: start fast (no optimising compiler,
        // one GC thread) rather than run fast.
        cmd.arg("-Xms128m")
            .arg("-Xmx384m")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-XX:+UseSerialGC")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j.display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(main)
            .current_dir(dir);
        cmd
    }

    /// Writes `dir/server.properties` and formats the node's storage.
    fn format(&self, dir: &Path, properties: &str, cluster_id: &str, extra: &[String]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("server.properties"), properties).unwrap();
        let log = dir.join("format.log");
        let formatted = self
            .command("kafka.tools.StorageTool", dir)
            .args(["format", "-t", cluster_id, "-c"])
            .arg(dir.join("server.properties"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .status()
            .unwrap();
        assert!(
            formatted.success(),
            "formatting a test broker's storage failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Starts the formatted node of `dir`, logging to `dir/kafka.log`.
    fn spawn(&self, dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("kafka.log"))
            .unwrap();
        self.command("kafka.Kafka", dir)
            .arg(dir.join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }
}

fn new_cluster_id() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ulid::Ulid::new().to_bytes())
}

/// The settings every broker of the tests' own shares.
const TEST_BROKER_PROPERTIES: &str = "auto.create.topics.enable=false
offsets.topic.replication.factor=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=1
num.io.threads=2
";

/// Waits until a client with `client` properties sees `brokers` brokers
/// through `bootstrap`, or panics with the end of the logs in `logs`.
async fn wait_brokers(
    bootstrap: &str,
    client: &[(&str, &str)],
    brokers: usize,
    began: Instant,
    logs: &[PathBuf],
) {
    loop {
        let admin = admin(bootstrap, client);
        let seen = tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|m| m.brokers().len())
                .unwrap_or(0)
        })
        .await
        .unwrap();
        if seen >= brokers {
            eprintln!(
                "The test's {brokers} broker(s) answered after {:?}.",
                began.elapsed()
            );
            return;
        }
        if began.elapsed() > Duration::from_secs(180) {
            let tails: Vec<String> = logs
                .iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .map(|t| t.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
                .collect();
            panic!("the test's brokers did not answer within 180 s: {tails:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A one-node Kafka (KRaft) of the test's own, whose client listener takes
/// SASL SCRAM-SHA-512 over TLS only, with a certificate made for the test.
struct SecureBroker {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

const SCRAM_USER: &str = "chat";
const SCRAM_PASSWORD: &str = "scram-secret-7f3a9c";

impl Drop for SecureBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SecureBroker {
    /// Starts it from the jars `scripts/services` installed; `None` (and
    /// why) when those, Java or `openssl` are missing.
    /// Panics when what it needs is missing: scripts/services installs the
    /// Kafka jars, and openssl is part of the machine the tests run on.
    async fn start() -> SecureBroker {
        let jars = KafkaJars::find()
            .unwrap_or_else(|why| panic!("the SASL/TLS broker needs {why} (scripts/services up)"));
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            panic!("openssl could not make a certificate for the SASL/TLS broker");
        }
        // Java properties: the PEM texts inline, newlines escaped.
        let pem = |f: &str| {
            std::fs::read_to_string(d.join(f))
                .unwrap()
                .trim()
                .replace('\n', "\\n")
        };
        let (port, internal, controller) = (free_port(), free_port(), free_port());
        let properties = format!(
            "process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=INTERNAL://127.0.0.1:{internal},SECURE://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=INTERNAL://127.0.0.1:{internal},SECURE://127.0.0.1:{port}
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER
listener.security.protocol.map=INTERNAL:PLAINTEXT,SECURE:SASL_SSL,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.secure.ssl.keystore.type=PEM
listener.name.secure.ssl.keystore.key={key}
listener.name.secure.ssl.keystore.certificate.chain={cert}
log.dirs={logs}
{TEST_BROKER_PROPERTIES}",
            key = pem("key.pem"),
            cert = pem("cert.pem"),
            logs = d.join("data").display(),
        );
        let began = Instant::now();
        jars.format(
            d,
            &properties,
            &new_cluster_id(),
            &[
                "--standalone".into(),
                "--add-scram".into(),
                format!("SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]"),
            ],
        );
        let child = jars.spawn(d);
        let broker = SecureBroker { child, dir, port };
        let client = broker.client(SCRAM_PASSWORD);
        let pairs: Vec<(&str, &str)> = client.iter().map(|(k, v)| (*k, v.as_str())).collect();
        wait_brokers(
            &broker.brokers(),
            &pairs,
            1,
            began,
            &[broker.dir.path().join("kafka.log")],
        )
        .await;
        broker
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }

    /// The client properties of a node or a test client with `password`.
    fn client(&self, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("security.protocol", "SASL_SSL".into()),
            ("sasl.mechanism", "SCRAM-SHA-512".into()),
            ("sasl.username", SCRAM_USER.into()),
            ("sasl.password", password.into()),
            ("ssl.ca.location", self.ca()),
        ]
    }
}

/// Two brokers of the test's own in one KRaft cluster: node 1 is broker
/// and controller, node 2 a broker that the test stops and starts.
struct TwoBrokers {
    jars: KafkaJars,
    dir: tempfile::TempDir,
    ports: [u16; 2],
    children: [Option<Child>; 2],
}

impl Drop for TwoBrokers {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl TwoBrokers {
    async fn start() -> TwoBrokers {
        let jars = KafkaJars::find()
            .unwrap_or_else(|why| panic!("the two test brokers need {why} (scripts/services up)"));
        let dir = tempfile::tempdir().unwrap();
        let ports = [free_port(), free_port()];
        let controller = free_port();
        let id = new_cluster_id();
        let began = Instant::now();
        for (i, port) in ports.iter().enumerate() {
            let node = i + 1;
            let roles = if node == 1 {
                "broker,controller"
            } else {
                "broker"
            };
            let listeners = if node == 1 {
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}")
            } else {
                format!("PLAINTEXT://127.0.0.1:{port}")
            };
            let d = dir.path().join(format!("node-{node}"));
            let properties = format!(
                "process.roles={roles}
node.id={node}
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners={listeners}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={logs}
{TEST_BROKER_PROPERTIES}",
                logs = d.join("data").display(),
            );
            let extra: Vec<String> = if node == 1 {
                vec!["--standalone".into()]
            } else {
                Vec::new()
            };
            jars.format(&d, &properties, &id, &extra);
        }
        let children = [
            Some(jars.spawn(&dir.path().join("node-1"))),
            Some(jars.spawn(&dir.path().join("node-2"))),
        ];
        let brokers = TwoBrokers {
            jars,
            dir,
            ports,
            children,
        };
        wait_brokers(&brokers.bootstrap(), &[], 2, began, &brokers.logs()).await;
        brokers
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{},127.0.0.1:{}", self.ports[0], self.ports[1])
    }

    fn logs(&self) -> Vec<PathBuf> {
        (1..=2)
            .map(|n| self.dir.path().join(format!("node-{n}/kafka.log")))
            .collect()
    }

    /// Stops broker 2 as an operator would (SIGTERM: a controlled
    /// shutdown, which takes it out of every ISR at once).
    fn stop_second(&mut self) {
        if let Some(mut child) = self.children[1].take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    async fn start_second(&mut self) {
        let began = Instant::now();
        self.children[1] = Some(self.jars.spawn(&self.dir.path().join("node-2")));
        wait_brokers(&self.bootstrap(), &[], 2, began, &self.logs()).await;
    }
}

/// With two brokers and the node's topic at replication factor 2
/// (`min.insync.replicas` 2, which the start-up check takes as durable), a
/// send is acked. Once one broker is stopped, too few replicas are in sync:
/// Kafka refuses the produce (NOT_ENOUGH_REPLICAS, which the producer
/// retries), and the sender gets `unavailable` within
/// `kafka.message_timeout_ms` and a little, never an ack. With the broker
/// back, the retry of the same cid is acked with the seq it was given.
#[tokio::test]
async fn too_few_replicas_in_sync_answer_unavailable_never_ack() {
    Services::local().require().await;
    if !own_brokers("too_few_replicas_in_sync_answer_unavailable_never_ack") {
        return;
    }
    let mut brokers = TwoBrokers::start().await;
    let mut opts = ClusterOpts::isolated();
    opts.kafka_brokers = brokers.bootstrap();
    opts.replication_factor = 2;
    opts.allow_unsafe_durability = false;
    let timeout_ms: u64 = 4000;
    let node = start_node(
        &opts,
        &[(
            "SCALABLE_CHAT__KAFKA__MESSAGE_TIMEOUT_MS",
            &timeout_ms.to_string(),
        )],
    )
    .await;
    assert_eq!(
        described(&opts).await,
        (2, "2".to_string(), "false".to_string())
    );
    let (status, body) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kafka"]["durability"], "ok", "{body}");
    let (mut client, _, _) = node.user("replicas").await;
    let room = format!("isr-{}", unique_tag());
    client.join(&room).await;
    let first = send_until_acked(&mut client, &room, "c1", Duration::from_secs(60), &node).await;
    assert_eq!(first["seq"], 1, "{first}");

    brokers.stop_second();
    let (answer, took) = send_answer(&mut client, &room, "c2").await;
    assert_eq!(
        answer["op"], "error",
        "acked with one replica in sync: {answer}"
    );
    assert_eq!(answer["code"], "unavailable", "{answer}");
    eprintln!("With one replica in sync the send was answered `unavailable` after {took:?}.");
    // The producer's timeout, its once-a-second scan for timed-out
    // messages, and the node's grace for a late report.
    assert!(
        took < Duration::from_millis(timeout_ms + 3500),
        "unavailable after {took:?}"
    );
    client
        .expect_none_of(
            Duration::from_millis(500),
            &["ack", "msg"],
            "a refused send",
        )
        .await;

    brokers.start_second().await;
    let acked = send_until_acked(&mut client, &room, "c2", Duration::from_secs(60), &node).await;
    assert_eq!(acked["seq"], 2, "{acked}");
    drop(node);
    let mongo = mongo_client(&opts).await;
    let _ = mongo.database(&opts.database).drop().await;
}

/// `[kafka.client]` as the environment gives it (a TOML inline table).
fn client_env(client: &[(&str, String)]) -> String {
    let pairs: Vec<String> = client
        .iter()
        .map(|(k, v)| format!("{:?} = {:?}", k, v))
        .collect();
    format!("{{ {} }}", pairs.join(", "))
}

/// Every Kafka client of the node speaks SCRAM over TLS with the
/// properties of `[kafka.client]`: the topic is created and checked (the
/// admin client), a message is acked (the producer, after the seeding
/// scan) and stored in MongoDB (the persist consumer). With a wrong
/// password the node does not start, and no password shows in its output.
#[tokio::test]
async fn sasl_scram_over_tls_reaches_every_kafka_client() {
    Services::local().require().await;
    if !own_brokers("sasl_scram_over_tls_reaches_every_kafka_client") {
        return;
    }
    let broker = SecureBroker::start().await;
    let mut opts = ClusterOpts::isolated();
    opts.kafka_brokers = broker.brokers();
    let client = broker.client(SCRAM_PASSWORD);
    let env = client_env(&client);
    let node = start_node(&opts, &[("SCALABLE_CHAT__KAFKA__CLIENT", &env)]).await;
    let (status, body) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dependencies"]["kafka"], "ok", "{body}");
    let (mut ws, _, _) = node.user("secure").await;
    let room = format!("sasl-{}", unique_tag());
    ws.join(&room).await;
    send_until_acked(&mut ws, &room, "c1", Duration::from_secs(60), &node).await;
    let messages = mongo_client(&opts)
        .await
        .database(&opts.database)
        .collection::<mongodb::bson::Document>("messages");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: Vec<_> = messages
            .find(doc! {"room": &room})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        if stored.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the persist worker did not store the message over SASL_SSL; log:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!node.log_tail().contains(SCRAM_PASSWORD));
    drop(node);

    let wrong = "wrong-password-51d2e8";
    let mut bad = broker.client(wrong);
    // Fail within the harness's 15 s rather than librdkafka's 60 s.
    bad.push(("socket.timeout.ms", "5000".into()));
    let mut other = opts.clone();
    other.topic = format!("{}-other", opts.topic);
    let (_dir, text) = config_text(&other);
    let stderr = start_expect_failure(
        &text,
        &[("SCALABLE_CHAT__KAFKA__CLIENT", &client_env(&bad))],
    )
    .await;
    assert!(stderr.contains("kafka"), "{stderr}");
    assert!(!stderr.contains(wrong), "{stderr}");
    let pairs: Vec<(&str, &str)> = client.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cleanup(&opts, &pairs).await;
}
