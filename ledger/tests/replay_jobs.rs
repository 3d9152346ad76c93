//! Replay jobs against the real PostgreSQL, as the API's role: idempotent
//! submission, leases, pages in (tx, seq) order up to the job's fixed end.

use std::time::{Duration, Instant};

use audit_ledger::query::{EventFilter, Position};
use audit_ledger::replay_jobs::{self, JobState, ReplayError, ReplayRequest};
use audit_ledger::store::conformance;
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::{OffsetKey, PgEventStore, WriteOutcome};
use audit_ledger::testing::TestDatabase;
use audit_ledger::{ParseOptions, PreparedBatch};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

struct Fixture {
    db: TestDatabase,
    store: PgEventStore,
    owner: PgEventStore,
    api: PgEventStore,
}

async fn fixture() -> Fixture {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect");
    let owner = PgEventStore::connect(&PgConfig {
        role: None,
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect as owner");
    let api = PgEventStore::connect(&PgConfig {
        role: Some("audit_api".into()),
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect as audit_api");
    Fixture {
        db,
        store,
        owner,
        api,
    }
}

impl Fixture {
    fn pool(&self) -> &PgPool {
        self.api.pool()
    }

    async fn close(self) {
        for store in [&self.store, &self.owner, &self.api] {
            store.pool().close().await;
        }
        self.db.drop_database().await;
    }
}

/// Writes events (stream, type) at offsets `first..` of `topic`/0 in one
/// transaction; returns their ids.
async fn write(
    store: &PgEventStore,
    topic: &str,
    first: i64,
    events: &[(&str, &str)],
) -> Vec<Uuid> {
    let key = OffsetKey {
        group_id: "g".into(),
        topic: topic.into(),
        partition: 0,
    };
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::new_v4()).collect();
    let records = ids
        .iter()
        .zip(events)
        .zip(first..)
        .map(|((id, (stream, event_type)), offset)| {
            let value = json!({
                "event_id": id,
                "event_type": event_type,
                "stream_id": stream,
                "occurred_at": "2026-11-27T10:00:00Z",
                "payload": {"n": offset},
            });
            conformance::record(topic, 0, offset, value.to_string().as_bytes())
        })
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch");
    let outcome = conformance::write(store, &key, (first > 0).then_some(first), &batch).await;
    assert!(matches!(outcome, WriteOutcome::Committed(_)), "{outcome:?}");
    ids
}

/// Waits until every stored event is below the read horizon: no older
/// transaction is in flight anywhere in the cluster (other tests run
/// concurrently on the same server), so a job started now covers them all.
async fn wait_until_readable(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let readable: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM events WHERE tx >= pg_snapshot_xmin(pg_current_snapshot()))",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if readable {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a transaction stayed in flight for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request(topic: &str) -> ReplayRequest {
    ReplayRequest {
        filter: EventFilter::default(),
        target_topic: topic.into(),
        rate_per_sec: replay_jobs::DEFAULT_RATE_PER_SEC,
    }
}

#[tokio::test]
async fn submit_is_idempotent_by_job_id() {
    let f = fixture().await;
    let mut req = request("replayed");
    req.filter.stream_id = Some("order-1".into());
    req.filter.event_types = vec!["order.*".parse().unwrap()];

    let (job, created) = replay_jobs::submit(f.pool(), "job-1", &req, "alice")
        .await
        .unwrap();
    assert!(created);
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(
        (job.published, job.total, job.cursor.as_deref()),
        (0, None, None)
    );
    assert_eq!(
        (job.request.clone(), job.created_by.as_str()),
        (req.clone(), "alice")
    );

    // Same id, same request (even from someone else): the same job.
    let (again, created) = replay_jobs::submit(f.pool(), "job-1", &req, "bob")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, job);
    // The stored request, as the API would parse it back from JSON.
    let parsed: ReplayRequest =
        serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
    assert!(
        !replay_jobs::submit(f.pool(), "job-1", &parsed, "alice")
            .await
            .unwrap()
            .1
    );

    // Same id, another request: a conflict that names the id.
    for other in [
        ReplayRequest {
            rate_per_sec: 10,
            ..req.clone()
        },
        ReplayRequest {
            target_topic: "elsewhere".into(),
            ..req.clone()
        },
        ReplayRequest {
            filter: EventFilter::default(),
            ..req.clone()
        },
    ] {
        let err = replay_jobs::submit(f.pool(), "job-1", &other, "alice")
            .await
            .unwrap_err();
        assert!(matches!(err, ReplayError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("job-1"), "{err}");
    }

    // Invalid input never reaches the table.
    let err = replay_jobs::submit(f.pool(), "bad id", &req, "alice")
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::BadRequest(_)), "{err}");
    let err = replay_jobs::submit(f.pool(), "job-2", &request("bad/topic"), "alice")
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::BadRequest(_)), "{err}");
    assert!(replay_jobs::get(f.pool(), "job-2").await.unwrap().is_none());

    assert_eq!(
        replay_jobs::get(f.pool(), "job-1").await.unwrap(),
        Some(job.clone())
    );
    // A finished job is still returned for its id.
    let claimed = replay_jobs::claim_next(f.pool(), "runner-a", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.job_id, "job-1");
    replay_jobs::finish(f.pool(), "job-1", "runner-a")
        .await
        .unwrap();
    let (done, created) = replay_jobs::submit(f.pool(), "job-1", &req, "alice")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(done.state, JobState::Done);
    f.close().await;
}

