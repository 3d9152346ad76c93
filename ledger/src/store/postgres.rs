//! The PostgreSQL event store.
//!
//! One transaction per batch: lock the partition's offset row, check it is
//! where this writer expects it (fencing), classify against stored events,
//! COPY the new events, insert dead letters and duplicates, move the offset.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Row};
use uuid::Uuid;

use super::chain::{kafka_chain_id, normalized, ChainHead, StoredEvent};
use super::checkpointer::Checkpointer;
use super::group::{self, GroupCommit};
use super::protection::{self, Protection};
use super::{BatchStats, EventStore, OffsetKey, WriteBatch, WriteOutcome};
use crate::batch::{classify, Classified, Duplicate, ExistingEvent};
use crate::canonical::GENESIS;
use crate::envelope::{DeadLetter, DeadLetterReason, Event};
use crate::error::StoreError;
use crate::merkle::CompactRange;
use crate::recycle::{VecPool, KEEP_PER_BATCH, MAX_KEPT_ROWS};

pub use super::chain::{
    encode_copy_row, encode_copy_row_binary, encode_event_id_row_binary, COPY_BINARY_HEADER,
    COPY_BINARY_TRAILER, COPY_EVENTS, COPY_EVENTS_BINARY, COPY_EVENT_IDS_BINARY,
};

/// The SQL migrations in migrations/, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The group role the node writes with: INSERT and SELECT on the store only.
pub const WRITER_ROLE: &str = "audit_writer";

/// How the node connects.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub url: String,
    pub max_connections: u32,
    /// Role to `SET ROLE` to on every connection; `None` keeps the login role.
    pub role: Option<String>,
    pub statement_timeout: Duration,
    pub acquire_timeout: Duration,
    /// `plan_cache_mode = force_generic_plan`: prepared statements are
    /// planned once per connection instead of at every execution. Only for
    /// pools whose statements have one good plan whatever the parameters
    /// (docs/DECISIONS.md, Decision 47).
    pub generic_plans: bool,
    /// Tasks that commit batches of several partitions together (group
    /// commit, `store::group`); 0 (the default) writes every batch in a
    /// transaction of its own.
    pub group_committers: usize,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 4,
            role: Some(WRITER_ROLE.to_string()),
            statement_timeout: Duration::from_secs(60),
            acquire_timeout: Duration::from_secs(10),
            generic_plans: false,
            group_committers: 0,
        }
    }
}

/// Parses a database URL, with an error that never echoes the password.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url)
        .map(|o| o.log_statements(tracing::log::LevelFilter::Debug))
        .map_err(|e| StoreError::Fatal(format!("invalid database URL {}: {e}", redact_url(url))))
}

/// The URL with any password replaced, safe for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Creates the database named in `url` if it does not exist, connecting to
/// the server's `postgres` database to do so.
pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
    let options = connect_options(url)?;
    let Some(name) = options.get_database().map(str::to_string) else {
        return Ok(false);
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(|e| unreachable(url, e))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        match admin
            .execute(format!("CREATE DATABASE {}", quote_ident(&name)).as_str())
            .await
        {
            Ok(_) => {}
            // Created concurrently by someone else: fine.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = admin.close().await;
    Ok(!exists)
}

/// Drops the database named in `url` (best effort, connections forced out).
pub async fn drop_database(url: &str) {
    let Ok(options) = connect_options(url) else {
        return;
    };
    let Some(name) = options.get_database().map(str::to_string) else {
        return;
    };
    if let Ok(mut admin) = options.database("postgres").connect().await {
        let statement = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&name)
        );
        let _ = admin.execute(statement.as_str()).await;
        let _ = admin.close().await;
    }
}

/// Whether a consumer group has stored offsets in the database of `url`
/// (false when the database or the table does not exist yet).
pub async fn group_has_offsets(url: &str, group_id: &str) -> Result<bool, StoreError> {
    let mut conn = match connect_options(url)?.connect().await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("3D000") => {
            return Ok(false)
        }
        Err(e) => return Err(unreachable(url, e)),
    };
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('consumer_offsets') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    let has = exists
        && sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM consumer_offsets WHERE group_id = $1)",
        )
        .bind(group_id)
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(has)
}

/// Applies the embedded migrations with the login role of `url`.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let mut conn = connect_options(url)?
        .connect()
        .await
        .map_err(|e| unreachable(url, e))?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| StoreError::Fatal(format!("migration failed on {}: {e}", redact_url(url))))?;
    let _ = conn.close().await;
    Ok(())
}

fn unreachable(url: &str, error: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot connect to PostgreSQL at {}: {error}; check that the server runs and that --database-url (AUDIT_DATABASE_URL) is right",
        redact_url(url)
    ))
}

