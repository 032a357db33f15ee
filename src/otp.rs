//! The OTP service: validates input, issues codes, delivers them, verifies them.
//!
//! Both front ends (the socket protocol and the HTTP listener) call this one type, so
//! the rules and limits are the same whichever way a request arrives.

use std::sync::Arc;

use crate::code::{Code, Digest};
use crate::config::{CODE_LENGTHS, OtpConfig};
use crate::delivery::{
    Delivery, DeliveryError, FAILOVER_SECS, Message, Recipients, SHORTEST_FAILOVER_TTL_SECS,
};
use crate::janitor::Wakeup;
use crate::log_throttle::OncePerSecond;
use crate::metrics::{Counters, Stats, bump};
use crate::rules::{
    Channel, CodeRecord, CodeState, DeliveryEvent, LimitedBy, Limits, Millis, Refusal, SendLimit,
    VerifyOutcome, now_ms,
};
use crate::secret::ServerSecret;
use crate::store::{Filed, NewCode, Store, StoreError, TokenStatus};

/// Why a request did not succeed; each maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum OtpError {
    #[error("{field}: {reason}")]
    BadRequest { field: &'static str, reason: String },
    #[error("no such code for this token")]
    NotFound,
    /// A cancel found no code still pending (none, or one verified, expired or locked).
    #[error("no pending code for this token")]
    NothingPending,
    #[error("the code has already been verified")]
    AlreadyVerified,
    #[error("the code is expired")]
    Expired,
    #[error("too many wrong codes for this token; try again later")]
    TooManyAttempts { retry_after_secs: u64 },
    /// `reason` names the limit and whose sends reached it (the token, or a recipient
    /// by its field).
    #[error("{reason}; try again later")]
    RateLimited {
        retry_after_secs: u64,
        reason: String,
    },
    #[error("the provider refused the message: {0}")]
    DeliveryFailed(String),
    #[error("the provider could not be reached: {0}")]
    DeliveryUnavailable(String),
    #[error("internal storage error")]
    Storage(StoreError),
}

impl OtpError {
    /// The HTTP-like status of the error.
    pub fn status(&self) -> u16 {
        match self {
            OtpError::BadRequest { .. } => 400,
            OtpError::NotFound | OtpError::NothingPending => 404,
            OtpError::AlreadyVerified => 409,
            OtpError::Expired => 410,
            OtpError::TooManyAttempts { .. } | OtpError::RateLimited { .. } => 429,
            OtpError::DeliveryFailed(_) => 502,
            OtpError::DeliveryUnavailable(_) => 503,
            OtpError::Storage(_) => 500,
        }
    }

    /// The snake_case error code of the protocol.
    pub fn code(&self) -> &'static str {
        match self {
            OtpError::BadRequest { .. } => "bad_request",
            OtpError::NotFound | OtpError::NothingPending => "not_found",
            OtpError::AlreadyVerified => "already_verified",
            OtpError::Expired => "expired",
            OtpError::TooManyAttempts { .. } => "too_many_attempts",
            OtpError::RateLimited { .. } => "rate_limited",
            OtpError::DeliveryFailed(_) => "delivery_failed",
            OtpError::DeliveryUnavailable(_) => "delivery_unavailable",
            OtpError::Storage(_) => "internal_error",
        }
    }

    /// Seconds until a retry may succeed, for 429 answers.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            OtpError::TooManyAttempts { retry_after_secs }
            | OtpError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> OtpError {
    OtpError::BadRequest {
        field,
        reason: reason.into(),
    }
}

fn secs_rounded_up(ms: Millis) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 128;

/// Checks a token: 1–128 characters of `[A-Za-z0-9._:@-]`.
pub fn validate_token(token: &str) -> Result<(), OtpError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(bad(
            "token",
            format!("must be 1 to {MAX_TOKEN_LEN} characters"),
        ));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".:_@-".contains(&b))
    {
        return Err(bad("token", "may only contain A-Z a-z 0-9 . _ : @ -"));
    }
    Ok(())
}

/// Normalises a phone number to E.164 digits without `+`: 7 to 15 digits. The error
/// is the reason, for the caller to put under the field's name as the client wrote it.
pub fn normalize_phone(number: &str) -> Result<String, &'static str> {
    let digits = number.strip_prefix('+').unwrap_or(number);
    if (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
    {
        Ok(digits.to_owned())
    } else {
        Err("must be an E.164 phone number: 7 to 15 digits, optional leading +, no leading 0")
    }
}

