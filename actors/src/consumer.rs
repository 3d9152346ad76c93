//! The consumer actor: one member of the Kafka consumer group. Rebalances
//! start and stop partition actors; it supervises them one-for-one with the
//! restart policy of [`crate::restart`], and escalates past its budget.
//!
//! It does not know Kafka: a [`Connector`] joins the group and reports
//! assignments as messages, so chaos/ can drive the same actor.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use audit_ledger::{EventStore, OffsetKey};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::Semaphore;

use crate::config::PipelineConfig;
use crate::partition::{PartitionActor, PartitionArgs, PartitionMsg};
use crate::restart::{RestartDecision, RestartTracker};
use crate::source::{RecordSource, SourceError};
use crate::supervisor::ChildSpec;
use crate::telemetry;

pub type TopicPartition = (String, i32);

/// Joins the consumer group and reports rebalances to the consumer actor.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn connect(
        &self,
        consumer: ActorRef<ConsumerMsg>,
    ) -> Result<Box<dyn ConnectorHandle>, SourceError>;
}

/// A live group membership.
#[async_trait]
pub trait ConnectorHandle: Send + Sync {
    /// Leaves the group and releases the client, bounded in time.
    async fn shutdown(self: Box<Self>);
}

pub struct Assignment {
    pub topic: String,
    pub partition: i32,
    pub source: Arc<dyn RecordSource>,
}

pub enum ConsumerMsg {
    Assigned(Vec<Assignment>),
    Revoked(Vec<TopicPartition>),
    /// Delayed restart of a failed partition actor (see the restart policy).
    RestartPartition {
        tp: TopicPartition,
        generation: u64,
    },
    /// The group membership failed beyond repair: fail this actor.
    ConnectorFailed(String),
    /// Test and health probe: how many partition actors run.
    RunningPartitions(ractor::RpcReplyPort<usize>),
}

pub struct ConsumerActor;

/// Starts the consumer actor under the node supervisor.
pub struct ConsumerSpec {
    pub connector: Arc<dyn Connector>,
    pub store: Arc<dyn EventStore>,
    pub config: Arc<PipelineConfig>,
}

pub const CONSUMER_CHILD: &str = "consumer";

#[async_trait]
impl ChildSpec for ConsumerSpec {
    fn name(&self) -> &str {
        CONSUMER_CHILD
    }

    async fn spawn(&self, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
        let args = ConsumerArgs {
            connector: self.connector.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
        };
        let (actor, _join) = Actor::spawn_linked(None, ConsumerActor, args, supervisor)
            .await
            .map_err(crate::supervisor::startup_error)?;
        Ok(actor.get_cell())
    }
}

pub struct ConsumerArgs {
    pub connector: Arc<dyn Connector>,
    pub store: Arc<dyn EventStore>,
    pub config: Arc<PipelineConfig>,
}

struct Slot {
    source: Arc<dyn RecordSource>,
    actor: Option<ActorRef<PartitionMsg>>,
    tracker: RestartTracker,
}

pub struct ConsumerState {
    store: Arc<dyn EventStore>,
    config: Arc<PipelineConfig>,
    permits: Arc<Semaphore>,
    slots: HashMap<TopicPartition, Slot>,
    by_actor: HashMap<ActorId, TopicPartition>,
    /// Revoked partitions' actors, asked to stop: a re-assignment waits for
    /// them, so that two actors never read one partition's queue at once.
    stopping: HashMap<TopicPartition, ActorRef<PartitionMsg>>,
    handle: Option<Box<dyn ConnectorHandle>>,
}

