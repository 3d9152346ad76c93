//! The storage conformance suite against both implementations, plus the
//! database-level guarantees of the PostgreSQL store.

use audit_ledger::store::conformance;
use audit_ledger::store::postgres::{PgConfig, WRITER_ROLE};
use audit_ledger::store::{MemoryStore, PgEventStore};
use audit_ledger::testing::TestDatabase;

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(&MemoryStore::new()).await;
}

#[tokio::test]
async fn postgres_store_conforms() {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect");
    conformance::run_all(&store).await;
    store.pool().close().await;
    db.drop_database().await;
}

/// The same suite through group commit (`ledger/tests/group_commit.rs` has
/// the cases only a group meets).
#[tokio::test]
async fn postgres_store_with_group_commit_conforms() {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig {
        group_committers: 2,
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect");
    conformance::run_all(&store).await;
    store.pool().close().await;
    db.drop_database().await;
}

/// UPDATE, DELETE and TRUNCATE are refused by the database, both for the
/// owner (trigger) and for the writer role (privileges and trigger).
#[tokio::test]
async fn events_are_append_only() {
    let db = TestDatabase::create().await.expect("test database");
    let owner = PgEventStore::connect(&PgConfig {
        role: None,
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect as owner");
    let writer = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect as writer");
    conformance::run_all(&writer).await;

    let role: String = sqlx::query_scalar("SELECT current_user")
        .fetch_one(writer.pool())
        .await
        .unwrap();
    assert_eq!(role, WRITER_ROLE);

    for store in [&owner, &writer] {
        for statement in [
            "UPDATE events SET event_type = 'tampered'",
            "DELETE FROM events",
            "TRUNCATE events",
            "DELETE FROM events_default",
            "TRUNCATE events_default",
            "UPDATE dead_letters SET reason = 'x'",
            "DELETE FROM duplicates",
            "DELETE FROM event_ids",
            "UPDATE event_ids SET content_hash = '\\x00'",
        ] {
            let result = sqlx::query(statement).execute(store.pool()).await;
            let error = result.expect_err(statement).to_string();
            assert!(
                error.contains("append-only") || error.contains("permission denied"),
                "{statement}: unexpected error {error}"
            );
        }
    }
    // Even an empty DELETE is refused (statement-level trigger).
    let error = sqlx::query("DELETE FROM events WHERE false")
        .execute(owner.pool())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("append-only"), "{error}");

    // The writer may create partitions only through the definer function.
    let error = sqlx::query("CREATE TABLE events_2099_01 PARTITION OF events FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')")
        .execute(writer.pool())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("permission denied")
            || error.to_string().contains("must be owner"),
        "{error}"
    );
    writer
        .ensure_partitions(2)
        .await
        .expect("writer may run partition maintenance");

    owner.pool().close().await;
    writer.pool().close().await;
    db.drop_database().await;
}

fn key(group: &str) -> audit_ledger::OffsetKey {
    audit_ledger::OffsetKey {
        group_id: group.into(),
        topic: "orders".into(),
        partition: 0,
    }
}

fn batch_of(values: &[String]) -> audit_ledger::PreparedBatch {
    let records = values
        .iter()
        .enumerate()
        .map(|(i, v)| conformance::record("orders", 0, i as i64, v.as_bytes()))
        .collect();
    audit_ledger::PreparedBatch::parse(records, &audit_ledger::ParseOptions::default()).unwrap()
}

/// A record that passes validation but that the database refuses becomes a
/// dead letter; the rest of its batch is stored and the partition goes on.
#[tokio::test]
async fn a_row_the_database_refuses_becomes_a_dead_letter() {
    use audit_ledger::WriteOutcome;
    let db = TestDatabase::create().await.expect("test database");
    audit_ledger::testing::plant_poison_rule(&db.url)
        .await
        .expect("plant a rule");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .unwrap();
    let values = vec![
        conformance::envelope("00000000-0000-4000-8000-000000000001", "order-1", 1).to_string(),
        conformance::envelope("00000000-0000-4000-8000-000000000002", "poison", 2).to_string(),
        conformance::envelope("00000000-0000-4000-8000-000000000003", "order-3", 3).to_string(),
    ];
    let batch = batch_of(&values);
    let outcome = conformance::write(&store, &key("g"), None, &batch).await;
    assert_eq!(
        outcome,
        WriteOutcome::Committed(audit_ledger::BatchStats {
            events: 2,
            dead_letters: 1,
            duplicates: 0
        })
    );
    let (code, reason, raw): (String, String, Vec<u8>) =
        sqlx::query_as("SELECT reason_code, reason, raw_value FROM dead_letters")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(code, "rejected_by_database");
    assert!(reason.contains("planted"), "{reason}");
    assert_eq!(raw, values[1].as_bytes());
    store.pool().close().await;
    db.drop_database().await;
}

/// A second consumer group re-reading the same positions converges: nothing
/// is stored or counted twice, and it does not loop on unique keys.
#[tokio::test]
async fn a_second_group_rereading_the_topic_converges() {
    use audit_ledger::WriteOutcome;
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .unwrap();
    let a = conformance::envelope("00000000-0000-4000-8000-00000000000a", "order-1", 1).to_string();
    let values = vec![a.clone(), "{bad".to_string(), a];
    let batch = batch_of(&values);
    let first = conformance::write(&store, &key("g1"), None, &batch).await;
    assert_eq!(
        first,
        WriteOutcome::Committed(audit_ledger::BatchStats {
            events: 1,
            dead_letters: 1,
            duplicates: 1
        })
    );
    let second = conformance::write(&store, &key("g2"), None, &batch).await;
    assert_eq!(
        second,
        WriteOutcome::Committed(audit_ledger::BatchStats {
            events: 0,
            dead_letters: 0,
            duplicates: 0
        })
    );
    let counts = conformance::Inspect::counts(&store).await.unwrap();
    assert_eq!(
        (counts.events, counts.dead_letters, counts.duplicates),
        (1, 1, 1)
    );
    store.pool().close().await;
    db.drop_database().await;
}

/// A pretty-printed envelope (newlines, tabs and escapes inside the payload
/// text) is stored intact: the COPY encoding escapes the raw JSON text.
#[tokio::test]
async fn pretty_printed_payloads_are_stored_intact() {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .unwrap();
    let mut envelope = conformance::envelope("00000000-0000-4000-8000-0000000000b1", "order-1", 1);
    envelope["payload"]["note"] =
        serde_json::json!("tab\there, newline\nthere, backslash \\ and \"quotes\"");
    let pretty = serde_json::to_string_pretty(&envelope)
        .unwrap()
        .replace("  ", "\t");
    let batch = batch_of(&[pretty]);
    conformance::write(&store, &key("g"), None, &batch).await;
    let stored: serde_json::Value = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, envelope["payload"]);
    store.pool().close().await;
    db.drop_database().await;
}

