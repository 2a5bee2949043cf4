//! Guest identity: signed tokens that any node of a cluster accepts.
//!
//! A token is `<payload>.<signature>`, both base64url without padding; the
//! payload is JSON `{"sub", "name", "exp"}` and the signature is
//! HMAC-SHA256 of the encoded payload under `auth.secret`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::{validate_user_id, validate_user_name, User};

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted; anything longer is not one of ours.
const MAX_TOKEN_LEN: usize = 1024;

/// Why a token was refused. Deliberately coarse: the client learns only that
/// it needs a new token.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("expired token")]
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    exp: u64,
}

/// Issues and verifies tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    secret: Vec<u8>,
    ttl_secs: u64,
}

impl Tokens {
    pub fn new(secret: &str, ttl_secs: u64) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
            ttl_secs,
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        match HmacSha256::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    /// A token for `user`, valid from `now` (Unix seconds) for the TTL.
    pub fn issue(&self, user: &User, now: u64) -> String {
        let claims = Claims {
            sub: user.id.clone(),
            name: user.name.clone(),
            exp: now.saturating_add(self.ttl_secs),
        };
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// The user a token names, if it is ours and not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<User, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        // A signed token with an id the node would not issue is refused
        // all the same: the id is used in store keys.
        if validate_user_name(&claims.name).is_err() || validate_user_id(&claims.sub).is_err() {
            return Err(TokenError::Malformed);
        }
        Ok(User {
            id: claims.sub,
            name: claims.name,
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new user id for a guest: a ULID, so ids sort by creation.
pub fn new_user_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn alice() -> User {
        User {
            id: "u1".into(),
            name: "alice".into(),
        }
    }

    #[test]
    fn round_trip() {
        let t = Tokens::new("0123456789abcdef", 60);
        let token = t.issue(&alice(), 1000);
        assert_eq!(t.verify(&token, 1059).unwrap(), alice());
    }

    #[test]
    fn expired() {
        let t = Tokens::new("0123456789abcdef", 60);
        let token = t.issue(&alice(), 1000);
        assert_eq!(t.verify(&token, 1060), Err(TokenError::Expired));
    }

    #[test]
    fn other_secret_and_forgery() {
        let a = Tokens::new("0123456789abcdef", 60);
        let b = Tokens::new("fedcba9876543210", 60);
        let token = a.issue(&alice(), 1000);
        assert_eq!(b.verify(&token, 1001), Err(TokenError::BadSignature));
        // Same signature, edited payload.
        let (_, sig) = token.split_once('.').unwrap();
        let forged_payload =
            URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","name":"admin","exp":99999999999}"#);
        let forged = format!("{forged_payload}.{sig}");
        assert_eq!(a.verify(&forged, 1001), Err(TokenError::BadSignature));
    }

    /// A token signed with `t`'s secret for any claims.
    fn signed(t: &Tokens, claims: &str) -> String {
        let payload = URL_SAFE_NO_PAD.encode(claims);
        let mut mac = t.mac();
        mac.update(payload.as_bytes());
        format!(
            "{payload}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn sub_must_be_a_well_formed_user_id() {
        let t = Tokens::new("0123456789abcdef", 60);
        let long = "a".repeat(65);
        for sub in [
            "a:b",
            "",
            "a b",
            "a/b",
            "a\\u0000b",
            "a\\nb",
            "é",
            "{a}",
            long.as_str(),
        ] {
            let token = signed(&t, &format!(r#"{{"sub":"{sub}","name":"x","exp":2000}}"#));
            assert_eq!(
                t.verify(&token, 1000),
                Err(TokenError::Malformed),
                "{sub:?}"
            );
        }
        let max = "A".repeat(64);
        for sub in [new_user_id(), "u-1.x_Y".into(), max] {
            let token = signed(&t, &format!(r#"{{"sub":"{sub}","name":"x","exp":2000}}"#));
            assert_eq!(t.verify(&token, 1000).unwrap().id, sub);
        }
    }

    #[test]
    fn garbage() {
        let t = Tokens::new("0123456789abcdef", 60);
        for bad in ["", ".", "abc", "a.b", "!!.??", &"x".repeat(5000)] {
            assert!(t.verify(bad, 0).is_err(), "{bad}");
        }
    }
}
