//! Test harness: starts the real `scalable-chat` binary as a child process on a
//! free port with its own data directory, and speaks HTTP and WebSocket to it.
//!
//! Every wait is bounded so that a misbehaving server fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a single expected frame may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node may take to answer `/healthz` after being spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The secret every test node uses unless a test overrides it.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Settings a test may change; everything else follows the documented defaults.
#[derive(Clone, Debug)]
pub struct NodeOpts {
    pub node_id: String,
    pub secret: String,
    pub token_ttl_secs: u64,
    pub max_frame_bytes: u64,
    pub max_text_chars: u64,
    pub rate_per_sec: f64,
    pub rate_burst: u64,
    pub heartbeat_interval_secs: u64,
    pub client_timeout_secs: u64,
    pub outbound_soft_bytes: u64,
    pub outbound_hard_bytes: u64,
    pub user_rate_per_sec: f64,
    pub user_rate_burst: u64,
    pub max_connections_per_address: u64,
    /// Extra environment variables for the child process.
    pub env: Vec<(String, String)>,
    /// Cluster mode: the `[redis]`, `[kafka]` and `[mongo]` sections (and
    /// `node.roles`); `None` runs the node standalone.
    pub cluster: Option<ClusterOpts>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            node_id: "test-1".to_string(),
            secret: SECRET.to_string(),
            token_ttl_secs: 86400,
            max_frame_bytes: 65536,
            max_text_chars: 4000,
            // Most tests send many messages quickly; the rate limit has its own test.
            rate_per_sec: 100_000.0,
            rate_burst: 100_000,
            heartbeat_interval_secs: 10,
            client_timeout_secs: 30,
            outbound_soft_bytes: 262_144,
            outbound_hard_bytes: 1_048_576,
            // Like the per-connection limit: high, tested on its own.
            user_rate_per_sec: 100_000.0,
            user_rate_burst: 100_000,
            max_connections_per_address: 1024,
            env: Vec::new(),
            cluster: None,
        }
    }
}

impl NodeOpts {
    /// The config file for this node.
    pub fn to_toml(&self, data_dir: &Path, port: u16) -> String {
        let roles = match &self.cluster {
            Some(c) => format!("roles = {}\n", toml_string_list(&c.roles)),
            None => String::new(),
        };
        let mut text = format!(
            r#"[node]
id = "{node_id}"
data_dir = "{data_dir}"
{roles}
[http]
bind = "127.0.0.1:{port}"
allowed_origins = ["http://127.0.0.1:{port}"]

[auth]
secret = "{secret}"
token_ttl_secs = {ttl}

[limits]
max_frame_bytes = {max_frame}
max_text_chars = {max_text}
rate_per_sec = {rate:?}
rate_burst = {burst}
heartbeat_interval_secs = {hb}
client_timeout_secs = {ct}
outbound_soft_bytes = {soft}
outbound_hard_bytes = {hard}
user_rate_per_sec = {user_rate:?}
user_rate_burst = {user_burst}
max_connections_per_address = {per_address}
"#,
            node_id = self.node_id,
            data_dir = toml_escape(&data_dir.display().to_string()),
            port = port,
            secret = self.secret,
            ttl = self.token_ttl_secs,
            max_frame = self.max_frame_bytes,
            max_text = self.max_text_chars,
            rate = self.rate_per_sec,
            burst = self.rate_burst,
            hb = self.heartbeat_interval_secs,
            ct = self.client_timeout_secs,
            soft = self.outbound_soft_bytes,
            hard = self.outbound_hard_bytes,
            user_rate = self.user_rate_per_sec,
            user_burst = self.user_rate_burst,
            per_address = self.max_connections_per_address,
        );
        if let Some(c) = &self.cluster {
            text.push_str(&c.to_toml());
        }
        text
    }

    /// How long the node may take to answer `/healthz` after being spawned:
    /// a cluster node first connects its services and creates its topic.
    pub fn start_timeout(&self) -> Duration {
        if self.cluster.is_some() {
            CLUSTER_START_TIMEOUT
        } else {
            START_TIMEOUT
        }
    }
}

