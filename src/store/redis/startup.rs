//! What a Redis store checks as a host starts: the server's version, that every host
//! on it holds the same server secret; and what it warns of: a clock off Redis's, and
//! settings under which Redis may lose or evict otpd's keys.

use std::sync::atomic::Ordering;

use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind, Value};

use super::RedisStore;
use super::commit::Commit;
use crate::rules::{self, Millis};
use crate::secret::ServerSecret;
use crate::store::StoreError;

/// The oldest Redis (major, minor) otpd runs on: [`COMMIT`](super::commit::COMMIT) calls `PEXPIRETIME`, new
/// in Redis 7.0. An older server would take the start-up and fail every write.
const MIN_REDIS_VERSION: (u32, u32) = (7, 0);

/// Whether a server reporting `version` (`7.0.15`) is [`MIN_REDIS_VERSION`] or later;
/// false for a version that does not read as `major.minor…`.
fn version_supported(version: &str) -> bool {
    let mut parts = version.trim().split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_REDIS_VERSION,
        _ => false,
    }
}

/// The `redis_version` field of an `INFO server` answer ("" when it has none).
fn info_version(info: &str) -> &str {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map_or("", str::trim)
}

/// How far this host's clock may be off Redis's before start-up warns: two hosts
/// each within this of Redis are within the margin a failover claim allows them.
const CLOCK_SKEW_WARNING_MS: Millis = rules::FAILOVER_CLAIM_MARGIN_MS / 2;

/// How far `here` is ahead of `redis` (negative: behind), both unix ms, when that is
/// beyond [`CLOCK_SKEW_WARNING_MS`].
fn clock_skew(here: Millis, redis: Millis) -> Option<i64> {
    let ahead = here as i64 - redis as i64;
    (ahead.unsigned_abs() > CLOCK_SKEW_WARNING_MS).then_some(ahead)
}

impl RedisStore {
    /// Refuses a server older than [`MIN_REDIS_VERSION`], naming it and its address.
    pub(super) async fn refuse_old_servers(&self) -> Result<(), StoreError> {
        let address = &self.address;
        for version in self.server_versions().await.map_err(|e| self.failure(e))? {
            if !version_supported(&version) {
                let (major, minor) = MIN_REDIS_VERSION;
                return Err(StoreError::Database(format!(
                    "Redis at {address} is version {version:?}: otpd needs Redis \
                     {major}.{minor} or later (its commit script calls PEXPIRETIME)"
                )));
            }
        }
        Ok(())
    }

