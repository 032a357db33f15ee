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
//! A cluster connection re-sends nothing on its own (`retries(0)`). redis-rs re-sends
//! a command whose connection dropped before its answer came, and a commit script that
//! had run would then find its own write, answer "changed", and have the engine plan
//! again on top of it: a right code answering 409, a wrong guess counted twice, a
//! create refused by its own send. redis-rs cannot tell that case from the safe ones.
//! otpd can: [`OnCluster`] sends a command again only after an answer that says the
//! cluster did not run it: `MOVED` or `ASK` (its slot moved, or is moving, to another
//! node: sent there, after `ASKING` for an `ASK`), `TRYAGAIN` (a slot whose keys are
//! split between two nodes mid-migration) or `CLUSTERDOWN`. So a resharding costs a
//! request a few round trips, not a 500. (The node importing a slot answers `TRYAGAIN`
//! to a read of several keys one of which it lacks, as it may still be on the other
//! node, until the slot's move ends: a wrong code typed meanwhile waits for that, for
//! [`CLUSTER_RESENDS`] × [`CLUSTER_RESEND_WAIT`] at most.) A dropped connection, a
//! timeout or `READONLY` (a failover) still fail the request (500); redis-rs reconnects
//! or refreshes its slot map, so the next request goes to the right node. (Pipelines,
//! used only for the `live` set's counts, are not followed: a failure there only skews
//! `stats`.)
//!
//! A store operation holds one [`Pinned`] handle: all its commands go to one
//! connection, so a `WAIT` counts the writes it follows, and an operation a Sentinel
//! failover interrupts fails (500) instead of finishing on the new master.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Arg, AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, TlsCertificates, Value,
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
    Cluster(OnCluster),
}

/// The pool: `Reconnecting` connections to a server or the Sentinels' master, or
/// cluster connections.
pub enum Pool {
    Servers(Vec<Arc<Reconnecting>>),
    Cluster(Vec<ClusterConnection>, Arc<NamedNodes>),
}

impl Pool {
    /// The `i`th connection (modulo the pool's size), for one store operation.
    pub fn connection(&self, i: usize) -> Connection {
        match self {
            Pool::Servers(servers) => Connection::Server(Pinned {
                pool: servers[i % servers.len()].clone(),
                pinned: None,
            }),
            Pool::Cluster(nodes, named) => Connection::Cluster(OnCluster {
                cluster: nodes[i % nodes.len()].clone(),
                named: named.clone(),
                named_used: Vec::new(),
            }),
        }
    }
}

