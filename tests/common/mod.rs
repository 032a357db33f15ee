//! Test harness: starts the real `otpd` binary in a temporary directory, on its own
//! socket, and talks to it over that socket.
//!
//! Every daemon gets a fresh `TempDir`, so tests run in parallel without fixed paths.
//! The `log` backend's `log_file` is how a test learns the codes it was sent.
//!
//! A daemon runs on a storage [`Engine`]. Tests written once as `fn name(engine: Engine)`
//! run on every engine through [`per_engine!`]. The Redis engines use one Redis server
//! (and one 3-master Redis Cluster) per test binary, started on first use in a temp dir
//! ([`RedisServer`]); each daemon gets a key prefix of its own, so tests stay apart.
//!
//! [`http`] is the HTTP client for daemons started with an `[http]` listener.

#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod http;
pub mod vonage;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Longest a test waits for the daemon to come up or go down: catches hangs only.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Instantiates tests written once as `fn name(engine: Engine)` for each listed engine,
/// as `engine::name`: `per_engine!([sled, fjall, redis, redis_cluster] { test_a, test_b });`
#[macro_export]
macro_rules! per_engine {
    ([$($engine:ident),* $(,)?] $names:tt) => {
        $( $crate::per_engine!(@one $engine $names); )*
    };
    (@one $engine:ident { $($name:ident),* $(,)? }) => {
        mod $engine {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::Engine::named(stringify!($engine)))
                }
            )*
        }
    };
}

/// The storage engine a test daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sled,
    /// The embedded fjall engine, in the daemon's directory like sled.
    Fjall,
    /// The test binary's Redis server, over its Unix socket.
    Redis,
    /// The test binary's 3-master Redis Cluster, over TCP on 127.0.0.1.
    RedisCluster,
}

impl Engine {
    /// The engine a [`per_engine!`] module is named after.
    pub fn named(name: &str) -> Engine {
        match name {
            "sled" => Engine::Sled,
            "fjall" => Engine::Fjall,
            "redis" => Engine::Redis,
            "redis_cluster" => Engine::RedisCluster,
            other => panic!("no engine named {other}"),
        }
    }

