//! Vonage's status webhooks (`POST /webhooks/status`): checks the signature, reads the
//! report and files it on the code whose delivery it is about.
//!
//! Vonage signs each callback with an HS256 JWT made with the account's signature
//! secret; its `payload_hash` claim is the SHA-256 of the body. A callback is accepted
//! only when the signature, the hash of the exact body and a recent `iat` all hold.
//! Badly signed ones get 401; unsigned ones get 503 (once a secret is set: without one,
//! every callback gets 401), because Vonage sends an unsigned callback only after an
//! internal error and retries 5xx answers, so the retry can arrive signed (README.md,
//! "Vonage status webhooks", has Vonage's sources). Refusals are logged at most once a
//! second: anyone can send them.

use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Answer, text};
use crate::config::{HttpConfig, WEBHOOK_SECRET_CREDENTIAL};
use crate::log_throttle::OncePerSecond;
use crate::metrics::bump;
use crate::otp::Otp;
use crate::rules::{DeliveryEvent, Millis, OWN_STATUSES, now_ms};
use crate::store::Filed;

/// Oldest a callback's `iat` may be: Vonage retries a callback answered 5xx for up to
/// 24 h (after a storage failure, or a report that came before its id was filed) and
/// does not say that it signs each retry anew, so a retry may carry the first
/// attempt's token; 5 minutes more allow for clock skew. A replay within that time can
/// only repeat the report its signature covers (`payload_hash`), which is filed once.
const MAX_IAT_AGE_SECS: i64 = 24 * 3600 + 300;
/// Farthest in the future a callback's `iat` may be: clock skew between Vonage and
/// this host.
const MAX_IAT_AHEAD_SECS: i64 = 300;

/// How long after its own `timestamp` a report on an unknown id is answered 503 instead
/// of dropped. Vonage can report on a message before the call that sent it has returned
/// to otpd, so its id is not filed yet; Vonage retries a 5xx after ~5 s, by when it is,
/// and again after ~1 min, by when a report on an id otpd never knew is dropped.
const EARLY_REPORT_MS: Millis = 30_000;

/// How far ahead of this host's clock a report's `timestamp` may be and still count as
/// early: clocks differ a little, but a report from next year would otherwise be
/// answered 503 until then.
const MAX_FUTURE_TIMESTAMP_MS: Millis = 60_000;

/// Whether a report on an unknown id is recent enough that its id may not be filed
/// yet (see [`EARLY_REPORT_MS`]).
fn is_early(reported_at: Option<Millis>, now: Millis) -> bool {
    reported_at.is_some_and(|at| {
        at <= now.saturating_add(MAX_FUTURE_TIMESTAMP_MS)
            && now.saturating_sub(at) < EARLY_REPORT_MS
    })
}

/// Longest `detail` and `channel` kept from a report.
const MAX_DETAIL_CHARS: usize = 200;
const MAX_CHANNEL_CHARS: usize = 32;

/// A signature secret is a few dozen bytes: a longer credential file is a mistake.
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The signature secret: `http.webhook_signature_secret`, else the systemd credential
/// (surrounding whitespace dropped: a file usually ends with a newline).
pub fn load_secret(config: &HttpConfig) -> anyhow::Result<Option<Vec<u8>>> {
    if !config.webhook_signature_secret.is_empty() {
        return Ok(Some(config.webhook_signature_secret.as_bytes().to_vec()));
    }
    let Some(path) = &config.webhook_secret_credential else {
        return Ok(None);
    };
    let bytes = crate::read_bounded(path, MAX_SECRET_FILE_BYTES)
        .map_err(|e| anyhow::anyhow!("credential {}: {e}", path.display()))?;
    let secret = bytes.trim_ascii();
    if secret.is_empty() {
        anyhow::bail!("credential {} is empty", path.display());
    }
    Ok(Some(secret.to_vec()))
}

/// What became of a callback, counted for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Filed on the code it is about.
    Recorded,
    /// Already filed: Vonage sent it again. 200, nothing changes.
    Duplicate,
    /// Signed, but about no code otpd knows (any more): answered 200 and dropped.
    UnknownId,
    /// Signed, recent and about no code otpd knows yet: 503, so that Vonage retries.
    Early,
    /// No `Authorization` header while a secret is set: 503, so that Vonage retries.
    Unsigned,
    /// Bad signature, body hash or `iat`, or no secret configured: 401.
    Unauthorized,
    /// Signed, but not a status report otpd can read: 400.
    Malformed,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Recorded,
        Outcome::Duplicate,
        Outcome::UnknownId,
        Outcome::Early,
        Outcome::Unsigned,
        Outcome::Unauthorized,
        Outcome::Malformed,
    ];

    fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .expect("listed")
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::Duplicate => "duplicate",
            Outcome::UnknownId => "unknown_id",
            Outcome::Early => "early",
            Outcome::Unsigned => "unsigned",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Malformed => "malformed",
        }
    }
}

