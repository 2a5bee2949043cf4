//! `AppState`: what the HTTP handlers and the sessions of a node share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use actix::prelude::*;

use super::registry::RoomRegistry;
use crate::auth::Tokens;
use crate::config::Settings;
use crate::limits::{AddressRates, AddressSlots, UserRates};
use crate::metrics::Metrics;
use crate::store::MessageStore;

/// What every request handler and session shares.
pub struct AppState {
    pub settings: Settings,
    pub tokens: Tokens,
    pub store: Arc<dyn MessageStore>,
    pub registry: Addr<RoomRegistry>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: new messages are refused while the node drains.
    pub draining: AtomicBool,
    /// One token bucket per user, over all of the user's connections.
    pub user_rates: UserRates,
    /// WebSocket connections open per client address.
    pub address_slots: Arc<AddressSlots>,
    /// REST requests per client address.
    pub address_rates: AddressRates,
    /// Guest sign-ins per client address.
    pub signin_rates: AddressRates,
    /// New rooms per user, over the hour.
    pub new_rooms: UserRates,
    session_ids: AtomicU64,
}

impl AppState {
    pub fn new(
        settings: Settings,
        store: Arc<dyn MessageStore>,
        registry: Addr<RoomRegistry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tokens: Tokens::new(&settings.auth.secret, settings.auth.token_ttl_secs),
            store,
            registry,
            metrics,
            draining: AtomicBool::new(false),
            user_rates: UserRates::new(
                settings.limits.user_rate_per_sec,
                settings.limits.user_rate_burst,
            ),
            address_slots: Arc::new(AddressSlots::new(
                settings.limits.max_connections_per_address,
            )),
            address_rates: AddressRates::new(
                settings.limits.address_rate_per_sec,
                settings.limits.address_rate_burst,
            ),
            signin_rates: AddressRates::new(
                settings.limits.signin_rate_per_sec,
                settings.limits.signin_rate_burst,
            ),
            new_rooms: UserRates::new(
                f64::from(settings.limits.new_rooms_per_hour) / 3600.0,
                settings.limits.new_rooms_per_hour,
            ),
            session_ids: AtomicU64::new(1),
            settings,
        }
    }

    /// A node-unique number for a new session.
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Relaxed)
    }
}
