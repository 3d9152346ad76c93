//! The access log: who read decrypted personal data, when, and why.
//!
//! Rows are inserted under the system chain's row lock (see
//! `disclose::record_read`), so their ids grow in commit order and the id
//! cursor never skips one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::filters::{self, id_cursor};
use crate::problem::ApiError;
use crate::state::ApiState;
use crate::ApiTags;

/// One read of decrypted personal data.
#[derive(Debug, Clone, Object)]
pub struct AccessLogEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The token name of the reader.
    pub actor: String,
    /// The reader's role.
    pub role: String,
    /// Why, as the reader said.
    pub purpose: String,
    /// The route read, e.g. `GET /v1/events`.
    pub route: String,
    /// The events whose protected fields were decrypted.
    pub event_ids: Vec<Uuid>,
    /// The `audit.pii_read` event recording this read.
    pub audit_event_id: Uuid,
}

/// A page of the access log, oldest first.
#[derive(Debug, Clone, Object)]
pub struct AccessLogPage {
    pub entries: Vec<AccessLogEntry>,
    /// Pass as `cursor` to read on; `null` when the page is empty.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

pub struct AccessLogApi;

#[OpenApi]
impl AccessLogApi {
    /// Reads of decrypted personal data, oldest first (auditors and admins).
    #[oai(
        path = "/v1/access-log",
        method = "get",
        tag = "ApiTags::AccessLog",
        operation_id = "list_access_log"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        /// Only reads by this token name.
        #[oai(validator(min_length = 1))]
        actor: Query<Option<String>>,
        /// Only reads of this event.
        event_id: Query<Option<Uuid>>,
        /// `at >= from` (RFC 3339).
        from: Query<Option<DateTime<Utc>>>,
        /// `at < to` (RFC 3339).
        to: Query<Option<DateTime<Utc>>>,
        /// Entries per page (1 to 1000, default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(min_length = 1))]
        cursor: Query<Option<String>>,
    ) -> Result<Json<AccessLogPage>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Auditor, "reading the access log")?;
        let after = id_cursor::decode(id_cursor::ACCESS_LOG, cursor.0.as_deref())?;
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT id, at, actor, role, purpose, route, event_ids, audit_event_id FROM access_log WHERE true",
        );
        if let Some(after) = after {
            qb.push(" AND id > ").push_bind(after);
        }
        if let Some(actor) = actor.0 {
            qb.push(" AND actor = ").push_bind(actor);
        }
        if let Some(id) = event_id.0 {
            qb.push(" AND ").push_bind(id).push(" = ANY(event_ids)");
        }
        if let Some(t) = from.0 {
            qb.push(" AND at >= ").push_bind(t);
        }
        if let Some(t) = to.0 {
            qb.push(" AND at < ").push_bind(t);
        }
        qb.push(" ORDER BY id LIMIT ")
            .push_bind(filters::page_limit(limit.0));
        let context = "reading the access log";
        let rows = qb
            .build()
            .fetch_all(state.pool())
            .await
            .map_err(|e| ApiError::from_sqlx(e, context))?;
        let entries = rows
            .iter()
            .map(entry)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| ApiError::internal(context, &e))?;
        let next_cursor = entries
            .last()
            .map(|e| id_cursor::encode(id_cursor::ACCESS_LOG, e.id));
        Ok(Json(AccessLogPage {
            entries,
            next_cursor,
        }))
    }
}

fn entry(row: &PgRow) -> Result<AccessLogEntry, sqlx::Error> {
    Ok(AccessLogEntry {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        role: row.try_get("role")?,
        purpose: row.try_get("purpose")?,
        route: row.try_get("route")?,
        event_ids: row.try_get("event_ids")?,
        audit_event_id: row.try_get("audit_event_id")?,
    })
}
