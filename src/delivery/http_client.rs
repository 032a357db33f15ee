//! The HTTPS client both Vonage backends use: JSON POSTs with the bearer JWT, a
//! timeout per request, and bounded retries.
//!
//! It sorts every answer into the outcomes a create cares about: accepted (2xx, with
//! the JSON body), refused (a 4xx other than 429: retrying the same request will not
//! help, so the create fails with 502), unavailable (429, 5xx, a failed connect:
//! nothing was taken, so it is retried with exponential backoff and jitter, honouring
//! `Retry-After`, then 503), or unanswered (no answer within the timeout, or the
//! connection lost after the request went out: the provider may have taken it, so it
//! is not retried, as a retry could send the message again; 503). It never logs a
//! request body: bodies hold codes. Nor does it pass on what a provider's error says
//! about the body: the numbers it sent (the code, phone numbers, Messenger ids) are
//! withheld from every error, in case the provider echoes its request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::RngExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::DeliveryError;
use super::jwt::JwtSigner;
use crate::metrics::{Counters, bump};

/// Largest answer body read from the provider.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Most characters kept of a problem's `title` and of its `detail`.
const MAX_PROBLEM_CHARS: usize = 200;
/// Shortest run of digits withheld from provider errors: the shortest code.
const MIN_WITHHELD_DIGITS: usize = 4;
/// First retry delay; doubled per attempt up to [`MAX_RETRY_DELAY`], with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest delay between two attempts. Backoff stops doubling here, so every retry
/// `max_retries` allows is made. A create is waiting on the answer, so a provider whose
/// `Retry-After` asks for longer gets a 503 at once.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// A JSON-over-HTTPS client for one Vonage application.
pub struct ApiClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    signer: JwtSigner,
    timeout: Duration,
    max_retries: u32,
    counters: Arc<Counters>,
    /// Cancelled when otpd stops: no retry is made after that, so a stop waits for one
    /// attempt at most, not a whole round of retries.
    stopping: CancellationToken,
}

/// What one attempt came to.
enum Attempt {
    Accepted(Value),
    Refused(String),
    /// Not taken, worth retrying; with the delay the provider asked for, if any.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// No answer to a request that may have gone out: not to be retried.
    Unanswered(String),
}

