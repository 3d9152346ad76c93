//! The Kafka side: a [`Connector`] that joins the consumer group with one
//! rdkafka consumer, and a [`RecordSource`] per assigned partition built on
//! rdkafka's partition queues (`split_partition_queue`), so a slow partition
//! never blocks the others.
//!
//! Only standard consumer-group features are used, so the same code runs on
//! Apache Kafka, Redpanda, MSK and librdkafka's mock cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use audit_ledger::{Header, RawRecord};
use ractor::ActorRef;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::consumer::{Assignment, Connector, ConnectorHandle, ConsumerMsg};
use crate::readahead::{FetchControl, ReadAhead, Taken};
use crate::source::{RecordSource, SourceError};

/// How the node talks to Kafka.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub client_id: String,
    /// `classic` (cooperative-sticky assignment) or `consumer` (KIP-848,
    /// Kafka 4.0+; much faster rebalances).
    pub group_protocol: String,
    /// Classic protocol only.
    pub session_timeout: Duration,
    /// Prefetch bound per partition: what a paused or slow partition can
    /// hold in memory at most. `None`: `prefetch_budget_kbytes` shared by
    /// the topics' partitions.
    pub queued_max_kbytes: Option<u32>,
    /// Node-wide prefetch budget, split evenly over the partitions of the
    /// subscribed topics (librdkafka only bounds prefetch per partition).
    pub prefetch_budget_kbytes: u32,
    /// Extra librdkafka properties (security, tuning), applied after
    /// [`FETCH_DEFAULTS`] and before the settings exactly-once and bounded
    /// memory rely on, which they cannot override.
    pub extra: BTreeMap<String, String>,
}

impl KafkaSettings {
    pub fn new(
        brokers: impl Into<String>,
        topics: Vec<String>,
        group_id: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            topics,
            group_id: group_id.into(),
            client_id: "audit-node".into(),
            group_protocol: "classic".into(),
            session_timeout: Duration::from_secs(45),
            queued_max_kbytes: None,
            prefetch_budget_kbytes: 32 * 1024,
            extra: BTreeMap::new(),
        }
    }

    /// Per-partition prefetch for `partitions` partitions.
    pub fn prefetch_kbytes(&self, partitions: usize) -> u32 {
        self.queued_max_kbytes.unwrap_or_else(|| {
            (self.prefetch_budget_kbytes / partitions.max(1) as u32).clamp(64, 1024)
        })
    }

    fn client_config(&self, prefetch_kbytes: u32) -> ClientConfig {
        let mut config = ClientConfig::new();
        // Defaults an operator may override (below). librdkafka keeps one
        // fetch in flight per broker; when it holds only partitions with
        // nothing new, the broker parks it for fetch.wait.max.ms (500 ms by
        // default) and a partition whose queue has just drained cannot fetch
        // until it returns: the last records of a backlog waited up to half
        // a second with the cores idle (PERFORMANCE.md, session 8).
        for (k, v) in FETCH_DEFAULTS {
            config.set(*k, *v);
        }
        // Operator properties next: the ones below are what exactly-once
        // and bounded memory rely on, so they cannot be overridden.
        for (k, v) in &self.extra {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("client.id", &self.client_id)
            .set("group.protocol", &self.group_protocol)
            // Offsets live in PostgreSQL; Kafka commits are informational.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Bounded prefetch per partition (split queues count per partition).
            .set("queued.min.messages", "2000")
            .set("queued.max.messages.kbytes", prefetch_kbytes.to_string())
            .set(
                "max.partition.fetch.bytes",
                (prefetch_kbytes * 1024).to_string(),
            )
            // A fetch response stays in memory until its last record is
            // consumed, so one slow partition pins the whole response.
            .set("fetch.max.bytes", (16 * 1024 * 1024).to_string())
            .set_log_level(RDKafkaLogLevel::Info);
        if self.group_protocol == "classic" {
            config
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set(
                    "session.timeout.ms",
                    self.session_timeout.as_millis().to_string(),
                );
        }
        config
    }
}

/// librdkafka properties set before the operator's (`kafka.properties`),
/// which may override them: see `client_config`.
pub const FETCH_DEFAULTS: &[(&str, &str)] = &[("fetch.wait.max.ms", "100")];

