//! systemd integration: the socket `otpd.socket` passes in (socket activation), the
//! `sd_notify` messages `Type=notify` expects (readiness, status, stopping, watchdog),
//! and a log format for the journal.
//!
//! Each part does nothing outside systemd (no `LISTEN_FDS`, no `NOTIFY_SOCKET`, no
//! `WATCHDOG_USEC`, no `JOURNAL_STREAM`), so the daemon keeps one code path.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use nix::sys::socket::{SockType, getsockopt, sockopt};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::store::Store;

/// The listening socket systemd passed.
#[derive(Debug)]
pub struct Activation {
    pub listener: UnixListener,
}

/// Takes the listening socket systemd passed (`LISTEN_FDS` / `LISTEN_PID`), if any.
///
/// Call it from `main` before the runtime starts its threads: the descriptor then
/// cannot leak into a child or be mistaken for another. It takes ownership of fd 3,
/// so only the first call can return it. Anything but one listening Unix stream socket
/// is refused, because `accept` on it would fail forever.
pub fn take_activation() -> anyhow::Result<Option<Activation>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let mut fds = sd_notify::listen_fds().context("socket activation (LISTEN_FDS)")?;
    let count = fds.len();
    if count == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    anyhow::ensure!(
        count == 1,
        "systemd passed {count} sockets; otpd.socket must have exactly one ListenStream="
    );
    let raw = fds.next().expect("one descriptor");
    // SAFETY: systemd passed this descriptor for this process to own (LISTEN_PID
    // matched, see sd_listen_fds(3)); TAKEN guarantees it is wrapped only once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let kind = getsockopt(&fd, sockopt::SockType).context("fd 3 from systemd")?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).context("fd 3 from systemd")?;
    anyhow::ensure!(
        kind == SockType::Stream && listening,
        "fd 3 from systemd is not a listening stream socket (use ListenStream= without Accept=)"
    );
    let listener = UnixListener::from(fd);
    listener
        .local_addr()
        .context("fd 3 from systemd is not a Unix socket (ListenStream= takes a path)")?;
    Ok(Some(Activation { listener }))
}

/// Sends `states` to systemd; a failure is logged, never fatal (systemd then times
/// the start out or restarts us, which says more than we could).
fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Shows `status` in `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `EXTEND_TIMEOUT_USEC`: a start that is making progress (moving a database to a new
/// layout) asks for `more` time, shown as `status`, so that `TimeoutStartSec=` does not
/// kill it halfway (a move killed halfway starts over, and would never end); a start
/// that stops making progress still times out.
pub fn still_starting(status: &str, more: Duration) {
    let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
    notify(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(status),
    ]);
}

/// `READY=1`: the socket listens and the store is open, so a client that connects
/// now is answered.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Sends `WATCHDOG=1` at half the interval systemd set (`WATCHDOG_USEC`), each time
/// only after a [`Store::probe`] came back. A store that hangs (a stuck flush, a wedged
/// runtime) withholds the pings, so systemd kills and restarts the daemon. A store that
/// answers with an error (Redis down, say) does not: otpd recovers from that by itself
/// once the database does, while a restart would not help and, with Redis down, would
/// fail at start-up. Returns at once when no watchdog was asked for, and when `stop`
/// is cancelled.
pub async fn watchdog(store: Arc<dyn Store>, stop: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (timeout / 2).max(Duration::from_millis(1));
    tracing::info!(interval_ms = period.as_millis(), "watchdog enabled");
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let probe = tokio::select! {
            _ = stop.cancelled() => return,
            probe = async {
                ticks.tick().await;
                store.probe().await
            } => probe,
        };
        match (&probe, failing) {
            (Ok(()), true) => tracing::info!("the store answers again"),
            (Err(error), false) => tracing::error!(
                %error,
                "the store fails: requests answer 500 until it recovers by itself"
            ),
            _ => {}
        }
        failing = probe.is_err();
        notify(&[NotifyState::Watchdog]);
    }
}

/// True when stderr is the journal: `JOURNAL_STREAM` names the device and inode of
/// stderr itself, not merely of something an ancestor had (systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}

/// Formats events for journald's stream: a `<N>` syslog priority first (journald turns
/// it into the entry's priority, so `journalctl -p warning` works) and the level name,
/// then `inner`, which should carry no level, no timestamp (the journal has its own)
/// and no colours.
#[derive(Debug)]
pub struct JournalFormat<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        write!(writer, "<{}>{level} ", syslog_priority(level))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority (sd-daemon(3) prefix) of a tracing level.
fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::DEBUG), 7);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }
}
