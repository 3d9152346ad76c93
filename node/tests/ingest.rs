//! End-to-end ingestion through real processes: the mock Kafka cluster
//! (real Kafka protocol), `audit-node run`, `audit-node produce`, and a real
//! PostgreSQL database per test.

mod common;

use std::time::Duration;

use audit_ledger::testing::TestDatabase;
use common::*;

/// 100k records over 16 partitions, with malformed records and producer
/// retries mixed in, are stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_100k_records_exactly_once() {
    let h = Harness::start(16).await;
    let pool = h.pool.clone();

    let _node = h.node("node-1");
    let produced = h.produce(100_000, 0.02, 0.01, 7).await;
    h.wait_all_stored(produced, Duration::from_secs(240)).await;
    check_exactly_once(&pool, produced)
        .await
        .expect("exactly once");
    h.assert_verifies().await;
    h.finish().await;
}

/// Malformed records become dead letters with the reason a producer team
/// needs, and keep their raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_become_dead_letters_with_reasons() {
    let h = Harness::start(4).await;
    let pool = h.pool.clone();

    let _node = h.node("node-1");
    let produced = h.produce(3_000, 0.3, 0.05, 11).await;
    h.wait_all_stored(produced, Duration::from_secs(120)).await;
    check_exactly_once(&pool, produced)
        .await
        .expect("exactly once");

    let reasons: Vec<(String, i64)> =
        sqlx::query_as("SELECT reason_code, count(*) FROM dead_letters GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let codes: Vec<&str> = reasons.iter().map(|(c, _)| c.as_str()).collect();
    for expected in [
        "event_id_conflict",
        "invalid_field",
        "invalid_utf8",
        "missing_field",
        "not_json",
        "unknown_field",
    ] {
        assert!(
            codes.contains(&expected),
            "no dead letter with reason {expected}: {reasons:?}"
        );
    }
    let (no_raw, no_reason): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE raw_value IS NULL), count(*) FILTER (WHERE length(reason) < 10) FROM dead_letters",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (no_raw, no_reason),
        (0, 0),
        "every dead letter keeps its bytes and a clear reason"
    );
    let conflict: String = sqlx::query_scalar(
        "SELECT reason FROM dead_letters WHERE reason_code = 'event_id_conflict' LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        conflict.contains("already stored") && conflict.contains("different content"),
        "{conflict}"
    );
    h.finish().await;
}

/// `kill -9` of the node mid-stream, twice, then a restart: every record
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_kill_9_mid_stream() {
    let h = Harness::start(16).await;
    let (pool, group) = (h.pool.clone(), h.group.clone());
    let producer = tokio::spawn({
        let bootstrap = h.kafka.bootstrap.clone();
        let topic = h.topic.clone();
        async move { produce(&bootstrap, &topic, 60_000, 0.02, 0.01, 21).await }
    });
    for round in 0..2 {
        let mut node = h.node(&format!("node-1-{round}"));
        // Kill once this incarnation has stored something new.
        let before = stored(&pool, &group).await.offsets;
        wait_until("progress before the kill", Duration::from_secs(120), || {
            let pool = pool.clone();
            let group = group.clone();
            async move { stored(&pool, &group).await.offsets > before + 2_000 }
        })
        .await;
        node.kill9();
    }
    let _node = h.node("node-1-final");
    let produced = producer.await.expect("producer task");
    h.wait_all_stored(produced, Duration::from_secs(240)).await;
    check_exactly_once(&pool, produced)
        .await
        .expect("exactly once after kill -9");
    h.assert_verifies().await;
    h.finish().await;
}

/// Two nodes share the group; one is killed mid-stream and the other takes
/// over its partitions: totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_takes_over_a_killed_nodes_partitions() {
    let h = Harness::start(16).await;
    let pool = h.pool.clone();

    let mut node1 = h.node("node-1");
    let _node2 = h.node("node-2");
    let producer = tokio::spawn({
        let bootstrap = h.kafka.bootstrap.clone();
        let topic = h.topic.clone();
        async move { produce(&bootstrap, &topic, 60_000, 0.02, 0.01, 33).await }
    });
    // Both nodes write before one dies.
    wait_until("both nodes writing", Duration::from_secs(120), || {
        let pool = pool.clone();
        async move {
            let writers: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT updated_by) FROM consumer_offsets WHERE next_offset > 0",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            writers >= 2
        }
    })
    .await;
    node1.kill9();
    let produced = producer.await.expect("producer task");
    h.wait_all_stored(produced, Duration::from_secs(240)).await;
    check_exactly_once(&pool, produced)
        .await
        .expect("exactly once after a member died");
    h.assert_verifies().await;
    h.finish().await;
}

