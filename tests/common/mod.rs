//! Test harness: starts the real `otpd` binary in a temporary directory, on its own
//! socket, and talks to it over that socket.
//!
//! Every daemon gets a fresh `TempDir`, so tests run in parallel without fixed paths.
//! The `log` backend's `log_file` is how a test learns the codes it was sent.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Longest a test waits for the daemon to come up or go down: catches hangs only.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running daemon and its directory.
pub struct Daemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub log_file: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
}

/// The config every test daemon gets, before the test's own TOML: the log backend
/// writing codes to a file in the temp dir.
fn base_config(dir: &Path) -> String {
    format!(
        "[delivery]\nbackend = \"log\"\nlog_file = \"{}\"\n",
        dir.join("codes.jsonl").display()
    )
}

impl Daemon {
    /// Starts a daemon with `extra` TOML sections merged after the base config. Keys
    /// of `[delivery]` go into `delivery_extra` (TOML allows a table only once).
    pub fn start(extra: &str) -> Daemon {
        Self::start_with(extra, "")
    }

    /// Like [`Daemon::start`], with extra keys for the `[delivery]` table.
    pub fn start_with(extra: &str, delivery_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!("{}{delivery_extra}\n{extra}\n", base_config(dir.path()));
        let config_path = dir.path().join("otpd.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut daemon = Daemon {
            socket: dir.path().join("otpd.sock"),
            log_file: dir.path().join("codes.jsonl"),
            stderr_path: dir.path().join("stderr.log"),
            config_path,
            dir,
            child: None,
        };
        daemon.spawn();
        daemon
    }

    /// Starts the binary (again) on the same directory and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_otpd"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--socket")
            .arg(&self.socket)
            .env("OTPD_LOG", "info")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start otpd");
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                // Any answer will do: a daemon that refuses this peer (403) is up too.
                let mut conn = Conn::new(stream);
                conn.send(&json!({"op": "ping"}));
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

    fn wait_exit(&mut self) -> ExitStatus {
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
        let response = self.call(json!({"op": "create", "token": token, "to": {"sms": number}}));
        assert_eq!(response["status"], 201, "{response}");
        self.code_for(token)
    }

    /// The last code the log backend wrote for `token`.
    pub fn code_for(&self, token: &str) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .rfind(|entry| entry["token"] == token)
            .and_then(|entry| entry["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no code logged for {token}"))
    }

    pub fn verify(&self, token: &str, code: &str) -> Value {
        self.call(json!({"op": "verify", "token": token, "code": code}))
    }

    pub fn stats(&self) -> Value {
        self.call(json!({"op": "stats"}))
    }
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
