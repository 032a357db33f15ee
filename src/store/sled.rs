//! The embedded storage engine: sled.
//!
//! Trees:
//! - `otp`: token 0x00 digest → [`CodeRecord`]; the key proves the code, the value never
//!   holds it.
//! - `tokens`: token → [`TokenRecord`] (live code, wrong guesses, lock, sends).
//! - `recipients`: `channel:address` → [`RecipientRecord`] (sends, for the rate limit).
//! - `expiry`: big-endian due time, kind, subject → empty; one entry per record that the
//!   janitor must revisit, so it reads due items in time order without scanning.
//! - `references`: provider delivery id → `otp` key, to file status webhooks.
//! - `failovers`: big-endian due time, delivery reference → [`PendingFailover`]; the
//!   `messages` backend's SMS still to send, in deadline order. Only
//!   `put_failover` and `take_due_failovers` touch it (reading `references` and `otp`).
//!
//! Each operation is one sled transaction over these trees, then waits for a shared
//! flush ([`GroupCommit`]) before it returns.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::{IVec, Transactional};

use super::group_commit::GroupCommit;
use super::{DueFailovers, NewCode, PurgeReport, Store, StoreError, TokenStatus, decode, encode};
use crate::code::{DIGEST_LEN, Digest};
use crate::config::{Durability, StoreConfig};
use crate::rules::{
    self, CodeRecord, CodeState, DeliveryEvent, Limits, Millis, PendingFailover, RecipientRecord,
    Refusal, TokenRecord, VerifyOutcome,
};

type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

/// The `otp` key of a code: token, 0x00, digest.
fn code_key(token: &str, digest: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(token.len() + 1 + DIGEST_LEN);
    key.extend_from_slice(token.as_bytes());
    key.push(0);
    key.extend_from_slice(&digest.0);
    key
}

/// Splits an `otp` key back into token and digest.
fn split_code_key(key: &[u8]) -> Option<(&[u8], Digest)> {
    let split = key.len().checked_sub(DIGEST_LEN + 1)?;
    let digest = Digest(key[split + 1..].try_into().ok()?);
    Some((&key[..split], digest))
}

/// A record that keeps one entry in the expiry index at the time it is next due.
trait Indexed: Serialize + DeserializeOwned {
    /// Expiry-index kind byte.
    const KIND: u8;
    /// When the janitor must come back for the record; `None`: no entry.
    fn due(&self, limits: &Limits) -> Option<Millis>;
    fn indexed_at(&mut self) -> &mut Option<Millis>;
}

impl Indexed for CodeRecord {
    const KIND: u8 = b'c';
    fn due(&self, limits: &Limits) -> Option<Millis> {
        Some(self.due_at(limits))
    }
    fn indexed_at(&mut self) -> &mut Option<Millis> {
        &mut self.indexed_at
    }
}

impl Indexed for TokenRecord {
    const KIND: u8 = b't';
    fn due(&self, limits: &Limits) -> Option<Millis> {
        self.purge_at(limits)
    }
    fn indexed_at(&mut self) -> &mut Option<Millis> {
        &mut self.indexed_at
    }
}

impl Indexed for RecipientRecord {
    const KIND: u8 = b'r';
    fn due(&self, limits: &Limits) -> Option<Millis> {
        Some(self.purge_at(limits))
    }
    fn indexed_at(&mut self) -> &mut Option<Millis> {
        &mut self.indexed_at
    }
}

fn expiry_key(due: Millis, kind: u8, subject: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + subject.len());
    key.extend_from_slice(&due.to_be_bytes());
    key.push(kind);
    key.extend_from_slice(subject);
    key
}

fn split_expiry_key(key: &[u8]) -> Option<(Millis, u8, &[u8])> {
    let due = Millis::from_be_bytes(key.get(..8)?.try_into().ok()?);
    Some((due, *key.get(8)?, &key[9..]))
}

