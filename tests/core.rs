//! The core daemon through its real socket: every op and status code, the rules,
//! concurrency, restarts, the janitor, bad input and access control.
//!
//! Each test that touches the store runs on every engine (`sled::`, `fjall::`,
//! `redis::`, `redis_cluster::`, see the list near the end). On the embedded engines
//! only (`embedded::`): the scan of the database files and the janitor's purge counts
//! (Redis has its own versions of both in tests/redis.rs). With a plain `#[test]`: what
//! starts no store or needs no engine of its own, such as the config check.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::Duration;

use common::{Daemon, Engine, concurrently, count, refused_start, wait_for};
use serde_json::{Value, json};

/// No resend cooldown, so one test can create several codes quickly.
const NO_COOLDOWN: &str = "[otp]\nresend_cooldown_secs = 0\n";

fn create_verify_and_the_answers_that_follow(engine: Engine) {
    let daemon = engine.start("");
    let created = daemon.call(json!({
        "op": "create", "id": "c1", "token": "123456789",
        "to": {"messenger": "8192836451", "sms": "+393331234567"}
    }));
    assert_eq!(created["ok"], true, "{created}");
    assert_eq!(created["status"], 201);
    assert_eq!(created["id"], "c1");
    assert_eq!(created["token"], "123456789");
    assert_eq!(created["channels"], json!(["messenger", "sms"]));
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));
    let code = daemon.code_for("123456789");
    assert_eq!(code.len(), 6);
    assert!(
        !created.to_string().contains(&code),
        "code leaked into the response"
    );
    // The log backend's line: what would have been sent, and where.
    let logged = daemon.logged_line("123456789").unwrap();
    assert_eq!(logged["channels"], json!(["messenger", "sms"]), "{logged}");
    assert!(
        logged["text"].as_str().unwrap().contains(&code),
        "the message text holds the code: {logged}"
    );

    let wrong = if code == "000000" { "111111" } else { "000000" };
    let answer = daemon.verify("123456789", wrong);
    assert_eq!(
        answer,
        json!({"ok": false, "status": 404, "error": "not_found", "message": "no such code for this token"})
    );

    let answer = daemon.verify("123456789", &code);
    assert_eq!(
        answer,
        json!({"ok": true, "status": 200, "result": "valid"})
    );
    let answer = daemon.verify("123456789", &code);
    assert_eq!(answer["status"], 409);
    assert_eq!(answer["error"], "already_verified");

    let status = daemon.call(json!({"op": "status", "token": "123456789"}));
    assert_eq!(status["status"], 200, "{status}");
    assert_eq!(status["state"], "verified");
    assert_eq!(status["attempts"], 0, "a valid verify clears the count");
    assert_eq!(status["expires_at"], created["expires_at"], "{status}");
    let created_at = status["created_at"].as_str().unwrap();
    assert!(
        created_at.ends_with('Z') && created_at < created["expires_at"].as_str().unwrap(),
        "{status}"
    );
    assert!(
        !status.to_string().contains(&code),
        "code leaked into status"
    );

    let stats = daemon.stats();
    assert_eq!(stats["created"], 1);
    assert_eq!(stats["verified"], 1);
    assert_eq!(stats["failed"], 1);
    assert_eq!(stats["live"], 0);
    assert!(stats["uptime_secs"].is_u64());

    let ping = daemon.call(json!({"op": "ping", "id": 5}));
    assert_eq!(ping["id"], 5);
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
}

fn tutorial_body_at_top_level_and_inside_to(engine: Engine) {
    let daemon = engine.start("");
    let top = daemon.call(
        json!({"op": "create", "token": "t1", "messengerId": "42", "phoneNumber": "393331234567"}),
    );
    assert_eq!(top["status"], 201, "{top}");
    assert_eq!(top["channels"], json!(["messenger", "sms"]));
    let inside =
        daemon.call(json!({"op": "create", "token": "t2", "to": {"phoneNumber": "+447700900000"}}));
    assert_eq!(inside["status"], 201, "{inside}");
    assert_eq!(inside["channels"], json!(["sms"]));
    let code = daemon.code_for("t2");
    assert_eq!(daemon.verify("t2", &code)["status"], 200);
}

fn expired_code_answers_410(engine: Engine) {
    let daemon = engine.start("");
    let code = daemon.create_short_code("exp", "393331234567");
    thread::sleep(Duration::from_millis(1100));
    let answer = daemon.verify("exp", &code);
    assert_eq!(answer["status"], 410, "{answer}");
    assert_eq!(answer["error"], "expired");
}

/// `expired` counts a code that expired unverified however it left: seen by the
/// janitor, replaced by a new create before the janitor came by, or expired while
/// the daemon was down. Every engine counts alike.
fn every_expiry_is_counted(engine: Engine) {
    let mut daemon =
        engine.start("[otp]\nresend_cooldown_secs = 0\n[janitor]\ninterval_secs = 1\n");
    let create = |daemon: &Daemon, token: &str| daemon.create_short_code(token, "393331234567");
    let expired = |daemon: &Daemon| daemon.stats()["expired"].as_u64().unwrap();
    create(&daemon, "replaced");
    thread::sleep(Duration::from_millis(1100));
    // The two left pending are valid long enough that no janitor pass before the stop
    // can meet them expired, however slow the machine.
    const LONGER: u64 = 4;
    daemon.create_code_valid_for("replaced", "393331234567", LONGER);
    wait_for("the replaced code to count", || expired(&daemon) == 1);
    daemon.create_code_valid_for("while-down", "393331234567", LONGER);
    daemon.stop();
    thread::sleep(Duration::from_secs(LONGER) + Duration::from_millis(100));
    daemon.spawn();
    // The counters start again at 0; both codes left pending expired while it was down.
    wait_for("the codes expired while down to count", || {
        expired(&daemon) == 2
    });
    assert_eq!(daemon.stats()["live"], 0);
}