/// How long a cluster node may take to answer `/healthz` after being spawned.
pub const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The shared services of a cluster test, and the names that keep one test
/// apart from the others (its own topic, consumer group and database; rooms
/// are the tests' own business).
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub redis_url: String,
    pub cache_size: usize,
    pub kafka_brokers: String,
    pub topic: String,
    pub partitions: i32,
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
        ClusterOpts {
            redis_url: services.redis_url(),
            cache_size: 500,
            kafka_brokers: services.kafka_brokers(),
            topic: format!("test.{tag}"),
            partitions: 3,
            group: format!("test-{tag}"),
            mongo_url: services.mongo_url(),
            database: format!("test_{tag}"),
            roles: vec!["persist".into(), "sweep".into()],
        }
    }

    fn to_toml(&self) -> String {
        format!(
            r#"
[redis]
url = "{redis}"
cache_size = {cache}

[kafka]
brokers = "{brokers}"
topic = "{topic}"
partitions = {partitions}
group = "{group}"

[mongo]
url = "{mongo}"
database = "{database}"
"#,
            redis = toml_escape(&self.redis_url),
            cache = self.cache_size,
            brokers = toml_escape(&self.kafka_brokers),
            topic = toml_escape(&self.topic),
            partitions = self.partitions,
            group = toml_escape(&self.group),
            mongo = toml_escape(&self.mongo_url),
            database = toml_escape(&self.database),
        )
    }
}

/// A short lowercase unique tag (a ULID) for names of topics, databases,
/// rooms and nodes.
pub fn unique_tag() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

fn toml_string_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", toml_escape(s)))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Where the local cluster services listen: 127.0.0.1 on the ports that
/// `scripts/services` uses (moved by the same REDIS_PORT, KAFKA_PORT and
/// MONGO_PORT variables).
#[derive(Clone, Copy, Debug)]
pub struct Services {
    pub redis_port: u16,
    pub kafka_port: u16,
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
        Services {
            redis_port: port("REDIS_PORT", 6379),
            kafka_port: port("KAFKA_PORT", 9092),
            mongo_port: port("MONGO_PORT", 27017),
        }
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    pub fn kafka_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn mongo_url(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.mongo_port)
    }

    /// Panics, saying how to start them, unless Redis, Kafka and MongoDB all
    /// accept TCP connections.
    pub async fn require(&self) {
        let mut down = Vec::new();
        for (name, port) in [
            ("Redis", self.redis_port),
            ("Kafka", self.kafka_port),
            ("MongoDB", self.mongo_port),
        ] {
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
            "cluster tests need the local services, but {} did not answer: run `scripts/services up` first",
            down.join(", ")
        );
    }
}

fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_scalable-chat")
}

