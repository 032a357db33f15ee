//! Group commit: concurrent requests share one flush of the embedded database.
//!
//! A writer takes a ticket after its writes and waits until a flush that started after
//! the ticket has finished. One flusher thread runs flushes back to back, so under load
//! each flush covers every write that arrived while the previous one ran. It is a
//! thread of its own, not a task: the next flush starts the moment the last one ends,
//! not once a runtime worker busy with requests gets round to it. A flush answers the
//! waiters it covers, each once, and no other: a request waiting for the next flush is
//! not woken by this one only to wait again.
//!
//! Under heavy concurrency the flusher first waits [`GATHER`] for more writers, as
//! PostgreSQL's `commit_delay` does: a flush costs the same CPU (the fdatasync, the
//! file system's journal commit, the device's interrupt) however many writes it
//! covers, and on two cores that CPU is taken from the requests themselves.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::StoreError;

/// How long a flush waits for more writers when the one before covered at least
/// [`GATHER_AFTER`] tickets. Measured with `otpd bench` (mixed, fjall): at 32 clients
/// 100 µs gave 15–20 % more requests a second than no wait, and a lower p99; 200–300
/// µs less than 100 (BENCHMARKS.md, "Stop 19").
const GATHER: Duration = Duration::from_micros(100);
/// The shared flush that makes the next one wait [`GATHER`]: only many writers at once
/// gain from it. With a few (4 clients) the CPU is not short, and a wait after every
/// shared flush cost them up to 15 % of their rate.
const GATHER_AFTER: u64 = 5;

/// What a waiter is told when its flush is over: whether it succeeded.
type Answer = oneshot::Sender<bool>;

/// Shares flushes of one embedded database among concurrent writers.
pub struct GroupCommit {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

struct Shared {
    next: Mutex<NextFlush>,
    /// The highest ticket a successful flush covered (for the tests).
    durable: AtomicU64,
    stopping: AtomicBool,
    /// Why the first failed flush failed: both engines refuse every flush after one
    /// ([`super::kv::SyncLatch`], fjall's poisoned keyspace, sled's global error).
    failed: watch::Sender<Option<String>>,
}

/// The tickets taken so far, and the waiters the next flush answers: each is told
/// exactly once, by the flush that covers it, so that no waiter is woken in vain.
#[derive(Default)]
struct NextFlush {
    issued: u64,
    waiters: Vec<Answer>,
}

impl GroupCommit {
    /// Starts the flusher thread, which calls `flush` to make every write made before
    /// the call durable (the database's [`Database::flush`](super::kv::Database::flush));
    /// it stops when this value is dropped.
    pub fn start(flush: impl FnMut() -> Result<(), StoreError> + Send + 'static) -> Self {
        Self::start_gathering(GATHER, flush)
    }

    /// [`GroupCommit::start`] with `gather` as the wait for more writers (the tests make
    /// it long enough to tell apart).
    fn start_gathering(
        gather: Duration,
        flush: impl FnMut() -> Result<(), StoreError> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            next: Mutex::default(),
            durable: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            failed: watch::Sender::new(None),
        });
        let flusher = thread::Builder::new()
            .name("otpd-flusher".into())
            .spawn({
                let shared = shared.clone();
                move || flush_loop(flush, &shared, gather)
            })
            .expect("spawning the flusher thread");
        Self {
            shared,
            flusher: Some(flusher),
        }
    }

    /// Waits until everything this task wrote before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let (answer, answered) = oneshot::channel();
        self.take_ticket(Some(answer));
        match answered.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::Database("flush failed".into())),
            Err(_) => Err(StoreError::Database("flusher stopped".into())),
        }
    }

    /// Resolves, with why, once a flush has failed: no later one can succeed.
    pub async fn failed_for_good(&self) -> String {
        let mut failed = self.shared.failed.subscribe();
        // An error only once the sender is gone, which `shared` holds as long as `self`.
        let why = (failed.wait_for(Option::is_some).await).map(|why| why.clone());
        match why {
            Ok(Some(why)) => why,
            _ => std::future::pending().await,
        }
    }

    /// Has a flush start soon for everything written so far, without waiting for it:
    /// for a write that is waited on later, and had better be on disk before then.
    pub fn hasten(&self) {
        self.take_ticket(None);
    }

    /// A ticket for the writes made so far (with the waiter to answer, if any), and
    /// the flusher woken for it.
    fn take_ticket(&self, waiter: Option<Answer>) {
        {
            let mut next = self.shared.lock_next();
            next.issued += 1;
            next.waiters.extend(waiter);
        }
        self.flusher_thread().unpark();
    }

    fn flusher_thread(&self) -> &thread::Thread {
        self.flusher.as_ref().expect("running until drop").thread()
    }
}