    /// The `[store]` TOML that puts a daemon on this engine, under a fresh key prefix.
    pub fn store_toml(self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let address = match self {
            Engine::Sled => return "[store]\nengine = \"sled\"\n".into(),
            Engine::Fjall => return "[store]\nengine = \"fjall\"\n".into(),
            Engine::Redis => format!("url = \"{}\"", RedisServer::shared().url()),
            Engine::RedisCluster => format!("cluster = {:?}", RedisCluster::shared().urls()),
        };
        format!(
            "[store]\nengine = \"redis\"\n[store.redis]\n{address}\nkey_prefix = \"t{}:\"\n",
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Starts a daemon on this engine; see [`Daemon::start`].
    pub fn start(self, extra: &str) -> Daemon {
        self.start_with(extra, "")
    }

    /// Starts a daemon on this engine; see [`Daemon::start_with`].
    pub fn start_with(self, extra: &str, delivery_extra: &str) -> Daemon {
        Daemon::start_on(&self.store_toml(), extra, delivery_extra)
    }
}

/// A running daemon and its directory.
pub struct Daemon {
    pub dir: TempDir,
    /// The `[store]` TOML it runs with, so a second host can share its store.
    pub store_toml: String,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub log_file: PathBuf,
    pub stderr_path: PathBuf,
    child: Option<Child>,
}

/// The config every test daemon gets, before the test's own TOML: the default `log`
/// backend writing codes to a file in the temp dir (`delivery_extra` may pick another).
fn base_config(dir: &Path) -> String {
    format!(
        "[delivery]\nlog_file = \"{}\"\n",
        dir.join("codes.jsonl").display()
    )
}

impl Daemon {
    /// Starts a daemon with `extra` TOML sections merged after the base config. Keys
    /// of `[delivery]` go into `delivery_extra` (TOML allows a table only once).
    /// `{dir}` in either stands for the daemon's temporary directory.
    pub fn start(extra: &str) -> Daemon {
        Self::start_with(extra, "")
    }

    /// Like [`Daemon::start`], with extra keys for the `[delivery]` table. The daemon
    /// runs on its default engine (fjall, for the new database a test starts with);
    /// `extra` may hold a `[store]` table.
    pub fn start_with(extra: &str, delivery_extra: &str) -> Daemon {
        Self::start_on("", extra, delivery_extra)
    }

    /// Starts a daemon on `store_toml` in a fresh directory; see [`Daemon::prepare`].
    pub fn start_on(store_toml: &str, extra: &str, delivery_extra: &str) -> Daemon {
        let mut daemon = Daemon::prepare(store_toml, extra, delivery_extra);
        daemon.spawn();
        daemon
    }

    /// Writes the config of a daemon on `store_toml` in a fresh directory, without
    /// starting it.
    pub fn prepare(store_toml: &str, extra: &str, delivery_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "{}{delivery_extra}\n{extra}\n{store_toml}",
            base_config(dir.path())
        )
        .replace("{dir}", &dir.path().display().to_string());
        let config_path = dir.path().join("otpd.toml");
        std::fs::write(&config_path, config).unwrap();
        Daemon {
            socket: dir.path().join("otpd.sock"),
            log_file: dir.path().join("codes.jsonl"),
            stderr_path: dir.path().join("stderr.log"),
            store_toml: store_toml.to_owned(),
            config_path,
            dir,
            child: None,
        }
    }

    /// Starts a second host on the same store as `other`, with a copy of its server
    /// secret (as an operator would distribute it).
    pub fn start_beside(other: &Daemon, extra: &str) -> Daemon {
        let mut daemon = Daemon::prepare(&other.store_toml, extra, "");
        std::fs::copy(
            other.dir.path().join("secret.key"),
            daemon.dir.path().join("secret.key"),
        )
        .unwrap();
        daemon.spawn();
        daemon
    }

    /// Starts the binary expecting it to refuse to start; returns its stderr.
    pub fn start_refused(&mut self) -> String {
        let command = self.serve_command();
        self.launch(command);
        let status = self.wait_exit();
        assert!(!status.success(), "otpd started:\n{}", self.stderr());
        self.stderr()
    }

    /// Starts the binary (again) on the same directory and waits until it answers.
    pub fn spawn(&mut self) {
        let command = self.serve_command();
        self.launch(command);
        self.wait_until_ready();
    }

    /// `otpd serve` on this directory and socket (see [`Daemon::command`]).
    pub fn serve_command(&self) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_otpd"));
        command.args(self.serve_args());
        command
    }

    /// The arguments of `otpd serve` on this directory and socket.
    pub fn serve_args(&self) -> Vec<OsString> {
        vec![
            "serve".into(),
            "--config".into(),
            self.config_path.clone().into(),
            "--data-dir".into(),
            self.dir.path().into(),
            "--socket".into(),
            self.socket.clone().into(),
        ]
    }

