//! The per-address limits of the HTTP edge: a token bucket per client
//! address over every request to the REST API and the WebSocket upgrade,
//! and a second, slower one over guest sign-ins. A refusal costs the node
//! no more than the bucket lookup: it comes before any body is read, any
//! token checked or any store asked.

use std::fmt;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::RETRY_AFTER;
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use crate::actors::app::AppState;
use crate::error::ChatError;
use crate::limits::{address_key, AddressRates};

/// Middleware: one token of the client address's bucket
/// (`limits.address_rate_*`) per request, or `429` with `Retry-After`.
pub(super) async fn per_address(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(app) = req.app_data::<web::Data<AppState>>() {
        take(&app.address_rates, req.request())?;
    }
    next.call(req).await
}

/// One token of `rates` for the address `req` comes from. A request
/// without a peer address (none in practice over TCP) is not limited.
pub(super) fn take(rates: &AddressRates, req: &HttpRequest) -> Result<(), TooManyRequests> {
    let Some(peer) = req.peer_addr() else {
        return Ok(());
    };
    rates
        .take_cost(&address_key(peer.ip()), 1.0, Instant::now())
        .map_err(|retry_after| {
            log::debug!(
                "{} {} from {peer} refused: rate limited.",
                req.method(),
                req.path()
            );
            TooManyRequests { retry_after }
        })
}

/// A refusal by an address bucket: `429`, the error body of
/// [`ChatError::RateLimited`], and `Retry-After` in whole seconds (at
/// least 1), when the bucket will hold the token again.
#[derive(Debug)]
pub(super) struct TooManyRequests {
    retry_after: Duration,
}

impl TooManyRequests {
    /// A refusal whose bucket holds the token again after `retry_after`.
    pub(super) fn after(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// Whole seconds, rounded up, so that a client that waits that long
    /// finds the token there.
    fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_secs_f64().ceil() as u64).max(1)
    }
}

impl fmt::Display for TooManyRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ChatError::RateLimited.fmt(f)
    }
}

impl ResponseError for TooManyRequests {
    fn status_code(&self) -> StatusCode {
        StatusCode::TOO_MANY_REQUESTS
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::TooManyRequests()
            .insert_header((RETRY_AFTER, self.retry_after_secs()))
            .json(ChatError::RateLimited.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        let secs = |ms| {
            TooManyRequests {
                retry_after: Duration::from_millis(ms),
            }
            .retry_after_secs()
        };
        assert_eq!(secs(0), 1);
        assert_eq!(secs(10), 1);
        assert_eq!(secs(1000), 1);
        assert_eq!(secs(1001), 2);
        assert_eq!(secs(4500), 5);
    }

    #[test]
    fn refusal_has_the_contract_shape() {
        let resp = TooManyRequests {
            retry_after: Duration::from_millis(2500),
        }
        .error_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("3")
        );
    }
}
