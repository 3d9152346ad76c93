//! Replay jobs: `POST /v1/replays` republishes the events matching a filter
//! to a Kafka topic as a tracked job; `GET /v1/replays/{id}` shows its
//! progress. The job table and what a job publishes are
//! `audit_ledger::replay_jobs`; the node's replay runner
//! (`audit_actors::republish`) runs the jobs.
//!
//! Submitting needs the **admin** role: a job copies events out of the
//! store into a topic whose readers the access log cannot see (payloads go
//! as stored, protected fields still encrypted). Auditors may watch jobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use audit_ledger::query::EventFilter;
use audit_ledger::replay_jobs::{self, Job, JobState, ReplayError, ReplayRequest};
use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::body::Text;
use crate::disclose::store_error;
use crate::filters::{self, FilterParams};
use crate::problem::{ApiError, Problem};
use crate::state::ApiState;

/// Groups of routes of this module in the OpenAPI document.
#[derive(Tags)]
pub enum JobTags {
    /// Republishing events to Kafka as tracked, resumable jobs.
    ReplayJobs,
}

/// Which events a job replays: the filters of `GET /v1/events`, as JSON.
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Only events of this stream (aggregate).
    #[oai(validator(min_length = 1))]
    pub stream_id: Option<Text>,
    /// Event types: exact (`order.created`) or prefix (`order.*`); any of them.
    #[oai(default)]
    pub event_type: Vec<Text>,
    #[oai(validator(min_length = 1))]
    pub source: Option<Text>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// `occurred_at >= occurred_from`.
    pub occurred_from: Option<DateTime<Utc>>,
    /// `occurred_at < occurred_to`.
    pub occurred_to: Option<DateTime<Utc>>,
    /// `ingested_at >= ingested_from`.
    pub ingested_from: Option<DateTime<Utc>>,
    /// `ingested_at < ingested_to`.
    pub ingested_to: Option<DateTime<Utc>>,
    /// A JSON object the payload must contain; protected fields never match by value.
    pub contains: Option<Value>,
    /// Equality on protected fields through their blind index, by index
    /// name: `{"email": "someone@example.com"}`. Only the index tokens are
    /// stored with the job, never the values.
    pub blind_index: Option<BTreeMap<String, String>>,
}

/// A replay job to create.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct NewReplayJob {
    /// Chosen by the client (a UUID works): 1 to 128 of `A-Z a-z 0-9 . _ -`.
    /// Submitting the same id with the same request again returns the job.
    pub job_id: Text,
    /// Which events; none given: every event.
    pub filter: Option<ReplayFilter>,
    /// The Kafka topic to publish to; not one this node ingests.
    pub target_topic: Text,
    /// Events per second, 1 to 10000 (default 1000).
    pub rate_per_sec: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ReplayJobState {
    /// Stored; no runner has claimed it yet.
    Pending,
    /// Claimed; publishing, or waiting for a runner to resume it.
    Running,
    /// Every matching event was published.
    Done,
    /// Publishing failed for good; `error` says why.
    Failed,
}

impl From<JobState> for ReplayJobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Pending => Self::Pending,
            JobState::Running => Self::Running,
            JobState::Done => Self::Done,
            JobState::Failed => Self::Failed,
        }
    }
}

/// The filter a job runs, as stored: blind-index values are not kept,
/// only which indexes are used.
#[derive(Debug, Clone, Object)]
pub struct ReplayJobFilter {
    #[oai(nullable)]
    pub stream_id: Option<String>,
    pub event_type: Vec<String>,
    #[oai(nullable)]
    pub source: Option<String>,
    #[oai(nullable)]
    pub correlation_id: Option<Uuid>,
    #[oai(nullable)]
    pub causation_id: Option<Uuid>,
    #[oai(nullable)]
    pub occurred_from: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub occurred_to: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub ingested_from: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub ingested_to: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub contains: Option<Value>,
    /// Names of the blind indexes the filter uses.
    pub blind_index: Vec<String>,
}

