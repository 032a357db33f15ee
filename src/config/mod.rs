//! Configuration: a TOML file, command-line flags and systemd's environment.
//!
//! Every key has a default, unknown keys and out-of-range values are refused with a
//! message naming the key (`Config::validate`). Paths that depend on where the daemon
//! runs (data directory, socket, secret) are resolved once by [`Config::resolve_paths`]:
//! flags beat the file, the file beats systemd's directories, and those beat the
//! developer default `./otpd-data`.

mod describe;
mod redis;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use describe::{describe_toml_error, describe_value_error};
pub use redis::{RedisConfig, redact_url};

/// Where state lives when nothing else says: the working directory, so that
/// `cargo run -- serve` works without root.
pub const DEFAULT_DATA_DIR: &str = "./otpd-data";
/// Socket file name inside the runtime (or data) directory.
pub const SOCKET_NAME: &str = "otpd.sock";
/// Name of the systemd credential that may hold the server secret.
pub const SECRET_CREDENTIAL: &str = "otpd-secret";
/// Name of the systemd credential that may hold the Vonage application's private key.
pub const VONAGE_KEY_CREDENTIAL: &str = "otpd-vonage-key";
/// Name of the systemd credential that may hold the status webhooks' signature secret.
pub const WEBHOOK_SECRET_CREDENTIAL: &str = "otpd-webhook-secret";

/// Longest config file read: the packaged one is 6 KiB, and a wrong `--config`
/// (`/dev/zero`, a log) must end in an error, not in memory exhaustion.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A configuration error: always names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Checks `min <= value <= max` and names the key when it is not (also for the
/// delivery backends' keys, so that every range error reads alike).
pub(crate) fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    check_range_why(key, value, min, max, None)
}

/// [`check_range`], saying where a bound comes from when the key alone does not
/// explain it (`why`: "it may not exceed otp.send_window_secs").
fn check_range_why(
    key: &str,
    value: u64,
    min: u64,
    max: u64,
    why: Option<&str>,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let why = why.map(|why| format!(" ({why})")).unwrap_or_default();
    Err(invalid(
        key,
        format!("{value} is out of range {min}..={max}{why}"),
    ))
}

/// The whole configuration, section by section as in the TOML file. (`Serialize`
/// lets a test hold the packaged example config against these defaults.)
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub otp: OtpConfig,
    pub janitor: JanitorConfig,
    pub delivery: DeliveryConfig,
    pub http: HttpConfig,
}

/// `[server]`: the Unix socket and its limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Socket path; empty means "decide from the environment".
    pub socket: PathBuf,
    /// Octal permission bits of a socket the daemon binds itself.
    pub socket_mode: String,
    /// Peers allowed by uid; both lists empty means any peer that can open the socket.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub idle_timeout_secs: u64,
    /// Runtime worker threads; 0: one per core. The engine's own threads and the
    /// group-commit flush run beside them, so on a small machine one fewer than the
    /// cores serves as much for less CPU (BENCHMARKS.md).
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::new(),
            socket_mode: "0660".into(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_connections: 1024,
            max_request_bytes: 16 * 1024,
            idle_timeout_secs: 60,
            worker_threads: 0,
        }
    }
}

impl ServerConfig {
    /// The socket mode as permission bits (validated by [`Config::validate`]). The
    /// owner must keep read and write: otpd's own user connects too (the `otpd` tools,
    /// and the start-up probe for a daemon still listening on the path).
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let refused = |why: &str| {
            invalid(
                "server.socket_mode",
                format!("{:?} {why}", self.socket_mode),
            )
        };
        let bits = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|bits| *bits <= 0o7777)
            .ok_or_else(|| refused("is not an octal mode like \"0660\""))?;
        if bits > 0o777 {
            return Err(refused(
                "sets setuid, setgid or sticky bits, which are not allowed on a socket",
            ));
        }
        if bits & 0o600 != 0o600 {
            return Err(refused(
                "denies the owner read and write: otpd's own user could not connect \
                 (the otpd tools, the start-up check for a daemon already running)",
            ));
        }
        Ok(bits)
    }
}

/// How a create or verify becomes durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Acknowledge only after the change is flushed to disk (group commit).
    #[default]
    Flush,
    /// Acknowledge at once; the embedded engine flushes within 500 ms. A crash may lose
    /// recent changes.
    Relaxed,
}

/// Which storage engine keeps the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// The embedded sled database: one host.
    Sled,
    /// The embedded fjall database (an LSM tree with a journal): one host, less CPU
    /// per write and less memory than sled (BENCHMARKS.md). The default for a new
    /// database.
    Fjall,
    /// A Redis server or cluster shared by several otpd hosts.
    Redis,
}

impl Engine {
    /// Its name in `store.engine`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Fjall => "fjall",
            Engine::Redis => "redis",
        }
    }
}

/// `[store]`: the storage engine and the server secret.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Unset: the embedded engine whose database `path` holds, and fjall for a new one
    /// (`store::embedded::engine_at`), so that a sled directory from before fjall was
    /// the default keeps opening.
    pub engine: Option<Engine>,
    /// sled or fjall database directory; empty means `<data dir>/db`.
    pub path: PathBuf,
    /// Server secret file; empty means the systemd credential or `<data dir>/secret.key`.
    pub secret_file: PathBuf,
    /// sled and fjall only: Redis's durability is its own `appendfsync`.
    pub durability: Durability,
    /// sled's page cache, or fjall's block cache. sled's resident memory is a few times
    /// this (BENCHMARKS.md); 16 MiB costs no throughput against 64 and holds 1 M live
    /// codes in half the memory.
    pub cache_capacity_mb: u64,
    pub redis: RedisConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            engine: None,
            path: PathBuf::new(),
            secret_file: PathBuf::new(),
            durability: Durability::Flush,
            cache_capacity_mb: 16,
            redis: RedisConfig::default(),
        }
    }
}

/// `[otp]`: the rules codes live by.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtpConfig {
    pub code_length: u32,
    pub ttl_secs: u64,
    pub max_attempts: u32,
    pub lock_secs: u64,
    pub retain_secs: u64,
    pub max_sends_per_recipient: u32,
    pub send_window_secs: u64,
    pub resend_cooldown_secs: u64,
}