fn a_new_create_replaces_the_live_code(engine: Engine) {
    let daemon = engine.start(NO_COOLDOWN);
    let first = daemon.create_code("rep", "393331234567");
    let second = daemon.create_code("rep", "393331234567");
    if first != second {
        assert_eq!(daemon.verify("rep", &first)["status"], 404);
    }
    assert_eq!(daemon.verify("rep", &second)["status"], 200);
    assert_eq!(daemon.stats()["live"], 0);
}

fn cancel_ends_the_code(engine: Engine) {
    let daemon = engine.start("");
    let code = daemon.create_code("can", "393331234567");
    assert_eq!(
        daemon.call(json!({"op": "cancel", "token": "can"}))["status"],
        200
    );
    for token in ["can", "nobody"] {
        assert_eq!(
            daemon.call(json!({"op": "cancel", "token": token})),
            json!({"ok": false, "status": 404, "error": "not_found", "message": "no pending code for this token"})
        );
    }
    let answer = daemon.verify("can", &code);
    assert_eq!(
        answer["status"], 410,
        "a cancelled code is no longer valid: {answer}"
    );
    let status = daemon.call(json!({"op": "status", "token": "can"}));
    assert_eq!(status["state"], "cancelled");
    assert_eq!(
        daemon.call(json!({"op": "status", "token": "nobody"}))["status"],
        404
    );
}

fn rate_limits_per_recipient_and_cooldown(engine: Engine) {
    let daemon = engine.start("[otp]\nresend_cooldown_secs = 30\nmax_sends_per_recipient = 2\n");
    assert_eq!(
        daemon.call(json!({"op": "create", "token": "r1", "to": {"sms": "393331111111"}}))["status"],
        201
    );
    let again = daemon.call(json!({"op": "create", "token": "r1", "to": {"sms": "393332222222"}}));
    assert_eq!(again["status"], 429, "token cooldown: {again}");
    assert_eq!(again["error"], "rate_limited");
    let retry = again["retry_after_secs"].as_u64().unwrap();
    assert!((1..=30).contains(&retry), "{again}");
    assert_eq!(
        again["message"],
        "this token was sent a code less than resend_cooldown_secs (30 s) ago; try again later"
    );
    let other = daemon.call(json!({"op": "create", "token": "r2", "to": {"sms": "393331111111"}}));
    assert_eq!(other["status"], 429, "recipient cooldown: {other}");
    assert_eq!(
        other["message"],
        "the recipient in to.sms was sent a code less than resend_cooldown_secs (30 s) ago; \
         try again later"
    );

    let daemon = engine.start("[otp]\nresend_cooldown_secs = 0\nmax_sends_per_recipient = 2\n");
    for token in ["w1", "w2"] {
        assert_eq!(
            daemon.call(json!({"op": "create", "token": token, "to": {"sms": "393331111111"}}))["status"],
            201
        );
    }
    let third = daemon.call(json!({"op": "create", "token": "w3", "to": {"sms": "+393331111111"}}));
    assert_eq!(third["status"], 429, "window limit: {third}");
    assert!(third["retry_after_secs"].as_u64().unwrap() > 800, "{third}");
    assert_eq!(
        third["message"],
        "the recipient in to.sms was sent max_sends_per_recipient (2) codes within \
         send_window_secs (900 s); try again later"
    );
    assert_eq!(daemon.stats()["rate_limited"], 1);
}

fn guessing_locks_the_token(engine: Engine) {
    let daemon =
        engine.start("[otp]\nresend_cooldown_secs = 0\nmax_attempts = 3\nlock_secs = 600\n");
    let first = daemon.create_code("g", "393331234567");
    let wrong = |code: &str| format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    assert_eq!(daemon.verify("g", &wrong(&first))["status"], 404);
    assert_eq!(daemon.verify("g", &wrong(&first))["status"], 404);
    // A new create before the lock does not reset the count.
    let code = daemon.create_code("g", "393331234567");
    let locked = daemon.verify("g", &wrong(&code));
    assert_eq!(locked["status"], 429, "third wrong code locks: {locked}");
    assert_eq!(locked["error"], "too_many_attempts");
    let right = daemon.verify("g", &code);
    assert_eq!(
        right["status"], 429,
        "the right code is refused while locked: {right}"
    );
    let retry = right["retry_after_secs"].as_u64().unwrap();
    assert!((590..=600).contains(&retry), "{right}");
    let create = daemon.call(json!({"op": "create", "token": "g", "to": {"sms": "393331234567"}}));
    assert_eq!(create["status"], 429, "create during the lock: {create}");
    assert_eq!(create["error"], "too_many_attempts");
    let status = daemon.call(json!({"op": "status", "token": "g"}));
    assert_eq!(status["state"], "locked", "{status}");
    assert_eq!(status["attempts"], 3);
    assert_eq!(daemon.stats()["locked"], 1);
    assert_eq!(daemon.stats()["live"], 0);
}

