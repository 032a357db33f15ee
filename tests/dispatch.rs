//! The `dispatch` backend against the strict Vonage stand-in: the workflow bodies,
//! retries, refusals, timeouts, the JWT, and what must never reach the log.

mod common;

use std::time::{Duration, Instant};

use common::vonage::{self, Reply, VonageStandIn};
use common::{Daemon, refused_start};
use serde_json::{Value, json};

const PSID: &str = "8192836451";
const PHONE: &str = "393331234567";

fn start(vonage: &VonageStandIn, section_extra: &str) -> Daemon {
    let (backend, delivery) = vonage.config("dispatch", section_extra);
    Daemon::start_with(
        // Ten-digit codes: no timestamp or id in the log matches one by chance.
        &format!("[otp]\nresend_cooldown_secs = 0\ncode_length = 10\n{backend}"),
        &delivery,
    )
}

fn create(daemon: &Daemon, token: &str, to: Value) -> Value {
    daemon.call(json!({"op": "create", "token": token, "to": to}))
}

fn messenger_step(code: &str, failover: bool) -> Value {
    let mut step = json!({
        "from": {"type": "messenger", "id": vonage::PAGE_ID},
        "to": {"type": "messenger", "id": PSID},
        "message": {
            "content": {"type": "text", "text": format!("{code} is your code. It expires in 5 minutes.")},
            "messenger": {"category": "response"},
        },
    });
    if failover {
        step["failover"] = json!({"expiry_time": 120, "condition_status": "read"});
    }
    step
}

/// The SMS step, whose text names the minutes the code has left when it goes out.
fn sms_step(code: &str, minutes_left: u64) -> Value {
    json!({
        "from": {"type": "sms", "number": vonage::SMS_FROM},
        "to": {"type": "sms", "number": PHONE},
        "message": {"content": {"type": "text", "text": format!("{code} is your code. It expires in {minutes_left} minutes.")}},
    })
}

/// Neither the code nor any part of the private key is in the daemon's log.
fn assert_log_is_clean(daemon: &Daemon, code: &str) {
    let log = daemon.stderr();
    assert!(!log.contains(code), "the code reached the log:\n{log}");
    assert!(!log.contains("PRIVATE KEY"), "the key reached the log");
    for line in vonage::PRIVATE_KEY
        .lines()
        .filter(|l| !l.starts_with("-----"))
    {
        assert!(!log.contains(line), "a line of the key reached the log");
    }
}

/// The code the stand-in was sent does not verify: nothing stayed live.
fn assert_not_live(daemon: &Daemon, token: &str, seen: &vonage::Seen) {
    assert_eq!(
        daemon.verify(token, &seen.code())["status"],
        404,
        "{token} is live"
    );
}

#[test]
fn both_channels_send_messenger_then_sms_and_keep_the_dispatch_uuid() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    let created = create(
        &daemon,
        "t1",
        json!({"messenger": PSID, "sms": format!("+{PHONE}")}),
    );
    assert_eq!(created["status"], 201, "{created}");
    assert_eq!(created["channels"], json!(["messenger", "sms"]));

    let seen = vonage.requests();
    assert_eq!(seen.len(), 1);
    let code = seen[0].code();
    assert_eq!(seen[0].path, "/v0.1/dispatch");
    // The SMS goes out 120 s after the Messenger message, with 3 of the 5 minutes left.
    assert_eq!(
        seen[0].body,
        json!({"template": "failover", "workflow": [messenger_step(&code, true), sms_step(&code, 3)]})
    );

    let status = daemon.call(json!({"op": "status", "token": "t1"}));
    assert_eq!(
        status["delivery"]["reference"],
        seen[0].uuid.clone().unwrap(),
        "{status}"
    );
    assert_eq!(daemon.verify("t1", &code)["status"], 200);

    let stats = daemon.stats();
    assert_eq!(stats["delivery_attempts"], 1, "{stats}");
    assert_eq!(stats["delivery_sent"], 1, "{stats}");
    assert_log_is_clean(&daemon, &code);
}

