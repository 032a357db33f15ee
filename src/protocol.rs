//! The socket protocol: one JSON object per line, answered by one JSON object per line.
//!
//! Requests are parsed by hand from a JSON object so that every error names the field
//! it is about; responses are typed and serialised with serde. See README.md for the
//! full reference with an example per op.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::delivery::Recipients;
use crate::metrics::Stats;
use crate::otp::{self, CreateRequest, OtpError};
use crate::strict_json::parse_json;

/// A parsed request.
#[derive(Clone)]
pub enum Request {
    Create(CreateRequest),
    Verify { token: String, code: String },
    Cancel { token: String },
    Status { token: String },
    Stats,
    Ping,
}

/// Written out so that a request in a log line never shows the code typed (as
/// [`crate::code::Code`]'s own `Debug` does not).
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Create(create) => f.debug_tuple("Create").field(create).finish(),
            Request::Verify { token, code: _ } => f
                .debug_struct("Verify")
                .field("token", token)
                .field("code", &format_args!("***"))
                .finish(),
            Request::Cancel { token } => f.debug_struct("Cancel").field("token", token).finish(),
            Request::Status { token } => f.debug_struct("Status").field("token", token).finish(),
            Request::Stats => f.write_str("Stats"),
            Request::Ping => f.write_str("Ping"),
        }
    }
}

/// A request that could not be parsed: answered with 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub error: &'static str,
    pub message: String,
}

fn bad_request(field: &str, reason: &str) -> ProtocolError {
    ProtocolError {
        error: "bad_request",
        message: format!("{field}: {reason}"),
    }
}

/// A request line: its `id` (echoed back, even when the rest is bad) and the request.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: Option<Value>,
    pub request: Result<Request, ProtocolError>,
}

/// The answer to a key given twice (found by [`parse_json`]), on both front ends.
pub fn given_twice(path: &str) -> ProtocolError {
    bad_request(path, "given twice")
}

/// The fields an object may carry, so that a misspelt key is an error, not ignored.
fn check_fields(
    object: &Map<String, Value>,
    allowed: &[&str],
    within: &str,
) -> Result<(), ProtocolError> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(bad_request(
            &format!("{within}{key}"),
            &format!("unknown field; expected one of: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn required_str(object: &Map<String, Value>, field: &str) -> Result<String, ProtocolError> {
    match object.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad_request(field, "must be a string")),
        None => Err(bad_request(field, "is required")),
    }
}

/// A string field that may also be given as a JSON number (phone numbers and Messenger
/// ids often are, in the tutorial's clients).
fn optional_id(
    object: &Map<String, Value>,
    field: &str,
    label: &str,
) -> Result<Option<String>, ProtocolError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(n.to_string())),
        // A JSON number above 2^64 - 1 is read as a double, whose digits are lost.
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f >= u64::MAX as f64) => {
            Err(bad_request(
                label,
                "is too large for a JSON number: send it as a string of digits",
            ))
        }
        Some(_) => Err(bad_request(label, "must be a string of digits")),
    }
}

fn optional_u64(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProtocolError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f >= u64::MAX as f64) => {
            Err(bad_request(field, "is too large"))
        }
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_request(field, "must be a whole number")),
    }
}

/// The recipient fields allowed at top level and inside `to`, each with the name an
/// error gives it.
const TOP_LEVEL_RECIPIENTS: [(&str, &str); 2] = [
    ("messengerId", "messengerId"),
    ("phoneNumber", "phoneNumber"),
];
const TO_RECIPIENTS: [(&str, &str); 4] = [
    ("messenger", "to.messenger"),
    ("sms", "to.sms"),
    ("messengerId", "to.messengerId"),
    ("phoneNumber", "to.phoneNumber"),
];

