//! [`Database`] on fjall 2: one keyspace at `store.path`, a partition per tree, and a
//! `meta` partition for the layout mark and the secret's fingerprint.
//!
//! Write order. fjall has one journal per keyspace, shared by every partition: a write
//! (or a batch) takes the journal's lock, gets the next sequence number, is appended to
//! the journal and then to its partition's memtable, all under that lock
//! (`PartitionHandle::insert`, `Batch::commit`). Before a memtable is sealed to become
//! a table on disk, the journal is fsynced and rotated (`rotate_memtable`, under the
//! same lock), so no table holds a write the journal on disk lacks. Recovery replays
//! the journals in order and cuts the last one at its first incomplete batch
//! (`RecoveryMode::TolerateCorruptTail`, the default). What survives a crash is
//! therefore a prefix of the writes, across all partitions, as [`super`] needs. (A
//! batch whose checksum does not match stops the open with an error instead of being
//! cut: fjall 2.11's `JournalBatchReader`; a kill cannot cause it, as the kernel keeps
//! what was written, only a disk that tears or corrupts a sector.)
//!
//! Durability. With `manual_journal_persist` (set on the keyspace for batches and on
//! each partition for single writes: a partition's default hands every write to the
//! kernel at once, a `write(2)` each) a write stays in the journal's 8 KiB buffer in
//! the process until [`Database::flush`], a journal rotation or a full buffer hands it
//! to the kernel; only the first two sync it. So `flush` durability costs one
//! fdatasync per group commit, as with sled. `Keyspace::persist(SyncData)` would hold
//! the journal's lock through the fdatasync, so that no request could write meanwhile
//! and each flush would cover only the writes made before it (on the benchmark, 12 k
//! instead of 16 k ops/s at half the CPU); [`Database::flush`] takes the lock only to
//! hand the buffer over (`PersistMode::Buffer`) and fdatasyncs the journal file itself
//! ([`JournalSync`]), while requests go on writing. fjall's own defaults (neither
//! `manual_journal_persist` nor `fsync_ms`) hand every write to the kernel at once and
//! fsync only at a journal rotation, so a power loss could take any amount of recent
//! writes; `relaxed` sets `fsync_ms` to 500 instead: a background thread persists the
//! journal every 500 ms (holding its lock through that fsync), the window sled's
//! `relaxed` has.
//!
//! Memory. The block cache is `store.cache_capacity_mb`; each partition's memtable is
//! sealed at [`MEMTABLE_BYTES`] and all of them together are held to
//! [`WRITE_BUFFER_BYTES`]; journals are rotated (their memtables flushed) beyond
//! [`JOURNAL_BYTES`] on disk. fjall stores a partition's options (memtable size,
//! `manual_journal_persist`) when it creates the partition and keeps those: a change
//! here applies to new databases only.
//!
//! fjall 2 does not lock its directory, so [`FjallDb`] holds an exclusive `flock` on
//! it: a second process opening the same `store.path` is refused, as sled refuses it.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fjall::{Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode, Slice};
use nix::fcntl::{Flock, FlockArg};
use nix::libc;

use super::background::lower_priority;
use super::kv::{Batch, Database, SyncLatch, Tree, open_error};
use crate::config::Durability;
use crate::store::StoreError;

/// A partition's memtable is sealed and written out as a table at this size.
pub const MEMTABLE_BYTES: u32 = 8 * 1024 * 1024;
/// All memtables together, sealed ones waiting for their flush included. Their nodes
/// and keys take two to three times what fjall counts here. 8 MiB, against 16: 13 %
/// more requests a second on the mixed load (five rounds, each ahead) and 79–90 MiB
/// instead of 105–111 after a verify load on 800 k codes
/// (BENCHMARKS.md, "Stop 24").
pub const WRITE_BUFFER_BYTES: u64 = 8 * 1024 * 1024;
/// Journals on disk before the oldest one's memtables are flushed (fjall's default).
/// fjall counts a sealed journal at its file's length, at least the 32 MiB it
/// preallocates however little was written, and its monitor flushes a partition every
/// 250 ms while the sealed journals pass half this. At 64 MiB that was after the first
/// sealed journal, so the monitor rotated the journal four times a second, each time
/// with three fsyncs under the journal lock that every write waits on: the mixed p99
/// was 3.7–4.2 ms against 2.9–3.6 ms at 512 (BENCHMARKS.md, "Stop 17").
pub const JOURNAL_BYTES: u64 = 512 * 1024 * 1024;
/// Sealed memtables one wake-up of fjall's flush thread may write out (its
/// `flush_workers`: the tasks it takes per wake-up; it starts a thread per partition
/// among them, six at most here). fjall 2.11.2 wakes it once per partition with
/// recovered memtables at start-up, and once per rotation after, but with its default
/// of one task per wake-up (cores − 1) a start after a large journal left tasks no
/// wake-up would take: the write buffer stayed full and every write halted for good
/// (`.ci/bench janitor` on fjall, 1 M codes, hung at its restart). Taking every queued
/// task (up to 32) at each wake-up drains such a backlog at the next rotation. (Each
/// flushed partition also wakes the compaction thread this many times, to find nothing
/// to do but once.)
const FLUSH_TASKS_PER_WAKEUP: usize = 32;
/// How often `relaxed` durability persists the journal in the background.
const RELAXED_FSYNC_MS: u16 = 500;
/// The partition holding the layout mark and the secret's fingerprint.
const META: &str = "meta";

