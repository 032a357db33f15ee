//! The Redis engine's own promises: several otpd hosts on one Redis (or Redis Cluster)
//! answer as one, a host with another secret or no Redis refuses to start (the latter
//! keeping no secret it drew), Redis holds no code, and keys expire by themselves.

mod common;

use std::thread;
use std::time::Duration;

use common::{
    Daemon, Engine, OwnedRedis, ProxiedCluster, RedisCluster, RedisSentinel, RedisServer, RedisTls,
    TwoNodeCluster, concurrently, count, wait_for,
};
use otpd::rules::{CodeState, DeliveryEvent, FailoverVerdict, VerifyOutcome, now_ms};
use otpd::store::{Filed, Store};
use serde_json::json;

const NO_COOLDOWN: &str = "[otp]\nresend_cooldown_secs = 0\n";

/// Two hosts on one store: `a`, then `b` with a copy of `a`'s secret.
fn two_hosts(engine: Engine, extra: &str) -> (Daemon, Daemon) {
    let a = engine.start(extra);
    let b = Daemon::start_beside(&a, extra);
    (a, b)
}

fn wrong(code: &str) -> String {
    format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000)
}

/// The `[store]` TOML of the Redis engine, `keys` being its `[store.redis]` lines.
fn redis_store(keys: &str) -> String {
    format!("[store]\nengine = \"redis\"\n[store.redis]\n{keys}")
}

/// With Redis Sentinel, otpd asks the Sentinel for the master, and asks again when the
/// master dies: after the failover it serves on, and a code created before it verifies.
#[test]
fn a_sentinel_failover_is_followed() {
    let mut sentinel = RedisSentinel::start();
    let store = redis_store(&format!(
        "sentinels = [\"{}\"]\nsentinel_master = \"{}\"\nresponse_timeout_ms = 500\n",
        sentinel.url(),
        RedisSentinel::MASTER
    ));
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("before", "393331234567");
    sentinel.kill_master();
    let mut attempt = 0;
    wait_for("otpd to reach the promoted replica", || {
        attempt += 1;
        let answer = daemon.call(json!({
            "op": "create", "token": format!("after{attempt}"),
            "to": {"sms": format!("3933310{attempt:05}")}
        }));
        assert!(
            [201, 500].contains(&answer["status"].as_u64().unwrap()),
            "only storage errors while the master is away: {answer}"
        );
        answer["status"] == 201
    });
    let first = daemon.verify("before", &code);
    assert_eq!(first["status"], 200, "{first}\n{}", daemon.stderr());
    assert_eq!(daemon.verify("before", &code)["status"], 409);
    assert!(
        daemon
            .stderr()
            .contains("reconnected to the master the Redis Sentinels name"),
        "{}",
        daemon.stderr()
    );
}

/// `rediss://` with the CA of the server's certificate in `tls_ca_file`; without it
/// the certificate is not trusted and start-up stops, naming Redis.
#[test]
fn a_tls_redis_is_reached_with_its_ca() {
    let redis = RedisTls::start();
    let store = |extra: &str| redis_store(&format!("url = \"{}\"\n{extra}", redis.url()));
    let mut untrusting = Daemon::prepare(&store(""), NO_COOLDOWN, "");
    let error = untrusting.start_refused();
    assert!(
        error.contains(&format!("cannot reach Redis at {}", redis.url())),
        "{error}"
    );

    let ca = format!("tls_ca_file = \"{}\"\n", RedisTls::ca_file().display());
    let daemon = Daemon::start_on(&store(&ca), NO_COOLDOWN, "");
    let code = daemon.create_code("over-tls", "393331234567");
    assert_eq!(daemon.verify("over-tls", &code)["status"], 200);
}

/// A master behind a password is reached through the Sentinels with
/// `master_password`, and refused without it, naming the cause.
#[test]
fn a_password_protected_master_is_reached_with_master_password() {
    let sentinel = RedisSentinel::start_with_password(Some("s3cret-pw"));
    let store = |login: &str| {
        redis_store(&format!(
            "sentinels = [\"{}\"]\nsentinel_master = \"{}\"\n{login}",
            sentinel.url(),
            RedisSentinel::MASTER
        ))
    };
    let mut refused = Daemon::prepare(&store(""), NO_COOLDOWN, "");
    let error = refused.start_refused();
    assert!(error.contains("cannot reach Redis"), "{error}");

    let daemon = Daemon::start_on(&store("master_password = \"s3cret-pw\"\n"), NO_COOLDOWN, "");
    let code = daemon.create_code("behind-a-password", "393331234567");
    assert_eq!(daemon.verify("behind-a-password", &code)["status"], 200);
    assert!(
        !daemon.stderr().contains("s3cret-pw"),
        "the password reached the log"
    );
}

