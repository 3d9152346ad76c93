//! Turning a batch of parsed records into what gets written: new events,
//! dead letters, and counted duplicates. Pure, so every store shares it.

use std::collections::HashMap;

use uuid::Uuid;

use crate::envelope::{self, DeadLetter, DeadLetterReason, Event, ParseOptions};
use crate::record::RawRecord;
use crate::recycle::{VecPool, KEEP_PER_BATCH, MAX_KEPT_ROWS};

static RECORDS: VecPool<RawRecord> = VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS);
static ITEMS: VecPool<Result<Event, DeadLetter>> = VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS);

/// An empty vector for a source to read a batch's records into: reused
/// from an earlier batch when one is free (see `recycle`).
pub fn record_buffer(capacity: usize) -> Vec<RawRecord> {
    RECORDS.take(capacity)
}

/// A batch of consecutive records of one partition, parsed.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    /// The raw records, kept so a late rejection (an `event_id` conflict
    /// found against the store) still keeps the original bytes.
    pub records: Vec<RawRecord>,
    pub items: Vec<Result<Event, DeadLetter>>,
    /// The offset after the last record: what the partition resumes from.
    pub next_offset: i64,
}

impl PreparedBatch {
    /// Parses records that must be consecutive offsets of one partition.
    #[allow(clippy::result_large_err)] // see envelope::parse
    pub fn parse(records: Vec<RawRecord>, options: &ParseOptions) -> Option<Self> {
        let next_offset = records.last()?.offset + 1;
        let mut items = ITEMS.take(records.len());
        items.extend(records.iter().map(|r| envelope::parse(r, options)));
        Some(Self {
            items,
            records,
            next_offset,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn event_ids(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self
            .items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(|e| e.event_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl Drop for PreparedBatch {
    fn drop(&mut self) {
        RECORDS.give(std::mem::take(&mut self.records));
        ITEMS.give(std::mem::take(&mut self.items));
    }
}

/// An event already in the store, as far as deduplication cares.
#[derive(Debug, Clone)]
pub struct ExistingEvent {
    pub content_hash: [u8; 32],
    /// Where it is, for the dead letter's message ("seq 42").
    pub location: String,
    /// Its Kafka position: the same position read again (by another
    /// consumer group) is already accounted for, not a duplicate.
    pub position: (String, i32, i64),
}

/// A second delivery of an event that is already stored: counted, not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub event_id: Uuid,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// What to write for one batch. Events are borrowed from the batch, which
/// stays intact for a retry.
#[derive(Debug, Default)]
pub struct Classified<'a> {
    pub events: Vec<&'a Event>,
    pub dead_letters: Vec<DeadLetter>,
    pub duplicates: Vec<Duplicate>,
}

/// Splits a batch, given the events already stored with the same ids.
///
/// Same `event_id` and same content is a producer retry (a duplicate); same
/// `event_id` and different content is a conflict (a dead letter). Events
/// earlier in the same batch count as stored.
pub fn classify<'a>(
    batch: &'a PreparedBatch,
    existing: &HashMap<Uuid, ExistingEvent>,
) -> Classified<'a> {
    let mut out = Classified::default();
    let mut in_batch: HashMap<Uuid, ([u8; 32], i64)> = HashMap::with_capacity(batch.len());
    for (record, item) in batch.records.iter().zip(&batch.items) {
        let event = match item {
            Ok(event) => event,
            Err(dead) => {
                out.dead_letters.push(dead.clone());
                continue;
            }
        };
        let stored = existing.get(&event.event_id);
        if stored.is_some_and(|e| {
            e.position
                == (
                    event.kafka_topic.clone(),
                    event.kafka_partition,
                    event.kafka_offset,
                )
        }) {
            continue;
        }
        let seen = stored
            .map(|e| (e.content_hash, e.location.clone()))
            .or_else(|| {
                in_batch.get(&event.event_id).map(|(hash, offset)| {
                    (
                        *hash,
                        format!(
                            "at {} partition {} offset {offset}",
                            event.kafka_topic, event.kafka_partition
                        ),
                    )
                })
            });
        match seen {
            Some((hash, _)) if hash == event.content_hash => out.duplicates.push(Duplicate {
                event_id: event.event_id,
                kafka_topic: event.kafka_topic.clone(),
                kafka_partition: event.kafka_partition,
                kafka_offset: event.kafka_offset,
            }),
            Some((_, location)) => out.dead_letters.push(DeadLetter::from_record(
                record,
                Some(event.event_id),
                DeadLetterReason::EventIdConflict {
                    event_id: event.event_id,
                    existing: location,
                },
            )),
            None => {
                in_batch.insert(event.event_id, (event.content_hash, event.kafka_offset));
                out.events.push(event);
            }
        }
    }
    out
}