impl Shared {
    fn lock_next(&self) -> std::sync::MutexGuard<'_, NextFlush> {
        // Nothing panics while holding it; a poisoned lock holds consistent counts.
        self.next.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
impl GroupCommit {
    /// How many tickets are known durable: rises only when a commit was asked for.
    pub fn durable_tickets(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }
}

impl Drop for GroupCommit {
    /// Stops the flusher after the flush under way, if any: it holds the database, and
    /// the directory must be free once the store is gone.
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(flusher) = self.flusher.take() {
            flusher.thread().unpark();
            let _ = flusher.join();
        }
    }
}

/// Runs flushes back to back while tickets are waiting, each after `gather_for` when
/// the last one was widely shared; parks when no ticket waits.
fn flush_loop(
    mut flush: impl FnMut() -> Result<(), StoreError>,
    shared: &Shared,
    gather_for: Duration,
) {
    let mut settled = 0;
    let mut wait_for_writers = false;
    while !shared.stopping.load(Ordering::Acquire) {
        if shared.lock_next().issued <= settled {
            // An unpark since the check makes this return at once: no ticket is missed.
            thread::park();
            continue;
        }
        if wait_for_writers {
            thread::sleep(gather_for);
        }
        // Every ticket taken so far, and so every write before one, is in this flush.
        let (target, waiters) = {
            let mut next = shared.lock_next();
            (next.issued, std::mem::take(&mut next.waiters))
        };
        wait_for_writers = target - settled >= GATHER_AFTER;
        // A panic in the engine fails the flush's waiters instead of leaving them waiting.
        let flushed = panic::catch_unwind(AssertUnwindSafe(&mut flush))
            .unwrap_or_else(|_| Err(StoreError::Database("the flush panicked".into())));
        settled = target;
        match &flushed {
            Ok(()) => shared.durable.store(target, Ordering::Release),
            Err(error) => {
                tracing::error!(%error, "database flush failed");
                shared.failed.send_if_modified(|failed| {
                    let first = failed.is_none();
                    failed.get_or_insert_with(|| error.to_string());
                    first
                });
            }
        }
        for waiter in waiters {
            // A waiter that gave up (its request was dropped) needs no answer.
            let _ = waiter.send(flushed.is_ok());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Mutex, mpsc};
    use std::task::{Context, Poll, Waker};
    use std::time::Instant;

    use super::*;

    /// A flush that takes `pause`, counts its calls and answers the next of `results`
    /// (then Ok): what the group commit is given by the database.
    fn flush(
        pause: Duration,
        results: Vec<Result<(), StoreError>>,
    ) -> (
        Arc<AtomicUsize>,
        impl FnMut() -> Result<(), StoreError> + Send,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let results = Mutex::new(results.into_iter());
        let counted = calls.clone();
        let flush = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            thread::sleep(pause);
            results.lock().unwrap().next().unwrap_or(Ok(()))
        };
        (calls, flush)
    }

    #[tokio::test]
    async fn concurrent_commits_share_flushes() {
        let (calls, flush) = flush(Duration::from_millis(20), vec![]);
        let group = Arc::new(GroupCommit::start(flush));
        let commits: Vec<_> = (0..32)
            .map(|_| {
                let group = group.clone();
                tokio::spawn(async move { group.commit().await })
            })
            .collect();
        for commit in commits {
            commit.await.unwrap().unwrap();
        }
        let calls = calls.load(Ordering::SeqCst);
        assert!((1..32).contains(&calls), "{calls} flushes for 32 commits");
        assert_eq!(group.durable_tickets(), 32);
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_commits_and_the_next_one_serves_later_ones() {
        let failure = Err(StoreError::Database("disk on fire".into()));
        let (calls, flush) = flush(Duration::ZERO, vec![failure]);
        let group = GroupCommit::start(flush);
        let error = group.commit().await.unwrap_err();
        assert!(error.to_string().contains("flush failed"), "{error}");
        group.commit().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_first_failed_flush_is_reported_as_the_end_of_the_store() {
        let first = Err(StoreError::Database("disk full".into()));
        let second = Err(StoreError::Database("poisoned".into()));
        let (_, flush) = flush(Duration::ZERO, vec![Ok(()), first, second]);
        let group = GroupCommit::start(flush);
        group.commit().await.unwrap();
        let mut failed = pin!(group.failed_for_good());
        let mut context = Context::from_waker(Waker::noop());
        assert!(failed.as_mut().poll(&mut context).is_pending());
        group.commit().await.unwrap_err();
        group.commit().await.unwrap_err();
        // Bounded, to fail rather than hang if the failure is not reported.
        let reported = tokio::time::timeout(Duration::from_secs(60), failed);
        assert_eq!(reported.await.expect("not reported"), "database: disk full");
    }

    #[tokio::test]
    async fn a_panicking_flush_fails_its_commits_instead_of_leaving_them_waiting() {
        let mut first = true;
        let group = GroupCommit::start(move || {
            if std::mem::take(&mut first) {
                panic!("the engine broke");
            }
            Ok(())
        });
        // Bounded, to fail rather than hang if the waiter is left waiting.
        let first = tokio::time::timeout(Duration::from_secs(60), group.commit());
        assert!(first.await.expect("left waiting").is_err());
        group.commit().await.unwrap();
    }

    /// A group commit whose first flush holds until the answer's sender is used or
    /// dropped, and the start of each flush, so that a test can line tickets up behind
    /// the held flush.
    fn with_held_first_flush(
        gather: Duration,
    ) -> (GroupCommit, Arc<Mutex<Vec<Instant>>>, mpsc::Sender<()>) {
        let (release, released) = mpsc::channel::<()>();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut first = true;
        let group = GroupCommit::start_gathering(gather, {
            let starts = starts.clone();
            move || {
                starts.lock().unwrap().push(Instant::now());
                if std::mem::take(&mut first) {
                    let _ = released.recv();
                }
                Ok(())
            }
        });
        (group, starts, release)
    }

    /// Waits until `done`; bounded, to fail rather than hang.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "still waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Takes `tickets` tickets behind the held first flush and releases it: the second
    /// flush covers them all; answers when a ticket taken after that flush was asked.
    fn share_one_flush_among(
        tickets: u64,
        group: &GroupCommit,
        starts: &Mutex<Vec<Instant>>,
        release: mpsc::Sender<()>,
    ) -> Instant {
        group.hasten();
        wait_until("the first flush", || starts.lock().unwrap().len() == 1);
        for _ in 0..tickets {
            group.hasten();
        }
        drop(release);
        wait_until("the shared flush", || {
            group.durable_tickets() == 1 + tickets
        });
        let asked = Instant::now();
        group.hasten();
        wait_until("the next flush", || starts.lock().unwrap().len() == 3);
        asked
    }

    #[test]
    fn a_flush_shared_by_many_makes_the_next_wait_for_more_writers() {
        let gather = Duration::from_millis(300);
        let (group, starts, release) = with_held_first_flush(gather);
        let asked = share_one_flush_among(GATHER_AFTER, &group, &starts, release);
        let waited = starts.lock().unwrap()[2] - asked;
        assert!(waited >= gather, "the next flush began after {waited:?}");
    }

    #[test]
    fn a_flush_shared_by_few_keeps_no_one_waiting() {
        // Beyond the bound of `wait_until`: a wait here fails the test (once it is over).
        let (group, starts, release) = with_held_first_flush(Duration::from_secs(30));
        share_one_flush_among(GATHER_AFTER - 1, &group, &starts, release);
        assert_eq!(starts.lock().unwrap().len(), 3);
    }

    /// A waker that counts its wakes.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiter_is_woken_only_by_the_flush_that_covers_it() {
        // Each flush holds until it is released (or for 20 s: a failed assertion drops
        // the group, which waits for the flush under way), and notes its start.
        let (release, released) = mpsc::channel::<()>();
        let starts = Arc::new(AtomicUsize::new(0));
        let group = GroupCommit::start_gathering(Duration::ZERO, {
            let starts = starts.clone();
            move || {
                starts.fetch_add(1, Ordering::SeqCst);
                let _ = released.recv_timeout(Duration::from_secs(20));
                Ok(())
            }
        });
        group.hasten();
        wait_until("the first flush", || starts.load(Ordering::SeqCst) == 1);

        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut context = Context::from_waker(&waker);
        let mut commit = pin!(group.commit());
        assert!(commit.as_mut().poll(&mut context).is_pending());

        // The flush under way did not cover the commit; the next one starts only once
        // that one has answered its own waiters.
        release.send(()).unwrap();
        wait_until("the second flush", || starts.load(Ordering::SeqCst) == 2);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "woken by the earlier flush"
        );

        release.send(()).unwrap();
        wait_until("the commit's answer", || {
            wakes.0.load(Ordering::SeqCst) == 1
        });
        assert!(matches!(
            commit.as_mut().poll(&mut context),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_group_commit_lets_go_of_what_its_flush_holds() {
        let held = Arc::new(());
        let group = GroupCommit::start({
            let held = held.clone();
            move || {
                let _ = &held;
                Ok(())
            }
        });
        group.hasten();
        drop(group);
        assert_eq!(Arc::strong_count(&held), 1, "the flusher still holds it");
    }
}
