//! Delivery backends: how a code reaches its person.
//!
//! Each backend is one module behind [`Delivery`]; [`from_config`] picks one. A backend
//! gets a [`Message`]: the recipients, the code and the template, not a finished text.
//! It renders the text itself as it sends, again for each retry ([`Message::text_at`]),
//! because `{minutes}` must name the time left when that attempt goes out, not at the
//! create. It answers with the provider's id for the delivery or with an error that
//! says whether retrying later could help.

mod dispatch;
mod http_client;
mod jwt;
mod log;
mod messages;
mod seal;
mod vonage;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::RngExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::code::Code;
use crate::config::{Backend, Config};
use crate::metrics::Counters;
use crate::rules::{Channel, Millis};
use crate::secret::ServerSecret;
use crate::store::Store;

pub use vonage::{FAILOVER_SECS, SHORTEST_FAILOVER_TTL_SECS};

use self::dispatch::DispatchDelivery;
use self::log::LogDelivery;
use self::messages::MessagesDelivery;

/// Where to send a code. At least one channel is set; with both, Messenger goes first
/// and SMS is the failover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipients {
    /// Messenger page-scoped id (digits).
    pub messenger: Option<String>,
    /// Phone number in E.164 digits, without `+`.
    pub sms: Option<String>,
}

impl Recipients {
    /// The channels in delivery order.
    pub fn channels(&self) -> Vec<Channel> {
        let mut channels = Vec::with_capacity(2);
        if self.messenger.is_some() {
            channels.push(Channel::Messenger);
        }
        if self.sms.is_some() {
            channels.push(Channel::Sms);
        }
        channels
    }

    /// Rate-limit keys, one per recipient in the order of [`Recipients::channels`]:
    /// `messenger:<id>`, `sms:<number>`.
    pub fn limit_keys(&self) -> Vec<String> {
        let mut keys = Vec::with_capacity(2);
        if let Some(id) = &self.messenger {
            keys.push(format!("messenger:{id}"));
        }
        if let Some(number) = &self.sms {
            keys.push(format!("sms:{number}"));
        }
        keys
    }
}

/// One message to deliver.
#[derive(Debug)]
pub struct Message<'a> {
    pub token: &'a str,
    pub code: &'a Code,
    pub to: &'a Recipients,
    /// The text with `{code}` and `{minutes}` still to fill in.
    pub template: &'a str,
    /// When the code expires (unix ms): an SMS failover is timed to arrive well
    /// before, from the time left when the message goes out.
    pub expires_at: Millis,
}

impl Message<'_> {
    /// Seconds the code has left at `now` (unix ms). The second begun counts: a send
    /// right after the create sees the whole validity.
    pub fn secs_left(&self, now: Millis) -> u64 {
        self.expires_at.saturating_sub(now).div_ceil(1000)
    }

    /// The text to send at `now`, naming the minutes left then: a send the client
    /// retries goes out later than the create. It holds the code: only ever sent to the
    /// provider, never logged (except by the `log` backend).
    pub fn text_at(&self, now: Millis) -> String {
        render(self.template, self.code, self.secs_left(now))
    }

    /// The text of an SMS that goes out `after_secs` after `now`, when the Messenger
    /// message was not read: it names the minutes left then, not the full validity, so
    /// that nobody counts on time the code no longer has.
    pub fn failover_text_at(&self, now: Millis, after_secs: u64) -> String {
        render(
            self.template,
            self.code,
            self.secs_left(now).saturating_sub(after_secs),
        )
    }

    /// The text of an SMS that otpd itself sends later, with the code and with
    /// `{minutes}` still to fill in by [`fill_minutes`] at the send: only then is it
    /// known how late the send is (a crash or a stop can delay it).
    pub fn text_without_minutes(&self) -> String {
        fill_code(self.template, self.code)
    }
}

/// What the provider said when it took the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    /// The provider's id for this delivery (`dispatch_uuid`, `message_uuid`; the `log`
    /// backend makes one up), by which status webhooks find the code.
    pub reference: String,
}

/// Why a delivery did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// The provider refused the message; retrying the same request will not help (502).
    #[error("{0}")]
    Refused(String),
    /// The provider could not take the message: unreachable or overloaded, after
    /// retries (503). Nothing went out, so a sender nobody waits on may try later.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        /// How long the provider last asked to be left alone (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// No answer came to a request that may have reached the provider (503): it may
    /// have taken the message, so none is sent again, neither at once nor later. A
    /// code's person gets it once or not at all, never a pile of copies that each cost
    /// an SMS.
    #[error("{0}")]
    Unanswered(String),
}

impl DeliveryError {
    /// Unavailable, with no wish of the provider's as to when to come back.
    pub fn unavailable(reason: String) -> Self {
        DeliveryError::Unavailable {
            reason,
            retry_after: None,
        }
    }
}