/// With `min_replicas`, a change is acknowledged only once a replica holds it (`WAIT`),
/// and answers 500 when none confirms it in time.
#[test]
fn acknowledged_changes_wait_for_a_replica() {
    let mut redis = RedisSentinel::start();
    let store = redis_store(&format!(
        "url = \"{}\"\nmin_replicas = 1\nreplica_timeout_ms = 1500\n",
        redis.master_url()
    ));
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("replicated", "393331234567");
    assert_eq!(daemon.verify("replicated", &code)["status"], 200);

    redis.kill_replica();
    let answer =
        daemon.call(json!({"op": "create", "token": "alone", "to": {"sms": "393331234568"}}));
    assert_eq!(answer["status"], 500, "{answer}");
    let log = daemon.stderr();
    assert!(
        log.contains("0 of the 1 replicas store.redis.min_replicas asks for confirmed the change within 1500 ms"),
        "{log}"
    );
    // Refused before it was sent: no code the person would get and a failover lose.
    let sent = std::fs::read_to_string(&daemon.log_file).unwrap();
    assert!(!sent.contains(r#""token":"alone""#), "{sent}");
}

/// The Redis engine opened directly, as a daemon on `engine` would open it, for the
/// store operations the socket cannot reach; each `connect` is one more host.
struct DirectStore {
    config: otpd::config::Config,
}

impl DirectStore {
    fn new(engine: Engine) -> Self {
        Self::on(&engine.store_toml(), "")
    }

    /// On the store `store_toml` describes, with `otp` lines added to `[otp]`.
    fn on(store_toml: &str, otp: &str) -> Self {
        // No resend cooldown: a test resends at once.
        let toml = format!("[otp]\nresend_cooldown_secs = 0\n{otp}{store_toml}");
        let config = otpd::config::Config::parse(&toml).unwrap();
        Self { config }
    }

    async fn connect_with(
        &self,
        secret: [u8; 32],
    ) -> Result<otpd::store::redis::RedisStore, otpd::store::StoreError> {
        otpd::store::redis::RedisStore::connect(
            &self.config.store.redis,
            otpd::rules::Limits::from(&self.config.otp),
            &otpd::secret::ServerSecret::from_bytes(secret),
        )
        .await
    }

    async fn connect(&self) -> otpd::store::redis::RedisStore {
        self.connect_with([7; 32]).await.unwrap()
    }

    /// Runs `test` on this store, on a runtime of its own.
    fn run(&self, test: impl AsyncFnOnce(&Self)) {
        tokio::runtime::Runtime::new().unwrap().block_on(test(self));
    }
}

/// A new code for `token` by SMS to `number`, valid for five minutes from `now`.
fn new_code(token: &str, digest: u8, number: &str, now: u64) -> otpd::store::NewCode {
    otpd::store::NewCode {
        token: token.into(),
        digest: otpd::code::Digest([digest; 16]),
        recipients: vec![format!("sms:{number}")],
        channels: vec![otpd::rules::Channel::Sms],
        created_at: now,
        expires_at: now + 300_000,
    }
}

/// `new_code(token, digest, number, now)`, created and confirmed delivered as
/// `uuid-{token}`.
async fn delivered(
    store: &otpd::store::redis::RedisStore,
    token: &str,
    digest: u8,
    number: &str,
    now: u64,
) -> otpd::store::NewCode {
    let new = new_code(token, digest, number, now);
    store.create(&new, now).await.unwrap().unwrap();
    let reference = format!("uuid-{token}");
    let counts = store.confirm_delivery(token, &new.digest, &reference, now);
    assert!(counts.await.unwrap(), "{token} delivered");
    new
}

/// The pending SMS failover to `to` of `token`'s code, delivered as `uuid-{token}`.
fn pending_failover(token: &str, to: &str, due_at: u64) -> otpd::rules::PendingFailover {
    otpd::rules::PendingFailover {
        reference: format!("uuid-{token}"),
        due_at,
        token: token.into(),
        to: to.into(),
        sealed_text: vec![1, 2, 3],
    }
}

fn create_on_one_host_verify_on_another(engine: Engine) {
    let (a, b) = two_hosts(engine, "[janitor]\ninterval_secs = 1\n");
    let code = a.create_code("shared", "393331234567");
    assert_eq!(b.verify("shared", &code)["status"], 200);
    assert_eq!(a.verify("shared", &code)["status"], 409);
    let status = a.call(json!({"op": "status", "token": "shared"}));
    assert_eq!(status["state"], "verified", "{status}");
    assert!(
        a.stderr().contains("appendonly no"),
        "the test Redis keeps nothing on disk, and otpd says so: {}",
        a.stderr()
    );

    // `live` counts every host's codes once a janitor pass has looked.
    a.create_code("pending", "393339999999");
    wait_for("b's live count to see a's code", || b.stats()["live"] == 1);
    assert_eq!(
        b.call(json!({"op": "cancel", "token": "pending"}))["status"],
        200
    );
    wait_for("a's live count to see b's cancel", || {
        a.stats()["live"] == 0
    });
}

fn fifty_concurrent_verifies_across_two_hosts_one_wins(engine: Engine) {
    let (a, b) = two_hosts(engine, "");
    let code = a.create_code("race", "393331234567");
    let statuses = concurrently(
        &[&a, &b],
        50,
        |_| json!({"op": "verify", "token": "race", "code": code}),
    );
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    assert_eq!(count(&statuses, 409), 49, "{statuses:?}");
}

fn guessing_spread_across_hosts_still_locks(engine: Engine) {
    let extra = "[otp]\nresend_cooldown_secs = 0\nmax_attempts = 4\nlock_secs = 600\n";
    let (a, b) = two_hosts(engine, extra);
    let code = a.create_code("g", "393331234567");
    // Four wrong codes at once, two per host: the count is shared and exact.
    let guess = wrong(&code);
    let mut statuses = concurrently(
        &[&a, &b],
        4,
        |_| json!({"op": "verify", "token": "g", "code": guess}),
    );
    statuses.sort();
    assert_eq!(statuses, [404, 404, 404, 429]);
    for host in [&a, &b] {
        let right = host.verify("g", &code);
        assert_eq!(right["status"], 429, "locked on every host: {right}");
        let create =
            host.call(json!({"op": "create", "token": "g", "to": {"sms": "393331234567"}}));
        assert_eq!(create["error"], "too_many_attempts", "{create}");
    }
    let status = b.call(json!({"op": "status", "token": "g"}));
    assert_eq!(status["state"], "locked", "{status}");
    assert_eq!(status["attempts"], 4);
}

fn recipient_limits_hold_across_hosts_and_slots(engine: Engine) {
    let (a, b) = two_hosts(engine, "[otp]\nresend_cooldown_secs = 30\n");
    a.create_code("first", "393331111111");
    // Another token (another cluster slot), another host, same number: cooldown.
    let again = b.call(json!({"op": "create", "token": "second", "to": {"sms": "393331111111"}}));
    assert_eq!(again["status"], 429, "{again}");
    assert_eq!(again["error"], "rate_limited");

    // Concurrent creates for one number over many tokens and both hosts: one send.
    let (a, b) = two_hosts(engine, "[otp]\nresend_cooldown_secs = 30\n");
    let statuses = concurrently(
        &[&a, &b],
        20,
        |i| json!({"op": "create", "token": format!("tok{i}"), "to": {"sms": "393332222222"}}),
    );
    assert_eq!(count(&statuses, 201), 1, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 19, "{statuses:?}");
}

fn a_host_with_another_secret_refuses_to_start(engine: Engine) {
    let a = engine.start("");
    let mut b = Daemon::prepare(&a.store_toml, "", "");
    let stderr = b.start_refused();
    assert!(stderr.contains("server secret differs"), "{stderr}");
    assert!(!stderr.contains(&secret_hex(&a)), "secret leaked: {stderr}");
    // The secret b drew is not kept: the operator gives it a's, as the error says.
    let drawn = b.dir.path().join("secret.key");
    assert!(!drawn.exists(), "{} was written", drawn.display());
    // Given its own secret file, b is refused all the same, and it is not leaked.
    std::fs::write(&drawn, [7u8; 32]).unwrap();
    let stderr = b.start_refused();
    assert!(stderr.contains("server secret differs"), "{stderr}");
    assert!(!stderr.contains(&secret_hex(&b)), "secret leaked: {stderr}");
    assert_eq!(a.call(json!({"op": "ping"}))["status"], 200);
}

/// Redis can lose the secret's fingerprint (a restart without persistence, a failover
/// to a replica without it, a `FLUSHALL`) while hosts run and make codes. A host whose
/// secret file is missing is then refused while codes are there, and a running host
/// records the fingerprint again at its next janitor pass, so that a host with another
/// secret file is refused again too.
#[test]
fn a_lost_secret_fingerprint_is_recorded_again_and_lets_no_other_secret_in() {
    let redis = OwnedRedis::start();
    let store = redis_store(&format!("url = \"{}\"\n", redis.url()));
    let mut a = Daemon::start_on(&store, "[janitor]\ninterval_secs = 1\n", "");
    let code = a.create_code("lost", "393331234567");
    let lose_fingerprint = || assert_eq!(redis.cli(&["DEL", "otpd:secret-check"]).trim(), "1");

    a.stop();
    lose_fingerprint();
    let mut drawn = Daemon::prepare(&store, "", "");
    let stderr = drawn.start_refused();
    assert!(
        stderr.contains("no server secret fingerprint") && stderr.contains("was missing"),
        "{stderr}"
    );
    assert!(!drawn.dir.path().join("secret.key").exists());

    a.spawn();
    lose_fingerprint();
    wait_for("a janitor pass to record the fingerprint again", || {
        !redis.cli(&["GET", "otpd:secret-check"]).trim().is_empty()
    });
    let mut other = Daemon::prepare(&store, "", "");
    std::fs::write(other.dir.path().join("secret.key"), [7u8; 32]).unwrap();
    let stderr = other.start_refused();
    assert!(stderr.contains("server secret differs"), "{stderr}");
    assert_eq!(a.verify("lost", &code)["status"], 200);
}

#[test]
fn unreachable_redis_stops_start_up_naming_it_and_leaves_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/none.sock", dir.path().display());
    let store = redis_store(&format!("url = \"{url}\"\n"));
    let mut host = Daemon::prepare(&store, "", "");
    let stderr = host.start_refused();
    assert!(
        stderr.contains("cannot reach Redis") && stderr.contains(&url),
        "{stderr}"
    );
    // The secret it drew is not kept: the operator may still give it the other hosts'.
    let secret = host.dir.path().join("secret.key");
    assert!(!secret.exists(), "{} was written", secret.display());
    let store = redis_store("url = \"redis://:hunter2@127.0.0.1:1\"\n");
    let stderr = Daemon::prepare(&store, "", "").start_refused();
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "password shown: {stderr}");
}

