//! Who may connect: the peer's uid, gid and supplementary groups, as the kernel saw
//! them when it connected, against `[server] allowed_uids` / `allowed_gids`.

use std::sync::Arc;

use tokio::net::UnixStream;

use crate::config::ServerConfig;
use crate::log_throttle::OncePerSecond;

/// Who may connect to a Unix socket, from `[server] allowed_uids` / `allowed_gids`:
/// the protocol socket, and a `unix:` HTTP listener (a TCP peer has no uid to check).
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    /// The listener's refusals in the log: one line a second.
    refusals: Arc<OncePerSecond>,
}

impl PeerPolicy {
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            allowed_uids: config.allowed_uids.clone(),
            allowed_gids: config.allowed_gids.clone(),
            refusals: Arc::default(),
        }
    }

    /// Whether the peer of `stream` may use otpd; a refusal is logged, naming the
    /// `listener` and the peer's uid, gid and pid, at most once a second per listener:
    /// a local user refused in a loop must not flood the journal (whose rate limit
    /// would then drop otpd's other lines).
    pub fn admits(&self, stream: &UnixStream, listener: &'static str) -> bool {
        match stream.peer_cred() {
            Ok(cred) if self.allows(stream, cred.uid(), cred.gid()) => true,
            Ok(cred) => {
                if let Some(held_back) = self.refusals.admit() {
                    tracing::warn!(
                        listener,
                        uid = cred.uid(),
                        gid = cred.gid(),
                        pid = cred.pid(),
                        held_back,
                        "refused a peer not in allowed_uids / allowed_gids (held_back: refusals since the last such line)"
                    );
                }
                false
            }
            Err(error) => {
                if let Some(held_back) = self.refusals.admit() {
                    tracing::warn!(listener, %error, held_back, "cannot read peer credentials; refused");
                }
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