/// A delivery backend.
#[async_trait]
pub trait Delivery: Send + Sync {
    /// Sends the message; returns once the provider has accepted it.
    async fn send(&self, message: &Message<'_>) -> Result<Receipt, DeliveryError>;

    /// Why this backend sends no Messenger messages, if it does not (an SMS-only
    /// deployment): a create that names a Messenger id is refused before anything is
    /// stored or counted.
    fn no_messenger(&self) -> Option<String> {
        None
    }

    /// Work the backend does on its own (the `messages` failover timer); the daemon
    /// runs it until `stop` and waits for it at shutdown.
    fn background(
        &self,
        _stop: CancellationToken,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        None
    }
}

/// 128 random bits in hex: never repeated in practice. An id needs to be unique, not
/// secret, so it comes from the thread's CSPRNG (seeded from the OS) rather than a
/// `getrandom` call per id; codes come from the OS itself (`Code::generate`).
fn random_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// The id Vonage gave a message it accepted (`field` of its answer), or, when the
/// answer does not carry one, a local reference (`unread-` and 32 hex digits): the
/// message is out all the same, so its code stands, but no status report will name
/// it (no read receipt for a failover, no events in `status`).
fn accepted_reference(answer: &Value, field: &str) -> String {
    match answer[field].as_str() {
        Some(id) => id.to_owned(),
        None => {
            let reference = format!("unread-{}", random_id());
            tracing::warn!(
                field,
                reference,
                "Vonage accepted the message without an id; it is filed under a local reference"
            );
            reference
        }
    }
}

/// Fills `{code}` and `{minutes}` (for `secs_left`) into the template.
fn render(template: &str, code: &Code, secs_left: u64) -> String {
    fill_minutes(&fill_code(template, code), secs_left)
}

fn fill_code(template: &str, code: &Code) -> String {
    template.replace("{code}", code.expose())
}

/// Fills `{minutes}` with the whole minutes in `secs_left`, at least one. The default's
/// "{minutes} minutes" reads "1 minute" when one is left.
pub fn fill_minutes(text: &str, secs_left: u64) -> String {
    let minutes = secs_left.div_ceil(60).max(1);
    let text = if minutes == 1 {
        text.replace("{minutes} minutes", "1 minute")
    } else {
        text.to_owned()
    };
    text.replace("{minutes}", &minutes.to_string())
}

/// Checks the delivery configuration, naming the key at fault, without touching
/// anything: `otpd serve` runs it before it creates the secret, the database or the
/// socket. A Vonage section otpd does not use is checked too: a wrong value there is as
/// much a mistake as anywhere else.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let backend = config.delivery.backend()?;
    for (api, sent_through) in [
        (vonage::Api::Dispatch, Backend::Dispatch),
        (vonage::Api::Messages, Backend::Messages),
    ] {
        api.check(config, backend == sent_through)?;
    }
    Ok(())
}

/// Builds the backend the configuration names. `counters` get its delivery counts;
/// the `messages` backend keeps pending failovers in `store`, their texts sealed with
/// a key derived from `secret`. Once `stopping` is cancelled, no delivery is retried.
pub fn from_config(
    config: &Config,
    counters: Arc<Counters>,
    store: Arc<dyn Store>,
    secret: &ServerSecret,
    stopping: CancellationToken,
) -> anyhow::Result<Arc<dyn Delivery>> {
    Ok(match config.delivery.backend()? {
        Backend::Log => Arc::new(LogDelivery::new(&config.delivery)?),
        Backend::Dispatch => Arc::new(DispatchDelivery::new(config, counters, stopping)?),
        Backend::Messages => Arc::new(MessagesDelivery::new(
            config, counters, store, secret, stopping,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_gets_code_and_whole_minutes() {
        let code = Code::from_input("123456");
        assert_eq!(
            render("{code} for {minutes} min", &code, 300),
            "123456 for 5 min"
        );
        assert_eq!(
            render("{code} for {minutes} min", &code, 61),
            "123456 for 2 min"
        );
        assert_eq!(
            render("{code} for {minutes} min", &code, 1),
            "123456 for 1 min"
        );
        let default = "Code {code}. It expires in {minutes} minutes.";
        assert_eq!(
            render(default, &code, 60),
            "Code 123456. It expires in 1 minute."
        );
        assert_eq!(
            render(default, &code, 61),
            "Code 123456. It expires in 2 minutes."
        );
    }

    #[test]
    fn a_failover_text_names_the_minutes_left_at_its_deadline() {
        let code = Code::from_input("123456");
        let message = Message {
            token: "t",
            code: &code,
            to: &Recipients::default(),
            template: "{code} for {minutes} min",
            expires_at: 400_000,
        };
        assert_eq!(message.text_at(100_000), "123456 for 5 min");
        assert_eq!(message.failover_text_at(100_000, 120), "123456 for 3 min");
        assert_eq!(message.failover_text_at(100_000, 400), "123456 for 1 min");
        // A send retried 70 s later names the minutes left then.
        assert_eq!(message.text_at(170_000), "123456 for 4 min");
        assert_eq!(message.failover_text_at(170_000, 120), "123456 for 2 min");
        let later = message.text_without_minutes();
        assert_eq!(later, "123456 for {minutes} min");
        assert_eq!(fill_minutes(&later, 179), "123456 for 3 min");
        // A text stored before `{minutes}` was left open is sent as it is.
        assert_eq!(fill_minutes("123456 for 4 min", 179), "123456 for 4 min");
    }

    #[test]
    fn a_vonage_value_out_of_range_reads_like_any_config_range_error() {
        for (section, key, value, range) in [
            ("dispatch", "failover_secs", 5, "15..=86400"),
            ("messages", "timeout_secs", 301, "1..=300"),
            ("dispatch", "max_retries", 11, "0..=10"),
        ] {
            let text = format!("[delivery.{section}]\n{key} = {value}\n");
            let err = check(&Config::parse(&text).unwrap()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("config key `delivery.{section}.{key}`: {value} is out of range {range}")
            );
        }
    }

    #[test]
    fn recipients_in_failover_order() {
        let to = Recipients {
            messenger: Some("42".into()),
            sms: Some("393331234567".into()),
        };
        assert_eq!(to.channels(), vec![Channel::Messenger, Channel::Sms]);
        assert_eq!(to.limit_keys(), vec!["messenger:42", "sms:393331234567"]);
    }
}
