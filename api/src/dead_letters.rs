//! Dead letters: records that could not become events, with the reason.
//!
//! Raw keys and values are kept as received and may hold personal data in
//! clear (docs/INTEGRITY.md § What stays in clear): only auditors and
//! admins see them.
//!
//! Pages run in `(tx, id)` order, `tx` being the id of the transaction that
//! stored the row, and only cover transactions older than every one still
//! in flight, like events (`audit_ledger::query`, Decision 40): dead
//! letters of concurrent batches commit out of `id` order, and a page
//! following `id` alone would skip a row that commits after a reader passed
//! its id. Following `next_cursor` never skips or repeats a dead letter.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::disclose::KafkaPosition;
use crate::filters;
use crate::problem::ApiError;
use crate::state::ApiState;
use crate::ApiTags;

/// A dead letter, without its raw bytes.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterSummary {
    pub id: i64,
    pub kafka: KafkaPosition,
    /// The event id, when the record had a readable one.
    #[oai(nullable)]
    pub event_id: Option<Uuid>,
    /// Stable reason code (`invalid_json`, `missing_field`, `unprotectable`, …).
    pub reason_code: String,
    /// What was wrong, in words.
    pub reason: String,
    pub received_at: DateTime<Utc>,
}

/// A page of dead letters, oldest first.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterSummary>,
    /// Pass as `cursor` to read on; `null` when the page is empty.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// Raw bytes of a record.
#[derive(Debug, Clone, Object)]
pub struct RawBytes {
    pub length: u64,
    pub base64: String,
    /// The bytes as text, when they are valid UTF-8.
    #[oai(nullable)]
    pub text: Option<String>,
}

/// A dead letter with its raw record (raw bytes for auditors and admins only).
#[derive(Debug, Clone, Object)]
pub struct DeadLetterDetail {
    pub id: i64,
    pub kafka: KafkaPosition,
    #[oai(nullable)]
    pub event_id: Option<Uuid>,
    pub reason_code: String,
    pub reason: String,
    pub received_at: DateTime<Utc>,
    /// Kafka headers: `[{"key": …, "value": …}]`.
    pub headers: Value,
    /// The record's key (null when absent or withheld).
    #[oai(nullable)]
    pub raw_key: Option<RawBytes>,
    /// The record's value (null when absent or withheld).
    #[oai(nullable)]
    pub raw_value: Option<RawBytes>,
    /// True when the raw key and value were withheld: they may hold personal data, and only auditors see them.
    pub raw_withheld: bool,
}

pub struct DeadLettersApi;

#[OpenApi]
impl DeadLettersApi {
    /// Dead letters, oldest first, filtered.
    #[oai(
        path = "/v1/dead-letters",
        method = "get",
        tag = "ApiTags::DeadLetters",
        operation_id = "list_dead_letters"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        /// Kafka topic.
        #[oai(validator(min_length = 1))]
        topic: Query<Option<String>>,
        /// Kafka partition.
        #[oai(validator(minimum(value = "0")))]
        partition: Query<Option<i32>>,
        /// Reason code, e.g. `invalid_json`.
        #[oai(validator(min_length = 1))]
        reason_code: Query<Option<String>>,
        /// `received_at >= received_from` (RFC 3339).
        received_from: Query<Option<DateTime<Utc>>>,
        /// `received_at < received_to` (RFC 3339).
        received_to: Query<Option<DateTime<Utc>>>,
        /// Dead letters per page (1 to 1000, default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(min_length = 1))]
        cursor: Query<Option<String>>,
    ) -> Result<Json<DeadLetterPage>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "listing dead letters")?;
        let after = cursor::decode(cursor.0.as_deref())?;
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT tx::text AS tx, id, kafka_topic, kafka_partition, kafka_offset, event_id, reason_code, reason, \
             received_at FROM dead_letters WHERE tx < pg_snapshot_xmin(pg_current_snapshot())",
        );
        if let Some(after) = after {
            qb.push(" AND (tx, id) > (")
                .push_bind(after.tx.to_string())
                .push("::xid8, ")
                .push_bind(after.id)
                .push(")");
        }
        if let Some(topic) = topic.0 {
            qb.push(" AND kafka_topic = ").push_bind(topic);
        }
        if let Some(partition) = partition.0 {
            qb.push(" AND kafka_partition = ").push_bind(partition);
        }
        if let Some(code) = reason_code.0 {
            qb.push(" AND reason_code = ").push_bind(code);
        }
        if let Some(t) = received_from.0 {
            qb.push(" AND received_at >= ").push_bind(t);
        }
        if let Some(t) = received_to.0 {
            qb.push(" AND received_at < ").push_bind(t);
        }
        qb.push(" ORDER BY tx, id LIMIT ")
            .push_bind(filters::page_limit(limit.0));
        let context = "listing dead letters";
        let rows = qb
            .build()
            .fetch_all(state.pool())
            .await
            .map_err(|e| ApiError::from_sqlx(e, context))?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let tx: String = row
                .try_get("tx")
                .map_err(|e| ApiError::internal(context, &e))?;
            let tx: u64 = tx.parse().map_err(|_| {
                ApiError::internal(
                    context,
                    &format!("dead_letters.tx {tx:?} is not a 64-bit id"),
                )
            })?;
            let item = summary(row).map_err(|e| ApiError::internal(context, &e))?;
            last = Some(cursor::Position { tx, id: item.id });
            items.push(item);
        }
        let next_cursor = last.map(cursor::encode);
        Ok(Json(DeadLetterPage {
            dead_letters: items,
            next_cursor,
        }))
    }

    /// One dead letter; its raw key and value only for auditors and admins.
    #[oai(
        path = "/v1/dead-letters/:id",
        method = "get",
        tag = "ApiTags::DeadLetters",
        operation_id = "get_dead_letter"
    )]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        id: Path<i64>,
    ) -> Result<Json<DeadLetterDetail>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "reading a dead letter")?;
        let context = "reading a dead letter";
        let row = sqlx::query(
            "SELECT id, kafka_topic, kafka_partition, kafka_offset, event_id, reason_code, reason, received_at, \
                    headers, raw_key, raw_value \
             FROM dead_letters WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(state.pool())
        .await
        .map_err(|e| ApiError::from_sqlx(e, context))?
        .ok_or_else(|| ApiError::not_found(format!("no dead letter {}", id.0)))?;
        let show_raw = caller.role >= Role::Auditor;
        detail(&row, show_raw)
            .map(Json)
            .map_err(|e| ApiError::internal(context, &e))
    }
}