/// The `failovers` key: big-endian due time, then the delivery reference.
fn failover_key(failover: &PendingFailover) -> Vec<u8> {
    let mut key = failover.due_at.to_be_bytes().to_vec();
    key.extend(failover.reference.as_bytes());
    key
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// The trees of one transaction.
struct Tx<'a> {
    codes: &'a TransactionalTree,
    tokens: &'a TransactionalTree,
    recipients: &'a TransactionalTree,
    expiry: &'a TransactionalTree,
    references: &'a TransactionalTree,
    limits: &'a Limits,
}

impl Tx<'_> {
    fn get<R: DeserializeOwned>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<R>> {
        tree.get(key)?
            .map(|bytes| decode(&bytes))
            .transpose()
            .map_err(abort)
    }

    /// Reads a record whose expiry entry the janitor just consumed.
    fn take_due<R: Indexed>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<R>> {
        let mut record: Option<R> = Self::get(tree, key)?;
        if let Some(record) = &mut record {
            *record.indexed_at() = None;
        }
        Ok(record)
    }

    /// Moves the record's expiry entry to its new due time, then writes it.
    fn put<R: Indexed>(
        &self,
        tree: &TransactionalTree,
        key: &[u8],
        record: &mut R,
    ) -> TxResult<()> {
        let due = record.due(self.limits);
        self.reindex::<R>(key, *record.indexed_at(), due)?;
        *record.indexed_at() = due;
        tree.insert(key, encode(record))?;
        Ok(())
    }

    /// Deletes the record and its expiry entry.
    fn delete<R: Indexed>(
        &self,
        tree: &TransactionalTree,
        key: &[u8],
        record: &mut R,
    ) -> TxResult<()> {
        self.reindex::<R>(key, *record.indexed_at(), None)?;
        tree.remove(key)?;
        Ok(())
    }

    fn reindex<R: Indexed>(
        &self,
        subject: &[u8],
        old: Option<Millis>,
        new: Option<Millis>,
    ) -> TxResult<()> {
        if old != new {
            if let Some(due) = old {
                self.expiry.remove(expiry_key(due, R::KIND, subject))?;
            }
            if let Some(due) = new {
                self.expiry.insert(expiry_key(due, R::KIND, subject), &[])?;
            }
        }
        Ok(())
    }

    /// Deletes a code, its expiry entry and its delivery reference; returns whether it
    /// was live.
    fn delete_code(&self, key: &[u8], mut code: CodeRecord) -> TxResult<bool> {
        self.delete(self.codes, key, &mut code)?;
        if let Some(reference) = &code.delivery.reference {
            self.references.remove(reference.as_bytes())?;
        }
        Ok(code.state == CodeState::Pending)
    }

    /// Writes a token record, or deletes it when nothing keeps it any more.
    fn put_or_purge_token(
        &self,
        token: &[u8],
        mut record: TokenRecord,
        now: Millis,
    ) -> TxResult<bool> {
        match record.purge_at(self.limits) {
            Some(at) if at <= now => {
                self.delete(self.tokens, token, &mut record)?;
                Ok(true)
            }
            _ => {
                self.put(self.tokens, token, &mut record)?;
                Ok(false)
            }
        }
    }
}

/// The sled storage engine.
pub struct SledStore {
    db: sled::Db,
    codes: sled::Tree,
    tokens: sled::Tree,
    recipients: sled::Tree,
    expiry: sled::Tree,
    references: sled::Tree,
    failovers: sled::Tree,
    limits: Limits,
    commit: Option<GroupCommit>,
    live: AtomicU64,
}

fn db_error(e: sled::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => db_error(e),
    }
}

/// At most `batch` keys of a tree keyed by big-endian due time, due by `now`.
fn due_keys(tree: &sled::Tree, now: Millis, batch: usize) -> Result<Vec<IVec>, StoreError> {
    let end = (now + 1).to_be_bytes();
    tree.range(..end.as_slice())
        .keys()
        .take(batch)
        .collect::<Result<_, _>>()
        .map_err(db_error)
}

