//! Starting and stopping one node: the store, the supervision tree (consumer
//! and API actors), and partition maintenance. Shared by `run`, `dev` and
//! `bench`, so all three run exactly the production path.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use audit_actors::consumer::{ConsumerSpec, CONSUMER_CHILD};
use audit_actors::kafka::KafkaConnector;
use audit_actors::republish::{KafkaRepublisher, ReplayRunnerConfig, ReplayRunnerSpec};
use audit_actors::supervisor::{ChildSpec, NodeSupervisor, SupervisorArgs, SupervisorMsg};
use audit_api::state::{ApiDatabase, ApiState, API_ROLE};
use audit_api::{ApiConfig, ApiSpec};
use audit_ledger::store::postgres::{self, PgConfig, PgEventStore};
use metrics_exporter_prometheus::PrometheusHandle;
use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::settings::NodeSettings;

pub struct RunningNode {
    supervisor: ActorRef<SupervisorMsg>,
    join: JoinHandle<()>,
    fatal: mpsc::UnboundedReceiver<String>,
    maintenance: JoinHandle<()>,
    pub store: PgEventStore,
    /// The API's own pool (role audit_api), closed at stop.
    api_pool: Option<sqlx::PgPool>,
    /// The replay runner's pool (role audit_api), closed at stop.
    replay_pool: Option<sqlx::PgPool>,
    pub api_addr: watch::Receiver<Option<SocketAddr>>,
}

pub async fn start(
    settings: NodeSettings,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<RunningNode> {
    let url = &settings.database.url;
    if settings.migrate {
        postgres::migrate(url).await?;
        tracing::info!(database = %postgres::redact_url(url), "migrations applied");
    }
    let mut store = PgEventStore::connect(&settings.database).await?;
    let checkpointer = settings.protection.as_ref().map(|p| p.checkpointer.clone());
    if let Some(p) = &settings.protection {
        store = store
            .with_protection(p.protection.clone())
            .with_checkpoints(p.checkpointer.clone());
    }
    store
        .ensure_partitions(settings.partitions_ahead_months)
        .await
        .context("creating monthly partitions of `events` (was the database migrated? run `audit-node migrate`)")?;

    let (fatal_tx, fatal) = mpsc::unbounded_channel();
    // The API's readiness check asks the tree, which starts after the API spec is built.
    let tree: Arc<OnceLock<ActorRef<SupervisorMsg>>> = Arc::new(OnceLock::new());
    let (bound_tx, api_addr) = watch::channel(None);
    let connector = Arc::new(KafkaConnector {
        settings: settings.kafka.clone(),
    });
    let mut children: Vec<Arc<dyn ChildSpec>> = vec![Arc::new(ConsumerSpec {
        connector,
        store: Arc::new(store.clone()),
        config: Arc::new(settings.pipeline.clone()),
    })];
    let mut api_pool = None;
    let mut replay_pool = None;
    if let Some(addr) = settings.api_addr {
        let state = api_state(&settings).await?;
        api_pool = Some(state.pool().clone());
        children.push(Arc::new(ApiSpec(ApiConfig {
            addr,
            metrics,
            readiness: readiness_check(store.clone(), tree.clone()),
            bound: Some(bound_tx),
            state: Arc::new(state),
        })));
        // Runs the replay jobs the API accepts; last started, first stopped.
        let runner = replay_runner(&settings).await?;
        replay_pool = Some(runner.pool.clone());
        children.push(Arc::new(runner));
    }
    let (supervisor, join) = Actor::spawn(
        None,
        NodeSupervisor,
        SupervisorArgs {
            children,
            policy: settings.pipeline.restart,
            fatal: fatal_tx,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}", audit_actors::supervisor::startup_error(e)))?;

    // New monthly partitions ahead of time, checked hourly; checkpoints
    // of chains that went quiet, checked every few seconds.
    let maintenance_store = store.clone();
    let months = settings.partitions_ahead_months;
    let maintenance = tokio::spawn(async move {
        let mut hourly = tokio::time::interval(Duration::from_secs(3600));
        let mut checkpoints = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = hourly.tick() => {
                    if let Err(error) = maintenance_store.ensure_partitions(months).await {
                        tracing::warn!(error = %error, "partition maintenance failed; will retry in an hour");
                    }
                }
                _ = checkpoints.tick() => {
                    if let Some(c) = maintenance_store.checkpointer() {
                        c.flush_due(maintenance_store.pool()).await;
                    }
                    // Expired data keys leave memory even on an idle node.
                    if let Some(p) = maintenance_store.protection() {
                        p.keyring().sweep();
                    }
                }
            }
        }
    });
    let _ = checkpointer;
    let _ = tree.set(supervisor.clone());
    Ok(RunningNode {
        supervisor,
        join,
        fatal,
        maintenance,
        store,
        api_pool,
        replay_pool,
        api_addr,
    })
}