/// Reads the recipients of a create: `to.messenger` / `to.sms`, or the tutorial's
/// `messengerId` / `phoneNumber` at top level or inside `to`. Also returns the name of
/// the field the Messenger id came in, for an error about it.
fn parse_recipients(
    object: &Map<String, Value>,
) -> Result<(Recipients, Option<&'static str>), ProtocolError> {
    let mut found: Vec<(&'static str, &'static str, String)> = Vec::new();
    let mut collect = |object: &Map<String, Value>, fields: &[(&'static str, &'static str)]| {
        // Of the six places a recipient may be named, a request uses one or two.
        for &(field, label) in fields
            .iter()
            .filter(|(field, _)| object.contains_key(*field))
        {
            if let Some(value) = optional_id(object, field, label)? {
                found.push((label, field, value));
            }
        }
        Ok::<(), ProtocolError>(())
    };
    collect(object, &TOP_LEVEL_RECIPIENTS)?;
    match object.get("to") {
        None | Some(Value::Null) => {}
        Some(Value::Object(to)) => {
            check_fields(to, &TO_RECIPIENTS.map(|(field, _)| field), "to.")?;
            collect(to, &TO_RECIPIENTS)?;
        }
        Some(_) => return Err(bad_request("to", "must be an object")),
    }
    let mut recipients = Recipients::default();
    // The field each recipient came from, to name both when one is given twice.
    let (mut messenger_from, mut sms_from) = (None, None);
    for (label, field, value) in found {
        let (slot, given_as, normalized) = match field {
            "messenger" | "messengerId" => (
                &mut recipients.messenger,
                &mut messenger_from,
                otp::validate_messenger_id(&value),
            ),
            _ => (
                &mut recipients.sms,
                &mut sms_from,
                otp::normalize_phone(&value),
            ),
        };
        let normalized = normalized.map_err(|reason| bad_request(label, reason))?;
        if let Some(earlier) = given_as.replace(label) {
            return Err(bad_request(
                label,
                &format!("given twice (also as {earlier})"),
            ));
        }
        *slot = Some(normalized);
    }
    Ok((recipients, messenger_from))
}

/// The fields of a create besides the token (and the socket's `op` and `id`).
const CREATE_FIELDS: [&str; 5] = [
    "to",
    "messengerId",
    "phoneNumber",
    "ttl_secs",
    "code_length",
];

/// Reads a create from `object`. With `path_token` it is the body of the HTTP listener's
/// `POST /otp/:token`, which names the token in its URL; without, a socket request with
/// its `op`, `id` and `token`. Both front ends so accept the same fields, and their
/// errors name them alike.
pub fn parse_create(
    object: &Map<String, Value>,
    path_token: Option<&str>,
) -> Result<CreateRequest, ProtocolError> {
    let envelope: &[&str] = match path_token {
        Some(_) => &[],
        None => &["op", "id", "token"],
    };
    let allowed: Vec<&str> = envelope.iter().chain(&CREATE_FIELDS).copied().collect();
    check_fields(object, &allowed, "")?;
    let code_length = optional_u64(object, "code_length")?
        .map(|len| u32::try_from(len).map_err(|_| bad_request("code_length", "is too large")))
        .transpose()?;
    let (to, messenger_field) = parse_recipients(object)?;
    Ok(CreateRequest {
        token: match path_token {
            Some(token) => token.to_owned(),
            None => required_str(object, "token")?,
        },
        to,
        messenger_field: messenger_field.unwrap_or("to.messenger"),
        ttl_secs: optional_u64(object, "ttl_secs")?,
        code_length,
    })
}

