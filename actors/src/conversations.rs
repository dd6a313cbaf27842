//! The conversation supervisor: one per number, one child per chat.
//!
//! It is the number's intake. An inbound message stays in its chat's `pending` queue until the
//! conversation reports it processed; only then is it acknowledged to the network. One that
//! arrives with nothing ahead of it in its chat is handed to the conversation at once, which
//! records it in the store's inbound log together with its outcome (one commit on the way to
//! the reply); every other one is committed to the log (deduplicated) before its conversation
//! sees it, so nothing waits behind another message unrecorded. A chat's messages reach its
//! conversation in arrival order: only the prefix of the queue that is committed (or was
//! delivered unrecorded) is delivered. So when a conversation panics (and ractor drops its
//! queued messages), nothing is lost: the supervisor restarts the child under its own
//! [`RestartTracker`] and redelivers the pending messages in order; and when the whole node dies,
//! the log holds what was waiting (the supervisor reloads it on start) and the network
//! redelivers what was not acknowledged. Siblings and the number are untouched.
//!
//! Only a message that fails on its own is poison: when a conversation spends its budget, the
//! message at the head of its chat (the one it keeps failing on) is dead-lettered with the
//! reason, and the chat goes on with the next. A store outage is not poison: a conversation
//! that fails because the store is down is started again once it is back, at no cost to its
//! budget, and every store write here waits out an outage instead of failing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;

use crate::addr::Addr;
use crate::conversation::{ConversationActor, ConversationArgs, ConversationMsg};
use crate::coordinator::FenceLoss;
use crate::dead_letter::DeadLetterReason;
use crate::deps::{Deps, FleetCounters, NumberResources};
use crate::ids::Jid;
use crate::number::NumberMsg;
use crate::pacer::PacerHandle;
use crate::restart::{Decision, Exit, RestartTracker};
use crate::store::{Fence, Recorded, StoreError};
use crate::telemetry::{ActorKind, CONVERSATIONS_ACTIVE, DEAD_LETTERS, Mailbox, PARKED, RESTARTS};
use crate::transport::{InboundMessage, MessageId, MessageKey};

/// How many processed messages a chat remembers to drop redeliveries.
const SEEN_CAPACITY: usize = 256;

/// The conversation supervisor.
pub struct ConversationsActor;

/// Messages of the conversation supervisor.
pub enum ConversationsMsg {
    /// A message for one of the chats.
    Inbound(InboundMessage),
    /// The store answered for a message: committed, or already there.
    Committed {
        /// The message.
        key: MessageKey,
        /// What the store found.
        result: Result<Recorded, StoreError>,
    },
    /// A conversation finished a message.
    Processed(MessageKey),
    /// A backoff delay ended: start the chat's conversation again.
    Respawn(Jid),
    /// A conversation's write was refused as fenced: the number must stop.
    Fenced(StoreError),
    /// The store refused a message's outcome for what it holds: it is dead-lettered.
    Refused(MessageKey, String),
    /// Report every chat's state.
    Status(RpcReplyPort<Vec<ChatStatus>>),
}

/// One chat as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatStatus {
    /// The chat.
    pub chat: Jid,
    /// Its phase.
    pub phase: ChatPhase,
    /// Messages received and not yet processed.
    pub pending: usize,
    /// Restarts performed so far.
    pub restarts: u32,
}

/// Where a chat's conversation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatPhase {
    /// No actor (never started, or stopped when idle).
    Idle,
    /// The actor runs.
    Running,
    /// Waiting out a backoff delay, or the store's return, before a restart.
    Restarting,
}

/// What the supervisor is started with.
pub struct ConversationsArgs {
    /// The number and its ownership's token, carried by every write.
    pub fence: Fence,
    /// The number actor, told when a write is fenced.
    pub number: Addr<NumberMsg>,
    /// Its own mailbox counter.
    pub mailbox: Mailbox,
    /// The number's session and tasks.
    pub resources: Arc<NumberResources>,
    /// The number's pacer.
    pub pacer: PacerHandle,
    /// Ports and settings.
    pub deps: Deps,
}

