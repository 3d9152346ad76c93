//! Field protection on the write path: per-subject data keys kept in
//! PostgreSQL (wrapped by a KEK from a [`KeyProvider`]), and the step that
//! turns a parsed event into its stored form (protected fields encrypted,
//! canonical JSON, blind-index tokens).
//!
//! Erasure safety: in the transaction that stores the ciphertexts, a writer
//! takes the erasure lock ([`ERASURE_LOCK`], a transaction-level advisory
//! lock) shared, then checks that every data key it used still exists and
//! none of its subjects was erased. An erasure takes the same lock
//! exclusive before it deletes a key, so it waits for writers already past
//! their check, and any writer after it finds the key gone and starts the
//! batch again. No event is ever written with a destroyed key.
//!
//! (Until session 6 writers pinned each key row with `FOR KEY SHARE`. That
//! wrote a row lock, and its WAL record, on about one key row per event,
//! often a MultiXact as partitions share customers: about 1.2 µs of
//! PostgreSQL CPU per event. The advisory lock is one lock per batch, in
//! memory.)

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::chain::StoredEvent;
use crate::envelope::{DeadLetterReason, Event};
use crate::error::StoreError;
use crate::protect::{
    self, BlindIndexKey, DataKey, KeyProvider, PayloadBatch, PayloadError, Policy, ProtectError,
    Scanned, Treatment, WrappedKey,
};
use crate::recycle::{VecPool, KEEP_PER_BATCH, MAX_KEPT_ROWS};

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
    /// Held while keys missing from the cache are read or created, so that
    /// a node's partitions meeting the same new subjects at once (the usual
    /// case at start-up) read, create and unwrap each key once, not once
    /// per partition: an unwrap or wrap may be a call to a KMS.
    fetching: tokio::sync::Mutex<()>,
}