fn a_lock_outlives_its_purged_code_in_status(engine: Engine) {
    let daemon = engine.start(
        "[otp]\nresend_cooldown_secs = 0\nmax_attempts = 2\nlock_secs = 600\nretain_secs = 0\n\
         [janitor]\ninterval_secs = 1\n",
    );
    let code = daemon.create_code_valid_for("p", "393331234567", 1);
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    daemon.verify("p", &wrong);
    assert_eq!(daemon.verify("p", &wrong)["status"], 429);
    let status = || daemon.call(json!({"op": "status", "token": "p"}));
    wait_for("the locked code to be purged", || {
        let status = status();
        status["status"] == 404 || status.get("created_at").is_none()
    });
    let status = status();
    assert_eq!(status["status"], 200, "the lock still stands: {status}");
    assert_eq!(status["state"], "locked", "{status}");
    assert_eq!(status["attempts"], 2, "{status}");
    assert!(status["locked_until"].is_string(), "{status}");
    assert!(
        status.get("delivery").is_none(),
        "no code to show: {status}"
    );
    let create = daemon.call(json!({"op": "create", "token": "p", "to": {"sms": "393331234567"}}));
    assert_eq!(
        create["error"], "too_many_attempts",
        "as status says: {create}"
    );
}

fn lock_ends_and_clears_the_count(engine: Engine) {
    let daemon = engine.start("[otp]\nresend_cooldown_secs = 0\nmax_attempts = 2\nlock_secs = 1\n");
    let code = daemon.create_code("l", "393331234567");
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    daemon.verify("l", &wrong);
    assert_eq!(daemon.verify("l", &wrong)["status"], 429);
    thread::sleep(Duration::from_millis(1100));
    let status = daemon.call(json!({"op": "status", "token": "l"}));
    assert_eq!(
        (&status["attempts"], &status["locked_until"]),
        (&json!(0), &Value::Null),
        "the lock is over, and so is its count: {status}"
    );
    let code = daemon.create_code("l", "393331234567");
    assert_eq!(
        daemon.verify("l", &wrong)["status"],
        404,
        "count was cleared"
    );
    assert_eq!(daemon.verify("l", &code)["status"], 200);
}

fn fifty_concurrent_verifies_exactly_one_wins(engine: Engine) {
    assert_one_of_fifty_verifies_wins(&engine.start(""));
}

/// Creates a code, verifies it 50 times at once: one 200, forty-nine 409.
fn assert_one_of_fifty_verifies_wins(daemon: &Daemon) {
    let code = daemon.create_code("race", "393331234567");
    let statuses = concurrently(
        &[daemon],
        50,
        |_| json!({"op": "verify", "token": "race", "code": code}),
    );
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    assert_eq!(count(&statuses, 409), 49, "{statuses:?}");
}

/// One runtime worker: the janitor's batches (which hand their worker over while they
/// run) and the group commit still let every request through.
#[test]
fn one_worker_thread_serves_concurrent_requests() {
    let daemon = Daemon::start(
        "[server]\nworker_threads = 1\n[otp]\nretain_secs = 0\n[janitor]\ninterval_secs = 1\n",
    );
    daemon.create_short_code("short", "393331000009");
    assert_one_of_fifty_verifies_wins(&daemon);
    wait_for("the janitor to purge the short code", || {
        daemon.stats()["expired"] == 1
    });
}

fn codes_survive_sigterm_and_sigkill(engine: Engine) {
    let mut daemon = engine.start(NO_COOLDOWN);
    let code = daemon.create_code("term", "393331234567");
    assert!(daemon.stop().success(), "SIGTERM exits 0");
    assert!(!daemon.socket.exists(), "socket removed on clean exit");
    if engine == Engine::Fjall {
        // The stop wrote the memtables out as tables, and removed the journals that
        // held them: the next start has nothing to replay.
        let files = |dir: &str| std::fs::read_dir(daemon.dir.path().join(dir)).unwrap();
        assert_eq!(files("db/partitions/tokens-2/segments").count(), 1);
        assert_eq!(files("db/journals").count(), 1, "journals left to replay");
    }
    daemon.spawn();
    assert_eq!(daemon.verify("term", &code)["status"], 200);

    let killed = daemon.create_code("kill", "393339999999");
    daemon.kill();
    daemon.spawn();
    assert_eq!(
        daemon.verify("kill", &killed)["status"],
        200,
        "acknowledged create survives kill -9"
    );
    assert_eq!(
        daemon.verify("term", &code)["status"],
        409,
        "acknowledged verify survives"
    );
}

#[test]
fn sigint_stops_the_daemon_as_sigterm_does() {
    use nix::sys::signal::{Signal, kill};
    let mut daemon = Daemon::start(NO_COOLDOWN);
    let code = daemon.create_code("int", "393331234567");
    kill(daemon.pid(), Signal::SIGINT).unwrap();
    assert!(daemon.wait_exit().success(), "SIGINT exits 0");
    assert!(!daemon.socket.exists(), "socket removed on clean exit");
    daemon.spawn();
    assert_eq!(daemon.verify("int", &code)["status"], 200);
}

