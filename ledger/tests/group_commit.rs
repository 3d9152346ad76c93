//! Group commit: batches of several partitions written at once share one
//! transaction, and what a group cannot decide alone (a taken id, a row the
//! database refuses) still ends exactly as a batch written alone would.
//!
//! The tests run on tokio's current-thread runtime: every writer queues its
//! batch before the one committer runs, so one group holds them all,
//! whatever the machine's speed.

use audit_ledger::store::conformance::{self, Inspect};
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::PgEventStore;
use audit_ledger::testing::TestDatabase;
use audit_ledger::{
    BatchStats, EventStore, OffsetKey, ParseOptions, PreparedBatch, WriteBatch, WriteOutcome,
};

const TOPIC: &str = "orders";

fn key(partition: i32) -> OffsetKey {
    OffsetKey {
        group_id: "g".into(),
        topic: TOPIC.into(),
        partition,
    }
}

fn id(partition: i32, n: i64) -> String {
    format!("00000000-0000-4000-8000-{:06}{:06}", partition, n)
}

/// `n` events on `partition` from `offset` on, with ids unique per position
/// unless `ids` names them.
fn batch(partition: i32, offset: i64, ids: &[String]) -> PreparedBatch {
    let records = ids
        .iter()
        .enumerate()
        .map(|(i, event_id)| {
            let stream = if event_id.ends_with("poison") {
                "poison".to_string()
            } else {
                format!("order-{partition}-{i}")
            };
            let value =
                conformance::envelope(event_id.trim_end_matches("poison"), &stream, 10).to_string();
            conformance::record(TOPIC, partition, offset + i as i64, value.as_bytes())
        })
        .collect();
    PreparedBatch::parse(records, &ParseOptions::default()).expect("batch")
}

fn ids(partition: i32, offset: i64, n: i64) -> Vec<String> {
    (offset..offset + n).map(|k| id(partition, k)).collect()
}

async fn grouped_store(db: &TestDatabase) -> PgEventStore {
    PgEventStore::connect(&PgConfig {
        group_committers: 1,
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect")
}

/// Writes all batches at once (key, expected offset, batch); panics on a
/// store error.
async fn write_all(
    store: &PgEventStore,
    batches: &[(OffsetKey, Option<i64>, PreparedBatch)],
) -> Vec<WriteOutcome> {
    futures::future::join_all(batches.iter().map(|(key, expected, batch)| {
        store.write_batch(WriteBatch {
            key,
            expected: *expected,
            batch,
            writer: "test",
        })
    }))
    .await
    .into_iter()
    .map(|outcome| outcome.expect("write"))
    .collect()
}

fn committed(events: u64, dead_letters: u64, duplicates: u64) -> WriteOutcome {
    WriteOutcome::Committed(BatchStats {
        events,
        dead_letters,
        duplicates,
    })
}

/// Distinct transactions that last moved the partitions' offsets (`now()`
/// is the transaction's start).
async fn transactions(store: &PgEventStore) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT updated_at) FROM consumer_offsets")
        .fetch_one(store.pool())
        .await
        .expect("count transactions")
}

#[tokio::test]
async fn batches_of_several_partitions_commit_in_one_transaction() {
    let db = TestDatabase::create().await.expect("test database");
    let store = grouped_store(&db).await;
    let batches: Vec<_> = (0..6)
        .map(|p| (key(p), None, batch(p, 0, &ids(p, 0, 3))))
        .collect();
    for outcome in write_all(&store, &batches).await {
        assert_eq!(outcome, committed(3, 0, 0));
    }
    assert_eq!(transactions(&store).await, 1);
    for p in 0..6 {
        assert_eq!(store.stored_offset(&key(p)).await.unwrap(), Some(3));
    }
    let (events, chains, chained): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM chains WHERE length = 3),
                (SELECT count(DISTINCT (chain_id, chain_position)) FROM events)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((events, chains, chained), (18, 6, 18));

    // The next batches of the same partitions continue their chains.
    let next: Vec<_> = (0..6)
        .map(|p| (key(p), Some(3), batch(p, 3, &ids(p, 3, 2))))
        .collect();
    for outcome in write_all(&store, &next).await {
        assert_eq!(outcome, committed(2, 0, 0));
    }
    let lengths: Vec<i64> = sqlx::query_scalar("SELECT length FROM chains ORDER BY chain_id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(lengths, vec![5; 6]);
    store.pool().close().await;
    db.drop_database().await;
}

