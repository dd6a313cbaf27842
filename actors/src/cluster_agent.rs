//! The cluster agent: this node's heartbeat and its placement reconciler.
//!
//! Every period (and at once when a lease is released anywhere), it announces the node
//! ([`Membership::heartbeat`]), reads the registered numbers and pins ([`Directory`]) and who
//! holds each lease, asks [`placement::plan`] who should own each number, and acts on its own
//! part only:
//! - a number it should own and does not run: the fleet starts it (taking its lease; one still
//!   held elsewhere is left for the next pass);
//! - a number it runs that another node should own: handed off (the fleet stops it and releases
//!   its lease, which tells the cluster). Rebalancing moves are paced by a [`MoveBudget`] and
//!   wait for the number to be online (not halfway through pairing); moves to a pinned node go
//!   at once;
//! - a number it should own but another live node still holds: left alone until that node
//!   releases it (the release wakes this agent), rather than tried and refused every pass;
//! - a number whose ownership it lost, or that was deleted: forgotten (stopped).
//!
//! While draining (asked by an admin, or on shutdown) it takes nothing and gives everything
//! away, as fast as the receivers admit connects ([`DrainBudget`]): in waves a tenth of a second
//! apart, each number serving here until its turn, so that none waits disconnected in a
//! receiver's admission queue. [`AgentStatus::to_hand_off`] says how many are left. It reports
//! to the node through [`AgentMsg`] replies only; it knows the fleet by its address.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::addr::Addr;
use crate::coordinator::{Directory, Membership, NodeAnnouncement};
use crate::fleet::FleetMsg;
use crate::ids::PhoneNumber;
use crate::placement::{self, DrainBudget, MoveBudget, NodeView, NumberView, PlacementConfig};
use crate::telemetry::{HANDOFFS, Mailbox, NODES};

/// The agent.
pub struct ClusterAgent;

/// Messages of the agent.
pub enum AgentMsg {
    /// Reconcile now.
    Tick,
    /// Stop taking numbers and give every one away; answers once the cluster has been told
    /// and the first wave is handed off.
    Drain(RpcReplyPort<()>),
    /// The agent's last view.
    Status(RpcReplyPort<AgentStatus>),
}

/// What the agent last saw and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    /// The live nodes.
    pub nodes: Vec<NodeView>,
    /// This node is draining.
    pub draining: bool,
    /// Reconcile passes done.
    pub passes: u64,
    /// Handoffs started.
    pub handoffs: u64,
    /// Numbers a drain still has to hand off (waiting for their wave).
    pub to_hand_off: usize,
}

/// What the agent is started with.
pub struct AgentArgs {
    /// This node's id and weight.
    pub node: NodeAnnouncement,
    /// Heartbeats and lease owners.
    pub membership: Arc<dyn Membership>,
    /// Registered numbers and pins.
    pub directory: Arc<dyn Directory>,
    /// The fleet it starts and stops numbers in.
    pub fleet: Addr<FleetMsg>,
    /// Reconcile period (a quarter of the lease TTL in a cluster).
    pub every: Duration,
    /// Placement tunables.
    pub placement: PlacementConfig,
    /// Forget numbers whose lease was lost (a cluster: another node may own them now).
    pub forget_lost: bool,
    /// Deadline of calls to the fleet.
    pub call_timeout: Duration,
    /// The agent's mailbox counter.
    pub mailbox: Mailbox,
}

/// The agent's state.
pub struct AgentState {
    args: AgentArgs,
    budget: MoveBudget,
    drain: DrainBudget,
    status: AgentStatus,
    ticker: CancellationToken,
    /// This agent's own address, to schedule a drain's next wave.
    me: Option<Addr<AgentMsg>>,
}

impl Actor for ClusterAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AgentArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AgentState {
            budget: MoveBudget::new(&args.placement, Instant::now()),
            drain: DrainBudget::new(None, Instant::now()),
            status: AgentStatus {
                draining: args.node.draining,
                ..AgentStatus::default()
            },
            args,
            ticker: CancellationToken::new(),
            me: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let me = Addr::new(myself, state.args.mailbox.clone());
        state.me = Some(me.clone());
        let membership = state.args.membership.clone();
        let every = state.args.every;
        let stop = state.ticker.clone();
        tokio::spawn(async move {
            loop {
                if me.cast(AgentMsg::Tick).is_err() {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                    () = membership.released() => {}
                }
                // Many releases at once (a drain) make one pass, not one each.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.cancel();
        state.args.mailbox.abandon();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.mailbox.dequeued();
        match message {
            AgentMsg::Tick => {
                // Coalesce ticks queued while a pass ran.
                if state.args.mailbox.depth() == 0 {
                    reconcile(state).await;
                    next_wave(state);
                }
            }
            AgentMsg::Drain(reply) => {
                state.args.node.draining = true;
                state.status.draining = true;
                if let Err(e) = state.args.membership.heartbeat(&state.args.node).await {
                    tracing::warn!(error = %e, "could not announce the drain");
                }
                reconcile(state).await;
                next_wave(state);
                let _ = reply.send(());
            }
            AgentMsg::Status(reply) => {
                let _ = reply.send(state.status.clone());
            }
        }
        Ok(())
    }
}

/// While a drain has numbers left, the next pass comes with the next wave, not the next period.
fn next_wave(state: &AgentState) {
    if state.status.to_hand_off == 0 {
        return;
    }
    let Some(me) = state.me.clone() else {
        return;
    };
    let wait = state
        .drain
        .wait(Instant::now())
        .max(Duration::from_millis(20));
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let _ = me.cast(AgentMsg::Tick);
    });
}

