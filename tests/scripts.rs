//! The Lua scripts of cluster mode against a real Redis, through their typed
//! calls: a room is seeded before its first seq and its seq never goes
//! down; a cid is accepted once and its later attempts learn its fate; a
//! cid is forgotten on time however busy its room, and one remembered by
//! older nodes is still recognised; a message is published once, and one
//! that comes late goes out under a new seq; an open gap is found while it
//! may still fill; the persisted watermark only rises.
//!
//! Needs Redis (`scripts/services up`); `make test` starts it. Each test
//! uses rooms of its own and deletes their keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use scalable_chat::protocol::{now_ms, ChatMessage, User};
use scalable_chat::store::channel::RoomEvent;
use scalable_chat::store::keys;
use scalable_chat::store::redis::{Publish, RedisConn};
use scalable_chat::store::scripts::{
    cid_field, text_digest, Accept, DeliverArgs, Delivery, Remembered, Scripts, Stamp,
};

async fn redis() -> RedisConn {
    common::Services::local().redis().await
}

/// How the node publishes on this topology.
fn publish() -> Publish {
    Publish::of(&common::Services::local().redis_settings())
}

/// Deletes the room's keys, its cid buckets of the last hour (the longest
/// cid lifetime these tests use) included.
async fn delete_room(conn: &mut RedisConn, room: &str) {
    let buckets = keys::live_cid_buckets(room, now_ms() as u64 / 1000, 3600);
    let _: () = redis::cmd("DEL")
        .arg(&keys::of_room(room)[..])
        .arg(buckets)
        .query_async(conn)
        .await
        .expect("DEL");
}

/// The text the tests send under `cid`.
fn text_of(cid: &str) -> String {
    format!("text of {cid}")
}

fn message(room: &str, stamp: &Stamp, cid: &str) -> ChatMessage {
    ChatMessage {
        room: room.into(),
        seq: stamp.seq,
        id: stamp.id.clone(),
        user: User {
            id: "u1".into(),
            name: "ann".into(),
        },
        text: text_of(cid),
        ts: stamp.ts,
        cid: cid.into(),
    }
}

/// Publishes `m` with `late_ms` as the script's lateness bound.
async fn deliver(
    scripts: &Scripts,
    conn: &mut RedisConn,
    m: &ChatMessage,
    late_ms: u64,
) -> Delivery {
    let event = RoomEvent::Msg {
        node: "n1".into(),
        m: m.clone(),
    };
    let args = DeliverArgs {
        message: m,
        message_json: serde_json::to_string(m).unwrap(),
        event_json: serde_json::to_string(&event).unwrap(),
        cache_size: 500,
        trim_margin: 100,
        late_ms,
        cid_ttl_secs: 600,
        publish: publish(),
    };
    scripts.deliver(conn, args).await.expect("deliver")
}

#[tokio::test]
async fn a_room_is_seeded_once_and_its_seq_never_goes_down() {
    let mut conn = redis().await;
    let scripts = Scripts::default();
    let room = format!("scripts-{}", common::unique_tag());
    let field = cid_field("u1", "c1");
    let ts = now_ms();
    let first = scripts
        .accept(&mut conn, &room, &field, "id-1", ts, "hello", 600)
        .await;
    assert_eq!(first.ok(), Some(Accept::Unseeded));
    assert_eq!(scripts.seed(&mut conn, &room, 10).await.ok(), Some(10));
    assert_eq!(scripts.seed(&mut conn, &room, 4).await.ok(), Some(10));
    let accepted = scripts
        .accept(&mut conn, &room, &field, "id-1", ts, "hello", 600)
        .await;
    let stamp = Stamp {
        seq: 11,
        id: "id-1".into(),
        ts,
    };
    assert_eq!(accepted.ok(), Some(Accept::New(stamp.clone())));
    // Another attempt, with the id and ts it would have had: the first's,
    // with the digest of the first's text.
    let again = scripts
        .accept(&mut conn, &room, &field, "id-2", ts + 1000, "hullo", 600)
        .await;
    let prior = Remembered {
        stamp,
        digest: Some(text_digest("hello")),
    };
    assert_eq!(again.ok(), Some(Accept::Pending(prior)));
    delete_room(&mut conn, &room).await;
}

