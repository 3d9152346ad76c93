//! `audit-node produce`: sends [`TrafficGenerator`] output to Kafka.
//!
//! Split so `dev` can reuse the pieces:
//! - [`create_producer`] + [`ensure_reachable`]: one producer configuration
//!   and a fast, clear failure when the brokers are wrong;
//! - [`produce_stream`]: the send loop (pacing, bounded in-flight deliveries,
//!   shutdown), finite (`produce`) or endless (`dev` demo traffic);
//! - [`run`]: the `produce` command end to end, returning the [`Summary`].

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::traffic::{GeneratedRecord, Summary, TrafficGenerator};

/// How long to wait for the first metadata response before declaring the
/// brokers unreachable (librdkafka would otherwise retry silently until
/// `message.timeout.ms`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound of sent-but-unacknowledged records; bounds memory and keeps
/// delivery errors surfacing close to the record that caused them.
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Flushing after all deliveries resolved is a formality; this only guards
/// against a wedged client.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// After a stall, pacing catches up at most this much backlog as a burst.
const MAX_PACING_LAG: Duration = Duration::from_secs(1);
/// Back-off when librdkafka's local queue is full and nothing is in flight
/// here to wait for (e.g. another user of a shared producer filled it).
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);

/// Flags of `audit-node produce`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "AUDIT_BROKERS")]
    pub brokers: String,

    /// Topic to produce to.
    #[arg(long, env = "AUDIT_PRODUCE_TOPIC")]
    pub topic: String,

    /// Exact number of records to produce (valid + invalid + duplicates).
    #[arg(long, env = "AUDIT_PRODUCE_COUNT")]
    pub count: u64,

    /// Records per second; absent or 0 means as fast as possible.
    #[arg(
        long,
        env = "AUDIT_PRODUCE_RATE",
        value_parser = parse_rate,
        allow_negative_numbers = true
    )]
    pub rate: Option<f64>,

    /// Share of records that are malformed, within [0, 1].
    #[arg(
        long,
        env = "AUDIT_PRODUCE_INVALID_RATIO",
        default_value_t = 0.0,
        value_parser = parse_ratio,
        allow_negative_numbers = true
    )]
    pub invalid_ratio: f64,

    /// Share of records that re-send an earlier valid record, within [0, 1];
    /// invalid-ratio + duplicate-ratio must not exceed 1.
    #[arg(
        long,
        env = "AUDIT_PRODUCE_DUPLICATE_RATIO",
        default_value_t = 0.0,
        value_parser = parse_ratio,
        allow_negative_numbers = true
    )]
    pub duplicate_ratio: f64,

    /// Seed of the traffic generator; the same seed produces the same records.
    #[arg(long, env = "AUDIT_PRODUCE_SEED", default_value_t = 42)]
    pub seed: u64,
}

impl ProduceArgs {
    /// Re-checks everything clap checks, plus cross-field rules, so values
    /// built in code (not parsed) get the same clear errors.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("--brokers (AUDIT_BROKERS) must not be empty");
        }
        if self.topic.trim().is_empty() {
            bail!("--topic (AUDIT_PRODUCE_TOPIC) must not be empty");
        }
        validate_rate(self.rate)?;
        validate_ratios(self.invalid_ratio, self.duplicate_ratio)
    }
}

/// Ratio rules shared with any other command that drives a [`TrafficGenerator`].
pub fn validate_ratios(invalid_ratio: f64, duplicate_ratio: f64) -> anyhow::Result<()> {
    check_ratio(invalid_ratio)
        .map_err(|e| anyhow!("--invalid-ratio (AUDIT_PRODUCE_INVALID_RATIO) {e}"))?;
    check_ratio(duplicate_ratio)
        .map_err(|e| anyhow!("--duplicate-ratio (AUDIT_PRODUCE_DUPLICATE_RATIO) {e}"))?;
    if invalid_ratio + duplicate_ratio > 1.0 {
        bail!(
            "--invalid-ratio ({invalid_ratio}) + --duplicate-ratio ({duplicate_ratio}) must not exceed 1, got {}",
            invalid_ratio + duplicate_ratio
        );
    }
    Ok(())
}

/// Rate rules shared with `dev`: finite and >= 0 (0 = unlimited).
pub fn validate_rate(rate: Option<f64>) -> anyhow::Result<()> {
    match rate {
        Some(r) if !r.is_finite() || r < 0.0 => {
            bail!("--rate (AUDIT_PRODUCE_RATE) must be a number >= 0 (events/s), got {r}")
        }
        _ => Ok(()),
    }
}

fn check_ratio(value: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be within [0, 1], got {value}"))
    }
}