/// A `Command` for the binary with no `SCALABLE_CHAT__*` variables inherited
/// from the environment running the tests.
pub fn base_command() -> Command {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("SCALABLE_CHAT__") {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// A reqwest client for talking to local nodes (never through a proxy).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One running (or stopped) node with its own data directory.
pub struct Node {
    pub opts: NodeOpts,
    pub dir: TempDir,
    pub port: u16,
    child: Option<Child>,
    http: reqwest::Client,
    /// How many times the process has been started; each start logs to its own file.
    starts: u32,
}

impl Node {
    /// Starts a node with default options.
    pub async fn start_default() -> Node {
        Node::start(NodeOpts::default()).await
    }

    /// Starts a cluster node `node_id` on the services and names of
    /// `cluster`, with the other options at their test defaults.
    pub async fn start_cluster(node_id: &str, cluster: &ClusterOpts) -> Node {
        Node::start(NodeOpts {
            node_id: node_id.to_string(),
            cluster: Some(cluster.clone()),
            ..NodeOpts::default()
        })
        .await
    }

    /// Starts a node and waits until `/healthz` answers 200.
    pub async fn start(opts: NodeOpts) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut node = Node {
            opts,
            dir,
            port: 0,
            child: None,
            http: http_client(),
            starts: 0,
        };
        node.spawn_and_wait().await;
        node
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("stderr-{n}.log"))
    }

    async fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "node already running");
        self.port = free_port();
        std::fs::write(
            self.config_path(),
            self.opts.to_toml(&self.data_dir(), self.port),
        )
        .unwrap();
        self.starts += 1;
        let stderr = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let stdout = stderr.try_clone().unwrap();
        let mut cmd = base_command();
        cmd.arg("--config")
            .arg(self.config_path())
            .envs(self.opts.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        self.child = Some(cmd.spawn().unwrap());
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let limit = self.opts.start_timeout();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    self.child = None;
                    panic!(
                        "node exited during start-up with {status}; log:\n{}",
                        self.log_tail()
                    );
                }
            }
            let ok = self
                .http
                .get(self.url("/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "node did not answer /healthz within {limit:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines the node wrote (all starts), for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            let _ = writeln!(out, "--- start #{n} ---");
            for line in &lines[from..] {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }

    /// Starts the node again on the same data directory (on a new port).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.sigterm().await;
            assert!(
                status.success(),
                "SIGTERM exit status {status}; log:\n{}",
                self.log_tail()
            );
        }
        self.spawn_and_wait().await;
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node not running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (at most 30 s) for the exit status.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.sigterm_within(Duration::from_secs(30)).await
    }

    pub async fn sigterm_within(&mut self, limit: Duration) -> ExitStatus {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node did not exit within {limit:?} after SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn origin(&self) -> String {
        self.base_url()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/ws?token={}",
            self.port,
            percent_encode(token)
        )
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `POST /api/v1/auth/guest`; panics unless it succeeds.
    pub async fn guest(&self, name: &str) -> (String, Value) {
        let resp = self
            .http
            .post(self.url("/api/v1/auth/guest"))
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "guest {name}: {status} {body}");
        let token = body["token"].as_str().expect("token string").to_string();
        assert!(!token.is_empty());
        let user = body["user"].clone();
        assert_eq!(user["name"], name, "guest body {body}");
        assert!(
            user["id"].as_str().is_some_and(|s| !s.is_empty()),
            "user id in {body}"
        );
        (token, user)
    }

    /// Opens a WebSocket and reads the `welcome` frame.
    pub async fn connect(&self, token: &str) -> Client {
        let (ws, _) = tokio::time::timeout(
            RECV_TIMEOUT,
            tokio_tungstenite::connect_async(self.ws_url(token)),
        )
        .await
        .expect("connect timed out")
        .expect("websocket connect failed");
        Client::welcomed(ws, RECV_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("no welcome frame: {e:?}"))
    }

    /// A guest user plus one connection.
    pub async fn user(&self, name: &str) -> (Client, Value, String) {
        let (token, user) = self.guest(name).await;
        let client = self.connect(&token).await;
        (client, user, token)
    }

    /// `GET path`: the status and the JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.http().get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("GET {path}: body is not JSON: {text:?}"));
        (status, body)
    }

    /// Tries a WebSocket upgrade with an optional Origin; returns the HTTP
    /// status of a refusal, or 101 when the upgrade succeeded.
    pub async fn try_upgrade(&self, url: &str, origin: Option<&str>) -> u16 {
        let mut req = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            req.headers_mut()
                .insert("Origin", HeaderValue::from_str(origin).unwrap());
        }
        let res = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .expect("upgrade timed out");
        match res {
            Ok((mut ws, resp)) => {
                let _ = ws.close(None).await;
                resp.status().as_u16()
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("upgrade failed without an HTTP status: {e}"),
        }
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// One sample of `/metrics`: the sum of all series named `name` whose
    /// labels contain every `label` (`code="bad_request"` style).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Polls `/metrics` until `name` sums to `value`; false after `within`.
    pub async fn wait_metric(&self, name: &str, value: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.metric(name, &[]).await == Some(value) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node log:\n{}", self.log_tail());
        }
        self.kill9();
    }
}

/// Sum of the samples of `name` whose label set contains all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value_part) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !labels.iter().all(|l| label_part.contains(l)) {
            continue;
        }
        let Some(v) = value_part.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What arrived on a WebSocket.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    /// A text frame that is not JSON, or a binary frame.
    Other(Message),
    /// A close frame (with its code and reason if any), or the stream ended.
    Closed(Option<CloseFrame<'static>>),
    /// The stream failed (reset and such).
    Error(String),
    Timeout,
}

