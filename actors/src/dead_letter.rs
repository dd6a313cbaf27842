//! Dead letters: messages set aside with a reason instead of being silently dropped.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::ids::PhoneNumber;
use crate::telemetry::DEAD_LETTERS;
use crate::transport::InboundMessage;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Its conversation spent its restart budget while the message was unprocessed.
    RestartBudgetSpent {
        /// The error of the last crash.
        last_error: String,
    },
    /// It arrived while its conversation was parked `failed`.
    ConversationParked {
        /// Why the conversation was parked.
        last_error: String,
    },
}

impl DeadLetterReason {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::RestartBudgetSpent { .. } => "restart_budget_spent",
            Self::ConversationParked { .. } => "conversation_parked",
        }
    }
}

/// A message that was not handled, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The number that received it.
    pub number: PhoneNumber,
    /// The message.
    pub message: InboundMessage,
    /// Why it was set aside.
    pub reason: DeadLetterReason,
}

/// Where dead letters go.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Keeps `letter` for inspection and replay.
    fn put(&self, letter: DeadLetter);
}

/// Keeps the newest dead letters in memory (the embedded default until the store keeps them).
#[derive(Debug)]
pub struct MemoryDeadLetters {
    capacity: usize,
    letters: Mutex<VecDeque<DeadLetter>>,
}

impl MemoryDeadLetters {
    /// Keeps at most `capacity` letters, dropping the oldest (each drop is still counted).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            letters: Mutex::new(VecDeque::new()),
        }
    }

    /// The letters kept, oldest first.
    pub fn snapshot(&self) -> Vec<DeadLetter> {
        self.letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    fn put(&self, letter: DeadLetter) {
        tracing::warn!(
            number = %letter.number,
            message_id = %letter.message.id,
            reason = ?letter.reason,
            "message dead-lettered"
        );
        metrics::counter!(DEAD_LETTERS, "reason" => letter.reason.label()).increment(1);
        let mut letters = self
            .letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if letters.len() == self.capacity {
            letters.pop_front();
        }
        letters.push_back(letter);
    }
}