/// The API's shared state: its own pool acting as `audit_api`, and the
/// node's protection and checkpointer.
async fn api_state(settings: &NodeSettings) -> anyhow::Result<ApiState> {
    let api = &settings.api;
    if api.tokens.is_empty() {
        tracing::warn!("no API tokens configured: every /v1 route answers 401; pass --api-tokens FILE (AUDIT_API_TOKENS)");
    }
    let mut state = ApiState::connect(
        &ApiDatabase {
            url: settings.database.url.clone(),
            max_connections: api.db_max_connections,
        },
        api.tokens.clone(),
        api.limits.clone(),
    )
    .await
    .context("connecting the API to PostgreSQL as role audit_api")?
    .with_reducers(api.reducers.clone())
    .with_consumed_topics(settings.kafka.topics.clone());
    if let Some(p) = &settings.protection {
        state = state
            .with_protection(p.protection.clone())
            .with_checkpointer(p.checkpointer.clone());
    }
    Ok(state)
}

/// The replay runner (`POST /v1/replays` jobs): a producer on the node's
/// brokers with its Kafka properties, and a small pool acting as
/// `audit_api` whose statement timeout lets it count a large job.
async fn replay_runner(settings: &NodeSettings) -> anyhow::Result<ReplayRunnerSpec> {
    let republisher = KafkaRepublisher::new(&settings.kafka.brokers, &settings.kafka.extra)
        .context("creating the Kafka producer of replay jobs")?;
    let store = PgEventStore::connect(&PgConfig {
        max_connections: 2,
        role: Some(API_ROLE.to_owned()),
        statement_timeout: Duration::from_secs(300),
        ..PgConfig::new(&settings.database.url)
    })
    .await
    .context("connecting the replay runner to PostgreSQL as role audit_api")?;
    Ok(ReplayRunnerSpec {
        pool: store.pool().clone(),
        republisher: Arc::new(republisher),
        config: Arc::new(ReplayRunnerConfig {
            node_id: settings.pipeline.node_id.clone(),
            ..ReplayRunnerConfig::default()
        }),
    })
}

fn readiness_check(
    store: PgEventStore,
    tree: Arc<OnceLock<ActorRef<SupervisorMsg>>>,
) -> audit_api::ReadinessCheck {
    Arc::new(move || {
        let store = store.clone();
        let tree = tree.clone();
        Box::pin(async move {
            store.ping().await.map_err(|e| format!("database: {e}"))?;
            let supervisor = tree.get().ok_or("starting")?;
            match ractor::call!(supervisor, SupervisorMsg::Child, CONSUMER_CHILD.to_string()) {
                Ok(Some(_)) => Ok(()),
                _ => Err("kafka consumer: not running (restarting)".to_string()),
            }
        })
    })
}

impl RunningNode {
    /// Runs until `shutdown` resolves (graceful) or the tree gives up (error).
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            _ = shutdown => Ok(()),
            reason = self.fatal.recv() => Err(anyhow::anyhow!(reason.unwrap_or_else(|| "supervisor stopped".into()))),
        };
        self.stop().await;
        outcome
    }

    /// Stops the tree: partition actors finish their batch, the consumer
    /// leaves the group, the API stops.
    pub async fn stop(self) {
        self.maintenance.abort();
        self.supervisor.stop(Some("shutdown".into()));
        if tokio::time::timeout(Duration::from_secs(90), self.join)
            .await
            .is_err()
        {
            tracing::warn!("supervision tree did not stop within 90s");
        }
        // Every chain this node wrote gets a final checkpoint.
        if let Some(checkpointer) = self.store.checkpointer() {
            let n = checkpointer.flush_all(self.store.pool()).await;
            tracing::info!(chains = n, "final checkpoints published");
        }
        if let Some(pool) = &self.api_pool {
            pool.close().await;
        }
        if let Some(pool) = &self.replay_pool {
            pool.close().await;
        }
        self.store.pool().close().await;
    }
}
