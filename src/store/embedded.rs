//! The embedded store of standalone mode: a redb database in
//! `node.data_dir`.
//!
//! redb is a pure-Rust, copy-on-write B-tree store with ACID transactions
//! whose commits are fsynced before they return, so a node killed right
//! after an `ack` still has the message when it restarts. One writer thread
//! owns every write and commits in groups: all appends waiting when a
//! transaction starts share its fsync, which is what keeps the accept→ack
//! latency low under load. Reads run on the blocking pool beside it.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Accepted, CommitHook, DependencyStatus, MessageStore, NewMessage, Page};
use crate::error::ChatError;
use crate::protocol::ChatMessage;

/// (room, seq) → the message as JSON.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// (room, user id, cid) → seq: the idempotency index.
const CIDS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("cids");
/// room → last seq.
const ROOMS: TableDefinition<&str, u64> = TableDefinition::new("rooms");

/// Appends waiting for the writer; beyond this the store answers
/// `unavailable` instead of queueing without bound.
const QUEUE_CAPACITY: usize = 65_536;
/// Most appends committed in one transaction.
const MAX_BATCH: usize = 1024;

enum Job {
    Append {
        msg: NewMessage,
        reply: oneshot::Sender<Result<Accepted, ChatError>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// The embedded message store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    jobs: SyncSender<Job>,
    /// Joined on drop, so the database is closed when the store is.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has answered every job.
        let (closed, _) = sync_channel(0);
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `dir` and starts its writer
    /// thread; `on_commit` hears of every new message once it is durable.
    pub fn open(dir: &Path, on_commit: CommitHook) -> Result<Self, ChatError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ChatError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("messages.redb"))
            .map_err(|e| ChatError::Internal(format!("cannot open the store: {e}")))?;
        // Create the tables so that readers never meet a missing one.
        let create = || -> Result<(), StoreError> {
            let txn = db.begin_write()?;
            {
                txn.open_table(MESSAGES)?;
                txn.open_table(CIDS)?;
                txn.open_table(ROOMS)?;
            }
            txn.commit()?;
            Ok(())
        };
        create()?;
        let db = Arc::new(db);
        let (jobs, rx) = sync_channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_db, rx, on_commit))
            .map_err(|e| ChatError::Internal(format!("cannot start the store writer: {e}")))?;
        Ok(Self {
            db,
            jobs,
            writer: Some(writer),
        })
    }

    fn read<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, ChatError>>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        async move {
            match tokio::task::spawn_blocking(move || f(&db)).await {
                Ok(r) => r.map_err(ChatError::from),
                Err(e) => Err(ChatError::Internal(format!("store read failed: {e}"))),
            }
        }
        .boxed()
    }
}

impl MessageStore for EmbeddedStore {
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, Result<Accepted, ChatError>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.jobs.try_send(Job::Append { msg, reply });
        async move {
            match sent {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(ChatError::Unavailable("store writer stopped".into()))),
                Err(TrySendError::Full(_)) => {
                    Err(ChatError::Unavailable("store queue is full".into()))
                }
                Err(TrySendError::Disconnected(_)) => {
                    Err(ChatError::Unavailable("store writer stopped".into()))
                }
            }
        }
        .boxed()
    }

    fn after(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ChatError>> {
        let room = room.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            let start = since.saturating_add(1);
            for entry in table.range((room.as_str(), start)..=(room.as_str(), u64::MAX))? {
                if out.len() >= limit {
                    break;
                }
                let (_, value) = entry?;
                out.push(decode(value.value())?);
            }
            Ok(out)
        })
    }

    fn before(
        &self,
        room: &str,
        before: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'static, Result<Page, ChatError>> {
        let room = room.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(MESSAGES)?;
            let end = before.unwrap_or(u64::MAX);
            let mut messages = Vec::new();
            let mut has_more = false;
            for entry in table.range((room.as_str(), 0)..(room.as_str(), end))?.rev() {
                if messages.len() >= limit as usize {
                    has_more = true;
                    break;
                }
                let (_, value) = entry?;
                messages.push(decode(value.value())?);
            }
            messages.reverse();
            Ok(Page { messages, has_more })
        })
    }

    fn last_seq(&self, room: &str) -> BoxFuture<'static, Result<u64, ChatError>> {
        let room = room.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROOMS)?;
            Ok(table.get(room.as_str())?.map(|v| v.value()).unwrap_or(0))
        })
    }

    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, ChatError>> {
        let after = after.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROOMS)?;
            // The table is ordered by name: the page is a range of it.
            let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in table.range::<&str>((from, Bound::Unbounded))?.take(limit) {
                let (k, v) = entry?;
                out.push((k.value().to_string(), v.value()));
            }
            Ok(out)
        })
    }

    fn check(&self) -> BoxFuture<'static, Vec<DependencyStatus>> {
        let probe = self.read(|db| {
            let txn = db.begin_read()?;
            txn.open_table(ROOMS)?;
            Ok(())
        });
        async move {
            vec![DependencyStatus {
                name: "store",
                error: probe.await.err().map(|e| format!("{e:?}")),
            }]
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let (reply, rx) = oneshot::channel();
        // A blocking send: a flush must queue behind every accepted append.
        let jobs = self.jobs.clone();
        async move {
            let sent =
                tokio::task::spawn_blocking(move || jobs.send(Job::Flush { reply }).is_ok()).await;
            if matches!(sent, Ok(true)) {
                let _ = rx.await;
            }
        }
        .boxed()
    }
}

