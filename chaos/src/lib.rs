//! Deterministic simulations of the real pipeline: the real consumer and
//! partition actors, run inside a turmoil simulation against the in-memory
//! store and a simulated Kafka topic, with faults drawn from one seed.
//!
//! ```text
//! turmoil Sim (virtual clock) ── client "node"
//!     producer task ── makes the generated log visible over time
//!     ConsumerActor "node-a" ── PartitionActor × partitions ─┐
//!     ConsumerActor "node-b" (after a rebalance) ────────────┼─ ChaosStore ── MemoryStore
//!     fault schedule (store outage, lost acks, rebalance)    │
//! check_exactly_once(log, store state) ◄─────────────────────┘
//! ```
//!
//! [`cluster`] is the fuller simulation: broker, store and node hosts over
//! turmoil TCP, the whole supervision tree, faults between any two hosts
//! and five invariants (docs/CHAOS.md).
//!
//! A failing run prints its seed; `CHAOS_SEED=<seed> cargo test -p
//! chaos` replays the same log and fault schedule.

pub mod check;
pub mod cluster;
pub mod log;
pub mod scenario;
pub mod source;
pub mod store;

pub use check::check_exactly_once;
pub use log::SimLog;
pub use scenario::{Faults, Outcome, Scenario};
pub use source::{PartitionFeed, SimSource, SourceFault, SourceStats};
pub use store::{ChaosStore, PlantedBug, WriterStats};

/// The environment variable that sets the seed of a run.
pub const SEED_VAR: &str = "CHAOS_SEED";

/// The seed from `CHAOS_SEED` (decimal or `0x` hex), else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    let Ok(text) = std::env::var(SEED_VAR) else {
        return default;
    };
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("{SEED_VAR}={text:?} is not a u64: {e}"))
}

/// The command that replays a run of `test` with `seed`.
pub fn replay_command(seed: u64, test: &str) -> String {
    format!(
        "{SEED_VAR}={seed} cargo test -p chaos --test exactly_once -- {test} --exact --nocapture"
    )
}
