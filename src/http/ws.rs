//! `GET /ws?token=…`: checks the Origin and the token before upgrading.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::actors::app::AppState;
use crate::actors::session::WsSession;
use crate::auth::unix_now;
use crate::error::ChatError;

#[derive(Deserialize)]
pub(super) struct WsQuery {
    token: Option<String>,
}

pub(super) async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    query: web::Query<WsQuery>,
    app: web::Data<AppState>,
) -> Result<HttpResponse, ChatError> {
    if let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|origin| {
            app.settings
                .http
                .allowed_origins
                .iter()
                .any(|a| a == origin)
        });
        if !allowed {
            return Err(ChatError::Forbidden("this origin may not connect".into()));
        }
    }
    let token = query.token.as_deref().ok_or(ChatError::Unauthorized)?;
    // The token is a credential: only why it was refused goes to the log.
    let user = app.tokens.verify(token, unix_now()).map_err(|e| {
        log::debug!("WebSocket upgrade from {:?} refused: {e}.", req.peer_addr());
        ChatError::Unauthorized
    })?;
    if app.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ChatError::Unavailable("the node is shutting down".into()));
    }
    // The cap on connections per client address; the slot is given back
    // when the connection ends.
    let slot = match req.peer_addr() {
        Some(peer) => Some(app.address_slots.acquire(peer.ip()).ok_or_else(|| {
            log::debug!("WebSocket upgrade from {peer} refused: too many connections.");
            ChatError::RateLimited
        })?),
        None => None,
    };
    WsSession::start(app.into_inner(), user, slot, &req, stream)
}