/// A redb failure, boxed: redb's error type is large.
#[derive(Debug)]
pub struct StoreError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(Box::new(e.into()))
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        ChatError::Unavailable(e.0.to_string())
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn decode(bytes: &[u8]) -> Result<ChatMessage, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| redb::Error::Corrupted(format!("undecodable message: {e}")).into())
}

/// The writer thread: takes every job waiting, commits the appends among
/// them in one transaction, then answers them and tells `on_commit`.
fn writer_loop(db: &Database, rx: Receiver<Job>, on_commit: CommitHook) {
    // Monotonic within a millisecond, so ids sort like seqs within a room.
    let mut ids = ulid::Generator::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut appends = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        for job in batch {
            match job {
                Job::Append { msg, reply } => appends.push((msg, reply)),
                Job::Flush { reply } => flushes.push(reply),
            }
        }
        if !appends.is_empty() {
            let msgs: Vec<&NewMessage> = appends.iter().map(|(m, _)| m).collect();
            match commit_batch(db, &msgs, &mut ids) {
                Ok(results) => {
                    for ((_, reply), accepted) in appends.into_iter().zip(results) {
                        if !accepted.duplicate {
                            on_commit(accepted.message.clone());
                        }
                        let _ = reply.send(Ok(accepted));
                    }
                }
                Err(e) => {
                    log::error!(
                        "Store commit failed: {e}. {} appends refused.",
                        appends.len()
                    );
                    for (_, reply) in appends {
                        let _ = reply.send(Err(ChatError::Unavailable(e.to_string())));
                    }
                }
            }
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

/// Stores a batch in one transaction; nothing of it is visible or
/// answered unless the whole commit (and its fsync) succeeds.
fn commit_batch(
    db: &Database,
    msgs: &[&NewMessage],
    ids: &mut ulid::Generator,
) -> Result<Vec<Accepted>, StoreError> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(msgs.len());
    {
        let mut messages = txn.open_table(MESSAGES)?;
        let mut cids = txn.open_table(CIDS)?;
        let mut rooms = txn.open_table(ROOMS)?;
        let mut last: HashMap<&str, u64> = HashMap::new();
        for m in msgs {
            let key = (m.room.as_str(), m.user.id.as_str(), m.cid.as_str());
            let earlier = cids.get(key)?.map(|v| v.value());
            if let Some(seq) = earlier {
                if let Some(stored) = messages.get((m.room.as_str(), seq))? {
                    results.push(Accepted {
                        message: decode(stored.value())?,
                        duplicate: true,
                    });
                    continue;
                }
            }
            let prev = match last.get(m.room.as_str()) {
                Some(seq) => *seq,
                None => rooms.get(m.room.as_str())?.map(|v| v.value()).unwrap_or(0),
            };
            let seq = prev + 1;
            let id = ids
                .generate()
                .unwrap_or_else(|_| ulid::Ulid::new())
                .to_string();
            let message = ChatMessage {
                room: m.room.clone(),
                seq,
                id,
                user: m.user.clone(),
                text: m.text.clone(),
                ts: crate::protocol::now_ms(),
                cid: m.cid.clone(),
            };
            let bytes = serde_json::to_vec(&message).map_err(|e| {
                StoreError::from(redb::Error::Corrupted(format!("cannot encode: {e}")))
            })?;
            messages.insert((m.room.as_str(), seq), bytes.as_slice())?;
            cids.insert(key, seq)?;
            rooms.insert(m.room.as_str(), seq)?;
            last.insert(m.room.as_str(), seq);
            results.push(Accepted {
                message,
                duplicate: false,
            });
        }
    }
    txn.commit()?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::protocol::User;
    use std::sync::Mutex;

    fn new_msg(room: &str, user: &str, cid: &str) -> NewMessage {
        NewMessage {
            room: room.into(),
            user: User {
                id: user.into(),
                name: user.into(),
            },
            text: format!("text {cid}"),
            cid: cid.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_ordered_idempotent_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        let store = EmbeddedStore::open(
            dir.path(),
            Box::new(move |m| hook_seen.lock().unwrap().push(m.seq)),
        )
        .unwrap();
        let mut futs = Vec::new();
        for i in 0..50 {
            futs.push(store.append(new_msg("r", "u1", &format!("c{i}"))));
        }
        let results = futures_util::future::join_all(futs).await;
        let seqs: Vec<u64> = results
            .iter()
            .map(|r| r.as_ref().unwrap().message.seq)
            .collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        // Same cid, same user: the earlier message.
        let again = store.append(new_msg("r", "u1", "c7")).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 8);
        assert_eq!(again.message.id, results[7].as_ref().unwrap().message.id);
        // Same cid, other user or other room: a new message.
        assert_eq!(
            store
                .append(new_msg("r", "u2", "c7"))
                .await
                .unwrap()
                .message
                .seq,
            51
        );
        assert_eq!(
            store
                .append(new_msg("q", "u1", "c7"))
                .await
                .unwrap()
                .message
                .seq,
            1
        );
        store.flush().await;
        assert_eq!(*seen.lock().unwrap(), {
            let mut v: Vec<u64> = (1..=51).collect();
            v.push(1);
            v
        });
        // Ids increase with seq.
        let all = store.after("r", 0, 1000).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));

        drop(store);
        let store = EmbeddedStore::open(dir.path(), Box::new(|_| {})).unwrap();
        assert_eq!(store.last_seq("r").await.unwrap(), 51);
        assert_eq!(store.after("r", 49, 10).await.unwrap().len(), 2);
        assert_eq!(
            store
                .append(new_msg("r", "u1", "new"))
                .await
                .unwrap()
                .message
                .seq,
            52
        );
        let rooms = store.rooms(None, 10).await.unwrap();
        assert_eq!(rooms, vec![("q".into(), 1), ("r".into(), 52)]);
        assert_eq!(store.rooms(None, 1).await.unwrap(), vec![("q".into(), 1)]);
        assert_eq!(
            store.rooms(Some("q"), 10).await.unwrap(),
            vec![("r".into(), 52)]
        );
        assert!(store.rooms(Some("r"), 10).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_pages_back_to_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Box::new(|_| {})).unwrap();
        for i in 0..25 {
            store
                .append(new_msg("r", "u", &format!("{i}")))
                .await
                .unwrap();
        }
        let page = store.before("r", None, 10).await.unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (16..=25).collect::<Vec<_>>()
        );
        assert!(page.has_more);
        let page = store.before("r", Some(16), 10).await.unwrap();
        assert_eq!(page.messages.first().unwrap().seq, 6);
        assert!(page.has_more);
        let page = store.before("r", Some(6), 10).await.unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert!(!page.has_more);
        let empty = store.before("none", None, 10).await.unwrap();
        assert!(empty.messages.is_empty() && !empty.has_more);
    }
}
