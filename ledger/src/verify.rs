//! Independent verification of the store: every chain recomputed from the
//! rows, every Merkle root at every checkpoint, every signature.
//!
//! Chains are independent: workers, each with its own connection and all
//! under one exported snapshot, take them from a queue, longest first. A
//! chain is one index-ordered scan (a Kafka chain in offset order, others
//! in `seq` order, which is position order), streamed as binary `COPY`:
//! rows are decoded where they lie, and each record is encoded, with its
//! JSON columns canonicalised, straight into one reused buffer. Per chain
//! the scan keeps the expected position, the previous hash and a Merkle
//! compact range, so memory is O(chains).
//!
//! The chains to scan are the ones the `chains` table and the checkpoints
//! name. The scans' row sets are disjoint, and a count of all rows in the
//! same snapshot proves that together they saw every row; only when it
//! does not are the others looked for (unchained rows, unlisted chains,
//! rows whose Kafka position belongs to no chain).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use futures::TryStreamExt;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::canonical::{chain_hash, Canonicalizer, ChainRecord, GENESIS};
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
    /// `seq` of the previous row: a chain's rows were stored in position
    /// order, so `seq` must increase along it (it is not hashed).
    last_seq: Option<i64>,
    prev: [u8; 32],
    frontier: CompactRange,
    /// Checkpoints by tree size, verified when the chain reaches that size.
    pending: BTreeMap<u64, Vec<(Checkpoint, &'static str)>>,
    /// Checkpoints verified.
    checkpoints: usize,
    broken: bool,
}

impl ChainState {
    fn new() -> Self {
        Self {
            next_position: 0,
            last_seq: None,
            prev: GENESIS,
            frontier: CompactRange::new(),
            pending: BTreeMap::new(),
            checkpoints: 0,
            broken: false,
        }
    }
}

/// Which rows a scan reads. The row sets of different scans are disjoint,
/// so the rows they count add up to the table's count when they saw every
/// row (see [`verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scan {
    /// The rows at a Kafka (topic, partition), in offset order: every row
    /// there belongs to the chain `topic/partition`. Counts those with a
    /// chain; rows without one are counted by [`Scan::Unchained`].
    Kafka { topic: String, partition: i32 },
    /// The rows of a chain without Kafka positions (`system`), in `seq`
    /// order.
    Chain,
    /// The rows in no chain, in `seq` order: each one a problem.
    Unchained,
}

/// One chain to verify.
struct Job {
    chain_id: String,
    scan: Scan,
    state: ChainState,
    /// Its length as the chains table records it: longest first.
    length: i64,
}

impl Job {
    fn new(chain_id: String, state: ChainState, length: i64) -> Self {
        let scan = match kafka_coordinates(&chain_id) {
            Some((topic, partition)) => Scan::Kafka {
                topic: topic.to_owned(),
                partition,
            },
            None => Scan::Chain,
        };
        Self {
            chain_id,
            scan,
            state,
            length,
        }
    }

    fn unchained() -> Self {
        Self {
            chain_id: "(none)".into(),
            scan: Scan::Unchained,
            state: ChainState::new(),
            length: 0,
        }
    }

    /// The statement streaming this scan's rows, `None` when no row can
    /// match (a chain id PostgreSQL cannot hold, named by a checkpoint).
    fn copy_statement(&self) -> Option<String> {
        let (filter, order) = match &self.scan {
            Scan::Kafka { topic, partition } => (
                format!(
                    "e.kafka_topic = {} AND e.kafka_partition = {partition}",
                    literal(topic)?
                ),
                "e.kafka_offset",
            ),
            // The index on the Kafka position finds the rows without one.
            Scan::Chain => (
                format!(
                    "e.kafka_topic IS NULL AND e.chain_id = {}",
                    literal(&self.chain_id)?
                ),
                "e.seq",
            ),
            Scan::Unchained => ("e.chain_id IS NULL".to_owned(), "e.seq"),
        };
        // A Kafka scan's rows all have its topic and partition: not sent.
        let kafka = match self.scan {
            Scan::Kafka { .. } => "NULL::text, NULL::int4",
            _ => "e.kafka_topic::text, e.kafka_partition::int4",
        };
        Some(format!(
            "COPY (SELECT {COLUMNS_BEFORE_KAFKA}, {kafka}, {COLUMNS_AFTER_KAFKA} FROM events e WHERE {filter} ORDER BY {order}) TO STDOUT (FORMAT binary)"
        ))
    }
}