#[test]
fn a_redis_crash_fails_requests_until_it_is_back_and_loses_nothing() {
    let mut redis = OwnedRedis::start();
    let store = redis_store(&format!(
        "url = \"{}\"\nresponse_timeout_ms = 500\n",
        redis.url()
    ));
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("appendonly no") && !stderr.contains("before fsync"),
        "appendfsync always draws no warning: {stderr}"
    );
    assert!(
        !stderr.contains("clock differs"),
        "Redis on this host shares its clock: {stderr}"
    );
    assert!(
        !stderr.contains("evict"),
        "maxmemory-policy noeviction (Redis's default) draws no warning: {stderr}"
    );
    let code = daemon.create_code("crash", "393331234567");
    redis.kill();
    let answer = daemon.verify("crash", &code);
    assert_eq!(answer["status"], 500, "{answer}");
    assert_eq!(answer["error"], "internal_error");
    let log = daemon.stderr();
    assert!(
        log.contains(r#"op="verify" key="crash""#),
        "the failure is logged with what it met: {log}"
    );
    assert!(
        log.contains(&format!("redis at {}: ", redis.url())),
        "and with the Redis it failed on: {log}"
    );
    assert_eq!(daemon.stats()["storage_failed"], 1);
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
    redis.spawn();
    // Every pooled connection (4) is made again: none hands a request the outage's error.
    for _ in 0..8 {
        let answer = daemon.call(json!({"op": "status", "token": "crash"}));
        assert_eq!(answer["status"], 200, "once Redis is back: {answer}");
    }
    assert_eq!(
        daemon.verify("crash", &code)["status"],
        200,
        "the acknowledged create survived the Redis crash"
    );
}

/// A Redis of the test's own with an ACL user `otpd` held to `rules`, and the
/// `[store]` TOML that logs in as that user.
fn redis_with_login(rules: &[&str]) -> (OwnedRedis, String) {
    let redis = OwnedRedis::start();
    let mut acl = vec!["ACL", "SETUSER", "otpd", "on", ">otpd-pw"];
    acl.extend(rules);
    redis.cli(&acl);
    let store = redis_store(&format!(
        "url = \"{}?user=otpd&pass=otpd-pw\"\n",
        redis.url()
    ));
    (redis, store)
}

/// Start-up checks the Redis version, also for an ACL user without `@dangerous`
/// commands (the README's), which may not run `INFO`.
#[test]
fn an_acl_user_without_dangerous_commands_starts() {
    let (_redis, store) = redis_with_login(&["~*", "+@all", "-@dangerous"]);
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("acl", "393331234567");
    assert_eq!(daemon.verify("acl", &code)["status"], 200);
}

/// Every write is a script: a login that may not run them is refused at start-up,
/// naming what it lacks, instead of starting and failing every create.
#[test]
fn a_login_that_may_not_run_scripts_is_refused_at_start_up() {
    let (_redis, store) = redis_with_login(&["~*", "+@all", "-@dangerous", "-@scripting"]);
    let stderr = Daemon::prepare(&store, "", "").start_refused();
    assert!(
        stderr.contains("may not run otpd's scripts") && stderr.contains("+@scripting"),
        "{stderr}"
    );
}

/// A create whose token commit fails after its recipient's send was reserved sends
/// nothing, so it takes the send back: the next create for that number is not refused
/// by the cooldown. The failure: an ACL user that may write every key but that token's.
#[test]
fn a_create_that_fails_takes_back_the_send_it_reserved() {
    let (_redis, store) = redis_with_login(&[
        "+@all",
        "-@dangerous",
        "%R~*",
        "~otpd:r:*",
        "~otpd:live",
        "~otpd:secret-check",
        "~otpd:ref:*",
        "~otpd:{ok}*",
    ]);
    let daemon = Daemon::start_on(&store, "", "");
    let to = json!({"sms": "393331234567"});
    let failed = daemon.call(json!({"op": "create", "token": "blocked", "to": to}));
    assert_eq!(failed["status"], 500, "{failed}");
    let created = daemon.call(json!({"op": "create", "token": "ok", "to": to}));
    assert_eq!(created["status"], 201, "{created}");
}

/// A Redis that may evict otpd's keys is named at start-up, with what that costs.
#[test]
fn a_redis_that_may_evict_keys_is_warned_of() {
    let redis = OwnedRedis::start();
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
    let store = redis_store(&format!("url = \"{}\"\n", redis.url()));
    let daemon = Daemon::start_on(&store, "", "");
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("Redis may evict otpd's keys") && stderr.contains("volatile-lru"),
        "{stderr}"
    );
}

