//! The shared storage engine: Redis (one server, a master watched by Redis Sentinel, or
//! a Redis Cluster), so several otpd hosts behind a load balancer see one set of codes.
//!
//! Keys (`P` is `key_prefix`; `{token}` is the hash tag, so a token's keys share one
//! cluster slot):
//! - `P{token}:t` → [`TokenRecord`], and behind it while a resend's delivery is
//!   unsettled the [`ReplacedCode`]; `P{token}:c:<digest hex>` → [`CodeRecord`]. The key
//!   holds the keyed digest, never the code.
//! - `P r:<channel>:<address>` (no space) → [`RecipientRecord`], in its own slot.
//! - `P ref:<reference>` → the code key a provider's status webhook is filed under.
//!   While a resend replaced that code (its key is gone) and the token keeps it, the
//!   report goes to it behind the token's record, as long as it
//!   [takes reports](ReplacedCode::takes_reports); after that, the reference names
//!   nothing and the report is unknown.
//! - `P live`: sorted set of pending codes scored by expiry, for the `live` count.
//! - `P failovers`: sorted set of pending SMS failovers ([`PendingFailover`], encoded),
//!   scored by due time.
//! - `P secret-check`: [`ServerSecret::fingerprint`], so a host with another secret
//!   refuses to start.
//!
//! Values are the same versioned postcard records as sled's. Every key but the last
//! three expires by itself (`PXAT` at its purge time), so there is nothing for the
//! janitor to purge. `live` and `failovers` have no expiry, as their members leave one
//! by one: a code when it stops being pending, or at the janitor's pass after its
//! expiry; a failover when it is handed out or finished. `secret-check` lasts as long
//! as the deployment.
//!
//! Each change is optimistic: read the records, let [`crate::rules`] decide (the same
//! code as sled), then commit with [`COMMIT`], a rule-free Lua script that writes only
//! if every key read still holds what was read, else the request starts over (a commit
//! whose answer is lost is never sent again: [`connection`] says why). A
//! recipient lives in another slot than the token, so a create reserves the send on
//! each recipient first (its own atomic commit) and takes it back if the token's
//! commit then fails.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};

use async_trait::async_trait;
use redis::{RedisError, Script};

use super::{
    DueFailovers, Filed, NewCode, PurgeReport, ReplacedCode, Store, StoreError, TokenStatus,
    decode, decode_with_extra, encode, encode_with_extra,
};
use crate::code::Digest;
use crate::config::{RedisConfig, redact_url};
use crate::rules::{
    self, CodeRecord, CodeState, DeliveryEvent, FailoverVerdict, Limits, Millis, PendingFailover,
    RecipientRecord, Refusal, TokenRecord, VerifyOutcome,
};
use crate::secret::ServerSecret;

mod commit;
mod connection;
mod keys;
mod startup;

use commit::{COMMIT, Commit};
use connection::{Connection, OpenError, Pool};
use keys::{Keys, hex};

/// Hands out failovers from the sorted set `KEYS[1]`: `ARGV` holds triples of a
/// member, what replaces it (its claim, or itself postponed; empty: nothing) and when
/// that is due. Each member still there is removed and its replacement filed; returns
/// the members removed, so a failover another host took first is handed to that host
/// alone.
const CLAIM: &str = r"
local handed_out = {}
for i = 1, #ARGV, 3 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    if ARGV[i + 1] ~= '' then
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i + 1])
    end
    handed_out[#handed_out + 1] = ARGV[i]
  end
end
return handed_out
";

static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));

/// Rounds of read-plan-commit before a request gives up: under fair contention every
/// round lets at least one contender through, so this bounds a burst of this size.
const MAX_ROUNDS: usize = 1000;

/// A value as read: `None` when the key does not exist.
type Read = Option<Vec<u8>>;

fn decode_read<R: serde::de::DeserializeOwned>(read: &Read) -> Result<Option<R>, StoreError> {
    read.as_deref().map(decode).transpose()
}

/// A token's key as read: its record, and the code a resend replaced while that
/// resend's delivery is unsettled (stored behind the record, see [`encode_with_extra`]).
fn decode_token(read: &Read) -> Result<(Option<TokenRecord>, Option<ReplacedCode>), StoreError> {
    match read.as_deref() {
        Some(bytes) => decode_with_extra(bytes).map(|(record, replaced)| (Some(record), replaced)),
        None => Ok((None, None)),
    }
}

/// Whether the token's record names `digest` as its code. Only that code
/// answers, as on the embedded engines. On Redis a code's key may outlive its token's
/// when Redis evicts keys (`maxmemory-policy` other than `noeviction`: every otpd key
/// has an expiry, so `volatile-*` policies take them too); a create then begins the
/// token anew, naming its own code and knowing nothing of the old one, whose key
/// stays until it expires.
fn names(record: Option<&TokenRecord>, digest: &Digest) -> bool {
    record.is_some_and(|record| record.current == Some(*digest))
}

