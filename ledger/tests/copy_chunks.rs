//! A batch whose COPY data spans several chunks is stored whole and chains
//! verify.

use audit_ledger::record::{Header, RawRecord};
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::PgEventStore;
use audit_ledger::testing::TestDatabase;
use audit_ledger::verify::{verify, VerifyOptions};
use audit_ledger::{EventStore, OffsetKey, ParseOptions, PreparedBatch, WriteBatch, WriteOutcome};

#[tokio::test]
async fn a_batch_larger_than_a_copy_chunk_is_stored_whole() {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect");
    const EVENTS: i64 = 700;
    // About 1.5 KB per row: some 1 MB of COPY data, several chunks.
    let note = "x".repeat(1_000);
    let records: Vec<RawRecord> = (0..EVENTS)
        .map(|offset| {
            let value = serde_json::json!({
                "event_id": uuid::Uuid::new_v4().to_string(),
                "event_type": "order.created",
                "stream_id": format!("order-{offset}"),
                "occurred_at": "2026-11-27T10:00:00.123Z",
                "payload": {"note": note, "offset": offset},
            });
            RawRecord {
                topic: "orders".into(),
                partition: 0,
                offset,
                key: None,
                value: Some(value.to_string().into_bytes()),
                headers: vec![Header {
                    key: "traceparent".into(),
                    value: Some(b"00-abc-def-01".to_vec()),
                }],
                timestamp_ms: None,
            }
        })
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch");
    let key = OffsetKey {
        group_id: "group".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let outcome = store
        .write_batch(WriteBatch {
            key: &key,
            expected: None,
            batch: &batch,
            writer: "test",
        })
        .await
        .expect("write");
    assert!(
        matches!(outcome, WriteOutcome::Committed(stats) if stats.events == EVENTS as u64),
        "{outcome:?}"
    );
    let (count, offsets): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (payload->>'offset')::int) FROM events
         WHERE payload->>'note' = $1",
    )
    .bind(&note)
    .fetch_one(store.pool())
    .await
    .expect("count");
    assert_eq!((count, offsets), (EVENTS, EVENTS));

    let signing = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let report = verify(
        store.pool(),
        &VerifyOptions {
            public_key: signing.verifying_key(),
            external: Vec::new(),
            max_problems: 10,
            workers: 1,
        },
    )
    .await
    .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.chains["orders/0"].length, EVENTS as u64);
    store.pool().close().await;
    db.drop_database().await;
}
