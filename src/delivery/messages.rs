//! The `messages` backend: Vonage Messages API v1, plus otpd's own read-timeout
//! failover.
//!
//! Messages v1 falls over to the next channel only when a message is *rejected*. So
//! with both channels otpd sends the Messenger message carrying Vonage's `failover`
//! list (the SMS, for an immediate rejection) and keeps a [`PendingFailover`] in the
//! store. At its deadline a background task takes it and, judging from the code's
//! record as the status webhooks left it, sends the SMS itself — unless the code was
//! verified, cancelled, locked, replaced or expired meanwhile, a `read` status
//! arrived, or Vonage reported the message `rejected` (its own failover has sent the
//! SMS). While a resend that replaced the code is on its way, the store keeps the
//! failover waiting: a failed resend brings the code back, and the SMS is owed again.
//!
//! The task claims a failover before sending its SMS: the store files it again, due
//! when the longest send would be over, so no other host takes it meanwhile, and once
//! the outcome is recorded on the code the failover is let go (tried again through a
//! store error until the code expires; a claim that comes back meanwhile is not sent
//! again from here). Before each of the client's retries the store judges the
//! failover again as the claim did, and one no longer owed is let go unsent; each
//! attempt names the minutes left as of that attempt. An SMS Vonage could not take
//! goes back in line, and no retry of one starts that could end after its code
//! expires. A send a crash cuts
//! short leaves the claim, which comes back when it runs out: the SMS goes out late
//! rather than never (and twice only if the crash came after Vonage took it). A stop
//! lets the attempt under way end and retries nothing: an SMS not sent is set aside,
//! due at once, for the next start. Sends run side by side, so one slow SMS holds up
//! no other.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper::Uri;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::seal::{Bound, Sealer};
use super::vonage::{Api, Vonage};
use super::{Delivery, DeliveryError, Message, Receipt, accepted_reference, fill_minutes};
use crate::config::Config;
use crate::metrics::Counters;
use crate::rules::{
    DeliveryEvent, FAILOVER_CLAIM_MARGIN_MS, FAILOVER_FAILED, FAILOVER_SENT, FailoverVerdict,
    Millis, PendingFailover, now_ms,
};
use crate::secret::ServerSecret;
use crate::server::SHUTDOWN_GRACE;
use crate::store::{Store, StoreError};

/// Most failover SMS being sent at once.
const MAX_SENDING: usize = 64;
/// Longest sleep of the failover task when nothing is pending.
const IDLE: Duration = Duration::from_secs(60);
/// Pause between tries to record a send's outcome through a store error.
const SETTLE_PAUSE: Duration = Duration::from_secs(1);
/// A failover SMS Vonage did not take (5xx, 429, a failed connect, after the client's
/// own retries) goes back in line this much later (or when Vonage's `Retry-After` asks),
/// as long as an attempt then could end before its code expires: nobody waits on this
/// send, and a brief outage must not cost the SMS. One that went unanswered may have
/// gone out, and is not sent again.
const OUTAGE_RETRY_MS: Millis = 10_000;

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
    /// References of the failovers this host is sending or settling: a claim that
    /// runs out meanwhile (the store down after Vonage took the SMS) and comes back is
    /// not sent again from here.
    in_hand: Mutex<HashSet<String>>,
}

