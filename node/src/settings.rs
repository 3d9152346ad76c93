//! Node settings: command-line flags (each with an environment variable),
//! an optional TOML file for the same tunables, and built-in defaults, in
//! that order of precedence. README.md lists every flag and variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use audit_actors::kafka::KafkaSettings;
use audit_actors::{PipelineConfig, RestartPolicy};
use audit_ledger::store::postgres::{PgConfig, WRITER_ROLE};
use audit_ledger::ParseOptions;
use serde::Deserialize;

/// Tunables shared by `run` and `dev`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Tuning {
    /// Consumer group protocol: `classic` (cooperative-sticky) or `consumer` (KIP-848, Kafka 4.0+).
    #[arg(long, env = "AUDIT_GROUP_PROTOCOL", value_parser = ["classic", "consumer"])]
    pub group_protocol: Option<String>,
    /// Classic protocol session timeout in milliseconds.
    #[arg(long, env = "AUDIT_SESSION_TIMEOUT_MS")]
    pub session_timeout_ms: Option<u64>,
    /// Most records in one batch (one database transaction).
    #[arg(long, env = "AUDIT_BATCH_MAX_RECORDS")]
    pub batch_max_records: Option<usize>,
    /// How long a partition waits to fill a batch, in milliseconds.
    #[arg(long, env = "AUDIT_BATCH_LINGER_MS")]
    pub batch_linger_ms: Option<u64>,
    /// Batches in flight across the node (bounds memory).
    #[arg(long, env = "AUDIT_MAX_INFLIGHT_BATCHES")]
    pub max_inflight_batches: Option<usize>,
    /// Largest accepted payload in bytes; larger records become dead letters.
    #[arg(long, env = "AUDIT_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Prefetched kilobytes per partition (librdkafka queued.max.messages.kbytes); default: the budget split over the partitions.
    #[arg(long, env = "AUDIT_KAFKA_QUEUED_MAX_KBYTES")]
    pub queued_max_kbytes: Option<u32>,
    /// Node-wide Kafka prefetch budget in kilobytes, split over the topics' partitions (64..1024 KiB each).
    #[arg(long, env = "AUDIT_KAFKA_PREFETCH_BUDGET_KBYTES")]
    pub prefetch_budget_kbytes: Option<u32>,
    /// PostgreSQL connections of the node.
    #[arg(long, env = "AUDIT_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
    /// Tasks that commit the batches of several partitions in one transaction (group commit); 0 (the default): a transaction per batch.
    #[arg(long, env = "AUDIT_DB_GROUP_COMMITTERS", default_value_t = 0)]
    pub db_group_committers: usize,
    /// Role the node writes with (`SET ROLE`); empty keeps the login role.
    #[arg(long, env = "AUDIT_DB_ROLE")]
    pub db_role: Option<String>,
}

/// HTTP API settings shared by `run` and `dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "AUDIT_API_ADDR", default_value = "127.0.0.1:8080")]
    pub api_addr: SocketAddr,
    /// statement_timeout of the API's queries in milliseconds; a slower query answers 503.
    #[arg(long, env = "AUDIT_API_STATEMENT_TIMEOUT_MS", default_value_t = 10_000)]
    pub api_statement_timeout_ms: u64,
    /// Largest accepted request body in bytes; larger ones answer 413.
    #[arg(long, env = "AUDIT_API_MAX_BODY_BYTES", default_value_t = 65_536)]
    pub api_max_body_bytes: usize,
    /// Concurrent replay streams; more answer 429.
    #[arg(long, env = "AUDIT_API_MAX_REPLAY_STREAMS", default_value_t = 8)]
    pub api_max_replay_streams: usize,
    /// PostgreSQL connections of the API, role audit_api: up to this many for event pages by stream, type or ids (statements planned once) and as many for the rest.
    #[arg(long, env = "AUDIT_API_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub api_db_max_connections: u32,
    /// TOML file of state reducers per event type: [reducers] "order.snapshot" = "replace" (merge, replace, ignore).
    #[arg(long, env = "AUDIT_API_REDUCERS")]
    pub api_reducers: Option<PathBuf>,
}

impl ApiArgs {
    /// The API's settings with the given tokens.
    pub fn settings(
        &self,
        tokens: audit_api::auth::TokenTable,
    ) -> anyhow::Result<audit_api::state::ApiSettings> {
        if self.api_statement_timeout_ms == 0
            || self.api_max_body_bytes == 0
            || self.api_max_replay_streams == 0
        {
            anyhow::bail!(
                "--api-statement-timeout-ms, --api-max-body-bytes and --api-max-replay-streams must be at least 1"
            );
        }
        let reducers = match &self.api_reducers {
            Some(path) => audit_api::fold::Reducers::load(path)?,
            None => audit_api::fold::Reducers::default(),
        };
        Ok(audit_api::state::ApiSettings {
            tokens,
            limits: audit_api::state::ApiLimits {
                max_body_bytes: self.api_max_body_bytes,
                statement_timeout: Duration::from_millis(self.api_statement_timeout_ms),
                max_replay_streams: self.api_max_replay_streams,
                ..audit_api::state::ApiLimits::default()
            },
            reducers,
            db_max_connections: self.api_db_max_connections.max(1),
        })
    }
}

