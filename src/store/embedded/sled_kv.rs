//! [`Database`] on sled 0.34: a sled tree per tree, the default tree for metadata.
//!
//! sled keeps a page per 16 keys or fewer and metadata for every page, so each key per
//! code costs memory and each write costs CPU. sled recovers a prefix of its log (it
//! replays the log in order and stops at the first torn message), which is the write
//! order [`super`] relies on; it flushes every 500 ms on its own, which is all the
//! durability `relaxed` gets.

use std::path::Path;

use sled::IVec;

use super::kv::{Batch, Database, Tree};
use crate::config::Durability;
use crate::store::StoreError;

fn db_error(e: sled::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A sled database.
#[derive(Clone)]
pub struct SledDb(sled::Db);

impl Database for SledDb {
    type Tree = sled::Tree;

    const ENGINE: &'static str = "sled";

    fn open(path: &Path, cache_capacity_mb: u64, _: Durability) -> Result<Self, StoreError> {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_mb * 1024 * 1024)
            .open()
            .map(SledDb)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))
    }

    fn owns(path: &Path) -> bool {
        path.join("conf").is_file() && path.join("db").is_file()
    }

    fn meta(&self) -> Result<sled::Tree, StoreError> {
        Ok(sled::Tree::clone(&self.0))
    }

    fn is_fresh(&self) -> Result<bool, StoreError> {
        Ok(self.0.tree_names().len() == 1 && self.0.is_empty())
    }

    fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.0.open_tree(name).map_err(db_error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.0.flush().map(drop).map_err(db_error)
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

    fn first_key(&self) -> Result<Option<IVec>, StoreError> {
        Ok(sled::Tree::first(self)
            .map_err(db_error)?
            .map(|(key, _)| key))
    }

    fn values(&self) -> impl Iterator<Item = Result<IVec, StoreError>> + '_ {
        self.iter().values().map(|value| value.map_err(db_error))
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
