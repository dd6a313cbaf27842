//! The outbound pacer: one task per number that sends replies in order, under the account's rate
//! limit, with a typing indicator proportional to the length, retrying with the same message id.
//!
//! A task rather than an actor: it spends its life waiting on timers and server acks, which would
//! block an actor's mailbox. It is cancelled with the number's token.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::deps::{FleetCounters, NumberResources, SendRate, Settings};
use crate::telemetry::{MESSAGES_SENT, OUTBOUND_QUEUE};
use crate::transport::{OutboundText, SendError};

/// Queues replies for a number's pacer.
#[derive(Debug, Clone)]
pub struct PacerHandle {
    tx: mpsc::UnboundedSender<OutboundText>,
}

impl PacerHandle {
    /// Queues `msg`; false if the pacer has stopped.
    pub fn enqueue(&self, msg: OutboundText) -> bool {
        let queued = self.tx.send(msg).is_ok();
        if queued {
            metrics::gauge!(OUTBOUND_QUEUE).increment(1.0);
        }
        queued
    }
}

/// Starts the pacer of a number.
pub fn spawn(
    resources: Arc<NumberResources>,
    settings: &Settings,
    counters: Arc<FleetCounters>,
) -> PacerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let pacer = Pacer {
        bucket: Bucket::new(settings.send_rate),
        typing_per_char: settings.typing_per_char,
        typing_max: settings.typing_max,
        resources,
        counters,
    };
    tokio::spawn(pacer.run(rx));
    PacerHandle { tx }
}

struct Pacer {
    bucket: Bucket,
    typing_per_char: Duration,
    typing_max: Duration,
    resources: Arc<NumberResources>,
    counters: Arc<FleetCounters>,
}

impl Pacer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<OutboundText>) {
        let cancel = self.resources.cancel.clone();
        loop {
            let msg = tokio::select! {
                () = cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            metrics::gauge!(OUTBOUND_QUEUE).decrement(1.0);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.deliver(msg) => {}
            }
        }
        let left = rx.len();
        if left > 0 {
            metrics::gauge!(OUTBOUND_QUEUE).decrement(left as f64);
        }
    }

    /// Sends one message, retrying until the server acks it or refuses it for good.
    async fn deliver(&mut self, msg: OutboundText) {
        let mut retry = Duration::from_millis(500);
        loop {
            let Some(session) = self.resources.session() else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
                continue;
            };
            self.type_for(&msg, session.as_ref()).await;
            // The token is taken right before the send, so the network sees sends spaced by the
            // bucket whatever the typing times were.
            self.bucket.take().await;
            let outcome = session.send_text(msg.clone()).await;
            let label = match &outcome {
                Ok(_) => "ok",
                Err(SendError::RateOverlimit) => "rate_overlimit",
                Err(SendError::NotConnected) => "not_connected",
                Err(SendError::Timeout(_)) => "timeout",
                Err(SendError::Refused(_)) => "refused",
                Err(SendError::Closed) => "closed",
            };
            metrics::counter!(MESSAGES_SENT, "outcome" => label).increment(1);
            match outcome {
                Ok(_) => {
                    FleetCounters::bump(&self.counters.messages_out);
                    return;
                }
                Err(SendError::Refused(reason)) => {
                    tracing::warn!(message_id = %msg.id, %reason, "send refused by the server");
                    return;
                }
                Err(SendError::RateOverlimit) => self.bucket.drain(),
                Err(SendError::NotConnected | SendError::Timeout(_) | SendError::Closed) => {}
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(Duration::from_secs(30));
        }
    }

    async fn type_for(&self, msg: &OutboundText, session: &dyn crate::transport::WaSession) {
        let chars = u32::try_from(msg.text.chars().count()).unwrap_or(u32::MAX);
        let typing = self
            .typing_per_char
            .saturating_mul(chars)
            .min(self.typing_max);
        if typing.is_zero() {
            return;
        }
        if session.send_typing(&msg.to, true).await.is_ok() {
            tokio::time::sleep(typing).await;
            let _ = session.send_typing(&msg.to, false).await;
        }
    }
}

/// A token bucket: `burst` sends at once, refilled at `per_second`.
struct Bucket {
    rate: SendRate,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: SendRate) -> Self {
        Self {
            rate,
            tokens: f64::from(rate.burst),
            refilled: Instant::now(),
        }
    }

    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.tokens =
                (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
            self.refilled = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.rate.per_second.max(1e-3);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }

    /// The server said we are over the limit: start from an empty bucket.
    fn drain(&mut self) {
        self.tokens = 0.0;
        self.refilled = Instant::now();
    }
}
