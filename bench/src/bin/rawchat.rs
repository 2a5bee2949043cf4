//! The raw baseline: the smallest tokio + tokio-tungstenite room broadcast
//! server. No actors, no auth, no persistence, no sequence numbers.
//!
//! ```text
//! rawchat [127.0.0.1:8090]
//! ```
//!
//! Frames (JSON text): `{"op":"join","room":R}` answers `{"op":"joined","room":R}`;
//! `{"op":"send","room":R,"text":T}` sends `{"op":"msg","room":R,"text":T}` to
//! every connection in room R, the sender included when it joined.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Tx = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, HashMap<u64, Tx>>>,
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, Tx>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Deserialize)]
struct Frame {
    op: String,
    #[serde(default)]
    room: String,
    #[serde(default)]
    text: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_string());
    let listener = TcpListener::bind(&addr).await?;
    println!("rawchat listening on {addr}");
    let rooms = Arc::new(Rooms::default());
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(stream, id, rooms.clone()));
    }
}

async fn serve(stream: TcpStream, id: u64, rooms: Arc<Rooms>) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut joined: Vec<String> = Vec::new();
    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame.op.as_str() {
            "join" => {
                rooms
                    .lock()
                    .entry(frame.room.clone())
                    .or_default()
                    .insert(id, tx.clone());
                let reply = serde_json::json!({"op": "joined", "room": frame.room});
                let _ = tx.send(Message::text(reply.to_string()));
                joined.push(frame.room);
            }
            "send" => {
                let out = serde_json::json!({"op": "msg", "room": frame.room, "text": frame.text})
                    .to_string();
                let members: Vec<Tx> = rooms
                    .lock()
                    .get(&frame.room)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                for m in members {
                    let _ = m.send(Message::text(out.clone()));
                }
            }
            _ => {}
        }
    }
    {
        let mut all = rooms.lock();
        for room in joined {
            if let Some(m) = all.get_mut(&room) {
                m.remove(&id);
                if m.is_empty() {
                    all.remove(&room);
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
