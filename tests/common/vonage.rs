//! A strict stand-in for Vonage's Dispatch and Messages APIs, on 127.0.0.1 port 0.
//!
//! It checks what the real service would and more: the RS256 JWT against the public
//! half of the test key pair in `tests/fixtures/` (made once with `openssl genrsa`),
//! every claim, and the body field by field against the API schema, with the values
//! the daemon was configured with. A request that breaks a rule gets a 400 problem and
//! is recorded as a violation, which [`VonageStandIn::requests`] turns into a test
//! failure. Tests script the answers: 202, a 400 problem, 401, 429 with Retry-After,
//! 500, or no answer at all.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tempfile::TempDir;

pub const PRIVATE_KEY: &str = include_str!("../fixtures/vonage-test-key.pem");
const PUBLIC_KEY: &str = include_str!("../fixtures/vonage-test-key.pub.pem");

pub const APPLICATION_ID: &str = "aaaaaaaa-bbbb-4ccc-8ddd-0123456789ab";
pub const PAGE_ID: &str = "107283945566123";
pub const SMS_FROM: &str = "OTPD";
/// The template every Vonage test uses: the code is the first word of the text.
pub const TEMPLATE: &str = "{code} is your code. It expires in {minutes} minutes.";

/// How the stand-in answers the next request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 202 with a fresh `dispatch_uuid` / `message_uuid`.
    Accept,
    /// 202 with a body that is not JSON: accepted, but without an id.
    AcceptUnreadable,
    /// 202 whose body breaks off: the connection closes before the length it
    /// announced, as when the network fails after Vonage took the message.
    AcceptCutShort,
    /// 400 with an RFC 7807 problem body.
    Problem,
    /// 401 problem, as for a wrong application id or key.
    Unauthorized,
    /// 429 with `Retry-After: <secs>`.
    TooMany { retry_after_secs: u64 },
    /// 500.
    ServerError,
    /// A problem with this status whose `detail` echoes the request body, as a careless
    /// provider might: what otpd passes on of it must not carry the code.
    Echo(u16),
    /// Takes the request and never answers: what it asked for may have been done.
    Hang,
}

/// A request the stand-in received and accepted as well-formed.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    /// The raw bearer token.
    pub jwt: String,
    pub claims: Value,
    pub body: Value,
    /// What the stand-in answered with (status).
    pub status: u16,
    /// The uuid it answered with, for 202s.
    pub uuid: Option<String>,
}

impl Seen {
    /// The code, read from the text of the first message.
    pub fn code(&self) -> String {
        let text = if self.path == "/v0.1/dispatch" {
            &self.body["workflow"][0]["message"]["content"]["text"]
        } else {
            &self.body["text"]
        };
        text.as_str()
            .and_then(|t| t.split(' ').next())
            .expect("a text")
            .to_owned()
    }
}

/// The values the daemon was configured with, which the bodies must carry.
#[derive(Debug, Clone)]
pub struct Expect {
    pub failover_secs: u64,
    /// The `expiry_time` of the Dispatch failover of each request in turn, where a
    /// retry goes out with less of the code's life left; after these, `failover_secs`.
    pub expiry_times: &'static [u64],
    pub category: &'static str,
}

impl Default for Expect {
    fn default() -> Self {
        Self {
            failover_secs: 120,
            expiry_times: &[],
            category: "response",
        }
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    seen: Vec<Seen>,
    violations: Vec<String>,
    next_uuid: u64,
    /// While set, answers wait for [`VonageStandIn::release`].
    held: bool,
    /// Uuids of requests given their uuid but not yet their answer.
    unanswered: Vec<String>,
    /// Requests received so far, checked or not.
    received: usize,
}

/// The running stand-in; stops with the test.
pub struct VonageStandIn {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    expect: Expect,
    key_dir: TempDir,
}

impl VonageStandIn {
    pub fn start() -> VonageStandIn {
        Self::start_expecting(Expect::default())
    }

