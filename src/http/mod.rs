//! The optional HTTP/1.1 listener (`[http] listen`): the tutorial service's REST API
//! ([`rest`]), Vonage's signed status webhooks ([`webhooks`]) and Prometheus metrics
//! ([`metrics`]).
//!
//! It calls the same [`Otp`] service as the Unix socket, so both apply one set of rules
//! and limits, and it stops with the daemon: on shutdown it stops accepting, lets each
//! connection finish the request in hand, then closes it.
//!
//! Each request is answered by a task of its own: a client that hangs up must not stop
//! a create between storing its code and recording its delivery.

mod metrics;
mod rest;
mod webhooks;
mod write_deadline;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, WEBHOOK_SECRET_CREDENTIAL};
use crate::otp::Otp;
use crate::server::{self, AcceptBackoff, PeerPolicy, SHUTDOWN_GRACE, wait_for_peer};
use write_deadline::WriteDeadline;

/// A response: always a small, fully built body.
type Answer = Response<Full<Bytes>>;

/// The longest request target (URL) taken, 414 beyond: RFC 9110 §4.1 asks for at least
/// 8000 octets, and otpd's own paths need a few hundred.
const MAX_URL_BYTES: usize = 8 * 1024;

/// Room in a request head for the method, the version and the line ends around the URL.
const REQUEST_LINE_SLACK: usize = 64;

/// The listening socket: TCP (`host:port`) or a Unix socket (`unix:/path`).
enum Listener {
    Tcp(TcpListener),
    Unix(server::Listener),
}

impl Listener {
    async fn bind(listen: &str, socket_mode: u32) -> anyhow::Result<Self> {
        match listen.strip_prefix("unix:") {
            Some(path) => {
                let listener = server::Listener::bind(path.as_ref(), socket_mode)
                    .map_err(|e| anyhow::anyhow!("http.listen: {e:#}"))?;
                tracing::info!(address = %listen, "HTTP listener ready");
                Ok(Listener::Unix(listener))
            }
            None => {
                let listener = TcpListener::bind(listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("http.listen: cannot bind {listen}: {e}"))?;
                // The bound address, not the configured one: with port 0 the kernel
                // picks the port, and this line is how a test (or a person) learns it.
                tracing::info!(address = %listener.local_addr()?, "HTTP listener ready");
                Ok(Listener::Tcp(listener))
            }
        }
    }

    async fn accept(
        &self,
    ) -> std::io::Result<Either<tokio::net::TcpStream, tokio::net::UnixStream>> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Either::Left(stream))
            }
            Listener::Unix(listener) => listener.accept().await.map(Either::Right),
        }
    }
}

/// What every request handler shares.
struct App {
    otp: Arc<Otp>,
    webhooks: webhooks::Webhooks,
    max_body: usize,
    /// The most bytes of header fields taken (431 beyond): `max_body`, at least 8 KiB.
    max_headers: usize,
    /// Longest wait for a request's headers (also between keep-alive requests) and
    /// for its body.
    read_timeout: Duration,
    /// The daemon's stop: a body still coming then gets [`SHUTDOWN_GRACE`].
    shutdown: CancellationToken,
    /// `[server] allowed_uids` / `allowed_gids`, for a `unix:` listener's peers.
    peers: PeerPolicy,
}

/// Binds `[http] listen` and serves it on `tracker` until `shutdown`, answering the
/// accept loop's task (which ends before `shutdown` only by panicking); does nothing
/// when `listen` is empty. Binding errors stop the start-up, naming `http.listen`.
pub async fn start(
    config: &Config,
    otp: Arc<Otp>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if config.http.listen.is_empty() {
        return Ok(None);
    }
    let secret = webhooks::load_secret(&config.http)?;
    if secret.is_none() {
        tracing::warn!(
            "http.webhook_signature_secret is not set (nor the credential {WEBHOOK_SECRET_CREDENTIAL}): \
             status webhooks will be refused"
        );
    }
    let listener = Listener::bind(&config.http.listen, config.server.socket_mode_bits()?).await?;
    let app = Arc::new(App {
        otp,
        webhooks: webhooks::Webhooks::new(secret),
        max_body: config.server.max_request_bytes,
        max_headers: config.server.max_request_bytes.max(8192),
        read_timeout: Duration::from_secs(config.server.idle_timeout_secs),
        shutdown: shutdown.clone(),
        peers: PeerPolicy::new(&config.server),
    });
    let slots = Arc::new(Semaphore::new(config.server.max_connections));
    Ok(Some(tracker.spawn(serve(
        listener,
        app,
        slots,
        shutdown,
        tracker.clone(),
    ))))
}