impl Default for OtpConfig {
    fn default() -> Self {
        Self {
            code_length: 6,
            ttl_secs: 300,
            max_attempts: 5,
            lock_secs: 900,
            retain_secs: 3600,
            max_sends_per_recipient: 5,
            send_window_secs: 900,
            resend_cooldown_secs: 30,
        }
    }
}

/// Shortest and longest codes otpd issues.
pub const CODE_LENGTHS: std::ops::RangeInclusive<u32> = 4..=10;
/// NIST SP 800-63B: an OTP sent out of band should be valid for at most 10 minutes.
pub const NIST_TTL_LIMIT_SECS: u64 = 600;

/// `[janitor]`: the background purge of finished items.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JanitorConfig {
    /// Longest sleep between two looks at the expiry index.
    pub interval_secs: u64,
    /// Most items purged in one go before yielding to requests.
    pub batch: usize,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        Self {
            interval_secs: 30,
            batch: 1000,
        }
    }
}

/// Which delivery backend sends the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Writes the message to the log (development).
    #[default]
    Log,
    /// Vonage Dispatch API failover workflow.
    Dispatch,
    /// Vonage Messages API with otpd's own read-timeout failover.
    Messages,
}

/// `[delivery]`: how a code reaches a person.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Unset: see [`DeliveryConfig::backend`].
    pub backend: Option<Backend>,
    /// Message text; `{code}` and `{minutes}` are replaced.
    pub template: String,
    /// Log backend: also append one JSON line per message here (empty: off).
    pub log_file: PathBuf,
    pub dispatch: VonageConfig,
    pub messages: VonageConfig,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            backend: None,
            template: "Your verification code is {code}. It expires in {minutes} minutes.".into(),
            log_file: PathBuf::new(),
            dispatch: VonageConfig::default(),
            messages: VonageConfig::default(),
        }
    }
}

impl DeliveryConfig {
    /// The backend named by `backend`; unset, the Vonage API whose section names an
    /// `application_id` (configured credentials must not fall back to printing codes to
    /// the log), else `log`.
    pub fn backend(&self) -> Result<Backend, ConfigError> {
        let dispatch = !self.dispatch.application_id.is_empty();
        let messages = !self.messages.application_id.is_empty();
        match (self.backend, dispatch, messages) {
            (Some(backend), _, _) => Ok(backend),
            (None, true, true) => Err(invalid(
                "delivery.backend",
                "both [delivery.dispatch] and [delivery.messages] name an application_id; \
                 set \"dispatch\" or \"messages\"",
            )),
            (None, true, false) => Ok(Backend::Dispatch),
            (None, false, true) => Ok(Backend::Messages),
            (None, false, false) => Ok(Backend::Log),
        }
    }
}

/// The `{name}`s the delivery backends fill into `delivery.template`.
const PLACEHOLDERS: [&str; 2] = ["code", "minutes"];

/// The first `{name}` in `template` that otpd does not fill in (a misspelt or made-up
/// placeholder), which would be sent as it is. Braces around anything but a name
/// (letters, digits, `_`) are text.
fn unknown_placeholder(template: &str) -> Option<&str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|after_brace| after_brace.split_once('}').map(|(name, _)| name))
        .find(|name| {
            !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !PLACEHOLDERS.contains(name)
        })
}

/// `[delivery.dispatch]` and `[delivery.messages]`: a Vonage application.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VonageConfig {
    pub api_url: String,
    pub application_id: String,
    /// RS256 private key (PEM); empty means the systemd credential `otpd-vonage-key`.
    pub private_key_file: PathBuf,
    /// Facebook Page id that sends Messenger messages.
    pub messenger_from: String,
    /// SMS sender id or number.
    pub sms_from: String,
    /// Messenger category: `response`, `update` or `message_tag`.
    pub messenger_category: String,
    /// Required when `messenger_category = "message_tag"`.
    pub messenger_tag: String,
    /// Seconds to wait for the Messenger message to be read before sending the SMS.
    pub failover_secs: u64,
    pub timeout_secs: u64,
    pub max_retries: u32,
}

impl Default for VonageConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.nexmo.com".into(),
            application_id: String::new(),
            private_key_file: PathBuf::new(),
            messenger_from: String::new(),
            sms_from: "OTP".into(),
            messenger_category: "response".into(),
            messenger_tag: String::new(),
            failover_secs: 120,
            timeout_secs: 10,
            max_retries: 3,
        }
    }
}

/// `[http]`: the optional REST listener of the tutorial service.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` or `unix:/path`; empty: no HTTP listener.
    pub listen: String,
    /// Vonage account signature secret for status webhooks (or credential
    /// `otpd-webhook-secret`).
    pub webhook_signature_secret: String,
    /// The credential `otpd-webhook-secret`, if systemd passed it: found by
    /// [`Config::resolve_paths`] with the other credentials, and read when
    /// `webhook_signature_secret` is empty. Not a key of the file.
    #[serde(skip)]
    pub webhook_secret_credential: Option<PathBuf>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field(
                "webhook_signature_secret",
                &hidden(&self.webhook_signature_secret),
            )
            .field("webhook_secret_credential", &self.webhook_secret_credential)
            .finish()
    }
}

/// A secret as `Debug` shows it: whether it is set, never what it is.
fn hidden(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "***" }
}

/// Command-line overrides; they beat the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
}

/// The systemd directories the daemon may have been given.
#[derive(Debug, Clone, Default)]
pub struct SystemdDirs {
    pub state: Option<PathBuf>,
    pub runtime: Option<PathBuf>,
    pub credentials: Option<PathBuf>,
}

