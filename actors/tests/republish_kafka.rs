//! The real producer path: a replay job published through
//! [`KafkaRepublisher`] to librdkafka's mock cluster (the Kafka wire
//! protocol), then read back with a consumer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_actors::republish::{
    KafkaRepublisher, ReplayRunner, ReplayRunnerArgs, ReplayRunnerConfig,
};
use audit_ledger::query::EventFilter;
use audit_ledger::replay_jobs::{self, JobState, ReplayRequest};
use audit_ledger::store::conformance;
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::{OffsetKey, PgEventStore, WriteOutcome};
use audit_ledger::testing::TestDatabase;
use audit_ledger::{ParseOptions, PreparedBatch};
use ractor::Actor;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;

type Received = (Vec<u8>, Value, HashMap<String, String>);

/// Reads `count` records from every partition of `topic`, off the runtime.
async fn consume(
    brokers: String,
    topic: &'static str,
    partitions: i32,
    count: usize,
) -> Vec<Received> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("read-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions {
            tpl.add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut received = Vec::new();
        while received.len() < count && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.unwrap();
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            received.push((
                message.key().unwrap_or_default().to_vec(),
                serde_json::from_slice(message.payload().unwrap_or_default()).unwrap(),
                headers,
            ));
        }
        received
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_job_is_published_to_kafka_with_keys_and_headers() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("replayed", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();

    let db = TestDatabase::create().await.unwrap();
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .unwrap();
    let api = PgEventStore::connect(&PgConfig {
        role: Some("audit_api".into()),
        ..PgConfig::new(&db.url)
    })
    .await
    .unwrap();
    let streams = ["s-1", "s-2", "s-3"];
    let records: Vec<_> = (0..30i64)
        .map(|offset| {
            let value = json!({
                "event_id": Uuid::new_v4(),
                "event_type": "order.created",
                "stream_id": streams[offset as usize % 3],
                "stream_version": offset / 3 + 1,
                "occurred_at": "2026-11-27T10:00:00Z",
                "payload": {"offset": offset},
            });
            conformance::record("orders", 0, offset, value.to_string().as_bytes())
        })
        .collect();
    let key = OffsetKey {
        group_id: "g".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).unwrap();
    assert!(matches!(
        conformance::write(&store, &key, None, &batch).await,
        WriteOutcome::Committed(_)
    ));
    // Every stored event below the read horizon (other tests' transactions
    // run on the same server).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sqlx::query_scalar::<_, bool>(
        "SELECT NOT EXISTS (SELECT 1 FROM events WHERE tx >= pg_snapshot_xmin(pg_current_snapshot()))",
    )
    .fetch_one(api.pool())
    .await
    .unwrap()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let republisher = Arc::new(KafkaRepublisher::new(&brokers, &Default::default()).unwrap());
    let config = Arc::new(ReplayRunnerConfig {
        poll_interval: Duration::from_millis(50),
        max_page: 7,
        ..ReplayRunnerConfig::default()
    });
    let (runner, _join) = Actor::spawn(
        None,
        ReplayRunner,
        ReplayRunnerArgs {
            pool: api.pool().clone(),
            republisher,
            config,
        },
    )
    .await
    .unwrap();
    let request = ReplayRequest {
        filter: EventFilter::default(),
        target_topic: "replayed".into(),
        rate_per_sec: 5_000,
    };
    replay_jobs::submit(api.pool(), "to-kafka", &request, "alice")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let job = replay_jobs::get(api.pool(), "to-kafka")
            .await
            .unwrap()
            .unwrap();
        if job.finished_at.is_some() {
            break job;
        }
        assert!(Instant::now() < deadline, "{job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.state, JobState::Done, "{:?}", done.error);
    assert_eq!((done.published, done.total), (30, Some(30)));
    runner
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .unwrap();

    // Acknowledged means readable: all 30, each stream's events in order
    // in one partition, with the original and the replay headers.
    let received = consume(brokers.clone(), "replayed", 3, 30).await;
    assert_eq!(received.len(), 30);
    let mut by_stream: HashMap<Vec<u8>, Vec<i64>> = HashMap::new();
    for (key, value, headers) in &received {
        assert_eq!(
            value["stream_id"].as_str().unwrap().as_bytes(),
            key.as_slice()
        );
        assert_eq!(
            headers["x-audit-event-id"],
            value["event_id"].as_str().unwrap()
        );
        assert_eq!(headers["x-audit-replay-job"], "to-kafka");
        assert_eq!(headers["x-audit-original-topic"], "orders");
        assert_eq!(
            headers["x-audit-original-offset"],
            value["payload"]["offset"].to_string()
        );
        assert_eq!(headers["traceparent"], "00-abc-def-01");
        by_stream
            .entry(key.clone())
            .or_default()
            .push(value["payload"]["offset"].as_i64().unwrap());
    }
    for (stream, offsets) in &by_stream {
        assert_eq!(offsets.len(), 10, "{}", String::from_utf8_lossy(stream));
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "out of order: {offsets:?}"
        );
    }

    store.pool().close().await;
    api.pool().close().await;
    db.drop_database().await;
    // The producer went with the runner; the cluster goes last.
    drop(cluster);
}
