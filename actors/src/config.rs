//! Tuning of the partition pipeline.

use std::time::Duration;

use audit_ledger::ParseOptions;

use crate::restart::RestartPolicy;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Most records in one batch (one transaction).
    pub batch_max_records: usize,
    /// How long a partition waits for more records once it has one and a
    /// permit (up to twice this: a first wait, then a fill deadline).
    pub batch_linger: Duration,
    /// How long a partition waits for a first record before checking in.
    pub poll_wait: Duration,
    /// Batches in flight across the whole node: bounds the node's memory
    /// whatever the number of partitions.
    pub max_inflight_batches: usize,
    /// Retry delays after a failed store write (exponential, capped).
    pub write_retry_base: Duration,
    pub write_retry_max: Duration,
    pub parse: ParseOptions,
    /// Parse batches on the partition actor's own task instead of tokio's
    /// blocking pool. For deterministic simulation only (chaos/): a pool
    /// thread finishes in real time, which a virtual clock cannot order.
    pub parse_inline: bool,
    pub restart: RestartPolicy,
    /// Written to `consumer_offsets.updated_by`.
    pub node_id: String,
    pub group_id: String,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_max_records: 2000,
            batch_linger: Duration::from_millis(50),
            poll_wait: Duration::from_millis(500),
            // 16: with hundreds of partitions each batch is small (the
            // prefetch budget split thin), and 8 left the cores idle while
            // permits waited on lingering batches (PERFORMANCE.md, session 7).
            max_inflight_batches: 16,
            write_retry_base: Duration::from_millis(100),
            write_retry_max: Duration::from_secs(10),
            parse: ParseOptions::default(),
            parse_inline: false,
            restart: RestartPolicy::default(),
            node_id: "node".into(),
            group_id: "audit-trail".into(),
        }
    }
}