    pub fn start_expecting(expect: Expect) -> VonageStandIn {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let server_state = state.clone();
        let server_expect = expect.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(listener, server_state, server_expect));
        });
        let key_dir = tempfile::tempdir().unwrap();
        let key_path = key_dir.path().join("vonage.pem");
        write_private(&key_path, PRIVATE_KEY, 0o600);
        VonageStandIn {
            addr,
            state,
            expect,
            key_dir,
        }
    }

    /// A copy of the test private key, mode 0600.
    pub fn key_path(&self) -> PathBuf {
        self.key_dir.path().join("vonage.pem")
    }

    /// `[delivery]` keys and the backend section for a daemon talking to this stand-in.
    /// `section` is `"dispatch"` or `"messages"`; `extra` lines (`key = value`) add to
    /// that section or replace its keys.
    pub fn config(&self, section: &str, extra: &str) -> (String, String) {
        let delivery = format!("backend = \"{section}\"\ntemplate = \"{TEMPLATE}\"\n");
        let defaults = [
            ("api_url", format!("\"http://{}\"", self.addr)),
            ("application_id", format!("\"{APPLICATION_ID}\"")),
            (
                "private_key_file",
                format!("\"{}\"", self.key_path().display()),
            ),
            ("messenger_from", format!("\"{PAGE_ID}\"")),
            ("sms_from", format!("\"{SMS_FROM}\"")),
            ("failover_secs", self.expect.failover_secs.to_string()),
            ("timeout_secs", "1".into()),
            ("max_retries", "2".into()),
        ];
        let replaced = |key: &str| {
            extra
                .lines()
                .any(|line| line.split('=').next().map(str::trim) == Some(key))
        };
        let mut backend = format!("[delivery.{section}]\n");
        for (key, value) in defaults.iter().filter(|(key, _)| !replaced(key)) {
            backend.push_str(&format!("{key} = {value}\n"));
        }
        backend.push_str(extra);
        backend.push('\n');
        (backend, delivery)
    }

    /// Queues answers for the next requests; after the script it accepts.
    pub fn script(&self, replies: &[Reply]) {
        self.state
            .lock()
            .unwrap()
            .script
            .extend(replies.iter().cloned());
    }

    /// Holds every answer until [`VonageStandIn::release`]: Vonage may report on a
    /// message before the daemon has the answer to the call that sent it.
    pub fn hold(&self) {
        self.state.lock().unwrap().held = true;
    }

    pub fn release(&self) {
        self.state.lock().unwrap().held = false;
    }

    /// Uuids of the requests received and not answered yet.
    pub fn unanswered(&self) -> Vec<String> {
        self.state.lock().unwrap().unanswered.clone()
    }

    /// Every request so far; fails the test if any broke a rule.
    pub fn requests(&self) -> Vec<Seen> {
        let state = self.state.lock().unwrap();
        assert!(
            state.violations.is_empty(),
            "requests broke the API contract: {:#?}",
            state.violations
        );
        state.seen.clone()
    }
}

/// A request that broke the contract fails its test even if the test never looked.
impl Drop for VonageStandIn {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let state = self.state.lock().unwrap();
            assert!(
                state.violations.is_empty(),
                "requests broke the API contract: {:#?}",
                state.violations
            );
        }
    }
}

