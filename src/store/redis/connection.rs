//! Connections to Redis: a pool of multiplexed connections to one server, to the
//! master the Sentinels name, or to a Redis Cluster.
//!
//! A server or Sentinel connection is a [`Reconnecting`] one: dropped after a
//! connection-level error, together with every other connection of the pool (they
//! went to the same server), and made again by the next request that needs it. So a
//! request after an outage meets the server as it is now, and a failed login is tried
//! again rather than kept. redis-rs's `ConnectionManager` did neither: a refused login
//! lasted until otpd restarted, and each pooled connection failed one more request,
//! with the outage's error, whenever it was next used after Redis was back.
//!
//! A connection idle for [`IDLE_CHECK`] is asked with a `PING` before its next use:
//! Redis (its `timeout`), a restart or a firewall may have closed it meanwhile, and a
//! command that then fails cannot be told from one lost in flight, so it could not be
//! retried. A `PING` can: if it meets a closed connection, a new one is made.
//!
//! A cluster connection re-sends nothing (`retries(0)`). redis-rs re-sends a command
//! whose connection dropped before its answer came, and a commit script that had run
//! would then find its own write, answer "changed", and have the engine plan again on
//! top of it: a right code answering 409, a wrong guess counted twice, a create
//! refused by its own send. redis-rs cannot tell that case from the safe ones, so every
//! error comes back at once: a `MOVED` or `ASK` during a resharding, a `TRYAGAIN`,
//! `CLUSTERDOWN` or `READONLY` during a failover, and a dropped connection fail that
//! request (500). redis-rs still refreshes its slot map or reconnects, so after a
//! `MOVED`, a failover or a reconnect the next request goes to the right node; but it
//! does not follow an `ASK` unless retrying, so while a slot migrates, the tokens whose
//! keys moved answer 500 until it ends. (A commit that could tell its own earlier run,
//! by an id it writes beside the keys, would let redis-rs retry again.)
//!
//! A store operation holds one [`Pinned`] handle: all its commands go to one
//! connection, so a `WAIT` counts the writes it follows, and an operation a Sentinel
//! failover interrupts fails (500) instead of finishing on the new master.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisConnectionInfo, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsCertificates, Value,
};

use crate::config::RedisConfig;
use crate::store::StoreError;

/// How long a connection may stay unused before a `PING` checks it (see the module
/// doc). Redis closes clients idle for more than its `timeout`, whole seconds, so one
/// used within the last second is open.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A connection of the pool, for one store operation.
#[derive(Clone)]
pub enum Connection {
    Server(Pinned),
    Cluster(ClusterConnection),
}

/// The pool: `Reconnecting` connections to a server or the Sentinels' master, or
/// cluster connections.
pub enum Pool {
    Servers(Vec<Arc<Reconnecting>>),
    Cluster(Vec<ClusterConnection>),
}

impl Pool {
    /// The `i`th connection (modulo the pool's size), for one store operation.
    pub fn connection(&self, i: usize) -> Connection {
        match self {
            Pool::Servers(servers) => Connection::Server(Pinned {
                pool: servers[i % servers.len()].clone(),
                pinned: None,
            }),
            Pool::Cluster(nodes) => Connection::Cluster(nodes[i % nodes.len()].clone()),
        }
    }
}

/// The pool `config` asks for: `pool_size` connections to one server or a cluster, or
/// one to the Sentinels' master (it is multiplexed, and asked for again after a loss).
pub async fn open_pool(config: &RedisConfig) -> Result<Pool, OpenError> {
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    let response_timeout = Duration::from_millis(config.response_timeout_ms);
    let connection_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    let losses = Arc::new(AtomicU64::new(0));
    if !config.sentinels.is_empty() {
        let target = Target::Sentinels(sentinel_client(config)?);
        let connection = Reconnecting::open(target, connection_config, losses).await?;
        return Ok(Pool::Servers(vec![Arc::new(connection)]));
    }
    if config.cluster.is_empty() {
        let client = match tls_roots(config)? {
            Some(roots) => redis::Client::build_with_tls(config.url.as_str(), roots),
            None => redis::Client::open(config.url.as_str()),
        }?;
        let mut servers = Vec::with_capacity(config.pool_size);
        for _ in 0..config.pool_size {
            let target = Target::Server(client.clone());
            let config = connection_config.clone();
            let connection = Reconnecting::open(target, config, losses.clone()).await?;
            servers.push(Arc::new(connection));
        }
        return Ok(Pool::Servers(servers));
    }
    // Nothing re-sent: see the module doc.
    let mut builder = ClusterClient::builder(config.cluster.clone())
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout)
        .retries(0);
    if let Some(roots) = tls_roots(config)? {
        builder = builder.certs(roots);
    }
    let client = builder.build()?;
    let mut nodes = Vec::with_capacity(config.pool_size);
    for _ in 0..config.pool_size {
        nodes.push(client.get_async_connection().await?);
    }
    Ok(Pool::Cluster(nodes))
}

