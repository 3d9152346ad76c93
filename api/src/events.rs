//! Event routes: filtered pages, one event, a stream's events, and a
//! stream's state at a point in time.

use std::sync::Arc;

use audit_ledger::query::{self, EventFilter, PageQuery};
use chrono::{DateTime, Utc};
use poem::web::Data;
use poem::Request;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{BearerAuth, Caller, Role};
use crate::disclose::{disclose, Disclosure, EventView};
use crate::filters::{self, FilterParams};
use crate::problem::ApiError;
use crate::render::{self, JsonBody};
use crate::state::ApiState;
use crate::ApiTags;

/// A page of events in store order.
#[derive(Debug, Clone, Object)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `cursor` to read on. It points after the last event of this
    /// page; `null` when the page is empty: nothing more for now (ask again
    /// later with the same cursor to see newer events).
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// An event a state fold applied.
#[derive(Debug, Clone, Object)]
pub struct AppliedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
}

/// A stream's state at a point in time.
#[derive(Debug, Clone, Object)]
pub struct StreamState {
    pub stream_id: String,
    /// The point in time (events that occurred at or before it are folded).
    pub at: DateTime<Utc>,
    /// The folded payloads (JSON merge patch by default; reducers per event type are configurable).
    pub state: Value,
    /// The events applied, in order.
    pub events_applied: Vec<AppliedEvent>,
}

/// Route-specific parameters of `GET /v1/events` besides the filters (the
/// declared `email` is a blind index, handled as one).
const LIST_PARAMS: &[&str] = &["limit", "cursor", "decrypt", "purpose"];

pub struct EventsApi;