fn parse_ratio(raw: &str) -> Result<f64, String> {
    let value: f64 = raw.trim().parse().map_err(|e| format!("{e}"))?;
    check_ratio(value)
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let value: f64 = raw.trim().parse().map_err(|e| format!("{e}"))?;
    validate_rate(Some(value)).map_err(|_| format!("must be a number >= 0, got {value}"))?;
    Ok(value)
}

/// Runs `audit-node produce`: exactly `args.count` records, then flush.
/// The summary is only returned when every record was acknowledged, so it
/// never over-reports what reached Kafka.
pub async fn run(args: ProduceArgs) -> anyhow::Result<Summary> {
    args.validate()?;
    let producer = create_producer(&args.brokers)?;
    ensure_reachable(&producer, &args.brokers, &args.topic, CONNECT_TIMEOUT).await?;
    info!(
        brokers = %args.brokers,
        topic = %args.topic,
        count = args.count,
        rate = ?args.rate,
        invalid_ratio = args.invalid_ratio,
        duplicate_ratio = args.duplicate_ratio,
        seed = args.seed,
        "producing"
    );
    let mut generator = TrafficGenerator::new(args.seed, args.invalid_ratio, args.duplicate_ratio);
    let started = Instant::now();
    produce_stream(
        &producer,
        &args.topic,
        &mut generator,
        Some(args.count),
        args.rate,
        std::future::pending::<()>(),
    )
    .await?;
    flush(&producer, FLUSH_TIMEOUT).await?;
    let summary = generator.summary();
    let elapsed = started.elapsed().as_secs_f64();
    info!(
        produced = summary.produced,
        valid = summary.valid,
        invalid = summary.invalid,
        duplicates = summary.duplicates,
        elapsed_s = elapsed,
        "produce finished"
    );
    Ok(summary)
}

/// The producer configuration of the audit trail: idempotent with `acks=all`
/// so retries never duplicate or reorder records within a partition (the
/// generator's duplicates are the only duplicates the consumer should see).
pub fn create_producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    create_producer_lingering(brokers, 5)
}

/// [`create_producer`] waiting up to `linger_ms` to fill each partition's
/// batches (a bulk load: fewer, larger record batches in the log).
pub fn create_producer_lingering(brokers: &str, linger_ms: u32) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", "none")
        .set("message.timeout.ms", "60000")
        .create()
        .with_context(|| format!("cannot create a Kafka producer for {brokers}"))
}

/// Fetches topic metadata once so a wrong `--brokers` fails within `timeout`
/// with an actionable message instead of timing out each record after 60 s.
pub async fn ensure_reachable(
    producer: &FutureProducer,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client_producer = producer.clone();
    let owned_topic = topic.to_owned();
    // fetch_metadata blocks the calling thread.
    let metadata = tokio::task::spawn_blocking(move || {
        client_producer
            .client()
            .fetch_metadata(Some(&owned_topic), timeout)
    })
    .await
    .context("Kafka metadata task failed")?
    .map_err(|e| {
        anyhow!("cannot reach Kafka at {brokers}: {e}; check --brokers / AUDIT_BROKERS")
    })?;

    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        warn!(%brokers, %topic, "topic missing from metadata; producing anyway");
        return Ok(());
    };
    match found.error().map(RDKafkaErrorCode::from) {
        None => {
            debug!(%brokers, %topic, partitions = found.partitions().len(), "Kafka reachable");
            Ok(())
        }
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => bail!(
            "topic {topic} does not exist on Kafka at {brokers} and was not auto-created; \
             create it or check --topic / AUDIT_PRODUCE_TOPIC"
        ),
        // e.g. LeaderNotAvailable right after auto-creation: librdkafka retries.
        Some(code) => {
            warn!(%brokers, %topic, error = %code, "topic metadata reports an error; producing anyway");
            Ok(())
        }
    }
}

/// Waits for librdkafka to drain its queue; `flush` blocks, hence spawn_blocking.
pub async fn flush(producer: &FutureProducer, timeout: Duration) -> anyhow::Result<()> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(timeout))
        .await
        .context("Kafka flush task failed")?
        .context("flushing the Kafka producer")
}