#[tokio::test]
async fn claims_are_leased_and_every_write_is_fenced() {
    let f = fixture().await;
    let pool = f.pool();
    let lease = Duration::from_secs(60);
    replay_jobs::submit(pool, "first", &request("t"), "alice")
        .await
        .unwrap();
    replay_jobs::submit(pool, "second", &request("t"), "alice")
        .await
        .unwrap();

    // Oldest first; a leased job is not claimed again.
    let a = replay_jobs::claim_next(pool, "runner-a", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.job_id.as_str(), a.state), ("first", JobState::Running));
    assert_eq!(a.lease_owner.as_deref(), Some("runner-a"));
    let until_tx = a.until_tx.expect("the first claim fixes until_tx");
    let b = replay_jobs::claim_next(pool, "runner-b", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.job_id, "second");
    assert!(replay_jobs::claim_next(pool, "runner-c", lease)
        .await
        .unwrap()
        .is_none());

    // Only the owner writes.
    let at = Position { tx: 1, seq: 1 };
    for result in [
        replay_jobs::record_progress(pool, "first", "runner-b", at, 1, lease).await,
        replay_jobs::renew(pool, "first", "runner-b", lease).await,
        replay_jobs::finish(pool, "first", "runner-b").await,
        replay_jobs::fail(pool, "first", "runner-b", "x").await,
        replay_jobs::release(pool, "first", "runner-b").await,
    ] {
        assert!(
            matches!(result, Err(ReplayError::LeaseLost { .. })),
            "{result:?}"
        );
    }
    let progressed = replay_jobs::record_progress(pool, "first", "runner-a", at, 1, lease)
        .await
        .unwrap();
    assert_eq!(
        (progressed.published, progressed.position().unwrap()),
        (1, Some(at))
    );
    replay_jobs::renew(pool, "first", "runner-a", lease)
        .await
        .unwrap();

    // A released job is taken over at once, with its progress and end.
    replay_jobs::release(pool, "first", "runner-a")
        .await
        .unwrap();
    let c = replay_jobs::claim_next(pool, "runner-c", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.job_id.as_str(), c.published, c.until_tx),
        ("first", 1, Some(until_tx))
    );
    assert_eq!(c.position().unwrap(), Some(at));
    let err = replay_jobs::record_progress(pool, "first", "runner-a", at, 2, lease)
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::LeaseLost { .. }), "{err}");
    assert!(err.to_string().contains("runner-a"), "{err}");

    // An expired lease (a runner that died) is taken over by another runner.
    replay_jobs::release(pool, "first", "runner-c")
        .await
        .unwrap();
    let short = replay_jobs::claim_next(pool, "runner-d", Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short.job_id, "first");
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(job) = replay_jobs::claim_next(pool, "runner-e", lease)
            .await
            .unwrap()
        {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the expired lease was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (taken.job_id.as_str(), taken.lease_owner.as_deref()),
        ("first", Some("runner-e"))
    );
    assert!(replay_jobs::renew(pool, "first", "runner-d", lease)
        .await
        .is_err());

    // Done and failed are final: never claimed again, no more writes.
    let done = replay_jobs::finish(pool, "first", "runner-e")
        .await
        .unwrap();
    assert_eq!(
        (done.state, done.lease_owner.as_deref()),
        (JobState::Done, None)
    );
    assert!(done.finished_at.is_some());
    let failed = replay_jobs::fail(pool, "second", "runner-b", "broker said no")
        .await
        .unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref()),
        (JobState::Failed, Some("broker said no"))
    );
    assert!(replay_jobs::claim_next(pool, "runner-f", lease)
        .await
        .unwrap()
        .is_none());
    assert!(
        replay_jobs::record_progress(pool, "first", "runner-e", at, 5, lease)
            .await
            .is_err()
    );
    f.close().await;
}