/// A string literal that means `s` whatever `standard_conforming_strings`
/// says (`COPY` takes no parameters). `None` for a NUL, which no text
/// value holds.
fn literal(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    Some(format!(
        "E'{}'",
        s.replace('\\', "\\\\").replace('\'', "\\'")
    ))
}

pub async fn verify(pool: &PgPool, options: &VerifyOptions) -> Result<Report, StoreError> {
    let mut report = Report::default();
    // One snapshot for every query and worker, so a store that keeps
    // ingesting meanwhile is verified as of one instant.
    let mut coordinator = pool.acquire().await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *coordinator)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *coordinator)
        .await?;
    let mut chains = load_checkpoints(&mut coordinator, options, &mut report).await?;

    // The chains to check: every chain the chains table lists, and every
    // chain a checkpoint speaks of (a chain whose rows were all deleted,
    // head included, has only its published checkpoints).
    let listed: Vec<(String, i64)> = sqlx::query_as("SELECT chain_id, length FROM chains")
        .fetch_all(&mut *coordinator)
        .await?;
    let mut jobs: Vec<Job> = Vec::with_capacity(listed.len() + chains.len());
    for (id, length) in listed {
        let state = chains.remove(&id).unwrap_or_else(ChainState::new);
        jobs.push(Job::new(id, state, length));
    }
    jobs.extend(chains.into_iter().map(|(id, state)| Job::new(id, state, 0)));
    let mut scans: Vec<(String, Scan)> = jobs
        .iter()
        .map(|j| (j.chain_id.clone(), j.scan.clone()))
        .collect();
    let scanned: HashSet<String> = jobs.iter().map(|j| j.chain_id.clone()).collect();

    // The count runs on the coordinator's connection while the workers scan.
    let total =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(&mut *coordinator);
    let (parts, total) = tokio::join!(
        run_workers(pool, &snapshot, jobs, options.workers, options.max_problems),
        total
    );
    let total = total?.max(0) as u64;
    for part in parts? {
        merge(&mut report, options, part);
    }

    if report.events != total {
        // Some rows were outside every scan: rows in no chain, rows of a
        // chain neither the chains table nor a checkpoint names (both
        // verified here as before), or rows whose Kafka position belongs
        // to no chain (reported below).
        let found: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT chain_id FROM events WHERE chain_id IS NOT NULL")
                .fetch_all(&mut *coordinator)
                .await?;
        let mut extra: Vec<Job> = found
            .into_iter()
            .filter(|id| !scanned.contains(id))
            .map(|id| Job::new(id, ChainState::new(), 0))
            .collect();
        extra.push(Job::unchained());
        for job in &extra {
            scans.push((job.chain_id.clone(), job.scan.clone()));
        }
        let mut part = Report::default();
        let mut scratch = Scratch::default();
        for job in extra {
            scan_chain(
                &mut coordinator,
                job,
                &mut part,
                &mut scratch,
                options.max_problems,
            )
            .await?;
        }
        merge(&mut report, options, part);
        if report.events < total {
            report_unscanned(&mut coordinator, &mut report, options, &scans).await?;
        } else if report.events > total {
            // Disjoint scans under one snapshot cannot do this: fail closed.
            let read = report.events;
            push(
                &mut report,
                options,
                Problem {
                    chain_id: "(all)".into(),
                    position: None,
                    seq: None,
                    event_id: None,
                    what: format!("the scans read {read} rows but the table holds {total}"),
                },
            );
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

/// Every checkpoint, from the database and from outside it, whose
/// signature holds, by chain; a bad one is a problem.
async fn load_checkpoints(
    conn: &mut sqlx::PgConnection,
    options: &VerifyOptions,
    report: &mut Report,
) -> Result<HashMap<String, ChainState>, StoreError> {
    let rows = sqlx::query(
        "SELECT chain_id, tree_size, root_hash, signed_at, key_id, signature FROM checkpoints",
    )
    .fetch_all(&mut *conn)
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
    let mut chains: HashMap<String, ChainState> = HashMap::new();
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
    Ok(chains)
}

/// Runs the jobs on `workers` connections under `snapshot`, each worker
/// taking the longest job left.
async fn run_workers(
    pool: &PgPool,
    snapshot: &str,
    mut jobs: Vec<Job>,
    workers: usize,
    max_problems: usize,
) -> Result<Vec<Report>, StoreError> {
    jobs.sort_by(|a, b| (a.length, &b.chain_id).cmp(&(b.length, &a.chain_id)));
    let workers = workers.max(1).min(jobs.len().max(1));
    let queue = Arc::new(Mutex::new(jobs));
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let pool = pool.clone();
        let snapshot = snapshot.to_owned();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *conn)
                .await?;
            // The id is PostgreSQL's own, not user input.
            sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
                .execute(&mut *conn)
                .await?;
            let mut part = Report::default();
            let mut scratch = Scratch::default();
            // Poisoned only if another worker panicked: its join fails.
            while let Some(job) = queue.lock().ok().and_then(|mut q| q.pop()) {
                scan_chain(&mut conn, job, &mut part, &mut scratch, max_problems).await?;
            }
            let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
            Ok::<_, StoreError>(part)
        }));
    }
    let mut parts = Vec::with_capacity(workers);
    for task in tasks {
        parts.push(
            task.await
                .map_err(|e| StoreError::Fatal(format!("verification worker failed: {e}")))??,
        );
    }
    Ok(parts)
}