impl SledStore {
    /// Opens (or creates) the database; must run inside a tokio runtime.
    pub fn open(config: &StoreConfig, limits: Limits) -> Result<Self, StoreError> {
        let db = Self::open_db(&config.path, config.cache_capacity_mb)?;
        let tree = |name: &str| db.open_tree(name).map_err(db_error);
        let store = Self {
            codes: tree("otp")?,
            tokens: tree("tokens")?,
            recipients: tree("recipients")?,
            expiry: tree("expiry")?,
            references: tree("references")?,
            failovers: tree("failovers")?,
            limits,
            commit: (config.durability == Durability::Flush)
                .then(|| GroupCommit::start(db.clone())),
            live: AtomicU64::new(0),
            db,
        };
        store.live.store(store.count_live()?, Ordering::Relaxed);
        Ok(store)
    }

    fn open_db(path: &Path, cache_capacity_mb: u64) -> Result<sled::Db, StoreError> {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_mb * 1024 * 1024)
            .open()
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))
    }

    /// Counts pending codes once at start-up; afterwards every operation adjusts it.
    fn count_live(&self) -> Result<u64, StoreError> {
        let mut live = 0;
        for entry in self.codes.iter() {
            let (_, value) = entry.map_err(db_error)?;
            if decode::<CodeRecord>(&value)?.state == CodeState::Pending {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Runs `f` as one transaction over all trees (retried by sled on conflict).
    fn transact<T>(&self, f: impl Fn(&Tx) -> TxResult<T>) -> Result<T, StoreError> {
        (
            &self.codes,
            &self.tokens,
            &self.recipients,
            &self.expiry,
            &self.references,
        )
            .transaction(|(codes, tokens, recipients, expiry, references)| {
                f(&Tx {
                    codes,
                    tokens,
                    recipients,
                    expiry,
                    references,
                    limits: &self.limits,
                })
            })
            .map_err(tx_error)
    }

    /// Applies a change to the live count (one per code leaving or entering pending).
    fn adjust_live(&self, delta: i64) {
        if delta >= 0 {
            self.live.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            // Saturating: a count is never worth a panic.
            let _ = self
                .live
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(delta.unsigned_abs()))
                });
        }
    }

    /// Waits for the shared flush, unless durability is relaxed.
    async fn durable(&self) -> Result<(), StoreError> {
        match &self.commit {
            Some(commit) => commit.commit().await,
            None => Ok(()),
        }
    }

    /// Handles one due expiry entry; returns (records purged, codes expired, live delta).
    fn purge_entry(&self, entry: &[u8], now: Millis) -> Result<(u64, u64, i64), StoreError> {
        let Some((_, kind, subject)) = split_expiry_key(entry) else {
            self.expiry.remove(entry).map_err(db_error)?;
            return Ok((0, 0, 0));
        };
        self.transact(|tx| {
            // Consume the entry; a record that stays is put back under its next due time.
            // The entry may already be gone if a request moved it since the scan.
            if tx.expiry.remove(entry)?.is_none() {
                return Ok((0, 0, 0));
            }
            match kind {
                CodeRecord::KIND => self.purge_code(tx, subject, now),
                TokenRecord::KIND => match Tx::take_due::<TokenRecord>(tx.tokens, subject)? {
                    Some(record) => Ok((tx.put_or_purge_token(subject, record, now)?.into(), 0, 0)),
                    None => Ok((0, 0, 0)),
                },
                RecipientRecord::KIND => {
                    match Tx::take_due::<RecipientRecord>(tx.recipients, subject)? {
                        Some(record) if record.purge_at(&self.limits) <= now => {
                            tx.recipients.remove(subject)?;
                            Ok((1, 0, 0))
                        }
                        Some(mut record) => {
                            tx.put(tx.recipients, subject, &mut record)?;
                            Ok((0, 0, 0))
                        }
                        None => Ok((0, 0, 0)),
                    }
                }
                _ => Ok((0, 0, 0)),
            }
        })
    }

    /// A code's entry is due: expire it if pending, purge it once past retain, and let
    /// its token go when nothing else keeps it.
    fn purge_code(&self, tx: &Tx, key: &[u8], now: Millis) -> TxResult<(u64, u64, i64)> {
        let Some(mut code) = Tx::take_due::<CodeRecord>(tx.codes, key)? else {
            return Ok((0, 0, 0));
        };
        if code.state == CodeState::Pending && code.expires_at <= now {
            code.state = CodeState::Expired;
            tx.put(tx.codes, key, &mut code)?;
            return Ok((0, 1, -1));
        }
        if code.due_at(&self.limits) > now {
            tx.put(tx.codes, key, &mut code)?;
            return Ok((0, 0, 0));
        }
        tx.delete_code(key, code)?;
        let mut purged = 1;
        if let Some((token, digest)) = split_code_key(key)
            && let Some(mut record) = Tx::get::<TokenRecord>(tx.tokens, token)?
            && record.live == Some(digest)
        {
            record.live = None;
            purged += u64::from(tx.put_or_purge_token(token, record, now)?);
        }
        Ok((purged, 0, 0))
    }
}

