//! The embedded storage engine, on sled or fjall ([`kv`] is all it asks of them).
//!
//! Trees, each written one key at a time (no transactions, see [`KeyLocks`]; only the
//! claim of due failovers is one atomic batch). A token, a recipient or a delivery
//! reference is keyed by its 12-byte [short key](short_keys), never by itself, and the
//! trees are named for the layout that keys them so ([`layout`], which also moves a
//! database of the layout before):
//! - `tokens`: token → [`TokenState`]: the token's record and its one code, and while
//!   a resend's delivery is unsettled the code it replaced. A code is stored only as
//!   its digest (`TokenRecord::current`), never in the clear.
//! - `expiry`: big-endian due time, token → empty: when the janitor must next look at a
//!   token, so it reads due tokens in time order without scanning.
//! - `recipients`: big-endian start of a send-window-long bucket, `channel:address` →
//!   [`RecipientRecord`]: a recipient's sends in that bucket, for the rate limit. A
//!   create reads the current bucket and the one before (together they cover the
//!   window) and writes the current one; a bucket two windows old holds nothing that
//!   counts, so the janitor deletes it from the front. The tree is its own expiry index.
//! - `references`: provider delivery id → token, to file status webhooks: every id of
//!   the token's code, and of the code a resend replaced for as long as the token keeps
//!   it (the person may only have that one; its reports still count).
//! - `failovers`: big-endian due time, delivery reference → [`PendingFailover`]; the
//!   `messages` backend's SMS still to send, in deadline order.
//!
//! Each key per code costs memory and each write costs CPU (sled most: a page and its
//! metadata per 16 keys or fewer); a create writes four keys, a verify one.
//!
//! An operation locks the keys it touches, reads, asks [`crate::rules`], writes, and
//! then waits for a shared flush ([`GroupCommit`]) before it returns. An answer drawn
//! from a record without writing (409 already verified, a duplicate status report, a
//! refusal, `status`) waits for a flush too: the record may hold another request's
//! write that is not yet on disk, and an answer must not outlive a crash that the
//! state it reports would not. Writes go in an
//! order whose every prefix is harmless, because both engines recover a prefix of
//! their writes across all trees: sled replays its one log in order and stops at the
//! first torn message; fjall writes every partition's changes to one journal, under
//! one lock and in sequence-number order, fsyncs it before any memtable becomes a
//! table on disk, and replays it in order, cutting it at the first incomplete batch
//! ([`fjall_kv`]). So an expiry entry goes before its token (an entry without a token
//! is dropped when due), and a reference before the token that names it (a reference
//! whose code does not answer to it is passed over).
//!
//! The expiry index is lazy: a token keeps the due time of its one live entry
//! (`indexed_at`) and gets a new entry only when it becomes due *sooner*. When it
//! becomes due later (a verified code is kept `retain` longer), the janitor visits at
//! the old time and files it again, so a verify writes one key. Entries a sooner one
//! replaced are recognised by their time and dropped.

mod background;
pub mod fjall_kv;
mod group_commit;
mod key_locks;
pub mod kv;
mod layout;
mod purge;
mod short_keys;
pub mod sled_kv;
mod timed;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::kv::{Batch, Database, Tree};
use super::{
    DueFailovers, Filed, NewCode, PurgeReport, ReplacedCode, Store, StoreError, TokenStatus,
    decode, decode_with_extra, encode, encode_with_extra,
};
use crate::code::Digest;
use crate::config::{Durability, Engine, StoreConfig};
use crate::rules::{
    self, CodeRecord, CodeState, DeliveryEvent, FailoverVerdict, Limits, Millis, PendingFailover,
    RecipientRecord, Refusal, TokenRecord, VerifyOutcome,
};
use crate::secret::ServerSecret;
use group_commit::GroupCommit;
use key_locks::KeyLocks;
use short_keys::{KeyHasher, ShortKey};
use timed::{Floor, timed_key};

/// Key in the metadata tree holding the server secret's [fingerprint](ServerSecret::fingerprint).
const SECRET_CHECK_KEY: &[u8] = b"secret-check";
/// How long a stop waits for the engine to write out what its journal holds
/// ([`Database::write_out`]): 8 MiB of memtables take about a second here, and
/// systemd allows the whole stop 60 s (`systemd/otpd.service`).
const WRITE_OUT_WITHIN: Duration = Duration::from_secs(30);

/// What the `tokens` tree keeps for a token.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct TokenState {
    record: TokenRecord,
    /// The code `record.current` names: present exactly when that is `Some`.
    code: Option<CodeRecord>,
    /// The due time of the token's live entry in the expiry index, if any.
    indexed_at: Option<Millis>,
    /// The code a resend replaced, until its delivery settles; its references stay
    /// filed as long, and go with it (a lookup passes over it once it no longer takes
    /// reports). Stored behind the rest
    /// ([`super::encode_with_extra`]), so records of earlier builds read as they are.
    #[serde(skip)]
    replaced: Option<ReplacedCode>,
}

impl TokenState {
    /// The code whose delivery carries `reference`: the token's code, or the code a
    /// resend replaced while it [takes reports](ReplacedCode::takes_reports).
    fn code_delivered_as(&mut self, reference: &str) -> Option<&mut CodeRecord> {
        let live = self.code.as_ref();
        let takes = (self.replaced.as_ref()).is_some_and(|old| old.takes_reports(live));
        let replaced = (self.replaced.as_mut().filter(|_| takes)).map(|old| &mut old.code);
        (self.code.as_mut().into_iter().chain(replaced)).find(|code| code.delivered_as(reference))
    }

    /// The code a resend replaced, if `digest` is its digest and it stands in.
    fn standing_in(&self, digest: &Digest, now: Millis) -> Option<&ReplacedCode> {
        self.replaced
            .as_ref()
            .filter(|old| old.digest == *digest && old.stands_in(self.code.as_ref(), now))
    }

    /// Takes the code away (discarded, replaced or purged); returns it.
    fn remove_code(&mut self) -> Option<CodeRecord> {
        self.record.current = None;
        self.code.take()
    }

    /// When the janitor must next look: at the code's expiry, then `retain` later to
    /// purge it; without a code, when the lock and the send window are over.
    fn due(&self, limits: &Limits) -> Option<Millis> {
        match &self.code {
            Some(code) => Some(code.due_at(limits)),
            None => self.record.purge_at(limits),
        }
    }
}

/// The embedded engine for `path` when `store.engine` is unset: sled for a sled
/// database (sled was the default until fjall served 1.5 × its durable load in a
/// quarter of its memory at 1 M codes, README.md "The fjall engine"), fjall for
/// anything else, a new database included.
pub fn engine_at(path: &Path) -> Engine {
    if sled_kv::SledDb::owns(path) {
        Engine::Sled
    } else {
        Engine::Fjall
    }
}

/// Refuses `path` if it holds the database of an engine other than `D`, naming it,
/// before `D` writes anything there.
fn refuse_other_engines<D: Database>(path: &Path) -> Result<(), StoreError> {
    let engines = [
        (sled_kv::SledDb::ENGINE, sled_kv::SledDb::owns(path)),
        (fjall_kv::FjallDb::ENGINE, fjall_kv::FjallDb::owns(path)),
    ];
    match engines
        .into_iter()
        .find(|&(engine, owns)| owns && engine != D::ENGINE)
    {
        Some((engine, _)) => Err(StoreError::Database(format!(
            "{}: holds a {engine} database, and store.engine is \"{}\"; set \
             store.engine = \"{engine}\" to use it, or point store.path elsewhere",
            path.display(),
            D::ENGINE
        ))),
        None => Ok(()),
    }
}

/// The embedded storage engine on database `D`.
pub struct EmbeddedStore<D: Database> {
    meta: D::Tree,
    tokens: D::Tree,
    expiry: D::Tree,
    recipients: D::Tree,
    references: D::Tree,
    failovers: D::Tree,
    keys: KeyHasher,
    locks: KeyLocks,
    limits: Limits,
    commit: Option<GroupCommit>,
    live: AtomicU64,
    /// Codes a create replaced after their expiry, before a janitor pass marked them
    /// expired: the next pass counts them ([`EmbeddedStore::purge`]).
    expired_unreported: AtomicU64,
    /// Where the scans for what is due in `expiry`, `recipients` and `failovers` start.
    expiry_floor: Floor,
    recipients_floor: Floor,
    failovers_floor: Floor,
    db: D,
}

/// The embedded engine on sled (`store.engine = "sled"`).
pub type SledStore = EmbeddedStore<sled_kv::SledDb>;

/// The embedded engine on fjall (`store.engine = "fjall"`).
pub type FjallStore = EmbeddedStore<fjall_kv::FjallDb>;

