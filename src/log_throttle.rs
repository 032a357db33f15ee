//! At most one log line a second for events that can come in floods (storage failures
//! in an outage, refused webhooks from an unauthenticated sender, refused peers on a
//! socket), with the count of those held back, so that the log stays readable and its
//! disk is not filled.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::rules::now_ms;

/// Admits one event a second (wall-clock seconds) to the log and counts the others.
#[derive(Debug, Default)]
pub struct OncePerSecond {
    last_sec: AtomicU64,
    held_back: AtomicU64,
}

impl OncePerSecond {
    /// `const`, so that it can be a `static`.
    pub const fn new() -> Self {
        Self {
            last_sec: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(held_back)` when this event may be logged (the first of its second), with
    /// how many were not since the last one that was; `None` when it is held back.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms() / 1000)
    }

    fn admit_at(&self, sec: u64) -> Option<u64> {
        if self.last_sec.swap(sec, Ordering::Relaxed) != sec {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_second_with_the_count_held_back() {
        let throttle = OncePerSecond::new();
        assert_eq!(throttle.admit_at(10), Some(0));
        assert_eq!(throttle.admit_at(10), None);
        assert_eq!(throttle.admit_at(10), None);
        assert_eq!(throttle.admit_at(11), Some(2));
        assert_eq!(throttle.admit_at(11), None);
        assert_eq!(throttle.admit_at(15), Some(1));
        assert_eq!(throttle.admit_at(16), Some(0));
    }
}
