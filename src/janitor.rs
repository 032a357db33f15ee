//! The janitor: a background task that expires pending codes and purges finished items
//! in due order, in bounded batches.
//!
//! It reads the first entries of the store's expiry index, handles at most `batch` of
//! them, and sleeps until the next entry is due (at most `interval_secs`). A create
//! whose expiry comes sooner than the planned wake-up wakes it early ([`Wakeup`]), as
//! mini-redis's purge task does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::JanitorConfig;
use crate::metrics::Counters;
use crate::rules::{Millis, now_ms};
use crate::store::Store;

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
        let wake_at = next_due.unwrap_or(Millis::MAX).min(now + interval).max(now);
        wakeup.planned.store(wake_at, Ordering::Release);
        let mut sleep = Duration::from_millis(wake_at.saturating_sub(now_ms()));
        if next_due.is_some_and(|due| due <= now) {
            sleep = sleep.max(started.elapsed());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = wakeup.notify.notified() => {}
        }
        tokio::task::yield_now().await;
    }
}