    /// Runs `program` in a clean environment (no systemd variables), stdout discarded
    /// and stderr appended to the daemon's log file, with the common default umask
    /// 022 whatever the runner's, so that a check of the modes otpd gives its files
    /// means the same everywhere.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.command_with_umask(program, 0o022)
    }

    /// Like [`Daemon::command`], with the umask `umask`.
    pub fn command_with_umask(&self, program: impl AsRef<OsStr>, umask: u32) -> Command {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut command = Command::new(program);
        without_outside_settings(&mut command)
            .env("OTPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let umask = nix::sys::stat::Mode::from_bits_truncate(umask);
        // SAFETY: umask(2) is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(move || {
                nix::sys::stat::umask(umask);
                Ok(())
            });
        }
        command
    }

    /// Starts `command` as this daemon's process, without waiting for it to answer.
    pub fn launch(&mut self, mut command: Command) {
        assert!(self.child.is_none(), "daemon already running");
        self.child = Some(command.spawn().expect("start otpd"));
    }

    /// Waits until the daemon answers a ping on its socket.
    pub fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                // Any answer will do: a daemon that refuses this peer (403) is up too,
                // and may have closed before the ping is written.
                let mut conn = Conn::new(stream);
                let _ = conn.writer.write_all(b"{\"op\":\"ping\"}\n");
                if conn
                    .receive()
                    .is_some_and(|answer| answer["status"].is_u64())
                {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "otpd exited with {status} before it answered:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "otpd did not answer in time:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        self.wait_exit()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        self.wait_exit();
    }

    /// Waits for the daemon to exit by itself and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("otpd did not exit in time:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A new connection to the daemon.
    pub fn connect(&self) -> Conn {
        Conn::new(UnixStream::connect(&self.socket).expect("connect to otpd"))
    }

    /// One request on a fresh connection.
    pub fn call(&self, request: Value) -> Value {
        self.connect().call(request)
    }

    /// Creates a code for `token` by SMS to `number` and returns it, read from the
    /// log backend's file. Panics unless the create answered 201.
    pub fn create_code(&self, token: &str, number: &str) -> String {
        self.create_code_from(json!({"op": "create", "token": token, "to": {"sms": number}}))
    }

    /// Like [`Daemon::create_code`], for a code valid one second only.
    pub fn create_short_code(&self, token: &str, number: &str) -> String {
        self.create_code_valid_for(token, number, 1)
    }

    /// Like [`Daemon::create_code`], for a code valid `ttl_secs`.
    pub fn create_code_valid_for(&self, token: &str, number: &str, ttl_secs: u64) -> String {
        self.create_code_from(
            json!({"op": "create", "token": token, "to": {"sms": number}, "ttl_secs": ttl_secs}),
        )
    }

    fn create_code_from(&self, request: Value) -> String {
        let response = self.call(request.clone());
        assert_eq!(response["status"], 201, "{response}");
        self.code_for(request["token"].as_str().unwrap())
    }

    /// The last code the log backend wrote for `token`.
    pub fn code_for(&self, token: &str) -> String {
        self.logged_for(token, "code")
    }

    /// The delivery reference (`log-…`) the log backend gave `token`'s last code.
    pub fn reference_for(&self, token: &str) -> String {
        self.logged_for(token, "reference")
    }

    fn logged_for(&self, token: &str, field: &str) -> String {
        self.logged_line(token)
            .and_then(|entry| entry[field].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no {field} logged for {token}"))
    }

    /// The log backend's last line for `token`.
    pub fn logged_line(&self, token: &str) -> Option<Value> {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .rfind(|entry| entry["token"] == token)
    }

    /// Where the HTTP listener listens (`127.0.0.1:PORT` or `unix:/path`), from the
    /// daemon's `HTTP listener ready address=…` line. With `listen = "127.0.0.1:0"` the
    /// kernel picks a free port, so tests need neither fixed ports nor a race to find
    /// one; the line is written before the socket answers, so it is there once
    /// [`Daemon::spawn`] returns.
    pub fn http_address(&self) -> String {
        self.stderr()
            .lines()
            .rev()
            .filter(|line| line.contains("HTTP listener ready"))
            .find_map(|line| line.split_once("address=").map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no HTTP listener in the log:\n{}", self.stderr()))
    }

    /// An HTTP client for this daemon's listener.
    pub fn http(&self) -> http::Client {
        http::Client::new(&self.http_address())
    }

    pub fn verify(&self, token: &str, code: &str) -> Value {
        self.call(json!({"op": "verify", "token": token, "code": code}))
    }

    pub fn stats(&self) -> Value {
        self.call(json!({"op": "stats"}))
    }
}

/// Sends `n` requests at once, the i-th to `hosts[i % hosts.len()]`, each on its own
/// connection opened beforehand and released together by a barrier; returns the
/// statuses in request order.
pub fn concurrently(
    hosts: &[&Daemon],
    n: usize,
    request: impl Fn(usize) -> Value + Sync,
) -> Vec<u64> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let mut conn = hosts[i % hosts.len()].connect();
                let (barrier, request) = (&barrier, &request);
                scope.spawn(move || {
                    let line = request(i);
                    barrier.wait();
                    conn.call(line)["status"].as_u64().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// How many of `statuses` are `status`.
pub fn count(statuses: &[u64], status: u64) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A blocking connection speaking JSON lines.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Conn {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Writes raw bytes.
    /// The connection's writing side, for a thread of its own.
    pub fn try_clone_writer(&self) -> UnixStream {
        self.writer.try_clone().unwrap()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Writes one request line.
    pub fn send(&mut self, request: &Value) {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// Reads one answer line; `None` when the daemon closed the connection.
    pub fn receive(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}")),
            ),
            Err(e) => panic!("reading from otpd: {e}"),
        }
    }

    pub fn call(&mut self, request: Value) -> Value {
        self.send(&request);
        self.receive().expect("an answer")
    }

    /// Like [`Conn::call`], for a daemon that may die: `None` when the request could
    /// not be sent or its answer did not arrive.
    pub fn try_call(&mut self, request: &Value) -> Option<Value> {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).ok()?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(n) if n > 0 && answer.ends_with('\n') => Some(
                serde_json::from_str(&answer)
                    .unwrap_or_else(|e| panic!("bad JSON {answer:?}: {e}")),
            ),
            _ => None,
        }
    }

    /// True when the daemon has closed the connection (reads EOF).
    pub fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
    }

    /// Half-closes the sending side, as socat does at the end of its input.
    pub fn shutdown_write(&self) {
        self.writer.shutdown(std::net::Shutdown::Write).unwrap();
    }
}