fn merge(report: &mut Report, options: &VerifyOptions, part: Report) {
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
        push(report, options, problem);
    }
}

/// Reports the rows no scan read (some, up to the problem limit).
async fn report_unscanned(
    conn: &mut sqlx::PgConnection,
    report: &mut Report,
    options: &VerifyOptions,
    scans: &[(String, Scan)],
) -> Result<(), StoreError> {
    let (mut topics, mut partitions, mut chain_ids) = (Vec::new(), Vec::new(), Vec::new());
    for (chain_id, scan) in scans {
        match scan {
            Scan::Kafka { topic, partition } => {
                topics.push(topic.clone());
                partitions.push(*partition);
            }
            Scan::Chain => chain_ids.push(chain_id.clone()),
            Scan::Unchained => {}
        }
    }
    // seq, event_id, chain_id, kafka_topic, kafka_partition
    type Unscanned = (i64, Uuid, Option<String>, Option<String>, Option<i32>);
    let rows: Vec<Unscanned> = sqlx::query_as(
        "SELECT seq, event_id, chain_id, kafka_topic, kafka_partition FROM events
         WHERE chain_id IS NOT NULL
           AND NOT (kafka_topic IS NOT NULL AND kafka_partition IS NOT NULL
                    AND (kafka_topic, kafka_partition) IN (SELECT * FROM unnest($1::text[], $2::int4[])))
           AND NOT (kafka_topic IS NULL AND chain_id = ANY($3))
         ORDER BY seq LIMIT $4",
    )
    .bind(topics)
    .bind(partitions)
    .bind(chain_ids)
    .bind(options.max_problems.max(1) as i64)
    .fetch_all(&mut *conn)
    .await?;
    for (seq, event_id, chain_id, topic, partition) in rows {
        let at = match (topic, partition) {
            (Some(t), Some(p)) => format!("Kafka position {t}/{p}"),
            (t, p) => format!(
                "Kafka topic {} and partition {}",
                t.unwrap_or_else(|| "NULL".into()),
                p.map_or_else(|| "NULL".into(), |p| p.to_string())
            ),
        };
        push(
            report,
            options,
            Problem {
                chain_id: chain_id.unwrap_or_default(),
                position: None,
                seq: Some(seq),
                event_id: Some(event_id),
                what: format!("no chain's scan read the row: no chain holds its {at} (its chain link or Kafka position was changed)"),
            },
        );
    }
    Ok(())
}