/// A daemon whose socket file was deleted, and another started on the same path
/// meanwhile: the first one's stop leaves the second one's socket alone.
#[test]
fn a_stop_removes_only_the_socket_file_its_daemon_made() {
    let mut first = Daemon::start("");
    std::fs::remove_file(&first.socket).unwrap();
    let mut second = Daemon::prepare("", "", "");
    second.socket = first.socket.clone();
    second.spawn();
    assert!(first.stop().success());
    assert!(
        second.socket.exists(),
        "the second daemon's socket was removed"
    );
    assert_eq!(second.call(json!({"op": "ping"}))["status"], 200);
    assert!(second.stop().success());
    assert!(
        !second.socket.exists(),
        "a daemon removes its own socket file"
    );
}

/// SIGHUP (logrotate's habit) and SIGUSR1/2 would otherwise end the daemon on the spot,
/// silently, and to systemd cleanly, so that it would not be restarted.
#[test]
fn sighup_and_sigusr_are_logged_and_ignored() {
    use nix::sys::signal::{Signal, kill};
    let mut daemon = Daemon::start(NO_COOLDOWN);
    let code = daemon.create_code("hup", "393331234567");
    for signal in [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2] {
        kill(daemon.pid(), signal).unwrap();
        let logged = format!(
            "signal ignored: otpd has no reload; restart it to apply a new configuration signal=\"{signal}\""
        );
        wait_for(&logged, || daemon.stderr().contains(&logged));
    }
    assert_eq!(daemon.verify("hup", &code)["status"], 200);
    assert!(daemon.stop().success());
}

#[test]
fn a_log_file_open_to_others_is_named_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let mut daemon = Daemon::start(NO_COOLDOWN);
    let created = std::fs::metadata(&daemon.log_file).unwrap().permissions();
    assert_eq!(created.mode() & 0o777, 0o600, "created owner-only");
    assert!(!daemon.stderr().contains("readable by group or others"));
    assert!(daemon.stop().success());
    let open = std::fs::Permissions::from_mode(0o644);
    std::fs::set_permissions(&daemon.log_file, open).unwrap();
    daemon.spawn();
    assert!(
        daemon.stderr().contains(
            "delivery.log_file (it receives the codes) is readable by group or others; chmod 600 it"
        ),
        "{}",
        daemon.stderr()
    );
}

/// A database whose secret file went missing (a restore without it) or was replaced
/// is refused at start, naming both: with another secret every right code would be
/// answered 404 and count as a wrong guess. Once the file is back, the codes verify.
#[test]
fn a_lost_or_replaced_secret_file_is_refused_and_its_codes_verify_once_it_is_back() {
    let mut daemon = Daemon::start("");
    let code = daemon.create_code("kept", "393331230001");
    assert!(daemon.stop().success());
    let secret_file = daemon.dir.path().join("secret.key");
    let secret = std::fs::read(&secret_file).unwrap();

    std::fs::remove_file(&secret_file).unwrap();
    let refused = daemon.start_refused();
    assert!(
        refused.contains("holds codes made with another server secret")
            && refused.contains("which was missing"),
        "{refused}"
    );
    assert!(!secret_file.exists(), "the drawn secret was kept");

    std::fs::write(&secret_file, [7; 32]).unwrap();
    let refused = daemon.start_refused();
    let db = daemon.dir.path().join("db");
    assert!(
        refused.contains(&format!(
            "{}: holds codes made with another server secret than {}",
            db.display(),
            secret_file.display()
        )),
        "{refused}"
    );

    std::fs::write(&secret_file, secret).unwrap();
    daemon.spawn();
    assert_eq!(daemon.verify("kept", &code)["status"], 200);
}

