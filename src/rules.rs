//! The OTP rules (README.md, "Rules, and the choices made where the design is silent")
//! as pure state transitions over stored records.
//!
//! A storage engine reads the records a request touches, asks these functions what the
//! answer is and what to write, and writes it atomically. Keeping the rules free of I/O
//! means every engine applies the same rules, and they are tested here without a store.

use serde::{Deserialize, Serialize};

use crate::code::Digest;
use crate::config::OtpConfig;

/// Wall-clock milliseconds since the Unix epoch: deadlines outlive the process.
pub type Millis = u64;

/// The current wall-clock time in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The limits of `[otp]`, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_attempts: u32,
    pub lock: Millis,
    pub retain: Millis,
    pub max_sends: u32,
    pub send_window: Millis,
    pub resend_cooldown: Millis,
}

impl From<&OtpConfig> for Limits {
    fn from(c: &OtpConfig) -> Self {
        Self {
            max_attempts: c.max_attempts,
            lock: c.lock_secs * 1000,
            retain: c.retain_secs * 1000,
            max_sends: c.max_sends_per_recipient,
            send_window: c.send_window_secs * 1000,
            resend_cooldown: c.resend_cooldown_secs * 1000,
        }
    }
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Messenger,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Messenger => "messenger",
            Channel::Sms => "sms",
        }
    }
}

/// Where a code stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeState {
    /// Issued and not yet used; verifies until `expires_at`.
    Pending,
    Verified,
    Expired,
    Cancelled,
    /// Invalidated because its token was locked after too many wrong codes.
    Locked,
}

impl CodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeState::Pending => "pending",
            CodeState::Verified => "verified",
            CodeState::Expired => "expired",
            CodeState::Cancelled => "cancelled",
            CodeState::Locked => "locked",
        }
    }
}

/// A status report from the delivery provider (Vonage webhooks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    pub at: Millis,
    pub status: String,
    pub channel: Option<String>,
    pub detail: Option<String>,
}

/// Status of the event recording the SMS the `messages` backend sent itself after an
/// unread Messenger message; its detail is the SMS's `message_uuid`.
pub const FAILOVER_SENT: &str = "failover_sent";
/// Status of the event recording that the `messages` backend's SMS could not be sent;
/// its detail is why.
pub const FAILOVER_FAILED: &str = "failover_failed";

/// The statuses otpd records itself, which no provider report may claim: a forged
/// `failover_sent` would file a new reference under the code.
pub const OWN_STATUSES: [&str; 2] = [FAILOVER_SENT, FAILOVER_FAILED];

impl DeliveryEvent {
    /// The provider id this event adds to its delivery: the failover SMS's, whose own
    /// status reports are then filed on the same code.
    pub fn new_reference(&self) -> Option<&str> {
        (self.status == FAILOVER_SENT)
            .then_some(self.detail.as_deref())
            .flatten()
    }
}

/// What is known about a code's delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// The provider's id for the delivery (`dispatch_uuid`, `message_uuid`).
    pub reference: Option<String>,
    pub events: Vec<DeliveryEvent>,
}

/// Most delivery events kept per code; a chatty provider cannot grow a record forever.
pub const MAX_DELIVERY_EVENTS: usize = 16;

impl DeliveryRecord {
    /// Every provider id this delivery's reports are filed under: its own and that of
    /// a failover SMS otpd sent ([`DeliveryEvent::new_reference`]).
    pub fn references(&self) -> impl Iterator<Item = &str> {
        let added = self.events.iter().filter_map(DeliveryEvent::new_reference);
        self.reference.as_deref().into_iter().chain(added)
    }

    /// Appends an event; false when it is already held: Vonage retries a callback whose
    /// answer it did not see, with the same timestamp. Beyond [`MAX_DELIVERY_EVENTS`]
    /// the oldest by its own time goes, so that a late `read` outlives earlier reports
    /// however they arrive; an event older than every one it could replace is not kept
    /// (false: a retry of one dropped before would otherwise come back as new). An
    /// event that adds a reference is never the one dropped: the failover SMS's id
    /// would be forgotten while its reports, the purge of its reference and the
    /// failover's own record still need it.
    pub fn push(&mut self, event: DeliveryEvent) -> bool {
        if self.events.contains(&event) {
            return false;
        }
        if self.events.len() >= MAX_DELIVERY_EVENTS {
            let oldest = (self.events.iter().enumerate())
                .filter(|(_, held)| held.new_reference().is_none())
                .min_by_key(|(_, held)| held.at);
            let dropped = match oldest {
                Some((_, held)) if held.at > event.at => return false,
                Some((index, _)) => index,
                None => 0,
            };
            self.events.remove(dropped);
        }
        self.events.push(event);
        true
    }
}

