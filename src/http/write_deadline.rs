//! A connection whose writes may wait for the peer only so long.
//!
//! hyper times out a request head that is slow to come, but not an answer the peer does
//! not read: a client that sends requests and never reads the answers blocks hyper's
//! write once the socket buffers fill, and holds its connection slot for good.
//! `max_connections` such clients would shut everyone else out, Vonage's webhooks
//! included. The Unix socket bounds its writes the same way ([`crate::server::wait_for_peer`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `S` with each write, flush and shutdown failing `TimedOut` once it has waited
/// `limit` for the peer without making progress.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Set while a write waits for the peer: when it gives up. Reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes on what the write returned, unless it has waited past the limit.
    fn bound<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(stalled.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer read nothing for idle_timeout_secs",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.bound(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bound(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.bound(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.bound(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_does_not_take_fails_at_the_limit() {
        let (near, _far) = tokio::io::duplex(16);
        let mut bounded = WriteDeadline::new(near, LIMIT);
        bounded.write_all(&[1; 16]).await.unwrap();

        // The pipe is full and nobody reads: the next write waits out the limit.
        let started = tokio::time::Instant::now();
        let error = bounded.write_all(&[2; 8]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_slowly_is_waited_for() {
        let (near, mut far) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut taken = Vec::new();
            let mut chunk = [0; 8];
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                match far.read(&mut chunk).await.unwrap() {
                    0 => return taken,
                    read => taken.extend_from_slice(&chunk[..read]),
                }
            }
        });
        let mut bounded = WriteDeadline::new(near, LIMIT);
        // 18 s of writing in all, 3 s at most without progress.
        let started = tokio::time::Instant::now();
        bounded.write_all(&[7; 64]).await.unwrap();
        assert!(started.elapsed() > LIMIT);
        bounded.shutdown().await.unwrap();
        drop(bounded);
        assert_eq!(reader.await.unwrap(), vec![7; 64]);
    }
}
