//! Counters since start-up, shown by the `stats` op (and by `GET /metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// Tokens locked after too many wrong codes: once per lock, when the wrong code
    /// that locks it comes; the requests a lock refuses are not counted.
    pub locked: AtomicU64,
    pub rate_limited: AtomicU64,
    pub delivery_failed: AtomicU64,
    /// Requests sent to the delivery provider, retries included: bumped once the
    /// request is signed, as it goes out, so one otpd could not sign is not counted.
    pub delivery_attempts: AtomicU64,
    /// Messages the provider accepted.
    pub delivery_sent: AtomicU64,
    /// Messages that will not go out as they are: the provider refused them (4xx other
    /// than 429), or otpd could not sign the request.
    pub delivery_refused: AtomicU64,
    /// Messages given up on after retries (429, 5xx, connection errors, timeouts).
    pub delivery_unavailable: AtomicU64,
    /// Requests answered 500 because the store failed (exact, where the log only
    /// samples them).
    pub storage_failed: AtomicU64,
    /// Time to answer a request on the Unix socket.
    pub socket_latency: Histogram,
    /// Time to answer a request on the HTTP listener.
    pub http_latency: Histogram,
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
            storage_failed: AtomicU64::new(0),
            socket_latency: Histogram::default(),
            http_latency: Histogram::default(),
        }
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Upper bounds of the latency buckets in microseconds: an answer takes from well under
/// a millisecond (relaxed durability) to tens of milliseconds (a shared disk flush).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// A latency histogram with fixed buckets, lock-free to record.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is beyond every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A histogram as read at one moment, in Prometheus' cumulative form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in µs, observations at or below it)`, one per [`LATENCY_BUCKETS_US`].
    pub cumulative: Vec<(u64, u64)>,
    /// All observations (the `+Inf` bucket).
    pub count: u64,
    pub sum_us: u64,
}

impl Histogram {
    /// Records one answer's duration.
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        bump(&self.buckets[bucket]);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Reads the buckets; the count is their total, so it always equals `+Inf`.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(LATENCY_BUCKETS_US.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            if let Some(&bound) = LATENCY_BUCKETS_US.get(i) {
                cumulative.push((bound, total));
            }
        }
        HistogramSnapshot {
            cumulative,
            count: total,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
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
    pub storage_failed: u64,
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
            storage_failed: read(&self.storage_failed),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_micros(101));
        histogram.observe(Duration::from_secs(10));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.cumulative[0], (100, 1), "le is inclusive");
        assert_eq!(snapshot.cumulative[1], (250, 2));
        assert_eq!(snapshot.cumulative.last(), Some(&(2_500_000, 2)));
        assert_eq!(snapshot.count, 3, "the slow one is only in +Inf");
        assert_eq!(snapshot.sum_us, 10_000_201);
    }
}
