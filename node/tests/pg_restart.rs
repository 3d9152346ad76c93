//! PostgreSQL restarted mid-stream: the node recovers by itself and the
//! store is still exact. Restarts the local server, so it lives in its own
//! test binary (cargo runs test binaries one at a time).
//!
//! The restart command defaults to Debian's `pg_ctlcluster 15 main restart`
//! and can be replaced with AUDIT_TEST_PG_RESTART (run through `sh -c`).

mod common;

use std::time::Duration;

use audit_ledger::testing::TestDatabase;
use common::*;

// Timeline: node ingesting → server stops (fast mode: every connection
// dropped) and stays down 12 s → starts again → writes fail, partitions pause and
// retry with backoff → server back → batches retried, partitions resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_a_postgres_restart_mid_stream() {
    let dir = scratch_dir();
    let topic = random_name("orders");
    let group = random_name("group");
    let kafka = MockKafka::start(&topic, 8, &dir).await;
    let db = TestDatabase::create().await.expect("test database");
    let pool = admin_pool(&db).await;
    let state = init_state_dir(&dir);
    let mut node = Proc::spawn(
        "node-1",
        &run_args(&kafka.bootstrap, &topic, &group, &db, "node-1", &state),
        &dir,
    );

    let producer = tokio::spawn({
        let bootstrap = kafka.bootstrap.clone();
        let topic = topic.clone();
        async move {
            // Paced so that ingestion is still running during the restart.
            let mut args = produce_args(&bootstrap, &topic, 30_000, 0.02, 0.01, 5);
            args.extend(["--rate".into(), "3000".into()]);
            let out = tokio::process::Command::new(BIN)
                .args(&args)
                .output()
                .await
                .expect("produce");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let v: serde_json::Value =
                serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            Produced {
                produced: v["produced"].as_u64().unwrap(),
                valid: v["valid"].as_u64().unwrap(),
                invalid: v["invalid"].as_u64().unwrap(),
                duplicates: v["duplicates"].as_u64().unwrap(),
            }
        }
    });
    wait_until("ingestion under way", Duration::from_secs(120), || {
        let pool = pool.clone();
        let group = group.clone();
        async move { stored(&pool, &group).await.offsets > 3_000 }
    })
    .await;

    let started_before: f64 = postmaster_start(&pool).await;
    // Down for longer than the pool's acquire timeout (10 s), so writes fail
    // and the pause/retry path runs, not just a transparent reconnect.
    let restart = std::env::var("AUDIT_TEST_PG_RESTART").unwrap_or_else(|_| {
        "pg_ctlcluster 15 main stop -m fast && sleep 12 && pg_ctlcluster 15 main start".into()
    });
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&restart)
        .status()
        .await
        .expect("run restart");
    assert!(
        status.success(),
        "`{restart}` failed; set AUDIT_TEST_PG_RESTART to a command that restarts the test server"
    );

    let produced = producer.await.expect("producer");
    wait_until(
        "all records stored after the restart",
        Duration::from_secs(240),
        || {
            let pool = pool.clone();
            let group = group.clone();
            async move { stored(&pool, &group).await.offsets == produced.produced as i64 }
        },
    )
    .await;
    assert!(
        postmaster_start(&pool).await > started_before,
        "the server did not restart"
    );
    assert!(
        node.is_running(),
        "the node must recover without a hand restart:\n{}",
        node.log_text()
    );
    assert!(
        node.log_text().contains("store write failed"),
        "the node should have seen the outage (else the test restarted nothing):\n{}",
        node.log_text()
    );
    check_exactly_once(&pool, produced)
        .await
        .expect("exactly once across a PostgreSQL restart");
    pool.close().await;
    db.drop_database().await;
}

async fn postmaster_start(pool: &sqlx::PgPool) -> f64 {
    sqlx::query_scalar("SELECT extract(epoch FROM pg_postmaster_start_time())::float8")
        .fetch_one(pool)
        .await
        .expect("postmaster start time")
}