/// Runs blocking work from async code: through `block_in_place` on a multi-thread
/// runtime (the daemon's), inline elsewhere (tests and tools on a current-thread one).
fn off_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

impl SledStore {
    /// One janitor batch, synchronously: see [`Store::purge_due`].
    fn purge_batch(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError> {
        let due = due_keys(&self.expiry, now, batch)?;
        let mut report = PurgeReport::default();
        let mut live_delta = 0;
        for entry in &due {
            let (purged, expired, delta) = self.purge_entry(entry, now)?;
            report.purged += purged;
            report.expired += expired;
            live_delta += delta;
        }
        self.adjust_live(live_delta);
        report.next_due = self
            .expiry
            .first()
            .map_err(db_error)?
            .and_then(|(key, _)| split_expiry_key(&key).map(|(due, _, _)| due));
        Ok(report)
    }
}

#[async_trait]
impl Store for SledStore {
    async fn create(&self, new: &NewCode, now: Millis) -> Result<Result<(), Refusal>, StoreError> {
        let key = code_key(&new.token, &new.digest);
        let token = new.token.as_bytes();
        let result = self.transact(|tx| {
            let mut recipients = Vec::with_capacity(new.recipients.len());
            for address in &new.recipients {
                let record: Option<RecipientRecord> = Tx::get(tx.recipients, address.as_bytes())?;
                recipients.push(record.unwrap_or_default());
            }
            let token_record = Tx::get(tx.tokens, token)?;
            let plan =
                match rules::plan_create(token_record, &mut recipients, new.digest, now, tx.limits)
                {
                    Ok(plan) => plan,
                    Err(refusal) => return Ok(Err(refusal)),
                };
            let mut live_delta = 1;
            if let Some(old) = plan.replaced {
                let old_key = code_key(&new.token, &old);
                if let Some(old_code) = Tx::get::<CodeRecord>(tx.codes, &old_key)?
                    && tx.delete_code(&old_key, old_code)?
                {
                    live_delta -= 1;
                }
            }
            let mut code = CodeRecord::new(new.created_at, new.expires_at, new.channels.clone());
            tx.put(tx.codes, &key, &mut code)?;
            let mut token_record = plan.token;
            tx.put(tx.tokens, token, &mut token_record)?;
            for (address, mut record) in new.recipients.iter().zip(recipients) {
                tx.put(tx.recipients, address.as_bytes(), &mut record)?;
            }
            Ok(Ok(live_delta))
        })?;
        // Durable with confirm_delivery or discard, whichever follows the delivery.
        Ok(result.map(|delta| self.adjust_live(delta)))
    }