#[test]
fn connections_redis_closed_while_idle_cost_no_request() {
    let redis = OwnedRedis::start();
    // Redis closes a client idle for more than a second.
    redis.cli(&["CONFIG", "SET", "timeout", "1"]);
    let store = redis_store(&format!("url = \"{}\"\n", redis.url()));
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("idle", "393331234567");
    // Only redis-cli itself (this CLIENT LIST) is left once otpd's pool is closed.
    wait_for("Redis to close otpd's idle connections", || {
        redis.cli(&["CLIENT", "LIST"]).lines().count() == 1
    });
    for _ in 0..8 {
        let answer = daemon.call(json!({"op": "status", "token": "idle"}));
        assert_eq!(
            answer["status"], 200,
            "on a connection Redis closed: {answer}"
        );
    }
    assert_eq!(daemon.verify("idle", &code)["status"], 200);
    assert_eq!(daemon.stats()["storage_failed"], 0);
}

#[test]
fn a_refused_login_is_tried_again_until_redis_takes_it() {
    let redis = OwnedRedis::start();
    redis.cli(&["ACL", "SETUSER", "otpd", "on", ">otpd-pw", "~*", "+@all"]);
    let store = redis_store(&format!(
        "url = \"{}?user=otpd&pass=otpd-pw\"\n",
        redis.url()
    ));
    let daemon = Daemon::start_on(&store, NO_COOLDOWN, "");
    let code = daemon.create_code("login", "393331234567");

    // The user is switched off and its connections dropped: every login is refused.
    redis.cli(&["ACL", "SETUSER", "otpd", "off"]);
    redis.cli(&["CLIENT", "KILL", "USER", "otpd"]);
    // Failures are logged once a second, so the refused login shows within about one.
    wait_for("a refused login, answered 500 and logged", || {
        let answer = daemon.call(json!({"op": "status", "token": "login"}));
        assert_eq!(answer["status"], 500, "{answer}");
        let log = daemon.stderr();
        log.contains("WRONGPASS") || log.contains("uthentication")
    });

    redis.cli(&["ACL", "SETUSER", "otpd", "on"]);
    for _ in 0..8 {
        let answer = daemon.call(json!({"op": "status", "token": "login"}));
        assert_eq!(answer["status"], 200, "login taken again: {answer}");
    }
    assert_eq!(daemon.verify("login", &code)["status"], 200);
}

/// Every key of a daemon's prefix with its value (a sorted set's members run
/// together), from every node. (`::redis` is the client crate; `redis` is the test
/// module `per_engine!` makes.)
fn stored(daemon: &Daemon) -> Vec<(String, Vec<u8>)> {
    let prefix = daemon
        .store_toml
        .split("key_prefix = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a Redis daemon");
    let urls = if daemon.store_toml.contains("cluster = ") {
        RedisCluster::shared().urls()
    } else {
        vec![RedisServer::shared().url()]
    };
    let mut entries = Vec::new();
    for url in urls {
        let mut conn = ::redis::Client::open(url)
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut conn)
            .unwrap();
        for key in keys {
            let kind: String = ::redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
            let value: Vec<u8> = match kind.as_str() {
                "string" => ::redis::cmd("GET").arg(&key).query(&mut conn).unwrap(),
                "zset" => {
                    let members: Vec<Vec<u8>> = ::redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query(&mut conn)
                        .unwrap();
                    members.concat()
                }
                other => panic!("{key} is a {other}: otpd writes strings and sorted sets"),
            };
            entries.push((key, value));
        }
    }
    entries
}

/// A daemon's server secret in hex, to look for it where it must not be.
fn secret_hex(daemon: &Daemon) -> String {
    std::fs::read(daemon.dir.path().join("secret.key"))
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn redis_holds_neither_codes_nor_the_secret(engine: Engine) {
    // Ten digits: no part of a phone number or a key matches one by chance.
    let daemon = engine.start("[otp]\nresend_cooldown_secs = 0\ncode_length = 10\n");
    let mut issued = Vec::new();
    for i in 0..20 {
        let token = format!("scan{i}");
        let code = daemon.create_code(&token, &format!("39333100{i:04}"));
        issued.push((token, code));
    }
    daemon.verify("scan0", &issued[0].1);
    let entries = stored(&daemon);
    assert!(entries.len() > 40, "codes, tokens, recipients: {entries:?}");
    let secret = std::fs::read(daemon.dir.path().join("secret.key")).unwrap();
    let secret_hex = secret_hex(&daemon);
    for (key, value) in &entries {
        assert!(!key.contains(&secret_hex) && !contains(value, &secret));
        for (_, code) in &issued {
            assert!(!key.contains(code.as_str()), "code in key {key}");
            assert!(!contains(value, code.as_bytes()), "code in value of {key}");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn keys_expire_by_themselves(engine: Engine) {
    let daemon = engine.start(
        "[otp]\nresend_cooldown_secs = 0\nretain_secs = 3\nsend_window_secs = 1\n[janitor]\ninterval_secs = 1\n",
    );
    let code = daemon.create_short_code("short", "393331000001");
    thread::sleep(Duration::from_millis(1100));
    // Between its expiry (1 s) and its purge (3 s later): 410, with time to spare.
    assert_eq!(
        daemon.verify("short", &code)["status"],
        410,
        "expired, retained"
    );
    wait_for("Redis to drop every key but the secret check", || {
        let keys: Vec<String> = stored(&daemon).into_iter().map(|(k, _)| k).collect();
        keys.len() == 1 && keys[0].ends_with("secret-check")
    });
    assert_eq!(daemon.verify("short", &code)["status"], 404, "purged");
    wait_for("the janitor to count the expiry", || {
        daemon.stats()["expired"] == 1
    });
    assert_eq!(daemon.stats()["live"], 0);
}

/// The operations the socket cannot reach without a provider (delivery references and
/// status events, discarding an undelivered code), through the store itself.
fn delivery_records_and_discard_through_the_store(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let new = new_code("deliv", 9, "393331234567", now);
        let digest = new.digest;
        assert!(store.create(&new, now).await.unwrap().is_ok());
        assert_eq!(store.live(), 1);
        assert!(
            store
                .confirm_delivery("deliv", &digest, "uuid-1", now)
                .await
                .unwrap()
        );
        let event = DeliveryEvent {
            at: now,
            status: "delivered".into(),
            channel: Some("sms".into()),
            detail: None,
        };
        for filed in [Filed::Recorded, Filed::AlreadyRecorded] {
            let outcome = store.record_delivery_event("uuid-1", event.clone()).await;
            assert_eq!(
                outcome.unwrap(),
                filed,
                "a provider's retry is recorded once"
            );
        }
        let outcome = store.record_delivery_event("uuid-2", event.clone()).await;
        assert_eq!(outcome.unwrap(), Filed::UnknownReference);
        let code = store.status("deliv").await.unwrap().unwrap().code.unwrap();
        assert_eq!(code.delivery.reference.as_deref(), Some("uuid-1"));
        assert_eq!(code.delivery.events, vec![event.clone()]);

        // A resend whose delivery failed gives the first code back, reports and all.
        let resend = new_code("deliv", 8, "393331234567", now);
        store.create(&resend, now).await.unwrap().unwrap();
        store.discard("deliv", &resend.digest).await.unwrap();
        assert_eq!(store.live(), 1);
        let status = store.status("deliv").await.unwrap().unwrap();
        assert_eq!(status.code.unwrap().delivery.events, vec![event.clone()]);
        let outcome = store.record_delivery_event("uuid-1", event.clone()).await;
        assert_eq!(
            outcome.unwrap(),
            Filed::AlreadyRecorded,
            "still filed by uuid-1"
        );

        // A resend verified before its delivery was judged failed did arrive: it stays.
        let arrived = new_code("deliv", 6, "393331234567", now);
        store.create(&arrived, now).await.unwrap().unwrap();
        let outcome = store.verify("deliv", &arrived.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
        store.discard("deliv", &arrived.digest).await.unwrap();
        let outcome = store.verify("deliv", &arrived.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified);
        assert_eq!(store.live(), 0);

        // A first code whose delivery failed: nothing to give back, nothing stays.
        let lone = new_code("lone", 5, "393331234599", now);
        assert_eq!(store.create(&lone, now).await.unwrap(), Ok(()));
        store.discard("lone", &lone.digest).await.unwrap();
        let status = store.status("lone").await.unwrap().unwrap();
        assert!(
            status.code.is_none(),
            "the token keeps its sends, not the code"
        );
        assert_eq!(store.live(), 0);
        let outcome = store.record_delivery_event("uuid-1", event).await;
        assert_eq!(
            outcome.unwrap(),
            Filed::UnknownReference,
            "replaced for good"
        );
        let outcome = store.verify("lone", &lone.digest, now_ms()).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::NotFound, "a discarded code is gone");

        // A second store with another secret on the same prefix is refused.
        assert!(direct.connect_with([8; 32]).await.is_err());
    });
}

/// Two resends on their way at once: the code delivered before them stands in for
/// both, and is back when both fail.
fn overlapping_resends_keep_the_delivered_code(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let first = new_code("overlap", 1, "393331000021", now);
        store.create(&first, now).await.unwrap().unwrap();
        let counts = store.confirm_delivery("overlap", &first.digest, "uuid-o1", now);
        assert!(counts.await.unwrap());
        let resends = [2, 3].map(|digit| new_code("overlap", digit, "393331000021", now));
        for resend in &resends {
            store.create(resend, now).await.unwrap().unwrap();
        }
        for resend in resends.iter().rev() {
            store.discard("overlap", &resend.digest).await.unwrap();
        }
        let outcome = store.verify("overlap", &first.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid, "the delivered code is back");
    });
}

