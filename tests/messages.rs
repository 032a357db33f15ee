//! The `messages` backend against the strict Vonage stand-in, with status webhooks
//! signed and posted by the test to the daemon's HTTP listener: the Messenger message
//! carrying Vonage's own failover, and otpd's read-timeout SMS — sent exactly once at
//! the deadline, never after a read, a verify, a cancel or Vonage's own failover, and
//! neither lost nor repeated across a restart.

mod common;

use std::time::{Duration, Instant};

use common::http::{SECRET, post_signed};
use common::vonage::{self, Expect, Reply, Seen, VonageStandIn};
use common::{Daemon, Engine, OwnedRedis, PATIENCE};
use serde_json::{Value, json};

const PSID: &str = "8192836451";
const PHONE: &str = "393331234567";
/// The shortest deadline the config allows, so the tests wait as little as possible.
const FAILOVER_SECS: u64 = 15;
/// Longer than a failover's claim lasts with `max_retries = 0`: one attempt (the
/// stand-in's config gives it 1 s) and the claim's margin. A failover sent but left
/// claimed, instead of finished, would come back within this.
const PAST_A_CLAIM: Duration =
    Duration::from_millis(1_000 + otpd::rules::FAILOVER_CLAIM_MARGIN_MS + 1_000);

fn stand_in() -> VonageStandIn {
    VonageStandIn::start_expecting(Expect {
        failover_secs: FAILOVER_SECS,
        ..Expect::default()
    })
}

fn start(vonage: &VonageStandIn) -> Daemon {
    start_configured(vonage, "")
}

/// A daemon whose `[delivery.messages]` section has `section_extra` too.
fn start_configured(vonage: &VonageStandIn, section_extra: &str) -> Daemon {
    start_on(Engine::Sled, vonage, section_extra)
}

/// [`start_configured`] on `engine`.
fn start_on(engine: Engine, vonage: &VonageStandIn, section_extra: &str) -> Daemon {
    let (backend, delivery) = vonage.config("messages", section_extra);
    let extra = format!(
        "[otp]\nresend_cooldown_secs = 0\nmax_sends_per_recipient = 10\n[http]\nlisten = \"127.0.0.1:0\"\n\
         webhook_signature_secret = \"{SECRET}\"\n{backend}"
    );
    engine.start_with(&extra, &delivery)
}

/// Creates a code for both channels; returns the stand-in's record of the Messenger
/// message.
fn create_both(daemon: &Daemon, vonage: &VonageStandIn, token: &str) -> Seen {
    create_both_with(daemon, vonage, json!({"token": token}))
}

/// [`create_both`] with the request's other fields (`token`, `ttl_secs`) in `fields`.
fn create_both_with(daemon: &Daemon, vonage: &VonageStandIn, mut fields: Value) -> Seen {
    let before = vonage.requests().len();
    fields["op"] = json!("create");
    fields["to"] = json!({"messenger": PSID, "sms": PHONE});
    let created = daemon.call(fields);
    assert_eq!(created["status"], 201, "{created}");
    let seen = vonage.requests();
    assert_eq!(seen.len(), before + 1);
    seen.last().unwrap().clone()
}