#[OpenApi]
impl EventsApi {
    /// Events matching every given filter, in store order, one page at a time.
    ///
    /// Pages are stable while ingestion runs: following `next_cursor` never
    /// skips or repeats an event. Besides the parameters listed, every blind
    /// index of the node's field-protection policy is a parameter for
    /// equality on that protected field (`email` with the default policy);
    /// events of erased subjects are left out of such searches. Protected
    /// fields are `{"$redacted": true}` unless an auditor passes
    /// `decrypt=true` and a `purpose` (the read is then recorded in the
    /// access log and as an `audit.pii_read` event).
    #[oai(
        path = "/v1/events",
        method = "get",
        tag = "ApiTags::Events",
        operation_id = "list_events"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_events(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        req: &Request,
        /// Only events of this stream (aggregate).
        #[oai(validator(min_length = 1))]
        stream_id: Query<Option<String>>,
        /// Event type: exact (`order.created`) or prefix (`order.*`); repeat for any of several.
        #[oai(default)]
        event_type: Query<Vec<String>>,
        /// Only events from this source.
        #[oai(validator(min_length = 1))]
        source: Query<Option<String>>,
        correlation_id: Query<Option<Uuid>>,
        causation_id: Query<Option<Uuid>>,
        /// `occurred_at >= occurred_from` (RFC 3339).
        occurred_from: Query<Option<DateTime<Utc>>>,
        /// `occurred_at < occurred_to` (RFC 3339).
        occurred_to: Query<Option<DateTime<Utc>>>,
        /// `ingested_at >= ingested_from` (RFC 3339).
        ingested_from: Query<Option<DateTime<Utc>>>,
        /// `ingested_at < ingested_to` (RFC 3339).
        ingested_to: Query<Option<DateTime<Utc>>>,
        /// A JSON object the payload must contain (`{"status":"paid"}`); protected fields never match by value.
        #[oai(validator(min_length = 1))]
        contains: Query<Option<String>>,
        /// Blind-index equality on the protected customer email (when the policy has the `email` index; other indexes work alike).
        #[oai(validator(min_length = 1))]
        email: Query<Option<String>>,
        /// Events per page (1 to 1000, default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(min_length = 1))]
        cursor: Query<Option<String>>,
        /// Decrypt protected fields (auditor or admin; needs `purpose`).
        decrypt: Query<Option<bool>>,
        /// Why personal data is read (required with `decrypt=true`; recorded).
        #[oai(validator(min_length = 1))]
        purpose: Query<Option<String>>,
    ) -> Result<JsonBody<EventPage>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "reading events")?;
        // Declared for the document; read from the raw query like every blind index.
        let _ = email;
        let disclosure = Disclosure::from_params(&caller, decrypt.0, purpose.0)?;
        let filter = filters::event_filter(
            &state,
            FilterParams {
                stream_id: stream_id.0,
                event_type: event_type.0,
                source: source.0,
                correlation_id: correlation_id.0,
                causation_id: causation_id.0,
                occurred_from: occurred_from.0,
                occurred_to: occurred_to.0,
                ingested_from: ingested_from.0,
                ingested_to: ingested_to.0,
                contains: contains.0,
            },
            req.uri().query(),
            LIST_PARAMS,
        )?;
        let after = filters::event_cursor(cursor.0.as_deref())?;
        let page = PageQuery {
            filter: &filter,
            after,
            limit: filters::page_limit(limit.0),
            until_tx: None,
        };
        show_page(&state, &caller, "GET /v1/events", &disclosure, page).await
    }

    /// One event by id.
    #[oai(
        path = "/v1/events/:event_id",
        method = "get",
        tag = "ApiTags::Events",
        operation_id = "get_event"
    )]
    async fn get_event(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        event_id: Path<Uuid>,
        /// Decrypt protected fields (auditor or admin; needs `purpose`).
        decrypt: Query<Option<bool>>,
        /// Why personal data is read (required with `decrypt=true`; recorded).
        #[oai(validator(min_length = 1))]
        purpose: Query<Option<String>>,
    ) -> Result<JsonBody<EventView>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "reading events")?;
        let disclosure = Disclosure::from_params(&caller, decrypt.0, purpose.0)?;
        let context = "reading an event";
        let not_found = || ApiError::not_found(format!("no event {} in the store", event_id.0));
        if disclosure == Disclosure::Redacted {
            let row = query::event_by_id_query(render::EVENT_COLUMNS, event_id.0)
                .build()
                .fetch_optional(state.pool())
                .await
                .map_err(|e| ApiError::from_query(e.into(), context))?
                .ok_or_else(not_found)?;
            return render::event(&row).map_err(|e| ApiError::from_query(e, context));
        }
        let record = query::event_by_id(state.pool(), event_id.0)
            .await
            .map_err(|e| ApiError::from_query(e, context))?
            .ok_or_else(not_found)?;
        let mut shown = disclose(
            &state,
            &caller,
            "GET /v1/events/{event_id}",
            &disclosure,
            vec![record],
        )
        .await?;
        let Some(record) = shown.pop() else {
            return Err(ApiError::internal(context, &"disclosure lost the event"));
        };
        JsonBody::from_typed(&EventView::from_record(record))
    }

    /// A stream's events in order (the order of its Kafka partition).
    #[oai(
        path = "/v1/streams/:stream_id/events",
        method = "get",
        tag = "ApiTags::Streams",
        operation_id = "list_stream_events"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn stream_events(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        stream_id: Path<String>,
        /// Only events with `stream_version >= from_version`.
        #[oai(validator(minimum(value = "1")))]
        from_version: Query<Option<i64>>,
        /// Events per page (1 to 1000, default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(min_length = 1))]
        cursor: Query<Option<String>>,
        /// Decrypt protected fields (auditor or admin; needs `purpose`).
        decrypt: Query<Option<bool>>,
        /// Why personal data is read (required with `decrypt=true`; recorded).
        #[oai(validator(min_length = 1))]
        purpose: Query<Option<String>>,
    ) -> Result<JsonBody<EventPage>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "reading a stream")?;
        let disclosure = Disclosure::from_params(&caller, decrypt.0, purpose.0)?;
        let filter = EventFilter {
            stream_id: Some(stream_id.0),
            from_version: from_version.0,
            ..EventFilter::default()
        };
        let after = filters::event_cursor(cursor.0.as_deref())?;
        let page = PageQuery {
            filter: &filter,
            after,
            limit: filters::page_limit(limit.0),
            until_tx: None,
        };
        show_page(
            &state,
            &caller,
            "GET /v1/streams/{stream_id}/events",
            &disclosure,
            page,
        )
        .await
    }

    /// A stream's state at time `at`: its events up to then, folded in order.
    ///
    /// Payloads are applied as JSON merge patches (RFC 7386) unless the
    /// node's reducers (`--api-reducers`) say `replace` or `ignore` for an
    /// event type. Protected fields are folded redacted, or decrypted for an
    /// auditor with `decrypt=true` and a `purpose`.
    #[oai(
        path = "/v1/streams/:stream_id/state",
        method = "get",
        tag = "ApiTags::Streams",
        operation_id = "get_stream_state"
    )]
    async fn stream_state(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        stream_id: Path<String>,
        /// The point in time (RFC 3339); default: now.
        at: Query<Option<DateTime<Utc>>>,
        /// Decrypt protected fields (auditor or admin; needs `purpose`).
        decrypt: Query<Option<bool>>,
        /// Why personal data is read (required with `decrypt=true`; recorded).
        #[oai(validator(min_length = 1))]
        purpose: Query<Option<String>>,
    ) -> Result<Json<StreamState>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "reading a stream's state")?;
        let disclosure = Disclosure::from_params(&caller, decrypt.0, purpose.0)?;
        let stream_id = stream_id.0;
        let at = at.0.unwrap_or_else(Utc::now);
        let max = state.limits().max_fold_events;
        let context = "folding a stream";
        let mut records = query::stream_until(state.pool(), &stream_id, at, max)
            .await
            .map_err(|e| ApiError::from_query(e, context))?;
        if records.len() as i64 > max {
            return Err(ApiError::bad_request(format!(
                "stream {stream_id:?} has more than {max} events up to {}; pass an earlier `at`",
                at.to_rfc3339()
            )));
        }
        if records.is_empty() {
            let exists = query::stream_exists(state.pool(), &stream_id)
                .await
                .map_err(|e| ApiError::from_query(e, context))?;
            return Err(ApiError::not_found(if exists {
                format!(
                    "stream {stream_id:?} has no event that occurred at or before {}; pass a later `at`",
                    at.to_rfc3339()
                )
            } else {
                format!("no stream {stream_id:?} in the store")
            }));
        }
        let reducers = state.reducers();
        records.retain(|r| reducers.for_type(&r.event_type) != crate::fold::Reducer::Ignore);
        let records = disclose(
            &state,
            &caller,
            "GET /v1/streams/{stream_id}/state",
            &disclosure,
            records,
        )
        .await?;
        let mut folded = Value::Null;
        let mut applied = Vec::with_capacity(records.len());
        for record in records {
            if reducers.apply(&mut folded, &record.event_type, &record.payload) {
                applied.push(AppliedEvent {
                    event_id: record.event_id,
                    event_type: record.event_type,
                    occurred_at: record.occurred_at,
                });
            }
        }
        Ok(Json(StreamState {
            stream_id,
            at,
            state: folded,
            events_applied: applied,
        }))
    }
}