/// How long a re-assignment waits for the partition's previous actor to
/// stop (it finishes its step first). Past it the new actor starts anyway:
/// offset fencing and the partition's gap checks keep the store exact.
const PREDECESSOR_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Actor for ConsumerActor {
    type Msg = ConsumerMsg;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ConsumerMsg>,
        args: ConsumerArgs,
    ) -> Result<ConsumerState, ActorProcessingErr> {
        let handle = args.connector.connect(myself).await?;
        Ok(ConsumerState {
            permits: Arc::new(Semaphore::new(args.config.max_inflight_batches.max(1))),
            store: args.store,
            config: args.config,
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            stopping: HashMap::new(),
            handle: Some(handle),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConsumerMsg>,
        msg: ConsumerMsg,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConsumerMsg::Assigned(assignments) => {
                telemetry::rebalance("assign", assignments.len());
                // A re-assignment replaces any older incarnation; wait until
                // those are gone (all at once, bounded) before starting the
                // new ones.
                let mut predecessors = Vec::new();
                for a in &assignments {
                    let tp = (a.topic.clone(), a.partition);
                    if let Some(old) = state.slots.remove(&tp).and_then(|s| s.actor) {
                        state.by_actor.remove(&old.get_id());
                        old.stop(Some("reassigned".into()));
                        predecessors.push(old);
                    }
                    predecessors.extend(state.stopping.remove(&tp));
                }
                let waits = predecessors
                    .iter()
                    .map(|old| old.wait(Some(PREDECESSOR_STOP_WAIT)));
                let still_running = futures::future::join_all(waits)
                    .await
                    .into_iter()
                    .filter(Result::is_err)
                    .count();
                if still_running > 0 {
                    telemetry::predecessors_still_running(still_running, PREDECESSOR_STOP_WAIT);
                }
                for a in assignments {
                    let tp = (a.topic.clone(), a.partition);
                    state.slots.insert(
                        tp.clone(),
                        Slot {
                            source: a.source,
                            actor: None,
                            tracker: RestartTracker::new(state.config.restart),
                        },
                    );
                    state.spawn_partition(&myself, &tp).await?;
                }
                telemetry::partitions_assigned(state.slots.len());
            }
            ConsumerMsg::Revoked(tps) => {
                telemetry::rebalance("revoke", tps.len());
                for tp in tps {
                    if let Some(actor) = state.slots.remove(&tp).and_then(|s| s.actor) {
                        state.by_actor.remove(&actor.get_id());
                        // Stop, not kill: a batch in flight finishes. If the new
                        // owner starts meanwhile, the offset fencing keeps it exact.
                        actor.stop(Some("revoked".into()));
                        state.stopping.insert(tp, actor);
                    }
                }
                telemetry::partitions_assigned(state.slots.len());
            }
            ConsumerMsg::RestartPartition { tp, generation } => {
                let current = state
                    .slots
                    .get(&tp)
                    .map(|s| (s.tracker.generation(), s.actor.is_some()));
                if current == Some((generation, false)) {
                    state.spawn_partition(&myself, &tp).await?;
                }
                telemetry::partitions_assigned(state.slots.len());
            }
            ConsumerMsg::ConnectorFailed(reason) => {
                return Err(format!("kafka consumer failed: {reason}").into());
            }
            ConsumerMsg::RunningPartitions(reply) => {
                let _ = reply.send(state.slots.values().filter(|s| s.actor.is_some()).count());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ConsumerMsg>,
        event: SupervisionEvent,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, _)
        | SupervisionEvent::ActorTerminated(cell, _, _) = &event
        {
            // A revoked actor is gone: nothing to wait for any more.
            state
                .stopping
                .retain(|_, old| old.get_id() != cell.get_id());
        }
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(tp) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(()); // an older incarnation, already replaced
                };
                if let Some(slot) = state.slots.get_mut(&tp) {
                    slot.actor = None;
                }
                state.on_partition_failure(&myself, &tp, &error)?;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(tp) = state.by_actor.remove(&cell.get_id()) {
                    if let Some(slot) = state.slots.get_mut(&tp) {
                        slot.actor = None;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ConsumerMsg>,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        // Let batches in flight finish, then leave the group.
        // All at once: each may be finishing a batch.
        let wait = state.config.poll_wait * 20;
        let stops = state
            .slots
            .drain()
            .filter_map(|(_, s)| s.actor)
            .map(|actor| async move {
                actor
                    .stop_and_wait(Some("shutdown".into()), Some(wait))
                    .await
            });
        futures::future::join_all(stops).await;
        telemetry::partitions_assigned(0);
        if let Some(handle) = state.handle.take() {
            handle.shutdown().await;
        }
        Ok(())
    }
}

impl ConsumerState {
    /// One-for-one restart with backoff; past the budget, fail this actor so
    /// the node supervisor decides.
    fn on_partition_failure(
        &mut self,
        myself: &ActorRef<ConsumerMsg>,
        tp: &TopicPartition,
        error: &dyn std::fmt::Display,
    ) -> Result<(), ActorProcessingErr> {
        let Some(slot) = self.slots.get_mut(tp) else {
            return Ok(());
        };
        let child = format!("partition:{}:{}", tp.0, tp.1);
        match slot
            .tracker
            .on_failure(tokio::time::Instant::now().into_std())
        {
            RestartDecision::Restart { delay, generation } => {
                telemetry::actor_restart_scheduled(&child, generation, delay, error);
                let tp = tp.clone();
                myself.send_after(delay, move || ConsumerMsg::RestartPartition {
                    tp,
                    generation,
                });
                Ok(())
            }
            RestartDecision::Escalate { restarts_in_window } => {
                telemetry::actor_escalated(&child, restarts_in_window, error);
                Err(format!(
                    "{child} failed {restarts_in_window} times within the restart window: {error}"
                )
                .into())
            }
        }
    }

    async fn spawn_partition(
        &mut self,
        myself: &ActorRef<ConsumerMsg>,
        tp: &TopicPartition,
    ) -> Result<(), ActorProcessingErr> {
        let Some(slot) = self.slots.get_mut(tp) else {
            return Ok(());
        };
        let args = PartitionArgs {
            key: OffsetKey {
                group_id: self.config.group_id.clone(),
                topic: tp.0.clone(),
                partition: tp.1,
            },
            source: slot.source.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
            permits: self.permits.clone(),
            generation: slot.tracker.generation(),
        };
        match Actor::spawn_linked(None, PartitionActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.by_actor.insert(actor.get_id(), tp.clone());
                slot.actor = Some(actor);
            }
            // pre_start failed (store unreachable for long, seek refused):
            // same policy as a failure after start.
            Err(error) => self.on_partition_failure(myself, tp, &error)?,
        }
        Ok(())
    }
}
