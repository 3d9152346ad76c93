//! Reading events back: filters, positions and pages, shared by the API's
//! routes, streaming replay and replay jobs.
//!
//! **Order and stability.** Events are read in `(tx, seq)` order: `tx` is
//! the id of the transaction that stored the event, `seq` its place in it.
//! A page only covers transactions older than every transaction still in
//! flight (`tx < pg_snapshot_xmin(pg_current_snapshot())`), so no event can
//! later appear *before* a position a reader has already passed: keyset
//! pages after a [`Position`] never skip or repeat an event, even while
//! ingestion runs (migration `…04_query_api.sql`). `seq` alone cannot give
//! that: concurrent batches draw `seq` values before they commit, in any
//! order. The price: an event becomes readable once every transaction that
//! started before its own has finished, usually milliseconds later.
//!
//! User input never becomes SQL text: every value is a bind parameter
//! ([`sqlx::QueryBuilder::push_bind`]).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{PgExecutor, QueryBuilder, Row};
use uuid::Uuid;

/// Errors of reads, split by what the caller (and the API's status code)
/// should do about them.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement ran into `statement_timeout` (SQLSTATE 57014): the
    /// filters match too much or too slowly.
    #[error("the query was cancelled after the statement timeout ({0})")]
    Timeout(String),
    /// The database is unreachable, shutting down or out of connections.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The database refused a value taken from the request (SQLSTATE class 22).
    #[error("the database refused a filter value: {0}")]
    Input(String),
    /// A bug or a schema mismatch.
    #[error("query failed: {0}")]
    Fatal(String),
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::Tls(_)
            | E::WorkerCrashed
            | E::Protocol(_) => Self::Unavailable(error.to_string()),
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let message = format!("{} (SQLSTATE {code})", db.message());
                match code.as_str() {
                    "57014" => Self::Timeout(message),
                    c if c.starts_with("22") => Self::Input(message),
                    c if c.starts_with("08")
                        || c.starts_with("57")
                        || c.starts_with("53")
                        || c.starts_with("58")
                        || c == "40001"
                        || c == "40P01" =>
                    {
                        Self::Unavailable(message)
                    }
                    _ => Self::Fatal(message),
                }
            }
            _ => Self::Fatal(error.to_string()),
        }
    }
}

/// Where an event sits in the read order: its transaction id (`xid8`) and
/// its `seq`. Encoded for clients as an opaque cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub tx: u64,
    pub seq: i64,
}

/// Version byte of event cursors; other cursor kinds use other bytes.
const EVENT_CURSOR_VERSION: u8 = 1;

/// A cursor that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cursor is not one this API returned (copy `next_cursor` from a previous response unchanged)")]
pub struct BadCursor;

impl Position {
    /// The opaque cursor: base64url (no padding) of a version byte, `tx`
    /// and `seq` (big endian).
    pub fn to_cursor(self) -> String {
        let mut bytes = [0u8; 17];
        bytes[0] = EVENT_CURSOR_VERSION;
        bytes[1..9].copy_from_slice(&self.tx.to_be_bytes());
        bytes[9..17].copy_from_slice(&self.seq.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn from_cursor(cursor: &str) -> Result<Self, BadCursor> {
        let mut bytes = [0u8; 17];
        match URL_SAFE_NO_PAD.decode_slice(cursor.trim().as_bytes(), &mut bytes) {
            Ok(17) if bytes[0] == EVENT_CURSOR_VERSION => {}
            _ => return Err(BadCursor),
        }
        let mut tx = [0u8; 8];
        let mut seq = [0u8; 8];
        tx.copy_from_slice(&bytes[1..9]);
        seq.copy_from_slice(&bytes[9..17]);
        let position = Self {
            tx: u64::from_be_bytes(tx),
            seq: i64::from_be_bytes(seq),
        };
        // xid8 values are below 2^63 in practice; anything else was forged.
        if position.tx > i64::MAX as u64 {
            return Err(BadCursor);
        }
        Ok(position)
    }
}

/// An event type filter: `order.created` (exact), `order.*` (prefix, the
/// `.` included) or `*` (any).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TypePattern {
    Exact(String),
    /// The prefix, ending with `.`.
    Prefix(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event type pattern {pattern:?}: {reason}")]
pub struct BadTypePattern {
    pub pattern: String,
    pub reason: &'static str,
}

impl FromStr for TypePattern {
    type Err = BadTypePattern;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadTypePattern {
            pattern: raw.to_owned(),
            reason,
        };
        if raw.is_empty() {
            return Err(bad(
                "it is empty; give a type (order.created) or a prefix (order.*)",
            ));
        }
        if raw == "*" {
            return Ok(Self::Any);
        }
        let Some(star) = raw.find('*') else {
            return Ok(Self::Exact(raw.to_owned()));
        };
        if star + 1 != raw.len() || !raw[..star].ends_with('.') || star < 2 {
            return Err(bad(
                "a `*` may only stand alone or end the pattern right after a `.`, as in order.*",
            ));
        }
        Ok(Self::Prefix(raw[..star].to_owned()))
    }
}

impl TryFrom<String> for TypePattern {
    type Error = BadTypePattern;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
    }
}

impl From<TypePattern> for String {
    fn from(pattern: TypePattern) -> Self {
        pattern.to_string()
    }
}

impl fmt::Display for TypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(t) => f.write_str(t),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Any => f.write_str("*"),
        }
    }
}

