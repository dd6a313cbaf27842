//! The transport port over whatsapp-rust: [`WhatsAppConnector`] starts one `Bot` per number;
//! [`WhatsAppSession`] is the port's session over its `Client`.
//!
//! - The bot is built with the number's [`WaBackend`] (its protocol state in the store, under
//!   the number's fence), the tokio WebSocket transport (its URL configurable; through the
//!   number's proxy if its settings name one, see [`super::proxy`]), the ureq HTTP
//!   client, `TokioRuntime`, a fixed WhatsApp Web version (no network fetch), a push name, and
//!   history sync skipped unless asked for.
//! - One inline event handler turns each `Event` into the port's events ([`map_event`]) and
//!   hands them to the number's sink, which never blocks.
//! - The inbound durability hook delivers each decrypted batch to the sink and holds the
//!   server's ack until the number has acknowledged every message of it ([`WaSession::ack`],
//!   after its commit); past `ack_timeout` the batch fails, so the server redelivers it. A
//!   repeat of a message waits for the same acknowledgement.
//! - whatsapp-rust emits no event for a failed connect; a watcher reads `client.stats()` and
//!   counts them (`switchboard_connect_failures_total{transport="whatsapp"}`).
//! - `disconnect()` is final: a restart of the number builds a new bot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{
    AccountSpec, EventSink, MessageId, MessageKey, OutboundText, SendError, SessionStats,
    TransportError, WaConnector, WaEvent, WaSession,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use whatsapp_rust::bot::{Bot, BotHandle};
use whatsapp_rust::send::SendOptions;
use whatsapp_rust::wacore::pair_code::PairCodeOptions;
use whatsapp_rust::wacore::types::events::{Event, EventHandler, InboundMessage as WaInbound};
use whatsapp_rust::waproto::whatsapp as wa;
use whatsapp_rust::{ChatStateType, Client, InboundDurabilityHook, TokioRuntime};
use whatsapp_rust_ureq_http_client::UreqHttpClient;

use super::backend::WaBackend;
use super::events::{inbound, map_event};
use super::proxy::NumberTransport;
use crate::store::SqlStore;

/// WhatsApp's own WebSocket endpoint.
pub const WHATSAPP_URL: &str = "wss://web.whatsapp.com/ws/chat";

/// Connect failures the client reports only through its stats.
pub const CONNECT_FAILURES: &str = "switchboard_connect_failures_total";

/// How often the watcher reads a client's stats.
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the client to flush and stop before it is aborted.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How numbers connect to WhatsApp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhatsAppOptions {
    /// The WebSocket URL (WhatsApp's, or a test endpoint's).
    pub url: String,
    /// The WhatsApp Web version the client presents.
    pub version: (u32, u32, u32),
    /// Whether to take the phone's chat history when pairing.
    pub history_sync: bool,
    /// How long an inbound batch may wait for the number's commit before it is left to the
    /// server to redeliver.
    pub ack_timeout: Duration,
}

impl Default for WhatsAppOptions {
    fn default() -> Self {
        Self {
            url: WHATSAPP_URL.to_owned(),
            version: (2, 3000, 1_042_742_319),
            history_sync: false,
            ack_timeout: Duration::from_secs(60),
        }
    }
}

/// Starts whatsapp-rust clients for numbers, on the store's protocol state.
#[derive(Debug, Clone)]
pub struct WhatsAppConnector {
    store: SqlStore,
    options: Arc<WhatsAppOptions>,
}

impl WhatsAppConnector {
    /// A connector whose clients keep their state in `store`.
    pub fn new(store: SqlStore, options: WhatsAppOptions) -> Self {
        Self {
            store,
            options: Arc::new(options),
        }
    }
}

#[async_trait]
impl WaConnector for WhatsAppConnector {
    async fn start(
        &self,
        account: AccountSpec,
        events: EventSink,
    ) -> Result<Arc<dyn WaSession>, TransportError> {
        let state = self.store.protocol_state(account.lease.fence().clone());
        let backend = WaBackend::new(state, account.lease.clone());
        let acks = Arc::new(AckWaiters::default());
        let counts = Arc::new(Counts::default());
        let mut builder = Bot::builder()
            .with_backend(backend)
            .with_transport_factory(NumberTransport {
                url: self.options.url.clone(),
                store: self.store.clone(),
                number: account.number.clone(),
            })
            .with_http_client(UreqHttpClient::new())
            .with_runtime(TokioRuntime)
            .with_version(self.options.version)
            .with_push_name(account.client_label.clone())
            .with_event_handler(Forwarder {
                sink: events.clone(),
                counts: counts.clone(),
            })
            .with_inbound_durability_hook(Durability {
                sink: events,
                acks: acks.clone(),
                timeout: self.options.ack_timeout,
            });
        if !self.options.history_sync {
            builder = builder.skip_history_sync();
        }
        let bot = builder
            .build()
            .await
            .map_err(|e| TransportError::Setup(e.to_string()))?;
        let handle = bot.spawn();
        let client = handle.client();
        let watcher = tokio::spawn(watch(client.clone(), counts.clone()));
        Ok(Arc::new(WhatsAppSession {
            number: account.number,
            client,
            handle: Mutex::new(Some(handle)),
            acks,
            counts,
            watcher,
        }))
    }
}

