//! The conversation actor: one per chat, started on its first message, stopped when idle.
//!
//! It asks the [`Responder`](crate::responder::Responder) for each message and commits the
//! outcome in one store transaction ([`Store::complete`](crate::store::Store::complete)): the
//! message's processed mark, its reply as an outbox row with an id derived from the inbound id
//! and step, and the chat's checkpoint. A message delivered before it was recorded is committed
//! to the inbound log in that same write
//! ([`Store::record_completed`](crate::store::Store::record_completed)), or recorded first if it
//! needs an AI job; if the log shows it processed already, its outcome is discarded. Then it
//! hands the reply to the number's pacer and reports the message processed to its supervisor,
//! which acknowledges it to the network. Replies that need a model run in an AI job actor; the
//! message is completed when the job's answer (or the fallback) is ready. A crash loses nothing:
//! the supervisor redelivers every unprocessed message, and a reply already in the outbox is
//! never queued twice (a message found completed before hands its unsent replies to the pacer
//! again, which sends each only if it has not).

use std::collections::HashMap;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::addr::Addr;
use tokio_util::sync::CancellationToken;

use crate::ai_job::{AiJobActor, AiJobArgs};
use crate::conversations::ConversationsMsg;
use crate::deps::Deps;
use crate::ids::Jid;
use crate::pacer::PacerHandle;
use crate::responder::{AiError, ChatContext, Reply};
use crate::store::{Completion, Fence, Recorded, StoreError, Unsent};
use crate::telemetry::Mailbox;
use crate::transport::{InboundMessage, MessageId, OutboundText};

/// The conversation actor.
pub struct ConversationActor;

/// Messages of a conversation.
pub enum ConversationMsg {
    /// Handle this inbound message.
    Deliver {
        /// The message.
        msg: InboundMessage,
        /// Whether it is in the inbound log already.
        logged: bool,
    },
    /// An AI job finished.
    AiDone {
        /// The inbound message it answers.
        inbound: MessageId,
        /// The completion or why there is none.
        result: Result<String, AiError>,
    },
    /// Stop if nothing happened for the idle timeout.
    IdleCheck,
}

/// What a conversation is started with.
pub struct ConversationArgs {
    /// Ends the number's work: a write waiting out a store outage gives up when it fires.
    pub cancel: CancellationToken,
    /// The number it belongs to, with its ownership's token.
    pub fence: Fence,
    /// The chat.
    pub chat: Jid,
    /// Its own mailbox counter (the supervisor holds the same).
    pub mailbox: Mailbox,
    /// Where processed messages are reported.
    pub parent: Addr<ConversationsMsg>,
    /// The number's pacer.
    pub pacer: PacerHandle,
    /// Ports and settings.
    pub deps: Deps,
}

/// A conversation's state.
pub struct ConversationState {
    args: ConversationArgs,
    myself: Option<Addr<ConversationMsg>>,
    ctx: ChatContext,
    last_activity: Instant,
    /// AI jobs running, by job actor, with the message each answers and its fallback.
    jobs: HashMap<ActorId, (InboundMessage, String)>,
}

/// Where a message being answered stands in the inbound log.
enum Intake {
    /// Recorded before it was delivered.
    Logged,
    /// Not recorded yet: it is recorded with its outcome. `before` is the chat's state to go
    /// back to if the log shows it processed already (a redelivery).
    Unlogged { before: ChatContext },
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ConversationState {
            args,
            myself: None,
            ctx: ChatContext::default(),
            last_activity: Instant::now(),
            jobs: HashMap::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let addr = Addr::new(myself, state.args.mailbox.clone());
        schedule_idle_check(&addr, state.args.deps.settings.conversation_idle);
        state.myself = Some(addr);
        let a = &state.args;
        let store = &a.deps.store;
        let saved = store
            .health()
            .retrying(&a.cancel, || store.checkpoint(&a.fence.number, &a.chat))
            .await?;
        if let Some(ctx) = saved {
            state.ctx = ctx;
        }
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
            ConversationMsg::Deliver { msg, logged } => deliver(&myself, state, msg, logged).await,
            ConversationMsg::AiDone { inbound, result } => ai_done(state, &inbound, result).await,
            ConversationMsg::IdleCheck => {
                idle_check(&myself, state);
                Ok(())
            }
        }
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Children are AI jobs: temporary, never restarted. A job that ends normally has
        // already sent its result (or its timeout); one that crashed gets its message answered
        // with the fallback.
        if let SupervisionEvent::ActorFailed(cell, err) = &event {
            tracing::warn!(error = %err, "AI job crashed");
            if let Some((msg, fallback)) = state.jobs.remove(&cell.get_id()) {
                metrics::counter!(crate::telemetry::AI_JOBS, "outcome" => "crashed").increment(1);
                answer(state, &msg, Some(fallback), Intake::Logged).await?;
            }
        }
        Ok(())
    }
}

