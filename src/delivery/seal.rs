//! Encryption of the SMS text a pending failover keeps in the database.
//!
//! The text holds the code, and the database must never reveal one. It is sealed with
//! AES-256-GCM under a key derived from the server secret (which lives outside the
//! database), with the token as associated data, so a copy of the database alone
//! shows nothing and a sealed text cannot be moved to another token.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use hmac::Mac;
use rand::RngExt;

use crate::secret::ServerSecret;

/// Seals and opens failover texts.
pub struct Sealer(LessSafeKey);

impl Sealer {
    /// Derives the key: HMAC-SHA-256(server secret, a fixed label).
    pub fn new(secret: &ServerSecret) -> Self {
        let mut mac = secret.mac();
        mac.update(b"otpd failover text v1");
        let key = mac.finalize().into_bytes();
        let key = UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key");
        Self(LessSafeKey::new(key))
    }

    /// Random nonce, then ciphertext and tag.
    pub fn seal(&self, token: &str, text: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rand_core::UnwrapErr(rand::rngs::SysRng).fill(&mut nonce);
        let mut sealed = text.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(token.as_bytes()),
                &mut sealed,
            )
            .expect("AES-GCM seals any message of this size");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        out
    }

    /// The text, or `None` when it was sealed for another token or another secret.
    pub fn open(&self, token: &str, sealed: &[u8]) -> Option<String> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(token.as_bytes()), &mut body)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_text_opens_only_for_its_token_and_secret() {
        let sealer = Sealer::new(&ServerSecret::from_bytes([1; 32]));
        let sealed = sealer.seal("tok", "123456 is your code");
        assert!(
            !sealed.windows(6).any(|w| w == b"123456"),
            "the code is visible"
        );
        assert_eq!(
            sealer.open("tok", &sealed).as_deref(),
            Some("123456 is your code")
        );
        assert_eq!(sealer.open("other", &sealed), None);
        let other = Sealer::new(&ServerSecret::from_bytes([2; 32]));
        assert_eq!(other.open("tok", &sealed), None);
        assert_eq!(sealer.open("tok", &sealed[..5]), None);
    }
}