impl ApiClient {
    /// A client over rustls (aws-lc-rs, Mozilla's roots) that keeps connections open
    /// for reuse. Plain `http://` is allowed for tests against a local stand-in.
    pub fn new(
        signer: JwtSigner,
        timeout: Duration,
        max_retries: u32,
        counters: Arc<Counters>,
        stopping: CancellationToken,
    ) -> anyhow::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            signer,
            timeout,
            max_retries,
            counters,
            stopping,
        })
    }

    /// The longest one attempt can take. Once otpd is stopping, no other follows.
    pub fn attempt_timeout(&self) -> Duration {
        self.timeout
    }

    /// The longest a [`ApiClient::post_json`] can take: every attempt timing out, with
    /// the longest wait between them.
    pub fn longest_post(&self) -> Duration {
        self.timeout * (self.max_retries + 1) + MAX_RETRY_DELAY * self.max_retries
    }

    /// POSTs the JSON that `body` builds, built again for each attempt (a text that
    /// names the minutes left stays true after a slow retry); answers the provider's
    /// JSON on 2xx.
    pub async fn post_json(
        &self,
        url: &Uri,
        mut body: impl FnMut() -> Result<Value, DeliveryError>,
    ) -> Result<Value, DeliveryError> {
        let mut tries = self.tries(None);
        loop {
            if let Some(outcome) = tries.attempt(url, &body()?).await {
                return outcome;
            }
        }
    }

    /// The attempts of one POST, made one at a time by [`Tries::attempt`], for a sender
    /// that looks again at what it sends before each retry. With `until`, no attempt
    /// starts that could end after it (a failover SMS whose code expires then).
    pub fn tries(&self, until: Option<Instant>) -> Tries<'_> {
        Tries {
            client: self,
            until,
            attempt: 0,
        }
    }

    /// One request (`body` is `sent`, serialized), bounded by the timeout from connect
    /// to the last body byte. Counted in `delivery_attempts` once signed, as it goes
    /// out: a request otpd could not sign never reached the provider.
    async fn attempt(&self, url: &Uri, body: Bytes, sent: &Value) -> Attempt {
        let token = match self.signer.token() {
            Ok(token) => token,
            Err(e) => return Attempt::Refused(format!("cannot sign the Vonage JWT: {e}")),
        };
        bump(&self.counters.delivery_attempts);
        let request = Request::post(url.clone())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(body))
            .expect("valid request parts");
        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            // The timeout may have struck before the request went out, but only a
            // connect that failed says so for sure.
            Err(_) => {
                return Attempt::Unanswered(format!(
                    "no answer within {} s",
                    self.timeout.as_secs()
                ));
            }
            Ok(Err(e)) if e.is_connect() => {
                return Attempt::Retry {
                    reason: format!("connection: {e}"),
                    retry_after: None,
                };
            }
            Ok(Err(e)) => return Attempt::Unanswered(format!("connection lost: {e}")),
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        // Once the status has come, it decides. A body lost after a 2xx must not make
        // a retry: the message is on its way, and a second POST sends it again.
        let bytes = match tokio::time::timeout_at(
            deadline,
            Limited::new(body, MAX_ANSWER_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(error)) => {
                tracing::warn!(status = %parts.status, %error, "reading Vonage's answer failed");
                Bytes::new()
            }
            Err(_) => {
                tracing::warn!(status = %parts.status, "Vonage's answer did not end in time");
                Bytes::new()
            }
        };
        let status = parts.status;
        if status.is_success() {
            return match serde_json::from_slice(&bytes) {
                Ok(answer) => Attempt::Accepted(answer),
                // Accepted all the same: the message is on its way, and refusing it
                // would drop a code its person is about to receive.
                Err(error) => {
                    tracing::warn!(%status, %error, "Vonage accepted the request with an unreadable answer");
                    Attempt::Accepted(Value::Null)
                }
            };
        }
        // Only an answer that is no success pays for finding what to withhold.
        let problem = describe_problem(status, &bytes, &SentNumbers::of(sent));
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Attempt::Retry {
                reason: problem,
                retry_after: parts
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            };
        }
        if status == StatusCode::UNAUTHORIZED {
            tracing::error!(
                %problem,
                "Vonage refused otpd's credentials: configuration error (check application_id and the private key)"
            );
        }
        Attempt::Refused(problem)
    }
}

/// The attempts of one POST ([`ApiClient::tries`]): retries as [`ApiClient::post_json`]
/// makes them, the request being the caller's at each attempt.
pub struct Tries<'a> {
    client: &'a ApiClient,
    until: Option<Instant>,
    attempt: u32,
}