impl<D: Database> EmbeddedStore<D> {
    /// Opens (or creates) the database; must run inside a tokio runtime. Refuses a
    /// directory that holds another engine's database, before touching it, and one
    /// whose files open empty, unless the server secret was `drawn` at this start: the
    /// secret is kept only once the store is open, so a first start cut short leaves
    /// such files and no secret.
    pub fn open(config: &StoreConfig, limits: Limits, drawn: bool) -> Result<Self, StoreError> {
        refuse_other_engines::<D>(&config.path)?;
        let existed = D::owns(&config.path);
        let db = D::open(&config.path, config.cache_capacity_mb, config.durability)?;
        let meta = db.meta()?;
        let keys = layout::open(&db, &meta, &config.path, drawn || !existed)?;
        let store = Self {
            tokens: db.open_tree(layout::TOKENS)?,
            expiry: db.open_tree(layout::EXPIRY)?,
            recipients: db.open_tree(layout::RECIPIENTS)?,
            references: db.open_tree(layout::REFERENCES)?,
            failovers: db.open_tree(layout::FAILOVERS)?,
            meta,
            keys,
            locks: KeyLocks::default(),
            limits,
            commit: (config.durability == Durability::Flush).then(|| {
                GroupCommit::start({
                    let db = db.clone();
                    move || db.flush()
                })
            }),
            live: AtomicU64::new(0),
            expired_unreported: AtomicU64::new(0),
            expiry_floor: Floor::default(),
            recipients_floor: Floor::default(),
            failovers_floor: Floor::default(),
            db,
        };
        store.live.store(store.count_live()?, Ordering::Relaxed);
        Ok(store)
    }

    /// Refuses a server secret other than the one the stored codes were made with: no
    /// code would match its digest, and each right code typed would count as a wrong
    /// guess until its token locked. Records the secret's fingerprint in a database
    /// without codes, and in one of a build before this check (no fingerprint yet)
    /// whose secret was read (not `drawn` at this start): that is taken as its own.
    /// `path` and `secret_file` name the database and the secret in the refusal.
    pub fn check_secret(
        &self,
        secret: &ServerSecret,
        drawn: bool,
        path: &Path,
        secret_file: &Path,
    ) -> Result<(), StoreError> {
        let fingerprint = secret.fingerprint();
        let holds_codes = || -> Result<bool, StoreError> {
            Ok(self.tokens.entries().next().transpose()?.is_some()
                || self.failovers.entries().next().transpose()?.is_some())
        };
        let refuse = |why: &str| {
            Err(StoreError::Database(format!(
                "{}: holds codes made with another server secret than {}{why}; restore \
                 the secret file this database was used with, or move the database away \
                 to start afresh (its codes are then lost)",
                path.display(),
                secret_file.display()
            )))
        };
        let missing = ", which was missing (a new one was drawn, and is not kept)";
        match self.meta.get(SECRET_CHECK_KEY)? {
            Some(stored) if *stored == *fingerprint.as_bytes() => Ok(()),
            Some(_) if holds_codes()? => refuse(if drawn { missing } else { "" }),
            None if drawn && holds_codes()? => refuse(missing),
            _ => self.meta.insert(SECRET_CHECK_KEY, fingerprint.as_bytes()),
        }
    }

    /// Counts pending codes once at start-up; afterwards every operation adjusts it.
    /// A record that cannot be read is not counted, and does not stop the start: its
    /// token's requests fail alone (and the janitor logs its key).
    fn count_live(&self) -> Result<u64, StoreError> {
        let (mut live, mut unreadable) = (0, 0);
        for entry in self.tokens.entries() {
            match decode::<TokenState>(&entry?.1) {
                Ok(state) => {
                    live += u64::from(state.code.is_some_and(|c| c.state == CodeState::Pending));
                }
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::error!(unreadable, "token records this build cannot read");
        }
        Ok(live)
    }

    /// Waits for the shared flush, unless durability is relaxed: after a write, and
    /// before answering from a record read (see the module doc).
    async fn wait_durable(&self) -> Result<(), StoreError> {
        match &self.commit {
            Some(commit) => commit.commit().await,
            None => Ok(()),
        }
    }

    fn read_token(&self, token: &ShortKey) -> Result<Option<TokenState>, StoreError> {
        let Some(bytes) = self.tokens.get(token)? else {
            return Ok(None);
        };
        let (mut state, replaced): (TokenState, _) = decode_with_extra(&bytes)?;
        state.replaced = replaced;
        Ok(Some(state))
    }

    /// Writes a token's state, first giving it an expiry entry if it is due sooner than
    /// the one it has (or has none).
    fn write_token(&self, token: &ShortKey, state: &mut TokenState) -> Result<(), StoreError> {
        if let Some(due) = state.due(&self.limits)
            && state.indexed_at.is_none_or(|at| due < at)
        {
            self.expiry_floor.insert(&self.expiry, due, token, &[])?;
            state.indexed_at = Some(due);
        }
        let bytes = encode_with_extra(state, state.replaced.as_ref());
        self.tokens.insert(token, &bytes)?;
        Ok(())
    }

    /// The start of the send-window bucket holding `at`.
    fn bucket(&self, at: Millis) -> Millis {
        at - at % self.limits.send_window.max(1)
    }

    /// A recipient's sends that may still be in the window at `now`: those of the
    /// current bucket and the one before.
    fn read_recipient(
        &self,
        address: &ShortKey,
        now: Millis,
    ) -> Result<RecipientRecord, StoreError> {
        let current = self.bucket(now);
        let mut sends = Vec::new();
        for bucket in [current.checked_sub(self.limits.send_window), Some(current)] {
            let Some(bucket) = bucket else { continue };
            if let Some(bytes) = self.recipients.get(&timed_key(bucket, address))? {
                sends.extend(decode::<RecipientRecord>(&bytes)?.sends);
            }
        }
        Ok(RecipientRecord { sends })
    }

    /// Writes the sends of the current bucket; earlier ones stay in their own.
    fn write_recipient(
        &self,
        address: &ShortKey,
        record: RecipientRecord,
        now: Millis,
    ) -> Result<(), StoreError> {
        let current = self.bucket(now);
        let sends = record.sends.into_iter().filter(|&t| t >= current).collect();
        let record = encode(&RecipientRecord { sends });
        self.recipients_floor
            .insert(&self.recipients, current, address, &record)
    }

    /// Drops the lookup entries of a code that is gone (every id it was delivered as).
    fn forget_references(&self, code: Option<&CodeRecord>) -> Result<(), StoreError> {
        for reference in code.iter().flat_map(|code| code.delivery.references()) {
            self.references.remove(&self.keys.short(reference))?;
        }
        Ok(())
    }

    /// Files a code that is `token`'s again (a resend undone) under every id it was
    /// delivered as. They stay filed while a resend replaces it, but an earlier build
    /// dropped them at the resend, and a crash can cut a confirm short after dropping
    /// them: filing them again costs little and brings those back.
    fn file_references(
        &self,
        code: Option<&CodeRecord>,
        token: &ShortKey,
    ) -> Result<(), StoreError> {
        for reference in code.iter().flat_map(|code| code.delivery.references()) {
            self.file_reference(reference, token)?;
        }
        Ok(())
    }

    /// Files `token`'s code under `reference`, for the provider's status reports.
    fn file_reference(&self, reference: &str, token: &ShortKey) -> Result<(), StoreError> {
        self.references.insert(&self.keys.short(reference), token)
    }

    /// Where `failover` is filed in `failovers`: its due time, then its reference's key.
    fn failover_key(&self, failover: &PendingFailover) -> Vec<u8> {
        timed_key(failover.due_at, &self.keys.short(&failover.reference))
    }

    /// The verdict on a failover from its token's record: one read, so the token's code
    /// and the code a resend replaced are seen as of one instant.
    fn judge(
        &self,
        failover: &PendingFailover,
        now: Millis,
    ) -> Result<FailoverVerdict, StoreError> {
        let state = self.read_token(&self.keys.short(&failover.token))?;
        let (code, replaced) = state.as_ref().map_or((None, None), |state| {
            (state.code.as_ref(), state.replaced.as_ref())
        });
        Ok(super::judge_failover(
            &failover.reference,
            code,
            replaced,
            now,
        ))
    }

    /// The key of the token whose code was delivered as `reference` (the code may be
    /// gone since).
    fn token_delivered_as(&self, reference: &str) -> Result<Option<ShortKey>, StoreError> {
        let Some(token) = self.references.get(&self.keys.short(reference))? else {
            return Ok(None);
        };
        let token = ShortKey::try_from(&*token)
            .map_err(|_| StoreError::Corrupt(format!("reference to a {}-byte key", token.len())))?;
        Ok(Some(token))
    }

    /// The create itself, under the locks of its token and recipients (`new`'s, by
    /// their keys); returns the change in live codes.
    fn create_locked(
        &self,
        new: &NewCode,
        token: &ShortKey,
        addresses: &[ShortKey],
        now: Millis,
    ) -> Result<Result<i64, Refusal>, StoreError> {
        let mut state = self.read_token(token)?.unwrap_or_default();
        let mut recipients = (addresses.iter())
            .map(|address| self.read_recipient(address, now))
            .collect::<Result<Vec<_>, _>>()?;
        let record = std::mem::take(&mut state.record);
        let plan = match rules::plan_create(
            Some(record),
            &mut recipients,
            new.digest,
            now,
            &self.limits,
        ) {
            Ok(plan) => plan,
            Err(refusal) => return Ok(Err(refusal)),
        };
        for (address, record) in addresses.iter().zip(recipients) {
            self.write_recipient(address, record, now)?;
        }
        state.record = plan.token;
        let code = CodeRecord::new(new.created_at, new.expires_at, new.channels.clone());
        let mut replaced = state.code.replace(code);
        let replaced_live = replaced.as_ref().is_some_and(CodeRecord::is_pending);
        // A pending code replaced after its expiry, before a janitor pass came by, has
        // expired all the same: it is kept (while the resend is on its way) as expired,
        // so that neither a failed resend, which puts it back, nor a pass counts it again.
        let expired_unseen = replaced.as_mut().is_some_and(|old| old.mark_expired(now));
        let replaced = plan
            .replaced
            .zip(replaced)
            .map(|(digest, code)| ReplacedCode { digest, code });
        // The code kept with the token keeps its references (its reports still count);
        // the one dropped, a resend on its way or the code kept so far, loses them
        // first, as update_token orders it.
        let dropped = if ReplacedCode::keeps_standing_in(state.replaced.as_ref(), replaced.as_ref())
        {
            replaced
        } else {
            std::mem::replace(&mut state.replaced, replaced)
        };
        self.forget_references(dropped.as_ref().map(|old| &old.code))?;
        self.write_token(token, &mut state)?;
        if expired_unseen {
            self.expired_unreported.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(1 - i64::from(replaced_live)))
    }

    /// The verify itself, under the token's lock: the outcome and the change in live
    /// codes, or `None` when the token has no record at all.
    fn verify_locked(
        &self,
        token: &ShortKey,
        digest: &Digest,
        now: Millis,
    ) -> Result<Option<(VerifyOutcome, i64)>, StoreError> {
        let Some(mut state) = self.read_token(token)? else {
            return Ok(None);
        };
        // The token's code, or the code a resend replaced while it stands in.
        let (probed, stand_in) = if state.record.current == Some(*digest) {
            (state.code.clone(), false)
        } else {
            let old = state.standing_in(digest, now).map(|old| old.code.clone());
            let stand_in = old.is_some();
            (old, stand_in)
        };
        let plan = rules::plan_verify(Some(state.record.clone()), probed, now, &self.limits);
        let wrote = plan.code.is_some() || plan.token.is_some();
        let mut live_delta = 0;
        let mut dropped = None;
        if let Some(code) = plan.code {
            live_delta -= 1;
            if stand_in {
                // The replaced code verified: it is the token's code again, and the new
                // one, never confirmed delivered, is the pending code this verify ends.
                dropped = state.code.take();
                state.replaced = None;
            }
            state.code = Some(code);
        }
        if let Some(mut record) = plan.token {
            if plan.invalidate_live
                && let Some(code) = &mut state.code
                && rules::finish_pending(code, CodeState::Locked, now)
            {
                live_delta -= 1;
            }
            if dropped.is_some() {
                record.current = Some(*digest);
            }
            state.record = record;
        }
        if wrote {
            // References first, as update_token files them.
            if dropped.is_some() {
                self.forget_references(dropped.as_ref())?;
                self.file_references(state.code.as_ref(), token)?;
            }
            self.write_token(token, &mut state)?;
        }
        Ok(Some((plan.outcome, live_delta)))
    }

    /// Changes the token's state under its lock with `change`, which says whether to
    /// write; returns what `change` returned. `file` then files or forgets the
    /// references the change calls for, still under the lock, and before the token is
    /// written: a crash in between leaves at most a reference naming a code that does
    /// not answer to it, which lookups pass over, never a code it keeps without its
    /// reference. Only a code the change drops can lose its references first (a crash
    /// then leaves it unreported until it goes, or [`Self::file_references`] brings
    /// them back), so that none is left naming nothing for good.
    fn update_token<T>(
        &self,
        token: &ShortKey,
        change: impl FnOnce(&mut TokenState) -> Option<T>,
        file: impl FnOnce(&T) -> Result<(), StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let _held = self.locks.lock(&[token]);
        let Some(mut state) = self.read_token(token)? else {
            return Ok(None);
        };
        let Some(result) = change(&mut state) else {
            return Ok(None);
        };
        file(&result)?;
        self.write_token(token, &mut state)?;
        Ok(Some(result))
    }
}

#[async_trait]
impl<D: Database> Store for EmbeddedStore<D> {
    async fn create(&self, new: &NewCode, now: Millis) -> Result<Result<(), Refusal>, StoreError> {
        let token = self.keys.short(&new.token);
        let addresses: Vec<_> = new.recipients.iter().map(|r| self.keys.short(r)).collect();
        let result = {
            let mut locked = vec![&token[..]];
            locked.extend(addresses.iter().map(|a| &a[..]));
            let _held = self.locks.lock(&locked);
            self.create_locked(new, &token, &addresses, now)?
        };
        match result {
            // Waited on by confirm_delivery or discard, whichever follows the delivery;
            // its flush starts now, so that the code is on disk while it is on its way
            // to its person (a crash then would lose a code that arrives after all).
            Ok(delta) => {
                super::adjust_live(&self.live, delta);
                if let Some(commit) = &self.commit {
                    commit.hasten();
                }
                Ok(Ok(()))
            }
            Err(refusal) => {
                self.wait_durable().await?;
                Ok(Err(refusal))
            }
        }
    }