/// Why the pool could not be opened: a setting, or Redis itself.
#[derive(Debug)]
pub enum OpenError {
    Config(StoreError),
    Redis(RedisError),
}

impl From<RedisError> for OpenError {
    fn from(e: RedisError) -> Self {
        OpenError::Redis(e)
    }
}

impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        OpenError::Config(e)
    }
}

fn sentinel_client(config: &RedisConfig) -> RedisResult<SentinelClient> {
    let master_login = (!config.master_password.is_empty()).then(|| {
        let mut login = RedisConnectionInfo::default().set_password(&config.master_password);
        if !config.master_username.is_empty() {
            login = login.set_username(&config.master_username);
        }
        SentinelNodeConnectionInfo::default().set_redis_connection_info(login)
    });
    SentinelClient::build(
        config.sentinels.clone(),
        config.sentinel_master.clone(),
        master_login,
        SentinelServerType::Master,
    )
}

/// The CA certificates of `tls_ca_file`, when set, for `rediss://` connections.
fn tls_roots(config: &RedisConfig) -> Result<Option<TlsCertificates>, StoreError> {
    if config.tls_ca_file.as_os_str().is_empty() {
        return Ok(None);
    }
    // Debian's whole CA bundle is ~220 KB.
    let pem = crate::read_bounded(&config.tls_ca_file, 4 << 20).map_err(|e| {
        StoreError::Database(format!(
            "store.redis.tls_ca_file {}: {e}",
            config.tls_ca_file.display()
        ))
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// Where a [`Reconnecting`] connection connects.
enum Target {
    Server(redis::Client),
    /// The master the Sentinels name, asked for at every connect.
    Sentinels(SentinelClient),
}

/// A multiplexed connection made on demand and forgotten when it breaks (see the
/// module doc).
pub struct Reconnecting {
    /// Held while connecting, so that concurrent requests make one connection.
    target: tokio::sync::Mutex<Target>,
    config: AsyncConnectionConfig,
    current: RwLock<Current>,
    /// Connections the pool lost so far, shared by all its connections.
    losses: Arc<AtomicU64>,
    /// Connect attempts ended so far, and the error of the last one if it failed.
    attempts: AtomicU64,
    last_failure: Mutex<Option<RedisError>>,
    /// When a request last took the connection, in milliseconds since `opened`.
    last_used_ms: AtomicU64,
    opened: Instant,
}

/// The live connection, if any, and how many losses the pool had counted when it was
/// made: it is trusted only while no other was lost since.
#[derive(Default)]
struct Current {
    connection: Option<MultiplexedConnection>,
    losses: u64,
}

impl Reconnecting {
    /// Connects once, so that start-up fails while Redis cannot be reached.
    async fn open(
        target: Target,
        config: AsyncConnectionConfig,
        losses: Arc<AtomicU64>,
    ) -> RedisResult<Self> {
        let connection = Self {
            target: tokio::sync::Mutex::new(target),
            config,
            current: RwLock::default(),
            losses,
            attempts: AtomicU64::new(0),
            last_failure: Mutex::default(),
            last_used_ms: AtomicU64::new(0),
            opened: Instant::now(),
        };
        connection.connection().await?;
        Ok(connection)
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, unless the pool lost one since it was made.
    fn live(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.current();
        let trusted = current.losses == self.losses.load(Ordering::Acquire);
        let connection = current.connection.clone().filter(|_| trusted)?;
        Some((current.losses, connection))
    }

    /// The live connection, or a new one.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(live) = self.live()
            && self.still_open(&live).await?
        {
            return Ok(live);
        }
        self.connect().await
    }

    /// Whether the live connection is still open: one unused for [`IDLE_CHECK`] is
    /// asked with a `PING` first, and counted lost if that meets a closed connection.
    async fn still_open(
        &self,
        (losses, connection): &(u64, MultiplexedConnection),
    ) -> RedisResult<bool> {
        let now_ms = self.opened.elapsed().as_millis() as u64;
        let idle = now_ms.saturating_sub(self.last_used_ms.load(Ordering::Acquire));
        if idle >= IDLE_CHECK.as_millis() as u64 {
            let ping = redis::cmd("PING")
                .query_async::<()>(&mut connection.clone())
                .await;
            match ping {
                Err(e) if connection_lost(&e) => {
                    self.lost(*losses);
                    return Ok(false);
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        self.last_used_ms.store(now_ms, Ordering::Release);
        Ok(true)
    }

    /// A new connection, unless another request made one or failed to while this one
    /// waited.
    async fn connect(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let attempts_before = self.attempts.load(Ordering::Acquire);
        let mut target = self.target.lock().await;
        if let Some(live) = self.live() {
            return Ok(live); // made while this request waited for the lock
        }
        // An attempt failed while this request waited: share its error rather than
        // make another, so that a server that does not answer costs each request one
        // connect timeout at most, not one per request queued ahead of it.
        if self.attempts.load(Ordering::Acquire) != attempts_before
            && let Some(error) = self.last_failure().clone()
        {
            return Err(error);
        }
        let losses = self.losses.load(Ordering::Acquire);
        let connected = match &mut *target {
            Target::Server(client) => {
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await
            }
            Target::Sentinels(sentinels) => {
                let master = sentinels
                    .get_async_connection_with_config(&self.config)
                    .await;
                if master.is_ok() && losses > 0 {
                    tracing::info!("reconnected to the master the Redis Sentinels name");
                }
                master
            }
        };
        *self.last_failure() = connected.as_ref().err().cloned();
        self.attempts.fetch_add(1, Ordering::Release);
        let connection = connected?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current {
            connection: Some(connection.clone()),
            losses,
        };
        let now_ms = self.opened.elapsed().as_millis() as u64;
        self.last_used_ms.store(now_ms, Ordering::Release);
        Ok((losses, connection))
    }

    fn last_failure(&self) -> std::sync::MutexGuard<'_, Option<RedisError>> {
        self.last_failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the connection made at `losses` lost (once, however many requests met
    /// it), so that every connection of the pool is made again.
    fn lost(&self, losses: u64) {
        let _ =
            self.losses
                .compare_exchange(losses, losses + 1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// One store operation's hold on a [`Reconnecting`] connection: its first command
/// pins the connection it runs on, and every later one uses that one. A `WAIT` counts
/// only its own connection's writes, and after a Sentinel failover the rest of an
/// operation begun on the old master must not go to the new one: a pinned connection
/// that breaks fails the rest of the operation (500) instead of moving.
#[derive(Clone)]
pub struct Pinned {
    pool: Arc<Reconnecting>,
    pinned: Option<(u64, MultiplexedConnection)>,
}

impl Pinned {
    /// Runs `request` on the pinned connection (pinning one first if need be).
    async fn run<T, F, R>(&mut self, request: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> R,
        R: Future<Output = RedisResult<T>>,
    {
        let (losses, connection) = match &self.pinned {
            Some(pinned) => pinned.clone(),
            None => self.pinned.insert(self.pool.connection().await?).clone(),
        };
        let result = request(connection).await;
        if let Err(e) = &result
            && connection_lost(e)
        {
            self.pool.lost(losses);
        }
        result
    }
}

/// Errors after which the connection may be gone, or (for a Sentinel master, demoted
/// by a failover) talking to the wrong server.
fn connection_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Server(c) => Box::pin(c.run(move |mut connection| async move {
                connection.req_packed_command(cmd).await
            })),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Server(c) => Box::pin(c.run(move |mut connection| async move {
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            })),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Cluster(c) => c.get_db(),
            Connection::Server(c) => c
                .pinned
                .as_ref()
                .map_or(0, |(_, connection)| connection.get_db()),
        }
    }
}
