//! Group commit: batches of several partitions that are ready at the same
//! time share one transaction, one COPY per table and one commit.
//!
//! A partition's batches stay in order and its offset still moves in the
//! transaction that stores them: a group commits all its batches or none.
//! What a group cannot decide on its own (an id already taken, a row the
//! database refuses) is handed back to the batch's writer, which takes the
//! single-batch path. Fewer, larger statements are what the COPY ceiling
//! does: per-statement and per-commit work in PostgreSQL was the part of the
//! gap to it that grew with the number of partitions (PERFORMANCE.md).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::chain::{encode_event_id_row_binary, kafka_chain_id, ChainHead, StoredEvent};
use super::postgres::{
    chain_head, copy_claim_rows, copy_row_groups, dead_letter_for, insert_rejects, CopyClaim,
    PgEventStore, STORED_ROWS,
};
use super::protection::{self, Prepared};
use super::{BatchStats, OffsetKey, WriteBatch, WriteOutcome};
use crate::batch::{Classified, Duplicate};
use crate::canonical::GENESIS;
use crate::envelope::DeadLetter;
use crate::error::StoreError;

/// A group stops growing at this many rows (bounds a transaction's size
/// and the wait of the batches behind it).
const MAX_GROUP_ROWS: usize = 20_000;
/// Batches waiting for a committer; their writers wait with them.
const QUEUE: usize = 64;

/// One partition's batch, protected and ready to store.
pub(crate) struct Job {
    key: OffsetKey,
    expected: Option<i64>,
    next_offset: i64,
    writer: String,
    /// Stored forms, in partition order, not yet linked into the chain.
    rows: Vec<StoredEvent>,
    /// The rows' `event_ids` claims, COPY-encoded.
    claims: Vec<u8>,
    dead_letters: Vec<DeadLetter>,
    duplicates: Vec<Duplicate>,
    keys_used: HashMap<Uuid, String>,
    reply: Option<oneshot::Sender<Reply>>,
}

pub(crate) enum Reply {
    /// Written (or fenced, or failed) with its group.
    Done(Result<WriteOutcome, StoreError>),
    /// Not written: take the single-batch path.
    Alone,
}

impl Job {
    pub(crate) fn new(
        write: &WriteBatch<'_>,
        first: Classified<'_>,
        mut prepared: Prepared,
    ) -> Self {
        let Classified {
            events,
            mut dead_letters,
            duplicates,
        } = first;
        let mut rows = STORED_ROWS.take(events.len());
        let mut claims = Vec::with_capacity(events.len() * 112);
        for event in &events {
            match prepared.take(event.kafka_offset) {
                Ok(row) => {
                    encode_event_id_row_binary(&mut claims, event);
                    rows.push(row);
                }
                Err(reason) => dead_letters.push(dead_letter_for(write.batch, event, reason)),
            }
        }
        Self {
            key: write.key.clone(),
            expected: write.expected,
            next_offset: write.batch.next_offset,
            writer: write.writer.to_owned(),
            rows,
            claims,
            dead_letters,
            duplicates,
            keys_used: prepared.take_keys_used(),
            reply: None,
        }
    }

    fn answer(&mut self, reply: Reply) {
        if let Some(tx) = self.reply.take() {
            if let Reply::Alone = reply {
                metrics::counter!("audit_group_commit_handbacks_total").increment(1);
            }
            // The writer may have gone (its actor stopped): nothing to tell.
            let _ = tx.send(reply);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        STORED_ROWS.give(std::mem::take(&mut self.rows));
        // A job dropped unanswered (a bug, a panic) is not lost: its
        // writer writes it alone.
        self.answer(Reply::Alone);
    }
}

/// The committers of one store: a bounded queue and the tasks that drain it.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts `committers` tasks (each holds one connection while it
    /// commits). `store` must have no group of its own: the tasks end when
    /// every other handle to the queue is gone.
    pub(crate) fn start(store: PgEventStore, committers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..committers.max(1) {
            tokio::spawn(run(store.clone(), jobs.clone()));
        }
        Self { queue }
    }

    /// Queues a batch and waits for its group's outcome.
    pub(crate) async fn submit(&self, mut job: Job) -> Reply {
        let (tx, rx) = oneshot::channel();
        job.reply = Some(tx);
        if let Err(mpsc::error::SendError(mut job)) = self.queue.send(job).await {
            job.reply = None;
            return Reply::Alone;
        }
        rx.await.unwrap_or(Reply::Alone)
    }
}