/// Sends records from `generator` to `topic` until `count` records were sent
/// (`None` = unbounded) or `shutdown` completes, then waits for every
/// outstanding delivery. Returns how many records this call sent; all of them
/// were acknowledged, so `generator.summary()` is exact afterwards.
///
/// - `rate` (records/s, `None`/0 = unlimited) is paced with timer sleeps, not
///   spinning; after a stall at most one second of backlog is sent as a burst.
/// - Records are enqueued synchronously in generation order, so records with
///   the same key (same partition) reach Kafka in order — duplicates and
///   reused event ids always land after their original.
/// - At most [`MAX_IN_FLIGHT`] deliveries are outstanding.
/// - The first failed delivery aborts with an error.
pub async fn produce_stream<S>(
    producer: &FutureProducer,
    topic: &str,
    generator: &mut TrafficGenerator,
    count: Option<u64>,
    rate: Option<f64>,
    shutdown: S,
) -> anyhow::Result<u64>
where
    S: Future<Output = ()>,
{
    // Fused: once fired it stays pending, so it can be polled again safely.
    let shutdown = shutdown.fuse();
    tokio::pin!(shutdown);
    let mut pacer = Pacer::new(rate);
    let mut in_flight = FuturesUnordered::new();
    let mut sent: u64 = 0;
    let mut delivered: u64 = 0;
    let started = Instant::now();
    let mut next_progress = started + PROGRESS_EVERY;

    'produce: while count.is_none_or(|c| sent < c) {
        // Reap finished deliveries without waiting so failures surface early.
        while let Some(Some(result)) = in_flight.next().now_or_never() {
            check_delivery(result, topic)?;
            delivered += 1;
        }
        if let Some(slot) = pacer.reserve() {
            if slot > Instant::now() {
                tokio::select! {
                    () = &mut shutdown => break 'produce,
                    () = tokio::time::sleep_until(slot) => {}
                }
            }
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            tokio::select! {
                () = &mut shutdown => break 'produce,
                Some(result) = in_flight.next() => {
                    check_delivery(result, topic)?;
                    delivered += 1;
                }
            }
        }
        if (&mut shutdown).now_or_never().is_some() {
            break;
        }

        let record = generator.next_record();
        let mut future_record = to_future_record(topic, &record);
        let delivery = loop {
            match producer.send_result(future_record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    future_record = returned;
                    // The local queue drains as deliveries complete: wait for one.
                    match in_flight.next().await {
                        Some(result) => {
                            check_delivery(result, topic)?;
                            delivered += 1;
                        }
                        None => tokio::time::sleep(QUEUE_FULL_BACKOFF).await,
                    }
                }
                Err((e, _)) => {
                    return Err(anyhow!(e)).with_context(|| {
                        format!("cannot enqueue record {sent} for topic {topic}")
                    });
                }
            }
        };
        in_flight.push(delivery);
        sent += 1;

        let now = Instant::now();
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            let elapsed = now.duration_since(started).as_secs_f64();
            info!(
                sent,
                delivered,
                in_flight = in_flight.len(),
                records_per_s = (sent as f64 / elapsed).round(),
                "producing"
            );
        }
    }

    while let Some(result) = in_flight.next().await {
        check_delivery(result, topic)?;
        delivered += 1;
    }
    debug!(sent, delivered, %topic, "all deliveries acknowledged");
    Ok(sent)
}

fn to_future_record<'a>(
    topic: &'a str,
    record: &'a GeneratedRecord,
) -> FutureRecord<'a, [u8], [u8]> {
    let headers = record.headers.iter().fold(
        OwnedHeaders::new_with_capacity(record.headers.len()),
        |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            })
        },
    );
    FutureRecord {
        topic,
        partition: None,
        payload: Some(record.value.as_slice()),
        key: record.key.as_deref(),
        timestamp: None,
        headers: Some(headers),
    }
}

fn check_delivery(
    result: Result<OwnedDeliveryResult, Canceled>,
    topic: &str,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, message))) => {
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            Err(anyhow!(error))
                .with_context(|| format!("delivery to topic {topic} failed (key {key:?})"))
        }
        Err(Canceled) => bail!("Kafka producer dropped a record for topic {topic} before delivery"),
    }
}

