//! The Unix-socket server: binds (or inherits) the socket, checks each peer's
//! credentials, and runs one task per connection that answers JSON lines in order.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::handler;
use crate::otp::Otp;
use crate::protocol::Response;

/// The listening socket, and its path when otpd created the file (and so removes it).
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    owned_path: Option<PathBuf>,
}

impl Listener {
    /// Binds the socket at `path` with permission bits `mode`. A leftover socket file of
    /// a dead daemon is replaced; a live daemon's socket is refused.
    pub fn bind(path: &Path, mode: u32) -> anyhow::Result<Self> {
        // Bound by its absolute path, which the kernel then shows (ss, /proc/net/unix)
        // and `otpd bench` finds the daemon by.
        let path = &std::path::absolute(path)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => anyhow::bail!(
                        "another process is listening on {}; is otpd already running?",
                        path.display()
                    ),
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "replacing a stale socket file");
                        std::fs::remove_file(path)?;
                    }
                    Err(e) => anyhow::bail!("cannot probe existing socket {}: {e}", path.display()),
                }
            }
            Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::create_owned_dir(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        // Bound owner-only, then given its mode: no peer can connect while the socket
        // would still have a permissive umask's mode. (The umask is the process's, so
        // anything created meanwhile gets owner-only too, which is harmless.)
        let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(umask);
        let listener = bound.map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(Self {
            listener,
            owned_path: Some(path.to_owned()),
        })
    }

    /// Waits for the next connection (the HTTP listener uses this for `unix:` sockets).
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// Wraps a socket someone else created (systemd socket activation): its file is
    /// never removed by otpd.
    pub fn inherited(listener: std::os::unix::net::UnixListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: UnixListener::from_std(listener)?,
            owned_path: None,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.owned_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What each connection is held to, from `[server]`: who may connect, and its limits.
#[derive(Debug, Clone)]
struct ConnectionPolicy {
    max_request_bytes: usize,
    idle_timeout: Duration,
    peers: PeerPolicy,
}

/// Who may connect to a Unix socket, from `[server] allowed_uids` / `allowed_gids`:
/// the protocol socket, and a `unix:` HTTP listener (a TCP peer has no uid to check).
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
}

impl PeerPolicy {
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            allowed_uids: config.allowed_uids.clone(),
            allowed_gids: config.allowed_gids.clone(),
        }
    }

    /// Whether the peer of `stream` may use otpd; a refusal is logged, naming the
    /// `listener` and the peer's uid, gid and pid.
    pub fn admits(&self, stream: &UnixStream, listener: &'static str) -> bool {
        match stream.peer_cred() {
            Ok(cred) if self.allows(stream, cred.uid(), cred.gid()) => true,
            Ok(cred) => {
                tracing::warn!(
                    listener,
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = cred.pid(),
                    "refused a peer not in allowed_uids / allowed_gids"
                );
                false
            }
            Err(error) => {
                tracing::warn!(listener, %error, "cannot read peer credentials; refused");
                false
            }
        }
    }

    /// Whether the peer may use otpd: its uid, its primary gid or one of its
    /// supplementary groups is allowed (`adduser alice otpd-clients` gives alice the
    /// group as a supplementary one), or no allow-list is set.
    fn allows(&self, stream: &UnixStream, uid: u32, gid: u32) -> bool {
        (self.allowed_uids.is_empty() && self.allowed_gids.is_empty())
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
            || (!self.allowed_gids.is_empty()
                && peer_groups(stream)
                    .iter()
                    .any(|group| self.allowed_gids.contains(group)))
    }
}

/// The peer's supplementary groups as they were when it connected (`SO_PEERGROUPS`,
/// Linux 4.13); empty if the kernel cannot tell.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    const GID_SIZE: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID_SIZE) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, which has them,
        // and sets `len` to what it wrote (or, with ERANGE, to what it needs).
        let result = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID_SIZE;
        if result == 0 {
            groups.truncate(needed);
            return groups;
        }
        let range = std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE);
        if !range || needed <= groups.len() {
            return Vec::new();
        }
        groups.resize(needed, 0);
    }
}

/// Descriptors kept beside the connections: the database, listeners, the log file.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft open-file limit to the hard one: every connection holds a descriptor,
/// and the usual soft limit (1024) is no more than the default `max_connections`. Warns
/// when the limit still cannot hold `max_connections`: past it, new clients wait in the
/// kernel's queue without even a `busy` answer.
pub fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // Under the packaged unit setrlimit is filtered out; LimitNOFILE= sets it there.
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let needed = max_connections as u64 + RESERVED_DESCRIPTORS;
    if limit < needed {
        tracing::warn!(
            "the open-file limit ({limit}) cannot hold server.max_connections ({max_connections}) \
             plus {RESERVED_DESCRIPTORS} for the database and listeners: raise it (LimitNOFILE=) \
             or lower max_connections"
        );
    }
}

/// What an accept loop does when `accept` fails (EMFILE and friends): waits instead
/// of spinning, and says so once a minute rather than at every try.
#[derive(Default)]
pub struct AcceptBackoff {
    last_warning: Option<Instant>,
}

impl AcceptBackoff {
    const PAUSE: Duration = Duration::from_millis(50);
    const QUIET: Duration = Duration::from_secs(60);

    pub async fn wait(&mut self, listener: &'static str, error: &std::io::Error) {
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= Self::QUIET)
        {
            tracing::warn!(listener, %error, "accept failed; retrying every 50 ms");
            self.last_warning = Some(Instant::now());
        }
        tokio::time::sleep(Self::PAUSE).await;
    }
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
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let mut line = Vec::new();
    loop {
        let read = tokio::select! {
            // A request already read is always answered; shutdown only stops reading.
            _ = shutdown.cancelled() => break,
            read = tokio::time::timeout(
                policy.idle_timeout,
                read_line(&mut reader, &mut line, policy.max_request_bytes),
            ) => read,
        };
        let response = match read {
            Err(_) | Ok(Err(_)) | Ok(Ok(LineRead::Eof)) => break,
            Ok(Ok(LineRead::TooLong)) => {
                let message = format!("request line exceeds {} bytes", policy.max_request_bytes);
                let response = Response::error(None, 413, "request_too_large", message, None);
                let write = write_line(&mut writer, &response, true);
                let _ = wait_for_peer(write, policy.idle_timeout, &shutdown).await;
                break;
            }
            Ok(Ok(LineRead::Line)) => {
                let started = Instant::now();
                let response = handler::respond(otp, &line).await;
                otp.counters().socket_latency.observe(started.elapsed());
                response
            }
        };
        // Pipelined requests are answered in one write once no whole request is left
        // in the input (the start of one is not enough: its end may be long coming).
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

/// Once shutdown has begun, how long a peer that does not read its answers is waited
/// for (otherwise `idle_timeout`), so that one such peer cannot hold the stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs I/O with a peer (a write of answers, a read of a request body); `None` when the
/// peer has not done its part within `idle`, or within [`SHUTDOWN_GRACE`] of the start
/// of shutdown.
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
    /// A line is in the buffer (without its `\n`; a final line may lack one).
    Line,
    /// The peer closed its side with nothing pending.
    Eof,
    /// The line exceeded the limit; nothing beyond the limit was buffered.
    TooLong,
}

/// Reads one `\n`-terminated line into `line`, refusing to buffer more than `max` bytes.
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
        if line.len() + chunk.len() > max {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(chunk);
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
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
}