#[test]
fn a_short_lived_code_fails_over_within_its_life() {
    // 120 s configured; a code waits half its life: 61 s waits 30 (60 also would, so
    // a send a second late waits the same), 30 s Dispatch's minimum, 15 (a shorter one
    // is refused, tests/core.rs).
    for (ttl_secs, expiry_time) in [(61, 30), (31, 15), (30, 15)] {
        let vonage = VonageStandIn::start_expecting(vonage::Expect {
            failover_secs: expiry_time,
            ..vonage::Expect::default()
        });
        let daemon = start(&vonage, "failover_secs = 120");
        let created = daemon.call(json!({
            "op": "create", "token": "short", "ttl_secs": ttl_secs,
            "to": {"messenger": PSID, "sms": PHONE}
        }));
        assert_eq!(created["status"], 201, "{created}");
        let seen = vonage.requests();
        assert_eq!(
            seen[0].body["workflow"][0]["failover"],
            json!({"expiry_time": expiry_time, "condition_status": "read"}),
            "ttl_secs {ttl_secs}"
        );
    }
}

/// A send retried later waits for the read for half the time the code has left then,
/// so that its SMS still comes in time.
#[test]
fn a_retried_send_waits_for_the_read_half_the_time_left_then() {
    // 41 s: the first attempt waits 20 s for the read (with 41 or, a second late, 40
    // s left); the retry, 4 s later with 37 or 36 s left, waits 18 s.
    let vonage = VonageStandIn::start_expecting(vonage::Expect {
        failover_secs: 20,
        expiry_times: &[20, 18],
        ..vonage::Expect::default()
    });
    let daemon = start(&vonage, "failover_secs = 120");
    vonage.script(&[Reply::TooMany {
        retry_after_secs: 4,
    }]);
    let created = daemon.call(json!({
        "op": "create", "token": "late", "ttl_secs": 41,
        "to": {"messenger": PSID, "sms": PHONE}
    }));
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    let waits: Vec<&Value> = (seen.iter())
        .map(|s| &s.body["workflow"][0]["failover"]["expiry_time"])
        .collect();
    assert_eq!(waits, [&json!(20), &json!(18)]);
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [429, 202]
    );
}

#[test]
fn sms_only_is_a_one_step_workflow() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    let created = create(&daemon, "t2", json!({"sms": PHONE}));
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    let code = seen[0].code();
    assert_eq!(
        seen[0].body,
        json!({"template": "failover", "workflow": [sms_step(&code, 5)]})
    );
    assert_log_is_clean(&daemon, &code);
}

#[test]
fn messenger_only_is_a_one_step_workflow_without_failover() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    let created = daemon.call(json!({"op": "create", "token": "t3", "messengerId": PSID}));
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    let code = seen[0].code();
    assert_eq!(
        seen[0].body,
        json!({"template": "failover", "workflow": [messenger_step(&code, false)]})
    );
}

#[test]
fn overload_and_server_errors_are_retried_honouring_retry_after() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[
        Reply::ServerError,
        Reply::TooMany {
            retry_after_secs: 1,
        },
    ]);
    let created = create(&daemon, "t4", json!({"sms": PHONE}));
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [500, 429, 202]
    );
    assert!(
        seen[2].at - seen[1].at >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    assert_eq!(seen[0].body, seen[2].body, "a retry sends the same message");
    let stats = daemon.stats();
    assert_eq!(stats["delivery_attempts"], 3, "{stats}");
    assert_eq!(stats["delivery_sent"], 1, "{stats}");
    assert_eq!(daemon.verify("t4", &seen[2].code())["status"], 200);
}

/// A retried send names the minutes the code has left when the retry goes out, not
/// when the create came: the text is built again for each attempt.
#[test]
fn a_retried_send_names_the_minutes_left_then() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    // 62 s: the first attempt has 61 s left (2 minutes), the retry 3 s later 58 s
    // (1 minute).
    vonage.script(&[Reply::TooMany {
        retry_after_secs: 3,
    }]);
    let created = daemon.call(json!({
        "op": "create", "token": "t11", "ttl_secs": 62, "to": {"sms": PHONE}
    }));
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    let texts: Vec<&Value> = seen
        .iter()
        .map(|s| &s.body["workflow"][0]["message"]["content"]["text"])
        .collect();
    let code = seen[1].code();
    let text = |left: &str| format!("{code} is your code. It expires in {left}.");
    assert_eq!(texts, [&json!(text("2 minutes")), &json!(text("1 minute"))]);
}

#[test]
fn a_retry_after_beyond_30_s_answers_503_at_once() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::TooMany {
        retry_after_secs: 31,
    }]);
    let answer = create(&daemon, "t9", json!({"sms": PHONE}));
    assert_eq!(answer["error"], "delivery_unavailable", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("31 s"),
        "{answer}"
    );
    assert_eq!(
        vonage.requests().len(),
        1,
        "no retry the person would wait for"
    );
}