    /// The version of each server otpd writes to: `INFO server` reaches every cluster
    /// primary. `INFO` is `@dangerous`, which an ACL for otpd may well take away (the
    /// README's does), and a hardened server may rename it away; when it is refused,
    /// `HELLO` tells the version of the server (or the one cluster node) it reaches.
    async fn server_versions(&self) -> Result<Vec<String>, RedisError> {
        let mut conn = self.conn();
        let info = redis::cmd("INFO")
            .arg("server")
            .query_async::<Value>(&mut conn)
            .await
            .and_then(Value::extract_error);
        let infos = match info {
            // A cluster's: each primary's address and answer.
            Ok(Value::Map(nodes)) => nodes.into_iter().map(|(_, info)| info).collect(),
            Ok(info) => vec![info],
            // Refused by an ACL (NOPERM), or renamed away (ERR unknown command).
            Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
                let mut hello: std::collections::HashMap<String, Value> =
                    redis::cmd("HELLO").query_async(&mut conn).await?;
                let version = hello.remove("version").unwrap_or(Value::Nil);
                return Ok(vec![String::from_redis_value(version)?]);
            }
            Err(e) => return Err(e),
        };
        infos
            .into_iter()
            .map(|info| Ok(info_version(&String::from_redis_value(info)?).to_owned()))
            .collect()
    }

    /// Checks that the other hosts on this Redis hold the same server secret (the first
    /// host records its fingerprint), and counts the live codes.
    pub async fn check_in(&self, secret: &ServerSecret) -> Result<(), StoreError> {
        self.refuse_a_login_without_scripts().await?;
        self.check_secret(secret).await?;
        // Codes that expired while no host was running count at the first pass.
        let expired = self.refresh_live(rules::now_ms()).await?;
        self.expired_unreported.store(expired, Ordering::Relaxed);
        self.warn_unless_durable().await;
        self.warn_if_clock_differs().await;
        Ok(())
    }

    /// Runs an empty commit, which changes nothing: every write goes through that
    /// script, so a login that may not run scripts would start and then fail every
    /// create and verify.
    async fn refuse_a_login_without_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        match self.run_commit(&mut conn, &Commit::default()).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) => {
                Err(self.failure(format_args!(
                    "the login may not run otpd's scripts ({e}): grant it EVALSHA, EVAL \
                     and SCRIPT LOAD (+@scripting)"
                )))
            }
            applied => applied.map(|_| ()).map_err(|e| self.failure(e)),
        }
    }

    /// Says at start-up when this host's clock is off Redis's by more than
    /// [`CLOCK_SKEW_WARNING_MS`]: the hosts sharing a Redis judge expiry, send windows
    /// and SMS failover claims by their own clocks, and a claim allows them
    /// [`rules::FAILOVER_CLAIM_MARGIN_MS`] apart.
    async fn warn_if_clock_differs(&self) {
        let mut conn = self.conn();
        let asked = rules::now_ms();
        // The round trip by the monotonic clock: the wall clock may step meanwhile.
        let started = std::time::Instant::now();
        let Ok((secs, micros)) = redis::cmd("TIME")
            .query_async::<(u64, u64)>(&mut conn)
            .await
        else {
            return;
        };
        let round_trip_ms = started.elapsed().as_millis() as Millis;
        // The middle of the round trip, against the server's time when it answered.
        let here = asked + round_trip_ms / 2;
        if let Some(ahead_ms) = clock_skew(here, secs * 1000 + micros / 1000) {
            tracing::warn!(
                ahead_ms,
                "this host's clock differs from Redis's: keep every host sharing this \
                 Redis synchronised (NTP), as they judge expiry and failover claims by \
                 their own clocks"
            );
        }
    }

    /// Says at start-up what Redis may lose of otpd's keys, in a crash or by evicting
    /// them, as far as the server tells (`CONFIG` may be disabled; then nothing is
    /// said).
    async fn warn_unless_durable(&self) {
        let mut conn = self.conn();
        let mut setting = async |name: &str| {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .ok()
                .and_then(|pair| pair.into_iter().nth(1))
        };
        let appendonly = setting("appendonly").await;
        let appendfsync = setting("appendfsync").await;
        match (appendonly.as_deref(), appendfsync.as_deref()) {
            (Some("no"), _) => tracing::warn!(
                "Redis runs with appendonly no: a Redis restart loses every code and counter"
            ),
            (Some("yes"), Some(fsync)) if fsync != "always" => tracing::warn!(
                appendfsync = fsync,
                "Redis acknowledges writes before fsync: a Redis crash may lose the last second of codes"
            ),
            _ => {}
        }
        // Every otpd key has an expiry, so the volatile-* policies take them too.
        if let Some(policy) = setting("maxmemory-policy").await
            && policy != "noeviction"
        {
            tracing::warn!(
                maxmemory_policy = policy,
                "Redis may evict otpd's keys once it reaches maxmemory: an evicted code no \
                 longer verifies, and an evicted token forgets its wrong guesses, its lock \
                 and its sends, which lifts the guessing and rate limits; set \
                 maxmemory-policy noeviction"
            );
        }
    }

    /// Refuses `secret` when the hosts on this Redis have recorded another one; records
    /// nothing. Asked before a secret drawn at this start is saved, so that a host
    /// given the wrong setup leaves no secret file behind (the operator then gives it
    /// the others' secret); [`RedisStore::check_in`] still settles a race of two first
    /// hosts. A `drawn` secret (the file was missing) is refused too where Redis holds
    /// codes but no fingerprint: the key was lost (see [`RedisStore::fingerprint`]),
    /// and the codes were made with a secret this host has not got.
    pub async fn refuse_another_secret(
        &self,
        secret: &ServerSecret,
        drawn: bool,
    ) -> Result<(), StoreError> {
        match self.recorded_fingerprint().await? {
            Some(stored) if stored != secret.fingerprint() => Err(self.another_secret()),
            None if drawn && self.live_codes().await? > 0 => Err(StoreError::Database(format!(
                "Redis holds codes but no server secret fingerprint (key {}, lost since), \
                 and this host's secret file was missing (a new one was drawn, and is not \
                 kept); give it the other hosts' secret file or credential",
                self.keys.secret_check()
            ))),
            _ => Ok(()),
        }
    }

    /// Records this host's secret fingerprint if none is there yet; refuses to go on
    /// when another host recorded a different one. Remembers it for
    /// [`RedisStore::record_fingerprint_again`].
    async fn check_secret(&self, secret: &ServerSecret) -> Result<(), StoreError> {
        let fingerprint = self.fingerprint.get_or_init(|| secret.fingerprint());
        self.check_fingerprint(fingerprint).await
    }

    /// Records this host's fingerprint again should Redis have lost it, at each janitor
    /// pass; an error if another host's is there.
    pub(super) async fn record_fingerprint_again(&self) -> Result<(), StoreError> {
        match self.fingerprint.get() {
            Some(fingerprint) => self.check_fingerprint(fingerprint).await,
            None => Ok(()),
        }
    }

    /// Records `fingerprint` unless one is there (`SET NX`), then refuses another.
    async fn check_fingerprint(&self, fingerprint: &str) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(self.keys.secret_check())
            .arg(fingerprint)
            .arg("NX")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))?;
        match self.recorded_fingerprint().await? {
            Some(stored) if stored != fingerprint => Err(self.another_secret()),
            _ => Ok(()),
        }
    }

    /// The fingerprint the hosts on this Redis recorded, if any.
    async fn recorded_fingerprint(&self) -> Result<Option<String>, StoreError> {
        redis::cmd("GET")
            .arg(self.keys.secret_check())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))
    }

    /// Members of the live set, expired ones not yet dropped included.
    async fn live_codes(&self) -> Result<u64, StoreError> {
        redis::cmd("ZCARD")
            .arg(self.keys.live())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.failure(e))
    }

    fn another_secret(&self) -> StoreError {
        StoreError::Database(format!(
            "the server secret differs from the one the other otpd hosts on this Redis use \
             (key {}); give every host the same secret file or credential",
            self.keys.secret_check()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_off_redis_by_more_than_five_seconds_is_reported_with_its_sign() {
        let redis = 1_800_000_000_000;
        assert_eq!(clock_skew(redis + 5_000, redis), None);
        assert_eq!(clock_skew(redis - 5_000, redis), None);
        assert_eq!(clock_skew(redis + 5_001, redis), Some(5_001));
        assert_eq!(clock_skew(redis - 12_000, redis), Some(-12_000));
    }

    #[test]
    fn redis_before_7_0_is_refused_by_its_info_version() {
        let info = "# Server\r\nredis_version:6.2.14\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(info_version(info), "6.2.14");
        assert_eq!(info_version("# Server\r\nredis_mode:standalone\r\n"), "");
        for old in ["6.2.14", "6.0.0", "5.0.7", "", "seven", "7"] {
            assert!(!version_supported(old), "{old:?}");
        }
        for new in ["7.0.0", "7.0.15", "7.2.4", "8.0.2", "10.0.0", "255.255.255"] {
            assert!(version_supported(new), "{new:?}");
        }
    }
}
