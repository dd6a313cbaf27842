//! The fleet supervisor: one child per number this node runs, each with its own restart budget.
//!
//! Before a number starts, the fleet takes its [`Lease`] from the [`Coordinator`] (waiting out
//! an outage of the coordinator or the store, at no cost to any budget); a number another node
//! holds is not started. The lease outlives restarts of the number's actor and is released when
//! the number stops for good (removed, drained, parked) so another node may take it at once.
//!
//! When a number dies the fleet first releases what the number owned (its session and tasks —
//! a panic skipped the number's `post_stop`), then applies the number's [`RestartTracker`]:
//! restart after the backoff, or park it `failed` with its last error once the budget is spent.
//! A number whose lease was revoked (its ownership lost) stays stopped: never restarted.
//! The fleet itself never stops because a child did.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::addr::{Addr, CallError};
use crate::command::{CommandError, Done, NumberCommand};
use crate::coordinator::{Coordinator, CoordinatorError, FenceLoss, Lease};
use crate::deps::{Deps, FleetCounters, NumberPhase, NumberResources};
use crate::ids::PhoneNumber;
use crate::number::{HANDOFF_SETTLE, NumberActor, NumberArgs, NumberMsg, NumberStatus};
use crate::restart::{Decision, Exit, RestartTracker};
use crate::store::OUTAGE_RETRY;
use crate::telemetry::{ActorKind, Mailbox, PARKED, RESTARTS};
use crate::transport::SessionStats;

/// The fleet supervisor.
pub struct FleetActor;

/// Messages of the fleet.
pub enum FleetMsg {
    /// Run this number (no-op if it runs already): take its lease, then start it.
    Start(PhoneNumber),
    /// Taking a number's lease ended.
    Acquired {
        /// The number.
        number: PhoneNumber,
        /// The slot it was taken for (a slot removed and added again meanwhile is another).
        resources: Arc<NumberResources>,
        /// The lease, or why there is none.
        result: Result<Lease, CoordinatorError>,
    },
    /// Stop running this number; answers whether it was known.
    Stop(PhoneNumber, RpcReplyPort<bool>),
    /// A backoff delay ended: start the number again.
    Respawn(PhoneNumber),
    /// The number's actor, if it runs.
    Get(PhoneNumber, RpcReplyPort<Option<Addr<NumberMsg>>>),
    /// The phase of a number this fleet holds a slot for, and its actor if it runs.
    Phase(
        PhoneNumber,
        RpcReplyPort<Option<(NumberPhase, Option<Addr<NumberMsg>>)>>,
    ),
    /// Report the fleet.
    Status(RpcReplyPort<FleetStatus>),
    /// The numbers the fleet holds a slot for.
    Numbers(RpcReplyPort<Vec<Held>>),
    /// An operator's command to a number this node runs.
    Command(
        PhoneNumber,
        NumberCommand,
        RpcReplyPort<Result<Done, CommandError>>,
    ),
    /// Shutting down: stop every number for good (none is restarted, none starts).
    Drain(RpcReplyPort<()>),
}

/// A number the fleet holds a slot for, as the cluster agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The number.
    pub number: PhoneNumber,
    /// Its lease was lost to another owner and its actor is stopped (a replaced stream does not
    /// count: that number waits for an operator).
    pub lost: bool,
    /// It is online: moving it now costs a reconnect, not a pairing.
    pub online: bool,
    /// It is being stopped (handed off, removed): nothing more to do with it.
    pub stopping: bool,
}

/// The fleet at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStatus {
    /// Numbers the fleet is responsible for.
    pub numbers: usize,
    /// Numbers whose actor is running.
    pub running: usize,
    /// Numbers parked `failed`, with their last error.
    pub parked: Vec<(PhoneNumber, String)>,
}

struct Slot {
    addr: Option<Addr<NumberMsg>>,
    /// The number's ownership; `None` while it is being taken.
    lease: Option<Lease>,
    resources: Arc<NumberResources>,
    tracker: RestartTracker,
    parked: Option<String>,
    stopping: bool,
    /// An operator asked for a fresh start: the actor's exit starts it again at once.
    restart: bool,
}

