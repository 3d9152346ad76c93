//! Independent verification of the store: every chain recomputed from the
//! rows, every Merkle root at every checkpoint, every signature.
//!
//! One pass over `events` in `seq` order (the order rows were appended; per
//! chain that is position order). Per chain it keeps the expected position,
//! the previous hash and a Merkle compact range, so memory is O(chains).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use futures::TryStreamExt;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::canonical::{chain_hash, write_canonical_text, ChainRecord, GENESIS};
use crate::checkpoint::Checkpoint;
use crate::error::StoreError;
use crate::merkle::{leaf_hash, CompactRange};

/// Where a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub chain_id: String,
    /// The chain position concerned (for a truncation: the first missing one).
    pub position: Option<u64>,
    pub seq: Option<i64>,
    pub event_id: Option<Uuid>,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chain {}", self.chain_id)?;
        if let Some(p) = self.position {
            write!(f, " position {p}")?;
        }
        match (self.seq, self.event_id) {
            (Some(seq), Some(id)) => write!(f, " (seq {seq}, event {id})")?,
            (Some(seq), None) => write!(f, " (seq {seq})")?,
            _ => {}
        }
        write!(f, ": {}", self.what)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChainSummary {
    pub length: u64,
    pub checkpoints: usize,
    /// The last verified event's hash.
    pub head: Option<[u8; 32]>,
    /// Verification stopped at a problem in this chain.
    pub broken: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub events: u64,
    pub chains: BTreeMap<String, ChainSummary>,
    pub checkpoints_verified: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What to check the database against.
pub struct VerifyOptions {
    /// The checkpoint signing key's public half.
    pub public_key: VerifyingKey,
    /// Checkpoints published outside the database (they catch truncation
    /// and a rewritten `checkpoints` table).
    pub external: Vec<Checkpoint>,
    /// Stop collecting after this many problems.
    pub max_problems: usize,
    /// Parallel workers (each with its own connection), chains split among them.
    pub workers: usize,
}

struct ChainState {
    next_position: u64,
    prev: [u8; 32],
    frontier: CompactRange,
    /// Checkpoints by tree size, verified when the chain reaches that size.
    pending: BTreeMap<u64, Vec<(Checkpoint, &'static str)>>,
    broken: bool,
}

impl ChainState {
    fn new() -> Self {
        Self {
            next_position: 0,
            prev: GENESIS,
            frontier: CompactRange::new(),
            pending: BTreeMap::new(),
            broken: false,
        }
    }
}

pub async fn verify(pool: &PgPool, options: &VerifyOptions) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let mut chains: HashMap<String, ChainState> = HashMap::new();
    // One snapshot for every query and worker, so a store that keeps
    // ingesting meanwhile is verified as of one instant.
    let mut coordinator = pool.acquire().await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *coordinator)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *coordinator)
        .await?;

    // Checkpoints, from the database and from outside it.
    let rows = sqlx::query(
        "SELECT chain_id, tree_size, root_hash, signed_at, key_id, signature FROM checkpoints",
    )
    .fetch_all(&mut *coordinator)
    .await?;
    let mut all: Vec<(Checkpoint, &'static str)> = Vec::new();
    for row in rows {
        let chain_id: String = row.try_get(0)?;
        let size: i64 = row.try_get(1)?;
        let root: Vec<u8> = row.try_get(2)?;
        let signed_at: DateTime<Utc> = row.try_get(3)?;
        let signature: Vec<u8> = row.try_get(5)?;
        let (Ok(root), Ok(signature)) =
            (<[u8; 32]>::try_from(root), <[u8; 64]>::try_from(signature))
        else {
            report.problems.push(Problem {
                chain_id,
                position: None,
                seq: None,
                event_id: None,
                what: format!("checkpoint of size {size} in the database is malformed"),
            });
            continue;
        };
        all.push((
            Checkpoint {
                chain_id,
                tree_size: size.max(0) as u64,
                root_hash: root,
                timestamp: signed_at,
                key_id: row.try_get(4)?,
                signature,
            },
            "database",
        ));
    }
    all.extend(options.external.iter().cloned().map(|c| (c, "published")));
    for (checkpoint, origin) in all {
        if let Err(e) = checkpoint.verify(&options.public_key) {
            report.problems.push(Problem {
                chain_id: checkpoint.chain_id.clone(),
                position: None,
                seq: None,
                event_id: None,
                what: format!(
                    "{origin} checkpoint of size {} has a bad signature: {e}",
                    checkpoint.tree_size
                ),
            });
            continue;
        }
        chains
            .entry(checkpoint.chain_id.clone())
            .or_insert_with(ChainState::new)
            .pending
            .entry(checkpoint.tree_size)
            .or_default()
            .push((checkpoint, origin));
    }

    // The chains to check: every chain with events, and every chain a
    // checkpoint speaks of (a chain whose rows were all deleted has none).
    let mut ids: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT chain_id FROM events WHERE chain_id IS NOT NULL")
            .fetch_all(&mut *coordinator)
            .await?;
    for id in chains.keys() {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    ids.sort();
    // Chains are independent: one worker (and one connection) per core.
    let workers = options.workers.max(1).min(ids.len().max(1));
    let mut shares: Vec<(Vec<String>, HashMap<String, ChainState>)> =
        (0..workers).map(|_| (Vec::new(), HashMap::new())).collect();
    for (i, id) in ids.into_iter().enumerate() {
        let state = chains.remove(&id).unwrap_or_else(ChainState::new);
        let share = &mut shares[i % workers];
        share.1.insert(id.clone(), state);
        share.0.push(id);
    }
    let mut tasks = Vec::with_capacity(workers);
    for (i, (ids, states)) in shares.into_iter().enumerate() {
        let pool = pool.clone();
        let max_problems = options.max_problems;
        // The first worker also reports rows outside every chain.
        let snapshot = snapshot.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *conn)
                .await?;
            // The id is PostgreSQL's own, not user input.
            sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
                .execute(&mut *conn)
                .await?;
            let report = verify_share(&mut conn, ids, states, i == 0, max_problems).await;
            let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
            report
        }));
    }
    for task in tasks {
        let part = task
            .await
            .map_err(|e| StoreError::Fatal(format!("verification worker failed: {e}")))??;
        report.events += part.events;
        report.checkpoints_verified += part.checkpoints_verified;
        for (chain, summary) in part.chains {
            let entry = report.chains.entry(chain).or_default();
            entry.length += summary.length;
            entry.checkpoints += summary.checkpoints;
            entry.head = entry.head.or(summary.head);
            entry.broken |= summary.broken;
        }
        for problem in part.problems {
            push(&mut report, options, problem);
        }
    }
    // The chains table must agree with the events: a shorter chain whose
    // tail is not covered by any checkpoint is still caught here, unless the
    // attacker also rewrote this row.
    let heads = sqlx::query("SELECT chain_id, length, head_hash FROM chains")
        .fetch_all(&mut *coordinator)
        .await?;
    sqlx::query("COMMIT").execute(&mut *coordinator).await?;
    for row in heads {
        let chain_id: String = row.try_get(0)?;
        let length: i64 = row.try_get(1)?;
        let head: Vec<u8> = row.try_get(2)?;
        let found = report.chains.get(&chain_id).cloned().unwrap_or_default();
        if found.broken {
            continue;
        }
        let found_head = found
            .head
            .map(|h| h.to_vec())
            .unwrap_or_else(|| GENESIS.to_vec());
        if length < 0 || length as u64 != found.length || head != found_head {
            push(
                &mut report,
                options,
                Problem {
                    chain_id: chain_id.clone(),
                    position: Some(found.length),
                    seq: None,
                    event_id: None,
                    what: format!(
                        "the chains table records {length} events and a different head than the {} events found: events were cut from the end of the chain (or the head was rewritten)",
                        found.length
                    ),
                },
            );
        }
    }
    report
        .problems
        .sort_by(|a, b| (a.seq, &a.chain_id).cmp(&(b.seq, &b.chain_id)));
    report
        .chains
        .retain(|_, s| s.length > 0 || s.checkpoints > 0);
    Ok(report)
}