#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
    protection: Option<Arc<Protection>>,
    checkpoints: Option<Arc<Checkpointer>>,
    /// Partitions (topic, partition) whose last batch held an id already
    /// claimed: their next batch claims with `ON CONFLICT` straight away
    /// instead of a COPY that would likely fail (retries come in bursts).
    claim_conflicts: Arc<std::sync::Mutex<HashSet<(String, i32)>>>,
    /// Committers of group commit (0: off), started at the first write.
    group_committers: usize,
    group: Arc<std::sync::OnceLock<GroupCommit>>,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore")
            .field("protected", &self.protection.is_some())
            .field("checkpoints", &self.checkpoints.is_some())
            .finish_non_exhaustive()
    }
}

impl PgEventStore {
    /// Connects lazily-checked: fails now if the server is unreachable or the
    /// role cannot be assumed, so misconfiguration shows at start-up.
    pub async fn connect(config: &PgConfig) -> Result<Self, StoreError> {
        let options = connect_options(&config.url)?;
        let role = config.role.clone();
        let statement_timeout = config.statement_timeout.as_millis();
        let generic_plans = config.generic_plans;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .after_connect(move |conn, _meta| {
                let role = role.clone();
                Box::pin(async move {
                    // No JIT: our statements are short, and a plan whose
                    // estimate passes `jit_above_cost` spent 30 ms compiling
                    // (PERFORMANCE.md, Query API).
                    let mut setup =
                        format!("SET statement_timeout = {statement_timeout}; SET jit = off;");
                    if generic_plans {
                        setup.push_str("SET plan_cache_mode = force_generic_plan;");
                    }
                    if let Some(role) = role {
                        let _ = write!(setup, "SET ROLE {};", quote_ident(&role));
                    }
                    conn.execute(setup.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => StoreError::Fatal(format!(
                    "connected to {} but cannot assume role {:?}: {}; grant it to the login user (GRANT {} TO <user>)",
                    redact_url(&config.url),
                    config.role.as_deref().unwrap_or_default(),
                    db.message(),
                    config.role.as_deref().unwrap_or_default(),
                )),
                other => unreachable(&config.url, other),
            })?;
        let mut store = Self::from_pool(pool);
        store.group_committers = config.group_committers;
        Ok(store)
    }

    /// A store on `pool`, without group commit.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            protection: None,
            checkpoints: None,
            claim_conflicts: Default::default(),
            group_committers: 0,
            group: Default::default(),
        }
    }

    /// The group commit a batch of `key` joins; `None` for the
    /// single-batch path: group commit is off, or the partition's last
    /// batch held a taken id (the next one likely does too).
    fn group_for(&self, key: &OffsetKey) -> Option<&GroupCommit> {
        if self.group_committers == 0 {
            return None;
        }
        if self.claim_conflicted(&key.topic, key.partition) {
            return None;
        }
        Some(self.group.get_or_init(|| {
            // The committers' own handle has no group: the tasks end once
            // the last handle with one is dropped.
            let committers = Self {
                group_committers: 0,
                group: Default::default(),
                ..self.clone()
            };
            GroupCommit::start(committers, self.group_committers)
        }))
    }

    /// Whether the partition's last batch held an id already claimed.
    fn claim_conflicted(&self, topic: &str, partition: i32) -> bool {
        self.claim_conflicts
            .lock()
            .map(|set| set.contains(&(topic.to_string(), partition)))
            .unwrap_or(false)
    }

    /// Encrypts protected fields with per-subject keys before storing.
    /// Without it payloads are stored in clear (tests and benchmarks only).
    pub fn with_protection(mut self, protection: Arc<Protection>) -> Self {
        self.protection = Some(protection);
        self
    }

    /// Signs and publishes Merkle checkpoints of the chains this store writes.
    pub fn with_checkpoints(mut self, checkpoints: Arc<Checkpointer>) -> Self {
        self.checkpoints = Some(checkpoints);
        self
    }

    pub fn protection(&self) -> Option<&Arc<Protection>> {
        self.protection.as_ref()
    }

    pub fn checkpointer(&self) -> Option<&Arc<Checkpointer>> {
        self.checkpoints.as_ref()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates this month's and the next `months_ahead` monthly partitions.
    pub async fn ensure_partitions(&self, months_ahead: i32) -> Result<i32, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT audit_ensure_event_partitions($1)")
                .bind(months_ahead)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Cheap liveness check for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// A batch's rows, kept between batches (see `recycle`).
pub(crate) static STORED_ROWS: VecPool<StoredEvent> = VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS);

#[async_trait]
impl EventStore for PgEventStore {
    async fn stored_offset(&self, key: &OffsetKey) -> Result<Option<i64>, StoreError> {
        let row: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&key.group_id)
        .bind(&key.topic)
        .bind(key.partition)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.flatten())
    }

    async fn write_batch(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        // Protection (encryption, canonical JSON) runs before the
        // transaction: CPU and key lookups hold no lock.
        let first = classify(write.batch, &HashMap::new());
        let prepared =
            protection::prepare(self.protection.as_deref(), &self.pool, &first.events).await?;
        let Some(group) = self.group_for(write.key) else {
            return self.write_alone(write, first, prepared).await;
        };
        match group.submit(group::Job::new(&write, first, prepared)).await {
            group::Reply::Done(result) => result,
            // An id of this batch is taken, or the database refused a row:
            // the single-batch path sorts it out (rare; protection again,
            // since the group consumed the prepared rows).
            group::Reply::Alone => {
                let first = classify(write.batch, &HashMap::new());
                let prepared =
                    protection::prepare(self.protection.as_deref(), &self.pool, &first.events)
                        .await?;
                self.write_alone(write, first, prepared).await
            }
        }
    }
}

