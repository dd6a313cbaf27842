//! Injected faults: what `POST /faults` does to an account, and how long it lasts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_actors::ids::PhoneNumber;
use tokio::time::Instant;

use super::{Network, SimError, State};
use crate::sim::wire::ServerFrame;

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Drop the connection; for `duration_s`, connect attempts fail silently.
    Drop,
    /// The phone unlinks the device.
    Logout,
    /// Temporary ban for `duration_s` (60 s if 0): the live connection closes and the next
    /// login is refused with the ban.
    Ban,
    /// Delay every frame to the client by `ms` for `duration_s` (60 s if 0).
    Latency,
    /// The account connects from elsewhere: the live connection is stream-replaced.
    Replace,
    /// The server swallows its acks of the account's sends for `duration_s` (60 s if 0); the
    /// sends themselves go through.
    NoAck,
    /// Sends are refused with an error ack (`code`, 479 if none) for `duration_s` (60 s if 0).
    AckError,
    /// Messages offered for `duration_s` (60 s if 0) arrive undecryptable first.
    Undecryptable,
    /// The account's contacts are offline for `duration_s` (60 s if 0): their receipts are
    /// withheld and sent together when they come back.
    ContactOffline,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// The delay of a `latency` fault, in milliseconds.
    pub ms: u64,
    /// How long it lasts (0: the kind's default).
    pub duration: Duration,
    /// The error code of an `ack_error` fault.
    pub code: Option<u16>,
}

impl Fault {
    /// A fault of `kind` lasting `duration`.
    pub fn new(kind: FaultKind, duration: Duration) -> Self {
        Self {
            kind,
            ms: 0,
            duration,
            code: None,
        }
    }
}

/// The error code of an `ack_error` fault when none is given (WhatsApp's "not delivered").
const DEFAULT_ACK_ERROR: u16 = 479;

/// The faults active on one account, each until a time.
#[derive(Debug, Default)]
pub(super) struct Faults {
    fail_connects_until: Option<Instant>,
    latency: Option<(Duration, Instant)>,
    no_ack_until: Option<Instant>,
    ack_error: Option<(u16, Instant)>,
    undecryptable_until: Option<Instant>,
    contact_offline_until: Option<Instant>,
}

fn active(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|t| t > now)
}

impl Faults {
    pub(super) fn connects_fail(&self, now: Instant) -> bool {
        active(self.fail_connects_until, now)
    }

    /// The delay of frames to the client now.
    pub(super) fn latency(&self, now: Instant) -> Duration {
        self.latency
            .filter(|(_, until)| *until > now)
            .map_or(Duration::ZERO, |(d, _)| d)
    }

    pub(super) fn swallows_acks(&self, now: Instant) -> bool {
        active(self.no_ack_until, now)
    }

    /// The error code sends are refused with now, if any.
    pub(super) fn ack_error(&self, now: Instant) -> Option<u16> {
        self.ack_error
            .filter(|(_, until)| *until > now)
            .map(|(code, _)| code)
    }

    pub(super) fn undecryptable(&self, now: Instant) -> bool {
        active(self.undecryptable_until, now)
    }

    pub(super) fn contact_offline(&self, now: Instant) -> bool {
        active(self.contact_offline_until, now)
    }
}

impl Network {
    /// Injects `fault` into `number`.
    pub fn fault(&self, number: &PhoneNumber, fault: Fault) -> Result<(), SimError> {
        let mut st = self.lock();
        let now = Instant::now();
        let lasting = if fault.duration.is_zero() {
            Duration::from_secs(60)
        } else {
            fault.duration
        };
        let until = now + lasting;
        let live = {
            let acct = st
                .accounts
                .get_mut(number)
                .ok_or_else(|| SimError::UnknownAccount(number.clone()))?;
            let f = &mut acct.faults;
            match fault.kind {
                FaultKind::Drop if !fault.duration.is_zero() => {
                    f.fail_connects_until = Some(now + fault.duration);
                }
                FaultKind::Drop | FaultKind::Replace => {}
                FaultKind::Logout => {
                    acct.paired = false;
                    acct.credentials = None;
                }
                FaultKind::Ban => acct.banned_until = Some(until),
                FaultKind::Latency => f.latency = Some((Duration::from_millis(fault.ms), until)),
                FaultKind::NoAck => f.no_ack_until = Some(until),
                FaultKind::AckError => {
                    f.ack_error = Some((fault.code.unwrap_or(DEFAULT_ACK_ERROR), until));
                }
                FaultKind::Undecryptable => f.undecryptable_until = Some(until),
                FaultKind::ContactOffline => f.contact_offline_until = Some(until),
            }
            acct.live
        };
        match fault.kind {
            FaultKind::ContactOffline => self.release_receipts_at(until, number),
            FaultKind::Ban => st.ledger.banned(),
            _ => {}
        }
        if let Some(conn) = live {
            self.fault_connection(&mut st, fault.kind, conn);
        }
        Ok(())
    }

    /// What a fault does to the live connection.
    fn fault_connection(&self, st: &mut State, kind: FaultKind, conn: u64) {
        match kind {
            FaultKind::Drop => self.drop_connection(st, conn, "dropped"),
            FaultKind::Logout => {
                self.send(st, conn, ServerFrame::LoggedOut);
                self.close_locked(st, conn, "logged_out");
            }
            FaultKind::Ban => self.drop_connection(st, conn, "banned"),
            FaultKind::Replace => {
                self.send(st, conn, ServerFrame::StreamReplaced);
                self.close_locked(st, conn, "stream_replaced");
            }
            FaultKind::Latency
            | FaultKind::NoAck
            | FaultKind::AckError
            | FaultKind::Undecryptable
            | FaultKind::ContactOffline => {}
        }
    }
}