/// A Messages v1 status webhook for the message, signed as Vonage signs it.
fn report(daemon: &Daemon, message: &Seen, status: &str) {
    let answer = post_signed(daemon, &report_body(message.uuid.as_ref().unwrap(), status));
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// A Messages v1 status report on the message `uuid`, stamped now.
fn report_body(uuid: &str, status: &str) -> Value {
    let mut body = json!({
        "message_uuid": uuid,
        "to": PSID,
        "from": vonage::PAGE_ID,
        "timestamp": jiff::Timestamp::now().to_string(),
        "status": status,
        "channel": "messenger",
    });
    if status == "rejected" {
        body["error"] = json!({"type": "https://developer.vonage.com/api-errors/messages#1050", "title": "1050", "detail": "Outside the 24-hour window"});
    }
    body
}

fn sms_requests(vonage: &VonageStandIn) -> Vec<Seen> {
    vonage
        .requests()
        .into_iter()
        .filter(|s| s.body["channel"] == "sms")
        .collect()
}

fn events(daemon: &Daemon, token: &str) -> Vec<Value> {
    let status = daemon.call(json!({"op": "status", "token": token}));
    status["delivery"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE + Duration::from_secs(FAILOVER_SECS);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the token's `failover_failed` event and returns it.
fn wait_for_failover_failed(daemon: &Daemon, token: &str) -> Value {
    let mut failed = None;
    wait_for("the failover to be recorded failed", || {
        failed = (events(daemon, token).into_iter()).find(|e| e["status"] == "failover_failed");
        failed.is_some()
    });
    failed.expect("found")
}

fn wait_for_failover_sent(daemon: &Daemon, token: &str) {
    wait_for("the failover SMS", || {
        events(daemon, token)
            .iter()
            .any(|e| e["status"] == "failover_sent")
    });
}

#[test]
fn messenger_carries_vonage_failover_and_the_sms_follows_once_at_the_deadline() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "max_retries = 0\n");
    let created_at = Instant::now();
    let messenger = create_both_with(&daemon, &vonage, json!({"token": "m1", "ttl_secs": 75}));
    let code = messenger.code();
    // While the failover is pending its text is sealed: the database never holds it.
    assert_not_stored(&daemon, &code);
    let text = format!("{code} is your code. It expires in 2 minutes.");
    let sms = |text: &str| json!({"to": PHONE, "from": vonage::SMS_FROM, "channel": "sms", "message_type": "text", "text": text});
    assert_eq!(messenger.path, "/v1/messages");
    assert_eq!(
        messenger.body,
        json!({
            "to": PSID, "from": vonage::PAGE_ID, "channel": "messenger", "message_type": "text",
            "text": text, "messenger": {"category": "response"}, "failover": [sms(&text)],
        })
    );
    let status = daemon.call(json!({"op": "status", "token": "m1"}));
    assert_eq!(
        status["delivery"]["reference"],
        messenger.uuid.clone().unwrap()
    );

    report(&daemon, &messenger, "delivered");
    wait_for_failover_sent(&daemon, "m1");
    let sent = sms_requests(&vonage);
    assert_eq!(sent.len(), 1, "exactly one SMS");
    assert_eq!(
        sent[0].body,
        sms(&format!("{code} is your code. It expires in 1 minute.")),
        "the same number, and the minutes left after the 15 s wait (60 s of 75)"
    );
    assert!(
        sent[0].at - created_at >= Duration::from_secs(FAILOVER_SECS),
        "the SMS went out before the deadline"
    );
    let recorded = events(&daemon, "m1");
    let failover = recorded
        .iter()
        .find(|e| e["status"] == "failover_sent")
        .unwrap();
    assert_eq!(failover["detail"], sent[0].uuid.clone().unwrap());

    // The SMS's own status reports are filed on the code too.
    let mut delivered = report_body(sent[0].uuid.as_ref().unwrap(), "delivered");
    delivered["channel"] = json!("sms");
    delivered["to"] = json!(PHONE);
    delivered["from"] = json!(vonage::SMS_FROM);
    let answer = post_signed(&daemon, &delivered);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        events(&daemon, "m1")
            .iter()
            .any(|e| e["status"] == "delivered" && e["channel"] == "sms"),
        "{:?}",
        events(&daemon, "m1")
    );

    std::thread::sleep(PAST_A_CLAIM);
    assert_eq!(sms_requests(&vonage).len(), 1, "no second SMS");
    assert_eq!(
        daemon.verify("m1", &code)["status"],
        200,
        "the code still works"
    );

    let log = daemon.stderr();
    assert!(!log.contains(&code), "the code reached the log");
    assert_not_stored(&daemon, &code);
}

/// No file of the database holds `code` where its text would have it.
fn assert_not_stored(daemon: &Daemon, code: &str) {
    let needle = format!("{code} is your code");
    let mut dirs = vec![daemon.dir.path().join("db")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "the SMS text is readable in {}",
                path.display()
            );
        }
    }
}

