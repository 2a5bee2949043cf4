//! The HTTP edge: token buckets per client address over the REST API and
//! the WebSocket upgrade, and over guest sign-ins; tokens whose `sub` is no
//! user id; `/metrics` on a listener of its own; the refusal of a public
//! secret off loopback; and service passwords kept out of the log,
//! `/readyz` and error frames.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// A reqwest client whose connections come from the local address `source`.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// Asserts a `429` in the contract's shape with a `Retry-After` of whole
/// seconds, at least 1; returns those seconds.
async fn assert_429(resp: reqwest::Response, what: &str) -> u64 {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    assert_eq!(status, 429, "{what}: status (body {text})");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: error body is not JSON: {text:?}"));
    assert_eq!(body["error"]["code"], "rate_limited", "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    let secs: u64 = retry_after
        .unwrap_or_else(|| panic!("{what}: no Retry-After"))
        .parse()
        .unwrap_or_else(|e| panic!("{what}: Retry-After is not whole seconds: {e}"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
    secs
}

/// Every kind of request the address bucket covers, from `client`: the
/// status of each.
async fn every_route(node: &TestNode, client: &reqwest::Client, token: &str) -> Vec<(String, u16)> {
    let bearer = format!("Bearer {token}");
    let requests = [
        ("GET /rooms", client.get(node.url("/api/v1/rooms"))),
        (
            "GET history",
            client.get(node.url("/api/v1/rooms/lobby/messages")),
        ),
        (
            "GET /me",
            client
                .get(node.url("/api/v1/me"))
                .header("Authorization", &bearer),
        ),
        (
            "POST message",
            client
                .post(node.url("/api/v1/rooms/lobby/messages"))
                .header("Authorization", &bearer)
                .json(&json!({"text": "hi", "cid": unique_tag()})),
        ),
        (
            "POST guest",
            client
                .post(node.url("/api/v1/auth/guest"))
                .json(&json!({"name": "eve"})),
        ),
        ("GET unknown", client.get(node.url("/api/v1/nothing-here"))),
        (
            "GET /ws",
            client.get(node.ws_url(token).replacen("ws://", "http://", 1)),
        ),
    ];
    let mut out = Vec::new();
    for (what, req) in requests {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 429 {
            assert_429(resp, what).await;
        }
        out.push((what.to_string(), status));
    }
    out
}

#[tokio::test]
async fn a_burst_from_one_address_gets_429_with_retry_after_and_others_are_served() {
    let node = TestNode::start(NodeOpts {
        // The documented burst, refilled too slowly to matter here.
        address_rate_per_sec: 0.01,
        address_rate_burst: 60,
        ..NodeOpts::default()
    })
    .await;
    let (token, _) = node.guest("ann").await;
    let flooder = client_from("127.0.0.2");

    // 100 history reads in a burst: the first 60 are served.
    let mut statuses = Vec::new();
    let mut retry_after = 0;
    for _ in 0..100 {
        let resp = flooder
            .get(node.url("/api/v1/rooms/lobby/messages"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        if status == 429 {
            retry_after = assert_429(resp, "history read beyond the burst").await;
        }
        statuses.push(status);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 60, "{statuses:?}");
    assert!(statuses[60..].iter().all(|s| *s == 429), "{statuses:?}");
    // At 0.01 tokens a second, the next token is 100 s away.
    assert!(
        (90..=100).contains(&retry_after),
        "Retry-After {retry_after}"
    );

    // Every route and the upgrade are refused to that address now.
    for (what, status) in every_route(&node, &flooder, &token).await {
        assert_eq!(status, 429, "{what} from 127.0.0.2");
    }
    // What is not limited: health, readiness and metrics.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = flooder.get(node.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path} from 127.0.0.2");
    }

    // Another address is served as before.
    let other = client_from("127.0.0.3");
    for (what, status) in every_route(&node, &other, &token).await {
        let expected = match what.as_str() {
            "POST message" => 201,
            "GET unknown" => 404,
            // A plain GET without the upgrade headers passes the limits
            // and fails as a handshake.
            "GET /ws" => 400,
            _ => 200,
        };
        assert_eq!(status, expected, "{what} from 127.0.0.3");
    }
    // The WebSocket upgrade, too.
    let url = node.ws_url(&token);
    assert_eq!(node.try_upgrade(&url, None).await, 101, "from 127.0.0.1");
}

#[tokio::test]
async fn guest_sign_ins_are_limited_per_address_on_top_of_requests() {
    let node = TestNode::start(NodeOpts {
        signin_rate_per_sec: 0.01,
        signin_rate_burst: 10,
        ..NodeOpts::default()
    })
    .await;
    let sign_in = |client: reqwest::Client, name: &'static str| {
        let url = node.url("/api/v1/auth/guest");
        async move {
            client
                .post(url)
                .json(&json!({ "name": name }))
                .send()
                .await
                .unwrap()
        }
    };
    let flooder = client_from("127.0.0.2");
    // A refused name mints no user, and costs no sign-in.
    let resp = sign_in(flooder.clone(), "not a name").await;
    assert_eq!(resp.status(), 400);
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let resp = sign_in(flooder.clone(), "eve").await;
        let status = resp.status().as_u16();
        if status == 429 {
            assert_429(resp, "sign-in beyond the burst").await;
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..10], &[200; 10], "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");

    // The address may still read; another address may still sign in.
    let resp = flooder.get(node.url("/api/v1/rooms")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = sign_in(client_from("127.0.0.3"), "ann").await;
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------- tokens

/// A token signed with `secret` as the node signs them, for any claims.
fn sign(secret: &str, claims: &Value) -> String {
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{payload}.{sig}")
}

#[tokio::test]
async fn a_signed_token_whose_sub_is_not_a_user_id_is_refused() {
    let node = TestNode::start_default().await;
    let exp = now_ms() / 1000 + 3600;
    let me = |token: String| {
        let req = node
            .http()
            .get(node.url("/api/v1/me"))
            .header("Authorization", format!("Bearer {token}"));
        async move { req.send().await.unwrap() }
    };
    // The signing is right: a well-formed sub is accepted.
    let good = sign(SECRET, &json!({"sub": "u-1", "name": "eve", "exp": exp}));
    let resp = me(good.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["user"]["id"], "u-1");
    assert_eq!(node.try_upgrade(&node.ws_url(&good), None).await, 101);

    // A `:` would let the id shape another user's cid key.
    for sub in ["a:b", "a b", "a\u{0}b", ""] {
        let bad = sign(SECRET, &json!({"sub": sub, "name": "eve", "exp": exp}));
        let resp = me(bad.clone()).await;
        assert_eq!(resp.status(), 401, "/me with sub {sub:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert_eq!(
            node.try_upgrade(&node.ws_url(&bad), None).await,
            401,
            "/ws with sub {sub:?}"
        );
    }
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn metrics_bind_moves_metrics_to_their_own_listener() {
    let metrics_port = free_port();
    let node = TestNode::start(NodeOpts {
        metrics_bind: Some(format!("127.0.0.1:{metrics_port}")),
        ..NodeOpts::default()
    })
    .await;
    let resp = node.http().get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "/metrics on the main listener");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    let metrics = format!("http://127.0.0.1:{metrics_port}");
    let resp = node
        .http()
        .get(format!("{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert!(text.contains("scalable_chat_connections"), "{text}");
    // The metrics listener serves nothing else.
    for path in ["/healthz", "/api/v1/rooms", "/"] {
        let resp = node
            .http()
            .get(format!("{metrics}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path} on the metrics listener");
    }
    // The main listener serves the rest as before.
    let (status, _) = node.get_json("/api/v1/rooms").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_metrics_bind_the_main_listener_serves_metrics() {
    let node = TestNode::start_default().await;
    let text = node.metrics().await;
    assert!(text.contains("scalable_chat_connections"), "{text}");
}

// ---------------------------------------------------------------- secrets

/// A standalone config listening on every interface.
fn public_config(dir: &std::path::Path, port: u16, secret: &str) -> String {
    format!(
        r#"[node]
id = "edge-secret"
data_dir = "{}"

[http]
bind = "0.0.0.0:{port}"
allowed_origins = ["http://127.0.0.1:{port}"]

[auth]
secret = "{secret}"
"#,
        dir.join("data").display()
    )
}

#[tokio::test]
async fn a_node_off_loopback_refuses_the_shipped_secret_and_starts_with_a_random_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let output = start_expect_failure(
        &public_config(dir.path(), port, "dev-only-secret-change-me-0123456789"),
        &[],
    )
    .await;
    assert!(
        output.contains("auth.secret") && output.contains("openssl rand"),
        "{output}"
    );

    // The same config with 48 random bytes starts and serves.
    let secret: String = format!("{}{}", unique_tag(), unique_tag())[..48].to_string();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, public_config(dir.path(), port, &secret)).unwrap();
    let mut child = base_command()
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    let client = http_client();
    let healthy = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the node exited with {status} despite a random secret");
        }
        let ok = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok || Instant::now() > deadline {
            break ok;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        healthy,
        "the node with a random secret did not become healthy"
    );
}

/// Every way `password` could be written: as set, and percent-encoded.
fn forms(password: &str) -> Vec<String> {
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    vec![password.to_string(), encoded]
}

/// Panics if `text` (what `what` showed) holds a form of any password.
fn assert_no_password(text: &str, passwords: &[&str], what: &str) {
    for password in passwords {
        for form in forms(password) {
            assert!(
                !text.contains(&form),
                "{what} shows a password ({form}):\n{text}"
            );
        }
    }
}

/// Everything the node wrote, over all its starts.
fn full_log(node: &TestNode) -> String {
    let mut log = String::new();
    for entry in std::fs::read_dir(node.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            log.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    log
}

#[tokio::test]
async fn service_passwords_never_reach_the_log_readyz_or_frames() {
    let services = Services::local();
    services.require().await;
    let tag = unique_tag();
    let redis_pw = format!("redis-pw-{tag}/x@y");
    let mongo_pw = format!("mongo-pw-{tag}:z");
    let kafka_pw = format!("kafka-pw-{tag}");
    let passwords = [redis_pw.as_str(), mongo_pw.as_str(), kafka_pw.as_str()];
    let encode = |p: &str| forms(p).pop().unwrap();
    let env = vec![
        ("RUST_LOG".to_string(), "debug".to_string()),
        (
            "SCALABLE_CHAT__KAFKA__CLIENT".to_string(),
            format!(r#"{{ "sasl.password" = "{kafka_pw}" }}"#),
        ),
    ];

    // Refused at start: Redis has no password, so AUTH fails; and a
    // MongoDB that does not listen.
    let redis_host = services.redis_url().replacen("redis://", "", 1);
    let mut bad_redis = ClusterOpts::isolated();
    bad_redis.redis_url = format!("redis://:{}@{redis_host}", encode(&redis_pw));
    let mut bad_mongo = ClusterOpts::isolated();
    bad_mongo.mongo_url = format!(
        "mongodb://chat:{}@127.0.0.1:{}/?authSource=admin",
        encode(&mongo_pw),
        free_port()
    );
    for (what, cluster) in [("Redis", bad_redis), ("MongoDB", bad_mongo)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = NodeOpts {
            node_id: format!("edge-{}", unique_tag()),
            cluster: Some(cluster),
            ..NodeOpts::default()
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let output = start_expect_failure(&opts.to_toml(dir.path(), free_port()), &env).await;
        assert!(output.contains(what), "{what} not named:\n{output}");
        assert_no_password(&output, &passwords, &format!("start-up refused by {what}"));
    }

    // A running node with a password in its MongoDB URL (the test
    // services' FerretDB takes any PLAIN credentials) and an unused one in
    // its Kafka client.
    let mut cluster = ClusterOpts::isolated();
    cluster.mongo_url = format!(
        "mongodb://chat:{}@127.0.0.1:{}/?authSource=$external&authMechanism=PLAIN",
        encode(&mongo_pw),
        services.mongo_port
    );
    let mut node = TestNode::start(NodeOpts {
        node_id: format!("edge-{tag}"),
        cluster: Some(cluster),
        env: env.clone(),
        ..NodeOpts::default()
    })
    .await;
    let (status, ready) = node.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_no_password(&ready.to_string(), &passwords, "/readyz");
    let room = format!("edge-{tag}");
    let (mut a, _, _) = node.user("ann").await;
    a.join(&room).await;
    a.send_msg(&room, "hello", "c1").await;
    let mut frames = vec![
        a.expect_error(tokio_tungstenite::tungstenite::Message::Text(
            "not json".into(),
        ))
        .await,
    ];
    frames.push(a.history(&room, None, None).await);
    assert_no_password(&json!(frames).to_string(), &passwords, "the frames");
    a.close().await;
    node.sigterm().await;
    assert_no_password(&full_log(&node), &passwords, "the node's log");
}