impl PgEventStore {
    /// One batch in a transaction of its own: the path for a batch whose ids
    /// may be taken (a duplicate, a conflict, a re-read), and for stores
    /// without group commit.
    async fn write_alone(
        &self,
        write: WriteBatch<'_>,
        first: Classified<'_>,
        mut prepared: protection::Prepared,
    ) -> Result<WriteOutcome, StoreError> {
        let key = write.key;
        let mut tx = self.pool.begin().await?;
        if let Some(stored) = fence(&mut tx, key, write.expected, write.writer).await? {
            return Ok(WriteOutcome::Fenced { stored });
        }

        // Claim the batch's new ids in `event_ids`; ids it already holds
        // are looked up there and classified (duplicate, conflict, re-read).
        sqlx::query("SAVEPOINT claim").execute(&mut *tx).await?;
        let taken: Vec<Uuid> = self
            .claim(&mut tx, &key.topic, key.partition, &first.events)
            .await?;
        // Every id was new (the common case): the classification against
        // no stored ids is the one already made.
        let Classified {
            events,
            mut dead_letters,
            duplicates,
        } = if taken.is_empty() {
            first
        } else {
            classify(write.batch, &existing_ids(&mut tx, &taken).await?)
        };

        let mut rows = STORED_ROWS.take(events.len());
        let mut refused = Vec::new();
        for event in &events {
            match prepared.take(event.kafka_offset) {
                Ok(row) => rows.push(row),
                Err(reason) => refused.push((*event, reason)),
            }
        }
        if !refused.is_empty() {
            // Their ids were claimed with the rest: start over without them.
            sqlx::query("ROLLBACK TO SAVEPOINT claim")
                .execute(&mut *tx)
                .await?;
            let keep: Vec<&Event> = events
                .iter()
                .copied()
                .filter(|e| {
                    !refused
                        .iter()
                        .any(|(r, _)| r.kafka_offset == e.kafka_offset)
                })
                .collect();
            if !claim_ids(&mut tx, &keep).await?.is_empty() {
                return Err(StoreError::Conflict(
                    "another writer claimed an event id of this batch".into(),
                ));
            }
        }
        for (event, reason) in refused {
            dead_letters.push(dead_letter_for(write.batch, event, reason));
        }
        protection::pin_keys(&mut tx, prepared.keys_used(), self.protection.as_deref()).await?;

        let chain_id = kafka_chain_id(&key.topic, key.partition);
        let mut head = lock_chain(&mut tx, &chain_id).await?;
        let mut scratch = Vec::with_capacity(4096);
        let before = head.clone();
        let before_length = before.length;
        for row in &mut rows {
            head.link(row, &mut scratch);
        }
        sqlx::query("SAVEPOINT copy").execute(&mut *tx).await?;
        let mut stored_events = rows.len() as u64;
        match copy_rows(&mut tx, &rows).await {
            Ok(()) => {}
            Err(StoreError::Data(_)) => {
                // Some row passed validation but the database refuses it:
                // find it row by row, so one record never stalls a partition.
                sqlx::query("ROLLBACK TO SAVEPOINT copy")
                    .execute(&mut *tx)
                    .await?;
                head = before;
                let rows = std::mem::take(&mut rows);
                let refused = isolate_refused(&mut tx, &mut head, rows, &mut scratch).await?;
                stored_events -= refused.len() as u64;
                for (event_id, offset, error) in refused {
                    if let Some(event) = events.iter().find(|e| e.kafka_offset == offset) {
                        dead_letters.push(dead_letter_for(
                            write.batch,
                            event,
                            DeadLetterReason::RejectedByDatabase { error },
                        ));
                    } else {
                        tracing::warn!(%event_id, offset, "refused row not found in its batch");
                    }
                }
            }
            Err(other) => return Err(other),
        }
        STORED_ROWS.give(rows);
        if head.length != before_length {
            update_chain(&mut tx, &head).await?;
        }
        let (dead_letters_stored, duplicates_stored) =
            insert_rejects(&mut tx, &dead_letters, &duplicates).await?;
        advance_offset(&mut tx, key, write.batch.next_offset, write.writer).await?;
        tx.commit().await?;
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.observe(&self.pool, &head).await;
        }
        Ok(WriteOutcome::Committed(BatchStats {
            events: stored_events,
            dead_letters: dead_letters_stored,
            duplicates: duplicates_stored,
        }))
    }
}