impl SystemdDirs {
    /// Reads `STATE_DIRECTORY`, `RUNTIME_DIRECTORY` and `CREDENTIALS_DIRECTORY`
    /// (the first entry of a colon-separated list).
    pub fn from_env() -> Self {
        let first = |name: &str| {
            std::env::var_os(name)
                .and_then(|v| {
                    v.to_str()
                        .map(|s| s.split(':').next().unwrap_or("").to_owned())
                })
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        Self {
            state: first("STATE_DIRECTORY"),
            runtime: first("RUNTIME_DIRECTORY"),
            credentials: first("CREDENTIALS_DIRECTORY"),
        }
    }

    /// A credential file by name, if systemd passed it. An empty one counts as none:
    /// the packaged unit loads `/etc/otpd/vonage-key.pem` unconditionally (a missing
    /// file would stop the unit from starting), and the package creates it empty.
    pub fn credential(&self, name: &str) -> Option<PathBuf> {
        self.credentials
            .as_ref()
            .map(|dir| dir.join(name))
            .filter(|path| path.metadata().is_ok_and(|meta| meta.len() > 0))
    }
}

impl Config {
    /// Reads and validates a TOML file, of at most [`MAX_CONFIG_BYTES`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::read_bounded(path, MAX_CONFIG_BYTES)
            .and_then(|bytes| {
                String::from_utf8(bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let failed = |message| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message,
        };
        let document =
            toml::Deserializer::parse(text).map_err(|e| failed(describe_toml_error(text, &e)))?;
        let config: Config = serde_path_to_error::deserialize(document)
            .map_err(|e| failed(describe_value_error(text, e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses out-of-range values, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        s.socket_mode_bits()?;
        check_range(
            "server.max_connections",
            s.max_connections as u64,
            1,
            1 << 20,
        )?;
        check_range(
            "server.max_request_bytes",
            s.max_request_bytes as u64,
            256,
            1 << 20,
        )?;
        check_range("server.idle_timeout_secs", s.idle_timeout_secs, 1, 86_400)?;
        check_range("server.worker_threads", s.worker_threads as u64, 0, 1024)?;
        check_range(
            "store.cache_capacity_mb",
            self.store.cache_capacity_mb,
            1,
            1 << 20,
        )?;
        self.store
            .redis
            .validate(self.store.engine == Some(Engine::Redis))?;
        let o = &self.otp;
        check_range(
            "otp.code_length",
            o.code_length.into(),
            (*CODE_LENGTHS.start()).into(),
            (*CODE_LENGTHS.end()).into(),
        )?;
        check_range("otp.ttl_secs", o.ttl_secs, 1, 86_400)?;
        check_range("otp.max_attempts", o.max_attempts.into(), 1, 1000)?;
        check_range("otp.lock_secs", o.lock_secs, 1, 30 * 86_400)?;
        check_range("otp.retain_secs", o.retain_secs, 0, 30 * 86_400)?;
        check_range(
            "otp.max_sends_per_recipient",
            o.max_sends_per_recipient.into(),
            1,
            1000,
        )?;
        check_range("otp.send_window_secs", o.send_window_secs, 1, 30 * 86_400)?;
        // Sends are remembered for one send window, so a longer cooldown would end early.
        let (longest_cooldown, why) = match o.send_window_secs {
            window @ ..=86_400 => (window, "it may not exceed otp.send_window_secs"),
            _ => (86_400, "at most a day, whatever otp.send_window_secs"),
        };
        check_range_why(
            "otp.resend_cooldown_secs",
            o.resend_cooldown_secs,
            0,
            longest_cooldown,
            Some(why),
        )?;
        check_range(
            "janitor.interval_secs",
            self.janitor.interval_secs,
            1,
            86_400,
        )?;
        check_range("janitor.batch", self.janitor.batch as u64, 1, 1_000_000)?;
        self.delivery.backend()?;
        if !self.delivery.template.contains("{code}") {
            return Err(invalid("delivery.template", "must contain {code}"));
        }
        if let Some(name) = unknown_placeholder(&self.delivery.template) {
            return Err(invalid(
                "delivery.template",
                format!(
                    "{{{name}}} is not a placeholder: only {{code}} and {{minutes}} are filled in"
                ),
            ));
        }
        if !self.http.listen.is_empty() && !self.http.listen.starts_with("unix:") {
            self.http
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| {
                    invalid(
                        "http.listen",
                        format!(
                            "{:?} is neither an IP address with a port (127.0.0.1:3000) nor \
                             unix:/path",
                            self.http.listen
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// Fills in every path left empty, from flags, then systemd's directories,
    /// then the developer default. Returns what `--data-dir` replaced of the file's
    /// paths, for a start-up warning: the file then does not say where the state is.
    pub fn resolve_paths(&mut self, overrides: &Overrides, dirs: &SystemdDirs) -> Vec<String> {
        let data_dir = overrides
            .data_dir
            .clone()
            .or_else(|| dirs.state.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let from_flag = overrides.data_dir.is_some();
        let mut replaced = Vec::new();
        if from_flag {
            let socket = (overrides.socket.is_none()).then_some(&self.server.socket);
            for (key, path) in [
                ("server.socket", socket),
                ("store.path", Some(&self.store.path)),
                ("store.secret_file", Some(&self.store.secret_file)),
            ] {
                if let Some(path) = path.filter(|path| !path.as_os_str().is_empty()) {
                    replaced.push(format!(
                        "--data-dir {} replaces {key} = {:?} from the config file",
                        data_dir.display(),
                        path.display().to_string()
                    ));
                }
            }
        }

        if let Some(socket) = &overrides.socket {
            self.server.socket = socket.clone();
        } else if from_flag || self.server.socket.as_os_str().is_empty() {
            self.server.socket = match (&dirs.runtime, from_flag) {
                (Some(runtime), false) => runtime.join(SOCKET_NAME),
                _ => data_dir.join(SOCKET_NAME),
            };
        }
        if from_flag || self.store.path.as_os_str().is_empty() {
            self.store.path = data_dir.join("db");
        }
        if from_flag || self.store.secret_file.as_os_str().is_empty() {
            self.store.secret_file = match (dirs.credential(SECRET_CREDENTIAL), from_flag) {
                (Some(credential), false) => credential,
                _ => data_dir.join("secret.key"),
            };
        }
        self.http.webhook_secret_credential = dirs.credential(WEBHOOK_SECRET_CREDENTIAL);
        if let Some(credential) = dirs.credential(VONAGE_KEY_CREDENTIAL) {
            for vonage in [&mut self.delivery.dispatch, &mut self.delivery.messages] {
                if vonage.private_key_file.as_os_str().is_empty() {
                    vonage.private_key_file = credential.clone();
                }
            }
        }
        replaced
    }

    /// Why the `messages` backend, sending Messenger messages, cannot hear Vonage's
    /// status webhooks, and what that costs. Its own timer sends the SMS unless a `read`
    /// or `rejected` status was recorded by the deadline, so without webhooks every
    /// message read is followed by an SMS, and every rejected one by two (Vonage's own
    /// failover, then otpd's). A warning, not an error: README documents running without
    /// webhooks (the SMS always follows), and DESIGN makes the HTTP listener optional.
    fn unheard_messenger_statuses(&self) -> Option<String> {
        if self.delivery.backend().ok() != Some(Backend::Messages)
            || self.delivery.messages.messenger_from.is_empty()
        {
            return None;
        }
        let mut why = Vec::new();
        if self.http.listen.is_empty() {
            why.push("http.listen is empty, so there is no HTTP listener".to_owned());
        }
        if self.http.webhook_signature_secret.is_empty()
            && self.http.webhook_secret_credential.is_none()
        {
            why.push(format!(
                "http.webhook_signature_secret is not set, nor the credential \
                 {WEBHOOK_SECRET_CREDENTIAL}, so every webhook is refused"
            ));
        }
        if why.is_empty() {
            return None;
        }
        Some(format!(
            "the messages backend sends Messenger messages (delivery.messages.messenger_from \
             is set), but otpd cannot take Vonage's status webhooks ({}): it never hears \
             that a Messenger message was read or rejected, so an SMS follows every \
             Messenger message at the failover deadline, also after one that was read, and a \
             message Messenger rejects costs two SMS (Vonage's own failover at once, then \
             otpd's); set http.listen and http.webhook_signature_secret (or the credential \
             {WEBHOOK_SECRET_CREDENTIAL}), and the Vonage application's Status URL to \
             /webhooks/status",
            why.join("; ")
        ))
    }

    /// Start-up warnings that do not stop the daemon.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.otp.ttl_secs > NIST_TTL_LIMIT_SECS {
            warnings.push(format!(
                "otp.ttl_secs = {} exceeds NIST SP 800-63B's 10-minute limit for out-of-band codes",
                self.otp.ttl_secs
            ));
        }
        let shortest = crate::delivery::SHORTEST_FAILOVER_TTL_SECS;
        if self.otp.ttl_secs < shortest {
            warnings.push(format!(
                "otp.ttl_secs = {} is below {shortest}: a create naming both Messenger and SMS \
                 will be refused (its SMS could not wait for the Messenger message to be read)",
                self.otp.ttl_secs
            ));
        }
        if self.store.engine != Some(Engine::Redis) && self.store.durability == Durability::Relaxed
        {
            warnings.push(
                "store.durability = \"relaxed\": a crash may lose codes created or verified in the last 500 ms"
                    .into(),
            );
        }
        let s = &self.server;
        if let Ok(bits) = s.socket_mode_bits()
            && bits & 0o002 != 0
            && s.allowed_uids.is_empty()
            && s.allowed_gids.is_empty()
        {
            warnings.push(format!(
                "server.socket_mode = {:?} lets others write to the socket: anyone on the \
                 host can connect and use otpd; give access by group (\"0660\") or set \
                 server.allowed_uids / server.allowed_gids",
                s.socket_mode
            ));
        }
        // The REST API has no authentication: only the host itself should reach it.
        if let Ok(address) = self.http.listen.parse::<std::net::SocketAddr>()
            && !address.ip().to_canonical().is_loopback()
        {
            warnings.push(format!(
                "http.listen = {:?} is not a loopback address: the REST API and /metrics \
                 have no authentication, so anyone who can reach it can create and verify \
                 codes; listen on 127.0.0.1 or a unix: socket behind a reverse proxy",
                self.http.listen
            ));
        }
        if let Some(warning) = self.unheard_messenger_statuses() {
            warnings.push(warning);
        }
        let vonage = match self.delivery.backend() {
            Ok(Backend::Dispatch) => Some(("dispatch", &self.delivery.dispatch)),
            Ok(Backend::Messages) => Some(("messages", &self.delivery.messages)),
            Ok(Backend::Log) | Err(_) => None,
        };
        if let Some((name, section)) = vonage
            && section.api_url.starts_with("http://")
        {
            warnings.push(format!(
                "delivery.{name}.api_url is plain http: the bearer token and the codes \
                 cross the network unencrypted (for a local stand-in only)"
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fjall_engine_is_chosen_by_name_and_warned_about_when_relaxed() {
        let config =
            Config::parse("[store]\nengine = \"fjall\"\ndurability = \"relaxed\"\n").unwrap();
        assert_eq!(config.store.engine, Some(Engine::Fjall));
        assert!(config.warnings().iter().any(|w| w.contains("relaxed")));
    }

    #[test]
    fn a_validity_beyond_nists_ten_minutes_is_warned_about() {
        let long = Config::parse("[otp]\nttl_secs = 601\n").unwrap().warnings();
        assert!(
            long.iter()
                .any(|w| w.starts_with("otp.ttl_secs = 601 exceeds NIST SP 800-63B")),
            "{long:?}"
        );
        let ten_minutes = Config::parse("[otp]\nttl_secs = 600\n").unwrap().warnings();
        assert!(ten_minutes.is_empty(), "{ten_minutes:?}");
    }

    #[test]
    fn a_validity_too_short_for_a_failover_is_warned_about() {
        let short = Config::parse("[otp]\nttl_secs = 29\n").unwrap().warnings();
        assert!(
            short
                .iter()
                .any(|w| w.starts_with("otp.ttl_secs = 29 is below 30")),
            "{short:?}"
        );
        assert!(Config::default().warnings().is_empty());
    }

    #[test]
    fn a_config_file_is_read_up_to_a_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otpd.toml");
        let comment = |len: u64| format!("#{}\n", "x".repeat(len as usize - 2));
        std::fs::write(&path, comment(MAX_CONFIG_BYTES)).unwrap();
        assert!(Config::load(&path).is_ok(), "exactly the limit");
        std::fs::write(&path, comment(MAX_CONFIG_BYTES + 1)).unwrap();
        let err = format!(
            "{:#}",
            anyhow::Error::from(Config::load(&path).unwrap_err())
        );
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("longer than 1048576 bytes"), "{err}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.otp.code_length, 6);
        assert_eq!(config.server.socket_mode_bits().unwrap(), 0o660);
        assert_eq!(config.store.durability, Durability::Flush);
        assert_eq!(config.store.engine, None, "chosen by what store.path holds");
        let sled = Config::parse("[store]\nengine = \"sled\"\n").unwrap();
        assert_eq!(sled.store.engine, Some(Engine::Sled));
    }

    #[test]
    fn the_backend_follows_the_configured_vonage_application() {
        let backend = |text: &str| Config::parse(text).map(|c| c.delivery.backend().unwrap());
        assert_eq!(backend("").unwrap(), Backend::Log);
        let dispatch = "[delivery.dispatch]\napplication_id = \"a\"\n";
        let messages = "[delivery.messages]\napplication_id = \"b\"\n";
        assert_eq!(backend(dispatch).unwrap(), Backend::Dispatch);
        assert_eq!(backend(messages).unwrap(), Backend::Messages);
        let named = format!("[delivery]\nbackend = \"log\"\n{dispatch}");
        assert_eq!(
            backend(&named).unwrap(),
            Backend::Log,
            "a named backend wins"
        );
        let err = backend(&format!("{dispatch}{messages}")).unwrap_err();
        assert!(err.to_string().contains("delivery.backend"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[otp]\ncode_lenght = 6\n").unwrap_err();
        assert!(err.to_string().contains("code_lenght"), "{err}");
        assert!(err.to_string().contains("line 2, column 1"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key_and_never_quoted() {
        for (text, key, wrong) in [
            (
                "[store.redis]\ncluster = \"redis://u:S3CRET-VALUE@h:7000\"\n",
                "store.redis.cluster",
                "invalid type: string, expected a sequence",
            ),
            (
                "[http]\nwebhook_signature_secret = 5133770\n",
                "http.webhook_signature_secret",
                "invalid type: integer, expected a string",
            ),
            (
                "server = 5133770\n",
                "server",
                "invalid type: integer, expected a table",
            ),
            (
                "[store]\ndurability = \"redis://u:S3CRET-VALUE@h, expected x\"\n",
                "store.durability",
                "unknown value, expected `flush` or `relaxed`",
            ),
            (
                "[delivery]\nbackend = \"S3CRET-VALUE\"\n",
                "delivery.backend",
                "unknown value, expected one of `log`, `dispatch`, `messages`",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("(key `{key}`)")), "{err}");
            assert!(err.contains(wrong), "{err}");
            assert!(
                !err.contains("S3CRET-VALUE") && !err.contains("5133770"),
                "{err}"
            );
        }
        let twice = Config::parse("[otp]\nttl_secs = 300\nttl_secs = 200\n").unwrap_err();
        assert!(
            twice.to_string().contains("`ttl_secs` given twice"),
            "{twice}"
        );
    }

    #[test]
    fn a_number_of_the_wrong_type_or_size_is_described_in_words() {
        for (text, key, described) in [
            (
                "[server]\nmax_connections = \"5133770\"\n",
                "server.max_connections",
                "invalid type: string, expected a whole number",
            ),
            (
                "[otp]\nttl_secs = 5133770.5\n",
                "otp.ttl_secs",
                "invalid type: floating point, expected a whole number",
            ),
            (
                "[otp]\nttl_secs = 99999999999999999999\n",
                "otp.ttl_secs",
                "too large",
            ),
            (
                "[otp]\ncode_length = 5133770000\n",
                "otp.code_length",
                "too large",
            ),
            (
                "[otp]\nretain_secs = -5133770\n",
                "otp.retain_secs",
                "must not be negative",
            ),
            (
                "[server]\nallowed_uids = [-5133770]\n",
                "server.allowed_uids[0]",
                "must not be negative",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(
                err.ends_with(&format!(": {described} (key `{key}`)")),
                "{err}"
            );
            assert!(!err.contains("5133770") && !err.contains("9999"), "{err}");
        }
    }

    #[test]
    fn a_parse_error_does_not_quote_the_line_it_is_on() {
        for text in [
            "[http]\nwebhook_signature_secre = \"S3CRET-VALUE\"\n",
            "[store.redis]\nurl = \"redis://u:S3CRET-VALUE@h:1\" junk\n",
            "-----BEGIN PRIVATE KEY----- S3CRET-VALUE\n",
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(!err.contains("S3CRET-VALUE"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
    }

    #[test]
    fn out_of_range_value_is_named() {
        let err = Config::parse("[otp]\ncode_length = 11\n").unwrap_err();
        assert!(err.to_string().contains("otp.code_length"), "{err}");
        let err = Config::parse("[server]\nsocket_mode = \"999\"\n").unwrap_err();
        assert!(err.to_string().contains("server.socket_mode"), "{err}");
        let err = Config::parse("[server]\nworker_threads = 5000\n").unwrap_err();
        assert!(err.to_string().contains("server.worker_threads"), "{err}");
        let err =
            Config::parse("[otp]\nsend_window_secs = 2\nresend_cooldown_secs = 10\n").unwrap_err();
        assert!(
            err.to_string().contains("otp.resend_cooldown_secs"),
            "{err}"
        );
        assert!(err.to_string().contains("0..=2"), "{err}");
    }

    #[test]
    fn a_cooldown_out_of_range_names_what_bounds_it() {
        let err = Config::parse("[otp]\nsend_window_secs = 10\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key `otp.resend_cooldown_secs`: 30 is out of range 0..=10 \
             (it may not exceed otp.send_window_secs)"
        );
        let text = "[otp]\nsend_window_secs = 200000\nresend_cooldown_secs = 100000\n";
        let err = Config::parse(text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key `otp.resend_cooldown_secs`: 100000 is out of range 0..=86400 \
             (at most a day, whatever otp.send_window_secs)"
        );
    }

    #[test]
    fn a_socket_mode_must_let_the_owner_in_and_is_warned_about_when_open_to_all() {
        let refused = |mode: &str| {
            let text = format!("[server]\nsocket_mode = {mode:?}\n");
            Config::parse(&text).unwrap_err().to_string()
        };
        for mode in ["7777", "1660", "0o4660"] {
            let err = refused(mode);
            assert!(err.contains("server.socket_mode"), "{err}");
            assert!(err.contains("setuid, setgid or sticky"), "{err}");
        }
        for mode in ["66", "0000", "0460", "0260"] {
            let err = refused(mode);
            assert!(err.contains("denies the owner read and write"), "{err}");
        }
        assert!(refused("17777").contains("not an octal mode"));

        let warned = |server: &str| {
            let config = Config::parse(&format!("[server]\n{server}")).unwrap();
            config.warnings().join("\n")
        };
        for mode in ["0666", "0777", "0602"] {
            let warning = warned(&format!("socket_mode = {mode:?}\n"));
            assert!(warning.contains("server.socket_mode"), "{mode}: {warning}");
            assert!(warning.contains("anyone on the host"), "{warning}");
        }
        assert_eq!(warned("socket_mode = \"0600\"\n"), "");
        assert_eq!(warned("socket_mode = \"0664\"\n"), "");
        assert_eq!(
            warned("socket_mode = \"0666\"\nallowed_gids = [4321]\n"),
            "",
            "the allow-lists decide who is served"
        );
    }

    #[test]
    fn a_template_may_hold_only_the_placeholders_otpd_fills_in() {
        let parsed = |template: &str| {
            Config::parse(&format!("[delivery]\ntemplate = {template:?}\n"))
                .map_err(|e| e.to_string())
        };
        for (template, unknown) in [
            ("{code} {hours}", "{hours}"),
            ("{minutes} {Code} {code}", "{Code}"),
            ("{code}{x_1}", "{x_1}"),
        ] {
            let err = parsed(template).unwrap_err();
            assert!(err.contains("delivery.template"), "{err}");
            assert!(err.contains(&format!(": {unknown} is not")), "{err}");
        }
        for template in [
            "{code} expires in {minutes} minutes",
            "{{code}} {} { } {not a name} {code",
            "json: {\"otp\": \"{code}\"}",
        ] {
            assert!(parsed(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn a_master_password_is_for_sentinels_only_and_never_shown() {
        let url = "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"redis://a\"\nmaster_password = \"pw\"\n";
        let err = Config::parse(url).unwrap_err();
        assert!(
            err.to_string().contains("store.redis.master_password"),
            "{err}"
        );
        let sentinels = "[store]\nengine = \"redis\"\n[store.redis]\nsentinels = [\"redis://s:26379\"]\nsentinel_master = \"m\"\nmaster_password = \"pw-123\"\n";
        let config = Config::parse(sentinels).unwrap();
        assert!(!format!("{:?}", config.store.redis).contains("pw-123"));
    }

    #[test]
    fn the_messages_backend_without_status_webhooks_is_warned_about() {
        let warned = |messages: &str, http: &str| {
            let text = format!(
                "[delivery]\nbackend = \"messages\"\n[delivery.messages]\n{messages}\n[http]\n{http}\n"
            );
            Config::parse(&text).unwrap().warnings().join("\n")
        };
        let page = "messenger_from = \"107283945566123\"";
        let listen = "listen = \"127.0.0.1:3000\"";
        let secret = "webhook_signature_secret = \"s\"";
        let unheard = warned(page, "");
        for part in [
            "http.listen is empty",
            "http.webhook_signature_secret is not set",
            "two SMS",
            "also after one that was read",
        ] {
            assert!(unheard.contains(part), "{part}: {unheard}");
        }
        let refused = warned(page, listen);
        assert!(refused.contains("never hears"), "{refused}");
        assert!(!refused.contains("http.listen is empty"), "{refused}");
        let no_listener = warned(page, secret);
        assert!(
            no_listener.contains("http.listen is empty"),
            "{no_listener}"
        );
        assert!(!no_listener.contains("is not set"), "{no_listener}");

        assert_eq!(warned(page, &format!("{listen}\n{secret}")), "", "heard");
        assert_eq!(warned("", ""), "", "SMS only: no read to wait for");
        let dispatch =
            "[delivery]\nbackend = \"dispatch\"\n[delivery.dispatch]\nmessenger_from = \"1\"\n";
        assert_eq!(
            Config::parse(dispatch).unwrap().warnings().join("\n"),
            "",
            "Vonage keeps Dispatch's read timer"
        );
    }

    #[test]
    fn plain_http_to_the_provider_is_warned_about() {
        let warned = |url: &str| {
            let text =
                format!("[delivery.messages]\napplication_id = \"a\"\napi_url = \"{url}\"\n");
            Config::parse(&text).unwrap().warnings().join("\n")
        };
        assert!(warned("http://127.0.0.1:9").contains("delivery.messages.api_url"));
        assert_eq!(warned("https://api.nexmo.com"), "");
    }

    #[test]
    fn an_http_listener_beyond_loopback_is_warned_about() {
        let warned = |listen: &str| {
            let text = format!("[http]\nlisten = {listen:?}\n");
            Config::parse(&text).unwrap().warnings().join("\n")
        };
        for listen in [
            "0.0.0.0:8080",
            "[::]:8080",
            "192.168.1.20:3000",
            "[fe80::1]:80",
        ] {
            assert!(warned(listen).contains("http.listen"), "{listen}");
        }
        for listen in [
            "",
            "127.0.0.1:3000",
            "127.1.2.3:3000",
            "[::1]:3000",
            "[::ffff:127.0.0.1]:3000",
            "unix:/run/otpd-http/http.sock",
        ] {
            assert_eq!(warned(listen), "", "{listen}");
        }
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let text = "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"redis://u:pw-url@h\"\n\
                    [http]\nwebhook_signature_secret = \"pw-webhook\"\n";
        let shown = format!("{:?}", Config::parse(text).unwrap());
        assert!(
            shown.contains("webhook_signature_secret: \"***\""),
            "{shown}"
        );
        for secret in ["pw-url", "pw-webhook"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn a_tls_ca_file_needs_a_rediss_address() {
        let redis = "[store]\nengine = \"redis\"\n[store.redis]\n";
        let plain = format!("{redis}url = \"redis://a\"\ntls_ca_file = \"/ca.pem\"\n");
        let err = Config::parse(&plain).unwrap_err();
        assert!(err.to_string().contains("store.redis.tls_ca_file"), "{err}");
        assert!(Config::parse(&plain.replace("redis://", "rediss://")).is_ok());
        let sentinels = format!("{redis}sentinels = [\"rediss://s\"]\nsentinel_master = \"m\"\n");
        let err = Config::parse(&sentinels).unwrap_err();
        assert!(err.to_string().contains("store.redis.sentinels"), "{err}");
    }

    #[test]
    fn waiting_for_replicas_ends_before_the_response_timeout() {
        let redis = "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"redis://a\"\nresponse_timeout_ms = 500\n";
        assert!(Config::parse(redis).is_ok(), "no wait, no bound");
        let err = Config::parse(&format!("{redis}min_replicas = 1\n")).unwrap_err();
        assert!(
            err.to_string().contains("store.redis.replica_timeout_ms"),
            "{err}"
        );
        assert!(
            Config::parse(&format!(
                "{redis}min_replicas = 1\nreplica_timeout_ms = 400\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn redis_engine_needs_one_address_and_a_plain_prefix() {
        let err = Config::parse("[store]\nengine = \"redis\"\n").unwrap_err();
        assert!(err.to_string().contains("store.redis.url"), "{err}");
        let both = "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"redis://a\"\ncluster = [\"redis://b\"]\n";
        let err = Config::parse(both).unwrap_err();
        assert!(err.to_string().contains("store.redis.cluster"), "{err}");
        let braces = "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"redis://a\"\nkey_prefix = \"{x}\"\n";
        let err = Config::parse(braces).unwrap_err();
        assert!(err.to_string().contains("store.redis.key_prefix"), "{err}");
        assert!(Config::parse("[store.redis]\ncluster = [\"redis://b\"]\n").is_ok());
        let sentinel =
            "[store]\nengine = \"redis\"\n[store.redis]\nsentinels = [\"redis://s:26379\"]\n";
        let err = Config::parse(sentinel).unwrap_err();
        assert!(
            err.to_string().contains("store.redis.sentinel_master"),
            "{err}"
        );
        assert!(Config::parse(&format!("{sentinel}sentinel_master = \"m\"\n")).is_ok());
        let err = Config::parse(&format!(
            "{sentinel}sentinel_master = \"m\"\nurl = \"redis://a\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("store.redis.cluster"), "{err}");
    }

    #[test]
    fn redis_values_are_checked_whatever_the_engine() {
        for (toml, key) in [
            ("[store.redis]\npool_size = 0\n", "store.redis.pool_size"),
            (
                "[store.redis]\nkey_prefix = \"{x}\"\n",
                "store.redis.key_prefix",
            ),
            (
                "[store.redis]\nurl = \"redis://a\"\ncluster = [\"redis://b\"]\n",
                "store.redis.cluster",
            ),
            ("[store.redis]\nurl = \"http://x\"\n", "store.redis.url"),
        ] {
            let err = Config::parse(toml).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
        assert!(Config::parse("[store.redis]\nurl = \"redis://a\"\n").is_ok());
    }

    #[test]
    fn redis_addresses_must_be_ones_the_client_can_use() {
        let parse = |key: &str, value: &str| {
            let value = match key {
                "url" => format!("{value:?}"),
                _ => format!("[{value:?}]"),
            };
            let master = if key == "sentinels" {
                "sentinel_master = \"m\"\n"
            } else {
                ""
            };
            Config::parse(&format!(
                "[store]\nengine = \"redis\"\n[store.redis]\n{key} = {value}\n{master}"
            ))
        };
        for url in [
            "redis://h",
            "redis://u:pw@h:6379/2",
            "rediss://h:6380",
            "unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=1",
        ] {
            assert!(parse("url", url).is_ok(), "{url}");
        }
        for (key, url) in [
            ("url", "http://u:S3CRET@x"),
            ("url", "h:6379"),
            ("url", "redis://"),
            ("url", "redis://h/x"),
            ("url", "valkey://h"),
            ("cluster", "unix:///run/redis.sock"),
            ("cluster", "tcp://h:7000"),
            ("sentinels", "http://s:26379"),
        ] {
            let err = parse(key, url).unwrap_err().to_string();
            assert!(err.contains(&format!("store.redis.{key}")), "{url}: {err}");
            assert!(!err.contains("S3CRET"), "{err}");
        }
        assert!(parse("cluster", "rediss://h:7000").is_ok());
        assert!(parse("sentinels", "unix:///run/sentinel.sock").is_ok());
    }

    #[test]
    fn a_bad_redis_database_is_refused_in_otpds_words() {
        let parse = |url: &str| {
            let toml = format!("[store]\nengine = \"redis\"\n[store.redis]\nurl = {url:?}\n");
            Config::parse(&toml).unwrap_err().to_string()
        };
        let expected = "is not a number: expected a database number, 0 or more, after the \
                        host (redis://host:6379/0), or ?db=0 after a socket's path";
        for (url, shown) in [
            (
                "redis://:S3CRET@h:6379/x",
                r#""redis://***@h:6379/x": the database "x""#,
            ),
            ("redis://h/-1", r#""redis://h/-1": the database "-1""#),
            ("rediss://h/0/1", r#""rediss://h/0/1": the database "0/1""#),
            (
                "unix:///run/r.sock?db=two",
                r#""unix:///run/r.sock?db=two": the database "two""#,
            ),
        ] {
            let err = parse(url);
            assert_eq!(
                err,
                format!("config key `store.redis.url`: {shown} {expected}"),
                "{url}"
            );
        }
    }

    #[test]
    fn redis_password_is_redacted() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("unix:///run/r.sock"), "unix:///run/r.sock");
        assert_eq!(
            redact_url("unix:///run/r.sock?db=1&user=u&pass=pw"),
            "unix:///run/r.sock?db=1&user=u&pass=***"
        );
        assert_eq!(redact_url("redis//u:pw@h:1"), "***@h:1", "unparseable");
        assert_eq!(redact_url("rediss://u:p@w@h:1/0"), "rediss://***@h:1/0");
        assert_eq!(redact_url("redis://u:S3C?RET@h:1/x"), "redis://***@h:1/x");
        assert_eq!(
            redact_url("redis://u:a/b#c@h:1?db=2"),
            "redis://***@h:1?db=2"
        );
        let config = RedisConfig {
            url: "redis://u:secret@h".into(),
            ..RedisConfig::default()
        };
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn flags_beat_file_and_systemd() {
        let mut config = Config::parse("[server]\nsocket = \"/file.sock\"\n").unwrap();
        let dirs = SystemdDirs {
            state: Some("/var/lib/otpd".into()),
            runtime: Some("/run/otpd".into()),
            credentials: None,
        };
        config.resolve_paths(
            &Overrides {
                socket: Some("/flag.sock".into()),
                data_dir: None,
            },
            &dirs,
        );
        assert_eq!(config.server.socket, PathBuf::from("/flag.sock"));
        assert_eq!(config.store.path, PathBuf::from("/var/lib/otpd/db"));
        assert_eq!(
            config.store.secret_file,
            PathBuf::from("/var/lib/otpd/secret.key")
        );
    }

    #[test]
    fn a_data_dir_flag_beats_the_files_paths() {
        let file = "[server]\nsocket = \"/file.sock\"\n[store]\npath = \"/file-db\"\n";
        let mut config = Config::parse(file).unwrap();
        let data_dir = Overrides {
            socket: None,
            data_dir: Some("/flag".into()),
        };
        let replaced = config.resolve_paths(&data_dir, &SystemdDirs::default());
        assert_eq!(config.server.socket, PathBuf::from("/flag/otpd.sock"));
        assert_eq!(config.store.path, PathBuf::from("/flag/db"));
        assert_eq!(config.store.secret_file, PathBuf::from("/flag/secret.key"));
        assert_eq!(
            replaced,
            [
                "--data-dir /flag replaces server.socket = \"/file.sock\" from the config file",
                "--data-dir /flag replaces store.path = \"/file-db\" from the config file",
            ],
            "said at start-up; the secret_file the file left empty is not"
        );
        let mut config = Config::default();
        assert!(
            config
                .resolve_paths(&data_dir, &SystemdDirs::default())
                .is_empty()
        );
    }

    #[test]
    fn systemd_runtime_dir_holds_the_socket() {
        let mut config = Config::default();
        let dirs = SystemdDirs {
            state: Some("/var/lib/otpd".into()),
            runtime: Some("/run/otpd".into()),
            credentials: None,
        };
        config.resolve_paths(&Overrides::default(), &dirs);
        assert_eq!(config.server.socket, PathBuf::from("/run/otpd/otpd.sock"));
    }

    #[test]
    fn an_empty_credential_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "").unwrap();
        std::fs::write(dir.path().join("full"), "key").unwrap();
        let dirs = SystemdDirs {
            credentials: Some(dir.path().to_owned()),
            ..SystemdDirs::default()
        };
        assert_eq!(dirs.credential("empty"), None);
        assert_eq!(dirs.credential("missing"), None);
        assert_eq!(dirs.credential("full"), Some(dir.path().join("full")));
    }

    #[test]
    fn developer_default_is_local() {
        let mut config = Config::default();
        config.resolve_paths(&Overrides::default(), &SystemdDirs::default());
        assert_eq!(config.server.socket, PathBuf::from("./otpd-data/otpd.sock"));
        assert_eq!(config.store.path, PathBuf::from("./otpd-data/db"));
    }

    #[test]
    fn the_server_secret_comes_from_its_systemd_credential_unless_a_flag_names_the_data_dir() {
        let credentials = tempfile::tempdir().unwrap();
        std::fs::write(credentials.path().join(SECRET_CREDENTIAL), "secret").unwrap();
        let dirs = SystemdDirs {
            credentials: Some(credentials.path().to_owned()),
            ..SystemdDirs::default()
        };
        let mut config = Config::default();
        config.resolve_paths(&Overrides::default(), &dirs);
        assert_eq!(
            config.store.secret_file,
            credentials.path().join(SECRET_CREDENTIAL)
        );
        let mut config = Config::default();
        let data_dir = Overrides {
            data_dir: Some(PathBuf::from("/tmp/otpd-here")),
            ..Overrides::default()
        };
        config.resolve_paths(&data_dir, &dirs);
        assert_eq!(
            config.store.secret_file,
            PathBuf::from("/tmp/otpd-here/secret.key")
        );
    }

    #[test]
    fn vonage_key_and_webhook_secret_fall_back_to_systemd_credentials() {
        let credentials = tempfile::tempdir().unwrap();
        std::fs::write(credentials.path().join(VONAGE_KEY_CREDENTIAL), "key").unwrap();
        std::fs::write(credentials.path().join(WEBHOOK_SECRET_CREDENTIAL), "s").unwrap();
        let dirs = SystemdDirs {
            credentials: Some(credentials.path().to_owned()),
            ..SystemdDirs::default()
        };
        let mut config =
            Config::parse("[delivery.messages]\nprivate_key_file = \"/etc/otpd/k.pem\"\n").unwrap();
        config.resolve_paths(&Overrides::default(), &dirs);
        assert_eq!(
            config.delivery.dispatch.private_key_file,
            credentials.path().join(VONAGE_KEY_CREDENTIAL)
        );
        assert_eq!(
            config.delivery.messages.private_key_file,
            PathBuf::from("/etc/otpd/k.pem"),
            "an explicit file wins"
        );
        assert_eq!(
            config.http.webhook_secret_credential,
            Some(credentials.path().join(WEBHOOK_SECRET_CREDENTIAL))
        );
    }
}