/// A WebSocket client of the chat protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// WebSocket pings received from the server (answered automatically).
    pub pings_seen: u32,
}

impl Client {
    /// Wraps an upgraded WebSocket once its first frame, `welcome`, has
    /// arrived within `within`; otherwise what came instead.
    pub async fn welcomed(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        within: Duration,
    ) -> Result<Client, Event> {
        let mut client = Client {
            ws,
            welcome: Value::Null,
            pings_seen: 0,
        };
        match client.next_event(within).await {
            Event::Json(v) if v["op"] == "welcome" => {
                client.welcome = v;
                Ok(client)
            }
            other => Err(other),
        }
    }

    pub fn session(&self) -> String {
        self.welcome["session"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_raw(Message::Text(v.to_string())).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send_raw(Message::Text(s.to_string())).await;
    }

    pub async fn send_raw(&mut self, m: Message) {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(m))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next event within `dur` (control frames are skipped; pings counted).
    pub async fn next_event(&mut self, dur: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            match next {
                Err(_) => return Event::Timeout,
                Ok(None) => return Event::Closed(None),
                Ok(Some(Err(e))) => return Event::Error(e.to_string()),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Ping(_) => {
                        self.pings_seen += 1;
                        continue;
                    }
                    Message::Pong(_) => continue,
                    Message::Close(frame) => return Event::Closed(frame.map(|f| f.into_owned())),
                    Message::Text(ref t) => match serde_json::from_str::<Value>(t) {
                        Ok(v) => return Event::Json(v),
                        Err(_) => return Event::Other(msg),
                    },
                    other => return Event::Other(other),
                },
            }
        }
    }

    /// The next JSON frame within `dur`, or `None` on timeout; panics on close.
    pub async fn try_recv_json(&mut self, dur: Duration) -> Option<Value> {
        match self.next_event(dur).await {
            Event::Json(v) => Some(v),
            Event::Timeout => None,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next JSON frame (bounded by `RECV_TIMEOUT`).
    pub async fn recv_json(&mut self) -> Value {
        match self.try_recv_json(RECV_TIMEOUT).await {
            Some(v) => v,
            None => panic!("no frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Frames until one with `op`; returns it and the frames skipped before it.
    pub async fn recv_until_collect(&mut self, op: &str) -> (Value, Vec<Value>) {
        self.recv_until_pred(|v| v["op"] == op).await
    }

    /// Frames until one with `op` (others are dropped).
    pub async fn recv_until(&mut self, op: &str) -> Value {
        self.recv_until_collect(op).await.0
    }

    /// Frames until one matches `pred`; returns it and the skipped frames.
    pub async fn recv_until_pred(&mut self, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv_json(left).await {
                Some(v) if pred(&v) => return (v, skipped),
                Some(v) => skipped.push(v),
                None => panic!(
                    "awaited frame did not arrive within {RECV_TIMEOUT:?}; got instead: {}",
                    summarize(&skipped)
                ),
            }
        }
    }

    /// Asserts that no JSON frame arrives within `dur`.
    pub async fn expect_silence(&mut self, dur: Duration, what: &str) {
        if let Some(v) = self.try_recv_json(dur).await {
            panic!("expected no frame ({what}), got {v}");
        }
    }

    /// Reads for `dur` and asserts that no frame with one of `ops` arrives
    /// (other frames, such as presence, are allowed and dropped).
    pub async fn expect_none_of(&mut self, dur: Duration, ops: &[&str], what: &str) {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.try_recv_json(left).await {
                None => return,
                Some(v) => {
                    let op = v["op"].as_str().unwrap_or_default();
                    assert!(!ops.contains(&op), "expected no {ops:?} ({what}), got {v}");
                }
            }
        }
    }

    /// Reads until the connection closes; returns the close frame (if any),
    /// the JSON frames read before it, and whether it ended by an I/O error.
    pub async fn wait_close(&mut self, dur: Duration) -> (Option<CloseFrame<'static>>, Vec<Value>) {
        let deadline = Instant::now() + dur;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Json(v) => frames.push(v),
                Event::Other(_) => {}
                Event::Closed(f) => return (f, frames),
                Event::Error(e) => panic!(
                    "connection failed before a close frame arrived: {e}; {}",
                    summarize(&frames)
                ),
                Event::Timeout => panic!("connection not closed within {dur:?}"),
            }
        }
    }

    /// Sends `ping` with `t` and waits for the `pong` carrying the same `t`.
    /// Returns the frames that arrived before the pong.
    pub async fn ping(&mut self, t: i64) -> Vec<Value> {
        self.send_json(&json!({ "op": "ping", "t": t })).await;
        let (_, skipped) = self
            .recv_until_pred(|v| v["op"] == "pong" && v["t"] == t)
            .await;
        skipped
    }

    /// `join` and wait for `joined`.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send_json(&json!({ "op": "join", "room": room })).await;
        let (joined, _) = self
            .recv_until_pred(|v| v["op"] == "joined" && v["room"] == room)
            .await;
        joined
    }

    /// `join` with `since`; returns the replayed `msg` frames and `joined`.
    pub async fn join_since(&mut self, room: &str, since: u64) -> (Vec<Value>, Value) {
        self.send_json(&json!({ "op": "join", "room": room, "since": since }))
            .await;
        let (joined, skipped) = self
            .recv_until_pred(|v| v["op"] == "joined" && v["room"] == room)
            .await;
        let msgs = skipped
            .into_iter()
            .filter(|v| v["op"] == "msg" && v["room"] == room)
            .collect();
        (msgs, joined)
    }

    /// `send` and wait for both the `ack` and the echoed `msg` (in any order).
    pub async fn send_msg(&mut self, room: &str, text: &str, cid: &str) -> (Value, Value) {
        self.send_json(&json!({ "op": "send", "room": room, "text": text, "cid": cid }))
            .await;
        let mut ack = None;
        let mut msg = None;
        let deadline = Instant::now() + RECV_TIMEOUT;
        while ack.is_none() || msg.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(v) = self.try_recv_json(left).await else {
                panic!(
                    "send {cid}: no ack and msg within {RECV_TIMEOUT:?} (ack {ack:?}, msg {msg:?})"
                );
            };
            if v["op"] == "error" && v["ref"] == cid {
                panic!("send {cid} refused: {v}");
            }
            if v["op"] == "ack" && v["cid"] == cid && v["room"] == room {
                ack = Some(v);
            } else if v["op"] == "msg"
                && v["cid"] == cid
                && v["room"] == room
                && v["user"]["id"] == self.welcome["user"]["id"]
            {
                msg = Some(v);
            }
        }
        (ack.unwrap(), msg.unwrap())
    }

    /// `send` and wait for the `ack` only.
    pub async fn send_acked(&mut self, room: &str, text: &str, cid: &str) -> Value {
        self.send_json(&json!({ "op": "send", "room": room, "text": text, "cid": cid }))
            .await;
        let (v, _) = self
            .recv_until_pred(|v| {
                (v["op"] == "ack" && v["cid"] == cid) || (v["op"] == "error" && v["ref"] == cid)
            })
            .await;
        assert_eq!(v["op"], "ack", "send {cid}: {v}");
        v
    }

    /// Sends a frame that must be refused; returns the `error` frame and
    /// asserts that nothing was acked or delivered for it before the error.
    pub async fn expect_error(&mut self, frame: Message) -> Value {
        self.send_raw(frame).await;
        let (err, skipped) = self.recv_until_collect("error").await;
        for v in &skipped {
            assert!(
                v["op"] != "ack" && v["op"] != "msg",
                "a refused frame produced {v}"
            );
        }
        err
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.ws.close(None)).await;
    }
}