impl TypePattern {
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Self::Exact(t) => t == event_type,
            Self::Prefix(p) => event_type.starts_with(p.as_str()),
            Self::Any => true,
        }
    }
}

/// Equality on a blind-indexed protected field: the event must carry one of
/// `tokens` (the alternatives `protect::query_tokens` gives for one value).
/// Only tokens are kept, never the value searched for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlindMatch {
    /// The blind index's name in the policy (`email`).
    pub name: String,
    pub tokens: Vec<String>,
}

/// Which events to read. Every set field must match (AND); within
/// `event_types`, any pattern may match (OR). Serializable, so a replay job
/// can store the filter it runs (it holds blind-index tokens, no values).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<TypePattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// `occurred_at >= occurred_from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_from: Option<DateTime<Utc>>,
    /// `occurred_at < occurred_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_to: Option<DateTime<Utc>>,
    /// `ingested_at >= ingested_from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingested_from: Option<DateTime<Utc>>,
    /// `ingested_at < ingested_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingested_to: Option<DateTime<Utc>>,
    /// JSON containment on the stored payload (`payload @> contains`).
    /// Protected fields are stored encrypted and never match by value:
    /// search them with `blind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains: Option<Value>,
    /// Blind-index equality; events of erased subjects are left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blind: Vec<BlindMatch>,
    /// `stream_version >= from_version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<i64>,
}

impl EventFilter {
    /// Appends ` AND …` conditions on `events e` for every set field.
    pub fn push_conditions(&self, qb: &mut QueryBuilder<'_, Postgres>) {
        if let Some(stream_id) = &self.stream_id {
            qb.push(" AND e.stream_id = ").push_bind(stream_id.clone());
        }
        self.push_event_types(qb);
        if let Some(source) = &self.source {
            qb.push(" AND e.source = ").push_bind(source.clone());
        }
        if let Some(id) = self.correlation_id {
            qb.push(" AND e.correlation_id = ").push_bind(id);
        }
        if let Some(id) = self.causation_id {
            qb.push(" AND e.causation_id = ").push_bind(id);
        }
        if let Some(t) = self.occurred_from {
            qb.push(" AND e.occurred_at >= ").push_bind(t);
        }
        if let Some(t) = self.occurred_to {
            qb.push(" AND e.occurred_at < ").push_bind(t);
        }
        if let Some(t) = self.ingested_from {
            qb.push(" AND e.ingested_at >= ").push_bind(t);
        }
        if let Some(t) = self.ingested_to {
            qb.push(" AND e.ingested_at < ").push_bind(t);
        }
        if let Some(contains) = &self.contains {
            qb.push(" AND e.payload @> ")
                .push_bind(sqlx::types::Json(contains.clone()))
                .push("::jsonb");
        }
        if !self.blind.is_empty() {
            // Lets the planner use the partial GIN index.
            qb.push(" AND e.blind_index <> '{}'");
            for m in &self.blind {
                qb.push(" AND e.blind_index && ")
                    .push_bind(m.tokens.clone())
                    .push("::text[]");
            }
            qb.push(
                " AND NOT EXISTS (SELECT 1 FROM erased_subjects x WHERE x.subject_id = e.subject_id)",
            );
        }
        if let Some(v) = self.from_version {
            qb.push(" AND e.stream_version >= ").push_bind(v);
        }
    }

