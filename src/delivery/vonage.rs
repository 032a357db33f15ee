//! What the two Vonage backends share: the validated `[delivery.dispatch]` or
//! `[delivery.messages]` section, the API client with its JWT signer, and the pieces
//! of a message body that both APIs spell alike.
//!
//! Everything is checked at start-up, so a bad key, id or template stops the daemon
//! with a message naming the key instead of failing the first create.

use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::http_client::ApiClient;
use super::jwt::{self, JwtSigner, SystemClock};
use super::{DeliveryError, Message, render};
use crate::code::Code;
use crate::config::{CODE_LENGTHS, Config, VonageConfig};
use crate::metrics::Counters;
use crate::rules::Millis;

/// Facebook's limit for a Messenger text.
pub const MESSENGER_MAX_CHARS: usize = 640;
/// Vonage's limit for an SMS text.
pub const SMS_MAX_CHARS: usize = 1000;
/// Range of `failover_secs` (Dispatch's `expiry_time`).
pub const FAILOVER_SECS: std::ops::RangeInclusive<u64> = 15..=86_400;
/// The shortest validity of a code sent by Messenger with an SMS failover: the SMS waits
/// at least the shortest failover and at most half the validity.
pub const SHORTEST_FAILOVER_TTL_SECS: u64 = 2 * *FAILOVER_SECS.start();

/// Which Vonage API, and so which config section.
#[derive(Debug, Clone, Copy)]
pub enum Api {
    Dispatch,
    Messages,
}

/// The checked values of one Vonage section, before its key is loaded.
pub struct Settings {
    api_url: String,
    /// Facebook Page id; `None` when this deployment sends SMS only.
    messenger_from: Option<String>,
    pub sms_from: String,
    failover_secs: u64,
    /// `message.messenger` / `messenger` object: category and, for tagged messages, tag.
    pub messenger_options: Value,
}

impl Api {
    /// The section name under `[delivery]`.
    fn section(self) -> &'static str {
        match self {
            Api::Dispatch => "dispatch",
            Api::Messages => "messages",
        }
    }

    /// The full name of the section's key `name`, as errors show it.
    fn key(self, name: &str) -> String {
        format!("delivery.{}.{name}", self.section())
    }

    /// Checks the API's section, naming the key at fault: its settings, and what
    /// sending needs when otpd sends through it (`in_use`).
    pub fn check(self, config: &Config, in_use: bool) -> anyhow::Result<Settings> {
        let settings = self.settings(config)?;
        if in_use {
            if self.section_of(config).application_id.trim().is_empty() {
                anyhow::bail!(
                    "{}: required (the id of your Vonage application)",
                    self.key("application_id")
                );
            }
            check_template_length(config, settings.messenger_from.is_some())?;
        }
        Ok(settings)
    }

    fn section_of(self, config: &Config) -> &VonageConfig {
        match self {
            Api::Dispatch => &config.delivery.dispatch,
            Api::Messages => &config.delivery.messages,
        }
    }

    fn settings(self, config: &Config) -> anyhow::Result<Settings> {
        let v = self.section_of(config);
        if !v.application_id.is_empty() && !is_uuid(&v.application_id) {
            anyhow::bail!(
                "{}: must be your Vonage application's id, a UUID such as \
                 aaaaaaaa-bbbb-4ccc-8ddd-0123456789ab",
                self.key("application_id")
            );
        }
        let api_url = v.api_url.trim_end_matches('/').to_owned();
        let uri: Uri = api_url.parse().map_err(|_| {
            anyhow::anyhow!("{}: {:?} is not a URL", self.key("api_url"), v.api_url)
        })?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
            anyhow::bail!(
                "{}: {:?} is not an http(s) URL",
                self.key("api_url"),
                v.api_url
            );
        }
        let messenger_from = match v.messenger_from.as_str() {
            "" => None,
            id if id.len() <= 50 && id.bytes().all(|b| b.is_ascii_digit()) => Some(id.to_owned()),
            _ => anyhow::bail!(
                "{}: must be a Facebook Page id (digits)",
                self.key("messenger_from")
            ),
        };
        let sender_ok = if v.sms_from.bytes().all(|b| b.is_ascii_digit()) {
            (1..=15).contains(&v.sms_from.len())
        } else {
            (1..=11).contains(&v.sms_from.len())
                && v.sms_from
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b' ')
        };
        if !sender_ok {
            anyhow::bail!(
                "{}: must be a number of up to 15 digits or an alphanumeric sender id of up to 11 characters",
                self.key("sms_from")
            );
        }
        crate::config::check_range(
            &self.key("failover_secs"),
            v.failover_secs,
            *FAILOVER_SECS.start(),
            *FAILOVER_SECS.end(),
        )?;
        crate::config::check_range(&self.key("timeout_secs"), v.timeout_secs, 1, 300)?;
        crate::config::check_range(&self.key("max_retries"), v.max_retries.into(), 0, 10)?;
        let messenger_options = match (v.messenger_category.as_str(), v.messenger_tag.as_str()) {
            ("response" | "update", "") => json!({"category": v.messenger_category}),
            ("message_tag", "") => anyhow::bail!(
                "{}: required when messenger_category = \"message_tag\"",
                self.key("messenger_tag")
            ),
            ("message_tag", tag) => json!({"category": "message_tag", "tag": tag}),
            ("response" | "update", _) => anyhow::bail!(
                "{}: only allowed with messenger_category = \"message_tag\"",
                self.key("messenger_tag")
            ),
            (other, _) => anyhow::bail!(
                "{}: {other:?} is not one of response, update, message_tag",
                self.key("messenger_category")
            ),
        };
        Ok(Settings {
            api_url,
            messenger_from,
            sms_from: v.sms_from.clone(),
            failover_secs: v.failover_secs,
            messenger_options,
        })
    }
}

