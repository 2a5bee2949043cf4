//! The one error type of the node. Each variant maps to one stable
//! snake_case code and a message written for users, used alike in WebSocket
//! `error` frames and in HTTP error bodies.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use std::net::SocketAddr;

use serde_json::json;

/// Everything a request can be refused for.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    /// The input does not follow the contract; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// A frame or a text over its configured size.
    #[error("{0}")]
    TooLarge(String),
    /// `send`, `typing`, `history` or `leave` in a room not joined.
    #[error("join the room first")]
    NotJoined,
    /// The client sends faster than its rate limit.
    #[error("too many requests: slow down")]
    RateLimited,
    /// A backing store cannot make the message durable now; retry the same cid.
    #[error("the message store is unavailable: retry with the same cid")]
    Unavailable(String),
    /// Not allowed (a foreign Origin, a limit on rooms or connections).
    #[error("{0}")]
    Forbidden(String),
    /// Missing, forged or expired token (HTTP only).
    #[error("a valid token is required")]
    Unauthorized,
    /// No such route (HTTP only).
    #[error("not found")]
    NotFound,
    /// A bug or an unexpected failure; details are in the node's log.
    #[error("internal error")]
    Internal(String),
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the message store: {}", .0.detail())]
    Store(ChatError),
    #[error("cannot reach {service}: {}", error.detail())]
    Service {
        service: &'static str,
        error: ChatError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Server(std::io::Error),
    #[error(
        "node.id `{node_id}` is in use by a live node (its heartbeat moves on): give every node its own node.id"
    )]
    DuplicateNodeId { node_id: String },
    #[error(
        "kafka topic {topic} could lose acknowledged messages: {settings} (a replication factor of at least 2, min.insync.replicas of at least 2 and unclean.leader.election.enable=false are needed); set kafka.allow_unsafe_durability = true to start anyway, for a single development broker only"
    )]
    UnsafeDurability { topic: String, settings: String },
}

impl ChatError {
    /// The details for the node's log: the `Display` of some variants is
    /// the sentence meant for clients, and hides what went wrong.
    pub fn detail(&self) -> String {
        match self {
            ChatError::Unavailable(m) | ChatError::Internal(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => "bad_request",
            ChatError::TooLarge(_) => "too_large",
            ChatError::NotJoined => "not_joined",
            ChatError::RateLimited => "rate_limited",
            ChatError::Unavailable(_) => "unavailable",
            ChatError::Forbidden(_) => "forbidden",
            ChatError::Unauthorized => "unauthorized",
            ChatError::NotFound => "not_found",
            ChatError::Internal(_) => "internal",
        }
    }

    /// Every code, for metrics that list them all from the start.
    pub const CODES: [&'static str; 9] = [
        "bad_request",
        "too_large",
        "not_joined",
        "rate_limited",
        "unavailable",
        "forbidden",
        "unauthorized",
        "not_found",
        "internal",
    ];

    pub fn bad_request(message: impl Into<String>) -> Self {
        ChatError::BadRequest(message.into())
    }

    /// The JSON body of an HTTP error.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code(), "message": self.to_string()}})
    }
}

impl ResponseError for ChatError {
    fn status_code(&self) -> StatusCode {
        match self {
            ChatError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ChatError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ChatError::NotJoined | ChatError::Forbidden(_) => StatusCode::FORBIDDEN,
            ChatError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ChatError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ChatError::Unauthorized => StatusCode::UNAUTHORIZED,
            ChatError::NotFound => StatusCode::NOT_FOUND,
            ChatError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_listed() {
        let all = [
            ChatError::bad_request("x"),
            ChatError::TooLarge("x".into()),
            ChatError::NotJoined,
            ChatError::RateLimited,
            ChatError::Unavailable("x".into()),
            ChatError::Forbidden("x".into()),
            ChatError::Unauthorized,
            ChatError::NotFound,
            ChatError::Internal("x".into()),
        ];
        let codes: Vec<_> = all.iter().map(ChatError::code).collect();
        assert_eq!(codes, ChatError::CODES);
        assert_eq!(all[3].status_code(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let e = ChatError::Internal("disk path /secret".into());
        assert!(!e.to_string().contains("secret"));
    }
}
