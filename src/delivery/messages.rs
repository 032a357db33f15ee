//! The `messages` backend: Vonage Messages API v1, plus otpd's own read-timeout
//! failover.
//!
//! Messages v1 falls over to the next channel only when a message is *rejected*. So
//! with both channels otpd sends the Messenger message carrying Vonage's `failover`
//! list (the SMS, for an immediate rejection) and keeps a [`PendingFailover`] in the
//! store. At its deadline a background task takes it and, judging from the code's
//! record as the status webhooks left it, sends the SMS itself — unless the code was
//! verified, cancelled or expired meanwhile, a `read` status arrived, or Vonage
//! reported the message `rejected` (its own failover has sent the SMS). Taking the
//! failover removes it in the same step, so it is handed out exactly once, and a
//! restart finds the ones still pending.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::Uri;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::seal::Sealer;
use super::vonage::{Api, Vonage};
use super::{Delivery, DeliveryError, Message, Receipt};
use crate::config::Config;
use crate::metrics::Counters;
use crate::rules::{DeliveryEvent, FAILOVER_SENT, FailoverVerdict, PendingFailover, now_ms};
use crate::secret::ServerSecret;
use crate::store::Store;

/// Most failovers taken from the store in one go.
const BATCH: usize = 100;
/// Longest sleep of the failover task when nothing is pending.
const IDLE: Duration = Duration::from_secs(60);

/// Sends codes through `POST {api_url}/v1/messages`.
pub struct MessagesDelivery {
    inner: Arc<Inner>,
}

struct Inner {
    vonage: Vonage,
    url: Uri,
    store: Arc<dyn Store>,
    sealer: Sealer,
    /// Wakes the failover task when a failover is added.
    added: Notify,
}

impl MessagesDelivery {
    pub fn new(
        config: &Config,
        counters: Arc<Counters>,
        store: Arc<dyn Store>,
        secret: &ServerSecret,
    ) -> anyhow::Result<Self> {
        let vonage = Vonage::from_config(Api::Messages, config, counters)?;
        let url = vonage.endpoint("/v1/messages")?;
        Ok(Self {
            inner: Arc::new(Inner {
                vonage,
                url,
                store,
                sealer: Sealer::new(secret),
                added: Notify::new(),
            }),
        })
    }
}

impl Inner {
    fn sms(&self, number: &str, text: &str) -> Value {
        json!({
            "to": number,
            "from": self.vonage.settings.sms_from,
            "channel": "sms",
            "message_type": "text",
            "text": text,
        })
    }

    /// Posts one message; answers its `message_uuid`.
    async fn post(&self, body: &Value) -> Result<String, DeliveryError> {
        let answer = self.vonage.client.post_json(&self.url, body).await?;
        answer["message_uuid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                DeliveryError::Refused("Vonage accepted the message without a message_uuid".into())
            })
    }

    /// The failover task: takes due failovers, sends the SMS where still needed, and
    /// sleeps until the next deadline, a new failover, or `stop`.
    async fn run_failovers(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let now = now_ms();
            let next_due = match self.store.take_due_failovers(now, BATCH).await {
                Ok(taken) => {
                    let full = taken.due.len() == BATCH;
                    let mut sends = JoinSet::new();
                    for (failover, verdict) in taken.due {
                        if verdict == FailoverVerdict::Send {
                            sends.spawn(self.clone().send_failover(failover));
                        } else {
                            tracing::info!(
                                token = failover.token,
                                message_uuid = failover.reference,
                                ?verdict,
                                "no failover SMS needed"
                            );
                        }
                    }
                    // Sends finish even during shutdown: they were taken from the store.
                    while sends.join_next().await.is_some() {}
                    if full {
                        continue;
                    }
                    taken.next_due
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pending failovers");
                    Some(now + 1000)
                }
            };
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(IDLE)
                .min(IDLE);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.added.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends a failover's SMS and records the outcome on its code.
    async fn send_failover(self: Arc<Self>, failover: PendingFailover) {
        let outcome = match self.sealer.open(&failover.token, &failover.sealed_text) {
            Some(text) => self.post(&self.sms(&failover.to, &text)).await,
            None => Err(DeliveryError::Refused(
                "the stored text does not open with this server secret".into(),
            )),
        };
        let (status, detail) = match outcome {
            Ok(uuid) => {
                tracing::info!(
                    token = failover.token,
                    message_uuid = failover.reference,
                    sms_uuid = uuid,
                    "Messenger message not read in time: sent the SMS"
                );
                (FAILOVER_SENT, uuid)
            }
            Err(e) => {
                tracing::error!(token = failover.token, error = %e, "failover SMS not sent");
                ("failover_failed", e.to_string())
            }
        };
        let event = DeliveryEvent {
            at: now_ms(),
            status: status.into(),
            channel: Some("sms".into()),
            detail: Some(detail),
        };
        if let Err(e) = self
            .store
            .record_delivery_event(&failover.reference, event)
            .await
        {
            tracing::error!(token = failover.token, error = %e, "cannot record the failover");
        }
    }
}

#[async_trait]
impl Delivery for MessagesDelivery {
    async fn send(&self, message: &Message<'_>) -> Result<Receipt, DeliveryError> {
        let inner = &self.inner;
        let Some(psid) = &message.to.messenger else {
            let number = message.to.sms.as_deref().expect("a create names a channel");
            let uuid = inner.post(&inner.sms(number, &message.text())).await?;
            tracing::info!(token = message.token, message_uuid = uuid, "sent SMS");
            return Ok(Receipt { reference: uuid });
        };
        let text = message.text();
        let mut body = json!({
            "to": psid,
            "from": inner.vonage.messenger_from()?,
            "channel": "messenger",
            "message_type": "text",
            "text": text,
            "messenger": inner.vonage.settings.messenger_options,
        });
        if let Some(number) = &message.to.sms {
            // Vonage's own failover, on a rejection, goes out at once.
            body["failover"] = json!([inner.sms(number, &text)]);
        }
        let uuid = inner.post(&body).await?;
        if let Some(number) = &message.to.sms {
            let after = inner.vonage.failover_after(message.ttl_secs);
            let failover = PendingFailover {
                reference: uuid.clone(),
                due_at: now_ms() + after * 1000,
                token: message.token.to_owned(),
                to: number.clone(),
                sealed_text: inner
                    .sealer
                    .seal(message.token, &message.failover_text(after)),
            };
            // The Messenger message is out, so this is no failed delivery (which would
            // discard a code the person has): the code stands, without its SMS.
            match inner.store.put_failover(&failover).await {
                Ok(()) => inner.added.notify_one(),
                Err(error) => tracing::error!(
                    token = message.token,
                    %error,
                    "cannot keep the SMS failover: no SMS will follow the Messenger message"
                ),
            }
        }
        tracing::info!(
            token = message.token,
            message_uuid = uuid,
            "sent Messenger message"
        );
        Ok(Receipt { reference: uuid })
    }

    fn background(
        &self,
        stop: CancellationToken,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        Some(Box::pin(self.inner.clone().run_failovers(stop)))
    }
}
