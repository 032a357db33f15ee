//! Storage engines behind one small trait of domain operations.
//!
//! An engine makes each operation atomic, and durable before it returns as [`Store`]
//! says; the rules it applies come from [`crate::rules`], so every engine answers
//! alike. `fjall` (the
//! default for a new database) and `sled` are embedded ([`embedded`]: one logic over
//! either database); `redis` is shared by several otpd hosts.

pub mod embedded;
mod encoding;
pub mod redis;

use async_trait::async_trait;

use crate::code::Digest;
use crate::rules::{
    self, Channel, CodeRecord, CodeState, DeliveryEvent, FailoverVerdict, Millis, PendingFailover,
    Refusal, TokenRecord, VerifyOutcome,
};

use encoding::{decode, decode_with_extra, encode, encode_with_extra};

/// Applies a change to an engine's live count (one per code leaving or entering
/// pending), saturating: a count is never worth a panic.
fn adjust_live(live: &std::sync::atomic::AtomicU64, delta: i64) {
    use std::sync::atomic::Ordering::Relaxed;
    let _ = live.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add_signed(delta)));
}

/// Whether a code just confirmed delivered still counts: pending, or verified already
/// (it arrived before its confirm did).
fn still_counts(code: &CodeRecord, now: Millis) -> bool {
    matches!(code.state_at(now), CodeState::Pending | CodeState::Verified)
}

/// A stored failover, or `None` (logged) when it does not decode: one unreadable
/// entry is dropped rather than holding up the failovers behind it.
fn readable_failover(bytes: &[u8]) -> Option<PendingFailover> {
    decode(bytes)
        .inspect_err(|error| tracing::error!(%error, "dropped an unreadable pending SMS failover"))
        .ok()
}

/// How long a failover waits whose code record cannot be read (corrupt, or written by
/// a newer otpd during a rolling upgrade): it goes back in line, behind the others,
/// instead of holding them up at the head.
const FAILOVER_UNREADABLE_RETRY_MS: Millis = 60_000;

/// How long a failover waits whose code a resend on its way replaced
/// ([`FailoverVerdict::ResendOnItsWay`]) before it is judged again: a resend settles
/// within its send, seconds as a rule, and the SMS must not be late once it is owed.
const FAILOVER_RESEND_WAIT_MS: Millis = 1_000;

/// The verdict on a failover of the code delivered as `reference`, from its token's
/// codes: `code`, the current one, and `replaced`, the one a resend replaced. A
/// failover of the code standing in for a resend on its way waits for that resend to
/// settle: undone, it brings the code back, and with it the failover.
fn judge_failover(
    reference: &str,
    code: Option<&CodeRecord>,
    replaced: Option<&ReplacedCode>,
    now: Millis,
) -> FailoverVerdict {
    if let Some(code) = code.filter(|code| code.delivered_as(reference)) {
        return rules::failover_verdict(Some(code), now);
    }
    let standing_in =
        replaced.filter(|old| old.code.delivered_as(reference) && old.stands_in(code, now));
    match standing_in.map(|old| rules::failover_verdict(Some(&old.code), now)) {
        Some(FailoverVerdict::Send { .. }) => FailoverVerdict::ResendOnItsWay,
        Some(verdict) => verdict,
        None => FailoverVerdict::Gone,
    }
}

/// What a claim does with one due failover, which it removes from where it was due.
#[derive(Debug)]
struct ClaimStep {
    /// Filed again in its place: its claim, or itself, due later.
    refiled: Option<PendingFailover>,
    /// Handed out, with its verdict.
    handed_out: Option<(PendingFailover, FailoverVerdict)>,
}

/// The claim of a due `failover`, from its verdict, or the error reading its code:
/// one to send is claimed until `claim_until`; one whose code a resend on its way
/// replaced, or whose code cannot be read, is filed again for later; any other is
/// handed out to be dropped. An error other than an unreadable record fails the claim.
fn claim_step(
    failover: PendingFailover,
    judged: Result<FailoverVerdict, StoreError>,
    now: Millis,
    claim_until: Millis,
) -> Result<ClaimStep, StoreError> {
    let refiled_at = |due_at| ClaimStep {
        refiled: Some(PendingFailover {
            due_at,
            ..failover.clone()
        }),
        handed_out: None,
    };
    Ok(match judged {
        Ok(verdict @ FailoverVerdict::Send { .. }) => {
            let claimed = PendingFailover {
                due_at: claim_until,
                ..failover
            };
            ClaimStep {
                refiled: Some(claimed.clone()),
                handed_out: Some((claimed, verdict)),
            }
        }
        Ok(FailoverVerdict::ResendOnItsWay) => {
            tracing::debug!(
                token = failover.token,
                "a resend is on its way: the failover of the code it replaced waits"
            );
            refiled_at(now + FAILOVER_RESEND_WAIT_MS)
        }
        Ok(verdict) => ClaimStep {
            refiled: None,
            handed_out: Some((failover, verdict)),
        },
        Err(error @ StoreError::Corrupt(_)) => {
            tracing::error!(
                reference = failover.reference,
                %error,
                "cannot read the code of a pending SMS failover; trying again in a minute"
            );
            refiled_at(now + FAILOVER_UNREADABLE_RETRY_MS)
        }
        Err(error) => return Err(error),
    })
}

