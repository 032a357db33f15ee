//! `[store.redis]`: where the shared Redis is, how to reach it, and the checks that
//! name a bad key without showing a password.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, check_range, hidden, invalid};

/// `[store.redis]`: where the shared Redis is and how to talk to it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` (TLS) or
    /// `unix:///path/redis.sock`.
    pub url: String,
    /// Redis Cluster seed nodes (`redis://host:port`); when set, `url` and `sentinels`
    /// must be empty.
    pub cluster: Vec<String>,
    /// Redis Sentinel nodes (`redis://host:port`) that name the master; when set,
    /// `url` and `cluster` must be empty and `sentinel_master` names the service.
    pub sentinels: Vec<String>,
    /// The master's name as the Sentinels know it (`sentinel monitor <name> …`).
    pub sentinel_master: String,
    /// Credentials of the master (and replicas) the Sentinels name: `requirepass`, or
    /// an ACL user and its password. Empty: none.
    pub master_username: String,
    pub master_password: String,
    /// CA certificates (PEM) that a `rediss://` server's certificate must chain to,
    /// instead of the system's; empty: the system's.
    pub tls_ca_file: PathBuf,
    /// Prefix of every key otpd writes, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Multiplexed connections per host; requests are spread over them. With
    /// `sentinels` there is one whatever this says: the master's, asked for again
    /// after a loss.
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
    /// Replicas that must hold a change (`WAIT`) before it is acknowledged, so that a
    /// failover to one of them loses nothing acknowledged; 0 = do not wait.
    pub min_replicas: u32,
    /// Longest wait for them; a change they do not confirm answers 500.
    pub replica_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            master_username: String::new(),
            master_password: String::new(),
            tls_ca_file: PathBuf::new(),
            key_prefix: "otpd:".into(),
            pool_size: 4,
            connect_timeout_ms: 2000,
            response_timeout_ms: 2000,
            min_replicas: 0,
            replica_timeout_ms: 1000,
        }
    }
}

