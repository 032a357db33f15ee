//! The ordered key-value interface the embedded engine is written against.
//!
//! Just what [`super::EmbeddedStore`] uses: named trees of byte keys in byte order,
//! single-key reads and writes, the keys of a range, every entry, an
//! atomic batch on one tree, and a durable flush of the whole database. Every write is visible to reads at
//! once and reaches disk in the order it was made ([`super`]'s module doc relies on
//! that); [`Database::flush`] makes everything written before it durable.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::Durability;
use crate::store::StoreError;

/// An error opening the database in `path`, naming that directory.
pub fn open_error(path: &Path, error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Database(format!("{}: {error}", path.display()))
}

/// Remembers a failed fdatasync of a database file and fails every later one: the
/// kernel may have dropped the pages it could not write, and Linux reports such an
/// error once, so a later sync of the same file would succeed over the lost writes
/// (fjall poisons its keyspace likewise).
#[derive(Default)]
pub struct SyncLatch {
    failed: AtomicBool,
}

impl SyncLatch {
    /// Runs `sync` unless an earlier one failed.
    pub fn sync(&self, sync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other("an earlier sync of this file failed"));
        }
        let result = sync();
        if result.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        result
    }
}

/// An embedded database: one directory, several [`Tree`]s.
pub trait Database: Clone + Send + Sync + 'static {
    type Tree: Tree;

    /// The engine's name in `store.engine`, for messages.
    const ENGINE: &'static str;

    /// Opens (or creates) the database in `path`, with a cache of about
    /// `cache_capacity_mb`. With [`Durability::Relaxed`] the engine makes writes
    /// durable in the background, as no one will call [`Database::flush`] for them.
    fn open(
        path: &Path,
        cache_capacity_mb: u64,
        durability: Durability,
    ) -> Result<Self, StoreError>;

    /// Whether `path` holds files of this engine's database (checked before opening
    /// one of another engine there).
    fn owns(path: &Path) -> bool;

    /// The tree for the database's own metadata (the layout mark, the secret's fingerprint).
    fn meta(&self) -> Result<Self::Tree, StoreError>;

    /// Whether the database holds nothing yet: no tree but [`Database::meta`], empty.
    fn is_fresh(&self) -> Result<bool, StoreError>;

    /// Opens (or creates) a tree.
    fn open_tree(&self, name: &str) -> Result<Self::Tree, StoreError>;

    /// Whether the database has a tree of this name.
    fn has_tree(&self, name: &str) -> bool;

    /// Deletes a tree and everything in it, durably. Its name must not be used again
    /// in this database: fjall journals writes by the tree's name but not its deletion,
    /// so it refuses the name while journals with the old writes are left, and a
    /// recovery would hand those writes to a new tree of that name.
    fn drop_tree(&self, name: &str) -> Result<(), StoreError>;

    /// Makes every write made before the call durable; blocks while the disk works.
    fn flush(&self) -> Result<(), StoreError>;

    /// At shutdown, after [`Database::flush`]: writes out what the engine holds only in
    /// memory and its journal, so that the next open has nothing to replay (replaying
    /// costs that open time and memory). Gives up after `within`, as a stop must end;
    /// the journal still has it all.
    fn write_out(&self, within: Duration) -> Result<(), StoreError>;
}

/// One ordered tree of a [`Database`].
pub trait Tree: Send + Sync + 'static {
    /// A key or value read back: a cheap handle on the engine's own bytes.
    type Bytes: std::ops::Deref<Target = [u8]> + Send;

    fn get(&self, key: &[u8]) -> Result<Option<Self::Bytes>, StoreError>;

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;

    /// Removes a key; removing one that is not there is no error.
    fn remove(&self, key: &[u8]) -> Result<(), StoreError>;

    /// At most `limit` keys from `start` (included) to `end` (excluded), in order;
    /// `start` is below `end`.
    fn keys_between(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Self::Bytes>, StoreError>;

    /// Every key with its value, in key order.
    fn entries(&self) -> impl Iterator<Item = Result<(Self::Bytes, Self::Bytes), StoreError>> + '_;

    /// Applies every change of `batch` at once: after a crash, all or none are there.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
}

/// Changes to one [`Tree`], applied atomically by [`Tree::apply`].
#[derive(Debug, Default)]
pub struct Batch {
    /// Each key with its new value, or `None` to remove it, in order.
    pub changes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.push((key, Some(value)));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.changes.push((key, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failed_sync_every_sync_fails() {
        let latch = SyncLatch::default();
        assert!(latch.sync(|| Ok(())).is_ok());
        let eio = || Err(std::io::Error::from_raw_os_error(5));
        assert_eq!(latch.sync(eio).unwrap_err().raw_os_error(), Some(5));
        let mut called = false;
        let later = latch.sync(|| {
            called = true;
            Ok(())
        });
        assert!(later.is_err(), "a sync after the failure succeeded");
        assert!(!called, "the file was synced again");
    }
}