/// A resend whose delivery never settles (its host died) leaves the code it replaced
/// standing in, on every host, until one of the two verifies; a confirmed one does not.
fn the_replaced_code_stands_in_while_a_resend_is_unsettled(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let (a, b) = (direct.connect().await, direct.connect().await);
        let now = now_ms();
        let first = new_code("stand", 1, "393331234567", now);
        a.create(&first, now).await.unwrap().unwrap();
        assert!(
            a.confirm_delivery("stand", &first.digest, "uuid-s1", now)
                .await
                .unwrap()
        );
        // Host a dies during the resend's delivery.
        let second = new_code("stand", 2, "393331234567", now);
        a.create(&second, now).await.unwrap().unwrap();
        drop(a);
        let wrong = b.verify("stand", &otpd::code::Digest([3; 16]), now);
        assert_eq!(wrong.await.unwrap(), VerifyOutcome::NotFound, "a typo");
        let outcome = b.verify("stand", &first.digest, now).await.unwrap();
        assert_eq!(
            outcome,
            VerifyOutcome::Valid,
            "the code the person has, after a typo"
        );
        let outcome = b.verify("stand", &first.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified);
        let outcome = b.verify("stand", &second.digest, now).await.unwrap();
        assert_eq!(
            outcome,
            VerifyOutcome::NotFound,
            "one valid verify per token"
        );
        let status = b.status("stand").await.unwrap().unwrap();
        assert_eq!(status.token.current, Some(first.digest));
        let read = DeliveryEvent {
            at: now,
            status: "read".into(),
            channel: None,
            detail: None,
        };
        let filed = b.record_delivery_event("uuid-s1", read).await.unwrap();
        assert_eq!(filed, Filed::Recorded, "filed under its id again");

        // A confirmed resend: only the new code counts.
        let third = new_code("stand", 3, "393331234567", now);
        b.create(&third, now).await.unwrap().unwrap();
        assert!(
            b.confirm_delivery("stand", &third.digest, "uuid-s3", now)
                .await
                .unwrap()
        );
        let outcome = b.verify("stand", &first.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::NotFound);
        let outcome = b.verify("stand", &third.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
        assert_eq!(b.live(), 0);
    });
}

/// Pending SMS failovers of the `messages` backend: kept in Redis, each taken by exactly
/// one of two hosts at its deadline, and judged from its code's record.
/// A failover whose code record cannot be read (corrupt, or from a newer otpd) waits a
/// minute behind the others instead of holding them up on every host.
fn a_failover_with_an_unreadable_code_waits_behind_the_others(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        for (token, digit) in [("fo-bad", 1), ("fo-good", 2)] {
            delivered(&store, token, digit, &format!("39333100003{digit}"), now).await;
        }
        let prefix = &direct.config.store.redis.key_prefix;
        let mut set = ::redis::cmd("SET");
        set.arg(format!("{prefix}{{fo-bad}}:c:{}", otpd::hex(&[1; 16])))
            .arg(b"\xff\xff".as_slice());
        behind_otpds_back(&direct.config.store.redis, &set);
        let failover = |token: &str, due_at| pending_failover(token, "393331000030", due_at);
        store.put_failover(&failover("fo-bad", now)).await.unwrap();
        store
            .put_failover(&failover("fo-good", now + 10))
            .await
            .unwrap();
        let claimed = store.claim_due_failovers(now + 10, now + 20_000, 10).await;
        let claimed = claimed.unwrap();
        assert_eq!(claimed.due.len(), 1, "{:?}", claimed.due);
        assert_eq!(claimed.due[0].0.reference, "uuid-fo-good");
        assert!(matches!(claimed.due[0].1, FailoverVerdict::Send { .. }));
        assert_eq!(
            claimed.next_due,
            Some(now + 20_000),
            "the claim; the bad one waits"
        );
    });
}

