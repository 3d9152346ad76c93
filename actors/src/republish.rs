//! Replay jobs, run: the [`ReplayRunner`] actor claims a job from the
//! `replay_jobs` table (`audit_ledger::replay_jobs`, which documents the
//! lifecycle and which events a job covers) and republishes its events to
//! Kafka through a [`Republisher`], one page at a time, at the job's rate.
//!
//! - **At least once.** A page is published, then every delivery is awaited,
//!   and only then is the cursor recorded. The cursor covers the longest
//!   acknowledged prefix of the page. A runner that dies mid-page leaves that
//!   page (at most `max_page` events after the recorded cursor) to be
//!   published again when the job resumes; a page that fails is retried, and
//!   its unacknowledged part is published again. Nothing else is ever
//!   published twice. Consumers deduplicate by the `x-audit-event-id` header.
//! - **Resumes.** A runner that stops cleanly releases its lease, so any
//!   runner resumes the job at once; one that dies (or a node that is
//!   killed) holds it until the lease expires (`lease`, 60 s by default),
//!   then any runner on any node resumes from the recorded cursor.
//! - **Order.** Events are sent in `(tx, seq)` order and keyed by
//!   `stream_id`; the idempotent producer keeps per-partition order, so each
//!   stream's events arrive in order.
//! - **Rate.** A pacer spaces sends by `1 / rate_per_sec`, with bursts of at
//!   most 100 ms worth after an idle spell. A page holds at most one second's
//!   worth of events (`min(max_page, rate_per_sec)`), so the actor is back at
//!   its mailbox (and sees a stop) within about a second plus the time the
//!   acknowledgements take (at most `ack_timeout`).
//! - **Failures.** A fatal publishing error (unknown topic, record too large,
//!   not authorised) fails the job at once with the error. Transient ones
//!   (broker unreachable, timeouts) retry the page with exponential backoff,
//!   and fail the job after `max_attempts` consecutive failed pages.
//!   Database errors never fail a job: they are retried.
//!
//! One job at a time per runner; one runner per node. Jobs are spread over
//! nodes by the lease (`FOR UPDATE SKIP LOCKED`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use audit_ledger::query::Position;
use audit_ledger::replay_jobs::{self, Job, ReplayError, ReplayRecord};
use futures::future::{BoxFuture, FutureExt};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::supervisor::ChildSpec;

/// Why a record could not be published, split by what the runner does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepublishError {
    /// The broker may accept it later: retry the page.
    #[error("publishing failed, will retry: {0}")]
    Transient(String),
    /// Retrying will not help: fail the job with this message.
    #[error("publishing failed: {0}")]
    Fatal(String),
}

/// Resolves when the broker acknowledged the record (`acks=all`), or failed.
pub type Delivery = BoxFuture<'static, Result<(), RepublishError>>;

/// Publishes records to a topic. [`KafkaRepublisher`] is the product;
/// [`MemoryRepublisher`] is for tests.
#[async_trait]
pub trait Republisher: Send + Sync + 'static {
    /// Enqueues one record. Records enqueued in order with the same key are
    /// delivered in that order. Awaiting the returned [`Delivery`] waits for
    /// the acknowledgement.
    async fn send(&self, topic: &str, record: ReplayRecord) -> Result<Delivery, RepublishError>;

    /// Waits until every enqueued record is delivered or failed, at most
    /// `timeout` (shutdown).
    async fn flush(&self, timeout: Duration) -> Result<(), RepublishError>;
}

/// How long librdkafka retries one record before failing its delivery.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `send` waits for room when librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);

/// Publishes with an idempotent rdkafka producer (`acks=all`), so its own
/// retries neither duplicate nor reorder records within a partition.
///
/// The producer is created on the first record: its polling thread costs
/// CPU even when idle (about 0.8% of a core, measured), and most nodes
/// never run a replay job.
pub struct KafkaRepublisher {
    config: ClientConfig,
    brokers: String,
    producer: std::sync::OnceLock<FutureProducer>,
}