impl From<&EventFilter> for ReplayJobFilter {
    fn from(f: &EventFilter) -> Self {
        Self {
            stream_id: f.stream_id.clone(),
            event_type: f.event_types.iter().map(ToString::to_string).collect(),
            source: f.source.clone(),
            correlation_id: f.correlation_id,
            causation_id: f.causation_id,
            occurred_from: f.occurred_from,
            occurred_to: f.occurred_to,
            ingested_from: f.ingested_from,
            ingested_to: f.ingested_to,
            contains: f.contains.clone(),
            blind_index: f.blind.iter().map(|m| m.name.clone()).collect(),
        }
    }
}

/// A replay job and its progress.
#[derive(Debug, Clone, Object)]
pub struct ReplayJob {
    pub job_id: String,
    pub state: ReplayJobState,
    pub target_topic: String,
    pub rate_per_sec: u32,
    pub filter: ReplayJobFilter,
    pub created_at: DateTime<Utc>,
    /// The token name that created it.
    pub created_by: String,
    /// Events published and acknowledged by Kafka so far.
    pub published: u64,
    /// Matching events when the job started; null until counted.
    #[oai(nullable)]
    pub total: Option<u64>,
    /// Cursor of the last event acknowledged (the kind `GET /v1/events` takes).
    #[oai(nullable)]
    pub cursor: Option<String>,
    /// Why the job failed.
    #[oai(nullable)]
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
    #[oai(nullable)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The runner (`node/instance`) holding the job, and until when.
    #[oai(nullable)]
    pub lease_owner: Option<String>,
    #[oai(nullable)]
    pub lease_until: Option<DateTime<Utc>>,
}

impl From<Job> for ReplayJob {
    fn from(job: Job) -> Self {
        Self {
            filter: ReplayJobFilter::from(&job.request.filter),
            job_id: job.job_id,
            state: job.state.into(),
            target_topic: job.request.target_topic,
            rate_per_sec: job.request.rate_per_sec,
            created_at: job.created_at,
            created_by: job.created_by,
            published: job.published,
            total: job.total,
            cursor: job.cursor,
            error: job.error,
            updated_at: job.updated_at,
            finished_at: job.finished_at,
            lease_owner: job.lease_owner,
            lease_until: job.lease_until,
        }
    }
}

#[derive(ApiResponse)]
pub enum SubmitResponse {
    /// The job was created; a runner picks it up within seconds.
    #[oai(status = 201)]
    Created(
        Json<ReplayJob>,
        /// Where to watch its progress.
        #[oai(header = "Location")]
        String,
    ),
    /// A job with this id and the same request exists already: here it is.
    #[oai(status = 200)]
    Existing(Json<ReplayJob>),
    /// A job with this id exists with a different request.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// The body is not sent as `Content-Type: application/json`. (Answered
    /// before the handler runs; listed here so the document says so.)
    #[allow(dead_code)]
    #[oai(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Json<Problem>),
}

pub struct JobsApi;

