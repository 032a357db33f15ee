//! One-time codes: generation from the OS CSPRNG and the keyed digest stored in their
//! place.

use hmac::Mac;
use rand::distr::{Distribution, Uniform};

use crate::secret::ServerSecret;

/// Bytes of the HMAC kept as the code's digest: 128 bits, far beyond what guessing a
/// 10-digit code could exploit, and short keys keep the tree small.
pub const DIGEST_LEN: usize = 16;

/// What the store keeps instead of a code: HMAC-SHA-256(secret, token 0x00 code),
/// truncated. Without the server secret it reveals nothing about the code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("…")
    }
}

/// A code as the person sees it. `Debug` masks it so it cannot reach a log by accident;
/// only the `log` delivery backend reads it out, through [`Code::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Code(***)")
    }
}

impl Code {
    /// A new code of `length` decimal digits, uniform over all 10^length values: one
    /// unbiased draw from the OS CSPRNG (rejection sampling, no modulo bias). Through
    /// `Uniform`, whose sampling is Lemire's unbiased method: `random_range` takes
    /// Canon's, which rand documents as biased (1 in 2^64 at worst) unless its
    /// `unbiased` feature is on.
    pub fn generate(length: u32) -> Code {
        let mut rng = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
        let digits = Uniform::new(0, 10u64.pow(length)).expect("a code has at least one digit");
        let value = digits.sample(&mut rng);
        Code(format!("{value:0width$}", width = length as usize))
    }

    /// A code typed by a person (already validated as digits).
    pub fn from_input(digits: &str) -> Code {
        Code(digits.to_owned())
    }

    /// The digits, for the message that carries the code to its person.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The keyed digest that the store keeps.
    pub fn digest(&self, secret: &ServerSecret, token: &str) -> Digest {
        let mut mac = secret.mac();
        mac.update(token.as_bytes());
        mac.update(&[0]);
        mac.update(self.0.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut digest = [0u8; DIGEST_LEN];
        digest.copy_from_slice(&full[..DIGEST_LEN]);
        Digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_asked_length_and_only_digits() {
        for length in 4..=10 {
            let code = Code::generate(length);
            assert_eq!(code.expose().len(), length as usize);
            assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn every_digit_appears_about_equally_often() {
        // 60,000 digits: each of the 10 values should appear 6,000 times; 5 standard
        // deviations (~ 365) is a bound a fair source practically never crosses.
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            for b in Code::generate(6).expose().bytes() {
                counts[(b - b'0') as usize] += 1;
            }
        }
        for (digit, count) in counts.iter().enumerate() {
            assert!((5_635..=6_365).contains(count), "digit {digit}: {count}");
        }
    }

    #[test]
    fn digest_depends_on_secret_token_and_code() {
        let a = ServerSecret::from_bytes([1; 32]);
        let b = ServerSecret::from_bytes([2; 32]);
        let code = Code::from_input("123456");
        let d = code.digest(&a, "tok");
        assert_eq!(d, Code::from_input("123456").digest(&a, "tok"));
        assert_ne!(d, code.digest(&b, "tok"));
        assert_ne!(d, code.digest(&a, "tok2"));
        assert_ne!(d, Code::from_input("123457").digest(&a, "tok"));
        assert_eq!(format!("{code:?}"), "Code(***)");
    }
}
