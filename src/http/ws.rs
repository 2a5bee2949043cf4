//! `GET /ws?token=…`: checks the Origin and the token before upgrading.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::actors::session::{ConnHandle, WsSession};
use crate::auth::unix_now;
use crate::error::ChatError;
use crate::AppState;

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
    let user = app
        .tokens
        .verify(token, unix_now())
        .map_err(|_| ChatError::Unauthorized)?;
    if app.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ChatError::Unavailable("the node is shutting down".into()));
    }
    let conn = req.conn_data::<ConnHandle>().cloned();
    WsSession::start(app.into_inner(), user, conn, &req, stream)
}