#[test]
fn a_stop_makes_no_further_retry() {
    let vonage = VonageStandIn::start();
    let mut daemon = start(&vonage, "");
    let busy = Reply::TooMany {
        retry_after_secs: 30,
    };
    vonage.script(&[busy.clone(), busy.clone(), busy.clone(), busy]);
    let mut conn = daemon.connect();
    let in_flight = std::thread::spawn(move || {
        conn.call(json!({"op": "create", "token": "stop", "to": {"sms": PHONE}}))
    });
    common::wait_for("the first attempt", || vonage.requests().len() == 1);
    // Three retries 30 s apart would hold the stop for 90 s.
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let answer = in_flight.join().unwrap();
    assert_eq!(answer["error"], "delivery_unavailable", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("otpd is stopping"),
        "{answer}"
    );
    assert!(daemon.wait_exit().success(), "{}", daemon.stderr());
    assert_eq!(vonage.requests().len(), 1);
}

#[test]
fn a_failed_delivery_still_counts_toward_the_cooldown() {
    let vonage = VonageStandIn::start();
    let (backend, delivery) = vonage.config("dispatch", "");
    // The default 30 s resend cooldown.
    let daemon = Daemon::start_with(&format!("[otp]\ncode_length = 10\n{backend}"), &delivery);
    vonage.script(&[Reply::Problem]);
    assert_eq!(create(&daemon, "c1", json!({"sms": PHONE}))["status"], 502);
    let again = create(&daemon, "c1", json!({"sms": PHONE}));
    assert_eq!(
        again["error"], "rate_limited",
        "the provider may have sent it: {again}"
    );
    assert_eq!(vonage.requests().len(), 1);
}

#[test]
fn a_messenger_id_without_messenger_from_is_a_bad_request_that_counts_no_send() {
    let vonage = VonageStandIn::start();
    // The default 30 s resend cooldown: a counted send would refuse the SMS create.
    let (backend, delivery) = vonage.config("dispatch", "messenger_from = \"\"");
    let daemon = Daemon::start_with(&format!("[otp]\ncode_length = 10\n{backend}"), &delivery);
    let answer = create(&daemon, "m1", json!({"messenger": PSID, "sms": PHONE}));
    assert_eq!(answer["status"], 400, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.starts_with("to.messenger: "), "{answer}");
    assert!(
        message.contains("delivery.dispatch.messenger_from"),
        "{answer}"
    );
    // Named as the client named it.
    let tutorial = daemon.call(json!({"op": "create", "token": "m2", "messengerId": PSID}));
    assert_eq!(tutorial["status"], 400, "{tutorial}");
    let message = tutorial["message"].as_str().unwrap();
    assert!(message.starts_with("messengerId: "), "{tutorial}");
    assert!(vonage.requests().is_empty(), "nothing sent");
    let sms_only = create(&daemon, "m1", json!({"sms": PHONE}));
    assert_eq!(sms_only["status"], 201, "SMS still works: {sms_only}");
}

#[test]
fn a_refused_connection_is_retried_then_answered_503() {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname};
    use std::os::fd::AsRawFd;
    // A port bound but not listening: connections to it are refused, and no other
    // test can take it meanwhile.
    let closed = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(closed.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    let port = getsockname::<SockaddrIn>(closed.as_raw_fd())
        .unwrap()
        .port();
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, &format!("api_url = \"http://127.0.0.1:{port}\""));
    let answer = create(&daemon, "refused", json!({"sms": PHONE}));
    assert_eq!(answer["status"], 503, "{answer}");
    assert_eq!(answer["error"], "delivery_unavailable");
    let stats = daemon.stats();
    assert_eq!(stats["delivery_attempts"], 3, "max_retries = 2: {stats}");
    assert_eq!(stats["delivery_unavailable"], 1, "{stats}");
    assert_eq!(stats["live"], 0, "{stats}");
}