/// What the watcher and the handler count for [`WaSession::stats`].
#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    connect_failures: AtomicU64,
}

/// The number's session over a running bot.
pub struct WhatsAppSession {
    number: PhoneNumber,
    client: Arc<Client>,
    handle: Mutex<Option<BotHandle>>,
    acks: Arc<AckWaiters>,
    counts: Arc<Counts>,
    watcher: JoinHandle<()>,
}

impl WhatsAppSession {
    fn connected(&self) -> Result<(), SendError> {
        if self.handle_gone() {
            return Err(SendError::Closed);
        }
        if self.client.is_connected() && self.client.is_logged_in() {
            Ok(())
        } else {
            Err(SendError::NotConnected)
        }
    }

    fn handle_gone(&self) -> bool {
        self.handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

#[async_trait]
impl WaSession for WhatsAppSession {
    async fn send_text(&self, msg: OutboundText) -> Result<(), SendError> {
        self.connected()?;
        let to = wa_jid(&msg.to)?;
        let body = wa::Message {
            conversation: Some(msg.text),
            ..Default::default()
        };
        let options = SendOptions::default().with_message_id(msg.id.as_str());
        self.client
            .send_message_with_options(to, body, options)
            .await
            .map(drop)
            .map_err(|e| {
                tracing::debug!(number = %self.number, error = %e, "send not written");
                SendError::NotConnected
            })
    }

    async fn send_typing(&self, chat: &Jid, typing: bool) -> Result<(), SendError> {
        self.connected()?;
        let state = if typing {
            ChatStateType::Composing
        } else {
            ChatStateType::Paused
        };
        self.client
            .chatstate()
            .send(&wa_jid(chat)?, state)
            .await
            .map_err(|_| SendError::NotConnected)
    }

    async fn mark_read(
        &self,
        chat: &Jid,
        sender: Option<&Jid>,
        ids: &[MessageId],
    ) -> Result<(), SendError> {
        self.connected()?;
        let sender = sender.map(wa_jid).transpose()?;
        let ids: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        self.client
            .mark_as_read(&wa_jid(chat)?, sender.as_ref(), &ids)
            .await
            .map_err(|_| SendError::NotConnected)
    }

    fn ack(&self, messages: &[MessageKey]) {
        self.acks.ack(messages);
    }

    async fn request_pair_code(&self) -> Result<(), TransportError> {
        let options = PairCodeOptions {
            phone_number: self.number.digits().to_owned(),
            ..PairCodeOptions::default()
        };
        // The code also arrives as an event, like every other pairing step.
        self.client
            .pair_with_code(options)
            .await
            .map(drop)
            .map_err(|e| TransportError::InvalidState(e.to_string()))
    }

    async fn logout(&self) -> Result<(), TransportError> {
        self.client.logout().await;
        Ok(())
    }

    async fn shutdown(&self) {
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.watcher.abort();
        if let Some(handle) = handle {
            // Dropping the handle on time-out aborts the bot.
            if tokio::time::timeout(SHUTDOWN_WAIT, handle.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(number = %self.number, "client did not stop in time; aborted");
            }
        }
        self.acks.clear();
    }

    fn stats(&self) -> SessionStats {
        let reconnects = self.client.stats().reconnects;
        let connections = self.counts.connections.load(Ordering::Relaxed);
        let connected = self.client.is_connected();
        SessionStats {
            connect_attempts: reconnects + 1,
            connect_failures: failed_connects(
                reconnects,
                connections.saturating_sub(u64::from(connected)),
            ),
            connections,
            connected,
        }
    }
}

/// Switchboard's address as whatsapp-rust's. Every [`Jid`] is one whatsapp-rust reads.
fn wa_jid(jid: &Jid) -> Result<whatsapp_rust::Jid, SendError> {
    jid.as_str().parse().map_err(|_| {
        tracing::error!(%jid, "an address whatsapp-rust does not read");
        SendError::Closed
    })
}

/// Counts failed connects from the client's stats: it emits no event for them. Every reconnect
/// the client starts follows either a failed attempt or the end of a connection that had logged
/// in (`Connected`); so the failed attempts so far are the reconnects less the connections that
/// have ended. (A failure whose retry has not started yet is counted when it starts.)
async fn watch(client: Arc<Client>, counts: Arc<Counts>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reconnects = client.stats().reconnects;
        let connections = counts.connections.load(Ordering::Relaxed);
        let ended = connections.saturating_sub(u64::from(client.is_connected()));
        let failed = failed_connects(reconnects, ended);
        let before = counts.connect_failures.swap(failed, Ordering::Relaxed);
        if failed > before {
            metrics::counter!(CONNECT_FAILURES, "transport" => "whatsapp")
                .increment(failed - before);
        }
    }
}

/// Failed connects, from the reconnects started and the logged-in connections that ended.
fn failed_connects(reconnects: u64, ended_connections: u64) -> u64 {
    reconnects.saturating_sub(ended_connections)
}

/// The inline event handler: maps and forwards, never blocks.
struct Forwarder {
    sink: EventSink,
    counts: Arc<Counts>,
}

impl EventHandler for Forwarder {
    fn handle_event(&self, event: Arc<Event>) {
        // Messages the durability hook committed reached the sink through it already.
        if let Event::Messages(batch) = &*event
            && batch.hook_committed
        {
            return;
        }
        for e in map_event(&event) {
            if e == WaEvent::Connected {
                self.counts.connections.fetch_add(1, Ordering::Relaxed);
            }
            (self.sink)(e);
        }
    }
}

/// Holds the server's ack of an inbound batch until the number acknowledged all of it.
struct Durability {
    sink: EventSink,
    acks: Arc<AckWaiters>,
    timeout: Duration,
}

#[async_trait]
impl InboundDurabilityHook for Durability {
    async fn on_messages(&self, _client: Arc<Client>, batch: &[WaInbound]) -> anyhow::Result<()> {
        let mut waits = Vec::with_capacity(batch.len());
        let mut keys = Vec::with_capacity(batch.len());
        for m in batch {
            // What Switchboard cannot carry (or that carries nothing to answer: reactions,
            // edits, protocol messages) is counted and let go: nothing to commit.
            let Some(event) = inbound(&m.info, &m.message) else {
                continue;
            };
            let key = match &event {
                WaEvent::Message(msg) | WaEvent::FromPhone(msg) => msg.key(),
                _ => continue,
            };
            // Registered before it is handed over: the acknowledgement can come at once.
            waits.push(self.acks.wait(key.clone()));
            keys.push(key);
            (self.sink)(event);
        }
        let all = futures_util::future::join_all(waits);
        match tokio::time::timeout(self.timeout, all).await {
            // Every message acknowledged: committed.
            Ok(acked) if acked.iter().all(Result::is_ok) => Ok(()),
            // A wait dropped unanswered (the session shut down): nothing says it was committed.
            Ok(_) => anyhow::bail!(
                "the session ended before {} inbound message(s) were committed; left for \
                 redelivery",
                keys.len()
            ),
            Err(_) => {
                self.acks.forget(&keys);
                anyhow::bail!(
                    "{} inbound message(s) not committed within {:?}; left for redelivery",
                    keys.len(),
                    self.timeout
                )
            }
        }
    }
}

/// Who waits for which message's acknowledgement.
#[derive(Debug, Default)]
struct AckWaiters {
    waiting: Mutex<HashMap<MessageKey, Vec<oneshot::Sender<()>>>>,
}

impl AckWaiters {
    fn wait(&self, key: MessageKey) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(key).or_default().push(tx);
        rx
    }