/// A code's record, kept with its token and known by its digest
/// ([`TokenRecord::current`]). Never holds the code itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub created_at: Millis,
    pub expires_at: Millis,
    pub state: CodeState,
    pub channels: Vec<Channel>,
    pub delivery: DeliveryRecord,
}

impl CodeRecord {
    pub fn new(created_at: Millis, expires_at: Millis, channels: Vec<Channel>) -> Self {
        Self {
            created_at,
            expires_at,
            state: CodeState::Pending,
            channels,
            delivery: DeliveryRecord::default(),
        }
    }

    /// Issued and not yet verified, cancelled, invalidated or expired by the janitor.
    pub fn is_pending(&self) -> bool {
        self.state == CodeState::Pending
    }

    /// Pending, and its delivery not confirmed: a resend still on its way (or one a
    /// crash cut short), which the person may not have.
    pub fn on_its_way(&self) -> bool {
        self.is_pending() && self.delivery.reference.is_none()
    }

    /// Whether the provider's `reference` is one of this code's deliveries.
    pub fn delivered_as(&self, reference: &str) -> bool {
        self.delivery.references().any(|r| r == reference)
    }

    /// The state as of `now`: a pending code past its expiry is expired even when the
    /// janitor has not come by yet.
    pub fn state_at(&self, now: Millis) -> CodeState {
        if self.state == CodeState::Pending && now >= self.expires_at {
            CodeState::Expired
        } else {
            self.state
        }
    }

    /// Marks a pending code past its expiry as expired, as [`CodeRecord::state_at`]
    /// already answers for it; whether it did.
    pub fn mark_expired(&mut self, now: Millis) -> bool {
        let expired = self.state == CodeState::Pending && self.state_at(now) == CodeState::Expired;
        if expired {
            self.state = CodeState::Expired;
        }
        expired
    }

    /// When the janitor must look at this record again: at expiry while pending, then
    /// `retain` later to purge it.
    pub fn due_at(&self, limits: &Limits) -> Millis {
        if self.state == CodeState::Pending {
            self.expires_at
        } else {
            self.purge_at(limits)
        }
    }

    /// When the record can go, whatever becomes of it: `retain` after its expiry, so
    /// late verifies still get 409 or 410.
    pub fn purge_at(&self, limits: &Limits) -> Millis {
        self.expires_at.saturating_add(limits.retain)
    }
}

/// Per-token state: which code is live, wrong guesses, the lock, recent sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Digest of the token's one code (live or finished but retained).
    pub current: Option<Digest>,
    /// Wrong codes since the last valid verify or the end of the last lock.
    pub attempts: u32,
    pub locked_until: Option<Millis>,
    /// Send times within the send window, oldest first.
    pub sends: Vec<Millis>,
}

/// Per-recipient (channel + address) send times, for the rate limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientRecord {
    pub sends: Vec<Millis>,
}

/// Why a create was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token is locked after too many wrong codes.
    Locked { retry_after: Millis },
    /// Too many or too frequent sends for the token or a recipient; the answer names
    /// which, so a client knows what to wait for or change.
    RateLimited {
        retry_after: Millis,
        limit: SendLimit,
        reached_by: LimitedBy,
    },
}

/// The send limit that refused a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendLimit {
    /// A code went out less than `resend_cooldown` ago.
    Cooldown,
    /// `max_sends` codes went out within `send_window`.
    Count,
}

/// Whose sends reached a [`SendLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    Token,
    /// The recipient at this index of the create's recipients.
    Recipient(usize),
}

/// The answer to a verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    Valid,
    NotFound,
    AlreadyVerified,
    /// Expired, cancelled, or invalidated by a lock that has since ended.
    Expired,
    /// The token is locked; `just_locked` when this very verify locked it.
    TooManyAttempts {
        retry_after: Millis,
        just_locked: bool,
    },
}