#[tokio::test]
async fn a_cid_is_published_once_and_a_late_message_gets_a_new_seq() {
    let mut conn = redis().await;
    let scripts = Scripts::default();
    let room = format!("scripts-{}", common::unique_tag());
    scripts.seed(&mut conn, &room, 0).await.expect("seed");
    let accept = |cid: &'static str, id: &'static str| {
        let field = cid_field("u1", cid);
        let room = room.clone();
        let scripts = &scripts;
        let mut conn = conn.clone();
        async move {
            let text = text_of(cid);
            match scripts
                .accept(&mut conn, &room, &field, id, now_ms(), &text, 600)
                .await
            {
                Ok(Accept::New(stamp)) => message(&room, &stamp, cid),
                other => panic!("expected a new message, got {other:?}"),
            }
        }
    };
    let one = accept("c1", "id-1").await;
    let two = accept("c2", "id-2").await;
    let three = accept("c3", "id-3").await;
    assert_eq!([one.seq, two.seq, three.seq], [1, 2, 3]);

    assert_eq!(
        deliver(&scripts, &mut conn, &one, 500).await,
        Delivery::Published
    );
    assert_eq!(
        deliver(&scripts, &mut conn, &one, 500).await,
        Delivery::Earlier(1),
        "a second publish of a cid publishes nothing"
    );
    let field = cid_field("u1", "c1");
    let repeat = scripts
        .accept(&mut conn, &room, &field, "x", now_ms(), "x", 600)
        .await;
    assert!(matches!(repeat, Ok(Accept::Published(p)) if p.stamp.seq == 1 && p.stamp.id == "id-1"));

    // 3 goes out before 2, and 2 comes "late" (any delay counts with a
    // bound of 0 ms): it is published under the room's next seq, 4.
    assert_eq!(
        deliver(&scripts, &mut conn, &three, 500).await,
        Delivery::Published
    );
    let gap = scripts
        .open_gap(&mut conn, &room, 60_000)
        .await
        .expect("gap");
    assert_eq!(gap, Some(1), "2 is missing and may still come");
    assert_eq!(
        deliver(&scripts, &mut conn, &two, 0).await,
        Delivery::Resequenced(4)
    );
    let field = cid_field("u1", "c2");
    let repeat = scripts
        .accept(&mut conn, &room, &field, "x", now_ms(), "x", 600)
        .await;
    assert!(
        matches!(repeat, Ok(Accept::Resequenced(p)) if p.stamp.seq == 4 && p.stamp.id == "id-2")
    );
    let cached: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(keys::recent(&room))
        .arg(4)
        .arg(4)
        .query_async(&mut conn)
        .await
        .expect("cache");
    let stored: ChatMessage = serde_json::from_str(&cached[0]).expect("cached JSON");
    assert_eq!((stored.seq, stored.id.as_str()), (4, "id-2"));
    assert_eq!(
        scripts.open_gap(&mut conn, &room, 0).await.expect("gap"),
        None,
        "no gap may fill within 0 ms"
    );
    delete_room(&mut conn, &room).await;
}

#[tokio::test]
async fn the_persisted_watermark_only_rises() {
    let mut conn = redis().await;
    let scripts = Scripts::default();
    let room = format!("scripts-{}", common::unique_tag());
    assert_eq!(
        scripts.raise_watermark(&mut conn, &room, 5).await.ok(),
        Some(5)
    );
    assert_eq!(
        scripts.raise_watermark(&mut conn, &room, 3).await.ok(),
        Some(5)
    );
    assert_eq!(
        scripts.raise_watermark(&mut conn, &room, 8).await.ok(),
        Some(8)
    );
    delete_room(&mut conn, &room).await;
}

/// Accepts `cid` as a new message of `room` and publishes it.
async fn send(scripts: &Scripts, conn: &mut RedisConn, room: &str, cid: &str, ttl: u64) -> u64 {
    let field = cid_field("u1", cid);
    let id = ulid::Ulid::new().to_string();
    let text = text_of(cid);
    let accepted = scripts
        .accept(conn, room, &field, &id, now_ms(), &text, ttl)
        .await;
    let Ok(Accept::New(stamp)) = accepted else {
        panic!("{cid}: expected a new message, got {accepted:?}");
    };
    let m = message(room, &stamp, cid);
    let event = RoomEvent::Msg {
        node: "n1".into(),
        m: m.clone(),
    };
    let args = DeliverArgs {
        message: &m,
        message_json: serde_json::to_string(&m).unwrap(),
        event_json: serde_json::to_string(&event).unwrap(),
        cache_size: 500,
        trim_margin: 100,
        late_ms: 500,
        cid_ttl_secs: ttl,
        publish: publish(),
    };
    let delivered = scripts.deliver(conn, args).await.expect("deliver");
    assert_eq!(delivered, Delivery::Published, "{cid}");
    stamp.seq
}