/// A failover due while a resend is on its way waits for it, on every host: the code
/// is back, and its failover with it, when the resend fails; once the resend is
/// confirmed (it has its own failover), the old one goes.
fn a_failover_due_while_a_resend_is_on_its_way_waits_for_it(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let (a, b) = (direct.connect().await, direct.connect().await);
        let now = now_ms();
        let first = delivered(&a, "fo-resend", 1, "393331000041", now).await;
        let failover = |due_at| pending_failover("fo-resend", "393331000041", due_at);
        let claim_until = now + 20_000;
        a.put_failover(&failover(now)).await.unwrap();
        let failing = new_code("fo-resend", 2, "393331000041", now);
        a.create(&failing, now).await.unwrap().unwrap();
        let waiting = b.claim_due_failovers(now, claim_until, 10).await.unwrap();
        assert!(
            waiting.due.is_empty(),
            "neither sent nor dropped: {waiting:?}"
        );
        assert_eq!(
            waiting.next_due,
            Some(now + 1_000),
            "judged again a second later"
        );
        let judged = b.judge_failover(&failover(now), now).await.unwrap();
        assert_eq!(judged, FailoverVerdict::ResendOnItsWay);
        a.discard("fo-resend", &failing.digest).await.unwrap();
        let back = b
            .claim_due_failovers(now + 1_000, claim_until, 10)
            .await
            .unwrap();
        let send = FailoverVerdict::Send {
            expires_at: first.expires_at,
        };
        assert_eq!(back.due, vec![(failover(claim_until), send)], "back");
        b.finish_failover(&back.due[0].0).await.unwrap();

        a.put_failover(&failover(now)).await.unwrap();
        let confirmed = new_code("fo-resend", 3, "393331000041", now);
        a.create(&confirmed, now).await.unwrap().unwrap();
        let waiting = b.claim_due_failovers(now, claim_until, 10).await.unwrap();
        assert!(waiting.due.is_empty(), "{waiting:?}");
        let counts = a.confirm_delivery("fo-resend", &confirmed.digest, "uuid-r", now);
        assert!(counts.await.unwrap());
        let gone = b
            .claim_due_failovers(now + 1_000, claim_until, 10)
            .await
            .unwrap();
        assert_eq!(
            gone.due,
            vec![(failover(now + 1_000), FailoverVerdict::Gone)]
        );
        assert_eq!(gone.next_due, None);
    });
}

/// A report on the code a resend replaced, arriving on another host while the resend
/// is on its way, is filed on that code: read, it owes no failover, and the code comes
/// back with it when the resend fails. Once a resend is confirmed, the old id is
/// unknown.
fn a_report_on_the_replaced_code_counts_while_the_resend_is_on_its_way(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let (a, b) = (direct.connect().await, direct.connect().await);
        let now = now_ms();
        delivered(&a, "fo-read", 1, "393331000051", now).await;
        let failover = pending_failover("fo-read", "393331000051", now);
        a.put_failover(&failover).await.unwrap();
        let failing = new_code("fo-read", 2, "393331000051", now);
        a.create(&failing, now).await.unwrap().unwrap();
        let read = DeliveryEvent {
            at: now,
            status: "read".into(),
            channel: None,
            detail: None,
        };
        for filed in [Filed::Recorded, Filed::AlreadyRecorded] {
            let outcome = b.record_delivery_event("uuid-fo-read", read.clone()).await;
            assert_eq!(outcome.unwrap(), filed, "on the replaced code");
        }
        let status = b.status("fo-read").await.unwrap().unwrap();
        assert_eq!(
            status.code.unwrap().delivery.events,
            vec![],
            "not the new code"
        );
        let judged = b.judge_failover(&failover, now).await.unwrap();
        assert_eq!(judged, FailoverVerdict::Read, "no resend to wait for");
        a.discard("fo-read", &failing.digest).await.unwrap();
        let status = b.status("fo-read").await.unwrap().unwrap();
        let events = status.code.unwrap().delivery.events;
        assert_eq!(events, vec![read.clone()], "back with it");
        let due = b.claim_due_failovers(now, now + 20_000, 10).await.unwrap();
        assert_eq!(due.due, vec![(failover, FailoverVerdict::Read)]);

        let confirmed = new_code("fo-read", 3, "393331000051", now);
        a.create(&confirmed, now).await.unwrap().unwrap();
        let counts = a.confirm_delivery("fo-read", &confirmed.digest, "uuid-r", now);
        assert!(counts.await.unwrap());
        let later = DeliveryEvent {
            at: now + 1,
            ..read
        };
        let outcome = b.record_delivery_event("uuid-fo-read", later).await;
        assert_eq!(outcome.unwrap(), Filed::UnknownReference);
    });
}

fn failovers_are_taken_once_across_hosts(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let (a, b) = (direct.connect().await, direct.connect().await);
        let now = now_ms();
        for (token, digit) in [("unread", 1), ("read", 2)] {
            delivered(&a, token, digit, &format!("39333100000{digit}"), now).await;
        }
        let read = DeliveryEvent {
            at: now,
            status: "read".into(),
            channel: Some("messenger".into()),
            detail: None,
        };
        let outcome = b.record_delivery_event("uuid-read", read).await;
        assert_eq!(outcome.unwrap(), Filed::Recorded);
        let failover = |reference: &str, due_at| {
            pending_failover(
                reference.trim_start_matches("uuid-"),
                "393331000001",
                due_at,
            )
        };
        for (reference, due_at) in [
            ("uuid-unread", now + 100),
            ("uuid-read", now + 200),
            ("uuid-gone", now + 300),
            ("uuid-later", now + 60_000),
        ] {
            a.put_failover(&failover(reference, due_at)).await.unwrap();
        }
        // One entry no engine can read, due among them, holds none of them up.
        zadd_unreadable_failover(&direct.config.store.redis, now + 150);
        let deadline = now + 1_000;
        let claim_until = deadline + 30_000; // before "later" is due
        assert!(
            b.claim_due_failovers(now, claim_until, 10)
                .await
                .unwrap()
                .due
                .is_empty(),
            "none due yet"
        );
        let (from_a, from_b) = tokio::join!(
            a.claim_due_failovers(deadline, claim_until, 10),
            b.claim_due_failovers(deadline, claim_until, 10)
        );
        let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
        let handed_out: Vec<_> = from_a.due.into_iter().chain(from_b.due).collect();
        let mut taken: Vec<(String, FailoverVerdict)> = handed_out
            .iter()
            .map(|(failover, verdict)| (failover.reference.clone(), *verdict))
            .collect();
        taken.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            taken,
            vec![
                ("uuid-gone".into(), FailoverVerdict::Gone),
                ("uuid-read".into(), FailoverVerdict::Read),
                (
                    "uuid-unread".into(),
                    FailoverVerdict::Send {
                        expires_at: now + 300_000
                    }
                ),
            ],
            "each due failover handed out once, with its verdict"
        );
        let again = a
            .claim_due_failovers(deadline, claim_until, 10)
            .await
            .unwrap();
        assert!(again.due.is_empty());
        assert_eq!(again.next_due, Some(claim_until), "the claim is due next");
        // The one to send is claimed: back only when its claim runs out, unless let go.
        let back = b.claim_due_failovers(claim_until, claim_until + 1, 10);
        let back = back.await.unwrap();
        assert_eq!(back.due.len(), 1, "{back:?}");
        assert_eq!(back.due[0].0.reference, "uuid-unread");
        b.finish_failover(&back.due[0].0).await.unwrap();
        let after = a.claim_due_failovers(claim_until + 1, claim_until + 2, 10);
        assert_eq!(after.await.unwrap().next_due, Some(now + 60_000), "let go");

        // The SMS sent for "unread" is filed on its code, so its own reports are too.
        let event = |status: &str, detail: Option<&str>| DeliveryEvent {
            at: deadline,
            status: status.into(),
            channel: Some("sms".into()),
            detail: detail.map(str::to_owned),
        };
        let sent = event("failover_sent", Some("uuid-sms"));
        let outcome = a.record_delivery_event("uuid-unread", sent.clone()).await;
        assert_eq!(outcome.unwrap(), Filed::Recorded);
        // A first try that failed before filing the SMS's id: the retry files it.
        let redis = &direct.config.store.redis;
        let mut forget = ::redis::cmd("DEL");
        forget.arg(format!("{}ref:uuid-sms", redis.key_prefix));
        behind_otpds_back(redis, &forget);
        let outcome = a.record_delivery_event("uuid-unread", sent.clone()).await;
        assert_eq!(outcome.unwrap(), Filed::AlreadyRecorded);
        let delivered = event("delivered", None);
        let outcome = b.record_delivery_event("uuid-sms", delivered.clone()).await;
        assert_eq!(outcome.unwrap(), Filed::Recorded);
        let status = a.status("unread").await.unwrap().unwrap();
        assert_eq!(status.code.unwrap().delivery.events, vec![sent, delivered]);
    });
}