/// Routes librdkafka's logs and rebalance callbacks.
pub struct KafkaContext {
    consumer_actor: ActorRef<ConsumerMsg>,
    consumer: OnceLock<Weak<KafkaConsumer>>,
    /// Read-ahead bound of each partition (its share of the prefetch budget).
    prefetch_bytes: usize,
    /// The current source of each assigned partition.
    owners: Arc<Owners>,
}

/// Which source of a partition may pause, resume and seek it. A revoked
/// partition's source lives on until its actor has stopped, and the
/// partition may be assigned to this consumer again meanwhile; librdkafka
/// keeps a pause across a revoke and a new assignment, so a late pause
/// from the old source would leave the new one waiting forever
/// (`second_node_takes_over_a_killed_nodes_partitions`, CHAOS.md).
#[derive(Default)]
struct Owners {
    next: std::sync::atomic::AtomicU64,
    current: Mutex<std::collections::HashMap<(String, i32), u64>>,
}

impl Owners {
    /// Makes a new source the partition's owner; returns its generation.
    fn take_over(&self, topic: &str, partition: i32) -> u64 {
        let generation = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic.to_owned(), partition), generation);
        generation
    }

    fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(topic.to_owned(), partition))
            == Some(&generation)
    }
}

type KafkaConsumer = StreamConsumer<KafkaContext>;

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(target: "librdkafka", fac, "{message}")
            }
            Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
            Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let _ = self
                .consumer_actor
                .send_message(ConsumerMsg::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let mut assignments = Vec::new();
                for element in tpl.elements() {
                    let (topic, partition) = (element.topic().to_string(), element.partition());
                    match consumer.split_partition_queue(&topic, partition) {
                        Some(queue) => assignments.push(Assignment {
                            topic: topic.clone(),
                            partition,
                            source: Arc::new(KafkaPartitionSource::new(
                                topic,
                                partition,
                                queue,
                                consumer.clone(),
                                self.prefetch_bytes,
                                self.owners.clone(),
                            )),
                        }),
                        None => {
                            let _ = self
                                .consumer_actor
                                .send_message(ConsumerMsg::ConnectorFailed(format!(
                                    "cannot split the queue of {topic}/{partition}"
                                )));
                        }
                    }
                }
                let _ = self
                    .consumer_actor
                    .send_message(ConsumerMsg::Assigned(assignments));
            }
            Rebalance::Error(error) => {
                tracing::warn!(error = %error, "rebalance error");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

pub struct KafkaConnector {
    pub settings: KafkaSettings,
}

#[async_trait]
impl Connector for KafkaConnector {
    async fn connect(
        &self,
        consumer_actor: ActorRef<ConsumerMsg>,
    ) -> Result<Box<dyn ConnectorHandle>, SourceError> {
        // Fail fast with a clear message when no broker answers, and size the
        // prefetch from the partitions we may be assigned.
        let partitions = self.count_partitions().await?;
        let prefetch_kbytes = self.settings.prefetch_kbytes(partitions);
        tracing::info!(partitions, prefetch_kbytes, "kafka topics found");
        let context = KafkaContext {
            consumer_actor,
            consumer: OnceLock::new(),
            prefetch_bytes: prefetch_kbytes as usize * 1024,
            owners: Arc::default(),
        };
        let consumer: KafkaConsumer = self
            .settings
            .client_config(prefetch_kbytes)
            .create_with_context(context)
            .map_err(|e| SourceError::Fatal(format!("invalid Kafka configuration: {e}")))?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = self.settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| SourceError::Fatal(format!("cannot subscribe to {topics:?}: {e}")))?;
        // The main queue must be polled for rebalances and group heartbeats;
        // records arrive on the partition queues, never here.
        let poller = consumer.clone();
        let main_loop = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(1), poller.recv()).await {
                    Err(_idle) => {}
                    Ok(Ok(message)) => tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "record on the main queue ignored; the partition actor will seek back to it"
                    ),
                    Ok(Err(error)) => tracing::warn!(error = %error, "kafka consumer error"),
                }
            }
        });
        Ok(Box::new(KafkaHandle {
            consumer: Some(consumer),
            main_loop,
        }))
    }
}