    async fn discard(&self, token: &str, digest: &Digest) -> Result<(), StoreError> {
        let token = &self.keys.short(token);
        let settled = self.update_token(
            token,
            |state| {
                let undelivered = state.record.current == Some(*digest)
                    && state.code.as_ref().is_some_and(CodeRecord::is_pending);
                undelivered.then(|| {
                    let restored = state.replaced.take();
                    let removed = state.remove_code();
                    if let Some(old) = &restored {
                        state.record.current = Some(old.digest);
                        state.code = Some(old.code.clone());
                    }
                    (removed, restored.map(|old| old.code))
                })
            },
            |(removed, restored)| {
                self.forget_references(removed.as_ref())?;
                self.file_references(restored.as_ref(), token)
            },
        )?;
        if let Some((_, restored)) = settled {
            let back = restored.as_ref().is_some_and(CodeRecord::is_pending);
            super::adjust_live(&self.live, i64::from(back) - 1);
        }
        self.wait_durable().await
    }

    async fn confirm_delivery(
        &self,
        token: &str,
        digest: &Digest,
        reference: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let token = &self.keys.short(token);
        let filed = self.update_token(
            token,
            |state| {
                let code = state
                    .code
                    .as_mut()
                    .filter(|_| state.record.current == Some(*digest))?;
                code.delivery.reference = Some(reference.to_owned());
                let counts = super::still_counts(code, now);
                // The new code went out: only it counts now, and only its reports.
                let dropped = state.replaced.take();
                Some((counts, dropped))
            },
            |(_, dropped)| {
                self.forget_references(dropped.as_ref().map(|old| &old.code))?;
                self.file_reference(reference, token)
            },
        )?;
        self.wait_durable().await?;
        Ok(filed.is_some_and(|(counts, _)| counts))
    }

    async fn record_delivery_event(
        &self,
        reference: &str,
        event: DeliveryEvent,
    ) -> Result<Filed, StoreError> {
        let Some(token) = self.token_delivered_as(reference)? else {
            return Ok(Filed::UnknownReference);
        };
        let new_reference = event.new_reference().map(str::to_owned);
        let added = self.update_token(
            &token,
            |state| Some(state.code_delivered_as(reference)?.delivery.push(event)),
            // On a retry too: a first try may have failed between the id and the event.
            |_| match &new_reference {
                Some(new_reference) => self.file_reference(new_reference, &token),
                None => Ok(()),
            },
        )?;
        let filed = match added {
            None => Filed::UnknownReference,
            Some(true) => Filed::Recorded,
            Some(false) => Filed::AlreadyRecorded,
        };
        self.wait_durable().await?;
        Ok(filed)
    }

    async fn verify(
        &self,
        token: &str,
        digest: &Digest,
        now: Millis,
    ) -> Result<VerifyOutcome, StoreError> {
        let verified = {
            let token = self.keys.short(token);
            let _held = self.locks.lock(&[&token]);
            self.verify_locked(&token, digest, now)?
        };
        let Some((outcome, live_delta)) = verified else {
            return Ok(VerifyOutcome::NotFound);
        };
        super::adjust_live(&self.live, live_delta);
        self.wait_durable().await?;
        Ok(outcome)
    }