fn database_holds_neither_codes_nor_the_secret(engine: Engine) {
    // Ten digits: no run of the database's other bytes matches one by chance.
    let mut daemon = engine.start("[otp]\nresend_cooldown_secs = 0\ncode_length = 10\n");
    let mut issued = Vec::new();
    for i in 0..20 {
        let token = format!("scan{i}");
        issued.push((
            token.clone(),
            daemon.create_code(&token, &format!("39333100{i:04}")),
        ));
    }
    let reference = daemon.reference_for("scan7");
    assert!(daemon.stop().success());
    let secret = std::fs::read(daemon.dir.path().join("secret.key")).unwrap();
    assert_eq!(secret.len(), 32);
    let mode = std::fs::metadata(daemon.dir.path().join("secret.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut db = Vec::new();
    let db_dir = daemon.dir.path().join("db");
    for entry in walk(&db_dir).into_iter().chain([db_dir.clone()]) {
        let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is open to others", entry.display());
        if entry.is_file() {
            db.extend(std::fs::read(entry).unwrap());
        }
    }
    assert!(db.len() > 1000, "database files were read");
    assert!(
        contains(&db, reference.as_bytes()),
        "records hold their delivery ids as they are, so the scan would see codes beside them"
    );
    assert!(
        !contains(&db, &secret),
        "server secret found in the database"
    );
    for (token, code) in &issued {
        assert_eq!(code.len(), 10);
        assert!(
            !contains(&db, code.as_bytes()),
            "code of {token} found in the database"
        );
    }
}

/// A database whose files are there but open empty is refused, not taken for a new one
/// that would answer 404 to every code it held: sled recovers its log up to the first
/// damaged block (here the first), and fjall opens a directory whose partitions are
/// gone. Without a secret file as well it is what a first start cut short leaves (the
/// secret is kept only once the store is open), and starts afresh.
fn a_database_whose_files_open_empty_is_refused(engine: Engine) {
    let mut daemon = engine.start("");
    daemon.create_code("lost", "393331230002");
    assert!(daemon.stop().success());
    let db = daemon.dir.path().join("db");
    if engine == Engine::Sled {
        let log = std::fs::OpenOptions::new().write(true).open(db.join("db"));
        std::io::Write::write_all(&mut log.unwrap(), &[0; 4096]).unwrap();
    } else {
        for partition in std::fs::read_dir(db.join("partitions")).unwrap() {
            std::fs::remove_dir_all(partition.unwrap().path()).unwrap();
        }
    }
    let refused = daemon.start_refused();
    assert!(
        refused.contains(&format!("{}: holds ", db.display()))
            && refused.contains("database files, but they open empty"),
        "{refused}"
    );
    std::fs::remove_file(daemon.dir.path().join("secret.key")).unwrap();
    daemon.spawn();
    assert_eq!(daemon.verify("lost", "123456")["status"], 404);
    daemon.create_code("new", "393331230003");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn janitor_purges_due_items_and_keeps_the_rest() {
    let daemon = Daemon::start(
        "[otp]\nresend_cooldown_secs = 0\nretain_secs = 1\nsend_window_secs = 1\n[janitor]\ninterval_secs = 1\n",
    );
    let long_code = daemon.create_code("long", "393331000002");
    assert_eq!(daemon.stats()["live"], 1);
    // Counted no longer than its 1 s: the janitor may have expired it by the next line.
    let short_code = daemon.create_short_code("short", "393331000001");
    // short: expires after 1 s and is purged 1 s later (retain), then its token goes;
    // both recipients leave the 1 s send window. long's code and token stay.
    wait_for("the janitor to purge the short code", || {
        daemon.call(json!({"op": "status", "token": "short"}))["status"] == 404
    });
    assert_eq!(
        daemon.verify("short", &short_code)["status"],
        404,
        "purged item is gone"
    );
    wait_for("code, token and two recipients purged", || {
        daemon.stats()["purged"] == 4
    });
    assert_eq!(daemon.stats()["expired"], 1);
    assert_eq!(daemon.stats()["live"], 1, "only the long code is live");
    let status = daemon.call(json!({"op": "status", "token": "long"}));
    assert_eq!(
        status["state"], "pending",
        "item not yet due stays: {status}"
    );
    assert_eq!(daemon.verify("long", &long_code)["status"], 200);
}

fn bad_input_gets_its_error_and_harms_nobody(engine: Engine) {
    let daemon = engine.start("[server]\nmax_request_bytes = 1024\n");
    let mut bystander = daemon.connect();
    let mut conn = daemon.connect();
    let cases: Vec<(&[u8], u64, &str, &str)> = vec![
        (b"{not json\n", 400, "bad_json", ""),
        (b"\n", 400, "bad_json", "empty"),
        (b"[1,2]\n", 400, "bad_json", "object"),
        (b"\xff\xfe\x00garbage\x01\n", 400, "bad_json", ""),
        (b"{\"op\":\"fly\"}\n", 400, "unknown_op", "op"),
        (b"{\"token\":\"x\"}\n", 400, "bad_request", "op"),
        (b"{\"op\":\"verify\",\"token\":\"x\"}\n", 400, "bad_request", "code"),
        (b"{\"op\":\"verify\",\"token\":7,\"code\":\"123456\"}\n", 400, "bad_request", "token"),
        (b"{\"op\":\"verify\",\"token\":\"x\",\"code\":\"12a456\"}\n", 400, "bad_request", "code"),
        (b"{\"op\":\"verify\",\"token\":\"a b\",\"code\":\"123456\"}\n", 400, "bad_request", "token"),
        (b"{\"op\":\"create\",\"token\":\"x\"}\n", 400, "bad_request", "to"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"12\"}}\n", 400, "bad_request", "to.sms"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"393331234567\"},\"ttl_secs\":9999}\n", 400, "bad_request", "ttl_secs"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"393331234567\"},\"code_length\":3}\n", 400, "bad_request", "code_length"),
        // Too short a validity for the SMS to wait for the Messenger message to be read.
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"393331234567\",\"messenger\":\"8192836451\"},\"ttl_secs\":29}\n", 400, "bad_request", "ttl_secs: a code sent by Messenger with an SMS failover needs at least 30 s"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"393331234567\"},\"ttl_secs\":1e400}\n", 400, "bad_json", "ttl_secs: number out of range"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"phoneNumber\":true}\n", 400, "bad_request", "phoneNumber"),
        (b"{\"op\":\"ping\",\"extra\":1}\n", 400, "bad_request", "extra"),
        (b"{\"op\":\"create\",\"id\":\"\\ud800\",\"token\":\"x\"}\n", 400, "bad_json", "id: a \\u escape of a lone UTF-16 surrogate"),
        (b"{\"Op\":\"ping\"}\n", 400, "bad_request", "Op: unknown field"),
        (b"{\"op\":\"ping\",\"op\":\"stats\"}\n", 400, "bad_request", "op: given twice"),
        (b"{\"op\":\"create\",\"token\":\"x\",\"to\":{\"sms\":\"393331234567\",\"sms\":\"393331234598\"}}\n", 400, "bad_request", "to.sms: given twice"),
    ];
    for (line, status, error, field) in cases {
        let answer = {
            conn.send_raw(line);
            conn.receive()
                .expect("the connection stays open after bad input")
        };
        let shown = String::from_utf8_lossy(line);
        assert_eq!(answer["status"], status, "{shown}: {answer}");
        assert_eq!(answer["ok"], false, "{shown}: {answer}");
        assert_eq!(answer["error"], error, "{shown}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{shown}: {answer}"
        );
        assert_eq!(bystander.call(json!({"op": "ping"}))["status"], 200);
    }
    assert_eq!(
        conn.call(json!({"op": "ping"}))["status"],
        200,
        "still serving"
    );

    let mut big = vec![b'x'; 2000];
    big.push(b'\n');
    conn.send_raw(&big);
    let answer = conn.receive().unwrap();
    assert_eq!(answer["status"], 413, "{answer}");
    assert_eq!(answer["error"], "request_too_large");
    assert!(conn.is_closed(), "413 closes the connection");
    assert_eq!(bystander.call(json!({"op": "ping"}))["status"], 200);
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
}

fn refused_peer_gets_403_and_is_closed(engine: Engine) {
    let uid = nix::unistd::getuid().as_raw();
    let daemon = engine.start(&format!("[server]\nallowed_uids = [{}]\n", uid + 1));
    let mut conn = daemon.connect();
    let answer = conn.receive().expect("one 403 line");
    assert_eq!(answer["status"], 403, "{answer}");
    assert_eq!(answer["error"], "forbidden");
    assert!(conn.is_closed());
    let log = daemon.stderr();
    assert!(
        log.contains(&format!("uid={uid}")) && log.contains("pid="),
        "refusal logged: {log}"
    );
}

fn allowed_peer_by_uid_is_served(engine: Engine) {
    let uid = nix::unistd::getuid().as_raw();
    let daemon = engine.start(&format!("[server]\nallowed_uids = [{uid}]\n"));
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
}

/// `adduser alice otpd` gives alice the group as a supplementary one, not her primary.
/// Connecting as another user takes root (CI runs as root); elsewhere this says so and
/// checks nothing.
#[test]
fn a_peer_allowed_by_a_supplementary_group_is_served() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: connecting as another user needs root");
        return;
    }
    let daemon = Daemon::start("[server]\nallowed_gids = [4321]\nsocket_mode = \"0666\"\n");
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ping_with_groups = |groups: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534"])
            .arg(format!("--groups={groups}"))
            .args([env!("CARGO_BIN_EXE_otpd"), "ping", "--socket"])
            .arg(&daemon.socket)
            .output()
            .expect("setpriv (util-linux)")
    };
    let allowed = ping_with_groups("100,4321");
    assert!(allowed.status.success(), "{allowed:?}");
    // Refusals are logged once a second, and the start's own check (as root) was
    // refused just now: the next second's is logged.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let refused = ping_with_groups("100,4322");
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        daemon.stderr().contains("refused a peer") && daemon.stderr().contains("uid=65534"),
        "{}",
        daemon.stderr()
    );
}

