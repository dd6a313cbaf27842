//! Dead letters: messages set aside with a reason instead of being silently dropped. The store
//! keeps them in the inbound log, marked with the reason, for inspection and replay.

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Its conversation spent its restart budget on it: it fails on its own (poison).
    RestartBudgetSpent {
        /// The error of the last crash.
        last_error: String,
    },
    /// The database refused to store it (or its outcome), alone, for what it holds.
    StoreRefused {
        /// What the database said.
        error: String,
    },
}

impl DeadLetterReason {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::RestartBudgetSpent { .. } => "restart_budget_spent",
            Self::StoreRefused { .. } => "store_refused",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RestartBudgetSpent { last_error } => {
                write!(f, "restart budget spent: {last_error}")
            }
            Self::StoreRefused { error } => write!(f, "refused by the store: {error}"),
        }
    }
}
