//! The replay runner against the real PostgreSQL with an in-memory
//! republisher: exactly the matching events, in order, with the right key
//! and headers; resumed after a clean stop and after a kill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_actors::republish::{
    MemoryRepublisher, ReplayRunner, ReplayRunnerArgs, ReplayRunnerConfig, ReplayRunnerMsg,
    ReplayRunnerSpec, RepublishError, Republisher, REPLAY_RUNNER_CHILD,
};
use audit_actors::restart::RestartPolicy;
use audit_actors::supervisor::{NodeSupervisor, SupervisorArgs, SupervisorMsg};
use audit_ledger::query::EventFilter;
use audit_ledger::replay_jobs::{self, Job, JobState, ReplayRecord, ReplayRequest};
use audit_ledger::store::conformance;
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::{OffsetKey, PgEventStore, WriteOutcome};
use audit_ledger::testing::TestDatabase;
use audit_ledger::{ParseOptions, PreparedBatch};
use ractor::{Actor, ActorRef};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

struct Fixture {
    db: TestDatabase,
    store: PgEventStore,
    api: PgEventStore,
}

async fn fixture() -> Fixture {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect");
    let api = PgEventStore::connect(&PgConfig {
        role: Some("audit_api".into()),
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect as audit_api");
    Fixture { db, store, api }
}

impl Fixture {
    fn pool(&self) -> &PgPool {
        self.api.pool()
    }

    async fn close(self) {
        self.store.pool().close().await;
        self.api.pool().close().await;
        self.db.drop_database().await;
    }
}

/// Stores events (stream, type) at offsets `first..` of `orders`/0 in one
/// transaction.
async fn write(store: &PgEventStore, first: i64, events: &[(&str, &str)]) {
    let key = OffsetKey {
        group_id: "g".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let records = events
        .iter()
        .zip(first..)
        .map(|((stream, event_type), offset)| {
            let value = json!({
                "event_id": Uuid::new_v4(),
                "event_type": event_type,
                "stream_id": stream,
                "stream_version": offset + 1,
                "occurred_at": "2026-11-27T10:00:00.5Z",
                "payload": {"offset": offset},
            });
            conformance::record("orders", 0, offset, value.to_string().as_bytes())
        })
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch");
    let outcome = conformance::write(store, &key, (first > 0).then_some(first), &batch).await;
    assert!(matches!(outcome, WriteOutcome::Committed(_)), "{outcome:?}");
}

/// Writes `batches` batches of `per_batch` events cycling over two streams
/// and two types; returns how many were written.
async fn write_many(store: &PgEventStore, batches: i64, per_batch: i64) -> i64 {
    let kinds = [
        ("s-1", "order.created"),
        ("s-2", "order.created"),
        ("s-1", "order.paid"),
        ("s-1", "audit.x"),
    ];
    for b in 0..batches {
        let events: Vec<(&str, &str)> = (0..per_batch)
            .map(|i| kinds[((b * per_batch + i) % 4) as usize])
            .collect();
        write(store, b * per_batch, &events).await;
    }
    wait_until_readable(store.pool()).await;
    batches * per_batch
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

/// What the job must publish: (event id, offset) of the matching events in
/// (tx, seq) order, read independently.
async fn expected(pool: &PgPool, until_tx: u64) -> Vec<(Uuid, i64)> {
    sqlx::query_as(
        "SELECT event_id, kafka_offset FROM events
         WHERE tx < $1::text::xid8 AND stream_id = 's-1' AND starts_with(event_type, 'order.')
         ORDER BY tx, seq",
    )
    .bind(until_tx.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

fn s1_orders(rate_per_sec: u32) -> ReplayRequest {
    let mut filter = EventFilter {
        stream_id: Some("s-1".into()),
        ..EventFilter::default()
    };
    filter.event_types = vec!["order.*".parse().unwrap()];
    ReplayRequest {
        filter,
        target_topic: "replayed".into(),
        rate_per_sec,
    }
}

fn config(max_page: usize, lease: Duration) -> Arc<ReplayRunnerConfig> {
    Arc::new(ReplayRunnerConfig {
        node_id: "test-node".into(),
        poll_interval: Duration::from_millis(50),
        lease,
        max_page,
        ack_timeout: Duration::from_secs(5),
        max_attempts: 3,
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
    })
}

async fn start_runner(
    pool: &PgPool,
    republisher: Arc<dyn Republisher>,
    config: Arc<ReplayRunnerConfig>,
) -> ActorRef<ReplayRunnerMsg> {
    let args = ReplayRunnerArgs {
        pool: pool.clone(),
        republisher,
        config,
    };
    let (actor, _join) = Actor::spawn(None, ReplayRunner, args)
        .await
        .expect("runner starts");
    actor
}

/// Polls the job until `done` says so, or panics after `within`.
async fn wait_for(
    pool: &PgPool,
    job_id: &str,
    within: Duration,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = Instant::now() + within;
    loop {
        let job = replay_jobs::get(pool, job_id).await.unwrap().unwrap();
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job never reached the expected state: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn header<'a>(record: &'a ReplayRecord, key: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn published_ids(republisher: &MemoryRepublisher) -> Vec<Uuid> {
    republisher
        .published()
        .iter()
        .map(|(_, r)| header(r, "x-audit-event-id").unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_job_republishes_exactly_the_matching_events_in_order() {
    let f = fixture().await;
    write_many(&f.store, 5, 8).await;
    let republisher = Arc::new(MemoryRepublisher::new());

    // Under the node supervisor, as the node runs it.
    let (fatal, _fatal_rx) = tokio::sync::mpsc::unbounded_channel();
    let spec = ReplayRunnerSpec {
        pool: f.pool().clone(),
        republisher: republisher.clone(),
        config: config(4, Duration::from_secs(30)),
    };
    let (supervisor, supervisor_join) = Actor::spawn(
        None,
        NodeSupervisor,
        SupervisorArgs {
            children: vec![Arc::new(spec)],
            policy: RestartPolicy::default(),
            fatal,
        },
    )
    .await
    .unwrap();
    let child = ractor::call!(
        supervisor,
        SupervisorMsg::Child,
        REPLAY_RUNNER_CHILD.to_string()
    )
    .unwrap();
    assert!(child.is_some());

    let (job, _) = replay_jobs::submit(f.pool(), "all-s1-orders", &s1_orders(10_000), "alice")
        .await
        .unwrap();
    let done = wait_for(f.pool(), &job.job_id, Duration::from_secs(20), |j| {
        j.state == JobState::Done
    })
    .await;
    let expected = expected(f.pool(), done.until_tx.unwrap()).await;
    assert_eq!(expected.len(), 20);
    assert_eq!((done.published, done.total), (20, Some(20)));
    assert!(done.finished_at.is_some() && done.error.is_none() && done.lease_owner.is_none());

    let published = republisher.published();
    let ids: Vec<Uuid> = published_ids(&republisher);
    assert_eq!(
        ids,
        expected.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    for ((topic, record), (id, offset)) in published.iter().zip(&expected) {
        assert_eq!(topic, "replayed");
        assert_eq!(record.key, b"s-1");
        let value: Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(value["event_id"], id.to_string());
        assert_eq!(value["stream_id"], "s-1");
        assert_eq!(value["payload"]["offset"], *offset);
        assert_eq!(value["occurred_at"], "2026-11-27T10:00:00.500000Z");
        assert!(value["event_type"].as_str().unwrap().starts_with("order."));
        assert_eq!(
            header(record, "traceparent"),
            Some("00-abc-def-01"),
            "original header kept"
        );
        assert_eq!(header(record, "x-audit-replay-job"), Some("all-s1-orders"));
        assert_eq!(header(record, "x-audit-original-topic"), Some("orders"));
        assert_eq!(header(record, "x-audit-original-partition"), Some("0"));
        assert_eq!(
            header(record, "x-audit-original-offset"),
            Some(offset.to_string().as_str())
        );
    }
    let last = done.position().unwrap().unwrap();
    let last_id: Uuid = sqlx::query_scalar("SELECT event_id FROM events WHERE seq = $1")
        .bind(last.seq)
        .fetch_one(f.pool())
        .await
        .unwrap();
    assert_eq!(last_id, expected.last().unwrap().0);

    // Nothing matches: done at once, nothing published.
    let mut none = s1_orders(10_000);
    none.filter.source = Some("nobody".into());
    replay_jobs::submit(f.pool(), "nothing", &none, "alice")
        .await
        .unwrap();
    let done = wait_for(f.pool(), "nothing", Duration::from_secs(20), |j| {
        j.state == JobState::Done
    })
    .await;
    assert_eq!((done.published, done.total), (0, Some(0)));
    assert_eq!(republisher.published().len(), 20);

    supervisor.stop(None);
    supervisor_join.await.unwrap();
    f.close().await;
}

/// A runner stopped mid-job releases it; the next one resumes at once from
/// the recorded cursor, and nothing is published twice.
#[tokio::test]
async fn a_stopped_runner_hands_the_job_over_without_duplicates() {
    let f = fixture().await;
    write_many(&f.store, 10, 16).await;
    let republisher = Arc::new(MemoryRepublisher::new());
    // 80 matching events at 100/s, pages of 10.
    let (job, _) = replay_jobs::submit(f.pool(), "stop", &s1_orders(100), "alice")
        .await
        .unwrap();
    let started = Instant::now();
    let first = start_runner(
        f.pool(),
        republisher.clone(),
        config(10, Duration::from_secs(60)),
    )
    .await;
    wait_for(f.pool(), &job.job_id, Duration::from_secs(20), |j| {
        j.published >= 30
    })
    .await;
    first
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .unwrap();

    let handed_over = replay_jobs::get(f.pool(), "stop").await.unwrap().unwrap();
    assert_eq!(handed_over.state, JobState::Running);
    assert_eq!(handed_over.lease_owner, None, "released on stop");
    assert_eq!(
        handed_over.published as usize,
        republisher.published().len(),
        "every published page was recorded"
    );

    let second = start_runner(
        f.pool(),
        republisher.clone(),
        config(10, Duration::from_secs(60)),
    )
    .await;
    let done = wait_for(f.pool(), "stop", Duration::from_secs(30), |j| {
        j.state == JobState::Done
    })
    .await;
    let elapsed = started.elapsed();
    let expected: Vec<Uuid> = expected(f.pool(), done.until_tx.unwrap())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(expected.len(), 80);
    assert_eq!(
        published_ids(&republisher),
        expected,
        "each event once, in order, across both runners"
    );
    assert_eq!((done.published, done.total), (80, Some(80)));
    // The rate holds: 80 events at 100/s, less a 100 ms burst per runner.
    assert!(
        elapsed >= Duration::from_millis(590),
        "too fast for 100/s: {elapsed:?}"
    );
    second
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .unwrap();
    f.close().await;
}

/// A runner killed mid-job keeps its lease until it expires; then another
/// resumes from the recorded cursor. The union of what both published is
/// every matching event; only events after the recorded cursor, at most one
/// page of them, were published twice.
#[tokio::test]
async fn a_killed_runner_leaves_at_most_one_page_to_publish_again() {
    let f = fixture().await;
    write_many(&f.store, 10, 16).await;
    let republisher = Arc::new(MemoryRepublisher::new());
    let page = 10;
    let lease = Duration::from_millis(500);
    replay_jobs::submit(f.pool(), "kill", &s1_orders(200), "alice")
        .await
        .unwrap();
    let first = start_runner(f.pool(), republisher.clone(), config(page, lease)).await;
    wait_for(f.pool(), "kill", Duration::from_secs(20), |j| {
        j.published >= 30
    })
    .await;
    first
        .kill_and_wait(Some(Duration::from_secs(10)))
        .await
        .unwrap();

    let after_kill = replay_jobs::get(f.pool(), "kill").await.unwrap().unwrap();
    let sent_by_first = republisher.published().len();
    assert!(
        after_kill.lease_owner.is_some(),
        "a killed runner does not release its lease"
    );

    let second = start_runner(f.pool(), republisher.clone(), config(page, lease)).await;
    let done = wait_for(f.pool(), "kill", Duration::from_secs(30), |j| {
        j.state == JobState::Done
    })
    .await;
    let expected: Vec<Uuid> = expected(f.pool(), done.until_tx.unwrap())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(expected.len(), 80);
    let ids = published_ids(&republisher);
    assert_eq!(ids[..sent_by_first], expected[..sent_by_first]);
    // Where the second runner resumed: the first runner's last recorded
    // cursor (read from what it published, as an update the kill cut short
    // may still have landed after `after_kill` was read).
    let resumed = expected
        .iter()
        .position(|id| *id == ids[sent_by_first])
        .unwrap();
    assert!(resumed >= after_kill.published as usize);
    assert!(
        resumed <= sent_by_first && sent_by_first - resumed <= page,
        "published again: events {resumed}..{sent_by_first}, more than one page of {page}"
    );
    assert_eq!(
        ids[sent_by_first..],
        expected[resumed..],
        "resumed right after the recorded cursor"
    );
    assert_eq!((done.published, done.total), (80, Some(80)));
    second
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .unwrap();
    f.close().await;
}

#[tokio::test]
async fn failed_deliveries_are_retried_then_fail_the_job() {
    let f = fixture().await;
    write_many(&f.store, 2, 8).await;
    let republisher = Arc::new(MemoryRepublisher::new());
    let runner = start_runner(
        f.pool(),
        republisher.clone(),
        config(4, Duration::from_secs(30)),
    )
    .await;

    // Two failed deliveries (the first page's first two events): the page
    // fails once and is retried; the job completes.
    republisher.fail_next([
        RepublishError::Transient("broker unreachable".into()),
        RepublishError::Transient("broker unreachable".into()),
    ]);
    replay_jobs::submit(f.pool(), "flaky", &s1_orders(10_000), "alice")
        .await
        .unwrap();
    let done = wait_for(f.pool(), "flaky", Duration::from_secs(20), |j| {
        j.finished_at.is_some()
    })
    .await;
    assert_eq!(done.state, JobState::Done, "{:?}", done.error);
    let expected: Vec<Uuid> = expected(f.pool(), done.until_tx.unwrap())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!((done.published, done.total), (8, Some(8)));
    // The two delivered events of the failed page went out again with the
    // retried page: published twice, within that page only.
    let ids = published_ids(&republisher);
    assert_eq!(ids[..2], expected[2..4]);
    assert_eq!(ids[2..], expected);

    // A fatal error fails the job at once, with the error.
    republisher.fail_next([RepublishError::Fatal(
        "topic replayed does not exist".into(),
    )]);
    replay_jobs::submit(f.pool(), "fatal", &s1_orders(10_000), "alice")
        .await
        .unwrap();
    let failed = wait_for(f.pool(), "fatal", Duration::from_secs(20), |j| {
        j.finished_at.is_some()
    })
    .await;
    assert_eq!(failed.state, JobState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("topic replayed does not exist"),
        "{failed:?}"
    );
    assert_eq!(failed.published, 0);

    // Kafka down for max_attempts pages in a row: the job gives up.
    republisher.set_failing(Some(RepublishError::Transient("still down".into())));
    replay_jobs::submit(f.pool(), "down", &s1_orders(10_000), "alice")
        .await
        .unwrap();
    let failed = wait_for(f.pool(), "down", Duration::from_secs(20), |j| {
        j.finished_at.is_some()
    })
    .await;
    republisher.set_failing(None);
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.published, 0);
    let error = failed.error.unwrap();
    assert!(
        error.contains("gave up after 3 failed attempts") && error.contains("still down"),
        "{error}"
    );

    runner
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .unwrap();
    f.close().await;
}
