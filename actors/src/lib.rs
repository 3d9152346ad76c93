//! The supervised ingestion pipeline.
//!
//! ```text
//! NodeSupervisor ── ConsumerActor (one Kafka consumer in the group)
//!                      └── PartitionActor × assigned partitions
//! ```
//! Partition actors reach Kafka and PostgreSQL only through [`RecordSource`]
//! and [`audit_ledger::EventStore`], so chaos/ can run them under simulation.

pub mod config;
pub mod consumer;
pub mod kafka;
pub mod partition;
pub mod readahead;
pub mod republish;
pub mod restart;
pub mod source;
pub mod supervisor;
pub mod telemetry;

pub use config::PipelineConfig;
pub use partition::{PartitionActor, PartitionArgs, PartitionMsg};
pub use restart::{RestartDecision, RestartPolicy, RestartTracker};
pub use source::{RecordSource, SourceError};