impl Keyring {
    pub fn new(provider: Arc<dyn KeyProvider>) -> Self {
        Self {
            provider,
            cache: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
            fetching: tokio::sync::Mutex::new(()),
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

    /// The cached keys of `subjects`, each looked up once, under one lock;
    /// and the subjects that have none.
    fn cached<'s>(&self, subjects: &[&'s str]) -> (HashMap<&'s str, SubjectKey>, Vec<&'s str>) {
        let mut found = HashMap::with_capacity(subjects.len());
        let mut missing = Vec::new();
        let mut seen = HashSet::with_capacity(subjects.len());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for &subject in subjects {
            if !seen.insert(subject) {
                continue;
            }
            match cache.get(subject) {
                Some(c) if c.at.elapsed() < KEY_CACHE_TTL => {
                    found.insert(subject, c.key.clone());
                }
                Some(_) => {
                    cache.remove(subject);
                    missing.push(subject);
                }
                None => missing.push(subject),
            }
        }
        (found, missing)
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
    pub async fn resolve<'s>(
        &self,
        pool: &PgPool,
        subjects: &[&'s str],
        create: bool,
    ) -> Result<HashMap<&'s str, SubjectKey>, StoreError> {
        self.sweep();
        let (mut out, missing) = self.cached(subjects);
        if missing.is_empty() {
            return Ok(out);
        }
        let _fetching = self.fetching.lock().await;
        // Another batch may have fetched some of them meanwhile.
        let (more, missing) = self.cached(&missing);
        out.extend(more);
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
            let created = self.create(pool, &absent).await?;
            // Another writer may have won the race for some, or the subject
            // was erased meanwhile: read those.
            let lost: Vec<&str> = absent
                .iter()
                .copied()
                .filter(|s| !created.contains_key(*s))
                .collect();
            found.extend(created);
            if !lost.is_empty() {
                found.extend(self.load(pool, &lost).await?);
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for subject in missing {
            if let Some((owned, key)) = found.remove_entry(subject) {
                cache.insert(
                    owned,
                    Cached {
                        key: key.clone(),
                        at: Instant::now(),
                    },
                );
                out.insert(subject, key);
            }
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
        let mut live = Vec::with_capacity(rows.len());
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
            live.push((subject, key_id, row));
        }
        // Keys another batch of this node unwrapped meanwhile (a node's
        // partitions meet the same new subjects at once): each unwrap may
        // be a call to a KMS.
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            live.retain(|(subject, key_id, _)| match cache.get(subject.as_str()) {
                Some(Cached {
                    key: key @ SubjectKey::Live { key_id: cached, .. },
                    ..
                }) if cached == key_id => {
                    out.insert(subject.clone(), key.clone());
                    false
                }
                _ => true,
            });
        }
        for (subject, key_id, row) in live {
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

    /// Creates data keys for `subjects`; returns those this call stored
    /// (not those another writer stored first, nor erased subjects').
    async fn create(
        &self,
        pool: &PgPool,
        subjects: &[&str],
    ) -> Result<HashMap<String, SubjectKey>, StoreError> {
        // Sorted and distinct: concurrent batches then take the unique
        // index's row locks in the same order. Unsorted, two batches with
        // common new subjects deadlocked, and PostgreSQL broke each
        // deadlock only after `deadlock_timeout` (1 s): ingest fell to a
        // third in the benchmark.
        let mut subjects = subjects.to_vec();
        subjects.sort_unstable();
        subjects.dedup();
        let subjects = &subjects[..];
        let mut ids = Vec::with_capacity(subjects.len());
        let mut versions = Vec::with_capacity(subjects.len());
        let mut wrapped_keys = Vec::with_capacity(subjects.len());
        let mut keys = HashMap::with_capacity(subjects.len());
        for subject in subjects {
            let key_id = Uuid::new_v4();
            let key = DataKey::generate_with_id(key_id.to_string());
            let wrapped =
                self.provider.wrap(&key).await.map_err(|e| {
                    StoreError::Unavailable(format!("wrapping a new data key: {e}"))
                })?;
            ids.push(key_id);
            versions.push(wrapped.kek_version);
            wrapped_keys.push(wrapped.ciphertext);
            keys.insert(*subject, (key_id, key));
        }
        // An erased subject never gets a new key: its data stays erased.
        let rows = sqlx::query(
            "INSERT INTO subject_keys (subject_id, key_id, kek_version, wrapped_key)
             SELECT s, k, v, w FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bytea[])
                 WITH ORDINALITY AS t(s, k, v, w, n)
             WHERE NOT EXISTS (SELECT 1 FROM erased_subjects e WHERE e.subject_id = t.s)
             ORDER BY n
             ON CONFLICT (subject_id) DO NOTHING
             RETURNING subject_id",
        )
        .bind(subjects)
        .bind(&ids)
        .bind(&versions)
        .bind(&wrapped_keys)
        .fetch_all(pool)
        .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            let subject: String = row.try_get(0)?;
            if let Some((key_id, key)) = keys.remove(subject.as_str()) {
                let key = SubjectKey::Live {
                    key_id,
                    key: Arc::new(key),
                };
                stored.insert(subject, key);
            }
        }
        Ok(stored)
    }
}

/// A batch's events in stored form, by Kafka offset, plus the keys used.
#[derive(Default)]
pub struct Prepared {
    /// The events' Kafka offsets, in the order given to [`prepare`]
    /// (increasing: a batch's events are in partition order).
    offsets: Vec<i64>,
    /// `rows[i]` is the stored form of the event at `offsets[i]`, until taken.
    rows: Vec<Option<Result<StoredEvent, DeadLetterReason>>>,
    /// Live data keys the rows were encrypted with, and their subjects.
    keys_used: HashMap<Uuid, String>,
}

/// The vectors of [`Prepared`], kept between batches (see `recycle`).
static PREPARED_ROWS: VecPool<Option<Result<StoredEvent, DeadLetterReason>>> =
    VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS);
static PREPARED_OFFSETS: VecPool<i64> = VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS);

impl Prepared {
    fn with_capacity(events: usize) -> Self {
        Self {
            offsets: PREPARED_OFFSETS.take(events),
            rows: PREPARED_ROWS.take(events),
            keys_used: HashMap::new(),
        }
    }

    fn push(&mut self, offset: i64, row: Result<StoredEvent, DeadLetterReason>) {
        self.offsets.push(offset);
        self.rows.push(Some(row));
    }

