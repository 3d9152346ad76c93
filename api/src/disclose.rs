//! What a caller may see of an event's protected fields.
//!
//! - Everyone by default: every encrypted field as `{"$redacted": true}`.
//! - Auditors (and admins) with `decrypt=true` and a `purpose`: the fields
//!   decrypted (`{"$erased": true}` for an erased subject). Such a read is
//!   recorded before any plaintext leaves the node, in one transaction: a
//!   row of `access_log` and an `audit.pii_read` event in the system chain
//!   (who, why, what). If recording fails, the read fails.
//!
//! Data keys are read from `subject_keys` for each request rather than
//! from a cache, so a subject erased a moment ago is never decrypted again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use audit_ledger::protect::{self, DataKey, KeyLookup, WrappedKey};
use audit_ledger::query::EventRecord;
use audit_ledger::store::system::{append_system_events, system_event};
use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::auth::{Caller, Role};
use crate::problem::ApiError;
use crate::state::ApiState;

/// The event type of an audited read of personal data.
pub const PII_READ_EVENT: &str = "audit.pii_read";
/// Longest accepted `purpose`.
pub const MAX_PURPOSE_CHARS: usize = 500;

/// Where an event came from in Kafka (null for events the system wrote).
#[derive(Debug, Clone, PartialEq, Object)]
pub struct KafkaPosition {
    #[oai(nullable)]
    pub topic: Option<String>,
    #[oai(nullable)]
    pub partition: Option<i32>,
    #[oai(nullable)]
    pub offset: Option<i64>,
}

/// The event's link in its hash chain.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct ChainLink {
    /// `topic/partition`, or `system`.
    #[oai(nullable)]
    pub id: Option<String>,
    /// 0-based position in the chain.
    #[oai(nullable)]
    pub position: Option<i64>,
    /// Hex of the chain hash.
    #[oai(nullable)]
    pub hash: Option<String>,
}

/// An event as the API shows it.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct EventView {
    /// Store-wide insertion number.
    pub seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub stream_id: String,
    #[oai(nullable)]
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    #[oai(nullable)]
    pub source: Option<String>,
    #[oai(nullable)]
    pub correlation_id: Option<Uuid>,
    #[oai(nullable)]
    pub causation_id: Option<Uuid>,
    #[oai(nullable)]
    pub subject_id: Option<String>,
    /// The payload; protected fields are `{"$redacted": true}` unless decrypted.
    pub payload: Value,
    #[oai(nullable)]
    pub metadata: Option<Value>,
    /// Kafka headers: `[{"key": …, "value": …}]`.
    pub headers: Value,
    pub kafka: KafkaPosition,
    pub chain: ChainLink,
}

impl EventView {
    /// The view of a record whose payload was already redacted or revealed.
    pub fn from_record(record: EventRecord) -> Self {
        Self {
            seq: record.seq,
            event_id: record.event_id,
            event_type: record.event_type,
            stream_id: record.stream_id,
            stream_version: record.stream_version,
            occurred_at: record.occurred_at,
            ingested_at: record.ingested_at,
            source: record.source,
            correlation_id: record.correlation_id,
            causation_id: record.causation_id,
            subject_id: record.subject_id,
            payload: record.payload,
            metadata: record.metadata,
            headers: record.headers,
            kafka: KafkaPosition {
                topic: record.kafka_topic,
                partition: record.kafka_partition,
                offset: record.kafka_offset,
            },
            chain: ChainLink {
                id: record.chain_id,
                position: record.chain_position,
                hash: record.hash.map(hex::encode),
            },
        }
    }
}

/// How protected fields are shown in a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disclosure {
    Redacted,
    /// Decrypted, for an auditor who said why.
    Decrypted {
        purpose: String,
    },
}

impl Disclosure {
    /// From the `decrypt` and `purpose` parameters: `decrypt=true` needs the
    /// auditor role (403) and a purpose (400).
    pub fn from_params(
        caller: &Caller,
        decrypt: Option<bool>,
        purpose: Option<String>,
    ) -> Result<Self, ApiError> {
        if decrypt != Some(true) {
            return Ok(Self::Redacted);
        }
        caller.require(Role::Auditor, "decrypt=true")?;
        let Some(purpose) = purpose
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
        else {
            return Err(ApiError::bad_request(
                "decrypt=true needs a `purpose`: say why you read this personal data (for example purpose=ticket-4711); it is recorded in the access log",
            ));
        };
        if purpose.chars().count() > MAX_PURPOSE_CHARS || purpose.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "`purpose` must be at most {MAX_PURPOSE_CHARS} characters of printable text"
            )));
        }
        Ok(Self::Decrypted { purpose })
    }
}

/// Shows `records` to `caller` as `disclosure` says, recording a decrypting
/// read first (module docs). `route` names the route template, e.g.
/// `GET /v1/events`.
pub async fn disclose(
    state: &Arc<ApiState>,
    caller: &Caller,
    route: &str,
    disclosure: &Disclosure,
    mut records: Vec<EventRecord>,
) -> Result<Vec<EventRecord>, ApiError> {
    let Disclosure::Decrypted { purpose } = disclosure else {
        for record in &mut records {
            protect::redact_payload(&mut record.payload);
        }
        return Ok(records);
    };
    let keys = load_keys(state, &records).await?;
    let lookup = |kid: &str| keys.lookup(kid);
    let mut revealed_ids = Vec::new();
    for record in &mut records {
        let revealed = protect::reveal_payload(&mut record.payload, record.event_id, &lookup)
            .map_err(|e| {
                ApiError::internal(
                    "decrypting an event",
                    &format!(
                        "event {}: {e}; run `audit-node verify` to check the store",
                        record.event_id
                    ),
                )
            })?;
        if revealed.decrypted > 0 {
            revealed_ids.push(record.event_id);
        }
    }
    if !revealed_ids.is_empty() {
        record_read(state, caller, route, purpose, &revealed_ids).await?;
    }
    Ok(records)
}