/// Drops send times that fell out of the window, then checks the cooldown and the count.
/// On refusal returns how long until a send would be allowed: the later of the two
/// ends, so that a client waiting that long is not refused again, and which limit that
/// end belongs to.
fn check_sends(
    sends: &mut Vec<Millis>,
    now: Millis,
    limits: &Limits,
) -> Result<(), (Millis, SendLimit)> {
    sends.retain(|&t| now.saturating_sub(t) < limits.send_window);
    let cooldown_end = sends
        .last()
        .map_or(0, |&last| last.saturating_add(limits.resend_cooldown));
    let max = limits.max_sends as usize;
    let count_end = match sends.len().checked_sub(max) {
        // The oldest send that must leave the window before one more is allowed.
        Some(excess) => sends[excess].saturating_add(limits.send_window),
        None => 0,
    };
    let (allowed_at, limit) = if count_end >= cooldown_end {
        (count_end, SendLimit::Count)
    } else {
        (cooldown_end, SendLimit::Cooldown)
    };
    if now < allowed_at {
        Err((allowed_at - now, limit))
    } else {
        Ok(())
    }
}

impl TokenRecord {
    /// Ends a lock whose time is over; the end of a lock clears the wrong-code count.
    pub fn end_lock_if_over(&mut self, now: Millis) -> bool {
        match self.locked_until {
            Some(until) if until <= now => {
                self.locked_until = None;
                self.attempts = 0;
                true
            }
            _ => false,
        }
    }

    /// When the record can go: never while it has a code (the code's purge comes back
    /// for it), else at [`TokenRecord::free_at`].
    pub fn purge_at(&self, limits: &Limits) -> Option<Millis> {
        self.current.is_none().then(|| self.free_at(limits))
    }

    /// When the record's own fields stop mattering: the lock is over and the last send
    /// left the window.
    pub fn free_at(&self, limits: &Limits) -> Millis {
        self.locked_until
            .unwrap_or(0)
            .max(last_send_leaves_window(&self.sends, limits))
    }
}

impl RecipientRecord {
    /// When the record can go: once its last send left the window.
    pub fn purge_at(&self, limits: &Limits) -> Millis {
        last_send_leaves_window(&self.sends, limits)
    }
}

/// When the last of `sends` (oldest first) leaves the send window; 0 without sends.
fn last_send_leaves_window(sends: &[Millis], limits: &Limits) -> Millis {
    sends
        .last()
        .map_or(0, |t| t.saturating_add(limits.send_window))
}

/// What a create changes: the token's new state and the code it replaces.
#[derive(Debug)]
pub struct CreatePlan {
    pub token: TokenRecord,
    /// The token's previous code: kept, and standing in for the new one while that is
    /// on its way ([`crate::store::ReplacedCode`]), then dropped.
    pub replaced: Option<Digest>,
}

/// Decides a create: refuses a locked token and sends beyond the rate limits, else
/// records the send on the token and on every recipient (mutated in place).
pub fn plan_create(
    token: Option<TokenRecord>,
    recipients: &mut [RecipientRecord],
    digest: Digest,
    now: Millis,
    limits: &Limits,
) -> Result<CreatePlan, Refusal> {
    let mut token = token.unwrap_or_default();
    token.end_lock_if_over(now);
    if let Some(until) = token.locked_until {
        return Err(Refusal::Locked {
            retry_after: until - now,
        });
    }
    // The longest wait is the answer: waiting less would be refused again.
    let mut longest: Option<(Millis, SendLimit, LimitedBy)> = None;
    let checks = std::iter::once((LimitedBy::Token, &mut token.sends)).chain(
        recipients
            .iter_mut()
            .enumerate()
            .map(|(i, recipient)| (LimitedBy::Recipient(i), &mut recipient.sends)),
    );
    for (reached_by, sends) in checks {
        if let Err((wait, limit)) = check_sends(sends, now, limits)
            && longest.is_none_or(|(longest, ..)| wait > longest)
        {
            longest = Some((wait, limit, reached_by));
        }
    }
    if let Some((retry_after, limit, reached_by)) = longest {
        return Err(Refusal::RateLimited {
            retry_after,
            limit,
            reached_by,
        });
    }
    token.sends.push(now);
    for recipient in recipients.iter_mut() {
        recipient.sends.push(now);
    }
    let replaced = token.current.replace(digest);
    Ok(CreatePlan { token, replaced })
}

