//! `otpd serve`: wires config, secret, store, delivery, janitor, server and the optional
//! HTTP listener together and runs them until the shutdown future resolves.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Engine};
use crate::delivery;
use crate::http;
use crate::janitor::{self, Wakeup};
use crate::metrics::Counters;
use crate::otp::Otp;
use crate::rules::Limits;
use crate::secret::ServerSecret;
use crate::server::{self, Listener};
use crate::store::Store;
use crate::store::embedded::{self, FjallStore, SledStore};
use crate::store::redis::RedisStore;
use crate::systemd;

/// The engine the configuration names, opened (or connected to, for Redis, which
/// checks that every host shares `secret`). A secret `drawn` at this start is saved
/// once the store is open, or for Redis reached, so that a start that cannot open its
/// store leaves no secret file; for Redis before the other hosts' secret is compared
/// with it, so that Redis never records the fingerprint of a secret not kept.
async fn open_store(
    config: &Config,
    secret: &ServerSecret,
    drawn: bool,
) -> anyhow::Result<Arc<dyn Store>> {
    let limits = Limits::from(&config.otp);
    let keep = || -> anyhow::Result<()> {
        if drawn {
            secret.save(&config.store.secret_file)?;
            tracing::info!(path = %config.store.secret_file.display(), "created a new server secret");
        }
        Ok(())
    };
    let engine = config
        .store
        .engine
        .unwrap_or_else(|| embedded::engine_at(&config.store.path));
    tracing::info!(engine = engine.name(), "opening the store");
    Ok(match engine {
        Engine::Sled => {
            let store = SledStore::open(&config.store, limits)?;
            keep()?;
            Arc::new(store)
        }
        Engine::Fjall => {
            let store = FjallStore::open(&config.store, limits)?;
            keep()?;
            Arc::new(store)
        }
        Engine::Redis => {
            let store = RedisStore::reach(&config.store.redis, limits).await?;
            keep()?;
            store.check_in(secret).await?;
            Arc::new(store)
        }
    })
}

/// Runs the daemon on `listener` until `shutdown` resolves, then stops accepting,
/// lets in-flight requests finish, flushes the store and returns.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    server::raise_open_file_limit(config.server.max_connections);
    systemd::status("opening the store");
    let (secret, drawn) = ServerSecret::load_or_draw(&config.store.secret_file)?;
    let store = open_store(&config, &secret, drawn).await?;
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let delivery = delivery::from_config(
        &config,
        counters.clone(),
        store.clone(),
        &secret,
        stop.clone(),
    )?;
    let wakeup = Arc::new(Wakeup::default());
    let otp = Arc::new(Otp::new(
        config.otp.clone(),
        secret,
        store.clone(),
        delivery.clone(),
        config.delivery.template.clone(),
        counters.clone(),
        wakeup.clone(),
    ));

    let tracker = TaskTracker::new();
    tracker.spawn(janitor::run(
        store.clone(),
        counters,
        wakeup,
        config.janitor.clone(),
        stop.clone(),
    ));
    if let Some(task) = delivery.background(stop.clone()) {
        tracker.spawn(task);
    }
    http::start(&config, otp.clone(), stop.clone(), &tracker).await?;
    tracker.spawn(systemd::watchdog(store.clone(), stop.clone()));
    let server = tracker.spawn({
        let (otp, stop, tracker) = (otp.clone(), stop.clone(), tracker.clone());
        let server_config = config.server.clone();
        async move { server::serve(listener, otp, &server_config, stop, tracker).await }
    });
    tracing::info!(
        socket = %config.server.socket.display(),
        live = store.live(),
        "otpd {} ready",
        crate::handler::VERSION
    );
    systemd::ready(&format!("serving on {}", config.server.socket.display()));

    let mut server = server;
    // The server runs until shutdown; one that ends before has panicked.
    let crashed = tokio::select! {
        () = shutdown => None,
        ended = &mut server => Some(ended.err().map_or("ended".into(), |e| e.to_string())),
    };
    tracing::info!("shutting down: finishing in-flight requests");
    systemd::stopping("shutting down: finishing in-flight requests");
    stop.cancel();
    if crashed.is_none() {
        let _ = server.await;
    }
    tracker.close();
    tracker.wait().await;
    store.flush().await?;
    if let Some(error) = crashed {
        // Exiting non-zero lets systemd restart the daemon.
        anyhow::bail!("the socket server stopped by itself: {error}");
    }
    tracing::info!("stopped");
    Ok(())
}