#[test]
fn no_sms_after_a_read_a_verify_a_cancel_or_vonages_own_failover() {
    let vonage = stand_in();
    // The held answer below must not time out.
    let daemon = start_configured(&vonage, "timeout_secs = 30");

    // A read reported before the send call has returned: 503, and the retry counts.
    vonage.hold();
    let early = std::thread::scope(|scope| {
        let creating = scope.spawn(|| create_both(&daemon, &vonage, "early"));
        wait_for("the Messenger message to reach Vonage", || {
            !vonage.unanswered().is_empty()
        });
        let uuid = vonage.unanswered().remove(0);
        let answer = post_signed(&daemon, &report_body(&uuid, "read"));
        assert_eq!(
            (answer.status, answer.header("retry-after")),
            (503, "60"),
            "{}",
            answer.text()
        );
        vonage.release();
        creating.join().unwrap()
    });
    report(&daemon, &early, "read");

    let read = create_both(&daemon, &vonage, "read");
    let verified = create_both(&daemon, &vonage, "verified");
    create_both(&daemon, &vonage, "cancelled");
    let rejected = create_both(&daemon, &vonage, "rejected");

    report(&daemon, &read, "delivered");
    report(&daemon, &read, "read");
    assert_eq!(daemon.verify("verified", &verified.code())["status"], 200);
    assert_eq!(
        daemon.call(json!({"op": "cancel", "token": "cancelled"}))["status"],
        200
    );
    report(&daemon, &rejected, "rejected");

    let cases = [
        ("early", "Read"),
        ("read", "Read"),
        ("verified", "Finished(Verified)"),
        ("cancelled", "Finished(Cancelled)"),
        ("rejected", "ProviderFellOver"),
    ];
    wait_for("the four failovers to fall due", || {
        let log = daemon.stderr();
        cases
            .iter()
            .all(|(token, _)| skipped(&log, token).is_some())
    });
    assert!(
        sms_requests(&vonage).is_empty(),
        "otpd sent an SMS it should not have"
    );
    assert_no_sms_needed(&daemon.stderr(), &cases);
}

/// Asserts that `log` says of each `(token, verdict)` that its failover needs no SMS,
/// for that verdict.
fn assert_no_sms_needed(log: &str, cases: &[(&str, &str)]) {
    for (token, verdict) in cases {
        let line = skipped(log, token).unwrap_or_else(|| panic!("{token}: nothing logged"));
        assert!(
            line.contains(&format!("verdict={verdict}")),
            "{token}: {line}"
        );
    }
}

/// The daemon's log line saying the failover of `token` needs no SMS.
fn skipped<'a>(log: &'a str, token: &str) -> Option<&'a str> {
    let token = format!("token=\"{token}\"");
    log.lines()
        .find(|line| line.contains("no failover SMS needed") && line.contains(&token))
}

#[test]
fn a_refused_failover_sms_is_recorded_and_the_code_stands() {
    let vonage = stand_in();
    let daemon = start(&vonage);
    let messenger = create_both(&daemon, &vonage, "f1");
    vonage.script(&[Reply::Echo(400)]);
    let failed = wait_for_failover_failed(&daemon, "f1");
    assert_eq!(failed["channel"], "sms");
    let detail = failed["detail"].as_str().unwrap();
    assert!(detail.starts_with("400"), "{detail}");
    let code = messenger.code();
    assert!(
        !detail.contains(&code) && !detail.contains(PHONE),
        "{detail}"
    );
    assert_eq!(daemon.verify("f1", &code)["status"], 200, "the code stands");
}

/// Vonage down at the deadline (no retries left in the client): the SMS goes back in
/// line and out once Vonage takes it, rather than being given up.
#[test]
fn a_failover_sms_vonage_could_not_take_is_sent_later() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "max_retries = 0\n");
    create_both(&daemon, &vonage, "f2");
    vonage.script(&[Reply::ServerError]);
    wait_for_failover_sent(&daemon, "f2");
    let statuses: Vec<u16> = sms_requests(&vonage).iter().map(|s| s.status).collect();
    assert_eq!(statuses, [500, 202]);
    assert!(
        !events(&daemon, "f2")
            .iter()
            .any(|e| e["status"] == "failover_failed")
    );
}