/// A message waiting to be processed.
struct Entry {
    msg: InboundMessage,
    /// In the inbound log.
    committed: bool,
    /// Arrived with nothing ahead of it: delivered without being recorded first (the
    /// conversation records it with its outcome).
    unlogged: bool,
    /// Handed to the running conversation actor.
    delivered: bool,
}

struct Chat {
    actor: Option<Addr<ConversationMsg>>,
    pending: VecDeque<Entry>,
    tracker: RestartTracker,
    phase: ChatPhase,
    /// Senders and ids processed lately (an id is unique only per chat and sender).
    seen: HashSet<(Jid, MessageId)>,
    seen_order: VecDeque<(Jid, MessageId)>,
    restarts: u32,
}

/// The supervisor's state.
pub struct ConversationsState {
    args: ConversationsArgs,
    myself: Addr<ConversationsMsg>,
    chats: HashMap<Jid, Chat>,
    by_actor: HashMap<ActorId, Jid>,
}

impl Actor for ConversationsActor {
    type Msg = ConversationsMsg;
    type State = ConversationsState;
    type Arguments = ConversationsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConversationsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ConversationsState {
            myself: Addr::new(myself, args.mailbox.clone()),
            args,
            chats: HashMap::new(),
            by_actor: HashMap::new(),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Whatever earlier owners committed and did not finish is processed first.
        let a = &state.args;
        let (store, cancel) = (&a.deps.store, &a.resources.cancel);
        let number = &a.fence.number;
        let left = store
            .health()
            .retrying(cancel, || store.unprocessed(number))
            .await?;
        if !left.is_empty() {
            tracing::info!(number = %state.args.fence.number, count = left.len(), "resuming");
        }
        for msg in left {
            let jid = msg.chat.clone();
            chat_of(state, &jid).pending.push_back(Entry {
                msg,
                committed: true,
                unlogged: false,
                delivered: false,
            });
        }
        let idle: Vec<Jid> = state.chats.keys().cloned().collect();
        for jid in idle {
            start(state, &jid).await;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let running = state.chats.values().filter(|c| c.actor.is_some()).count();
        metrics::gauge!(CONVERSATIONS_ACTIVE).decrement(running as f64);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.mailbox.dequeued();
        handle(state, message).await;
        // What the number's intake holds now, for its sink's backpressure.
        let pending = state.chats.values().map(|c| c.pending.len()).sum();
        state
            .args
            .resources
            .pending
            .store(pending, Ordering::Relaxed);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                child_exited(state, cell.get_id(), Exit::of_failure(err.as_ref())).await;
            }
            SupervisionEvent::ActorTerminated(cell, ..) => {
                child_exited(state, cell.get_id(), Exit::Normal).await;
            }
            _ => {}
        }
        Ok(())
    }
}

async fn handle(state: &mut ConversationsState, message: ConversationsMsg) {
    match message {
        ConversationsMsg::Inbound(msg) => inbound(state, msg).await,
        ConversationsMsg::Committed { key, result } => committed(state, &key, result),
        ConversationsMsg::Processed(key) => done(state, &key),
        ConversationsMsg::Fenced(e) => fenced(&state.args.resources, &e),
        ConversationsMsg::Refused(key, error) => refused(state, &key, error),
        ConversationsMsg::Respawn(chat) => {
            let due = state
                .chats
                .get(&chat)
                .is_some_and(|c| c.phase == ChatPhase::Restarting);
            if due {
                start(state, &chat).await;
            }
        }
        ConversationsMsg::Status(reply) => {
            let _ = reply.send(status(state));
        }
    }
}