impl PgEventStore {
    /// Claims the batch's ids in `event_ids` (inside savepoint `claim`);
    /// returns those another event already holds. A COPY first, the cheap
    /// way when every id is new (the common case); if one is not, the COPY
    /// fails as a whole and the claim is redone with `ON CONFLICT`.
    async fn claim(
        &self,
        tx: &mut sqlx::PgConnection,
        topic: &str,
        partition: i32,
        candidates: &[&Event],
    ) -> Result<Vec<Uuid>, StoreError> {
        if !self.claim_conflicted(topic, partition) {
            match copy_claim_ids(tx, candidates).await? {
                CopyClaim::Claimed => return Ok(Vec::new()),
                CopyClaim::Refused => {
                    sqlx::query("ROLLBACK TO SAVEPOINT claim")
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        let taken: Vec<Uuid> = claim_ids(tx, candidates).await?.into_iter().collect();
        if let Ok(mut set) = self.claim_conflicts.lock() {
            let position = (topic.to_string(), partition);
            if taken.is_empty() {
                set.remove(&position);
            } else {
                set.insert(position);
            }
        }
        Ok(taken)
    }
}

/// Locks the partition's offset row and checks it is where this writer
/// expects it. `Some(stored)`: another writer moved it (fenced).
async fn fence(
    tx: &mut sqlx::PgConnection,
    key: &OffsetKey,
    expected: Option<i64>,
    writer: &str,
) -> Result<Option<Option<i64>>, StoreError> {
    if expected.is_none() {
        // First batch of this partition: claim the row so a concurrent
        // first writer blocks on it instead of racing past the check.
        sqlx::query(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_by)
             VALUES ($1, $2, $3, NULL, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&key.group_id)
        .bind(&key.topic)
        .bind(key.partition)
        .bind(writer)
        .execute(&mut *tx)
        .await?;
    }
    let stored: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets
         WHERE group_id = $1 AND topic = $2 AND partition = $3 FOR UPDATE",
    )
    .bind(&key.group_id)
    .bind(&key.topic)
    .bind(key.partition)
    .fetch_optional(&mut *tx)
    .await?;
    let stored = stored.flatten();
    Ok((stored != expected).then_some(stored))
}

/// Moves the partition's offset past the batch (in the batch's transaction).
async fn advance_offset(
    tx: &mut sqlx::PgConnection,
    key: &OffsetKey,
    next_offset: i64,
    writer: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE consumer_offsets SET next_offset = $4, updated_at = now(), updated_by = $5
         WHERE group_id = $1 AND topic = $2 AND partition = $3",
    )
    .bind(&key.group_id)
    .bind(&key.topic)
    .bind(key.partition)
    .bind(next_offset)
    .bind(writer)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Inserts a batch's dead letters and duplicates; returns how many of each
/// were new. ON CONFLICT DO NOTHING: a position already accounted for
/// (another consumer group re-reading the topic) is not counted twice.
pub(crate) async fn insert_rejects(
    tx: &mut sqlx::PgConnection,
    dead_letters: &[DeadLetter],
    duplicates: &[Duplicate],
) -> Result<(u64, u64), StoreError> {
    let mut dead_letters_stored = 0;
    for dead in dead_letters {
        dead_letters_stored += sqlx::query(
            "INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, raw_key, raw_value,
             headers, event_id, reason_code, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (kafka_topic, kafka_partition, kafka_offset) DO NOTHING",
        )
        .bind(&dead.kafka_topic)
        .bind(dead.kafka_partition)
        .bind(dead.kafka_offset)
        .bind(dead.key.as_deref())
        .bind(dead.value.as_deref())
        .bind(&dead.headers)
        .bind(dead.event_id)
        .bind(dead.reason.code())
        // text cannot hold U+0000; a field name in the reason might.
        .bind(dead.reason.to_string().replace('\0', "\\0"))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    let mut duplicates_stored = 0;
    for duplicate in duplicates {
        duplicates_stored += sqlx::query(
            "INSERT INTO duplicates (kafka_topic, kafka_partition, kafka_offset, event_id)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&duplicate.kafka_topic)
        .bind(duplicate.kafka_partition)
        .bind(duplicate.kafka_offset)
        .bind(duplicate.event_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    Ok((dead_letters_stored, duplicates_stored))
}

/// What a COPY into `event_ids` did.
pub(crate) enum CopyClaim {
    /// Every id was new and is now claimed.
    Claimed,
    /// The database refused a row (an id already claimed, or a value it
    /// rejects): nothing was claimed, and the transaction must roll back to
    /// its savepoint.
    Refused,
}

async fn copy_claim_ids(
    conn: &mut sqlx::PgConnection,
    events: &[&Event],
) -> Result<CopyClaim, StoreError> {
    /// About 100 bytes a row.
    static BUFFERS: VecPool<u8> = VecPool::new(KEEP_PER_BATCH, MAX_KEPT_ROWS * 112);
    if events.is_empty() {
        return Ok(CopyClaim::Claimed);
    }
    let mut buffer = BUFFERS.take(events.len() * 112 + 32);
    for event in events {
        encode_event_id_row_binary(&mut buffer, event);
    }
    let result = copy_claim_rows(conn, &[buffer.as_slice()]).await;
    BUFFERS.give(buffer);
    result
}

/// COPYs rows already encoded by [`encode_event_id_row_binary`] into
/// `event_ids`, as one statement.
pub(crate) async fn copy_claim_rows(
    conn: &mut sqlx::PgConnection,
    rows: &[&[u8]],
) -> Result<CopyClaim, StoreError> {
    if rows.iter().all(|r| r.is_empty()) {
        return Ok(CopyClaim::Claimed);
    }
    let result = async {
        let mut copy = conn.copy_in_raw(COPY_EVENT_IDS_BINARY).await?;
        for part in std::iter::once(COPY_BINARY_HEADER)
            .chain(rows.iter().copied())
            .chain(std::iter::once(COPY_BINARY_TRAILER))
        {
            if part.is_empty() {
                continue;
            }
            if let Err(e) = copy.send(part).await {
                let _ = copy.abort("send failed").await;
                return Err(e);
            }
        }
        copy.finish().await
    }
    .await;
    match result {
        Ok(_) => Ok(CopyClaim::Claimed),
        Err(sqlx::Error::Database(db))
            if db
                .code()
                .is_some_and(|c| c == "23505" || c.starts_with("22")) =>
        {
            // 23505: an id is taken (a duplicate, a conflict, or a re-read);
            // 22xxx: a value refused, which the ON CONFLICT path reports.
            Ok(CopyClaim::Refused)
        }
        Err(other) => Err(other.into()),
    }
}

pub(crate) fn dead_letter_for(
    batch: &crate::batch::PreparedBatch,
    event: &Event,
    reason: DeadLetterReason,
) -> DeadLetter {
    match batch
        .records
        .iter()
        .find(|r| r.offset == event.kafka_offset)
    {
        Some(record) => DeadLetter::from_record(record, Some(event.event_id), reason),
        None => DeadLetter {
            kafka_topic: event.kafka_topic.clone(),
            kafka_partition: event.kafka_partition,
            kafka_offset: event.kafka_offset,
            key: None,
            value: None,
            headers: serde_json::Value::Array(Vec::new()),
            event_id: Some(event.event_id),
            reason,
        },
    }
}

/// Creates the chain's row if it is new, and locks it for this transaction:
/// appends to one chain are strictly sequential.
pub(crate) async fn lock_chain(
    conn: &mut sqlx::PgConnection,
    chain_id: &str,
) -> Result<ChainHead, StoreError> {
    sqlx::query(
        "INSERT INTO chains (chain_id, length, head_hash, frontier) VALUES ($1, 0, $2, '')
         ON CONFLICT DO NOTHING",
    )
    .bind(chain_id)
    .bind(&GENESIS[..])
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(
        "SELECT length, head_hash, frontier FROM chains WHERE chain_id = $1 FOR UPDATE",
    )
    .bind(chain_id)
    .fetch_one(&mut *conn)
    .await?;
    chain_head(chain_id, row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)
}

/// A chain's head from its `chains` row.
pub(crate) fn chain_head(
    chain_id: &str,
    length: i64,
    head: Vec<u8>,
    frontier: Vec<u8>,
) -> Result<ChainHead, StoreError> {
    let corrupt = |what: String| {
        StoreError::Fatal(format!("chain {chain_id}: {what}; run `audit-node verify`"))
    };
    let length = u64::try_from(length).map_err(|_| corrupt(format!("negative length {length}")))?;
    Ok(ChainHead {
        chain_id: chain_id.to_owned(),
        length,
        head_hash: head
            .try_into()
            .map_err(|_| corrupt("head hash is not 32 bytes".into()))?,
        frontier: CompactRange::from_bytes(length, &frontier)
            .map_err(|e| corrupt(format!("Merkle frontier unreadable: {e}")))?,
    })
}

pub(crate) async fn update_chain(
    conn: &mut sqlx::PgConnection,
    head: &ChainHead,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE chains SET length = $2, head_hash = $3, frontier = $4, updated_at = now()
         WHERE chain_id = $1",
    )
    .bind(&head.chain_id)
    .bind(head.length as i64)
    .bind(&head.head_hash[..])
    .bind(head.frontier.to_bytes())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Claims the events' ids in `event_ids`; returns the ids another event
/// already holds.
async fn claim_ids(
    conn: &mut sqlx::PgConnection,
    events: &[&Event],
) -> Result<HashSet<Uuid>, StoreError> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let hashes: Vec<&[u8]> = events.iter().map(|e| &e.content_hash[..]).collect();
    // As `events` stores it: whole microseconds, rounded down. Bound as is,
    // sqlx rounds a time before 2000 towards 2000 instead, and the row would
    // not match its event's `occurred_at` (lookups join on it).
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        events.iter().map(|e| normalized(e.occurred_at)).collect();
    let topics: Vec<&str> = events.iter().map(|e| e.kafka_topic.as_str()).collect();
    let partitions: Vec<i32> = events.iter().map(|e| e.kafka_partition).collect();
    let offsets: Vec<i64> = events.iter().map(|e| e.kafka_offset).collect();
    // Answers with the ids that were *not* claimed (usually none), so that a
    // batch does not read back a row per event.
    let taken: Vec<Uuid> = sqlx::query_scalar(
        "WITH claimed AS (
           INSERT INTO event_ids (event_id, content_hash, occurred_at, kafka_topic, kafka_partition, kafka_offset)
           SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::timestamptz[], $4::text[], $5::int[], $6::bigint[])
           ON CONFLICT (event_id) DO NOTHING RETURNING event_id)
         SELECT DISTINCT batch.id FROM unnest($1::uuid[]) AS batch(id)
         WHERE NOT EXISTS (SELECT 1 FROM claimed WHERE claimed.event_id = batch.id)",
    )
    .bind(&ids)
    .bind(&hashes)
    .bind(&times)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(&mut *conn)
    .await?;
    Ok(taken.into_iter().collect())
}

/// What `event_ids` holds for ids a batch could not claim.
async fn existing_ids(
    conn: &mut sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, ExistingEvent>, StoreError> {
    let mut existing = HashMap::new();
    if ids.is_empty() {
        return Ok(existing);
    }
    let rows = sqlx::query(
        "SELECT event_id, content_hash, kafka_topic, kafka_partition, kafka_offset
         FROM event_ids WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let id: Uuid = row.try_get(0)?;
        let hash: Vec<u8> = row.try_get(1)?;
        // System events have no Kafka position.
        let position: (String, i32, i64) = (
            row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            row.try_get::<Option<i32>, _>(3)?.unwrap_or(-1),
            row.try_get::<Option<i64>, _>(4)?.unwrap_or(-1),
        );
        existing.insert(
            id,
            ExistingEvent {
                content_hash: hash.try_into().unwrap_or([0; 32]),
                location: format!(
                    "at {} partition {} offset {}",
                    position.0, position.1, position.2
                ),
                position,
            },
        );
    }
    Ok(existing)
}

/// COPYs stored rows into `events`, in chunks of about `CHUNK` bytes
/// encoded into a buffer reused from call to call: a fresh buffer the size
/// of the batch costs page faults on every batch.
pub(crate) async fn copy_rows(
    conn: &mut sqlx::PgConnection,
    rows: &[StoredEvent],
) -> Result<(), StoreError> {
    copy_row_groups(conn, &[rows]).await
}

/// [`copy_rows`] for the rows of several batches, as one statement.
pub(crate) async fn copy_row_groups(
    conn: &mut sqlx::PgConnection,
    groups: &[&[StoredEvent]],
) -> Result<(), StoreError> {
    const CHUNK: usize = 256 * 1024;
    /// Buffers kept for later calls (one per connection writing at once);
    /// one a huge row grew is not kept.
    static BUFFERS: VecPool<u8> = VecPool::new(KEEP_PER_BATCH, 4 * CHUNK);
    let total: usize = groups.iter().map(|g| g.len()).sum();
    if total == 0 {
        return Ok(());
    }
    let mut buffer = BUFFERS.take(CHUNK + 16 * 1024);
    buffer.extend_from_slice(COPY_BINARY_HEADER);
    let mut copy = conn.copy_in_raw(COPY_EVENTS_BINARY).await?;
    for (i, row) in groups.iter().flat_map(|g| g.iter()).enumerate() {
        encode_copy_row_binary(&mut buffer, row);
        let last = i + 1 == total;
        if last {
            buffer.extend_from_slice(COPY_BINARY_TRAILER);
        } else if buffer.len() < CHUNK {
            continue;
        }
        if let Err(e) = copy.send(buffer.as_slice()).await {
            let _ = copy.abort("send failed").await;
            return Err(e.into());
        }
        buffer.clear();
    }
    copy.finish().await?;
    BUFFERS.give(buffer);
    Ok(())
}

/// Copies rows one by one under savepoints, linking each into the chain only
/// once the database took it; returns those it refused (id, offset, reason).
async fn isolate_refused(
    conn: &mut sqlx::PgConnection,
    head: &mut ChainHead,
    rows: Vec<StoredEvent>,
    scratch: &mut Vec<u8>,
) -> Result<Vec<(Uuid, i64, String)>, StoreError> {
    let mut refused = Vec::new();
    for mut row in rows {
        let before = head.clone();
        head.link(&mut row, scratch);
        sqlx::query("SAVEPOINT one_event")
            .execute(&mut *conn)
            .await?;
        match copy_rows(conn, std::slice::from_ref(&row)).await {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT one_event")
                    .execute(&mut *conn)
                    .await?;
            }
            Err(StoreError::Data(reason)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT one_event")
                    .execute(&mut *conn)
                    .await?;
                *head = before;
                refused.push((row.event_id, row.kafka_offset.unwrap_or(-1), reason));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(refused)
}

/// The local PostgreSQL server through its Unix socket, as the current OS
/// user (PostgreSQL's usual peer authentication), for `dev` and the tests.
pub fn local_database_url(database: &str) -> String {
    let user = std::env::var("PGUSER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(os_user_name)
        .unwrap_or_else(|| "postgres".to_string());
    let socket_dir = std::env::var("PGHOST")
        .ok()
        .filter(|h| h.starts_with('/'))
        .unwrap_or_else(|| "/var/run/postgresql".to_string());
    format!("postgres://{user}@localhost/{database}?host={socket_dir}")
}

/// The name of the effective OS user, as peer authentication sees it.
fn os_user_name() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; the
    // name is copied out before any other call could overwrite it.
    unsafe {
        let entry = libc::getpwuid(libc::geteuid());
        if entry.is_null() || (*entry).pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr((*entry).pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://audit:s3cret@db:5432/audit?sslmode=require"),
            "postgres://audit:***@db:5432/audit?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://audit@db/audit"),
            "postgres://audit@db/audit"
        );
        assert_eq!(redact_url("postgres:///audit"), "postgres:///audit");
    }

    /// Rows with every optional column set or not, odd text, far dates and
    /// blind-index tokens; the binary COPY must store exactly what the
    /// text COPY (the format used before) stores.
    fn random_rows(seed: u64, n: usize) -> Vec<StoredEvent> {
        use chrono::{TimeZone, Utc};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let texts = [
            "a",
            "tab\there",
            "new\nline",
            "back\\slash",
            "Zoë ✓ 𝄞",
            "\\N",
            "",
            "x\ry",
        ];
        let pick = |rng: &mut rand::rngs::StdRng| texts[rng.gen_range(0..texts.len())].to_owned();
        (0..n)
            .map(|i| {
                let micros: i64 = rng.gen_range(-2_000_000_000_000_000..4_000_000_000_000_000);
                let occurred_at = Utc.timestamp_micros(micros).single().expect("in range");
                StoredEvent {
                    event_id: Uuid::from_u128(rng.gen()),
                    event_type: format!("order.{}", pick(&mut rng)),
                    stream_id: format!("order-{i}-{}", pick(&mut rng)),
                    stream_version: rng.gen_bool(0.5).then(|| rng.gen_range(1..i64::MAX)),
                    occurred_at,
                    ingested_at: Utc
                        .timestamp_micros(rng.gen_range(0..2_000_000_000_000_000))
                        .single()
                        .expect("in range"),
                    source: rng.gen_bool(0.5).then(|| pick(&mut rng)),
                    correlation_id: rng.gen_bool(0.5).then(|| Uuid::from_u128(rng.gen())),
                    causation_id: rng.gen_bool(0.5).then(|| Uuid::from_u128(rng.gen())),
                    subject_id: rng.gen_bool(0.5).then(|| pick(&mut rng)),
                    payload: format!(r#"{{"k":{},"s":{:?},"n":[1,2.5,-3e3]}}"#, i, pick(&mut rng)),
                    metadata: rng
                        .gen_bool(0.5)
                        .then(|| r#"{"m":{"deep":[true,null]}}"#.to_owned()),
                    headers: format!(r#"[{{"key":"h","value":{:?}}}]"#, pick(&mut rng)),
                    blind_index: (0..rng.gen_range(0..3))
                        .map(|_| format!("email:{}", pick(&mut rng)))
                        .collect(),
                    content_hash: rng.gen(),
                    kafka_topic: Some("orders".into()),
                    kafka_partition: Some(rng.gen_range(0..i32::MAX)),
                    kafka_offset: Some(i as i64),
                    chain_id: format!("orders/{}", pick(&mut rng)),
                    chain_position: rng.gen_range(0..u64::MAX / 2),
                    hash: rng.gen(),
                }
            })
            .collect()
    }

    /// A migrated scratch database and a connection to it.
    async fn scratch() -> (crate::testing::TestDatabase, sqlx::PgConnection) {
        let db = crate::testing::TestDatabase::create()
            .await
            .expect("database");
        let conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        (db, conn)
    }

    #[tokio::test]
    async fn binary_copy_stores_what_text_copy_stores() {
        let rows = random_rows(2026, 500);
        let ((text_db, mut text), (binary_db, mut binary)) = (scratch().await, scratch().await);
        let mut encoded = String::new();
        for row in &rows {
            super::super::chain::encode_copy_row(&mut encoded, row);
        }
        let mut copy = text.copy_in_raw(COPY_EVENTS).await.expect("copy in");
        copy.send(encoded.as_bytes()).await.expect("send");
        copy.finish().await.expect("text COPY");
        copy_rows(&mut binary, &rows).await.expect("binary COPY");
        let columns = COPY_EVENTS
            .trim_start_matches("COPY events (")
            .trim_end_matches(") FROM STDIN");
        let dump =
            format!("SELECT t::text FROM (SELECT {columns} FROM events ORDER BY event_id) t");
        let from_text: Vec<String> = sqlx::query_scalar(&dump)
            .fetch_all(&mut text)
            .await
            .expect("read");
        let from_binary: Vec<String> = sqlx::query_scalar(&dump)
            .fetch_all(&mut binary)
            .await
            .expect("read");
        assert_eq!(from_text.len(), rows.len());
        for (t, b) in from_text.iter().zip(&from_binary) {
            assert_eq!(t, b);
        }

        // A value PostgreSQL refuses is a data error, as with text, so the
        // writer isolates the row instead of retrying the batch forever.
        let mut bad = random_rows(7, 1);
        bad[0].stream_id = "nul\0byte".into();
        match copy_rows(&mut binary, &bad).await {
            Err(StoreError::Data(_)) => {}
            other => panic!("expected a data error, got {other:?}"),
        }
        let _ = text.close().await;
        let _ = binary.close().await;
        text_db.drop_database().await;
        binary_db.drop_database().await;
    }

    /// The COPY claim must store exactly what the `ON CONFLICT` claim (the
    /// way used before, and still the fallback) stores, and claim nothing
    /// when one id is taken.
    #[tokio::test]
    async fn copy_claim_stores_what_the_on_conflict_claim_stores() {
        let events: Vec<Event> = random_rows(2027, 300)
            .into_iter()
            .enumerate()
            .map(|(i, row)| Event {
                event_id: row.event_id,
                event_type: row.event_type,
                stream_id: row.stream_id,
                stream_version: row.stream_version,
                // Sub-microsecond digits, which both ways must drop alike.
                occurred_at: row.occurred_at + chrono::Duration::nanoseconds(i as i64 % 1000),
                source: row.source,
                correlation_id: row.correlation_id,
                causation_id: row.causation_id,
                subject_id: row.subject_id,
                payload: serde_json::value::RawValue::from_string(row.payload).expect("json"),
                metadata: None,
                headers: row.headers,
                content_hash: row.content_hash,
                kafka_topic: format!("topic-{}", i % 3),
                kafka_partition: row.kafka_partition.unwrap_or(0),
                kafka_offset: row.kafka_offset.unwrap_or(0),
            })
            .collect();
        let refs: Vec<&Event> = events.iter().collect();
        let ((conflict_db, mut on_conflict), (copy_db, mut copy)) =
            (scratch().await, scratch().await);
        assert!(claim_ids(&mut on_conflict, &refs)
            .await
            .expect("claim")
            .is_empty());
        assert!(matches!(
            copy_claim_ids(&mut copy, &refs).await.expect("copy claim"),
            CopyClaim::Claimed
        ));
        let dump = "SELECT t::text FROM (SELECT * FROM event_ids ORDER BY event_id) t";
        let by_conflict: Vec<String> = sqlx::query_scalar(dump)
            .fetch_all(&mut on_conflict)
            .await
            .expect("read");
        let by_copy: Vec<String> = sqlx::query_scalar(dump)
            .fetch_all(&mut copy)
            .await
            .expect("read");
        assert_eq!(by_conflict.len(), events.len());
        assert_eq!(by_copy.len(), events.len());
        let differing: Vec<_> = by_conflict
            .iter()
            .zip(&by_copy)
            .filter(|(a, b)| a != b)
            .collect();
        assert!(
            differing.is_empty(),
            "{} rows differ, first: {:?}",
            differing.len(),
            differing.first()
        );
        // Both store the time `events` stores for the event (lookups join on it).
        let mut expected: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = events
            .iter()
            .map(|e| (e.event_id, normalized(e.occurred_at)))
            .collect();
        expected.sort();
        let stored: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT event_id, occurred_at FROM event_ids ORDER BY event_id")
                .fetch_all(&mut on_conflict)
                .await
                .expect("read");
        let wrong = stored.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "occurred_at differs from the stored event's");

        // One taken id among new ones: the COPY claims none of them.
        let mut again = random_rows(2028, 5)
            .into_iter()
            .map(|row| Event {
                event_id: row.event_id,
                ..events[0].clone()
            })
            .collect::<Vec<_>>();
        again[3].event_id = events[7].event_id;
        let refs: Vec<&Event> = again.iter().collect();
        let mut tx = copy.begin().await.expect("begin");
        sqlx::query("SAVEPOINT claim")
            .execute(&mut *tx)
            .await
            .expect("savepoint");
        assert!(matches!(
            copy_claim_ids(&mut tx, &refs).await.expect("copy claim"),
            CopyClaim::Refused
        ));
        sqlx::query("ROLLBACK TO SAVEPOINT claim")
            .execute(&mut *tx)
            .await
            .expect("rollback to savepoint");
        let taken = claim_ids(&mut tx, &refs).await.expect("claim");
        assert_eq!(taken, HashSet::from([events[7].event_id]));
        tx.commit().await.expect("commit");
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM event_ids")
            .fetch_one(&mut copy)
            .await
            .expect("count");
        assert_eq!(count as usize, events.len() + 4);
        let _ = on_conflict.close().await;
        let _ = copy.close().await;
        conflict_db.drop_database().await;
        copy_db.drop_database().await;
    }

    #[test]
    fn copy_text_escapes_separators() {
        let mut out = String::new();
        super::super::chain::copy_text(&mut out, "a\tb\nc\\d\re");
        assert_eq!(out, "a\\tb\\nc\\\\d\\re");
    }
}