/// Before each retry of a failover SMS (here after a 429), otpd asks again whether the
/// SMS is still owed: none goes out for a code verified, read, cancelled, replaced or
/// locked meanwhile.
#[test]
fn a_failover_sms_no_longer_owed_is_not_retried() {
    let vonage = stand_in();
    let daemon = start(&vonage);
    let cases = [
        ("verified", "Finished(Verified)"),
        ("read", "Read"),
        ("cancelled", "Finished(Cancelled)"),
        ("replaced", "Gone"),
        ("locked", "Finished(Locked)"),
    ];
    let messages: Vec<Seen> = cases
        .iter()
        .map(|(token, _)| create_both(&daemon, &vonage, token))
        .collect();
    // Long enough for the ten calls below to come before the retries on a busy
    // machine (they take well under a second), and short enough that the retries are
    // judged, and a second later counted, before the replacing code's own failover is
    // due (FAILOVER_SECS after its create).
    let busy = Reply::TooMany {
        retry_after_secs: 10,
    };
    vonage.script(&vec![busy; cases.len()]);
    wait_for("the first SMS attempts", || {
        sms_requests(&vonage).len() == cases.len()
    });
    // Within the 10 s before the retries.
    assert_eq!(
        daemon.verify("verified", &messages[0].code())["status"],
        200
    );
    report(&daemon, &messages[1], "read");
    let cancelled = daemon.call(json!({"op": "cancel", "token": "cancelled"}));
    assert_eq!(cancelled["status"], 200);
    create_both(&daemon, &vonage, "replaced");
    let wrong = format!(
        "{:06}",
        (messages[4].code().parse::<u32>().unwrap() + 1) % 1_000_000
    );
    let guesses: Vec<Value> = (0..5).map(|_| daemon.verify("locked", &wrong)).collect();
    assert_eq!(guesses[4]["error"], "too_many_attempts", "{guesses:?}");

    let sent = || sms_requests(&vonage).iter().any(|s| s.status == 202);
    wait_for("the retries to be judged", || {
        let log = daemon.stderr();
        sent()
            || cases
                .iter()
                .all(|(token, _)| skipped(&log, token).is_some())
    });
    assert!(!sent(), "an SMS no longer owed went out");
    assert_no_sms_needed(&daemon.stderr(), &cases);
    for (token, _) in cases {
        let events = events(&daemon, token);
        assert!(
            !events.iter().any(|e| e["status"] == "failover_failed"),
            "{token}: nothing is recorded for an SMS no longer owed: {events:?}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sms_requests(&vonage).len(),
        cases.len(),
        "no retry went out"
    );
}

/// A retried failover SMS names the minutes its code has left at that attempt, not at
/// the first.
#[test]
fn a_retried_failover_sms_names_the_minutes_left_then() {
    let vonage = stand_in();
    let daemon = start(&vonage);
    // Due at 15 s, 65 s left: 2 minutes; the retry 6 s later, 59 s left: 1 minute.
    let messenger = create_both_with(&daemon, &vonage, json!({"token": "m2", "ttl_secs": 80}));
    vonage.script(&[Reply::TooMany {
        retry_after_secs: 6,
    }]);
    wait_for_failover_sent(&daemon, "m2");
    let texts: Vec<Value> = sms_requests(&vonage)
        .iter()
        .map(|s| s.body["text"].clone())
        .collect();
    let text = |left: &str| format!("{} is your code. It expires in {left}.", messenger.code());
    assert_eq!(texts, [text("2 minutes"), text("1 minute")]);
}

/// A failover SMS whose retries would run past its code's expiry stops retrying, so
/// no SMS carries a code that has expired: due at 15 s, 15 s left, and a retry after
/// the 12 s Vonage asks for could end 5 s later, past the expiry; so could one put
/// back in line.
#[test]
fn a_failover_sms_is_not_retried_past_its_codes_expiry() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "timeout_secs = 5\nmax_retries = 3\n");
    create_both_with(&daemon, &vonage, json!({"token": "f3", "ttl_secs": 30}));
    vonage.script(&[Reply::TooMany {
        retry_after_secs: 12,
    }]);
    let failed = wait_for_failover_failed(&daemon, "f3");
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("no time left before the code expires"),
        "{detail}"
    );
    let statuses: Vec<u16> = sms_requests(&vonage).iter().map(|s| s.status).collect();
    assert_eq!(statuses, [429], "an SMS went out");
}

/// An SMS attempt that got no answer may have gone out: it is neither retried nor put
/// back in line, so one failover never sends a pile of SMS to one number. The outcome
/// recorded says so.
#[test]
fn an_unanswered_failover_sms_is_not_sent_again() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "timeout_secs = 2\nmax_retries = 3\n");
    vonage.script(&[Reply::Accept, Reply::Hang]);
    create_both(&daemon, &vonage, "u1");
    let failed = wait_for_failover_failed(&daemon, "u1");
    let detail = failed["detail"].as_str().unwrap();
    assert!(detail.contains("no answer within 2 s"), "{detail}");
    assert!(
        detail.contains("Vonage may have taken the message"),
        "{detail}"
    );
    assert_eq!(sms_requests(&vonage).len(), 1, "sent again");
}

