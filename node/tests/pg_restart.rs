//! PostgreSQL restarted mid-stream: the node recovers by itself and the
//! store is still exact. The server is a private one (common/private_pg.rs):
//! the shared local server is never stopped, other tests use it meanwhile.

mod common;

use std::time::Duration;

use common::private_pg::PrivatePg;
use common::*;

// Timeline: node ingesting → server stops (fast mode: every connection
// dropped) → writes fail, partitions pause and retry with backoff → the
// node has logged a failed write → server starts again → batches retried,
// partitions resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_a_postgres_restart_mid_stream() {
    let dir = scratch_dir();
    let topic = random_name("orders");
    let group = random_name("group");
    let kafka = MockKafka::start(&topic, 8, &dir).await;
    let pg = PrivatePg::start();
    let db = pg.create_database().await;
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
    // Down until the node has seen it fail a write, so the pause/retry path
    // runs, not just a transparent reconnect.
    pg.stop_server("fast");
    wait_until("a failed write", Duration::from_secs(120), || {
        let seen = node.log_text().contains("store write failed");
        async move { seen }
    })
    .await;
    pg.start_server();

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
    drop(pg);
}

async fn postmaster_start(pool: &sqlx::PgPool) -> f64 {
    sqlx::query_scalar("SELECT extract(epoch FROM pg_postmaster_start_time())::float8")
        .fetch_one(pool)
        .await
        .expect("postmaster start time")
}