/// Hands out send slots `1/rate` apart.
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        let interval = rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r));
        Self {
            interval,
            next: Instant::now(),
        }
    }

    /// The instant the next record may be sent, or `None` when unpaced.
    fn reserve(&mut self) -> Option<Instant> {
        let interval = self.interval?;
        let now = Instant::now();
        if self.next + MAX_PACING_LAG < now {
            self.next = now;
        }
        let slot = self.next;
        self.next += interval;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        produce: ProduceArgs,
    }

    fn args(brokers: &str, topic: &str, count: u64) -> ProduceArgs {
        ProduceArgs {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            count,
            rate: None,
            invalid_ratio: 0.05,
            duplicate_ratio: 0.05,
            seed: 7,
        }
    }

    type Record = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

    /// Reads `topic` from the beginning until `expected` records arrived or
    /// the deadline passed.
    fn consume_all(brokers: &str, topic: &str, partitions: i32, expected: usize) -> Vec<Record> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut records = Vec::new();
        while records.len() < expected && std::time::Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
        }
        records
    }

    #[test]
    fn clap_flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "produce",
            "--brokers",
            "k:9092",
            "--topic",
            "t",
            "--count",
            "10",
        ])
        .unwrap();
        let a = cli.produce;
        assert_eq!((a.count, a.seed, a.rate), (10, 42, None));
        assert_eq!((a.invalid_ratio, a.duplicate_ratio), (0.0, 0.0));

        let err = Cli::try_parse_from([
            "produce",
            "--brokers",
            "k",
            "--topic",
            "t",
            "--count",
            "1",
            "--invalid-ratio",
            "1.5",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--invalid-ratio") && err.contains("1.5"),
            "{err}"
        );

        let err = Cli::try_parse_from([
            "produce",
            "--brokers",
            "k",
            "--topic",
            "t",
            "--count",
            "1",
            "--rate",
            "-3",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--rate"), "{err}");
    }

    #[test]
    fn validation_names_the_flag_and_value() {
        let mut a = args("k:9092", "t", 1);
        a.validate().unwrap();
        a.invalid_ratio = 0.7;
        a.duplicate_ratio = 0.4;
        let err = a.validate().unwrap_err().to_string();
        assert!(
            err.contains("--invalid-ratio (0.7) + --duplicate-ratio (0.4)"),
            "{err}"
        );
        a.duplicate_ratio = -0.1;
        let err = a.validate().unwrap_err().to_string();
        assert!(
            err.contains("--duplicate-ratio") && err.contains("-0.1"),
            "{err}"
        );
        a.duplicate_ratio = 0.0;
        a.rate = Some(f64::NAN);
        assert!(a.validate().unwrap_err().to_string().contains("--rate"));
        a.rate = Some(0.0);
        a.validate().unwrap();
        a.brokers = " ".into();
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("AUDIT_BROKERS"));
    }

    #[test]
    fn produce_stream_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let producer = create_producer("127.0.0.1:1").unwrap();
        let mut generator = TrafficGenerator::new(1, 0.0, 0.0);
        let future = produce_stream(
            &producer,
            "t",
            &mut generator,
            Some(0),
            None,
            std::future::pending::<()>(),
        );
        assert_send(&future);
    }

    #[tokio::test]
    async fn unreachable_broker_fails_fast_with_the_address() {
        let producer = create_producer("127.0.0.1:1").unwrap();
        let started = std::time::Instant::now();
        let err = ensure_reachable(&producer, "127.0.0.1:1", "orders", Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot reach Kafka at 127.0.0.1:1"), "{err}");
        assert!(err.contains("--brokers / AUDIT_BROKERS"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn run_delivers_exactly_the_generated_records_in_key_order() {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic("orders", 3, 1).unwrap();
        let brokers = cluster.bootstrap_servers();

        let summary = run(args(&brokers, "orders", 1_000)).await.unwrap();
        assert_eq!(summary.produced, 1_000);
        assert_eq!(summary.valid + summary.invalid + summary.duplicates, 1_000);
        assert!(summary.invalid > 0 && summary.duplicates > 0, "{summary:?}");

        // The generator is deterministic, so the expected topic content is known.
        let mut generator = TrafficGenerator::new(7, 0.05, 0.05);
        let mut expected: HashMap<Option<Vec<u8>>, Vec<Record>> = HashMap::new();
        for _ in 0..1_000 {
            let r = generator.next_record();
            expected
                .entry(r.key.clone())
                .or_default()
                .push((r.key, r.value, r.headers));
        }
        assert_eq!(generator.summary(), summary);

        let consumed = consume_all(&brokers, "orders", 3, 1_000);
        assert_eq!(consumed.len(), 1_000);
        let mut actual: HashMap<Option<Vec<u8>>, Vec<Record>> = HashMap::new();
        for record in consumed {
            actual.entry(record.0.clone()).or_default().push(record);
        }
        // Per key (= per partition) order is preserved, byte for byte.
        assert_eq!(actual, expected);
    }

    #[tokio::test]
    async fn produce_stream_paces_and_stops_on_shutdown() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("demo", 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer = create_producer(&brokers).unwrap();
        ensure_reachable(&producer, &brokers, "demo", Duration::from_secs(5))
            .await
            .unwrap();

        let mut generator = TrafficGenerator::new(3, 0.0, 0.0);
        let started = std::time::Instant::now();
        let sent = produce_stream(
            &producer,
            "demo",
            &mut generator,
            None,
            Some(200.0),
            tokio::time::sleep(Duration::from_millis(500)),
        )
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        // ~100 at 200/s for 0.5 s; generous bounds for slow CI machines.
        assert!((40..=120).contains(&sent), "sent {sent}");
        assert_eq!(generator.summary().produced, sent);
        flush(&producer, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            consume_all(&brokers, "demo", 2, sent as usize).len(),
            sent as usize
        );
    }
}
