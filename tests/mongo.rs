//! `MongoStore` against a real MongoDB-compatible server (FerretDB from
//! `scripts/services`, or MongoDB itself): the stored shape the contract
//! fixes, replayed batches stored once, history pages, and errors.
//!
//! Needs the MongoDB service (`scripts/services up`); `make test` starts
//! it. Each test works in a database of its own and drops it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ops::Deref;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::Acknowledgment;
use mongodb::{Collection, IndexModel};
use scalable_chat::config::{MongoSettings, WriteConcern};
use scalable_chat::error::ChatError;
use scalable_chat::protocol::{ChatMessage, User};
use scalable_chat::store::mongo::{
    check_storable, MongoStore, COLLECTION, ROOM_SEQ_INDEX, ROOM_USER_CID_INDEX,
};

fn mongo_url() -> String {
    common::Services::local().mongo_url()
}

fn settings() -> MongoSettings {
    MongoSettings::new(mongo_url(), format!("test_{}", common::unique_tag()))
}

/// A store on a database of its own, and that database seen directly.
#[derive(Clone)]
struct TestStore {
    store: MongoStore,
    db: mongodb::Database,
}

impl Deref for TestStore {
    type Target = MongoStore;
    fn deref(&self) -> &MongoStore {
        &self.store
    }
}

impl TestStore {
    /// The messages collection, to look at what was stored.
    fn collection(&self) -> Collection<Document> {
        self.db.collection(COLLECTION)
    }
}

/// Connects to a fresh database; panics with a hint when MongoDB is down.
async fn store() -> TestStore {
    let settings = settings();
    let store = match MongoStore::connect(&settings).await {
        Ok(s) => s,
        Err(e) => panic!(
            "MongoDB must run on {} (scripts/services up): {e:?}",
            settings.url
        ),
    };
    let client = mongodb::Client::with_uri_str(&settings.url)
        .await
        .expect("MongoDB client");
    TestStore {
        store,
        db: client.database(&settings.database),
    }
}

fn message(room: &str, seq: u64) -> ChatMessage {
    ChatMessage {
        room: room.into(),
        seq,
        id: ulid::Ulid::new().to_string(),
        user: User {
            id: "u1".into(),
            name: "alice".into(),
        },
        text: format!("message {seq} with ünïcödé, \"quotes\" and\na newline"),
        ts: 1_700_000_000_123 + seq as i64,
        cid: format!("c{seq}"),
    }
}

/// Runs `body` on a fresh store, drops its database whatever happened,
/// then fails if the body did.
async fn with_store<F, Fut>(body: F)
where
    F: FnOnce(TestStore) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let store = store().await;
    let db = store.db.clone();
    let result = body(store).await;
    let dropped = db.drop().await;
    if let Err(e) = result {
        panic!("{e}");
    }
    if let Err(e) = dropped {
        panic!("cannot drop the test database: {e:?}");
    }
}

/// `assert!` for the bodies, which return errors so clean-up still runs.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn err(e: ChatError) -> String {
    format!("{e:?}")
}

/// Stores `m` alone; how many of it were new (1 or 0).
async fn insert_one(store: &TestStore, m: &ChatMessage) -> Result<usize, String> {
    store
        .insert_batch(std::slice::from_ref(m))
        .await
        .map_err(err)
}

