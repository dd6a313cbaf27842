//! The AI job actor: one per job, temporary, bounded by a timeout.
//!
//! It runs the completion in `post_start`, reports the result to its conversation and stops.
//! A panic or a timeout is never restarted: the conversation answers with the fallback.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::addr::Addr;
use crate::conversation::ConversationMsg;
use crate::responder::{AiBackend, AiError};
use crate::telemetry::AI_JOBS;
use crate::transport::MessageId;

/// The AI job actor.
pub struct AiJobActor;

/// What a job needs.
pub struct AiJobArgs {
    /// The inbound message this job answers.
    pub inbound: MessageId,
    /// The prompt.
    pub prompt: String,
    /// The model.
    pub backend: Arc<dyn AiBackend>,
    /// Deadline of the job.
    pub timeout: Duration,
    /// Where the result goes.
    pub reply_to: Addr<ConversationMsg>,
}

/// A job holds its arguments until it runs.
pub struct AiJobState {
    args: Option<AiJobArgs>,
}

/// Jobs take no messages.
pub enum AiJobMsg {}

impl Actor for AiJobActor {
    type Msg = AiJobMsg;
    type State = AiJobState;
    type Arguments = AiJobArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AiJobArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AiJobState { args: Some(args) })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.args.take() {
            let result = tokio::time::timeout(args.timeout, args.backend.complete(&args.prompt))
                .await
                .unwrap_or(Err(AiError::Timeout));
            let outcome = match &result {
                Ok(_) => "ok",
                Err(AiError::Timeout) => "timeout",
                Err(AiError::Backend(_)) => "error",
            };
            metrics::counter!(AI_JOBS, "outcome" => outcome).increment(1);
            let _ = args.reply_to.cast(ConversationMsg::AiDone {
                inbound: args.inbound,
                result,
            });
        }
        myself.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {}
    }
}