/// Checks a Messenger page-scoped id: 1 to 32 digits (the error as for
/// [`normalize_phone`]).
pub fn validate_messenger_id(id: &str) -> Result<String, &'static str> {
    // No leading zero: an id is a number, and `0819…` beside `819…` would be a second
    // name for one recipient, with send limits of its own.
    if (1..=32).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_digit())
        && !id.starts_with('0')
    {
        Ok(id.to_owned())
    } else {
        Err("must be a Messenger id: 1 to 32 digits, the first not 0")
    }
}

/// A create as the front ends hand it over: the recipients normalised by
/// [`normalize_phone`] and [`validate_messenger_id`] (under the field names the client
/// used), the rest still to check.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub token: String,
    pub to: Recipients,
    /// The field the Messenger id came in (`to.messenger`, `messengerId`, …), which an
    /// error about it names.
    pub messenger_field: &'static str,
    pub ttl_secs: Option<u64>,
    pub code_length: Option<u32>,
}

/// A created code, as the caller may see it (never the code itself).
#[derive(Debug, Clone)]
pub struct Created {
    pub token: String,
    pub expires_at: Millis,
    pub channels: Vec<Channel>,
}

/// A token's code as `status` reports it: its state, and the code's record unless the
/// token is locked after its code was purged.
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub state: CodeState,
    pub attempts: u32,
    pub locked_until: Option<Millis>,
    pub code: Option<CodeRecord>,
}

/// The service: configuration, secret, store, delivery and counters.
pub struct Otp {
    config: OtpConfig,
    limits: Limits,
    secret: ServerSecret,
    store: Arc<dyn Store>,
    delivery: Arc<dyn Delivery>,
    template: String,
    counters: Arc<Counters>,
    janitor: Arc<Wakeup>,
}

impl Otp {
    pub fn new(
        config: OtpConfig,
        secret: ServerSecret,
        store: Arc<dyn Store>,
        delivery: Arc<dyn Delivery>,
        template: String,
        counters: Arc<Counters>,
        janitor: Arc<Wakeup>,
    ) -> Self {
        Self {
            limits: Limits::from(&config),
            config,
            secret,
            store,
            delivery,
            template,
            counters,
            janitor,
        }
    }

    /// Records a provider's status report (a webhook) on the code it is about.
    pub async fn record_delivery_event(
        &self,
        reference: &str,
        event: DeliveryEvent,
    ) -> Result<Filed, OtpError> {
        self.store
            .record_delivery_event(reference, event)
            .await
            .map_err(self.storage_failed("record_delivery_event", reference))
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Counts a storage failure and logs it with the operation and the token (or
    /// delivery id) it met, and makes it the 500 the client gets (which says nothing
    /// of it). In an outage every request fails alike: one line a second says so, with
    /// how many it stands for; `stats` has the exact count.
    fn storage_failed<'a>(
        &'a self,
        op: &'static str,
        key: &'a str,
    ) -> impl FnOnce(StoreError) -> OtpError + 'a {
        static THROTTLE: OncePerSecond = OncePerSecond::new();
        move |error| {
            bump(&self.counters.storage_failed);
            if let Some(held_back) = THROTTLE.admit() {
                tracing::error!(
                    op,
                    key,
                    %error,
                    held_back,
                    "storage failed; answered 500 (held_back: failures since the last such line)"
                );
            }
            OtpError::Storage(error)
        }
    }

    /// The validity a create asked for: at most the configured one.
    fn checked_ttl(&self, asked: Option<u64>) -> Result<u64, OtpError> {
        match asked {
            None => Ok(self.config.ttl_secs),
            Some(ttl) if (1..=self.config.ttl_secs).contains(&ttl) => Ok(ttl),
            Some(_) => Err(bad(
                "ttl_secs",
                format!(
                    "must be 1 to {} (the configured limit)",
                    self.config.ttl_secs
                ),
            )),
        }
    }

    /// The code lengths a create may ask for and a verify may bring: from the
    /// configured one up.
    fn code_lengths(&self) -> std::ops::RangeInclusive<u32> {
        self.config.code_length..=*CODE_LENGTHS.end()
    }

    /// The code length a create asked for: at least the configured one.
    fn checked_code_length(&self, asked: Option<u32>) -> Result<u32, OtpError> {
        let lengths = self.code_lengths();
        match asked {
            None => Ok(self.config.code_length),
            Some(len) if lengths.contains(&len) => Ok(len),
            Some(_) => Err(bad(
                "code_length",
                format!(
                    "must be {} to {} (shorter than configured is not allowed)",
                    lengths.start(),
                    lengths.end()
                ),
            )),
        }
    }