/// Dead-letter cursors: where a row sits in page order, `(tx, id)`.
pub mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    use crate::problem::ApiError;

    /// Kind byte; event cursors and the other id cursors use other bytes.
    /// (0x10 was the cursor of the `id`-only pager before Decision 42: such a
    /// cursor is refused, and the client starts over.)
    pub const KIND: u8 = 0x12;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Position {
        pub tx: u64,
        pub id: i64,
    }

    /// base64url (no padding) of the kind byte, `tx` and `id` (big endian).
    pub fn encode(position: Position) -> String {
        let mut bytes = [0u8; 17];
        bytes[0] = KIND;
        bytes[1..9].copy_from_slice(&position.tx.to_be_bytes());
        bytes[9..17].copy_from_slice(&position.id.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(cursor: Option<&str>) -> Result<Option<Position>, ApiError> {
        let Some(cursor) = cursor else {
            return Ok(None);
        };
        let refuse = || {
            ApiError::bad_request(
                "parameter `cursor`: the cursor is not one this route returned (copy `next_cursor` from a \
                 previous response unchanged)",
            )
        };
        let mut bytes = [0u8; 17];
        match URL_SAFE_NO_PAD.decode_slice(cursor.trim().as_bytes(), &mut bytes) {
            Ok(17) if bytes[0] == KIND => {}
            _ => return Err(refuse()),
        }
        let mut tx = [0u8; 8];
        let mut id = [0u8; 8];
        tx.copy_from_slice(&bytes[1..9]);
        id.copy_from_slice(&bytes[9..17]);
        let position = Position {
            tx: u64::from_be_bytes(tx),
            id: i64::from_be_bytes(id),
        };
        // xid8 values are below 2^63 in practice; anything else was forged.
        if position.tx > i64::MAX as u64 {
            return Err(refuse());
        }
        Ok(Some(position))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cursors_round_trip_and_refuse_other_kinds() {
            let p = Position {
                tx: 9_000_000_001,
                id: 77,
            };
            assert_eq!(decode(Some(&encode(p))).unwrap(), Some(p));
            assert_eq!(decode(None).unwrap(), None);
            let old =
                crate::filters::id_cursor::encode(crate::filters::id_cursor::DEAD_LETTERS, 77);
            assert!(decode(Some(&old)).is_err());
            let event = audit_ledger::query::Position { tx: 1, seq: 2 }.to_cursor();
            assert!(decode(Some(&event)).is_err());
            let forged = URL_SAFE_NO_PAD.encode([[KIND].as_slice(), &[0xff; 16]].concat());
            assert!(decode(Some(&forged)).is_err());
        }
    }
}

fn summary(row: &PgRow) -> Result<DeadLetterSummary, sqlx::Error> {
    Ok(DeadLetterSummary {
        id: row.try_get("id")?,
        kafka: KafkaPosition {
            topic: row.try_get("kafka_topic")?,
            partition: row.try_get("kafka_partition")?,
            offset: row.try_get("kafka_offset")?,
        },
        event_id: row.try_get("event_id")?,
        reason_code: row.try_get("reason_code")?,
        reason: row.try_get("reason")?,
        received_at: row.try_get("received_at")?,
    })
}

fn detail(row: &PgRow, show_raw: bool) -> Result<DeadLetterDetail, sqlx::Error> {
    let s = summary(row)?;
    let raw = |column: &str| -> Result<Option<RawBytes>, sqlx::Error> {
        if !show_raw {
            return Ok(None);
        }
        let bytes: Option<Vec<u8>> = row.try_get(column)?;
        Ok(bytes.map(|b| RawBytes {
            length: b.len() as u64,
            base64: BASE64.encode(&b),
            text: String::from_utf8(b).ok(),
        }))
    };
    Ok(DeadLetterDetail {
        id: s.id,
        kafka: s.kafka,
        event_id: s.event_id,
        reason_code: s.reason_code,
        reason: s.reason,
        received_at: s.received_at,
        headers: row.try_get("headers")?,
        raw_key: raw("raw_key")?,
        raw_value: raw("raw_value")?,
        raw_withheld: !show_raw,
    })
}