#[test]
fn retries_exhausted_answer_503_and_nothing_stays_live() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::ServerError, Reply::ServerError, Reply::ServerError]);
    let answer = create(&daemon, "t5", json!({"messenger": PSID, "sms": PHONE}));
    assert_eq!(answer["status"], 503, "{answer}");
    assert_eq!(answer["error"], "delivery_unavailable");
    let seen = vonage.requests();
    assert_eq!(seen.len(), 3, "max_retries = 2: three attempts");
    assert_not_live(&daemon, "t5", &seen[0]);
    let stats = daemon.stats();
    assert_eq!(stats["live"], 0, "{stats}");
    assert_eq!(stats["delivery_unavailable"], 1, "{stats}");
    assert_eq!(stats["delivery_failed"], 1, "{stats}");
}

#[test]
fn a_refusal_answers_502_with_the_provider_detail_and_nothing_stays_live() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::Problem]);
    let answer = create(&daemon, "t6", json!({"messenger": PSID, "sms": PHONE}));
    assert_eq!(answer["status"], 502, "{answer}");
    assert_eq!(answer["error"], "delivery_failed");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("Bad Request"), "{message}");
    assert!(
        message.contains("The request failed due to validation errors"),
        "{message}"
    );
    let seen = vonage.requests();
    assert_eq!(seen.len(), 1, "a refusal is not retried");
    assert_not_live(&daemon, "t6", &seen[0]);
    assert_eq!(daemon.stats()["delivery_refused"], 1);
    assert_log_is_clean(&daemon, &seen[0].code());
}

/// Vonage took the message but its answer cannot be read: the message is out, so the
/// code must stand (refusing it would leave the person a code that answers 404).
#[test]
fn an_acceptance_without_an_id_keeps_the_code_under_a_local_reference() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::AcceptUnreadable]);
    let answer = create(&daemon, "t7", json!({"sms": PHONE}));
    assert_eq!(answer["status"], 201, "{answer}");
    let seen = vonage.requests();
    assert_eq!(seen.len(), 1, "an acceptance is not retried");
    let status = daemon.call(json!({"op": "status", "token": "t7"}));
    let reference = status["delivery"]["reference"].as_str().unwrap();
    assert!(reference.starts_with("unread-"), "{status}");
    assert_eq!(daemon.verify("t7", &seen[0].code())["status"], 200);
    assert_eq!(daemon.stats()["delivery_sent"], 1);
}

/// The connection fails after Vonage answered 202 but before its body ended: the
/// message is out, so it is not posted again (a second SMS), and the code stands.
#[test]
fn an_acceptance_whose_answer_breaks_off_is_not_sent_again() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::AcceptCutShort, Reply::Accept]);
    let answer = create(&daemon, "t7", json!({"sms": PHONE}));
    assert_eq!(answer["status"], 201, "{answer}");
    let seen = vonage.requests();
    assert_eq!(seen.len(), 1, "an acceptance is not retried");
    assert_eq!(daemon.verify("t7", &seen[0].code())["status"], 200);
    assert_eq!(daemon.stats()["delivery_sent"], 1);
}