/// A token's records as [`RedisStore::token_codes`] read them at one instant.
struct TokenCodes {
    record: TokenRecord,
    /// The code the record names, unless its key is gone.
    code: Option<CodeRecord>,
    replaced: Option<ReplacedCode>,
}

/// What [`RedisStore::record_event`] did.
enum CodeChange {
    /// There is no such code (any more).
    Gone,
    /// The change changed nothing: nothing written. With the key's expiry.
    Unchanged { expire_at: Millis },
    /// Written, with the key's expiry.
    Written { expire_at: Millis },
}

/// The Redis storage engine.
pub struct RedisStore {
    connections: Pool,
    next: AtomicUsize,
    keys: Keys,
    limits: Limits,
    /// Pending codes across all hosts as of the janitor's last pass, adjusted by this
    /// host's own requests since.
    live: AtomicU64,
    /// Codes this host saw leave the live set expired outside a janitor pass (at
    /// start-up, or replaced after their expiry), for the next pass to report.
    expired_unreported: AtomicU64,
    /// `WAIT` for this many replicas (0: not at all) for up to `replica_timeout_ms`.
    min_replicas: u32,
    replica_timeout_ms: u64,
    /// This host's server secret fingerprint, as recorded at check-in. Recorded again
    /// at every janitor pass: Redis can lose the key (a restart without persistence, a
    /// failover to a replica that lacked it, a `FLUSHALL`), and the first host to
    /// start after that would otherwise record its own, whatever secret it holds.
    fingerprint: OnceLock<String>,
    /// Where Redis is, without passwords, for error messages: an operator running
    /// several needs to know which one failed.
    address: String,
}

impl RedisStore {
    /// A failure while talking to Redis (its error, or what went wrong), naming the
    /// Redis by its `address`.
    fn failure(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Database(format!("redis at {}: {what}", self.address))
    }

    fn contention(&self) -> StoreError {
        self.failure(format_args!(
            "gave up after {MAX_ROUNDS} conflicting attempts"
        ))
    }

    /// Connects and checks in ([`RedisStore::reach`], then [`RedisStore::check_in`]),
    /// for a caller that holds its secret already (tests, tools). A host starting up
    /// also asks [`RedisStore::refuse_another_secret`] in between, before it saves a
    /// secret it drew.
    pub async fn connect(
        config: &RedisConfig,
        limits: Limits,
        secret: &ServerSecret,
    ) -> Result<Self, StoreError> {
        let store = Self::reach(config, limits).await?;
        store.check_in(secret).await?;
        Ok(store)
    }

    /// Connects and makes sure Redis answers. Fails when Redis cannot be reached, before
    /// anything is read or written, so that a host starting up can keep a secret it drew
    /// only once its store is known to be there.
    pub async fn reach(config: &RedisConfig, limits: Limits) -> Result<Self, StoreError> {
        let address = if !config.url.is_empty() {
            redact_url(&config.url)
        } else {
            config
                .cluster
                .iter()
                .chain(&config.sentinels)
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unreachable = |address: &str, e: RedisError| {
            StoreError::Database(format!("cannot reach Redis at {address}: {e}"))
        };
        let connections = connection::open_pool(config, &[COMMIT, CLAIM])
            .await
            .map_err(|e| match e {
                OpenError::Config(e) => e,
                OpenError::Redis(e) => unreachable(&address, e),
            })?;
        let store = Self {
            connections,
            next: AtomicUsize::new(0),
            keys: Keys {
                prefix: config.key_prefix.clone(),
            },
            limits,
            live: AtomicU64::new(0),
            expired_unreported: AtomicU64::new(0),
            min_replicas: config.min_replicas,
            replica_timeout_ms: config.replica_timeout_ms,
            fingerprint: OnceLock::new(),
            address,
        };
        let mut conn = store.conn();
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unreachable(&store.address, e))?;
        store.refuse_old_servers().await?;
        Ok(store)
    }

