//! The number actor: one per WhatsApp account this node runs.
//!
//! It owns the account's session (through [`NumberResources`], so the fleet can close it even
//! after a panic), its outbound pacer and its conversation supervisor, and it runs the session
//! state machine: pairing → connecting ⇄ online, and the terminal states. After a stream
//! replacement it stops and never reconnects by itself: another connection owns the account now.
//!
//! It runs under the [`Lease`] the fleet took for it, and every write it and its children make
//! carries the lease's [`Fence`]. It watches the lease: when it is revoked, for whatever reason
//! (a lost renewal, a write refused as fenced, a replaced stream — see
//! [`NumberResources::lose_fence`]), the watch closes the session and the tasks at once and the
//! number stops; the fleet keeps it stopped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::addr::Addr;
use crate::command::{CommandError, Done};
use crate::conversations::{ConversationsActor, ConversationsArgs, ConversationsMsg};
use crate::coordinator::{FenceLoss, Lease};
use crate::deps::{Deps, FleetCounters, NumberPhase, NumberResources};
use crate::ids::PhoneNumber;
use crate::pacer::{self, PacerHandle};
use crate::store::{Fence, Queued, StoreError, Unsent, unix_ms};
use crate::telemetry::{
    ActorKind, DISCONNECTS, FENCE_LOSSES, INTAKE_DEFERRED, MESSAGES_RECEIVED, Mailbox,
};
use crate::transport::{
    AccountSpec, EventSink, InboundMessage, OutboundText, SessionStats, WaEvent,
};

/// The number actor.
pub struct NumberActor;

/// Messages of a number.
pub enum NumberMsg {
    /// An event from the session, in order.
    Transport(WaEvent),
    /// Report the number's status.
    Status(RpcReplyPort<NumberStatus>),
    /// Hand out the conversation supervisor (for status and tests).
    Conversations(RpcReplyPort<Option<Addr<ConversationsMsg>>>),
    /// A temporary ban ended: open a new session.
    Reconnect,
    /// Fault injection for chaos runs: fail this actor with the given error.
    Crash(String),
    /// The number's lease was revoked (its session is closed already): stop.
    FenceLost(FenceLoss),
    /// Stop for a handoff (moved, drained, removed): settle the sends in flight first, for at
    /// most [`HANDOFF_SETTLE`], so that the next owner has nothing to send again.
    HandOff,
    /// An operator asks to unlink the device; answers once the logout is under way.
    Logout(RpcReplyPort<Result<(), CommandError>>),
    /// Send this message as the business: queued in the outbox (once per id), then paced like
    /// every reply. Answers once it is committed.
    Send(OutboundText, RpcReplyPort<Result<Done, CommandError>>),
    /// An operator asks for a pair code; answers once WhatsApp took the request.
    PairCode(RpcReplyPort<Result<(), CommandError>>),
}

/// How long a number handed off waits for the acks of its sends in flight.
pub const HANDOFF_SETTLE: Duration = Duration::from_secs(2);

/// A number as its actor sees it.
#[derive(Debug, Clone)]
pub struct NumberStatus {
    /// The account.
    pub number: PhoneNumber,
    /// Its state.
    pub state: NumberPhase,
    /// The QR code to show while pairing.
    pub qr: Option<String>,
    /// The pair code, if one was requested.
    pub pair_code: Option<String>,
    /// Session counters.
    pub stats: SessionStats,
}

/// What a number is started with.
pub struct NumberArgs {
    /// The account.
    pub number: PhoneNumber,
    /// Its mailbox counter.
    pub mailbox: Mailbox,
    /// Session, tasks and state, owned by the fleet's slot.
    pub resources: Arc<NumberResources>,
    /// The ownership it runs under.
    pub lease: Lease,
    /// Ports and settings.
    pub deps: Deps,
}

/// A number's state.
pub struct NumberState {
    args: NumberArgs,
    myself: Addr<NumberMsg>,
    pacer: Option<PacerHandle>,
    conversations: Option<Addr<ConversationsMsg>>,
    qr: Option<String>,
    pair_code: Option<String>,
}