/// What a verify changes.
#[derive(Debug)]
pub struct VerifyPlan {
    pub outcome: VerifyOutcome,
    /// The token's new record, when it changed.
    pub token: Option<TokenRecord>,
    /// The probed code's new record, when it changed.
    pub code: Option<CodeRecord>,
    /// The token just got locked: its live code must be invalidated.
    pub invalidate_live: bool,
}

/// Decides a verify. `probed` is the record of the typed code: present only when its
/// digest is the token's code's, or that of the code a resend replaced while it
/// stands in.
pub fn plan_verify(
    token: Option<TokenRecord>,
    probed: Option<CodeRecord>,
    now: Millis,
    limits: &Limits,
) -> VerifyPlan {
    let unchanged = |outcome| VerifyPlan {
        outcome,
        token: None,
        code: None,
        invalidate_live: false,
    };
    // An unknown token counts nothing: a guesser must not be able to fill the store.
    let Some(mut token) = token else {
        return unchanged(VerifyOutcome::NotFound);
    };
    let lock_ended = token.end_lock_if_over(now);
    if let Some(until) = token.locked_until {
        return unchanged(VerifyOutcome::TooManyAttempts {
            retry_after: until - now,
            just_locked: false,
        });
    }
    let changed_token = |token: TokenRecord| lock_ended.then_some(token);
    match probed {
        Some(mut code) => match code.state_at(now) {
            CodeState::Pending => {
                code.state = CodeState::Verified;
                token.attempts = 0;
                VerifyPlan {
                    outcome: VerifyOutcome::Valid,
                    token: Some(token),
                    code: Some(code),
                    invalidate_live: false,
                }
            }
            CodeState::Verified => VerifyPlan {
                token: changed_token(token),
                ..unchanged(VerifyOutcome::AlreadyVerified)
            },
            CodeState::Expired | CodeState::Cancelled | CodeState::Locked => VerifyPlan {
                token: changed_token(token),
                ..unchanged(VerifyOutcome::Expired)
            },
        },
        None => {
            token.attempts += 1;
            if token.attempts >= limits.max_attempts {
                token.locked_until = Some(now.saturating_add(limits.lock));
                VerifyPlan {
                    outcome: VerifyOutcome::TooManyAttempts {
                        retry_after: limits.lock,
                        just_locked: true,
                    },
                    token: Some(token),
                    code: None,
                    invalidate_live: true,
                }
            } else {
                VerifyPlan {
                    outcome: VerifyOutcome::NotFound,
                    token: Some(token),
                    code: None,
                    invalidate_live: false,
                }
            }
        }
    }
}

/// Ends a code early (cancel or lock) when it is still pending; returns whether it was.
pub fn finish_pending(code: &mut CodeRecord, state: CodeState, now: Millis) -> bool {
    if code.state_at(now) == CodeState::Pending {
        code.state = state;
        true
    } else {
        false
    }
}

/// What a claim on a due failover adds to the longest send: time to record its
/// outcome. Hosts sharing a Redis judge claims by their own clocks, so this is also how
/// far apart their clocks may be.
pub const FAILOVER_CLAIM_MARGIN_MS: Millis = 10_000;

/// A Messenger message the `messages` backend must follow with an SMS unless it is read
/// in time. Kept by the store until due, so a restart neither loses nor repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFailover {
    /// The Messenger message's provider id: the code's delivery reference, by which
    /// the failover finds its code (the token's, or the one a resend replaced while
    /// the token keeps it; a purged code is found no more).
    pub reference: String,
    pub due_at: Millis,
    /// For the log, and bound into the sealed text.
    pub token: String,
    /// SMS number, E.164 digits; bound into the sealed text, with the token and the
    /// reference, so that a failover rewritten in the store sends nothing.
    pub to: String,
    /// The SMS text, encrypted with a key derived from the server secret: it holds the
    /// code, and the database never does in the clear.
    pub sealed_text: Vec<u8>,
}