    async fn cancel(&self, token: &str, now: Millis) -> Result<bool, StoreError> {
        let cancelled = self.update_token(
            &self.keys.short(token),
            |state| {
                let code = state.code.as_mut()?;
                rules::finish_pending(code, CodeState::Cancelled, now).then_some(())
            },
            |()| Ok(()),
        )?;
        if cancelled.is_some() {
            super::adjust_live(&self.live, -1);
        }
        self.wait_durable().await?;
        Ok(cancelled.is_some())
    }

    async fn status(&self, token: &str) -> Result<Option<TokenStatus>, StoreError> {
        let Some(TokenState { record, code, .. }) = self.read_token(&self.keys.short(token))?
        else {
            return Ok(None);
        };
        self.wait_durable().await?;
        Ok(Some(TokenStatus {
            code,
            token: record,
        }))
    }

    async fn purge_due(&self, now: Millis, batch: usize) -> Result<PurgeReport, StoreError> {
        self.purge(now, batch)
    }

    async fn put_failover(&self, failover: &PendingFailover) -> Result<(), StoreError> {
        let (due_at, reference) = (failover.due_at, self.keys.short(&failover.reference));
        self.failovers_floor
            .insert(&self.failovers, due_at, &reference, &encode(failover))?;
        self.wait_durable().await
    }

    async fn claim_due_failovers(
        &self,
        now: Millis,
        claim_until: Millis,
        batch: usize,
    ) -> Result<DueFailovers, StoreError> {
        let mut handed_out = DueFailovers::default();
        let due = self.failovers_floor.due(&self.failovers, now, batch)?;
        for key in &due.keys {
            let Some(bytes) = self.failovers.get(key)? else {
                continue;
            };
            let mut change = Batch::default();
            change.remove(key.to_vec());
            let Some(failover) = super::readable_failover(&bytes) else {
                self.failovers.apply(change)?;
                continue;
            };
            let judged = self.judge(&failover, now);
            let step = super::claim_step(failover, judged, now, claim_until)?;
            if let Some(again) = &step.refiled {
                let key = self.failover_key(again);
                change.insert(key, encode(again));
            }
            self.failovers.apply(change)?;
            if let Some(again) = &step.refiled {
                self.failovers_floor.lower(again.due_at);
            }
            handed_out.due.extend(step.handed_out);
        }
        self.failovers_floor.raise(due);
        if !handed_out.due.is_empty() {
            self.wait_durable().await?;
        }
        handed_out.next_due = self.failovers_floor.first_due(&self.failovers)?;
        Ok(handed_out)
    }

    async fn judge_failover(
        &self,
        failover: &PendingFailover,
        now: Millis,
    ) -> Result<FailoverVerdict, StoreError> {
        self.judge(failover, now)
    }

    async fn finish_failover(&self, claimed: &PendingFailover) -> Result<(), StoreError> {
        self.failovers.remove(&self.failover_key(claimed))
    }

    fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            db.flush()?;
            // Durable already: a write-out cut short only makes the next start longer.
            if let Err(error) = db.write_out(WRITE_OUT_WITHIN) {
                tracing::warn!(%error, "the next start replays the journal");
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.meta.get(layout::LAYOUT_KEY)?;
        self.wait_durable().await
    }

    /// Only a shared flush can tell: with `relaxed` durability the engine syncs in the
    /// background, and its failure shows as failed writes (README.md, "How it works").
    async fn failed_for_good(&self) -> String {
        match &self.commit {
            Some(commit) => commit.failed_for_good().await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fjall_kv::FjallDb;
    use super::sled_kv::SledDb;
    use super::*;
    use crate::config::OtpConfig;
    use crate::rules::DeliveryEvent;

    /// A provider's status report `status` at `at`, naming no channel.
    fn report(status: &str, at: Millis) -> DeliveryEvent {
        DeliveryEvent {
            at,
            status: status.into(),
            channel: None,
            detail: None,
        }
    }

    fn failover(token: &str, due_at: Millis) -> PendingFailover {
        PendingFailover {
            reference: format!("uuid-{token}"),
            due_at,
            token: token.into(),
            to: "393331234567".into(),
            sealed_text: vec![1, 2, 3],
        }
    }

    fn open<D: Database>(dir: &tempfile::TempDir, limits: Limits) -> EmbeddedStore<D> {
        let config = StoreConfig {
            path: dir.path().join("db"),
            ..StoreConfig::default()
        };
        EmbeddedStore::open(&config, limits, false).unwrap()
    }

    fn is_empty(tree: &impl Tree) -> bool {
        tree.entries().next().is_none()
    }

    fn len(tree: &impl Tree) -> usize {
        tree.entries().count()
    }

    const LIMITS: Limits = Limits {
        max_attempts: 3,
        lock: 60_000,
        retain: 1_000,
        max_sends: 5,
        send_window: 10_000,
        resend_cooldown: 0,
    };

    fn new_code(token: &str, digest: u8, created_at: Millis, expires_at: Millis) -> NewCode {
        NewCode {
            token: token.into(),
            digest: Digest([digest; crate::code::DIGEST_LEN]),
            recipients: vec![format!("sms:{token}")],
            channels: vec![rules::Channel::Sms],
            created_at,
            expires_at,
        }
    }

    async fn purge<D: Database>(
        store: &EmbeddedStore<D>,
        now: Millis,
    ) -> (u64, u64, Option<Millis>) {
        let report = store.purge_due(now, 100).await.unwrap();
        (report.purged, report.expired, report.next_due)
    }

    /// A code for `token`, valid from 0 to 5 s, delivered as `reference`.
    async fn delivered<D: Database>(
        store: &EmbeddedStore<D>,
        token: &str,
        reference: &str,
    ) -> NewCode {
        let new = new_code(token, 1, 0, 5_000);
        store.create(&new, 0).await.unwrap().unwrap();
        assert!(
            store
                .confirm_delivery(token, &new.digest, reference, 0)
                .await
                .unwrap()
        );
        new
    }

    /// A pending code a create replaced after its expiry, before a janitor pass came by,
    /// expired all the same: the next pass counts it, once, also when the resend's
    /// delivery fails and puts it back.
    async fn a_code_replaced_after_its_expiry_counts_as_expired_once<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let mut expired = 0;
        for (token, delivered_again) in [("sent", true), ("put back", false)] {
            delivered(&store, token, &format!("uuid-{token}")).await; // expires at 5 s
            let resend = new_code(token, 9, 5_100, 50_000);
            store.create(&resend, 5_100).await.unwrap().unwrap();
            if delivered_again {
                let reference = format!("uuid-{token}-2");
                let confirm = store.confirm_delivery(token, &resend.digest, &reference, 5_100);
                assert!(confirm.await.unwrap());
            } else {
                store.discard(token, &resend.digest).await.unwrap();
            }
            expired += store.purge_due(5_200, 100).await.unwrap().expired;
        }
        assert_eq!(expired, 2, "each replaced code once");
        assert_eq!(store.live(), 1, "the resend that was sent");
        let code = store
            .status("put back")
            .await
            .unwrap()
            .unwrap()
            .code
            .unwrap();
        assert_eq!(
            code.state,
            CodeState::Expired,
            "put back as it was: expired"
        );
        expired += store.purge_due(60_000, 100).await.unwrap().expired;
        assert_eq!(expired, 3, "and the resend, at its own expiry");
    }

    async fn a_verified_code_is_filed_again_and_goes_retain_after_its_expiry<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let new = delivered(&store, "a", "uuid-0").await;
        let valid = store.verify("a", &new.digest, 100).await.unwrap();
        assert_eq!(valid, VerifyOutcome::Valid);
        assert_eq!(store.live(), 0);
        // Filed at the expiry while pending; the verify did not move the entry.
        assert_eq!(purge(&store, 4_999).await, (0, 0, Some(5_000)));
        assert_eq!(
            purge(&store, 5_000).await,
            (0, 0, Some(6_000)),
            "filed again"
        );
        let code = async || store.status("a").await.unwrap().unwrap().code;
        assert!(code().await.is_some(), "kept for retain");
        // Code purged at 6 s; the token once its 10 s send window is over; the
        // recipient's bucket (0–10 s) once everything in it left the window.
        assert_eq!(purge(&store, 6_000).await, (1, 0, Some(10_000)));
        assert!(code().await.is_none(), "the code is gone, the token stays");
        assert_eq!(purge(&store, 10_000).await, (1, 0, Some(20_000)));
        assert!(
            store.status("a").await.unwrap().is_none(),
            "the token is gone"
        );
        assert_eq!(purge(&store, 19_999).await, (0, 0, Some(20_000)));
        assert_eq!(purge(&store, 20_000).await, (1, 0, None));
        assert!(is_empty(&store.tokens) && is_empty(&store.recipients));
        assert!(is_empty(&store.expiry));
    }

    async fn answers_drawn_from_a_record_wait_for_a_flush<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(
            &dir,
            Limits {
                max_sends: 1,
                ..LIMITS
            },
        );
        let new = delivered(&store, "a", "uuid-1").await;
        // Another request's verify, written but not yet flushed.
        store
            .verify_locked(&store.keys.short("a"), &new.digest, 100)
            .unwrap();
        let flushed = || store.commit.as_ref().unwrap().durable_tickets();