/// Data keys for a set of events, by key id.
struct Keys {
    found: HashMap<String, DataKey>,
    erased: HashSet<String>,
}

impl Keys {
    fn lookup(&self, kid: &str) -> KeyLookup<'_> {
        match self.found.get(kid) {
            Some(key) => KeyLookup::Found(key),
            None if self.erased.contains(kid) => KeyLookup::Erased,
            None => KeyLookup::Missing,
        }
    }
}

async fn load_keys(state: &Arc<ApiState>, records: &[EventRecord]) -> Result<Keys, ApiError> {
    let mut ids: Vec<Uuid> = records
        .iter()
        .flat_map(|r| protect::key_ids(&r.payload))
        .filter_map(|kid| Uuid::parse_str(&kid).ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut keys = Keys {
        found: HashMap::new(),
        erased: HashSet::new(),
    };
    if ids.is_empty() {
        return Ok(keys);
    }
    let Some(protection) = state.protection() else {
        return Err(ApiError::internal(
            "decrypting events",
            &"encrypted fields found but this node runs without field protection",
        ));
    };
    let context = "reading data keys";
    let rows = sqlx::query(
        "SELECT key_id, kek_version, wrapped_key FROM subject_keys WHERE key_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(state.pool())
    .await
    .map_err(|e| ApiError::from_sqlx(e, context))?;
    let provider = protection.keyring().provider();
    for row in rows {
        let key_id: Uuid = row
            .try_get(0)
            .map_err(|e| ApiError::internal(context, &e))?;
        let wrapped = WrappedKey {
            key_id: key_id.to_string(),
            kek_version: row
                .try_get(1)
                .map_err(|e| ApiError::internal(context, &e))?,
            ciphertext: row
                .try_get(2)
                .map_err(|e| ApiError::internal(context, &e))?,
        };
        let key = provider.unwrap(&wrapped).await.map_err(|e| {
            if e.is_retryable() {
                tracing::warn!(%key_id, error = %e, "key provider unavailable");
                ApiError::unavailable("the key provider is unavailable; retry shortly", 1)
            } else {
                ApiError::internal(
                    context,
                    &format!(
                        "cannot unwrap data key {key_id} (KEK version {}): {e}",
                        wrapped.kek_version
                    ),
                )
            }
        })?;
        keys.found.insert(key_id.to_string(), key);
    }
    let missing: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !keys.found.contains_key(&id.to_string()))
        .collect();
    if !missing.is_empty() {
        let erased: Vec<Uuid> =
            sqlx::query_scalar("SELECT key_id FROM erased_subjects WHERE key_id = ANY($1)")
                .bind(&missing)
                .fetch_all(state.pool())
                .await
                .map_err(|e| ApiError::from_sqlx(e, context))?;
        keys.erased = erased.iter().map(Uuid::to_string).collect();
    }
    Ok(keys)
}

/// One `access_log` row and one `audit.pii_read` event, in one transaction.
async fn record_read(
    state: &Arc<ApiState>,
    caller: &Caller,
    route: &str,
    purpose: &str,
    event_ids: &[Uuid],
) -> Result<(), ApiError> {
    let context = "recording the read in the access log";
    let payload = json!({
        "who": { "name": caller.name, "role": caller.role.as_str() },
        "why": purpose,
        "what": { "route": route, "event_ids": event_ids },
    });
    let mut event = [system_event(
        PII_READ_EVENT,
        format!("pii-read/{}", caller.name),
        None,
        &payload,
    )
    .map_err(|e| ApiError::internal(context, &e))?];
    let mut tx = state
        .pool()
        .begin()
        .await
        .map_err(|e| ApiError::from_sqlx(e, context))?;
    // The system chain's row lock, taken here first, also orders access_log
    // ids by commit, so its id cursor never skips a row.
    let head = append_system_events(&mut tx, &mut event)
        .await
        .map_err(|e| store_error(e, context))?;
    let [event] = event;
    sqlx::query(
        "INSERT INTO access_log (at, actor, role, purpose, route, event_ids, audit_event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(event.occurred_at)
    .bind(&caller.name)
    .bind(caller.role.as_str())
    .bind(purpose)
    .bind(route)
    .bind(event_ids)
    .bind(event.event_id)
    .execute(&mut *tx)
    .await
    .map_err(|e| ApiError::from_sqlx(e, context))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::from_sqlx(e, context))?;
    tracing::info!(
        actor = %caller.name,
        role = caller.role.as_str(),
        route,
        events = event_ids.len(),
        audit_event_id = %event.event_id,
        "personal data read recorded"
    );
    metrics::counter!("audit_api_pii_reads_total").increment(1);
    state.observe_system_head(&head).await;
    Ok(())
}

/// Maps a store error of a write on behalf of the API.
pub fn store_error(error: audit_ledger::StoreError, context: &str) -> ApiError {
    use audit_ledger::StoreError as E;
    match error {
        E::Unavailable(message) => {
            if message.contains("57014") {
                return ApiError::from_query(
                    audit_ledger::query::QueryError::Timeout(message),
                    context,
                );
            }
            tracing::warn!(context, error = %message, "database unavailable");
            ApiError::unavailable(
                format!("the event store is unavailable while {context}; retry shortly"),
                1,
            )
        }
        E::Conflict(message) => {
            tracing::warn!(context, error = %message, "write conflict");
            ApiError::unavailable(
                format!("a concurrent write got in the way while {context}; retry"),
                1,
            )
        }
        E::Data(message) | E::Fatal(message) => ApiError::internal(context, &message),
    }
}