impl KafkaConnector {
    /// Partitions of the subscribed topics, read with a short-lived client.
    async fn count_partitions(&self) -> Result<usize, SourceError> {
        let probe: BaseConsumer = self
            .settings
            .client_config(64)
            .create()
            .map_err(|e| SourceError::Fatal(format!("invalid Kafka configuration: {e}")))?;
        let brokers = self.settings.brokers.clone();
        let topics = self.settings.topics.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = probe.fetch_metadata(None, Duration::from_secs(15)).map_err(|e| {
                SourceError::Fatal(format!(
                    "cannot reach Kafka at {brokers}: {e}; check --brokers (AUDIT_BROKERS) and that the brokers are up"
                ))
            })?;
            let partitions = metadata
                .topics()
                .iter()
                .filter(|t| topics.iter().any(|name| name == t.name()))
                .map(|t| t.partitions().len())
                .sum();
            drop(metadata);
            // Destroying a client waits about 100 ms for librdkafka's
            // threads to notice (measured: the metadata itself takes under
            // a millisecond on loopback). Nothing depends on the probe
            // being gone, so the node does not wait for it.
            close_in_background("kafka-probe-close", probe);
            Ok(partitions)
        })
        .await
        .map_err(|e| SourceError::Fatal(e.to_string()))?
    }
}

struct KafkaHandle {
    consumer: Option<Arc<KafkaConsumer>>,
    main_loop: JoinHandle<()>,
}

#[async_trait]
impl ConnectorHandle for KafkaHandle {
    async fn shutdown(mut self: Box<Self>) {
        self.main_loop.abort();
        let _ = (&mut self.main_loop).await;
        if let Some(consumer) = self.consumer.take() {
            // Closing can block for the session timeout if brokers are gone:
            // do it off the async workers, and do not wait forever.
            let closing = tokio::task::spawn_blocking(move || {
                consumer.unsubscribe();
                drop(consumer);
            });
            if tokio::time::timeout(Duration::from_secs(10), closing)
                .await
                .is_err()
            {
                tracing::warn!("kafka consumer did not close within 10s; leaving it behind");
            }
        }
    }
}

impl Drop for KafkaHandle {
    /// Reached without `shutdown` when the consumer actor failed: close the
    /// client on a plain thread, never on an async worker.
    fn drop(&mut self) {
        self.main_loop.abort();
        if let Some(consumer) = self.consumer.take() {
            close_in_background("kafka-close", consumer);
        }
    }
}

/// Drops a Kafka client on a plain thread of its own, not waited for:
/// destroying one blocks until librdkafka's threads notice (about 100 ms,
/// longer with brokers gone). If no thread can be started it is dropped here.
fn close_in_background<T: Send + 'static>(name: &str, client: T) {
    let _ = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || drop(client));
}

