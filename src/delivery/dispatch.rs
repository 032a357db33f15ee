//! The `dispatch` backend: one Vonage Dispatch API `failover` workflow per code.
//!
//! With both channels the workflow is the Messenger message, failing over to the SMS
//! when it is not read in time (`Vonage::failover_after`); Vonage runs the timer. With one channel
//! it is a one-step workflow holding that message: the schema allows it (the array has
//! no minimum, and the last step carries no `failover`), and it keeps one endpoint, one
//! `dispatch_uuid` and one set of webhooks for every create.

use std::sync::Arc;

use async_trait::async_trait;
use hyper::Uri;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::vonage::{Api, Vonage};
use super::{Delivery, DeliveryError, Message, Receipt, accepted_reference};
use crate::config::Config;
use crate::metrics::Counters;
use crate::rules::{Millis, now_ms};

/// Sends codes through `POST {api_url}/v0.1/dispatch`.
pub struct DispatchDelivery {
    vonage: Vonage,
    url: Uri,
}

impl DispatchDelivery {
    pub fn new(
        config: &Config,
        counters: Arc<Counters>,
        stopping: CancellationToken,
    ) -> anyhow::Result<Self> {
        let vonage = Vonage::from_config(Api::Dispatch, config, counters, stopping)?;
        let url = vonage.endpoint("/v0.1/dispatch")?;
        Ok(Self { vonage, url })
    }

    /// The request body for a message sent at `now`.
    fn workflow(&self, message: &Message<'_>, now: Millis) -> Result<Value, DeliveryError> {
        let content = |text: String| json!({"type": "text", "text": text});
        let failover_after = self.vonage.failover_after(message, now);
        let mut workflow = Vec::with_capacity(2);
        if let Some(psid) = &message.to.messenger {
            let mut step = json!({
                "from": {"type": "messenger", "id": self.vonage.messenger_from()?},
                "to": {"type": "messenger", "id": psid},
                "message": {"content": content(message.text_at(now)), "messenger": self.vonage.settings.messenger_options},
            });
            if message.to.sms.is_some() {
                step["failover"] =
                    json!({"expiry_time": failover_after, "condition_status": "read"});
            }
            workflow.push(step);
        }
        if let Some(number) = &message.to.sms {
            // After a Messenger step the SMS goes out at the failover deadline.
            let text = match message.to.messenger {
                Some(_) => message.failover_text_at(now, failover_after),
                None => message.text_at(now),
            };
            workflow.push(json!({
                "from": {"type": "sms", "number": self.vonage.settings.sms_from},
                "to": {"type": "sms", "number": number},
                "message": {"content": content(text)},
            }));
        }
        Ok(json!({"template": "failover", "workflow": workflow}))
    }
}

#[async_trait]
impl Delivery for DispatchDelivery {
    fn no_messenger(&self) -> Option<String> {
        self.vonage.no_messenger()
    }

    async fn send(&self, message: &Message<'_>) -> Result<Receipt, DeliveryError> {
        let answer = self
            .vonage
            .client
            .post_json(&self.url, || self.workflow(message, now_ms()))
            .await?;
        let uuid = accepted_reference(&answer, "dispatch_uuid");
        tracing::info!(
            token = message.token,
            dispatch_uuid = uuid,
            "sent via Dispatch"
        );
        Ok(Receipt { reference: uuid })
    }
}