    async fn discard(&self, token: &str, digest: &Digest) -> Result<(), StoreError> {
        let key = code_key(token, digest);
        let was_live = self.transact(|tx| {
            let Some(code) = Tx::get::<CodeRecord>(tx.codes, &key)? else {
                return Ok(false);
            };
            let was_live = tx.delete_code(&key, code)?;
            if let Some(mut record) = Tx::get::<TokenRecord>(tx.tokens, token.as_bytes())?
                && record.live == Some(*digest)
            {
                record.live = None;
                tx.put(tx.tokens, token.as_bytes(), &mut record)?;
            }
            Ok(was_live)
        })?;
        if was_live {
            self.adjust_live(-1);
        }
        self.durable().await
    }

    async fn confirm_delivery(
        &self,
        token: &str,
        digest: &Digest,
        reference: Option<&str>,
    ) -> Result<(), StoreError> {
        if let Some(reference) = reference {
            let key = code_key(token, digest);
            self.transact(|tx| {
                if let Some(mut code) = Tx::get::<CodeRecord>(tx.codes, &key)? {
                    code.delivery.reference = Some(reference.to_owned());
                    tx.put(tx.codes, &key, &mut code)?;
                    tx.references.insert(reference.as_bytes(), key.as_slice())?;
                }
                Ok(())
            })?;
        }
        self.durable().await
    }

    async fn record_delivery_event(
        &self,
        reference: &str,
        event: DeliveryEvent,
    ) -> Result<bool, StoreError> {
        let found = self.transact(|tx| {
            let Some(key) = tx.references.get(reference.as_bytes())? else {
                return Ok(false);
            };
            let Some(mut code) = Tx::get::<CodeRecord>(tx.codes, &key)? else {
                return Ok(false);
            };
            code.delivery.push(event.clone());
            tx.put(tx.codes, &key, &mut code)?;
            Ok(true)
        })?;
        if found {
            self.durable().await?;
        }
        Ok(found)
    }

    async fn verify(
        &self,
        token: &str,
        digest: &Digest,
        now: Millis,
    ) -> Result<VerifyOutcome, StoreError> {
        let key = code_key(token, digest);
        let (outcome, live_delta, wrote) = self.transact(|tx| {
            let token_record: Option<TokenRecord> = Tx::get(tx.tokens, token.as_bytes())?;
            let probed = Tx::get(tx.codes, &key)?;
            let plan = rules::plan_verify(token_record, probed, now, tx.limits);
            let mut live_delta = 0;
            let wrote = plan.code.is_some() || plan.token.is_some();
            if let Some(mut code) = plan.code {
                live_delta -= 1;
                tx.put(tx.codes, &key, &mut code)?;
            }
            if let Some(mut record) = plan.token {
                if plan.invalidate_live
                    && let Some(live) = record.live
                {
                    let live_key = code_key(token, &live);
                    if let Some(mut code) = Tx::get::<CodeRecord>(tx.codes, &live_key)?
                        && rules::finish_pending(&mut code, CodeState::Locked, now)
                    {
                        live_delta -= 1;
                        tx.put(tx.codes, &live_key, &mut code)?;
                    }
                }
                tx.put(tx.tokens, token.as_bytes(), &mut record)?;
            }
            Ok((plan.outcome, live_delta, wrote))
        })?;
        self.adjust_live(live_delta);
        if wrote {
            self.durable().await?;
        }
        Ok(outcome)
    }

    async fn cancel(&self, token: &str, now: Millis) -> Result<bool, StoreError> {
        let cancelled = self.transact(|tx| {
            let Some(record) = Tx::get::<TokenRecord>(tx.tokens, token.as_bytes())? else {
                return Ok(false);
            };
            let Some(live) = record.live else {
                return Ok(false);
            };
            let key = code_key(token, &live);
            let Some(mut code) = Tx::get::<CodeRecord>(tx.codes, &key)? else {
                return Ok(false);
            };
            let cancelled = rules::finish_pending(&mut code, CodeState::Cancelled, now);
            if cancelled {
                tx.put(tx.codes, &key, &mut code)?;
            }
            Ok(cancelled)
        })?;
        if cancelled {
            self.adjust_live(-1);
            self.durable().await?;
        }
        Ok(cancelled)
    }

