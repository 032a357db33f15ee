//! Request lines through the whole handler over a temporary sled store: no panic, no
//! 5xx, and every line gets one well-formed JSON answer.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use otpd::config::{Config, Durability};
use otpd::handler;
use otpd::janitor::Wakeup;
use otpd::metrics::Counters;
use otpd::otp::Otp;
use otpd::rules::Limits;
use otpd::secret::ServerSecret;
use otpd::store::Store;
use otpd::store::embedded::SledStore;

struct Harness {
    runtime: tokio::runtime::Runtime,
    otp: Otp,
    _dir: tempfile::TempDir,
}

/// One service for the whole run, like a long-lived daemon. Durability is relaxed so
/// an execution costs no fsync; the rules and transactions are the same.
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.store.path = dir.path().join("db");
        config.store.durability = Durability::Relaxed;
        config.otp.resend_cooldown_secs = 0;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store: Arc<dyn Store> = Arc::new(
            runtime
                // A new database, and a secret made up for it (no secret file kept).
                .block_on(async { SledStore::open(&config.store, Limits::from(&config.otp), true) })
                .expect("store"),
        );
        let secret = ServerSecret::from_bytes([7; 32]);
        let counters = Arc::new(Counters::default());
        let stopping = tokio_util::sync::CancellationToken::new();
        let delivery = otpd::delivery::from_config(
            &config,
            counters.clone(),
            store.clone(),
            &secret,
            stopping,
        )
        .expect("log delivery");
        let otp = Otp::new(
            config.otp.clone(),
            secret,
            store,
            delivery,
            config.delivery.template.clone(),
            counters,
            Arc::new(Wakeup::default()),
        );
        Harness {
            runtime,
            otp,
            _dir: dir,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let harness = harness();
    for line in input.split(|&b| b == b'\n').take(16) {
        let answer = harness
            .runtime
            .block_on(handler::respond(&harness.otp, line))
            .to_line();
        let (last, body) = answer.split_last().expect("empty answer");
        assert_eq!(*last, b'\n');
        assert!(!body.contains(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(body).expect("answer is JSON");
        let status = value["status"].as_u64().expect("status");
        assert!((200..500).contains(&status), "status {status}: {value}");
        assert_eq!(value["ok"], (200..300).contains(&status));
    }
});