impl KafkaRepublisher {
    /// `extra` are librdkafka properties (security) applied first; the
    /// delivery guarantees below cannot be overridden.
    pub fn new(brokers: &str, extra: &BTreeMap<String, String>) -> Result<Self, RepublishError> {
        let mut config = ClientConfig::new();
        for (key, value) in extra {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", "audit-node-replay")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            );
        // Fail at start-up on a bad configuration, not at the first job.
        config
            .create::<BaseProducer>()
            .map_err(|e| create_error(brokers, &e))?;
        Ok(Self {
            config,
            brokers: brokers.to_owned(),
            producer: std::sync::OnceLock::new(),
        })
    }

    fn producer(&self) -> Result<&FutureProducer, RepublishError> {
        if let Some(producer) = self.producer.get() {
            return Ok(producer);
        }
        let producer = self
            .config
            .create()
            .map_err(|e| create_error(&self.brokers, &e))?;
        // Two first sends at once: the loser's producer is dropped unused.
        Ok(self.producer.get_or_init(|| producer))
    }
}

fn create_error(brokers: &str, error: &KafkaError) -> RepublishError {
    RepublishError::Fatal(format!(
        "cannot create a Kafka producer for {brokers}: {error}; check --brokers (AUDIT_BROKERS)"
    ))
}

/// Errors a retry cannot fix: the job fails with the broker's words.
fn classify(error: &KafkaError, topic: &str) -> RepublishError {
    use RDKafkaErrorCode as C;
    let code = match error {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition) => RepublishError::Fatal(format!(
            "topic {topic} does not exist and was not created: {error}; create it, then submit a new job"
        )),
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidArgument
            | C::Fatal,
        ) => RepublishError::Fatal(format!("publishing to topic {topic}: {error}")),
        _ => RepublishError::Transient(format!("publishing to topic {topic}: {error}")),
    }
}

#[async_trait]
impl Republisher for KafkaRepublisher {
    async fn send(&self, topic: &str, record: ReplayRecord) -> Result<Delivery, RepublishError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: value.as_deref(),
                })
            },
        );
        let mut future_record = FutureRecord::to(topic)
            .key(&record.key[..])
            .payload(&record.value[..])
            .headers(headers);
        let deadline = Instant::now() + QUEUE_FULL_WAIT;
        let delivery = loop {
            match self.producer()?.send_result(future_record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if Instant::now() < deadline =>
                {
                    future_record = returned;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(classify(&error, topic)),
            }
        };
        let topic = topic.to_owned();
        Ok(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _message))) => Err(classify(&error, &topic)),
                Err(_canceled) => Err(RepublishError::Transient(format!(
                    "the producer dropped a record for topic {topic} before delivery"
                ))),
            }
        }
        .boxed())
    }

    async fn flush(&self, timeout: Duration) -> Result<(), RepublishError> {
        let Some(producer) = self.producer.get().cloned() else {
            return Ok(()); // never sent anything
        };
        // flush blocks the calling thread.
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| RepublishError::Transient(format!("flush task failed: {e}")))?
            .map_err(|e| RepublishError::Transient(format!("flushing the replay producer: {e}")))
    }
}

/// Keeps published records in memory; tests can make deliveries fail.
#[derive(Default)]
pub struct MemoryRepublisher {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    published: Vec<(String, ReplayRecord)>,
    /// Errors of the next deliveries: each send takes one, and its record
    /// is not kept.
    failures: VecDeque<RepublishError>,
    /// While set, every delivery fails with it (a broker that is down).
    failing: Option<RepublishError>,
}