/// In one group: a batch holding an id another partition already stored
/// (handed back, then a counted duplicate) and a fenced batch; the others
/// commit together.
#[tokio::test]
async fn a_group_hands_back_taken_ids_and_answers_fenced_batches() {
    let db = TestDatabase::create().await.expect("test database");
    let store = grouped_store(&db).await;
    // Partition 9 stores one event first.
    let stored = batch(9, 0, &[id(9, 0)]);
    assert_eq!(
        conformance::write(&store, &key(9), None, &stored).await,
        committed(1, 0, 0)
    );
    // Partition 1 re-sends it (same content: a producer retry) after
    // events of its own. Partition 2's writer believes offset 7 is stored.
    let mut retry_ids = ids(1, 0, 2);
    retry_ids.push(id(9, 0));
    let retry = {
        // Same stream as the stored event: identical content.
        let mut records: Vec<_> = batch(1, 0, &retry_ids).records.clone();
        let value = conformance::envelope(&id(9, 0), "order-9-0", 10).to_string();
        records[2] = conformance::record(TOPIC, 1, 2, value.as_bytes());
        PreparedBatch::parse(records, &ParseOptions::default()).unwrap()
    };
    let batches = vec![
        (key(0), None, batch(0, 0, &ids(0, 0, 2))),
        (key(1), None, retry),
        (key(2), Some(7), batch(2, 0, &ids(2, 0, 2))),
        (key(3), None, batch(3, 0, &ids(3, 0, 2))),
        (key(4), None, batch(4, 0, &ids(4, 0, 2))),
    ];
    let outcomes = write_all(&store, &batches).await;
    assert_eq!(
        outcomes,
        vec![
            committed(2, 0, 0),
            committed(2, 0, 1),
            WriteOutcome::Fenced { stored: None },
            committed(2, 0, 0),
            committed(2, 0, 0),
        ]
    );
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.events, counts.duplicates), (1 + 2 + 2 + 2 + 2, 1));
    assert_eq!(store.stored_offset(&key(1)).await.unwrap(), Some(3));
    assert_eq!(store.stored_offset(&key(2)).await.unwrap(), None);
    // Partitions 0, 3 and 4 committed together; 1 was handed back and
    // written alone.
    let together: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT updated_at) FROM consumer_offsets WHERE partition IN (0, 3, 4)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(together, 1);
    assert_eq!(transactions(&store).await, 3);
    store.pool().close().await;
    db.drop_database().await;
}

/// A row the database refuses fails the group's COPY: every batch of the
/// group is written alone, and only that row becomes a dead letter.
#[tokio::test]
async fn a_refused_row_sends_its_group_down_the_single_batch_path() {
    let db = TestDatabase::create().await.expect("test database");
    audit_ledger::testing::plant_poison_rule(&db.url)
        .await
        .expect("plant a rule");
    let store = grouped_store(&db).await;
    let mut poisoned = ids(2, 0, 3);
    poisoned[1].push_str("poison");
    let batches: Vec<_> = (0..4)
        .map(|p| {
            let ids = if p == 2 {
                poisoned.clone()
            } else {
                ids(p, 0, 3)
            };
            (key(p), None, batch(p, 0, &ids))
        })
        .collect();
    let outcomes = write_all(&store, &batches).await;
    assert_eq!(
        outcomes,
        vec![
            committed(3, 0, 0),
            committed(3, 0, 0),
            committed(2, 1, 0),
            committed(3, 0, 0)
        ]
    );
    let reason: String = sqlx::query_scalar("SELECT reason_code FROM dead_letters")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(reason, "rejected_by_database");
    store.pool().close().await;
    db.drop_database().await;
}
