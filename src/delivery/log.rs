//! The `log` backend: writes the message it would send to the log, for development.
//!
//! This is the one place a code is allowed into a log: showing it is the backend's
//! whole job. With `log_file` set it also appends one JSON line per message, which is
//! how tests and `otpd bench` learn the codes.
//!
//! Like a provider, it answers with a reference for the delivery (`log-` and 32 hex
//! digits), so status webhooks can be tried end to end without a Vonage account.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, Once};

use async_trait::async_trait;
use serde::Serialize;

use super::{Delivery, DeliveryError, Message, Receipt};
use crate::config::DeliveryConfig;
use crate::rules::now_ms;

/// Writes each message to the log (and optionally to a JSON-lines file).
pub struct LogDelivery {
    file: Option<Mutex<File>>,
    notice: Once,
}

impl LogDelivery {
    pub fn new(config: &DeliveryConfig) -> anyhow::Result<Self> {
        let file = if config.log_file.as_os_str().is_empty() {
            None
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&config.log_file)
                .map_err(|e| {
                    anyhow::anyhow!("delivery.log_file {}: {e}", config.log_file.display())
                })?;
            // Created 0600; one that was there keeps its mode.
            crate::warn_if_exposed(
                &config.log_file,
                "delivery.log_file (it receives the codes)",
            );
            Some(Mutex::new(file))
        };
        Ok(Self {
            file,
            notice: Once::new(),
        })
    }
}

#[async_trait]
impl Delivery for LogDelivery {
    async fn send(&self, message: &Message<'_>) -> Result<Receipt, DeliveryError> {
        self.notice.call_once(|| {
            tracing::warn!(
                "delivery backend `log` writes codes to the log instead of sending them: for development only"
            );
        });
        let channels: Vec<&str> = message.to.channels().iter().map(|c| c.as_str()).collect();
        let reference = new_reference();
        let text = message.text_at(now_ms());
        tracing::warn!(
            token = %message.token,
            code = %message.code.expose(),
            channels = %channels.join(","),
            text = ?text,
            reference = %reference,
            "would send"
        );
        if let Some(file) = &self.file {
            let mut line = serde_json::to_vec(&LoggedLine {
                token: message.token,
                code: message.code.expose(),
                channels: &channels,
                text: &text,
                reference: &reference,
            })
            .expect("JSON of strings");
            line.push(b'\n');
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.write_all(&line)
                .map_err(|e| DeliveryError::unavailable(format!("log_file: {e}")))?;
        }
        Ok(Receipt { reference })
    }
}

/// One line of `log_file`: serialised straight from the message, with no JSON value
/// built in between. `otpd bench` finds a line by its opening `{"token":`.
#[derive(Serialize)]
struct LoggedLine<'a> {
    token: &'a str,
    code: &'a str,
    channels: &'a [&'a str],
    text: &'a str,
    reference: &'a str,
}

/// A fresh reference in the shape of a provider's id: `log-` and 32 hex digits.
fn new_reference() -> String {
    format!("log-{}", super::random_id())
}
