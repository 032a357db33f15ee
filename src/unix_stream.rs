//! Unix stream connections registered with the reactor for reading only.
//!
//! tokio registers a `UnixStream` with epoll for readability and writability. Then
//! whenever the peer reads what this side wrote, the kernel, in the peer's `recv`,
//! tells this side's epoll that the socket is writable again, and wakes a thread
//! waiting in `epoll_wait` for it: work on both sides for every answer, for nothing,
//! since a line is far smaller than the socket's buffer. These halves write straight
//! to the socket and register for writability only once a write finds the buffer full
//! (a peer that does not read), through a second descriptor of the socket: epoll keeps
//! one registration per descriptor.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits `stream` into halves that read and write it from the current tokio runtime.
pub fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let stream = Arc::new(register(stream, Interest::READABLE)?);
    let write = WriteHalf {
        stream: stream.clone(),
        writable: None,
    };
    Ok((ReadHalf(stream), write))
}

/// Registers a descriptor the `AsyncFd` will own with the current runtime.
fn register<T: AsRawFd>(owned: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `owned` owns its descriptor (a `UnixStream` or an `OwnedFd`), which stays
    // open and the same for as long as the `AsyncFd` holds it.
    Ok(unsafe { AsyncFd::register_with_interest(owned, interest) }?)
}

/// The reading half of [`split`].
pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

/// The writing half of [`split`]; dropping it does not close the socket, shutting it
/// down does (for writing).
pub struct WriteHalf {
    stream: Arc<AsyncFd<UnixStream>>,
    /// The socket registered for writability, once a write found its buffer full.
    writable: Option<AsyncFd<OwnedFd>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            match ready.try_io(|stream| stream.get_ref().read(unfilled)) {
                Ok(Ok(read)) => {
                    // A short read emptied the socket: the next read waits for epoll
                    // rather than costing a `recv` that fails (as tokio's own does).
                    if read > 0 && read < wanted {
                        ready.clear_ready();
                    }
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let Some(writable) = &this.writable else {
                match this.stream.get_ref().write(data) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        let socket = this.stream.get_ref().as_fd().try_clone_to_owned()?;
                        this.writable = Some(register(socket, Interest::WRITABLE)?);
                        continue;
                    }
                    written => return Poll::Ready(written),
                }
            };
            let mut ready = ready!(writable.poll_write_ready(cx))?;
            if let Ok(written) = ready.try_io(|_| this.stream.get_ref().write(data)) {
                return Poll::Ready(written);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_write_that_fills_the_buffer_waits_for_the_peer_and_loses_nothing() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_, mut write) = split(ours).unwrap();
        let (mut peer_read, _peer_write) = split(theirs).unwrap();
        // Far more than a socket buffer holds, so the write must wait for the reader.
        let sent: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = sent.clone();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut received = Vec::new();
            peer_read.read_to_end(&mut received).await.unwrap();
            received
        });
        write.write_all(&sent).await.unwrap();
        assert!(write.writable.is_some(), "the buffer never filled");
        write.shutdown().await.unwrap();
        let received = reader.await.unwrap();
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the bytes arrived changed");
    }

    #[tokio::test]
    async fn reads_what_the_peer_writes_until_it_shuts_down() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (mut read, _write) = split(ours).unwrap();
        let (_, mut peer_write) = split(theirs).unwrap();
        let writer = tokio::spawn(async move {
            for line in [&b"first\n"[..], b"second\n"] {
                peer_write.write_all(line).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peer_write.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        read.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(received, b"first\nsecond\n");
    }
}
