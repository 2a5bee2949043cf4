//! Node settings: arbitrary file text and environment overrides go through
//! `Settings::parse`. It must never panic, and settings it accepts must
//! hold the checks it promises.
//!
//! Input format: the TOML text up to the first NUL byte; after it, one
//! environment variable per line, `NAME=VALUE`. A name that starts with `~`
//! stands for `SCALABLE_CHAT__` followed by the rest, so the fuzzer reaches
//! the overrides without having to guess the prefix.

#![no_main]

use libfuzzer_sys::fuzz_target;
use scalable_chat::config::{Settings, ENV_PREFIX};

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    let (text, env_text) = input.split_once('\0').unwrap_or((&input, ""));
    let env: Vec<(String, String)> = env_text
        .lines()
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap_or((line, ""));
            let name = match name.strip_prefix('~') {
                Some(rest) => format!("{ENV_PREFIX}{rest}"),
                None => name.to_string(),
            };
            (name, value.to_string())
        })
        .collect();
    if let Ok(s) = Settings::parse(text, "fuzz.toml", env) {
        let l = &s.limits;
        assert!(!s.node.id.is_empty() && s.node.id.len() <= 64);
        assert!(s.auth.secret.len() >= 16);
        assert!(l.max_frame_bytes >= 1024);
        assert!(l.rate_per_sec.is_finite() && l.rate_per_sec > 0.0);
        assert!(l.client_timeout_secs > l.heartbeat_interval_secs);
        assert!(l.outbound_hard_bytes > l.outbound_soft_bytes);
        assert!(l.user_rate_per_sec.is_finite() && l.user_rate_per_sec > 0.0);
        assert!(l.user_rate_burst > 0 && l.rate_burst > 0);
        assert!(l.max_connections_per_address > 0 && l.max_rooms_per_session > 0);
        let services = [s.redis.is_some(), s.kafka.is_some(), s.mongo.is_some()];
        assert!(services.iter().all(|p| *p) || services.iter().all(|p| !*p));
        assert_eq!(s.cluster().is_some(), services[0]);
    }
});