/// A page as `disclosure` says. Redacted pages, what nearly every read is,
/// are rendered straight from the rows ([`render`]); a decrypting read
/// decodes the events, decrypts them and records the read ([`disclose`]).
async fn show_page(
    state: &Arc<ApiState>,
    caller: &Caller,
    route: &str,
    disclosure: &Disclosure,
    page: PageQuery<'_>,
) -> Result<JsonBody<EventPage>, ApiError> {
    let context = "reading events";
    if *disclosure == Disclosure::Redacted {
        let pool = state.page_pool(page.filter);
        let rows = query::page_query(render::EVENT_COLUMNS, page)
            .build()
            .fetch_all(pool)
            .await
            .map_err(|e| ApiError::from_query(e.into(), context))?;
        return render::event_page_off_worker(rows)
            .await
            .map_err(|e| ApiError::from_query(e, context));
    }
    let records = query::page(state.pool(), page)
        .await
        .map_err(|e| ApiError::from_query(e, context))?;
    let records = disclose(state, caller, route, disclosure, records).await?;
    JsonBody::from_typed(&to_page(records))
}

/// The `EventPage` of records already redacted or revealed.
pub fn to_page(records: Vec<query::EventRecord>) -> EventPage {
    let next_cursor = records.last().map(|r| r.position.to_cursor());
    EventPage {
        events: records.into_iter().map(EventView::from_record).collect(),
        next_cursor,
    }
}
