//! `MongoStore`: long-term message storage of cluster mode, in the collection
//! `messages` of a MongoDB (or wire-compatible) database.
//!
//! One document per message, shaped by the contract: `_id` (the message id),
//! `room`, `seq` (Int64), `user` `{id, name}`, `text`, `ts` (a BSON date) and
//! `cid`, with a unique index on `(room, seq)`. Writes come from the persist
//! workers, which replay batches after a crash, so an insert of a message
//! that is already stored is "already done", never an error. Reads serve
//! history beyond the Redis cache.
//!
//! Every filter is built from typed values (`doc!` with strings and
//! integers), never from text, so nothing a client sends can become a query
//! operator.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::{Error as MongoError, ErrorKind, InsertManyError, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use crate::config::MongoSettings;
use crate::error::ChatError;
use crate::protocol::{ChatMessage, User};

/// Collection of the messages, fixed by the contract.
pub const COLLECTION: &str = "messages";

/// Name of the unique `(room, seq)` index (MongoDB's default name for these
/// keys, so an index created by hand with the same keys is recognised).
pub const ROOM_SEQ_INDEX: &str = "room_1_seq_1";

/// How long an operation waits for a reachable server: short, so a node
/// whose MongoDB is down answers `unavailable` (and `/readyz` 503) quickly
/// instead of holding requests for the driver's default 30 s.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a TCP connection may take, for the same reason.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// MongoDB's code for a duplicate key.
const DUPLICATE_KEY: i32 = 11000;

/// The message collection of one database.
#[derive(Clone)]
pub struct MongoStore {
    /// Kept to answer `ping` (a database command) and to drop test databases.
    db: mongodb::Database,
    messages: Collection<Document>,
}

impl MongoStore {
    /// Connects (with a short server-selection timeout, so a down MongoDB
    /// answers fast) and creates the unique index on `(room: 1, seq: 1)` if
    /// it is missing.
    pub async fn connect(settings: &MongoSettings) -> Result<Self, ChatError> {
        let mut options = ClientOptions::parse(&settings.url)
            .await
            .map_err(|e| mongo_error("parse mongo.url", e))?;
        // The URL may choose its own timeouts; otherwise fail fast.
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        options
            .app_name
            .get_or_insert_with(|| "scalable-chat".into());
        let client =
            Client::with_options(options).map_err(|e| mongo_error("create the client", e))?;
        let db = client.database(&settings.database);
        let store = Self {
            messages: db.collection(COLLECTION),
            db,
        };
        store.ensure_index().await?;
        Ok(store)
    }

    /// Creates the unique `(room, seq)` index; a no-op when it exists.
    async fn ensure_index(&self) -> Result<(), ChatError> {
        let index = IndexModel::builder()
            .keys(doc! {"room": 1, "seq": 1})
            .options(
                IndexOptions::builder()
                    .name(ROOM_SEQ_INDEX.to_string())
                    .unique(true)
                    .build(),
            )
            .build();
        self.messages
            .create_index(index)
            .await
            .map_err(|e| mongo_error("create the unique (room, seq) index", e))?;
        Ok(())
    }

