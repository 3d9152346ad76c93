//! What every route shares: the API's own database pool (role `audit_api`,
//! with a statement timeout), field protection (to decrypt for auditors and
//! to compute blind-index tokens), the checkpointer (system events), the
//! token table and the limits.
//!
//! Handlers get it as `Data<&Arc<ApiState>>`.

use std::sync::Arc;
use std::time::Duration;

use audit_ledger::store::checkpointer::Checkpointer;
use audit_ledger::store::postgres::{PgConfig, PgEventStore};
use audit_ledger::store::protection::Protection;
use audit_ledger::StoreError;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::TokenTable;
use crate::fold::Reducers;
use crate::problem::ApiError;

/// The database role the API works as: reads, plus the system events and
/// access log rows of audited reads, plus erasure (migration `…03`).
pub const API_ROLE: &str = "audit_api";

/// Most events on one page (`limit`).
pub const MAX_PAGE: u32 = 1000;
/// Events on a page when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;

/// Limits on what one request may cost.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// `statement_timeout` of the API's connections (503 beyond).
    pub statement_timeout: Duration,
    /// Concurrent replay streams (429 beyond).
    pub max_replay_streams: usize,
    /// Most events a point-in-time state folds (400 beyond).
    pub max_fold_events: i64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            statement_timeout: Duration::from_secs(10),
            max_replay_streams: 8,
            max_fold_events: 100_000,
        }
    }
}

/// The API's settings, as the node's flags give them.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub tokens: TokenTable,
    pub limits: ApiLimits,
    pub reducers: Reducers,
    /// Connections of the API's own pool.
    pub db_max_connections: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            tokens: TokenTable::default(),
            limits: ApiLimits::default(),
            reducers: Reducers::default(),
            db_max_connections: 8,
        }
    }
}

/// How the API connects to PostgreSQL.
#[derive(Debug, Clone)]
pub struct ApiDatabase {
    pub url: String,
    pub max_connections: u32,
}

pub struct ApiState {
    pool: PgPool,
    /// Connections with generic plans, for event pages whose plan does not
    /// depend on the values asked for (see [`ApiState::page_pool`]).
    generic_pool: PgPool,
    protection: Option<Arc<Protection>>,
    checkpointer: Option<Arc<Checkpointer>>,
    tokens: TokenTable,
    limits: ApiLimits,
    reducers: Reducers,
    replay_streams: Arc<Semaphore>,
    /// Kafka topics the node ingests: a replay job may not publish to them.
    consumed_topics: Vec<String>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("protection", &self.protection)
            .field("tokens", &self.tokens)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Connects the API's pool: every connection does `SET ROLE audit_api`
    /// and sets `statement_timeout` from `limits`.
    pub async fn connect(
        database: &ApiDatabase,
        tokens: TokenTable,
        limits: ApiLimits,
    ) -> Result<Self, StoreError> {
        let config = PgConfig {
            max_connections: database.max_connections.max(1),
            role: Some(API_ROLE.to_owned()),
            statement_timeout: limits.statement_timeout,
            acquire_timeout: Duration::from_secs(5),
            ..PgConfig::new(&database.url)
        };
        let store = PgEventStore::connect(&config).await?;
        let generic = PgEventStore::connect(&PgConfig {
            generic_plans: true,
            ..config
        })
        .await?;
        Ok(Self::new(store.pool().clone(), tokens, limits)
            .with_generic_pool(generic.pool().clone()))
    }

    /// A state over an existing pool (which should act as `audit_api`).
    pub fn new(pool: PgPool, tokens: TokenTable, limits: ApiLimits) -> Self {
        let streams = limits.max_replay_streams.max(1);
        Self {
            generic_pool: pool.clone(),
            pool,
            protection: None,
            checkpointer: None,
            tokens,
            limits,
            reducers: Reducers::default(),
            replay_streams: Arc::new(Semaphore::new(streams)),
            consumed_topics: Vec::new(),
        }
    }

    /// Connections for event pages whose plan does not depend on the
    /// values asked for, which plan their statements once
    /// (`plan_cache_mode = force_generic_plan`): planning a page over the
    /// partitions of `events` cost PostgreSQL more than running it
    /// (PERFORMANCE.md, Query API).
    pub fn with_generic_pool(mut self, pool: PgPool) -> Self {
        self.generic_pool = pool;
        self
    }

    /// The pool for a page of events matching `filter`. Filters by stream,
    /// type, source, correlation or causation id have one best plan
    /// whatever their values, so their statements are planned once. A time
    /// range, a blind-index token or a payload containment take the pool
    /// that plans each statement with its values: how many rows match
    /// decides between an index and the `(tx, seq)` scan (a narrow range
    /// wants the `occurred_at` index, a wide one the scan), and a generic
    /// plan cannot tell.
    pub fn page_pool(&self, filter: &audit_ledger::query::EventFilter) -> &PgPool {
        let value_dependent = filter.occurred_from.is_some()
            || filter.occurred_to.is_some()
            || filter.ingested_from.is_some()
            || filter.ingested_to.is_some()
            || filter.contains.is_some()
            || !filter.blind.is_empty();
        if value_dependent {
            &self.pool
        } else {
            &self.generic_pool
        }
    }

    /// The topics the node consumes (`--topics`), refused as replay targets.
    pub fn with_consumed_topics(mut self, topics: Vec<String>) -> Self {
        self.consumed_topics = topics;
        self
    }

    pub fn with_protection(mut self, protection: Arc<Protection>) -> Self {
        self.protection = Some(protection);
        self
    }

    pub fn with_checkpointer(mut self, checkpointer: Arc<Checkpointer>) -> Self {
        self.checkpointer = Some(checkpointer);
        self
    }

    pub fn with_reducers(mut self, reducers: Reducers) -> Self {
        self.reducers = reducers;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `None` only when the node runs without field protection (benchmarks).
    pub fn protection(&self) -> Option<&Arc<Protection>> {
        self.protection.as_ref()
    }

    pub fn checkpointer(&self) -> Option<&Arc<Checkpointer>> {
        self.checkpointer.as_ref()
    }

    pub fn tokens(&self) -> &TokenTable {
        &self.tokens
    }

    pub fn limits(&self) -> &ApiLimits {
        &self.limits
    }

    pub fn reducers(&self) -> &Reducers {
        &self.reducers
    }

    pub fn consumed_topics(&self) -> &[String] {
        &self.consumed_topics
    }

    /// A slot for one replay stream, held for the stream's life; 429 when
    /// all `max_replay_streams` are taken.
    pub fn replay_stream_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.replay_streams.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(
                limit = self.limits.max_replay_streams,
                "replay stream refused: too many concurrent streams"
            );
            ApiError::too_many_requests(
                format!(
                    "{} replay streams are already running, the most this node serves at once; retry shortly \
                     (the operator sets the limit with --api-max-replay-streams)",
                    self.limits.max_replay_streams
                ),
                1,
            )
        })
    }

    /// Records a committed head of the system chain (audited reads,
    /// erasures) so a checkpoint follows in due time.
    pub async fn observe_system_head(&self, head: &audit_ledger::store::chain::ChainHead) {
        if let Some(c) = &self.checkpointer {
            c.observe(&self.pool, head).await;
        }
    }
}