    fn ack(&self, keys: &[MessageKey]) {
        let mut waiting = self.lock();
        for key in keys {
            for tx in waiting.remove(key).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    fn forget(&self, keys: &[MessageKey]) {
        let mut waiting = self.lock();
        for key in keys {
            if let Some(txs) = waiting.get_mut(key) {
                txs.retain(|tx| !tx.is_closed());
                if txs.is_empty() {
                    waiting.remove(key);
                }
            }
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MessageKey, Vec<oneshot::Sender<()>>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> MessageKey {
        let chat = Jid::parse("15552220000@s.whatsapp.net").expect("a JID");
        MessageKey {
            sender: chat.clone(),
            chat,
            id: MessageId::parse(id).expect("an id"),
        }
    }

    #[test]
    fn a_reconnect_after_a_connection_ended_is_no_failed_connect() {
        // Three refused attempts (two retried so far).
        assert_eq!(failed_connects(2, 0), 2);
        // Connected, dropped, reconnected at once: no failure.
        assert_eq!(failed_connects(1, 1), 0);
        // Then two failures before the next success.
        assert_eq!(failed_connects(3, 1), 2);
    }

    #[tokio::test]
    async fn an_acknowledgement_releases_every_wait_for_that_message_and_only_those() {
        let acks = AckWaiters::default();
        let first = acks.wait(key("A"));
        let repeat = acks.wait(key("A"));
        let mut other = acks.wait(key("B"));
        acks.ack(&[key("A")]);
        assert!(first.await.is_ok());
        assert!(repeat.await.is_ok(), "a repeat waits for the same commit");
        assert!(other.try_recv().is_err(), "B is still owed");
        acks.ack(&[key("C")]);
        drop(other);
        acks.forget(&[key("B")]);
        assert!(
            acks.lock().is_empty(),
            "a forgotten wait leaves nothing behind"
        );
    }
}