/// Writes a key file with the given mode.
pub fn write_private(path: &std::path::Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn serve(listener: std::net::TcpListener, state: Arc<Mutex<State>>, expect: Expect) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let (state, expect) = (state.clone(), expect.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (state, expect) = (state.clone(), expect.clone());
                async move { Ok::<_, Infallible>(answer(request, &state, &expect).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The stand-in's answer bodies: whole, or one that breaks off.
type Body = Either<Full<Bytes>, CutShort>;

fn whole(bytes: Bytes) -> Body {
    Either::Left(Full::new(bytes))
}

/// A body that announces 1,000 bytes, sends the start of a JSON object, waits for
/// hyper to write what it has, and then fails, so that hyper closes the connection
/// in the middle of it.
struct CutShort {
    sent: bool,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl CutShort {
    fn new() -> Self {
        Self {
            sent: false,
            pause: Box::pin(tokio::time::sleep(Duration::from_millis(100))),
        }
    }
}

impl hyper::body::Body for CutShort {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if !std::mem::replace(&mut self.sent, true) {
            let start = Bytes::from_static(b"{\"dispatch_uuid\":");
            return Poll::Ready(Some(Ok(Frame::data(start))));
        }
        self.pause.as_mut().poll(context).map(|()| {
            Some(Err(std::io::Error::other(
                "the stand-in cuts the answer short",
            )))
        })
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(1000)
    }
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    let body = json!({
        "type": "https://developer.vonage.com/api-errors#invalid-params",
        "title": title,
        "detail": detail,
        "instance": "bf0ca0bf927b3b52e3cb03217e1a1ddf",
        "invalid_parameters": [{"name": "workflow[0].to.id", "reason": "Invalid"}],
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/problem+json")
        .body(whole(Bytes::from(body.to_string())))
        .unwrap()
}

async fn answer(
    request: Request<Incoming>,
    state: &Mutex<State>,
    expect: &Expect,
) -> Response<Body> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let nth = {
        let mut state = state.lock().unwrap();
        state.received += 1;
        state.received - 1
    };
    let checked = check_request(&parts, &body, &path, expect, nth);
    let (jwt, claims, body) = match checked {
        Ok(ok) => ok,
        Err(violation) => {
            state.lock().unwrap().violations.push(violation.clone());
            return problem(StatusCode::BAD_REQUEST, "Bad Request", &violation);
        }
    };
    let (reply, uuid) = {
        let mut state = state.lock().unwrap();
        state.next_uuid += 1;
        let reply = state.script.pop_front().unwrap_or(Reply::Accept);
        let uuid = format!("00000000-0000-4000-8000-{:012}", state.next_uuid);
        state.unanswered.push(uuid.clone());
        (reply, uuid)
    };
    while state.lock().unwrap().held {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    state.lock().unwrap().unanswered.retain(|u| *u != uuid);
    let status = match &reply {
        Reply::Accept | Reply::AcceptUnreadable | Reply::AcceptCutShort => 202,
        Reply::Problem => 400,
        Reply::Unauthorized => 401,
        Reply::TooMany { .. } => 429,
        Reply::ServerError => 500,
        Reply::Echo(status) => *status,
        Reply::Hang => 0,
    };
    let echo = body.to_string();
    state.lock().unwrap().seen.push(Seen {
        at,
        path: path.clone(),
        jwt,
        claims,
        body,
        status,
        uuid: matches!(reply, Reply::Accept).then(|| uuid.clone()),
    });
    match reply {
        Reply::Accept => {
            let field = if path == "/v0.1/dispatch" {
                "dispatch_uuid"
            } else {
                "message_uuid"
            };
            Response::builder()
                .status(202)
                .header("content-type", "application/json")
                .body(whole(Bytes::from(json!({ field: uuid }).to_string())))
                .unwrap()
        }
        Reply::AcceptUnreadable => Response::builder()
            .status(202)
            .body(whole(Bytes::from_static(b"Accepted")))
            .unwrap(),
        Reply::AcceptCutShort => Response::builder()
            .status(202)
            .header("content-type", "application/json")
            .body(Either::Right(CutShort::new()))
            .unwrap(),
        Reply::Problem => problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "The request failed due to validation errors",
        ),
        Reply::Unauthorized => problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "You did not provide correct credentials.",
        ),
        Reply::TooMany { retry_after_secs } => Response::builder()
            .status(429)
            .header("retry-after", retry_after_secs.to_string())
            .body(whole(Bytes::new()))
            .unwrap(),
        Reply::ServerError => Response::builder()
            .status(500)
            .body(whole(Bytes::from_static(b"oops")))
            .unwrap(),
        Reply::Echo(status) => problem(
            StatusCode::from_u16(status).unwrap(),
            "Echo",
            &format!("you sent {echo}"),
        ),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!("the daemon gives up long before")
        }
    }
}

type Checked = Result<(String, Value, Value), String>;

/// Method, headers, JWT and body of the `nth` request received (from 0); the first
/// broken rule as the error.
fn check_request(
    parts: &hyper::http::request::Parts,
    body: &[u8],
    path: &str,
    expect: &Expect,
    nth: usize,
) -> Checked {
    if parts.method != hyper::Method::POST {
        return Err(format!("method {} (want POST)", parts.method));
    }
    if let Some(query) = parts.uri.query() {
        return Err(format!("query string {query:?} (the endpoints take none)"));
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if header("content-type") != Some("application/json") {
        return Err(format!("content-type {:?}", header("content-type")));
    }
    let jwt = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("authorization: no Bearer token")?
        .to_owned();
    let claims = check_jwt(&jwt)?;
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    match path {
        "/v0.1/dispatch" => {
            let expiry_time = (expect.expiry_times.get(nth)).unwrap_or(&expect.failover_secs);
            check_dispatch(&body, expect, *expiry_time)?
        }
        "/v1/messages" => check_message(&body, expect, true)?,
        other => return Err(format!("unknown path {other}")),
    }
    Ok((jwt, claims, body))
}

/// RS256 signature with the test public key; claims exactly application_id, iat, exp
/// (= iat + 15 min) and a 128-bit hex jti; iat close to now.
fn check_jwt(jwt: &str) -> Result<Value, String> {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat"]);
    validation.leeway = 0;
    let header = jsonwebtoken::decode_header(jwt).map_err(|e| format!("JWT header: {e}"))?;
    if header.typ.as_deref() != Some("JWT") {
        return Err(format!("JWT typ {:?}", header.typ));
    }
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|e| format!("JWT: {e}"))?
        .claims;
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    if names != ["application_id", "exp", "iat", "jti"] {
        return Err(format!("JWT claims {names:?}"));
    }
    if claims["application_id"] != APPLICATION_ID {
        return Err(format!("JWT application_id {}", claims["application_id"]));
    }
    let iat = claims["iat"].as_u64().ok_or("JWT iat not an integer")?;
    if claims["exp"].as_u64() != Some(iat + 900) {
        return Err(format!("JWT exp {} for iat {iat}", claims["exp"]));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if iat > now + 5 || iat + 900 < now {
        return Err(format!("JWT iat {iat} is not around now {now}"));
    }
    let jti = claims["jti"].as_str().ok_or("JWT jti not a string")?;
    if jti.len() != 32 || !jti.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("JWT jti {jti:?}"));
    }
    Ok(claims)
}

/// The object has exactly these keys.
fn keys(value: &Value, what: &str, want: &[&str]) -> Result<(), String> {
    let object = value
        .as_object()
        .ok_or(format!("{what} is not an object"))?;
    let mut have: Vec<&str> = object.keys().map(String::as_str).collect();
    have.sort_unstable();
    let mut want = want.to_vec();
    want.sort_unstable();
    if have == want {
        Ok(())
    } else {
        Err(format!("{what} has keys {have:?}, want {want:?}"))
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn is_psid(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| (1..=50).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
}

/// E.164 without `+` or `00`: 7 to 15 digits, no leading zero.
fn is_msisdn(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        (7..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0')
    })
}

/// A text made from [`TEMPLATE`] (a 4 to 10 digit code, whole minutes), within `max`
/// characters.
fn text_within(value: &Value, max: usize) -> bool {
    value
        .as_str()
        .is_some_and(|t| t.chars().count() <= max && template_code(t).is_some())
}

/// The code a [`TEMPLATE`] text carries.
fn template_code(text: &str) -> Option<&str> {
    let (code, rest) = text.split_once(" is your code. It expires in ")?;
    let digits = |s: &str, lengths: std::ops::RangeInclusive<usize>| {
        lengths.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let minutes_ok = match rest.strip_suffix(" minutes.") {
        Some(minutes) => digits(minutes, 1..=4) && minutes != "1",
        None => rest == "1 minute.",
    };
    (digits(code, 4..=10) && minutes_ok).then_some(code)
}

/// Every text of one request carries the same code.
fn one_code<'a>(texts: impl IntoIterator<Item = &'a Value>) -> Result<(), String> {
    let codes: Vec<Option<&str>> = texts
        .into_iter()
        .map(|t| t.as_str().and_then(template_code))
        .collect();
    check(codes.windows(2).all(|w| w[0] == w[1]), || {
        "the steps carry different codes".into()
    })
}

/// Dispatch `failover` template: Messenger (with `failover` unless last), then SMS
/// (never with `failover`); one or two steps.
fn check_dispatch(body: &Value, expect: &Expect, expiry_time: u64) -> Result<(), String> {
    keys(body, "body", &["template", "workflow"])?;
    check(body["template"] == "failover", || {
        format!("template {}", body["template"])
    })?;
    let steps = body["workflow"]
        .as_array()
        .ok_or("workflow is not an array")?;
    check((1..=2).contains(&steps.len()), || {
        format!("{} steps", steps.len())
    })?;
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        let at = |field: &str| format!("workflow[{i}].{field}");
        let kind = step["from"]["type"].as_str().unwrap_or_default();
        match kind {
            "messenger" => {
                check(i == 0, || at("from: Messenger must come first"))?;
                let mut want = vec!["from", "to", "message"];
                if !last {
                    want.push("failover");
                }
                keys(step, &at(""), &want)?;
                party(&step["from"], &at("from"), "messenger", "id", |v| {
                    *v == PAGE_ID
                })?;
                party(&step["to"], &at("to"), "messenger", "id", is_psid)?;
                keys(&step["message"], &at("message"), &["content", "messenger"])?;
                check(
                    step["message"]["messenger"] == json!({"category": expect.category}),
                    || at("message.messenger"),
                )?;
                check_content(&step["message"]["content"], 640, &at("message.content"))?;
                if !last {
                    check(
                        step["failover"]
                            == json!({"expiry_time": expiry_time, "condition_status": "read"}),
                        || format!("{} = {}", at("failover"), step["failover"]),
                    )?;
                }
            }
            "sms" => {
                check(last, || at("from: SMS must be the last step"))?;
                keys(step, &at(""), &["from", "to", "message"])?;
                party(&step["from"], &at("from"), "sms", "number", |v| {
                    *v == SMS_FROM
                })?;
                party(&step["to"], &at("to"), "sms", "number", is_msisdn)?;
                keys(&step["message"], &at("message"), &["content"])?;
                check_content(&step["message"]["content"], 1000, &at("message.content"))?;
            }
            other => return Err(format!("{} {other:?}", at("from.type"))),
        }
    }
    one_code(steps.iter().map(|step| &step["message"]["content"]["text"]))
}

/// A Dispatch `from` / `to`: exactly `type` = `kind` and `field`, which `ok` accepts.
fn party(
    value: &Value,
    what: &str,
    kind: &str,
    field: &str,
    ok: impl Fn(&Value) -> bool,
) -> Result<(), String> {
    keys(value, what, &["type", field])?;
    check(value["type"] == kind && ok(&value[field]), || {
        format!("{what} = {value}")
    })
}

fn check_content(content: &Value, max: usize, what: &str) -> Result<(), String> {
    keys(content, what, &["type", "text"])?;
    check(
        content["type"] == "text" && text_within(&content["text"], max),
        || format!("{what} = {content}"),
    )
}

/// Messages API v1: a Messenger text (optionally with a `failover` list holding one
/// SMS) or an SMS text.
fn check_message(body: &Value, expect: &Expect, top: bool) -> Result<(), String> {
    let base = ["to", "from", "channel", "message_type", "text"];
    check(body["message_type"] == "text", || {
        format!("message_type {}", body["message_type"])
    })?;
    match body["channel"].as_str() {
        Some("messenger") if top => {
            let mut want = base.to_vec();
            want.push("messenger");
            if body.get("failover").is_some() {
                want.push("failover");
            }
            keys(body, "messenger message", &want)?;
            check(body["from"] == PAGE_ID, || format!("from {}", body["from"]))?;
            check(is_psid(&body["to"]), || format!("to {}", body["to"]))?;
            check(text_within(&body["text"], 640), || "text".into())?;
            check(
                body["messenger"] == json!({"category": expect.category}),
                || format!("messenger {}", body["messenger"]),
            )?;
            if let Some(failover) = body.get("failover") {
                let list = failover.as_array().ok_or("failover is not an array")?;
                check(list.len() == 1, || {
                    format!("failover has {} entries", list.len())
                })?;
                check(list[0]["channel"] == "sms", || "failover[0].channel".into())?;
                check_message(&list[0], expect, false)?;
                one_code([&body["text"], &list[0]["text"]])?;
            }
            Ok(())
        }
        Some("sms") => {
            keys(body, "sms message", &base)?;
            check(body["from"] == SMS_FROM, || {
                format!("from {}", body["from"])
            })?;
            check(is_msisdn(&body["to"]), || format!("to {}", body["to"]))?;
            check(text_within(&body["text"], 1000), || "text".into())
        }
        other => Err(format!("channel {other:?}")),
    }
}