fn chat_of<'a>(state: &'a mut ConversationsState, jid: &Jid) -> &'a mut Chat {
    let policy = state.args.deps.settings.conversation_policy;
    state.chats.entry(jid.clone()).or_insert_with(|| Chat {
        actor: None,
        pending: VecDeque::new(),
        tracker: RestartTracker::new(policy, Instant::now(), seed_of(jid)),
        phase: ChatPhase::Idle,
        seen: HashSet::new(),
        seen_order: VecDeque::new(),
        restarts: 0,
    })
}

async fn inbound(state: &mut ConversationsState, msg: InboundMessage) {
    let chat = chat_of(state, &msg.chat);
    if chat.seen.contains(&(msg.sender.clone(), msg.id.clone())) {
        // A redelivery of something already processed: our ack was lost; ack again.
        ack(&state.args.resources, &msg);
        return;
    }
    if chat
        .pending
        .iter()
        .any(|p| p.msg.id == msg.id && p.msg.sender == msg.sender)
    {
        return;
    }
    // Nothing ahead of it and a conversation running or free to start: it is processed now.
    let unlogged =
        chat.pending.is_empty() && matches!(chat.phase, ChatPhase::Running | ChatPhase::Idle);
    chat.pending.push_back(Entry {
        msg: msg.clone(),
        committed: false,
        unlogged,
        delivered: false,
    });
    match chat.phase {
        ChatPhase::Idle => start(state, &msg.chat).await,
        _ if unlogged => deliver_ready(chat),
        _ => {}
    }
    if !unlogged {
        record(state, msg);
    }
}

/// Commits `msg` to the inbound log, waiting out an outage of the store, and reports back.
fn record(state: &ConversationsState, msg: InboundMessage) {
    let store = state.args.deps.store.clone();
    let fence = state.args.fence.clone();
    let myself = state.myself.clone();
    let cancel = state.args.resources.cancel.clone();
    // Queued now, so that writes keep the arrival order; only a retry waits.
    let first = store.record_inbound(&fence, &msg);
    tokio::spawn(async move {
        let mut first = Some(first);
        let result = store
            .health()
            .retrying(&cancel, || {
                first
                    .take()
                    .unwrap_or_else(|| store.record_inbound(&fence, &msg))
            })
            .await;
        let _ = myself.cast(ConversationsMsg::Committed {
            key: msg.key(),
            result,
        });
    });
}

fn committed(
    state: &mut ConversationsState,
    key: &MessageKey,
    result: Result<Recorded, StoreError>,
) {
    let Some(chat) = state.chats.get_mut(&key.chat) else {
        return;
    };
    let Some(pos) = position(chat, key) else {
        return;
    };
    let (jid, id) = (&key.chat, &key.id);
    match result {
        Ok(Recorded::New | Recorded::Duplicate { processed: false }) => {
            if let Some(entry) = chat.pending.get_mut(pos) {
                entry.committed = true;
            }
            deliver_ready(chat);
        }
        Ok(Recorded::Duplicate { processed: true }) => done(state, key),
        Err(e @ StoreError::Fenced { .. }) => fenced(&state.args.resources, &e),
        Err(StoreError::Refused(error)) => refused(state, key, error),
        Err(e) => {
            // Not acknowledged: the network redelivers it after the next reconnect.
            tracing::error!(chat = %jid, message_id = %id, error = %e, "inbound not committed");
            chat.pending.remove(pos);
        }
    }
}

/// Hands the running conversation the deliverable prefix of the queue it has not seen yet.
fn deliver_ready(chat: &mut Chat) {
    let (ChatPhase::Running, Some(actor)) = (&chat.phase, &chat.actor) else {
        return;
    };
    for entry in chat.pending.iter_mut() {
        if !entry.committed && !entry.unlogged {
            break;
        }
        if !entry.delivered {
            entry.delivered = true;
            let _ = actor.cast(ConversationMsg::Deliver {
                msg: entry.msg.clone(),
                logged: entry.committed,
            });
        }
    }
}

