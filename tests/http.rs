//! The HTTP listener through the real binary: the tutorial's REST contract byte for
//! byte, bad paths, methods and bodies, signed Vonage status webhooks filed on the code
//! and shown by the socket's `status`, `/metrics` as Prometheus text, and shutdown.
//!
//! Each daemon listens on `127.0.0.1:0`; the harness reads the bound address from the
//! daemon's log (see `Daemon::http_address`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Daemon;
use common::http::{Payload, SECRET, now_secs, post_signed, post_status, webhook_jwt};
use serde_json::{Value, json};

/// An HTTP listener on a free port, webhooks signed with [`SECRET`].
fn http_config(extra: &str) -> String {
    format!("[http]\nlisten = \"127.0.0.1:0\"\nwebhook_signature_secret = \"{SECRET}\"\n{extra}")
}

fn start(extra: &str) -> Daemon {
    Daemon::start(&http_config(extra))
}

const TUTORIAL_BODY: &[u8] = br#"{"messengerId": "8192836451", "phoneNumber": "393331234567"}"#;

/// Creates a code for `token` over HTTP with the tutorial's body; returns the code.
fn http_create(daemon: &Daemon, token: &str) -> String {
    let answer = daemon.http().post(&format!("/otp/{token}"), TUTORIAL_BODY);
    assert_eq!((answer.status, answer.text()), (201, "Created"));
    daemon.code_for(token)
}

/// A code of the default length that is not `code`.
fn wrong_code(code: &str) -> &'static str {
    if code == "000000" { "111111" } else { "000000" }
}

fn status_of(daemon: &Daemon, token: &str) -> Value {
    let status = daemon.call(json!({"op": "status", "token": token}));
    assert_eq!(status["status"], 200, "{status}");
    status
}

#[test]
fn tutorial_contract_byte_for_byte() {
    let daemon = start("");
    let http = daemon.http();

    let home = http.get("/");
    assert_eq!(
        (home.status, home.body.as_slice()),
        (200, &b"This is the OTP service"[..])
    );
    assert_eq!(home.header("content-type"), "text/plain; charset=utf-8");

    let created = http.post("/otp/123456789", TUTORIAL_BODY);
    assert_eq!((created.status, created.text()), (201, "Created"));
    assert_eq!(created.header("cache-control"), "no-store");
    let code = daemon.code_for("123456789");

    let answer = http.get(&format!("/otp/123456789/{}", wrong_code(&code)));
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (404, &b"Not found"[..])
    );
    let answer = http.get(&format!("/otp/123456789/{code}"));
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"OK"[..]));
    let answer = http.get(&format!("/otp/123456789/{code}"));
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (409, &b"The code has already been verified"[..])
    );

    // The same store as the socket: it sees the HTTP verify.
    let status = status_of(&daemon, "123456789");
    assert_eq!(status["state"], "verified");
    assert_eq!(status["channels"], json!(["messenger", "sms"]));

    // The verify path holds the code, yet only the log backend's line shows it.
    let log = daemon.stderr();
    let mentions: Vec<&str> = log.lines().filter(|l| l.contains(&code)).collect();
    assert_eq!(mentions.len(), 1, "{mentions:?}");
    assert!(mentions[0].contains("would send"));
}