/// Adds an entry that does not decode to the pending failovers, due at `due_at`.
fn zadd_unreadable_failover(config: &otpd::config::RedisConfig, due_at: u64) {
    let mut zadd = ::redis::cmd("ZADD");
    zadd.arg(format!("{}failovers", config.key_prefix))
        .arg(due_at)
        .arg(b"\xffnot a failover".as_slice());
    behind_otpds_back(config, &zadd);
}

/// Runs `command` on the store's Redis (or cluster) directly.
fn behind_otpds_back(config: &otpd::config::RedisConfig, command: &::redis::Cmd) {
    if config.cluster.is_empty() {
        let client = ::redis::Client::open(config.url.as_str()).unwrap();
        command
            .query::<()>(&mut client.get_connection().unwrap())
            .unwrap();
    } else {
        let client = ::redis::cluster::ClusterClient::new(config.cluster.clone()).unwrap();
        command
            .query::<()>(&mut client.get_connection().unwrap())
            .unwrap();
    }
}

/// A commit whose answer a dropped connection lost is not sent again by the cluster
/// client: the second run would find the first one's write, and the engine would plan
/// again on top of it (here a right code answering 409 instead of 200). The request
/// fails instead, as a 500 that is not a "no".
#[test]
fn a_cluster_commit_whose_answer_is_lost_is_not_sent_again() {
    let cluster = ProxiedCluster::start();
    let store = redis_store(&format!("cluster = [\"{}\"]\n", cluster.url()));
    DirectStore::on(&store, "").run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        // Its commits load the script: the next EVALSHA runs it.
        let new = delivered(&store, "lost", 1, "393331000041", now).await;
        cluster.lose_next_script_answer();
        let outcome = store.verify("lost", &new.digest, now).await;
        assert!(
            outcome.is_err(),
            "answered without its commit's answer: {outcome:?}"
        );
        let outcome = store.verify("lost", &new.digest, now).await.unwrap();
        assert_eq!(
            outcome,
            VerifyOutcome::AlreadyVerified,
            "Redis ran the first"
        );
    });
}

/// While a token's slot moves to another node, the old node answers `ASK` for its keys
/// moved already, and `MOVED` once the move is over. The cluster ran nothing then, so
/// otpd sends the command where it is told, and the token is served throughout.
#[test]
fn a_token_is_served_while_its_slot_moves_to_another_node() {
    let cluster = TwoNodeCluster::start();
    let store = redis_store(&format!("cluster = [\"{}\"]\n", cluster.url()));
    let direct = DirectStore::on(&store, "");
    let prefix = direct.config.store.redis.key_prefix.clone();
    direct.run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let new = delivered(&store, "moving", 1, "393331000061", now).await;
        let slot = cluster.slot_of(&format!("{prefix}{{moving}}:t"));

        cluster.move_keys(&slot);
        let outcome = store.verify("moving", &new.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid, "verified during the move");

        cluster.finish_move(&slot);
        let outcome = store.verify("moving", &new.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::AlreadyVerified, "after the move");
    });
}

/// A `WAIT` counts only the writes of its own connection. A write that went, during a
/// slot's move, to the node importing it went over a connection of otpd's own, so the
/// `WAIT` for `min_replicas` goes there too. (These nodes have no replicas: the verify
/// fails for want of one, after waiting on both nodes.)
#[test]
fn a_wait_also_goes_to_the_node_a_moving_slots_write_went_to() {
    let cluster = TwoNodeCluster::start();
    let store = redis_store(&format!(
        "cluster = [\"{}\"]\nmin_replicas = 1\nreplica_timeout_ms = 50\n",
        cluster.url()
    ));
    let direct = DirectStore::on(&store, "");
    let prefix = direct.config.store.redis.key_prefix.clone();
    direct.run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let new = new_code("waited", 1, "393331000081", now);
        let created = store.create(&new, now).await;
        assert!(
            created.is_err(),
            "no replica, yet acknowledged: {created:?}"
        );
        let slot = cluster.slot_of(&format!("{prefix}{{waited}}:t"));
        cluster.move_keys(&slot);
        let outcome = store.verify("waited", &new.digest, now).await;
        assert!(
            outcome.is_err(),
            "no replica, yet acknowledged: {outcome:?}"
        );
        let clients = cluster.on_second(&["client", "list"]);
        assert!(
            clients.contains("cmd=wait"),
            "no WAIT reached the node: {clients}"
        );
    });
}

/// An evicted token key (Redis under a `maxmemory-policy` other than `noeviction`)
/// leaves its code's key behind, and the next create, knowing nothing of it, leaves it
/// there: that code is no longer the token's. It takes no report, is not confirmed
/// and does not verify, as on the embedded engines, where only the code the token names
/// answers.
fn a_code_its_token_no_longer_names_does_not_answer(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let old = delivered(&store, "evicted", 1, "393331000051", now).await;
        let mut evict = ::redis::cmd("DEL");
        evict.arg(format!(
            "{}{{evicted}}:t",
            direct.config.store.redis.key_prefix
        ));
        behind_otpds_back(&direct.config.store.redis, &evict);
        let new = new_code("evicted", 2, "393331000051", now);
        store.create(&new, now).await.unwrap().unwrap();

        let read = DeliveryEvent {
            at: now,
            status: "read".into(),
            channel: None,
            detail: None,
        };
        let filed = store.record_delivery_event("uuid-evicted", read).await;
        assert_eq!(filed.unwrap(), Filed::UnknownReference);
        let counts = store.confirm_delivery("evicted", &old.digest, "uuid-again", now);
        assert!(
            !counts.await.unwrap(),
            "confirmed a code its token does not name"
        );
        let outcome = store.verify("evicted", &old.digest, now).await.unwrap();
        assert_eq!(
            outcome,
            VerifyOutcome::NotFound,
            "the code before the eviction"
        );
        let outcome = store.verify("evicted", &new.digest, now).await.unwrap();
        assert_eq!(outcome, VerifyOutcome::Valid);
    });
}