/// A failover SMS put back in line after a 429 waits as long as Vonage's `Retry-After`
/// asks, when that is longer than the usual 10 s.
#[test]
fn a_failover_sms_put_back_in_line_waits_as_long_as_vonage_asks() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "max_retries = 0\n");
    vonage.script(&[
        Reply::Accept,
        Reply::TooMany {
            retry_after_secs: 20,
        },
    ]);
    create_both(&daemon, &vonage, "u2");
    wait_for("the first SMS attempt", || sms_requests(&vonage).len() == 1);
    wait_for_failover_sent(&daemon, "u2");
    let sms = sms_requests(&vonage);
    assert_eq!(sms.iter().map(|s| s.status).collect::<Vec<_>>(), [429, 202]);
    let waited = sms[1].at - sms[0].at;
    assert!(
        waited >= Duration::from_secs(20),
        "retried after {waited:?}"
    );
}

/// A Messenger message that took long to go out (the client's retries) still gets its
/// SMS before the code expires: the deadline is kept clear of the expiry.
#[test]
fn a_slow_messenger_send_still_leaves_its_sms_time() {
    let vonage = stand_in();
    let daemon = start_configured(&vonage, "max_retries = 2\n");
    let busy = Reply::TooMany {
        retry_after_secs: 8,
    };
    vonage.script(&[busy.clone(), busy]);
    let created_at = Instant::now();
    let created = daemon.call(json!({
        "op": "create", "token": "f4", "ttl_secs": 30,
        "to": {"messenger": PSID, "sms": PHONE}
    }));
    assert_eq!(created["status"], 201, "{created}");
    assert!(
        created_at.elapsed() > Duration::from_secs(15),
        "the send was slow"
    );
    wait_for_failover_sent(&daemon, "f4");
    let sms = sms_requests(&vonage);
    assert_eq!(sms.len(), 1);
    assert!(
        sms[0].at - created_at < Duration::from_secs(30),
        "the SMS went out after the code expired"
    );
}

#[test]
fn a_restart_while_waiting_neither_loses_nor_repeats_the_sms() {
    let vonage = stand_in();
    let mut daemon = start_configured(&vonage, "max_retries = 0\n");
    create_both(&daemon, &vonage, "r1");
    daemon.kill();
    daemon.spawn();
    wait_for_failover_sent(&daemon, "r1");
    assert_eq!(sms_requests(&vonage).len(), 1);

    // Once sent, a further restart does not send it again.
    daemon.stop();
    daemon.spawn();
    std::thread::sleep(PAST_A_CLAIM);
    assert_eq!(sms_requests(&vonage).len(), 1, "repeated after restart");
}

#[test]
fn a_slow_failover_sms_holds_up_no_other() {
    let vonage = stand_in();
    // The first SMS never gets an answer; otpd gives up on it after 20 s.
    let daemon = start_configured(&vonage, "timeout_secs = 20\nmax_retries = 0\n");
    vonage.script(&[Reply::Accept, Reply::Accept, Reply::Hang]);
    create_both(&daemon, &vonage, "slow");
    std::thread::sleep(Duration::from_secs(2)); // due 2 s after the first
    create_both(&daemon, &vonage, "next");
    wait_for_failover_sent(&daemon, "next");
    let slow_ended = events(&daemon, "slow")
        .iter()
        .any(|e| e["status"] == "failover_sent" || e["status"] == "failover_failed");
    assert!(
        !slow_ended,
        "the second SMS went out while the first still hung"
    );
    assert_eq!(sms_requests(&vonage).len(), 2);
}

#[test]
fn a_stop_while_a_failover_sms_waits_to_retry_sets_it_aside_for_the_next_start() {
    let vonage = stand_in();
    // A claim would last 20 s × 2 + 30 s + 10 s, beyond this test's patience.
    let mut daemon = start_configured(&vonage, "timeout_secs = 20\nmax_retries = 1\n");
    let busy = Reply::TooMany {
        retry_after_secs: 25,
    };
    vonage.script(&[Reply::Accept, busy]);
    let messenger = create_both(&daemon, &vonage, "aside");
    wait_for("the first SMS attempt", || sms_requests(&vonage).len() == 1);
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    let log = daemon.stderr();
    assert!(log.contains("the next start sends it"), "{log}");
    assert_eq!(sms_requests(&vonage).len(), 1, "no retry was waited for");
    daemon.spawn();
    wait_for_failover_sent(&daemon, "aside");
    assert_eq!(
        sms_requests(&vonage).len(),
        2,
        "the refused attempt, then one"
    );
    assert_eq!(daemon.verify("aside", &messenger.code())["status"], 200);
}