/// The pool `config` asks for: `pool_size` connections to one server or a cluster, or
/// one to the Sentinels' master (it is multiplexed, and asked for again after a loss).
/// `scripts`: the Lua scripts otpd calls, for the cluster nodes it reaches by itself.
pub async fn open_pool(
    config: &RedisConfig,
    scripts: &'static [&'static str],
) -> Result<Pool, OpenError> {
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
    let roots = tls_roots(config)?;
    if let Some(roots) = &roots {
        builder = builder.certs(roots.clone());
    }
    let client = builder.build()?;
    let named = Arc::new(NamedNodes {
        like: config.cluster[0].as_str().into_connection_info()?,
        roots,
        config: connection_config,
        scripts,
        open: tokio::sync::Mutex::default(),
    });
    let mut nodes = Vec::with_capacity(config.pool_size);
    for _ in 0..config.pool_size {
        nodes.push(client.get_async_connection().await?);
    }
    Ok(Pool::Cluster(nodes, named))
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

/// How many times [`OnCluster::follow`] sends a command again: one command meets a moving
/// slot's `ASK`, or a moved one's `MOVED`, once or twice at most.
const CLUSTER_RESENDS: usize = 8;
/// How long [`OnCluster::follow`] waits before sending again after `TRYAGAIN` or
/// `CLUSTERDOWN`: keys are moved a batch at a time, in milliseconds.
const CLUSTER_RESEND_WAIT: Duration = Duration::from_millis(20);

/// One store operation's hold on a cluster connection of the pool, and on the nodes
/// it reached over connections of otpd's own ([`NamedNodes`]).
#[derive(Clone)]
pub struct OnCluster {
    cluster: ClusterConnection,
    named: Arc<NamedNodes>,
    /// The nodes this operation sent a command to through `named`: a `WAIT` counts
    /// only its own connection's writes, so it is sent there too.
    named_used: Vec<(String, u16)>,
}

impl OnCluster {
    /// Runs `cmd` ([`OnCluster::follow`]); a `WAIT` also on each node this operation
    /// reached through [`NamedNodes`], answering the fewest replicas of all.
    async fn send(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let answer = self.follow(cmd).await?;
        let name = cmd.args_iter().next();
        if !matches!(name, Some(Arg::Simple(name)) if name.eq_ignore_ascii_case(b"WAIT")) {
            return Ok(answer);
        }
        let mut fewest = i64::from_redis_value(answer)?;
        for (host, port) in &self.named_used {
            let there = self.named.send(host, *port, false, cmd).await?;
            fewest = fewest.min(i64::from_redis_value(there)?);
        }
        Ok(Value::Int(fewest))
    }

    /// Runs `cmd` on the cluster, and again when the cluster answers that it did not
    /// run it (see the module doc): after `MOVED` or `ASK` on the node named (after
    /// `ASKING` for an `ASK`), not where redis-rs's slot map, refreshed meanwhile, may
    /// still point; after `TRYAGAIN` or `CLUSTERDOWN` once [`CLUSTER_RESEND_WAIT`] is
    /// over.
    async fn follow(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        // The node the last answer named, and whether it asked for an `ASKING` first.
        let mut sent_to: Option<(String, u16, bool)> = None;
        let mut resends = 0;
        loop {
            let answer = match sent_to.take() {
                None => self.cluster.req_packed_command(cmd).await,
                Some((host, port, asking)) => {
                    let node = (host, port);
                    if !self.named_used.contains(&node) {
                        self.named_used.push(node.clone());
                    }
                    self.named.send(&node.0, node.1, asking, cmd).await
                }
            };
            let Err(error) = &answer else { return answer };
            if resends == CLUSTER_RESENDS {
                return answer;
            }
            resends += 1;
            match error.kind() {
                ErrorKind::Server(kind @ (ServerErrorKind::Ask | ServerErrorKind::Moved)) => {
                    // `redirect_node` gives the node's "host:port" and the slot.
                    let node = error.redirect_node().and_then(|(node, _slot)| {
                        let (host, port) = node.rsplit_once(':')?;
                        Some((host.to_owned(), port.parse().ok()?))
                    });
                    let asking = kind == ServerErrorKind::Ask;
                    sent_to = node.map(|(host, port)| (host, port, asking));
                }
                ErrorKind::Server(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown) => {
                    tokio::time::sleep(CLUSTER_RESEND_WAIT).await;
                }
                _ => return answer,
            }
        }
    }
}

/// Connections of otpd's own to the nodes a cluster's `ASK` or `MOVED` names. redis-rs
/// connects to a node outside its slot map (an empty node that a slot is moving to)
/// only when it retries a command itself, which otpd does not let it do.
pub struct NamedNodes {
    /// The first seed's address, credentials and TLS, for the others.
    like: ConnectionInfo,
    roots: Option<TlsCertificates>,
    config: AsyncConnectionConfig,
    /// Loaded on each node when connected: redis-rs loads a script on the nodes of its
    /// slot map alone, so a command's `EVALSHA` would meet `NOSCRIPT` there.
    scripts: &'static [&'static str],
    open: tokio::sync::Mutex<HashMap<(String, u16), MultiplexedConnection>>,
}

impl NamedNodes {
    /// Sends `cmd` to the node at `host`:`port`, right after an `ASKING` when `asking`.
    async fn send(&self, host: &str, port: u16, asking: bool, cmd: &Cmd) -> RedisResult<Value> {
        let mut connection = self.connection(host, port).await?;
        let mut pipe = redis::pipe();
        if asking {
            pipe.cmd("ASKING");
        }
        pipe.add_command(cmd.clone());
        let sent = connection
            .req_packed_commands(&pipe, usize::from(asking), 1)
            .await;
        if let Err(error) = &sent
            && connection_lost(error)
        {
            self.open.lock().await.remove(&(host.to_owned(), port));
        }
        match sent?.pop() {
            Some(answer) => answer.extract_error(),
            None => Err((ErrorKind::Client, "no answer from the node named").into()),
        }
    }

    /// The open connection to `host`:`port`, or a new one.
    async fn connection(&self, host: &str, port: u16) -> RedisResult<MultiplexedConnection> {
        let mut open = self.open.lock().await;
        let node = (host.to_owned(), port);
        if let Some(connection) = open.get(&node) {
            return Ok(connection.clone());
        }
        let address = match self.like.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let info = self.like.clone().set_addr(address);
        let client = match &self.roots {
            Some(roots) => redis::Client::build_with_tls(info, roots.clone()),
            None => redis::Client::open(info),
        }?;
        let mut connection =
            (client.get_multiplexed_async_connection_with_config(&self.config)).await?;
        for script in self.scripts {
            let load = redis::cmd("SCRIPT").arg("LOAD").arg(*script).to_owned();
            load.query_async::<String>(&mut connection).await?;
        }
        open.insert(node, connection.clone());
        Ok(connection)
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
            Connection::Cluster(c) => Box::pin(c.send(cmd)),
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
            Connection::Cluster(c) => c.cluster.req_packed_commands(pipeline, offset, count),
            Connection::Server(c) => Box::pin(c.run(move |mut connection| async move {
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            })),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Cluster(c) => c.cluster.get_db(),
            Connection::Server(c) => c
                .pinned
                .as_ref()
                .map_or(0, |(_, connection)| connection.get_db()),
        }
    }
}
