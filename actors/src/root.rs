//! The root of a node: the parent of the fleet supervisor and of the cluster agent.
//!
//! ```text
//! Root (root.rs)
//! ├── Cluster agent (cluster_agent.rs)   heartbeat, placement reconciler; restarted on failure
//! │                                      (permanent, 30 per 10 min)
//! └── Fleet supervisor (fleet.rs)        one child per number this node owns
//! ```
//!
//! (The event dispatcher for webhooks and the event stream will be the root's third child.)
//! The agent talks to the fleet through the fleet's address; neither knows the root. If the
//! fleet itself fails (a bug: it never fails because a number did) the root stops and the node
//! exits: nothing else can run its numbers.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::addr::{Addr, CallError};
use crate::cluster_agent::{AgentArgs, AgentMsg, AgentStatus, ClusterAgent};
use crate::coordinator::{Directory, Membership, NodeAnnouncement};
use crate::deps::Deps;
use crate::fleet::{Fleet, FleetMsg};
use crate::placement::PlacementConfig;
use crate::restart::{Decision, Exit, RestartPolicy, RestartTracker};
use crate::telemetry::{ActorKind, Mailbox, RESTARTS};

/// How the node's cluster agent runs.
#[derive(Clone)]
pub struct AgentSpec {
    /// This node as it announces itself.
    pub node: NodeAnnouncement,
    /// Heartbeats and lease owners.
    pub membership: Arc<dyn Membership>,
    /// Registered numbers and pins.
    pub directory: Arc<dyn Directory>,
    /// Reconcile period.
    pub every: Duration,
    /// Placement tunables.
    pub placement: PlacementConfig,
    /// Forget numbers whose lease was lost (clusters).
    pub forget_lost: bool,
}

/// The root actor.
pub struct RootActor;

/// Messages of the root.
pub enum RootMsg {
    /// Start (or restart) the cluster agent.
    StartAgent,
    /// The agent's address, if it runs.
    Agent(RpcReplyPort<Option<Addr<AgentMsg>>>),
}

/// The root's state.
pub struct RootState {
    spec: AgentSpec,
    fleet: Addr<FleetMsg>,
    call_timeout: Duration,
    myself: Addr<RootMsg>,
    mailbox: Mailbox,
    agent: Option<Addr<AgentMsg>>,
    tracker: RestartTracker,
}

/// What the root is started with.
pub struct RootArgs {
    spec: AgentSpec,
    fleet: Addr<FleetMsg>,
    call_timeout: Duration,
    mailbox: Mailbox,
}

impl Actor for RootActor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RootState {
            myself: Addr::new(myself, args.mailbox.clone()),
            spec: args.spec,
            fleet: args.fleet,
            call_timeout: args.call_timeout,
            mailbox: args.mailbox,
            agent: None,
            tracker: RestartTracker::new(RestartPolicy::cluster_agent(), Instant::now(), 0),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        start_agent(state).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
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
            RootMsg::StartAgent => {
                if state.agent.is_none() {
                    start_agent(state).await;
                }
            }
            RootMsg::Agent(reply) => {
                let _ = reply.send(state.agent.clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (id, exit) = match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                (cell.get_id(), Exit::of_failure(err.as_ref()))
            }
            SupervisionEvent::ActorTerminated(cell, ..) => (cell.get_id(), Exit::Normal),
            _ => return Ok(()),
        };
        if id == state.fleet.actor().get_id() {
            tracing::error!(?exit, "the fleet supervisor ended; stopping the node");
            myself.stop(Some("fleet ended".to_owned()));
            return Ok(());
        }
        if state
            .agent
            .as_ref()
            .is_some_and(|a| a.actor().get_id() == id)
        {
            if let Some(agent) = state.agent.take() {
                agent.mailbox().abandon();
            }
            match state.tracker.on_exit(&exit, Instant::now()) {
                Decision::Restart { delay, attempt } => {
                    metrics::counter!(RESTARTS, "kind" => ActorKind::ClusterAgent.as_str())
                        .increment(1);
                    tracing::warn!(attempt, ?delay, ?exit, "restarting the cluster agent");
                    state.myself.cast_after(delay, RootMsg::StartAgent);
                }
                Decision::Park { last_error } => {
                    tracing::error!(%last_error, "the cluster agent spent its budget");
                }
                Decision::AwaitDependency | Decision::Done => {
                    state
                        .myself
                        .cast_after(Duration::from_secs(1), RootMsg::StartAgent);
                }
            }
        }
        Ok(())
    }
}