fn parse_object(object: &Map<String, Value>) -> Result<Request, ProtocolError> {
    let op = match object.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(bad_request("op", "must be a string")),
        None => {
            // A misspelt `op` (`Op`) is named as the unknown key it is.
            let known: Vec<&str> = ["op", "id", "token", "code"]
                .iter()
                .chain(&CREATE_FIELDS)
                .copied()
                .collect();
            check_fields(object, &known, "")?;
            return Err(bad_request("op", "is required"));
        }
    };
    match op {
        "create" => parse_create(object, None).map(Request::Create),
        "verify" => {
            check_fields(object, &["op", "id", "token", "code"], "")?;
            Ok(Request::Verify {
                token: required_str(object, "token")?,
                code: required_str(object, "code")?,
            })
        }
        "cancel" | "status" => {
            check_fields(object, &["op", "id", "token"], "")?;
            let token = required_str(object, "token")?;
            Ok(if op == "cancel" {
                Request::Cancel { token }
            } else {
                Request::Status { token }
            })
        }
        "stats" | "ping" => {
            check_fields(object, &["op", "id"], "")?;
            Ok(if op == "stats" {
                Request::Stats
            } else {
                Request::Ping
            })
        }
        other => Err(ProtocolError {
            error: "unknown_op",
            message: format!(
                "op: unknown op {other:?}; expected create, verify, cancel, status, stats or ping"
            ),
        }),
    }
}

/// Parses one request line (without its `\n`).
pub fn parse(line: &[u8]) -> Envelope {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Envelope {
            id: None,
            request: Err(ProtocolError {
                error: "bad_json",
                message: "empty line: expected a JSON object".into(),
            }),
        };
    }
    let (value, duplicates) = match parse_json(line) {
        Ok(parsed) => parsed,
        Err(e) => {
            return Envelope {
                id: None,
                request: Err(ProtocolError {
                    error: "bad_json",
                    message: format!("request is not valid JSON: {e}"),
                }),
            };
        }
    };
    let Value::Object(object) = value else {
        return Envelope {
            id: None,
            request: Err(ProtocolError {
                error: "bad_json",
                message: "request must be a JSON object".into(),
            }),
        };
    };
    // Only ids that come back exactly as sent are echoed: a string, or an integer within
    // 64 bits (a larger one, or a fraction, would be a float, echoed rounded), so that
    // the client can match the answer.
    // An id given twice is not echoed either: the client cannot tell which comes back.
    let id = object
        .get("id")
        .filter(|_| !duplicates.iter().any(|path| path == "id"));
    let id = id.cloned();
    let echoable = |id: &Value| id.is_string() || id.is_i64() || id.is_u64();
    let request = match (&id, duplicates.first()) {
        (_, Some(path)) => Err(given_twice(path)),
        (Some(id), None) if !echoable(id) => Err(bad_request(
            "id",
            "must be a string or an integer within 64 bits",
        )),
        _ => parse_object(&object),
    };
    let id = id.filter(echoable);
    Envelope { id, request }
}

/// The body of a successful answer.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Body {
    Created {
        token: String,
        expires_at: String,
        channels: Vec<&'static str>,
    },
    Verified {
        result: &'static str,
    },
    Cancelled {
        result: &'static str,
    },
    /// The code's fields are absent for a token locked after its code was purged.
    Status {
        token: String,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        created_at: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
        attempts: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        locked_until: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channels: Option<Vec<&'static str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        delivery: Option<DeliveryView>,
    },
    Stats(Stats),
    Pong {
        version: &'static str,
    },
    Error {
        error: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
}

/// Delivery facts shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub events: Vec<DeliveryEventView>,
}

/// One provider status report, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryEventView {
    pub at: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One answer line.
#[derive(Debug, Clone, Serialize)]
pub struct Response {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub ok: bool,
    pub status: u16,
    #[serde(flatten)]
    pub body: Body,
}

impl Response {
    /// A success answer.
    pub fn ok(id: Option<Value>, status: u16, body: Body) -> Self {
        Self {
            id,
            ok: true,
            status,
            body,
        }
    }

    /// An error answer.
    pub fn error(
        id: Option<Value>,
        status: u16,
        error: &'static str,
        message: String,
        retry_after_secs: Option<u64>,
    ) -> Self {
        Self {
            id,
            ok: false,
            status,
            body: Body::Error {
                error,
                message,
                retry_after_secs,
            },
        }
    }

