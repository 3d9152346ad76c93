//! An in-memory [`EventStore`] with the same semantics as PostgreSQL, for
//! simulations and unit tests. Faults can be injected to exercise retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

use super::{BatchStats, EventStore, OffsetKey, WriteBatch, WriteOutcome};
use crate::batch::{classify, Duplicate, ExistingEvent};
use crate::envelope::{DeadLetter, Event};
use crate::error::StoreError;

#[derive(Debug, Default)]
pub struct MemoryState {
    pub events: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
    pub duplicates: Vec<Duplicate>,
    pub offsets: BTreeMap<OffsetKey, i64>,
    by_id: HashMap<Uuid, usize>,
    /// Writes that will fail with [`StoreError::Unavailable`] before one succeeds.
    pub failing_writes: u32,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the state under the lock.
    pub fn inspect<R>(&self, f: impl FnOnce(&MemoryState) -> R) -> R {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&state)
    }

    /// Changes the state under the lock: for simulations that model a store
    /// bug or a partial write the trait cannot express.
    pub fn update<R>(&self, f: impl FnOnce(&mut MemoryState) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    /// Makes the next `n` writes fail as if the database were down.
    pub fn fail_next_writes(&self, n: u32) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failing_writes = n;
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn stored_offset(&self, key: &OffsetKey) -> Result<Option<i64>, StoreError> {
        Ok(self.inspect(|s| s.offsets.get(key).copied()))
    }

    async fn write_batch(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failing_writes > 0 {
            state.failing_writes -= 1;
            return Err(StoreError::Unavailable("injected fault: store down".into()));
        }
        let stored = state.offsets.get(write.key).copied();
        if stored != write.expected {
            return Ok(WriteOutcome::Fenced { stored });
        }
        let existing: HashMap<Uuid, ExistingEvent> = write
            .batch
            .event_ids()
            .into_iter()
            .filter_map(|id| {
                let index = *state.by_id.get(&id)?;
                Some((
                    id,
                    ExistingEvent {
                        content_hash: state.events[index].content_hash,
                        location: format!("seq {}", index + 1),
                        position: {
                            let e = &state.events[index];
                            (e.kafka_topic.clone(), e.kafka_partition, e.kafka_offset)
                        },
                    },
                ))
            })
            .collect();
        let classified = classify(write.batch, &existing);
        let stats = BatchStats {
            events: classified.events.len() as u64,
            dead_letters: classified.dead_letters.len() as u64,
            duplicates: classified.duplicates.len() as u64,
        };
        for event in classified.events {
            let index = state.events.len();
            state.by_id.insert(event.event_id, index);
            state.events.push(event.clone());
        }
        // A position already accounted for is not stored twice (as PostgreSQL's
        // unique keys and ON CONFLICT DO NOTHING do).
        let mut stats = stats;
        for dead in classified.dead_letters {
            let position = (&dead.kafka_topic, dead.kafka_partition, dead.kafka_offset);
            if state
                .dead_letters
                .iter()
                .any(|d| (&d.kafka_topic, d.kafka_partition, d.kafka_offset) == position)
            {
                stats.dead_letters -= 1;
            } else {
                state.dead_letters.push(dead);
            }
        }
        for dup in classified.duplicates {
            if state.duplicates.contains(&dup) {
                stats.duplicates -= 1;
            } else {
                state.duplicates.push(dup);
            }
        }
        state
            .offsets
            .insert(write.key.clone(), write.batch.next_offset);
        Ok(WriteOutcome::Committed(stats))
    }
}