async fn deliver(
    myself: &ActorRef<ConversationMsg>,
    state: &mut ConversationState,
    msg: InboundMessage,
    logged: bool,
) -> Result<(), ActorProcessingErr> {
    state.last_activity = Instant::now();
    let intake = if logged {
        Intake::Logged
    } else {
        Intake::Unlogged {
            before: state.ctx.clone(),
        }
    };
    if msg.is_from_me {
        // A person answered from the phone: recorded in the chat, never answered.
        state.ctx.from_phone += 1;
        return answer(state, &msg, None, intake).await;
    }
    state.ctx.turns += 1;
    match state.args.deps.responder.respond(&state.ctx, &msg) {
        Reply::Text(text) => answer(state, &msg, Some(text), intake).await?,
        Reply::Nothing => answer(state, &msg, None, intake).await?,
        Reply::Ai { prompt, fallback } => {
            let Some(reply_to) = state.myself.clone() else {
                return Err("conversation used before post_start".into());
            };
            if let Intake::Unlogged { before } = intake {
                // A job takes a while: the message is recorded before it waits on one.
                let a = &state.args;
                let store = &a.deps.store;
                let recorded = store
                    .health()
                    .retrying(&a.cancel, || store.record_inbound(&a.fence, &msg))
                    .await;
                match unless_refused(state, &msg, recorded)? {
                    None => return Ok(()),
                    Some(Recorded::Duplicate { processed: true }) => {
                        state.ctx = before;
                        recover_replies(state, &msg).await;
                        processed(state, &msg);
                        return Ok(());
                    }
                    Some(_) => {}
                }
            }
            let args = AiJobArgs {
                inbound: msg.id.clone(),
                prompt,
                backend: state.args.deps.ai.clone(),
                timeout: state.args.deps.settings.ai_timeout,
                reply_to,
            };
            let (job, _) =
                AiJobActor::spawn_linked(None, AiJobActor, args, myself.get_cell()).await?;
            state.jobs.insert(job.get_id(), (msg, fallback));
        }
    }
    Ok(())
}

async fn ai_done(
    state: &mut ConversationState,
    inbound: &MessageId,
    result: Result<String, AiError>,
) -> Result<(), ActorProcessingErr> {
    let Some(job) = state
        .jobs
        .iter()
        .find_map(|(id, (msg, _))| (msg.id == *inbound).then_some(*id))
    else {
        return Ok(());
    };
    if let Some((msg, fallback)) = state.jobs.remove(&job) {
        let text = result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "AI job failed; answering with the fallback");
            fallback
        });
        answer(state, &msg, Some(text), Intake::Logged).await?;
    }
    Ok(())
}

