//! Events the system writes itself, in the `system` chain: erasures
//! (`audit.subject_erased`) and, later, audited reads of personal data.

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::chain::{ChainHead, StoredEvent, SYSTEM_CHAIN};
use super::postgres::{copy_rows, lock_chain, update_chain};
use crate::error::StoreError;

/// The `source` of events the system writes.
pub const SYSTEM_SOURCE: &str = "order-audit-trail";

/// A system event before it is linked.
pub fn system_event(
    event_type: &str,
    stream_id: String,
    subject_id: Option<String>,
    payload: &serde_json::Value,
) -> Result<StoredEvent, StoreError> {
    let mut text = Vec::with_capacity(256);
    crate::canonical::write_value(payload, &mut text)
        .map_err(|e| StoreError::Fatal(format!("system event payload: {e}")))?;
    let payload = String::from_utf8(text)
        .map_err(|e| StoreError::Fatal(format!("system event payload: {e}")))?;
    let now = Utc::now().trunc_subsecs(6);
    Ok(StoredEvent {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        stream_id,
        stream_version: None,
        occurred_at: now,
        ingested_at: now,
        source: Some(SYSTEM_SOURCE.to_owned()),
        correlation_id: None,
        causation_id: None,
        subject_id,
        // Nothing else is hashed for dedup: system events are never retried.
        content_hash: Sha256::digest(payload.as_bytes()).into(),
        payload,
        metadata: None,
        headers: "[]".to_owned(),
        blind_index: Vec::new(),
        kafka_topic: None,
        kafka_partition: None,
        kafka_offset: None,
        chain_id: SYSTEM_CHAIN.to_owned(),
        chain_position: 0,
        hash: [0; 32],
    })
}

/// Links and stores system events in the caller's transaction. Returns the
/// system chain's new head (for a checkpoint after commit).
pub async fn append_system_events(
    conn: &mut sqlx::PgConnection,
    events: &mut [StoredEvent],
) -> Result<ChainHead, StoreError> {
    let mut head = lock_chain(&mut *conn, SYSTEM_CHAIN).await?;
    let mut scratch = Vec::with_capacity(1024);
    for event in events.iter_mut() {
        head.link(event, &mut scratch);
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let hashes: Vec<Vec<u8>> = events.iter().map(|e| e.content_hash.to_vec()).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
    sqlx::query(
        "INSERT INTO event_ids (event_id, content_hash, occurred_at)
         SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::timestamptz[])",
    )
    .bind(&ids)
    .bind(&hashes)
    .bind(&times)
    .execute(&mut *conn)
    .await?;
    copy_rows(&mut *conn, events).await?;
    update_chain(&mut *conn, &head).await?;
    Ok(head)
}

/// What erasing a subject did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub subject_id: String,
    /// The `audit.subject_erased` event.
    pub event_id: Uuid,
    pub erased_at: DateTime<Utc>,
    /// The destroyed data key (none if the subject never had one).
    pub key_id: Option<Uuid>,
    /// True when the subject had been erased before: nothing was done.
    pub already_erased: bool,
    /// The system chain's head after the erasure event (None if already erased).
    pub system_chain_length: Option<u64>,
    /// Whether the deleted key row was vacuumed away at once.
    pub vacuumed: bool,
}

/// Erases a data subject: destroys its data key and records the erasure as
/// an `audit.subject_erased` event in the system chain, in one transaction.
/// Irreversible and idempotent: erasing again returns the first erasure.
pub async fn erase_subject(
    pool: &PgPool,
    subject_id: &str,
    reason: &str,
    erased_by: &str,
) -> Result<(Erasure, Option<ChainHead>), StoreError> {
    if subject_id.is_empty() {
        return Err(StoreError::Fatal(
            "the subject id is empty; pass the data subject's id (the events' subject_id)".into(),
        ));
    }
    if reason.trim().is_empty() {
        return Err(StoreError::Fatal(
            "a reason is required (for example the erasure request's ticket)".into(),
        ));
    }
    if erased_by.trim().is_empty() {
        return Err(StoreError::Fatal(
            "who requests the erasure is required".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    // Waits for writers that already checked their keys (store::protection);
    // writers after this transaction find the key gone.
    super::protection::lock_out_writers(&mut tx).await?;
    if let Some(done) = previous(&mut tx, subject_id).await? {
        return Ok((done, None));
    }
    let key_id: Option<Uuid> =
        sqlx::query_scalar("DELETE FROM subject_keys WHERE subject_id = $1 RETURNING key_id")
            .bind(subject_id)
            .fetch_optional(&mut *tx)
            .await?;
    let payload = json!({
        "subject_id": subject_id,
        "key_id": key_id.map(|k| k.to_string()),
        "reason": reason,
        "erased_by": erased_by,
    });
    let mut event = [system_event(
        "audit.subject_erased",
        format!("subject-erasure/{subject_id}"),
        Some(subject_id.to_owned()),
        &payload,
    )?];
    let head = append_system_events(&mut tx, &mut event).await?;
    let [event] = event;
    let inserted = sqlx::query(
        "INSERT INTO erased_subjects (subject_id, key_id, erased_at, erased_by, reason, event_id)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(subject_id)
    .bind(key_id)
    .bind(event.occurred_at)
    .bind(erased_by)
    .bind(reason)
    .bind(event.event_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        // A concurrent erasure of the same subject committed first.
        tx.rollback().await?;
        let mut conn = pool.acquire().await?;
        let done = previous(&mut conn, subject_id)
            .await?
            .ok_or_else(|| StoreError::Conflict("concurrent erasure vanished; try again".into()))?;
        return Ok((done, None));
    }
    tx.commit().await?;
    // The deleted key row stays in the table file until vacuumed; vacuum now
    // so no copy of the wrapped key lingers in the live database. PostgreSQL
    // silently skips VACUUM for a role that does not own the table.
    let may_vacuum: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, c.relowner, 'USAGE') OR r.rolsuper
         FROM pg_class c, pg_roles r
         WHERE c.oid = 'subject_keys'::regclass AND r.rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(false);
    let vacuumed = may_vacuum
        && sqlx::query("VACUUM subject_keys")
            .execute(pool)
            .await
            .is_ok();
    if !vacuumed {
        tracing::warn!(
            "VACUUM subject_keys not possible for this role; the deleted wrapped key stays in the table file until autovacuum removes it"
        );
    }
    Ok((
        Erasure {
            subject_id: subject_id.to_owned(),
            event_id: event.event_id,
            erased_at: event.occurred_at,
            key_id,
            already_erased: false,
            system_chain_length: Some(head.length),
            vacuumed,
        },
        Some(head),
    ))
}

async fn previous(
    conn: &mut sqlx::PgConnection,
    subject_id: &str,
) -> Result<Option<Erasure>, StoreError> {
    let row = sqlx::query(
        "SELECT event_id, erased_at, key_id FROM erased_subjects WHERE subject_id = $1",
    )
    .bind(subject_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(Erasure {
            subject_id: subject_id.to_owned(),
            event_id: row.try_get(0)?,
            erased_at: row.try_get(1)?,
            key_id: row.try_get(2)?,
            already_erased: true,
            system_chain_length: None,
            vacuumed: false,
        })
    })
    .transpose()
}
