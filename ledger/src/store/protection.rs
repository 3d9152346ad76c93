//! Field protection on the write path: per-subject data keys kept in
//! PostgreSQL (wrapped by a KEK from a [`KeyProvider`]), and the step that
//! turns a parsed event into its stored form (protected fields encrypted,
//! canonical JSON, blind-index tokens).
//!
//! Erasure safety: a writer pins the data keys it used (`FOR KEY SHARE`) in
//! the transaction that stores the ciphertexts, and re-checks that none of
//! its subjects was erased meanwhile. An erasure deletes the key row, so it
//! waits for such a writer, and any writer after it finds the key gone and
//! starts the batch again. No event is ever written with a destroyed key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::chain::StoredEvent;
use crate::envelope::{DeadLetterReason, Event};
use crate::error::StoreError;
use crate::protect::{self, BlindIndexKey, DataKey, KeyProvider, Policy, WrappedKey};

/// The data key of events without a data subject. It is never erased.
pub const DEFAULT_SUBJECT: &str = "";

/// How long a node keeps an unwrapped data key in memory. Bounded so that
/// an erased subject's key leaves every node's memory soon after erasure.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(60);

/// Protection settings of a store.
pub struct Protection {
    policy: Policy,
    keys: Keyring,
    blind: BlindIndexKey,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("provider", &self.keys.provider.describe())
            .finish_non_exhaustive()
    }
}