impl MessagesDelivery {
    pub fn new(
        config: &Config,
        counters: Arc<Counters>,
        store: Arc<dyn Store>,
        secret: &ServerSecret,
        stopping: CancellationToken,
    ) -> anyhow::Result<Self> {
        let vonage = Vonage::from_config(Api::Messages, config, counters, stopping)?;
        let url = vonage.endpoint("/v1/messages")?;
        Ok(Self {
            inner: Arc::new(Inner {
                vonage,
                url,
                store,
                sealer: Sealer::new(secret),
                added: Notify::new(),
                in_hand: Mutex::default(),
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

    /// Posts one message, its body built again for each attempt; answers its
    /// `message_uuid`.
    async fn post(
        &self,
        body: impl FnMut() -> Result<Value, DeliveryError>,
    ) -> Result<String, DeliveryError> {
        let answer = self.vonage.client.post_json(&self.url, body).await?;
        Ok(accepted_reference(&answer, "message_uuid"))
    }

    /// Marks `reference` as being sent from here; false if it already is.
    fn take_in_hand(&self, reference: &str) -> bool {
        let mut in_hand = self.in_hand.lock().unwrap_or_else(PoisonError::into_inner);
        in_hand.insert(reference.to_owned())
    }

    /// How long a claimed failover is kept from everyone else: longer than its send.
    fn claim_ms(&self) -> Millis {
        self.vonage.client.longest_post().as_millis() as Millis + FAILOVER_CLAIM_MARGIN_MS
    }

    /// The failover task: claims due failovers and sends their SMS where still needed
    /// (side by side), and sleeps until the next deadline, a new failover, the end of a
    /// send, or `stop`. At a stop no send is retried any more, so each ends within its
    /// attempt; those the provider did not take are set aside for the next start.
    async fn run_failovers(self: Arc<Self>, stop: CancellationToken) {
        let mut sending = JoinSet::new();
        loop {
            let now = now_ms();
            let room = MAX_SENDING - sending.len();
            let next_due = if room == 0 {
                None // woken by the end of a send
            } else {
                match self
                    .store
                    .claim_due_failovers(now, now + self.claim_ms(), room)
                    .await
                {
                    Ok(handed_out) => {
                        let full = handed_out.due.len() == room;
                        for (failover, verdict) in handed_out.due {
                            if let FailoverVerdict::Send { expires_at } = verdict {
                                if !self.take_in_hand(&failover.reference) {
                                    tracing::warn!(
                                        token = failover.token,
                                        message_uuid = failover.reference,
                                        "a failover's claim ran out while its SMS is still settling here"
                                    );
                                    continue;
                                }
                                let send =
                                    self.clone()
                                        .send_failover(failover, expires_at, stop.clone());
                                sending.spawn(send);
                            } else {
                                log_not_needed(&failover, verdict);
                            }
                        }
                        if full {
                            continue;
                        }
                        handed_out.next_due
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read pending failovers");
                        Some(now + 1000)
                    }
                }
            };
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(IDLE)
                .min(IDLE);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.added.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = sending.join_next() => {}
            }
        }
        let all_sent = async { while sending.join_next().await.is_some() {} };
        let last_attempt = self.vonage.client.attempt_timeout() + SHUTDOWN_GRACE;
        if tokio::time::timeout(last_attempt, all_sent).await.is_err() {
            tracing::warn!(
                cut_short = sending.len(),
                "stopping during failover SMS sends: they are tried again once their claims run out"
            );
        }
    }

    /// Sends a failover's SMS, naming the minutes its code has left (until
    /// `expires_at`), and records the outcome on its code. One not retried because otpd
    /// is stopping is set aside instead.
    async fn send_failover(
        self: Arc<Self>,
        failover: PendingFailover,
        expires_at: Millis,
        stop: CancellationToken,
    ) {
        let _in_hand = InHand {
            set: &self.in_hand,
            reference: &failover.reference,
        };
        let opened = self
            .sealer
            .open(&Bound::of(&failover), &failover.sealed_text);
        let outcome = match opened {
            Some(text) => match self.post_failover(&failover, &text, expires_at).await {
                Ok(outcome) => outcome,
                Err(verdict) => return self.let_go(&failover, verdict).await,
            },
            None => Err(DeliveryError::Refused(
                "the stored text does not open: sealed under another server secret, or \
                 the failover's token, number or reference was altered in the store"
                    .into(),
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
            Err(DeliveryError::Unavailable { .. }) if stop.is_cancelled() => {
                return self.set_aside(&failover).await;
            }
            Err(DeliveryError::Unavailable {
                reason,
                retry_after,
            }) if let Some(due_at) = self.retry_at(retry_after, expires_at) => {
                return self.retry_later(&failover, due_at, &reason).await;
            }
            Err(e) => {
                tracing::error!(token = failover.token, error = %e, "failover SMS not sent");
                (FAILOVER_FAILED, e.to_string())
            }
        };
        let event = DeliveryEvent {
            at: now_ms(),
            status: status.into(),
            channel: Some("sms".into()),
            detail: Some(detail),
        };
        self.settle(&failover, event, expires_at, &stop).await;
    }

    /// Posts a claimed failover's SMS (`text`, its minutes left to fill). Before each
    /// retry it asks the store again whether the SMS is still owed, as the claim did,
    /// and answers the verdict when it is not (verified, read, cancelled, replaced,
    /// locked meanwhile); each attempt names the minutes left as of that attempt. A
    /// store error on asking retries as claimed: the claim found the SMS owed.
    async fn post_failover(
        &self,
        failover: &PendingFailover,
        text: &str,
        expires_at: Millis,
    ) -> Result<Result<String, DeliveryError>, FailoverVerdict> {
        let left = |now| Duration::from_millis(expires_at.saturating_sub(now));
        let mut tries = self
            .vonage
            .client
            .tries(Some(Instant::now() + left(now_ms())));
        loop {
            let sms = self.sms(&failover.to, &fill_minutes(text, left(now_ms()).as_secs()));
            if let Some(outcome) = tries.attempt(&self.url, &sms).await {
                return Ok(outcome.map(|answer| accepted_reference(&answer, "message_uuid")));
            }
            match self.store.judge_failover(failover, now_ms()).await {
                Ok(FailoverVerdict::Send { .. }) => {}
                Ok(verdict) => return Err(verdict),
                Err(error) => tracing::warn!(
                    token = failover.token,
                    %error,
                    "cannot check that the failover SMS is still owed: retrying it as claimed"
                ),
            }
        }
    }

    /// Lets go of a claimed failover whose SMS turned out no longer owed between two
    /// attempts, as a claim drops one: nothing is recorded on its code. One whose code
    /// a resend on its way replaced is filed again, due at once, for the claim to wait
    /// on that resend. A store error leaves the claim, judged again when it runs out.
    async fn let_go(&self, claimed: &PendingFailover, verdict: FailoverVerdict) {
        log_not_needed(claimed, verdict);
        let released = if verdict == FailoverVerdict::ResendOnItsWay {
            self.refile(claimed, now_ms()).await
        } else {
            self.store.finish_failover(claimed).await
        };
        if let Err(error) = released {
            tracing::error!(
                token = claimed.token,
                %error,
                "cannot let the failover go: it is judged again when its claim runs out"
            );
        }
    }

    /// Records a send's outcome on its code and lets the failover go, trying again
    /// through a store error until the code expires or otpd stops. A claim that runs
    /// out meanwhile comes back, but is not sent again from here (`in_hand`), nor from
    /// anywhere once the code has expired.
    async fn settle(
        &self,
        failover: &PendingFailover,
        event: DeliveryEvent,
        expires_at: Millis,
        stop: &CancellationToken,
    ) {
        loop {
            let settled = async {
                // A retried record finds the event there already: the same `at`.
                let store = &self.store;
                store
                    .record_delivery_event(&failover.reference, event.clone())
                    .await?;
                store.finish_failover(failover).await
            };
            let Err(error) = settled.await else { return };
            if now_ms() >= expires_at || stop.is_cancelled() {
                tracing::error!(
                    token = failover.token,
                    %error,
                    "cannot record the failover SMS's outcome: it may be sent again"
                );
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(SETTLE_PAUSE) => {}
                () = stop.cancelled() => {}
            }
        }
    }

    /// Files a failover not sent because otpd is stopping as due now, so the next start
    /// sends it at once rather than when its claim runs out (the code may not live that
    /// long).
    async fn set_aside(&self, claimed: &PendingFailover) {
        match self.refile(claimed, now_ms()).await {
            Ok(()) => tracing::info!(
                token = claimed.token,
                "failover SMS not sent before the stop: the next start sends it"
            ),
            Err(error) => tracing::error!(
                token = claimed.token,
                %error,
                "failover SMS not sent before the stop: it is sent when its claim runs out"
            ),
        }
    }

    /// When to try again a failover SMS Vonage did not take: [`OUTAGE_RETRY_MS`] from
    /// now, or later if Vonage asked for longer (`retry_after`). `None` when an attempt
    /// then could end after the code expires, as no retry starts that could.
    fn retry_at(&self, retry_after: Option<Duration>, expires_at: Millis) -> Option<Millis> {
        let asked = retry_after.map_or(0, |wait| wait.as_millis() as Millis);
        let due_at = now_ms() + asked.max(OUTAGE_RETRY_MS);
        let attempt = self.vonage.client.attempt_timeout().as_millis() as Millis;
        (due_at + attempt <= expires_at).then_some(due_at)
    }

    /// Files a failover Vonage could not take again, due at `due_at`.
    async fn retry_later(&self, claimed: &PendingFailover, due_at: Millis, error: &str) {
        match self.refile(claimed, due_at).await {
            Ok(()) => tracing::warn!(
                token = claimed.token,
                error,
                retry_in_ms = due_at.saturating_sub(now_ms()),
                "failover SMS not taken by Vonage: it goes back in line"
            ),
            Err(store_error) => tracing::error!(
                token = claimed.token,
                error,
                %store_error,
                "failover SMS not taken by Vonage: it is tried again when its claim runs out"
            ),
        }
    }

    /// Files a claimed failover again, due at `due_at`, then lets the claim go. Filed
    /// before the claim goes: between the two, a crash leaves both, and the second is
    /// dropped as [`FailoverVerdict::Done`] once the first is sent.
    async fn refile(&self, claimed: &PendingFailover, due_at: Millis) -> Result<(), StoreError> {
        let again = PendingFailover {
            due_at,
            ..claimed.clone()
        };
        self.store.put_failover(&again).await?;
        self.store.finish_failover(claimed).await
    }
}

/// Logs why a failover's SMS is not sent: not at all, or not yet (a resend is on its way).
fn log_not_needed(failover: &PendingFailover, verdict: FailoverVerdict) {
    let (token, message_uuid) = (&failover.token, &failover.reference);
    if verdict == FailoverVerdict::ResendOnItsWay {
        tracing::info!(
            token,
            message_uuid,
            "failover SMS held back: a resend is on its way"
        );
    } else {
        tracing::info!(token, message_uuid, ?verdict, "no failover SMS needed");
    }
}

/// A failover reference in hand for as long as this lives (see `Inner::in_hand`).
struct InHand<'a> {
    set: &'a Mutex<HashSet<String>>,
    reference: &'a str,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        set.remove(self.reference);
    }
}

#[async_trait]
impl Delivery for MessagesDelivery {
    fn no_messenger(&self) -> Option<String> {
        self.inner.vonage.no_messenger()
    }

    async fn send(&self, message: &Message<'_>) -> Result<Receipt, DeliveryError> {
        let inner = &self.inner;
        let Some(psid) = &message.to.messenger else {
            let number = message.to.sms.as_deref().expect("a create names a channel");
            let uuid = inner
                .post(|| Ok(inner.sms(number, &message.text_at(now_ms()))))
                .await?;
            tracing::info!(token = message.token, message_uuid = uuid, "sent SMS");
            return Ok(Receipt { reference: uuid });
        };
        let uuid = inner
            .post(|| {
                let text = message.text_at(now_ms());
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
                Ok(body)
            })
            .await?;
        if let Some(number) = &message.to.sms {
            // Waited from now, when the message went out, for half the time left at
            // most; where that is under Dispatch's 15 s floor (a slow send of a
            // short-lived code), no later than leaves the SMS as long as the wait.
            let now = now_ms();
            let after = inner.vonage.failover_after(message, now) * 1000;
            let due_at = (now + after).min(message.expires_at.saturating_sub(after));
            let mut failover = PendingFailover {
                reference: uuid.clone(),
                due_at: due_at.max(now),
                token: message.token.to_owned(),
                to: number.clone(),
                sealed_text: Vec::new(),
            };
            // Bound to the fields stored beside it, as the failover task opens it.
            let bound = Bound::of(&failover);
            failover.sealed_text = inner.sealer.seal(&bound, &message.text_without_minutes());
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