/// Keeps `room` busy, one new message every 250 ms, until `until` after
/// `t0`; answers how many it sent.
async fn keep_busy(
    scripts: &Scripts,
    conn: &mut RedisConn,
    room: &str,
    ttl: u64,
    t0: Instant,
    until: Duration,
) -> usize {
    let mut sent = 0;
    while t0.elapsed() < until {
        let cid = format!("other-{}", common::unique_tag());
        send(scripts, conn, room, &cid, ttl).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sent
}

/// A cid is remembered `ttl` at least and 1.5 `ttl` at most after its first
/// acceptance, however many messages the room accepts meanwhile: with a
/// 4 s lifetime, a cid is a repeat 3 s later and new again after 6 s,
/// while the room took a message every 250 ms throughout.
#[tokio::test]
async fn a_cid_is_forgotten_on_time_however_busy_its_room() {
    const TTL: u64 = 4;
    let mut conn = redis().await;
    let scripts = Scripts::default();
    let room = format!("scripts-{}", common::unique_tag());
    scripts.seed(&mut conn, &room, 0).await.expect("seed");
    let field = cid_field("u1", "x");
    let t0 = Instant::now();
    let first = send(&scripts, &mut conn, &room, "x", TTL).await;

    let mut others = keep_busy(&scripts, &mut conn, &room, TTL, t0, secs(TTL - 1)).await;
    let still = scripts
        .accept(&mut conn, &room, &field, "id-2", now_ms(), "x", TTL)
        .await
        .expect("accept");
    assert!(
        t0.elapsed() < secs(TTL),
        "the machine stalled past the cid's lifetime; nothing to conclude"
    );
    assert!(
        matches!(&still, Accept::Published(p) if p.stamp.seq == first),
        "{TTL} s lifetime, {:?} after: {still:?}",
        t0.elapsed()
    );

    let forgotten = Duration::from_millis(TTL * 1500 + 300);
    others += keep_busy(&scripts, &mut conn, &room, TTL, t0, forgotten).await;
    let again = scripts
        .accept(&mut conn, &room, &field, "id-3", now_ms(), "x", TTL)
        .await
        .expect("accept");
    match again {
        Accept::New(stamp) => assert!(stamp.seq > first, "{stamp:?}"),
        other => panic!(
            "a cid accepted {:?} ago, lifetime {TTL} s, in a room with {others} messages since: {other:?}",
            t0.elapsed()
        ),
    }
    delete_room(&mut conn, &room).await;
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// During a rolling upgrade older nodes keep a room's cids in one hash
/// (`keys::cids`): a cid found there is a repeat, and its publication is
/// marked there too.
#[tokio::test]
async fn a_cid_remembered_by_an_older_node_is_still_recognised() {
    let mut conn = redis().await;
    let scripts = Scripts::default();
    let room = format!("scripts-{}", common::unique_tag());
    scripts.seed(&mut conn, &room, 0).await.expect("seed");
    let field = cid_field("u1", "old");
    let seq: u64 = redis::cmd("INCR")
        .arg(keys::seq(&room))
        .query_async(&mut conn)
        .await
        .unwrap();
    let stamp = Stamp {
        seq,
        id: "id-old".into(),
        ts: now_ms(),
    };
    let _: () = redis::cmd("HSET")
        .arg(keys::cids(&room))
        .arg(&field)
        .arg(format!("{} {} {}", stamp.seq, stamp.id, stamp.ts))
        .query_async(&mut conn)
        .await
        .unwrap();

    let retry = scripts
        .accept(&mut conn, &room, &field, "id-new", now_ms(), "old", 600)
        .await;
    let prior = Remembered {
        stamp: stamp.clone(),
        digest: None,
    };
    assert_eq!(retry.ok(), Some(Accept::Pending(prior)));
    assert_eq!(
        deliver(&scripts, &mut conn, &message(&room, &stamp, "old"), 500).await,
        Delivery::Published
    );
    let kept: String = redis::cmd("HGET")
        .arg(keys::cids(&room))
        .arg(&field)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(kept.ends_with(" d"), "{kept}");
    let retry = scripts
        .accept(&mut conn, &room, &field, "id-new", now_ms(), "old", 600)
        .await;
    assert!(matches!(retry, Ok(Accept::Published(p)) if p.stamp == stamp));
    delete_room(&mut conn, &room).await;
}

/// Every key a message writes lives as long as an idle room's keys, the
/// published window 10 minutes at most, and the cid buckets by their own
/// schedule (at most 1.5 cid lifetimes).
#[tokio::test]
async fn every_key_of_a_message_expires_once_the_room_is_idle() {
    const IDLE: i64 = 120;
    const CID_TTL: u64 = 30;
    let mut conn = redis().await;
    let scripts = Scripts::new(IDLE as u64);
    let room = format!("scripts-{}", common::unique_tag());
    scripts.seed(&mut conn, &room, 0).await.expect("seed");
    send(&scripts, &mut conn, &room, "c1", CID_TTL).await;
    scripts
        .raise_watermark(&mut conn, &room, 1)
        .await
        .expect("watermark");
    let buckets: Vec<String> = keys::live_cid_buckets(&room, now_ms() as u64 / 1000, CID_TTL);
    let cid_ttl = CID_TTL as i64;
    let mut expected = vec![
        (keys::seq(&room), IDLE),
        (keys::recent(&room), IDLE),
        (keys::persisted(&room), IDLE),
        (keys::published(&room), IDLE.min(600)),
    ];
    expected.push((buckets[0].clone(), cid_ttl + cid_ttl.div_euclid(2) + 1));
    for (key, most) in expected {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            (1..=most).contains(&ttl),
            "{key}: TTL {ttl}, at most {most}"
        );
    }
    delete_room(&mut conn, &room).await;
}
