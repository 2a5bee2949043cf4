//! The node under test: `NodeOpts` and the config file written from them,
//! `TestNode` (one `scalable-chat` child process with its own data directory,
//! spoken to over HTTP), and the helpers for starting the binary by hand and
//! reading its metrics.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::client::{TestClient, RECV_TIMEOUT};
use super::services::ClusterOpts;

/// How long the node may take to answer `/healthz` after being spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The secret every test node uses unless a test overrides it.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// How long a cluster node may take to answer `/healthz` after being spawned.
pub const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(60);

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
    pub fanout_window_ms: u64,
    pub user_rate_per_sec: f64,
    pub user_rate_burst: u64,
    pub max_connections_per_address: u64,
    pub ping_cost: f64,
    pub typing_interval_ms: u64,
    pub room_create_cost: u64,
    pub new_rooms_per_hour: u64,
    pub address_rate_per_sec: f64,
    pub address_rate_burst: u64,
    pub signin_rate_per_sec: f64,
    pub signin_rate_burst: u64,
    /// `http.metrics_bind`, written only when set.
    pub metrics_bind: Option<String>,
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
            fanout_window_ms: 10,
            // Like the per-connection limit: high, tested on its own.
            user_rate_per_sec: 100_000.0,
            user_rate_burst: 100_000,
            max_connections_per_address: 1024,
            // The defaults, but the per-address and new-room limits: tests
            // sign in many guests and open many rooms from 127.0.0.1; each
            // of these limits has its own test.
            ping_cost: 0.25,
            typing_interval_ms: 3000,
            room_create_cost: 10,
            new_rooms_per_hour: 100_000,
            address_rate_per_sec: 100_000.0,
            address_rate_burst: 100_000,
            signin_rate_per_sec: 100_000.0,
            signin_rate_burst: 100_000,
            metrics_bind: None,
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
{metrics_bind}
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
fanout_window_ms = {fanout_window}
user_rate_per_sec = {user_rate:?}
user_rate_burst = {user_burst}
max_connections_per_address = {per_address}
ping_cost = {ping_cost:?}
typing_interval_ms = {typing}
room_create_cost = {create_cost}
new_rooms_per_hour = {new_rooms}
address_rate_per_sec = {addr_rate:?}
address_rate_burst = {addr_burst}
signin_rate_per_sec = {signin_rate:?}
signin_rate_burst = {signin_burst}
"#,
            node_id = self.node_id,
            data_dir = toml_escape(&data_dir.display().to_string()),
            port = port,
            metrics_bind = match &self.metrics_bind {
                Some(bind) => format!("metrics_bind = \"{}\"\n", toml_escape(bind)),
                None => String::new(),
            },
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
            fanout_window = self.fanout_window_ms,
            user_rate = self.user_rate_per_sec,
            user_burst = self.user_rate_burst,
            per_address = self.max_connections_per_address,
            ping_cost = self.ping_cost,
            typing = self.typing_interval_ms,
            create_cost = self.room_create_cost,
            new_rooms = self.new_rooms_per_hour,
            addr_rate = self.address_rate_per_sec,
            addr_burst = self.address_rate_burst,
            signin_rate = self.signin_rate_per_sec,
            signin_burst = self.signin_rate_burst,
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

pub(super) fn toml_string_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", toml_escape(s)))
        .collect();
    format!("[{}]", quoted.join(", "))
}

pub(super) fn toml_escape(s: &str) -> String {
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

/// One running (or stopped) node with its own data directory.
pub struct TestNode {
    pub opts: NodeOpts,
    pub dir: TempDir,
    pub port: u16,
    child: Option<Child>,
    http: reqwest::Client,
    /// How many times the process has been started; each start logs to its own file.
    starts: u32,
}

impl TestNode {
    /// Starts a node with default options.
    pub async fn start_default() -> TestNode {
        TestNode::start(NodeOpts::default()).await
    }

    /// Starts a cluster node `node_id` on the services and names of
    /// `cluster`, with the other options at their test defaults.
    pub async fn start_cluster(node_id: &str, cluster: &ClusterOpts) -> TestNode {
        TestNode::start(NodeOpts {
            node_id: node_id.to_string(),
            cluster: Some(cluster.clone()),
            ..NodeOpts::default()
        })
        .await
    }

    /// Starts a node and waits until `/healthz` answers 200.
    pub async fn start(opts: NodeOpts) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut node = TestNode {
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
    pub async fn connect(&self, token: &str) -> TestClient {
        let (ws, _) = tokio::time::timeout(
            RECV_TIMEOUT,
            tokio_tungstenite::connect_async(self.ws_url(token)),
        )
        .await
        .expect("connect timed out")
        .expect("websocket connect failed");
        TestClient::welcomed(ws, RECV_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("no welcome frame: {e:?}"))
    }

    /// A guest user plus one connection.
    pub async fn user(&self, name: &str) -> (TestClient, Value, String) {
        let (token, user) = self.guest(name).await;
        let client = self.connect(&token).await;
        (client, user, token)
    }

    /// `GET path`: the status and the JSON body.
    /// `POST /api/v1/rooms/{room}/messages` with a bearer token: the
    /// status and the body (JSON, or the text as a JSON string).
    pub async fn post_message(
        &self,
        token: &str,
        room: &str,
        text: &str,
        cid: &str,
    ) -> (u16, Value) {
        let resp = self
            .http()
            .post(self.url(&format!("/api/v1/rooms/{room}/messages")))
            .bearer_auth(token)
            .json(&serde_json::json!({ "text": text, "cid": cid }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

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

impl Drop for TestNode {
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

/// Starts the binary with a hand-written config and `env`, and waits up to
/// `within` for it to exit; returns its status and everything it wrote
/// (stdout and stderr). Panics, with that output, if it is still running.
pub async fn run_to_exit(
    config: &str,
    env: &[(&str, &str)],
    within: Duration,
) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("output.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = base_command()
        .arg("--config")
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the node still ran after {within:?}; its output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Starts the binary with a hand-written config and expects it to stop with a
/// non-zero status within 15 s; returns what it wrote.
pub async fn start_expect_failure(config: &str, env: &[(&str, &str)]) -> String {
    let (status, output) = run_to_exit(config, env, Duration::from_secs(15)).await;
    assert!(
        !status.success(),
        "node exited 0 with a bad config; its output:\n{output}"
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

/// The resident set size of process `pid`, in bytes (`VmRSS` of
/// `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}