#[tokio::test]
async fn round_trip_keeps_every_field_and_stores_a_bson_date() {
    with_store(|store| async move {
        let msgs: Vec<_> = (1..=5).map(|s| message("general", s)).collect();
        let other = message("random", 1);
        check!(store.insert_batch(&msgs).await.map_err(err)? == 5, "5 new");
        check!(insert_one(&store, &other).await? == 1, "1 new");

        let (page, has_more) = store.before("general", None, 50).await.map_err(err)?;
        check!(page == msgs, "latest page differs: {page:#?}");
        check!(!has_more, "nothing older");
        let after = store.after("general", 2, 10).await.map_err(err)?;
        check!(after == msgs[2..], "after 2: {after:#?}");
        check!(
            store.after("general", 1, 2).await.map_err(err)? == msgs[1..3],
            "limit"
        );
        check!(
            store.after("general", 5, 10).await.map_err(err)?.is_empty(),
            "after end"
        );
        check!(store.max_seq("general").await.map_err(err)? == 5, "max seq");
        check!(
            store.max_seq("random").await.map_err(err)? == 1,
            "max seq other"
        );
        check!(
            store.max_seq("empty").await.map_err(err)? == 0,
            "max seq empty"
        );
        store.ping().await.map_err(err)?;

        // The stored shape, as the contract fixes it.
        let raw = store
            .collection()
            .find_one(doc! {"_id": &msgs[0].id})
            .await
            .map_err(|e| e.to_string())?
            .ok_or("first message not found by _id")?;
        check!(
            raw.get("seq") == Some(&Bson::Int64(1)),
            "seq is Int64: {raw}"
        );
        check!(
            raw.get("ts") == Some(&Bson::DateTime(DateTime::from_millis(msgs[0].ts))),
            "ts is a BSON date: {raw}"
        );
        check!(
            raw.get_document("user").ok() == Some(&doc! {"id": "u1", "name": "alice"}),
            "user: {raw}"
        );
        let keys: Vec<&str> = raw.keys().map(String::as_str).collect();
        check!(
            keys == ["_id", "room", "seq", "user", "text", "ts", "cid"],
            "fields: {keys:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_replayed_batch_is_stored_once_without_error() {
    with_store(|store| async move {
        let msgs: Vec<_> = (1..=20).map(|s| message("general", s)).collect();
        check!(
            store.insert_batch(&msgs[..10]).await.map_err(err)? == 10,
            "first half"
        );
        // A replay of the first half together with new messages.
        let n = store.insert_batch(&msgs).await.map_err(err)?;
        check!(n == 10, "only the second half is new, got {n}");
        let n = store.insert_batch(&msgs).await.map_err(err)?;
        check!(n == 0, "a full replay is not new, got {n}");
        let count = store
            .collection()
            .count_documents(doc! {})
            .await
            .map_err(|e| e.to_string())?;
        check!(count == 20, "each message once, got {count}");
        // A different message with a seq already taken is not stored
        // either, and does not fail the batch.
        let clash = message("general", 3);
        let n = store
            .insert_batch(&[clash, message("general", 21)])
            .await
            .map_err(err)?;
        check!(n == 1, "only seq 21 is new, got {n}");
        let (page, _) = store.before("general", Some(4), 1).await.map_err(err)?;
        check!(
            page == msgs[2..3],
            "seq 3 is still the first one: {page:#?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_message_stored_again_under_a_higher_seq_keeps_the_higher() {
    with_store(|store| async move {
        let first = message("general", 4);
        let mut moved = first.clone();
        moved.seq = 9;
        // The first seq, then the new one: raised.
        check!(insert_one(&store, &first).await? == 1, "new");
        check!(insert_one(&store, &moved).await? == 0, "not new");
        let stored = store.after("general", 0, 10).await.map_err(err)?;
        check!(stored == [moved.clone()], "raised to 9: {stored:#?}");
        let seqs = || async {
            let stored = store.after("general", 0, 10).await.map_err(err)?;
            Ok::<Vec<u64>, String>(stored.iter().map(|m| m.seq).collect())
        };
        // The first seq again, late (a replay): not lowered.
        let n = store
            .insert_batch(&[first.clone(), message("general", 5)])
            .await
            .map_err(err)?;
        check!(n == 1, "only 5 is new, got {n}");
        check!(seqs().await? == [5, 9], "still 9");
        check!(store.max_seq("general").await.map_err(err)? == 9, "max seq");
        // Both records in one batch, in either order: the higher stays.
        for (low, high) in [(6, 12), (7, 13)] {
            let first = message("general", low);
            let mut moved = first.clone();
            moved.seq = high;
            let batch = if low == 6 {
                [moved, first]
            } else {
                [first, moved]
            };
            let n = store.insert_batch(&batch).await.map_err(err)?;
            check!(n == 1, "one of the two records of {low} is new, got {n}");
        }
        check!(
            seqs().await? == [5, 9, 12, 13],
            "6 and 7 stored as 12 and 13"
        );
        Ok(())
    })
    .await;
}

/// The indexes of the test database's collection.
async fn indexes(store: &TestStore) -> Result<Vec<IndexModel>, String> {
    store
        .collection()
        .list_indexes()
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())
}

/// Fails unless `indexes` has a unique index on exactly `keys`, named `name`.
fn check_unique_index(indexes: &[IndexModel], keys: Document, name: &str) -> Result<(), String> {
    let Some(index) = indexes.iter().find(|i| i.keys == keys) else {
        return Err(format!("no index on {keys} in {indexes:#?}"));
    };
    let options = index.options.as_ref();
    check!(
        options.and_then(|o| o.unique) == Some(true),
        "index is not unique: {index:#?}"
    );
    check!(
        options.and_then(|o| o.name.as_deref()) == Some(name),
        "index is not named {name}: {index:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_unique_indexes_exist_and_connect_is_idempotent() {
    with_store(|store| async move {
        check!(store.has_cid_index(), "the cid index is in place");
        // A second connect to the same database finds the indexes in place.
        let settings = MongoSettings::new(mongo_url(), store.db.name());
        let again = MongoStore::connect(&settings).await.map_err(err)?;
        check!(again.has_cid_index(), "still in place");
        let indexes = indexes(&store).await?;
        check_unique_index(&indexes, doc! {"room": 1, "seq": 1}, ROOM_SEQ_INDEX)?;
        check_unique_index(
            &indexes,
            doc! {"room": 1, "user.id": 1, "cid": 1},
            ROOM_USER_CID_INDEX,
        )?;
        check!(indexes.len() == 3, "_id and the two: {indexes:#?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_existing_database_gets_the_cid_index_at_connect() {
    let settings = settings();
    let client = mongodb::Client::with_uri_str(&settings.url)
        .await
        .expect("MongoDB client");
    let db = client.database(&settings.database);
    // A database as an earlier version left it: messages and the
    // (room, seq) index only.
    let collection = db.collection::<Document>(COLLECTION);
    let result = async {
        collection
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"room": 1, "seq": 1})
                    .options(
                        mongodb::options::IndexOptions::builder()
                            .unique(true)
                            .build(),
                    )
                    .build(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let old = message("general", 1);
        collection
            .insert_one(raw_document(&old))
            .await
            .map_err(|e| e.to_string())?;
        let store = MongoStore::connect(&settings).await.map_err(err)?;
        let test_store = TestStore {
            store,
            db: db.clone(),
        };
        check!(test_store.has_cid_index(), "created at connect");
        check_unique_index(
            &indexes(&test_store).await?,
            doc! {"room": 1, "user.id": 1, "cid": 1},
            ROOM_USER_CID_INDEX,
        )?;
        // It holds for the message that was there before.
        let mut again = old.clone();
        again.id = ulid::Ulid::new().to_string();
        again.seq = 2;
        check!(
            test_store.insert_batch(&[again]).await.map_err(err)? == 0,
            "the old message's cid is taken"
        );
        Ok::<(), String>(())
    }
    .await;
    let dropped = db.drop().await;
    result.unwrap();
    dropped.expect("drop the test database");
}

#[tokio::test]
async fn a_database_that_breaks_the_cid_index_still_starts_without_it() {
    let settings = settings();
    let client = mongodb::Client::with_uri_str(&settings.url)
        .await
        .expect("MongoDB client");
    let db = client.database(&settings.database);
    let collection = db.collection::<Document>(COLLECTION);
    let result = async {
        // A cid stored twice, as a node could before the index existed
        // (repeated after Redis had forgotten it).
        let first = message("general", 1);
        let mut second = first.clone();
        second.id = ulid::Ulid::new().to_string();
        second.seq = 7;
        collection
            .insert_many([raw_document(&second), raw_document(&first)])
            .await
            .map_err(|e| e.to_string())?;
        let store = MongoStore::connect(&settings).await.map_err(err)?;
        check!(!store.has_cid_index(), "the index cannot exist");
        let test_store = TestStore {
            store,
            db: db.clone(),
        };
        // The (room, seq) index is there all the same.
        check_unique_index(
            &indexes(&test_store).await?,
            doc! {"room": 1, "seq": 1},
            ROOM_SEQ_INDEX,
        )?;
        // The first of the two is the message of the cid.
        let found = test_store
            .find_by_cid("general", "u1", "c1")
            .await
            .map_err(err)?;
        check!(found.as_ref() == Some(&first), "lowest seq: {found:#?}");
        check!(
            test_store
                .insert_batch(&[message("general", 8)])
                .await
                .map_err(err)?
                == 1,
            "writes go on"
        );
        Ok::<(), String>(())
    }
    .await;
    let dropped = db.drop().await;
    result.unwrap();
    dropped.expect("drop the test database");
}

/// `m` in its stored shape, written directly (as another version would).
fn raw_document(m: &ChatMessage) -> Document {
    doc! {
        "_id": &m.id,
        "room": &m.room,
        "seq": m.seq as i64,
        "user": {"id": &m.user.id, "name": &m.user.name},
        "text": &m.text,
        "ts": DateTime::from_millis(m.ts),
        "cid": &m.cid,
    }
}

#[tokio::test]
async fn a_second_message_for_a_stored_cid_is_not_stored_and_the_batch_goes_on() {
    with_store(|store| async move {
        let first = message("general", 1);
        check!(insert_one(&store, &first).await? == 1, "first");
        // The same user, room and cid under another id and seq (a repeat
        // that reached the sequencer as new), in a batch with a new message.
        let mut repeat = first.clone();
        repeat.id = ulid::Ulid::new().to_string();
        repeat.seq = 2;
        let next = message("general", 3);
        let n = store
            .insert_batch(&[repeat.clone(), next.clone()])
            .await
            .map_err(err)?;
        check!(n == 1, "only seq 3 is new, got {n}");
        check!(store.cid_conflicts() == 1, "counted once");
        let stored = store.after("general", 0, 10).await.map_err(err)?;
        check!(
            stored == [first.clone(), next.clone()],
            "the first one is kept: {stored:#?}"
        );
        // A replay of the batch: still not stored, and not a failure.
        let n = store
            .insert_batch(&[repeat.clone(), next.clone(), first.clone()])
            .await
            .map_err(err)?;
        check!(n == 0, "nothing new, got {n}");
        check!(store.cid_conflicts() == 2, "counted again");
        // A replay of the first one alone is no conflict.
        insert_one(&store, &first).await?;
        check!(store.cid_conflicts() == 2, "same id: no conflict");

        // Two messages with one cid in one batch: one is stored.
        let a = message("general", 10);
        let mut b = a.clone();
        b.id = ulid::Ulid::new().to_string();
        b.seq = 11;
        let n = store
            .insert_batch(&[a.clone(), b.clone()])
            .await
            .map_err(err)?;
        check!(n == 1, "one of the two, got {n}");
        let found = store
            .find_by_cid("general", "u1", "c10")
            .await
            .map_err(err)?
            .ok_or("the cid is stored")?;
        check!(found == a || found == b, "one of the two: {found:#?}");
        check!(store.cid_conflicts() == 3, "the other counted");

        // The same cid from another user, or in another room, is another
        // message.
        let mut other_user = message("general", 20);
        other_user.cid = first.cid.clone();
        other_user.user.id = "u2".into();
        let mut other_room = first.clone();
        other_room.id = ulid::Ulid::new().to_string();
        other_room.room = "random".into();
        let n = store
            .insert_batch(&[other_user, other_room])
            .await
            .map_err(err)?;
        check!(n == 2, "both are new, got {n}");
        check!(store.cid_conflicts() == 3, "no conflict");
        let count = store
            .collection()
            .count_documents(doc! {})
            .await
            .map_err(|e| e.to_string())?;
        check!(count == 5, "first, next, one of a/b, two others: {count}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn find_by_cid_finds_a_users_message_in_a_room() {
    with_store(|store| async move {
        let msgs: Vec<_> = (1..=3).map(|s| message("general", s)).collect();
        let mut bob = message("general", 4);
        bob.user = User {
            id: "u2".into(),
            name: "bob".into(),
        };
        bob.cid = "c1".into();
        store.insert_batch(&msgs).await.map_err(err)?;
        insert_one(&store, &bob).await?;
        let found = store
            .find_by_cid("general", "u1", "c2")
            .await
            .map_err(err)?;
        check!(found.as_ref() == Some(&msgs[1]), "c2 of u1: {found:#?}");
        let found = store
            .find_by_cid("general", "u2", "c1")
            .await
            .map_err(err)?;
        check!(found.as_ref() == Some(&bob), "c1 of u2: {found:#?}");
        for (room, user, cid) in [
            ("general", "u1", "c9"),
            ("general", "u3", "c1"),
            ("random", "u1", "c1"),
            // Operators and patterns are values here.
            ("general", "u1", "{\"$ne\": null}"),
            ("general", "{\"$gt\": \"\"}", "c1"),
            ("$gt", "u1", "c1"),
            ("general", "u1", ".*"),
        ] {
            let found = store.find_by_cid(room, user, cid).await.map_err(err)?;
            check!(found.is_none(), "({room}, {user}, {cid}): {found:#?}");
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn writes_ask_for_majority_with_journal_and_the_server_accepts_them() {
    with_store(|store| async move {
        let wc = store.write_concern().ok_or("no write concern")?;
        check!(
            wc.w == Some(Acknowledgment::Majority) && wc.journal == Some(true),
            "majority with journal: {wc:?}"
        );
        check!(
            wc.w_timeout.is_some(),
            "a write never waits for ever: {wc:?}"
        );
        // Every kind of write this store makes, under that concern: an
        // insert, a refused duplicate, a raised seq.
        let first = message("general", 1);
        let mut moved = first.clone();
        moved.seq = 5;
        check!(insert_one(&store, &first).await? == 1, "insert");
        check!(insert_one(&store, &moved).await? == 0, "raise");
        check!(
            store.max_seq("general").await.map_err(err)? == 5,
            "raised to 5"
        );
        Ok(())
    })
    .await;
    // A number of members, without the journal, also goes through.
    let settings = MongoSettings {
        write_concern: WriteConcern::Members(1),
        journal: false,
        ..settings()
    };
    let store = MongoStore::connect(&settings).await.expect("connect");
    let wc = store.write_concern().cloned().expect("a write concern");
    let inserted = store.insert_batch(&[message("general", 1)]).await;
    let client = mongodb::Client::with_uri_str(&settings.url)
        .await
        .expect("MongoDB client");
    let dropped = client.database(&settings.database).drop().await;
    assert_eq!(wc.w, Some(Acknowledgment::Nodes(1)));
    assert_eq!(wc.journal, Some(false));
    assert_eq!(inserted.expect("insert with w: 1"), 1);
    dropped.expect("drop the test database");
}

#[tokio::test]
async fn paging_back_reaches_seq_1() {
    with_store(|store| async move {
        let msgs: Vec<_> = (1..=23).map(|s| message("paged", s)).collect();
        check!(
            store.insert_batch(&msgs).await.map_err(err)? == 23,
            "23 new"
        );
        let mut seen = Vec::new();
        let mut before = None;
        let mut pages = 0;
        loop {
            let (page, has_more) = store.before("paged", before, 10).await.map_err(err)?;
            pages += 1;
            check!(pages <= 3, "too many pages");
            check!(
                page.windows(2).all(|w| w[0].seq < w[1].seq),
                "page not ascending"
            );
            let first = page.first().map(|m| m.seq);
            seen.splice(0..0, page);
            if !has_more {
                break;
            }
            before = first;
        }
        check!(pages == 3, "10 + 10 + 3, got {pages} pages");
        check!(
            seen == msgs,
            "paging back yields every message once, in order"
        );
        let (page, has_more) = store.before("paged", Some(11), 10).await.map_err(err)?;
        check!(
            page == msgs[..10] && !has_more,
            "exactly 10 below 11: no more"
        );
        let (page, has_more) = store.before("paged", Some(1), 10).await.map_err(err)?;
        check!(page.is_empty() && !has_more, "nothing below 1");
        let (page, has_more) = store
            .before("paged", Some(u64::MAX), 2)
            .await
            .map_err(err)?;
        check!(
            page == msgs[21..] && has_more,
            "a huge before is the latest"
        );
        let (page, has_more) = store.before("paged", None, 0).await.map_err(err)?;
        check!(page.is_empty() && has_more, "limit 0 still says has_more");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_message_with_nul_is_refused_before_sending() {
    with_store(|store| async move {
        let good = message("general", 1);
        for field in ["text", "cid", "user.name"] {
            let mut bad = message("general", 2);
            match field {
                "text" => bad.text = "a\0b".into(),
                "cid" => bad.cid = "c\0".into(),
                _ => bad.user.name = "\0".into(),
            }
            match store.insert_batch(&[good.clone(), bad]).await {
                Err(ChatError::Internal(m)) => {
                    check!(m.contains("NUL") && m.contains(field), "message: {m}")
                }
                other => return Err(format!("{field}: expected Internal, got {other:?}")),
            }
        }
        // Nothing of a refused batch was sent.
        let count = store
            .collection()
            .count_documents(doc! {})
            .await
            .map_err(|e| e.to_string())?;
        check!(count == 0, "refused batches store nothing, got {count}");
        let mut huge = message("general", 1);
        huge.seq = u64::MAX;
        check!(
            matches!(check_storable(&huge), Err(ChatError::Internal(_))),
            "a seq above i64::MAX is refused"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn filters_take_room_names_as_values() {
    with_store(|store| async move {
        check!(
            store
                .insert_batch(&[message("general", 1)])
                .await
                .map_err(err)?
                == 1,
            "1"
        );
        // Strings that would be operators or patterns in a string-built
        // query match nothing here.
        for room in ["$gt", "{\"$ne\": null}", ".*", "general' || '1'=='1"] {
            check!(
                store.max_seq(room).await.map_err(err)? == 0,
                "max_seq {room}"
            );
            let (page, _) = store.before(room, None, 10).await.map_err(err)?;
            check!(page.is_empty(), "before {room}");
            check!(
                store.after(room, 0, 10).await.map_err(err)?.is_empty(),
                "after {room}"
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_undecodable_document_is_an_internal_error_naming_it() {
    with_store(|store| async move {
        store
            .collection()
            .insert_one(doc! {"_id": "broken-1", "room": "general", "seq": 1_i64, "text": 5})
            .await
            .map_err(|e| e.to_string())?;
        match store.before("general", None, 10).await {
            Err(ChatError::Internal(m)) => check!(m.contains("broken-1"), "message: {m}"),
            other => return Err(format!("expected Internal, got {other:?}")),
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_down_server_is_unavailable_quickly() {
    // Nothing listens on port 1.
    let settings = MongoSettings::new("mongodb://127.0.0.1:1", "unused");
    let started = std::time::Instant::now();
    let result = MongoStore::connect(&settings).await;
    assert!(
        matches!(result, Err(ChatError::Unavailable(_))),
        "expected Unavailable, got {:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A cluster config on the local services, with `mongo_extra` at the end
/// of its `[mongo]` section.
fn cluster_config(mongo_extra: &str) -> String {
    let services = common::Services::local();
    format!(
        "{}\n[redis]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic = \"test.{tag}\"\n\
         [mongo]\nurl = \"{}\"\ndatabase = \"test_{tag}\"\n{mongo_extra}",
        common::minimal_config(&std::env::temp_dir(), common::free_port()),
        services.redis_url(),
        services.kafka_brokers(),
        services.mongo_url(),
        tag = common::unique_tag(),
    )
}

#[tokio::test]
async fn an_invalid_write_concern_stops_start_up_naming_the_key() {
    for extra in [
        "write_concern = \"most\"\n",
        "write_concern = 0\n",
        "journal = \"yes\"\n",
    ] {
        let stderr = common::start_expect_failure(&cluster_config(extra), &[]).await;
        let key = extra.split(' ').next().unwrap_or_default();
        assert!(
            stderr.contains(&format!("mongo.{key}")),
            "{extra}: stderr does not name the key:\n{stderr}"
        );
    }
    let stderr = common::start_expect_failure(
        &cluster_config(""),
        &[("SCALABLE_CHAT__MONGO__WRITE_CONCERN", "0")],
    )
    .await;
    assert!(stderr.contains("mongo.write_concern"), "{stderr}");
}

/// What a password in `mongo.url` must never be part of.
const PASSWORD: &str = "Pa55w0rd-never-printed";

#[tokio::test]
async fn a_password_in_mongo_url_never_reaches_an_error() {
    // Unreachable, and unparsable (an unencoded `@` in the password, an
    // unknown option): the errors name the problem, never the password.
    for url in [
        format!("mongodb://chat:{PASSWORD}@127.0.0.1:1/?authSource=admin"),
        format!("mongodb://chat:{PASSWORD}@x@127.0.0.1:1/"),
        format!("mongodb://chat:{PASSWORD}@127.0.0.1:1/?tls=maybe"),
    ] {
        match MongoStore::connect(&MongoSettings::new(url.as_str(), "unused")).await {
            Ok(_) => panic!("{url}: connected"),
            Err(e) => {
                let shown = format!("{e:?} {}", e.detail());
                assert!(!shown.contains("Pa55w0rd"), "{url}: {shown}");
            }
        }
    }
}

#[tokio::test]
async fn a_password_in_mongo_url_is_not_in_the_log_or_readyz() {
    // FerretDB takes PLAIN credentials without checking them (MongoDB
    // itself would check them): enough to carry a password through a
    // running node.
    let services = common::Services::local();
    let mut cluster = common::ClusterOpts::isolated();
    cluster.mongo_url = format!(
        "mongodb://chat:{PASSWORD}@127.0.0.1:{}/?authMechanism=PLAIN&authSource=%24external",
        services.mongo_port
    );
    let mut node = common::TestNode::start_cluster("redact-1", &cluster).await;
    let mut ready = None;
    for _ in 0..100 {
        let (status, body) = node.get_json("/readyz").await;
        if status == 200 {
            ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(node.dir.path().join("stderr-1.log")).unwrap_or_default();
    node.kill9();
    let client = common::mongo_client(&cluster).await;
    let dropped = client.database(&cluster.database).drop().await;
    delete_topic(&cluster).await;

    let ready = ready.expect("the node with credentials in mongo.url gets ready");
    assert_eq!(ready["dependencies"]["mongo"], "ok", "{ready}");
    assert!(!ready.to_string().contains(PASSWORD), "{ready}");
    assert!(
        !log.contains(PASSWORD),
        "the log shows the password:\n{log}"
    );
    assert!(
        log.contains("mongo mongodb://chat:***@127.0.0.1:"),
        "the start-up line shows the redacted URL:\n{log}"
    );
    dropped.expect("drop the test database");
}

/// Removes the topic and consumer group of `cluster`; failures are only
/// reported.
async fn delete_topic(cluster: &common::ClusterOpts) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::ClientConfig;
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", &cluster.kafka_brokers)
        .create();
    let Ok(admin) = admin else {
        eprintln!("cleanup: no Kafka admin client");
        return;
    };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = admin.delete_topics(&[&cluster.topic], &options).await {
        eprintln!("cleanup: deleting topic {}: {e}", cluster.topic);
    }
    let _ = admin.delete_groups(&[&cluster.group], &options).await;
}

/// TLS (rustls, no system OpenSSL) with credentials, against a server that
/// `MONGO_TLS_URL` names, for example a FerretDB started with
/// `--listen-tls`, its certificate and key, and a URL with
/// `tls=true&tlsCAFile=…`. The local services have no TLS listener, so this
/// runs only when asked: `MONGO_TLS_URL=… cargo test --test mongo -- --ignored tls`.
#[tokio::test]
#[ignore = "needs a TLS MongoDB at MONGO_TLS_URL"]
async fn tls_with_credentials_connects_and_writes() {
    let url = std::env::var("MONGO_TLS_URL").expect("MONGO_TLS_URL");
    assert!(url.contains("tls=true"), "MONGO_TLS_URL must ask for TLS");
    let settings = MongoSettings::new(url.as_str(), format!("test_{}", common::unique_tag()));
    let store = match MongoStore::connect(&settings).await {
        Ok(s) => s,
        Err(e) => panic!("connect over TLS: {}", e.detail()),
    };
    let inserted = store.insert_batch(&[message("general", 1)]).await;
    let read = store.after("general", 0, 10).await;
    let client = mongodb::Client::with_uri_str(&url)
        .await
        .expect("MongoDB client");
    let dropped = client.database(&settings.database).drop().await;
    assert_eq!(inserted.map_err(err).expect("insert over TLS"), 1);
    assert_eq!(read.map_err(err).expect("read over TLS").len(), 1);
    dropped.expect("drop the test database");

    // The same server without trusting its certificate's CA: refused.
    let untrusted = url
        .split('&')
        .filter(|o| !o.starts_with("tlsCAFile="))
        .collect::<Vec<_>>()
        .join("&");
    if untrusted != url {
        let refused = MongoStore::connect(&MongoSettings::new(untrusted.as_str(), "unused")).await;
        assert!(
            refused.is_err(),
            "a certificate from an unknown CA is refused"
        );
    }
}