/// Accepts connections until `shutdown`. At `max_connections` it stops accepting until a
/// connection ends, so the excess waits in the kernel's backlog.
async fn serve(
    listener: Listener,
    app: Arc<App>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (accepted, slot) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = async {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                (listener.accept().await, slot)
            } => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                backoff.wait("http", &error).await;
                continue;
            }
        };
        let (app, shutdown, handlers) = (app.clone(), shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            match stream {
                Either::Right(unix) if !app.peers.admits(&unix, "http") => refuse(unix).await,
                stream => serve_connection(stream, app, shutdown, handlers).await,
            }
            drop(slot);
        });
    }
    drop(listener);
}

/// What a peer not in `allowed_uids` / `allowed_gids` gets on a `unix:` listener.
const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\n\
cache-control: no-store\r\ncontent-length: 26\r\nconnection: close\r\n\r\nThis user may not use otpd";

/// Answers a refused peer and closes, holding its connection slot for two seconds at
/// most, so that it cannot hold slots by sending nothing. The answer waits a second
/// for the request head (an HTTP client takes an answer to a request it has not sent
/// for an error); what the peer sends after it is read and dropped, so that its write
/// does not fail before it reads the answer.
async fn refuse(mut stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut chunk = [0; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let head = async {
            let mut tail = Vec::new();
            loop {
                let read = stream.read(&mut chunk).await?;
                tail.extend_from_slice(&chunk[..read]);
                if read == 0 || tail.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Ok::<_, std::io::Error>(());
                }
                tail.drain(..tail.len().saturating_sub(3));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), head).await;
        stream.write_all(FORBIDDEN).await?;
        stream.shutdown().await?;
        while stream.read(&mut chunk).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Serves one connection's requests (keep-alive) until it closes, or until shutdown.
/// Each request runs as a task on `handlers` (the daemon's tracker), so it finishes
/// even if the client hangs up, and the daemon waits for it. At shutdown the request
/// in hand is answered however long it takes; a request not yet whole gets
/// [`SHUTDOWN_GRACE`]. Returns once every request of the connection has ended.
async fn serve_connection<S>(
    stream: S,
    app: Arc<App>,
    shutdown: CancellationToken,
    handlers: TaskTracker,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let read_timeout = app.read_timeout;
    // Room for the longest URL and header fields taken, each measured in `App::answer`
    // so that the answer says which was too long (414, 431). A head longer than both
    // together may not be held whole to be measured: hyper then answers 431.
    let max_head = MAX_URL_BYTES + app.max_headers + REQUEST_LINE_SLACK;
    let in_hand = TaskTracker::new();
    let tracked = in_hand.clone();
    let service = hyper::service::service_fn(move |request| {
        let app = app.clone();
        let answer = handlers.spawn(tracked.track_future(async move { app.answer(request).await }));
        async move {
            Ok::<_, Infallible>(
                answer
                    .await
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")),
            )
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(max_head)
        .serve_connection(
            TokioIo::new(WriteDeadline::new(stream, read_timeout)),
            service,
        );
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            in_hand.close();
            let answered_and_grace_over = async {
                in_hand.wait().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            tokio::select! {
                result = connection => result,
                _ = answered_and_grace_over => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
    // A request whose client hung up keeps the connection's slot until it ends, so
    // `max_connections` bounds the work under way, not just the open sockets.
    in_hand.close();
    in_hand.wait().await;
}

/// The endpoints, by the shape of their path. Each answers one method.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint<'a> {
    Home,
    Create { token: &'a str },
    Verify { token: &'a str, code: &'a str },
    Metrics,
    StatusWebhook,
    InboundWebhook,
}

impl<'a> Endpoint<'a> {
    /// Matches a request path (without its query); a trailing `/` and the case of the
    /// fixed words are ignored, as by the tutorial's Express router. A token and a
    /// code keep their case.
    fn of(path: &'a str) -> Option<Self> {
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let is = |segment: &str, word: &str| segment.eq_ignore_ascii_case(word);
        Some(match segments.as_slice() {
            [""] => Endpoint::Home,
            // As Express's `:token`, a segment must not be empty.
            [otp, token] if is(otp, "otp") && !token.is_empty() => Endpoint::Create { token },
            [otp, token, code] if is(otp, "otp") && !token.is_empty() && !code.is_empty() => {
                Endpoint::Verify { token, code }
            }
            [metrics] if is(metrics, "metrics") => Endpoint::Metrics,
            [webhooks, status] if is(webhooks, "webhooks") && is(status, "status") => {
                Endpoint::StatusWebhook
            }
            [webhooks, inbound] if is(webhooks, "webhooks") && is(inbound, "inbound") => {
                Endpoint::InboundWebhook
            }
            _ => return None,
        })
    }

    fn method(&self) -> Method {
        match self {
            Endpoint::Home | Endpoint::Verify { .. } | Endpoint::Metrics => Method::GET,
            Endpoint::Create { .. } | Endpoint::StatusWebhook | Endpoint::InboundWebhook => {
                Method::POST
            }
        }
    }

    /// The endpoint's name for logs: paths are never logged, they hold codes.
    fn name(&self) -> &'static str {
        match self {
            Endpoint::Home => "home",
            Endpoint::Create { .. } => "create",
            Endpoint::Verify { .. } => "verify",
            Endpoint::Metrics => "metrics",
            Endpoint::StatusWebhook => "status webhook",
            Endpoint::InboundWebhook => "inbound webhook",
        }
    }
}

impl App {
    /// Answers one request and records how long that took.
    async fn answer(&self, request: Request<Incoming>) -> Answer {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let endpoint = Endpoint::of(parts.uri.path());
        let answer = match &endpoint {
            _ if parts.uri.to_string().len() > MAX_URL_BYTES => text(
                StatusCode::URI_TOO_LONG,
                &format!("URL exceeds {MAX_URL_BYTES} bytes"),
            ),
            _ if header_bytes(&parts.headers) > self.max_headers => text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &format!("Header fields exceed {} bytes", self.max_headers),
            ),
            None => text(StatusCode::NOT_FOUND, "Not found"),
            Some(endpoint) if parts.method != endpoint.method() => {
                let mut answer = text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
                let allow = HeaderValue::from_str(endpoint.method().as_str());
                answer
                    .headers_mut()
                    .insert(header::ALLOW, allow.expect("a method is a header value"));
                answer
            }
            Some(endpoint) => self.route(endpoint, &parts.headers, body).await,
        };
        self.otp.counters().http_latency.observe(started.elapsed());
        tracing::debug!(
            endpoint = endpoint.as_ref().map_or("none", Endpoint::name),
            status = answer.status().as_u16(),
            "HTTP request"
        );
        answer
    }

    async fn route(
        &self,
        endpoint: &Endpoint<'_>,
        headers: &hyper::HeaderMap,
        body: Incoming,
    ) -> Answer {
        match *endpoint {
            Endpoint::Home => text(StatusCode::OK, "This is the OTP service"),
            Endpoint::Verify { token, code } => rest::verify(&self.otp, token, code).await,
            Endpoint::Metrics => metrics::render(&self.otp, &self.webhooks),
            Endpoint::Create { token } => match self.read_body(headers, body).await {
                Ok(body) => rest::create(&self.otp, token, &body).await,
                Err(answer) => answer,
            },
            Endpoint::StatusWebhook => match self.read_body(headers, body).await {
                Ok(body) => self.webhooks.status(&self.otp, headers, &body).await,
                Err(answer) => answer,
            },
            Endpoint::InboundWebhook => match self.read_body(headers, body).await {
                Ok(_) => text(StatusCode::OK, "OK"),
                Err(answer) => answer,
            },
        }
    }

    /// Reads a whole body of at most `max_request_bytes`: a larger `Content-Length` is
    /// refused before reading, a longer chunked body as soon as it passes the limit.
    async fn read_body(&self, headers: &hyper::HeaderMap, body: Incoming) -> Result<Bytes, Answer> {
        let too_large = || {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("Request body exceeds {} bytes", self.max_body),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(too_large());
        }
        let collect = Limited::new(body, self.max_body).collect();
        match wait_for_peer(collect, self.read_timeout, &self.shutdown).await {
            Some(Ok(collected)) => Ok(collected.to_bytes()),
            Some(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Some(Err(_)) => Err(text(StatusCode::BAD_REQUEST, "body: could not be read")),
            None => Err(text(
                StatusCode::REQUEST_TIMEOUT,
                "body: not received in time",
            )),
        }
    }
}

/// The size of the header fields as sent, near enough (`name: value` and a line end).
fn header_bytes(headers: &hyper::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// A plain-text answer. OTP answers are never to be cached by a proxy or browser.
fn text(status: StatusCode, body: &str) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_endpoints() {
        assert_eq!(Endpoint::of("/"), Some(Endpoint::Home));
        assert_eq!(
            Endpoint::of("/otp/123"),
            Some(Endpoint::Create { token: "123" })
        );
        assert_eq!(
            Endpoint::of("/otp/123/"),
            Some(Endpoint::Create { token: "123" })
        );
        assert_eq!(
            Endpoint::of("/otp/123/456"),
            Some(Endpoint::Verify {
                token: "123",
                code: "456"
            })
        );
        assert_eq!(Endpoint::of("/metrics"), Some(Endpoint::Metrics));
        assert_eq!(
            Endpoint::of("/OTP/Tok/123"),
            Some(Endpoint::Verify {
                token: "Tok",
                code: "123"
            }),
            "the fixed words in any case; the token as given"
        );
        assert_eq!(Endpoint::of("/Metrics/"), Some(Endpoint::Metrics));
        assert_eq!(
            Endpoint::of("/WebHooks/Status"),
            Some(Endpoint::StatusWebhook)
        );
        assert_eq!(
            Endpoint::of("/webhooks/status"),
            Some(Endpoint::StatusWebhook)
        );
        assert_eq!(Endpoint::of("/otp"), None);
        assert_eq!(Endpoint::of("/otp/1/2/3"), None);
        assert_eq!(Endpoint::of("/nope"), None);
    }
}