    fn push_event_types(&self, qb: &mut QueryBuilder<'_, Postgres>) {
        if self.event_types.is_empty() || self.event_types.contains(&TypePattern::Any) {
            return;
        }
        let exact: Vec<String> = self
            .event_types
            .iter()
            .filter_map(|p| match p {
                TypePattern::Exact(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let prefixes = self.event_types.iter().filter_map(|p| match p {
            TypePattern::Prefix(prefix) => Some(prefix.clone()),
            _ => None,
        });
        qb.push(" AND (false");
        if !exact.is_empty() {
            qb.push(" OR e.event_type = ANY(")
                .push_bind(exact)
                .push(")");
        }
        for prefix in prefixes {
            qb.push(" OR starts_with(e.event_type, ")
                .push_bind(prefix)
                .push(")");
        }
        qb.push(")");
    }
}

/// An event as stored, read back. `payload` still holds the encrypted
/// field envelopes: reveal or redact before showing it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub position: Position,
    pub seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub stream_id: String,
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub source: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub subject_id: Option<String>,
    pub payload: Value,
    pub metadata: Option<Value>,
    pub headers: Value,
    pub kafka_topic: Option<String>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub chain_id: Option<String>,
    pub chain_position: Option<i64>,
    pub hash: Option<Vec<u8>>,
}

/// The columns [`EventRecord::from_row`] reads, for `FROM events e`.
pub const EVENT_COLUMNS: &str = "e.tx::text AS tx, e.seq, e.event_id, e.event_type, e.stream_id, \
     e.stream_version, e.occurred_at, e.ingested_at, e.source, e.correlation_id, e.causation_id, \
     e.subject_id, e.payload, e.metadata, e.headers, e.kafka_topic, e.kafka_partition, \
     e.kafka_offset, e.chain_id, e.chain_position, e.hash";

impl EventRecord {
    pub fn from_row(row: &PgRow) -> Result<Self, QueryError> {
        let tx: String = row.try_get("tx")?;
        let tx: u64 = tx.parse().map_err(|_| {
            QueryError::Fatal(format!("events.tx {tx:?} is not a 64-bit transaction id"))
        })?;
        let seq: i64 = row.try_get("seq")?;
        Ok(Self {
            position: Position { tx, seq },
            seq,
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            stream_id: row.try_get("stream_id")?,
            stream_version: row.try_get("stream_version")?,
            occurred_at: row.try_get("occurred_at")?,
            ingested_at: row.try_get("ingested_at")?,
            source: row.try_get("source")?,
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            subject_id: row.try_get("subject_id")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            headers: row.try_get("headers")?,
            kafka_topic: row.try_get("kafka_topic")?,
            kafka_partition: row.try_get("kafka_partition")?,
            kafka_offset: row.try_get("kafka_offset")?,
            chain_id: row.try_get("chain_id")?,
            chain_position: row.try_get("chain_position")?,
            hash: row.try_get("hash")?,
        })
    }
}

/// One page of a filtered read.
#[derive(Debug, Clone, Copy)]
pub struct PageQuery<'a> {
    pub filter: &'a EventFilter,
    /// Start strictly after this position (`None`: from the beginning).
    pub after: Option<Position>,
    pub limit: i64,
    /// Also stop below this transaction id (a replay job's fixed end).
    pub until_tx: Option<u64>,
}

/// The events matching `query.filter` after `query.after`, in `(tx, seq)`
/// order, at most `query.limit`, all older than every transaction in flight
/// (module docs). An empty page means: nothing more for now.
pub async fn page<'c>(
    executor: impl PgExecutor<'c>,
    query: PageQuery<'_>,
) -> Result<Vec<EventRecord>, QueryError> {
    let rows = page_query(EVENT_COLUMNS, query)
        .build()
        .fetch_all(executor)
        .await?;
    rows.iter().map(EventRecord::from_row).collect()
}

/// The statement of [`page`] selecting `columns` (same conditions, order
/// and limit), for readers that decode rows themselves: the API writes
/// rows straight to bytes. `columns` is trusted SQL text, never user input.
pub fn page_query<'a>(columns: &str, query: PageQuery<'a>) -> QueryBuilder<'a, Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(columns);
    qb.push(" FROM events e WHERE e.tx < pg_snapshot_xmin(pg_current_snapshot())");
    if let Some(until) = query.until_tx {
        qb.push(" AND e.tx < ")
            .push_bind(until.to_string())
            .push("::xid8");
    }
    if let Some(after) = query.after {
        qb.push(" AND (e.tx, e.seq) > (")
            .push_bind(after.tx.to_string())
            .push("::xid8, ")
            .push_bind(after.seq)
            .push(")");
    }
    query.filter.push_conditions(&mut qb);
    qb.push(" ORDER BY e.tx, e.seq LIMIT ")
        .push_bind(query.limit.max(0));
    qb
}