/// The ids of this process's threads.
fn thread_ids() -> BTreeSet<libc::id_t> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return BTreeSet::new();
    };
    tasks
        .flatten()
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

fn db_error(e: fjall::Error) -> StoreError {
    match e {
        // fjall logs the I/O error itself, and answers every later write with this.
        fjall::Error::Poisoned => StoreError::Database(
            "fjall refuses writes since writing its journal failed (its log line says why)".into(),
        ),
        e => StoreError::Database(e.to_string()),
    }
}

/// A fjall keyspace, the lock on its directory, and its journal's fdatasync.
#[derive(Clone)]
pub struct FjallDb {
    keyspace: Keyspace,
    sync: Arc<JournalSync>,
    _lock: Arc<Flock<File>>,
}

/// fdatasyncs the active journal outside fjall's journal lock.
///
/// fjall 2 keeps its journals as `journals/<id>` in the keyspace directory and writes
/// to the highest id; a rotation syncs the old file before it creates the next one.
/// So after `persist(Buffer)` the writes made before it are in the newest journal, or
/// in an older one that its rotation already synced: syncing the newest file found
/// afterwards makes them durable.
struct JournalSync {
    dir: PathBuf,
    /// The newest journal's id and file, reopened when a rotation makes another.
    newest: Mutex<Option<(u64, File)>>,
    /// Fails every flush after one whose sync failed.
    latch: SyncLatch,
}

impl JournalSync {
    fn sync(&self) -> std::io::Result<()> {
        self.latch.sync(|| self.sync_newest())
    }

    fn sync_newest(&self) -> std::io::Result<()> {
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        // A rotation names the next journal id + 1 (fjall's `Writer::rotate`), so the
        // folder is listed only when that file appears, not on every flush; or when
        // the file held is gone: fjall deletes a journal once its writes are in
        // tables, and after two rotations between flushes id + 1 may be gone too.
        let rotated = match newest.as_ref() {
            Some((id, file)) => {
                self.dir.join((id + 1).to_string()).try_exists()? || file.metadata()?.nlink() == 0
            }
            None => true,
        };
        if rotated {
            let id = self.newest_id()?;
            *newest = Some((id, File::open(self.dir.join(id.to_string()))?));
        }
        newest.as_ref().map_or(Ok(()), |(_, file)| file.sync_data())
    }

    fn newest_id(&self) -> std::io::Result<u64> {
        let mut newest_id = None;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|name| name.parse::<u64>().ok()) {
                newest_id = newest_id.max(Some(id));
            }
        }
        newest_id.ok_or_else(|| std::io::Error::other("no journal found"))
    }
}

impl Database for FjallDb {
    type Tree = FjallTree;

    const ENGINE: &'static str = "fjall";