/// Statuses counted by name in `/metrics`; any other is counted as `other`.
pub const STATUSES: [&str; 7] = [
    "submitted",
    "delivered",
    "read",
    "rejected",
    "undeliverable",
    "completed",
    "error",
];

/// Claims of Vonage's webhook JWT that otpd checks (besides the signature).
#[derive(Deserialize)]
struct Claims {
    iat: Option<i64>,
    payload_hash: Option<String>,
}

/// Why a callback was not authenticated.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Unsigned,
    Unauthorized(String),
}

/// The webhook endpoint's key and counters.
pub struct Webhooks {
    /// `None` when no secret is configured: every callback is refused.
    key: Option<DecodingKey>,
    validation: Validation,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Recorded reports by status, as [`STATUSES`] and then `other`.
    statuses: [AtomicU64; STATUSES.len() + 1],
    /// The log of refusals, per [`Outcome`] (see [`Webhooks::refused`]).
    refusal_logs: [OncePerSecond; Outcome::ALL.len()],
}

impl Webhooks {
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Vonage's token carries `iat` but no `exp`; `iat` is checked below. An `exp`,
        // should one appear, is still honoured.
        validation.required_spec_claims.clear();
        Self {
            key: secret.map(|secret| DecodingKey::from_secret(&secret)),
            validation,
            outcomes: Default::default(),
            statuses: Default::default(),
            refusal_logs: Default::default(),
        }
    }

    /// Counts per [`Outcome`], in [`Outcome::ALL`] order.
    pub fn outcome_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Outcome::ALL
            .iter()
            .zip(&self.outcomes)
            .map(|(outcome, count)| (outcome.label(), count.load(Ordering::Relaxed)))
    }

    /// Recorded reports per status, [`STATUSES`] then `other`.
    pub fn status_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STATUSES
            .iter()
            .chain(&["other"])
            .zip(&self.statuses)
            .map(|(status, count)| (*status, count.load(Ordering::Relaxed)))
    }

    fn count(&self, outcome: Outcome) {
        bump(&self.outcomes[outcome.index()]);
    }

    /// Counts a refused callback and logs it, at most once a second per outcome with
    /// how many were not: anyone can send a flood of them (the metrics count each).
    /// `reason` is logged escaped, as it may hold what the sender wrote.
    fn refused(&self, outcome: Outcome, what: &str, reason: &str) {
        self.count(outcome);
        if let Some(held_back) = self.refusal_logs[outcome.index()].admit() {
            tracing::warn!(
                ?reason,
                held_back,
                "{what} (held_back: refusals since the last such line)"
            );
        }
    }

    /// `POST /webhooks/status`.
    pub async fn status(&self, otp: &Otp, headers: &HeaderMap, body: &[u8]) -> Answer {
        let now = now_ms();
        match self.authenticate(headers, body, now) {
            Ok(()) => {}
            Err(Refused::Unsigned) => {
                self.refused(
                    Outcome::Unsigned,
                    "unsigned status webhook: answered 503 so that Vonage retries it",
                    "no Authorization header",
                );
                return retry_later("Unsigned callbacks are not accepted");
            }
            Err(Refused::Unauthorized(reason)) => {
                self.refused(
                    Outcome::Unauthorized,
                    "refused a status webhook (401)",
                    &reason,
                );
                return text(StatusCode::UNAUTHORIZED, "Unauthorized");
            }
        }
        let report = match parse_report(body, now) {
            Ok(report) => report,
            Err(reason) => {
                self.refused(
                    Outcome::Malformed,
                    "signed status webhook not understood (400)",
                    &reason,
                );
                return text(StatusCode::BAD_REQUEST, &format!("body: {reason}"));
            }
        };
        for reference in &report.references {
            match otp
                .record_delivery_event(reference, report.event.clone())
                .await
            {
                Ok(Filed::UnknownReference) => continue,
                Ok(Filed::AlreadyRecorded) => {
                    self.count(Outcome::Duplicate);
                    return text(StatusCode::OK, "OK");
                }
                Ok(Filed::Recorded) => {
                    self.count(Outcome::Recorded);
                    let index = STATUSES.iter().position(|s| *s == report.event.status);
                    bump(&self.statuses[index.unwrap_or(STATUSES.len())]);
                    tracing::info!(
                        reference,
                        status = report.event.status,
                        "delivery status recorded"
                    );
                    return text(StatusCode::OK, "OK");
                }
                // Logged by `record_delivery_event`; a 5xx makes Vonage retry later.
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal error"),
            }
        }
        if is_early(report.reported_at, now) {
            self.count(Outcome::Early);
            tracing::debug!(references = ?report.references, "recent status webhook for a delivery not filed yet; answered 503 so that Vonage retries it");
            return retry_later("Unknown delivery id, retry later");
        }
        self.count(Outcome::UnknownId);
        tracing::debug!(references = ?report.references, "status webhook for an unknown delivery; ignored");
        text(StatusCode::OK, "OK")
    }

    /// Checks the Bearer JWT: HS256 with the secret, `payload_hash` of this exact body,
    /// `iat` at most [`MAX_IAT_AGE_SECS`] before `now` and [`MAX_IAT_AHEAD_SECS`] after.
    fn authenticate(&self, headers: &HeaderMap, body: &[u8], now: Millis) -> Result<(), Refused> {
        let refuse = |reason: String| Err(Refused::Unauthorized(reason));
        let Some(key) = &self.key else {
            return refuse(format!(
                "http.webhook_signature_secret is not set (nor the credential {WEBHOOK_SECRET_CREDENTIAL})"
            ));
        };
        let Some(authorization) = headers.get(header::AUTHORIZATION) else {
            return Err(Refused::Unsigned);
        };
        let token = authorization
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return refuse("Authorization is not a Bearer token".into());
        };
        let claims = match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => data.claims,
            Err(error) => return refuse(jwt_refusal(&error).into()),
        };
        let Some(payload_hash) = claims.payload_hash else {
            return refuse("JWT: no payload_hash claim".into());
        };
        if !payload_hash.eq_ignore_ascii_case(&sha256_hex(body)) {
            return refuse("JWT: payload_hash does not match the body".into());
        }
        let Some(iat) = claims.iat else {
            return refuse("JWT: no iat claim".into());
        };
        // Saturating: an `iat` near i64::MIN must not wrap into a small age.
        let age = ((now / 1000) as i64).saturating_sub(iat);
        if age > MAX_IAT_AGE_SECS {
            return refuse(format!(
                "JWT: iat is {age} s in the past (at most {MAX_IAT_AGE_SECS} allowed)"
            ));
        }
        if age < -MAX_IAT_AHEAD_SECS {
            return refuse(format!(
                "JWT: iat is {} s in the future (at most {MAX_IAT_AHEAD_SECS} allowed)",
                age.unsigned_abs()
            ));
        }
        Ok(())
    }
}