/// A short description of a list of frames (long texts shortened).
pub fn summarize(frames: &[Value]) -> String {
    let mut out = format!("{} frames", frames.len());
    let show = |v: &Value| {
        let s = v.to_string();
        if s.len() > 300 {
            format!("{}…", &s[..s.floor_char_boundary(300)])
        } else {
            s
        }
    };
    if let Some(first) = frames.first() {
        let _ = write!(out, ", first {}", show(first));
    }
    if frames.len() > 1 {
        let _ = write!(out, ", last {}", show(&frames[frames.len() - 1]));
    }
    out
}

/// Asserts the shape of a `msg` body (a frame or a history item).
pub fn assert_msg_shape(m: &Value) {
    assert!(m["room"].is_string(), "room in {m}");
    assert!(m["seq"].is_u64(), "seq in {m}");
    assert_ulid(&m["id"]);
    assert!(m["user"]["id"].is_string(), "user.id in {m}");
    assert!(m["user"]["name"].is_string(), "user.name in {m}");
    assert!(m["text"].is_string(), "text in {m}");
    assert!(m["ts"].is_i64() || m["ts"].is_u64(), "ts in {m}");
    assert!(m["cid"].is_string(), "cid in {m}");
}

const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Asserts `v` is a ULID string and returns its millisecond timestamp.
pub fn assert_ulid(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {v}"));
    assert_eq!(s.len(), 26, "ULID length of {s}");
    let mut ms: u64 = 0;
    for (i, c) in s.chars().enumerate() {
        let digit = CROCKFORD
            .find(c.to_ascii_uppercase())
            .unwrap_or_else(|| panic!("{s} is not Crockford base32"));
        if i < 10 {
            ms = ms * 32 + digit as u64;
        }
    }
    ms
}

