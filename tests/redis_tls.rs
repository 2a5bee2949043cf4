//! Redis over TLS (`rediss://`) with credentials in the URL, on one server
//! (`redis.cluster = false`) and on a Redis Cluster (`redis.cluster = true`).
//!
//! Each test makes its own certificate authority and a certificate for
//! 127.0.0.1 with the `openssl` command, and starts its own `redis-server`
//! processes (Redis 7 built with TLS) that listen on TLS only and require a
//! password: the `default` user's, and an ACL user's with characters that
//! must be percent-encoded in a URL. It checks that:
//!
//! - the library's `connect` with `redis.ca_file` runs commands and Lua
//!   scripts, through both logins (on a cluster, on every shard);
//! - two nodes, one logged in as each user, start, and their clients
//!   exchange messages, so the relay's pub/sub works over TLS too;
//! - no password appears in the nodes' logs, in `/readyz` or in the
//!   settings' `Debug`;
//! - a wrong password, a URL without TLS (with or without
//!   `redis.ca_file`) and a missing `redis.ca_file` (the system's roots do
//!   not know the test's authority) each stop the node at start-up within
//!   seconds, naming Redis, with no password in what it says.
//!
//! The nodes use the shared Kafka and MongoDB of `scripts/services`, under
//! a topic, consumer group and database of their own, removed when a test
//! passes. Every Redis process is killed when its test ends, and lives 15
//! minutes at most should the test process die without cleaning up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use scalable_chat::config::RedisSettings;
use scalable_chat::store::keys;
use scalable_chat::store::redis::RedisConn;
use scalable_chat::store::scripts::Scripts;
use tempfile::TempDir;

/// How long `openssl` or `redis-cli` may take for one command.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `redis-server` may take to accept connections.
const SERVER_START: Duration = Duration::from_secs(10);
/// How long a new cluster may take to report `cluster_state:ok`.
const CLUSTER_OK_WITHIN: Duration = Duration::from_secs(20);
/// How long the library's `connect` may take, its attempts included.
const CONNECT_WITHIN: Duration = Duration::from_secs(15);
/// How soon a node must give up on a Redis it cannot use.
const REFUSED_WITHIN: Duration = Duration::from_secs(10);
/// The longest a Redis process may live, should the test process die
/// without killing it.
const SERVER_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The ACL user next to `default`.
const ACL_USER: &str = "chat";

// ---------------------------------------------------------------- tools