async fn run(store: PgEventStore, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let group = {
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut rows = first.rows.len();
            let mut group = vec![first];
            // Whatever else is ready joins; nothing waits for more.
            while rows < MAX_GROUP_ROWS {
                match jobs.try_recv() {
                    Ok(job) => {
                        rows += job.rows.len();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        commit(&store, group).await;
    }
}

/// Writes a group in one transaction and answers every job.
async fn commit(store: &PgEventStore, mut jobs: Vec<Job>) {
    // One lock order for every group: no two groups wait on each other.
    jobs.sort_by(|a, b| a.key.cmp(&b.key));
    match try_commit(store, &mut jobs).await {
        Ok(heads) => {
            if let Some(checkpoints) = store.checkpointer() {
                for head in &heads {
                    checkpoints.observe(store.pool(), head).await;
                }
            }
        }
        Err(error) => {
            let alone = matches!(error, StoreError::Data(_));
            for job in &mut jobs {
                // A row the database refuses: the single-batch path finds
                // it and makes it a dead letter. Anything else: the writers
                // retry as they would after their own transaction failed.
                job.answer(if alone {
                    Reply::Alone
                } else {
                    Reply::Done(Err(error.clone()))
                });
            }
        }
    }
}

/// The group's transaction. Jobs answered on the way (fenced, or handed
/// back) leave `jobs`; the rest are answered once committed.
async fn try_commit(
    store: &PgEventStore,
    jobs: &mut Vec<Job>,
) -> Result<Vec<ChainHead>, StoreError> {
    let mut tx = store.pool().begin().await?;
    fence_all(&mut tx, jobs).await?;

    // Every id new (the common case): one COPY claims them all. If one is
    // taken, find whose, one batch at a time, and hand those back.
    sqlx::query("SAVEPOINT claim").execute(&mut *tx).await?;
    let all: Vec<&[u8]> = jobs.iter().map(|j| j.claims.as_slice()).collect();
    if let CopyClaim::Refused = copy_claim_rows(&mut tx, &all).await? {
        sqlx::query("ROLLBACK TO SAVEPOINT claim")
            .execute(&mut *tx)
            .await?;
        // A failure on the way drops the jobs not yet tried: they are
        // handed back (see `Drop`), the others get the error.
        for mut job in std::mem::take(jobs) {
            sqlx::query("SAVEPOINT one_batch").execute(&mut *tx).await?;
            match copy_claim_rows(&mut tx, &[job.claims.as_slice()]).await? {
                CopyClaim::Claimed => jobs.push(job),
                CopyClaim::Refused => {
                    sqlx::query("ROLLBACK TO SAVEPOINT one_batch")
                        .execute(&mut *tx)
                        .await?;
                    job.answer(Reply::Alone);
                }
            }
        }
    }
    if jobs.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }

    let mut keys_used = HashMap::new();
    for job in jobs.iter_mut() {
        keys_used.extend(job.keys_used.drain());
    }
    protection::pin_keys(&mut tx, &keys_used, store.protection().map(|p| p.as_ref())).await?;

    let chain_ids: Vec<String> = jobs
        .iter()
        .map(|j| kafka_chain_id(&j.key.topic, j.key.partition))
        .collect();
    let mut locked = lock_chains(&mut tx, &chain_ids).await?;
    let mut heads = Vec::with_capacity(jobs.len());
    for chain_id in &chain_ids {
        heads.push(locked.remove(chain_id).ok_or_else(|| {
            StoreError::Fatal(format!("chain {chain_id} not found after it was created"))
        })?);
    }
    let mut scratch = Vec::with_capacity(4096);
    for (job, head) in jobs.iter_mut().zip(&mut heads) {
        for row in &mut job.rows {
            head.link(row, &mut scratch);
        }
    }
    let rows: Vec<&[StoredEvent]> = jobs.iter().map(|j| j.rows.as_slice()).collect();
    copy_row_groups(&mut tx, &rows).await?;
    update_chains(&mut tx, jobs, &heads).await?;
    let mut stats = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        let (dead_letters, duplicates) =
            insert_rejects(&mut tx, &job.dead_letters, &job.duplicates).await?;
        stats.push(BatchStats {
            events: job.rows.len() as u64,
            dead_letters,
            duplicates,
        });
    }
    advance_offsets(&mut tx, jobs).await?;
    tx.commit().await?;
    metrics::histogram!("audit_group_commit_batches").record(jobs.len() as f64);
    for (job, stats) in jobs.iter_mut().zip(stats) {
        job.answer(Reply::Done(Ok(WriteOutcome::Committed(stats))));
    }
    Ok(heads)
}

/// Locks the offset rows of every job, in key order (claiming the rows of
/// partitions' first batches), and answers the fenced jobs, which leave
/// `jobs`.
async fn fence_all(tx: &mut sqlx::PgConnection, jobs: &mut Vec<Job>) -> Result<(), StoreError> {
    let first: Vec<&Job> = jobs.iter().filter(|j| j.expected.is_none()).collect();
    if !first.is_empty() {
        // First batches: claim the row so a concurrent first writer blocks
        // on it instead of racing past the check.
        let (groups, topics, partitions, writers) = key_columns(first.iter().copied());
        sqlx::query(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_by)
             SELECT g, t, p, NULL, w FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) AS u(g, t, p, w)
             ON CONFLICT DO NOTHING",
        )
        .bind(groups)
        .bind(topics)
        .bind(partitions)
        .bind(writers)
        .execute(&mut *tx)
        .await?;
    }
    // Locked in the order the jobs are sorted in (bytewise, as "C" sorts).
    let (groups, topics, partitions, _) = key_columns(jobs.iter());
    let rows: Vec<(String, String, i32, Option<i64>)> = sqlx::query_as(
        r#"SELECT o.group_id, o.topic, o.partition, o.next_offset
           FROM consumer_offsets o
           JOIN unnest($1::text[], $2::text[], $3::int4[]) AS u(g, t, p)
             ON o.group_id = u.g AND o.topic = u.t AND o.partition = u.p
           ORDER BY o.group_id COLLATE "C", o.topic COLLATE "C", o.partition
           FOR UPDATE OF o"#,
    )
    .bind(groups)
    .bind(topics)
    .bind(partitions)
    .fetch_all(&mut *tx)
    .await?;
    let stored: HashMap<(&str, &str, i32), Option<i64>> = rows
        .iter()
        .map(|(g, t, p, next)| ((g.as_str(), t.as_str(), *p), *next))
        .collect();
    for mut job in std::mem::take(jobs) {
        let position = (
            job.key.group_id.as_str(),
            job.key.topic.as_str(),
            job.key.partition,
        );
        let now = stored.get(&position).copied().flatten();
        if now == job.expected {
            jobs.push(job);
        } else {
            job.answer(Reply::Done(Ok(WriteOutcome::Fenced { stored: now })));
        }
    }
    Ok(())
}