/// One id on two partitions with different content and different
/// occurred_at (which the partitioned table's unique key cannot see): the
/// second is a conflict, and concurrent writers cannot both store it.
#[tokio::test]
async fn an_event_id_is_unique_across_partitions() {
    use audit_ledger::{EventStore, WriteBatch, WriteOutcome};
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .unwrap();
    let id = "00000000-0000-4000-8000-0000000000c1";
    let mut first = conformance::envelope(id, "order-1", 1);
    first["occurred_at"] = serde_json::json!("2026-01-15T10:00:00Z");
    let mut second = conformance::envelope(id, "order-1", 2);
    second["occurred_at"] = serde_json::json!("2026-11-15T10:00:00Z");
    let batch = |partition: i32, value: &serde_json::Value| {
        audit_ledger::PreparedBatch::parse(
            vec![conformance::record(
                "orders",
                partition,
                0,
                value.to_string().as_bytes(),
            )],
            &audit_ledger::ParseOptions::default(),
        )
        .unwrap()
    };
    let (a, b) = (batch(0, &first), batch(1, &second));
    let key_a = audit_ledger::OffsetKey {
        group_id: "g".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let key_b = audit_ledger::OffsetKey {
        partition: 1,
        ..key_a.clone()
    };
    // Both at once: one stores the event, the other gets the conflict.
    let (ra, rb) = tokio::join!(
        store.write_batch(WriteBatch {
            key: &key_a,
            expected: None,
            batch: &a,
            writer: "a"
        }),
        store.write_batch(WriteBatch {
            key: &key_b,
            expected: None,
            batch: &b,
            writer: "b"
        }),
    );
    let stats = |r: Result<WriteOutcome, audit_ledger::StoreError>| match r.expect("write") {
        WriteOutcome::Committed(s) => (s.events, s.dead_letters),
        other => panic!("{other:?}"),
    };
    let (sa, sb) = (stats(ra), stats(rb));
    assert_eq!(sa.0 + sb.0, 1, "exactly one event stored: {sa:?} {sb:?}");
    assert_eq!(sa.1 + sb.1, 1, "exactly one conflict: {sa:?} {sb:?}");
    let (events, reason): (i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE event_id = $1::uuid), (SELECT reason_code FROM dead_letters)",
    )
    .bind(id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((events, reason.as_str()), (1, "event_id_conflict"));
    store.pool().close().await;
    db.drop_database().await;
}