#[test]
fn a_stop_lets_a_failover_sms_attempt_under_way_end() {
    let vonage = stand_in();
    let mut daemon = start_configured(&vonage, "timeout_secs = 20\nmax_retries = 0\n");
    create_both(&daemon, &vonage, "slow");
    vonage.hold();
    wait_for("the SMS to reach Vonage", || {
        !vonage.unanswered().is_empty()
    });
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    // Vonage takes the SMS after the 5 s a socket peer gets, within the attempt's 20 s.
    std::thread::sleep(Duration::from_secs(7));
    vonage.release();
    assert!(daemon.wait_exit().success(), "{}", daemon.stderr());
    daemon.spawn();
    wait_for_failover_sent(&daemon, "slow");
    assert_eq!(
        sms_requests(&vonage).len(),
        1,
        "recorded before the stop, once"
    );
}

#[test]
fn a_crash_during_a_failover_send_sends_the_sms_once_the_claim_runs_out() {
    let vonage = stand_in();
    // A claim lasts the longest send (5 s) and 10 s more.
    let mut daemon = start_configured(&vonage, "timeout_secs = 5\nmax_retries = 0\n");
    vonage.script(&[Reply::Accept, Reply::Hang]);
    let messenger = create_both_with(&daemon, &vonage, json!({"token": "crash", "ttl_secs": 90}));
    wait_for("the SMS to reach Vonage", || {
        sms_requests(&vonage).len() == 1
    });
    daemon.kill();
    daemon.spawn();
    wait_for_failover_sent(&daemon, "crash");
    let sms = sms_requests(&vonage);
    assert_eq!(sms.len(), 2, "sent again, once");
    let code = messenger.code();
    // Due at 15 s (75 s left), sent again once the claim ran out, 15 s later at least:
    // the text names the time left then, not at the first try.
    let text = |left: &str| format!("{code} is your code. It expires in {left}.");
    assert_eq!(sms[0].body["text"], text("2 minutes"));
    assert_eq!(sms[1].body["text"], text("1 minute"));
    assert_eq!(daemon.verify("crash", &code)["status"], 200);
}

/// A daemon of the `messages` backend on `redis` (a short response timeout, so that an
/// outage shows at once), with `section_extra` in `[delivery.messages]`.
fn start_on_redis(vonage: &VonageStandIn, redis: &OwnedRedis, section_extra: &str) -> Daemon {
    let (backend, delivery) = vonage.config("messages", section_extra);
    let store = format!(
        "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"{}\"\nresponse_timeout_ms = 500\n",
        redis.url()
    );
    Daemon::start_on(&store, &backend, &delivery)
}

#[test]
fn a_store_failure_after_the_messenger_message_went_out_discards_nothing() {
    let vonage = stand_in();
    let mut redis = OwnedRedis::start();
    let daemon = start_on_redis(&vonage, &redis, "");

    // Redis goes away while Vonage is taking the Messenger message.
    vonage.hold();
    let creating = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            let mut conn =
                common::Conn::new(std::os::unix::net::UnixStream::connect(socket).unwrap());
            conn.call(
                json!({"op": "create", "token": "lost", "to": {"messenger": PSID, "sms": PHONE}}),
            )
        })
    };
    wait_for("the Messenger message", || !vonage.unanswered().is_empty());
    redis.kill();
    vonage.release();
    let answer = creating.join().unwrap();
    assert_eq!(
        (answer["status"].as_u64(), answer["error"].as_str()),
        (Some(500), Some("internal_error")),
        "a storage failure, not a failed delivery: {answer}"
    );
    assert!(
        daemon.stderr().contains("cannot keep the SMS failover"),
        "{}",
        daemon.stderr()
    );

    // The message went out, so its code was not taken back.
    redis.spawn();
    let code = vonage.requests().last().unwrap().code();
    assert_eq!(daemon.verify("lost", &code)["status"], 200);
}

/// Redis down when Vonage takes the SMS, for `outage`: the SMS goes out once.
fn sms_sent_once_through_a_store_outage(token: &str, outage: Duration) {
    let vonage = stand_in();
    let mut redis = OwnedRedis::start();
    // A claim lasts 2 s + 10 s.
    let daemon = start_on_redis(&vonage, &redis, "timeout_secs = 2\nmax_retries = 0\n");
    create_both(&daemon, &vonage, token);
    vonage.hold();
    wait_for("the SMS to reach Vonage", || {
        !vonage.unanswered().is_empty()
    });
    redis.kill();
    vonage.release();
    std::thread::sleep(outage);
    redis.spawn();
    wait_for_failover_sent(&daemon, token);
    wait_for("the failover to be let go", || {
        redis.cli(&["ZCARD", "otpd:failovers"]).trim() == "0"
    });
    assert_eq!(sms_requests(&vonage).len(), 1, "sent once");
}