impl Tries<'_> {
    /// POSTs `sent` as JSON. Answers the outcome once there is one: the provider's JSON
    /// on 2xx, a refusal, or unavailable with no retry left (or none allowed: too long
    /// a wait, no time left before `until`, otpd stopping). `None` when the attempt is
    /// to be retried: the delay before it has passed, so the caller makes the retry now.
    pub async fn attempt(
        &mut self,
        url: &Uri,
        sent: &Value,
    ) -> Option<Result<Value, DeliveryError>> {
        let client = self.client;
        let body = Bytes::from(serde_json::to_vec(sent).expect("JSON values serialize"));
        let outcome = match client.attempt(url, body, sent).await {
            Attempt::Accepted(answer) => Ok(answer),
            Attempt::Refused(message) => Err(DeliveryError::Refused(message)),
            Attempt::Unanswered(reason) => Err(DeliveryError::Unanswered(format!(
                "{reason}; not retried: Vonage may have taken the message"
            ))),
            Attempt::Retry {
                reason,
                retry_after,
            } => match self.wait_to_retry(&reason, retry_after).await {
                Ok(()) => return None,
                Err(error) => Err(error),
            },
        };
        bump(match &outcome {
            Ok(_) => &client.counters.delivery_sent,
            Err(DeliveryError::Refused(_)) => &client.counters.delivery_refused,
            Err(DeliveryError::Unavailable { .. } | DeliveryError::Unanswered(_)) => {
                &client.counters.delivery_unavailable
            }
        });
        Some(outcome)
    }

    /// Waits out the delay before the next attempt, or answers why none is made.
    async fn wait_to_retry(
        &mut self,
        reason: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), DeliveryError> {
        let client = self.client;
        // Each carries the provider's wish, for a sender that tries again later.
        let unavailable = |why: String| DeliveryError::Unavailable {
            reason: format!("{reason}{why}"),
            retry_after,
        };
        if self.attempt >= client.max_retries {
            return Err(unavailable(format!(
                " (after {} attempts)",
                self.attempt + 1
            )));
        }
        let delay = retry_delay(self.attempt, retry_after).map_err(|asked| {
            unavailable(format!(
                "; the provider asked to retry after {} s, longer than otpd waits ({} s)",
                asked.as_secs_f64().ceil(),
                MAX_RETRY_DELAY.as_secs()
            ))
        })?;
        if self
            .until
            .is_some_and(|until| Instant::now() + delay + client.timeout > until)
        {
            return Err(unavailable(
                "; not retried: no time left before the code expires".into(),
            ));
        }
        let stopped = || unavailable("; not retried: otpd is stopping".into());
        if client.stopping.is_cancelled() {
            return Err(stopped());
        }
        tracing::info!(
            ?reason,
            delay_ms = delay.as_millis() as u64,
            "Vonage: retrying"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = client.stopping.cancelled() => return Err(stopped()),
        }
        self.attempt += 1;
        Ok(())
    }
}

/// The delay before the retry that follows `attempt`: the backoff, or longer where the
/// provider's `Retry-After` asks for it. `Err` with what the provider asked when that is
/// longer than [`MAX_RETRY_DELAY`]: only the provider's own wish ends the retries here,
/// never otpd's backoff, which stops growing at that limit.
fn retry_delay(attempt: u32, retry_after: Option<Duration>) -> Result<Duration, Duration> {
    match retry_after {
        Some(asked) if asked > MAX_RETRY_DELAY => Err(asked),
        asked => Ok(backoff(attempt).max(asked.unwrap_or_default())),
    }
}

/// Exponential backoff with jitter: a random delay in [d/2, d], d = base * 2^attempt
/// but at most [`MAX_RETRY_DELAY`]. Uncapped, the 9th retry (`max_retries` allows 10)
/// would wait 51 to 102 s, longer than any retry may wait, and so never be made.
fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(MAX_RETRY_DELAY);
    let half = full / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(value.trim()).ok()?.timestamp();
    let wait = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(wait).unwrap_or_default())
}

/// "status: title: detail (invalid: a, b)" from an RFC 7807 problem, or the bare
/// status when the body is not one, without the numbers otpd `sent`. Control
/// characters become spaces: the text is the provider's, and it is logged.
fn describe_problem(status: StatusCode, body: &[u8], sent: &SentNumbers) -> String {
    describe_problem_raw(status, body, sent)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn describe_problem_raw(status: StatusCode, body: &[u8], sent: &SentNumbers) -> String {
    let Ok(problem) = serde_json::from_slice::<Value>(body) else {
        return status.to_string();
    };
    let mut message = status.to_string();
    for field in ["title", "detail"] {
        // A title that only repeats the status's reason ("Bad Request") adds nothing.
        let repeats_status = |text: &str| {
            field == "title"
                && status
                    .canonical_reason()
                    .is_some_and(|r| r.eq_ignore_ascii_case(text))
        };
        if let Some(text) = problem[field]
            .as_str()
            .filter(|t| !t.is_empty() && !repeats_status(t))
        {
            message.push_str(": ");
            // Withheld before it is cut short: a number cut in half is no longer found.
            message.extend(sent.withhold(text).chars().take(MAX_PROBLEM_CHARS));
        }
    }
    let invalid: Vec<&str> = match &problem["invalid_parameters"] {
        Value::Array(items) => items.iter().filter_map(|p| p["name"].as_str()).collect(),
        Value::Object(_) => problem["invalid_parameters"]["name"]
            .as_str()
            .into_iter()
            .collect(),
        _ => Vec::new(),
    };
    if !invalid.is_empty() {
        message.push_str(&sent.withhold(&format!(" (invalid: {})", invalid.join(", "))));
    }
    message
}

/// The runs of digits in the strings of a request body, longest first: what a
/// provider's error must not carry back (see the module doc).
struct SentNumbers(Vec<String>);

impl SentNumbers {
    fn of(body: &Value) -> Self {
        let mut numbers = Vec::new();
        collect_digit_runs(body, &mut numbers);
        numbers.sort_by_key(|run| std::cmp::Reverse(run.len()));
        numbers.dedup();
        Self(numbers)
    }

    /// `text` with each run of digits that is part of a number sent, or holds one,
    /// replaced: a provider may echo a number whole, cut short, or run into others.
    fn withhold(&self, text: &str) -> String {
        let mut kept = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
            let (before, from_run) = rest.split_at(start);
            let end = from_run
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(from_run.len());
            let (run, after) = from_run.split_at(end);
            kept.push_str(before);
            kept.push_str(if self.covers(run) { "[withheld]" } else { run });
            rest = after;
        }
        kept.push_str(rest);
        kept
    }

    fn covers(&self, run: &str) -> bool {
        run.len() >= MIN_WITHHELD_DIGITS
            && self
                .0
                .iter()
                .any(|number| number.contains(run) || run.contains(number.as_str()))
    }
}