async fn start_agent(state: &mut RootState) {
    let mailbox = Mailbox::new(ActorKind::ClusterAgent);
    let s = state.spec.clone();
    let args = AgentArgs {
        node: s.node,
        membership: s.membership,
        directory: s.directory,
        fleet: state.fleet.clone(),
        every: s.every,
        placement: s.placement,
        forget_lost: s.forget_lost,
        call_timeout: state.call_timeout,
        mailbox: mailbox.clone(),
    };
    let cell = state.myself.actor().get_cell();
    match ClusterAgent::spawn_linked(None, ClusterAgent, args, cell).await {
        Ok((agent, _)) => {
            state.agent = Some(Addr::new(agent, mailbox));
            state.tracker.started(Instant::now());
        }
        Err(e) => {
            tracing::error!(error = %e, "the cluster agent did not start");
            state
                .myself
                .cast_after(Duration::from_secs(1), RootMsg::StartAgent);
        }
    }
}

/// A running node: the root, its fleet and its agent.
pub struct Node {
    root: Addr<RootMsg>,
    join: JoinHandle<()>,
    fleet: Fleet,
    call_timeout: Duration,
}

/// Asks the node's agent to reconcile now: a number registered or removed while the node runs
/// starts or stops at once rather than at the next period. Cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    root: Addr<RootMsg>,
    call_timeout: Duration,
}

impl Reconciler {
    /// Queues a pass (the agent coalesces passes queued while one runs).
    pub async fn now(&self) {
        if let Ok(Some(agent)) = self.root.call(RootMsg::Agent, self.call_timeout).await {
            let _ = agent.cast(AgentMsg::Tick);
        }
    }
}

impl Node {
    /// Starts the root, the fleet under it, then the agent.
    pub async fn start(deps: Deps, spec: AgentSpec) -> Result<Self, SpawnErr> {
        let call_timeout = deps.settings.call_timeout;
        // The fleet first (unlinked for the moment it takes to spawn the root), then the root
        // adopts it as its child.
        let fleet = Fleet::start(deps).await?;
        let mailbox = Mailbox::new(ActorKind::Root);
        let args = RootArgs {
            spec,
            fleet: fleet.addr().clone(),
            call_timeout,
            mailbox: mailbox.clone(),
        };
        let (root, join) = RootActor::spawn(None, RootActor, args).await?;
        fleet.addr().actor().get_cell().link(root.get_cell());
        Ok(Self {
            root: Addr::new(root, mailbox),
            join,
            fleet,
            call_timeout,
        })
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// A handle that asks the agent for a pass now (numbers added or removed).
    pub fn reconciler(&self) -> Reconciler {
        Reconciler {
            root: self.root.clone(),
            call_timeout: self.call_timeout,
        }
    }

    /// The agent's last view.
    pub async fn agent_status(&self) -> Result<AgentStatus, CallError> {
        let agent = self.root.call(RootMsg::Agent, self.call_timeout).await?;
        match agent {
            Some(agent) => agent.call(AgentMsg::Status, self.call_timeout).await,
            None => Ok(AgentStatus::default()),
        }
    }

    /// Drains: the agent takes no more numbers, tells the cluster this node is draining and
    /// hands every number off as fast as the other nodes admit them. Returns once none is left
    /// to hand off, or at `until` (what is left then is stopped by [`Node::shutdown`]).
    pub async fn drain(&self, until: Instant) -> Result<(), CallError> {
        let agent = self.root.call(RootMsg::Agent, self.call_timeout).await?;
        let Some(agent) = agent else {
            return Ok(());
        };
        agent.call(AgentMsg::Drain, self.call_timeout).await?;
        while Instant::now() < until {
            let status = agent.call(AgentMsg::Status, self.call_timeout).await?;
            if status.to_hand_off == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the agent, then every number (their leases released), then the root, waiting at
    /// most `deadline` for the numbers.
    pub async fn shutdown(self, deadline: Duration) {
        if let Ok(Some(agent)) = self.root.call(RootMsg::Agent, self.call_timeout).await {
            agent.actor().stop(Some("shutdown".to_owned()));
        }
        // Unlink the fleet first: its stop is not a failure of the node.
        self.fleet
            .addr()
            .actor()
            .get_cell()
            .unlink(self.root.actor().get_cell());
        self.fleet.shutdown(deadline).await;
        self.root.actor().stop(Some("shutdown".to_owned()));
        let _ = tokio::time::timeout(deadline, self.join).await;
    }
}