    /// Live data keys the rows were encrypted with, and their subjects.
    pub fn keys_used(&self) -> &HashMap<Uuid, String> {
        &self.keys_used
    }

    /// Takes [`Self::keys_used`] out, leaving it empty.
    pub fn take_keys_used(&mut self) -> HashMap<Uuid, String> {
        std::mem::take(&mut self.keys_used)
    }

    /// The stored form of the event at `offset`, or why it has none.
    pub fn take(&mut self, offset: i64) -> Result<StoredEvent, DeadLetterReason> {
        let index = match self.offsets.binary_search(&offset) {
            Ok(index) => Some(index),
            // Not in increasing order after all: look at every one.
            Err(_) => self.offsets.iter().position(|o| *o == offset),
        };
        index.and_then(|i| self.rows[i].take()).unwrap_or_else(|| {
            Err(DeadLetterReason::Unprotectable {
                error: format!("offset {offset} was not prepared (internal error)"),
            })
        })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        PREPARED_ROWS.give(std::mem::take(&mut self.rows));
        PREPARED_OFFSETS.give(std::mem::take(&mut self.offsets));
    }
}

/// Turns events into their stored form: the subject resolved, protected
/// fields encrypted (or marked erased), JSON canonical, blind tokens.
///
/// Each payload is read straight from its text ([`PayloadBatch`]): once to
/// canonicalise it and find its subject and fields, then, once the batch's
/// data keys are known, to encrypt them. The same as [`prepare_reference`].
pub async fn prepare(
    protection: Option<&Protection>,
    pool: &PgPool,
    events: &[&Event],
) -> Result<Prepared, StoreError> {
    let ingested_at = Utc::now();
    let mut batch = take_scratch();
    let mut scans = Vec::with_capacity(events.len());
    let mut subjects = Vec::with_capacity(events.len());
    for event in events {
        let plan = protection.map(|p| p.policy.plan_for(&event.event_type));
        // With `arbitrary_precision`, serde_json reads an object keyed by its
        // private token as a number: refuse rather than store altered data.
        // (The payload's scan checks the payload.)
        let metadata_reserved = event.metadata.as_deref().is_some_and(|m| reserved(m.get()));
        let scanned = if metadata_reserved {
            Err("the metadata uses the reserved key prefix `$serde_json::private::`")
        } else {
            Ok(batch.scan(event.payload.get(), plan))
        };
        let subject = match (&scanned, protection) {
            (_, None) => None,
            (Ok(scanned), Some(_)) => event.subject_id.clone().or_else(|| batch.subject(scanned)),
            (Err(_), Some(_)) => event.subject_id.clone(),
        };
        subjects.push(subject);
        scans.push(scanned);
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
    let mut prepared = Prepared::with_capacity(events.len());
    let mut rng = rand::thread_rng();
    for ((event, scanned), subject) in events.iter().zip(scans).zip(&subjects) {
        let result = store_form(
            protection,
            &keys,
            event,
            scanned,
            subject.as_deref(),
            ingested_at,
            &mut batch,
            &mut rng,
            &mut prepared.keys_used,
        );
        prepared.push(event.kafka_offset, result);
    }
    return_scratch(batch);
    // The subjects move into their rows once the keys, which borrow them,
    // are done with.
    drop(keys);
    for (row, subject) in prepared.rows.iter_mut().zip(subjects) {
        if let Some(Ok(stored)) = row {
            stored.subject_id = subject;
        }
    }
    Ok(prepared)
}

/// Whether serde_json would misread `json` (see `uses_private_keys`); the
/// text search spares most texts the check.
fn reserved(json: &str) -> bool {
    (json.contains("private") || json.contains("\\u")) && crate::canonical::uses_private_keys(json)
}

/// Scratch space of [`prepare`], reused by later batches (at most
/// `KEEP_PER_BATCH`).
static SCRATCH: Mutex<Vec<PayloadBatch>> = Mutex::new(Vec::new());

fn take_scratch() -> PayloadBatch {
    let mut pool = SCRATCH.lock().unwrap_or_else(|p| p.into_inner());
    pool.pop().unwrap_or_default()
}

fn return_scratch(mut batch: PayloadBatch) {
    batch.clear();
    let mut pool = SCRATCH.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < KEEP_PER_BATCH {
        pool.push(batch);
    }
}

#[allow(clippy::too_many_arguments)]
fn store_form(
    protection: Option<&Protection>,
    keys: &HashMap<&str, SubjectKey>,
    event: &Event,
    scanned: Result<Scanned<'_>, &str>,
    subject: Option<&str>,
    ingested_at: DateTime<Utc>,
    batch: &mut PayloadBatch,
    rng: &mut rand::rngs::ThreadRng,
    keys_used: &mut HashMap<Uuid, String>,
) -> Result<StoredEvent, DeadLetterReason> {
    let unprotectable = |e: &dyn std::fmt::Display| DeadLetterReason::Unprotectable {
        error: e.to_string(),
    };
    let cannot_store = |e: &dyn std::fmt::Display| DeadLetterReason::Unprotectable {
        error: format!("payload cannot be stored: {e}"),
    };
    let scanned = scanned.map_err(|e| cannot_store(&e))?;
    // Before the key: the payload must be JSON whatever its subject.
    if let Some(error) = scanned.error() {
        return Err(cannot_store(&error));
    }
    let mut key_used = None;
    let treatment = match protection {
        None => Treatment::Plain,
        Some(protection) => {
            let key_subject = subject.unwrap_or(DEFAULT_SUBJECT);
            match keys.get(key_subject) {
                Some(SubjectKey::Live { key_id, key }) => {
                    key_used = Some((*key_id, key_subject));
                    Treatment::Encrypt {
                        key,
                        blind: Some(&protection.blind),
                    }
                }
                // Personal data of an erased subject is not stored again.
                Some(SubjectKey::Erased) => Treatment::Erase,
                None => {
                    return Err(unprotectable(&format!(
                        "no data key for subject {key_subject:?}"
                    )))
                }
            }
        }
    };
    let erasing = matches!(treatment, Treatment::Erase);
    let sealed = batch
        .seal(scanned, treatment, event.event_id, rng)
        .map_err(|e| match e {
            PayloadError::Protect(ProtectError::AlreadyProtected { pointer }) if erasing => {
                unprotectable(&format!(
                    "the payload holds a `$enc` object at {pointer}; that key is reserved for encrypted fields"
                ))
            }
            other => unprotectable(&other),
        })?;
    if let (Some((key_id, key_subject)), true) = (key_used, sealed.encrypted > 0) {
        keys_used.insert(key_id, key_subject.to_owned());
    }
    let mut stored =
        StoredEvent::from_event(event, sealed.text, ingested_at).map_err(|e| unprotectable(&e))?;
    // `prepare` sets `subject_id`.
    stored.blind_index = sealed.blind_tokens;
    Ok(stored)
}

/// [`prepare`] by the reference path: each payload parsed into a `Value`,
/// then `protect_payload` (or `erase_fields`) and `write_value`. Kept as the
/// definition `prepare` must match, for tests and benchmarks.
#[doc(hidden)]
pub async fn prepare_reference(
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
    for ((event, payload), subject) in events.iter().zip(payloads).zip(subjects.clone()) {
        let result = match payload {
            Err(e) => Err(DeadLetterReason::Unprotectable {
                error: format!("payload cannot be stored: {e}"),
            }),
            Ok(payload) => reference_store_form(
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
        prepared.push(event.kafka_offset, result);
    }
    Ok(prepared)
}

#[allow(clippy::too_many_arguments)]
fn reference_store_form(
    protection: Option<&Protection>,
    keys: &HashMap<&str, SubjectKey>,
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
    let mut stored =
        StoredEvent::from_event(event, text, ingested_at).map_err(|e| unprotectable(&e))?;
    stored.subject_id = subject;
    stored.blind_index = blind_index;
    Ok(stored)
}

/// The advisory lock (transaction level) between writers (shared) and
/// erasures (exclusive): module docs. The bytes of "oat-eras".
pub const ERASURE_LOCK: i64 = 0x6f61_742d_6572_6173;

/// Takes the erasure lock exclusive for the rest of `conn`'s transaction:
/// waits for the writers that already checked their keys to commit.
pub async fn lock_out_writers(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ERASURE_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

/// Pins the data keys a batch used, inside its write transaction, and
/// checks their subjects were not erased meanwhile (module docs).
pub async fn pin_keys(
    conn: &mut sqlx::PgConnection,
    keys_used: &HashMap<Uuid, String>,
    protection: Option<&Protection>,
) -> Result<(), StoreError> {
    let Some(protection) = protection else {
        return Ok(());
    };
    if keys_used.is_empty() {
        return Ok(());
    }
    // A statement of its own: the check below must read with a snapshot
    // taken after the lock is held (READ COMMITTED: one per statement).
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(ERASURE_LOCK)
        .execute(&mut *conn)
        .await?;
    let ids: Vec<Uuid> = keys_used.keys().copied().collect();
    let subjects: Vec<&str> = keys_used.values().map(String::as_str).collect();
    // The common case in one round trip and one row: every key is still
    // there, and no subject was erased meanwhile.
    let (pinned, erased): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM subject_keys WHERE key_id = ANY($1)),
                EXISTS (SELECT 1 FROM erased_subjects WHERE subject_id = ANY($2))",
    )
    .bind(&ids)
    .bind(&subjects)
    .fetch_one(&mut *conn)
    .await?;
    if pinned == ids.len() as i64 && !erased {
        return Ok(());
    }
    let pinned: Vec<Uuid> =
        sqlx::query_scalar("SELECT key_id FROM subject_keys WHERE key_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let subjects: Vec<String> = keys_used.values().cloned().collect();
    let erased: Vec<String> =
        sqlx::query_scalar("SELECT subject_id FROM erased_subjects WHERE subject_id = ANY($1)")
            .bind(&subjects)
            .fetch_all(&mut *conn)
            .await?;
    if pinned.len() != ids.len() || !erased.is_empty() {
        let gone: Vec<String> = keys_used
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
    use crate::testing::TestDatabase;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The key provider of these tests: fixed keys, never a real secret.
    fn test_provider() -> protect::EnvKeyProvider {
        protect::EnvKeyProvider::from_values(
            "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            None,
            "HxgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQAfHh0cGxo=",
        )
        .expect("keys")
    }

    fn test_protection() -> Protection {
        let policy = Policy::from_toml_str(POLICY).expect("policy");
        Protection::new(policy, Arc::new(test_provider())).expect("protection")
    }

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
                other => panic!(
                    "{payload}: expected a dead letter, got {:?}",
                    other.map(|e| e.payload)
                ),
            }
        }
        let ordinary = event_with_payload(r#"{"a": {"private": "\u0041"}}"#);
        let mut prepared = prepare(None, &pool, &[&ordinary]).await.expect("prepare");
        assert!(prepared.take(7).is_ok());
    }

    const POLICY: &str = r#"version = 1
subject_pointer = "/customer/id"

[[protect]]
event_types = ["*"]
fields = ["/customer/email", "/customer/name", "/customer/address", "/payment/card", "/signed_by"]

[[protect]]
event_types = ["order.shipped"]
fields = ["/items/0/gift_note", "/shipping_address", "/customer"]

[[blind_index]]
name = "email"
field = "/customer/email"
normalize = "lowercase"

[[blind_index]]
name = "gift"
field = "/items/0/gift_note"
normalize = "none"
"#;

    /// Random order events, now and then with what a producer should not
    /// send: duplicate keys, a `$enc` key, serde_json's private keys (in
    /// the payload or the metadata), a number without canonical form.
    fn random_event(rng: &mut StdRng, offset: i64) -> Event {
        let mut customer = rng.gen_range(0..6);
        let email = ["A@Example.com ", "b@example.com", "\\u00c9@x.org"][rng.gen_range(0..3)];
        let mut payload = format!(
            r#"{{"customer": {{"id": "customer-{customer}", "name": "Zoë \"Z\"", "email": "{email}",
                "address": {{"line1": "1 Main St", "city": "Leeds", "zip": 12.50}}}},
              "items": [{{"sku": "A-1", "qty": 2, "gift_note": "for\nyou"}}, {{"sku": "B", "qty": 1E2}}],
              "total_cents": 2500, "currency": "EUR""#
        );
        match rng.gen_range(0..40) {
            // Subjects whose events have one protected field, or none.
            6..=9 => {
                customer = rng.gen_range(100..140);
                payload =
                    format!(r#"{{"customer": {{"id": "customer-{customer}"}}, "signed_by": "Zoë""#);
            }
            10..=12 => {
                customer = rng.gen_range(200..240);
                payload =
                    format!(r#"{{"customer": {{"id": "customer-{customer}"}}, "reason": "none""#);
            }
            0 => payload.push_str(r#", "customer": {"id": 7, "email": "late@example.com"}"#),
            1 => payload.push_str(r#", "note": {"$enc": {"v": 1}}"#),
            2 => payload.push_str(r#", "odd": {"$serde_json::private::Number": "1"}"#),
            3 => payload.push_str(r#", "huge": 1e99999999999999999999"#),
            4 => payload.push_str(r#", "signed_by": [1, {"b": null, "a": -0.0}]"#),
            5 => {
                payload.push_str(r#", "payment": {"card": {"number": "4111", "expiry": "01/30"}}"#)
            }
            _ => {}
        }
        payload.push('}');
        let types = ["order.created", "order.shipped", "order.paid"];
        let mut event = event_with_payload(&payload);
        event.kafka_offset = offset;
        event.event_id = Uuid::from_u128(rng.gen());
        event.event_type = types[rng.gen_range(0..types.len())].to_owned();
        event.subject_id = rng.gen_bool(0.5).then(|| format!("customer-{customer}"));
        if rng.gen_bool(0.05) {
            let metadata = r#"{"\u0024serde_json::private::RawValue": "{}"}"#;
            event.metadata =
                Some(serde_json::value::RawValue::from_string(metadata.to_owned()).expect("raw"));
        }
        event
    }

    /// The stored payload with every envelope opened, and the text with
    /// nonces and ciphertexts masked: equal for runs that differ only in
    /// their nonces.
    fn opened(
        keys: &HashMap<String, DataKey>,
        stored: &StoredEvent,
    ) -> (String, serde_json::Value, Result<protect::Revealed, String>) {
        let mut value: serde_json::Value = serde_json::from_str(&stored.payload).expect("json");
        let lookup = |kid: &str| match keys.get(kid) {
            Some(key) => protect::KeyLookup::Found(key),
            None => protect::KeyLookup::Missing,
        };
        // Without protection, a producer's `$enc` object is stored as is.
        let revealed = protect::reveal_payload(&mut value, stored.event_id, &lookup)
            .map_err(|e| e.to_string());
        let mut masked = stored.payload.clone();
        for marker in [r#""c":""#, r#""n":""#] {
            let mut from = 0;
            while let Some(at) = masked[from..].find(marker) {
                let start = from + at + marker.len();
                let end = start + masked[start..].find('"').expect("closing quote");
                masked.replace_range(start..end, &"x".repeat(end - start));
                from = end;
            }
        }
        (masked, value, revealed)
    }

    /// A migrated scratch database and a pool on it; [`finish`] drops both.
    async fn scratch() -> (TestDatabase, PgPool) {
        let db = TestDatabase::create().await.expect("test database");
        let pool = PgPool::connect(&db.url).await.expect("connect");
        (db, pool)
    }

    async fn finish(db: TestDatabase, pool: PgPool) {
        pool.close().await;
        db.drop_database().await;
    }

    /// Two nodes creating keys for the same new subjects at once, listed in
    /// opposite orders: no deadlock (PostgreSQL would break it only after
    /// `deadlock_timeout` and fail one batch), and both get the same key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_key_creation_does_not_deadlock() {
        let (db, pool) = scratch().await;
        let provider: Arc<dyn KeyProvider> = Arc::new(test_provider());
        for round in 0..10 {
            let subjects: Vec<String> = (0..300).map(|i| format!("r{round}-s{i}")).collect();
            let forward: Vec<&str> = subjects.iter().map(String::as_str).collect();
            let backward: Vec<&str> = forward.iter().rev().copied().collect();
            let (a, b) = (
                Keyring::new(provider.clone()),
                Keyring::new(provider.clone()),
            );
            let (ka, kb) = tokio::join!(
                a.resolve(&pool, &forward, true),
                b.resolve(&pool, &backward, true)
            );
            let (ka, kb) = (ka.expect("node a"), kb.expect("node b"));
            for subject in &forward {
                match (ka.get(*subject), kb.get(*subject)) {
                    (
                        Some(SubjectKey::Live { key_id: x, key: kx }),
                        Some(SubjectKey::Live { key_id: y, key: ky }),
                    ) => {
                        assert_eq!(x, y, "{subject}: two keys");
                        // The winner's key as created, the loser's as read
                        // back and unwrapped: the same bytes.
                        assert_eq!(kx.id(), ky.id(), "{subject}: key ids");
                        assert_eq!(
                            kx.expose_secret(),
                            ky.expose_secret(),
                            "{subject}: key bytes"
                        );
                    }
                    _ => panic!("{subject}: no live key"),
                }
            }
        }
        finish(db, pool).await;
    }

    /// Counts the provider's wraps and unwraps (each may be a KMS call).
    struct Counting {
        inner: Arc<dyn KeyProvider>,
        wraps: std::sync::atomic::AtomicUsize,
        unwraps: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl KeyProvider for Counting {
        async fn wrap(&self, dk: &DataKey) -> Result<WrappedKey, protect::KeyError> {
            self.wraps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.wrap(dk).await
        }
        async fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, protect::KeyError> {
            self.unwraps
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.unwrap(wrapped).await
        }
        fn current_version(&self) -> String {
            self.inner.current_version()
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn blind_index_key(&self) -> Result<protect::BlindIndexKey, protect::KeyError> {
            self.inner.blind_index_key()
        }
    }

    /// Four partitions of one node meeting the same 300 new subjects at
    /// once: each key is created (wrapped) once and never unwrapped again,
    /// and all four batches get the same keys.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_creates_each_new_key_once() {
        let (db, pool) = scratch().await;
        let counting = Arc::new(Counting {
            inner: Arc::new(test_provider()),
            wraps: Default::default(),
            unwraps: Default::default(),
        });
        let keyring = Keyring::new(counting.clone());
        let subjects: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
        let forward: Vec<&str> = subjects.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        let (a, b, c, d) = tokio::join!(
            keyring.resolve(&pool, &forward, true),
            keyring.resolve(&pool, &backward, true),
            keyring.resolve(&pool, &forward, true),
            keyring.resolve(&pool, &backward, true),
        );
        let batches = [a, b, c, d].map(|r| r.expect("resolve"));
        for subject in &forward {
            let ids: Vec<Uuid> = batches
                .iter()
                .map(|keys| match keys.get(subject) {
                    Some(SubjectKey::Live { key_id, .. }) => *key_id,
                    _ => panic!("{subject}: no live key"),
                })
                .collect();
            assert!(ids.windows(2).all(|w| w[0] == w[1]), "{subject}: {ids:?}");
        }
        use std::sync::atomic::Ordering::SeqCst;
        assert_eq!(counting.wraps.load(SeqCst), 300, "keys wrapped");
        assert_eq!(counting.unwraps.load(SeqCst), 0, "keys unwrapped");
        finish(db, pool).await;
    }

    /// A writer past its key check holds an erasure of its subject until
    /// it commits; a writer after the erasure is refused and prepares again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_erasure_waits_for_writers_past_their_key_check() {
        let (db, pool) = scratch().await;
        let protection = test_protection();
        let event =
            event_with_payload(r#"{"customer": {"id": "customer-1", "email": "one@example.com"}}"#);
        let prepared = prepare(Some(&protection), &pool, &[&event])
            .await
            .expect("prepare");
        assert_eq!(
            prepared.keys_used.values().collect::<Vec<_>>(),
            ["customer-1"],
            "the event was encrypted under customer-1's key"
        );

        let mut writer = pool.begin().await.expect("begin");
        pin_keys(&mut writer, prepared.keys_used(), Some(&protection))
            .await
            .expect("the key is there");
        let erasure = tokio::spawn({
            let pool = pool.clone();
            async move {
                crate::store::system::erase_subject(&pool, "customer-1", "test", "tester").await
            }
        });
        // Until the erasure queues behind the writer's lock (polled: the
        // condition, not a delay, is what the test waits for).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
            )
            .fetch_one(&pool)
            .await
            .expect("pg_locks");
            if waiting {
                break;
            }
            assert!(
                !erasure.is_finished(),
                "the erasure did not wait for the writer"
            );
            assert!(
                Instant::now() < deadline,
                "the erasure never queued for the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.commit().await.expect("the writer commits first");
        erasure
            .await
            .expect("erasure task")
            .expect("the erasure completes once the writer committed");

        let mut late = pool.begin().await.expect("begin");
        match pin_keys(&mut late, prepared.keys_used(), Some(&protection)).await {
            Err(StoreError::Conflict(message)) => {
                assert!(
                    message.contains("erased while it was prepared"),
                    "{message}"
                )
            }
            Err(other) => panic!("expected a conflict, got {other}"),
            Ok(()) => panic!("a writer stored ciphertext under an erased subject's destroyed key"),
        }
        drop(late);
        finish(db, pool).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepare_equals_the_reference_path() {
        let (db, pool) = scratch().await;
        let protection = test_protection();
        let mut rng = StdRng::seed_from_u64(2026);
        let events: Vec<Event> = (0..600).map(|i| random_event(&mut rng, i)).collect();
        let refs: Vec<&Event> = events.iter().collect();

        // Keys exist after a first pass; then one subject is erased.
        prepare(Some(&protection), &pool, &refs)
            .await
            .expect("prepare");
        sqlx::query("DELETE FROM subject_keys WHERE subject_id = 'customer-3'")
            .execute(&pool)
            .await
            .expect("delete key");
        sqlx::query(
            "INSERT INTO erased_subjects (subject_id, erased_by, reason, event_id)
             VALUES ('customer-3', 'test', 'test', gen_random_uuid())",
        )
        .execute(&pool)
        .await
        .expect("erase");
        protection.keyring().evict(&["customer-3".to_owned()]);

        for protection in [Some(&protection), None] {
            let mut new = prepare(protection, &pool, &refs).await.expect("prepare");
            let mut reference = prepare_reference(protection, &pool, &refs)
                .await
                .expect("prepare_reference");
            assert_eq!(new.keys_used, reference.keys_used);
            let subjects: Vec<String> = new.keys_used.values().cloned().collect();
            let keys: HashMap<String, DataKey> = match protection {
                Some(protection) => {
                    let wanted: Vec<&str> = subjects.iter().map(String::as_str).collect();
                    let found = protection
                        .keys
                        .resolve(&pool, &wanted, false)
                        .await
                        .expect("keys");
                    found
                        .into_values()
                        .filter_map(|key| match key {
                            SubjectKey::Live { key_id, key } => {
                                Some((key_id.to_string(), (*key).clone()))
                            }
                            SubjectKey::Erased => None,
                        })
                        .collect()
                }
                None => HashMap::new(),
            };
            let (mut stored, mut refused, mut erased) = (0, 0, 0);
            for event in &events {
                let what = format!("event at {}: {}", event.kafka_offset, event.payload.get());
                match (
                    new.take(event.kafka_offset),
                    reference.take(event.kafka_offset),
                ) {
                    (Ok(mut new), Ok(mut reference)) => {
                        assert_eq!(opened(&keys, &new), opened(&keys, &reference), "{what}");
                        assert_eq!(new.blind_index, reference.blind_index, "{what}");
                        erased += usize::from(new.payload.contains("$erased"));
                        new.payload.clear();
                        reference.payload.clear();
                        reference.ingested_at = new.ingested_at;
                        assert_eq!(format!("{new:?}"), format!("{reference:?}"), "{what}");
                        stored += 1;
                    }
                    (Err(new), Err(reference)) => {
                        assert_eq!(new, reference, "{what}");
                        refused += 1;
                    }
                    (new, reference) => panic!(
                        "{what}: new {:?}, reference {:?}",
                        new.map(|e| e.payload),
                        reference.map(|e| e.payload)
                    ),
                }
            }
            assert!(
                stored > 400 && refused > 20,
                "{stored} stored, {refused} refused"
            );
            if protection.is_some() {
                assert!(erased > 20, "{erased} erased");
            }
        }
        finish(db, pool).await;
    }
}