/// The horizon of [`page`] now: every event of a transaction below it is
/// readable, none above it yet. A replay job stores it as its `until_tx`.
pub async fn horizon<'c>(executor: impl PgExecutor<'c>) -> Result<u64, QueryError> {
    let text: String = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .fetch_one(executor)
        .await?;
    text.parse()
        .map_err(|_| QueryError::Fatal(format!("snapshot xmin {text:?} is not a 64-bit id")))
}

/// One event by id (found through `event_ids`, so only its month's
/// partition is searched).
pub async fn event_by_id<'c>(
    executor: impl PgExecutor<'c>,
    event_id: Uuid,
) -> Result<Option<EventRecord>, QueryError> {
    let row = event_by_id_query(EVENT_COLUMNS, event_id)
        .build()
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(EventRecord::from_row).transpose()
}

/// The statement of [`event_by_id`] selecting `columns` (trusted SQL text,
/// never user input).
pub fn event_by_id_query<'a>(columns: &str, event_id: Uuid) -> QueryBuilder<'a, Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(columns);
    qb.push(" FROM events e WHERE e.event_id = ")
        .push_bind(event_id)
        .push(" AND e.occurred_at = (SELECT i.occurred_at FROM event_ids i WHERE i.event_id = ")
        .push_bind(event_id)
        .push(")");
    qb
}

/// A stream's events that occurred at or before `at`, in `(tx, seq)` order
/// (a stream's events come from one Kafka partition, where this is the
/// partition's order), at most `max + 1` of them so the caller can tell
/// that there were more than `max`.
pub async fn stream_until<'c>(
    executor: impl PgExecutor<'c>,
    stream_id: &str,
    at: DateTime<Utc>,
    max: i64,
) -> Result<Vec<EventRecord>, QueryError> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(EVENT_COLUMNS);
    qb.push(" FROM events e WHERE e.stream_id = ")
        .push_bind(stream_id.to_owned())
        .push(" AND e.occurred_at <= ")
        .push_bind(at)
        .push(" ORDER BY e.tx, e.seq LIMIT ")
        .push_bind(max.saturating_add(1));
    let rows = qb.build().fetch_all(executor).await?;
    rows.iter().map(EventRecord::from_row).collect()
}

/// Whether any event of the stream exists (to tell "no such stream" from
/// "nothing yet at that time").
pub async fn stream_exists<'c>(
    executor: impl PgExecutor<'c>,
    stream_id: &str,
) -> Result<bool, QueryError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = $1)")
            .bind(stream_id)
            .fetch_one(executor)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_refuses_forgeries() {
        let p = Position {
            tx: 123_456_789_012,
            seq: 42,
        };
        assert_eq!(Position::from_cursor(&p.to_cursor()), Ok(p));
        assert_eq!(Position::from_cursor(""), Err(BadCursor));
        assert_eq!(Position::from_cursor("not a cursor!"), Err(BadCursor));
        let mut other_kind = URL_SAFE_NO_PAD.decode(p.to_cursor()).unwrap();
        other_kind[0] = 9;
        assert_eq!(
            Position::from_cursor(&URL_SAFE_NO_PAD.encode(&other_kind)),
            Err(BadCursor)
        );
        let too_long = URL_SAFE_NO_PAD.encode([1u8; 18]);
        assert_eq!(Position::from_cursor(&too_long), Err(BadCursor));
    }

    #[test]
    fn type_patterns() {
        assert_eq!(
            "order.created".parse(),
            Ok(TypePattern::Exact("order.created".into()))
        );
        assert_eq!("order.*".parse(), Ok(TypePattern::Prefix("order.".into())));
        assert_eq!("*".parse(), Ok(TypePattern::Any));
        for bad in ["", "order*", "*.created", "order.*.x", "a.**", ".*"] {
            assert!(bad.parse::<TypePattern>().is_err(), "{bad}");
        }
        let p: TypePattern = "audit.*".parse().unwrap();
        assert!(p.matches("audit.pii_read"));
        assert!(!p.matches("auditx.pii_read"));
        assert_eq!(p.to_string(), "audit.*");
    }

    #[test]
    fn filters_round_trip_through_json() {
        let filter = EventFilter {
            stream_id: Some("order-1".into()),
            event_types: vec!["order.*".parse().unwrap()],
            blind: vec![BlindMatch {
                name: "email".into(),
                tokens: vec!["email:00".into()],
            }],
            ..EventFilter::default()
        };
        let text = serde_json::to_string(&filter).unwrap();
        assert_eq!(serde_json::from_str::<EventFilter>(&text).unwrap(), filter);
        assert!(serde_json::from_str::<EventFilter>(r#"{"event_types":["a*"]}"#).is_err());
    }
}