/// Verifies some chains: one pass over their rows in `seq` order.
async fn verify_share(
    conn: &mut sqlx::PgConnection,
    ids: Vec<String>,
    mut chains: HashMap<String, ChainState>,
    unchained: bool,
    max_problems: usize,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let options = &Limits { max_problems };
    let mut buffer = Vec::with_capacity(4096);
    // One index-ordered scan per chain: a Kafka chain is in offset order
    // (the unique position index), others in seq order. Every row is read
    // once, whichever worker owns its chain.
    for id in ids.iter().map(Some).chain(unchained.then_some(None)) {
        let kafka = id.and_then(|id| kafka_coordinates(id));
        let sql = match (id, kafka) {
            (_, Some(_)) => format!(
                "SELECT {ROW_COLUMNS} FROM events WHERE kafka_topic = $1 AND kafka_partition = $2 ORDER BY kafka_offset"
            ),
            (Some(_), None) => format!("SELECT {ROW_COLUMNS} FROM events WHERE chain_id = $1 ORDER BY seq"),
            (None, _) => format!("SELECT {ROW_COLUMNS} FROM events WHERE chain_id IS NULL ORDER BY seq"),
        };
        let mut query = sqlx::query(&sql);
        match (id, kafka) {
            (_, Some((topic, partition))) => query = query.bind(topic.to_owned()).bind(partition),
            (Some(id), None) => query = query.bind(id.clone()),
            (None, _) => {}
        }
        let mut stream = query.fetch(&mut *conn);
        while let Some(row) = stream.try_next().await? {
            process_row(
                &row,
                id.map(String::as_str),
                &mut chains,
                &mut report,
                options,
                &mut buffer,
            )?;
        }
    }
    for (chain_id, state) in chains {
        let summary = report.chains.entry(chain_id.clone()).or_default();
        summary.length = state.next_position;
        summary.head = (state.next_position > 0).then_some(state.prev);
        summary.broken = state.broken;
        if state.broken {
            continue;
        }
        if let Some((size, list)) = state.pending.iter().next_back() {
            let origin = list.first().map(|(_, o)| *o).unwrap_or("a");
            push(
                &mut report,
                options,
                Problem {
                    chain_id: chain_id.clone(),
                    position: Some(state.next_position),
                    seq: None,
                    event_id: None,
                    what: format!(
                        "the chain has {} events but a signed {origin} checkpoint covers {size}: events were cut from its end",
                        state.next_position
                    ),
                },
            );
        }
    }
    Ok(report)
}