#[test]
fn expired_code_answers_410() {
    let daemon = start("");
    let http = daemon.http();
    let created = http.post(
        "/otp/short-lived",
        br#"{"phoneNumber": "+393331234567", "ttl_secs": 1}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let code = daemon.code_for("short-lived");
    std::thread::sleep(Duration::from_millis(1100));
    let answer = http.get(&format!("/otp/short-lived/{code}"));
    assert_eq!((answer.status, answer.text()), (410, "The code is expired"));
}

#[test]
fn too_many_attempts_answers_429_with_retry_after() {
    let daemon = start("[otp]\nmax_attempts = 2\nlock_secs = 600\n");
    let http = daemon.http();
    let code = http_create(&daemon, "guessed");
    let wrong = wrong_code(&code);
    let answer = http.get(&format!("/otp/guessed/{wrong}"));
    assert_eq!((answer.status, answer.text()), (404, "Not found"));
    // The second wrong code locks the token; then even the right one is refused.
    for attempt in [wrong, code.as_str()] {
        let answer = http.get(&format!("/otp/guessed/{attempt}"));
        assert_eq!((answer.status, answer.text()), (429, "Too many attempts"));
        let retry: u64 = answer.header("retry-after").parse().unwrap();
        assert!((1..=600).contains(&retry), "{retry}");
    }
    // A create on the locked token is refused the same way.
    let answer = http.post("/otp/guessed", TUTORIAL_BODY);
    assert_eq!((answer.status, answer.text()), (429, "Too many attempts"));
}

/// `otpd_failures_total{reason="locked"}` counts locks, not the requests a lock
/// refuses, and its help text says so.
#[test]
fn a_lock_counts_once_in_the_failures_however_many_requests_it_refuses() {
    let daemon = start("[otp]\nmax_attempts = 2\nlock_secs = 600\n");
    let http = daemon.http();
    let code = http_create(&daemon, "locked-once");
    let wrong = wrong_code(&code);
    assert_eq!(http.get(&format!("/otp/locked-once/{wrong}")).status, 404);
    // The second wrong code locks; the right code and a create are refused by the lock.
    for attempt in [wrong, code.as_str()] {
        assert_eq!(http.get(&format!("/otp/locked-once/{attempt}")).status, 429);
    }
    assert_eq!(http.post("/otp/locked-once", TUTORIAL_BODY).status, 429);

    let text = http.get("/metrics").text().to_owned();
    let samples = parse_prometheus(&text);
    let failures = |reason| sample(&samples, "otpd_failures_total", &[("reason", reason)]);
    assert_eq!(failures("locked"), 1.0, "one lock");
    assert_eq!(
        failures("wrong_code"),
        1.0,
        "the 404; the locking guess counts as the lock"
    );
    let help = text
        .lines()
        .find(|line| line.starts_with("# HELP otpd_failures_total "))
        .unwrap();
    assert!(help.contains("once per lock, not per request"), "{help}");
}

#[test]
fn rate_limits_are_shared_with_the_socket() {
    let daemon = start("");
    let http = daemon.http();
    assert_eq!(http.post("/otp/tok-1", TUTORIAL_BODY).status, 201);
    // The resend cooldown counts the HTTP create against the socket's, and back.
    let socket =
        daemon.call(json!({"op": "create", "token": "tok-1", "to": {"sms": "393331234567"}}));
    assert_eq!(socket["error"], "rate_limited", "{socket}");
    let answer = http.post("/otp/tok-2", br#"{"phoneNumber": "393331234567"}"#);
    assert_eq!((answer.status, answer.text()), (429, "Too many requests"));
    let retry: u64 = answer.header("retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");

    // A code created on the socket verifies over HTTP, once.
    let code = daemon.create_code("from-socket", "393330000001");
    assert_eq!(http.get(&format!("/otp/from-socket/{code}")).status, 200);
    assert_eq!(daemon.verify("from-socket", &code)["status"], 409);
    assert_eq!(daemon.stats()["verified"], 1);
}

#[test]
fn bad_input_answers_400_naming_the_field() {
    let daemon = start("");
    let http = daemon.http();
    let cases: [(&str, &[u8], &str); 10] = [
        ("/otp/bad%20token", TUTORIAL_BODY, "token: "),
        ("/otp/t1", br#"{"phoneNumber": "12"}"#, "phoneNumber: "),
        ("/otp/t1", br#"{"messengerId": "abc"}"#, "messengerId: "),
        ("/otp/t1", b"{}", "messengerId, phoneNumber: "),
        ("/otp/t1", b"", "messengerId, phoneNumber: "),
        ("/otp/t1", b"not json", "body: "),
        ("/otp/t1", b"[1, 2]", "body: "),
        (
            "/otp/t1",
            br#"{"phoneNumber": "393331234567", "email": "a@b"}"#,
            "email: ",
        ),
        (
            "/otp/t1",
            br#"{"phoneNumber":"1","phoneNumber":"393331234598"}"#,
            "phoneNumber: given twice",
        ),
        (
            "/otp/t1",
            br#"{"to":{"sms":"393331234598"},"to":{"sms":"393331234599"}}"#,
            "to: given twice",
        ),
    ];
    for (path, body, prefix) in cases {
        let answer = http.post(path, body);
        assert_eq!(
            answer.status,
            400,
            "{path} {:?}",
            String::from_utf8_lossy(body)
        );
        assert!(
            answer.text().starts_with(prefix),
            "{path}: {:?} should start with {prefix:?}",
            answer.text()
        );
    }
    let answer = http.get("/otp/t1/12ab56");
    assert_eq!(answer.status, 400);
    assert!(answer.text().starts_with("code: "), "{}", answer.text());
    for (path, field) in [("/otp/t1/%zz", "code"), ("/otp/%zz/123456", "token")] {
        let answer = http.get(path);
        assert_eq!(
            (answer.status, answer.text()),
            (400, format!("{field}: bad percent-encoding").as_str())
        );
    }
    // Percent-encoded tokens are decoded, as Express did: `a%3Ab` is `a:b`.
    assert_eq!(http.post("/otp/a%3Ab", TUTORIAL_BODY).status, 201);
    assert_eq!(status_of(&daemon, "a:b")["state"], "pending");
}

#[test]
fn other_paths_404_and_other_methods_405() {
    let daemon = start("[otp]\nresend_cooldown_secs = 0\n");
    let http = daemon.http();
    for path in [
        "/nope",
        "/otp",
        "/otp/a/b/c",
        "/webhooks",
        "/metrics/x",
        "/otp//b",
        "/otp/a//",
    ] {
        let answer = http.get(path);
        assert_eq!((answer.status, answer.text()), (404, "Not found"), "{path}");
    }
    let cases = [
        ("POST", "/", "GET"),
        ("DELETE", "/otp/x", "POST"),
        ("GET", "/otp/x", "POST"),
        ("PUT", "/otp/x/123456", "GET"),
        ("POST", "/otp/x/123456", "GET"),
        ("GET", "/webhooks/status", "POST"),
        ("GET", "/webhooks/inbound", "POST"),
        ("POST", "/metrics", "GET"),
    ];
    for (method, path, allow) in cases {
        let answer = http.send(method, path, &[], Payload::empty());
        assert_eq!(
            (answer.status, answer.text()),
            (405, "Method not allowed"),
            "{method} {path}"
        );
        assert_eq!(answer.header("allow"), allow, "{method} {path}");
    }
    // A trailing slash is ignored, as by the tutorial's router; a query too.
    assert_eq!(http.get("/?x=1").text(), "This is the OTP service");
    assert_eq!(http.post("/otp/slash/", TUTORIAL_BODY).status, 201);

    // HEAD is not a GET without a body here: it must not verify a code.
    let code = http_create(&daemon, "head");
    let answer = http.send("HEAD", &format!("/otp/head/{code}"), &[], Payload::empty());
    assert_eq!((answer.status, answer.header("allow")), (405, "GET"));
    assert_eq!(
        http.get(&format!("/otp/head/{code}")).status,
        200,
        "still unverified"
    );
}

#[test]
fn oversized_bodies_answer_413() {
    let daemon = start("[server]\nmax_request_bytes = 1024\n");
    let http = daemon.http();
    // Exactly at the limit is fine (JSON padded with spaces).
    let mut body = br#"{"phoneNumber": "393331234567"}"#.to_vec();
    body.resize(1024, b' ');
    assert_eq!(http.post("/otp/at-limit", &body).status, 201);

    body.push(b' ');
    let answer = http.post("/otp/over-limit", &body);
    assert_eq!(
        (answer.status, answer.text()),
        (413, "Request body exceeds 1024 bytes")
    );
    let chunks = vec![vec![b' '; 600], vec![b' '; 600]];
    let answer = http.send("POST", "/otp/chunked", &[], Payload::Chunked(chunks));
    assert_eq!(
        answer.status, 413,
        "a chunked body is cut off at the limit too"
    );
    let answer = post_status(&daemon, &vec![b'x'; 2000], Some("Bearer x"));
    assert_eq!(answer.status, 413, "webhooks have the same limit");
    // Headers have the same limit, or 8 KiB if that is more.
    let long = "x".repeat(7000);
    let answer = http.send("GET", "/", &[("x-long", &long)], Payload::empty());
    assert_eq!(answer.status, 200);
    let longer = "x".repeat(9000);
    let answer = http.send("GET", "/", &[("x-long", &longer)], Payload::empty());
    assert_eq!(
        (answer.status, answer.text()),
        (431, "Header fields exceed 8192 bytes")
    );
    assert_eq!(daemon.stats()["created"], 1);
}

#[test]
fn over_long_urls_answer_414() {
    let daemon = start(""); // max_request_bytes: the default 16384
    let http = daemon.http();
    let url = |length: usize| format!("/?{}", "x".repeat(length - 2));
    assert_eq!(http.get(&url(8192)).status, 200, "a URL of 8 KiB is taken");
    let answer = http.get(&url(8193));
    assert_eq!(
        (answer.status, answer.text()),
        (414, "URL exceeds 8192 bytes")
    );
    // The URL's room is its own: full header fields beside it are still measured apart.
    let fields = "x".repeat(16_000);
    let answer = http.send(
        "GET",
        &url(12_000),
        &[("x-long", &fields)],
        Payload::empty(),
    );
    assert_eq!(answer.status, 414);
    let answer = http.send("GET", &url(8192), &[("x-long", &fields)], Payload::empty());
    assert_eq!(answer.status, 200);
    assert_eq!(http.get("/").status, 200);
}

#[test]
fn signed_status_webhooks_are_recorded_and_shown_by_status() {
    let daemon = start("");
    let http = daemon.http();
    http_create(&daemon, "watched");
    let reference = daemon.reference_for("watched");
    assert!(reference.starts_with("log-"), "{reference}");
    assert_eq!(
        status_of(&daemon, "watched")["delivery"],
        json!({"reference": reference, "events": []})
    );

    // A Messages API status: the reference is the message_uuid. Sent twice, as Vonage
    // does when it missed the 200: recorded once.
    let delivered = json!({
        "message_uuid": reference, "to": "393331234567", "from": "OTP", "channel": "sms",
        "timestamp": "2026-11-26T09:05:00Z", "status": "delivered",
        "usage": {"currency": "EUR", "price": "0.0333"}
    });
    for _ in 0..2 {
        let answer = post_signed(&daemon, &delivered);
        assert_eq!((answer.status, answer.text()), (200, "OK"));
    }

    // A Dispatch per-message status: filed by its workflow's dispatch_uuid.
    let answer = post_signed(
        &daemon,
        &json!({
            "message_uuid": "0f4d6b8e-0000-4000-8000-000000000001",
            "to": {"type": "messenger", "id": "8192836451"},
            "from": {"type": "messenger", "id": "1234"},
            "timestamp": "2026-11-26T09:05:01.500Z", "status": "rejected",
            "error": {"code": 1300, "reason": "Not part of the provider network"},
            "_links": {"workflow": {"dispatch_uuid": reference, "href": "https://x"}}
        }),
    );
    assert_eq!(answer.status, 200);

    // Dispatch's final report.
    let answer = post_signed(
        &daemon,
        &json!({
            "dispatch_uuid": reference, "template": "failover", "status": "completed",
            "timestamp": "2026-11-26T09:05:02Z", "usage": {"price": "0.05", "currency": "EUR"},
            "_links": {"messages": [
                {"message_uuid": "a", "href": "x", "channel": "messenger", "status": "rejected"},
                {"message_uuid": "b", "href": "y", "channel": "sms", "status": "delivered"}
            ]}
        }),
    );
    assert_eq!(answer.status, 200);

    // Unknown ids are acknowledged and dropped, unless the report is recent: then its
    // message may still be on its way back from Vonage to otpd, and Vonage retries a 503.
    // A timestamp far in the future is not recent: it would be answered 503 until then.
    let unknown = |timestamp: Option<jiff::Timestamp>| {
        let mut body = json!({"message_uuid": "unknown", "status": "read", "channel": "messenger"});
        if let Some(at) = timestamp {
            body["timestamp"] = json!(at.to_string());
        }
        post_signed(&daemon, &body)
    };
    let minute_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    let in_2030 = "2030-01-01T00:00:00Z".parse().unwrap();
    for old in [None, Some(minute_ago), Some(in_2030)] {
        let answer = unknown(old);
        assert_eq!((answer.status, answer.text()), (200, "OK"), "{old:?}");
    }
    let answer = unknown(Some(jiff::Timestamp::now()));
    assert_eq!(
        (answer.status, answer.header("retry-after"), answer.text()),
        (503, "60", "Unknown delivery id, retry later")
    );

    let delivery = &status_of(&daemon, "watched")["delivery"];
    assert_eq!(
        delivery,
        &json!({
            "reference": reference,
            "events": [
                {"at": "2026-11-26T09:05:00Z", "status": "delivered", "channel": "sms"},
                {"at": "2026-11-26T09:05:01.5Z", "status": "rejected", "channel": "messenger",
                 "detail": "1300: Not part of the provider network"},
                {"at": "2026-11-26T09:05:02Z", "status": "completed",
                 "detail": "messenger rejected, sms delivered"}
            ]
        })
    );

    let samples = parse_prometheus(http.get("/metrics").text());
    let outcome = |name| sample(&samples, "otpd_webhooks_total", &[("outcome", name)]);
    assert_eq!(
        ["recorded", "duplicate", "unknown_id", "early"].map(outcome),
        [3.0, 1.0, 3.0, 1.0]
    );

    let answer = http.post("/webhooks/inbound", br#"{"anything": true}"#);
    assert_eq!((answer.status, answer.text()), (200, "OK"));

    // A signed body that is no status report is refused, and not retried (4xx).
    let answer = post_signed(&daemon, &json!({"hello": "world"}));
    assert_eq!(answer.status, 400);

    // Nor is a report of a status otpd records itself: a failover_sent would file the
    // reference in its detail under the code.
    for status in ["failover_sent", "failover_failed"] {
        let answer = post_signed(
            &daemon,
            &json!({
                "message_uuid": reference, "status": status, "channel": "sms",
                "timestamp": "2026-11-26T09:06:00Z", "error": {"title": "forged-ref"}
            }),
        );
        assert_eq!(answer.status, 400, "{status}");
        assert!(
            answer.text().starts_with("body: status: "),
            "{}",
            answer.text()
        );
    }
    let forged = json!({"message_uuid": "forged-ref", "status": "read", "timestamp": "2026-11-26T09:07:00Z"});
    assert_eq!(post_signed(&daemon, &forged).status, 200);
    assert_eq!(
        &status_of(&daemon, "watched")["delivery"],
        delivery,
        "unchanged"
    );
}

#[test]
fn badly_signed_webhooks_are_refused_and_logged() {
    let daemon = start("");
    assert_eq!(
        daemon.http().post("/otp/guarded", TUTORIAL_BODY).status,
        201
    );
    let reference = daemon.reference_for("guarded");
    let body =
        json!({"message_uuid": reference, "status": "read", "channel": "messenger"}).to_string();
    let body = body.as_bytes();
    let now = now_secs();

    let cases: [(&str, String, &[u8]); 6] = [
        (
            "wrong secret",
            format!("Bearer {}", webhook_jwt("another-secret", body, now)),
            body,
        ),
        (
            "tampered body",
            format!("Bearer {}", webhook_jwt(SECRET, body, now)),
            br#"{"message_uuid":"x","status":"read"}"#,
        ),
        (
            "iat more than a day old",
            format!(
                "Bearer {}",
                webhook_jwt(SECRET, body, now - 24 * 3600 - 600)
            ),
            body,
        ),
        (
            "iat from the future",
            format!("Bearer {}", webhook_jwt(SECRET, body, now + 600)),
            body,
        ),
        ("not a JWT", "Bearer not.a.jwt".into(), body),
        ("not Bearer", "Basic dXNlcjpwYXNz".into(), body),
    ];
    for (what, authorization, sent) in &cases {
        let answer = post_status(&daemon, sent, Some(authorization));
        assert_eq!(
            (answer.status, answer.text()),
            (401, "Unauthorized"),
            "{what}"
        );
    }
    assert!(
        daemon.stderr().contains("refused a status webhook"),
        "{}",
        daemon.stderr()
    );
    let samples = parse_prometheus(daemon.http().get("/metrics").text());
    let unauthorized = sample(
        &samples,
        "otpd_webhooks_total",
        &[("outcome", "unauthorized")],
    );
    assert_eq!(unauthorized, cases.len() as f64);

    // Unsigned: 503 so that Vonage retries it (signed, one hopes).
    let answer = post_status(&daemon, body, None);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), "60");

    assert_eq!(
        status_of(&daemon, "guarded")["delivery"]["events"],
        json!([])
    );
    assert!(
        !daemon.stderr().contains(SECRET),
        "the secret reached the log"
    );

    // The same callback, signed right, is accepted, even with a token made hours ago:
    // Vonage's retries (for up to a day) may carry the first attempt's.
    let bearer = format!("Bearer {}", webhook_jwt(SECRET, body, now - 6 * 3600));
    assert_eq!(post_status(&daemon, body, Some(&bearer)).status, 200);
    assert_eq!(
        status_of(&daemon, "guarded")["delivery"]["events"][0]["status"],
        "read"
    );
}

#[test]
fn a_forged_jwt_header_cannot_write_a_line_of_its_own_into_the_log() {
    let daemon = start("");
    let forged = "2026-11-26T09:05:00Z  INFO otpd: FORGED admin logged in";
    let header = json!({"alg": format!("HS256\n{forged}"), "typ": "JWT"}).to_string();
    let body = br#"{"message_uuid":"m","status":"read"}"#;
    let claims = json!({"iat": now_secs(), "payload_hash": common::http::sha256_hex(body)});
    let token = [header.as_bytes(), claims.to_string().as_bytes(), b"sig"]
        .map(common::http::base64url)
        .join(".");
    let answer = post_status(&daemon, body, Some(&format!("Bearer {token}")));
    assert_eq!((answer.status, answer.text()), (401, "Unauthorized"));
    let log = daemon.stderr();
    assert!(
        !log.lines().any(|line| line.starts_with(forged)),
        "a forged line: {log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("refused a status webhook")
                && line.contains("reason=\"JWT: malformed\"")),
        "the refusal is logged: {log}"
    );
}

/// The `held_back` of each of the daemon's log lines that contain `what`.
fn held_back_counts(daemon: &Daemon, what: &str) -> Vec<u64> {
    daemon
        .stderr()
        .lines()
        .filter(|line| line.contains(what))
        .map(|line| {
            let (_, count) = line.rsplit_once("held_back=").expect("held_back");
            count.trim().parse().expect("a count")
        })
        .collect()
}

#[test]
fn a_flood_of_refused_webhooks_is_logged_once_a_second_and_counted_in_full() {
    const FLOOD: u64 = 300;
    let daemon = start("");
    let body = br#"{"message_uuid":"m","status":"read"}"#;
    let bearer = format!("Bearer {}", webhook_jwt("another-secret", body, now_secs()));
    let headers = [("authorization", bearer.as_str())];
    let http = daemon.http();
    let mut connection = http.connect();
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let answer = connection.send(
            "POST",
            "/webhooks/status",
            &headers,
            Payload::Sized(body.to_vec()),
        );
        assert_eq!(answer.status, 401);
    }
    // One line for each wall-clock second the flood touched, at most.
    let lines = held_back_counts(&daemon, "refused a status webhook").len() as u64;
    assert!(
        (1..=started.elapsed().as_secs() + 2).contains(&lines),
        "{lines} lines in {:?}",
        started.elapsed()
    );

    // The next second's refusal is logged, and counts those held back since the last.
    std::thread::sleep(Duration::from_millis(1100));
    let answer = post_status(&daemon, body, Some(&bearer));
    assert_eq!(answer.status, 401);
    let held_back = held_back_counts(&daemon, "refused a status webhook");
    assert_eq!(held_back.len() as u64, lines + 1);
    let logged_or_held_back: u64 = held_back.iter().map(|held| held + 1).sum();
    assert_eq!(logged_or_held_back, FLOOD + 1, "{held_back:?}");

    let samples = parse_prometheus(http.get("/metrics").text());
    let unauthorized = sample(
        &samples,
        "otpd_webhooks_total",
        &[("outcome", "unauthorized")],
    );
    assert_eq!(unauthorized, (FLOOD + 1) as f64);
}

#[test]
fn without_a_secret_every_webhook_is_refused() {
    let daemon = Daemon::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    assert!(daemon.stderr().contains("status webhooks will be refused"));
    let body = br#"{"message_uuid":"m","status":"read"}"#;
    let bearer = format!("Bearer {}", webhook_jwt("", body, now_secs()));
    let answer = post_status(&daemon, body, Some(&bearer));
    assert_eq!(answer.status, 401);
}

#[test]
fn the_webhook_secret_may_come_as_a_systemd_credential() {
    let mut daemon = Daemon::prepare("", "[http]\nlisten = \"127.0.0.1:0\"\n", "");
    let credentials = daemon.dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(
        credentials.join("otpd-webhook-secret"),
        format!("{SECRET}\n"),
    )
    .unwrap();
    let mut command = daemon.serve_command();
    command.env("CREDENTIALS_DIRECTORY", &credentials);
    daemon.launch(command);
    daemon.wait_until_ready();
    assert!(!daemon.stderr().contains("webhooks will be refused"));
    let body = br#"{"message_uuid":"m","status":"read"}"#;
    let bearer = format!("Bearer {}", webhook_jwt(SECRET, body, now_secs()));
    let answer = post_status(&daemon, body, Some(&bearer));
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// A sample's labels, sorted by name.
type Labels = Vec<(String, String)>;

/// Prometheus samples: value by name and labels.
type Samples = BTreeMap<(String, Labels), f64>;

/// A strict reader of Prometheus' text format 0.0.4: `# HELP` / `# TYPE` before their
/// family's samples, each family once and contiguous, valid names, quoted label values,
/// numeric values, histograms with cumulative buckets ending in `+Inf` = `_count`.
fn parse_prometheus(text: &str) -> Samples {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    fn labels(s: &str) -> Labels {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (name, after) = rest.split_once("=\"").expect("label=\"value\"");
            assert!(is_name(name, false), "label name {name:?}");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c}"),
                    },
                    (_, c) => value.push(c),
                }
            };
            out.push((name.to_owned(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or_else(|| {
                assert!(rest.is_empty(), "junk after label: {rest:?}");
                rest
            });
        }
        out.sort();
        out
    }

    assert!(text.ends_with('\n'), "text must end with a newline");
    let mut samples = Samples::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            assert!(
                is_name(name, true) && !helped.contains(&name.to_owned()),
                "{line}"
            );
            helped.push(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family {name} declared twice"
            );
            current = Some(name.to_owned());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels(rest.strip_suffix('}').expect("closing }"))),
            None => (series, Vec::new()),
        };
        assert!(is_name(name, true), "metric name {name:?}");
        let family = current.as_deref().expect("a sample before any TYPE");
        let belongs = name == family
            || (types[family] == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(family)));
        assert!(belongs, "sample {name} outside its family {family}");
        if name.ends_with("_total") || types[family] == "counter" {
            assert!(value >= 0.0, "{line}");
        }
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "duplicate sample {line}"
        );
    }
    // Histograms: cumulative buckets, +Inf equal to _count.
    for (family, _) in types.iter().filter(|(_, kind)| *kind == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), value) in &samples {
            if *name == bucket {
                let le = labels.iter().find(|(k, _)| k == "le").expect("le label");
                let bound = if le.1 == "+Inf" {
                    f64::INFINITY
                } else {
                    le.1.parse().unwrap()
                };
                let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                series.entry(rest).or_default().push((bound, *value));
            }
        }
        assert!(!series.is_empty(), "histogram {family} has no buckets");
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} not cumulative"
            );
            let (last_bound, last_count) = *buckets.last().unwrap();
            assert_eq!(last_bound, f64::INFINITY, "{family} lacks +Inf");
            let count = samples[&(format!("{family}_count"), labels.clone())];
            assert_eq!(last_count, count, "{family}: +Inf bucket != _count");
            assert!(samples.contains_key(&(format!("{family}_sum"), labels)));
        }
    }
    samples
}

fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    key.sort();
    *samples
        .get(&(name.to_owned(), key))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let daemon = start("");
    let http = daemon.http();
    let code = http_create(&daemon, "m1");
    assert_eq!(
        http.get(&format!("/otp/m1/{}", wrong_code(&code))).status,
        404
    );
    assert_eq!(http.get(&format!("/otp/m1/{code}")).status, 200);
    let reference = daemon.reference_for("m1");
    post_signed(
        &daemon,
        &json!({"message_uuid": reference, "status": "read"}),
    );
    post_status(&daemon, b"{}", None);
    for _ in 0..3 {
        daemon.call(json!({"op": "ping"}));
    }

    let answer = http.get("/metrics");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let samples = parse_prometheus(answer.text());
    assert_eq!(sample(&samples, "otpd_codes_created_total", &[]), 1.0);
    assert_eq!(sample(&samples, "otpd_codes_verified_total", &[]), 1.0);
    assert_eq!(sample(&samples, "otpd_live_codes", &[]), 0.0);
    assert_eq!(
        sample(
            &samples,
            "otpd_delivery_events_total",
            &[("status", "read")]
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, "otpd_webhooks_total", &[("outcome", "recorded")]),
        1.0
    );
    assert_eq!(
        sample(&samples, "otpd_webhooks_total", &[("outcome", "unsigned")]),
        1.0
    );
    // The socket's pings (and the harness's readiness ping) were timed…
    let socket = sample(
        &samples,
        "otpd_request_duration_seconds_count",
        &[("listener", "socket")],
    );
    assert!(socket >= 4.0, "{socket}");
    // …and so was every HTTP request before this one.
    let http_count = sample(
        &samples,
        "otpd_request_duration_seconds_count",
        &[("listener", "http")],
    );
    assert!(http_count >= 5.0, "{http_count}");

    // README.md's table names every family.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
    let readme = readme.unwrap();
    for line in answer.text().lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            let name = family.split_whitespace().next().unwrap();
            let named = [
                format!("| `{name}`"),
                format!("| `{name}{{"),
                format!(", `{name}`"),
            ];
            assert!(
                named.iter().any(|cell| readme.contains(cell.as_str())),
                "{name} is missing from README.md's metrics table"
            );
        }
    }
}