#[test]
fn a_provider_echoing_the_request_gets_no_code_or_number_into_answers_or_logs() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::Echo(500), Reply::Echo(400)]);
    let answer = create(&daemon, "t8", json!({"messenger": PSID, "sms": PHONE}));
    assert_eq!(answer["status"], 502, "{answer}");
    let seen = vonage.requests();
    assert_eq!(seen.len(), 2, "the 500 was retried");
    let (message, log) = (answer["message"].as_str().unwrap(), daemon.stderr());
    assert!(
        message.contains("you sent"),
        "the provider's words stay: {message}"
    );
    assert!(
        log.contains("you sent"),
        "the retry and the failure are logged:\n{log}"
    );
    for secret in [seen[0].code(), seen[1].code(), PHONE.into(), PSID.into()] {
        assert!(
            !message.contains(&secret),
            "{secret} in the answer: {message}"
        );
        assert!(!log.contains(&secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn a_resend_that_fails_leaves_the_code_already_sent() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    let to = json!({"messenger": PSID, "sms": PHONE});
    assert_eq!(create(&daemon, "t7", to.clone())["status"], 201);
    vonage.script(&[Reply::Problem]);
    assert_eq!(create(&daemon, "t7", to)["status"], 502);
    let seen = vonage.requests();
    let (sent, failed) = (seen[0].code(), seen[1].code());
    assert_eq!(daemon.stats()["live"], 1);
    let status = daemon.call(json!({"op": "status", "token": "t7"}));
    assert_eq!(
        status["delivery"]["reference"],
        seen[0].uuid.clone().unwrap(),
        "{status}"
    );
    if failed != sent {
        assert_eq!(daemon.verify("t7", &failed)["status"], 404);
    }
    assert_eq!(daemon.verify("t7", &sent)["status"], 200);
}

/// While a resend is on its way its token may end: the code it replaced verifies, a
/// lock or a cancel ends the new code. The create then answers what ended it, not a
/// 201 promising a code that cannot verify.
#[test]
fn a_resend_whose_token_ended_on_the_way_does_not_answer_201() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    let wrong = "0000000000";
    for (token, end, status, error, sms) in [
        (
            "by-verify",
            "verify",
            409,
            "already_verified",
            "393331000001",
        ),
        ("by-lock", "lock", 429, "too_many_attempts", "393331000002"),
        ("by-cancel", "cancel", 410, "expired", "393331000003"),
    ] {
        let to = json!({ "sms": sms });
        assert_eq!(create(&daemon, token, to.clone())["status"], 201);
        let sent = vonage.requests().last().unwrap().code();
        vonage.hold();
        let mut resend = daemon.connect();
        resend.send(&json!({"op": "create", "token": token, "to": to}));
        common::wait_for("the resend to reach Vonage", || {
            !vonage.unanswered().is_empty()
        });
        match end {
            "verify" => assert_eq!(daemon.verify(token, &sent)["status"], 200),
            "lock" => {
                // The default max_attempts (5) wrong codes lock the token.
                let answers: Vec<Value> = (0..5)
                    .map(|_| daemon.verify(token, wrong)["status"].clone())
                    .collect();
                assert_eq!(answers.last(), Some(&json!(429)), "{answers:?}");
            }
            _ => assert_eq!(
                daemon.call(json!({"op": "cancel", "token": token}))["status"],
                200
            ),
        }
        vonage.release();
        let answer = resend.receive().expect("the resend's answer");
        assert_eq!(
            (&answer["status"], &answer["error"]),
            (&json!(status), &json!(error)),
            "{end}: {answer}"
        );
    }
    assert_eq!(daemon.stats()["live"], 0);
}

#[test]
fn a_crash_during_a_resend_leaves_the_code_already_sent_valid() {
    let vonage = VonageStandIn::start();
    let mut daemon = start(&vonage, "");
    let to = json!({"sms": PHONE});
    assert_eq!(create(&daemon, "t9", to.clone())["status"], 201);
    assert_eq!(create(&daemon, "other", to.clone())["status"], 201);
    let sent = vonage.requests()[0].code();
    vonage.hold();
    let mut resend = daemon.connect();
    resend.send(&json!({"op": "create", "token": "t9", "to": to}));
    common::wait_for("the resend to reach Vonage", || {
        !vonage.unanswered().is_empty()
    });
    // A write that waits for a flush puts the resend's new code on disk too.
    assert_eq!(daemon.verify("other", "0000000000")["status"], 404);
    daemon.kill();
    daemon.spawn();
    assert_eq!(
        daemon.verify("t9", &sent)["status"],
        200,
        "the code the person has still verifies"
    );
    assert_eq!(daemon.verify("t9", &sent)["status"], 409);
    assert_eq!(daemon.stats()["live"], 1, "the other token's code only");
}

#[test]
fn unauthorized_is_a_configuration_error() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::Unauthorized]);
    let answer = create(&daemon, "t7", json!({"sms": PHONE}));
    assert_eq!(answer["status"], 502, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("401"),
        "{answer}"
    );
    assert!(
        daemon.stderr().contains("configuration error"),
        "{}",
        daemon.stderr()
    );
}

/// A request that got no answer may have been taken: a retry could send the message
/// twice, so there is none, and the code stands, should the message arrive.
#[test]
fn a_provider_that_does_not_answer_times_out_into_503_without_a_retry() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    vonage.script(&[Reply::Hang, Reply::Hang, Reply::Hang]);
    let started = Instant::now();
    let answer = create(&daemon, "t8", json!({"sms": PHONE}));
    assert_eq!(answer["status"], 503, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("no answer within 1 s"), "{answer}");
    assert!(message.contains("not retried"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "timeout_secs = 1"
    );
    let sent = vonage.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(daemon.stats()["live"], 1);
    assert_eq!(daemon.verify("t8", &sent[0].code())["status"], 200);
}

