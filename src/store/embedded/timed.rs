//! Trees ordered by time (`expiry`, `recipients`, `failovers`): keys that start with a
//! big-endian time, read in time order for what is due, from past what was removed
//! ([`Floor`]).

use std::sync::{Mutex, PoisonError};

use super::kv::Tree;
use crate::rules::Millis;
use crate::store::StoreError;

/// A key of a tree ordered by time: big-endian milliseconds, then `rest`.
pub(super) fn timed_key(at: Millis, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + rest.len());
    key.extend_from_slice(&at.to_be_bytes());
    key.extend_from_slice(rest);
    key
}

/// Splits a [`timed_key`].
pub(super) fn split_timed_key(key: &[u8]) -> Option<(Millis, &[u8])> {
    let at = Millis::from_be_bytes(key.get(..8)?.try_into().ok()?);
    Some((at, &key[8..]))
}

/// Where the scans of a [`timed_key`] tree for what is due start: every key before the
/// floor was handled and removed.
///
/// An LSM tree (fjall) keeps a removed key as a tombstone until a compaction into its
/// last level drops it, which for trees of otpd's size can be never, and a scan steps
/// over every tombstone in its range (0.4 µs each). Scanning from the head, a janitor
/// pass took 300–1,000 ms after 90 s of 2,800 creates a second (`retain_secs = 0`;
/// BENCHMARKS.md, "Stop 22"), and more the longer the daemon ran. So scans start at
/// the floor, which rises past the keys its caller handled ([`Floor::raise`]); a key
/// filed below the floor, or below the end of a scan under way (only a clock stepping
/// back files one in the past), lowers it ([`Floor::lower`]). One scanner at a time per
/// tree: the janitor, or the failover task.
#[derive(Default)]
pub(super) struct Floor(Mutex<FloorState>);

#[derive(Default)]
struct FloorState {
    /// Every key before this one is gone.
    key: Vec<u8>,
    /// The end of the scan under way, which the floor may rise to.
    scanning_to: Vec<u8>,
    /// The earliest time filed below that end since the scan began, which the scan
    /// may not have seen.
    filed_below: Option<[u8; 8]>,
}

/// Keys a scan found due, for its caller to handle and remove, and then to pass to
/// [`Floor::raise`].
pub(super) struct Due<K> {
    pub keys: Vec<K>,
    /// The batch is full: more may be due.
    pub full: bool,
    /// Where the floor goes once the keys are handled.
    raise_to: Vec<u8>,
}

impl Floor {
    fn state(&self) -> std::sync::MutexGuard<'_, FloorState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Files `rest` at `at` in `tree`, the floor's tree, with `value`, and lowers the
    /// floor to it if need be ([`Floor::lower`]).
    pub fn insert(
        &self,
        tree: &impl Tree,
        at: Millis,
        rest: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        tree.insert(&timed_key(at, rest), value)?;
        self.lower(at);
        Ok(())
    }

    /// Called once a key at `at` is filed (after: a scan that began before then, and
    /// did not see it, then raises nothing).
    pub fn lower(&self, at: Millis) {
        let at = at.to_be_bytes();
        let mut state = self.state();
        if at.as_slice() < state.key.as_slice() {
            state.key = at.to_vec();
        }
        if at.as_slice() < state.scanning_to.as_slice() {
            state.filed_below = Some(state.filed_below.map_or(at, |filed| filed.min(at)));
        }
    }

    /// At most `batch` keys of `tree` due by `due_by`, from the floor.
    pub fn due<T: Tree>(
        &self,
        tree: &T,
        due_by: Millis,
        batch: usize,
    ) -> Result<Due<T::Bytes>, StoreError> {
        let end = (due_by + 1).to_be_bytes();
        let from = {
            let mut state = self.state();
            state.filed_below = None;
            state.scanning_to = end.to_vec();
            state.key.clone()
        };
        let keys = if from.as_slice() < end.as_slice() {
            tree.keys_between(&from, &end, batch)?
        } else {
            Vec::new()
        };
        let full = keys.len() == batch;
        // A full batch ends at its last key (whose tombstone the next scan meets first);
        // otherwise nothing before `end` is left.
        let raise_to = match keys.last() {
            Some(last) if full => last.to_vec(),
            _ => end.to_vec(),
        };
        Ok(Due {
            keys,
            full,
            raise_to,
        })
    }

    /// Raises the floor past the keys of `due`, all handled and removed, but not past
    /// a key filed meanwhile.
    pub fn raise<K>(&self, due: Due<K>) {
        let mut state = self.state();
        let mut raise_to = due.raise_to;
        if let Some(filed) = state.filed_below.take()
            && filed.as_slice() < raise_to.as_slice()
        {
            raise_to = filed.to_vec();
        }
        if state.key < raise_to {
            state.key = raise_to;
        }
        state.scanning_to.clear();
    }

    /// The time of the first key at or after the floor.
    pub fn first_due(&self, tree: &impl Tree) -> Result<Option<Millis>, StoreError> {
        let from = self.state().key.clone();
        let first = tree.keys_between(&from, &[0xff; 9], 1)?;
        Ok(first.first().and_then(|key| Some(split_timed_key(key)?.0)))
    }

