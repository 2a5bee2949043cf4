//! The REST API under `/api/v1`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::bearer::bearer_user;
use super::limit::{self, TooManyRequests};
use crate::actors::app::AppState;
use crate::actors::registry::ListRooms;
use crate::actors::session::pay_for_new_room;
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

/// Rooms per page of `GET /rooms` unless the client asks for another
/// number...
const ROOMS_PAGE: usize = 100;
/// ...and the most it may ask for.
const MAX_ROOMS_PAGE: usize = 500;

#[derive(Deserialize)]
pub(super) struct RoomsQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /rooms?after=&limit=`: a page of the rooms with messages or
/// members, by name, and the name to ask for the next page after (`next`,
/// null on the last page).
///
/// Both sources are asked for one room more than the page: when the two
/// together have more than `limit`, a next page exists; when they have
/// fewer, both are exhausted. A room of the page that has members is among
/// the first `limit` of the registry's, so it has its count.
pub(super) async fn rooms(
    query: web::Query<RoomsQuery>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, ChatError> {
    let RoomsQuery { after, limit } = query.into_inner();
    let limit = match limit {
        None => ROOMS_PAGE,
        Some(l) if (1..=MAX_ROOMS_PAGE).contains(&l) => l,
        Some(_) => return Err(ChatError::bad_request("limit must be 1-500")),
    };
    let after = after
        .map(validate_room)
        .transpose()
        .map_err(|_| ChatError::bad_request("after must be a room name, as `next` gave it"))?;
    let stored = app.store.rooms(after.as_deref(), limit + 1).await?;
    let online = app
        .registry
        .send(ListRooms {
            after,
            limit: limit + 1,
        })
        .await
        .unwrap_or_default();
    let mut rooms: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (name, last_seq) in stored {
        rooms.entry(name).or_default().1 = last_seq;
    }
    for (name, users) in online {
        rooms.entry(name).or_default().0 = users;
    }
    let more = rooms.len() > limit;
    let page: Vec<_> = rooms.into_iter().take(limit).collect();
    let next = more
        .then(|| page.last().map(|(name, _)| name.clone()))
        .flatten();
    let list: Vec<_> = page
        .into_iter()
        .map(|(name, (members, last_seq))| json!({"name": name, "members": members, "last_seq": last_seq}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"rooms": list, "next": next})))
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
/// stored message once it is durable. A post into a room without messages
/// opens it, and costs what opening a room costs.
pub(super) async fn post_message(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<PostBody>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let received = Instant::now();
    let user = bearer_user(&req, &app)?;
    // The same per-user bucket as the user's WebSocket frames.
    app.user_rates
        .take_cost(&user.id, 1.0, received)
        .map_err(TooManyRequests::after)?;
    let room = validate_room(path.into_inner())?;
    let PostBody { text, cid } = body.into_inner();
    validate_cid(&cid)?;
    validate_text(&text, app.settings.limits.max_text_chars)?;
    if app.draining.load(Relaxed) {
        return Err(ChatError::Unavailable("the node is shutting down".into()).into());
    }
    // The first message opens the room: charged like a `join` that does.
    if app.store.last_seq(&room).await? == 0 {
        pay_for_new_room(&app, &user.id).map_err(TooManyRequests::after)?;
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