    /// Inserts a batch, unordered, with `_id` = message id. A message that is
    /// already stored (duplicate key, say a batch replayed after a crash) is
    /// not an error; any other failure is, and the caller retries the whole
    /// batch. Returns how many messages were new.
    pub async fn insert_batch(&self, msgs: &[ChatMessage]) -> Result<usize, ChatError> {
        if msgs.is_empty() {
            return Ok(0);
        }
        let docs = msgs
            .iter()
            .map(|m| check_storable(m).map(|()| to_document(m)))
            .collect::<Result<Vec<_>, _>>()?;
        match self.messages.insert_many(docs).ordered(false).await {
            Ok(result) => Ok(result.inserted_ids.len()),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(failure) => self.count_after_duplicates(msgs, failure).await,
                _ => Err(mongo_error("insert a batch of messages", e)),
            },
        }
    }

    /// The outcome of an unordered insert that reported write errors: fine
    /// when every error is a duplicate key, a failure otherwise.
    async fn count_after_duplicates(
        &self,
        msgs: &[ChatMessage],
        failure: &InsertManyError,
    ) -> Result<usize, ChatError> {
        if let Some(wc) = &failure.write_concern_error {
            return Err(ChatError::Unavailable(format!(
                "MongoDB could not confirm a batch of messages (write concern, code {}): {}",
                wc.code, wc.message
            )));
        }
        let errors = failure.write_errors.as_deref().unwrap_or_default();
        if let Some(other) = errors.iter().find(|w| w.code != DUPLICATE_KEY) {
            let id = msgs.get(other.index).map_or("?", |m| m.id.as_str());
            return Err(ChatError::Internal(format!(
                "MongoDB refused message {id} (code {}): {}",
                other.code, other.message
            )));
        }
        let duplicates: Vec<&ChatMessage> =
            errors.iter().filter_map(|w| msgs.get(w.index)).collect();
        self.settle_duplicates(&duplicates).await?;
        Ok(msgs.len().saturating_sub(errors.len()))
    }

    /// A duplicate key is normally the same message stored before (same
    /// `_id`). It may have been stored under a lower seq: a message that
    /// came late to Redis is published under a new seq and produced again,
    /// and the stored one is raised to it (never lowered, whatever order
    /// the two records come in). When the `_id` is absent, the clash was on
    /// `(room, seq)`: two different messages got the same seq, which the
    /// sequencer must never do. That message cannot be stored; say so
    /// loudly, but do not fail the batch (retrying would block the
    /// partition forever).
    async fn settle_duplicates(&self, duplicates: &[&ChatMessage]) -> Result<(), ChatError> {
        if duplicates.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = duplicates.iter().map(|m| m.id.as_str()).collect();
        let stored: HashMap<String, u64> = self
            .messages
            .find(doc! {"_id": {"$in": &ids}})
            .projection(doc! {"_id": 1, "seq": 1})
            .await
            .map_err(|e| mongo_error("read duplicate messages", e))?
            .try_filter_map(|d| async move {
                Ok(d.get_str("_id")
                    .ok()
                    .map(|id| (id.to_string(), seq_of(&d).unwrap_or(0))))
            })
            .try_collect()
            .await
            .map_err(|e| mongo_error("read duplicate messages", e))?;
        for m in duplicates {
            match stored.get(&m.id) {
                None => log::error!(
                    "room={} seq={} id={}: Message not stored: another message already has this room and seq.",
                    m.room, m.seq, m.id
                ),
                Some(&seq) if seq < m.seq => {
                    let raised = self
                        .messages
                        .update_one(
                            doc! {"_id": &m.id, "seq": {"$lt": m.seq as i64}},
                            doc! {"$set": {"seq": m.seq as i64}},
                        )
                        .await;
                    match raised {
                        Ok(_) => log::info!(
                            "room={} id={}: Stored seq raised from {seq} to {}.",
                            m.room,
                            m.id,
                            m.seq
                        ),
                        Err(e) if is_duplicate_key(&e) => log::error!(
                            "room={} seq={} id={}: Cannot raise the stored seq: another message already has it.",
                            m.room, m.seq, m.id
                        ),
                        Err(e) => return Err(mongo_error("raise the seq of a message", e)),
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The `limit` latest messages of `room` with `seq < before` (the latest
    /// of all without `before`), in ascending seq, and whether older ones
    /// exist.
    pub async fn before(
        &self,
        room: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<ChatMessage>, bool), ChatError> {
        let filter = match before {
            // Larger than any storable seq: every message qualifies.
            Some(b) if b <= i64::MAX as u64 => doc! {"room": room, "seq": {"$lt": b as i64}},
            _ => doc! {"room": room},
        };
        // One extra message tells whether there are more.
        let docs: Vec<Document> = self
            .messages
            .find(filter)
            .sort(doc! {"seq": -1})
            .limit(i64::from(limit) + 1)
            .await
            .map_err(|e| mongo_error("read history", e))?
            .try_collect()
            .await
            .map_err(|e| mongo_error("read history", e))?;
        let has_more = docs.len() > limit as usize;
        let mut page = docs
            .iter()
            .take(limit as usize)
            .map(from_document)
            .collect::<Result<Vec<_>, _>>()?;
        page.reverse();
        Ok((page, has_more))
    }

    /// Up to `limit` messages of `room` with `seq > since`, ascending.
    pub async fn after(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        if limit == 0 || since >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .messages
            .find(doc! {"room": room, "seq": {"$gt": since as i64}})
            .sort(doc! {"seq": 1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| mongo_error("read messages after a seq", e))?
            .try_collect()
            .await
            .map_err(|e| mongo_error("read messages after a seq", e))?;
        docs.iter().map(from_document).collect()
    }

    /// The highest stored seq of `room`, 0 if it has none.
    pub async fn max_seq(&self, room: &str) -> Result<u64, ChatError> {
        let found = self
            .messages
            .find_one(doc! {"room": room})
            .sort(doc! {"seq": -1})
            .projection(doc! {"seq": 1})
            .await
            .map_err(|e| mongo_error("read the last seq of a room", e))?;
        match found {
            None => Ok(0),
            Some(d) => seq_of(&d).ok_or_else(|| {
                ChatError::Internal(format!(
                    "stored message {} of room {room} has no valid seq",
                    id_of(&d)
                ))
            }),
        }
    }

    /// Whether MongoDB answers a `ping` now, for `/readyz`.
    pub async fn ping(&self) -> Result<(), ChatError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map_err(|e| mongo_error("ping", e))?;
        Ok(())
    }

    /// Drops the whole database: for tests, each on its own database.
    #[cfg(test)]
    pub(crate) async fn drop_database(&self) -> Result<(), ChatError> {
        self.db
            .drop()
            .await
            .map_err(|e| mongo_error("drop the database", e))
    }

    /// The collection, for tests that look at it directly.
    #[cfg(test)]
    pub(crate) fn collection(&self) -> &Collection<Document> {
        &self.messages
    }
}

/// Whether a message can be stored as it is: no NUL in any string (which
/// FerretDB refuses, and the node's validation never lets through) and a seq
/// that fits a BSON Int64. A message that fails here never will succeed, so
/// a persist worker skips it rather than retrying.
pub fn check_storable(m: &ChatMessage) -> Result<(), ChatError> {
    let fields = [
        ("_id", m.id.as_str()),
        ("room", m.room.as_str()),
        ("user.id", m.user.id.as_str()),
        ("user.name", m.user.name.as_str()),
        ("text", m.text.as_str()),
        ("cid", m.cid.as_str()),
    ];
    if let Some((field, _)) = fields.iter().find(|(_, v)| v.contains('\0')) {
        return Err(ChatError::Internal(format!(
            "message {} has a NUL character in `{field}` and cannot be stored",
            m.id.escape_default()
        )));
    }
    if i64::try_from(m.seq).is_err() {
        return Err(ChatError::Internal(format!(
            "message {} has seq {} above the largest storable seq",
            m.id, m.seq
        )));
    }
    Ok(())
}

/// The stored shape of a message (after [`check_storable`]).
fn to_document(m: &ChatMessage) -> Document {
    doc! {
        "_id": &m.id,
        "room": &m.room,
        "seq": i64::try_from(m.seq).unwrap_or(i64::MAX),
        "user": {"id": &m.user.id, "name": &m.user.name},
        "text": &m.text,
        "ts": DateTime::from_millis(m.ts),
        "cid": &m.cid,
    }
}

/// A message from its stored shape; a document that does not decode is a
/// bug (or foreign data), reported with its `_id`.
fn from_document(d: &Document) -> Result<ChatMessage, ChatError> {
    let bad = |field: &str| {
        ChatError::Internal(format!(
            "stored message {} has no valid `{field}`",
            id_of(d)
        ))
    };
    let user = d.get_document("user").map_err(|_| bad("user"))?;
    Ok(ChatMessage {
        room: d.get_str("room").map_err(|_| bad("room"))?.to_string(),
        seq: seq_of(d).ok_or_else(|| bad("seq"))?,
        id: d.get_str("_id").map_err(|_| bad("_id"))?.to_string(),
        user: User {
            id: user.get_str("id").map_err(|_| bad("user.id"))?.to_string(),
            name: user
                .get_str("name")
                .map_err(|_| bad("user.name"))?
                .to_string(),
        },
        text: d.get_str("text").map_err(|_| bad("text"))?.to_string(),
        ts: d
            .get_datetime("ts")
            .map_err(|_| bad("ts"))?
            .timestamp_millis(),
        cid: d.get_str("cid").map_err(|_| bad("cid"))?.to_string(),
    })
}

/// The seq of a stored document: an Int64 as written, or an Int32 as a
/// hand-made or migrated document may hold; never negative.
fn seq_of(d: &Document) -> Option<u64> {
    match d.get("seq")? {
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Int32(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// Whether a single write failed on a unique index.
fn is_duplicate_key(e: &MongoError) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

/// The `_id` of a document, for error messages.
fn id_of(d: &Document) -> String {
    match d.get("_id") {
        Some(Bson::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "(no _id)".into(),
    }
}

/// Maps a driver error: the server or the network failing is `Unavailable`
/// (the caller may retry); our own mistakes (bad arguments, undecodable
/// data) are `Internal`. The message names what was being done.
fn mongo_error(doing: &str, e: MongoError) -> ChatError {
    let message = format!("MongoDB: cannot {doing}: {e}");
    match e.kind.as_ref() {
        ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonDeserialization(_)
        | ErrorKind::BsonSerialization(_)
        | ErrorKind::InvalidResponse { .. }
        | ErrorKind::InvalidTlsConfig { .. }
        | ErrorKind::Internal { .. } => ChatError::Internal(message),
        _ => ChatError::Unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "mongodb://127.0.0.1:27017";

    fn settings() -> MongoSettings {
        MongoSettings {
            url: URL.into(),
            database: format!(
                "test_{}",
                ulid::Ulid::new().to_string().to_ascii_lowercase()
            ),
            batch_size: 500,
        }
    }

    /// Connects to a fresh database; panics with a hint when MongoDB is down.
    async fn store() -> MongoStore {
        match MongoStore::connect(&settings()).await {
            Ok(s) => s,
            Err(e) => panic!("MongoDB must run on {URL} (scripts/services up): {e:?}"),
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
        F: FnOnce(MongoStore) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let store = store().await;
        let result = body(store.clone()).await;
        let dropped = store.drop_database().await;
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

    #[tokio::test]
    async fn round_trip_keeps_every_field_and_stores_a_bson_date() {
        with_store(|store| async move {
            let msgs: Vec<_> = (1..=5).map(|s| message("general", s)).collect();
            let other = message("random", 1);
            check!(store.insert_batch(&msgs).await.map_err(err)? == 5, "5 new");
            check!(
                store
                    .insert_batch(std::slice::from_ref(&other))
                    .await
                    .map_err(err)?
                    == 1,
                "1 new"
            );

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
            check!(
                store
                    .insert_batch(std::slice::from_ref(&first))
                    .await
                    .map_err(err)?
                    == 1,
                "new"
            );
            check!(
                store
                    .insert_batch(std::slice::from_ref(&moved))
                    .await
                    .map_err(err)?
                    == 0,
                "not new"
            );
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

    #[tokio::test]
    async fn the_unique_room_seq_index_exists_and_connect_is_idempotent() {
        with_store(|store| async move {
            // A second connect to the same database finds the index in place.
            let settings = MongoSettings {
                url: URL.into(),
                database: store.db.name().to_string(),
                batch_size: 500,
            };
            MongoStore::connect(&settings).await.map_err(err)?;
            let indexes: Vec<IndexModel> = store
                .collection()
                .list_indexes()
                .await
                .map_err(|e| e.to_string())?
                .try_collect()
                .await
                .map_err(|e| e.to_string())?;
            let found = indexes
                .iter()
                .find(|i| i.keys == doc! {"room": 1, "seq": 1});
            let Some(index) = found else {
                return Err(format!("no (room, seq) index in {indexes:#?}"));
            };
            let unique = index.options.as_ref().and_then(|o| o.unique);
            check!(unique == Some(true), "index is not unique: {index:#?}");
            Ok(())
        })
        .await;
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
        let settings = MongoSettings {
            // Nothing listens on port 1.
            url: "mongodb://127.0.0.1:1".into(),
            database: "unused".into(),
            batch_size: 10,
        };
        let started = std::time::Instant::now();
        let result = MongoStore::connect(&settings).await;
        assert!(
            matches!(result, Err(ChatError::Unavailable(_))),
            "expected Unavailable, got {:?}",
            result.err()
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
