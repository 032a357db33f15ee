//! Encryption of the SMS text a pending failover keeps in the store.
//!
//! The text holds the code, and the store must never reveal one. It is sealed with
//! AES-256-GCM under a key derived from the server secret (which lives outside the
//! store), so a copy of the store alone shows nothing. Its associated data is all the
//! failover says about where the SMS goes ([`Bound`]): the token, the phone number and
//! the Messenger message's reference. Whoever can write to the store (a Redis shared by
//! several hosts) could otherwise rewrite a pending failover's number and have otpd
//! send the live code to a phone of theirs; now a failover changed in any of these no
//! longer opens, and its SMS is not sent.
//!
//! Texts sealed before the number and reference were bound (associated data: the token
//! alone) still open, so that an SMS pending across an upgrade still goes out: a
//! failover lives until its code expires, up to a day. Those few stay as open to a
//! rewrite as they were; nothing seals that way any more.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use hmac::Mac;
use rand::RngExt;

use crate::rules::PendingFailover;
use crate::secret::ServerSecret;

/// Starts the associated data of a text sealed with its number and reference bound:
/// it can never be read as the token-only associated data of the build before.
const BOUND_LABEL: &[u8] = b"otpd failover v2\0";

/// What a sealed text is bound to: the fields of its failover that say for which code
/// and to whom the SMS goes.
#[derive(Debug, Clone, Copy)]
pub struct Bound<'a> {
    pub token: &'a str,
    /// The SMS number.
    pub to: &'a str,
    /// The Messenger message's reference, by which the failover finds its code.
    pub reference: &'a str,
}

impl<'a> Bound<'a> {
    pub fn of(failover: &'a PendingFailover) -> Self {
        Self {
            token: &failover.token,
            to: &failover.to,
            reference: &failover.reference,
        }
    }

    /// The label, then each field behind its length, so that no two different sets of
    /// fields make the same bytes.
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = BOUND_LABEL.to_vec();
        for field in [self.token, self.to, self.reference] {
            aad.extend((field.len() as u64).to_be_bytes());
            aad.extend(field.as_bytes());
        }
        aad
    }
}

/// Seals and opens failover texts.
pub struct Sealer(LessSafeKey);

impl Sealer {
    /// Derives the key: HMAC-SHA-256(server secret, a fixed label). The label is that
    /// of the first build: the key is unchanged, so earlier texts still open.
    pub fn new(secret: &ServerSecret) -> Self {
        let mut mac = secret.mac();
        mac.update(b"otpd failover text v1");
        let key = mac.finalize().into_bytes();
        let key = UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key");
        Self(LessSafeKey::new(key))
    }

    /// Random nonce, then ciphertext and tag.
    pub fn seal(&self, bound: &Bound<'_>, text: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rand_core::UnwrapErr(rand::rngs::SysRng).fill(&mut nonce);
        let mut sealed = text.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound.associated_data()),
                &mut sealed,
            )
            .expect("AES-GCM seals any message of this size");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        out
    }

    /// The text, or `None` when it was sealed for another token, number or reference
    /// (the failover was altered), or under another secret. A text sealed by the build
    /// before, bound to its token alone, opens with its token (see the module doc).
    pub fn open(&self, bound: &Bound<'_>, sealed: &[u8]) -> Option<String> {
        self.open_with(&bound.associated_data(), sealed)
            .or_else(|| self.open_with(bound.token.as_bytes(), sealed))
    }

    fn open_with(&self, aad: &[u8], sealed: &[u8]) -> Option<String> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Bound = Bound {
        token: "tok",
        to: "393331234567",
        reference: "aaaaaaaa-bbbb-4ccc-8ddd-0123456789ab",
    };

    #[test]
    fn sealed_text_opens_only_for_its_token_and_secret() {
        let sealer = Sealer::new(&ServerSecret::from_bytes([1; 32]));
        let sealed = sealer.seal(&BOUND, "123456 is your code");
        assert!(
            !sealed.windows(6).any(|w| w == b"123456"),
            "the code is visible"
        );
        assert_eq!(
            sealer.open(&BOUND, &sealed).as_deref(),
            Some("123456 is your code")
        );
        let other_token = Bound {
            token: "other",
            ..BOUND
        };
        assert_eq!(sealer.open(&other_token, &sealed), None);
        let other = Sealer::new(&ServerSecret::from_bytes([2; 32]));
        assert_eq!(other.open(&BOUND, &sealed), None);
        assert_eq!(sealer.open(&BOUND, &sealed[..5]), None);
    }

    /// Someone who can write to the store cannot send the code elsewhere by rewriting
    /// a pending failover's number, nor move the text to another message.
    #[test]
    fn a_sealed_text_does_not_open_for_another_number_or_reference() {
        let sealer = Sealer::new(&ServerSecret::from_bytes([1; 32]));
        let sealed = sealer.seal(&BOUND, "123456 is your code");
        let redirected = Bound {
            to: "447700900000",
            ..BOUND
        };
        assert_eq!(sealer.open(&redirected, &sealed), None);
        let moved = Bound {
            reference: "ffffffff-bbbb-4ccc-8ddd-0123456789ab",
            ..BOUND
        };
        assert_eq!(sealer.open(&moved, &sealed), None);
        // The fields cannot trade bytes across their borders either.
        let shifted = Bound {
            token: "tok3",
            to: "93331234567",
            ..BOUND
        };
        assert_eq!(sealer.open(&shifted, &sealed), None);
    }

    /// A failover sealed by the build before, bound to its token alone (made by it
    /// with the secret [1; 32]), still sends its SMS after an upgrade.
    #[test]
    fn a_text_sealed_by_the_build_before_still_opens() {
        let sealed: Vec<u8> = (0..V1_SEALED.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&V1_SEALED[i..i + 2], 16).unwrap())
            .collect();
        let sealer = Sealer::new(&ServerSecret::from_bytes([1; 32]));
        assert_eq!(
            sealer.open(&BOUND, &sealed).as_deref(),
            Some("123456 is your code. It expires in {minutes} minutes.")
        );
        let other_token = Bound {
            token: "other",
            ..BOUND
        };
        assert_eq!(sealer.open(&other_token, &sealed), None);
    }

    const V1_SEALED: &str = "eebaefd6c67adcfab19868e83efd9f5dae66f2eb9eaf57238a663c25a7878c17ab949095dee42c872bfd179d3d051009d98abec2d9ffcc653fbaf62fa03a65c4d1ed601242aa616138871618764335bd17";
}