/// The messages of a `history` frame or REST answer as (seq, id, cid) tuples.
pub fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("messages not a list: {messages}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Asserts strictly increasing.
pub fn assert_strictly_increasing(seqs: &[u64], what: &str) {
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "{what}: seq not strictly increasing: {seqs:?}");
    }
}

/// A map cid -> (seq, id) built from acks.
pub fn ack_map(acks: &[Value]) -> BTreeMap<String, (u64, String)> {
    let mut map = BTreeMap::new();
    for a in acks {
        let cid = a["cid"].as_str().unwrap().to_string();
        let seq = a["seq"].as_u64().unwrap();
        let id = a["id"].as_str().unwrap().to_string();
        assert!(
            map.insert(cid.clone(), (seq, id)).is_none(),
            "two acks for {cid}"
        );
    }
    map
}

/// Starts the binary with a hand-written config and expects it to stop with a
/// non-zero status within 15 s; returns what it wrote to stderr.
pub async fn start_expect_failure(config: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("stderr.log");
    let err = std::fs::File::create(&log).unwrap();
    let mut cmd = base_command();
    cmd.arg("--config")
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node kept running with a bad config; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "node exited 0 with a bad config; stderr:\n{output}"
    );
    output
}

/// A complete valid config (no [limits] section) for config tests.
pub fn minimal_config(dir: &Path, port: u16) -> String {
    format!(
        r#"[node]
id = "cfg-test"
data_dir = "{}"

[http]
bind = "127.0.0.1:{port}"
allowed_origins = ["http://127.0.0.1:{port}"]

[auth]
secret = "{SECRET}"
"#,
        toml_escape(&dir.join("data").display().to_string())
    )
}

impl Client {
    /// Sends `n` messages without waiting, then collects their `n` acks
    /// (frames other than acks are dropped). Panics on any refusal.
    pub async fn blast(&mut self, room: &str, prefix: &str, n: usize) -> Vec<Value> {
        for i in 0..n {
            let cid = format!("{prefix}-{i}");
            self.send_json(&json!({
                "op": "send", "room": room, "text": format!("message {cid}"), "cid": cid
            }))
            .await;
        }
        let mut acks = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(v) = self.try_recv_json(left).await else {
                panic!("only {} of {n} acks within 60 s", acks.len());
            };
            match v["op"].as_str() {
                Some("ack") if v["room"] == room => acks.push(v),
                Some("error") => panic!("send refused during blast: {v}"),
                _ => {}
            }
        }
        acks
    }

    /// Sends `history` and returns the `history` answer (or the `error`).
    pub async fn history(&mut self, room: &str, before: Option<u64>, limit: Option<u64>) -> Value {
        let mut frame = json!({ "op": "history", "room": room });
        if let Some(b) = before {
            frame["before"] = json!(b);
        }
        if let Some(l) = limit {
            frame["limit"] = json!(l);
        }
        self.send_json(&frame).await;
        let (v, _) = self
            .recv_until_pred(|v| {
                (v["op"] == "history" && v["room"] == room)
                    || (v["op"] == "error" && v["ref"] == "history")
            })
            .await;
        v
    }
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