/// A Vonage application, ready to send.
pub struct Vonage {
    pub client: ApiClient,
    pub settings: Settings,
    api: Api,
}

impl Vonage {
    /// Seconds to wait for the Messenger message to be read before the SMS goes out,
    /// for a message sent at `now`: `failover_secs`, but at most half the time the code
    /// has left then (at least the 15 s Dispatch allows: a create refuses a shorter
    /// validity with both channels, [`SHORTEST_FAILOVER_TTL_SECS`]), so that the SMS
    /// does not bring a code that has expired, also after a slow send.
    pub fn failover_after(&self, message: &Message<'_>, now: Millis) -> u64 {
        self.settings
            .failover_secs
            .min((message.secs_left(now) / 2).max(*FAILOVER_SECS.start()))
    }

    /// Validates the API's section of `config` and loads the private key. Every error
    /// names its key.
    pub fn from_config(
        api: Api,
        config: &Config,
        counters: Arc<Counters>,
        stopping: CancellationToken,
    ) -> anyhow::Result<Self> {
        let settings = api.check(config, true)?;
        let v = api.section_of(config);

        let private_key = jwt::load_key(&v.private_key_file, &api.key("private_key_file"))?;
        let signer = JwtSigner::new(v.application_id.clone(), private_key, Arc::new(SystemClock));
        let client = ApiClient::new(
            signer,
            Duration::from_secs(v.timeout_secs),
            v.max_retries,
            counters,
            stopping,
        )?;
        if settings.messenger_from.is_none() {
            tracing::info!(
                "{} is empty: Messenger is off, codes go by SMS only",
                api.key("messenger_from")
            );
        }
        Ok(Self {
            client,
            settings,
            api,
        })
    }

    /// `{api_url}{path}` as a request URI.
    pub fn endpoint(&self, path: &str) -> anyhow::Result<Uri> {
        Ok(format!("{}{path}", self.settings.api_url).parse()?)
    }

    /// See [`super::Delivery::no_messenger`].
    pub fn no_messenger(&self) -> Option<String> {
        self.settings
            .messenger_from
            .is_none()
            .then(|| self.no_messenger_reason())
    }

    /// The Page id, or the refusal [`Vonage::no_messenger`] gives when Messenger is
    /// not configured.
    pub fn messenger_from(&self) -> Result<&str, DeliveryError> {
        self.settings
            .messenger_from
            .as_deref()
            .ok_or_else(|| DeliveryError::Refused(self.no_messenger_reason()))
    }

    fn no_messenger_reason(&self) -> String {
        format!(
            "this deployment sends no Messenger messages ({} is empty)",
            self.api.key("messenger_from")
        )
    }
}

/// `8-4-4-4-12` hex digits, as Vonage's application ids are.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The longest text the template can make (longest code, configured minutes) must fit
/// Messenger's limit when Messenger is on, and SMS's always.
fn check_template_length(config: &Config, messenger: bool) -> anyhow::Result<()> {
    let longest = Code::from_input(&"9".repeat(*CODE_LENGTHS.end() as usize));
    let chars = render(&config.delivery.template, &longest, config.otp.ttl_secs)
        .chars()
        .count();
    let (limit, channel) = if messenger {
        (MESSENGER_MAX_CHARS, "Messenger")
    } else {
        (SMS_MAX_CHARS, "SMS")
    };
    if chars > limit {
        anyhow::bail!(
            "delivery.template: with a {}-digit code it makes {chars} characters; {channel} allows {limit}",
            CODE_LENGTHS.end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(template: &str) -> Config {
        let mut config = Config::default();
        config.delivery.template = template.into();
        config
    }

    #[test]
    fn template_must_fit_the_channel() {
        let long = format!("{{code}}{}", "x".repeat(630));
        assert!(
            check_template_length(&config(&long), true).is_ok(),
            "640 fits"
        );
        let longer = format!("{{code}}{}", "x".repeat(631));
        let err = check_template_length(&config(&longer), true).unwrap_err();
        assert!(err.to_string().contains("delivery.template"), "{err}");
        assert!(
            check_template_length(&config(&longer), false).is_ok(),
            "SMS takes 1000"
        );
    }

    #[test]
    fn application_id_must_be_a_uuid() {
        let mut config = Config::default();
        for (id, ok) in [
            ("aaaaaaaa-bbbb-4ccc-8ddd-0123456789ab", true),
            ("AAAAAAAA-BBBB-4CCC-8DDD-0123456789AB", true),
            ("", true), // not in use: checked as required where it is
            ("not-a-uuid", false),
            ("aaaaaaaa-bbbb-4ccc-8ddd-0123456789a", false),
            ("aaaaaaaabbbb4ccc8ddd0123456789abcdef", false),
            ("gaaaaaaa-bbbb-4ccc-8ddd-0123456789ab", false),
        ] {
            config.delivery.messages.application_id = id.into();
            let checked = Api::Messages.check(&config, false);
            assert_eq!(checked.is_ok(), ok, "{id}: {:?}", checked.err());
            if let Err(error) = checked {
                assert!(
                    error
                        .to_string()
                        .starts_with("delivery.messages.application_id: "),
                    "{error}"
                );
            }
        }
    }
}
