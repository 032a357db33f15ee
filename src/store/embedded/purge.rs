//! The janitor's side of the embedded store: due expiry entries and recipient buckets,
//! a batch at a time ([`Store::purge_due`](crate::store::Store::purge_due)).

use std::sync::atomic::Ordering;

use super::background::run_in_background;
use super::kv::{Database, Tree};
use super::short_keys::ShortKey;
use super::timed::{split_timed_key, timed_key};
use super::{EmbeddedStore, TokenState};
use crate::log_throttle::OncePerSecond;
use crate::rules::Millis;
use crate::store::{PurgeReport, StoreError};

/// How long a token whose record cannot be read waits for the janitor's next visit.
pub(super) const UNREADABLE_RETRY_MS: Millis = 60 * 60 * 1000;

/// What one janitor visit did.
#[derive(Debug, Default)]
struct Visit {
    purged: u64,
    expired: u64,
    live_delta: i64,
}

impl<D: Database> EmbeddedStore<D> {
    /// One janitor batch. A batch is up to `batch` token visits of a few writes each.
    /// Run on a runtime worker, it would stall the requests queued behind it;
    /// `block_in_place` hands them to another worker first (BENCHMARKS.md, "Janitor at
    /// scale"). It runs in the background, so that the workers get the cores first:
    /// during a purge of 150 k codes the mixed p99 was 6.3–6.6 ms at the same priority
    /// and 5.4–5.6 ms below it, at 20 % more requests (BENCHMARKS.md, "Stop 18").
    pub(super) fn purge(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError> {
        off_worker(|| run_in_background("otpd-janitor", || self.purge_batch(now, batch)))
    }

    /// One due expiry entry: handles its token if the entry is still the live one, then
    /// removes it. Both under the token's lock: a write in between could file the token
    /// under this very key again (a discard restoring a code due then), and removing
    /// that entry would leave the token out of the index for good.
    fn visit(&self, entry: &[u8], now: Millis) -> Result<Visit, StoreError> {
        let filed = split_timed_key(entry)
            .and_then(|(due, token)| Some((due, ShortKey::try_from(token).ok()?)));
        let Some((due, token)) = filed else {
            self.expiry.remove(entry)?;
            return Ok(Visit::default());
        };
        let _held = self.locks.lock(&[&token]);
        let visit = match self.visit_token(&token, due, now) {
            // A record this build cannot read (a newer otpd's after a rollback, a bad
            // sector) must not stop the janitor for every other token: it comes back
            // later, and is taken up then if it can be read ([`Self::visit_token`]).
            Err(error @ StoreError::Corrupt(_)) => {
                // After a rollback every record a newer build wrote fails alike.
                static THROTTLE: OncePerSecond = OncePerSecond::new();
                if let Some(held_back) = THROTTLE.admit() {
                    tracing::error!(
                        token_key = %crate::hex(&token),
                        %error,
                        held_back,
                        "the janitor cannot read a token's record; trying again in an hour (held_back: others since the last such line)"
                    );
                }
                let retry_at = now + UNREADABLE_RETRY_MS;
                self.expiry_floor
                    .insert(&self.expiry, retry_at, &token, &[])?;
                Visit::default()
            }
            visited => visited?,
        };
        self.expiry.remove(entry)?;
        Ok(visit)
    }

    /// Expires a pending code at its expiry, purges a finished one `retain` later, and
    /// lets the token go once nothing keeps it; otherwise files it for its next visit.
    fn visit_token(&self, token: &ShortKey, due: Millis, now: Millis) -> Result<Visit, StoreError> {
        let mut visit = Visit::default();
        let Some(mut state) = self.read_token(token)? else {
            return Ok(visit);
        };
        if state.indexed_at != Some(due) && !self.lost_its_entry(token, &state, due)? {
            return Ok(visit); // a sooner entry replaced this one
        }
        state.indexed_at = None;
        if state
            .code
            .as_mut()
            .is_some_and(|code| code.mark_expired(now))
        {
            visit.expired = 1;
            visit.live_delta = -1;
        }
        let mut purged_code = None;
        let mut purged_replaced = None;
        if state
            .code
            .as_ref()
            .is_some_and(|c| c.due_at(&self.limits) <= now)
        {
            purged_code = state.remove_code();
            purged_replaced = state.replaced.take();
            visit.purged += 1;
        }
        // References first: after a crash in between, none is left naming nothing.
        self.forget_references(purged_code.as_ref())?;
        self.forget_references(purged_replaced.as_ref().map(|old| &old.code))?;
        if state.code.is_none()
            && state
                .record
                .purge_at(&self.limits)
                .is_some_and(|at| at <= now)
        {
            self.tokens.remove(token)?;
            visit.purged += 1;
        } else {
            self.write_token(token, &mut state)?;
        }
        Ok(visit)
    }

    /// Whether the entry at `due` is the token's only one, though its record names a
    /// sooner one: the entry at that time is gone, moved here by [`Self::visit`] while
    /// the record could not be read. (Otherwise an entry the record does not name is
    /// one a sooner entry replaced, and the record's own is still filed.)
    fn lost_its_entry(
        &self,
        token: &ShortKey,
        state: &TokenState,
        due: Millis,
    ) -> Result<bool, StoreError> {
        match state.indexed_at {
            Some(at) if at < due => Ok(self.expiry.get(&timed_key(at, token))?.is_none()),
            _ => Ok(false),
        }
    }

    /// Deletes at most `batch` recipient buckets whose sends all left the window;
    /// returns how many, and when the next one is due.
    fn purge_recipients(
        &self,
        now: Millis,
        batch: usize,
    ) -> Result<(u64, Option<Millis>), StoreError> {
        // A bucket starting at b holds sends before b + window, out of it by b + 2 windows.
        let window = 2 * self.limits.send_window;
        let mut purged = 0;
        let mut more = false;
        if let Some(last_due) = now.checked_sub(window) {
            let due = self
                .recipients_floor
                .due(&self.recipients, last_due, batch)?;
            for key in &due.keys {
                self.recipients.remove(key)?;
            }
            (purged, more) = (due.keys.len() as u64, due.full);
            self.recipients_floor.raise(due);
        }
        let next = self
            .recipients_floor
            .next_visit(&self.recipients, more, now, window)?;
        Ok((purged, next))
    }

    /// One janitor batch, on the calling thread.
    fn purge_batch(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError> {
        let mut report = PurgeReport::default();
        let mut live_delta = 0;
        let due = self.expiry_floor.due(&self.expiry, now, batch)?;
        for entry in &due.keys {
            let visit = self.visit(entry, now)?;
            report.purged += visit.purged;
            report.expired += visit.expired;
            live_delta += visit.live_delta;
        }
        let more = due.full;
        self.expiry_floor.raise(due);
        crate::store::adjust_live(&self.live, live_delta);
        let (purged, next_recipients) = self.purge_recipients(now, batch)?;
        report.purged += purged;
        report.expired += self.expired_unreported.swap(0, Ordering::Relaxed);
        let next_expiry = self.expiry_floor.next_visit(&self.expiry, more, now, 0)?;
        report.next_due = next_expiry.into_iter().chain(next_recipients).min();
        Ok(report)
    }
}

/// Runs blocking work from async code: through `block_in_place` on a multi-thread
/// runtime (the daemon's), inline elsewhere (tests and tools on a current-thread one).
fn off_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