impl Protection {
    pub fn new(policy: Policy, provider: Arc<dyn KeyProvider>) -> Result<Self, StoreError> {
        let blind = provider
            .blind_index_key()
            .map_err(|e| StoreError::Fatal(format!("blind-index key: {e}")))?;
        Ok(Self {
            policy,
            keys: Keyring::new(provider),
            blind,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keys
    }

    pub fn blind_key(&self) -> &BlindIndexKey {
        &self.blind
    }
}

/// A subject's data key, as far as a writer or reader is concerned.
#[derive(Clone)]
pub enum SubjectKey {
    Live { key_id: Uuid, key: Arc<DataKey> },
    Erased,
}

struct Cached {
    key: SubjectKey,
    at: Instant,
}

/// How often the cache drops expired keys, so an erased subject's key
/// leaves memory even if that subject never comes up again.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Data keys by subject, cached in memory for [`KEY_CACHE_TTL`].
pub struct Keyring {
    provider: Arc<dyn KeyProvider>,
    cache: Mutex<HashMap<String, Cached>>,
    swept: Mutex<Instant>,
}

impl Keyring {
    pub fn new(provider: Arc<dyn KeyProvider>) -> Self {
        Self {
            provider,
            cache: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Drops every expired key (their bytes are zeroized on drop).
    pub fn sweep(&self) {
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if swept.elapsed() < SWEEP_EVERY {
                return;
            }
            *swept = Instant::now();
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, c| c.at.elapsed() < KEY_CACHE_TTL);
    }

    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    fn cached(&self, subject: &str) -> Option<SubjectKey> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(subject) {
            Some(c) if c.at.elapsed() < KEY_CACHE_TTL => Some(c.key.clone()),
            Some(_) => {
                cache.remove(subject);
                None
            }
            None => None,
        }
    }

    /// Forgets subjects' keys (they were erased, or a pin failed).
    pub fn evict(&self, subjects: &[String]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for s in subjects {
            cache.remove(s);
        }
    }

    /// The data keys of `subjects`, creating those that do not exist yet
    /// (unless the subject was erased).
    pub async fn resolve(
        &self,
        pool: &PgPool,
        subjects: &[&str],
        create: bool,
    ) -> Result<HashMap<String, SubjectKey>, StoreError> {
        self.sweep();
        let mut out = HashMap::with_capacity(subjects.len());
        let mut missing: Vec<&str> = Vec::new();
        for s in subjects {
            if out.contains_key(*s) || missing.contains(s) {
                continue;
            }
            match self.cached(s) {
                Some(k) => {
                    out.insert((*s).to_owned(), k);
                }
                None => missing.push(s),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let mut found = self.load(pool, &missing).await?;
        let absent: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|s| !found.contains_key(*s))
            .collect();
        if create && !absent.is_empty() {
            self.create(pool, &absent).await?;
            // Another node may have won the race for some: read the winners.
            found.extend(self.load(pool, &absent).await?);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for (subject, key) in found {
            cache.insert(
                subject.clone(),
                Cached {
                    key: key.clone(),
                    at: Instant::now(),
                },
            );
            out.insert(subject, key);
        }
        Ok(out)
    }

    async fn load(
        &self,
        pool: &PgPool,
        subjects: &[&str],
    ) -> Result<HashMap<String, SubjectKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.subject_id, k.key_id, k.kek_version, k.wrapped_key, e.subject_id IS NOT NULL
             FROM unnest($1::text[]) AS s(subject_id)
             LEFT JOIN subject_keys k USING (subject_id)
             LEFT JOIN erased_subjects e USING (subject_id)",
        )
        .bind(subjects)
        .fetch_all(pool)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let subject: String = row.try_get(0)?;
            let erased: bool = row.try_get(4)?;
            if erased {
                out.insert(subject, SubjectKey::Erased);
                continue;
            }
            let Some(key_id) = row.try_get::<Option<Uuid>, _>(1)? else {
                continue;
            };
            let wrapped = WrappedKey {
                key_id: key_id.to_string(),
                kek_version: row.try_get(2)?,
                ciphertext: row.try_get(3)?,
            };
            let key = self.provider.unwrap(&wrapped).await.map_err(|e| {
                StoreError::Fatal(format!(
                    "cannot unwrap the data key {key_id} (KEK version {}): {e}",
                    wrapped.kek_version
                ))
            })?;
            out.insert(
                subject,
                SubjectKey::Live {
                    key_id,
                    key: Arc::new(key),
                },
            );
        }
        Ok(out)
    }

    async fn create(&self, pool: &PgPool, subjects: &[&str]) -> Result<(), StoreError> {
        let mut ids = Vec::with_capacity(subjects.len());
        let mut versions = Vec::with_capacity(subjects.len());
        let mut wrapped_keys = Vec::with_capacity(subjects.len());
        for _ in subjects {
            let key_id = Uuid::new_v4();
            let key = DataKey::generate_with_id(key_id.to_string());
            let wrapped = self
                .provider
                .wrap(&key)
                .await
                .map_err(|e| StoreError::Unavailable(format!("wrapping a new data key: {e}")))?;
            ids.push(key_id);
            versions.push(wrapped.kek_version);
            wrapped_keys.push(wrapped.ciphertext);
        }
        // An erased subject never gets a new key: its data stays erased.
        sqlx::query(
            "INSERT INTO subject_keys (subject_id, key_id, kek_version, wrapped_key)
             SELECT s, k, v, w FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bytea[]) AS t(s, k, v, w)
             WHERE NOT EXISTS (SELECT 1 FROM erased_subjects e WHERE e.subject_id = t.s)
             ON CONFLICT (subject_id) DO NOTHING",
        )
        .bind(subjects)
        .bind(&ids)
        .bind(&versions)
        .bind(&wrapped_keys)
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// A batch's events in stored form, by Kafka offset, plus the keys used.
#[derive(Default)]
pub struct Prepared {
    rows: HashMap<i64, Result<StoredEvent, DeadLetterReason>>,
    /// Live data keys the rows were encrypted with, and their subjects.
    keys_used: HashMap<Uuid, String>,
}

impl Prepared {
    /// The stored form of the event at `offset`, or why it has none.
    pub fn take(&mut self, offset: i64) -> Result<StoredEvent, DeadLetterReason> {
        self.rows
            .remove(&offset)
            .unwrap_or_else(|| Err(DeadLetterReason::Unprotectable {
                error: format!("offset {offset} was not prepared (internal error)"),
            }))
    }
}

/// Turns events into their stored form: the subject resolved, protected
/// fields encrypted (or marked erased), JSON canonical, blind tokens.
pub async fn prepare(
    protection: Option<&Protection>,
    pool: &PgPool,
    events: &[&Event],
) -> Result<Prepared, StoreError> {
    let ingested_at = Utc::now();
    let mut prepared = Prepared::default();
    let mut payloads = Vec::with_capacity(events.len());
    let mut subjects = Vec::with_capacity(events.len());
    for event in events {
        // With `arbitrary_precision`, serde_json reads an object keyed by its
        // private token as a number: refuse rather than store altered data.
        let text = event.payload.get();
        let reserved = |t: &str| {
            (t.contains("private") || t.contains("\\u")) && crate::canonical::uses_private_keys(t)
        };
        let metadata_reserved = event.metadata.as_deref().is_some_and(|m| reserved(m.get()));
        let payload: Result<Value, String> = if metadata_reserved {
            Err("the metadata uses the reserved key prefix `$serde_json::private::`".into())
        } else if reserved(text) {
            Err("the payload uses the reserved key prefix `$serde_json::private::`".into())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        };
        let subject = match (&payload, protection) {
            (_, None) => None,
            (Ok(p), Some(protection)) => event
                .subject_id
                .clone()
                .or_else(|| protection.policy.subject_from(p)),
            (Err(_), Some(_)) => event.subject_id.clone(),
        };
        subjects.push(subject);
        payloads.push(payload);
    }
    let keys = match protection {
        Some(protection) => {
            let wanted: Vec<&str> = subjects
                .iter()
                .map(|s| s.as_deref().unwrap_or(DEFAULT_SUBJECT))
                .collect();
            protection.keys.resolve(pool, &wanted, true).await?
        }
        None => HashMap::new(),
    };
    let mut buffer = Vec::with_capacity(2048);
    for ((event, payload), subject) in events.iter().zip(payloads).zip(subjects) {
        let result = match payload {
            Err(e) => Err(DeadLetterReason::Unprotectable {
                error: format!("payload cannot be stored: {e}"),
            }),
            Ok(payload) => store_form(
                protection,
                &keys,
                event,
                payload,
                subject,
                ingested_at,
                &mut buffer,
                &mut prepared.keys_used,
            ),
        };
        prepared.rows.insert(event.kafka_offset, result);
    }
    Ok(prepared)
}

#[allow(clippy::too_many_arguments)]
fn store_form(
    protection: Option<&Protection>,
    keys: &HashMap<String, SubjectKey>,
    event: &Event,
    mut payload: Value,
    subject: Option<String>,
    ingested_at: DateTime<Utc>,
    buffer: &mut Vec<u8>,
    keys_used: &mut HashMap<Uuid, String>,
) -> Result<StoredEvent, DeadLetterReason> {
    let unprotectable = |e: &dyn std::fmt::Display| DeadLetterReason::Unprotectable {
        error: e.to_string(),
    };
    let mut blind_index = Vec::new();
    if let Some(protection) = protection {
        let key_subject = subject.as_deref().unwrap_or(DEFAULT_SUBJECT);
        let fields = protection.policy.fields_for(&event.event_type);
        match keys.get(key_subject) {
            Some(SubjectKey::Live { key_id, key }) => {
                let protected = protect::protect_payload(
                    &mut payload,
                    event.event_id,
                    fields,
                    key,
                    Some((&protection.blind, protection.policy.blind_indexes())),
                )
                .map_err(|e| unprotectable(&e))?;
                if protected.encrypted_any() {
                    keys_used.insert(*key_id, key_subject.to_owned());
                }
                blind_index = protected.blind_tokens;
            }
            // Personal data of an erased subject is not stored again.
            Some(SubjectKey::Erased) => {
                if let Some(pointer) = protect::cipher::find_envelope(&payload) {
                    return Err(unprotectable(&format!(
                        "the payload holds a `$enc` object at {pointer}; that key is reserved for encrypted fields"
                    )));
                }
                protect::erase_fields(&mut payload, fields)
            }
            None => {
                return Err(unprotectable(&format!(
                    "no data key for subject {key_subject:?}"
                )))
            }
        }
    }
    buffer.clear();
    crate::canonical::write_value(&payload, buffer).map_err(|e| unprotectable(&e))?;
    let text = String::from_utf8(std::mem::take(buffer)).map_err(|e| unprotectable(&e))?;
    let mut stored = StoredEvent::from_event(event, text, ingested_at).map_err(|e| unprotectable(&e))?;
    stored.subject_id = subject;
    stored.blind_index = blind_index;
    Ok(stored)
}

/// Pins the data keys a batch used, inside its write transaction, and
/// checks their subjects were not erased meanwhile (module docs).
pub async fn pin_keys(
    conn: &mut sqlx::PgConnection,
    prepared: &Prepared,
    protection: Option<&Protection>,
) -> Result<(), StoreError> {
    let Some(protection) = protection else {
        return Ok(());
    };
    if prepared.keys_used.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = prepared.keys_used.keys().copied().collect();
    let pinned: Vec<Uuid> =
        sqlx::query_scalar("SELECT key_id FROM subject_keys WHERE key_id = ANY($1) FOR KEY SHARE")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let subjects: Vec<String> = prepared.keys_used.values().cloned().collect();
    let erased: Vec<String> =
        sqlx::query_scalar("SELECT subject_id FROM erased_subjects WHERE subject_id = ANY($1)")
            .bind(&subjects)
            .fetch_all(&mut *conn)
            .await?;
    if pinned.len() != ids.len() || !erased.is_empty() {
        let gone: Vec<String> = prepared
            .keys_used
            .iter()
            .filter(|(id, s)| !pinned.contains(id) || erased.contains(s))
            .map(|(_, s)| s.clone())
            .collect();
        protection.keys.evict(&gone);
        return Err(StoreError::Conflict(format!(
            "{} data subject(s) of this batch were erased while it was prepared; preparing it again",
            gone.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{parse, ParseOptions};
    use crate::store::conformance::{envelope, record};

    /// An ordinary event whose payload text is then replaced verbatim.
    fn event_with_payload(payload: &str) -> Event {
        let value = envelope("0b9c8a52-7f1e-4d6a-9c3e-2f8b1a4d5e60", "order-1", 1);
        let raw = record("orders", 0, 7, value.to_string().as_bytes());
        let mut event = parse(&raw, &ParseOptions::default()).expect("valid envelope");
        event.payload =
            serde_json::value::RawValue::from_string(payload.to_string()).expect("raw payload");
        event
    }

    #[tokio::test]
    async fn serde_private_keys_become_dead_letters() {
        // Connects on first use only; prepare without protection never does.
        let pool = PgPool::connect_lazy("postgres://localhost/unused").expect("lazy pool");
        for payload in [
            r#"{"a": {"$serde_json::private::Number": "1.50"}}"#,
            r#"{"a": {"\u0024serde_json::private::Number": "1.50"}}"#,
            r#"{"a": [{"\u0024serde_json::\u0070rivate::RawValue": "[1]"}]}"#,
        ] {
            let event = event_with_payload(payload);
            let mut prepared = prepare(None, &pool, &[&event]).await.expect("prepare");
            match prepared.take(7) {
                Err(DeadLetterReason::Unprotectable { error }) => {
                    assert!(error.contains("reserved"), "{error}")
                }
                other => panic!("{payload}: expected a dead letter, got {:?}", other.map(|e| e.payload)),
            }
        }
        let ordinary = event_with_payload(r#"{"a": {"private": "\u0041"}}"#);
        let mut prepared = prepare(None, &pool, &[&ordinary]).await.expect("prepare");
        assert!(prepared.take(7).is_ok());
    }
}
