//! The audit trail's domain: what an event is, how a raw Kafka record becomes
//! one (or a dead letter), and where events are kept.
//!
//! Everything here is shared by the node, the actors, the API and the chaos
//! simulations, so it must not depend on Kafka or on an actor runtime.

pub mod batch;
pub mod canonical;
pub mod checkpoint;
pub mod envelope;
pub mod error;
pub mod merkle;
pub mod proofs;
pub mod protect;
pub mod query;
pub mod record;
pub mod recycle;
pub mod replay_jobs;
pub mod store;
pub mod testing;
pub mod verify;

pub use batch::{classify, Classified, PreparedBatch};
pub use envelope::{DeadLetter, DeadLetterReason, Event, ParseOptions};
pub use error::StoreError;
pub use record::{Header, RawRecord};
pub use store::{BatchStats, EventStore, OffsetKey, WriteBatch, WriteOutcome};