impl Actor for NumberActor {
    type Msg = NumberMsg;
    type State = NumberState;
    type Arguments = NumberArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: NumberArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(NumberState {
            myself: Addr::new(myself, args.mailbox.clone()),
            args,
            pacer: None,
            conversations: None,
            qr: None,
            pair_code: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let a = &state.args;
        watch_lease(a.lease.clone(), a.resources.clone(), state.myself.clone());
        let fence = a.lease.fence().clone();
        let pacer = pacer::spawn(a.resources.clone(), &a.deps, fence.clone());
        let mailbox = Mailbox::new(ActorKind::ConversationSupervisor);
        let args = ConversationsArgs {
            fence: fence.clone(),
            mailbox: mailbox.clone(),
            resources: a.resources.clone(),
            pacer: pacer.clone(),
            number: state.myself.clone(),
            deps: a.deps.clone(),
        };
        state.pacer = Some(pacer);
        let (conv, _) =
            ConversationsActor::spawn_linked(None, ConversationsActor, args, myself.get_cell())
                .await?;
        state.conversations = Some(Addr::new(conv, mailbox));
        open_session(state).await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.resources.release().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.mailbox.dequeued();
        match message {
            NumberMsg::Transport(event) => on_event(state, event).await?,
            NumberMsg::Status(reply) => {
                let _ = reply.send(status(state));
            }
            NumberMsg::Conversations(reply) => {
                let _ = reply.send(state.conversations.clone());
            }
            NumberMsg::Reconnect => {
                if state.args.resources.state() == NumberPhase::Banned {
                    open_session(state).await?;
                }
            }
            NumberMsg::Crash(reason) => return Err(reason.into()),
            NumberMsg::HandOff => {
                if let Some(pacer) = &state.pacer {
                    let _ = tokio::time::timeout(HANDOFF_SETTLE, pacer.settle()).await;
                }
                myself.stop(Some("handed off".to_owned()));
            }
            NumberMsg::Logout(reply) => {
                let _ = reply.send(logout(state).await);
            }
            NumberMsg::Send(msg, reply) => {
                let _ = reply.send(send(state, msg).await);
            }
            NumberMsg::PairCode(reply) => {
                let _ = reply.send(pair_code(state).await);
            }
            NumberMsg::FenceLost(loss) => {
                // Never restarted: the fleet sees the revoked lease and keeps it stopped.
                myself.stop(Some(format!("ownership lost: {loss}")));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The only child is the conversation supervisor, which never stops on its own: if it
        // fails, the number fails with it and the fleet restarts both under the number's policy.
        match event {
            SupervisionEvent::ActorFailed(_, err) => {
                Err(format!("conversation supervisor failed: {err}").into())
            }
            SupervisionEvent::ActorTerminated(..) => Err("conversation supervisor stopped".into()),
            _ => Ok(()),
        }
    }
}

fn fence(state: &NumberState) -> Result<&Fence, ActorProcessingErr> {
    Ok(state.args.lease.fence())
}

/// Watches the number's lease: the moment it is revoked the number's session and tasks are
/// closed (no send goes out after it) and the number is told to stop.
fn watch_lease(lease: Lease, resources: Arc<NumberResources>, number: Addr<NumberMsg>) {
    tokio::spawn(async move {
        let loss = tokio::select! {
            loss = lease.revoked() => loss,
            // The number stopped (or restarts with fresh resources and a watch of its own).
            () = resources.cancel.cancelled() => return,
        };
        metrics::counter!(FENCE_LOSSES, "reason" => loss.as_str()).increment(1);
        tracing::warn!(number = %lease.number(), token = %lease.token(), %loss, "ownership lost; stopping");
        resources.set_state(NumberPhase::after_loss(loss));
        resources.release().await;
        let _ = number.cast(NumberMsg::FenceLost(loss));
    });
}

/// Opens a session with the stored credentials (pairing if there are none).
async fn open_session(state: &mut NumberState) -> Result<(), ActorProcessingErr> {
    let a = &state.args;
    let (store, cancel) = (&a.deps.store, &a.resources.cancel);
    let credentials = store
        .health()
        .retrying(cancel, || store.load_session(&a.number))
        .await?;
    // Pairing starts when the first code arrives: until then the session is connecting.
    a.resources.set_state(NumberPhase::Connecting);
    let account = AccountSpec {
        number: a.number.clone(),
        client_label: a.deps.settings.client_label.clone(),
        credentials,
        lease: a.lease.clone(),
    };
    let intake = Intake {
        number: state.myself.clone(),
        conversations: state
            .conversations
            .clone()
            .ok_or("session opened before post_start")?,
        pacer: state
            .pacer
            .clone()
            .ok_or("session opened before post_start")?,
        fence: fence(state)?.clone(),
        resources: a.resources.clone(),
        deps: a.deps.clone(),
    };
    let sink: EventSink = Arc::new(move |event| intake.on_event(event));
    let session = a.deps.connector.start(account, sink).await?;
    if let Some(old) = a.resources.replace_session(Some(session)) {
        old.shutdown().await;
    }
    Ok(())
}

async fn on_event(state: &mut NumberState, event: WaEvent) -> Result<(), ActorProcessingErr> {
    let r = state.args.resources.clone();
    match event {
        // Taken by the session's sink (see [`Intake`]); never queued here.
        WaEvent::Message(_)
        | WaEvent::FromPhone(_)
        | WaEvent::Undecryptable { .. }
        | WaEvent::OfflineSyncCompleted { .. }
        | WaEvent::Receipt(_)
        | WaEvent::ServerAck(_)
        | WaEvent::OfflineSyncPreview { .. }
        | WaEvent::ChatPresence { .. } => {}
        WaEvent::QrCode { code, .. } => {
            state.qr = Some(code);
            r.set_state(NumberPhase::Pairing);
        }
        WaEvent::PairCode { code, .. } => {
            state.pair_code = Some(code);
            r.set_state(NumberPhase::Pairing);
        }
        WaEvent::PairCodeRefresh => {
            state.pair_code = None;
        }
        WaEvent::PairCodeFailed {
            reason,
            retry_after,
        } => {
            state.pair_code = None;
            tracing::warn!(number = %state.args.number, %reason, ?retry_after, "pair code refused");
        }
        WaEvent::PairFailed { reason } => {
            tracing::warn!(number = %state.args.number, %reason, "pairing failed");
        }
        WaEvent::PairSuccess { credentials } => {
            state.qr = None;
            state.pair_code = None;
            let (store, fence) = (&state.args.deps.store, fence(state)?);
            let cancel = &r.cancel;
            store
                .health()
                .retrying(cancel, || store.save_session(fence, &credentials))
                .await?;
            r.set_state(NumberPhase::Connecting);
        }
        WaEvent::Connected => r.set_state(NumberPhase::Online),
        WaEvent::Disconnected { reason } => {
            metrics::counter!(DISCONNECTS, "reason" => reason.label()).increment(1);
            r.set_state(NumberPhase::Connecting);
        }
        WaEvent::LoggedOut => {
            let (store, fence) = (&state.args.deps.store, fence(state)?);
            store
                .health()
                .retrying(&r.cancel, || store.clear_session(fence))
                .await?;
            end_session(state, "logged_out", NumberPhase::LoggedOut);
        }
        WaEvent::StreamReplaced => {
            // Another connection is logged in as this number: ownership is lost.
            metrics::counter!(DISCONNECTS, "reason" => "stream_replaced").increment(1);
            r.lose_fence(FenceLoss::StreamReplaced);
        }
        WaEvent::QrCodesExhausted { disconnected } => {
            state.qr = None;
            if disconnected {
                end_session(state, "qr_exhausted", NumberPhase::Unpaired);
            }
        }
        WaEvent::ConnectFailure {
            code,
            message,
            will_retry,
        } => {
            tracing::warn!(number = %state.args.number, code, ?message, will_retry, "login refused");
            if will_retry {
                metrics::counter!(DISCONNECTS, "reason" => "connect_failure").increment(1);
                r.set_state(NumberPhase::Connecting);
            } else {
                end_session(state, "connect_failure", NumberPhase::Rejected);
            }
        }
        WaEvent::ClientOutdated => {
            end_session(state, "client_outdated", NumberPhase::Rejected);
        }
        WaEvent::StreamError { code } => {
            tracing::info!(number = %state.args.number, %code, "stream error; reconnecting");
            metrics::counter!(DISCONNECTS, "reason" => "stream_error").increment(1);
            r.set_state(NumberPhase::Connecting);
        }
        WaEvent::TemporaryBan { duration, .. } => {
            end_session(state, "temporary_ban", NumberPhase::Banned);
            // A ban that names no time left is no reason to try again at once.
            let wait = duration.max(MIN_BAN_WAIT);
            state.myself.cast_after(wait, NumberMsg::Reconnect);
        }
    }
    Ok(())
}

/// The session's sink: the number's events as the session reports them. Messages (a contact's,
/// or one sent from the phone) go straight to the conversation supervisor (intake); server
/// acks, receipts and the connection's ups and downs straight to the pacer, which settles sends
/// by them; the session's lifecycle events go through the number's mailbox. So a message costs
/// no trip through the number actor.
struct Intake {
    number: Addr<NumberMsg>,
    conversations: Addr<ConversationsMsg>,
    pacer: PacerHandle,
    fence: Fence,
    resources: Arc<NumberResources>,
    deps: Deps,
}

impl Intake {
    fn on_event(&self, event: WaEvent) {
        match event {
            WaEvent::Message(msg) => self.on_message(msg),
            WaEvent::FromPhone(msg) => {
                metrics::counter!(MESSAGES_RECEIVED, "kind" => "from_phone").increment(1);
                self.take_in(msg);
            }
            WaEvent::Undecryptable { id, offline, .. } => {
                // The session asked for a resend; the readable copy arrives with the same id.
                metrics::counter!(MESSAGES_RECEIVED, "kind" => "undecryptable").increment(1);
                tracing::debug!(number = %self.fence.number, message_id = %id, offline, "undecryptable");
            }
            WaEvent::ServerAck(ack) => self.pacer.server_ack(ack),
            WaEvent::Receipt(receipt) => self.pacer.receipt(receipt.ids),
            WaEvent::OfflineSyncCompleted { count } => {
                tracing::debug!(number = %self.fence.number, count, "offline sync completed");
            }
            WaEvent::OfflineSyncPreview { total, messages } => {
                tracing::debug!(number = %self.fence.number, total, messages, "offline sync starts");
            }
            WaEvent::ChatPresence { .. } => {}
            WaEvent::Connected => {
                self.pacer.connected();
                let _ = self.number.cast(NumberMsg::Transport(WaEvent::Connected));
            }
            event @ WaEvent::Disconnected { .. } => {
                self.pacer.disconnected();
                let _ = self.number.cast(NumberMsg::Transport(event));
            }
            event => {
                let _ = self.number.cast(NumberMsg::Transport(event));
            }
        }
    }

    fn on_message(&self, msg: InboundMessage) {
        if msg.chat.is_group() && !self.deps.settings.groups_enabled {
            metrics::counter!(MESSAGES_RECEIVED, "kind" => "group_ignored").increment(1);
            if let Some(session) = self.resources.session() {
                session.ack(&[msg.key()]);
            }
            return;
        }
        let kind = if msg.chat.is_group() {
            "group"
        } else {
            "direct"
        };
        metrics::counter!(MESSAGES_RECEIVED, "kind" => kind).increment(1);
        FleetCounters::bump(&self.deps.counters.messages_in);
        self.take_in(msg);
    }

    /// Hands `msg` to intake, unless the number already holds as many unprocessed messages as
    /// it may: then it is left unacknowledged, and WhatsApp, which keeps it, delivers it again
    /// (after the next login, or when it recycles a connection that owes acks).
    fn take_in(&self, msg: InboundMessage) {
        let held = self.resources.pending.load(Ordering::Relaxed)
            + usize::try_from(self.conversations.mailbox().depth()).unwrap_or(0);
        if held >= self.deps.settings.intake_max_pending {
            metrics::counter!(INTAKE_DEFERRED).increment(1);
            FleetCounters::bump(&self.deps.counters.deferred);
            tracing::debug!(number = %self.fence.number, held, "intake full; left to WhatsApp");
            return;
        }
        let _ = self.conversations.cast(ConversationsMsg::Inbound(msg));
    }
}

/// A terminal event: close the session (it does not reconnect) and record the state.
/// The least a banned number waits before it logs in again.
const MIN_BAN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Unlinks the device: through the session ([`WaEvent::LoggedOut`] follows), or, with none
/// open, by clearing the stored credentials here.
async fn logout(state: &mut NumberState) -> Result<(), CommandError> {
    if let Some(session) = state.args.resources.session() {
        return session
            .logout()
            .await
            .map_err(|e| CommandError::Failed(format!("logout refused: {e}")));
    }
    on_event(state, WaEvent::LoggedOut)
        .await
        .map_err(|e| CommandError::Failed(format!("logout failed: {e}")))
}

/// Asks the session for a pair code: only a number that is pairing has one to give.
async fn pair_code(state: &NumberState) -> Result<(), CommandError> {
    let phase = state.args.resources.state();
    if phase != NumberPhase::Pairing {
        return Err(CommandError::Failed(format!(
            "{} is {}, not pairing",
            state.args.number,
            phase.as_str()
        )));
    }
    let Some(session) = state.args.resources.session() else {
        return Err(CommandError::Failed("no session yet; try again".to_owned()));
    };
    session
        .request_pair_code()
        .await
        .map_err(|e| CommandError::Failed(format!("pair code refused: {e}")))
}

/// Queues `msg` in the outbox and hands it to the pacer if it is new (or was queued before but
/// may never have reached the pacer: its commit's answer was lost).
async fn send(state: &NumberState, msg: OutboundText) -> Result<Done, CommandError> {
    let Some(pacer) = &state.pacer else {
        return Err(CommandError::NotHere(state.args.number.clone()));
    };
    let id = msg.id.clone();
    match state
        .args
        .deps
        .store
        .queue_send(state.args.lease.fence(), &msg)
        .await
    {
        Ok(Queued::New) => {
            tracing::info!(number = %state.args.number, message_id = %id, "business send queued");
            pacer.enqueue(msg);
            Ok(Done::Queued { id, repeat: false })
        }
        Ok(Queued::Repeat { unsent }) => {
            if unsent {
                pacer.recover(Unsent {
                    reply: msg,
                    queued_at_ms: unix_ms(),
                });
            }
            Ok(Done::Queued { id, repeat: true })
        }
        Ok(Queued::KeyReused) => Err(CommandError::KeyReused),
        Err(StoreError::Fenced { .. }) => {
            state.args.resources.lose_fence(FenceLoss::StoreRefused);
            Err(CommandError::NotHere(state.args.number.clone()))
        }
        Err(e) if e.is_retryable() => Err(CommandError::Unavailable(e.to_string())),
        Err(e) => Err(CommandError::Failed(format!("the store refused it: {e}"))),
    }
}

fn end_session(state: &NumberState, reason: &'static str, to: NumberPhase) {
    metrics::counter!(DISCONNECTS, "reason" => reason).increment(1);
    tracing::warn!(number = %state.args.number, reason, "session ended");
    state.args.resources.set_state(to);
    if let Some(session) = state.args.resources.replace_session(None) {
        tokio::spawn(async move { session.shutdown().await });
    }
}

fn status(state: &NumberState) -> NumberStatus {
    let r = &state.args.resources;
    NumberStatus {
        number: state.args.number.clone(),
        state: r.state(),
        qr: state.qr.clone(),
        pair_code: state.pair_code.clone(),
        stats: r.session().map(|s| s.stats()).unwrap_or_default(),
    }
}
