//! Every internal event of the pipeline in one place: each function logs and
//! bumps its metric together, so names stay consistent. Metric names are
//! listed in docs/ARCHITECTURE.md#metrics.

use std::time::Duration;

use audit_ledger::BatchStats;
use metrics::{counter, gauge, histogram};
use tracing::{debug, error, info, warn};

pub fn batch_committed(
    topic: &str,
    partition: i32,
    next_offset: i64,
    stats: BatchStats,
    took: Duration,
) {
    let labels = [
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ];
    counter!("audit_events_ingested_total", &labels).increment(stats.events);
    counter!("audit_dead_letters_total", &labels).increment(stats.dead_letters);
    counter!("audit_duplicates_total", &labels).increment(stats.duplicates);
    counter!("audit_batches_committed_total", &labels).increment(1);
    gauge!("audit_partition_next_offset", &labels).set(next_offset as f64);
    histogram!("audit_batch_write_seconds").record(took.as_secs_f64());
    debug!(
        topic,
        partition,
        next_offset,
        events = stats.events,
        dead_letters = stats.dead_letters,
        duplicates = stats.duplicates,
        took_ms = took.as_millis() as u64,
        "batch committed"
    );
}

pub fn store_write_failed(
    topic: &str,
    partition: i32,
    attempt: u32,
    retry_in: Duration,
    error: &dyn std::fmt::Display,
) {
    counter!("audit_store_write_failures_total", "topic" => topic.to_string()).increment(1);
    warn!(
        topic,
        partition,
        attempt,
        retry_in_ms = retry_in.as_millis() as u64,
        error = %error,
        "store write failed, partition paused, retrying"
    );
}

pub fn partition_fenced(topic: &str, partition: i32, expected: Option<i64>, stored: Option<i64>) {
    counter!("audit_partition_fenced_total", "topic" => topic.to_string()).increment(1);
    info!(
        topic,
        partition,
        expected = ?expected,
        stored = ?stored,
        "another writer moved this partition's offset; resuming from the stored offset"
    );
}

pub fn predecessors_still_running(count: usize, waited: std::time::Duration) {
    warn!(
        count,
        waited_ms = waited.as_millis() as u64,
        "re-assigned partitions' previous actors had not stopped; starting the new ones anyway"
    );
}

pub fn partition_seek(topic: &str, partition: i32, offset: Option<i64>, reason: &str) {
    counter!("audit_partition_seeks_total", "topic" => topic.to_string()).increment(1);
    info!(topic, partition, offset = ?offset, reason, "seeking partition");
}

pub fn records_skipped(topic: &str, partition: i32, count: usize, below: i64) {
    counter!("audit_records_skipped_total", "topic" => topic.to_string()).increment(count as u64);
    debug!(
        topic,
        partition, count, below, "skipped records already stored"
    );
}

pub fn partition_started(topic: &str, partition: i32, generation: u64) {
    info!(topic, partition, generation, "partition actor started");
}

pub fn partitions_assigned(count: usize) {
    gauge!("audit_partitions_assigned").set(count as f64);
}

pub fn store_read_failed(
    topic: &str,
    partition: i32,
    attempt: u32,
    retry_in: Duration,
    error: &dyn std::fmt::Display,
) {
    counter!("audit_store_read_failures_total", "topic" => topic.to_string()).increment(1);
    warn!(
        topic,
        partition,
        attempt,
        retry_in_ms = retry_in.as_millis() as u64,
        error = %error,
        "reading the stored offset failed, retrying"
    );
}

/// Offsets the log no longer has: lost to retention before they were read
/// (an operator must know), or legitimately absent (compaction, markers).
pub fn offsets_missing_from_log(topic: &str, partition: i32, expected: i64, first_available: i64) {
    counter!("audit_offsets_missing_total", "topic" => topic.to_string())
        .increment((first_available - expected) as u64);
    warn!(
        topic,
        partition,
        expected,
        first_available,
        "offsets missing from the Kafka log (retention, compaction or transaction markers); continuing after the gap"
    );
}

pub fn actor_restart_scheduled(
    child: &str,
    generation: u64,
    delay: Duration,
    error: &dyn std::fmt::Display,
) {
    counter!("audit_actor_restarts_total", "child" => child_kind(child)).increment(1);
    warn!(child, generation, delay_ms = delay.as_millis() as u64, error = %error, "actor failed, restarting");
}

pub fn actor_escalated(child: &str, restarts_in_window: u32, error: &dyn std::fmt::Display) {
    counter!("audit_actor_escalations_total", "child" => child_kind(child)).increment(1);
    error!(child, restarts_in_window, error = %error, "restart budget spent, escalating to parent");
}

pub fn source_error(topic: &str, partition: i32, error: &dyn std::fmt::Display) {
    counter!("audit_source_errors_total", "topic" => topic.to_string()).increment(1);
    warn!(topic, partition, error = %error, "kafka partition error");
}

pub fn rebalance(kind: &str, partitions: usize) {
    counter!("audit_rebalances_total", "kind" => kind.to_string()).increment(1);
    info!(kind, partitions, "consumer group rebalance");
}

fn child_kind(child: &str) -> String {
    child.split(':').next().unwrap_or(child).to_string()
}