/// The exactly-once checker is not vacuous: planted bugs (an offset stored
/// twice, a hole, a lost event) make it fail.
#[tokio::test]
async fn exactly_once_checker_catches_planted_bugs() {
    let db = TestDatabase::create().await.expect("test database");
    let pool = admin_pool(&db).await;
    let insert_event = |offset: i64, id: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO events (event_id, event_type, stream_id, occurred_at, payload, content_hash,
                 kafka_topic, kafka_partition, kafka_offset) VALUES ($1::uuid, 't', 's', now(), '{}', '\\x00', 'orders', 0, $2)",
            )
            .bind(id)
            .bind(offset)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let one = Produced {
        produced: 2,
        valid: 2,
        invalid: 0,
        duplicates: 0,
    };
    insert_event(0, "00000000-0000-4000-8000-000000000001").await;
    insert_event(1, "00000000-0000-4000-8000-000000000002").await;
    check_exactly_once(&pool, one)
        .await
        .expect("a correct store passes");

    // A lost event: fewer events than produced.
    let three = Produced {
        produced: 3,
        valid: 3,
        invalid: 0,
        duplicates: 0,
    };
    assert!(
        check_exactly_once(&pool, three).await.is_err(),
        "a lost event must be caught"
    );

    // A hole: offset 3 stored, offset 2 missing.
    insert_event(3, "00000000-0000-4000-8000-000000000004").await;
    let err = check_exactly_once(&pool, three).await.unwrap_err();
    assert!(err.contains("missing"), "{err}");

    // An offset stored twice (as an event and as a dead letter).
    sqlx::query("INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, raw_value, reason_code, reason) VALUES ('orders', 0, 1, 'x', 'not_json', 'planted')")
        .execute(&pool)
        .await
        .unwrap();
    let err = check_exactly_once(&pool, three).await.unwrap_err();
    assert!(err.contains("more than once"), "{err}");
    pool.close().await;
    db.drop_database().await;
}

/// A topic deleted and recreated (here: a new cluster with the same topic)
/// restarts its offsets at 0 while the store remembers more: the node must
/// refuse loudly instead of skipping the new records as "already stored".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_log_shorter_than_the_stored_offsets() {
    let dir = scratch_dir();
    let topic = random_name("orders");
    let group = random_name("group");
    let db = TestDatabase::create().await.expect("test database");
    let pool = admin_pool(&db).await;
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "[restart]\nmax_restarts = 1\nbase_backoff_ms = 50\n",
    )
    .unwrap();
    let state = init_state_dir(&dir);
    let mut args = run_args("", &topic, &group, &db, "node-1", &state);
    args.extend(["--config".to_string(), config.display().to_string()]);

    let first = MockKafka::start(&topic, 2, &dir).await;
    args[2] = first.bootstrap.clone();
    let mut node = Proc::spawn("node-first", &args, &dir);
    let produced = produce(&first.bootstrap, &topic, 500, 0.0, 0.0, 1).await;
    wait_all_stored(&pool, &group, produced, Duration::from_secs(120)).await;
    assert!(node.terminate().success());
    drop(first);

    let second = MockKafka::start(&topic, 2, &scratch_dir()).await;
    args[2] = second.bootstrap.clone();
    produce(&second.bootstrap, &topic, 100, 0.0, 0.0, 2).await;
    let mut node = Proc::spawn("node-second", &args, &dir);
    wait_until("the node to give up", Duration::from_secs(120), || {
        let running = node.is_running();
        async move { !running }
    })
    .await;
    let log = node.log_text();
    assert!(log.contains("beyond the end of the Kafka log"), "{log}");
    assert_eq!(
        stored(&pool, &group).await.events,
        500,
        "nothing of the new log was skipped or stored"
    );
    pool.close().await;
    db.drop_database().await;
}