/// Runs `program` in `dir` within [`TOOL_TIMEOUT`]; returns its stdout.
/// Panics with `install` as the hint when the program is missing, and
/// with its output when it fails.
async fn run_tool(
    program: &str,
    args: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
    install: &str,
) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Err(_) => panic!(
            "`{program} {}` did not finish within {TOOL_TIMEOUT:?}",
            args.join(" ")
        ),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {install}")
        }
        Ok(Err(e)) => panic!("cannot run `{program}`: {e}"),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{program} {}` failed with {}:\n{stdout}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

const INSTALL_OPENSSL: &str =
    "install the `openssl` package (the test makes its certificates with it)";
const INSTALL_REDIS: &str =
    "install the `redis-server` and `redis-tools` packages (Redis 7 built with TLS)";

/// A certificate authority and a certificate for 127.0.0.1 signed by it.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Runs `openssl` with `args` (split at spaces) in `dir`.
async fn openssl(dir: &Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    run_tool("openssl", &args, dir, &[], INSTALL_OPENSSL).await;
}

async fn make_pki(dir: &Path) -> Pki {
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(
        dir,
        &format!(
            "req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=scalable-chat-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    )
    .await;
    openssl(
        dir,
        &format!("req -new {key} -keyout server.key -out server.csr -subj /CN=127.0.0.1"),
    )
    .await;
    // A server certificate (also the cluster bus's client certificate)
    // that rustls accepts: for the IP address, and not a CA itself.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\n\
         basicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage = serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
         -extfile server.ext -out server.crt",
    )
    .await;
    Pki {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    }
}

/// Percent-encodes everything but unreserved characters, for a URL's
/// user info.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------- Redis

/// One `redis-server` process; killed (with the `timeout` above it) when
/// dropped.
struct RedisServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // `timeout` passes SIGTERM on to the server (which saves nothing)
        // and reaps it; should that take long, SIGKILL for the process
        // group, which holds both.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let group = format!("-{pid}");
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's own Redis: one server or a cluster of three masters, all on
/// TLS only, with two passwords.
struct TlsRedis {
    /// First, so that the servers go before their directory.
    servers: Vec<RedisServer>,
    dir: TempDir,
    pki: Pki,
    cluster: bool,
    /// The `default` user's password.
    password: String,
    /// [`ACL_USER`]'s, with `@`, `:` and `/` in it.
    user_password: String,
}

impl TlsRedis {
    async fn single() -> TlsRedis {
        TlsRedis::start(1, false).await
    }

    /// Three masters, no replicas, every slot assigned.
    async fn cluster() -> TlsRedis {
        let redis = TlsRedis::start(3, true).await;
        let nodes: Vec<String> = redis
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut args = redis.cli_tls();
        args.extend(["--cluster", "create"]);
        args.extend(nodes.iter().map(String::as_str));
        args.push("--cluster-yes");
        redis.cli(&args).await;
        redis.wait_cluster_ok().await;
        redis
    }

    async fn start(n: usize, cluster: bool) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        run_tool(
            "redis-server",
            &["--version"],
            dir.path(),
            &[],
            INSTALL_REDIS,
        )
        .await;
        run_tool("redis-cli", &["--version"], dir.path(), &[], INSTALL_REDIS).await;
        let pki = make_pki(dir.path()).await;
        let mut redis = TlsRedis {
            pki,
            cluster,
            servers: Vec::new(),
            password: format!("pw-{}", unique_tag()),
            user_password: format!("Ch@t:{}/pw", unique_tag()),
            dir,
        };
        for i in 0..n {
            let server = redis.start_server(i).await;
            redis.servers.push(server);
        }
        redis
    }

    /// Starts server `i` on free ports; tries new ones if another process
    /// took them meanwhile.
    async fn start_server(&self, i: usize) -> RedisServer {
        let home = self.dir.path().join(format!("redis-{i}"));
        std::fs::create_dir_all(&home).unwrap();
        let mut attempt = 1;
        loop {
            let port = free_port();
            let log = home.join(format!("redis-{attempt}.log"));
            let mut server = self.spawn_server(&home, port, &log);
            let deadline = Instant::now() + SERVER_START;
            let ready = loop {
                if let Some(status) = server.child.try_wait().unwrap() {
                    break Err(status);
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Ready to accept connections") {
                    break Ok(());
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server on {port} not ready within {SERVER_START:?}; log:\n{text}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match ready {
                Ok(()) => return server,
                Err(_) if attempt < 3 => attempt += 1,
                Err(status) => panic!(
                    "redis-server on {port} exited with {status}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
            drop(server);
        }
    }

    fn spawn_server(&self, home: &Path, port: u16, log: &Path) -> RedisServer {
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "--signal=KILL".into(),
            SERVER_LIFETIME.as_secs().to_string(),
            "redis-server".into(),
        ];
        let mut set = |option: &str, values: &[&str]| {
            args.push(format!("--{option}"));
            args.extend(values.iter().map(|v| v.to_string()));
        };
        set("bind", &["127.0.0.1"]);
        set("port", &["0"]);
        set("tls-port", &[&port.to_string()]);
        set("tls-cert-file", &[&path(&self.pki.cert)]);
        set("tls-key-file", &[&path(&self.pki.key)]);
        set("tls-ca-cert-file", &[&path(&self.pki.ca)]);
        set("tls-auth-clients", &["no"]);
        set("requirepass", &[&self.password]);
        let acl_password = format!(">{}", self.user_password);
        set(
            "user",
            &[ACL_USER, "on", &acl_password, "~*", "&*", "+@all"],
        );
        set("save", &[""]);
        set("appendonly", &["no"]);
        set("dir", &[&path(home)]);
        set("daemonize", &["no"]);
        set("logfile", &[""]);
        if self.cluster {
            let bus = free_port().to_string();
            set("cluster-enabled", &["yes"]);
            set("cluster-port", &[&bus]);
            set("cluster-config-file", &["nodes.conf"]);
            set("tls-cluster", &["yes"]);
            set("tls-replication", &["yes"]);
            set("masterauth", &[&self.password]);
        }
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new("timeout")
            .args(&args)
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server under `timeout`: {e}"));
        RedisServer {
            child,
            port,
            log: log.to_path_buf(),
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    fn cli_tls(&self) -> Vec<&str> {
        vec!["--tls", "--cacert", self.pki.ca.to_str().unwrap()]
    }

    /// `redis-cli` as `default`, the password passed outside its arguments.
    async fn cli(&self, args: &[&str]) -> String {
        run_tool(
            "redis-cli",
            args,
            self.dir.path(),
            &[("REDISCLI_AUTH", &self.password)],
            INSTALL_REDIS,
        )
        .await
    }

    async fn wait_cluster_ok(&self) {
        let deadline = Instant::now() + CLUSTER_OK_WITHIN;
        for port in self.ports() {
            let port = port.to_string();
            loop {
                let mut args = self.cli_tls();
                args.extend(["-h", "127.0.0.1", "-p", &port, "CLUSTER", "INFO"]);
                let info = self.cli(&args).await;
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster is not ok on {port} within {CLUSTER_OK_WITHIN:?}:\n{info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The `default` user's login, as a URL's user info.
    fn default_login(&self) -> String {
        format!(":{}", encode(&self.password))
    }

    /// [`ACL_USER`]'s login, as a URL's user info.
    fn user_login(&self) -> String {
        format!("{ACL_USER}:{}", encode(&self.user_password))
    }

    /// The node's settings for this Redis, every server a seed.
    fn settings(&self, scheme: &str, login: &str, ca: bool) -> RedisSettings {
        let urls: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("{scheme}://{login}@127.0.0.1:{p}"))
            .collect();
        RedisSettings {
            url: urls[0].clone(),
            cluster: self.cluster,
            urls: urls[1..].to_vec(),
            ca_file: ca.then(|| self.pki.ca.clone()),
            cache_size: 500,
            cid_ttl_secs: 3600,
            room_idle_ttl_secs: 30 * 24 * 3600,
        }
    }

    /// The passwords as they may leak: as set, and as written in a URL.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        for p in [&self.password, &self.user_password] {
            secrets.push(p.clone());
            secrets.push(encode(p));
        }
        secrets
    }

    /// The logs of every server, for failure messages.
    fn server_logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(20);
                format!("--- redis {} ---\n{}\n", s.port, lines[from..].join("\n"))
            })
            .collect()
    }
}

/// Panics if `text` (what `what` showed) holds any of `secrets`.
fn assert_no_secret(text: &str, secrets: &[String], what: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows a Redis password ({secret}):\n{text}"
        );
    }
}

// ---------------------------------------------------------------- checks

/// The library connects as `default` and as [`ACL_USER`].
async fn library_works(redis: &TlsRedis) {
    let default = redis.settings("rediss", &redis.default_login(), true);
    library_connects(redis, &default, "default").await;
    let user = redis.settings("rediss", &redis.user_login(), true);
    library_connects(redis, &user, ACL_USER).await;
}

/// The library connects with `settings` and runs a command and a script;
/// on a cluster, the script's rooms are spread so that every shard runs
/// one.
async fn library_connects(redis: &TlsRedis, settings: &RedisSettings, who: &str) {
    assert_no_secret(
        &format!("{settings:?}"),
        &redis.secrets(),
        "RedisSettings' Debug",
    );
    let mut conn = tokio::time::timeout(
        CONNECT_WITHIN,
        scalable_chat::store::redis::connect(settings),
    )
    .await
    .unwrap_or_else(|_| panic!("connect as {who} took over {CONNECT_WITHIN:?}"))
    .unwrap_or_else(|e| panic!("connect as {who}: {e:?}\n{}", redis.server_logs()));

    let key = format!("tls-test:{who}");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("over TLS")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("SET as {who}: {e}"));
    let got: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(got, "over TLS");

    let scripts = Scripts::default();
    let rooms: Vec<String> = (0..12).map(|i| format!("tls-{who}-{i}")).collect();
    for (i, room) in rooms.iter().enumerate() {
        let floor = 40 + i as u64;
        let seq = scripts
            .seed(&mut conn, room, floor)
            .await
            .unwrap_or_else(|e| panic!("seed.lua as {who} in {room}: {e:?}"));
        assert_eq!(seq, floor, "seed.lua as {who} in {room}");
        // The script ran on the server: a lower floor leaves the seq.
        assert_eq!(scripts.seed(&mut conn, room, 1).await.unwrap(), floor);
    }

    if redis.cluster {
        let shards = shards(&mut conn).await;
        let mut hit = BTreeSet::new();
        for room in &rooms {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(keys::seq(room))
                .query_async(&mut conn)
                .await
                .unwrap();
            let (_, _, port) = shards
                .iter()
                .find(|(from, to, _)| (*from..=*to).contains(&slot))
                .unwrap_or_else(|| panic!("slot {slot} in no shard of {shards:?}"));
            hit.insert(*port);
        }
        let all: BTreeSet<u16> = redis.ports().into_iter().collect();
        assert_eq!(hit, all, "the rooms' scripts must have run on every shard");
    }
}

/// `CLUSTER SLOTS` as (first slot, last slot, port of the master).
async fn shards(conn: &mut RedisConn) -> Vec<(i64, i64, u16)> {
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .unwrap();
    ranges
        .into_iter()
        .map(|range| {
            let from: i64 = redis::from_redis_value_ref(&range[0]).unwrap();
            let to: i64 = redis::from_redis_value_ref(&range[1]).unwrap();
            let master: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).unwrap();
            let port: u16 = redis::from_redis_value_ref(&master[1]).unwrap();
            (from, to, port)
        })
        .collect()
}

/// The node's settings for `redis`'s `settings`, on the shared Kafka and
/// MongoDB names of `base`.
fn node_opts(base: &ClusterOpts, settings: &RedisSettings) -> ClusterOpts {
    ClusterOpts {
        redis_url: settings.url.clone(),
        redis_cluster: settings.cluster,
        redis_urls: settings.urls.clone(),
        redis_ca_file: settings.ca_file.clone(),
        ..base.clone()
    }
}

/// Everything a node wrote, all its starts.
fn node_log(node: &TestNode) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(node.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("stderr-") {
            text.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    text
}

/// Two nodes, one logged in as `default` and one as [`ACL_USER`], relay
/// messages both ways, are ready, and show no password.
async fn nodes_relay(redis: &TlsRedis) {
    Services::local().require().await;
    let base = ClusterOpts::isolated();
    let a_opts = node_opts(
        &base,
        &redis.settings("rediss", &redis.default_login(), true),
    );
    let b_opts = node_opts(&base, &redis.settings("rediss", &redis.user_login(), true));
    let tag = unique_tag();
    let (a_id, b_id) = (format!("tls-{tag}-a"), format!("tls-{tag}-b"));
    let (a, b) = tokio::join!(
        TestNode::start_cluster(&a_id, &a_opts),
        TestNode::start_cluster(&b_id, &b_opts),
    );

    let room = format!("tls-{tag}");
    let (mut ann, ua, _) = a.user("ann").await;
    let (mut bob, ub, _) = b.user("bob").await;
    ann.join(&room).await;
    bob.join(&room).await;
    let (ack, _) = ann.send_msg(&room, "hello over TLS", "a-1").await;
    let (got, _) = bob
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "a-1")
        .await;
    assert_eq!(got["user"]["id"], ua["id"], "{got}");
    assert_eq!(got["text"], "hello over TLS", "{got}");
    assert_eq!(
        (&got["seq"], &got["id"]),
        (&ack["seq"], &ack["id"]),
        "{got}"
    );
    let (ack, _) = bob.send_msg(&room, "and back", "b-1").await;
    let (got, _) = ann
        .recv_until_pred(|v| v["op"] == "msg" && v["cid"] == "b-1")
        .await;
    assert_eq!(got["user"]["id"], ub["id"], "{got}");
    assert_eq!(
        (&got["seq"], &got["id"]),
        (&ack["seq"], &ack["id"]),
        "{got}"
    );

    let secrets = redis.secrets();
    for node in [&a, &b] {
        let (status, body) = node.get_json("/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dependencies"]["redis"], "ok", "{body}");
        assert_no_secret(&body.to_string(), &secrets, "/readyz");
        let log = node_log(node);
        assert!(log.contains("listening on"), "node log:\n{log}");
        assert_no_secret(&log, &secrets, "the node's log");
    }

    ann.close().await;
    bob.close().await;
    drop((a, b));
    forget_services(&base).await;
}

/// Removes the test's topic, consumer group and database; failures are
/// only reported (the test has passed by then).
async fn forget_services(opts: &ClusterOpts) {
    let work = async {
        if let Err(e) = mongo_client(opts)
            .await
            .database(&opts.database)
            .drop()
            .await
        {
            eprintln!("cleanup: dropping {}: {e}", opts.database);
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &opts.kafka_brokers)
            .create()
            .expect("Kafka admin client");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = admin.delete_topics(&[&opts.topic], &options).await {
            eprintln!("cleanup: deleting topic {}: {e}", opts.topic);
        }
        let _ = admin.delete_groups(&[&opts.group], &options).await;
    };
    if tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .is_err()
    {
        eprintln!("cleanup did not finish within 30 s");
    }
}

/// A node given `settings` exits at start-up within [`REFUSED_WITHIN`],
/// naming Redis and no password; returns its error line.
async fn node_refuses(
    redis: &TlsRedis,
    settings: &RedisSettings,
    case: &str,
    wrong_password: Option<&str>,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let opts = NodeOpts {
        node_id: format!("tls-refused-{}", unique_tag()),
        cluster: Some(node_opts(&ClusterOpts::isolated(), settings)),
        ..NodeOpts::default()
    };
    let config = opts.to_toml(&dir.path().join("data"), free_port());
    let started = Instant::now();
    let output = start_expect_failure(&config, &[]).await;
    let took = started.elapsed();
    assert!(
        took < REFUSED_WITHIN,
        "with {case} the node took {took:?} to give up (at most {REFUSED_WITHIN:?}):\n{output}"
    );
    let error = output
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("with {case} the node said no `error:` line:\n{output}"))
        .to_string();
    assert!(
        error.contains("cannot reach redis"),
        "with {case} the node's error must name Redis: {error}\n{output}"
    );
    let mut secrets = redis.secrets();
    secrets.extend(wrong_password.map(str::to_string));
    assert_no_secret(&output, &secrets, &format!("the node's output with {case}"));
    error
}

/// A wrong password, a URL without TLS, and no `redis.ca_file` each stop
/// the node at start-up; so does a `redis.ca_file` with a URL without TLS.
async fn nodes_refuse(redis: &TlsRedis) {
    let wrong = format!("wrong-{}", unique_tag());
    for (user, login) in [
        ("default", format!(":{wrong}")),
        (ACL_USER, format!("{ACL_USER}:{wrong}")),
    ] {
        let settings = redis.settings("rediss", &login, true);
        let case = format!("a wrong password for {user}");
        let error = node_refuses(redis, &settings, &case, Some(&wrong)).await;
        assert!(
            error.to_ascii_lowercase().contains("authentication failed")
                || error.contains("WRONGPASS"),
            "a wrong password must be named as such: {error}"
        );
    }
    let settings = redis.settings("redis", &redis.default_login(), false);
    node_refuses(redis, &settings, "a URL without TLS", None).await;
    // A CA file with a URL without TLS contradicts itself: refused alike
    // on one server and on a cluster (where redis-rs would use TLS anyway).
    let settings = redis.settings("redis", &redis.default_login(), true);
    let error = node_refuses(redis, &settings, "redis.ca_file and a redis:// URL", None).await;
    assert!(
        error.contains("rediss://"),
        "redis.ca_file with a redis:// URL must be refused as such: {error}"
    );
    let settings = redis.settings("rediss", &redis.default_login(), false);
    let error = node_refuses(redis, &settings, "no redis.ca_file for a private CA", None).await;
    assert!(
        error.to_ascii_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "an untrusted certificate must be named as such: {error}"
    );
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn one_server_over_tls_with_passwords_serves_the_library_and_relays_between_nodes() {
    let redis = TlsRedis::single().await;
    library_works(&redis).await;
    nodes_relay(&redis).await;
}

#[tokio::test]
async fn one_server_over_tls_refuses_a_node_with_wrong_credentials_or_tls_settings() {
    let redis = TlsRedis::single().await;
    nodes_refuse(&redis).await;
}

#[tokio::test]
async fn a_cluster_over_tls_with_passwords_serves_the_library_and_relays_between_nodes() {
    let redis = TlsRedis::cluster().await;
    library_works(&redis).await;
    nodes_relay(&redis).await;
}

#[tokio::test]
async fn a_cluster_over_tls_refuses_a_node_with_wrong_credentials_or_tls_settings() {
    let redis = TlsRedis::cluster().await;
    nodes_refuse(&redis).await;
}