    /// The answer to a service error.
    pub fn from_otp_error(id: Option<Value>, error: &OtpError) -> Self {
        Self::error(
            id,
            error.status(),
            error.code(),
            error.to_string(),
            error.retry_after_secs(),
        )
    }

    /// The answer to a request that could not be parsed.
    pub fn from_protocol_error(id: Option<Value>, error: ProtocolError) -> Self {
        Self::error(id, 400, error.error, error.message, None)
    }

    /// The line to write, with its `\n`.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("responses serialise");
        line.push(b'\n');
        line
    }
}

/// Formats wall-clock milliseconds as RFC 3339 UTC (`2026-11-26T09:05:00.123Z`).
pub fn timestamp(ms: crate::rules::Millis) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Envelope {
        parse(line.as_bytes())
    }

    fn error_of(line: &str) -> ProtocolError {
        parse_str(line).request.unwrap_err()
    }

    #[test]
    fn create_with_design_body() {
        let env = parse_str(
            r#"{"op":"create","id":7,"token":"123","to":{"messenger":"8192836451","sms":"+393331234567"}}"#,
        );
        assert_eq!(env.id, Some(Value::from(7)));
        let Request::Create(create) = env.request.unwrap() else {
            panic!()
        };
        assert_eq!(create.to.messenger.as_deref(), Some("8192836451"));
        assert_eq!(create.to.sms.as_deref(), Some("393331234567"));
    }

    #[test]
    fn create_with_tutorial_body_at_top_level_and_in_to() {
        for line in [
            r#"{"op":"create","token":"t","messengerId":"42","phoneNumber":"393331234567"}"#,
            r#"{"op":"create","token":"t","to":{"messengerId":42,"phoneNumber":"393331234567"}}"#,
        ] {
            let Request::Create(create) = parse_str(line).request.unwrap() else {
                panic!()
            };
            assert_eq!(create.to.messenger.as_deref(), Some("42"), "{line}");
            assert_eq!(create.to.sms.as_deref(), Some("393331234567"), "{line}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(error_of("{").error, "bad_json");
        assert_eq!(error_of("[1]").error, "bad_json");
        assert_eq!(error_of(" ").error, "bad_json");
        assert_eq!(error_of(r#"{"op":"fly"}"#).error, "unknown_op");
        for (line, field) in [
            (r#"{"token":"x"}"#, "op:"),
            (r#"{"op":"verify","token":"x"}"#, "code:"),
            (r#"{"op":"verify","token":5,"code":"1"}"#, "token:"),
            (
                r#"{"op":"create","token":"t","to":{"sms":"12"}}"#,
                "to.sms:",
            ),
            (
                r#"{"op":"create","token":"t","phoneNumber":"x"}"#,
                "phoneNumber:",
            ),
            (r#"{"op":"create","token":"t","ttl":5}"#, "ttl:"),
            (
                r#"{"op":"create","token":"t","to":{"email":"a"}}"#,
                "to.email:",
            ),
            (r#"{"op":"create","token":"t","ttl_secs":-1}"#, "ttl_secs:"),
            (
                r#"{"op":"create","token":"t","phoneNumber":"393331234567","to":{"sms":"393331234567"}}"#,
                "to.sms: given twice (also as phoneNumber)",
            ),
            (r#"{"op":"ping","op":"stats"}"#, "op: given twice"),
            (
                r#"{"op":"create","token":"t","to":{"sms":"393331234567","sms":"393331234568"}}"#,
                "to.sms: given twice",
            ),
            (r#"{"Op":"ping"}"#, "Op: unknown field"),
            (r#"{"token":"x","Op":"ping"}"#, "Op: unknown field"),
        ] {
            let error = error_of(line);
            assert_eq!(error.error, "bad_request", "{line}");
            assert!(
                error.message.starts_with(field),
                "{line}: {}",
                error.message
            );
        }
    }

    #[test]
    fn text_that_stops_being_json_inside_a_value_names_its_field() {
        let message = |text: &str| error_of(text).message;
        assert_eq!(
            message(r#"{"op":"create","token":"t","ttl_secs":1e400}"#),
            "request is not valid JSON: ttl_secs: number out of range at line 1 column 43"
        );
        assert!(
            message(r#"{"op":"create","to":{"sms":"1","messenger":"2}"#)
                .starts_with("request is not valid JSON: to.messenger: EOF while parsing"),
        );
        assert!(message(r#"{"a":[1,{"b":-}]}"#).starts_with("request is not valid JSON: a.1.b: "));
        // Half a surrogate pair, high or low, alone or before something else: otpd's words.
        let lone = "a \\u escape of a lone UTF-16 surrogate (\\ud800 to \\udfff), which is no \
                    character; expected a high-low pair (\\ud83d\\ude00) or UTF-8 text, at line 1";
        for (text, field) in [
            (r#"{"op":"create","id":"\ud800"}"#, "id"),
            (r#"{"op":"create","token":"\udc00x"}"#, "token"),
            (r#"{"op":"create","to":{"sms":"\ud83d\u0041"}}"#, "to.sms"),
        ] {
            let got = message(text);
            assert!(
                got.starts_with(&format!("request is not valid JSON: {field}: {lone}")),
                "{text}: {got}"
            );
        }
        // Bytes that are not UTF-8 are named as such, in the field they are in.
        let mut not_utf8 = br#"{"op":"ping","id":"x"}"#.to_vec();
        not_utf8[19] = 0xff;
        assert_eq!(
            parse(&not_utf8).request.unwrap_err().message,
            "request is not valid JSON: id: bytes that are not UTF-8 text, which JSON text \
             must be, at line 1 column 20"
        );
        // Outside any value there is no field to name: the position only.
        assert_eq!(
            message(r#"{"op":"ping"} x"#),
            "request is not valid JSON: trailing characters at line 1 column 15"
        );
    }

    /// A line of keys given twice, deep down: each was once passed up, its path
    /// rebuilt at every level (a 16 KiB line cost 0.67 GB of copying).
    #[test]
    fn of_many_repeated_keys_inside_a_value_only_the_first_is_passed_up() {
        let depth = 100;
        let mut text = "{\"k\":".repeat(depth);
        text.push('{');
        text.push_str(&vec![r#""a":0"#; 1000].join(","));
        text.push_str(&"}".repeat(depth + 1));
        let (_, duplicates) = parse_json(text.as_bytes()).unwrap();
        let path = format!("{}a", "k.".repeat(depth));
        assert_eq!(duplicates, vec![path]);
    }

    #[test]
    fn a_verify_request_in_a_log_line_shows_no_code() {
        let env = parse_str(r#"{"op":"verify","token":"t","code":"424242"}"#);
        let logged = format!("{:?}", env.request.unwrap());
        assert!(!logged.contains("424242"), "{logged}");
        assert_eq!(logged, r#"Verify { token: "t", code: *** }"#);
    }

    #[test]
    fn repeated_keys_are_found_at_any_depth_and_the_first_value_kept() {
        let parsed = |text: &str| parse_json(text.as_bytes()).unwrap();
        assert_eq!(
            parsed(r#"{"a":1,"b":[{"c":2,"c":3}],"a":4}"#).1,
            vec!["b.0.c", "a"],
            "in the order found"
        );
        let (value, duplicates) = parsed(r#"{"a":{"x":true,"x":null},"n":-1.5}"#);
        assert_eq!(duplicates, vec!["a.x"]);
        assert_eq!(value, serde_json::json!({"a": {"x": true}, "n": -1.5}));
        let text = r#"{"s":"é","u":18446744073709551615,"i":-9,"z":[],"o":{}}"#;
        let (value, duplicates) = parsed(text);
        assert!(duplicates.is_empty());
        assert_eq!(value, serde_json::from_str::<Value>(text).unwrap());
        assert!(parse_json(b"{\"a\":").is_err());
        // An id given twice is not echoed.
        let env = parse_str(r#"{"op":"ping","id":1,"id":2}"#);
        assert_eq!(env.id, None);
        assert_eq!(env.request.unwrap_err().message, "id: given twice");
        let env = parse_str(r#"{"op":"ping","op":"ping","id":1,"id":2}"#);
        assert_eq!(env.id, None, "not even after another key given twice");
        assert_eq!(env.request.unwrap_err().message, "op: given twice");
        let env = parse_str(r#"{"op":"ping","to":{"sms":"1","sms":"2"},"id":1,"id":2}"#);
        assert_eq!(env.id, None, "nor after a key given twice inside a value");
        assert_eq!(env.request.unwrap_err().message, "to.sms: given twice");
    }

    #[test]
    fn id_is_echoed_even_when_the_request_is_bad() {
        let env = parse_str(r#"{"op":"nope","id":"abc"}"#);
        assert_eq!(env.id, Some(Value::from("abc")));
        assert!(env.request.is_err());
        let env = parse_str(r#"{"op":"ping","id":[1]}"#);
        assert_eq!(env.id, None);
        assert!(env.request.unwrap_err().message.starts_with("id:"));
    }

    #[test]
    fn a_recipient_number_too_large_for_json_is_asked_for_as_a_string() {
        let create = |id: &str| {
            parse_str(&format!(
                r#"{{"op":"create","token":"t","messengerId":{id}}}"#
            ))
            .request
            .map(|_| ())
            .map_err(|error| error.message)
        };
        assert_eq!(
            create("12345678901234567890123456789012"),
            Err(
                "messengerId: is too large for a JSON number: send it as a string of digits".into()
            )
        );
        assert_eq!(
            create("1.5"),
            Err("messengerId: must be a string of digits".into())
        );
        assert_eq!(create("18446744073709551615"), Ok(()));
    }

    #[test]
    fn a_number_beyond_64_bits_is_called_too_large_not_fractional() {
        let create = |ttl: &str| {
            parse_str(&format!(
                r#"{{"op":"create","token":"t","phoneNumber":"393331234567","ttl_secs":{ttl}}}"#
            ))
            .request
            .map(|_| ())
            .map_err(|error| error.message)
        };
        assert_eq!(
            create("18446744073709551616"),
            Err("ttl_secs: is too large".into())
        );
        assert_eq!(
            create("1.5"),
            Err("ttl_secs: must be a whole number".into())
        );
        assert_eq!(create("-1"), Err("ttl_secs: must be a whole number".into()));
        assert_eq!(create("60"), Ok(()));
    }

    #[test]
    fn an_id_that_would_come_back_rounded_is_refused() {
        for id in ["18446744073709551616", "1e2", "1.5"] {
            let env = parse_str(&format!(r#"{{"op":"ping","id":{id}}}"#));
            assert_eq!(env.id, None, "{id}");
            assert!(env.request.unwrap_err().message.starts_with("id:"), "{id}");
        }
        for id in ["18446744073709551615", "-9223372036854775808", "0"] {
            let env = parse_str(&format!(r#"{{"op":"ping","id":{id}}}"#));
            assert_eq!(env.id.unwrap().to_string(), id);
        }
    }

    #[test]
    fn responses_serialise_flat() {
        let line = Response::ok(
            Some(Value::from(1)),
            200,
            Body::Verified { result: "valid" },
        )
        .to_line();
        assert_eq!(
            line,
            b"{\"id\":1,\"ok\":true,\"status\":200,\"result\":\"valid\"}\n"
        );
        let line =
            Response::error(None, 429, "rate_limited", "slow down".into(), Some(30)).to_line();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"ok\":false,\"status\":429,\"error\":\"rate_limited\",\"message\":\"slow down\",\"retry_after_secs\":30}\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(1_795_683_900_000), "2026-11-26T09:05:00Z");
        assert_eq!(timestamp(1_795_683_900_123), "2026-11-26T09:05:00.123Z");
    }
}
