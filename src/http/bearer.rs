//! `Authorization: Bearer <token>`: the user of a REST request.

use actix_web::HttpRequest;

use crate::actors::app::AppState;
use crate::auth::unix_now;
use crate::error::ChatError;
use crate::protocol::User;

/// The user of a `Authorization: Bearer <token>` header.
pub(super) fn bearer_user(req: &HttpRequest, app: &AppState) -> Result<User, ChatError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ChatError::Unauthorized)?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or(ChatError::Unauthorized)?;
    app.tokens
        .verify(token.trim(), unix_now())
        .map_err(|_| ChatError::Unauthorized)
}