/// The columns a chain record is rebuilt from.
const ROW_COLUMNS: &str =
    "seq, chain_id, chain_position, hash, event_id, event_type, stream_id, stream_version,
    occurred_at, ingested_at, source, correlation_id, causation_id, subject_id,
    kafka_topic, kafka_partition, kafka_offset, headers::text, metadata::text,
    payload::text, blind_index, content_hash";

/// `topic/partition` of a Kafka chain id.
fn kafka_coordinates(chain_id: &str) -> Option<(&str, i32)> {
    let (topic, partition) = chain_id.rsplit_once('/')?;
    let partition: i32 = partition.parse().ok()?;
    (!topic.is_empty() && partition >= 0).then_some((topic, partition))
}

/// Checks one row against its chain's state.
fn process_row(
    row: &sqlx::postgres::PgRow,
    scanning: Option<&str>,
    chains: &mut HashMap<String, ChainState>,
    report: &mut Report,
    options: &dyn ProblemLimit,
    buffer: &mut Vec<u8>,
) -> Result<(), StoreError> {
    report.events += 1;
    let seq: i64 = row.try_get(0)?;
    let event_id: Uuid = row.try_get(4)?;
    let Some(chain_id) = row.try_get::<Option<String>, _>(1)? else {
        if scanning.is_some() {
            // Reported once, by the scan of unchained rows.
            report.events -= 1;
            return Ok(());
        }
        push(report, options, Problem {
            chain_id: "(none)".into(),
            position: None,
            seq: Some(seq),
            event_id: Some(event_id),
            what: "the event is in no chain (stored before chains existed, or its link was removed)".into(),
        });
        return Ok(());
    };
    if let Some(scanning) = scanning.filter(|s| *s != chain_id) {
        push(report, options, Problem {
            chain_id: scanning.to_owned(),
            position: None,
            seq: Some(seq),
            event_id: Some(event_id),
            what: format!("a row at this chain's Kafka position claims chain {chain_id}: its link was changed"),
        });
        if let Some(state) = chains.get_mut(scanning) {
            state.broken = true;
        }
        return Ok(());
    }
    let state = chains
        .entry(chain_id.clone())
        .or_insert_with(ChainState::new);
    if state.broken {
        return Ok(());
    }
    let position: Option<i64> = row.try_get(2)?;
    let stored_hash: Option<Vec<u8>> = row.try_get(3)?;
    let problem = |what: String, position: Option<u64>| Problem {
        chain_id: chain_id.clone(),
        position,
        seq: Some(seq),
        event_id: Some(event_id),
        what,
    };
    let expected = state.next_position;
    let position = match position {
        Some(p) if p >= 0 => p as u64,
        _ => {
            state.broken = true;
            push(
                report,
                options,
                problem("the chain position is missing".into(), Some(expected)),
            );
            return Ok(());
        }
    };
    if position != expected {
        state.broken = true;
        let what = if position > expected {
            format!(
                "expected position {expected} next but found {position}: {} event(s) missing (deleted) or rows out of order (swapped)",
                position - expected
            )
        } else {
            format!("position {position} appears again or out of order (expected {expected}): rows were swapped or copied")
        };
        push(report, options, problem(what, Some(expected)));
        return Ok(());
    }
    let record = read_record(row, &chain_id, position);
    let recomputed = match record {
        Ok((parts, content_hash)) => {
            buffer.clear();
            parts
                .record(&chain_id, position, &content_hash)
                .encode(buffer);
            chain_hash(&state.prev, buffer)
        }
        Err(what) => {
            state.broken = true;
            push(report, options, problem(what, Some(position)));
            return Ok(());
        }
    };
    if stored_hash.as_deref() != Some(&recomputed[..]) {
        state.broken = true;
        push(
            report,
            options,
            problem(
                "the stored hash differs from the one recomputed from the row and its predecessor: the row (or one before it) was changed".into(),
                Some(position),
            ),
        );
        return Ok(());
    }
    state.prev = recomputed;
    state.frontier.push(leaf_hash(&recomputed));
    state.next_position += 1;
    let size = state.next_position;
    if let Some(checkpoints) = state.pending.remove(&size) {
        let root = state.frontier.root();
        for (checkpoint, origin) in checkpoints {
            if checkpoint.root_hash == root {
                report.checkpoints_verified += 1;
                report
                    .chains
                    .entry(chain_id.clone())
                    .or_default()
                    .checkpoints += 1;
            } else {
                state.broken = true;
                push(
                    report,
                    options,
                    problem(
                        format!(
                            "the Merkle root of the first {size} events differs from the signed {origin} checkpoint of {}: rows were changed and their hashes recomputed",
                            checkpoint.timestamp.format("%Y-%m-%dT%H:%M:%SZ")
                        ),
                        Some(position),
                    ),
                );
            }
        }
    }
    Ok(())
}