    /// When the janitor must come back to a tree whose entries are due `wait` after
    /// their key's time: at once after a full batch (more may be due), else when the
    /// first key is due.
    pub fn next_visit(
        &self,
        tree: &impl Tree,
        full: bool,
        now: Millis,
        wait: Millis,
    ) -> Result<Option<Millis>, StoreError> {
        if full {
            return Ok(Some(now));
        }
        Ok(self.first_due(tree)?.map(|at| at.saturating_add(wait)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::embedded::kv::Batch;

    /// A tree in memory that records where each scan starts.
    #[derive(Default)]
    struct Recording {
        keys: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
        scans_from: Mutex<Vec<Vec<u8>>>,
    }

    impl Tree for Recording {
        type Bytes = Vec<u8>;

        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.keys.lock().unwrap().get(key).cloned())
        }

        fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.keys
                .lock()
                .unwrap()
                .insert(key.to_vec(), value.to_vec());
            Ok(())
        }

        fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
            self.keys.lock().unwrap().remove(key);
            Ok(())
        }

        fn keys_between(
            &self,
            start: &[u8],
            end: &[u8],
            limit: usize,
        ) -> Result<Vec<Vec<u8>>, StoreError> {
            self.scans_from.lock().unwrap().push(start.to_vec());
            let keys = self.keys.lock().unwrap();
            let range = keys.range(start.to_vec()..end.to_vec());
            Ok(range.take(limit).map(|(key, _)| key.clone()).collect())
        }

        fn entries(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
            let entries: Vec<_> = self.keys.lock().unwrap().clone().into_iter().collect();
            entries.into_iter().map(Ok)
        }

        fn apply(&self, batch: Batch) -> Result<(), StoreError> {
            for (key, value) in batch.changes {
                match value {
                    Some(value) => self.insert(&key, &value)?,
                    None => self.remove(&key)?,
                }
            }
            Ok(())
        }
    }

    fn file(tree: &Recording, floor: &Floor, at: Millis, name: &str) {
        floor.insert(tree, at, name.as_bytes(), b"").unwrap();
    }

    /// One scan due by `now`, its keys removed: their times.
    fn handle(tree: &Recording, floor: &Floor, now: Millis, batch: usize) -> Vec<Millis> {
        let due = floor.due(tree, now, batch).unwrap();
        let times = due.keys.iter().map(|key| split_timed_key(key).unwrap().0);
        let times = times.collect();
        for key in &due.keys {
            tree.remove(key).unwrap();
        }
        floor.raise(due);
        times
    }

    fn last_scan_from(tree: &Recording) -> Vec<u8> {
        tree.scans_from.lock().unwrap().last().unwrap().clone()
    }

    #[test]
    fn a_scan_starts_past_what_the_last_ones_handled() {
        let (tree, floor) = (Recording::default(), Floor::default());
        for (at, name) in [(10, "a"), (20, "b"), (30, "c"), (90, "d")] {
            file(&tree, &floor, at, name);
        }
        assert_eq!(handle(&tree, &floor, 50, 2), [10, 20], "a full batch");
        assert_eq!(handle(&tree, &floor, 50, 2), [30]);
        assert_eq!(
            last_scan_from(&tree),
            timed_key(20, b"b"),
            "from the full batch's end"
        );
        assert_eq!(floor.first_due(&tree).unwrap(), Some(90));
        assert_eq!(
            last_scan_from(&tree),
            51u64.to_be_bytes(),
            "past all due by 50"
        );
        assert_eq!(handle(&tree, &floor, 100, 2), [90]);
        assert_eq!(last_scan_from(&tree), 51u64.to_be_bytes());
    }

    #[test]
    fn a_key_filed_below_the_floor_lowers_it() {
        let (tree, floor) = (Recording::default(), Floor::default());
        file(&tree, &floor, 10, "a");
        assert_eq!(handle(&tree, &floor, 50, 10), [10]);
        file(&tree, &floor, 40, "stepped back");
        assert_eq!(floor.first_due(&tree).unwrap(), Some(40));
        assert_eq!(handle(&tree, &floor, 60, 10), [40]);
    }

    #[test]
    fn a_key_filed_during_a_scan_below_its_end_is_found_by_the_next() {
        let (tree, floor) = (Recording::default(), Floor::default());
        file(&tree, &floor, 10, "a");
        let due = floor.due(&tree, 50, 10).unwrap();
        // Filed after the scan read the tree, before it is over.
        file(&tree, &floor, 30, "meanwhile");
        for key in &due.keys {
            tree.remove(key).unwrap();
        }
        floor.raise(due);
        assert_eq!(handle(&tree, &floor, 50, 10), [30]);
        assert_eq!(handle(&tree, &floor, 60, 10), Vec::<Millis>::new());
        assert_eq!(last_scan_from(&tree), 51u64.to_be_bytes(), "then past it");
    }
}
