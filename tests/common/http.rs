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

use super::PATIENCE;

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
