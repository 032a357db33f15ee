//! The janitor: a background task that expires pending codes and purges finished items
//! in due order, in bounded batches.
//!
//! Each pass has the store handle what is due: the embedded engine reads due entries
//! of its expiry index in time order (past what earlier passes handled, see
//! `store::embedded::timed::Floor`), handles at most `batch` of them and names the
//! next one's time (now, after a full batch); Redis expires keys itself, and a pass
//! only counts the codes that expired. The janitor then sleeps until the next entry is
//! due (at most `interval_secs`, and at least [`MIN_PASS_GAP`] unless the batch was
//! full). A create whose expiry comes sooner than the planned wake-up wakes it early
//! ([`Wakeup`]), as mini-redis's purge task does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::JanitorConfig;
use crate::metrics::Counters;
use crate::rules::{Millis, now_ms};
use crate::store::Store;

/// The shortest sleep after a pass that handled everything due. Under a steady load
/// something falls due every few milliseconds, and each pass has a fixed cost (a
/// thread of its own at a lower priority, see `store::embedded::purge`): at 1,800
/// creates a second a pass every 2 ms handled 2–6 entries. Reads check expiry
/// themselves, so waiting this long to mark codes expired and purge them changes no
/// answer, only how soon `stats` counts them.
const MIN_PASS_GAP: Duration = Duration::from_millis(100);

/// Tells the janitor about deadlines sooner than its planned wake-up.
#[derive(Debug)]
pub struct Wakeup {
    planned: AtomicU64,
    notify: Notify,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            planned: AtomicU64::new(Millis::MAX),
            notify: Notify::new(),
        }
    }
}

impl Wakeup {
    /// Something is due at `at`: wake the janitor if it planned to sleep past that.
    pub fn due_by(&self, at: Millis) {
        if self.planned.fetch_min(at, Ordering::AcqRel) > at {
            self.notify.notify_one();
        }
    }

    /// A pass begins: a deadline told from now on may be one the pass does not see,
    /// so each is taken (and wakes the janitor, which finds it after the pass).
    fn pass_begins(&self) {
        self.planned.store(Millis::MAX, Ordering::Release);
    }

    /// The pass found its next entry due at `at`: the janitor wakes then, or at a
    /// sooner deadline told during the pass.
    fn plan(&self, at: Millis) -> Millis {
        self.planned.fetch_min(at, Ordering::AcqRel).min(at)
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(
    store: Arc<dyn Store>,
    counters: Arc<Counters>,
    wakeup: Arc<Wakeup>,
    config: JanitorConfig,
    shutdown: CancellationToken,
) {
    let interval = config.interval_secs * 1000;
    loop {
        let now = now_ms();
        let started = std::time::Instant::now();
        wakeup.pass_begins();
        let next_due = match store.purge_due(now, config.batch).await {
            Ok(report) => {
                counters.purged.fetch_add(report.purged, Ordering::Relaxed);
                counters
                    .expired
                    .fetch_add(report.expired, Ordering::Relaxed);
                if report.purged + report.expired > 0 {
                    tracing::debug!(
                        purged = report.purged,
                        expired = report.expired,
                        took_ms = started.elapsed().as_millis() as u64,
                        "janitor pass"
                    );
                }
                report.next_due
            }
            Err(error) => {
                tracing::error!(%error, "janitor pass failed; retrying at the next interval");
                None
            }
        };
        // A full batch may leave more due entries: go on after a pause as long as the
        // batch took, so a large purge takes at most half the janitor's core from
        // requests (BENCHMARKS.md, "Janitor at scale").
        let wake_at = wakeup.plan(next_due.unwrap_or(Millis::MAX).min(now + interval).max(now));
        let mut sleep = Duration::from_millis(wake_at.saturating_sub(now_ms()));
        if next_due.is_some_and(|due| due <= now) {
            sleep = sleep.max(started.elapsed());
        } else {
            sleep = sleep.max(MIN_PASS_GAP);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = wakeup.notify.notified() => {}
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_told_during_a_pass_is_not_lost() {
        let wakeup = Wakeup::default();
        assert_eq!(wakeup.plan(1_000), 1_000);
        wakeup.due_by(2_000); // later than planned: no wake-up needed
        wakeup.pass_begins();
        // A create lands while the pass runs, after the store read the next deadline.
        wakeup.due_by(1_500);
        assert_eq!(wakeup.plan(5_000), 1_500, "the pass's own plan is later");
        assert_eq!(wakeup.plan(900), 900, "and an earlier one stands");
    }
}