    async fn status(&self, token: &str) -> Result<Option<TokenStatus>, StoreError> {
        let record: Option<TokenRecord> = self
            .tokens
            .get(token.as_bytes())
            .map_err(db_error)?
            .map(|bytes: IVec| decode(&bytes))
            .transpose()?;
        let Some(record) = record else {
            return Ok(None);
        };
        let Some(live) = record.live else {
            return Ok(None);
        };
        let code = self
            .codes
            .get(code_key(token, &live))
            .map_err(db_error)?
            .map(|bytes| decode::<CodeRecord>(&bytes))
            .transpose()?;
        Ok(code.map(|code| TokenStatus {
            code,
            attempts: record.attempts,
            locked_until: record.locked_until,
        }))
    }

    async fn purge_due(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError> {
        // A batch is up to `batch` synchronous sled transactions (~150 ms for 1,000
        // under load on the benchmark machine). Run on a runtime worker, it stalls the
        // requests queued behind it; block_in_place hands them to another worker first
        // (BENCHMARKS.md, "Janitor at scale").
        off_worker(|| self.purge_batch(now, batch))
    }

    async fn put_failover(&self, failover: &PendingFailover) -> Result<(), StoreError> {
        let key = failover_key(failover);
        self.failovers
            .insert(key, encode(failover))
            .map_err(db_error)?;
        self.durable().await
    }

    async fn take_due_failovers(
        &self,
        now: Millis,
        batch: usize,
    ) -> Result<DueFailovers, StoreError> {
        let keys = due_keys(&self.failovers, now, batch)?;
        let mut taken = DueFailovers::default();
        for key in keys {
            let outcome = (&self.codes, &self.references, &self.failovers)
                .transaction(|(codes, references, failovers)| {
                    let Some(failover) = Tx::get::<PendingFailover>(failovers, &key)? else {
                        return Ok(None);
                    };
                    failovers.remove(&key)?;
                    let code = match references.get(failover.reference.as_bytes())? {
                        Some(code_key) => Tx::get::<CodeRecord>(codes, &code_key)?,
                        None => None,
                    };
                    let verdict = rules::failover_verdict(code.as_ref(), now);
                    Ok(Some((failover, verdict)))
                })
                .map_err(tx_error)?;
            taken.due.extend(outcome);
        }
        if !taken.due.is_empty() {
            self.durable().await?;
        }
        taken.next_due = self
            .failovers
            .first()
            .map_err(db_error)?
            .and_then(|(key, _)| key.get(..8)?.try_into().ok().map(u64::from_be_bytes));
        Ok(taken)
    }

    fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await.map(|_| ()).map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OtpConfig;
    use crate::rules::FailoverVerdict;

    fn failover(token: &str, due_at: Millis) -> PendingFailover {
        PendingFailover {
            reference: format!("uuid-{token}"),
            due_at,
            token: token.into(),
            to: "393331234567".into(),
            sealed_text: vec![1, 2, 3],
        }
    }

    #[tokio::test]
    async fn failovers_are_taken_once_in_deadline_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            path: dir.path().join("db"),
            ..StoreConfig::default()
        };
        let limits = Limits::from(&OtpConfig::default());
        let store = SledStore::open(&config, limits).unwrap();
        store.put_failover(&failover("late", 2_000)).await.unwrap();
        store.put_failover(&failover("early", 1_000)).await.unwrap();
        let none = store.take_due_failovers(999, 10).await.unwrap();
        assert!(none.due.is_empty());
        assert_eq!(none.next_due, Some(1_000));
        let taken = store.take_due_failovers(1_000, 10).await.unwrap();
        assert_eq!(
            taken.due,
            vec![(failover("early", 1_000), FailoverVerdict::Gone)]
        );
        assert_eq!(taken.next_due, Some(2_000));
        let again = store.take_due_failovers(1_500, 10).await.unwrap();
        assert!(again.due.is_empty(), "taken once");
    }
}