/// Starts the chat's conversation and hands it every pending message, in order.
async fn start(state: &mut ConversationsState, jid: &Jid) {
    let mailbox = Mailbox::new(ActorKind::Conversation);
    let args = ConversationArgs {
        cancel: state.args.resources.cancel.clone(),
        fence: state.args.fence.clone(),
        chat: jid.clone(),
        mailbox: mailbox.clone(),
        parent: state.myself.clone(),
        pacer: state.args.pacer.clone(),
        deps: state.args.deps.clone(),
    };
    let cell = state.myself.actor().get_cell();
    let spawned = ConversationActor::spawn_linked(None, ConversationActor, args, cell).await;
    let Some(chat) = state.chats.get_mut(jid) else {
        return;
    };
    match spawned {
        Ok((actor, _)) => {
            metrics::gauge!(CONVERSATIONS_ACTIVE).increment(1.0);
            let addr = Addr::new(actor, mailbox);
            state.by_actor.insert(addr.actor().get_id(), jid.clone());
            chat.actor = Some(addr);
            chat.phase = ChatPhase::Running;
            chat.tracker.started(Instant::now());
            for entry in chat.pending.iter_mut() {
                entry.delivered = false;
            }
            deliver_ready(chat);
        }
        Err(e) => {
            tracing::error!(error = %e, chat = %jid, "conversation failed to start");
            chat.phase = ChatPhase::Restarting;
            state.myself.cast_after(
                state.args.deps.settings.conversation_policy.backoff.max,
                ConversationsMsg::Respawn(jid.clone()),
            );
        }
    }
}

/// Where the message `key` waits in its chat's queue.
fn position(chat: &Chat, key: &MessageKey) -> Option<usize> {
    chat.pending
        .iter()
        .position(|e| e.msg.id == key.id && e.msg.sender == key.sender)
}

/// The message is processed (its outcome committed): acknowledge it and remember it.
fn done(state: &mut ConversationsState, key: &MessageKey) {
    let Some(chat) = state.chats.get_mut(&key.chat) else {
        return;
    };
    let Some(pos) = position(chat, key) else {
        return;
    };
    if let Some(Entry { msg, .. }) = chat.pending.remove(pos) {
        ack(&state.args.resources, &msg);
        if chat.seen_order.len() == SEEN_CAPACITY
            && let Some(old) = chat.seen_order.pop_front()
        {
            chat.seen.remove(&old);
        }
        let seen = (msg.sender, msg.id);
        chat.seen.insert(seen.clone());
        chat.seen_order.push_back(seen);
    }
}

async fn child_exited(state: &mut ConversationsState, id: ActorId, exit: Exit) {
    let Some(jid) = state.by_actor.remove(&id) else {
        return;
    };
    let Some(chat) = state.chats.get_mut(&jid) else {
        return;
    };
    if let Some(actor) = chat.actor.take() {
        actor.mailbox().abandon();
        metrics::gauge!(CONVERSATIONS_ACTIVE).decrement(1.0);
    }
    match chat.tracker.on_exit(&exit, Instant::now()) {
        Decision::Done if chat.pending.is_empty() => {
            // Passivated while idle: forget the chat entirely.
            state.chats.remove(&jid);
        }
        // Stopped (idle) just as a message arrived: start it again at once.
        Decision::Done => start(state, &jid).await,
        Decision::Restart { delay, attempt } => {
            chat.restarts += 1;
            FleetCounters::bump(&state.args.deps.counters.restarts);
            metrics::counter!(RESTARTS, "kind" => ActorKind::Conversation.as_str()).increment(1);
            tracing::info!(chat = %jid, attempt, ?delay, ?exit, "restarting conversation");
            chat.phase = ChatPhase::Restarting;
            if delay.is_zero() {
                start(state, &jid).await;
            } else {
                state
                    .myself
                    .cast_after(delay, ConversationsMsg::Respawn(jid));
            }
        }
        Decision::AwaitDependency => {
            tracing::info!(chat = %jid, ?exit, "conversation waits for the store");
            chat.phase = ChatPhase::Restarting;
            let health = state.args.deps.store.health();
            let myself = state.myself.clone();
            tokio::spawn(async move {
                health.wait_up(Duration::from_secs(60)).await;
                let _ = myself.cast(ConversationsMsg::Respawn(jid));
            });
        }
        Decision::Park { last_error } => poisoned(state, &jid, last_error).await,
    }
}