impl MemoryRepublisher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record acknowledged so far, with its topic, in send order.
    pub fn published(&self) -> Vec<(String, ReplayRecord)> {
        self.lock().published.clone()
    }

    /// Makes the next deliveries fail with these errors, one each.
    pub fn fail_next(&self, errors: impl IntoIterator<Item = RepublishError>) {
        self.lock().failures.extend(errors);
    }

    /// Makes every delivery fail with `error` until called with `None`.
    pub fn set_failing(&self, error: Option<RepublishError>) {
        self.lock().failing = error;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Republisher for MemoryRepublisher {
    async fn send(&self, topic: &str, record: ReplayRecord) -> Result<Delivery, RepublishError> {
        let mut inner = self.lock();
        if let Some(error) = inner.failures.pop_front().or_else(|| inner.failing.clone()) {
            return Ok(futures::future::ready(Err(error)).boxed());
        }
        inner.published.push((topic.to_owned(), record));
        Ok(futures::future::ready(Ok(())).boxed())
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), RepublishError> {
        Ok(())
    }
}

/// Tuning of the replay runner.
#[derive(Debug, Clone)]
pub struct ReplayRunnerConfig {
    /// Part of the lease owner (`node_id/<random>`), for operators reading
    /// `replay_jobs.lease_owner`.
    pub node_id: String,
    /// How often an idle runner looks for a job.
    pub poll_interval: Duration,
    /// How long a claim holds; renewed by every recorded page. A dead
    /// runner's job resumes elsewhere after at most this.
    pub lease: Duration,
    /// Most events per page (also at most one second's worth at the job's rate).
    pub max_page: usize,
    /// How long to wait for a page's acknowledgements before retrying it.
    pub ack_timeout: Duration,
    /// Consecutive failed pages before the job fails.
    pub max_attempts: u32,
    /// Retry delays (exponential, capped).
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Default for ReplayRunnerConfig {
    fn default() -> Self {
        Self {
            node_id: "node".into(),
            poll_interval: Duration::from_secs(2),
            lease: Duration::from_secs(60),
            max_page: 500,
            ack_timeout: MESSAGE_TIMEOUT + Duration::from_secs(5),
            max_attempts: 8,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The node supervisor's child name.
pub const REPLAY_RUNNER_CHILD: &str = "replay-runner";

/// Starts the replay runner under the node supervisor. `pool` needs the
/// `audit_api` role's privileges (SELECT on `events`, UPDATE on
/// `replay_jobs`).
pub struct ReplayRunnerSpec {
    pub pool: PgPool,
    pub republisher: Arc<dyn Republisher>,
    pub config: Arc<ReplayRunnerConfig>,
}

#[async_trait]
impl ChildSpec for ReplayRunnerSpec {
    fn name(&self) -> &str {
        REPLAY_RUNNER_CHILD
    }

    async fn spawn(&self, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
        let args = ReplayRunnerArgs {
            pool: self.pool.clone(),
            republisher: self.republisher.clone(),
            config: self.config.clone(),
        };
        let (actor, _join) = Actor::spawn_linked(None, ReplayRunner, args, supervisor)
            .await
            .map_err(crate::supervisor::startup_error)?;
        Ok(actor.get_cell())
    }
}

pub struct ReplayRunner;

pub enum ReplayRunnerMsg {
    /// Do the next step: look for a job, or publish the next page.
    Step,
    /// The id of the job being run, if any (tests, health).
    CurrentJob(RpcReplyPort<Option<String>>),
}

pub struct ReplayRunnerArgs {
    pub pool: PgPool,
    pub republisher: Arc<dyn Republisher>,
    pub config: Arc<ReplayRunnerConfig>,
}

pub struct ReplayRunnerState {
    pool: PgPool,
    republisher: Arc<dyn Republisher>,
    config: Arc<ReplayRunnerConfig>,
    /// This incarnation's lease owner: a restarted runner never mistakes an
    /// older incarnation's lease for its own.
    owner: String,
    running: Option<Running>,
    /// Consecutive failed claims, for the backoff.
    claim_failures: u32,
}

/// The job this runner holds.
struct Running {
    job: Job,
    /// Everything up to here is acknowledged and recorded.
    after: Option<Position>,
    published: u64,
    pacer: Pacer,
    /// Consecutive failed pages.
    failures: u32,
}

impl Actor for ReplayRunner {
    type Msg = ReplayRunnerMsg;
    type State = ReplayRunnerState;
    type Arguments = ReplayRunnerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ReplayRunnerMsg>,
        args: ReplayRunnerArgs,
    ) -> Result<ReplayRunnerState, ActorProcessingErr> {
        let owner = format!("{}/{}", args.config.node_id, uuid::Uuid::new_v4());
        myself.send_message(ReplayRunnerMsg::Step)?;
        Ok(ReplayRunnerState {
            pool: args.pool,
            republisher: args.republisher,
            config: args.config,
            owner,
            running: None,
            claim_failures: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplayRunnerMsg>,
        msg: ReplayRunnerMsg,
        state: &mut ReplayRunnerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplayRunnerMsg::Step => {
                let delay = state.step().await;
                if delay.is_zero() {
                    myself.send_message(ReplayRunnerMsg::Step)?;
                } else {
                    myself.send_after(delay, || ReplayRunnerMsg::Step);
                }
            }
            ReplayRunnerMsg::CurrentJob(reply) => {
                let _ = reply.send(state.running.as_ref().map(|r| r.job.job_id.clone()));
            }
        }
        Ok(())
    }

    /// Not called when the actor is killed or fails: the lease then expires.
    async fn post_stop(
        &self,
        _myself: ActorRef<ReplayRunnerMsg>,
        state: &mut ReplayRunnerState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(running) = state.running.take() else {
            return Ok(());
        };
        let job_id = running.job.job_id;
        let release = replay_jobs::release(&state.pool, &job_id, &state.owner);
        match tokio::time::timeout(Duration::from_secs(5), release).await {
            Ok(Ok(_)) => telemetry::released(&job_id, running.published),
            Ok(Err(error)) => telemetry::release_failed(&job_id, &error),
            Err(_) => telemetry::release_failed(&job_id, &"timed out after 5 s"),
        }
        Ok(())
    }
}

/// What one page came to.
enum PageOutcome {
    /// Nothing left: the job is done.
    Empty,
    /// Every event of the page acknowledged and recorded.
    Published,
    /// Part of the page (maybe none) was recorded; then this error.
    Failed(RepublishError),
}

impl ReplayRunnerState {
    /// One step; returns how long to wait before the next (zero: at once).
    async fn step(&mut self) -> Duration {
        if self.running.is_none() {
            return self.claim().await;
        }
        match self.publish_page().await {
            Ok(PageOutcome::Published) => {
                if let Some(running) = &mut self.running {
                    running.failures = 0;
                }
                Duration::ZERO
            }
            Ok(PageOutcome::Empty) => self.finish().await,
            Ok(PageOutcome::Failed(RepublishError::Fatal(error))) => self.fail(&error).await,
            Ok(PageOutcome::Failed(RepublishError::Transient(error))) => {
                self.retry_later(error).await
            }
            Err(ReplayError::LeaseLost { job_id, .. }) => {
                telemetry::lease_lost(&job_id);
                self.running = None;
                Duration::ZERO
            }
            Err(error) if error.is_retryable() => self.retry_later(error.to_string()).await,
            Err(error) => self.fail(&error.to_string()).await,
        }
    }

    async fn claim(&mut self) -> Duration {
        let job = match replay_jobs::claim_next(&self.pool, &self.owner, self.config.lease).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                self.claim_failures = 0;
                return self.config.poll_interval;
            }
            Err(error) => {
                self.claim_failures += 1;
                let delay = self.backoff(self.claim_failures);
                telemetry::claim_failed(self.claim_failures, delay, &error);
                return delay;
            }
        };
        self.claim_failures = 0;
        let after = job.position();
        let published = job.published;
        let pacer = Pacer::new(job.request.rate_per_sec);
        telemetry::claimed(&job, &self.owner);
        let count = job.total.is_none();
        self.running = Some(Running {
            job,
            after: None,
            published,
            pacer,
            failures: 0,
        });
        match after {
            Ok(after) => {
                if let Some(running) = &mut self.running {
                    running.after = after;
                }
            }
            Err(error) => return self.fail(&error.to_string()).await,
        }
        if count {
            self.count_total().await;
        }
        Duration::ZERO
    }

    /// Counts the job's events for its progress display; a failure only
    /// leaves `total` empty until the next claim.
    async fn count_total(&mut self) {
        let Some(running) = &mut self.running else {
            return;
        };
        match replay_jobs::count_total(&self.pool, &running.job, &self.owner).await {
            Ok(total) => {
                running.job.total = Some(total);
                // The count may have taken a while: keep the lease.
                if let Err(error) = replay_jobs::renew(
                    &self.pool,
                    &running.job.job_id,
                    &self.owner,
                    self.config.lease,
                )
                .await
                {
                    telemetry::count_failed(&running.job.job_id, &error);
                }
            }
            Err(error) => telemetry::count_failed(&running.job.job_id, &error),
        }
    }

    /// Publishes the next page and records what was acknowledged.
    async fn publish_page(&mut self) -> Result<PageOutcome, ReplayError> {
        let Some(running) = &mut self.running else {
            return Ok(PageOutcome::Empty);
        };
        let job = &running.job;
        let page_size = self
            .config
            .max_page
            .min(job.request.rate_per_sec as usize)
            .max(1);
        let events = replay_jobs::fetch_page(&self.pool, job, running.after, page_size).await?;
        if events.is_empty() {
            return Ok(PageOutcome::Empty);
        }
        let topic = job.request.target_topic.as_str();
        let mut deliveries = Vec::with_capacity(events.len());
        let mut send_error = None;
        for event in &events {
            running.pacer.acquire().await;
            let record = replay_jobs::replay_record(&job.job_id, event);
            match self.republisher.send(topic, record).await {
                Ok(delivery) => deliveries.push(delivery),
                Err(error) => {
                    send_error = Some(error);
                    break;
                }
            }
        }
        let (acked, error) = match tokio::time::timeout(
            self.config.ack_timeout,
            futures::future::join_all(deliveries),
        )
        .await
        {
            Ok(results) => {
                let acked = results.iter().take_while(|r| r.is_ok()).count();
                let error = results.into_iter().find_map(Result::err).or(send_error);
                (acked, error)
            }
            Err(_) => (
                0,
                Some(RepublishError::Transient(format!(
                    "no acknowledgement from Kafka within {:?}",
                    self.config.ack_timeout
                ))),
            ),
        };
        if let Some(last) = acked.checked_sub(1).and_then(|i| events.get(i)) {
            let published = running.published + acked as u64;
            replay_jobs::record_progress(
                &self.pool,
                &job.job_id,
                &self.owner,
                last.position,
                published,
                self.config.lease,
            )
            .await?;
            running.after = Some(last.position);
            running.published = published;
            telemetry::page_published(&job.job_id, topic, acked, published, job.total);
        }
        Ok(match error {
            None => PageOutcome::Published,
            Some(error) => PageOutcome::Failed(error),
        })
    }

    async fn finish(&mut self) -> Duration {
        let Some(running) = &self.running else {
            return Duration::ZERO;
        };
        match replay_jobs::finish(&self.pool, &running.job.job_id, &self.owner).await {
            Ok(job) => {
                telemetry::finished(&job);
                self.running = None;
                Duration::ZERO
            }
            Err(ReplayError::LeaseLost { job_id, .. }) => {
                telemetry::lease_lost(&job_id);
                self.running = None;
                Duration::ZERO
            }
            Err(error) => self.retry_later(error.to_string()).await,
        }
    }

    async fn fail(&mut self, error: &str) -> Duration {
        let Some(running) = &self.running else {
            return Duration::ZERO;
        };
        match replay_jobs::fail(&self.pool, &running.job.job_id, &self.owner, error).await {
            Ok(job) => {
                telemetry::failed(&job, error);
                self.running = None;
                Duration::ZERO
            }
            Err(ReplayError::LeaseLost { job_id, .. }) => {
                telemetry::lease_lost(&job_id);
                self.running = None;
                Duration::ZERO
            }
            Err(store) => {
                // The job stays ours; the next step meets the error again.
                let delay = self.backoff(1);
                telemetry::retry(&running.job.job_id, 1, delay, &store);
                delay
            }
        }
    }

    /// Counts a failed page; past `max_attempts` in a row the job fails.
    async fn retry_later(&mut self, error: String) -> Duration {
        let Some(running) = &mut self.running else {
            return Duration::ZERO;
        };
        running.failures += 1;
        let attempts = running.failures;
        let job_id = running.job.job_id.clone();
        if attempts >= self.config.max_attempts {
            let message =
                format!("gave up after {attempts} failed attempts in a row; last error: {error}");
            return self.fail(&message).await;
        }
        let delay = self.backoff(attempts);
        telemetry::retry(&job_id, attempts, delay, &error);
        // Renew now: the backoff may outlast the lease.
        let renewed = replay_jobs::renew(&self.pool, &job_id, &self.owner, self.config.lease).await;
        if let Err(ReplayError::LeaseLost { .. }) = renewed {
            telemetry::lease_lost(&job_id);
            self.running = None;
        }
        delay
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }
}

/// Spaces sends `1 / rate` apart on a virtual schedule, so sleep overshoot
/// does not accumulate; after an idle spell at most `BURST` worth of sends
/// go at once.
struct Pacer {
    interval: Duration,
    next: Instant,
}

const BURST: Duration = Duration::from_millis(100);

impl Pacer {
    fn new(rate_per_sec: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate_per_sec.max(1),
            next: Instant::now(),
        }
    }

    async fn acquire(&mut self) {
        let now = Instant::now();
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        if self.next < earliest {
            self.next = earliest;
        }
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next += self.interval;
    }
}

/// The runner's log lines and metrics, one function each (see
/// `crate::telemetry` for the convention).
mod telemetry {
    use std::time::Duration;

    use audit_ledger::replay_jobs::Job;
    use metrics::counter;
    use tracing::{debug, info, warn};

    pub fn claimed(job: &Job, owner: &str) {
        info!(
            job_id = %job.job_id,
            owner,
            topic = %job.request.target_topic,
            published = job.published,
            rate_per_sec = job.request.rate_per_sec,
            "replay job claimed"
        );
    }

    pub fn page_published(
        job_id: &str,
        topic: &str,
        events: usize,
        published: u64,
        total: Option<u64>,
    ) {
        counter!("audit_replay_events_published_total").increment(events as u64);
        debug!(
            job_id,
            topic, events, published, total, "replay page published"
        );
    }

    pub fn finished(job: &Job) {
        counter!("audit_replay_jobs_finished_total", "state" => "done").increment(1);
        info!(job_id = %job.job_id, published = job.published, "replay job done");
    }

    pub fn failed(job: &Job, error: &str) {
        counter!("audit_replay_jobs_finished_total", "state" => "failed").increment(1);
        warn!(job_id = %job.job_id, published = job.published, error, "replay job failed");
    }

    pub fn retry(job_id: &str, attempt: u32, delay: Duration, error: &dyn std::fmt::Display) {
        counter!("audit_replay_retries_total").increment(1);
        warn!(
            job_id,
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            error = %error,
            "replay page failed, retrying"
        );
    }

    pub fn lease_lost(job_id: &str) {
        warn!(
            job_id,
            "replay job lease lost to another runner; dropping the job"
        );
    }

    pub fn released(job_id: &str, published: u64) {
        info!(job_id, published, "replay job released for another runner");
    }

    pub fn release_failed(job_id: &str, error: &dyn std::fmt::Display) {
        warn!(job_id, error = %error, "replay job not released; it resumes when its lease expires");
    }

    pub fn claim_failed(attempt: u32, delay: Duration, error: &dyn std::fmt::Display) {
        warn!(
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            error = %error,
            "looking for replay jobs failed, retrying"
        );
    }

    pub fn count_failed(job_id: &str, error: &dyn std::fmt::Display) {
        warn!(job_id, error = %error, "counting the replay job's events failed; total stays empty");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_sends_and_bursts_only_after_idling() {
        let mut pacer = Pacer::new(100);
        let start = Instant::now();
        for _ in 0..50 {
            pacer.acquire().await;
        }
        // The first at once, then one every 10 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(490));

        tokio::time::sleep(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..10 {
            pacer.acquire().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "100 ms worth at once after idling"
        );
        pacer.acquire().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn memory_republisher_fails_the_requested_deliveries() {
        let republisher = MemoryRepublisher::new();
        let record = ReplayRecord {
            key: b"k".to_vec(),
            value: b"{}".to_vec(),
            headers: Vec::new(),
        };
        republisher.fail_next([RepublishError::Transient("down".into())]);
        let first = republisher.send("t", record.clone()).await.unwrap().await;
        assert_eq!(first, Err(RepublishError::Transient("down".into())));
        republisher
            .send("t", record.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(republisher.published(), vec![("t".to_owned(), record)]);
    }

    #[test]
    fn kafka_errors_are_classified() {
        let fatal = classify(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "t",
        );
        assert!(matches!(fatal, RepublishError::Fatal(_)), "{fatal}");
        let missing = classify(
            &KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition),
            "replayed",
        );
        assert!(
            missing
                .to_string()
                .contains("topic replayed does not exist"),
            "{missing}"
        );
        let transient = classify(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            "t",
        );
        assert!(
            matches!(transient, RepublishError::Transient(_)),
            "{transient}"
        );
    }
}