    /// The answer to a create the store refused; `to` the create's recipients, to name
    /// one whose sends reached a limit.
    fn refused(&self, refusal: Refusal, to: &Recipients) -> OtpError {
        match refusal {
            Refusal::Locked { retry_after } => OtpError::TooManyAttempts {
                retry_after_secs: secs_rounded_up(retry_after),
            },
            Refusal::RateLimited {
                retry_after,
                limit,
                reached_by,
            } => {
                bump(&self.counters.rate_limited);
                let whose = match reached_by {
                    LimitedBy::Token => "this token".to_owned(),
                    LimitedBy::Recipient(i) => match to.channels().get(i) {
                        Some(channel) => format!("the recipient in to.{}", channel.as_str()),
                        None => "a recipient".to_owned(),
                    },
                };
                let reason = match limit {
                    SendLimit::Cooldown => format!(
                        "{whose} was sent a code less than resend_cooldown_secs ({} s) ago",
                        self.config.resend_cooldown_secs
                    ),
                    SendLimit::Count => format!(
                        "{whose} was sent max_sends_per_recipient ({}) codes within \
                         send_window_secs ({} s)",
                        self.config.max_sends_per_recipient, self.config.send_window_secs
                    ),
                };
                OtpError::RateLimited {
                    retry_after_secs: secs_rounded_up(retry_after),
                    reason,
                }
            }
        }
    }

    /// Issues a code for the token and delivers it. When the delivery fails the new
    /// code is dropped and any earlier one stands.
    pub async fn create(&self, request: CreateRequest) -> Result<Created, OtpError> {
        let CreateRequest {
            token,
            to,
            messenger_field,
            ttl_secs,
            code_length,
        } = request;
        validate_token(&token)?;
        if to.messenger.is_none() && to.sms.is_none() {
            return Err(bad("to", "needs a messenger id or an sms number (or both)"));
        }
        if to.messenger.is_some()
            && let Some(reason) = self.delivery.no_messenger()
        {
            return Err(bad(messenger_field, reason));
        }
        let ttl_secs = self.checked_ttl(ttl_secs)?;
        if to.messenger.is_some() && to.sms.is_some() && ttl_secs < SHORTEST_FAILOVER_TTL_SECS {
            return Err(bad(
                "ttl_secs",
                format!(
                    "a code sent by Messenger with an SMS failover needs at least \
                     {SHORTEST_FAILOVER_TTL_SECS} s: the SMS waits at least {} s for the \
                     Messenger message to be read, and at most half the validity",
                    FAILOVER_SECS.start()
                ),
            ));
        }
        let code = Code::generate(self.checked_code_length(code_length)?);
        let digest = code.digest(&self.secret, &token);
        let now = now_ms();
        let expires_at = now + ttl_secs * 1000;
        let new = NewCode {
            token: token.clone(),
            digest,
            recipients: to.limit_keys(),
            channels: to.channels(),
            created_at: now,
            expires_at,
        };
        self.store
            .create(&new, now)
            .await
            .map_err(self.storage_failed("create", &token))?
            .map_err(|refusal| self.refused(refusal, &to))?;
        self.janitor
            .due_by(expires_at.min(now + self.limits.send_window));

        let message = Message {
            token: &token,
            code: &code,
            to: &to,
            template: &self.template,
            expires_at,
        };
        match self.delivery.send(&message).await {
            Ok(receipt) => {
                let counts = self
                    .store
                    .confirm_delivery(&token, &digest, &receipt.reference, now_ms())
                    .await
                    .map_err(self.storage_failed("create", &token))?;
                if !counts {
                    return Err(self.ended_while_sent(&token).await);
                }
            }
            Err(error) => {
                bump(&self.counters.delivery_failed);
                return Err(self.undelivered(&token, &digest, error).await);
            }
        }
        bump(&self.counters.created);
        Ok(Created {
            token,
            expires_at,
            channels: new.channels,
        })
    }

    /// The answer to a create whose delivery failed. Its code is discarded (any
    /// previous one stands), unless the provider may have taken the message
    /// ([`DeliveryError::Unanswered`]): then it stays, unconfirmed, as after a crash
    /// during the delivery (the previous code stands in beside it until one of them
    /// verifies), so that a message arriving after all carries a code that works.
    async fn undelivered(&self, token: &str, digest: &Digest, error: DeliveryError) -> OtpError {
        if let DeliveryError::Unanswered(detail) = error {
            tracing::warn!(
                token,
                error = detail,
                "no answer to the delivery; the code stands, should the message arrive"
            );
            return OtpError::DeliveryUnavailable(detail);
        }
        if let Err(e) = self.store.discard(token, digest).await {
            tracing::error!(token, error = %e, "could not discard an undelivered code");
        }
        tracing::warn!(token, %error, "delivery failed; the code was discarded (any previous one stands)");
        match error {
            DeliveryError::Refused(detail) => OtpError::DeliveryFailed(detail),
            DeliveryError::Unavailable { reason, .. } | DeliveryError::Unanswered(reason) => {
                OtpError::DeliveryUnavailable(reason)
            }
        }
    }

