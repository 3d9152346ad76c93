//! The store under simulation: the in-memory store behind a wrapper that
//! injects faults the memory store cannot (a commit whose acknowledgement is
//! lost), counts outcomes per writer, and can plant a bug on purpose, to
//! show the invariant checker catches it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use audit_ledger::store::MemoryStore;
use audit_ledger::{EventStore, OffsetKey, StoreError, WriteBatch, WriteOutcome};

/// A deliberate store bug. Never used outside the tests that show the
/// checker fails on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Once: drop one event of a batch but still move the offset past it.
    DropOneEvent,
    /// Once: store a batch's rows in reverse order (as iterating a hash map
    /// instead of the batch would).
    ReverseOneBatch,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub committed: u32,
    pub fenced: u32,
    pub failed: u32,
    pub acks_lost: u32,
    /// Writes the planted bug changed.
    pub bug_fired: u32,
    /// Writes held back by `stall_next_write_of` before they ran.
    pub stalled: u32,
}

pub struct ChaosStore {
    memory: Arc<MemoryStore>,
    acks_to_lose: AtomicU32,
    bug: Option<PlantedBug>,
    bug_fired: AtomicBool,
    /// The next write of this partition waits this long before it runs.
    stall: Mutex<Option<(i32, Duration)>>,
    stats: Mutex<BTreeMap<String, WriterStats>>,
}

impl ChaosStore {
    pub fn new(bug: Option<PlantedBug>) -> Self {
        Self {
            memory: Arc::new(MemoryStore::new()),
            acks_to_lose: AtomicU32::new(0),
            bug,
            bug_fired: AtomicBool::new(false),
            stall: Mutex::default(),
            stats: Mutex::default(),
        }
    }

    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// The next `n` writes fail as if the database were down.
    pub fn fail_next_writes(&self, n: u32) {
        self.memory.fail_next_writes(n);
    }

    /// The next `n` successful writes commit, then report a lost connection.
    pub fn lose_next_acks(&self, n: u32) {
        self.acks_to_lose.store(n, Ordering::SeqCst);
    }

    /// The next write of `partition` waits `duration` (virtual time) before
    /// it runs, as a transaction stuck on a lock or a slow disk would.
    pub fn stall_next_write_of(&self, partition: i32, duration: Duration) {
        *self.stall.lock().unwrap_or_else(|e| e.into_inner()) = Some((partition, duration));
    }

    /// Outcomes per writer (the node id of each consumer).
    pub fn stats(&self) -> BTreeMap<String, WriterStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, writer: &str, f: impl FnOnce(&mut WriterStats)) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(stats.entry(writer.to_string()).or_default());
    }

    async fn write_with_bug(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let Some(bug) = self.bug.filter(|_| !self.bug_fired.load(Ordering::SeqCst)) else {
            return self.memory.write_batch(write).await;
        };
        let events = write.batch.items.iter().filter(|i| i.is_ok()).count();
        let mut batch = write.batch.clone();
        match bug {
            PlantedBug::DropOneEvent if events >= 1 => {
                let index = batch
                    .items
                    .iter()
                    .position(Result::is_ok)
                    .unwrap_or_default();
                batch.records.remove(index);
                let _dropped = batch.items.remove(index);
            }
            PlantedBug::ReverseOneBatch if events >= 2 => {
                batch.records.reverse();
                batch.items.reverse();
            }
            _ => return self.memory.write_batch(write).await,
        }
        let outcome = self
            .memory
            .write_batch(WriteBatch {
                batch: &batch,
                ..write
            })
            .await;
        if matches!(outcome, Ok(WriteOutcome::Committed(_))) {
            self.bug_fired.store(true, Ordering::SeqCst);
            self.count(write.writer, |s| s.bug_fired += 1);
        }
        outcome
    }
}

#[async_trait]
impl EventStore for ChaosStore {
    async fn stored_offset(&self, key: &OffsetKey) -> Result<Option<i64>, StoreError> {
        self.memory.stored_offset(key).await
    }

    async fn write_batch(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let writer = write.writer;
        let stall = {
            let mut stall = self.stall.lock().unwrap_or_else(|e| e.into_inner());
            match *stall {
                Some((partition, duration)) if partition == write.key.partition => {
                    *stall = None;
                    Some(duration)
                }
                _ => None,
            }
        };
        if let Some(duration) = stall {
            self.count(writer, |s| s.stalled += 1);
            tokio::time::sleep(duration).await;
        }
        let result = self.write_with_bug(write).await;
        match &result {
            Ok(WriteOutcome::Committed(_)) => {
                let lose = self
                    .acks_to_lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if lose {
                    self.count(writer, |s| s.acks_lost += 1);
                    return Err(StoreError::Unavailable(
                        "connection lost after commit".into(),
                    ));
                }
                self.count(writer, |s| s.committed += 1);
            }
            Ok(WriteOutcome::Fenced { .. }) => self.count(writer, |s| s.fenced += 1),
            Err(_) => self.count(writer, |s| s.failed += 1),
        }
        result
    }
}