/// `status` reads a token's record and its code at one instant: creates on another
/// host, each replacing the token's code, never make it answer without a code.
fn status_keeps_seeing_a_code_that_another_host_replaces(engine: Engine) {
    // No send limit to speak of: the test creates a hundred codes in a second.
    let no_limit = "max_sends_per_recipient = 1000\nsend_window_secs = 1\n";
    let direct = DirectStore::on(&engine.store_toml(), no_limit);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (a, b) = (direct.connect().await, direct.connect().await);
        let first = new_code("busy", 0, "393331000061", now_ms());
        a.create(&first, now_ms()).await.unwrap().unwrap();
        let creates = tokio::spawn(async move {
            for i in 1..=100u16 {
                let mut new = new_code("busy", 0, "393331000061", now_ms());
                new.digest.0[..2].copy_from_slice(&i.to_be_bytes());
                a.create(&new, now_ms()).await.unwrap().unwrap();
            }
        });
        let (mut statuses, mut without_code) = (0, 0);
        while !creates.is_finished() {
            let status = b.status("busy").await.unwrap().expect("a known token");
            statuses += 1;
            without_code += usize::from(status.code.is_none());
        }
        creates.await.unwrap();
        assert!(
            statuses >= 5,
            "only {statuses} statuses ran among the creates"
        );
        assert_eq!(without_code, 0, "statuses without a code, of {statuses}");
    });
}

/// A code that expires while its delivery is on its way (here with no retain time, so
/// its key goes at its expiry) no longer counts when the delivery is confirmed, as on
/// the embedded engines: not an error, which only a code lost with its master is.
fn a_code_that_expired_on_its_way_no_longer_counts(engine: Engine) {
    DirectStore::on(&engine.store_toml(), "retain_secs = 0\n").run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let mut brief = new_code("brief", 1, "393331000071", now);
        brief.expires_at = now + 200;
        store.create(&brief, now).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let counts = store
            .confirm_delivery("brief", &brief.digest, "uuid-brief", now_ms())
            .await;
        assert!(!counts.expect("expired on schedule, not lost"));
    });
}

/// A create lost with the master it was written to (a Sentinel failover during its
/// delivery) is not confirmed; one a newer create replaced is.
fn a_create_lost_before_its_confirm_is_not_acknowledged(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let first = new_code("gone", 1, "393331000011", now);
        assert!(store.create(&first, now).await.unwrap().is_ok());
        let second = new_code("gone", 2, "393331000012", now);
        assert!(store.create(&second, now).await.unwrap().is_ok());
        let counts = store
            .confirm_delivery("gone", &first.digest, "uuid-first", now)
            .await
            .expect("replaced by a newer create: nothing to confirm, nothing wrong");
        assert!(!counts, "the replaced code no longer counts");

        // The new master never had the token: as after a failover.
        let prefix = &direct.config.store.redis.key_prefix;
        let mut del = ::redis::cmd("DEL");
        del.arg(format!("{prefix}{{gone}}:t")).arg(format!(
            "{prefix}{{gone}}:c:{}",
            otpd::hex(&second.digest.0)
        ));
        behind_otpds_back(&direct.config.store.redis, &del);
        let lost = store
            .confirm_delivery("gone", &second.digest, "uuid-second", now)
            .await;
        assert!(lost.is_err(), "a lost create was acknowledged: {lost:?}");
    });
}

/// A pending code a create replaced after its expiry, before a janitor pass counted it,
/// is counted once: also when the resend's delivery fails and puts it back, it is put
/// back expired, not into the live set for the next pass to count again.
fn a_code_replaced_after_its_expiry_counts_as_expired_once(engine: Engine) {
    DirectStore::new(engine).run(async |direct| {
        let store = direct.connect().await;
        let now = now_ms();
        let resent_at = now + 2_000;
        for (token, number, sent) in [
            ("sent", "393331000071", true),
            ("back", "393331000072", false),
        ] {
            let mut first = new_code(token, 1, number, now);
            first.expires_at = now + 1_000;
            store.create(&first, now).await.unwrap().unwrap();
            let reference = format!("uuid-{token}");
            let counts = store.confirm_delivery(token, &first.digest, &reference, now);
            assert!(counts.await.unwrap());
            let resend = new_code(token, 2, number, resent_at);
            store.create(&resend, resent_at).await.unwrap().unwrap();
            if sent {
                let reference = format!("uuid-{token}-2");
                let counts = store.confirm_delivery(token, &resend.digest, &reference, resent_at);
                assert!(counts.await.unwrap());
            } else {
                store.discard(token, &resend.digest).await.unwrap();
            }
        }
        let report = store.purge_due(resent_at + 100, 100).await.unwrap();
        assert_eq!(report.expired, 2, "each replaced code once");
        let back = store.status("back").await.unwrap().unwrap().code.unwrap();
        assert_eq!(
            back.state,
            CodeState::Expired,
            "put back as it was: expired"
        );
    });
}

per_engine!([redis, redis_cluster] {
    a_code_replaced_after_its_expiry_counts_as_expired_once,
    a_code_that_expired_on_its_way_no_longer_counts,
    status_keeps_seeing_a_code_that_another_host_replaces,
    a_code_its_token_no_longer_names_does_not_answer,
    a_create_lost_before_its_confirm_is_not_acknowledged,
    failovers_are_taken_once_across_hosts,
    a_failover_with_an_unreadable_code_waits_behind_the_others,
    a_failover_due_while_a_resend_is_on_its_way_waits_for_it,
    a_report_on_the_replaced_code_counts_while_the_resend_is_on_its_way,
    delivery_records_and_discard_through_the_store,
    the_replaced_code_stands_in_while_a_resend_is_unsettled,
    overlapping_resends_keep_the_delivered_code,
    create_on_one_host_verify_on_another,
    fifty_concurrent_verifies_across_two_hosts_one_wins,
    guessing_spread_across_hosts_still_locks,
    recipient_limits_hold_across_hosts_and_slots,
    a_host_with_another_secret_refuses_to_start,
    redis_holds_neither_codes_nor_the_secret,
    keys_expire_by_themselves,
});