    /// Why a code that went out no longer counts, as the token's state says: the code
    /// it replaced verified meanwhile (409), a lock ended it (429), or a cancel or its
    /// expiry did (410). A 201 would promise a code that cannot verify.
    async fn ended_while_sent(&self, token: &str) -> OtpError {
        tracing::info!(
            token,
            "the new code was sent, but the token's state ended it meanwhile"
        );
        match self.status(token).await {
            Ok(report) => match report.state {
                CodeState::Verified => OtpError::AlreadyVerified,
                CodeState::Locked => OtpError::TooManyAttempts {
                    retry_after_secs: report
                        .locked_until
                        .map_or(0, |until| secs_rounded_up(until.saturating_sub(now_ms()))),
                },
                // A newer create replaced it, as verify would say of it.
                CodeState::Pending => OtpError::NotFound,
                CodeState::Cancelled | CodeState::Expired => OtpError::Expired,
            },
            Err(error) => error,
        }
    }

    /// Checks a code typed by a person.
    pub async fn verify(&self, token: &str, code: &str) -> Result<(), OtpError> {
        validate_token(token)?;
        let lengths = self.code_lengths();
        if !lengths.contains(&(code.len() as u32)) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "code",
                format!("must be {} to {} digits", lengths.start(), lengths.end()),
            ));
        }
        let digest = Code::from_input(code).digest(&self.secret, token);
        let outcome = self
            .store
            .verify(token, &digest, now_ms())
            .await
            .map_err(self.storage_failed("verify", token))?;
        match outcome {
            VerifyOutcome::Valid => {
                bump(&self.counters.verified);
                Ok(())
            }
            VerifyOutcome::NotFound => {
                bump(&self.counters.failed);
                Err(OtpError::NotFound)
            }
            VerifyOutcome::AlreadyVerified => Err(OtpError::AlreadyVerified),
            VerifyOutcome::Expired => Err(OtpError::Expired),
            VerifyOutcome::TooManyAttempts {
                retry_after,
                just_locked,
            } => {
                if just_locked {
                    bump(&self.counters.locked);
                }
                Err(OtpError::TooManyAttempts {
                    retry_after_secs: secs_rounded_up(retry_after),
                })
            }
        }
    }

    /// Ends the token's pending code.
    pub async fn cancel(&self, token: &str) -> Result<(), OtpError> {
        validate_token(token)?;
        let cancelled = self
            .store
            .cancel(token, now_ms())
            .await
            .map_err(self.storage_failed("cancel", token))?;
        if cancelled {
            bump(&self.counters.cancelled);
            Ok(())
        } else {
            Err(OtpError::NothingPending)
        }
    }

    /// The token's code: state, times, attempts and delivery; never the code.
    pub async fn status(&self, token: &str) -> Result<StatusReport, OtpError> {
        validate_token(token)?;
        let TokenStatus {
            code,
            token: mut record,
        } = self
            .store
            .status(token)
            .await
            .map_err(self.storage_failed("status", token))?
            .ok_or(OtpError::NotFound)?;
        let now = now_ms();
        // As the next write would record it: an ended lock, and its count, are gone.
        record.end_lock_if_over(now);
        // A lock outlives the code it was earned on: create and verify still answer 429.
        let state = match (&code, record.locked_until) {
            (Some(code), _) => code.state_at(now),
            (None, Some(_)) => CodeState::Locked,
            (None, None) => return Err(OtpError::NotFound),
        };
        Ok(StatusReport {
            state,
            attempts: record.attempts,
            locked_until: record.locked_until,
            code,
        })
    }

    /// The counters since start-up, with the live count from the store.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot(self.store.live())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(validate_token("abc-123_x.y:z@w").is_ok());
        assert!(validate_token("").is_err());
        assert!(validate_token(&"a".repeat(129)).is_err());
        assert!(validate_token("a b").is_err());
        assert!(validate_token("ü").is_err());
    }

    #[test]
    fn phone_numbers() {
        assert_eq!(normalize_phone("+393331234567").unwrap(), "393331234567");
        assert_eq!(normalize_phone("393331234567").unwrap(), "393331234567");
        assert!(normalize_phone("123456").is_err());
        assert!(normalize_phone("1234567890123456").is_err());
        assert!(normalize_phone("+39 333").is_err());
        assert!(normalize_phone("0039333123456").is_err());
    }

    #[test]
    fn messenger_ids() {
        assert!(validate_messenger_id("8192836451").is_ok());
        assert!(validate_messenger_id("81a").is_err());
        for zeros in ["08192836451", "0", "00"] {
            assert!(validate_messenger_id(zeros).is_err(), "{zeros}");
        }
        assert!(validate_messenger_id("").is_err());
    }
}
