//! Replay jobs: republishing the events that match a filter to a Kafka
//! topic, as a tracked, resumable job (`POST /v1/replays`,
//! `GET /v1/replays/{id}`). This module is the job table
//! (`replay_jobs`, migration `…04_query_api.sql`) and the records a job
//! publishes; the runner that publishes them lives in
//! `audit_actors::republish`, so this crate stays free of Kafka.
//!
//! # Lifecycle
//!
//! 1. [`submit`] stores the job as `pending`. The job id is the client's
//!    idempotency key: the same id with the same request returns the stored
//!    job (`created == false`), whatever its state; the same id with another
//!    request is [`ReplayError::Conflict`].
//! 2. A runner takes it with [`claim_next`]: `running`, with a lease
//!    (`lease_owner`, `lease_until`). The first claim fixes the job's end,
//!    `until_tx`, and the runner then counts `total` ([`count_total`]).
//! 3. The runner reads pages in `(tx, seq)` order after its cursor
//!    ([`fetch_page`]), publishes them, waits for the broker's
//!    acknowledgements, and only then records the new cursor and count
//!    ([`record_progress`], which also renews the lease).
//! 4. [`finish`] (`done`) when a page comes back empty, or [`fail`]
//!    (`failed`, with the error) when publishing cannot succeed. Both are
//!    final: to replay again, submit a new job id.
//!
//! A runner that stops cleanly [`release`]s its lease, so another runner
//! resumes at once; one that dies holds it until `lease_until`, then any
//! runner (on any node) resumes the job from its recorded cursor. Every
//! write after the claim is fenced by the lease owner: a runner that lost
//! its lease gets [`ReplayError::LeaseLost`] and must drop the job.
//!
//! # Which events
//!
//! Exactly the events that match the filter and whose storing transaction
//! is older than `until_tx`, the oldest transaction still in flight when the
//! job was first claimed (`pg_snapshot_xmin(pg_current_snapshot())`). No
//! transaction below it can still commit, so that set is fixed for good: a
//! resumed job replays the same set, `total` is exact, and pages in
//! `(tx, seq)` order never skip an event (see [`crate::query`]). Events
//! stored after the job started are not replayed, and neither are the few
//! that committed while an older transaction was still open at that moment.
//!
//! # Delivery: at least once
//!
//! The cursor moves only after every event up to it was acknowledged by
//! the broker. A runner that dies mid-page publishes that page again when
//! the job resumes: an event is published more than once only if it belongs
//! to a page in flight when its runner died (or when a page failed and was
//! retried). Consumers deduplicate by the `x-audit-event-id` header.
//!
//! # What is published
//!
//! [`replay_record`]: the record key is the event's `stream_id` (the
//! store keeps no Kafka key, and our producers key by stream, so a stream's
//! events stay in order in one partition); the value is the event as our
//! native JSON envelope; the headers are the original ones plus the replay
//! headers. Payloads are republished **as stored**: protected fields stay
//! encrypted (`{"$enc": …}`), and erased subjects' fields stay erased.
//! Replays never decrypt. A replay is a bulk export to a topic whose readers
//! the access log cannot see, so decrypted personal data would leave the
//! audited path for good (and would outlive an erasure in the topic).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{PgPool, QueryBuilder, Row};

use crate::error::StoreError;
use crate::query::{self, EventFilter, EventRecord, PageQuery, Position, QueryError};

/// Events per second when the request names no rate.
pub const DEFAULT_RATE_PER_SEC: u32 = 1_000;
/// The highest rate a job may ask for.
pub const MAX_RATE_PER_SEC: u32 = 10_000;

/// Header: the id of the replay job that published the record.
pub const HEADER_REPLAY_JOB: &str = "x-audit-replay-job";
/// Header: the event id, for consumers to deduplicate by.
pub const HEADER_EVENT_ID: &str = "x-audit-event-id";
/// Headers: where the event was originally read (absent for system events).
pub const HEADER_ORIGINAL_TOPIC: &str = "x-audit-original-topic";
pub const HEADER_ORIGINAL_PARTITION: &str = "x-audit-original-partition";
pub const HEADER_ORIGINAL_OFFSET: &str = "x-audit-original-offset";
/// Original headers with this prefix are dropped: the namespace is ours,
/// and a producer must not be able to forge replay headers.
pub const RESERVED_HEADER_PREFIX: &str = "x-audit-";