#[test]
fn unix_socket_listener() {
    let daemon = Daemon::start("[http]\nlisten = \"unix:{dir}/http.sock\"\n");
    let address = daemon.http_address();
    assert_eq!(
        address,
        format!("unix:{}/http.sock", daemon.dir.path().display())
    );
    let http = daemon.http();
    assert_eq!(http.get("/").text(), "This is the OTP service");
    assert_eq!(http.post("/otp/over-unix", TUTORIAL_BODY).status, 201);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(daemon.dir.path().join("http.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "server.socket_mode applies");
}

#[test]
fn the_allow_lists_cover_a_unix_socket_listener() {
    let uid = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start(&format!(
        "[server]\nallowed_uids = [{}]\n[http]\nlisten = \"unix:{{dir}}/http.sock\"\n",
        uid + 1
    ));
    let http = daemon.http();
    let answer = http.get("/");
    assert_eq!(
        (answer.status, answer.text()),
        (403, "This user may not use otpd")
    );
    assert_eq!(http.post("/otp/refused", TUTORIAL_BODY).status, 403);
    // Logged as the socket logs its refusals: naming the peer, at most once a second.
    let refusals = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("refused a peer") && line.contains("listener=\"http\""))
            .map(str::to_owned)
            .collect()
    };
    let log = daemon.stderr();
    assert!(!refusals(&log).is_empty(), "{log}");
    assert!(
        refusals(&log)
            .iter()
            .all(|line| line.contains(&format!("uid={uid}")))
    );
    assert!(!log.contains("would send"), "nothing was created: {log}");
    for _ in 0..50 {
        assert_eq!(http.get("/").status, 403);
    }
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(http.get("/").status, 403);
    let lines = refusals(&daemon.stderr());
    assert!(lines.len() < 20, "{} lines for 53 refusals", lines.len());
    assert!(
        lines.iter().any(|line| !line.contains("held_back=0")),
        "a later line counts those held back: {lines:?}"
    );

    // A refused peer that sends nothing is answered at once, and holds no slot.
    use std::io::Read;
    let mut silent =
        std::os::unix::net::UnixStream::connect(daemon.dir.path().join("http.sock")).unwrap();
    silent.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nThis user may not use otpd"),
        "{answer}"
    );
}

