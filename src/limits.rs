//! Limits shared by all connections of a node: token buckets per key (a
//! user over all of that user's connections and the REST API, a client
//! address over its REST requests and sign-ins) and a cap on the WebSocket
//! connections open at once from one client address.
//!
//! All are in-process and per node: a user connected to three nodes has
//! three buckets, one on each.

use std::borrow::Borrow;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket: holds at most `burst` tokens, starts full, refills at
/// `per_sec` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_sec: f64, burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_sec,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_cost(1.0, now).is_ok()
    }

    /// Takes `cost` tokens if there are that many; else says how long until
    /// there will be.
    pub fn take_cost(&mut self, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            let missing = (cost.min(self.burst) - self.tokens).max(0.0);
            Err(Duration::from_secs_f64(missing / self.per_sec))
        }
    }

    /// Full again at `now`: the bucket is as good as a new one.
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.per_sec >= self.burst
    }
}

/// Shards of the per-user table, so that sessions on different worker
/// threads rarely wait for each other.
const SHARDS: usize = 16;
/// A shard is swept of full (idle) buckets when it grows past this size,
/// then again when it has doubled.
const SWEEP_AT: usize = 1024;

struct Shard<K> {
    buckets: HashMap<K, TokenBucket>,
    sweep_at: usize,
}

/// One token bucket per key; a bucket that is full again is forgotten.
pub struct KeyedRates<K> {
    shards: Vec<Mutex<Shard<K>>>,
    per_sec: f64,
    burst: u32,
}

/// One token bucket per user id.
pub type UserRates = KeyedRates<String>;

/// One token bucket per client address (see [`address_key`]).
pub type AddressRates = KeyedRates<IpAddr>;

impl<K: Hash + Eq> KeyedRates<K> {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    sweep_at: SWEEP_AT,
                })
            })
            .collect();
        Self {
            shards,
            per_sec,
            burst,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Shard<K>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() % SHARDS as u64) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub fn take<Q>(&self, key: &Q, now: Instant) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.take_cost(key, 1.0, now).is_ok()
    }

    /// Takes `cost` tokens from `key`'s bucket if it has that many; else
    /// says how long until it will.
    pub fn take_cost<Q>(&self, key: &Q, cost: f64, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut shard = self.shard(key);
        if let Some(bucket) = shard.buckets.get_mut(key) {
            return bucket.take_cost(cost, now);
        }
        if shard.buckets.len() >= shard.sweep_at {
            // A full bucket is the same as none: forget those.
            shard.buckets.retain(|_, b| !b.is_full(now));
            shard.sweep_at = (shard.buckets.len() * 2).max(SWEEP_AT);
        }
        let mut bucket = TokenBucket::new(self.per_sec, self.burst, now);
        let taken = bucket.take_cost(cost, now);
        shard.buckets.insert(key.to_owned(), bucket);
        taken
    }

    /// Gives back `cost` tokens taken from `key`'s bucket (an operation
    /// that was refused for another reason), up to its burst.
    pub fn give_back<Q>(&self, key: &Q, cost: f64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(bucket) = self.shard(key).buckets.get_mut(key) {
            bucket.tokens = (bucket.tokens + cost).min(bucket.burst);
        }
    }

    /// Users with a bucket in memory (for tests).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .buckets
                    .len()
            })
            .sum()
    }
}

/// Open WebSocket connections per client address.
pub struct AddressSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

/// One open connection's place in [`AddressSlots`]; given back on drop.
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    key: IpAddr,
}

impl AddressSlots {
    pub fn new(cap: usize) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            cap,
        }
    }

    /// A slot for a connection from `ip`, or `None` when that address has
    /// `cap` connections open already.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            slots: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s address (for tests and metrics).
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&address_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a client counts against: an IPv4 address as it is (an
/// IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address by its
/// /64, the block one client usually holds.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = TokenBucket::new(10.0, 3, t0);
        assert!(r.take(t0) && r.take(t0) && r.take(t0));
        assert!(!r.take(t0));
        assert!(!r.take(t0 + Duration::from_millis(50)));
        assert!(r.take(t0 + Duration::from_millis(110)));
        assert!(!r.take(t0 + Duration::from_millis(110)));
        // Refill stops at the burst size.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| r.take(later)));
        assert!(!r.take(later));
    }

    #[test]
    fn user_buckets_are_per_user() {
        let rates = UserRates::new(1.0, 2);
        let t0 = Instant::now();
        assert!(rates.take("a", t0) && rates.take("a", t0));
        assert!(!rates.take("a", t0));
        assert!(rates.take("b", t0));
        assert!(rates.take("a", t0 + Duration::from_millis(1001)));
    }

    #[test]
    fn idle_users_are_forgotten() {
        let rates = UserRates::new(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..(SHARDS * SWEEP_AT * 2) {
            rates.take(&format!("u{i}"), t0);
        }
        // Much later every bucket is full again, and new users sweep them.
        let later = t0 + Duration::from_secs(10);
        for i in 0..(SHARDS * SWEEP_AT * 2) {
            rates.take(&format!("v{i}"), later);
        }
        assert!(
            rates.tracked() < SHARDS * SWEEP_AT * 3,
            "{} buckets kept",
            rates.tracked()
        );
    }

    #[test]
    fn address_slots_cap_and_give_back() {
        let slots = Arc::new(AddressSlots::new(2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = slots.acquire(a).unwrap();
        let _s2 = slots.acquire(a).unwrap();
        assert!(slots.acquire(a).is_none());
        let _s3 = slots.acquire(b).unwrap();
        drop(s1);
        assert_eq!(slots.open(a), 1);
        let _s4 = slots.acquire(a).unwrap();
        assert!(slots.acquire(a).is_none());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let slots = Arc::new(AddressSlots::new(1));
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _sx = slots.acquire(x).unwrap();
        assert!(slots.acquire(y).is_none(), "same /64");
        let _sz = slots.acquire(z).unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _s = slots.acquire(v4).unwrap();
        assert!(slots.acquire(mapped).is_none());
    }
}
