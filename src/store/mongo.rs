//! `MongoStore`: long-term message storage of cluster mode, in the collection
//! `messages` of a MongoDB (or wire-compatible) database.
//!
//! One document per message, shaped by the contract: `_id` (the message id),
//! `room`, `seq` (Int64), `user` `{id, name}`, `text`, `ts` (a BSON date) and
//! `cid`, with unique indexes on `(room, seq)` and `(room, user.id, cid)`.
//! Writes come from the persist workers, which replay batches after a crash,
//! so an insert of a message that is already stored is "already done", never
//! an error. Reads serve history beyond the Redis cache.
//!
//! Every write waits until `mongo.write_concern` members (a majority by
//! default) hold it, in their journal with `mongo.journal`: the persist
//! workers commit Kafka offsets and let the Redis cache be trimmed after an
//! acknowledged write, so a write that a failover could roll back would be a
//! hole in history.
//!
//! Every filter names the room, the shard key of a sharded `messages`
//! (docs/ARCHITECTURE.md, "Sharding `messages`"), so each query and update
//! goes to one shard. All of them are built in [`filter`] from typed values
//! (`doc!` with strings and integers), never from text, so nothing a client
//! sends can become a query operator; tests check both.
//!
//! `mongo.url` may carry a password: every error this store returns is
//! scrubbed of it ([`redact_secrets`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::{Error as MongoError, ErrorKind, InsertManyError, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};

use super::scripts::{AcceptedCid, Stamp};
use crate::config::{self, redact_secrets, redact_url, MongoSettings};
use crate::error::ChatError;
use crate::protocol::{ChatMessage, User};

/// Collection of the messages, fixed by the contract.
pub const COLLECTION: &str = "messages";

/// Name of the unique `(room, seq)` index (MongoDB's default name for these
/// keys, so an index created by hand with the same keys is recognised).
pub const ROOM_SEQ_INDEX: &str = "room_1_seq_1";

/// Name of the unique `(room, user.id, cid)` index: the scope in which the
/// contract promises that re-sending a cid never creates a second message.
/// MongoDB's default name for these keys, as above.
pub const ROOM_USER_CID_INDEX: &str = "room_1_user.id_1_cid_1";

/// How long an operation waits for a reachable server: short, so a node
/// whose MongoDB is down answers `unavailable` (and `/readyz` 503) quickly
/// instead of holding requests for the driver's default 30 s.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a TCP connection may take, for the same reason.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a write waits for its write concern (unless the URL sets
/// `wtimeoutMS`). Without a limit, a replica set that cannot gather a
/// majority (an arbiter and a primary, the secondary down) would hold a
/// persist worker in one insert for ever, silently; with it, the worker
/// logs the failure and retries the batch, which is harmless (the write
/// itself is not undone, and the retry finds it stored).
const WRITE_CONCERN_TIMEOUT: Duration = Duration::from_secs(10);

/// MongoDB's code for a duplicate key.
const DUPLICATE_KEY: i32 = 11000;

/// The message collection of one database.
#[derive(Clone)]
pub struct MongoStore {
    /// Kept to answer `ping` (a database command) and to drop test databases.
    db: mongodb::Database,
    messages: Collection<Document>,
    /// `mongo.url`, whose secrets are scrubbed from every error message.
    url: Arc<str>,
    /// Messages refused because their `(room, user.id, cid)` is stored
    /// under another id.
    cid_conflicts: Arc<AtomicU64>,
    /// Whether the unique `(room, user.id, cid)` index is in place.
    cid_index: bool,
}

