//! The names of otpd's keys in Redis, one deployment's under its `key_prefix` (the
//! layout is in [`super`]'s module doc).

use crate::code::Digest;

/// The key names of one deployment.
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn token(&self, token: &str) -> String {
        format!("{}{{{token}}}:t", self.prefix)
    }

    pub(super) fn code(&self, token: &str, digest: &Digest) -> String {
        format!("{}{{{token}}}:c:{}", self.prefix, hex(digest))
    }

    pub(super) fn recipient(&self, address: &str) -> String {
        format!("{}r:{address}", self.prefix)
    }

    pub(super) fn reference(&self, reference: &str) -> String {
        format!("{}ref:{reference}", self.prefix)
    }

    pub(super) fn live(&self) -> String {
        format!("{}live", self.prefix)
    }

    pub(super) fn failovers(&self) -> String {
        format!("{}failovers", self.prefix)
    }

    pub(super) fn secret_check(&self) -> String {
        format!("{}secret-check", self.prefix)
    }

    /// The token and the digest (hex) of a [`Keys::code`] key: the hex digest is last
    /// and holds no `:`, whatever the token holds.
    pub(super) fn token_of_code<'k>(&self, code_key: &'k str) -> Option<(&'k str, &'k str)> {
        let (slot, digest) = code_key.rsplit_once(":c:")?;
        let token = slot.strip_prefix(&self.prefix)?.strip_prefix('{')?;
        Some((token.strip_suffix('}')?, digest))
    }

    /// A code's member in the `live` set.
    pub(super) fn live_member(token: &str, digest: &Digest) -> String {
        format!("{token}:{}", hex(digest))
    }
}

/// A digest as its key names spell it.
pub(super) fn hex(digest: &Digest) -> String {
    crate::hex(&digest.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_keys_share_its_hash_tag_and_hold_no_code() {
        let keys = Keys {
            prefix: "otpd:".into(),
        };
        let digest = Digest([0xab; 16]);
        assert_eq!(keys.token("t.1"), "otpd:{t.1}:t");
        assert_eq!(
            keys.code("t.1", &digest),
            format!("otpd:{{t.1}}:c:{}", "ab".repeat(16))
        );
        // Recipients hash on the whole key: any slot, never a token's tag.
        assert_eq!(
            keys.recipient("sms:393331234567"),
            "otpd:r:sms:393331234567"
        );
    }
}