pub struct KafkaPartitionSource {
    topic: String,
    partition: i32,
    consumer: Arc<KafkaConsumer>,
    ahead: Arc<ReadAhead>,
    /// The partition's queue, until the first read starts the reader task.
    queue: Mutex<Option<StreamPartitionQueue<KafkaContext>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// Seeks, pauses and resumes one partition of the consumer.
struct PartitionFetch {
    consumer: Weak<KafkaConsumer>,
    topic: String,
    partition: i32,
    tpl: TopicPartitionList,
    owners: Arc<Owners>,
    generation: u64,
}

impl PartitionFetch {
    fn superseded(&self) -> bool {
        !self
            .owners
            .is_current(&self.topic, self.partition, self.generation)
    }
}

impl FetchControl for PartitionFetch {
    fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
        let Some(consumer) = self.consumer.upgrade() else {
            return Err(SourceError::Transient("the consumer is closing".into()));
        };
        if self.superseded() {
            return Err(SourceError::Transient(format!(
                "seek of {}/{}: the partition was assigned again, to a newer source",
                self.topic, self.partition
            )));
        }
        let (topic, partition) = (&self.topic, self.partition);
        let target = offset.map_or(Offset::Beginning, Offset::Offset);
        // Right after an assignment librdkafka may not accept a seek yet.
        let mut last = None;
        for attempt in 0..20u64 {
            let started = std::time::Instant::now();
            match consumer.seek(
                topic,
                partition,
                target,
                Timeout::After(Duration::from_secs(10)),
            ) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(
                        topic = %topic,
                        partition,
                        attempt = attempt + 1,
                        waited_ms = started.elapsed().as_millis() as u64,
                        error = %e,
                        "partition seek failed; retrying"
                    );
                    last = Some(e);
                    // A partition revoked meanwhile fails every seek
                    // ("Erroneous state"): give up at once, so that the
                    // actor sees its stop instead of retrying for seconds.
                    let assigned = consumer
                        .assignment()
                        .map(|tpl| tpl.find_partition(topic, partition).is_some());
                    if let Ok(false) = assigned {
                        return Err(SourceError::Transient(format!(
                            "seek of {topic}/{partition}: the partition is no longer assigned to this consumer"
                        )));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        Err(SourceError::Fatal(format!(
            "seek of {topic}/{partition} to {target:?} failed: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    fn set_paused(&self, paused: bool) -> Result<(), String> {
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        // Calls run in order on one thread: a newer source's first call (a
        // resume, see `start_reader`) comes after any of this one's.
        if self.superseded() {
            return Ok(());
        }
        let result = if paused {
            consumer.pause(&self.tpl)
        } else {
            consumer.resume(&self.tpl)
        };
        result.map_err(|e| format!("pause or resume failed: {e}"))
    }
}

impl KafkaPartitionSource {
    fn new(
        topic: String,
        partition: i32,
        queue: StreamPartitionQueue<KafkaContext>,
        consumer: Arc<KafkaConsumer>,
        prefetch_bytes: usize,
        owners: Arc<Owners>,
    ) -> Self {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let generation = owners.take_over(&topic, partition);
        let control = PartitionFetch {
            consumer: Arc::downgrade(&consumer),
            topic: topic.clone(),
            partition,
            tpl,
            owners,
            generation,
        };
        Self {
            topic,
            partition,
            consumer,
            ahead: ReadAhead::new(prefetch_bytes, Arc::new(control)),
            queue: Mutex::new(Some(queue)),
            reader: Mutex::new(None),
        }
    }

    /// Starts the reader task on the first read (a runtime is certain there;
    /// rebalance callbacks, which create sources, may run elsewhere).
    fn start_reader(&self) {
        let Some(queue) = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let ahead = self.ahead.clone();
        // An earlier source of this partition may have left it paused at the
        // broker: the reader's first call resumes it.
        ahead.assume_paused_at_broker();
        // Weak: the task must not keep the consumer alive past the source.
        let consumer = Arc::downgrade(&self.consumer);
        let (topic, partition) = (self.topic.clone(), self.partition);
        let task = tokio::spawn(async move {
            let mut queue = queue;
            loop {
                ahead.clone().fill(queue.stream(), to_record).await;
                // The queue's wake-up was lost (see `WAKEUP_CHECK`): drop this
                // handle first (its drop turns the wake-up off), then make a
                // new one, which turns it on for this reader.
                drop(queue);
                queue = loop {
                    let Some(consumer) = consumer.upgrade() else {
                        return;
                    };
                    if let Some(again) = consumer.split_partition_queue(&topic, partition) {
                        break again;
                    }
                    // Unknown to librdkafka for now (a metadata refresh):
                    // try again; a revoke drops the source and ends this task.
                    tracing::warn!(
                        topic,
                        partition,
                        "read-ahead: cannot make a new handle of the partition queue; retrying"
                    );
                    drop(consumer);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
            }
        });
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }
}

impl Drop for KafkaPartitionSource {
    fn drop(&mut self) {
        if let Some(task) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

fn to_record(message: &BorrowedMessage<'_>) -> RawRecord {
    RawRecord {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| Header {
                        key: h.key.to_string(),
                        value: h.value.map(<[u8]>::to_vec),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

impl KafkaPartitionSource {
    fn tpl(&self, offset: Option<Offset>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        match offset {
            Some(offset) => {
                let _ = tpl.add_partition_offset(&self.topic, self.partition, offset);
            }
            None => {
                tpl.add_partition(&self.topic, self.partition);
            }
        }
        tpl
    }
}

#[async_trait]
impl RecordSource for KafkaPartitionSource {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    async fn next_batch(
        &self,
        max: usize,
        max_wait: Duration,
        linger: Duration,
    ) -> Result<Vec<RawRecord>, SourceError> {
        self.start_reader();
        let first_deadline = tokio::time::Instant::now() + max_wait;
        // The recycled buffer is taken only once there is something to read.
        while !self.ahead.readable() {
            if tokio::time::timeout_at(first_deadline, self.ahead.arrived())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
        }
        // A batch holds at most twice the read-ahead's bound: with hundreds
        // of partitions the batches in flight, not the buffers, would
        // otherwise hold most of the node's memory (batch_max_records each).
        let budget = self.ahead.limit_bytes().saturating_mul(2);
        let mut records = audit_ledger::batch::record_buffer(max.min(4096));
        let mut bytes = match self.ahead.take(max, budget, &mut records) {
            Taken::Records(bytes) => bytes,
            Taken::Empty => 0,
            Taken::Error(error) => return Err(SourceError::Transient(error)),
            Taken::Ended => {
                return Err(SourceError::Transient("the partition stream ended".into()))
            }
        };
        // Linger for more, taking what arrives as it arrives, so the buffer
        // keeps room and the partition keeps fetching meanwhile.
        let deadline = tokio::time::Instant::now() + linger;
        while records.len() < max && bytes < budget {
            let (moved, more) =
                self.ahead
                    .take_records(max - records.len(), budget - bytes, &mut records);
            if moved > 0 {
                bytes += more;
                continue;
            }
            // An error or the end shows on the next read.
            if linger.is_zero()
                || self.ahead.interrupted()
                || tokio::time::timeout_at(deadline, self.ahead.arrived())
                    .await
                    .is_err()
            {
                break;
            }
        }
        Ok(records)
    }

    async fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
        self.start_reader();
        self.ahead.seek(offset).await
    }

    async fn end_offset(&self) -> Result<Option<i64>, SourceError> {
        let consumer = self.consumer.clone();
        let (topic, partition) = (self.topic.clone(), self.partition);
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map(|(_low, high)| Some(high))
                .map_err(|e| {
                    SourceError::Transient(format!("watermarks of {topic}/{partition}: {e}"))
                })
        })
        .await
        .map_err(|e| SourceError::Fatal(e.to_string()))?
    }

    fn pause(&self) -> Result<(), SourceError> {
        self.start_reader();
        self.ahead.hold();
        Ok(())
    }

    fn resume(&self) -> Result<(), SourceError> {
        self.start_reader();
        self.ahead.release();
        Ok(())
    }

    fn commit(&self, next_offset: i64) {
        if let Err(error) = self.consumer.commit(
            &self.tpl(Some(Offset::Offset(next_offset))),
            CommitMode::Async,
        ) {
            // Expected during rebalances; the store holds the real offset.
            tracing::debug!(topic = %self.topic, partition = self.partition, error = %error, "informational kafka commit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_assigned_again_belongs_to_its_newest_source() {
        let owners = Owners::default();
        let old = owners.take_over("orders", 3);
        let other = owners.take_over("orders", 4);
        let new = owners.take_over("orders", 3);
        assert!(
            !owners.is_current("orders", 3, old),
            "the old source may no longer pause it"
        );
        assert!(owners.is_current("orders", 3, new));
        assert!(owners.is_current("orders", 4, other));
    }

    fn settings(extra: &[(&str, &str)]) -> KafkaSettings {
        let mut settings = KafkaSettings::new("localhost:9092", vec!["orders".into()], "g");
        settings.extra = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings
    }

    #[test]
    fn a_fetch_of_idle_partitions_is_parked_at_most_100_ms() {
        let config = settings(&[]).client_config(512);
        assert_eq!(config.get("fetch.wait.max.ms"), Some("100"));
    }

    #[test]
    fn operators_may_tune_fetching_but_not_what_exactly_once_relies_on() {
        let config = settings(&[
            ("fetch.wait.max.ms", "500"),
            ("enable.auto.commit", "true"),
            ("queued.max.messages.kbytes", "999999"),
        ])
        .client_config(512);
        assert_eq!(config.get("fetch.wait.max.ms"), Some("500"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("512"));
    }
}
