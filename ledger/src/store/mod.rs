//! The event store: the one narrow interface the pipeline writes through.
//!
//! The PostgreSQL implementation is the product; the in-memory one lets the
//! actors run under simulation (chaos/) and in unit tests. Both pass the same
//! conformance suite ([`conformance`]).

use async_trait::async_trait;

use crate::batch::PreparedBatch;
use crate::error::StoreError;

pub mod chain;
pub mod checkpointer;
pub mod conformance;
mod group;
pub mod memory;
pub mod postgres;
pub mod protection;
pub mod system;

pub use memory::MemoryStore;
pub use postgres::PgEventStore;

/// Whose offset: offsets are kept per consumer group, topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OffsetKey {
    pub group_id: String,
    pub topic: String,
    pub partition: i32,
}

/// One atomic write: the batch's rows and the partition's next offset.
#[derive(Debug)]
pub struct WriteBatch<'a> {
    pub key: &'a OffsetKey,
    /// The offset this writer believes is stored (`None`: nothing stored
    /// yet). If another writer moved it, the write is refused: that is how
    /// two nodes briefly owning one partition during a rebalance stay exact.
    pub expected: Option<i64>,
    pub batch: &'a PreparedBatch,
    /// Node that writes, for operators reading `consumer_offsets`.
    pub writer: &'a str,
}

/// Counts of what one committed batch became.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub events: u64,
    pub dead_letters: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The batch and the new offset are durable.
    Committed(BatchStats),
    /// Nothing was written: the stored offset is not what the writer
    /// expected. The writer must resume from `stored`.
    Fenced { stored: Option<i64> },
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// The next offset to consume for a partition, if any batch was stored.
    async fn stored_offset(&self, key: &OffsetKey) -> Result<Option<i64>, StoreError>;

    /// Writes a batch and its offset in one transaction, or nothing.
    async fn write_batch(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError>;
}