/// How many problems to keep.
pub trait ProblemLimit {
    fn max_problems(&self) -> usize;
}

impl ProblemLimit for VerifyOptions {
    fn max_problems(&self) -> usize {
        self.max_problems
    }
}

struct Limits {
    max_problems: usize,
}

impl ProblemLimit for Limits {
    fn max_problems(&self) -> usize {
        self.max_problems
    }
}

fn push(report: &mut Report, options: &dyn ProblemLimit, problem: Problem) {
    if report.problems.len() < options.max_problems().max(1) {
        report.problems.push(problem);
    }
}

/// The owned values of a row's hashed fields.
struct Parts {
    event_id: Uuid,
    event_type: String,
    stream_id: String,
    stream_version: Option<i64>,
    occurred_at: DateTime<Utc>,
    ingested_at: DateTime<Utc>,
    source: Option<String>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    subject_id: Option<String>,
    kafka_topic: Option<String>,
    kafka_partition: Option<i32>,
    kafka_offset: Option<i64>,
    headers: String,
    metadata: Option<String>,
    payload: String,
    blind_index: Vec<String>,
}

impl Parts {
    fn record<'a>(
        &'a self,
        chain_id: &'a str,
        position: u64,
        content_hash: &'a [u8; 32],
    ) -> ChainRecord<'a> {
        ChainRecord {
            chain_id,
            position,
            event_id: self.event_id,
            event_type: &self.event_type,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            occurred_at: self.occurred_at,
            ingested_at: self.ingested_at,
            source: self.source.as_deref(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            subject_id: self.subject_id.as_deref(),
            kafka_topic: self.kafka_topic.as_deref(),
            kafka_partition: self.kafka_partition,
            kafka_offset: self.kafka_offset,
            headers: &self.headers,
            metadata: self.metadata.as_deref(),
            payload: &self.payload,
            blind_index: &self.blind_index,
            content_hash,
        }
    }
}

