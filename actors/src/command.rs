//! Operator commands to one number, wherever it runs: restart it, log it out.
//!
//! A node applies a command to a number it runs through
//! [`Commands::run`](crate::fleet::Commands::run):
//! the fleet restarts the number itself, and hands a logout to the number's actor. In a cluster
//! the command is routed to the node holding the number's lease (the bus on Redis Streams in
//! the service), which answers with the outcome; when no live node holds the lease, or the
//! owner does not answer in time, the caller gets a [`CommandError`] saying so.

use std::fmt;
use std::time::Duration;

use crate::ids::PhoneNumber;

/// What an operator can ask of a running number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NumberCommand {
    /// A fresh start: its actor stops and starts again (a new session with the stored
    /// credentials), its restart budget and any parking forgotten. Ownership is kept.
    Restart,
    /// Unlinks the device from the account: the stored session is cleared and the number waits
    /// to be paired again.
    Logout,
}

impl NumberCommand {
    /// Every command.
    pub const ALL: [Self; 2] = [Self::Restart, Self::Logout];

    /// Its name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Logout => "logout",
        }
    }

    /// The command named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for NumberCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No node holds the number's lease: it is not running anywhere (not started yet, parked,
    /// or between owners).
    #[error("no node runs {0}")]
    NoOwner(PhoneNumber),
    /// The lease names a node that is not live (it died and its lease has not expired yet).
    #[error("{number} is held by {node}, which is not live")]
    OwnerGone {
        /// The number.
        number: PhoneNumber,
        /// The node its lease names.
        node: String,
    },
    /// The owner did not answer in time; the command may still be carried out.
    #[error("{node} did not answer within {after:?}; the command may still be carried out")]
    Timeout {
        /// The owner.
        node: String,
        /// How long the caller waited.
        after: Duration,
    },
    /// The number does not run on the node asked (it moved meanwhile).
    #[error("{0} does not run on this node")]
    NotHere(PhoneNumber),
    /// The cluster's store of commands cannot be reached.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    /// The number could not do it.
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_by_name() {
        for c in NumberCommand::ALL {
            assert_eq!(NumberCommand::parse(c.as_str()), Some(c));
        }
        assert_eq!(NumberCommand::parse("reboot"), None);
    }
}