#[test]
fn shutdown_closes_kept_alive_connections_and_exits_cleanly() {
    let mut daemon = start("");
    let http = daemon.http();
    let mut connection = http.connect();
    let answer = connection.send("GET", "/", &[], Payload::empty());
    assert_eq!(answer.status, 200);
    let answer = connection.send(
        "POST",
        "/otp/kept",
        &[],
        Payload::Sized(TUTORIAL_BODY.to_vec()),
    );
    assert_eq!(answer.status, 201, "keep-alive serves a second request");
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    assert!(daemon.stderr().contains("stopped"));
    assert!(
        connection.closed_by_the_server(),
        "the kept-alive connection is closed"
    );
}

#[test]
fn shutdown_answers_the_http_request_in_hand() {
    let vonage = common::vonage::VonageStandIn::start();
    let (backend, delivery) = vonage.config("dispatch", "");
    let mut daemon = Daemon::start_with(
        &http_config(&format!("[otp]\ncode_length = 10\n{backend}")),
        &delivery,
    );
    let client = daemon.http();
    vonage.hold();
    let in_hand = std::thread::spawn(move || client.post("/otp/in-hand", TUTORIAL_BODY));
    common::wait_for("the create to reach Vonage", || {
        !vonage.unanswered().is_empty()
    });
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    vonage.release();
    let answer = in_hand.join().unwrap();
    assert_eq!((answer.status, answer.text()), (201, "Created"));
    assert!(daemon.wait_exit().success(), "{}", daemon.stderr());
    assert_eq!(vonage.requests().len(), 1);
}