/// Why a replay job operation failed, split by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request is invalid; the message says what to fix (400).
    #[error("{0}")]
    BadRequest(String),
    /// The job id is taken by a different request (409).
    #[error("replay job {job_id} already exists with a different request; POST the same request to see it, or choose another job id")]
    Conflict { job_id: String },
    /// The runner no longer holds the job's lease: another runner took it
    /// over. Drop the job without writing anything more.
    #[error("replay job {job_id} is no longer leased to {owner}; another runner took it over")]
    LeaseLost { job_id: String, owner: String },
    /// A stored job cannot be read back (a bug or a hand-edited row).
    #[error("replay job {job_id} is malformed: {reason}")]
    Malformed { job_id: String, reason: String },
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReplayError {
    /// Worth retrying later: the database was unavailable or too slow.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Query(QueryError::Unavailable(_) | QueryError::Timeout(_)) => true,
            _ => false,
        }
    }
}

impl From<sqlx::Error> for ReplayError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

fn default_rate() -> u32 {
    DEFAULT_RATE_PER_SEC
}

/// What to replay, where, and how fast. Stored as the job's `request`, and
/// compared as stored (jsonb equality) when a job id is submitted again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The filters of `GET /v1/events` (the API's [`EventFilter`]).
    #[serde(default)]
    pub filter: EventFilter,
    /// The Kafka topic to publish to.
    pub target_topic: String,
    /// Events per second, 1 to [`MAX_RATE_PER_SEC`].
    #[serde(default = "default_rate")]
    pub rate_per_sec: u32,
}