/// Commits `msg` as processed with `text` as its reply, hands the reply to the pacer if it is
/// newly queued, and reports `msg` processed. A store error crashes the conversation: the
/// supervisor redelivers the message to a fresh one.
async fn answer(
    state: &mut ConversationState,
    msg: &InboundMessage,
    text: Option<String>,
    intake: Intake,
) -> Result<(), ActorProcessingErr> {
    let a = &state.args;
    let replies: Vec<OutboundText> = text
        .into_iter()
        .map(|text| OutboundText {
            id: MessageId::derived(&a.fence.number, &a.chat, &msg.sender, &msg.id, 0),
            to: a.chat.clone(),
            text,
            reply_to: Some(msg.id.clone()),
            // In a DM the chat says who wrote it; in a group the quote must.
            reply_to_sender: a.chat.is_group().then(|| msg.sender.clone()),
        })
        .collect();
    let done = Completion {
        chat: a.chat.clone(),
        sender: msg.sender.clone(),
        inbound: msg.id.clone(),
        replies: replies.clone(),
        checkpoint: state.ctx.clone(),
    };
    // An outage is waited out here (the write is idempotent: a retry after a lost answer finds
    // its own earlier commit), so it never costs the conversation a restart.
    let store = &a.deps.store;
    let written = store
        .health()
        .retrying(&a.cancel, || match &intake {
            Intake::Logged => {
                let completed = store.complete(&a.fence, done.clone());
                Box::pin(async move { completed.await.map(Some) })
            }
            Intake::Unlogged { .. } => store.record_completed(&a.fence, msg, done.clone()),
        })
        .await;
    let Some(written) = unless_refused(state, msg, written)? else {
        return Ok(());
    };
    // Whether the message was completed before: then its replies may be waiting unsent.
    let (queued, done_before) = match (written, intake) {
        (Some(queued), _) => {
            let done_before = queued.len() < replies.len();
            (queued, done_before)
        }
        // Processed before (a redelivery): this outcome is discarded.
        (None, Intake::Unlogged { before }) => {
            state.ctx = before;
            (Vec::new(), true)
        }
        (None, Intake::Logged) => (Vec::new(), true),
    };
    for reply in replies {
        if queued.contains(&reply.id) {
            state.args.pacer.enqueue(reply);
        }
    }
    if done_before {
        recover_replies(state, msg).await;
    }
    processed(state, msg);
    Ok(())
}

/// The message was completed before (a redelivery, or a retry after a commit whose answer was
/// lost): hands the pacer its replies that are still unsent, which it sends unless it has them
/// already. Without this, a reply committed by a write whose answer was lost would wait for the
/// number's next start.
async fn recover_replies(state: &ConversationState, msg: &InboundMessage) {
    let a = &state.args;
    match a.deps.store.unsent(&a.fence.number).await {
        Ok(rows) => {
            let quoted = a.chat.is_group().then_some(&msg.sender);
            let mine = |row: &Unsent| {
                let r = &row.reply;
                r.to == a.chat
                    && r.reply_to.as_ref() == Some(&msg.id)
                    && r.reply_to_sender.as_ref() == quoted
            };
            for row in rows.into_iter().filter(|r| mine(r)) {
                a.pacer.recover(row);
            }
        }
        Err(e) => tracing::warn!(message_id = %msg.id, error = %e, "looking for unsent replies"),
    }
}

/// A write's result for `msg`, with two refusals taken out and `None` returned: a fenced one
/// (the number is told to stop, through the supervisor, leaving the message unacknowledged for
/// the new owner) and one for what the message holds (the supervisor dead-letters it). Other
/// errors crash the conversation.
fn unless_refused<T>(
    state: &ConversationState,
    msg: &InboundMessage,
    result: Result<T, StoreError>,
) -> Result<Option<T>, ActorProcessingErr> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e @ StoreError::Fenced { .. }) => {
            let _ = state.args.parent.cast(ConversationsMsg::Fenced(e));
            Ok(None)
        }
        Err(StoreError::Refused(error)) => {
            let _ = state
                .args
                .parent
                .cast(ConversationsMsg::Refused(msg.key(), error));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Reports `msg` processed to the supervisor, which acknowledges it.
fn processed(state: &ConversationState, msg: &InboundMessage) {
    let a = &state.args;
    let _ = a.parent.cast(ConversationsMsg::Processed(msg.key()));
}

fn idle_check(myself: &ActorRef<ConversationMsg>, state: &ConversationState) {
    let idle = state.args.deps.settings.conversation_idle;
    if state.jobs.is_empty() && state.last_activity.elapsed() >= idle {
        myself.stop(Some("idle".to_owned()));
    } else if let Some(addr) = &state.myself {
        let left = idle.saturating_sub(state.last_activity.elapsed());
        schedule_idle_check(addr, left.max(Duration::from_millis(10)));
    }
}

fn schedule_idle_check(addr: &Addr<ConversationMsg>, after: Duration) {
    addr.cast_after(after, ConversationMsg::IdleCheck);
}