/// A redis-server of this test binary, in its own temp dir; it outlives the tests
/// (a static), so a guard process kills it when the test binary exits.
pub struct RedisServer {
    pub socket: PathBuf,
    _guard: Guard,
}

impl RedisServer {
    /// The binary's shared server, started on first use.
    pub fn shared() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir").keep();
            let socket = dir.join("redis.sock");
            let child = unix_redis(&dir, &socket, &["--unixsocketperm", "700"]);
            let guard = Guard::new(&dir, vec![child]);
            RedisServer {
                socket,
                _guard: guard,
            }
        })
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// A redis-server of one test, with an append-only file fsynced on every write, which
/// the test may crash and start again on the same socket and directory.
pub struct OwnedRedis {
    dir: TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl OwnedRedis {
    pub fn start() -> OwnedRedis {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut redis = OwnedRedis {
            socket: dir.path().join("redis.sock"),
            dir,
            child: None,
        };
        redis.spawn();
        redis
    }

    /// Starts redis-server (again) and waits until it answers.
    pub fn spawn(&mut self) {
        let durable = ["--appendonly", "yes", "--appendfsync", "always"];
        self.child = Some(unix_redis(self.dir.path(), &self.socket, &durable));
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs `redis-cli ARGS…` on it and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for OwnedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-master Redis Cluster of this test binary on 127.0.0.1 (a cluster needs TCP).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _guard: Guard,
}

impl RedisCluster {
    /// The binary's shared cluster, started on first use.
    pub fn shared() -> &'static RedisCluster {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir").keep();
            let mut children = Vec::new();
            let mut ports = Vec::new();
            for node in 0..3 {
                let (child, port) = cluster_node(&dir, node);
                children.push(child);
                ports.push(port);
            }
            let guard = Guard::new(&dir, children);
            let mut create = Command::new("redis-cli");
            create.args(["--cluster", "create"]);
            for port in &ports {
                create.arg(format!("127.0.0.1:{port}"));
            }
            let out = create
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("run redis-cli --cluster create");
            assert!(
                out.status.success(),
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            for port in &ports {
                wait_for("the cluster to agree", || {
                    redis_cli(*port, &["cluster", "info"]).contains("cluster_state:ok")
                });
            }
            RedisCluster {
                ports,
                _guard: guard,
            }
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }
}

/// Starts one cluster node on free ports.
fn cluster_node(dir: &Path, node: usize) -> (Child, u16) {
    tcp_redis(&format!("Redis Cluster node {node}"), |port| {
        let mut command = redis_server(dir);
        command.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &free_port().to_string(),
            "--cluster-config-file",
            &format!("nodes-{node}.conf"),
        ]);
        command
    })
}