fn a_thousand_pipelined_requests_are_answered_in_order(engine: Engine) {
    let daemon = engine.start("");
    let mut conn = daemon.connect();
    let mut batch = Vec::new();
    for i in 0..1000 {
        let request = if i % 2 == 0 {
            json!({"op": "ping", "id": i})
        } else {
            json!({"op": "verify", "id": i, "token": format!("none{i}"), "code": "123456"})
        };
        batch.extend(serde_json::to_vec(&request).unwrap());
        batch.push(b'\n');
    }
    conn.send_raw(&batch);
    for i in 0..1000 {
        let answer = conn.receive().expect("answer");
        assert_eq!(answer["id"], i, "{answer}");
        assert_eq!(answer["status"], if i % 2 == 0 { 200 } else { 404 });
    }
}

fn answers_still_arrive_after_the_client_half_closes(engine: Engine) {
    let daemon = engine.start("");
    let mut conn = daemon.connect();
    conn.send_raw(b"{\"op\":\"ping\",\"id\":1}\n{\"op\":\"stats\",\"id\":2}");
    conn.shutdown_write();
    assert_eq!(conn.receive().unwrap()["id"], 1);
    assert_eq!(
        conn.receive().unwrap()["id"],
        2,
        "a last line without newline is answered"
    );
    assert!(conn.is_closed());
}