/// What a due failover comes to, judged from its code's record at the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverVerdict {
    /// Unread, not rejected, still pending: send the SMS, which names the time the code
    /// has left (until `expires_at`) as of the send.
    Send { expires_at: Millis },
    /// The code was replaced or purged.
    Gone,
    /// Verified, cancelled, expired or locked meanwhile.
    Finished(CodeState),
    /// A `read` status arrived for the Messenger message.
    Read,
    /// Vonage reported the Messenger message `rejected`, so its own failover sent the SMS.
    ProviderFellOver,
    /// A resend replaced the code and is still on its way: its delivery may yet fail and
    /// bring the code back, so the failover is judged again shortly, neither sent (the
    /// person may have the new code) nor dropped. Never handed out by a claim.
    ResendOnItsWay,
    /// The SMS was sent, or failed, already: a claim that outlived its send's end (the
    /// daemon stopped before it let the failover go).
    Done,
}

/// Decides a due failover from its code's record (`None`: no such code any more).
pub fn failover_verdict(code: Option<&CodeRecord>, now: Millis) -> FailoverVerdict {
    let Some(code) = code else {
        return FailoverVerdict::Gone;
    };
    let state = code.state_at(now);
    if state != CodeState::Pending {
        return FailoverVerdict::Finished(state);
    }
    let seen = |status: &str| code.delivery.events.iter().any(|e| e.status == status);
    if seen(FAILOVER_SENT) || seen(FAILOVER_FAILED) {
        FailoverVerdict::Done
    } else if seen("read") {
        FailoverVerdict::Read
    } else if seen("rejected") {
        FailoverVerdict::ProviderFellOver
    } else {
        FailoverVerdict::Send {
            expires_at: code.expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_attempts: 3,
        lock: 900_000,
        retain: 3_600_000,
        max_sends: 2,
        send_window: 900_000,
        resend_cooldown: 30_000,
    };
    const D1: Digest = Digest([1; 16]);
    const D2: Digest = Digest([2; 16]);

    fn pending(now: Millis) -> CodeRecord {
        CodeRecord::new(now, now + 300_000, vec![Channel::Sms])
    }

    #[test]
    fn create_replaces_the_previous_code() {
        let plan = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap();
        assert_eq!(plan.replaced, None);
        let plan = plan_create(Some(plan.token), &mut [], D2, 60_000, &LIMITS).unwrap();
        assert_eq!(plan.replaced, Some(D1));
        assert_eq!(plan.token.current, Some(D2));
    }

    #[test]
    fn cooldown_and_window_limit_sends() {
        let mut recipient = [RecipientRecord::default()];
        let first = plan_create(None, &mut recipient, D1, 0, &LIMITS).unwrap();
        let err = plan_create(
            Some(first.token.clone()),
            &mut recipient.clone(),
            D2,
            10_000,
            &LIMITS,
        )
        .unwrap_err();
        assert_eq!(
            err,
            Refusal::RateLimited {
                retry_after: 20_000,
                limit: SendLimit::Cooldown,
                reached_by: LimitedBy::Token,
            }
        );
        // A new token, same recipient: the recipient's own limit applies.
        let second = plan_create(None, &mut recipient, D2, 40_000, &LIMITS).unwrap();
        assert_eq!(second.token.sends, vec![40_000]);
        let err = plan_create(None, &mut recipient, D1, 100_000, &LIMITS).unwrap_err();
        assert_eq!(
            err,
            Refusal::RateLimited {
                retry_after: 800_000,
                limit: SendLimit::Count,
                reached_by: LimitedBy::Recipient(0),
            }
        );
        // Once the window has passed, sends are allowed again.
        assert!(plan_create(None, &mut recipient, D1, 900_001, &LIMITS).is_ok());
    }

    #[test]
    fn the_longest_wait_names_its_limit_and_whose_sends_reached_it() {
        let limits = Limits {
            max_sends: 1,
            resend_cooldown: 0,
            ..LIMITS
        };
        // The token and both recipients are at the count; the second recipient's send
        // is the newest, so it leaves the window last.
        let mut recipients = [
            RecipientRecord { sends: vec![1_000] },
            RecipientRecord { sends: vec![5_000] },
        ];
        let token = TokenRecord {
            sends: vec![2_000],
            ..TokenRecord::default()
        };
        let err = plan_create(Some(token), &mut recipients, D1, 10_000, &limits).unwrap_err();
        assert_eq!(
            err,
            Refusal::RateLimited {
                retry_after: 895_000,
                limit: SendLimit::Count,
                reached_by: LimitedBy::Recipient(1),
            }
        );
    }

    #[test]
    fn retry_after_waits_out_both_the_cooldown_and_the_count() {
        let limits = Limits {
            max_sends: 2,
            send_window: 10_000,
            resend_cooldown: 2_000,
            ..LIMITS
        };
        let mut sends = vec![0, 3_000];
        // Inside the cooldown (until 5 s) and at the count (until 10 s): the later one.
        assert_eq!(
            check_sends(&mut sends, 4_000, &limits),
            Err((6_000, SendLimit::Count))
        );
        assert_eq!(
            check_sends(&mut sends, 9_999, &limits),
            Err((1, SendLimit::Count))
        );
        // Under the count, only the cooldown is left to wait out.
        let mut sends = vec![3_000];
        assert_eq!(
            check_sends(&mut sends, 4_000, &limits),
            Err((1_000, SendLimit::Cooldown))
        );
        assert_eq!(check_sends(&mut sends, 10_000, &limits), Ok(()));
    }

    #[test]
    fn right_code_verifies_once() {
        let token = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap().token;
        let plan = plan_verify(Some(token.clone()), Some(pending(0)), 1_000, &LIMITS);
        assert_eq!(plan.outcome, VerifyOutcome::Valid);
        let verified = plan.code.unwrap();
        let plan = plan_verify(Some(token), Some(verified), 2_000, &LIMITS);
        assert_eq!(plan.outcome, VerifyOutcome::AlreadyVerified);
        assert!(plan.code.is_none() && plan.token.is_none());
    }

    #[test]
    fn expired_code_answers_expired() {
        let token = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap().token;
        let plan = plan_verify(Some(token), Some(pending(0)), 300_000, &LIMITS);
        assert_eq!(plan.outcome, VerifyOutcome::Expired);
    }

    #[test]
    fn unknown_token_counts_nothing() {
        let plan = plan_verify(None, None, 0, &LIMITS);
        assert_eq!(plan.outcome, VerifyOutcome::NotFound);
        assert!(plan.token.is_none());
    }

    #[test]
    fn wrong_codes_lock_the_token_and_the_lock_ends() {
        let mut token = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap().token;
        for attempt in 1..LIMITS.max_attempts {
            let plan = plan_verify(Some(token), None, 1_000, &LIMITS);
            assert_eq!(plan.outcome, VerifyOutcome::NotFound);
            token = plan.token.unwrap();
            assert_eq!(token.attempts, attempt);
        }
        let plan = plan_verify(Some(token), None, 1_000, &LIMITS);
        assert_eq!(
            plan.outcome,
            VerifyOutcome::TooManyAttempts {
                retry_after: LIMITS.lock,
                just_locked: true
            }
        );
        assert!(plan.invalidate_live);
        let token = plan.token.unwrap();
        // While locked, even the right code is refused, and so is a create.
        let plan = plan_verify(Some(token.clone()), Some(pending(0)), 2_000, &LIMITS);
        assert_eq!(
            plan.outcome,
            VerifyOutcome::TooManyAttempts {
                retry_after: 899_000,
                just_locked: false
            }
        );
        let err = plan_create(Some(token.clone()), &mut [], D2, 2_000, &LIMITS).unwrap_err();
        assert_eq!(
            err,
            Refusal::Locked {
                retry_after: 899_000
            }
        );
        // After the lock the count is clear and a create works.
        let plan = plan_create(Some(token), &mut [], D2, 901_000, &LIMITS).unwrap();
        assert_eq!(plan.token.attempts, 0);
        assert_eq!(plan.token.locked_until, None);
    }

    #[test]
    fn a_new_create_does_not_reset_the_count() {
        let token = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap().token;
        let token = plan_verify(Some(token), None, 1_000, &LIMITS)
            .token
            .unwrap();
        let token = plan_create(Some(token), &mut [], D2, 31_000, &LIMITS)
            .unwrap()
            .token;
        assert_eq!(token.attempts, 1);
    }

    #[test]
    fn token_record_stays_while_it_has_a_code() {
        let mut token = plan_create(None, &mut [], D1, 0, &LIMITS).unwrap().token;
        assert_eq!(token.purge_at(&LIMITS), None);
        token.current = None;
        assert_eq!(token.purge_at(&LIMITS), Some(LIMITS.send_window));
    }

    #[test]
    fn failover_goes_out_only_for_an_unread_pending_code() {
        let mut code = CodeRecord::new(0, 10_000, vec![Channel::Messenger, Channel::Sms]);
        assert_eq!(failover_verdict(None, 5), FailoverVerdict::Gone);
        let send = FailoverVerdict::Send { expires_at: 10_000 };
        assert_eq!(failover_verdict(Some(&code), 5), send);
        assert_eq!(
            failover_verdict(Some(&code), 10_000),
            FailoverVerdict::Finished(CodeState::Expired)
        );
        let event = |status: &str| DeliveryEvent {
            at: 1,
            status: status.into(),
            channel: Some("messenger".into()),
            detail: None,
        };
        code.delivery.push(event("delivered"));
        assert_eq!(failover_verdict(Some(&code), 5), send);
        for outcome in [FAILOVER_SENT, FAILOVER_FAILED] {
            let mut done = code.clone();
            done.delivery.push(event(outcome));
            assert_eq!(failover_verdict(Some(&done), 5), FailoverVerdict::Done);
        }
        let mut rejected = code.clone();
        rejected.delivery.push(event("rejected"));
        assert_eq!(
            failover_verdict(Some(&rejected), 5),
            FailoverVerdict::ProviderFellOver
        );
        code.delivery.push(event("read"));
        assert_eq!(failover_verdict(Some(&code), 5), FailoverVerdict::Read);
        code.state = CodeState::Verified;
        assert_eq!(
            failover_verdict(Some(&code), 5),
            FailoverVerdict::Finished(CodeState::Verified)
        );
    }

    #[test]
    fn a_retried_callback_is_recorded_once_and_the_oldest_events_go() {
        let event = |at: Millis| DeliveryEvent {
            at,
            status: "delivered".into(),
            channel: Some("sms".into()),
            detail: None,
        };
        let mut delivery = DeliveryRecord::default();
        delivery.push(event(1));
        delivery.push(event(1));
        assert_eq!(
            delivery.events,
            vec![event(1)],
            "the retry is the same event"
        );
        for at in 2..=(MAX_DELIVERY_EVENTS as Millis + 1) {
            delivery.push(event(at));
        }
        assert_eq!(delivery.events.len(), MAX_DELIVERY_EVENTS);
        assert_eq!(delivery.events[0], event(2), "the oldest went");
        assert!(
            !delivery.push(event(1)),
            "the retry of one dropped came back"
        );
        assert_eq!(delivery.events[0], event(2));
    }

    #[test]
    fn a_full_record_drops_the_oldest_report_by_its_time_not_by_its_arrival() {
        let report = |at, status: &str| DeliveryEvent {
            at,
            status: status.into(),
            channel: Some("messenger".into()),
            detail: None,
        };
        let mut delivery = DeliveryRecord::default();
        // The read, stamped last, arrives first; then earlier reports fill the record.
        delivery.push(report(100, "read"));
        for at in 1..=(MAX_DELIVERY_EVENTS as Millis) {
            assert!(delivery.push(report(at, "submitted")));
        }
        assert_eq!(delivery.events.len(), MAX_DELIVERY_EVENTS);
        assert!(delivery.events.contains(&report(100, "read")));
        assert!(!delivery.events.contains(&report(1, "submitted")));
    }

    #[test]
    fn the_failover_sms_id_outlives_a_chatty_provider() {
        let mut delivery = DeliveryRecord {
            reference: Some("messenger-id".into()),
            events: vec![],
        };
        delivery.push(DeliveryEvent {
            at: 1,
            status: FAILOVER_SENT.into(),
            channel: Some("sms".into()),
            detail: Some("sms-id".into()),
        });
        for at in 2..=(3 * MAX_DELIVERY_EVENTS as Millis) {
            delivery.push(DeliveryEvent {
                at,
                status: "delivered".into(),
                channel: Some("sms".into()),
                detail: None,
            });
        }
        assert_eq!(delivery.events.len(), MAX_DELIVERY_EVENTS);
        assert_eq!(
            delivery.references().collect::<Vec<_>>(),
            ["messenger-id", "sms-id"]
        );
        assert_eq!(
            delivery.events.last().unwrap().at,
            3 * MAX_DELIVERY_EVENTS as Millis,
            "the newest report is kept"
        );
    }
}