    fn open(
        path: &Path,
        cache_capacity_mb: u64,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let at = |e: &dyn std::fmt::Display| open_error(path, e);
        std::fs::create_dir_all(path).map_err(|e| at(&e))?;
        let dir = File::open(path).map_err(|e| at(&e))?;
        let lock = Flock::lock(dir, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| at(&format!("locked by another process ({errno})")))?;
        let config = fjall::Config::new(path)
            .cache_size(cache_capacity_mb * 1024 * 1024)
            .max_write_buffer_size(WRITE_BUFFER_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .flush_workers(FLUSH_TASKS_PER_WAKEUP)
            .manual_journal_persist(true)
            .fsync_ms((durability == Durability::Relaxed).then_some(RELAXED_FSYNC_MS));
        // fjall's `flusher`, `compactor`s and `monitor` (which rotates journals) run in
        // the background; the threads they start for a flush inherit the priority. By
        // id, not by name: a thread names itself once it runs, which may be after
        // `Config::open` returns.
        let before = thread_ids();
        let keyspace = config.open().map_err(|e| at(&e))?;
        lower_priority(thread_ids().difference(&before));
        Ok(FjallDb {
            keyspace,
            sync: Arc::new(JournalSync {
                dir: path.join("journals"),
                newest: Mutex::new(None),
                latch: SyncLatch::default(),
            }),
            _lock: Arc::new(lock),
        })
    }

    fn owns(path: &Path) -> bool {
        // fjall's marker file, written when a keyspace is created, and its journals.
        path.join("version").is_file() && path.join("journals").is_dir()
    }

    fn meta(&self) -> Result<FjallTree, StoreError> {
        self.open_tree(META)
    }

    fn is_fresh(&self) -> Result<bool, StoreError> {
        let only_meta = self.keyspace.list_partitions().iter().all(|p| &**p == META);
        Ok(only_meta && self.meta()?.partition.is_empty().map_err(db_error)?)
    }

    fn open_tree(&self, name: &str) -> Result<FjallTree, StoreError> {
        let options = PartitionCreateOptions::default()
            .max_memtable_size(MEMTABLE_BYTES)
            .manual_journal_persist(true);
        Ok(FjallTree {
            partition: self
                .keyspace
                .open_partition(name, options)
                .map_err(db_error)?,
            keyspace: self.keyspace.clone(),
        })
    }

    fn has_tree(&self, name: &str) -> bool {
        self.keyspace.partition_exists(name)
    }

    /// fjall marks the partition deleted with a synced file before it returns, and
    /// removes its folder once the last handle is dropped.
    fn drop_tree(&self, name: &str) -> Result<(), StoreError> {
        let partition = self.open_tree(name)?.partition;
        self.keyspace.delete_partition(partition).map_err(db_error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.keyspace
            .persist(PersistMode::Buffer)
            .map_err(db_error)?;
        self.sync
            .sync()
            .map_err(|e| StoreError::Database(format!("journal sync: {e}")))
    }

    /// Seals every partition's memtable (each seal rotates the journal) and waits for
    /// fjall's flush thread to make them tables and delete the journals they came
    /// from, until only the new, empty journal is left. After a fill of 1 M codes, a
    /// start that replayed the journals peaked at 119 MiB, against 61 MiB with nothing
    /// to replay (BENCHMARKS.md, "Stop 24"). `rotate_memtable` is
    /// doc(hidden) in fjall 2.11 (its tests use it), hence the exact version.
    fn write_out(&self, within: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + within;
        for name in self.keyspace.list_partitions() {
            self.open_tree(&name)?
                .partition
                .rotate_memtable()
                .map_err(db_error)?;
        }
        while self.keyspace.journal_count() > 1 {
            if Instant::now() > deadline {
                return Err(StoreError::Database(format!(
                    "{} journals still to replay at the next start: their tables were \
                     not written within {within:?}",
                    self.keyspace.journal_count() - 1
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// A fjall partition, and its keyspace for batches.
pub struct FjallTree {
    keyspace: Keyspace,
    partition: PartitionHandle,
}

impl Tree for FjallTree {
    type Bytes = Slice;

    fn get(&self, key: &[u8]) -> Result<Option<Slice>, StoreError> {
        self.partition.get(key).map_err(db_error)
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.partition.insert(key, value).map_err(db_error)
    }

    fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        self.partition.remove(key).map_err(db_error)
    }

    fn keys_between(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Slice>, StoreError> {
        self.partition
            .range(start..end)
            .take(limit)
            .map(|entry| entry.map(|(key, _)| key).map_err(db_error))
            .collect()
    }

    fn entries(&self) -> impl Iterator<Item = Result<(Slice, Slice), StoreError>> + '_ {
        self.partition.iter().map(|entry| entry.map_err(db_error))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut change = self.keyspace.batch();
        for (key, value) in batch.changes {
            match value {
                Some(value) => change.insert(&self.partition, key, value),
                None => change.remove(&self.partition, key),
            }
        }
        change.commit().map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::background::{BACKGROUND_NICE, nice_of};

    /// The journal each flush syncs, by id.
    fn synced_id(db: &FjallDb) -> Option<u64> {
        let newest = db.sync.newest.lock().unwrap();
        newest.as_ref().map(|(id, _)| *id)
    }

    #[test]
    fn fjall_background_threads_run_at_a_lower_priority() {
        let before = thread_ids();
        let dir = tempfile::tempdir().unwrap();
        let _db = FjallDb::open(dir.path(), 4, Durability::Flush).unwrap();
        // Other tests start threads meanwhile; fjall's own are at least a flusher, a
        // compactor and the monitor.
        let lowered = thread_ids()
            .difference(&before)
            .filter(|&&tid| nice_of(tid) == BACKGROUND_NICE)
            .count();
        assert!(lowered >= 3, "{lowered} threads at nice {BACKGROUND_NICE}");
    }

    /// A database in `dir` whose first journal has a flushed write, filled past its
    /// memtables (each sealed one rotates the journal) until `rotations` more journals
    /// came, without a flush; with the first journal's id.
    fn rotated(dir: &tempfile::TempDir, rotations: u64) -> (FjallDb, u64) {
        let db = FjallDb::open(dir.path(), 4, Durability::Flush).unwrap();
        let tree = db.open_tree("t").unwrap();
        tree.insert(b"first", b"value").unwrap();
        db.flush().unwrap();
        let first = synced_id(&db).unwrap();
        let value = vec![7u8; 64 * 1024];
        let mut key = 0u32;
        while db.sync.newest_id().unwrap() < first + rotations {
            tree.insert(&key.to_be_bytes(), &value).unwrap();
            key += 1;
            assert!(key < 20_000, "the journal did not rotate {rotations} times");
        }
        (db, first)
    }

    #[test]
    fn after_a_write_out_the_next_open_replays_nothing_and_reads_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = FjallDb::open(dir.path(), 4, Durability::Flush).unwrap();
            let (tokens, expiry) = (
                db.open_tree("tokens").unwrap(),
                db.open_tree("expiry").unwrap(),
            );
            for key in 0..1000u32 {
                tokens.insert(&key.to_be_bytes(), b"record").unwrap();
                expiry.insert(&key.to_be_bytes(), b"").unwrap();
            }
            tokens.remove(&7u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
            db.write_out(Duration::from_secs(30)).unwrap();
            assert_eq!(db.keyspace.journal_count(), 1);
        }
        let db = FjallDb::open(dir.path(), 4, Durability::Flush).unwrap();
        assert_eq!(
            db.keyspace.write_buffer_size(),
            0,
            "the open replayed writes"
        );
        let (tokens, expiry) = (
            db.open_tree("tokens").unwrap(),
            db.open_tree("expiry").unwrap(),
        );
        assert_eq!(tokens.entries().count(), 999);
        assert_eq!(expiry.entries().count(), 1000);
        assert!(tokens.get(&7u32.to_be_bytes()).unwrap().is_none());
        assert_eq!(
            &*tokens.get(&8u32.to_be_bytes()).unwrap().unwrap(),
            b"record"
        );
    }

    #[test]
    fn a_flush_after_a_journal_rotation_syncs_the_new_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (db, first) = rotated(&dir, 1);
        db.flush().unwrap();
        assert_eq!(synced_id(&db), Some(db.sync.newest_id().unwrap()));
        assert!(synced_id(&db).unwrap() > first);
    }

    /// Two rotations between flushes, and fjall deletes both older journals once
    /// their memtables are tables: id + 1 of the journal held never appears, and the
    /// next flush must still find the newest.
    #[test]
    fn a_flush_after_two_rotations_and_their_deletion_syncs_the_new_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (db, first) = rotated(&dir, 2);
        let journal = |id: u64| db.sync.dir.join(id.to_string());
        let deadline = Instant::now() + Duration::from_secs(30);
        while journal(first).exists() || journal(first + 1).exists() {
            assert!(Instant::now() < deadline, "fjall kept the flushed journals");
            std::thread::sleep(Duration::from_millis(20));
        }
        db.flush().unwrap();
        assert_eq!(synced_id(&db), Some(db.sync.newest_id().unwrap()));
    }
}