fn socket_mode_is_applied_and_a_live_daemon_is_not_replaced(engine: Engine) {
    let daemon = engine.start("[server]\nsocket_mode = \"0600\"\n");
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let other = daemon.dir.path().join("other");
    let stderr = refused_start(&[
        "--socket".as_ref(),
        daemon.socket.as_ref(),
        "--data-dir".as_ref(),
        other.as_ref(),
    ]);
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
}

/// The data directory holds the secret and the socket: one otpd creates is its own
/// user's alone even under `umask 000`; one that exists keeps its mode.
#[test]
fn a_directory_otpd_creates_is_0755_whatever_the_umask() {
    // The HTTP socket's directory is made after the daemon set its own umask (077).
    let mut daemon = Daemon::prepare("", "[http]\nlisten = \"unix:{dir}/web/http.sock\"\n", "");
    let data = daemon.dir.path().join("new/data");
    daemon.socket = data.join("otpd.sock");
    let serve = |daemon: &Daemon| {
        let mut command = daemon.command_with_umask(env!("CARGO_BIN_EXE_otpd"), 0o000);
        command
            .args(["serve", "--config"])
            .arg(&daemon.config_path)
            .arg("--data-dir")
            .arg(&data);
        command
    };
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    daemon.launch(serve(&daemon));
    daemon.wait_until_ready();
    assert_eq!(mode(&data), 0o755);
    assert_eq!(mode(data.parent().unwrap()), 0o755, "a missing parent too");
    assert_eq!(mode(&data.join("secret.key")), 0o600);
    assert_eq!(mode(&data.join("db")), 0o700);
    assert_eq!(mode(&daemon.dir.path().join("web")), 0o755);

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    assert!(daemon.stop().success());
    daemon.launch(serve(&daemon));
    daemon.wait_until_ready();
    assert_eq!(mode(&data), 0o750);
}

fn a_stale_socket_file_is_replaced(engine: Engine) {
    let mut daemon = engine.start("");
    daemon.kill();
    assert!(daemon.socket.exists(), "kill -9 leaves the socket file");
    daemon.spawn();
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
}

#[test]
fn bad_config_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        ("[otp]\ncode_lenght = 6\n", "code_lenght"),
        ("[otp]\nttl_secs = 0\n", "otp.ttl_secs"),
        ("[server]\nsocket_mode = \"rw\"\n", "server.socket_mode"),
        ("[delivery]\nbackend = \"pigeon\"\n", "delivery.backend"),
        // A Vonage section the log backend does not use is checked all the same.
        (
            "[delivery.messages]\nfailover_secs = 5\n",
            "delivery.messages.failover_secs",
        ),
        (
            "[delivery]\nbackend = \"dispatch\"\n",
            "delivery.dispatch.application_id",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let data_dir = dir.path().join("data");
        let stderr = refused_start(&[
            "--config".as_ref(),
            path.as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_ref(),
        ]);
        assert!(stderr.contains(key), "{toml}: {stderr}");
        // Refused before anything was made: no secret, database or socket.
        assert!(!data_dir.exists(), "{toml}: {data_dir:?} was created");
    }
}

fn cli_client_commands(engine: Engine) {
    let daemon = engine.start("");
    let otpd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_otpd"))
            .args(args)
            .arg("--socket")
            .arg(&daemon.socket)
            .output()
            .unwrap()
    };
    let out = otpd(&["create", "cli", "--ttl", "120"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--sms <SMS>|--messenger <MESSENGER>"),
        "a create without a recipient names both flags: {stderr}"
    );
    let out = otpd(&[
        "create",
        "cli",
        "--sms",
        "+393331234567",
        "--ttl-secs",
        "120",
        "--code-length",
        "8",
    ]);
    assert!(out.status.success());
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["status"], 201);
    let code = daemon.code_for("cli");
    assert_eq!(code.len(), 8, "--code-length reaches the daemon");
    let out = otpd(&[
        "create",
        "cli-ttl",
        "--sms",
        "+393331234567",
        "--ttl",
        "86401",
    ]);
    let refused: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        refused["status"], 400,
        "--ttl reaches the daemon: {refused}"
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("ttl_secs: "),
        "named as the flag --ttl-secs is: {refused}"
    );
    let out = otpd(&["verify", "cli", "000"]);
    assert!(!out.status.success(), "bad code exits non-zero");
    let out = otpd(&["verify", "cli", &code]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = otpd(&["verify", "cli", &code]);
    assert!(!out.status.success(), "409 exits non-zero");
    let status: Value = serde_json::from_slice(&otpd(&["status", "cli"]).stdout).unwrap();
    assert_eq!(status["state"], "verified");
    assert!(otpd(&["ping"]).status.success());
    let stats: Value = serde_json::from_slice(&otpd(&["stats"]).stdout).unwrap();
    assert_eq!(stats["verified"], 1);
    assert!(
        !otpd(&["cancel", "cli"]).status.success(),
        "nothing pending to cancel"
    );
}

fn an_answer_is_not_held_back_by_the_start_of_the_next_request(engine: Engine) {
    let daemon = engine.start("");
    let mut conn = daemon.connect();
    conn.send_raw(b"{\"op\":\"ping\",\"id\":1}\n{\"op\":\"pi");
    assert_eq!(conn.receive().expect("the first answer")["id"], 1);
    conn.send_raw(b"ng\",\"id\":2}\n");
    assert_eq!(conn.receive().expect("the second answer")["id"], 2);
}

