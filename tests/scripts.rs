//! The Lua scripts of cluster mode against a real Redis, through their typed
//! calls: a room is seeded before its first seq and its seq never goes
//! down; a cid is accepted once and its later attempts learn its fate; a
//! message is published once, and one that comes late goes out under a new
//! seq; an open gap is found while it may still fill; the persisted
//! watermark only rises.
//!
//! Needs Redis (`scripts/services up`); `make test` starts it. Each test
//! uses rooms of its own and deletes their keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use scalable_chat::protocol::{ChatMessage, User};
use scalable_chat::store::channel::RoomEvent;
use scalable_chat::store::keys;
use scalable_chat::store::redis::{Publish, RedisConn};
use scalable_chat::store::scripts::{cid_field, Accept, DeliverArgs, Delivery, Scripts, Stamp};

async fn redis() -> RedisConn {
    common::Services::local().redis().await
}

/// How the node publishes on this topology.
fn publish() -> Publish {
    Publish::of(&common::Services::local().redis_settings())
}

async fn delete_room(conn: &mut RedisConn, room: &str) {
    let _: () = redis::cmd("DEL")
        .arg(&keys::of_room(room)[..])
        .query_async(conn)
        .await
        .expect("DEL");
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
        text: format!("message {}", stamp.seq),
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
    let first = scripts
        .accept(&mut conn, &room, &field, "id-1", 1000, 600)
        .await;
    assert_eq!(first.ok(), Some(Accept::Unseeded));
    assert_eq!(scripts.seed(&mut conn, &room, 10).await.ok(), Some(10));
    assert_eq!(scripts.seed(&mut conn, &room, 4).await.ok(), Some(10));
    let accepted = scripts
        .accept(&mut conn, &room, &field, "id-1", 1000, 600)
        .await;
    let stamp = Stamp {
        seq: 11,
        id: "id-1".into(),
        ts: 1000,
    };
    assert_eq!(accepted.ok(), Some(Accept::New(stamp.clone())));
    // Another attempt, with the id and ts it would have had: the first's.
    let again = scripts
        .accept(&mut conn, &room, &field, "id-2", 2000, 600)
        .await;
    assert_eq!(again.ok(), Some(Accept::Pending(stamp)));
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
            match scripts.accept(&mut conn, &room, &field, id, 5, 600).await {
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
    let repeat = scripts.accept(&mut conn, &room, &field, "x", 9, 600).await;
    assert!(matches!(repeat, Ok(Accept::Published(s)) if s.seq == 1 && s.id == "id-1"));

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
    let repeat = scripts.accept(&mut conn, &room, &field, "x", 9, 600).await;
    assert!(matches!(repeat, Ok(Accept::Resequenced(s)) if s.seq == 4 && s.id == "id-2"));
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
