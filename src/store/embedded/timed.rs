//! Trees ordered by time (`expiry`, `recipients`, `failovers`): keys that start with a
//! big-endian time, read from the head for what is due.

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

/// At most `batch` keys of a [`timed_key`] tree due by `now`, from the start of the
/// tree.
pub(super) fn due_keys<T: Tree>(
    tree: &T,
    now: Millis,
    batch: usize,
) -> Result<Vec<T::Bytes>, StoreError> {
    tree.keys_between(&[], &(now + 1).to_be_bytes(), batch)
}

/// The janitor's batch of a [`timed_key`] tree: at most `batch` keys due by `now`, for
/// the caller to remove, and whether it is full (more may be due).
///
/// An LSM tree (fjall) keeps a removed key as a tombstone until a compaction drops it,
/// and a scan from the head steps over all of them, so purging a backlog batch by batch
/// from the head would cost each batch more than the one before. While batches come
/// back full (more are due), the next one therefore starts at `resume`, the last key of
/// this one; a batch that is not full ends the backlog, and the next scan starts at the
/// head again. A key filed below `resume` meanwhile (only a clock stepping back files
/// one in the past) waits for that; reads check expiry themselves.
pub(super) fn due_batch<T: Tree>(
    tree: &T,
    resume: &Mutex<Vec<u8>>,
    now: Millis,
    batch: usize,
) -> Result<(Vec<T::Bytes>, bool), StoreError> {
    let mut from = resume.lock().unwrap_or_else(PoisonError::into_inner);
    let end = (now + 1).to_be_bytes();
    let due = if from.as_slice() < end.as_slice() {
        tree.keys_between(&from, &end, batch)?
    } else {
        Vec::new()
    };
    match due.last() {
        Some(last) if due.len() == batch => *from = last.to_vec(),
        _ => from.clear(),
    }
    let full = !from.is_empty();
    Ok((due, full))
}

/// The time at the head of a [`timed_key`] tree.
pub(super) fn first_due(tree: &impl Tree) -> Result<Option<Millis>, StoreError> {
    Ok(tree
        .first_key()?
        .and_then(|key| Some(split_timed_key(&key)?.0)))
}

/// When the janitor must come back to a [`timed_key`] tree whose entries are due
/// `wait` after their key's time: at once after a full batch (more may be due), else
/// when its head is due.
pub(super) fn next_visit(
    tree: &impl Tree,
    full: bool,
    now: Millis,
    wait: Millis,
) -> Result<Option<Millis>, StoreError> {
    if full {
        return Ok(Some(now));
    }
    Ok(first_due(tree)?.map(|at| at.saturating_add(wait)))
}