impl ReplayRequest {
    /// Checks everything the database would refuse, and more, with
    /// messages that say what to fix. [`submit`] calls it.
    pub fn validate(&self) -> Result<(), ReplayError> {
        validate_topic(&self.target_topic)?;
        if !(1..=MAX_RATE_PER_SEC).contains(&self.rate_per_sec) {
            return Err(ReplayError::BadRequest(format!(
                "rate_per_sec must be between 1 and {MAX_RATE_PER_SEC} events per second, got {}",
                self.rate_per_sec
            )));
        }
        let f = &self.filter;
        for (name, from, to) in [
            ("occurred", f.occurred_from, f.occurred_to),
            ("ingested", f.ingested_from, f.ingested_to),
        ] {
            if let (Some(from), Some(to)) = (from, to) {
                if from >= to {
                    return Err(ReplayError::BadRequest(format!(
                        "{name}_from ({from}) must be before {name}_to ({to}): the range is empty"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A Kafka topic name: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
fn validate_topic(topic: &str) -> Result<(), ReplayError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty()
        || topic.len() > 249
        || topic == "."
        || topic == ".."
        || !topic.chars().all(legal)
    {
        return Err(ReplayError::BadRequest(format!(
            "target_topic {topic:?} is not a valid Kafka topic name: use 1 to 249 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// A client-supplied job id: 1 to 128 of `[A-Za-z0-9._-]` (as the table's
/// CHECK constraint says).
pub fn validate_job_id(job_id: &str) -> Result<(), ReplayError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if job_id.is_empty() || job_id.len() > 128 || !job_id.chars().all(legal) {
        return Err(ReplayError::BadRequest(format!(
            "job id {job_id:?} is invalid: use 1 to 128 letters, digits, '.', '_' or '-' (a UUID works)"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Submitted, not yet claimed by a runner.
    Pending,
    /// Claimed at least once; runs, or waits for a runner to resume it.
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "done" => Self::Done,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// A replay job as stored: what `GET /v1/replays/{id}` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub job_id: String,
    pub state: JobState,
    pub request: ReplayRequest,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    /// Events published and acknowledged so far, in `(tx, seq)` order.
    pub published: u64,
    /// Matching events when the job started; `None` until counted.
    pub total: Option<u64>,
    /// The position of the last acknowledged event, as an opaque cursor
    /// (the same kind `GET /v1/events` returns: resume a read there).
    pub cursor: Option<String>,
    /// The job's end: only events of transactions below it are replayed.
    pub until_tx: Option<u64>,
    /// Why the job failed.
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The runner that holds the job, and until when.
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
}

impl Job {
    /// Where the job resumes: after this position (`None`: from the start).
    pub fn position(&self) -> Result<Option<Position>, ReplayError> {
        let Some(cursor) = &self.cursor else {
            return Ok(None);
        };
        Position::from_cursor(cursor)
            .map(Some)
            .map_err(|_| self.malformed(format!("cursor {cursor:?} does not decode")))
    }

    fn malformed(&self, reason: String) -> ReplayError {
        ReplayError::Malformed {
            job_id: self.job_id.clone(),
            reason,
        }
    }
}

/// Columns of [`job_from_row`], for `FROM replay_jobs j`.
const JOB_COLUMNS: &str = "j.job_id, j.state, j.request, j.created_at, j.created_by, j.published, \
     j.total, j.cursor, j.until_tx::text AS until_tx, j.error, j.updated_at, j.finished_at, \
     j.lease_owner, j.lease_until";

fn job_from_row(row: &PgRow) -> Result<Job, ReplayError> {
    let job_id: String = row.try_get("job_id")?;
    let malformed = |reason: String| ReplayError::Malformed {
        job_id: job_id.clone(),
        reason,
    };
    let state: String = row.try_get("state")?;
    let state =
        JobState::parse(&state).ok_or_else(|| malformed(format!("unknown state {state:?}")))?;
    let request: Value = row.try_get("request")?;
    let request: ReplayRequest =
        serde_json::from_value(request).map_err(|e| malformed(format!("request: {e}")))?;
    let until_tx: Option<String> = row.try_get("until_tx")?;
    let until_tx = until_tx
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| malformed(format!("until_tx {t:?}")))
        })
        .transpose()?;
    let published: i64 = row.try_get("published")?;
    let total: Option<i64> = row.try_get("total")?;
    Ok(Job {
        state,
        request,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
        published: published.max(0) as u64,
        total: total.map(|t| t.max(0) as u64),
        cursor: row.try_get("cursor")?,
        until_tx,
        error: row.try_get("error")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
        job_id,
    })
}

fn lease_millis(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// Stores a new job, or returns the one already stored under `job_id` if
/// its request is the same (`created == false`). The request is validated
/// first; a different request under the same id is [`ReplayError::Conflict`].
pub async fn submit(
    pool: &PgPool,
    job_id: &str,
    request: &ReplayRequest,
    created_by: &str,
) -> Result<(Job, bool), ReplayError> {
    validate_job_id(job_id)?;
    request.validate()?;
    let request_json = serde_json::to_value(request)
        .map_err(|e| ReplayError::BadRequest(format!("the request cannot be stored: {e}")))?;
    let mut qb = QueryBuilder::<Postgres>::new(
        "INSERT INTO replay_jobs AS j (job_id, created_by, request, target_topic, state) VALUES (",
    );
    qb.push_bind(job_id)
        .push(", ")
        .push_bind(created_by)
        .push(", ")
        .push_bind(sqlx::types::Json(&request_json))
        .push("::jsonb, ")
        .push_bind(&request.target_topic)
        .push(", 'pending') ON CONFLICT (job_id) DO NOTHING RETURNING ")
        .push(JOB_COLUMNS);
    if let Some(row) = qb.build().fetch_optional(pool).await? {
        return Ok((job_from_row(&row)?, true));
    }
    // Taken: the same request (as jsonb values) is the same job. Rows are
    // never deleted, so the row is still there.
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(JOB_COLUMNS)
        .push(", j.request = ")
        .push_bind(sqlx::types::Json(&request_json))
        .push("::jsonb AS same FROM replay_jobs j WHERE j.job_id = ")
        .push_bind(job_id);
    let row = qb.build().fetch_one(pool).await?;
    let same: bool = row.try_get("same")?;
    if !same {
        return Err(ReplayError::Conflict {
            job_id: job_id.to_owned(),
        });
    }
    Ok((job_from_row(&row)?, false))
}

/// The job stored under `job_id`, if any.
pub async fn get(pool: &PgPool, job_id: &str) -> Result<Option<Job>, ReplayError> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(JOB_COLUMNS)
        .push(" FROM replay_jobs j WHERE j.job_id = ")
        .push_bind(job_id);
    let row = qb.build().fetch_optional(pool).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Claims the oldest job that is pending, or running with no live lease
/// (its runner released it or died), for `owner` until `lease` from now.
/// The first claim of a job fixes its `until_tx`. `owner` must be unique
/// per runner incarnation (node id plus a random part): the lease fences
/// every later write by it.
pub async fn claim_next(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
) -> Result<Option<Job>, ReplayError> {
    let mut qb = QueryBuilder::<Postgres>::new(
        "WITH next AS (
             SELECT job_id FROM replay_jobs
             WHERE state IN ('pending', 'running') AND (lease_until IS NULL OR lease_until < now())
             ORDER BY created_at, job_id LIMIT 1 FOR UPDATE SKIP LOCKED)
         UPDATE replay_jobs j SET state = 'running', lease_owner = ",
    );
    qb.push_bind(owner)
        .push(", lease_until = now() + make_interval(secs => ")
        .push_bind(lease_millis(lease))
        .push("::float8 / 1000), until_tx = coalesce(j.until_tx, pg_snapshot_xmin(pg_current_snapshot())), updated_at = now()")
        .push(" FROM next WHERE j.job_id = next.job_id RETURNING ")
        .push(JOB_COLUMNS);
    let row = qb.build().fetch_optional(pool).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Counts the events the job replays and stores the count as its `total`
/// (once; later calls return the stored count). One scan with the job's
/// filter: run it after the claim, not in the request path.
pub async fn count_total(pool: &PgPool, job: &Job, owner: &str) -> Result<u64, ReplayError> {
    if let Some(total) = job.total {
        return Ok(total);
    }
    let until = job
        .until_tx
        .ok_or_else(|| job.malformed("it was never claimed (no until_tx)".into()))?;
    let mut qb = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events e WHERE e.tx < ");
    qb.push_bind(until.to_string()).push("::xid8");
    job.request.filter.push_conditions(&mut qb);
    let total: i64 = qb
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(QueryError::from)?;
    let updated = sqlx::query(
        "UPDATE replay_jobs SET total = $3, updated_at = now()
         WHERE job_id = $1 AND lease_owner = $2 AND total IS NULL",
    )
    .bind(&job.job_id)
    .bind(owner)
    .bind(total)
    .execute(pool)
    .await?
    .rows_affected();
    if updated == 0 {
        lease_lost_unless_counted(pool, &job.job_id, owner).await?;
    }
    Ok(total.max(0) as u64)
}

/// After a fenced update changed nothing: fine if the total was already
/// there under our lease, [`ReplayError::LeaseLost`] otherwise.
async fn lease_lost_unless_counted(
    pool: &PgPool,
    job_id: &str,
    owner: &str,
) -> Result<(), ReplayError> {
    let ours: Option<bool> = sqlx::query_scalar(
        "SELECT lease_owner IS NOT DISTINCT FROM $2 FROM replay_jobs WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(owner)
    .fetch_optional(pool)
    .await?;
    match ours {
        Some(true) => Ok(()),
        _ => Err(lease_lost(job_id, owner)),
    }
}

fn lease_lost(job_id: &str, owner: &str) -> ReplayError {
    ReplayError::LeaseLost {
        job_id: job_id.to_owned(),
        owner: owner.to_owned(),
    }
}

/// Runs a fenced update: exactly one row of a running job leased to `owner`.
async fn fenced(
    pool: &PgPool,
    job_id: &str,
    owner: &str,
    set: &str,
    bind: impl FnOnce(&mut QueryBuilder<'_, Postgres>),
) -> Result<Job, ReplayError> {
    let mut qb = QueryBuilder::<Postgres>::new("UPDATE replay_jobs j SET ");
    qb.push(set);
    bind(&mut qb);
    qb.push(", updated_at = now() WHERE j.job_id = ")
        .push_bind(job_id.to_owned())
        .push(" AND j.lease_owner = ")
        .push_bind(owner.to_owned())
        .push(" AND j.state = 'running' RETURNING ")
        .push(JOB_COLUMNS);
    match qb.build().fetch_optional(pool).await? {
        Some(row) => job_from_row(&row),
        None => Err(lease_lost(job_id, owner)),
    }
}

/// Extends `owner`'s lease to `lease` from now.
pub async fn renew(
    pool: &PgPool,
    job_id: &str,
    owner: &str,
    lease: Duration,
) -> Result<Job, ReplayError> {
    let millis = lease_millis(lease);
    fenced(
        pool,
        job_id,
        owner,
        "lease_until = now() + make_interval(secs => ",
        |qb| {
            qb.push_bind(millis).push("::float8 / 1000)");
        },
    )
    .await
}

/// Records that every event up to `cursor` was published and acknowledged,
/// `published` of them in all, and renews the lease.
pub async fn record_progress(
    pool: &PgPool,
    job_id: &str,
    owner: &str,
    cursor: Position,
    published: u64,
    lease: Duration,
) -> Result<Job, ReplayError> {
    let millis = lease_millis(lease);
    let published = i64::try_from(published).unwrap_or(i64::MAX);
    fenced(pool, job_id, owner, "cursor = ", |qb| {
        qb.push_bind(cursor.to_cursor())
            .push(", published = ")
            .push_bind(published)
            .push(", lease_until = now() + make_interval(secs => ")
            .push_bind(millis)
            .push("::float8 / 1000)");
    })
    .await
}

/// Marks the job done and gives up its lease.
pub async fn finish(pool: &PgPool, job_id: &str, owner: &str) -> Result<Job, ReplayError> {
    fenced(
        pool,
        job_id,
        owner,
        "state = 'done', finished_at = now(), lease_owner = NULL, lease_until = NULL, error = NULL",
        |_| {},
    )
    .await
}

/// Marks the job failed with `error` (shown by `GET /v1/replays/{id}`).
pub async fn fail(
    pool: &PgPool,
    job_id: &str,
    owner: &str,
    error: &str,
) -> Result<Job, ReplayError> {
    let error = error.to_owned();
    fenced(
        pool,
        job_id,
        owner,
        "state = 'failed', finished_at = now(), lease_owner = NULL, lease_until = NULL, error = ",
        |qb| {
            qb.push_bind(error);
        },
    )
    .await
}

/// Gives up the lease without finishing (a clean shutdown), so any runner
/// resumes the job at once from its recorded cursor.
pub async fn release(pool: &PgPool, job_id: &str, owner: &str) -> Result<Job, ReplayError> {
    fenced(
        pool,
        job_id,
        owner,
        "lease_owner = NULL, lease_until = NULL",
        |_| {},
    )
    .await
}

/// The job's next events after `after`, in `(tx, seq)` order, at most
/// `limit`. Empty: the job is complete (its set of events is fixed).
pub async fn fetch_page(
    pool: &PgPool,
    job: &Job,
    after: Option<Position>,
    limit: usize,
) -> Result<Vec<EventRecord>, ReplayError> {
    let until_tx = job
        .until_tx
        .ok_or_else(|| job.malformed("it was never claimed (no until_tx)".into()))?;
    let page = query::page(
        pool,
        PageQuery {
            filter: &job.request.filter,
            after,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            until_tx: Some(until_tx),
        },
    )
    .await?;
    Ok(page)
}

/// One record to publish, independent of the Kafka client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// In order; a `None` value is a header without a value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The native envelope `ingest` accepts: only its fields, absent ones left out.
#[derive(Serialize)]
struct Envelope<'a> {
    event_id: uuid::Uuid,
    event_type: &'a str,
    stream_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_version: Option<i64>,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causation_id: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_id: Option<&'a str>,
    payload: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
}

/// The record job `job_id` publishes for `event`.
///
/// - key: `stream_id`;
/// - value: the native JSON envelope (`event_id`, `event_type`,
///   `stream_id`, `stream_version`, `occurred_at`, `source`,
///   `correlation_id`, `causation_id`, `subject_id`, `payload` as stored,
///   `metadata`);
/// - headers: the original headers in their order, then
///   `x-audit-replay-job`, `x-audit-event-id`, and
///   `x-audit-original-{topic,partition,offset}` when the event came from
///   Kafka. Original `x-audit-*` headers are dropped (ours to set). When the
///   original was a CloudEvent (a `ce_specversion` header, or a
///   `content-type` of `application/cloudevents…`), its `ce_*` and
///   `content-type` headers are dropped too: they describe a value that is
///   no longer the one sent, and would make readers (ours included) parse
///   the envelope as CloudEvents data.
pub fn replay_record(job_id: &str, event: &EventRecord) -> ReplayRecord {
    let envelope = Envelope {
        event_id: event.event_id,
        event_type: &event.event_type,
        stream_id: &event.stream_id,
        stream_version: event.stream_version,
        occurred_at: event
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true),
        source: event.source.as_deref(),
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        subject_id: event.subject_id.as_deref(),
        payload: &event.payload,
        metadata: event.metadata.as_ref().filter(|m| !m.is_null()),
    };
    // Serialising a Value and plain fields into a Vec cannot fail.
    let value = serde_json::to_vec(&envelope).unwrap_or_default();
    let mut headers = original_headers(&event.headers);
    let mut add =
        |key: &str, value: String| headers.push((key.to_owned(), Some(value.into_bytes())));
    add(HEADER_REPLAY_JOB, job_id.to_owned());
    add(HEADER_EVENT_ID, event.event_id.to_string());
    if let Some(topic) = &event.kafka_topic {
        add(HEADER_ORIGINAL_TOPIC, topic.clone());
    }
    if let Some(partition) = event.kafka_partition {
        add(HEADER_ORIGINAL_PARTITION, partition.to_string());
    }
    if let Some(offset) = event.kafka_offset {
        add(HEADER_ORIGINAL_OFFSET, offset.to_string());
    }
    ReplayRecord {
        key: event.stream_id.as_bytes().to_vec(),
        value,
        headers,
    }
}

/// Decodes `events.headers` (`[{"key", "value" | "value_base64"}]`, see
/// `RawRecord::headers_json`) and drops the ones a replay must not carry.
fn original_headers(stored: &Value) -> Vec<(String, Option<Vec<u8>>)> {
    use base64::Engine as _;
    let Some(list) = stored.as_array() else {
        return Vec::new();
    };
    let decoded: Vec<(String, Option<Vec<u8>>)> = list
        .iter()
        .filter_map(|entry| {
            let key = entry.get("key")?.as_str()?.to_owned();
            let value = match (entry.get("value"), entry.get("value_base64")) {
                (Some(Value::String(text)), _) => Some(text.clone().into_bytes()),
                (_, Some(Value::String(b64))) => {
                    Some(base64::engine::general_purpose::STANDARD.decode(b64).ok()?)
                }
                _ => None,
            };
            Some((key, value))
        })
        .collect();
    let is_cloudevent = decoded.iter().any(|(key, value)| {
        key == "ce_specversion"
            || (key.eq_ignore_ascii_case("content-type")
                && value
                    .as_deref()
                    .is_some_and(|v| v.starts_with(b"application/cloudevents")))
    });
    decoded
        .into_iter()
        .filter(|(key, _)| {
            let lower = key.to_ascii_lowercase();
            !lower.starts_with(RESERVED_HEADER_PREFIX)
                && !(is_cloudevent && (lower.starts_with("ce_") || lower == "content-type"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(headers: Value) -> EventRecord {
        EventRecord {
            position: Position { tx: 7, seq: 3 },
            seq: 3,
            event_id: uuid::Uuid::from_u128(1),
            event_type: "order.created".into(),
            stream_id: "order-1".into(),
            stream_version: Some(2),
            occurred_at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            ingested_at: DateTime::from_timestamp_micros(1_795_000_001_000_000).unwrap(),
            source: Some("shop".into()),
            correlation_id: None,
            causation_id: Some(uuid::Uuid::from_u128(2)),
            subject_id: Some("customer-1".into()),
            // As sqlx decodes jsonb: numbers keep their text.
            payload: serde_json::from_str(r#"{"total": 12.50, "email": {"$enc": {"v": 1}}}"#)
                .unwrap(),
            metadata: None,
            headers,
            kafka_topic: Some("orders".into()),
            kafka_partition: Some(3),
            kafka_offset: Some(1200),
            chain_id: Some("orders/3".into()),
            chain_position: Some(9),
            hash: None,
        }
    }

    fn header<'a>(record: &'a ReplayRecord, key: &str) -> Vec<Option<&'a [u8]>> {
        record
            .headers
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
            .collect()
    }

    #[test]
    fn record_carries_the_envelope_the_original_headers_and_the_replay_headers() {
        let headers = json!([
            {"key": "traceparent", "value": "00-abc-def-01"},
            {"key": "bin", "value_base64": "AAEC"},
            {"key": "empty", "value": null},
            {"key": "x-audit-event-id", "value": "forged"},
            {"key": "X-Audit-Replay-Job", "value": "forged"},
        ]);
        let record = replay_record("job-1", &event(headers));
        assert_eq!(record.key, b"order-1");
        let value: Value = serde_json::from_slice(&record.value).unwrap();
        let expected: Value = serde_json::from_str(
            r#"{
                "event_id": "00000000-0000-0000-0000-000000000001",
                "event_type": "order.created",
                "stream_id": "order-1",
                "stream_version": 2,
                "occurred_at": "2026-11-18T11:06:40.123456Z",
                "source": "shop",
                "causation_id": "00000000-0000-0000-0000-000000000002",
                "subject_id": "customer-1",
                "payload": {"total": 12.50, "email": {"$enc": {"v": 1}}}
            }"#,
        )
        .unwrap();
        assert_eq!(value, expected);
        // Numbers keep their stored spelling.
        assert!(String::from_utf8_lossy(&record.value).contains("12.50"));
        let keys: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "traceparent",
                "bin",
                "empty",
                HEADER_REPLAY_JOB,
                HEADER_EVENT_ID,
                HEADER_ORIGINAL_TOPIC,
                HEADER_ORIGINAL_PARTITION,
                HEADER_ORIGINAL_OFFSET
            ]
        );
        assert_eq!(header(&record, "bin"), [Some(&[0u8, 1, 2][..])]);
        assert_eq!(header(&record, "empty"), [None]);
        assert_eq!(
            header(&record, HEADER_EVENT_ID),
            [Some(&b"00000000-0000-0000-0000-000000000001"[..])]
        );
        assert_eq!(header(&record, HEADER_REPLAY_JOB), [Some(&b"job-1"[..])]);
        assert_eq!(
            header(&record, HEADER_ORIGINAL_OFFSET),
            [Some(&b"1200"[..])]
        );
    }

    #[test]
    fn cloudevents_headers_are_dropped_with_the_cloudevent() {
        let headers = json!([
            {"key": "ce_specversion", "value": "1.0"},
            {"key": "ce_type", "value": "order.created"},
            {"key": "content-type", "value": "application/json"},
            {"key": "traceparent", "value": "t"},
        ]);
        let record = replay_record("j", &event(headers));
        assert_eq!(
            record.headers[0],
            ("traceparent".to_owned(), Some(b"t".to_vec()))
        );
        assert_eq!(record.headers.len(), 1 + 5);
        // A content type alone is kept.
        let headers = json!([{"key": "content-type", "value": "application/json"}]);
        let record = replay_record("j", &event(headers));
        assert_eq!(
            header(&record, "content-type"),
            [Some(&b"application/json"[..])]
        );
        // System events have no Kafka position.
        let mut system = event(json!([]));
        (
            system.kafka_topic,
            system.kafka_partition,
            system.kafka_offset,
        ) = (None, None, None);
        let record = replay_record("j", &system);
        assert_eq!(record.headers.len(), 2);
    }

    #[test]
    fn requests_are_validated() {
        let ok = ReplayRequest {
            filter: EventFilter::default(),
            target_topic: "replay.orders-1".into(),
            rate_per_sec: DEFAULT_RATE_PER_SEC,
        };
        ok.validate().unwrap();
        for (bad, needle) in [
            (
                ReplayRequest {
                    target_topic: "".into(),
                    ..ok.clone()
                },
                "target_topic",
            ),
            (
                ReplayRequest {
                    target_topic: "a/b".into(),
                    ..ok.clone()
                },
                "target_topic",
            ),
            (
                ReplayRequest {
                    target_topic: "..".into(),
                    ..ok.clone()
                },
                "target_topic",
            ),
            (
                ReplayRequest {
                    target_topic: "x".repeat(250),
                    ..ok.clone()
                },
                "target_topic",
            ),
            (
                ReplayRequest {
                    rate_per_sec: 0,
                    ..ok.clone()
                },
                "rate_per_sec",
            ),
            (
                ReplayRequest {
                    rate_per_sec: MAX_RATE_PER_SEC + 1,
                    ..ok.clone()
                },
                "rate_per_sec",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let t = Utc::now();
        let mut empty_range = ok.clone();
        empty_range.filter.occurred_from = Some(t);
        empty_range.filter.occurred_to = Some(t);
        assert!(empty_range
            .validate()
            .unwrap_err()
            .to_string()
            .contains("occurred_from"));
        for bad in ["", "a b", "a/b", &"x".repeat(129)] {
            assert!(validate_job_id(bad).is_err(), "{bad}");
        }
        validate_job_id("0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f").unwrap();
        // JSON: the rate defaults, unknown fields are refused.
        let parsed: ReplayRequest = serde_json::from_str(r#"{"target_topic":"t"}"#).unwrap();
        assert_eq!(parsed.rate_per_sec, DEFAULT_RATE_PER_SEC);
        assert!(
            serde_json::from_str::<ReplayRequest>(r#"{"target_topic":"t","decrypt":true}"#)
                .is_err()
        );
    }
}
