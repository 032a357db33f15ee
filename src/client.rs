//! A client of the socket protocol, for the command-line tools and the benchmark.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::{DEFAULT_DATA_DIR, SOCKET_NAME};
use crate::unix_stream::{ReadHalf, WriteHalf};

/// The socket of the packaged service, used when it exists and nothing else is said.
pub const SYSTEM_SOCKET: &str = "/run/otpd/otpd.sock";

/// Where the client tools look for the daemon without `--socket`: the system socket if
/// there is one, else the developer default.
pub fn default_socket() -> PathBuf {
    let system = Path::new(SYSTEM_SOCKET);
    if system.exists() {
        system.to_owned()
    } else {
        Path::new(DEFAULT_DATA_DIR).join(SOCKET_NAME)
    }
}

/// One connection to the daemon; requests are answered in order.
pub struct Client {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
    line: String,
}

impl Client {
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("cannot connect to otpd at {}", path.display()))?;
        let (read, writer) = crate::unix_stream::split(stream.into_std()?)?;
        Ok(Self {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        })
    }

    /// Sends one request without waiting for its answer (for pipelining).
    pub async fn send(&mut self, request: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.send_line(&line).await
    }

    /// Sends a request line that is already serialised (ending in `\n`).
    pub async fn send_line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(line).await?;
        Ok(())
    }

    /// Reads the next answer.
    pub async fn receive(&mut self) -> anyhow::Result<Value> {
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            anyhow::bail!("otpd closed the connection");
        }
        serde_json::from_str(&self.line).context("otpd sent a line that is not JSON")
    }

    /// Sends one request and reads its answer. A daemon that turns the connection away
    /// (`busy`, `forbidden`) answers and closes without reading, so the request may
    /// meet a closed pipe: its answer is still there to read, and says more.
    pub async fn call(&mut self, request: &Value) -> anyhow::Result<Value> {
        let sent = self.send(request).await;
        match (sent, self.receive().await) {
            (_, Ok(answer)) => Ok(answer),
            (Err(send_error), Err(_)) => Err(send_error),
            (Ok(()), Err(receive_error)) => Err(receive_error),
        }
    }
}
