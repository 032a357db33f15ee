//! Counters since start-up, shown by the `stats` op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// Event counters, bumped where the event happens.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    pub created: AtomicU64,
    pub verified: AtomicU64,
    /// Verifies that did not succeed: wrong code or unknown token (404).
    pub failed: AtomicU64,
    /// Codes that reached their expiry unverified.
    pub expired: AtomicU64,
    pub purged: AtomicU64,
    pub cancelled: AtomicU64,
    /// Tokens locked after too many wrong codes.
    pub locked: AtomicU64,
    pub rate_limited: AtomicU64,
    pub delivery_failed: AtomicU64,
    /// Requests sent to the delivery provider, retries included.
    pub delivery_attempts: AtomicU64,
    /// Messages the provider accepted.
    pub delivery_sent: AtomicU64,
    /// Messages the provider refused (4xx other than 429).
    pub delivery_refused: AtomicU64,
    /// Messages given up on after retries (429, 5xx, connection errors, timeouts).
    pub delivery_unavailable: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            created: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            locked: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            delivery_failed: AtomicU64::new(0),
            delivery_attempts: AtomicU64::new(0),
            delivery_sent: AtomicU64::new(0),
            delivery_refused: AtomicU64::new(0),
            delivery_unavailable: AtomicU64::new(0),
        }
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of the counters, as the `stats` op answers it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub live: u64,
    pub created: u64,
    pub verified: u64,
    pub failed: u64,
    pub expired: u64,
    pub purged: u64,
    pub cancelled: u64,
    pub locked: u64,
    pub rate_limited: u64,
    pub delivery_failed: u64,
    pub delivery_attempts: u64,
    pub delivery_sent: u64,
    pub delivery_refused: u64,
    pub delivery_unavailable: u64,
    pub uptime_secs: u64,
}

impl Counters {
    /// Reads every counter; `live` comes from the store.
    pub fn snapshot(&self, live: u64) -> Stats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            live,
            created: read(&self.created),
            verified: read(&self.verified),
            failed: read(&self.failed),
            expired: read(&self.expired),
            purged: read(&self.purged),
            cancelled: read(&self.cancelled),
            locked: read(&self.locked),
            rate_limited: read(&self.rate_limited),
            delivery_failed: read(&self.delivery_failed),
            delivery_attempts: read(&self.delivery_attempts),
            delivery_sent: read(&self.delivery_sent),
            delivery_refused: read(&self.delivery_refused),
            delivery_unavailable: read(&self.delivery_unavailable),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }
}
