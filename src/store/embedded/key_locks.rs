//! Per-key mutual exclusion for the embedded engines, in place of transactions.
//!
//! A sled transaction of three inserts into three trees cost ~110 µs of CPU and ~3 KB
//! of log on the benchmark machine, against ~12 µs and ~450 B for one plain insert
//! (BENCHMARKS.md, "What got otpd from 5.4 k to 28 k ops/s"). So an operation locks
//! the stripes of the keys it reads and writes, then writes single keys in an order
//! whose every prefix is harmless. Only one process opens a sled or fjall database
//! (each engine locks its directory), so in-process locks isolate.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Enough stripes that 32 or so concurrent requests rarely share one.
const STRIPES: usize = 1024;

/// A fixed table of mutexes; a key locks the stripe its hash falls in.
pub struct KeyLocks {
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
}

/// Held while an operation reads and writes its keys; dropping it releases them.
#[must_use = "the keys are unlocked as soon as the guard is dropped"]
pub struct Held<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl KeyLocks {
    /// Locks every key's stripe, always in ascending stripe order so that two
    /// operations never wait on each other in a cycle.
    pub fn lock<'a>(&'a self, keys: &[&[u8]]) -> Held<'a> {
        let mut stripes: Vec<usize> = keys
            .iter()
            .map(|key| (self.hasher.hash_one(key) % STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        Held {
            _guards: stripes
                .into_iter()
                // The data lives in the database, not behind the mutex: a panic elsewhere
                // leaves nothing half-updated here.
                .map(|i| {
                    self.stripes[i]
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn overlapping_key_sets_in_any_order_never_deadlock_and_exclude() {
        let locks = Arc::new(KeyLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let a = format!("token-{}", i % 7);
                        let b = format!("sms:{}", (i + t) % 5);
                        let keys: [&[u8]; 3] = if t % 2 == 0 {
                            [a.as_bytes(), b.as_bytes(), b"shared"]
                        } else {
                            [b"shared", b.as_bytes(), a.as_bytes()]
                        };
                        let _held = locks.lock(&keys);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "excluded");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