/// Strips the credentials from a Redis URL, so it can be shown in errors and logs: the
/// user part before `@` (also of a URL too mangled to parse) and a `pass` or
/// `password` query value (`unix://` URLs carry them there).
pub fn redact_url(url: &str) -> String {
    let host_start = url.find("://").map_or(0, |scheme| scheme + 3);
    // The last `@` ends the user info: a password may hold an unencoded `?`, `#` or
    // `/` (an `@` in the query would hide the host too: the safe side).
    let (mut redacted, rest) = match url[host_start..].rfind('@') {
        Some(at) => (
            format!("{}***@", &url[..host_start]),
            &url[host_start + at + 1..],
        ),
        None => (url[..host_start].to_owned(), &url[host_start..]),
    };
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    redacted.push_str(base);
    if !query.is_empty() {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if matches!(key, "pass" | "password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        redacted = format!("{redacted}?{}", pairs.join("&"));
    }
    redacted
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field(
                "sentinels",
                &self
                    .sentinels
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            .field("master_username", &self.master_username)
            .field("master_password", &hidden(&self.master_password))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("min_replicas", &self.min_replicas)
            .field("replica_timeout_ms", &self.replica_timeout_ms)
            .finish()
    }
}

/// Refuses an address the Redis client could not use, naming `key` (and the address
/// without its password): a scheme outside `schemes`, a missing host or a bad database
/// number would otherwise surface at start-up as Redis being unreachable.
fn check_redis_url(key: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let parsed = redis::parse_redis_url(url).filter(|parsed| schemes.contains(&parsed.scheme()));
    let Some(parsed) = parsed else {
        let expected: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        return Err(invalid(
            key,
            format!(
                "{:?} is not a Redis address: expected {}",
                redact_url(url),
                expected.join(", ")
            ),
        ));
    };
    // The database: a TCP address's path, a socket's `db` query value.
    let database = if parsed.scheme().ends_with("unix") {
        let db = parsed.query_pairs().find(|(name, _)| name == "db");
        db.map(|(_, db)| db.into_owned())
    } else {
        Some(parsed.path().trim_matches('/').to_owned()).filter(|db| !db.is_empty())
    };
    if let Some(db) = database.filter(|db| db.parse::<u32>().is_err()) {
        return Err(invalid(
            key,
            format!(
                "{:?}: the database {db:?} is not a number: expected a database number, 0 or \
                 more, after the host (redis://host:6379/0), or ?db=0 after a socket's path",
                redact_url(url)
            ),
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(drop)
        .map_err(|e| invalid(key, format!("{:?}: {e}", redact_url(url))))
}

impl RedisConfig {
    /// Refuses a Redis configuration that cannot work, naming the key. Checked
    /// whatever the engine, as a wrong value is a mistake wherever it is; only
    /// `engine_is_redis` needs an address.
    pub(super) fn validate(&self, engine_is_redis: bool) -> Result<(), ConfigError> {
        let given = [
            !self.url.is_empty(),
            !self.cluster.is_empty(),
            !self.sentinels.is_empty(),
        ];
        match given.iter().filter(|&&set| set).count() {
            0 if engine_is_redis => {
                return Err(invalid(
                    "store.redis.url",
                    "engine \"redis\" needs store.redis.url, store.redis.cluster or store.redis.sentinels",
                ));
            }
            0 | 1 => {}
            _ => {
                return Err(invalid(
                    "store.redis.cluster",
                    "set only one of store.redis.url, store.redis.cluster and store.redis.sentinels",
                ));
            }
        }
        if self.sentinels.is_empty() != self.sentinel_master.is_empty() {
            return Err(invalid(
                "store.redis.sentinel_master",
                "store.redis.sentinels and store.redis.sentinel_master go together",
            ));
        }
        if self.sentinels.is_empty()
            && !(self.master_username.is_empty() && self.master_password.is_empty())
        {
            return Err(invalid(
                "store.redis.master_password",
                "only for store.redis.sentinels; with url or cluster, the credentials go in the URLs",
            ));
        }
        if self
            .sentinels
            .iter()
            .any(|url| url.starts_with("rediss://"))
        {
            return Err(invalid(
                "store.redis.sentinels",
                "TLS (rediss://) is not supported through Sentinels yet; use url or cluster",
            ));
        }
        const SERVER: [&str; 4] = ["redis", "rediss", "unix", "redis+unix"];
        if !self.url.is_empty() {
            check_redis_url("store.redis.url", &self.url, &SERVER)?;
        }
        for url in &self.sentinels {
            check_redis_url("store.redis.sentinels", url, &SERVER)?;
        }
        // The cluster client connects over TCP only.
        for url in &self.cluster {
            check_redis_url("store.redis.cluster", url, &SERVER[..2])?;
        }
        let tls = self
            .cluster
            .iter()
            .chain([&self.url])
            .any(|url| url.starts_with("rediss://"));
        if !self.tls_ca_file.as_os_str().is_empty() && !tls {
            return Err(invalid(
                "store.redis.tls_ca_file",
                "only for rediss:// addresses in store.redis.url or store.redis.cluster",
            ));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "store.redis.key_prefix",
                "may not contain { or }: the token is the key's hash tag",
            ));
        }
        check_range("store.redis.pool_size", self.pool_size as u64, 1, 64)?;
        check_range(
            "store.redis.connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            600_000,
        )?;
        check_range(
            "store.redis.response_timeout_ms",
            self.response_timeout_ms,
            1,
            600_000,
        )?;
        check_range("store.redis.min_replicas", self.min_replicas.into(), 0, 16)?;
        // The wait must end before the command's own response timeout does.
        let longest_wait = match self.min_replicas {
            0 => 600_000,
            _ => self.response_timeout_ms.saturating_sub(1).max(1),
        };
        check_range(
            "store.redis.replica_timeout_ms",
            self.replica_timeout_ms,
            1,
            longest_wait,
        )
    }
}
