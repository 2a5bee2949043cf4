//! The REST API under `/api/v1`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::bearer::bearer_user;
use super::limit;
use crate::actors::app::AppState;
use crate::actors::registry::ListRooms;
use crate::auth::{new_user_id, unix_now};
use crate::error::ChatError;
use crate::protocol::{
    validate_cid, validate_limit, validate_room, validate_text, validate_user_name, User,
};
use crate::store::NewMessage;

#[derive(Deserialize)]
pub(super) struct GuestBody {
    name: String,
}

/// `POST /auth/guest`: a token for a new guest user. Each new user costs
/// a token of the client address's sign-in bucket
/// (`limits.signin_rate_*`), on top of the request's own.
pub(super) async fn guest(
    req: HttpRequest,
    body: web::Json<GuestBody>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let name = body.into_inner().name;
    validate_user_name(&name)?;
    limit::take(&app.signin_rates, &req)?;
    let user = User {
        id: new_user_id(),
        name,
    };
    let token = app.tokens.issue(&user, unix_now());
    Ok(HttpResponse::Ok().json(json!({"token": token, "user": user})))
}

/// `GET /me`: the user of the bearer token (lets a client check its token).
pub(super) async fn me(
    req: HttpRequest,
    app: web::Data<AppState>,
) -> Result<HttpResponse, ChatError> {
    let user = bearer_user(&req, &app)?;
    Ok(HttpResponse::Ok().json(json!({"user": user})))
}

/// `GET /rooms`: rooms with messages or members, by name.
pub(super) async fn rooms(app: web::Data<AppState>) -> Result<HttpResponse, ChatError> {
    let stored = app.store.rooms().await?;
    let online = app.registry.send(ListRooms).await.unwrap_or_default();
    let mut rooms: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (name, last_seq) in stored {
        rooms.entry(name).or_default().1 = last_seq;
    }
    for (name, users) in online {
        rooms.entry(name).or_default().0 = users;
    }
    let list: Vec<_> = rooms
        .into_iter()
        .map(|(name, (members, last_seq))| json!({"name": name, "members": members, "last_seq": last_seq}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"rooms": list})))
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

/// `GET /rooms/{room}/messages?before=&limit=`: a page of history.
pub(super) async fn messages(
    path: web::Path<String>,
    query: web::Query<PageQuery>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, ChatError> {
    let room = validate_room(path.into_inner())?;
    let limit = validate_limit(query.limit)?;
    let page = app.store.before(&room, query.before, limit).await?;
    Ok(HttpResponse::Ok().json(json!({"messages": page.messages, "has_more": page.has_more})))
}

#[derive(Deserialize)]
pub(super) struct PostBody {
    text: String,
    cid: String,
}

/// `POST /rooms/{room}/messages`: posts like `send`, answers 201 with the
/// stored message once it is durable.
pub(super) async fn post_message(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<PostBody>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, ChatError> {
    let received = Instant::now();
    let user = bearer_user(&req, &app)?;
    // The same per-user bucket as the user's WebSocket frames.
    if !app.user_rates.take(&user.id, received) {
        return Err(ChatError::RateLimited);
    }
    let room = validate_room(path.into_inner())?;
    let PostBody { text, cid } = body.into_inner();
    validate_cid(&cid)?;
    validate_text(&text, app.settings.limits.max_text_chars)?;
    if app.draining.load(Relaxed) {
        return Err(ChatError::Unavailable("the node is shutting down".into()));
    }
    let accepted = app
        .store
        .append(NewMessage {
            room,
            user,
            text,
            cid,
        })
        .await?;
    if !accepted.duplicate {
        app.metrics.messages_in.fetch_add(1, Relaxed);
    }
    app.metrics.ack_latency(received.elapsed());
    Ok(HttpResponse::Created().json(accepted.message))
}