fn codes_do_not_reach_the_log_outside_the_delivery_line(engine: Engine) {
    // Ten digits, so that no timestamp or id in the log matches by chance.
    let daemon = engine.start("[otp]\ncode_length = 10\n");
    let code = daemon.create_code("quiet", "393331234567");
    daemon.verify("quiet", &code);
    daemon.verify("quiet", "0000000000");
    let log = daemon.stderr();
    let mentions: Vec<&str> = log.lines().filter(|l| l.contains(&code)).collect();
    assert_eq!(
        mentions.len(),
        1,
        "only the log backend's line shows the code: {mentions:?}"
    );
    assert!(mentions[0].contains("would send") && mentions[0].contains("token=quiet"));
    assert!(mentions[0].contains(&format!("code={code}")));
}

per_engine!([sled, fjall, redis, redis_cluster] {
    create_verify_and_the_answers_that_follow,
    tutorial_body_at_top_level_and_inside_to,
    expired_code_answers_410,
    every_expiry_is_counted,
    a_new_create_replaces_the_live_code,
    cancel_ends_the_code,
    rate_limits_per_recipient_and_cooldown,
    guessing_locks_the_token,
    lock_ends_and_clears_the_count,
    a_lock_outlives_its_purged_code_in_status,
    fifty_concurrent_verifies_exactly_one_wins,
    codes_survive_sigterm_and_sigkill,
    bad_input_gets_its_error_and_harms_nobody,
    refused_peer_gets_403_and_is_closed,
    allowed_peer_by_uid_is_served,
    a_thousand_pipelined_requests_are_answered_in_order,
    answers_still_arrive_after_the_client_half_closes,
    an_answer_is_not_held_back_by_the_start_of_the_next_request,
    socket_mode_is_applied_and_a_live_daemon_is_not_replaced,
    a_stale_socket_file_is_replaced,
    cli_client_commands,
    codes_do_not_reach_the_log_outside_the_delivery_line,
});

/// `relaxed` acknowledges a write before it is on disk and persists it within 500 ms
/// in the background: once that is past, a killed daemon (the kernel's page cache
/// intact) has lost nothing.
fn relaxed_durability_persists_in_the_background(engine: Engine) {
    let store = engine.store_toml() + "durability = \"relaxed\"\n";
    let mut daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("relaxed", "393331234567");
    thread::sleep(Duration::from_secs(2));
    daemon.kill();
    daemon.spawn();
    assert_eq!(daemon.verify("relaxed", &code)["status"], 200);
}

/// Tests of the embedded engines alone: their files, and relaxed durability.
mod embedded {
    use super::{
        a_database_whose_files_open_empty_is_refused, database_holds_neither_codes_nor_the_secret,
        relaxed_durability_persists_in_the_background,
    };

    crate::per_engine!([sled, fjall] {
        a_database_whose_files_open_empty_is_refused,
        database_holds_neither_codes_nor_the_secret,
        relaxed_durability_persists_in_the_background,
    });
}

/// The engine the daemon's last start says it opened.
fn engine_opened(daemon: &Daemon) -> String {
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .rfind(|line| line.contains("opening the store"))
        .unwrap_or_else(|| panic!("no store opened:\n{stderr}"));
    line.split("engine=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// With `store.engine` unset a new database is fjall's, and a sled database from
/// before (sled was the default) keeps opening with sled, its codes intact.
#[test]
fn an_unset_engine_is_fjall_for_a_new_database_and_sled_for_an_old_one() {
    let fresh = Daemon::start("");
    assert_eq!(engine_opened(&fresh), "fjall");
    assert!(
        fresh.dir.path().join("db/version").is_file(),
        "fjall's marker file"
    );

    let mut old = Engine::Sled.start("");
    assert_eq!(engine_opened(&old), "sled");
    let code = old.create_code("kept", "+15550001");
    old.stop();
    let config = std::fs::read_to_string(&old.config_path).unwrap();
    let unset = config.replace("engine = \"sled\"\n", "");
    assert_ne!(config, unset, "the engine was named");
    std::fs::write(&old.config_path, unset).unwrap();
    old.spawn();
    assert_eq!(engine_opened(&old), "sled");
    assert_eq!(old.verify("kept", &code)["status"], 200);
}

/// `otpd bench` against a real daemon: it learns codes from the log backend's file,
/// every request gets its expected answer, and it finds the daemon for its RSS and CPU.
#[test]
fn the_benchmark_runs_against_the_daemon() {
    let daemon = Daemon::start("[otp]\nresend_cooldown_secs = 0\n");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_otpd"))
        .args(["bench", "--clients", "2", "--total", "200", "--socket"])
        .arg(&daemon.socket)
        .arg("--codes-file")
        .arg(&daemon.log_file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}{output:?}");
    assert!(
        report.contains("[201:200]"),
        "200 creates, all 201: {report}"
    );
    assert!(
        report.contains("[200:200]"),
        "200 verifies, all 200: {report}"
    );
    assert!(report.contains("daemon RSS after:"), "{report}");
    assert!(
        report.contains("µs a request"),
        "the daemon's CPU: {report}"
    );
    assert_eq!(daemon.stats()["verified"], 200);
}