/// The jobs' offset keys and writers, as columns to bind as arrays.
fn key_columns<'a>(
    jobs: impl Iterator<Item = &'a Job>,
) -> (Vec<&'a str>, Vec<&'a str>, Vec<i32>, Vec<&'a str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for job in jobs {
        columns.0.push(job.key.group_id.as_str());
        columns.1.push(job.key.topic.as_str());
        columns.2.push(job.key.partition);
        columns.3.push(job.writer.as_str());
    }
    columns
}

/// Creates the chains that are new and locks them all, in id order.
async fn lock_chains(
    tx: &mut sqlx::PgConnection,
    chain_ids: &[String],
) -> Result<HashMap<String, ChainHead>, StoreError> {
    sqlx::query(
        "INSERT INTO chains (chain_id, length, head_hash, frontier)
         SELECT c, 0, $2, '' FROM unnest($1::text[]) AS u(c)
         ON CONFLICT DO NOTHING",
    )
    .bind(chain_ids)
    .bind(&GENESIS[..])
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        r#"SELECT chain_id, length, head_hash, frontier FROM chains
           WHERE chain_id = ANY($1) ORDER BY chain_id COLLATE "C" FOR UPDATE"#,
    )
    .bind(chain_ids)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter()
        .map(|(id, length, head, frontier)| {
            let head = chain_head(&id, length, head, frontier)?;
            Ok((id, head))
        })
        .collect()
}

/// Stores the heads of the chains that grew.
async fn update_chains(
    tx: &mut sqlx::PgConnection,
    jobs: &[Job],
    heads: &[ChainHead],
) -> Result<(), StoreError> {
    let grown: Vec<&ChainHead> = jobs
        .iter()
        .zip(heads)
        .filter(|(job, _)| !job.rows.is_empty())
        .map(|(_, head)| head)
        .collect();
    if grown.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE chains AS c SET length = u.length, head_hash = u.head, frontier = u.frontier,
                updated_at = now()
         FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::bytea[]) AS u(chain_id, length, head, frontier)
         WHERE c.chain_id = u.chain_id",
    )
    .bind(grown.iter().map(|h| h.chain_id.as_str()).collect::<Vec<_>>())
    .bind(grown.iter().map(|h| h.length as i64).collect::<Vec<_>>())
    .bind(grown.iter().map(|h| h.head_hash.to_vec()).collect::<Vec<_>>())
    .bind(grown.iter().map(|h| h.frontier.to_bytes()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Moves every job's offset past its batch.
async fn advance_offsets(tx: &mut sqlx::PgConnection, jobs: &[Job]) -> Result<(), StoreError> {
    let (groups, topics, partitions, writers) = key_columns(jobs.iter());
    sqlx::query(
        "UPDATE consumer_offsets AS o SET next_offset = u.next, updated_at = now(), updated_by = u.w
         FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::text[]) AS u(g, t, p, next, w)
         WHERE o.group_id = u.g AND o.topic = u.t AND o.partition = u.p",
    )
    .bind(groups)
    .bind(topics)
    .bind(partitions)
    .bind(jobs.iter().map(|j| j.next_offset).collect::<Vec<_>>())
    .bind(writers)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
