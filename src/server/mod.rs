//! The Unix-socket server: accepts on the socket ([`Listener`]), admits each peer by
//! its credentials ([`PeerPolicy`]), and runs one task per connection that answers
//! JSON lines in order.

mod listener;
mod peer;

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::handler;
use crate::otp::Otp;
use crate::protocol::Response;

pub use listener::{AcceptBackoff, Listener, raise_open_file_limit};
pub use peer::PeerPolicy;

/// What each connection is held to, from `[server]`: who may connect, and its limits.
#[derive(Debug, Clone)]
struct ConnectionPolicy {
    max_request_bytes: usize,
    idle_timeout: Duration,
    peers: PeerPolicy,
}

/// Accepts connections until `shutdown`, each served by its own task on `tracker`.
pub async fn serve(
    listener: Listener,
    otp: Arc<Otp>,
    config: &ServerConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let policy = Arc::new(ConnectionPolicy {
        max_request_bytes: config.max_request_bytes,
        idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        peers: PeerPolicy::new(config),
    });
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    backoff.wait("socket", &error).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracker.spawn(refuse(
                stream,
                Response::error(
                    None,
                    503,
                    "busy",
                    "too many connections; try again".into(),
                    None,
                ),
            ));
            continue;
        };
        let (otp, policy, shutdown) = (otp.clone(), policy.clone(), shutdown.clone());
        tracker.spawn(async move {
            serve_connection(stream, &otp, &policy, shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
}

/// Answers one error line and closes, without waiting long for a slow peer.
async fn refuse(mut stream: UnixStream, response: Response) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&response.to_line()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection(
    stream: UnixStream,
    otp: &Otp,
    policy: &ConnectionPolicy,
    shutdown: CancellationToken,
) {
    if !policy.peers.admits(&stream, "socket") {
        let message = "this user may not use otpd".to_owned();
        return refuse(
            stream,
            Response::error(None, 403, "forbidden", message, None),
        )
        .await;
    }
    let (read, write) = match stream.into_std().and_then(crate::unix_stream::split) {
        Ok(halves) => halves,
        Err(error) => return tracing::warn!(%error, "could not serve a connection"),
    };
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let mut line = Vec::new();
    // One timer and one shutdown waiter for the connection's life, not one per request:
    // moving a timer's deadline later touches no shared state, and a child token's
    // waiters are the connection's own.
    let idle = tokio::time::sleep(policy.idle_timeout);
    let stopped = shutdown.child_token().cancelled_owned();
    tokio::pin!(idle, stopped);
    loop {
        idle.as_mut()
            .reset(tokio::time::Instant::now() + policy.idle_timeout);
        let read = tokio::select! {
            biased;
            // A request already read is always answered; shutdown only stops reading.
            () = &mut stopped => break,
            read = read_line(&mut reader, &mut line, policy.max_request_bytes) => read,
            () = &mut idle => break,
        };
        let response = match read {
            Err(_) | Ok(LineRead::Eof) => break,
            Ok(LineRead::TooLong) => {
                let message = format!("request line exceeds {} bytes", policy.max_request_bytes);
                let response = Response::error(None, 413, "request_too_large", message, None);
                let write = write_line(&mut writer, &response, true);
                let _ = wait_for_peer(write, policy.idle_timeout, &shutdown).await;
                break;
            }
            Ok(LineRead::Line) => {
                // Timed alone: not the write of earlier answers it may wait on.
                let respond = async {
                    let started = Instant::now();
                    let response = handler::respond(otp, &line).await;
                    otp.counters().socket_latency.observe(started.elapsed());
                    response
                };
                let Some(response) =
                    answer_meanwhile(respond, &mut writer, policy, &shutdown).await
                else {
                    return;
                };
                response
            }
        };
        // Answers to pipelined requests share one write while whole requests are left
        // in the input (the start of one is not enough: its end may be long coming),
        // unless one of them waits ([`answer_meanwhile`]).
        let more_buffered = reader.buffer().contains(&b'\n');
        let write = write_line(&mut writer, &response, !more_buffered);
        if !matches!(
            wait_for_peer(write, policy.idle_timeout, &shutdown).await,
            Some(Ok(()))
        ) {
            return;
        }
    }
    let close = async {
        writer.flush().await?;
        writer.shutdown().await
    };
    let _ = wait_for_peer(close, policy.idle_timeout, &shutdown).await;
}

/// Runs `respond`. Answers held back for one write of a pipelined batch go out first
/// if it waits (on the disk, on Vonage: a create's delivery can take minutes), instead
/// of after it. `None` when the peer did not take them ([`wait_for_peer`]); the request
/// is still carried out.
async fn answer_meanwhile<W: AsyncWrite + Unpin>(
    respond: impl Future<Output = Response>,
    writer: &mut BufWriter<W>,
    policy: &ConnectionPolicy,
    shutdown: &CancellationToken,
) -> Option<Response> {
    let mut respond = std::pin::pin!(respond);
    let first_poll = std::future::poll_fn(|cx| Poll::Ready(respond.as_mut().poll(cx))).await;
    match first_poll {
        Poll::Ready(response) => Some(response),
        Poll::Pending if writer.buffer().is_empty() => Some(respond.await),
        Poll::Pending => {
            let held = wait_for_peer(writer.flush(), policy.idle_timeout, shutdown);
            let (response, sent) = tokio::join!(respond, held);
            matches!(sent, Some(Ok(()))).then_some(response)
        }
    }
}

/// Once shutdown has begun, how long a peer that does not read its answers is waited
/// for (otherwise `idle_timeout`), so that one such peer cannot hold the stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs I/O with a peer (a write of answers, a read of a request body); `None` when the
/// peer has not done its part within `idle`, or, once shutdown has begun, within
/// [`SHUTDOWN_GRACE`] (counted from this call, or from the start of shutdown if later).
pub async fn wait_for_peer<T>(
    io: impl Future<Output = T>,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Option<T> {
    let shutdown_grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        // I/O first: when it is ready at once, as a write of an answer mostly is, no
        // timer is set.
        biased;
        done = io => Some(done),
        _ = tokio::time::sleep(idle) => None,
        _ = shutdown_grace_over => None,
    }
}

/// Writes one answer, and flushes when `flush`.
async fn write_line<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    response: &Response,
    flush: bool,
) -> std::io::Result<()> {
    writer.write_all(&response.to_line()).await?;
    if flush {
        writer.flush().await?;
    }
    Ok(())
}

/// The outcome of reading one request line.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line is in the buffer (without its `\n` or `\r\n`; a final line may lack one).
    Line,
    /// The peer closed its side with nothing pending.
    Eof,
    /// The line exceeded the limit; nothing beyond the limit (and one `\r`) was buffered.
    TooLong,
}