fn collect_digit_runs(value: &Value, runs: &mut Vec<String>) {
    match value {
        Value::String(text) => runs.extend(
            text.split(|c: char| !c.is_ascii_digit())
                .filter(|run| run.len() >= MIN_WITHHELD_DIGITS)
                .map(str::to_owned),
        ),
        Value::Array(items) => items.iter().for_each(|v| collect_digit_runs(v, runs)),
        Value::Object(fields) => fields.values().for_each(|v| collect_digit_runs(v, runs)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use jsonwebtoken::EncodingKey;
    use serde_json::json;

    use super::super::jwt::SystemClock;
    use super::*;

    #[test]
    fn problem_json_becomes_a_message() {
        let body = br#"{"type":"https://x/errors#invalid","title":"Bad Request","detail":"The request failed due to validation errors","instance":"1","invalid_parameters":[{"name":"workflow[0].to.id","reason":"Invalid"}]}"#;
        assert_eq!(
            describe_problem(StatusCode::BAD_REQUEST, body, &SentNumbers(Vec::new())),
            "400 Bad Request: The request failed due to validation errors (invalid: workflow[0].to.id)"
        );
        let titled = br#"{"title":"Invalid sender","detail":"The from field is not allowed"}"#;
        assert_eq!(
            describe_problem(StatusCode::BAD_REQUEST, titled, &SentNumbers(Vec::new())),
            "400 Bad Request: Invalid sender: The from field is not allowed"
        );
        assert_eq!(
            describe_problem(StatusCode::BAD_GATEWAY, b"<html>", &SentNumbers(Vec::new())),
            "502 Bad Gateway"
        );
    }

    #[test]
    fn control_characters_in_a_problem_become_spaces() {
        let body = json!({"title": "Bad\nRequest", "detail": "a\r\n2026 FORGED", "invalid_parameters": [{"name": "x\u{1b}[31m"}]});
        assert_eq!(
            describe_problem(
                StatusCode::BAD_REQUEST,
                body.to_string().as_bytes(),
                &SentNumbers(Vec::new())
            ),
            "400 Bad Request: Bad Request: a  2026 FORGED (invalid: x [31m)"
        );
    }

    #[test]
    fn numbers_sent_are_withheld_from_a_problem_that_echoes_them() {
        let sent = json!({"to": "393331234567", "text": "Code 081234, valid 5 minutes", "n": [{"id": "8192836451"}]});
        let echo = json!({"title": "Bad Request", "detail": sent.to_string()}).to_string();
        let withheld = SentNumbers::of(&sent);
        let message = describe_problem(StatusCode::BAD_REQUEST, echo.as_bytes(), &withheld);
        for number in ["393331234567", "081234", "8192836451"] {
            assert!(!message.contains(number), "{number} in {message}");
        }
        assert!(message.starts_with("400 Bad Request: {"), "{message}");
        assert!(
            message.contains("valid 5 minutes"),
            "short numbers stay: {message}"
        );

        let long = json!({"detail": "x".repeat(1000)}).to_string();
        let message = describe_problem(StatusCode::BAD_REQUEST, long.as_bytes(), &withheld);
        assert_eq!(message.len(), "400 Bad Request: ".len() + MAX_PROBLEM_CHARS);
    }

    #[test]
    fn a_number_sent_is_withheld_even_where_the_problem_cuts_it_short() {
        let sent = json!({"text": "Your verification code is 044576", "to": "393331234568"});
        let withheld = SentNumbers::of(&sent);
        // Our own cut at MAX_PROBLEM_CHARS falls inside the code.
        let padding = "x".repeat(MAX_PROBLEM_CHARS - "Your verification code is 04".len());
        let cut_by_us = json!({"detail": format!("{padding}Your verification code is 044576")});
        // The provider cut it (or ran it into other digits) itself.
        let cut_by_them = json!({"title": "text 0445…", "detail": "to 3933312345689 rejected"});
        for body in [cut_by_us, cut_by_them] {
            let message = describe_problem(
                StatusCode::BAD_REQUEST,
                body.to_string().as_bytes(),
                &withheld,
            );
            for part in ["04", "0445", "393331", "3933312345689"] {
                assert!(!message.contains(part), "{part} in {message}");
            }
        }
        assert_eq!(
            withheld.withhold("2026: code 5678 or 044576 to +393331234568."),
            "2026: code 5678 or [withheld] to +[withheld].",
            "numbers not sent stay"
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        for attempt in 0..4 {
            let full = BACKOFF_BASE * (1 << attempt);
            let delay = backoff(attempt);
            assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
        }
    }

    /// Every retry the config allows (`max_retries` up to 10) is made: the backoff
    /// stops at the longest delay, and only a provider asking for longer ends retries.
    #[test]
    fn backoff_stops_at_the_longest_delay_and_only_the_provider_ends_retries() {
        for attempt in 0..=20 {
            for _ in 0..100 {
                let delay = retry_delay(attempt, None).expect("otpd's own backoff");
                assert!(delay <= MAX_RETRY_DELAY, "{attempt}: {delay:?}");
            }
        }
        let late = retry_delay(10, None).unwrap();
        assert!(late >= MAX_RETRY_DELAY / 2, "still backing off: {late:?}");
        assert_eq!(
            retry_delay(0, Some(MAX_RETRY_DELAY)),
            Ok(MAX_RETRY_DELAY),
            "the provider's wait, up to the limit"
        );
        assert_eq!(
            retry_delay(0, Some(Duration::from_secs(2))),
            Ok(Duration::from_secs(2))
        );
        let asked = MAX_RETRY_DELAY + Duration::from_millis(1);
        assert_eq!(retry_delay(0, Some(asked)), Err(asked));
    }

    /// A request otpd cannot sign is refused without being sent, and `delivery_attempts`
    /// (requests sent) does not count it.
    #[tokio::test]
    async fn a_request_otpd_cannot_sign_is_refused_and_not_counted_as_sent() {
        // An HMAC key cannot sign RS256: every signature fails.
        let key = EncodingKey::from_secret(b"no RSA key");
        let signer = JwtSigner::new("app".into(), key, Arc::new(SystemClock));
        let counters = Arc::new(Counters::default());
        let client = ApiClient::new(
            signer,
            Duration::from_secs(1),
            3,
            counters.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        // A listener that would see the request, were one sent.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url: Uri = format!("http://{address}/v1/messages").parse().unwrap();
        let outcome = client.post_json(&url, || Ok(json!({"text": "x"}))).await;
        assert!(
            matches!(&outcome, Err(DeliveryError::Refused(m)) if m.starts_with("cannot sign the Vonage JWT")),
            "{outcome:?}"
        );
        let connected = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(connected.is_err(), "a connection was made");
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        assert_eq!(count(&counters.delivery_attempts), 0, "nothing was sent");
        assert_eq!(count(&counters.delivery_refused), 1);
    }
}
