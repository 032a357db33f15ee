//! [`Database`] on sled 0.34: a sled tree per tree, the default tree for metadata.
//!
//! sled keeps a page per 16 keys or fewer and metadata for every page, so each key per
//! code costs memory and each write costs CPU. sled recovers a prefix of its log (it
//! replays the log in order and stops at the first torn message), which is the write
//! order [`super`] relies on; it flushes every 500 ms on its own, which is all the
//! durability `relaxed` gets.
//!
//! sled's own flush is not enough for `flush` durability: it writes its log with
//! `pwrite` and waits with `sync_file_range`, which writes no file metadata and does
//! not flush the device's write cache. When the log grows (a new segment past the end
//! of the file) the new blocks and the file's size would reach the disk only at sled's
//! next `fsync`, up to 500 ms later, so a power loss could take an acknowledged write.
//! [`SledDb::flush`] therefore fdatasyncs the file after sled's flush, as fjall's
//! journal and Redis's `appendfsync always` are synced.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sled::IVec;

use super::kv::{Batch, Database, SyncLatch, Tree, open_error};
use crate::config::Durability;
use crate::store::StoreError;

/// sled 0.34's one data file in its directory: the log, segment after segment.
const LOG_FILE: &str = "db";

fn db_error(e: sled::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A sled database, and its log file for the fdatasync sled's flush leaves out.
#[derive(Clone)]
pub struct SledDb {
    db: sled::Db,
    log: Arc<File>,
    /// Fails every flush after one whose fdatasync failed.
    latch: Arc<SyncLatch>,
}

impl Database for SledDb {
    type Tree = sled::Tree;

    const ENGINE: &'static str = "sled";

    fn open(path: &Path, cache_capacity_mb: u64, _: Durability) -> Result<Self, StoreError> {
        let at = |e: &dyn std::fmt::Display| open_error(path, e);
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_mb * 1024 * 1024)
            .open()
            .map_err(|e| at(&e))?;
        let log = File::open(path.join(LOG_FILE)).map_err(|e| at(&e))?;
        Ok(SledDb {
            db,
            log: Arc::new(log),
            latch: Arc::default(),
        })
    }

    fn owns(path: &Path) -> bool {
        path.join("conf").is_file() && path.join(LOG_FILE).is_file()
    }

    fn meta(&self) -> Result<sled::Tree, StoreError> {
        Ok(sled::Tree::clone(&self.db))
    }

    fn is_fresh(&self) -> Result<bool, StoreError> {
        Ok(self.db.tree_names().len() == 1 && self.db.is_empty())
    }

    fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(name).map_err(db_error)
    }

    fn has_tree(&self, name: &str) -> bool {
        self.db
            .tree_names()
            .iter()
            .any(|tree| **tree == *name.as_bytes())
    }

    /// Durable once flushed, as every other write (sled records a dropped tree in its
    /// log).
    fn drop_tree(&self, name: &str) -> Result<(), StoreError> {
        self.db.drop_tree(name).map_err(db_error)?;
        self.flush()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(db_error)?;
        self.latch
            .sync(|| self.log.sync_data())
            .map_err(|e| StoreError::Database(format!("log sync: {e}")))
    }

    /// sled's flush writes out every dirty page: its log is its data.
    fn write_out(&self, _within: Duration) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Tree for sled::Tree {
    type Bytes = IVec;

    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        sled::Tree::get(self, key).map_err(db_error)
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        sled::Tree::insert(self, key, value)
            .map(drop)
            .map_err(db_error)
    }

    fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        sled::Tree::remove(self, key).map(drop).map_err(db_error)
    }

    fn keys_between(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<IVec>, StoreError> {
        self.range(start..end)
            .keys()
            .take(limit)
            .collect::<Result<_, _>>()
            .map_err(db_error)
    }

    fn entries(&self) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        self.iter().map(|entry| entry.map_err(db_error))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut change = sled::Batch::default();
        for (key, value) in batch.changes {
            match value {
                Some(value) => change.insert(key, value),
                None => change.remove(key),
            }
        }
        self.apply_batch(change).map_err(db_error)
    }
}
