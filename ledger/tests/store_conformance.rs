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
    let store = PgEventStore::connect(&PgConfig::new(&db.url)).await.expect("connect");
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
    let writer = PgEventStore::connect(&PgConfig::new(&db.url)).await.expect("connect as writer");
    conformance::run_all(&writer).await;

    let role: String = sqlx::query_scalar("SELECT current_user").fetch_one(writer.pool()).await.unwrap();
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
    let error = sqlx::query("DELETE FROM events WHERE false").execute(owner.pool()).await.unwrap_err();
    assert!(error.to_string().contains("append-only"), "{error}");

    // The writer may create partitions only through the definer function.
    let error = sqlx::query("CREATE TABLE events_2099_01 PARTITION OF events FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')")
        .execute(writer.pool())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("permission denied") || error.to_string().contains("must be owner"), "{error}");
    writer.ensure_partitions(2).await.expect("writer may run partition maintenance");

    owner.pool().close().await;
    writer.pool().close().await;
    db.drop_database().await;
}