/// Sends a create for `token` on a raw connection and leaves it open, unanswered.
fn send_create_unanswered(daemon: &Daemon, token: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(daemon.http_address()).unwrap();
    let head = format!(
        "POST /otp/{token} HTTP/1.1\r\nHost: otpd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        TUTORIAL_BODY.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(TUTORIAL_BODY).unwrap();
    stream
}

#[test]
fn a_client_that_hangs_up_does_not_cut_its_create_short() {
    let vonage = common::vonage::VonageStandIn::start();
    let (backend, delivery) = vonage.config("dispatch", "");
    let daemon = Daemon::start_with(
        &http_config(&format!("[otp]\nresend_cooldown_secs = 0\n{backend}")),
        &delivery,
    );
    let first =
        daemon.call(json!({"op": "create", "token": "hung-up", "to": {"sms": "393331234567"}}));
    assert_eq!(first["status"], 201, "{first}");
    let first_code = vonage.requests()[0].code();
    let first_reference = status_of(&daemon, "hung-up")["delivery"]["reference"].clone();
    assert!(first_reference.is_string(), "{first_reference}");

    // A second create reaches Vonage, its client hangs up, and Vonage then refuses it.
    vonage.script(&[common::vonage::Reply::Problem]);
    vonage.hold();
    let stream = send_create_unanswered(&daemon, "hung-up");
    common::wait_for("the second create to reach Vonage", || {
        !vonage.unanswered().is_empty()
    });
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(stream);
    vonage.release();

    // The create still ends as it would have: the refused code is dropped and the
    // first one stands, with its delivery record.
    common::wait_for("the refused code to be dropped", || {
        status_of(&daemon, "hung-up")["delivery"]["reference"] == first_reference
    });
    assert_eq!(vonage.requests().len(), 2);
    assert_eq!(daemon.verify("hung-up", &first_code)["status"], 200);
}

#[test]
fn requests_whose_clients_hung_up_still_count_toward_max_connections() {
    let vonage = common::vonage::VonageStandIn::start();
    // Held longer than the 1 s the stand-in's config gives an attempt, a create would
    // end unanswered (503) and free its slot.
    let (backend, delivery) = vonage.config("dispatch", "timeout_secs = 30\n");
    let daemon = Daemon::start_with(
        &http_config(&format!(
            "[server]\nmax_connections = 2\n[otp]\nresend_cooldown_secs = 0\n{backend}"
        )),
        &delivery,
    );
    vonage.hold();
    for i in 0..5 {
        let stream = send_create_unanswered(&daemon, &format!("bounded-{i}"));
        stream.shutdown(std::net::Shutdown::Both).unwrap();
    }
    common::wait_for("two creates to reach Vonage", || {
        vonage.unanswered().len() == 2
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        vonage.requests().len() + vonage.unanswered().len(),
        2,
        "no more creates under way than max_connections"
    );
    vonage.release();
    common::wait_for("the other three, one slot at a time", || {
        vonage.requests().len() == 5
    });
}

#[test]
fn clients_that_never_read_their_answers_do_not_keep_others_out() {
    use std::io::{ErrorKind, Write};
    let daemon = start("[server]\nmax_connections = 2\nidle_timeout_secs = 1\n");
    // Each sends requests until its socket takes no more: the daemon's answers then
    // fill the buffers on their way back, and its writes wait for a reader.
    let requests = b"GET / HTTP/1.1\r\nHost: otpd\r\n\r\n".repeat(1000);
    let stalled: Vec<_> = (0..2)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(daemon.http_address()).unwrap();
            stream.set_nonblocking(true).unwrap();
            let mut refused_in_a_row = 0;
            while refused_in_a_row < 3 {
                match stream.write(&requests) {
                    Ok(_) => refused_in_a_row = 0,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        refused_in_a_row += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("writing requests: {e}"),
                }
            }
            stream
        })
        .collect();
    // Both slots are taken by writes nobody reads, until the idle timeout ends them.
    assert_eq!(daemon.http().get("/").status, 200);
    drop(stalled);
}

#[test]
fn a_request_that_never_comes_whole_does_not_hold_the_stop() {
    use std::io::Write;
    // An hour of idle timeout: only the shutdown grace can end these connections.
    let mut daemon = start("[server]\nidle_timeout_secs = 3600\n");
    let mut one_byte = std::net::TcpStream::connect(daemon.http_address()).unwrap();
    one_byte.write_all(b"G").unwrap();
    let mut half_body = std::net::TcpStream::connect(daemon.http_address()).unwrap();
    half_body
        .write_all(b"POST /otp/half HTTP/1.1\r\nHost: otpd\r\nContent-Length: 100\r\n\r\n{\"phone")
        .unwrap();
    // Both are in the daemon's hands before it is told to stop.
    assert_eq!(daemon.http().get("/").status, 200);
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

#[test]
fn http_is_off_by_default_and_a_taken_port_stops_start_up() {
    let daemon = start("");
    let plain = Daemon::start("");
    assert!(!plain.stderr().contains("HTTP listener"));

    // A second daemon configured for the first one's port refuses to start, naming
    // the key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("otpd.toml");
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"{}\"\n", daemon.http_address()),
    )
    .unwrap();
    let stderr = common::refused_start(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert!(stderr.contains("http.listen"), "{stderr}");
}
