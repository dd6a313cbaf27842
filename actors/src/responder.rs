//! The reply ports: what a conversation answers, and the AI backend it may ask.
//!
//! A [`Responder`] decides synchronously from the message and the chat's context; when the
//! answer needs a model it returns [`Reply::Ai`] and the conversation runs an AI job actor
//! against the [`AiBackend`], with a timeout, and answers with a fallback if the job fails.

use async_trait::async_trait;

use crate::transport::InboundMessage;

/// What a conversation knows of its chat when it decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatContext {
    /// Messages of this chat handled so far (restored from the checkpoint after a restart).
    pub turns: u64,
    /// Messages a person sent in this chat from the account's phone.
    #[serde(default)]
    pub from_phone: u64,
}

/// A responder's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this text.
    Text(String),
    /// Ask the AI backend with this prompt and answer with its completion.
    Ai {
        /// The prompt.
        prompt: String,
        /// Sent if the job fails or times out.
        fallback: String,
    },
    /// No answer.
    Nothing,
}

/// Decides replies. Runs inside the conversation actor: a panic here crashes that actor only.
pub trait Responder: Send + Sync + 'static {
    /// The reply to `msg`.
    fn respond(&self, ctx: &ChatContext, msg: &InboundMessage) -> Reply;
}

/// Why an AI completion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiError {
    /// The backend answered with an error.
    #[error("backend: {0}")]
    Backend(String),
    /// The job ran past its timeout.
    #[error("timed out")]
    Timeout,
}

/// A language model behind the AI job actor.
#[async_trait]
pub trait AiBackend: Send + Sync + 'static {
    /// Completes `prompt`.
    async fn complete(&self, prompt: &str) -> Result<String, AiError>;
}