/// The TOML file given with `--config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub kafka: KafkaFile,
    #[serde(default)]
    pub pipeline: PipelineFile,
    #[serde(default)]
    pub database: DatabaseFile,
    #[serde(default)]
    pub restart: RestartFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    pub group_protocol: Option<String>,
    pub session_timeout_ms: Option<u64>,
    pub queued_max_kbytes: Option<u32>,
    pub prefetch_budget_kbytes: Option<u32>,
    /// Any librdkafka property, e.g. `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub batch_max_records: Option<usize>,
    pub batch_linger_ms: Option<u64>,
    pub max_inflight_batches: Option<usize>,
    pub max_payload_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseFile {
    pub max_connections: Option<u32>,
    pub role: Option<String>,
    pub partitions_ahead_months: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartFile {
    pub max_restarts: Option<u32>,
    pub window_secs: Option<u64>,
    pub base_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub kafka: KafkaSettings,
    pub database: PgConfig,
    pub pipeline: PipelineConfig,
    pub api_addr: Option<SocketAddr>,
    /// Tokens, limits and reducers of the API (used when `api_addr` is set).
    pub api: audit_api::state::ApiSettings,
    pub migrate: bool,
    pub partitions_ahead_months: i32,
    /// Field protection and checkpoints; `None` only in benchmarks of the bare pipeline.
    pub protection: Option<crate::keys::NodeProtection>,
}

pub struct Identity<'a> {
    pub brokers: &'a str,
    pub topics: Vec<String>,
    pub group_id: &'a str,
    pub database_url: &'a str,
    pub node_id: String,
    pub default_group_protocol: &'a str,
}

impl NodeSettings {
    pub fn resolve(
        identity: Identity<'_>,
        tuning: &Tuning,
        file: FileConfig,
    ) -> anyhow::Result<Self> {
        let mut kafka = KafkaSettings::new(identity.brokers, identity.topics, identity.group_id);
        kafka.client_id = identity.node_id.clone();
        kafka.group_protocol = tuning
            .group_protocol
            .clone()
            .or(file.kafka.group_protocol)
            .unwrap_or_else(|| identity.default_group_protocol.to_string());
        if !["classic", "consumer"].contains(&kafka.group_protocol.as_str()) {
            anyhow::bail!(
                "kafka.group_protocol must be \"classic\" or \"consumer\", got {:?}",
                kafka.group_protocol
            );
        }
        if let Some(ms) = tuning.session_timeout_ms.or(file.kafka.session_timeout_ms) {
            kafka.session_timeout = Duration::from_millis(ms);
        }
        kafka.queued_max_kbytes = tuning.queued_max_kbytes.or(file.kafka.queued_max_kbytes);
        if let Some(kb) = tuning
            .prefetch_budget_kbytes
            .or(file.kafka.prefetch_budget_kbytes)
        {
            kafka.prefetch_budget_kbytes = kb;
        }
        kafka.extra = file.kafka.properties;

        let mut database = PgConfig::new(identity.database_url);
        if let Some(n) = tuning.db_max_connections.or(file.database.max_connections) {
            database.max_connections = n.max(1);
        }
        database.group_committers = tuning.db_group_committers;
        let role = tuning
            .db_role
            .clone()
            .or(file.database.role)
            .unwrap_or_else(|| WRITER_ROLE.to_string());
        database.role = (!role.is_empty()).then_some(role);

        let defaults = PipelineConfig::default();
        let restart_defaults = RestartPolicy::default();
        let pipeline = PipelineConfig {
            batch_max_records: tuning
                .batch_max_records
                .or(file.pipeline.batch_max_records)
                .unwrap_or(defaults.batch_max_records)
                .max(1),
            batch_linger: tuning
                .batch_linger_ms
                .or(file.pipeline.batch_linger_ms)
                .map(Duration::from_millis)
                .unwrap_or(defaults.batch_linger),
            max_inflight_batches: tuning
                .max_inflight_batches
                .or(file.pipeline.max_inflight_batches)
                .unwrap_or(defaults.max_inflight_batches)
                .max(1),
            parse: ParseOptions {
                max_payload_bytes: tuning
                    .max_payload_bytes
                    .or(file.pipeline.max_payload_bytes)
                    .unwrap_or(ParseOptions::default().max_payload_bytes),
            },
            restart: RestartPolicy {
                max_restarts: file
                    .restart
                    .max_restarts
                    .unwrap_or(restart_defaults.max_restarts),
                window: file
                    .restart
                    .window_secs
                    .map(Duration::from_secs)
                    .unwrap_or(restart_defaults.window),
                base_backoff: file
                    .restart
                    .base_backoff_ms
                    .map(Duration::from_millis)
                    .unwrap_or(restart_defaults.base_backoff),
                max_backoff: file
                    .restart
                    .max_backoff_ms
                    .map(Duration::from_millis)
                    .unwrap_or(restart_defaults.max_backoff),
            },
            node_id: identity.node_id,
            group_id: identity.group_id.to_string(),
            ..defaults
        };
        Ok(Self {
            kafka,
            database,
            pipeline,
            api_addr: None,
            api: audit_api::state::ApiSettings::default(),
            migrate: true,
            partitions_ahead_months: file.database.partitions_ahead_months.unwrap_or(3),
            protection: None,
        })
    }
}

/// A node id that is stable for a Kubernetes pod and unique on a laptop.
pub fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("node-{}", std::process::id()))
}
