//! The number actor: one per WhatsApp account this node runs.
//!
//! It owns the account's session (through [`NumberResources`], so the fleet can close it even
//! after a panic), its outbound pacer and its conversation supervisor, and it runs the session
//! state machine: pairing → connecting ⇄ online, and the terminal states. After a stream
//! replacement it stops its session and never reconnects by itself: another connection owns the
//! account now.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::addr::Addr;
use crate::conversations::{ConversationsActor, ConversationsArgs, ConversationsMsg};
use crate::deps::{Deps, FleetCounters, NumberPhase, NumberResources};
use crate::ids::PhoneNumber;
use crate::pacer;
use crate::telemetry::{ActorKind, DISCONNECTS, MESSAGES_RECEIVED, Mailbox};
use crate::transport::{AccountSpec, EventSink, InboundMessage, SessionStats, WaEvent};

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
}

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
    /// Ports and settings.
    pub deps: Deps,
}

/// A number's state.
pub struct NumberState {
    args: NumberArgs,
    myself: Addr<NumberMsg>,
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
        let pacer = pacer::spawn(
            a.resources.clone(),
            &a.deps.settings,
            a.deps.counters.clone(),
        );
        let mailbox = Mailbox::new(ActorKind::ConversationSupervisor);
        let args = ConversationsArgs {
            number: a.number.clone(),
            mailbox: mailbox.clone(),
            resources: a.resources.clone(),
            pacer,
            deps: a.deps.clone(),
        };
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
        _myself: ActorRef<Self::Msg>,
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
        }
        Ok(())
    }
}

/// Opens a session with the stored credentials (pairing if there are none).
async fn open_session(state: &mut NumberState) -> Result<(), ActorProcessingErr> {
    let a = &state.args;
    let credentials = a.deps.sessions.load(&a.number).await?;
    a.resources.set_state(if credentials.is_some() {
        NumberPhase::Connecting
    } else {
        NumberPhase::Pairing
    });
    let account = AccountSpec {
        number: a.number.clone(),
        client_label: a.deps.settings.client_label.clone(),
        credentials,
    };
    let addr = state.myself.clone();
    let sink: EventSink = Arc::new(move |event| {
        let _ = addr.cast(NumberMsg::Transport(event));
    });
    let session = a.deps.connector.start(account, sink).await?;
    if let Some(old) = a.resources.replace_session(Some(session)) {
        old.shutdown().await;
    }
    Ok(())
}

async fn on_event(state: &mut NumberState, event: WaEvent) -> Result<(), ActorProcessingErr> {
    let r = state.args.resources.clone();
    match event {
        WaEvent::Message(msg) => on_message(state, msg),
        WaEvent::Receipt(receipt) => {
            tracing::trace!(id = %receipt.id, kind = ?receipt.kind, "receipt");
        }
        WaEvent::QrCode { code, .. } => {
            state.qr = Some(code);
            r.set_state(NumberPhase::Pairing);
        }
        WaEvent::PairCode { code } => {
            state.pair_code = Some(code);
            r.set_state(NumberPhase::Pairing);
        }
        WaEvent::PairSuccess { credentials } => {
            state.qr = None;
            state.pair_code = None;
            state
                .args
                .deps
                .sessions
                .save(&state.args.number, &credentials)
                .await?;
            r.set_state(NumberPhase::Connecting);
        }
        WaEvent::Connected => r.set_state(NumberPhase::Online),
        WaEvent::Disconnected { reason } => {
            metrics::counter!(DISCONNECTS, "reason" => reason.label()).increment(1);
            r.set_state(NumberPhase::Connecting);
        }
        WaEvent::LoggedOut => {
            state.args.deps.sessions.clear(&state.args.number).await?;
            end_session(state, "logged_out", NumberPhase::LoggedOut);
        }
        WaEvent::StreamReplaced => end_session(state, "stream_replaced", NumberPhase::Replaced),
        WaEvent::QrCodesExhausted => {
            state.qr = None;
            end_session(state, "qr_exhausted", NumberPhase::Unpaired);
        }
        WaEvent::TemporaryBan { duration } => {
            end_session(state, "temporary_ban", NumberPhase::Banned);
            state.myself.cast_after(duration, NumberMsg::Reconnect);
        }
    }
    Ok(())
}

fn on_message(state: &NumberState, msg: InboundMessage) {
    let resources = &state.args.resources;
    let ignore = if msg.is_from_me {
        Some("echo")
    } else if msg.chat.is_group() && !state.args.deps.settings.groups_enabled {
        Some("group_ignored")
    } else {
        None
    };
    if let Some(kind) = ignore {
        metrics::counter!(MESSAGES_RECEIVED, "kind" => kind).increment(1);
        if let Some(session) = resources.session() {
            session.ack(&msg.chat, &msg.sender, &msg.id);
        }
        return;
    }
    let kind = if msg.chat.is_group() {
        "group"
    } else {
        "direct"
    };
    metrics::counter!(MESSAGES_RECEIVED, "kind" => kind).increment(1);
    FleetCounters::bump(&state.args.deps.counters.messages_in);
    if let Some(conv) = &state.conversations {
        let _ = conv.cast(ConversationsMsg::Inbound(msg));
    }
}

/// A terminal event: close the session (it does not reconnect) and record the state.
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