/// Why jsonwebtoken refused a token, in fixed words: its own messages quote the token
/// (a header `{"alg":"HS256\n…"}` would put a forged line into the log).
fn jwt_refusal(error: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => "JWT: bad signature",
        ErrorKind::ExpiredSignature => "JWT: expired (exp)",
        ErrorKind::ImmatureSignature => "JWT: not valid yet (nbf)",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => "JWT: not signed with HS256",
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "JWT: malformed",
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            "JWT: a claim is missing or malformed"
        }
        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience | ErrorKind::InvalidSubject => {
            "JWT: unexpected iss, aud or sub"
        }
        _ => "JWT: refused",
    }
}

/// Lower-case hex SHA-256, as `payload_hash` carries it.
fn sha256_hex(bytes: &[u8]) -> String {
    crate::hex(&Sha256::digest(bytes))
}

/// 503 with `Retry-After`: Vonage retries 5xx answers on its own schedule.
fn retry_later(message: &str) -> Answer {
    let mut answer = text(StatusCode::SERVICE_UNAVAILABLE, message);
    answer
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    answer
}

/// A status report and the provider ids it may be filed under, most specific first.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    references: Vec<String>,
    event: DeliveryEvent,
    /// The report's own `timestamp`, when it has a readable one.
    reported_at: Option<Millis>,
}