/// The chat's conversation spent its budget on the message at the head of its queue: that
/// message fails on its own. It is dead-lettered with the reason, the budget starts over, and the
/// chat goes on with the next message.
async fn poisoned(state: &mut ConversationsState, jid: &Jid, last_error: String) {
    let Some(chat) = state.chats.get_mut(jid) else {
        return;
    };
    metrics::counter!(PARKED, "kind" => ActorKind::Conversation.as_str()).increment(1);
    tracing::warn!(chat = %jid, %last_error, "conversation spent its restart budget on a message");
    chat.tracker.reset(Instant::now());
    chat.phase = ChatPhase::Idle;
    if let Some(Entry { msg, .. }) = chat.pending.pop_front() {
        let reason = DeadLetterReason::RestartBudgetSpent { last_error };
        dead_letter(&state.args, msg, reason);
    }
    let more = state.chats.get(jid).is_some_and(|c| !c.pending.is_empty());
    if more {
        start(state, jid).await;
    } else {
        state.chats.remove(jid);
    }
}

/// The store refused the message `key` (or its outcome) for what it holds: dead-letter it and
/// go on with the chat.
fn refused(state: &mut ConversationsState, key: &MessageKey, error: String) {
    let Some(chat) = state.chats.get_mut(&key.chat) else {
        return;
    };
    let Some(pos) = position(chat, key) else {
        return;
    };
    if let Some(Entry { msg, .. }) = chat.pending.remove(pos) {
        dead_letter(&state.args, msg, DeadLetterReason::StoreRefused { error });
        deliver_ready(chat);
    }
}

/// Sets a message aside with its reason and acknowledges it once that is committed: it is
/// accounted for.
fn dead_letter(args: &ConversationsArgs, message: InboundMessage, reason: DeadLetterReason) {
    tracing::warn!(
        number = %args.fence.number,
        message_id = %message.id,
        %reason,
        "message dead-lettered"
    );
    metrics::counter!(DEAD_LETTERS, "reason" => reason.label()).increment(1);
    FleetCounters::bump(&args.deps.counters.dead_letters);
    let store = args.deps.store.clone();
    let fence = args.fence.clone();
    let resources = args.resources.clone();
    tokio::spawn(async move {
        let cancel = &resources.cancel;
        let written = store
            .health()
            .retrying(cancel, || store.dead_letter(&fence, &message, &reason))
            .await;
        match written {
            Ok(()) => ack(&resources, &message),
            Err(e @ StoreError::Fenced { .. }) => fenced(&resources, &e),
            Err(e) => tracing::error!(message_id = %message.id, error = %e, "dead letter lost"),
        }
    });
}

fn ack(resources: &NumberResources, msg: &InboundMessage) {
    if let Some(session) = resources.session() {
        session.ack(&[msg.key()]);
    }
}

fn status(state: &ConversationsState) -> Vec<ChatStatus> {
    let mut all: Vec<_> = state
        .chats
        .iter()
        .map(|(jid, c)| ChatStatus {
            chat: jid.clone(),
            phase: c.phase.clone(),
            pending: c.pending.len(),
            restarts: c.restarts,
        })
        .collect();
    all.sort_by(|a, b| a.chat.cmp(&b.chat));
    all
}

fn seed_of(jid: &Jid) -> u64 {
    jid.to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A write of the number's was refused as fenced: a newer owner exists.
fn fenced(resources: &NumberResources, error: &StoreError) {
    tracing::warn!(%error, "write refused as fenced");
    resources.lose_fence(FenceLoss::StoreRefused);
}
