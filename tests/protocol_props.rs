//! Property test through the real socket: whatever line a client sends, the daemon
//! answers it with one well-formed JSON line (never a 5xx), keeps the connection open,
//! and keeps serving.

mod common;

use common::Daemon;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

/// JSON values of the kinds requests carry, near and far from valid ones.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[0-9]{0,16}".prop_map(Value::from),
        "\\+?[0-9]{5,17}".prop_map(Value::from),
        "[A-Za-z0-9._:@-]{0,130}".prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ]
}

/// A JSON object built from the protocol's own field names, with arbitrary values.
fn request_object() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![
        Just("create"),
        Just("verify"),
        Just("cancel"),
        Just("status"),
        Just("stats"),
        Just("ping"),
        Just("nope"),
    ];
    let field = prop_oneof![
        Just("token"),
        Just("code"),
        Just("id"),
        Just("ttl_secs"),
        Just("code_length"),
        Just("messengerId"),
        Just("phoneNumber"),
        Just("extra"),
    ];
    let to = proptest::collection::btree_map(
        prop_oneof![
            Just("sms"),
            Just("messenger"),
            Just("phoneNumber"),
            Just("fax")
        ],
        value(),
        0..3,
    );
    (
        op,
        proptest::collection::btree_map(field, value(), 0..5),
        proptest::option::of(to),
    )
        .prop_map(|(op, fields, to)| {
            let mut object: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            object.insert("op".into(), op.into());
            if let Some(to) = to {
                let to: Map<String, Value> =
                    to.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                object.insert("to".into(), Value::Object(to));
            }
            serde_json::to_vec(&object).unwrap()
        })
}

/// Any bytes but the line terminator, well under `max_request_bytes`.
fn raw_line() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
        0..600,
    )
}

#[test]
fn every_line_gets_a_well_formed_answer() {
    let daemon = Daemon::start("[store]\ndurability = \"relaxed\"\n");
    // TestRunner::run takes a Fn: the one connection is shared through a RefCell.
    let conn = std::cell::RefCell::new(daemon.connect());
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    let line = prop_oneof![raw_line(), request_object()];
    runner
        .run(&line, |mut line| {
            line.push(b'\n');
            let mut conn = conn.borrow_mut();
            conn.send_raw(&line);
            let answer = conn.receive().expect("the daemon closed the connection");
            let status = answer["status"].as_u64().expect("a numeric status");
            prop_assert!(
                (200..500).contains(&status),
                "status {}: {}",
                status,
                answer
            );
            prop_assert_eq!(&answer["ok"], &json!((200..300).contains(&status)));
            if status >= 400 {
                prop_assert!(answer["error"].is_string() && answer["message"].is_string());
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(conn.into_inner().call(json!({"op": "ping"}))["status"], 200);
}
