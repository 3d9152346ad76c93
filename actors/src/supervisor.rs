//! The node supervisor: root of the tree. It starts its children from specs
//! (the consumer actor, the API actor) and restarts each one-for-one with the
//! restart policy; past a child's budget it reports a fatal error, so the
//! process exits non-zero and the orchestrator (Kubernetes) takes over.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use crate::restart::{RestartDecision, RestartPolicy, RestartTracker};
use crate::telemetry;

/// How to start one child of the node supervisor, linked to it.
#[async_trait]
pub trait ChildSpec: Send + Sync + 'static {
    fn name(&self) -> &str;
    async fn spawn(&self, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr>;
}

/// The error a child's `pre_start` returned, without ractor's wrapping, so
/// an operator reads "cannot reach Kafka at ..." and not "actor panicked".
pub fn startup_error(error: ractor::SpawnErr) -> ActorProcessingErr {
    match error {
        ractor::SpawnErr::StartupFailed(inner) => inner,
        other => Box::new(other),
    }
}

pub struct NodeSupervisor;

pub enum SupervisorMsg {
    Restart {
        child: usize,
        generation: u64,
    },
    /// The running child of that name, if any (health checks, tests).
    Child(String, RpcReplyPort<Option<ActorCell>>),
}

pub struct SupervisorArgs {
    pub children: Vec<Arc<dyn ChildSpec>>,
    pub policy: RestartPolicy,
    /// Receives the reason when the tree gives up.
    pub fatal: mpsc::UnboundedSender<String>,
}

struct Child {
    spec: Arc<dyn ChildSpec>,
    cell: Option<ActorCell>,
    tracker: RestartTracker,
}

pub struct SupervisorState {
    children: Vec<Child>,
    fatal: mpsc::UnboundedSender<String>,
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = Vec::new();
        for spec in args.children {
            // A first start must succeed: a bad broker address or config is
            // a start-up error for the operator, not something to retry.
            let cell = spec
                .spawn(myself.get_cell())
                .await
                .map_err(|e| format!("{} failed to start: {e}", spec.name()))?;
            children.push(Child {
                spec,
                cell: Some(cell),
                tracker: RestartTracker::new(args.policy),
            });
        }
        Ok(SupervisorState {
            children,
            fatal: args.fatal,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart { child, generation } => {
                let Some(entry) = state.children.get_mut(child) else {
                    return Ok(());
                };
                if entry.cell.is_some() || entry.tracker.generation() != generation {
                    return Ok(());
                }
                match entry.spec.spawn(myself.get_cell()).await {
                    Ok(cell) => entry.cell = Some(cell),
                    Err(error) => state.on_failure(&myself, child, &error),
                }
            }
            SupervisorMsg::Child(name, reply) => {
                let cell = state
                    .children
                    .iter()
                    .find(|c| c.spec.name() == name)
                    .and_then(|c| c.cell.clone());
                let _ = reply.send(cell);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, error) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!(
                    "terminated: {}",
                    reason.unwrap_or_else(|| "no reason".into())
                ),
            ),
            _ => return Ok(()),
        };
        let index = state
            .children
            .iter()
            .position(|c| c.cell.as_ref().is_some_and(|c| c.get_id() == cell.get_id()));
        if let Some(index) = index {
            state.children[index].cell = None;
            state.on_failure(&myself, index, &error);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Children stop in reverse start order: the API last-started goes first.
        for child in state.children.iter_mut().rev() {
            if let Some(cell) = child.cell.take() {
                let _ = cell
                    .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(60)))
                    .await;
            }
        }
        Ok(())
    }
}

impl SupervisorState {
    fn on_failure(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        index: usize,
        error: &dyn std::fmt::Display,
    ) {
        let child = &mut self.children[index];
        let name = child.spec.name().to_string();
        match child
            .tracker
            .on_failure(tokio::time::Instant::now().into_std())
        {
            RestartDecision::Restart { delay, generation } => {
                telemetry::actor_restart_scheduled(&name, generation, delay, error);
                myself.send_after(delay, move || SupervisorMsg::Restart {
                    child: index,
                    generation,
                });
            }
            RestartDecision::Escalate { restarts_in_window } => {
                telemetry::actor_escalated(&name, restarts_in_window, error);
                let _ = self.fatal.send(format!(
                    "{name} failed {restarts_in_window} times within the restart window; last error: {error}"
                ));
                myself.stop(Some("restart budget spent".into()));
            }
        }
    }
}