fn read_record(
    row: &sqlx::postgres::PgRow,
    _chain_id: &str,
    _position: u64,
) -> Result<(Parts, [u8; 32]), String> {
    let get = |e: sqlx::Error| format!("the row cannot be read: {e}");
    let canonical = |what: &str, text: String| {
        let mut out = Vec::with_capacity(text.len());
        write_canonical_text(&text, &mut out)
            .map_err(|e| format!("the stored {what} has no canonical form: {e}"))?;
        String::from_utf8(out).map_err(|e| format!("the stored {what} is not UTF-8: {e}"))
    };
    let content_hash: Vec<u8> = row.try_get(21).map_err(get)?;
    let content_hash: [u8; 32] = content_hash
        .try_into()
        .map_err(|_| "content_hash is not 32 bytes".to_string())?;
    let metadata: Option<String> = row.try_get(18).map_err(get)?;
    Ok((
        Parts {
            event_id: row.try_get(4).map_err(get)?,
            event_type: row.try_get(5).map_err(get)?,
            stream_id: row.try_get(6).map_err(get)?,
            stream_version: row.try_get(7).map_err(get)?,
            occurred_at: row.try_get(8).map_err(get)?,
            ingested_at: row.try_get(9).map_err(get)?,
            source: row.try_get(10).map_err(get)?,
            correlation_id: row.try_get(11).map_err(get)?,
            causation_id: row.try_get(12).map_err(get)?,
            subject_id: row.try_get(13).map_err(get)?,
            kafka_topic: row.try_get(14).map_err(get)?,
            kafka_partition: row.try_get(15).map_err(get)?,
            kafka_offset: row.try_get(16).map_err(get)?,
            headers: canonical("headers", row.try_get(17).map_err(get)?)?,
            metadata: metadata.map(|m| canonical("metadata", m)).transpose()?,
            payload: canonical("payload", row.try_get(19).map_err(get)?)?,
            blind_index: row.try_get(20).map_err(get)?,
        },
        content_hash,
    ))
}
