//! The RS256 JWT that authenticates otpd to Vonage, signed with the application's
//! private key.
//!
//! One token is reused until a minute before it expires rather than signed per
//! request: signing costs an RSA operation, and Vonage accepts a token for its whole
//! lifetime. The clock is injected so a test can make a token fall due without waiting
//! 15 minutes.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// How long a token is valid: Vonage's default and the official SDKs' choice.
pub const LIFETIME_SECS: u64 = 15 * 60;
/// A token is replaced this long before it expires, so it never expires in flight.
pub const RENEW_BEFORE_SECS: u64 = 60;

/// Wall-clock seconds since the Unix epoch, as the JWT claims count them.
pub trait Clock: Send + Sync {
    fn now_secs(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_secs(&self) -> u64 {
        crate::rules::now_ms() / 1000
    }
}

/// The claims Vonage requires (`application_id`, `iat`, `jti`) plus `exp`.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    application_id: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

/// A token in use and when it must be replaced.
struct Cached {
    token: String,
    renew_at: u64,
}

/// Signs and caches the bearer token. Its `Debug` never shows the key.
pub struct JwtSigner {
    application_id: String,
    key: EncodingKey,
    clock: Arc<dyn Clock>,
    cached: Mutex<Option<Cached>>,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("application_id", &self.application_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Longer than any RSA private key in PEM form (an 8192-bit one is ~6.4 KB).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Reads the application's private key. `key_name` is the config key the path came
/// from, so every error names it; the error never holds the key's contents.
pub fn load_key(path: &Path, key_name: &str) -> anyhow::Result<EncodingKey> {
    if path.as_os_str().is_empty() {
        anyhow::bail!(
            "{key_name} is not set and systemd passed no credential `{}`",
            crate::config::VONAGE_KEY_CREDENTIAL
        );
    }
    let pem = crate::read_bounded(path, MAX_KEY_FILE_BYTES)
        .map_err(|e| anyhow::anyhow!("{key_name}: cannot read {}: {e}", path.display()))?;
    crate::warn_if_exposed(path, &format!("{key_name}: the private key file"));
    let not_rsa = || {
        anyhow::anyhow!(
            "{key_name}: {} is not an RSA private key in PEM form",
            path.display()
        )
    };
    let key = EncodingKey::from_rsa_pem(&pem).map_err(|_| not_rsa())?;
    // Parsing only checks the PEM label; a trial signature proves the key works.
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &(), &key).map_err(|_| not_rsa())?;
    Ok(key)
}

impl JwtSigner {
    pub fn new(application_id: String, key: EncodingKey, clock: Arc<dyn Clock>) -> Self {
        Self {
            application_id,
            key,
            clock,
            cached: Mutex::new(None),
        }
    }

    /// The current token, signing a new one when none is cached or it is due.
    pub fn token(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let now = self.clock.now_secs();
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(current) = cached.as_ref().filter(|c| now < c.renew_at) {
            return Ok(current.token.clone());
        }
        let claims = Claims {
            application_id: &self.application_id,
            iat: now,
            exp: now + LIFETIME_SECS,
            jti: super::random_id(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)?;
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: claims.exp - RENEW_BEFORE_SECS,
        });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Test key pair, also used by the integration tests' Vonage stand-in.
    const PRIVATE: &str = include_str!("../../tests/fixtures/vonage-test-key.pem");
    const PUBLIC: &str = include_str!("../../tests/fixtures/vonage-test-key.pub.pem");

    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now_secs(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Decoded {
        application_id: String,
        iat: u64,
        exp: u64,
        jti: String,
    }

    fn decode(token: &str) -> Decoded {
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        jsonwebtoken::decode::<Decoded>(token, &key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn token_is_reused_until_a_minute_before_expiry_then_renewed() {
        let start = 1_800_000_000;
        let clock = Arc::new(ManualClock(AtomicU64::new(start)));
        let key = EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap();
        let signer = JwtSigner::new("app-1".into(), key, clock.clone());

        let first = signer.token().unwrap();
        let claims = decode(&first);
        assert_eq!(claims.application_id, "app-1");
        assert_eq!(claims.iat, start);
        assert_eq!(claims.exp, start + LIFETIME_SECS);
        assert_eq!(claims.jti.len(), 32);

        clock.0.store(
            start + LIFETIME_SECS - RENEW_BEFORE_SECS - 1,
            Ordering::SeqCst,
        );
        assert_eq!(signer.token().unwrap(), first, "reused while not due");

        clock
            .0
            .store(start + LIFETIME_SECS - RENEW_BEFORE_SECS, Ordering::SeqCst);
        let second = signer.token().unwrap();
        assert_ne!(second, first, "renewed when due");
        let renewed = decode(&second);
        assert_eq!(renewed.iat, start + LIFETIME_SECS - RENEW_BEFORE_SECS);
        assert_ne!(renewed.jti, claims.jti, "a new jti");
    }

    #[test]
    fn debug_hides_the_key() {
        let key = EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap();
        let signer = JwtSigner::new("app-1".into(), key, Arc::new(SystemClock));
        let shown = format!("{signer:?}");
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("MII"), "{shown}");
    }

    #[test]
    fn bad_keys_stop_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_key(
            &dir.path().join("nope.pem"),
            "delivery.dispatch.private_key_file",
        );
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("delivery.dispatch.private_key_file: cannot read"),
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_key(&junk, "k").unwrap_err().to_string();
        assert!(err.contains("not an RSA private key"), "{err}");
        let unset = load_key(Path::new(""), "k").unwrap_err().to_string();
        assert!(unset.contains("otpd-vonage-key"), "{unset}");
        let endless = load_key(Path::new("/dev/zero"), "k")
            .unwrap_err()
            .to_string();
        assert_eq!(endless, "k: cannot read /dev/zero: longer than 65536 bytes");
    }
}