#[OpenApi]
impl JobsApi {
    /// Republishes the events matching `filter` to `target_topic` as a
    /// tracked job (admin: it copies events out of the store).
    ///
    /// The job covers the matching events stored when a runner starts it,
    /// in store order, at `rate_per_sec`. Each record is keyed by the
    /// event's `stream_id`; its value is the event's native JSON envelope
    /// with the payload as stored (protected fields stay encrypted); its
    /// headers are the original ones plus `x-audit-replay-job`,
    /// `x-audit-event-id` and `x-audit-original-{topic,partition,offset}`.
    /// Delivery is at least once (deduplicate by `x-audit-event-id`); a job
    /// resumes from its last acknowledged event after a node restart.
    /// `job_id` makes the request idempotent: the same id and request give
    /// 200 with the job, the same id with another request 409.
    #[oai(
        path = "/v1/replays",
        method = "post",
        tag = "JobTags::ReplayJobs",
        operation_id = "create_replay_job"
    )]
    async fn submit(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        body: Json<NewReplayJob>,
    ) -> Result<SubmitResponse, ApiError> {
        let caller = auth.0;
        caller.require(Role::Admin, "creating a replay job")?;
        let body = body.0;
        let job_id = body.job_id.into_string();
        let target_topic = body.target_topic.into_string();
        if state.consumed_topics().contains(&target_topic) {
            return Err(ApiError::bad_request(format!(
                "target_topic {target_topic:?} is a topic this node ingests: replaying into it would ingest the events again; choose another topic",
            )));
        }
        let request = ReplayRequest {
            filter: job_filter(&state, body.filter.unwrap_or_default())?,
            target_topic,
            rate_per_sec: body
                .rate_per_sec
                .unwrap_or(replay_jobs::DEFAULT_RATE_PER_SEC),
        };
        let submitted = replay_jobs::submit(state.pool(), &job_id, &request, &caller.name).await;
        let (job, created) = match submitted {
            Ok(outcome) => outcome,
            Err(ReplayError::Conflict { job_id }) => {
                return Ok(SubmitResponse::Conflict(Json(Problem::new(
                    StatusCode::CONFLICT,
                    format!(
                        "replay job {job_id:?} already exists with a different request; \
                         GET /v1/replays/{job_id} shows it; to replay something else, choose another job_id"
                    ),
                ))))
            }
            Err(error) => return Err(replay_error(error, "creating a replay job")),
        };
        if !created {
            return Ok(SubmitResponse::Existing(Json(job.into())));
        }
        tracing::info!(
            job_id = %job.job_id,
            caller = %caller.name,
            topic = %job.request.target_topic,
            rate_per_sec = job.request.rate_per_sec,
            "replay job created"
        );
        let location = format!("/v1/replays/{}", job.job_id);
        Ok(SubmitResponse::Created(Json(job.into()), location))
    }

    /// A replay job and its progress (`published` of `total`).
    #[oai(
        path = "/v1/replays/:job_id",
        method = "get",
        tag = "JobTags::ReplayJobs",
        operation_id = "get_replay_job"
    )]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        job_id: Path<String>,
    ) -> Result<Json<ReplayJob>, ApiError> {
        auth.0.require(Role::Auditor, "reading a replay job")?;
        let job_id = job_id.0;
        let not_found = || {
            ApiError::not_found(format!(
                "no replay job {job_id:?}; job ids are the `job_id` given to POST /v1/replays"
            ))
        };
        if replay_jobs::validate_job_id(&job_id).is_err() {
            return Err(not_found());
        }
        let job = replay_jobs::get(state.pool(), &job_id)
            .await
            .map_err(|e| replay_error(e, "reading a replay job"))?
            .ok_or_else(not_found)?;
        Ok(Json(job.into()))
    }
}

/// The body's filter as an [`EventFilter`], through the same parsing as the
/// query parameters of `GET /v1/events`.
fn job_filter(state: &Arc<ApiState>, filter: ReplayFilter) -> Result<EventFilter, ApiError> {
    let blind = filter.blind_index.unwrap_or_default();
    let policy = state.protection().map(|p| p.policy());
    for name in blind.keys() {
        if policy.and_then(|p| p.blind_index(name)).is_none() {
            let known: Vec<String> = policy
                .map(|p| p.blind_indexes().iter().map(|r| r.name.clone()).collect())
                .unwrap_or_default();
            return Err(ApiError::bad_request(format!(
                "filter.blind_index: {name:?} is not a blind index of this node's policy (it has: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
    }
    // Blind indexes travel as the query string `event_filter` reads them from.
    let blind_query = serde_urlencoded::to_string(&blind)
        .map_err(|e| ApiError::bad_request(format!("filter.blind_index: {e}")))?;
    filters::event_filter(
        state,
        FilterParams {
            stream_id: filter.stream_id.map(Text::into_string),
            event_type: filter
                .event_type
                .into_iter()
                .map(Text::into_string)
                .collect(),
            source: filter.source.map(Text::into_string),
            correlation_id: filter.correlation_id,
            causation_id: filter.causation_id,
            occurred_from: filter.occurred_from,
            occurred_to: filter.occurred_to,
            ingested_from: filter.ingested_from,
            ingested_to: filter.ingested_to,
            contains: filter.contains.map(|c| c.to_string()),
        },
        Some(&blind_query),
        &[],
    )
}

fn replay_error(error: ReplayError, context: &str) -> ApiError {
    match error {
        ReplayError::BadRequest(message) => ApiError::bad_request(message),
        ReplayError::Query(e) => ApiError::from_query(e, context),
        ReplayError::Store(e) => store_error(e, context),
        other => ApiError::internal(context, &other),
    }
}