/// One reconcile pass (see the module doc). Any dependency that fails ends the pass: the next
/// one tries again, and the leases' own watchdog keeps ownership safe meanwhile.
async fn reconcile(state: &mut AgentState) {
    let a = &state.args;
    let view = match a.membership.heartbeat(&a.node).await {
        Ok(view) => view,
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat failed");
            return;
        }
    };
    if view.drain_requested && !state.args.node.draining {
        tracing::warn!("asked to drain: giving every number away");
        state.args.node.draining = true;
        state.status.draining = true;
        // Tell the others before the first release, so that none hands a number back here.
        if let Err(e) = state.args.membership.heartbeat(&state.args.node).await {
            tracing::warn!(error = %e, "could not announce the drain");
            return;
        }
    }
    let a = &state.args;
    for (label, active) in [("active", true), ("draining", false)] {
        let count = view.nodes.iter().filter(|n| n.active == active).count();
        metrics::gauge!(NODES, "state" => label).set(count as f64);
    }
    let Ok(registered) = a.directory.numbers().await else {
        return;
    };
    let numbers: Vec<PhoneNumber> = registered.iter().map(|(n, _)| n.clone()).collect();
    let Ok(owners) = a.membership.owners(&numbers).await else {
        return;
    };
    let Ok(running) = a.fleet.call(FleetMsg::Numbers, a.call_timeout).await else {
        return;
    };
    let views: Vec<NumberView> = registered
        .iter()
        .zip(&owners)
        .map(|((number, pin), owner)| NumberView {
            number: number.clone(),
            owner: owner.clone(),
            pin: pin.clone(),
        })
        .collect();
    let mut nodes = view.nodes.clone();
    match nodes.iter_mut().find(|n| n.id == a.node.id) {
        Some(me) => me.active = !a.node.draining,
        None => nodes.push(NodeView {
            id: a.node.id.clone(),
            capacity: a.node.capacity,
            active: !a.node.draining,
        }),
    }
    let plan = placement::plan(&views, &nodes, &a.placement, false);
    let receivers = nodes
        .iter()
        .filter(|n| n.active && n.id != a.node.id)
        .count();
    let now = Instant::now();
    state
        .drain
        .set_rate(placement::drain_rate(receivers, &a.placement), now);
    let pins: HashMap<&PhoneNumber, Option<&String>> =
        registered.iter().map(|(n, p)| (n, p.as_ref())).collect();
    let registered_set: HashSet<&PhoneNumber> = numbers.iter().collect();
    let mut runs: HashMap<PhoneNumber, bool> = HashMap::new();
    let mut leaving = HashSet::new();
    let mut stop = Vec::new();
    for held in running {
        if held.stopping {
            // On its way out (its release will tell the cluster): neither started nor stopped.
            leaving.insert(held.number);
            continue;
        }
        if !registered_set.contains(&held.number) || (held.lost && a.forget_lost) {
            stop.push(held.number);
        } else {
            runs.insert(held.number, held.online);
        }
    }

    let mut handoffs = 0;
    let mut to_hand_off = 0;
    for v in &views {
        let desired = plan.get(&v.number);
        let mine = desired == Some(&a.node.id);
        if mine && !a.node.draining {
            // Held by another live node: its release wakes this agent (an acquire now would
            // only be refused). Held under this node's id: a previous process's, soon expired.
            let free = v.owner.as_deref().is_none_or(|o| o == a.node.id);
            if free && !runs.contains_key(&v.number) && !leaving.contains(&v.number) {
                let _ = a.fleet.cast(FleetMsg::Start(v.number.clone()));
            }
            continue;
        }
        let held_here = v.owner.as_deref() == Some(a.node.id.as_str());
        let Some(&online) = runs.get(&v.number) else {
            continue;
        };
        if desired.is_none() || !held_here {
            continue;
        }
        let pinned_away = pins.get(&v.number).copied().flatten() == desired;
        // A rebalance waits for the number to be online: moved while it pairs or connects, it
        // would start over on the new node (a new QR code for a phone halfway through a scan).
        let go = if a.node.draining {
            state.drain.take(now)
        } else {
            pinned_away || (online && state.budget.take(now))
        };
        if go {
            stop.push(v.number.clone());
            handoffs += 1;
        } else if a.node.draining {
            to_hand_off += 1;
        }
    }
    for number in stop {
        let _ = a
            .fleet
            .call(|r| FleetMsg::Stop(number, r), a.call_timeout)
            .await;
    }
    if handoffs > 0 {
        metrics::counter!(HANDOFFS).increment(handoffs);
        tracing::info!(handoffs, "numbers handed off");
    }
    state.status.nodes = nodes;
    state.status.passes += 1;
    state.status.handoffs += handoffs;
    state.status.to_hand_off = to_hand_off;
}