impl MongoStore {
    /// Connects (with a short server-selection timeout, so a down MongoDB
    /// answers fast, and the write concern of `settings`) and creates the
    /// unique indexes on `(room, seq)` and `(room, user.id, cid)` if they are
    /// missing.
    pub async fn connect(settings: &MongoSettings) -> Result<Self, ChatError> {
        let url: Arc<str> = Arc::from(settings.url.as_str());
        let mut options = ClientOptions::parse(&settings.url)
            .await
            .map_err(|e| mongo_error("parse mongo.url", e, &url))?;
        // The URL may choose its own timeouts; otherwise fail fast.
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        options
            .app_name
            .get_or_insert_with(|| "scalable-chat".into());
        options.write_concern = Some(write_concern(settings, options.write_concern.as_ref()));
        let client =
            Client::with_options(options).map_err(|e| mongo_error("create the client", e, &url))?;
        let db = client.database(&settings.database);
        let mut store = Self {
            messages: db.collection(COLLECTION),
            db,
            url,
            cid_conflicts: Arc::default(),
            cid_index: false,
        };
        store.cid_index = store.ensure_indexes().await?;
        Ok(store)
    }

    /// Creates the unique indexes; a no-op for each one that exists.
    ///
    /// Without `(room, seq)` the node does not start. `(room, user.id, cid)`
    /// may be impossible to build on a database that predates it: a cid sent
    /// again after Redis had forgotten it was stored as a second message.
    /// Then the node logs what to do and runs without it (as it did before
    /// the index existed); returns whether it is in place.
    async fn ensure_indexes(&self) -> Result<bool, ChatError> {
        self.messages
            .create_index(unique_index(doc! {"room": 1, "seq": 1}, ROOM_SEQ_INDEX))
            .await
            .map_err(|e| self.error("create the unique (room, seq) index", e))?;
        let cid = unique_index(
            doc! {"room": 1, "user.id": 1, "cid": 1},
            ROOM_USER_CID_INDEX,
        );
        match self.messages.create_index(cid).await {
            Ok(_) => Ok(true),
            // The server answered and refused: the data, not the network.
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(_)) => {
                log::error!(
                    "database={} index={ROOM_USER_CID_INDEX}: Running without the unique (room, user.id, cid) index: {}. \
                     Stored messages probably repeat a (room, user.id, cid); remove all but the lowest seq of each \
                     (docs/ARCHITECTURE.md, \"The cid index\") and restart the node to create it.",
                    self.db.name(),
                    self.error("create it", e).detail()
                );
                Ok(false)
            }
            Err(e) => Err(self.error("create the unique (room, user.id, cid) index", e)),
        }
    }

    /// Inserts a batch, unordered, with `_id` = message id. A message that is
    /// already stored (duplicate key, say a batch replayed after a crash) is
    /// not an error; neither is one refused by a unique index for a clash
    /// with another message (logged by [`Self::settle_duplicates`]). Any
    /// other failure is, and the caller retries the whole batch. Returns how
    /// many messages were new.
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
                _ => Err(self.error("insert a batch of messages", e)),
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
            return Err(ChatError::Unavailable(redact_secrets(
                &format!(
                    "MongoDB could not confirm a batch of messages (write concern, code {}): {}",
                    wc.code, wc.message
                ),
                &self.url,
            )));
        }
        let errors = failure.write_errors.as_deref().unwrap_or_default();
        if let Some(other) = errors.iter().find(|w| w.code != DUPLICATE_KEY) {
            let id = msgs.get(other.index).map_or("?", |m| m.id.as_str());
            return Err(ChatError::Internal(redact_secrets(
                &format!(
                    "MongoDB refused message {id} (code {}): {}",
                    other.code, other.message
                ),
                &self.url,
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
    /// the two records come in). When the `_id` is absent, another message
    /// holds one of the other unique keys ([`Self::report_refused`]).
    async fn settle_duplicates(&self, duplicates: &[&ChatMessage]) -> Result<(), ChatError> {
        if duplicates.is_empty() {
            return Ok(());
        }
        let stored: HashMap<(String, String), u64> = self
            .messages
            .find(filter::stored(duplicates))
            .projection(doc! {"_id": 1, "room": 1, "seq": 1})
            .await
            .map_err(|e| self.error("read duplicate messages", e))?
            .try_filter_map(|d| async move {
                Ok(match (d.get_str("room"), d.get_str("_id")) {
                    (Ok(room), Ok(id)) => {
                        Some(((room.to_string(), id.to_string()), seq_of(&d).unwrap_or(0)))
                    }
                    _ => None,
                })
            })
            .try_collect()
            .await
            .map_err(|e| self.error("read duplicate messages", e))?;
        for m in duplicates {
            match stored.get(&(m.room.clone(), m.id.clone())) {
                None => self.report_refused(m).await?,
                Some(&seq) if seq < m.seq => {
                    let raised = self
                        .messages
                        .update_one(filter::raise_seq(m), doc! {"$set": {"seq": m.seq as i64}})
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
                        Err(e) => return Err(self.error("raise the seq of a message", e)),
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A message refused by a unique index while its `_id` is not stored.
    /// Either its `(room, user.id, cid)` is stored under another id (a
    /// repeated cid that reached the sequencer as new, after Redis forgot
    /// it), or its `(room, seq)` is (which the sequencer must never do).
    /// The stored message is kept and this one is not stored: say so
    /// loudly, naming both ids, but do not fail the batch (a retry would
    /// fail the same way and block the partition for ever).
    async fn report_refused(&self, m: &ChatMessage) -> Result<(), ChatError> {
        let kept = self
            .messages
            .find_one(filter::cid(&m.room, &m.user.id, &m.cid))
            .sort(doc! {"seq": 1})
            .projection(doc! {"_id": 1, "seq": 1})
            .await
            .map_err(|e| self.error("read the message of a cid", e))?;
        match kept {
            Some(kept) if id_of(&kept) != m.id => {
                self.cid_conflicts.fetch_add(1, Relaxed);
                log::error!(
                    "room={} user={} cid={} seq={} id={}: Message not stored: the same user's cid is already stored as message {} (seq {}), which is kept.",
                    m.room,
                    m.user.id,
                    m.cid,
                    m.seq,
                    m.id,
                    id_of(&kept),
                    seq_of(&kept).map_or_else(|| "?".to_string(), |s| s.to_string())
                );
            }
            _ => {
                let holder = self
                    .messages
                    .find_one(filter::at_seq(&m.room, m.seq))
                    .projection(doc! {"_id": 1})
                    .await
                    .map_err(|e| self.error("read the message of a seq", e))?;
                log::error!(
                    "room={} seq={} id={}: Message not stored: message {} already has this room and seq, and is kept.",
                    m.room,
                    m.seq,
                    m.id,
                    holder.as_ref().map_or_else(|| "?".to_string(), id_of)
                );
            }
        }
        Ok(())
    }

    /// The stored message that `user_id` sent to `room` with `cid`, if any:
    /// how a repeated cid is recognised once Redis no longer remembers it.
    /// The `(room, user.id, cid)` index answers it; on a database where that
    /// index could not be built, the first of several is the lowest seq.
    pub async fn find_by_cid(
        &self,
        room: &str,
        user_id: &str,
        cid: &str,
    ) -> Result<Option<ChatMessage>, ChatError> {
        let found = self
            .messages
            .find_one(filter::cid(room, user_id, cid))
            .sort(doc! {"seq": 1})
            .await
            .map_err(|e| self.error("read the message of a cid", e))?;
        found.as_ref().map(from_document).transpose()
    }

    /// The cids of the newest `limit` messages of `room` sent at `since_ms`
    /// or later, newest first, and whether that is all of them: what a room
    /// needs to recognise its cids again after Redis lost them. One query,
    /// for the room's shard.
    pub async fn recent_cids(
        &self,
        room: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<(Vec<AcceptedCid>, bool), ChatError> {
        let found: Vec<Document> = self
            .messages
            .find(filter::since(room, since_ms))
            .sort(doc! {"seq": -1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1))
            .projection(doc! {"_id": 1, "seq": 1, "ts": 1, "user.id": 1, "cid": 1})
            .await
            .map_err(|e| self.error("read the cids of a room", e))?
            .try_collect()
            .await
            .map_err(|e| self.error("read the cids of a room", e))?;
        let complete = found.len() <= limit;
        let cids = found
            .iter()
            .take(limit)
            .filter_map(|d| {
                Some(AcceptedCid {
                    user_id: d.get_document("user").ok()?.get_str("id").ok()?.to_string(),
                    cid: d.get_str("cid").ok()?.to_string(),
                    stamp: Stamp {
                        seq: seq_of(d)?,
                        id: d.get_str("_id").ok()?.to_string(),
                        ts: d.get_datetime("ts").ok()?.timestamp_millis(),
                    },
                })
            })
            .collect();
        Ok((cids, complete))
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
        // One extra message tells whether there are more.
        let docs: Vec<Document> = self
            .messages
            .find(filter::before(room, before))
            .sort(doc! {"seq": -1})
            .limit(i64::from(limit) + 1)
            .await
            .map_err(|e| self.error("read history", e))?
            .try_collect()
            .await
            .map_err(|e| self.error("read history", e))?;
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
            .find(filter::after(room, since))
            .sort(doc! {"seq": 1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| self.error("read messages after a seq", e))?
            .try_collect()
            .await
            .map_err(|e| self.error("read messages after a seq", e))?;
        docs.iter().map(from_document).collect()
    }

    /// The highest stored seq of `room`, 0 if it has none.
    pub async fn max_seq(&self, room: &str) -> Result<u64, ChatError> {
        let found = self
            .messages
            .find_one(filter::room(room))
            .sort(doc! {"seq": -1})
            .projection(doc! {"seq": 1})
            .await
            .map_err(|e| self.error("read the last seq of a room", e))?;
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
            .map_err(|e| self.error("ping", e))?;
        Ok(())
    }

    /// The write concern every write of this store asks for.
    pub fn write_concern(&self) -> Option<&WriteConcern> {
        self.messages.write_concern()
    }

    /// Whether the unique `(room, user.id, cid)` index is in place (see
    /// [`Self::connect`]).
    pub fn has_cid_index(&self) -> bool {
        self.cid_index
    }

    /// Messages this store (and its clones) refused because their
    /// `(room, user.id, cid)` was already stored under another id.
    pub fn cid_conflicts(&self) -> u64 {
        self.cid_conflicts.load(Relaxed)
    }

    /// `mongo_error`, scrubbed of the secrets of this store's URL.
    fn error(&self, doing: &str, e: MongoError) -> ChatError {
        mongo_error(doing, e, &self.url)
    }
}

/// The write concern of every write: `mongo.write_concern` and
/// `mongo.journal`, stated rather than left to the deployment's default.
/// They win over a `w` or `journal` in the URL (with a warning); the URL's
/// `wtimeoutMS` is kept, else [`WRITE_CONCERN_TIMEOUT`].
fn write_concern(settings: &MongoSettings, from_url: Option<&WriteConcern>) -> WriteConcern {
    let w = match settings.write_concern {
        config::WriteConcern::Majority => Acknowledgment::Majority,
        config::WriteConcern::Members(n) => Acknowledgment::Nodes(n),
    };
    if let Some(url) = from_url {
        let other_w = url.w.as_ref().is_some_and(|u| *u != w);
        let other_j = url.journal.is_some_and(|j| j != settings.journal);
        if other_w || other_j {
            log::warn!(
                "url={}: The write concern in mongo.url (w={:?}, journal={:?}) is replaced by mongo.write_concern and mongo.journal ({w:?}, {}).",
                redact_url(&settings.url),
                url.w,
                url.journal,
                settings.journal
            );
        }
    }
    WriteConcern::builder()
        .w(w)
        .journal(settings.journal)
        .w_timeout(
            from_url
                .and_then(|u| u.w_timeout)
                .unwrap_or(WRITE_CONCERN_TIMEOUT),
        )
        .build()
}

/// A unique index on `keys` named `name`.
fn unique_index(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_string())
                .unique(true)
                .build(),
        )
        .build()
}

/// Every filter the store sends. Each one names the room: on a collection
/// sharded by `room`, mongos sends a query or update that names the room to
/// the one shard that holds it, and any other to every shard. The tests
/// check that each filter has `room`, and that no query of this file takes
/// its filter from anywhere else.
mod filter {
    use super::*;

    /// Every message of `room`.
    pub(super) fn room(room: &str) -> Document {
        doc! {"room": room}
    }

    /// The messages of `room` below `before`; all of them without it, or
    /// when it is above any storable seq.
    pub(super) fn before(room: &str, before: Option<u64>) -> Document {
        match before.and_then(|b| i64::try_from(b).ok()) {
            Some(b) => doc! {"room": room, "seq": {"$lt": b}},
            None => doc! {"room": room},
        }
    }

    /// The messages of `room` above `since` (at most `i64::MAX`).
    pub(super) fn after(room: &str, since: u64) -> Document {
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        doc! {"room": room, "seq": {"$gt": since}}
    }

    /// The message `user_id` sent to `room` with `cid`.
    pub(super) fn cid(room: &str, user_id: &str, cid: &str) -> Document {
        doc! {"room": room, "user.id": user_id, "cid": cid}
    }

    /// The messages of `room` stored with a `ts` of `since_ms` or later.
    pub(super) fn since(room: &str, since_ms: i64) -> Document {
        doc! {"room": room, "ts": {"$gte": DateTime::from_millis(since_ms)}}
    }

    /// The message of `room` at `seq`.
    pub(super) fn at_seq(room: &str, seq: u64) -> Document {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        doc! {"room": room, "seq": seq}
    }

    /// The stored copies of `messages`, by room and `_id` (a message's
    /// `_id` is unique on its room's shard only).
    pub(super) fn stored(messages: &[&ChatMessage]) -> Document {
        let mut rooms: Vec<&str> = messages.iter().map(|m| m.room.as_str()).collect();
        rooms.sort_unstable();
        rooms.dedup();
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        doc! {"room": {"$in": &rooms}, "_id": {"$in": &ids}}
    }

    /// The stored copy of `m` while its seq is below `m.seq`.
    pub(super) fn raise_seq(m: &ChatMessage) -> Document {
        let seq = i64::try_from(m.seq).unwrap_or(i64::MAX);
        doc! {"room": &m.room, "_id": &m.id, "seq": {"$lt": seq}}
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
/// data) are `Internal`. The message names what was being done, and never
/// the secrets of `url` (the driver may quote parts of it).
fn mongo_error(doing: &str, e: MongoError, url: &str) -> ChatError {
    let message = redact_secrets(&format!("MongoDB: cannot {doing}: {e}"), url);
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn message(room: &str, seq: u64) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            seq,
            id: format!("id-{room}-{seq}"),
            user: User {
                id: "u1".into(),
                name: "alice".into(),
            },
            text: "hi".into(),
            ts: 0,
            cid: format!("c{seq}"),
        }
    }

    /// Whether `filter` selects by room: `room` is its first key, an exact
    /// room or a `$in` list of rooms.
    fn names_the_room(filter: &Document) -> bool {
        let first = filter.keys().next().map(String::as_str);
        let targeted = match filter.get("room") {
            Some(Bson::String(_)) => true,
            Some(Bson::Document(op)) => {
                op.len() == 1
                    && matches!(op.get("$in"), Some(Bson::Array(rooms)) if !rooms.is_empty())
            }
            _ => false,
        };
        first == Some("room") && targeted
    }

    #[test]
    fn every_filter_names_the_room() {
        let a = message("general", 3);
        let b = message("random", 9);
        let filters = [
            ("room", filter::room("general")),
            ("before", filter::before("general", Some(10))),
            ("before none", filter::before("general", None)),
            ("before huge", filter::before("general", Some(u64::MAX))),
            ("after", filter::after("general", 4)),
            ("cid", filter::cid("general", "u1", "c1")),
            ("at_seq", filter::at_seq("general", 3)),
            ("since", filter::since("general", 1_700_000_000_000)),
            ("stored", filter::stored(&[&a, &b, &a])),
            ("raise_seq", filter::raise_seq(&a)),
        ];
        for (name, f) in &filters {
            assert!(names_the_room(f), "{name}: {f}");
        }
        assert_eq!(
            filter::stored(&[&b, &a, &b]),
            doc! {"room": {"$in": ["general", "random"]}, "_id": {"$in": [&b.id, &a.id, &b.id]}}
        );
        assert_eq!(
            filter::raise_seq(&a),
            doc! {"room": "general", "_id": &a.id, "seq": {"$lt": 3_i64}}
        );
        assert_eq!(
            filter::cid("general", "u1", "c1"),
            doc! {"room": "general", "user.id": "u1", "cid": "c1"}
        );
        assert_eq!(
            filter::before("general", Some(u64::MAX)),
            doc! {"room": "general"}
        );
    }

    /// Every operation on the collection in this file is either a write
    /// that carries its room in the document (`insert_many`), the index
    /// set-up, or a query or update whose filter comes from [`filter`], so
    /// the test above covers them all. A new one that builds its filter
    /// elsewhere, or a new kind of operation, fails here.
    #[test]
    fn every_query_takes_its_filter_from_the_filter_module() {
        let source = include_str!("mongo.rs");
        let code = source.split("#[cfg(test)]").next().unwrap();
        let without_filter = ["insert_many", "create_index", "write_concern"];
        let mut queries = 0;
        for (at, _) in code.match_indices(".messages") {
            let rest = code[at + ".messages".len()..].trim_start();
            let Some(call) = rest.strip_prefix('.') else {
                // A field access or a declaration: not an operation.
                continue;
            };
            let Some((method, argument)) = call.split_once('(') else {
                continue;
            };
            if without_filter.contains(&method) {
                continue;
            }
            queries += 1;
            assert!(
                argument.trim_start().starts_with("filter::"),
                "`.messages.{method}(` at byte {at} does not take its filter from `filter::`"
            );
        }
        assert!(
            queries >= 8,
            "found only {queries} queries: has the file changed?"
        );
    }

    #[test]
    fn writes_ask_for_majority_and_journal_by_default() {
        let settings = MongoSettings::new("mongodb://h", "d");
        let wc = write_concern(&settings, None);
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.journal, Some(true));
        assert_eq!(wc.w_timeout, Some(WRITE_CONCERN_TIMEOUT));
    }

    #[test]
    fn the_settings_win_over_the_url_but_its_timeout_stays() {
        let settings = MongoSettings {
            write_concern: config::WriteConcern::Members(2),
            journal: false,
            ..MongoSettings::new("mongodb://h/?w=1&journal=true&wtimeoutMS=2500", "d")
        };
        let from_url = WriteConcern::builder()
            .w(Acknowledgment::Nodes(1))
            .journal(true)
            .w_timeout(Duration::from_millis(2500))
            .build();
        let wc = write_concern(&settings, Some(&from_url));
        assert_eq!(wc.w, Some(Acknowledgment::Nodes(2)));
        assert_eq!(wc.journal, Some(false));
        assert_eq!(wc.w_timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn errors_never_show_the_password_of_the_url() {
        let url = "mongodb://chat:s3cr%3Ft@db:27017/?authSource=admin";
        let e = MongoError::from(std::io::Error::other(format!(
            "cannot use {url}: password s3cr?t refused"
        )));
        let shown = mongo_error("connect", e, url).detail();
        assert!(
            !shown.contains("s3cr") && shown.contains("mongodb://chat:***@db:27017"),
            "{shown}"
        );
    }
}