/// The (tx, seq) positions and ids of the matching events below `until_tx`,
/// read independently of the module.
async fn expected_events(pool: &PgPool, until_tx: u64, stream: &str) -> Vec<(Position, Uuid)> {
    let rows: Vec<(String, i64, Uuid)> = sqlx::query_as(
        "SELECT tx::text, seq, event_id FROM events
         WHERE tx < $1::text::xid8 AND stream_id = $2 AND event_type LIKE 'order.%'
         ORDER BY tx, seq",
    )
    .bind(until_tx.to_string())
    .bind(stream)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(tx, seq, id)| {
            (
                Position {
                    tx: tx.parse().unwrap(),
                    seq,
                },
                id,
            )
        })
        .collect()
}

#[tokio::test]
async fn pages_run_in_tx_seq_order_up_to_the_jobs_end() {
    let f = fixture().await;
    let pool = f.pool();
    // Committed before the job starts, in three transactions.
    let mut before = Vec::new();
    let mut offset = 0;
    for events in [
        &[
            ("s-1", "order.created"),
            ("s-2", "order.created"),
            ("s-1", "order.paid"),
        ][..],
        &[("s-1", "audit.x"), ("s-1", "order.shipped")],
        &[
            ("s-1", "order.created"),
            ("s-1", "order.created"),
            ("s-2", "order.paid"),
            ("s-1", "order.paid"),
        ],
    ] {
        let ids = write(&f.store, "orders", offset, events).await;
        offset += events.len() as i64;
        before.extend(ids.into_iter().zip(events.iter().copied()));
    }
    let matching_before: Vec<Uuid> = before
        .iter()
        .filter(|(_, (stream, event_type))| *stream == "s-1" && event_type.starts_with("order."))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(matching_before.len(), 6);
    wait_until_readable(f.owner.pool()).await;

    // A transaction in flight when the job starts, and one that commits
    // after it began but before the job starts.
    let mut open = f.owner.pool().begin().await.unwrap();
    let open_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO events (event_id, event_type, stream_id, occurred_at, payload, content_hash, kafka_topic, kafka_partition, kafka_offset)
         VALUES ($1, 'order.created', 's-1', now(), '{}', '\\x00', 'other', 0, 0)",
    )
    .bind(open_id)
    .execute(&mut *open)
    .await
    .unwrap();
    let open_tx: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let open_tx: u64 = open_tx.parse().unwrap();
    let concurrent = write(&f.store, "orders", offset, &[("s-1", "order.created")]).await;
    offset += 1;

    let mut req = request("replayed");
    req.filter.stream_id = Some("s-1".into());
    req.filter.event_types = vec!["order.*".parse().unwrap()];
    replay_jobs::submit(pool, "job", &req, "alice")
        .await
        .unwrap();
    let job = replay_jobs::claim_next(pool, "runner", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let until_tx = job.until_tx.unwrap();
    assert!(
        until_tx <= open_tx,
        "until_tx {until_tx} is past the transaction in flight {open_tx}"
    );
    open.commit().await.unwrap();
    // Stored after the job started.
    let after = write(&f.store, "orders", offset, &[("s-1", "order.created")]).await;

    // Pages of 2, resumed from the cursor each time.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = replay_jobs::fetch_page(pool, &job, cursor, 2)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        cursor = Some(last.position);
        seen.extend(page.iter().map(|e| (e.position, e.event_id)));
    }
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "not in (tx, seq) order: {seen:?}"
    );
    assert_eq!(seen, expected_events(f.owner.pool(), until_tx, "s-1").await);
    let ids: Vec<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ids, matching_before,
        "exactly the matching events committed before the job started"
    );
    for excluded in [open_id, concurrent[0], after[0]] {
        assert!(!ids.contains(&excluded));
    }
    assert_eq!(
        replay_jobs::count_total(pool, &job, "runner")
            .await
            .unwrap(),
        6
    );
    let stored = replay_jobs::get(pool, "job").await.unwrap().unwrap();
    assert_eq!(stored.total, Some(6));
    // Counted once: later calls return the stored total.
    assert_eq!(
        replay_jobs::count_total(pool, &stored, "runner")
            .await
            .unwrap(),
        6
    );
    // Another runner may not store a total.
    let fresh = replay_jobs::Job {
        total: None,
        ..stored.clone()
    };
    assert!(matches!(
        replay_jobs::count_total(pool, &fresh, "intruder").await,
        Err(ReplayError::LeaseLost { .. })
    ));

    // The job's end never moves, even after the job is taken over.
    replay_jobs::release(pool, "job", "runner").await.unwrap();
    let again = replay_jobs::claim_next(pool, "runner-2", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.until_tx, Some(until_tx));
    let all = replay_jobs::fetch_page(pool, &again, None, 100)
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        matching_before
    );
    f.close().await;
}
