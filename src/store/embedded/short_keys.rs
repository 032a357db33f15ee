//! Short keys: the trees key a token, a recipient or a delivery reference by a 12-byte
//! keyed hash of it, not by the name itself.
//!
//! Why: fjall keeps a key of up to 20 bytes inline; a longer one sits on the heap
//! behind a 4-byte prefix, and every comparison whose prefixes tie (tokens such as
//! `order-…`, the time that starts every key of `expiry`, `recipients` and
//! `failovers`) follows the pointer. With 12-byte names every key, a time in front
//! included, is at most 20 bytes, whatever the application's tokens look like
//! (BENCHMARKS.md, "Stop 28").
//!
//! The hash is SipHash-2-4 under a key drawn for each database and kept in it, so no
//! one can choose names that collide; 96 bits make an accidental collision among even
//! 10⁸ records a chance of about 2⁻⁴⁴.

use siphasher::sip128::SipHasher24;

/// How many bytes of the hash name a token, recipient or reference.
const SHORT_KEY_LEN: usize = 12;

/// The tree key of a name.
pub(super) type ShortKey = [u8; SHORT_KEY_LEN];

/// Hashes names into [`ShortKey`]s under one database's key.
#[derive(Clone)]
pub(super) struct KeyHasher(SipHasher24);

impl KeyHasher {
    /// How many bytes the hash key has, as kept in the database.
    pub const SEED_LEN: usize = 16;

    pub fn new(seed: &[u8; Self::SEED_LEN]) -> Self {
        Self(SipHasher24::new_with_key(seed))
    }

    /// A new random hash key for a new database.
    pub fn draw_seed() -> [u8; Self::SEED_LEN] {
        rand::random()
    }

    /// The tree key of `name`.
    pub fn short(&self, name: impl AsRef<[u8]>) -> ShortKey {
        let hash = self.0.hash(name.as_ref()).as_bytes();
        let mut key = [0; SHORT_KEY_LEN];
        key.copy_from_slice(&hash[..SHORT_KEY_LEN]);
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_key_per_seed() {
        let one = KeyHasher::new(&[1; 16]);
        assert_eq!(one.short("order-1"), one.short("order-1"));
        assert_ne!(one.short("order-1"), one.short("order-2"));
        let other = KeyHasher::new(&[2; 16]);
        assert_ne!(one.short("order-1"), other.short("order-1"));
    }
}
