//! The sockets otpd listens on: binding one (replacing a dead daemon's file, never a
//! live one's), taking one from systemd, and what accepting needs (descriptors, and a
//! pause when accept fails).

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};

/// The listening socket, and its path when otpd created the file (and so removes it).
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    /// The path this process bound, with the device and inode of the socket file it
    /// made there: removed at the end only while it is still that file.
    owned_path: Option<(PathBuf, FileId)>,
    /// What the logs and systemd's status call it: its path, or `@name` for an
    /// abstract socket systemd passed.
    name: String,
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
        let made = FileId::of(path)?;
        Ok(Self {
            listener,
            owned_path: Some((path.to_owned(), made)),
            name: path.display().to_string(),
        })
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// Wraps a socket someone else created (systemd socket activation): its file is
    /// never removed by otpd.
    pub fn inherited(listener: std::os::unix::net::UnixListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let name = match (address.as_pathname(), address.as_abstract_name()) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
            (None, None) => "an unnamed socket".to_owned(),
        };
        Ok(Self {
            listener: UnixListener::from_std(listener)?,
            owned_path: None,
            name,
        })
    }

    /// The socket's path, or what it is when it has none.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A file's device and inode: which file a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self(meta.dev(), meta.ino()))
    }
}

impl Drop for Listener {
    /// Removes the socket file, unless it was deleted and the path now names another
    /// (a second daemon's, started on the same path meanwhile), which stays.
    fn drop(&mut self) {
        if let Some((path, made)) = &self.owned_path
            && FileId::of(path).is_ok_and(|now| now == *made)
        {
            let _ = std::fs::remove_file(path);
        }
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