        let before = flushed();
        let outcome = store.verify("a", &new.digest, 200).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified);
        assert!(
            flushed() > before,
            "409 answered before the verify was durable"
        );

        let before = flushed();
        assert!(store.status("a").await.unwrap().is_some());
        assert!(
            flushed() > before,
            "status answered from an unflushed record"
        );

        let before = flushed();
        assert!(!store.cancel("a", 300).await.unwrap());
        assert!(
            flushed() > before,
            "cancel answered from an unflushed record"
        );

        let event = report("delivered", 1);
        store
            .record_delivery_event("uuid-1", event.clone())
            .await
            .unwrap();
        let before = flushed();
        let filed = store.record_delivery_event("uuid-1", event).await.unwrap();
        assert_eq!(filed, Filed::AlreadyRecorded);
        assert!(
            flushed() > before,
            "a duplicate report answered before it was durable"
        );

        let before = flushed();
        let refused = store
            .create(&new_code("a", 2, 400, 5_000), 400)
            .await
            .unwrap();
        assert!(
            matches!(refused, Err(Refusal::RateLimited { .. })),
            "{refused:?}"
        );
        assert!(
            flushed() > before,
            "a refusal answered from an unflushed record"
        );

        let before = flushed();
        assert_eq!(
            store.verify("nobody", &new.digest, 500).await.unwrap(),
            VerifyOutcome::NotFound
        );
        assert_eq!(flushed(), before, "no record, nothing to wait for");
    }

    async fn an_undelivered_resend_puts_the_previous_code_back<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let first = delivered(&store, "a", "uuid-1").await;
        let second = new_code("a", 2, 100, 5_100);
        store.create(&second, 100).await.unwrap().unwrap();
        store.discard("a", &second.digest).await.unwrap();
        assert_eq!(store.live(), 1);
        let event = report("read", 150);
        let filed = store.record_delivery_event("uuid-1", event).await.unwrap();
        assert_eq!(filed, Filed::Recorded, "its status reports are filed again");
        let outcome = store.verify("a", &second.digest, 200).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::NotFound);
        let outcome = store.verify("a", &first.digest, 200).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);

        // A resend verified before its delivery was judged failed did arrive: it stays.
        let third = new_code("a", 3, 300, 5_300);
        store.create(&third, 300).await.unwrap().unwrap();
        let outcome = store.verify("a", &third.digest, 400).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
        store.discard("a", &third.digest).await.unwrap();
        let outcome = store.verify("a", &third.digest, 500).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified);
        assert_eq!(store.live(), 0);
    }

    async fn the_replaced_code_stands_in_until_the_resend_is_confirmed_even_across_a_crash<
        D: Database,
    >() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let first = delivered(&store, "a", "uuid-1").await;
        let second = new_code("a", 2, 100, 5_100);
        store.create(&second, 100).await.unwrap().unwrap();
        store.flush().await.unwrap();
        // The resend's delivery never settles: the daemon dies, and starts again.
        drop(store);
        let store = open::<D>(&dir, LIMITS);
        assert_eq!(
            store.live(),
            1,
            "the new code; the replaced one is no longer live"
        );
        let outcome = store.verify("a", &first.digest, 200).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid, "the code the person has");
        assert_eq!(store.live(), 0, "the new code went with it");
        let outcome = store.verify("a", &first.digest, 250).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified);
        let outcome = store.verify("a", &second.digest, 300).await.unwrap();
        assert_eq!(
            outcome,
            VerifyOutcome::NotFound,
            "one valid verify per token"
        );
        let status = store.status("a").await.unwrap().unwrap();
        assert_eq!(status.token.current, Some(first.digest));
        let filed = store.record_delivery_event("uuid-1", report("read", 350));
        assert_eq!(
            filed.await.unwrap(),
            Filed::Recorded,
            "filed again under its id"
        );

        // Once the resend is confirmed, only the new code counts.
        let third = new_code("a", 3, 400, 5_400);
        store.create(&third, 400).await.unwrap().unwrap();
        assert!(
            store
                .confirm_delivery("a", &third.digest, "uuid-3", 400)
                .await
                .unwrap()
        );
        let outcome = store.verify("a", &first.digest, 500).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::NotFound);
        let outcome = store.verify("a", &third.digest, 600).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
    }

    /// A create's flush starts before its delivery ends: nothing waits for it yet.
    async fn a_created_code_is_flushed_while_it_is_on_its_way<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let flushed = || store.commit.as_ref().unwrap().durable_tickets();
        assert_eq!(flushed(), 0);
        store
            .create(&new_code("a", 1, 0, 5_000), 0)
            .await
            .unwrap()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while flushed() == 0 {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Two resends on their way at once: the code delivered before them stands in for
    /// both, and is back when both fail.
    async fn overlapping_resends_keep_the_delivered_code<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let first = delivered(&store, "a", "uuid-1").await;
        let second = new_code("a", 2, 100, 5_100);
        store.create(&second, 100).await.unwrap().unwrap();
        let third = new_code("a", 3, 200, 5_200);
        store.create(&third, 200).await.unwrap().unwrap();
        let typo = Digest([9; crate::code::DIGEST_LEN]);
        let outcome = store.verify("a", &typo, 250).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::NotFound);
        store.discard("a", &third.digest).await.unwrap();
        store.discard("a", &second.digest).await.unwrap();
        assert_eq!(store.live(), 1);
        let outcome = store.verify("a", &first.digest, 300).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid, "the delivered code is back");

        // While both are on their way, the delivered code verifies too (and ends them).
        let delivered_b = new_code("b", 4, 400, 5_400);
        store.create(&delivered_b, 400).await.unwrap().unwrap();
        let counts = store.confirm_delivery("b", &delivered_b.digest, "uuid-4", 400);
        assert!(counts.await.unwrap());
        for (digest, at) in [(5, 500), (6, 600)] {
            let resend = new_code("b", digest, at, at + 5_000);
            store.create(&resend, at).await.unwrap().unwrap();
        }
        let outcome = store.verify("b", &delivered_b.digest, 700).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
        for digest in [5, 6] {
            let dropped = Digest([digest; crate::code::DIGEST_LEN]);
            let outcome = store.verify("b", &dropped, 800).await.unwrap();
            assert_eq!(outcome, VerifyOutcome::NotFound);
        }
        assert_eq!(store.live(), 0);
    }

    async fn a_failover_sms_is_filed_with_its_code_and_forgotten_with_it<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        delivered(&store, "a", "uuid-m").await;
        let event = |status: &str, detail: Option<&str>| DeliveryEvent {
            at: 100,
            status: status.into(),
            channel: Some("sms".into()),
            detail: detail.map(str::to_owned),
        };
        let sent = event(rules::FAILOVER_SENT, Some("uuid-s"));
        let filed = store.record_delivery_event("uuid-m", sent.clone()).await;
        assert_eq!(filed.unwrap(), Filed::Recorded);
        // A first try that failed before filing the SMS's id: the retry files it.
        store.references.remove(b"uuid-s").unwrap();
        let filed = store.record_delivery_event("uuid-m", sent).await.unwrap();
        assert_eq!(filed, Filed::AlreadyRecorded);
        let filed = store.record_delivery_event("uuid-s", event("delivered", None));
        assert_eq!(filed.await.unwrap(), Filed::Recorded);
        assert_eq!(len(&store.references), 2);
        // Expired at 5 s, purged `retain` later: both ids go with the code.
        assert_eq!(purge(&store, 5_000).await.1, 1);
        purge(&store, 6_000).await;
        assert!(is_empty(&store.references));
        let filed = store.record_delivery_event("uuid-s", event("read", None));
        assert_eq!(filed.await.unwrap(), Filed::UnknownReference);
    }

    async fn an_entry_replaced_by_a_sooner_one_is_dropped_when_due<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let first = new_code("a", 1, 0, 5_000);
        store.create(&first, 0).await.unwrap().unwrap();
        let second = new_code("a", 2, 100, 1_000);
        store.create(&second, 100).await.unwrap().unwrap();
        assert_eq!(store.live(), 1, "the second replaced the first");
        assert_eq!(purge(&store, 1_000).await, (0, 1, Some(2_000)), "expired");
        assert_eq!(purge(&store, 2_000).await, (1, 0, Some(5_000)), "purged");
        // The first code's entry is stale: it must not touch the token.
        assert_eq!(purge(&store, 5_000).await, (0, 0, Some(10_100)));
        assert_eq!(len(&store.tokens), 1, "the token stays for its send window");
        assert_eq!(purge(&store, 10_100).await, (1, 0, Some(20_000)));
        assert_eq!(purge(&store, 20_000).await, (1, 0, None));
        assert_eq!(store.live(), 0);
    }

    async fn the_recipient_limit_spans_two_buckets_and_counts_only_the_window<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_sends: 2,
            ..LIMITS
        };
        let store = open::<D>(&dir, limits);
        let create = |token: &str, now: Millis| {
            let mut new = new_code(token, 1, now, now + 5_000);
            new.recipients = vec!["sms:393331234567".into()];
            new
        };
        // Sends at 9 s and 11 s fall in the buckets 0–10 s and 10–20 s.
        assert!(
            store
                .create(&create("a", 9_000), 9_000)
                .await
                .unwrap()
                .is_ok()
        );
        assert!(
            store
                .create(&create("b", 11_000), 11_000)
                .await
                .unwrap()
                .is_ok()
        );
        let third = store.create(&create("c", 18_999), 18_999).await.unwrap();
        let refusal = Refusal::RateLimited {
            retry_after: 1,
            limit: rules::SendLimit::Count,
            reached_by: rules::LimitedBy::Recipient(0),
        };
        assert_eq!(third, Err(refusal));
        // At 19 s the 9 s send has left the 10 s window.
        assert!(
            store
                .create(&create("c", 19_000), 19_000)
                .await
                .unwrap()
                .is_ok()
        );
        assert_eq!(len(&store.recipients), 2, "one key per bucket");
    }

    #[tokio::test]
    async fn a_database_of_the_first_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // No flusher thread, which could still hold the file lock after the drop.
        let old = ::sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .unwrap();
        old.open_tree("otp")
            .unwrap()
            .insert("token", "code")
            .unwrap();
        drop(old);
        let config = StoreConfig {
            path,
            ..StoreConfig::default()
        };
        let error = SledStore::open(&config, LIMITS, false)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("another layout"), "{error}");
    }

    /// A failover whose code record cannot be read (corrupt, or from a newer otpd)
    /// waits a minute behind the others instead of holding them up.
    async fn a_failover_with_an_unreadable_code_waits_behind_the_others<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, Limits::from(&OtpConfig::default()));
        delivered(&store, "late", "uuid-late").await; // pending until 5 s
        store.put_failover(&failover("late", 2_000)).await.unwrap();
        let bad = store.keys.short("bad");
        store.tokens.insert(&bad, &[0xff, 0xff]).unwrap();
        store.file_reference("uuid-bad", &bad).unwrap();
        store.put_failover(&failover("bad", 1_000)).await.unwrap();
        let claimed = store.claim_due_failovers(2_000, 3_000, 10).await.unwrap();
        let send = FailoverVerdict::Send { expires_at: 5_000 };
        assert_eq!(claimed.due, vec![(failover("late", 3_000), send)]);
        assert_eq!(claimed.next_due, Some(3_000));
        let postponed = timed_key(62_000, &store.keys.short("uuid-bad"));
        assert!(store.failovers.get(&postponed).unwrap().is_some());
    }

    /// A failover due while a resend is on its way is judged again a second later,
    /// neither sent nor dropped: the code is back, and its failover with it, when the
    /// resend fails; once the resend is confirmed (it has its own), the failover goes.
    async fn a_failover_due_while_a_resend_is_on_its_way_waits_for_it<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        delivered(&store, "a", "uuid-a").await; // pending until 5 s
        let send = FailoverVerdict::Send { expires_at: 5_000 };
        store.put_failover(&failover("a", 1_000)).await.unwrap();
        let failing = new_code("a", 2, 900, 5_900);
        store.create(&failing, 900).await.unwrap().unwrap();
        let waiting = store.claim_due_failovers(1_000, 3_000, 10).await.unwrap();
        assert_eq!(waiting.due, vec![], "neither sent nor dropped");
        assert_eq!(waiting.next_due, Some(2_000), "judged again a second later");
        let judged = store.judge_failover(&failover("a", 2_000), 1_500).await;
        assert_eq!(judged.unwrap(), FailoverVerdict::ResendOnItsWay);
        store.discard("a", &failing.digest).await.unwrap();
        let back = store.claim_due_failovers(2_000, 3_000, 10).await.unwrap();
        assert_eq!(back.due, vec![(failover("a", 3_000), send)], "back");
        store.finish_failover(&back.due[0].0).await.unwrap();

        store.put_failover(&failover("a", 3_100)).await.unwrap();
        let confirmed = new_code("a", 3, 3_000, 8_000);
        store.create(&confirmed, 3_000).await.unwrap().unwrap();
        let waiting = store.claim_due_failovers(3_100, 9_000, 10).await.unwrap();
        assert_eq!(waiting.due, vec![]);
        let counts = store.confirm_delivery("a", &confirmed.digest, "uuid-r", 3_200);
        assert!(counts.await.unwrap());
        let gone = store.claim_due_failovers(4_100, 9_000, 10).await.unwrap();
        assert_eq!(
            gone.due,
            vec![(failover("a", 4_100), FailoverVerdict::Gone)]
        );
        assert!(is_empty(&store.failovers));
    }

    /// A report on the code a resend replaced, arriving while the resend is on its way,
    /// is filed on that code: read, it owes no failover, whether the resend then fails
    /// (the code comes back with the report) or not.
    async fn a_report_on_the_replaced_code_counts_while_the_resend_is_on_its_way<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        delivered(&store, "a", "uuid-a").await; // pending until 5 s
        store.put_failover(&failover("a", 1_000)).await.unwrap();
        let failing = new_code("a", 2, 100, 5_100);
        store.create(&failing, 100).await.unwrap().unwrap();
        let read = report("read", 200);
        let filed = store.record_delivery_event("uuid-a", read.clone()).await;
        assert_eq!(filed.unwrap(), Filed::Recorded, "on the replaced code");
        let filed = store.record_delivery_event("uuid-a", read.clone()).await;
        assert_eq!(filed.unwrap(), Filed::AlreadyRecorded, "a provider's retry");
        let status = store.status("a").await.unwrap().unwrap();
        assert_eq!(
            status.code.unwrap().delivery.events,
            vec![],
            "not on the new code"
        );
        let judged = store.judge_failover(&failover("a", 1_000), 300).await;
        assert_eq!(
            judged.unwrap(),
            FailoverVerdict::Read,
            "no resend to wait for"
        );
        store.discard("a", &failing.digest).await.unwrap();
        let status = store.status("a").await.unwrap().unwrap();
        assert_eq!(
            status.code.unwrap().delivery.events,
            vec![read],
            "back with it"
        );
        let due = store.claim_due_failovers(1_000, 3_000, 10).await.unwrap();
        assert_eq!(due.due, vec![(failover("a", 1_000), FailoverVerdict::Read)]);
    }

    /// The ids of the code a resend replaced go when the token stops keeping it: the
    /// resend confirmed, a newer create, or the janitor's purge.
    async fn the_replaced_codes_references_go_with_it<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        let read = |at| report("read", at);
        // The filed ids, of those this test delivers as (the tree holds their hashes).
        let references = || -> Vec<&str> {
            let keys: Vec<_> = store.references.entries().map(|e| e.unwrap().0).collect();
            let filed = |id: &&str| keys.iter().any(|key| **key == store.keys.short(id));
            ["uuid-1", "uuid-2", "uuid-b"]
                .into_iter()
                .filter(filed)
                .collect()
        };
        // Confirmed: only the resend's reports count.
        delivered(&store, "a", "uuid-1").await;
        let resend = new_code("a", 2, 100, 5_100);
        store.create(&resend, 100).await.unwrap().unwrap();
        assert_eq!(
            references(),
            ["uuid-1"],
            "kept while the resend is on its way"
        );
        let counts = store.confirm_delivery("a", &resend.digest, "uuid-2", 100);
        assert!(counts.await.unwrap());
        assert_eq!(references(), ["uuid-2"]);
        let filed = store.record_delivery_event("uuid-1", read(200)).await;
        assert_eq!(filed.unwrap(), Filed::UnknownReference);

        // A newer create: the resend verified before its confirm, so the code it
        // replaced stands in no more, and the next resend drops it.
        let verified = new_code("a", 3, 300, 5_300);
        store.create(&verified, 300).await.unwrap().unwrap();
        let outcome = store.verify("a", &verified.digest, 400).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
        assert_eq!(references(), ["uuid-2"]);
        let filed = store.record_delivery_event("uuid-2", read(450)).await;
        assert_eq!(
            filed.unwrap(),
            Filed::UnknownReference,
            "the resend arrived"
        );
        store
            .create(&new_code("a", 4, 500, 5_500), 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(references(), Vec::<&str>::new());

        // The janitor's purge of the token's code takes the replaced code's ids too.
        delivered(&store, "b", "uuid-b").await; // expires at 5 s
        let never_settles = new_code("b", 5, 600, 5_000);
        store.create(&never_settles, 600).await.unwrap().unwrap();
        assert_eq!(references(), ["uuid-b"]);
        purge(&store, 6_000).await;
        assert_eq!(references(), Vec::<&str>::new());
    }

    async fn failovers_are_handed_out_once_in_deadline_order_and_claimed_until_finished<
        D: Database,
    >() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, Limits::from(&OtpConfig::default()));
        store.put_failover(&failover("late", 2_000)).await.unwrap();
        store.put_failover(&failover("early", 1_000)).await.unwrap();
        // An entry that does not decode, due first, holds nothing up and is dropped.
        let unreadable = timed_key(900, b"junk");
        store.failovers.insert(&unreadable, &[0xff]).unwrap();
        let none = store.claim_due_failovers(899, 5_000, 10).await.unwrap();
        assert!(none.due.is_empty());
        assert_eq!(none.next_due, Some(900));
        let gone = store.claim_due_failovers(1_000, 5_000, 10).await.unwrap();
        assert_eq!(
            gone.due,
            vec![(failover("early", 1_000), FailoverVerdict::Gone)],
            "a failover not to send is removed, not claimed"
        );
        assert!(store.failovers.get(&unreadable).unwrap().is_none());
        assert_eq!(gone.next_due, Some(2_000));
        let again = store.claim_due_failovers(1_500, 5_000, 10).await.unwrap();
        assert!(again.due.is_empty(), "handed out once");

        // A failover to send is claimed until the end of its claim, then comes back.
        delivered(&store, "late", "uuid-late").await; // pending until 5 s
        let claimed = store.claim_due_failovers(2_000, 3_000, 10).await.unwrap();
        let send = FailoverVerdict::Send { expires_at: 5_000 };
        let expected = (failover("late", 3_000), send);
        assert_eq!(claimed.due, vec![expected.clone()]);
        assert_eq!(claimed.next_due, Some(3_000));
        let during = store.claim_due_failovers(2_999, 4_000, 10).await.unwrap();
        assert!(during.due.is_empty(), "nobody else gets it while claimed");
        let back = store.claim_due_failovers(3_000, 4_000, 10).await.unwrap();
        let expected = (failover("late", 4_000), send);
        assert_eq!(
            back.due,
            vec![expected.clone()],
            "a claim never finished comes back"
        );
        store.finish_failover(&expected.0).await.unwrap();
        assert!(is_empty(&store.failovers), "finished, it is gone");
    }

    async fn a_backlog_is_purged_from_where_the_last_full_batch_ended<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        for (digest, token) in [(1, "a"), (2, "b"), (3, "c")] {
            let new = new_code(token, digest, 0, 1_000 + Millis::from(digest));
            store.create(&new, 0).await.unwrap().unwrap();
        }
        let report = store.purge_due(5_000, 2).await.unwrap();
        assert_eq!(report.expired, 2);
        assert_eq!(
            report.next_due,
            Some(5_000),
            "a full batch: more may be due"
        );
        // Filed below where the next batch starts, as only a clock step back would:
        // it lowers the floor the batches start from.
        store
            .create(&new_code("d", 4, 0, 500), 0)
            .await
            .unwrap()
            .unwrap();
        let mut expired = report.expired;
        let mut batches = 1;
        loop {
            let report = store.purge_due(5_000, 2).await.unwrap();
            expired += report.expired;
            batches += 1;
            if report.next_due != Some(5_000) {
                break;
            }
        }
        assert!(batches <= 4, "{batches} batches");
        assert_eq!(
            expired, 4,
            "the rest of the backlog and the one filed below it"
        );
        for token in ["a", "b", "c", "d"] {
            let code = store.status(token).await.unwrap().unwrap().code;
            assert!(code.is_none(), "{token}: expired and purged");
        }
    }

    /// A token record this build cannot read (a newer otpd's, after a rollback) stops
    /// neither the janitor for other tokens nor the start; once it can be read, its
    /// token is visited again.
    async fn an_unreadable_record_is_passed_over_and_visited_later<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        for (digest, token) in [(1, "a"), (2, "b")] {
            let new = new_code(token, digest, 0, 1_000);
            store.create(&new, 0).await.unwrap().unwrap();
        }
        let a = store.keys.short("a");
        let readable = store.tokens.get(&a).unwrap().unwrap().to_vec();
        let mut newer = readable.clone();
        newer[0] += 1; // the format version
        store.tokens.insert(&a, &newer).unwrap();

        let report = store.purge_due(1_500, 100).await.unwrap();
        assert_eq!(report.expired, 1, "b expires all the same");
        let later = 1_500 + purge::UNREADABLE_RETRY_MS;
        let moved = store.expiry.get(&timed_key(later, &a)).unwrap();
        assert!(moved.is_some(), "a's entry comes back later");
        drop(store);

        let store = open::<D>(&dir, LIMITS);
        assert_eq!(store.live(), 0, "started, counting what it can read");
        store.tokens.insert(&a, &readable).unwrap();
        let report = store.purge_due(later, 100).await.unwrap();
        assert_eq!(report.expired, 1, "a, read again, expires");
    }

    #[tokio::test]
    async fn a_fjall_database_of_another_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let old = FjallDb::open(&path, 1, Durability::Flush).unwrap();
        let otp = old.open_tree("otp").unwrap();
        otp.insert(b"token", b"code").unwrap();
        drop((otp, old));
        let config = StoreConfig {
            path,
            ..StoreConfig::default()
        };
        let error = FjallStore::open(&config, LIMITS, false)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("another layout"), "{error}");
    }

    /// A database of engine `D` holding a live code is refused by engine `E`, by path
    /// and engine, and `D` still finds its code afterwards.
    async fn refused_by_the_other_engine<D: Database, E: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<D>(&dir, LIMITS);
        delivered(&store, "a", "uuid-1").await;
        drop(store);
        let path = dir.path().join("db");
        let config = StoreConfig {
            path: path.clone(),
            ..StoreConfig::default()
        };
        let error = EmbeddedStore::<E>::open(&config, LIMITS, false)
            .err()
            .unwrap()
            .to_string();
        let names = format!(
            "{}: holds a {} database, and store.engine is \"{}\"",
            path.display(),
            D::ENGINE,
            E::ENGINE
        );
        assert!(error.contains(&names), "{error}");
        assert!(!E::owns(&path), "{} wrote nothing there", E::ENGINE);
        let store = open::<D>(&dir, LIMITS);
        assert_eq!(store.live(), 1, "the code is still there");
    }

    #[test]
    fn an_unset_engine_is_sled_only_where_a_sled_database_is() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, sled, fjall) = (
            dir.path().join("empty"),
            dir.path().join("s"),
            dir.path().join("f"),
        );
        std::fs::create_dir(&empty).unwrap();
        drop(SledDb::open(&sled, 4, Durability::Flush).unwrap());
        drop(FjallDb::open(&fjall, 4, Durability::Flush).unwrap());
        assert_eq!(engine_at(&dir.path().join("none")), Engine::Fjall);
        assert_eq!(engine_at(&empty), Engine::Fjall);
        assert_eq!(engine_at(&sled), Engine::Sled);
        assert_eq!(engine_at(&fjall), Engine::Fjall);
    }

    #[tokio::test]
    async fn a_sled_directory_is_refused_by_fjall_and_left_as_it_is() {
        refused_by_the_other_engine::<SledDb, FjallDb>().await;
    }

    #[tokio::test]
    async fn a_fjall_directory_is_refused_by_sled_and_left_as_it_is() {
        refused_by_the_other_engine::<FjallDb, SledDb>().await;
    }

    #[tokio::test]
    async fn a_fjall_directory_is_opened_by_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = open::<FjallDb>(&dir, LIMITS);
        let config = StoreConfig {
            path: dir.path().join("db"),
            ..StoreConfig::default()
        };
        let error = FjallStore::open(&config, LIMITS, false)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("locked by another process"), "{error}");
        drop(store);
        // Dropped, the store lets go at once (its flusher thread is joined).
        open::<FjallDb>(&dir, LIMITS);
    }

    /// A new store, and [`EmbeddedStore::check_secret`] of secrets made of one byte.
    struct SecretCheck<D: Database> {
        store: EmbeddedStore<D>,
        path: std::path::PathBuf,
        file: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl<D: Database> SecretCheck<D> {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self {
                store: open::<D>(&dir, LIMITS),
                path: dir.path().join("db"),
                file: dir.path().join("secret.key"),
                _dir: dir,
            }
        }

        /// The check of the secret `[byte; 32]`, read from its file or `drawn`.
        fn check(&self, byte: u8, drawn: bool) -> Result<(), String> {
            let secret = ServerSecret::from_bytes([byte; 32]);
            (self
                .store
                .check_secret(&secret, drawn, &self.path, &self.file))
            .map_err(|e| e.to_string())
        }

        async fn add_a_code(&self) {
            let created = self.store.create(&new_code("t", 1, 0, 60_000), 0).await;
            created.unwrap().unwrap();
        }
    }

    async fn a_secret_other_than_the_one_its_codes_were_made_with_is_refused<D: Database>() {
        let secrets = SecretCheck::<D>::new();
        // As a build before the check left it: codes, and no fingerprint.
        secrets.add_a_code().await;
        let drawn = secrets.check(1, true).unwrap_err();
        assert!(drawn.contains("which was missing"), "{drawn}");
        // A secret read from its file is taken as the codes', and recorded.
        secrets.check(1, false).unwrap();
        secrets.check(1, true).unwrap();
        let refused = secrets.check(2, false).unwrap_err();
        let names = [&secrets.path, &secrets.file].map(|p| p.display().to_string());
        assert!(refused.contains("another server secret than"), "{refused}");
        assert!(names.iter().all(|name| refused.contains(name)), "{refused}");
    }

    async fn a_database_without_codes_takes_a_new_secret<D: Database>() {
        let secrets = SecretCheck::<D>::new();
        secrets.check(1, true).unwrap();
        // Without codes, another secret is taken too.
        secrets.check(2, true).unwrap();
        secrets.add_a_code().await;
        let drawn = secrets.check(1, true).unwrap_err();
        assert!(drawn.contains("which was missing"), "{drawn}");
        secrets.check(2, false).unwrap();
    }

    /// Writes `store`'s trees into a new database at `path` as a build before short
    /// keys did, in layout 1: keyed by the names themselves, which must be among
    /// `names` (the trees hold only their hashes).
    fn write_layout_1<D: Database>(store: &EmbeddedStore<D>, names: &[&str], path: &Path) {
        let name_of = |key: &[u8]| {
            let name = names.iter().find(|name| store.keys.short(name) == key);
            name.expect("a name the test used").as_bytes().to_vec()
        };
        let db = D::open(path, 1, Durability::Flush).unwrap();
        db.meta().unwrap().insert(layout::LAYOUT_KEY, b"1").unwrap();
        for (old, keyed, new) in layout::LAYOUT_1_TREES {
            let (from, to) = (store.db.open_tree(new).unwrap(), db.open_tree(old).unwrap());
            for entry in from.entries() {
                let (key, value) = entry.unwrap();
                let (key, value) = match keyed {
                    layout::Keyed::Name => (name_of(&key), value.to_vec()),
                    layout::Keyed::NameToName => (name_of(&key), name_of(&value)),
                    layout::Keyed::Timed => {
                        let (at, name) = timed::split_timed_key(&key).unwrap();
                        (timed_key(at, &name_of(name)), value.to_vec())
                    }
                };
                to.insert(&key, &value).unwrap();
            }
        }
        db.flush().unwrap();
    }

    /// A token "a" with a code delivered as "uuid-a" (sent to "sms:a", valid from 0 to
    /// 5 s) and its failover due at 1 s, in a database of layout 1 at `dir`/db.
    async fn a_layout_1_database<D: Database>(dir: &tempfile::TempDir) -> NewCode {
        let today = tempfile::tempdir().unwrap();
        let store = open::<D>(&today, LIMITS);
        let new = delivered(&store, "a", "uuid-a").await;
        store.put_failover(&failover("a", 1_000)).await.unwrap();
        write_layout_1(&store, &["a", "sms:a", "uuid-a"], &dir.path().join("db"));
        new
    }

    /// Every tree of a layout-1 database moves: the token's code verifies, its
    /// delivery id takes reports, its failover comes due, its recipient's send counts,
    /// and its expiry entry brings the janitor; the old trees are gone.
    async fn a_layout_1_database_moves_with_everything_it_holds<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        let new = a_layout_1_database::<D>(&dir).await;
        let store = open::<D>(
            &dir,
            Limits {
                max_sends: 1,
                ..LIMITS
            },
        );
        assert_eq!(store.live(), 1);
        let claimed = store.claim_due_failovers(1_000, 3_000, 10).await.unwrap();
        let send = FailoverVerdict::Send { expires_at: 5_000 };
        assert_eq!(
            claimed.due,
            vec![(failover("a", 3_000), send)],
            "claimed till 3 s"
        );
        let read = store.record_delivery_event("uuid-a", report("read", 1_100));
        assert_eq!(read.await.unwrap(), Filed::Recorded);
        let same_recipient = NewCode {
            recipients: vec!["sms:a".into()],
            ..new_code("b", 2, 1_200, 6_200)
        };
        let refused = store.create(&same_recipient, 1_200).await.unwrap();
        assert!(
            matches!(refused, Err(Refusal::RateLimited { .. })),
            "{refused:?}"
        );
        let valid = store.verify("a", &new.digest, 1_300).await.unwrap();
        assert_eq!(valid, VerifyOutcome::Valid);
        assert_eq!(
            purge(&store, 5_000).await,
            (0, 0, Some(6_000)),
            "the moved entry came due, and filed the verified code again"
        );
        for (old, _, _) in layout::LAYOUT_1_TREES {
            assert!(!store.db.has_tree(old), "{old} is left");
        }
    }

    /// A move a crash cut short (`written` bytes of new trees, a hash key drawn) is
    /// done again from the start.
    async fn move_cut_short_is_done_again<D: Database>(written: usize) {
        let dir = tempfile::tempdir().unwrap();
        let new = a_layout_1_database::<D>(&dir).await;
        {
            let db = D::open(&dir.path().join("db"), 1, Durability::Flush).unwrap();
            let tokens = db.open_tree(layout::TOKENS).unwrap();
            for n in 0..written.div_ceil(4096) as u32 {
                tokens.insert(&n.to_be_bytes(), &[0; 4096]).unwrap();
            }
            db.meta().unwrap().insert(b"key-seed", &[7; 16]).unwrap();
            db.flush().unwrap();
        } // closed without writing out, as a crash leaves it
        let store = open::<D>(&dir, LIMITS);
        assert_eq!(len(&store.tokens), 1, "only the token moved");
        let valid = store.verify("a", &new.digest, 100).await.unwrap();
        assert_eq!(valid, VerifyOutcome::Valid);
    }

    async fn a_move_cut_short_is_done_again<D: Database>() {
        move_cut_short_is_done_again::<D>(1).await;
    }

    /// After more than a memtable of a cut-short move, fjall's journal has rotated and
    /// journals with those writes are left over: a tree dropped and made again under
    /// its name was then refused (`PartitionDeleted`), which emptying it key by key is
    /// not.
    #[tokio::test]
    async fn a_fjall_move_cut_short_after_a_journal_rotation_is_done_again() {
        let written = 3 * fjall_kv::MEMTABLE_BYTES as usize / 2;
        move_cut_short_is_done_again::<FjallDb>(written).await;
    }

    /// Layout-1 trees a crash left behind after the move's mark go at the next start.
    async fn old_trees_left_after_the_mark_are_dropped<D: Database>() {
        let dir = tempfile::tempdir().unwrap();
        a_layout_1_database::<D>(&dir).await;
        {
            let db = D::open(&dir.path().join("db"), 1, Durability::Flush).unwrap();
            let meta = db.meta().unwrap();
            meta.insert(b"key-seed", &[7; 16]).unwrap();
            meta.insert(layout::LAYOUT_KEY, b"2").unwrap();
            db.flush().unwrap();
        }
        let store = open::<D>(&dir, LIMITS);
        for (old, _, _) in layout::LAYOUT_1_TREES {
            assert!(!store.db.has_tree(old), "{old} is left");
        }
    }

    /// Runs each test written once over `D: Database` on both engines, as
    /// `sled::name` and `fjall::name`.
    macro_rules! on_both_engines {
        ($($name:ident),* $(,)?) => {
            mod sled {
                $(#[tokio::test]
                async fn $name() {
                    super::$name::<super::SledDb>().await
                })*
            }
            mod fjall {
                $(#[tokio::test]
                async fn $name() {
                    super::$name::<super::FjallDb>().await
                })*
            }
        };
    }

    on_both_engines!(
        a_code_replaced_after_its_expiry_counts_as_expired_once,
        a_backlog_is_purged_from_where_the_last_full_batch_ended,
        an_unreadable_record_is_passed_over_and_visited_later,
        a_verified_code_is_filed_again_and_goes_retain_after_its_expiry,
        answers_drawn_from_a_record_wait_for_a_flush,
        an_undelivered_resend_puts_the_previous_code_back,
        a_created_code_is_flushed_while_it_is_on_its_way,
        overlapping_resends_keep_the_delivered_code,
        the_replaced_code_stands_in_until_the_resend_is_confirmed_even_across_a_crash,
        a_failover_sms_is_filed_with_its_code_and_forgotten_with_it,
        an_entry_replaced_by_a_sooner_one_is_dropped_when_due,
        the_recipient_limit_spans_two_buckets_and_counts_only_the_window,
        failovers_are_handed_out_once_in_deadline_order_and_claimed_until_finished,
        a_failover_with_an_unreadable_code_waits_behind_the_others,
        a_failover_due_while_a_resend_is_on_its_way_waits_for_it,
        a_report_on_the_replaced_code_counts_while_the_resend_is_on_its_way,
        the_replaced_codes_references_go_with_it,
        a_secret_other_than_the_one_its_codes_were_made_with_is_refused,
        a_database_without_codes_takes_a_new_secret,
        a_layout_1_database_moves_with_everything_it_holds,
        a_move_cut_short_is_done_again,
        old_trees_left_after_the_mark_are_dropped,
    );
}
