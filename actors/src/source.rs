//! The record source: the only way a partition actor reaches Kafka.
//!
//! One source per assigned partition. The Kafka implementation wraps an
//! rdkafka partition queue; chaos/ implements it with a simulated log.

use std::time::Duration;

use async_trait::async_trait;
use audit_ledger::RawRecord;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The client reported an error it will recover from (a broker down).
    #[error("transient source error: {0}")]
    Transient(String),
    #[error("source failed: {0}")]
    Fatal(String),
}

#[async_trait]
pub trait RecordSource: Send + Sync + 'static {
    fn topic(&self) -> &str;
    fn partition(&self) -> i32;

    /// Waits up to `max_wait` for a first record, then up to `linger` for
    /// more, returning at most `max` consecutive records (maybe none).
    async fn next_batch(
        &self,
        max: usize,
        max_wait: Duration,
        linger: Duration,
    ) -> Result<Vec<RawRecord>, SourceError>;

    /// Moves the read position: `Some(offset)`, or the earliest retained
    /// record for `None`.
    async fn seek(&self, offset: Option<i64>) -> Result<(), SourceError>;

    /// Stops fetching from the broker (the store cannot keep up), so the
    /// client buffers nothing more for this partition.
    fn pause(&self) -> Result<(), SourceError>;
    fn resume(&self) -> Result<(), SourceError>;

    /// The offset after the last record in the log (the high watermark), if
    /// the source can tell: a stored offset beyond it means the log is not
    /// the one the store has seen (topic recreated, another cluster).
    async fn end_offset(&self) -> Result<Option<i64>, SourceError> {
        Ok(None)
    }

    /// Tells the broker how far this partition is durably stored. For lag
    /// tooling only: the store's own offset is the truth.
    fn commit(&self, next_offset: i64);
}