#[test]
fn a_store_error_after_the_sms_went_out_does_not_send_it_twice() {
    sms_sent_once_through_a_store_outage("blip", Duration::from_secs(2));
}

/// Longer than the claim: it comes back while the outcome is still being recorded.
#[test]
fn a_store_outage_longer_than_the_claim_does_not_send_the_sms_twice() {
    sms_sent_once_through_a_store_outage("outage", Duration::from_secs(15));
}

/// The stderr of a `messages` daemon started with `http` as its `[http]` section and
/// `section_extra` in `[delivery.messages]`, once it is ready.
fn start_up_log(vonage: &VonageStandIn, http: &str, section_extra: &str) -> String {
    let (backend, delivery) = vonage.config("messages", section_extra);
    let mut daemon = Engine::Sled.start_with(&format!("{http}\n{backend}"), &delivery);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    daemon.stderr()
}

/// Without status webhooks otpd never hears of a read or a rejection, so its own SMS
/// follows every Messenger message: start-up says so, what it costs and what to set.
#[test]
fn start_up_warns_when_no_status_webhook_can_tell_of_a_read_or_a_rejection() {
    let vonage = stand_in();
    let warning = "it never hears that a Messenger message was read or rejected";
    let costs = "a message Messenger rejects costs two SMS";
    let listen = "[http]\nlisten = \"127.0.0.1:0\"\n";

    let no_listener = start_up_log(&vonage, "", "");
    for part in [warning, costs, "http.listen is empty", "set http.listen"] {
        assert!(no_listener.contains(part), "{part}:\n{no_listener}");
    }
    let unsigned = start_up_log(&vonage, listen, "");
    for part in [
        warning,
        costs,
        "http.webhook_signature_secret is not set",
        "also after one that was read",
    ] {
        assert!(unsigned.contains(part), "{part}:\n{unsigned}");
    }

    let heard = format!("{listen}webhook_signature_secret = \"{SECRET}\"\n");
    let heard = start_up_log(&vonage, &heard, "");
    assert!(!heard.contains(warning), "{heard}");
    let sms_only = start_up_log(&vonage, "", "messenger_from = \"\"\n");
    assert!(!sms_only.contains(warning), "{sms_only}");
}

#[test]
fn single_channels_and_refusals() {
    let vonage = stand_in();
    let daemon = start(&vonage);
    let created = daemon.call(json!({"op": "create", "token": "s1", "to": {"sms": PHONE}}));
    assert_eq!(created["status"], 201, "{created}");
    let sms = vonage.requests().pop().unwrap();
    assert_eq!(
        sms.body,
        json!({"to": PHONE, "from": vonage::SMS_FROM, "channel": "sms", "message_type": "text",
               "text": format!("{} is your code. It expires in 5 minutes.", sms.code())})
    );

    let created = daemon.call(json!({"op": "create", "token": "s2", "to": {"messenger": PSID}}));
    assert_eq!(created["status"], 201, "{created}");
    let messenger = vonage.requests().pop().unwrap();
    assert!(
        messenger.body.get("failover").is_none(),
        "{}",
        messenger.body
    );
    assert_eq!(messenger.body["channel"], "messenger");

    vonage.script(&[Reply::Unauthorized]);
    let refused = daemon
        .call(json!({"op": "create", "token": "s3", "to": {"messenger": PSID, "sms": PHONE}}));
    assert_eq!(refused["status"], 502, "{refused}");
    vonage.script(&[Reply::ServerError, Reply::ServerError, Reply::ServerError]);
    let unavailable = daemon
        .call(json!({"op": "create", "token": "s4", "to": {"messenger": PSID, "sms": PHONE}}));
    assert_eq!(unavailable["status"], 503, "{unavailable}");
    assert_eq!(daemon.stats()["live"], 2, "only s1 and s2 are live");
}