/// The fleet's state.
pub struct FleetState {
    deps: Deps,
    myself: Addr<FleetMsg>,
    mailbox: Mailbox,
    slots: HashMap<PhoneNumber, Slot>,
    by_actor: HashMap<ActorId, PhoneNumber>,
    /// Set by [`FleetMsg::Drain`]: the node is shutting down.
    draining: bool,
    /// Lease releases under way; waited for when the fleet stops.
    releases: JoinSet<()>,
}

/// What the fleet is started with.
pub struct FleetArgs {
    /// Ports and settings.
    pub deps: Deps,
    /// The fleet's mailbox counter.
    pub mailbox: Mailbox,
}

impl Actor for FleetActor {
    type Msg = FleetMsg;
    type State = FleetState;
    type Arguments = FleetArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FleetArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(FleetState {
            myself: Addr::new(myself, args.mailbox.clone()),
            deps: args.deps,
            mailbox: args.mailbox,
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            draining: false,
            releases: JoinSet::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let slots: Vec<Slot> = state.slots.drain().map(|(_, slot)| slot).collect();
        for slot in slots {
            slot.resources.release().await;
            slot.resources.retire();
            if let Some(addr) = &slot.addr {
                addr.mailbox().abandon();
            }
            if let Some(lease) = slot.lease {
                release_lease(state, lease);
            }
        }
        // Releases are bounded by the coordinator's own timeouts.
        while state.releases.join_next().await.is_some() {}
        state.mailbox.abandon();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.mailbox.dequeued();
        match message {
            FleetMsg::Start(number) => {
                if !state.draining && !state.slots.contains_key(&number) {
                    let slot = Slot {
                        addr: None,
                        lease: None,
                        resources: NumberResources::new(state.deps.counters.clone()),
                        tracker: RestartTracker::new(
                            state.deps.settings.number_policy,
                            Instant::now(),
                            seed_of(&number),
                        ),
                        parked: None,
                        stopping: false,
                        restart: false,
                    };
                    let resources = slot.resources.clone();
                    state.slots.insert(number.clone(), slot);
                    acquire(state, number, resources);
                }
            }
            FleetMsg::Acquired {
                number,
                resources,
                result,
            } => acquired(state, number, &resources, result).await,
            FleetMsg::Stop(number, reply) => {
                let _ = reply.send(stop_number(state, &number).await);
            }
            FleetMsg::Respawn(number) => {
                let due = state.slots.get(&number).is_some_and(|s| {
                    s.addr.is_none() && s.lease.is_some() && s.parked.is_none() && !s.stopping
                });
                if due {
                    spawn_number(state, &number).await;
                }
            }
            FleetMsg::Get(number, reply) => {
                let _ = reply.send(state.slots.get(&number).and_then(|s| s.addr.clone()));
            }
            FleetMsg::Phase(number, reply) => {
                let phase = state
                    .slots
                    .get(&number)
                    .map(|s| (s.resources.state(), s.addr.clone()));
                let _ = reply.send(phase);
            }
            FleetMsg::Status(reply) => {
                let _ = reply.send(status(state));
            }
            FleetMsg::Numbers(reply) => {
                let numbers = state
                    .slots
                    .iter()
                    .map(|(n, s)| {
                        let loss = s.lease.as_ref().and_then(Lease::loss);
                        let lost = loss.is_some_and(|l| l != FenceLoss::StreamReplaced);
                        Held {
                            number: n.clone(),
                            lost: lost && s.addr.is_none(),
                            online: s.resources.state() == NumberPhase::Online,
                            stopping: s.stopping,
                        }
                    })
                    .collect();
                let _ = reply.send(numbers);
            }
            FleetMsg::Command(number, command, reply) => {
                command_number(state, number, command, reply).await;
            }
            FleetMsg::Drain(reply) => {
                state.draining = true;
                let numbers: Vec<PhoneNumber> = state.slots.keys().cloned().collect();
                for number in &numbers {
                    stop_number(state, number).await;
                }
                let _ = reply.send(());
            }
        }
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

async fn spawn_number(state: &mut FleetState, number: &PhoneNumber) {
    let Some(slot) = state.slots.get_mut(number) else {
        return;
    };
    let Some(lease) = slot.lease.clone() else {
        return;
    };
    if let Some(loss) = lease.loss() {
        // Lost while it waited to restart: it stays stopped.
        tracing::warn!(%number, %loss, "ownership lost; not restarted");
        slot.resources.set_state(NumberPhase::after_loss(loss));
        return;
    }
    if slot.resources.cancel.is_cancelled() {
        // The previous incarnation's resources are spent; start with fresh ones.
        slot.resources.retire();
        slot.resources = NumberResources::new(state.deps.counters.clone());
        slot.resources.set_lease(lease.clone());
    }
    let mailbox = Mailbox::new(ActorKind::Number);
    let args = NumberArgs {
        number: number.clone(),
        mailbox: mailbox.clone(),
        resources: slot.resources.clone(),
        lease,
        deps: state.deps.clone(),
    };
    let cell = state.myself.actor().get_cell();
    match NumberActor::spawn_linked(None, NumberActor, args, cell).await {
        Ok((actor, _)) => {
            let addr = Addr::new(actor, mailbox);
            state.by_actor.insert(addr.actor().get_id(), number.clone());
            slot.addr = Some(addr);
            slot.tracker.started(Instant::now());
        }
        Err(e) => {
            tracing::error!(%number, error = %e, "number failed to start");
            let exit = Exit::Failed(e.to_string());
            after_exit(state, number, exit).await;
        }
    }
}

async fn stop_number(state: &mut FleetState, number: &PhoneNumber) -> bool {
    let Some(slot) = state.slots.get_mut(number) else {
        return false;
    };
    slot.stopping = true;
    match &slot.addr {
        Some(addr) => {
            // It settles its sends first; one too busy to take the message is stopped anyway.
            let actor = addr.actor().clone();
            if addr.cast(NumberMsg::HandOff).is_err() {
                actor.stop(Some("removed".to_owned()));
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(HANDOFF_SETTLE + Duration::from_secs(1)).await;
                    actor.stop(Some("handoff deadline".to_owned()));
                });
            }
        }
        None => {
            if let Some(slot) = state.slots.remove(number) {
                slot.resources.release().await;
                slot.resources.retire();
                if let Some(lease) = slot.lease {
                    release_lease(state, lease);
                }
            }
        }
    }
    true
}

/// Takes the lease of `number` off the fleet's task, waiting out outages, and reports it.
fn acquire(state: &FleetState, number: PhoneNumber, resources: Arc<NumberResources>) {
    let coordinator = state.deps.coordinator.clone();
    let health = state.deps.store.health();
    let fleet = state.myself.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(250);
        let result = loop {
            match coordinator.acquire(&number).await {
                Err(e) if e.is_outage() && !resources.cancel.is_cancelled() => {
                    tracing::debug!(%number, error = %e, "coordinator unavailable; waiting");
                    let pause = async {
                        match e {
                            CoordinatorError::Store(_) => health.wait_up(OUTAGE_RETRY).await,
                            _ => tokio::time::sleep(wait).await,
                        }
                    };
                    tokio::select! {
                        () = resources.cancel.cancelled() => break Err(e),
                        () = pause => {}
                    }
                    wait = (wait * 2).min(OUTAGE_RETRY);
                }
                other => break other,
            }
        };
        // Then its turn to connect: a cold start or a failover never storms WhatsApp.
        let result = match result {
            Ok(lease) => match admit(&*coordinator, &number, &resources).await {
                Ok(()) => Ok(lease),
                Err(e) => {
                    // Stopped (or handed off) while it waited: the lease is of no use here.
                    coordinator.release(&lease).await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let _ = fleet.cast(FleetMsg::Acquired {
            number,
            resources,
            result,
        });
    });
}

/// Waits for `number`'s admission, through outages of the coordinator; cancelled with the slot.
async fn admit(
    coordinator: &dyn Coordinator,
    number: &PhoneNumber,
    resources: &NumberResources,
) -> Result<(), CoordinatorError> {
    loop {
        let admitted = tokio::select! {
            () = resources.cancel.cancelled() => return Err(CoordinatorError::Draining),
            admitted = coordinator.admit(number) => admitted,
        };
        match admitted {
            Err(e) if e.is_outage() => {
                tracing::debug!(%number, error = %e, "admission unavailable; waiting");
                tokio::select! {
                    () = resources.cancel.cancelled() => return Err(e),
                    () = tokio::time::sleep(OUTAGE_RETRY / 4) => {}
                }
            }
            other => return other,
        }
    }
}

async fn acquired(
    state: &mut FleetState,
    number: PhoneNumber,
    resources: &Arc<NumberResources>,
    result: Result<Lease, CoordinatorError>,
) {
    let ours = state
        .slots
        .get(&number)
        .filter(|s| Arc::ptr_eq(&s.resources, resources) && !s.stopping);
    match (ours.is_some() && !state.draining, result) {
        (true, Ok(lease)) => {
            if let Some(slot) = state.slots.get_mut(&number) {
                slot.resources.set_lease(lease.clone());
                slot.lease = Some(lease);
            }
            spawn_number(state, &number).await;
        }
        (false, Ok(lease)) => release_lease(state, lease),
        (ours, Err(e)) => {
            tracing::info!(%number, error = %e, "number not started");
            if ours && let Some(slot) = state.slots.remove(&number) {
                slot.resources.release().await;
                slot.resources.retire();
            }
        }
    }
}

/// Gives `lease` back to the coordinator, off the fleet's task.
fn release_lease(state: &mut FleetState, lease: Lease) {
    lease.mark_released();
    let coordinator: Arc<dyn Coordinator> = state.deps.coordinator.clone();
    state
        .releases
        .spawn(async move { coordinator.release(&lease).await });
    // Finished releases are reaped as new ones start.
    while state.releases.try_join_next().is_some() {}
}

async fn child_exited(state: &mut FleetState, id: ActorId, exit: Exit) {
    let Some(number) = state.by_actor.remove(&id) else {
        return;
    };
    let Some(slot) = state.slots.get_mut(&number) else {
        return;
    };
    if let Some(addr) = slot.addr.take() {
        addr.mailbox().abandon();
    }
    // A panic skipped the number's post_stop: close its session and tasks here.
    slot.resources.release().await;
    if slot.stopping {
        slot.resources.retire();
        if let Some(lease) = state.slots.remove(&number).and_then(|s| s.lease) {
            release_lease(state, lease);
        }
        return;
    }
    if let Some(loss) = slot.lease.as_ref().and_then(Lease::loss) {
        // Another owner has it, or may: stay stopped (the slot stays, visible in the counts).
        tracing::warn!(%number, %loss, "ownership lost; not restarted");
        slot.resources.set_state(NumberPhase::after_loss(loss));
        // Still ours after a replaced stream: give it up (a no-op if it is another's).
        if let Some(lease) = slot.lease.clone() {
            release_lease(state, lease);
        }
        return;
    }
    if std::mem::take(&mut slot.restart) {
        tracing::info!(%number, "number restarted on request");
        Box::pin(spawn_number(state, &number)).await;
        return;
    }
    after_exit(state, &number, exit).await;
}

/// An operator's `command` to `number`, answered on `reply`.
async fn command_number(
    state: &mut FleetState,
    number: PhoneNumber,
    command: NumberCommand,
    reply: RpcReplyPort<Result<Done, CommandError>>,
) {
    let lost = |s: &Slot| s.lease.as_ref().is_some_and(|l| l.loss().is_some());
    let Some(slot) = state
        .slots
        .get_mut(&number)
        .filter(|s| !s.stopping && !lost(s) && !state.draining)
    else {
        let _ = reply.send(Err(CommandError::NotHere(number)));
        return;
    };
    tracing::info!(%number, %command, "operator command");
    match command {
        NumberCommand::Restart => {
            let was_parked = slot.parked.take().is_some();
            slot.tracker = RestartTracker::new(
                state.deps.settings.number_policy,
                Instant::now(),
                seed_of(&number),
            );
            let leased = slot.lease.is_some();
            if let Some(addr) = slot.addr.clone() {
                slot.restart = true;
                addr.actor().stop(Some("restart requested".to_owned()));
            } else if leased {
                // Waiting out a restart delay (or the store): now.
                spawn_number(state, &number).await;
            } else if was_parked {
                // Parked, its lease given up: take it again from the start.
                if let Some(slot) = state.slots.remove(&number) {
                    slot.resources.retire();
                }
                let _ = state.myself.cast(FleetMsg::Start(number));
            }
            // Otherwise it is still taking its lease, and starts fresh anyway.
            let _ = reply.send(Ok(Done::Done));
        }
        NumberCommand::Logout | NumberCommand::Send(_) | NumberCommand::PairCode => {
            let Some(addr) = slot.addr.clone() else {
                let state = slot.resources.state().as_str();
                let _ = reply.send(Err(CommandError::Failed(format!(
                    "{number} is {state}, not running: restart it first"
                ))));
                return;
            };
            let timeout = state.deps.settings.call_timeout;
            tokio::spawn(async move {
                let done = match command {
                    NumberCommand::Send(send) => {
                        let msg = send.outbound(&number);
                        addr.call(|r| NumberMsg::Send(msg, r), timeout).await
                    }
                    NumberCommand::PairCode => addr
                        .call(NumberMsg::PairCode, timeout)
                        .await
                        .map(|r| r.map(|()| Done::Done)),
                    _ => addr
                        .call(NumberMsg::Logout, timeout)
                        .await
                        .map(|r| r.map(|()| Done::Done)),
                };
                let _ =
                    reply.send(done.unwrap_or_else(|e| Err(CommandError::Failed(e.to_string()))));
            });
        }
    }
}

async fn after_exit(state: &mut FleetState, number: &PhoneNumber, exit: Exit) {
    let Some(slot) = state.slots.get_mut(number) else {
        return;
    };
    match slot.tracker.on_exit(&exit, Instant::now()) {
        Decision::Restart { delay, attempt } => {
            FleetCounters::bump(&state.deps.counters.restarts);
            metrics::counter!(RESTARTS, "kind" => ActorKind::Number.as_str()).increment(1);
            tracing::warn!(%number, attempt, ?delay, ?exit, "restarting number");
            slot.resources.set_state(NumberPhase::Restarting);
            if delay.is_zero() {
                Box::pin(spawn_number(state, number)).await;
            } else {
                state
                    .myself
                    .cast_after(delay, FleetMsg::Respawn(number.clone()));
            }
        }
        Decision::Park { last_error } => {
            metrics::counter!(PARKED, "kind" => ActorKind::Number.as_str()).increment(1);
            tracing::error!(%number, %last_error, "number spent its restart budget; parked");
            slot.resources.set_state(NumberPhase::Failed);
            slot.parked = Some(last_error);
            // Parked here, it may run elsewhere.
            if let Some(lease) = slot.lease.take() {
                release_lease(state, lease);
            }
        }
        Decision::AwaitDependency => {
            // The store is down: not the number's fault. Start it again once the store is back,
            // at no cost to its budget.
            tracing::warn!(%number, ?exit, "number waits for the store");
            slot.resources.set_state(NumberPhase::Restarting);
            let health = state.deps.store.health();
            let fleet = state.myself.clone();
            let number = number.clone();
            tokio::spawn(async move {
                health.wait_up(Duration::from_secs(60)).await;
                let _ = fleet.cast(FleetMsg::Respawn(number));
            });
        }
        Decision::Done => {
            slot.resources.retire();
            if let Some(lease) = state.slots.remove(number).and_then(|s| s.lease) {
                release_lease(state, lease);
            }
        }
    }
}

fn status(state: &FleetState) -> FleetStatus {
    let mut parked: Vec<_> = state
        .slots
        .iter()
        .filter_map(|(n, s)| s.parked.clone().map(|e| (n.clone(), e)))
        .collect();
    parked.sort();
    FleetStatus {
        numbers: state.slots.len(),
        running: state.slots.values().filter(|s| s.addr.is_some()).count(),
        parked,
    }
}

fn seed_of(number: &PhoneNumber) -> u64 {
    number.digits().parse().unwrap_or(0)
}

/// Operator commands to the numbers a fleet runs; cheap to clone (the command bus holds one).
#[derive(Clone)]
pub struct Commands {
    addr: Addr<FleetMsg>,
    call_timeout: Duration,
}

impl Commands {
    /// The status of `number` if this node holds it (running, or waiting to restart, parked,
    /// taking its lease); `None` if it does not.
    pub async fn status(&self, number: &PhoneNumber) -> Result<Option<NumberStatus>, CallError> {
        let held = self
            .addr
            .call(|r| FleetMsg::Phase(number.clone(), r), self.call_timeout)
            .await?;
        let Some((phase, addr)) = held else {
            return Ok(None);
        };
        let idle = NumberStatus {
            number: number.clone(),
            state: phase,
            qr: None,
            pair_code: None,
            stats: SessionStats::default(),
        };
        match addr {
            // It may stop between the two calls: then it is as its slot says.
            Some(addr) => Ok(Some(
                addr.call(NumberMsg::Status, self.call_timeout)
                    .await
                    .unwrap_or(idle),
            )),
            None => Ok(Some(idle)),
        }
    }

    /// Carries out `command` to `number`, which must run on this node.
    pub async fn run(
        &self,
        number: PhoneNumber,
        command: NumberCommand,
    ) -> Result<Done, CommandError> {
        self.addr
            .call(|r| FleetMsg::Command(number, command, r), self.call_timeout)
            .await
            .unwrap_or_else(|e| Err(CommandError::Failed(e.to_string())))
    }
}

/// A running fleet: the handle the rest of the program holds.
pub struct Fleet {
    addr: Addr<FleetMsg>,
    counters: Arc<FleetCounters>,
    call_timeout: Duration,
    join: JoinHandle<()>,
}

impl Fleet {
    /// Starts an empty fleet.
    pub async fn start(deps: Deps) -> Result<Self, SpawnErr> {
        let mailbox = Mailbox::new(ActorKind::Fleet);
        let counters = deps.counters.clone();
        let call_timeout = deps.settings.call_timeout;
        let args = FleetArgs {
            deps,
            mailbox: mailbox.clone(),
        };
        let (actor, join) = FleetActor::spawn(None, FleetActor, args).await?;
        Ok(Self {
            addr: Addr::new(actor, mailbox),
            counters,
            call_timeout,
            join,
        })
    }

    /// Runs `number` (no-op if it runs already).
    pub fn add(&self, number: PhoneNumber) -> Result<(), CallError> {
        self.addr.cast(FleetMsg::Start(number))
    }

    /// Stops running `number`; false if it was unknown.
    pub async fn remove(&self, number: PhoneNumber) -> Result<bool, CallError> {
        self.addr
            .call(|r| FleetMsg::Stop(number, r), self.call_timeout)
            .await
    }

    /// The actor of `number`, if it runs.
    pub async fn number(&self, number: PhoneNumber) -> Result<Option<Addr<NumberMsg>>, CallError> {
        self.addr
            .call(|r| FleetMsg::Get(number, r), self.call_timeout)
            .await
    }

    /// A handle for operator commands to the numbers this fleet runs.
    pub fn commands(&self) -> Commands {
        Commands {
            addr: self.addr.clone(),
            call_timeout: self.call_timeout,
        }
    }

    /// The fleet at a glance.
    pub async fn status(&self) -> Result<FleetStatus, CallError> {
        self.addr.call(FleetMsg::Status, self.call_timeout).await
    }

    /// Live counters.
    pub fn counters(&self) -> &Arc<FleetCounters> {
        &self.counters
    }

    /// The fleet actor's address.
    pub fn addr(&self) -> &Addr<FleetMsg> {
        &self.addr
    }

    /// Stops every number and the fleet, waiting at most `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let until = Instant::now() + deadline;
        // First the fleet marks every number stopping, so that their exits are not restarts,
        // and hands each off (its sends settled); past `deadline` whatever is left is stopped.
        match self.addr.call(FleetMsg::Drain, self.call_timeout).await {
            Ok(()) => {
                while Instant::now() < until && self.status().await.is_ok_and(|s| s.running > 0) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet did not take the shutdown; stopping it anyway");
            }
        }
        let deadline = until.saturating_duration_since(Instant::now());
        let actor = self.addr.actor();
        actor
            .stop_children_and_wait(Some("shutdown".to_owned()), Some(deadline))
            .await;
        actor.stop(Some("shutdown".to_owned()));
        if tokio::time::timeout(deadline, self.join).await.is_err() {
            tracing::warn!("fleet did not stop within {deadline:?}");
        }
    }
}
