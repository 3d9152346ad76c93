//! The storage conformance suite: every [`EventStore`] must pass it, the
//! PostgreSQL one and the simulated one alike, so simulations prove things
//! about the real semantics. Test support: failures panic with a message.

use async_trait::async_trait;
use serde_json::json;

use super::{BatchStats, EventStore, OffsetKey, WriteBatch, WriteOutcome};
use crate::batch::PreparedBatch;
use crate::envelope::ParseOptions;
use crate::error::StoreError;
use crate::record::{Header, RawRecord};

/// Row counts of the store's three destinations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: u64,
    pub dead_letters: u64,
    pub duplicates: u64,
}

/// Read access the suite needs beyond the write interface.
#[async_trait]
pub trait Inspect {
    async fn counts(&self) -> Result<Counts, StoreError>;
}

#[async_trait]
impl Inspect for super::MemoryStore {
    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(self.inspect(|s| Counts {
            events: s.events.len() as u64,
            dead_letters: s.dead_letters.len() as u64,
            duplicates: s.duplicates.len() as u64,
        }))
    }
}

#[async_trait]
impl Inspect for super::PgEventStore {
    async fn counts(&self) -> Result<Counts, StoreError> {
        let (events, dead_letters, duplicates): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM duplicates)",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Counts {
            events: events as u64,
            dead_letters: dead_letters as u64,
            duplicates: duplicates as u64,
        })
    }
}

/// A valid native envelope for stream `stream` with the given id.
pub fn envelope(event_id: &str, stream: &str, amount: i64) -> serde_json::Value {
    json!({
        "event_id": event_id,
        "event_type": "order.created",
        "stream_id": stream,
        "stream_version": 1,
        "occurred_at": "2026-11-27T10:00:00.123Z",
        "subject_id": "customer-1",
        "payload": { "amount_cents": amount, "customer": { "email": "a@example.com" } },
    })
}

/// A record at `offset` carrying `value`.
pub fn record(topic: &str, partition: i32, offset: i64, value: &[u8]) -> RawRecord {
    RawRecord {
        topic: topic.to_string(),
        partition,
        offset,
        key: Some(b"order-1".to_vec()),
        value: Some(value.to_vec()),
        headers: vec![Header {
            key: "traceparent".into(),
            value: Some(b"00-abc-def-01".to_vec()),
        }],
        timestamp_ms: None,
    }
}

fn batch(records: Vec<RawRecord>) -> PreparedBatch {
    PreparedBatch::parse(records, &ParseOptions::default()).expect("non-empty batch")
}

/// Writes one batch, panicking on a store error (test support).
pub async fn write<S: EventStore>(
    store: &S,
    key: &OffsetKey,
    expected: Option<i64>,
    batch: &PreparedBatch,
) -> WriteOutcome {
    store
        .write_batch(WriteBatch {
            key,
            expected,
            batch,
            writer: "conformance",
        })
        .await
        .expect("write succeeds")
}

const ID_A: &str = "0b8f5a52-7c1e-4d7a-9d60-5a8b0c3e2f01";
const ID_B: &str = "0b8f5a52-7c1e-4d7a-9d60-5a8b0c3e2f02";

/// Runs every check against a fresh, empty store.
pub async fn run_all<S: EventStore + Inspect>(store: &S) {
    let topic = "conformance";
    let key = OffsetKey {
        group_id: "group-1".into(),
        topic: topic.into(),
        partition: 0,
    };
    assert_eq!(
        store.stored_offset(&key).await.expect("read offset"),
        None,
        "fresh store has no offset"
    );

    // A first batch: two events and one malformed record.
    let a = envelope(ID_A, "order-1", 100).to_string();
    let b = envelope(ID_B, "order-2", 200).to_string();
    let first = batch(vec![
        record(topic, 0, 0, a.as_bytes()),
        record(topic, 0, 1, b"{not json"),
        record(topic, 0, 2, b.as_bytes()),
    ]);
    assert_eq!(
        write(store, &key, None, &first).await,
        WriteOutcome::Committed(BatchStats {
            events: 2,
            dead_letters: 1,
            duplicates: 0
        })
    );
    assert_eq!(
        store.stored_offset(&key).await.expect("read offset"),
        Some(3)
    );

    // A writer with a stale view is fenced and writes nothing.
    let stale = batch(vec![record(topic, 0, 0, a.as_bytes())]);
    assert_eq!(
        write(store, &key, None, &stale).await,
        WriteOutcome::Fenced { stored: Some(3) }
    );
    assert_eq!(
        write(store, &key, Some(1), &stale).await,
        WriteOutcome::Fenced { stored: Some(3) }
    );

    // A producer retry is a counted duplicate; a reused id with different
    // content is a dead letter; both in a later batch and within one batch.
    let conflicting = envelope(ID_A, "order-1", 999).to_string();
    let second = batch(vec![
        record(topic, 0, 3, a.as_bytes()),
        record(topic, 0, 4, conflicting.as_bytes()),
    ]);
    assert_eq!(
        write(store, &key, Some(3), &second).await,
        WriteOutcome::Committed(BatchStats {
            events: 0,
            dead_letters: 1,
            duplicates: 1
        })
    );
    let id_c = "0b8f5a52-7c1e-4d7a-9d60-5a8b0c3e2f03";
    let c = envelope(id_c, "order-3", 300).to_string();
    let c_conflict = envelope(id_c, "order-3", 301).to_string();
    let third = batch(vec![
        record(topic, 0, 5, c.as_bytes()),
        record(topic, 0, 6, c.as_bytes()),
        record(topic, 0, 7, c_conflict.as_bytes()),
    ]);
    assert_eq!(
        write(store, &key, Some(5), &third).await,
        WriteOutcome::Committed(BatchStats {
            events: 1,
            dead_letters: 1,
            duplicates: 1
        })
    );

    // Offsets are per group: another group starts from nothing.
    let other_group = OffsetKey {
        group_id: "group-2".into(),
        ..key.clone()
    };
    assert_eq!(
        store
            .stored_offset(&other_group)
            .await
            .expect("read offset"),
        None
    );

    // Every offset 0..8 is accounted for exactly once.
    let counts = store.counts().await.expect("counts");
    assert_eq!(
        counts,
        Counts {
            events: 3,
            dead_letters: 3,
            duplicates: 2
        }
    );
    assert_eq!(counts.events + counts.dead_letters + counts.duplicates, 8);
}
