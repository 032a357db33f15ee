//! Any line through the request parser: no panic, and a refusal is a well-formed answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otpd::protocol::{self, Response};

fuzz_target!(|line: &[u8]| {
    let envelope = protocol::parse(line);
    if let Err(error) = envelope.request {
        let answer = Response::from_protocol_error(envelope.id, error).to_line();
        check_refusal(&answer);
    }
});

/// One JSON object line with `ok` false and a 4xx `status`.
fn check_refusal(answer: &[u8]) {
    let (last, body) = answer.split_last().expect("empty answer");
    assert_eq!(*last, b'\n');
    assert!(!body.contains(&b'\n'));
    let value: serde_json::Value = serde_json::from_slice(body).expect("answer is JSON");
    assert_eq!(value["ok"], false);
    assert!((400..500).contains(&value["status"].as_u64().expect("status")));
}