/// A storage failure. The request that met it answers 500; the daemon keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// A code to be stored by [`Store::create`].
#[derive(Debug, Clone)]
pub struct NewCode {
    pub token: String,
    pub digest: Digest,
    /// Rate-limit keys of the recipients, e.g. `sms:393331234567`.
    pub recipients: Vec<String>,
    pub channels: Vec<Channel>,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// The code a create replaced, stored with the token until the new code is confirmed
/// delivered: a resend that never went out must not take away the code the person
/// already has. [`Store::discard`] puts it back; until then, and for good when a crash
/// cuts the delivery short, it [stands in](ReplacedCode::stands_in) for the new code.
/// Its provider reports are filed on it while it [takes them](ReplacedCode::takes_reports).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplacedCode {
    pub digest: Digest,
    pub code: CodeRecord,
}

impl ReplacedCode {
    /// Whether the code standing in (`standing`) keeps doing so for a new create that
    /// replaces `replaced`: when that is a resend still on its way (pending, its delivery
    /// not confirmed), the person may hold only the code standing in.
    pub fn keeps_standing_in(standing: Option<&Self>, replaced: Option<&Self>) -> bool {
        standing.is_some() && replaced.is_some_and(|r| r.code.on_its_way())
    }

    /// Whether a verify of this code counts, given the code that replaced it (`live`):
    /// while it [takes reports](Self::takes_reports) and neither code has expired at
    /// `now`. Once the new code went out, was verified, or ended, only it counts.
    pub fn stands_in(&self, live: Option<&CodeRecord>, now: Millis) -> bool {
        let unexpired = |code: &CodeRecord| code.state_at(now) == CodeState::Pending;
        self.takes_reports(live) && unexpired(&self.code) && live.is_some_and(unexpired)
    }

    /// Whether a provider's report on this code is recorded on it, given the code that
    /// replaced it (`live`): while this one is pending and the new one is on its way
    /// (pending, its delivery not confirmed). By their states alone, without the
    /// clock: a report brings the provider's time, not ours. The person may read this
    /// one meanwhile, and a failed resend brings it back with what was reported.
    pub fn takes_reports(&self, live: Option<&CodeRecord>) -> bool {
        self.code.is_pending() && live.is_some_and(CodeRecord::on_its_way)
    }
}

/// What became of a provider's status report ([`Store::record_delivery_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filed {
    /// Added to the events of the code it is about.
    Recorded,
    /// The code already holds it (a provider's retry).
    AlreadyRecorded,
    /// No code has a delivery with this reference.
    UnknownReference,
}

/// What the janitor did in one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PurgeReport {
    /// Records deleted (codes, tokens, recipients).
    pub purged: u64,
    /// Pending codes that reached their expiry unverified.
    pub expired: u64,
    /// When the next entry is due, if any.
    pub next_due: Option<Millis>,
}

/// Failovers claimed by [`Store::claim_due_failovers`].
#[derive(Debug, Default)]
pub struct DueFailovers {
    /// Each due failover with the verdict on its code at the deadline; one to send as
    /// claimed (due at the end of its claim).
    pub due: Vec<(PendingFailover, FailoverVerdict)>,
    /// When the next remaining one is due, if any.
    pub next_due: Option<Millis>,
}

/// A token's record and its current code (none once purged), for `status`.
#[derive(Debug, Clone)]
pub struct TokenStatus {
    pub code: Option<CodeRecord>,
    pub token: TokenRecord,
}

/// The domain operations every storage engine provides. Each is atomic, and durable
/// when it returns (unless the operator chose relaxed durability) — except `create`,
/// which [`Store::confirm_delivery`] or [`Store::discard`] makes durable, so that a
/// create costs one flush however its delivery goes; and the janitor's and the
/// failover task's bookkeeping (`purge_due`, the refiles of `claim_due_failovers`,
/// `finish_failover`), whose loss in a crash only has that work done again.
#[async_trait]
pub trait Store: Send + Sync {
    /// Stores a new code for a token, replacing its previous one (kept as a
    /// [`ReplacedCode`] until the delivery settles), unless the token is locked or a
    /// rate limit refuses. Atomic, but not yet durable.
    async fn create(&self, code: &NewCode, now: Millis) -> Result<Result<(), Refusal>, StoreError>;