/// Starts a Redis process (`command` for a port) on a free TCP port and waits until it
/// answers. A port found free may be taken before the process binds it; it then exits
/// at once and is started again on another port.
fn tcp_redis(what: &str, command: impl Fn(u16) -> Command) -> (Child, u16) {
    for _ in 0..20 {
        let port = free_port();
        let mut child = command(port)
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .is_some_and(redis_ping)
            {
                // The answer may have come from another test's Redis that took the
                // port first, while this one is still on its way out (bind failed).
                std::thread::sleep(Duration::from_millis(200));
                if child.try_wait().unwrap().is_none() {
                    return (child, port);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start {what}");
}

/// A redis-server of one test that takes TLS on `tls_port`, with the certificate in
/// `tests/fixtures` (for 127.0.0.1, signed by `redis-test-ca.pem`; made once with
/// openssl, valid for a century, its CA key thrown away). Its plain port only tells
/// the harness it is up.
pub struct RedisTls {
    _dir: TempDir,
    child: Child,
    pub tls_port: u16,
}

impl RedisTls {
    pub fn start() -> RedisTls {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixture = |name: &str| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name)
        };
        let tls_port = std::cell::Cell::new(0);
        let (child, _) = tcp_redis("the TLS Redis", |port| {
            tls_port.set(free_port());
            let mut command = redis_server(dir.path());
            command
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--tls-port", &tls_port.get().to_string()])
                .arg("--tls-cert-file")
                .arg(fixture("redis-test-server.pem"))
                .arg("--tls-key-file")
                .arg(fixture("redis-test-server.key"))
                .arg("--tls-ca-cert-file")
                .arg(fixture("redis-test-ca.pem"))
                .args(["--tls-auth-clients", "no"]);
            command
        });
        RedisTls {
            _dir: dir,
            child,
            tls_port: tls_port.get(),
        }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }

    /// The CA the server's certificate chains to.
    pub fn ca_file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/redis-test-ca.pem")
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis master, its replica and one Sentinel watching them, on 127.0.0.1, owned by
/// one test, which may kill the master to make the Sentinel promote the replica. The
/// Sentinel waits 2 s before it calls the master down: on a machine busy with a whole
/// test suite a shorter wait made it fail over a live master, whose writes the
/// resync then erased.
pub struct RedisSentinel {
    _dir: TempDir,
    children: Vec<Child>,
    pub master_port: u16,
    pub sentinel_port: u16,
    /// `requirepass` of the master and the replica, if any.
    password: Option<String>,
}

impl RedisSentinel {
    /// The name the Sentinel knows the master by.
    pub const MASTER: &'static str = "otpd-master";

    pub fn start() -> RedisSentinel {
        Self::start_with_password(None)
    }

    /// The same, with the master and the replica behind `requirepass`.
    pub fn start_with_password(password: Option<&str>) -> RedisSentinel {
        let auth: Vec<&str> = match password {
            Some(password) => vec!["--requirepass", password, "--masterauth", password],
            None => Vec::new(),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let node = |name: &str| {
            let node_dir = dir.path().join(name);
            std::fs::create_dir(&node_dir).unwrap();
            node_dir
        };
        let master_dir = node("master");
        let (master, master_port) = tcp_redis("the Redis master", |port| {
            let mut command = redis_server(&master_dir);
            command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
            // The replica's first sync starts at once, not after the default 5 s.
            command.args(["--repl-diskless-sync-delay", "0"]);
            command.args(&auth);
            command
        });
        let replica_dir = node("replica");
        let (replica, replica_port) = tcp_redis("the Redis replica", |port| {
            let mut command = redis_server(&replica_dir);
            command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
            command.args(["--replicaof", "127.0.0.1", &master_port.to_string()]);
            command.args(&auth);
            command
        });
        let sentinel_dir = node("sentinel");
        let conf = sentinel_dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nsentinel monitor {m} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {m} 2000\nsentinel failover-timeout {m} 6000\n{pass}",
                m = Self::MASTER,
                pass = password
                    .map(|p| format!("sentinel auth-pass {} {p}\n", Self::MASTER))
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
        let (sentinel, sentinel_port) = tcp_redis("the Redis Sentinel", |port| {
            let mut command = Command::new("redis-server");
            command
                .arg(&conf)
                .args(["--sentinel", "--port", &port.to_string()])
                .current_dir(&sentinel_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            command
        });
        let sentinel = RedisSentinel {
            _dir: dir,
            children: vec![master, replica, sentinel],
            master_port,
            sentinel_port,
            password: password.map(str::to_owned),
        };
        wait_for("the replica to be in sync", || {
            sentinel
                .master_cli(&["info", "replication"])
                .contains("state=online")
        });
        wait_for("the Sentinel to see the replica", || {
            redis_cli(sentinel_port, &["sentinel", "replicas", Self::MASTER])
                .contains(&replica_port.to_string())
        });
        sentinel
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel_port)
    }

    /// `redis://` URL of the master itself.
    pub fn master_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.master_port)
    }

    /// Kills the replica (SIGKILL); before [`RedisSentinel::kill_master`] only.
    pub fn kill_replica(&mut self) {
        let replica = &mut self.children[1];
        let _ = replica.kill();
        let _ = replica.wait();
    }

    /// `redis-cli` on the master, logged in.
    fn master_cli(&self, args: &[&str]) -> String {
        let mut login = Vec::new();
        if let Some(password) = &self.password {
            login = vec!["--no-auth-warning", "-a", password];
        }
        redis_cli(self.master_port, &[&login[..], args].concat())
    }

    /// Waits until the replica has acknowledged every write, then kills the master
    /// (SIGKILL). (`WAIT` would not do: it covers only its own connection's writes.)
    pub fn kill_master(&mut self) {
        let field = |info: &str, name: &str| -> Option<u64> {
            let at = info.find(name)? + name.len();
            let digits: String = info[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        let written = field(
            &self.master_cli(&["info", "replication"]),
            "master_repl_offset:",
        )
        .expect("the master's replication offset");
        wait_for("the replica to acknowledge every write", || {
            let info = self.master_cli(&["info", "replication"]);
            info.lines()
                .filter(|line| line.starts_with("slave0:"))
                .filter_map(|line| field(line, "offset="))
                .any(|acked| acked >= written)
        });
        let mut master = self.children.remove(0);
        let _ = master.kill();
        let _ = master.wait();
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A one-node Redis Cluster (every slot on one node) of one test that clients reach
/// only through a TCP relay of the test: the node announces the relay's port, so the
/// cluster client's slot map leads there too. The relay can lose the answer to a
/// script call after Redis ran it ([`ProxiedCluster::lose_next_script_answer`]), as a
/// connection that drops in flight does.
pub struct ProxiedCluster {
    _dir: TempDir,
    child: Child,
    pub relay_port: u16,
    lose_answer: Arc<AtomicBool>,
}

impl ProxiedCluster {
    pub fn start() -> ProxiedCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_port = listener.local_addr().unwrap().port();
        let (child, port) = tcp_redis("the proxied Redis Cluster node", |port| {
            let mut command = redis_server(dir.path());
            command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
            command.args(["--cluster-enabled", "yes", "--cluster-port"]);
            command.arg(free_port().to_string());
            command.args([
                "--cluster-announce-ip",
                "127.0.0.1",
                "--cluster-announce-port",
            ]);
            command.arg(relay_port.to_string());
            command
        });
        redis_cli(port, &["cluster", "addslotsrange", "0", "16383"]);
        wait_for("the one-node cluster", || {
            redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok")
        });
        let lose_answer = Arc::new(AtomicBool::new(false));
        let lose = lose_answer.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                relay(client, port, lose.clone());
            }
        });
        ProxiedCluster {
            _dir: dir,
            child,
            relay_port,
            lose_answer,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.relay_port)
    }

    /// The next `EVALSHA` reaches Redis, and its connection is closed when Redis
    /// answers, instead of the answer being passed on.
    pub fn lose_next_script_answer(&self) {
        self.lose_answer.store(true, Ordering::SeqCst);
    }
}

impl Drop for ProxiedCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A two-node Redis Cluster of one test, every slot on the first node, whose slots the
/// test moves to the second by hand, in the steps `redis-cli --cluster reshard` takes.
pub struct TwoNodeCluster {
    _dir: TempDir,
    children: Vec<Child>,
    ports: [u16; 2],
    ids: [String; 2],
}

impl TwoNodeCluster {
    pub fn start() -> TwoNodeCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, first_port) = cluster_node(dir.path(), 0);
        let (second, second_port) = cluster_node(dir.path(), 1);
        let ports = [first_port, second_port];
        redis_cli(first_port, &["cluster", "addslotsrange", "0", "16383"]);
        let (first_node, second_node) = (
            format!("127.0.0.1:{first_port}"),
            format!("127.0.0.1:{second_port}"),
        );
        let add = Command::new("redis-cli")
            .args(["--cluster", "add-node", &second_node, &first_node])
            .output()
            .expect("run redis-cli --cluster add-node");
        assert!(add.status.success(), "add-node: {add:?}");
        for port in ports {
            wait_for("both nodes to agree", || {
                let nodes = redis_cli(port, &["cluster", "nodes"]);
                nodes.lines().count() == 2
                    && redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        let ids = ports.map(|port| redis_cli(port, &["cluster", "myid"]).trim().to_owned());
        TwoNodeCluster {
            _dir: dir,
            children: vec![first, second],
            ports,
            ids,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> String {
        redis_cli(self.ports[0], &["cluster", "keyslot", key])
            .trim()
            .to_owned()
    }

    /// Starts moving `slot` to the second node and moves its keys there: the first node
    /// now answers `ASK` for them.
    pub fn move_keys(&self, slot: &str) {
        let [first, second] = self.ports;
        let importing = ["cluster", "setslot", slot, "importing", &self.ids[0]];
        assert_eq!(redis_cli(second, &importing).trim(), "OK");
        let migrating = ["cluster", "setslot", slot, "migrating", &self.ids[1]];
        assert_eq!(redis_cli(first, &migrating).trim(), "OK");
        let keys = redis_cli(first, &["cluster", "getkeysinslot", slot, "1000"]);
        let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
        assert!(!keys.is_empty(), "no keys in slot {slot}");
        let mut migrate = vec!["migrate", "127.0.0.1"];
        let second_port = second.to_string();
        migrate.extend([second_port.as_str(), "", "0", "5000", "keys"]);
        migrate.extend(&keys);
        assert_eq!(redis_cli(first, &migrate).trim(), "OK", "{migrate:?}");
    }

    /// Runs `redis-cli ARGS…` on the second node and returns what it printed.
    pub fn on_second(&self, args: &[&str]) -> String {
        redis_cli(self.ports[1], args)
    }

    /// Ends the move of `slot`: it is the second node's, and the first answers `MOVED`.
    pub fn finish_move(&self, slot: &str) {
        for port in self.ports {
            let owner = ["cluster", "setslot", slot, "node", &self.ids[1]];
            assert_eq!(redis_cli(port, &owner).trim(), "OK");
        }
    }
}

impl Drop for TwoNodeCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Relays one client connection to the Redis on `port`, in two threads. When `lose` is
/// set and this client sends an `EVALSHA`, it is cleared and this connection is closed
/// at the next answer.
fn relay(client: std::net::TcpStream, port: u16, lose: Arc<AtomicBool>) {
    use std::net::Shutdown;
    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let lose_here = Arc::new(AtomicBool::new(false));
    let (mut from_client, mut to_server) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    let lose_this = lose_here.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 << 10];
        while let Ok(n @ 1..) = from_client.read(&mut buf) {
            let request = &buf[..n];
            if request.windows(7).any(|w| w == b"EVALSHA") && lose.swap(false, Ordering::SeqCst) {
                lose_this.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(request).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        let (mut from_server, mut to_client) = (server, client);
        let mut buf = vec![0; 64 << 10];
        while let Ok(n @ 1..) = from_server.read(&mut buf) {
            if lose_here.load(Ordering::SeqCst) || to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = from_server.shutdown(Shutdown::Both);
    });
}

/// Runs `redis-cli -p PORT ARGS…` and returns what it printed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts redis-server on a Unix socket only, and waits until it answers.
fn unix_redis(dir: &Path, socket: &Path, args: &[&str]) -> Child {
    let child = redis_server(dir)
        .args(["--port", "0", "--unixsocket", socket.to_str().unwrap()])
        .args(args)
        .spawn()
        .expect("start redis-server (apt-get install redis-server)");
    wait_for("the Redis server", || {
        UnixStream::connect(socket).is_ok_and(redis_ping)
    });
    child
}

/// redis-server in `dir` without persistence (unless later args say otherwise),
/// logging into the dir.
fn redis_server(dir: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .unwrap();
    let mut command = Command::new("redis-server");
    command
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    command
}

/// Sends PING on a fresh connection; true on PONG.
fn redis_ping<S: Read + Write>(mut stream: S) -> bool {
    let mut answer = [0u8; 7];
    // A server behind requirepass answers a PING it cannot take yet with -NOAUTH.
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && [b"+PONG\r\n", b"-NOAUTH"].contains(&&answer)
}

/// `command` without the environment through which systemd or the user running the
/// tests would configure otpd, so that a test daemon runs on its test's settings alone.
fn without_outside_settings(command: &mut Command) -> &mut Command {
    for name in [
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "LISTEN_FDS",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "OTPD_CONFIG",
        "OTPD_SOCKET",
        "OTPD_LOG",
    ] {
        command.env_remove(name);
    }
    command
}

/// Runs `otpd serve ARGS` expecting it to refuse to start, and returns its stderr. One
/// that starts after all fails the test after [`PATIENCE`] instead of hanging it.
pub fn refused_start(args: &[&OsStr]) -> String {
    let mut child = without_outside_settings(&mut Command::new(env!("CARGO_BIN_EXE_otpd")))
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("otpd serve {args:?} started instead of refusing to");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "otpd serve {args:?} exited 0: {stderr}");
    stderr
}

/// Polls `done` until it holds; panics after [`PATIENCE`].
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A shell that waits on a pipe from the test binary: when the binary exits, however
/// it exits, the pipe closes and the shell kills the Redis processes and removes their
/// directory. Statics are never dropped, so nothing else would.
struct Guard(Child);

impl Guard {
    fn new(dir: &Path, children: Vec<Child>) -> Guard {
        let pids: Vec<String> = children.iter().map(|c| c.id().to_string()).collect();
        let child = Command::new("sh")
            .arg("-c")
            .arg("read _; shift; kill \"$@\"; sleep 1; rm -rf \"$0\"")
            .arg(dir)
            .arg("--")
            .args(pids)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Redis guard");
        Guard(child)
    }
}
