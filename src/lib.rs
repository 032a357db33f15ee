//! otpd: a one-time-password daemon for co-located services.
//!
//! A request arrives as a JSON line on the Unix socket ([`server`]), is parsed
//! ([`protocol`]) and answered ([`handler`]) by the service ([`otp`]), which validates
//! it, generates the code ([`code`]) and keeps only its keyed digest ([`secret`]) in the
//! store ([`store`]), whose engines apply the rules of [`rules`] atomically and durably.
//! Codes reach people through a delivery backend ([`delivery`]); the [`janitor`]
//! expires and purges finished items in the background. [`daemon`] wires it together
//! from the [`config`] and tells systemd how it is doing ([`systemd`]); [`client`] speaks
//! the protocol for the command-line tools, and [`bench`](mod@bench) measures a running daemon with
//! it. The optional [`http`] listener serves the tutorial's REST API, Vonage's status
//! webhooks and Prometheus metrics through the same service. Log lines that can come in
//! floods (storage failures, refused webhooks) go through [`log_throttle`].

pub mod bench;
pub mod client;
pub mod code;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod handler;
pub mod http;
pub mod janitor;
pub mod log_throttle;
pub mod metrics;
pub mod otp;
pub mod protocol;
pub mod rules;
pub mod secret;
pub mod server;
pub mod store;
pub mod strict_json;
pub mod systemd;
pub mod unix_stream;

/// Lower-case hex of `bytes`: digests in Redis keys, the secret's fingerprint, payload
/// hashes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Reads at most `limit` + 1 bytes of a file the configuration names: a caller that
/// wants at most `limit` tells a longer file by the one byte more, without reading it
/// all (a wrong path such as `/dev/zero` must end in an error, not in memory
/// exhaustion).
pub fn read_prefix(path: &std::path::Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_prefix`], refusing a file longer than `limit` bytes (a key, a CA bundle).
pub fn read_bounded(path: &std::path::Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let bytes = read_prefix(path, limit)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// Warns when the file at `path`, which holds secrets (`what`), can be read by group
/// or others. otpd goes on (the mode is the operator's choice) but says how to close it.
pub fn warn_if_exposed(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "{what} is readable by group or others; chmod 600 it"
        );
    }
}

/// Creates `dir` and its missing parents 0755, whatever the umask (the daemon runs
/// under 077 once its socket is bound): they hold the server secret, the database
/// and sockets, which nobody else may replace, and others may pass through, so that
/// `socket_mode` decides who reaches a socket; the secret and the database are
/// owner-only files. A directory that exists is left as it is.
pub fn create_owned_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&std::path::Path> = dir
        .ancestors()
        .take_while(|at| !at.as_os_str().is_empty() && !at.exists())
        .collect();
    for at in missing.into_iter().rev() {
        match std::fs::create_dir(at) {
            Ok(()) => std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