/// Reads a report: a per-message status (`message_uuid`, and for Dispatch
/// `_links.workflow.dispatch_uuid`) or Dispatch's final report (`dispatch_uuid`,
/// `_links.messages`). The event time is the report's `timestamp`, else `now`.
fn parse_report(body: &[u8], now: Millis) -> Result<Report, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not valid JSON: {e}"))?;
    let str_at = |pointer: &str| value.pointer(pointer).and_then(Value::as_str);
    let status = str_at("/status").ok_or("status: missing")?;
    if !(1..=32).contains(&status.len())
        || !status.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return Err("status: not a status name".into());
    }
    if OWN_STATUSES.contains(&status) {
        return Err(format!(
            "status: {status} is recorded by otpd itself, never reported"
        ));
    }
    let reported_at = str_at("/timestamp")
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .and_then(|t| Millis::try_from(t.as_millisecond()).ok());
    let (references, channel, detail) = if let Some(message_uuid) = str_at("/message_uuid") {
        let references = [str_at("/_links/workflow/dispatch_uuid"), Some(message_uuid)];
        (
            references
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect(),
            // Messages v1 names the channel; Dispatch's v0.1 reports carry it in `to`.
            str_at("/channel").or_else(|| str_at("/to/type")),
            value.get("error").and_then(error_detail),
        )
    } else if let Some(dispatch_uuid) = str_at("/dispatch_uuid") {
        let messages = value.pointer("/_links/messages").and_then(Value::as_array);
        let summary = messages.map(|messages| {
            messages
                .iter()
                .map(|m| {
                    let field = |name| m.get(name).and_then(Value::as_str).unwrap_or("?");
                    format!("{} {}", field("channel"), field("status"))
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        (
            vec![dispatch_uuid.to_owned()],
            None,
            summary.filter(|s| !s.is_empty()),
        )
    } else {
        return Err("neither message_uuid nor dispatch_uuid".into());
    };
    Ok(Report {
        references,
        event: DeliveryEvent {
            at: reported_at.unwrap_or(now),
            status: status.to_owned(),
            channel: channel.map(|c| truncate(c, MAX_CHANNEL_CHARS)),
            detail: detail.map(|d| truncate(&d, MAX_DETAIL_CHARS)),
        },
        reported_at,
    })
}

/// `code: reason` from a report's `error`: Dispatch's `{code, reason}` or Messages v1's
/// problem details `{title, detail}`.
fn error_detail(error: &Value) -> Option<String> {
    let part = |keys: [&str; 2]| {
        keys.iter().find_map(|key| match error.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    match (part(["code", "title"]), part(["reason", "detail"])) {
        (Some(code), Some(reason)) => Some(format!("{code}: {reason}")),
        (code, reason) => code.or(reason),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"signature-secret-for-tests";

    #[test]
    fn the_credential_is_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEBHOOK_SECRET_CREDENTIAL);
        let config = HttpConfig {
            webhook_secret_credential: Some(path.clone()),
            ..HttpConfig::default()
        };
        let load = || load_secret(&config);
        std::fs::write(&path, b" s3cret\n").unwrap();
        assert_eq!(load().unwrap(), Some(b"s3cret".to_vec()));
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let error = load().unwrap_err().to_string();
        assert!(error.contains("longer than 4096 bytes"), "{error}");
        assert!(!error.contains("xxxx"), "{error}");
    }

    fn signed(claims: Value) -> HeaderMap {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn authentication() {
        let webhooks = Webhooks::new(Some(SECRET.to_vec()));
        let body = br#"{"status":"read"}"#;
        let now = now_ms();
        let iat = (now / 1000) as i64;
        let good = signed(json!({"iat": iat, "payload_hash": sha256_hex(body)}));
        assert_eq!(webhooks.authenticate(&good, body, now), Ok(()));
        assert!(matches!(
            webhooks.authenticate(&good, b"{\"status\":\"read\" }", now),
            Err(Refused::Unauthorized(r)) if r.contains("payload_hash")
        ));
        // A retry a day later may carry the first attempt's token.
        let a_day = 24 * 3600 * 1000;
        assert_eq!(
            webhooks.authenticate(&good, body, now + a_day + 300_000),
            Ok(())
        );
        assert_eq!(
            webhooks.authenticate(&good, body, now + a_day + 301_000),
            Err(Refused::Unauthorized(
                "JWT: iat is 86701 s in the past (at most 86700 allowed)".into()
            ))
        );
        assert_eq!(webhooks.authenticate(&good, body, now - 300_000), Ok(()));
        assert_eq!(
            webhooks.authenticate(&good, body, now - 301_000),
            Err(Refused::Unauthorized(
                "JWT: iat is 301 s in the future (at most 300 allowed)".into()
            ))
        );
        assert_eq!(
            webhooks.authenticate(&HeaderMap::new(), body, now),
            Err(Refused::Unsigned)
        );
        let no_iat = signed(json!({"payload_hash": sha256_hex(body)}));
        assert!(webhooks.authenticate(&no_iat, body, now).is_err());
        let unconfigured = Webhooks::new(None);
        assert!(matches!(
            unconfigured.authenticate(&good, body, now),
            Err(Refused::Unauthorized(_))
        ));
    }

    #[test]
    fn secret_from_config_or_credential() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEBHOOK_SECRET_CREDENTIAL);
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut config = HttpConfig {
            webhook_secret_credential: Some(path),
            ..HttpConfig::default()
        };
        assert_eq!(load_secret(&config).unwrap(), Some(b"s3cret".to_vec()));
        config.webhook_signature_secret = "from-file".into();
        assert_eq!(load_secret(&config).unwrap(), Some(b"from-file".to_vec()));
        assert_eq!(load_secret(&HttpConfig::default()).unwrap(), None);
    }

    #[test]
    fn dispatch_message_status_is_filed_under_its_workflow_first() {
        let body = json!({
            "message_uuid": "m-1", "to": {"type": "messenger", "id": "42"},
            "from": {"type": "messenger", "id": "7"}, "timestamp": "2026-11-26T09:05:00.123Z",
            "status": "rejected", "error": {"code": 1300, "reason": "Not part of the provider network"},
            "_links": {"workflow": {"dispatch_uuid": "d-1", "href": "x"}}
        });
        let report = parse_report(body.to_string().as_bytes(), 1).unwrap();
        assert_eq!(report.references, vec!["d-1", "m-1"]);
        assert_eq!(report.reported_at, Some(1_795_683_900_123));
        assert_eq!(
            report.event,
            DeliveryEvent {
                at: 1_795_683_900_123,
                status: "rejected".into(),
                channel: Some("messenger".into()),
                detail: Some("1300: Not part of the provider network".into()),
            }
        );
    }

    #[test]
    fn messages_v1_status_and_dispatch_final_report() {
        let body = json!({
            "message_uuid": "m-2", "to": "447700900000", "from": "OTP", "channel": "sms",
            "timestamp": "not a time", "status": "undeliverable",
            "error": {"type": "https://x", "title": 1320, "detail": "Message already read"}
        });
        let report = parse_report(body.to_string().as_bytes(), 99).unwrap();
        assert_eq!(report.references, vec!["m-2"]);
        assert_eq!(report.event.at, 99, "unparsable timestamp: now");
        assert_eq!(report.reported_at, None);
        assert_eq!(report.event.channel.as_deref(), Some("sms"));
        assert_eq!(
            report.event.detail.as_deref(),
            Some("1320: Message already read")
        );

        let body = json!({
            "dispatch_uuid": "d-3", "template": "failover", "status": "completed",
            "timestamp": "2026-11-26T09:05:00Z",
            "_links": {"messages": [
                {"message_uuid": "a", "channel": "messenger", "status": "read"},
                {"message_uuid": "b", "channel": "sms"}
            ]}
        });
        let report = parse_report(body.to_string().as_bytes(), 0).unwrap();
        assert_eq!(report.references, vec!["d-3"]);
        assert_eq!(report.event.status, "completed");
        assert_eq!(report.event.channel, None);
        assert_eq!(
            report.event.detail.as_deref(),
            Some("messenger read, sms ?")
        );
    }

    #[test]
    fn only_a_recent_report_not_far_in_the_future_is_early() {
        let now = 1_000_000_000;
        assert!(is_early(Some(now), now));
        assert!(is_early(Some(now - 29_999), now));
        assert!(!is_early(Some(now - 30_000), now));
        assert!(is_early(Some(now + 60_000), now), "clocks differ a little");
        assert!(!is_early(Some(now + 60_001), now));
        assert!(!is_early(None, now));
    }

    #[test]
    fn unreadable_reports_are_refused() {
        for body in [
            "nope",
            r#"{"message_uuid":"m"}"#,
            r#"{"message_uuid":"m","status":"Bad Status"}"#,
            r#"{"status":"read"}"#,
            r#"{"message_uuid":"m","status":"failover_sent","detail":"x"}"#,
            r#"{"message_uuid":"m","status":"failover_failed"}"#,
        ] {
            assert!(parse_report(body.as_bytes(), 0).is_err(), "{body}");
        }
    }
}