#[test]
fn one_jwt_serves_many_requests() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    for token in ["j1", "j2", "j3"] {
        assert_eq!(create(&daemon, token, json!({"sms": PHONE}))["status"], 201);
    }
    let seen = vonage.requests();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|s| s.jwt == seen[0].jwt),
        "the token was re-signed"
    );
    // Renewal a minute before expiry is driven by a test clock in src/delivery/jwt.rs.
}

#[test]
fn creates_wait_for_vonage_in_parallel() {
    let vonage = VonageStandIn::start();
    let daemon = start(&vonage, "");
    // The stand-in holds every answer: all 16 creates must reach it at once, which
    // they could not if a create waiting on Vonage held up the others.
    vonage.hold();
    std::thread::scope(|scope| {
        for i in 0..16 {
            let daemon = &daemon;
            scope.spawn(move || {
                let answer = create(
                    daemon,
                    &format!("p{i}"),
                    json!({"sms": format!("3933312345{i:02}")}),
                );
                assert_eq!(answer["status"], 201, "{answer}");
            });
        }
        common::wait_for("16 creates waiting on Vonage together", || {
            vonage.unanswered().len() == 16
        });
        vonage.release();
    });
    assert_eq!(vonage.requests().len(), 16);
}

/// Requests sent in one write are answered in one write when they are quick; an
/// answer is not held back behind one that waits on Vonage.
#[test]
fn a_pipelined_answer_is_not_held_back_behind_a_create_waiting_on_vonage() {
    let vonage = VonageStandIn::start();
    // Vonage's answer is waited for longer than this test reads.
    let daemon = start(&vonage, "timeout_secs = 60");
    vonage.hold();
    let mut conn = daemon.connect();
    conn.send_raw(
        format!(
            "{{\"op\":\"ping\",\"id\":1}}\n{{\"op\":\"create\",\"id\":2,\"token\":\"t1\",\"to\":{{\"sms\":\"{PHONE}\"}}}}\n"
        )
        .as_bytes(),
    );
    // Before, the ping's answer waited in the write buffer for the create's, and
    // this read timed out.
    let ping = conn.receive().expect("the ping's answer");
    assert_eq!(ping["id"], 1, "{ping}");
    common::wait_for("the create waiting on Vonage", || {
        vonage.unanswered().len() == 1
    });
    vonage.release();
    let created = conn.receive().expect("the create's answer");
    assert_eq!(
        (created["id"].clone(), created["status"].clone()),
        (json!(2), json!(201))
    );
}

/// Starts the binary expecting it to refuse to start; returns its stderr.
fn start_up_error(vonage: &VonageStandIn, section_extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (backend, delivery) = vonage.config("dispatch", section_extra);
    let path = dir.path().join("otpd.toml");
    std::fs::write(&path, format!("[delivery]\n{delivery}\n{backend}")).unwrap();
    refused_start(&[
        "--config".as_ref(),
        path.as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_ref(),
    ])
}

#[test]
fn bad_settings_stop_start_up_naming_the_key() {
    let vonage = VonageStandIn::start();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    vonage::write_private(&junk, "not a key\n", 0o600);
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            format!("private_key_file = \"{}\"", junk.display()),
            "not an RSA private key",
        ),
        (
            format!("private_key_file = \"{}\"", missing.display()),
            "cannot read",
        ),
        (
            "failover_secs = 14".to_owned(),
            "delivery.dispatch.failover_secs",
        ),
        (
            "application_id = \"\"".to_owned(),
            "delivery.dispatch.application_id",
        ),
        (
            "messenger_category = \"message_tag\"".to_owned(),
            "delivery.dispatch.messenger_tag",
        ),
    ];
    for (extra, needle) in cases {
        // A later duplicate key would be a TOML error: replace the stand-in's line.
        let stderr = start_up_error(&vonage, &extra);
        assert!(stderr.contains(needle), "{extra}: {stderr}");
        assert!(
            !stderr.contains("MII"),
            "key material in the error: {stderr}"
        );
    }
}

#[test]
fn a_key_readable_by_others_starts_with_a_warning() {
    let vonage = VonageStandIn::start();
    let dir = tempfile::tempdir().unwrap();
    let open_key = dir.path().join("open.pem");
    vonage::write_private(&open_key, vonage::PRIVATE_KEY, 0o644);
    let daemon = start(
        &vonage,
        &format!("private_key_file = \"{}\"", open_key.display()),
    );
    assert!(
        daemon.stderr().contains("readable by group or others"),
        "{}",
        daemon.stderr()
    );
}