    /// Drops expired members of the live set; returns how many, and resets the count.
    async fn refresh_live(&self, now: Millis) -> Result<u64, StoreError> {
        let key = self.keys.live();
        let (expired, live): (u64, u64) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now)
            .cmd("ZCARD")
            .arg(&key)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))?;
        self.live.store(live, Ordering::Relaxed);
        Ok(expired)
    }

    /// The next connection of the pool (round robin; each is multiplexed).
    fn conn(&self) -> Connection {
        self.connections
            .connection(self.next.fetch_add(1, Ordering::Relaxed))
    }

    async fn get(&self, conn: &mut Connection, key: &str) -> Result<Read, StoreError> {
        redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(|e| self.failure(e))
    }

    /// Reads keys of one hash slot in one consistent snapshot.
    async fn get_two(
        &self,
        conn: &mut Connection,
        a: &str,
        b: &str,
    ) -> Result<(Read, Read), StoreError> {
        let (a, b): (Read, Read) = redis::cmd("MGET")
            .arg(a)
            .arg(b)
            .query_async(conn)
            .await
            .map_err(|e| self.failure(e))?;
        Ok((a, b))
    }

    /// The key of the code whose delivery carries `reference`, if any.
    async fn code_key_of(
        &self,
        conn: &mut Connection,
        reference: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = self.get(conn, &self.keys.reference(reference)).await?;
        Ok(key.map(|key| String::from_utf8_lossy(&key).into_owned()))
    }

    /// Files the code at `code_key` under a provider's `reference`. The entry has its own
    /// slot, so it is written after the code and never points at nothing that was not
    /// there.
    async fn file_reference(
        &self,
        conn: &mut Connection,
        reference: &str,
        code_key: &str,
        expire_at: Millis,
    ) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(self.keys.reference(reference))
            .arg(code_key)
            .arg("PXAT")
            .arg(expire_at)
            .query_async::<()>(conn)
            .await
            .map_err(|e| self.failure(e))
    }

    /// Returns once `min_replicas` replicas hold every change sent on `conn` so far
    /// (Redis `WAIT`), so that a failover cannot lose what is acknowledged next.
    async fn replicated(&self, conn: &mut Connection) -> Result<(), StoreError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        let acknowledged: u32 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replica_timeout_ms)
            .query_async(conn)
            .await
            .map_err(|e| self.failure(e))?;
        if acknowledged < self.min_replicas {
            return Err(self.failure(format_args!(
                "{acknowledged} of the {} replicas store.redis.min_replicas asks for confirmed the change within {} ms",
                self.min_replicas, self.replica_timeout_ms
            )));
        }
        Ok(())
    }

    /// A created code is gone before its confirm, so it no longer counts. Fine if a
    /// newer create replaced it (the token names another code), or if it expired on its
    /// way: while the token still names it, its key went at its purge time (`retain`
    /// after its expiry; the commit that named it set both keys, the token's to last
    /// at least as long), as the embedded engine's janitor would have purged it (or
    /// Redis evicted it, see [`names`]: it is gone all the same). Else
    /// it was lost with the master it was written to (a Sentinel failover during the
    /// delivery), and the create must not be acknowledged (500). When the token's own
    /// key went too (its lock and send window ended before the code's purge time), an
    /// expiry cannot be told from that loss, and answers as one.
    async fn confirm_gone(&self, conn: &mut Connection, token: &str) -> Result<(), StoreError> {
        let read = self.get(conn, &self.keys.token(token)).await?;
        match decode_read::<TokenRecord>(&read)? {
            Some(record) if record.current.is_some() => Ok(()),
            _ => Err(StoreError::Database(
                "the new code is no longer in Redis (lost in a failover?)".into(),
            )),
        }
    }

    /// One optimistic change of the record at `key`: read it (with `guard`, a key of
    /// its slot, at the same instant), let `change` change it, and commit if neither key
    /// changed meanwhile, else read again. `change` sees what `guard` held and says
    /// whether there is anything to write. Returns the record as written; `None` when
    /// there was no record or nothing to write.
    async fn update<R: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        conn: &mut Connection,
        key: &str,
        guard: Option<&str>,
        mut change: impl FnMut(&mut R, &Read) -> Result<bool, StoreError>,
        expire_at: impl Fn(&R) -> Millis,
    ) -> Result<Option<R>, StoreError> {
        for _ in 0..MAX_ROUNDS {
            let (guard_read, read) = match guard {
                Some(guard) => self.get_two(conn, guard, key).await?,
                None => (None, self.get(conn, key).await?),
            };
            let Some(mut record) = decode_read::<R>(&read)? else {
                return Ok(None);
            };
            if !change(&mut record, &guard_read)? {
                return Ok(None);
            }
            let mut commit = Commit::default();
            if let Some(guard) = guard {
                commit.expect(guard, &guard_read);
            }
            commit
                .expect(key, &read)
                .set(key, &encode(&record), expire_at(&record));
            if self.apply(conn, &commit).await? {
                return Ok(Some(record));
            }
        }
        Err(self.contention())
    }

    /// Records `event` on the code at `code_key` while the token names it, or, when a
    /// resend replaced that code (deleting its key), on that code behind the token's
    /// record while it [takes reports](ReplacedCode::takes_reports). The token's key and
    /// the code's are read at one instant (one slot, one `MGET`), the new code's after:
    /// the commit checks all three, and an answer that the replaced code takes no
    /// report, both others again. A code key the token does not name is not its code:
    /// Redis evicted the token's key (see [`names`]) and a create began it anew.
    async fn record_event(
        &self,
        conn: &mut Connection,
        code_key: &str,
        event: &DeliveryEvent,
    ) -> Result<CodeChange, StoreError> {
        let Some((token, digest)) = self.keys.token_of_code(code_key) else {
            return Ok(CodeChange::Gone);
        };
        let token_key = self.keys.token(token);
        for _ in 0..MAX_ROUNDS {
            let (token_read, code_read) = self.get_two(conn, &token_key, code_key).await?;
            let (record, replaced) = decode_token(&token_read)?;
            // `names`, with the digest as the code's key holds it (hex).
            let named = record
                .as_ref()
                .and_then(|record| record.current)
                .is_some_and(|live| hex(&live) == digest);
            let mut commit = Commit::default();
            commit.expect(code_key, &code_read);
            let code = decode_read::<CodeRecord>(&code_read)?.filter(|_| named);
            let change = if let Some(mut code) = code {
                let expire_at = self.code_expire_at(&code);
                if !code.delivery.push(event.clone()) {
                    return Ok(CodeChange::Unchanged { expire_at });
                }
                commit
                    .expect(&token_key, &token_read)
                    .set(code_key, &encode(&code), expire_at);
                CodeChange::Written { expire_at }
            } else {
                let kept = replaced.filter(|old| hex(&old.digest) == digest);
                let (Some(record), Some(mut old)) = (record, kept) else {
                    return Ok(CodeChange::Gone);
                };
                let Some(live) = record.current.filter(|live| *live != old.digest) else {
                    return Ok(CodeChange::Gone);
                };
                let live_key = self.keys.code(token, &live);
                let live_read = self.get(conn, &live_key).await?;
                if !old.takes_reports(decode_read(&live_read)?.as_ref()) {
                    // So the code stays unknown, unless a discard or a verify brought it
                    // back meanwhile.
                    let again = self.get_two(conn, &token_key, code_key).await?;
                    if again == (token_read, code_read) {
                        return Ok(CodeChange::Gone);
                    }
                    continue;
                }
                commit.expect(&live_key, &live_read);
                let expire_at = self.code_expire_at(&old.code);
                if !old.code.delivery.push(event.clone()) {
                    return Ok(CodeChange::Unchanged { expire_at });
                }
                commit.expect(&token_key, &token_read).set(
                    &token_key,
                    &encode_with_extra(&record, Some(&old)),
                    self.token_expire_at(&record),
                );
                CodeChange::Written { expire_at }
            };
            if self.apply(conn, &commit).await? {
                return Ok(change);
            }
        }
        Err(self.contention())
    }

    /// The token's new code when `old`, the code a resend replaced, stands in for it
    /// ([`ReplacedCode::stands_in`]): its key, as read, and its digest.
    async fn new_code_of(
        &self,
        conn: &mut Connection,
        token: &str,
        record: &TokenRecord,
        old: &ReplacedCode,
        now: Millis,
    ) -> Result<Option<(String, Read, Digest)>, StoreError> {
        let Some(live) = record.current.filter(|live| *live != old.digest) else {
            return Ok(None);
        };
        let key = self.keys.code(token, &live);
        let read = self.get(conn, &key).await?;
        let new = decode_read::<CodeRecord>(&read)?;
        Ok(old
            .stands_in(new.as_ref(), now)
            .then_some((key, read, live)))
    }

    /// The verdict on a failover from its token's records, as of one instant.
    async fn judge(
        &self,
        conn: &mut Connection,
        failover: &PendingFailover,
        now: Millis,
    ) -> Result<FailoverVerdict, StoreError> {
        let codes = self.token_codes(conn, &failover.token).await?;
        let (code, replaced) = codes.as_ref().map_or((None, None), |codes| {
            (codes.code.as_ref(), codes.replaced.as_ref())
        });
        Ok(super::judge_failover(
            &failover.reference,
            code,
            replaced,
            now,
        ))
    }

    /// The token's record, its current code and the code a resend replaced, as of one
    /// instant (`None`: no record): the token's key is read again with its code's (one
    /// slot, one `MGET`) until it held still, so a create or a resend settling in
    /// between is not missed.
    async fn token_codes(
        &self,
        conn: &mut Connection,
        token: &str,
    ) -> Result<Option<TokenCodes>, StoreError> {
        let token_key = self.keys.token(token);
        let mut token_read = self.get(conn, &token_key).await?;
        for _ in 0..MAX_ROUNDS {
            let (Some(record), replaced) = decode_token(&token_read)? else {
                return Ok(None);
            };
            let code_read = match record.current {
                Some(live) => {
                    let code_key = self.keys.code(token, &live);
                    let (again, code_read) = self.get_two(conn, &token_key, &code_key).await?;
                    if again != token_read {
                        token_read = again;
                        continue;
                    }
                    code_read
                }
                None => None,
            };
            let code = decode_read(&code_read)?;
            return Ok(Some(TokenCodes {
                record,
                code,
                replaced,
            }));
        }
        Err(self.contention())
    }

    /// When a code's key goes, as the embedded engine's janitor would purge it.
    fn code_expire_at(&self, code: &CodeRecord) -> Millis {
        code.purge_at(&self.limits)
    }

    /// When a token's key may go as far as its own fields tell. A create also keeps it
    /// as long as its code ([`Commit::set`] never shortens an expiry).
    fn token_expire_at(&self, record: &TokenRecord) -> Millis {
        record.free_at(&self.limits)
    }

    /// Mirrors a committed change in the live set and the live count; returns how many
    /// of `removed` were still there. A failure here only skews `stats`.
    async fn track_live(
        &self,
        conn: &mut Connection,
        added: Option<(&str, Millis)>,
        removed: &[String],
    ) -> i64 {
        let key = self.keys.live();
        let mut pipe = redis::pipe();
        if let Some((member, expires_at)) = added {
            pipe.cmd("ZADD").arg(&key).arg(expires_at).arg(member);
        }
        for member in removed {
            pipe.cmd("ZREM").arg(&key).arg(member);
        }
        if added.is_none() && removed.is_empty() {
            return 0;
        }
        match pipe.query_async::<Vec<i64>>(conn).await {
            Ok(counts) => {
                // ZADD answers 1 for a new member, each ZREM 1 for a member it removed.
                let (adds, rems) = counts.split_at(usize::from(added.is_some()));
                let removed = rems.iter().sum::<i64>();
                super::adjust_live(&self.live, adds.iter().sum::<i64>() - removed);
                removed
            }
            Err(error) => {
                tracing::warn!(%error, "could not update the live set");
                0
            }
        }
    }

    /// Takes back a send reserved on a recipient by a create that did not commit.
    async fn unreserve(
        &self,
        conn: &mut Connection,
        key: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let take_back = |record: &mut RecipientRecord, _: &Read| {
            let reserved = record.sends.iter().rposition(|&t| t == at);
            Ok(reserved.map(|pos| record.sends.remove(pos)).is_some())
        };
        let purge_at = |record: &RecipientRecord| record.purge_at(&self.limits);
        self.update(conn, key, None, take_back, purge_at).await?;
        Ok(())
    }

    /// The token's side of a create whose sends are reserved: the new code and the
    /// token's record in one commit, checked against `token_read` (and the replaced
    /// code as read), then the live set and the replicas. False when a key changed
    /// since it was read.
    async fn commit_create(
        &self,
        conn: &mut Connection,
        new: &NewCode,
        now: Millis,
        token_read: &Read,
        standing_in: Option<ReplacedCode>,
        plan: rules::CreatePlan,
    ) -> Result<bool, StoreError> {
        let token_key = self.keys.token(&new.token);
        let code_key = self.keys.code(&new.token, &new.digest);
        let code = CodeRecord::new(new.created_at, new.expires_at, new.channels.clone());
        let code_expire_at = self.code_expire_at(&code);
        let mut commit = Commit::default();
        commit.expect(&token_key, token_read);
        // The replaced code as it is when deleted, kept with the token for a discard.
        let mut replaced = None;
        if let Some(old) = plan.replaced {
            let old_key = self.keys.code(&new.token, &old);
            let old_read = self.get(conn, &old_key).await?;
            replaced = decode_read::<CodeRecord>(&old_read)?
                .map(|code| ReplacedCode { digest: old, code });
            commit.expect(&old_key, &old_read).delete(&old_key);
        }
        // A pending code replaced after its expiry, before a janitor pass counted it,
        // has expired all the same: it is kept as expired, so that a failed resend
        // puts it back expired, not into the live set to be counted again.
        let expired_unseen = replaced
            .as_mut()
            .is_some_and(|old| old.code.mark_expired(now));
        let stand_in = if ReplacedCode::keeps_standing_in(standing_in.as_ref(), replaced.as_ref()) {
            standing_in.as_ref()
        } else {
            replaced.as_ref()
        };
        commit.set(&code_key, &encode(&code), code_expire_at).set(
            &token_key,
            &encode_with_extra(&plan.token, stand_in),
            self.token_expire_at(&plan.token).max(code_expire_at),
        );
        if !self.apply(conn, &commit).await? {
            return Ok(false);
        }
        let member = Keys::live_member(&new.token, &new.digest);
        let gone: Vec<String> = plan
            .replaced
            .filter(|old| *old != new.digest)
            .map(|old| Keys::live_member(&new.token, &old))
            .into_iter()
            .collect();
        let removed = self
            .track_live(conn, Some((&member, new.expires_at)), &gone)
            .await;
        if expired_unseen && removed > 0 {
            self.expired_unreported.fetch_add(1, Ordering::Relaxed);
        }
        // On a replica before it is sent: a code a failover then loses would reach
        // the person and never verify.
        self.replicated(conn).await?;
        Ok(true)
    }

    /// Takes back the send reserved at `at` on each of `keys` that has it.
    async fn unreserve_all(
        &self,
        conn: &mut Connection,
        keys: &[String],
        at: Millis,
    ) -> Result<(), StoreError> {
        for key in keys {
            self.unreserve(conn, key, at).await?;
        }
        Ok(())
    }

    /// [`Self::unreserve_all`] for a create that failed, which answers its own error:
    /// this one is only logged. A reservation Redis applies after otpd gave up on it
    /// (a stalled Redis) is not seen here, and still counts.
    async fn take_back_after_failure(&self, conn: &mut Connection, keys: &[String], at: Millis) {
        if let Err(error) = self.unreserve_all(conn, keys, at).await {
            tracing::warn!(%error, "cannot take back the sends a failed create reserved");
        }
    }

    /// Reserves the planned sends on each recipient, each in its own commit; false
    /// (after taking back those reserved) when one had changed since it was read, an
    /// error (after trying to take them back) when a commit failed.
    async fn reserve(
        &self,
        conn: &mut Connection,
        keys: &[String],
        reads: &[Read],
        records: &[RecipientRecord],
        now: Millis,
    ) -> Result<bool, StoreError> {
        for (i, ((key, read), record)) in keys.iter().zip(reads).zip(records).enumerate() {
            let mut commit = Commit::default();
            commit
                .expect(key, read)
                .set(key, &encode(record), record.purge_at(&self.limits));
            match self.apply(conn, &commit).await {
                Ok(true) => {}
                Ok(false) => {
                    self.unreserve_all(conn, &keys[..i], now).await?;
                    return Ok(false);
                }
                // This one may have been applied all the same.
                Err(error) => {
                    self.take_back_after_failure(conn, &keys[..=i], now).await;
                    return Err(error);
                }
            }
        }
        Ok(true)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, new: &NewCode, now: Millis) -> Result<Result<(), Refusal>, StoreError> {
        let mut conn = self.conn();
        let token_key = self.keys.token(&new.token);
        let recipient_keys: Vec<String> = new
            .recipients
            .iter()
            .map(|r| self.keys.recipient(r))
            .collect();
        for _ in 0..MAX_ROUNDS {
            let token_read = self.get(&mut conn, &token_key).await?;
            let mut recipient_reads = Vec::with_capacity(recipient_keys.len());
            for key in &recipient_keys {
                recipient_reads.push(self.get(&mut conn, key).await?);
            }
            let mut recipients = recipient_reads
                .iter()
                .map(|read| decode_read(read).map(Option::unwrap_or_default))
                .collect::<Result<Vec<RecipientRecord>, _>>()?;
            let (record, standing_in) = decode_token(&token_read)?;
            let plan =
                match rules::plan_create(record, &mut recipients, new.digest, now, &self.limits) {
                    Ok(plan) => plan,
                    Err(refusal) => return Ok(Err(refusal)),
                };
            if !self
                .reserve(
                    &mut conn,
                    &recipient_keys,
                    &recipient_reads,
                    &recipients,
                    now,
                )
                .await?
            {
                continue;
            }
            // No delivery follows a create that failed, so its reserved sends are
            // taken back then too, not only on a conflict.
            let committed = self
                .commit_create(&mut conn, new, now, &token_read, standing_in, plan)
                .await;
            match committed {
                Ok(true) => return Ok(Ok(())),
                Ok(false) => self.unreserve_all(&mut conn, &recipient_keys, now).await?,
                Err(error) => {
                    self.take_back_after_failure(&mut conn, &recipient_keys, now)
                        .await;
                    return Err(error);
                }
            }
        }
        Err(self.contention())
    }

    async fn discard(&self, token: &str, digest: &Digest) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let token_key = self.keys.token(token);
        let code_key = self.keys.code(token, digest);
        for _ in 0..MAX_ROUNDS {
            let (token_read, code_read) = self.get_two(&mut conn, &token_key, &code_key).await?;
            if !decode_read::<CodeRecord>(&code_read)?.is_some_and(|code| code.is_pending()) {
                return Ok(()); // gone, or verified: it arrived after all
            }
            let mut commit = Commit::default();
            commit
                .expect(&token_key, &token_read)
                .expect(&code_key, &code_read)
                .delete(&code_key);
            let mut restored = None;
            if let (Some(mut record), replaced) = decode_token(&token_read)?
                && names(Some(&record), digest)
            {
                record.current = replaced.as_ref().map(|old| old.digest);
                let mut expire_at = self.token_expire_at(&record);
                if let Some(old) = &replaced {
                    let old_expire_at = self.code_expire_at(&old.code);
                    commit.set(
                        &self.keys.code(token, &old.digest),
                        &encode(&old.code),
                        old_expire_at,
                    );
                    expire_at = expire_at.max(old_expire_at);
                }
                restored = replaced.filter(|old| old.code.is_pending());
                commit.set(&token_key, &encode(&record), expire_at);
            }
            if self.apply(&mut conn, &commit).await? {
                let back = restored
                    .map(|old| (Keys::live_member(token, &old.digest), old.code.expires_at));
                let back = back.as_ref().map(|(member, at)| (member.as_str(), *at));
                self.track_live(&mut conn, back, &[Keys::live_member(token, digest)])
                    .await;
                return self.replicated(&mut conn).await;
            }
        }
        Err(self.contention())
    }

    /// Redis applied the create already; what remains is the reference, and a replica
    /// holding it: the replication stream is ordered, so that `WAIT` covers the create
    /// too, whichever connection made it.
    async fn confirm_delivery(
        &self,
        token: &str,
        digest: &Digest,
        reference: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let token_key = self.keys.token(token);
        let code_key = self.keys.code(token, digest);
        // Only the code the token names (see `names`).
        let confirm = |code: &mut CodeRecord, token_read: &Read| {
            let named = names(decode_token(token_read)?.0.as_ref(), digest);
            if named {
                code.delivery.reference = Some(reference.to_owned());
            }
            Ok(named)
        };
        let expire_at = |code: &CodeRecord| self.code_expire_at(code);
        let confirmed = self
            .update(&mut conn, &code_key, Some(&token_key), confirm, expire_at)
            .await?;
        let Some(code) = confirmed else {
            // The code it replaced verified (and took its place), a newer create did, or
            // it expired.
            self.confirm_gone(&mut conn, token).await?;
            return Ok(false);
        };
        self.file_reference(&mut conn, reference, &code_key, self.code_expire_at(&code))
            .await?;
        self.replicated(&mut conn).await?;
        Ok(super::still_counts(&code, now))
    }

    async fn record_delivery_event(
        &self,
        reference: &str,
        event: DeliveryEvent,
    ) -> Result<Filed, StoreError> {
        let mut conn = self.conn();
        let Some(code_key) = self.code_key_of(&mut conn, reference).await? else {
            return Ok(Filed::UnknownReference);
        };
        let change = self.record_event(&mut conn, &code_key, &event).await?;
        let (filed, expire_at) = match change {
            CodeChange::Gone => return Ok(Filed::UnknownReference),
            CodeChange::Unchanged { expire_at } => (Filed::AlreadyRecorded, expire_at),
            CodeChange::Written { expire_at } => (Filed::Recorded, expire_at),
        };
        // On a retry too: a first try may have failed between the event and its id.
        if let Some(new_reference) = event.new_reference() {
            self.file_reference(&mut conn, new_reference, &code_key, expire_at)
                .await?;
        }
        self.replicated(&mut conn).await?;
        Ok(filed)
    }

    async fn verify(
        &self,
        token: &str,
        digest: &Digest,
        now: Millis,
    ) -> Result<VerifyOutcome, StoreError> {
        let mut conn = self.conn();
        let token_key = self.keys.token(token);
        let code_key = self.keys.code(token, digest);
        for _ in 0..MAX_ROUNDS {
            let (token_read, probed_read) = self.get_two(&mut conn, &token_key, &code_key).await?;
            let (record, replaced) = decode_token(&token_read)?;
            let stand_in = match (&record, &replaced) {
                (Some(record), Some(old)) if old.digest == *digest => {
                    self.new_code_of(&mut conn, token, record, old, now).await?
                }
                _ => None,
            };
            let probed = match &stand_in {
                Some(_) => replaced.as_ref().map(|old| old.code.clone()),
                // Only the code the token names (see `names`).
                None if names(record.as_ref(), digest) => decode_read(&probed_read)?,
                None => None,
            };
            let plan = rules::plan_verify(record, probed, now, &self.limits);
            // Nothing to write: MGET read both keys at one instant, so the answer holds.
            if plan.token.is_none() && plan.code.is_none() {
                return Ok(plan.outcome);
            }
            let mut commit = Commit::default();
            commit
                .expect(&token_key, &token_read)
                .expect(&code_key, &probed_read);
            let mut ended = Vec::new();
            // The replaced code verified: it is the token's code again (its key must last
            // as long), and the new one, never confirmed delivered, is the pending code
            // this verify ends.
            let promoted_until = match (&plan.code, stand_in) {
                (Some(code), Some((new_key, new_read, new_digest))) => {
                    commit.expect(&new_key, &new_read).delete(&new_key);
                    ended.push(Keys::live_member(token, &new_digest));
                    Some(self.code_expire_at(code))
                }
                _ => None,
            };
            if let Some(code) = &plan.code {
                commit.set(&code_key, &encode(code), self.code_expire_at(code));
                ended.push(Keys::live_member(token, digest));
            }
            if let Some(mut record) = plan.token {
                if promoted_until.is_some() {
                    record.current = Some(*digest);
                }
                let expire_at = self
                    .token_expire_at(&record)
                    .max(promoted_until.unwrap_or(0));
                let keep = replaced.as_ref().filter(|_| promoted_until.is_none());
                if plan.invalidate_live
                    && let Some(live) = record.current
                {
                    let live_key = self.keys.code(token, &live);
                    let live_read = self.get(&mut conn, &live_key).await?;
                    commit.expect(&live_key, &live_read);
                    if let Some(mut code) = decode_read::<CodeRecord>(&live_read)?
                        && rules::finish_pending(&mut code, CodeState::Locked, now)
                    {
                        commit.set(&live_key, &encode(&code), self.code_expire_at(&code));
                        ended.push(Keys::live_member(token, &live));
                    }
                }
                commit.set(&token_key, &encode_with_extra(&record, keep), expire_at);
            }
            if self.apply(&mut conn, &commit).await? {
                self.track_live(&mut conn, None, &ended).await;
                self.replicated(&mut conn).await?;
                return Ok(plan.outcome);
            }
        }
        Err(self.contention())
    }

    async fn cancel(&self, token: &str, now: Millis) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let token_key = self.keys.token(token);
        for _ in 0..MAX_ROUNDS {
            let token_read = self.get(&mut conn, &token_key).await?;
            let Some(live) = decode_read::<TokenRecord>(&token_read)?.and_then(|r| r.current)
            else {
                return Ok(false);
            };
            let live_key = self.keys.code(token, &live);
            let live_read = self.get(&mut conn, &live_key).await?;
            let mut code = decode_read::<CodeRecord>(&live_read)?;
            let cancelled = code
                .as_mut()
                .is_some_and(|code| rules::finish_pending(code, CodeState::Cancelled, now));
            // Two reads: the commit also confirms that the answer is not stale.
            let mut commit = Commit::default();
            commit
                .expect(&token_key, &token_read)
                .expect(&live_key, &live_read);
            if let Some(code) = code.as_ref().filter(|_| cancelled) {
                commit.set(&live_key, &encode(code), self.code_expire_at(code));
            }
            if self.apply(&mut conn, &commit).await? {
                if cancelled {
                    self.track_live(&mut conn, None, &[Keys::live_member(token, &live)])
                        .await;
                    self.replicated(&mut conn).await?;
                }
                return Ok(cancelled);
            }
        }
        Err(self.contention())
    }

    async fn status(&self, token: &str) -> Result<Option<TokenStatus>, StoreError> {
        let codes = self.token_codes(&mut self.conn(), token).await?;
        Ok(codes.map(|codes| TokenStatus {
            code: codes.code,
            token: codes.record,
        }))
    }

    /// Redis expires keys itself; a pass only counts the codes that expired unverified
    /// (leaving the live set) and refreshes the live count. It also records this
    /// host's secret fingerprint again, should Redis have lost it.
    async fn purge_due(&self, now: Millis, _batch: usize) -> Result<PurgeReport, StoreError> {
        if let Err(error) = self.record_fingerprint_again().await {
            tracing::error!(%error, "checking the server secret's fingerprint on Redis");
        }
        let expired =
            self.refresh_live(now).await? + self.expired_unreported.swap(0, Ordering::Relaxed);
        Ok(PurgeReport {
            purged: 0,
            expired,
            next_due: None,
        })
    }

    async fn put_failover(&self, failover: &PendingFailover) -> Result<(), StoreError> {
        let mut conn = self.conn();
        redis::cmd("ZADD")
            .arg(self.keys.failovers())
            .arg(failover.due_at)
            .arg(encode(failover))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.failure(e))?;
        self.replicated(&mut conn).await
    }

    /// Judges the due failovers from their codes' records first, then hands them out
    /// from the shared set in one script (so one host gets each): an error before that
    /// leaves them all for the next pass. The claims are not waited for (`WAIT`): a
    /// claim a Redis failover loses hands the SMS out again, a lesser harm than
    /// sending none.
    async fn claim_due_failovers(
        &self,
        now: Millis,
        claim_until: Millis,
        batch: usize,
    ) -> Result<DueFailovers, StoreError> {
        let mut conn = self.conn();
        let key = self.keys.failovers();
        let members: Vec<Vec<u8>> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(batch)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failure(e))?;
        let mut to_hand_out = Vec::with_capacity(members.len());
        let mut claim = CLAIM_SCRIPT.key(&key);
        for member in &members {
            // Removed all the same: an unreadable entry would otherwise come back forever.
            let Some(failover) = super::readable_failover(member) else {
                claim.arg(member).arg("").arg(0);
                continue;
            };
            let judged = self.judge(&mut conn, &failover, now).await;
            let step = super::claim_step(failover, judged, now, claim_until)?;
            match &step.refiled {
                Some(again) => claim.arg(member).arg(encode(again)).arg(again.due_at),
                None => claim.arg(member).arg("").arg(0),
            };
            to_hand_out.extend(
                step.handed_out
                    .map(|(failover, verdict)| (member, failover, verdict)),
            );
        }
        let handed_out: Vec<Vec<u8>> = if members.is_empty() {
            Vec::new()
        } else {
            claim
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.failure(e))?
        };
        let due = to_hand_out
            .into_iter()
            .filter(|(member, ..)| handed_out.contains(member))
            .map(|(_, failover, verdict)| (failover, verdict))
            .collect();
        // The claims are made: they are handed out even if this read fails (then the
        // next pass comes in a second).
        let next: Result<Vec<(Vec<u8>, f64)>, _> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await;
        let next_due = match next {
            Ok(next) => next.first().map(|(_, score)| *score as Millis),
            Err(error) => {
                tracing::warn!(%error, "cannot read the next failover's deadline");
                Some(now + 1000)
            }
        };
        Ok(DueFailovers { due, next_due })
    }

    async fn judge_failover(
        &self,
        failover: &PendingFailover,
        now: Millis,
    ) -> Result<FailoverVerdict, StoreError> {
        self.judge(&mut self.conn(), failover, now).await
    }

    async fn finish_failover(&self, claimed: &PendingFailover) -> Result<(), StoreError> {
        redis::cmd("ZREM")
            .arg(self.keys.failovers())
            .arg(encode(claimed))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))
    }

    fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Every answer came after Redis applied the write; how durable that is, is the
    /// Redis server's `appendfsync` setting.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn probe(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))
    }
}
