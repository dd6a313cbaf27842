//! [`Addr`]: an actor reference that counts what it queues.
//!
//! Every message to an actor in the tree goes through an `Addr`, self-sends included, so the
//! mailbox-depth gauge is exact: `cast` counts up, the actor's `handle` counts down.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};

use crate::telemetry::Mailbox;

/// Why a call to an actor produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The actor is not running.
    #[error("actor is gone")]
    Gone,
    /// The actor did not answer in time.
    #[error("actor did not answer within {0:?}")]
    Timeout(Duration),
}

/// An actor reference paired with the counter of its mailbox.
#[derive(Debug)]
pub struct Addr<M: Message> {
    actor: ActorRef<M>,
    mailbox: Mailbox,
}

impl<M: Message> Clone for Addr<M> {
    fn clone(&self) -> Self {
        Self {
            actor: self.actor.clone(),
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<M: Message> Addr<M> {
    /// Wraps a spawned actor and the mailbox counter it was given.
    pub fn new(actor: ActorRef<M>, mailbox: Mailbox) -> Self {
        Self { actor, mailbox }
    }

    /// Queues `msg`; returns it back if the actor is gone.
    pub fn cast(&self, msg: M) -> Result<(), CallError> {
        self.mailbox.enqueued();
        self.actor.cast(msg).map_err(|_| {
            self.mailbox.dequeued();
            CallError::Gone
        })
    }

    /// Queues `msg` after `delay` (from a detached timer task).
    pub fn cast_after(&self, delay: Duration, msg: M) {
        let addr = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = addr.cast(msg);
        });
    }

    /// Sends a request built around a reply port and waits at most `timeout` for the answer.
    pub async fn call<R: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, CallError> {
        self.mailbox.enqueued();
        match self.actor.call(build, Some(timeout)).await {
            Ok(CallResult::Success(r)) => Ok(r),
            Ok(CallResult::Timeout) => Err(CallError::Timeout(timeout)),
            Ok(CallResult::SenderError) => Err(CallError::Gone),
            Err(_) => {
                self.mailbox.dequeued();
                Err(CallError::Gone)
            }
        }
    }

    /// The underlying reference (for linking, stopping and supervision).
    pub fn actor(&self) -> &ActorRef<M> {
        &self.actor
    }

    /// The mailbox counter.
    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }
}