/// Reads one `\n`-terminated line into `line`, refusing to buffer more than `max` bytes.
/// A `\r` before the `\n` belongs to the terminator: it is neither counted nor kept, so
/// a CRLF client has the same limit as an LF one.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk, found_newline) = match find_newline(available) {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        // A last `\r` may be a CRLF's, its `\n` in this chunk or yet to come.
        let ends_in_cr = chunk.last().or(line.last()) == Some(&b'\r');
        if line.len() + chunk.len() - usize::from(ends_in_cr) > max {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(chunk);
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            if ends_in_cr {
                line.pop();
            }
            return Ok(LineRead::Line);
        }
    }
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(LineRead, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            let read = read_line(&mut reader, &mut line, max).await.unwrap();
            let stop = read != LineRead::Line;
            out.push((read, line.clone()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn splits_lines_across_small_reads() {
        let got = lines(b"{\"a\":1}\n\nxyz", 100).await;
        assert_eq!(got[0], (LineRead::Line, b"{\"a\":1}".to_vec()));
        assert_eq!(got[1], (LineRead::Line, b"".to_vec()));
        assert_eq!(got[2], (LineRead::Line, b"xyz".to_vec()));
        assert_eq!(got[3].0, LineRead::Eof);
    }

    #[tokio::test]
    async fn refuses_a_line_over_the_limit_before_buffering_it() {
        let got = lines(b"12345678\n", 8).await;
        assert_eq!(got[0], (LineRead::Line, b"12345678".to_vec()));
        let got = lines(b"123456789\n", 8).await;
        assert_eq!(got[0].0, LineRead::TooLong);
        assert!(got[0].1.len() <= 8);
    }

    #[tokio::test]
    async fn a_crlf_line_is_measured_and_kept_without_its_cr() {
        // The reader's 4-byte buffer puts the `\r` and the `\n` in different reads.
        let got = lines(b"1234567\r\n12345678\r\nab\r\r\n", 8).await;
        let expected =
            [&b"1234567"[..], b"12345678", b"ab\r"].map(|l| (LineRead::Line, l.to_vec()));
        assert_eq!(got[..3], expected);
        // Only a `\r` right before the `\n` is free: one within the line counts.
        for input in [&b"1234567\r8\r\n"[..], b"12345678\r\r\n"] {
            assert_eq!(lines(input, 8).await[0].0, LineRead::TooLong);
        }
    }
}
