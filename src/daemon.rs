//! `otpd serve`: wires config, secret, store, delivery, janitor, server and the optional
//! HTTP listener together and runs them until the shutdown future resolves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use tokio::task::JoinHandle;
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
use crate::store::embedded::kv::Database;
use crate::store::embedded::{self, EmbeddedStore, FjallStore, SledStore};
use crate::store::redis::RedisStore;
use crate::systemd;

/// The engine the configuration names, opened (or connected to, for Redis, which
/// checks that every host shares `secret`). A secret `drawn` at this start is saved
/// once the store is open, or for Redis reached and found to hold no other host's
/// secret, so that a start that cannot open its store or was given the wrong setup
/// leaves no secret file; for Redis before its fingerprint is recorded there, so that
/// Redis never records the fingerprint of a secret not kept.
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
            let store: SledStore = open_embedded(config, limits, secret, drawn)?;
            keep()?;
            Arc::new(store)
        }
        Engine::Fjall => {
            let store: FjallStore = open_embedded(config, limits, secret, drawn)?;
            keep()?;
            Arc::new(store)
        }
        Engine::Redis => {
            let store = RedisStore::reach(&config.store.redis, limits).await?;
            store.refuse_another_secret(secret, drawn).await?;
            keep()?;
            store.check_in(secret).await?;
            Arc::new(store)
        }
    })
}

/// The embedded store on `D`, refused if its codes were made with another secret.
fn open_embedded<D: Database>(
    config: &Config,
    limits: Limits,
    secret: &ServerSecret,
    drawn: bool,
) -> anyhow::Result<EmbeddedStore<D>> {
    let store = EmbeddedStore::<D>::open(&config.store, limits, drawn)?;
    store.check_secret(secret, drawn, &config.store.path, &config.store.secret_file)?;
    Ok(store)
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
    // Tasks that run until shutdown: one that ends before has panicked, and the daemon
    // stops rather than go on without it.
    let mut essential = vec![(
        "janitor",
        tracker.spawn(janitor::run(
            store.clone(),
            counters,
            wakeup,
            config.janitor.clone(),
            stop.clone(),
        )),
    )];
    if let Some(task) = delivery.background(stop.clone()) {
        essential.push(("delivery task", tracker.spawn(task)));
    }
    if let Some(task) = http::start(&config, otp.clone(), stop.clone(), &tracker).await? {
        essential.push(("HTTP listener", task));
    }
    tracker.spawn(systemd::watchdog(store.clone(), stop.clone()));
    let socket = listener.name().to_owned();
    essential.push((
        "socket server",
        tracker.spawn({
            let (otp, stop, tracker) = (otp.clone(), stop.clone(), tracker.clone());
            let server_config = config.server.clone();
            async move { server::serve(listener, otp, &server_config, stop, tracker).await }
        }),
    ));
    tracing::info!(
        %socket,
        live = store.live(),
        "otpd {} ready",
        crate::handler::VERSION
    );
    systemd::ready(&format!("serving on {socket}"));

    let stopped = tokio::select! {
        () = shutdown => Stopped::Asked,
        (index, error) = first_to_end(&mut essential) => {
            let task = essential.swap_remove(index).0;
            tracing::error!(task, error, "a task stopped by itself; shutting down");
            Stopped::TaskEnded(format!("the {task} stopped by itself: {error}"))
        }
        error = store.failed_for_good() => {
            tracing::error!(
                error,
                "the store can no longer write; shutting down, so that a restart recovers \
                 it from its journal"
            );
            Stopped::StoreFailed(format!("the store can no longer write: {error}"))
        }
    };
    tracing::info!("shutting down: finishing in-flight requests");
    systemd::stopping("shutting down: finishing in-flight requests");
    stop.cancel();
    for (_, task) in essential {
        let _ = task.await;
    }
    tracker.close();
    tracker.wait().await;
    // Exiting non-zero lets systemd restart the daemon. A store that failed for good
    // is not flushed: that would fail too.
    match stopped {
        Stopped::Asked => store.flush().await?,
        Stopped::TaskEnded(why) => {
            store.flush().await?;
            anyhow::bail!(why);
        }
        Stopped::StoreFailed(why) => anyhow::bail!(why),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Why [`run`] stops.
enum Stopped {
    /// The shutdown future resolved (SIGTERM, SIGINT).
    Asked,
    /// A task that should run until shutdown ended: it panicked.
    TaskEnded(String),
    /// The store can no longer write ([`Store::failed_for_good`]).
    StoreFailed(String),
}

/// Waits until one of `tasks` ends; answers its index and why (a task that runs until
/// shutdown ends before only by panicking).
async fn first_to_end(tasks: &mut [(&'static str, JoinHandle<()>)]) -> (usize, String) {
    std::future::poll_fn(|cx| {
        for (index, (_, task)) in tasks.iter_mut().enumerate() {
            if let Poll::Ready(ended) = Pin::new(task).poll(cx) {
                let why = ended.err().map_or("ended".into(), |e| e.to_string());
                return Poll::Ready((index, why));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_panic() {
        let mut tasks = vec![
            ("forever", tokio::spawn(std::future::pending())),
            ("broken", tokio::spawn(async { panic!("a bug") })),
        ];
        let (index, why) = first_to_end(&mut tasks).await;
        assert_eq!(tasks[index].0, "broken");
        assert!(why.contains("panicked"), "{why}");
        assert!(!tasks[0].1.is_finished());
    }
}
