//! A blocking HTTP/1.1 client over hyper's own client, for the daemon's HTTP listener
//! on TCP or on a `unix:` socket. Bodies come back as raw bytes, so tests can compare
//! them byte for byte.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use tokio::runtime::Runtime;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Daemon, PATIENCE};

/// A request body: sized (`Content-Length`) or chunked (`Transfer-Encoding: chunked`,
/// length unknown to the server until the end).
pub enum Payload {
    Sized(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

impl Payload {
    pub fn empty() -> Self {
        Payload::Sized(Vec::new())
    }
}

/// A body of chunks with no declared length, so hyper sends it chunked.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }
}

type AnyBody = http_body_util::Either<Full<Bytes>, Chunks>;

/// An answer: status, headers and the exact body bytes.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
            .to_str()
            .unwrap()
    }
}

/// A client for one daemon's listener: each call opens its own connection.
pub struct Client {
    runtime: Runtime,
    address: String,
}

/// One open connection, for keep-alive and shutdown tests.
pub struct Connection<'a> {
    client: &'a Client,
    sender: SendRequest<AnyBody>,
}

impl Client {
    /// `address` is `host:port` or `unix:/path`, as the daemon logs it.
    pub fn new(address: &str) -> Client {
        Client {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            address: address.to_owned(),
        }
    }

    pub fn connect(&self) -> Connection<'_> {
        let sender = self.runtime.block_on(async {
            match self.address.strip_prefix("unix:") {
                Some(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
                    handshake(stream).await
                }
                None => {
                    let stream = tokio::net::TcpStream::connect(&self.address).await.unwrap();
                    handshake(stream).await
                }
            }
        });
        Connection {
            client: self,
            sender,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], Payload::empty())
    }

    /// A POST with a sized body.
    pub fn post(&self, path: &str, body: &[u8]) -> Reply {
        self.send("POST", path, &[], Payload::Sized(body.to_vec()))
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        payload: Payload,
    ) -> Reply {
        self.connect().send(method, path, headers, payload)
    }
}

async fn handshake<S>(stream: S) -> SendRequest<AnyBody>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

impl Connection<'_> {
    /// Waits until the server has closed this connection; false if it is still open
    /// after [`PATIENCE`].
    pub fn closed_by_the_server(&mut self) -> bool {
        let sender = &self.sender;
        self.client.runtime.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                // The connection's task, on this runtime, notices the close as it runs.
                while !sender.is_closed() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
        })
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        payload: Payload,
    ) -> Reply {
        let body = match payload {
            Payload::Sized(bytes) => AnyBody::Left(Full::new(Bytes::from(bytes))),
            Payload::Chunked(chunks) => {
                AnyBody::Right(Chunks(chunks.into_iter().map(Bytes::from).collect()))
            }
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "otpd.test");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body).unwrap();
        let sender = &mut self.sender;
        self.client.runtime.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                sender.ready().await.expect("connection usable");
                let response = sender.send_request(request).await.expect("an answer");
                let (parts, body) = response.into_parts();
                Reply {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: body.collect().await.unwrap().to_bytes().to_vec(),
                }
            })
            .await
            .expect("otpd answered in time")
        })
    }
}

/// The signature secret the webhook tests configure (`http.webhook_signature_secret`).
pub const SECRET: &str = "test-signature-secret-1234567890";

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn sha256_hex(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A Vonage-style webhook JWT: HS256, `iat`, `jti`, `payload_hash` of `hashed`.
pub fn webhook_jwt(secret: &str, hashed: &[u8], iat: i64) -> String {
    let claims = json!({
        "iat": iat,
        "jti": "c5ba8f24-1a14-4c10-bfdf-3fbe8ce511b5",
        "iss": "Vonage",
        "payload_hash": sha256_hex(hashed),
        "api_key": "a1b2c3d",
        "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Unpadded base64url, as JWTs use: for tokens no JWT library would make.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    text
}

/// Posts `body` to `/webhooks/status` with `authorization` (if any).
pub fn post_status(daemon: &Daemon, body: &[u8], authorization: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(value) = authorization {
        headers.push(("authorization", value));
    }
    daemon.http().send(
        "POST",
        "/webhooks/status",
        &headers,
        Payload::Sized(body.to_vec()),
    )
}

/// Posts `body` signed as Vonage would.
pub fn post_signed(daemon: &Daemon, body: &Value) -> Reply {
    let body = body.to_string();
    let bearer = format!(
        "Bearer {}",
        webhook_jwt(SECRET, body.as_bytes(), now_secs())
    );
    post_status(daemon, body.as_bytes(), Some(&bearer))
}