/// A failover that falls due while a resend is on its way waits for the resend: when
/// it fails, the code the person has is back, and its SMS goes out; when it goes out,
/// the old failover is dropped (the new code has its own).
fn a_failover_due_while_a_resend_is_on_its_way_waits_for_it(engine: Engine) {
    let vonage = stand_in();
    // The resends are held past the failovers' deadline.
    let daemon = start_on(engine, &vonage, "timeout_secs = 30\n");
    let created_at = Instant::now();
    let back = create_both(&daemon, &vonage, "back");
    let kept = create_both(&daemon, &vonage, "kept");
    vonage.script(&[Reply::Problem, Reply::Accept]);
    vonage.hold();
    let (failed, confirmed) = std::thread::scope(|scope| {
        let resend = |token: &'static str| {
            let daemon = &daemon;
            move || {
                daemon.call(json!({"op": "create", "token": token, "to": {"messenger": PSID, "sms": PHONE}}))
            }
        };
        let failing = scope.spawn(resend("back"));
        wait_for("the first resend", || vonage.unanswered().len() == 1);
        let confirming = scope.spawn(resend("kept"));
        wait_for("the second resend", || vonage.unanswered().len() == 2);
        let due = created_at + Duration::from_secs(FAILOVER_SECS + 2);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        vonage.release();
        (failing.join().unwrap(), confirming.join().unwrap())
    });
    assert_eq!(failed["status"], 502, "{failed}");
    assert_eq!(confirmed["status"], 201, "{confirmed}");
    // The confirmed resend; the restored code's SMS may already have followed it.
    let resent = vonage
        .requests()
        .into_iter()
        .rfind(|s| s.status == 202 && s.body["channel"] == "messenger")
        .unwrap();

    wait_for("the restored code's failover", || {
        skipped(&daemon.stderr(), "back").is_some()
            || events(&daemon, "back")
                .iter()
                .any(|e| e["status"] == "failover_sent")
    });
    let sms = sms_requests(&vonage);
    assert_eq!(sms.len(), 1, "only the restored code's SMS: {sms:?}");
    assert_eq!(sms[0].code(), back.code());
    assert_eq!(daemon.verify("back", &back.code())["status"], 200);

    wait_for("the replaced code's failover to be dropped", || {
        skipped(&daemon.stderr(), "kept").is_some()
    });
    let line = skipped(&daemon.stderr(), "kept").unwrap().to_owned();
    assert!(line.contains("verdict=Gone"), "{line}");
    assert!(
        line.contains(kept.uuid.as_deref().unwrap()),
        "the old failover: {line}"
    );
    wait_for_failover_sent(&daemon, "kept");
    let sms = sms_requests(&vonage);
    assert_eq!(sms.len(), 2, "{sms:?}");
    assert_eq!(
        sms[1].code(),
        resent.code(),
        "the new code, by its own failover"
    );
}

/// A report on the message of a code a resend replaced, arriving while the resend is
/// on its way, is filed on that code: read, it owes no SMS when the resend then fails
/// and brings the code back.
fn a_read_while_a_resend_is_on_its_way_counts_when_the_resend_fails(engine: Engine) {
    let vonage = stand_in();
    let daemon = start_on(engine, &vonage, "");
    let created_at = Instant::now();
    let old = create_both(&daemon, &vonage, "read-old");
    vonage.script(&[Reply::Problem]);
    vonage.hold();
    let failed = std::thread::scope(|scope| {
        let resend = scope.spawn(|| {
            daemon.call(json!({"op": "create", "token": "read-old", "to": {"messenger": PSID, "sms": PHONE}}))
        });
        wait_for("the resend", || vonage.unanswered().len() == 1);
        report(&daemon, &old, "read");
        vonage.release();
        resend.join().unwrap()
    });
    assert_eq!(failed["status"], 502, "{failed}");
    let uuid = old.uuid.as_deref().unwrap();
    let log = daemon.stderr();
    assert!(
        log.lines()
            .any(|line| line.contains("delivery status recorded") && line.contains(uuid)),
        "{log}"
    );
    let read = events(&daemon, "read-old");
    assert!(read.iter().any(|e| e["status"] == "read"), "{read:?}");

    wait_for("the failover to be judged", || {
        skipped(&daemon.stderr(), "read-old").is_some()
    });
    assert!(created_at.elapsed() >= Duration::from_secs(FAILOVER_SECS));
    assert_no_sms_needed(&daemon.stderr(), &[("read-old", "Read")]);
    let sms = sms_requests(&vonage);
    assert!(sms.is_empty(), "no SMS after a read: {sms:?}");
    assert_eq!(daemon.verify("read-old", &old.code())["status"], 200);
}

per_engine!([sled, fjall, redis] {
    a_failover_due_while_a_resend_is_on_its_way_waits_for_it,
    a_read_while_a_resend_is_on_its_way_counts_when_the_resend_fails,
});
