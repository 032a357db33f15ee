//! The server secret: 32 random bytes that key the code digests.
//!
//! It lives in its own 0600 file, never in the database and never in a log, so a copy
//! of the database alone cannot be used to test guesses offline.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand::TryRng;

/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The server secret. `Debug` prints a mask, so it cannot leak through a log line.
#[derive(Clone)]
pub struct ServerSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSecret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("server secret {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// `len` is what was read: at most one byte more than a secret
    /// ([`crate::read_prefix`]), so that a wrong path (`/dev/zero`, a log file) is not
    /// read to its end.
    #[error("server secret {path} holds {} bytes, expected {SECRET_LEN}", held(*.len))]
    WrongLength { path: String, len: usize },
    #[error("cannot draw random bytes from the OS: {0}")]
    Random(String),
}

/// How many bytes [`SecretError::WrongLength`] found, as far as it read.
fn held(len: usize) -> String {
    if len > SECRET_LEN {
        format!("more than {SECRET_LEN}")
    } else {
        len.to_string()
    }
}

impl ServerSecret {
    /// HMAC-SHA-256 keyed with the secret: everything otpd derives from it (code
    /// digests, the failover-text key, the fingerprint) starts here, each with input
    /// of its own.
    pub fn mac(&self) -> hmac::Hmac<sha2::Sha256> {
        use hmac::KeyInit;
        hmac::Hmac::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// Builds a secret from known bytes, for tests and fuzzing; the daemon's comes from
    /// [`ServerSecret::load_or_draw`].
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// A value that tells whether two hosts hold the same secret without revealing it:
    /// HMAC-SHA-256 of a fixed label, hex. Hosts sharing a Redis compare it at start-up.
    pub fn fingerprint(&self) -> String {
        use hmac::Mac;
        let mut mac = self.mac();
        mac.update(b"otpd server secret check v1");
        crate::hex(&mac.finalize().into_bytes())
    }

    /// Reads the secret at `path`, or draws a new one from the OS CSPRNG when there is no
    /// file yet. Returns whether it was drawn: a drawn secret is written only by
    /// [`ServerSecret::save`], once the start-up has got far enough to keep it (a start
    /// that cannot reach its store leaves no secret behind).
    pub fn load_or_draw(path: &Path) -> Result<(Self, bool), SecretError> {
        match crate::read_prefix(path, SECRET_LEN as u64) {
            Ok(bytes) => {
                crate::warn_if_exposed(path, "the server secret");
                let bytes: [u8; SECRET_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| SecretError::WrongLength {
                            path: path.display().to_string(),
                            len: bytes.len(),
                        })?;
                Ok((Self(bytes), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; SECRET_LEN];
                rand::rngs::SysRng
                    .try_fill_bytes(&mut bytes)
                    .map_err(|e| SecretError::Random(e.to_string()))?;
                Ok((Self(bytes), true))
            }
            Err(source) => Err(SecretError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes a secret drawn by [`ServerSecret::load_or_draw`] to `path`, mode 0600,
    /// creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), SecretError> {
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            crate::create_owned_dir(dir).map_err(io)?;
        }
        // Written under a temporary name and renamed, so a crash never leaves a short
        // secret behind; create_new refuses to follow a planted file. The directory is
        // synced after the rename, so that a power loss cannot keep the database's
        // first writes and lose the secret they are keyed with.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(&self.0).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        let dir = dir.unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn drawn_saved_with_mode_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret.key");
        let (first, drawn) = ServerSecret::load_or_draw(&path).unwrap();
        assert!(drawn);
        assert!(!path.exists(), "nothing is written until it is saved");
        first.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            dir_mode & 0o022,
            0,
            "the directory it made is writable by its owner alone"
        );
        let (second, drawn) = ServerSecret::load_or_draw(&path).unwrap();
        assert!(!drawn);
        assert_eq!(first.0, second.0);
        assert_eq!(format!("{first:?}"), "ServerSecret(***)");
    }

    #[test]
    fn fingerprint_tells_secrets_apart_and_hides_them() {
        let a = ServerSecret::from_bytes([1; 32]);
        let b = ServerSecret::from_bytes([2; 32]);
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
    }

    #[test]
    fn short_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        std::fs::write(&path, b"short").unwrap();
        let err = ServerSecret::load_or_draw(&path).unwrap_err();
        assert!(
            err.to_string().contains("holds 5 bytes, expected 32"),
            "{err}"
        );
    }

    #[test]
    fn an_endless_file_is_read_no_further_than_a_secret() {
        let err = ServerSecret::load_or_draw(Path::new("/dev/zero")).unwrap_err();
        let expected = "server secret /dev/zero holds more than 32 bytes, expected 32";
        assert_eq!(err.to_string(), expected);
    }
}
