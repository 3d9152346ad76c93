//! A node host: the real supervision tree (node supervisor, consumer actor,
//! partition actors, restart policy, in-flight permits) over the simulated
//! broker and store clients. Everything here is the node's memory: a crash
//! loses it, and the host's software starts again from `run`.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use audit_actors::consumer::{Assignment, Connector, ConnectorHandle, ConsumerMsg, ConsumerSpec};
use audit_actors::supervisor::{NodeSupervisor, SupervisorArgs};
use audit_actors::{PipelineConfig, SourceError};
use audit_ledger::EventStore;
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::broker::BrokerSource;
use super::db::DbClient;
use super::{Shared, GROUP, TOPIC};

/// The node's software; on a spent restart budget it exits, as the
/// process does (exit code 1), and the orchestrator starts it again.
pub async fn run(
    node: &'static str,
    config: PipelineConfig,
    shared: Arc<Shared>,
) -> turmoil::Result {
    let boot = shared.boot(node);
    shared.trace(node, format!("boot {boot}"));
    let config = Arc::new(PipelineConfig {
        node_id: node.to_string(),
        group_id: GROUP.to_string(),
        ..config
    });
    let store: Arc<dyn EventStore> = Arc::new(DbClient::new(node, shared.clone()));
    let connector = Arc::new(GroupConnector {
        node,
        shared: shared.clone(),
    });
    let (fatal, mut fatal_rx) = mpsc::unbounded_channel();
    let args = SupervisorArgs {
        children: vec![Arc::new(ConsumerSpec {
            connector,
            store,
            config: config.clone(),
        })],
        policy: config.restart,
        fatal,
    };
    let (supervisor, _) = match Actor::spawn(None, NodeSupervisor, args).await {
        Ok(spawned) => spawned,
        Err(e) => {
            shared.fatal(node, format!("start-up failed: {e}"));
            return Ok(());
        }
    };
    let reason = fatal_rx
        .recv()
        .await
        .unwrap_or_else(|| "supervisor gone".into());
    shared.fatal(node, reason);
    supervisor.stop(Some("exit".into()));
    Ok(())
}

/// Group membership: the simulated coordinator's assignment, as rebalance
/// messages to the consumer actor.
struct GroupConnector {
    node: &'static str,
    shared: Arc<Shared>,
}

struct GroupHandle(JoinHandle<()>);

#[async_trait]
impl ConnectorHandle for GroupHandle {
    async fn shutdown(self: Box<Self>) {
        self.0.abort();
    }
}

#[async_trait]
impl Connector for GroupConnector {
    async fn connect(
        &self,
        consumer: ActorRef<ConsumerMsg>,
    ) -> Result<Box<dyn ConnectorHandle>, SourceError> {
        let node = self.node;
        let shared = self.shared.clone();
        let mut group = shared.subscribe_group();
        let task = tokio::spawn(async move {
            let mut owned: BTreeSet<i32> = BTreeSet::new();
            loop {
                let wanted: BTreeSet<i32> = group
                    .borrow_and_update()
                    .iter()
                    .filter(|(_, owners)| owners.contains(&node))
                    .map(|(p, _)| *p)
                    .collect();
                let revoked: Vec<(String, i32)> = owned
                    .difference(&wanted)
                    .map(|p| (TOPIC.to_string(), *p))
                    .collect();
                let assigned: Vec<Assignment> = wanted
                    .difference(&owned)
                    .map(|&p| Assignment {
                        topic: TOPIC.to_string(),
                        partition: p,
                        source: BrokerSource::new(TOPIC, p, node, shared.clone()),
                    })
                    .collect();
                if !revoked.is_empty()
                    && consumer
                        .send_message(ConsumerMsg::Revoked(revoked))
                        .is_err()
                {
                    return;
                }
                if !assigned.is_empty()
                    && consumer
                        .send_message(ConsumerMsg::Assigned(assigned))
                        .is_err()
                {
                    return;
                }
                owned = wanted;
                if group.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::new(GroupHandle(task)))
    }
}