    /// Removes a code whose delivery failed and puts back the one it replaced, as if
    /// the create had not been (its sends still count toward the rate limits: the
    /// provider may have sent before it failed). Leaves a code already verified alone:
    /// it evidently arrived.
    async fn discard(&self, token: &str, digest: &Digest) -> Result<(), StoreError>;

    /// Makes a created code final once its delivery went out: keeps the provider's
    /// delivery id (from then on the code it replaced no longer stands in) and returns
    /// once the code is durable. Returns whether the code still counts at `now`: it is
    /// the token's code, pending or verified. It does not when, while it was on its
    /// way, the code it replaced verified, or a lock, a cancel or its expiry ended it.
    async fn confirm_delivery(
        &self,
        token: &str,
        digest: &Digest,
        reference: &str,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// Records a provider status report on the code whose delivery carries `reference`:
    /// a token's code, or the [`ReplacedCode`] it keeps while that
    /// [takes reports](ReplacedCode::takes_reports).
    async fn record_delivery_event(
        &self,
        reference: &str,
        event: DeliveryEvent,
    ) -> Result<Filed, StoreError>;

    /// Checks a typed code (as its digest) against the token's code, or the code it
    /// replaced while that [stands in](ReplacedCode::stands_in): a valid one of those
    /// becomes the token's code again, and the new one goes.
    async fn verify(
        &self,
        token: &str,
        digest: &Digest,
        now: Millis,
    ) -> Result<VerifyOutcome, StoreError>;

    /// Ends the token's pending code; returns false when there was none.
    async fn cancel(&self, token: &str, now: Millis) -> Result<bool, StoreError>;

    /// The token's counters and current code, if the token is known.
    async fn status(&self, token: &str) -> Result<Option<TokenStatus>, StoreError>;

    /// Handles at most `batch` due entries of the expiry index: expires pending codes
    /// and purges finished items past their retain time.
    async fn purge_due(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError>;

    /// Keeps a pending failover of the `messages` backend until it is due.
    async fn put_failover(&self, failover: &PendingFailover) -> Result<(), StoreError>;

    /// Hands out at most `batch` failovers due by `now`, each with the verdict on its
    /// code as stored just before ([`Store::judge_failover`]). One to send is claimed:
    /// filed again, due at `claim_until`, so no one else gets it until then, and it
    /// comes back if its send never ends (a crash, a stop). One whose code a resend on
    /// its way replaced is filed again a second later, one whose code cannot be read a
    /// minute later (logged); neither is handed out. The others are removed, and so is
    /// an entry that does not decode (logged, never handed out). Atomic per failover,
    /// so one host gets each.
    async fn claim_due_failovers(
        &self,
        now: Millis,
        claim_until: Millis,
        batch: usize,
    ) -> Result<DueFailovers, StoreError>;

    /// The verdict [`Store::claim_due_failovers`] would reach on `failover` at `now`,
    /// changing nothing: the send of a claimed failover asks again before each retry.
    async fn judge_failover(
        &self,
        failover: &PendingFailover,
        now: Millis,
    ) -> Result<FailoverVerdict, StoreError>;

    /// Removes a failover [`Store::claim_due_failovers`] claimed, once its outcome is
    /// recorded on its code. Not waited on to be durable: a claim a crash brings back
    /// finds that outcome and is dropped ([`FailoverVerdict::Done`]).
    async fn finish_failover(&self, claimed: &PendingFailover) -> Result<(), StoreError>;

    /// Codes issued and not yet verified, cancelled, locked or expired (as of the
    /// janitor's last pass).
    fn live(&self) -> u64;

    /// At shutdown: makes everything written so far durable, and leaves the engine
    /// nothing to replay at the next start.
    async fn flush(&self) -> Result<(), StoreError>;

    /// A round trip through the engine for the watchdog: a read, and (embedded) a shared
    /// flush. It returns, with an error if the database fails, unless the engine is
    /// stuck.
    async fn probe(&self) -> Result<(), StoreError>;

    /// Resolves, with why, once the store can no longer make a write durable in this
    /// process, so that the daemon stops and a restart recovers it. An embedded engine
    /// whose flush failed (a full disk, an I/O error) refuses every later write, as
    /// the kernel may have dropped the pages it could not write; its journal still
    /// holds every acknowledged change. Never for Redis, whose outages pass by
    /// themselves.
    async fn failed_for_good(&self) -> String {
        std::future::pending().await
    }
}