/// Buffers a worker reuses from row to row.
#[derive(Default)]
struct Scratch {
    canonicalizer: Canonicalizer,
    record: Vec<u8>,
    blind_index: Vec<String>,
    pending: Vec<u8>,
}

/// Verifies one chain (or reports the unchained rows): one scan in chain
/// order, streamed as binary COPY.
async fn scan_chain(
    conn: &mut sqlx::PgConnection,
    mut job: Job,
    part: &mut Report,
    scratch: &mut Scratch,
    max_problems: usize,
) -> Result<(), StoreError> {
    let limit = &Limits { max_problems };
    if let Some(sql) = job.copy_statement() {
        let mut stream = conn.copy_out_raw(&sql).await?;
        let mut decoder = CopyDecoder::default();
        let mut pending = std::mem::take(&mut scratch.pending);
        pending.clear();
        while let Some(chunk) = stream.try_next().await? {
            decoder.feed(&chunk, &mut pending, |fields| {
                process_row(fields, &mut job, part, scratch, limit)
            })?;
        }
        scratch.pending = pending;
        decoder.finish()?;
    }
    if job.scan == Scan::Unchained {
        return Ok(());
    }
    let state = job.state;
    let summary = part.chains.entry(job.chain_id.clone()).or_default();
    summary.length = state.next_position;
    summary.head = (state.next_position > 0).then_some(state.prev);
    summary.broken = state.broken;
    summary.checkpoints = state.checkpoints;
    if state.broken {
        return Ok(());
    }
    if let Some((size, list)) = state.pending.iter().next_back() {
        let origin = list.first().map(|(_, o)| *o).unwrap_or("a");
        push(
            part,
            limit,
            Problem {
                chain_id: job.chain_id,
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
    Ok(())
}

/// The columns a chain record is rebuilt from, cast to the types the binary
/// decoding below expects (no-ops on the real schema).
const COLUMNS_BEFORE_KAFKA: &str = "e.seq::int8, e.chain_id::text, e.chain_position::int8,
    e.hash::bytea, e.event_id::uuid, e.event_type::text, e.stream_id::text, e.stream_version::int8,
    e.occurred_at::timestamptz, e.ingested_at::timestamptz, e.source::text,
    e.correlation_id::uuid, e.causation_id::uuid, e.subject_id::text";
/// Columns 14 and 15 are `kafka_topic` and `kafka_partition`.
const COLUMNS_AFTER_KAFKA: &str = "e.kafka_offset::int8, e.headers::jsonb, e.metadata::jsonb,
    e.payload::jsonb, e.blind_index::text[], e.content_hash::bytea";
const COLUMNS: usize = 22;

/// One row of binary COPY: each column's bytes, `None` for NULL.
type Fields<'a> = [Option<&'a [u8]>; COLUMNS];

/// Splits a binary COPY stream (PostgreSQL's "COPY file format") into
/// rows, whatever the chunk boundaries.
#[derive(Default)]
struct CopyDecoder {
    header_seen: bool,
    trailer_seen: bool,
}

const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

impl CopyDecoder {
    /// Hands every complete row in `pending` + `chunk` to `row`; keeps the
    /// rest in `pending`. Rows are decoded from the chunk itself unless one
    /// spans chunks.
    fn feed(
        &mut self,
        chunk: &[u8],
        pending: &mut Vec<u8>,
        mut row: impl FnMut(&Fields<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if pending.is_empty() {
            let used = self.rows(chunk, &mut row)?;
            pending.extend_from_slice(&chunk[used..]);
        } else {
            pending.extend_from_slice(chunk);
            let used = self.rows(pending, &mut row)?;
            pending.drain(..used);
        }
        Ok(())
    }

    /// Decodes the complete rows at the start of `buf`; returns the bytes used.
    fn rows(
        &mut self,
        buf: &[u8],
        row: &mut impl FnMut(&Fields<'_>) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let mut pos = 0;
        if !self.header_seen {
            // Signature, flags, header extension length, extension.
            let Some(extension) = be_i32(buf, 15) else {
                return Ok(0);
            };
            if &buf[..11] != COPY_SIGNATURE || extension < 0 {
                return Err(copy_error("bad header"));
            }
            let end = 19 + extension as usize;
            if buf.len() < end {
                return Ok(0);
            }
            self.header_seen = true;
            pos = end;
        }
        let mut fields: Fields<'_> = [None; COLUMNS];
        while pos < buf.len() {
            if self.trailer_seen {
                return Err(copy_error("data after the trailer"));
            }
            let Some(count) = buf.get(pos..pos + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.trailer_seen = true;
                pos += 2;
                continue;
            }
            if count as usize != COLUMNS {
                return Err(copy_error("unexpected column count"));
            }
            let mut at = pos + 2;
            let mut complete = true;
            for field in fields.iter_mut() {
                let Some(len) = be_i32(buf, at) else {
                    complete = false;
                    break;
                };
                at += 4;
                if len < 0 {
                    *field = None;
                    continue;
                }
                let Some(bytes) = buf.get(at..at + len as usize) else {
                    complete = false;
                    break;
                };
                *field = Some(bytes);
                at += len as usize;
            }
            if !complete {
                break;
            }
            row(&fields)?;
            pos = at;
        }
        Ok(pos)
    }

    fn finish(&self) -> Result<(), StoreError> {
        if self.trailer_seen {
            Ok(())
        } else {
            Err(copy_error("the stream ended before its trailer"))
        }
    }
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    let bytes = buf.get(at..at + 4)?;
    Some(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn copy_error(what: &str) -> StoreError {
    StoreError::Fatal(format!("verification scan: binary COPY data: {what}"))
}

/// `topic/partition` of a Kafka chain id, in the one spelling the node
/// writes (so two ids never name the same rows).
fn kafka_coordinates(chain_id: &str) -> Option<(&str, i32)> {
    let (topic, partition) = chain_id.rsplit_once('/')?;
    let number: i32 = partition.parse().ok()?;
    (!topic.is_empty() && number >= 0 && number.to_string() == partition).then_some((topic, number))
}

/// Checks one row against its chain's state.
fn process_row(
    fields: &Fields<'_>,
    job: &mut Job,
    report: &mut Report,
    scratch: &mut Scratch,
    limit: &dyn ProblemLimit,
) -> Result<(), StoreError> {
    let fatal = |e: String| StoreError::Fatal(format!("verification scan: {e}"));
    let seq = decode::int8(fields[0], "seq").map_err(fatal)?;
    let event_id = decode::uuid(fields[4], "event_id").map_err(fatal)?;
    let chain_id = decode::opt_text(fields[1], "chain_id").map_err(fatal)?;
    if job.scan == Scan::Unchained {
        report.events += 1;
        push(report, limit, Problem {
            chain_id: "(none)".into(),
            position: None,
            seq: Some(seq),
            event_id: Some(event_id),
            what: "the event is in no chain (stored before chains existed, or its link was removed)".into(),
        });
        return Ok(());
    }
    // Counted, and reported, by the scan of unchained rows.
    let Some(chain_id) = chain_id else {
        return Ok(());
    };
    report.events += 1;
    let state = &mut job.state;
    if chain_id != job.chain_id {
        push(report, limit, Problem {
            chain_id: job.chain_id.clone(),
            position: None,
            seq: Some(seq),
            event_id: Some(event_id),
            what: format!("a row at this chain's Kafka position claims chain {chain_id}: its link was changed"),
        });
        state.broken = true;
        return Ok(());
    }
    if state.broken {
        return Ok(());
    }
    let position = decode::opt_int8(fields[2], "chain_position").map_err(fatal)?;
    let stored_hash = fields[3];
    let problem = |what: String, position: Option<u64>| Problem {
        chain_id: chain_id.to_owned(),
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
                limit,
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
        push(report, limit, problem(what, Some(expected)));
        return Ok(());
    }
    scratch.record.clear();
    let kafka = match &job.scan {
        Scan::Kafka { topic, partition } => Some((topic.as_str(), *partition)),
        _ => None,
    };
    if let Err(what) = encode_row(fields, kafka, chain_id, position, scratch) {
        state.broken = true;
        push(report, limit, problem(what, Some(position)));
        return Ok(());
    }
    let recomputed = chain_hash(&state.prev, &scratch.record);
    if stored_hash != Some(&recomputed[..]) {
        state.broken = true;
        push(
            report,
            limit,
            problem(
                "the stored hash differs from the one recomputed from the row and its predecessor: the row (or one before it) was changed".into(),
                Some(position),
            ),
        );
        return Ok(());
    }
    if let Some(last) = state.last_seq.filter(|last| seq <= *last) {
        state.broken = true;
        push(
            report,
            limit,
            problem(
                format!("seq {seq} is not after seq {last} of the previous position: the rows' store order was changed (seq values swapped)"),
                Some(position),
            ),
        );
        return Ok(());
    }
    state.last_seq = Some(seq);
    state.prev = recomputed;
    state.frontier.push(leaf_hash(&recomputed));
    state.next_position += 1;
    let size = state.next_position;
    if let Some(checkpoints) = state.pending.remove(&size) {
        let root = state.frontier.root();
        for (checkpoint, origin) in checkpoints {
            if checkpoint.root_hash == root {
                report.checkpoints_verified += 1;
                state.checkpoints += 1;
            } else {
                state.broken = true;
                push(
                    report,
                    limit,
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

/// Writes the row's chain record (encoding v1) to `scratch.record`; the
/// Kafka topic and partition are `kafka` when the scan selected them.
fn encode_row(
    fields: &Fields<'_>,
    kafka: Option<(&str, i32)>,
    chain_id: &str,
    position: u64,
    scratch: &mut Scratch,
) -> Result<(), String> {
    let content_hash: &[u8; 32] = fields[21]
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| "content_hash is not 32 bytes".to_string())?;
    let read = |e: String| format!("the row cannot be read: {e}");
    let blind_index =
        decode::text_array(fields[20], "blind_index", &mut scratch.blind_index).map_err(read)?;
    let record = ChainRecord {
        chain_id,
        position,
        event_id: decode::uuid(fields[4], "event_id").map_err(read)?,
        event_type: decode::text(fields[5], "event_type").map_err(read)?,
        stream_id: decode::text(fields[6], "stream_id").map_err(read)?,
        stream_version: decode::opt_int8(fields[7], "stream_version").map_err(read)?,
        occurred_at: decode::timestamp(fields[8], "occurred_at").map_err(read)?,
        ingested_at: decode::timestamp(fields[9], "ingested_at").map_err(read)?,
        source: decode::opt_text(fields[10], "source").map_err(read)?,
        correlation_id: decode::opt_uuid(fields[11], "correlation_id").map_err(read)?,
        causation_id: decode::opt_uuid(fields[12], "causation_id").map_err(read)?,
        subject_id: decode::opt_text(fields[13], "subject_id").map_err(read)?,
        kafka_topic: match kafka {
            Some((topic, _)) => Some(topic),
            None => decode::opt_text(fields[14], "kafka_topic").map_err(read)?,
        },
        kafka_partition: match kafka {
            Some((_, partition)) => Some(partition),
            None => decode::opt_int4(fields[15], "kafka_partition").map_err(read)?,
        },
        kafka_offset: decode::opt_int8(fields[16], "kafka_offset").map_err(read)?,
        headers: decode::jsonb(fields[17], "headers").map_err(read)?,
        metadata: fields[18]
            .map(|m| decode::jsonb(Some(m), "metadata"))
            .transpose()
            .map_err(read)?,
        payload: decode::jsonb(fields[19], "payload").map_err(read)?,
        blind_index,
        content_hash,
    };
    record
        .encode_canonicalizing(&mut scratch.canonicalizer, &mut scratch.record)
        .map_err(|(field, e)| format!("the stored {} has no canonical form: {e}", field.name()))
}

/// PostgreSQL's binary forms of the column types verify reads.
mod decode {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    /// 2000-01-01T00:00:00Z, PostgreSQL's epoch, in Unix microseconds.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    /// The OID of `text`.
    const TEXT_OID: u32 = 25;

    fn value<'a>(v: Option<&'a [u8]>, column: &str) -> Result<&'a [u8], String> {
        v.ok_or_else(|| format!("column {column} is NULL"))
    }

    fn fixed<const N: usize>(v: &[u8], column: &str) -> Result<[u8; N], String> {
        v.try_into()
            .map_err(|_| format!("column {column} has {} bytes, not {N}", v.len()))
    }

    pub(super) fn int8(v: Option<&[u8]>, column: &str) -> Result<i64, String> {
        Ok(i64::from_be_bytes(fixed(value(v, column)?, column)?))
    }

    pub(super) fn opt_int8(v: Option<&[u8]>, column: &str) -> Result<Option<i64>, String> {
        v.map(|v| int8(Some(v), column)).transpose()
    }

    pub(super) fn opt_int4(v: Option<&[u8]>, column: &str) -> Result<Option<i32>, String> {
        v.map(|v| fixed(v, column).map(i32::from_be_bytes))
            .transpose()
    }

    pub(super) fn uuid(v: Option<&[u8]>, column: &str) -> Result<Uuid, String> {
        Ok(Uuid::from_bytes(fixed(value(v, column)?, column)?))
    }

    pub(super) fn opt_uuid(v: Option<&[u8]>, column: &str) -> Result<Option<Uuid>, String> {
        v.map(|v| uuid(Some(v), column)).transpose()
    }

    pub(super) fn text<'a>(v: Option<&'a [u8]>, column: &str) -> Result<&'a str, String> {
        std::str::from_utf8(value(v, column)?)
            .map_err(|e| format!("column {column} is not UTF-8: {e}"))
    }

    pub(super) fn opt_text<'a>(
        v: Option<&'a [u8]>,
        column: &str,
    ) -> Result<Option<&'a str>, String> {
        v.map(|v| text(Some(v), column)).transpose()
    }

    /// Microseconds since 2000-01-01; the infinities are out of range.
    pub(super) fn timestamp(v: Option<&[u8]>, column: &str) -> Result<DateTime<Utc>, String> {
        let micros = int8(v, column)?;
        micros
            .checked_add(PG_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| format!("column {column} is out of range"))
    }

    /// A version byte (1), then the text.
    pub(super) fn jsonb<'a>(v: Option<&'a [u8]>, column: &str) -> Result<&'a str, String> {
        match value(v, column)? {
            [1, json @ ..] => {
                std::str::from_utf8(json).map_err(|e| format!("column {column} is not UTF-8: {e}"))
            }
            _ => Err(format!("column {column} has an unknown jsonb version")),
        }
    }

    /// A one-dimensional `text[]` starting at 1 without NULLs, into `out`
    /// (whose strings are reused).
    pub(super) fn text_array<'o>(
        v: Option<&[u8]>,
        column: &str,
        out: &'o mut Vec<String>,
    ) -> Result<&'o [String], String> {
        let bad = |what: &str| format!("column {column}: {what}");
        let v = value(v, column)?;
        let word = |at: usize| -> Result<i32, String> {
            v.get(at..at + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("truncated array"))
        };
        let dimensions = word(0)?;
        if dimensions == 0 {
            out.clear();
            return Ok(&out[..0]);
        }
        if dimensions != 1 {
            return Err(bad(&format!("an array of {dimensions} dimensions")));
        }
        if word(8)? as u32 != TEXT_OID {
            return Err(bad("not an array of text"));
        }
        let len = usize::try_from(word(12)?).map_err(|_| bad("negative array length"))?;
        if word(16)? != 1 {
            return Err(bad("an array whose lower bound is not 1"));
        }
        let mut at = 20;
        let mut n = 0;
        for _ in 0..len {
            let element = usize::try_from(word(at)?).map_err(|_| bad("a NULL element"))?;
            at += 4;
            let bytes = v
                .get(at..at + element)
                .ok_or_else(|| bad("truncated array"))?;
            at += element;
            let s = std::str::from_utf8(bytes).map_err(|e| bad(&format!("not UTF-8: {e}")))?;
            if n < out.len() {
                out[n].clear();
                out[n].push_str(s);
            } else {
                out.push(s.to_owned());
            }
            n += 1;
        }
        if at != v.len() {
            return Err(bad("trailing bytes after the array"));
        }
        Ok(&out[..n])
    }
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
