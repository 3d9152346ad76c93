//! The store host: a transactional event store over turmoil TCP, and the
//! node side of it, [`DbClient`], the simulated [`EventStore`].
//!
//! Durable state (what PostgreSQL keeps on disk) is a [`MemoryStore`] for
//! rows and offsets (the store that passes the conformance suite) plus the
//! hash chains, linked with the ledger's own [`ChainHead::link`], as
//! `PgEventStore::write_batch` does. A session's transaction lives in the
//! host's memory until `Commit`: a crash, or a lost connection, before it
//! loses the transaction, and one after it loses only the answer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use audit_ledger::canonical::canonical_text;
use audit_ledger::store::chain::{kafka_chain_id, normalized, ChainHead, StoredEvent};
use audit_ledger::store::conformance::{Counts, Inspect};
use audit_ledger::store::MemoryStore;
use audit_ledger::{
    BatchStats, EventStore, OffsetKey, ParseOptions, PreparedBatch, RawRecord, StoreError,
    WriteBatch, WriteOutcome,
};
use chrono::{DateTime, Utc};
use turmoil::net::{TcpListener, TcpStream};

use super::wire::{self, StoreRequest, StoreResponse, WireKey, WireRecord, STORE_PORT};
use super::{Bug, PanicPoint, Shared, STORE};

/// One offset move, as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetMove {
    pub key: OffsetKey,
    pub from: Option<i64>,
    pub to: i64,
    pub writer: String,
}

/// What the store keeps on disk.
pub struct DbDisk {
    pub memory: MemoryStore,
    chains: Mutex<Chains>,
    moves: Mutex<Vec<OffsetMove>>,
    /// Extra latency of every answer while set (a slow store).
    slow: Mutex<Option<Duration>>,
    bug: Option<Bug>,
    bug_fired: Mutex<u32>,
}

/// The chains table and the stored (hashed) form of every event, in commit
/// order.
#[derive(Default)]
pub struct Chains {
    pub heads: BTreeMap<String, ChainHead>,
    pub rows: Vec<StoredEvent>,
}

/// The instant `ingested_at` counts from: fixed, so hashes depend only on
/// the seed.
fn ingest_epoch() -> DateTime<Utc> {
    DateTime::from_timestamp(1_795_000_000, 0).unwrap_or_default()
}

impl DbDisk {
    pub fn new(bug: Option<Bug>) -> Arc<Self> {
        Arc::new(Self {
            memory: MemoryStore::new(),
            chains: Mutex::default(),
            moves: Mutex::default(),
            slow: Mutex::default(),
            bug,
            bug_fired: Mutex::new(0),
        })
    }

    pub fn chains(&self) -> MutexGuard<'_, Chains> {
        self.chains.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn moves(&self) -> Vec<OffsetMove> {
        self.moves.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_slow(&self, delay: Option<Duration>) {
        *self.slow.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    fn slow(&self) -> Option<Duration> {
        *self.slow.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bug_fired(&self) -> u32 {
        *self.bug_fired.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fire(&self) {
        *self.bug_fired.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// The one commit path: rows and offset through the memory store (fenced
    /// by the expected offset), then the new events linked into their chain.
    /// Nothing awaits in between, so a commit is atomic on the store host.
    fn commit(
        &self,
        key: &OffsetKey,
        expected: Option<i64>,
        batch: &PreparedBatch,
        writer: &str,
        shared: &Shared,
    ) -> Result<WriteOutcome, StoreError> {
        let stored = self.memory.inspect(|s| s.offsets.get(key).copied());
        let mut expected = expected;
        if self.bug == Some(Bug::NoFencing) && stored != expected {
            // Planted: last writer wins.
            self.fire();
            expected = stored;
        }
        if self.bug == Some(Bug::OffsetBeforeRows) {
            // Planted: the offset already moved when the rows arrived.
            expected = stored;
        }
        let mut reversed;
        let mut batch = batch;
        if self.bug == Some(Bug::ReverseOneBatch) && self.bug_fired() == 0 && batch.len() >= 2 {
            // Planted: a batch stored back to front.
            reversed = batch.clone();
            reversed.records.reverse();
            reversed.items.reverse();
            batch = &reversed;
            self.fire();
        }
        let before = self.memory.inspect(|s| s.events.len());
        let outcome = now_or_never(self.memory.write_batch(WriteBatch {
            key,
            expected,
            batch,
            writer,
        }))
        .ok_or_else(|| StoreError::Unavailable("the memory store had to wait".into()))??;
        if let WriteOutcome::Committed(stats) = &outcome {
            let new = self.memory.inspect(|s| s.events[before..].to_vec());
            self.link(&new, shared);
            let to = batch.next_offset;
            // With the planted bug the offset moved earlier, recorded there.
            if self.bug != Some(Bug::OffsetBeforeRows) {
                self.record_move(key, stored, to, writer);
            }
            shared.trace(
                STORE,
                format!(
                    "commit {}/{} {stored:?}->{to} by {writer}: {} events {} dead {} dup",
                    key.topic, key.partition, stats.events, stats.dead_letters, stats.duplicates
                ),
            );
        }
        Ok(outcome)
    }

    fn record_move(&self, key: &OffsetKey, from: Option<i64>, to: i64, writer: &str) {
        self.moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(OffsetMove {
                key: key.clone(),
                from,
                to,
                writer: writer.to_string(),
            });
    }

    fn link(&self, events: &[audit_ledger::Event], shared: &Shared) {
        let ingested_at = normalized(
            ingest_epoch()
                + chrono::Duration::from_std(shared.now())
                    .unwrap_or_else(|_| chrono::Duration::zero()),
        );
        let mut chains = self.chains();
        let mut scratch = Vec::new();
        for event in events {
            let payload = match canonical_text(event.payload.get()) {
                Ok(text) => text,
                // The envelope parser accepted it as JSON; keep it as sent.
                Err(_) => event.payload.get().to_string(),
            };
            let Ok(mut row) = StoredEvent::from_event(event, payload, ingested_at) else {
                continue; // the chain check reports the event as unchained
            };
            let chain_id = kafka_chain_id(&event.kafka_topic, event.kafka_partition);
            let head = chains
                .heads
                .entry(chain_id.clone())
                .or_insert_with(|| ChainHead::genesis(&chain_id));
            if self.bug == Some(Bug::SkipChainLink) && head.length == 3 {
                // Planted: the event is hashed as if its chain were empty.
                let mut wrong = ChainHead::genesis(&chain_id);
                wrong.length = head.length;
                wrong.link(&mut row, &mut scratch);
                head.length += 1;
                head.head_hash = row.hash;
                head.frontier
                    .push(audit_ledger::merkle::leaf_hash(&row.hash));
                self.fire();
            } else {
                head.link(&mut row, &mut scratch);
            }
            chains.rows.push(row);
        }
    }
}

/// Polls a future once: the memory store's never waits, and a commit must
/// have no await point.
fn now_or_never<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(value) => Some(value),
        std::task::Poll::Pending => None,
    }
}

/// The store host's software; run again from scratch after a crash.
pub async fn serve(disk: Arc<DbDisk>, shared: Arc<Shared>) -> turmoil::Result {
    shared.trace(STORE, "boot".into());
    let listener = TcpListener::bind(("0.0.0.0", STORE_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(session(stream, disk.clone(), shared.clone()));
    }
}

/// An open transaction: in the store host's memory only.
struct Tx {
    key: OffsetKey,
    expected: Option<i64>,
    writer: String,
    rows: Option<Vec<RawRecord>>,
}

async fn session(mut stream: TcpStream, disk: Arc<DbDisk>, shared: Arc<Shared>) {
    let mut tx: Option<Tx> = None;
    while let Ok(Some(request)) = wire::recv::<StoreRequest>(&mut stream).await {
        if let Some(delay) = disk.slow() {
            tokio::time::sleep(delay).await;
        }
        let response = match request {
            StoreRequest::StoredOffset(key) => {
                let key = OffsetKey::from(key);
                StoreResponse::Offset(disk.memory.inspect(|s| s.offsets.get(&key).copied()))
            }
            StoreRequest::Begin {
                key,
                expected,
                writer,
            } => {
                tx = Some(Tx {
                    key: key.into(),
                    expected,
                    writer,
                    rows: None,
                });
                StoreResponse::Ok
            }
            StoreRequest::Rows(records) => match tx.as_mut() {
                Some(tx) => {
                    let records: Vec<RawRecord> =
                        records.into_iter().map(RawRecord::from).collect();
                    if disk.bug == Some(Bug::OffsetBeforeRows) {
                        offset_first(&disk, tx, &records)
                    } else {
                        tx.rows = Some(records);
                        StoreResponse::Ok
                    }
                }
                None => StoreResponse::Error("no transaction".into()),
            },
            StoreRequest::Commit => match tx.take() {
                Some(Tx {
                    key,
                    expected,
                    writer,
                    rows: Some(rows),
                }) => match PreparedBatch::parse(rows, &ParseOptions::default()) {
                    Some(batch) => match disk.commit(&key, expected, &batch, &writer, &shared) {
                        Ok(WriteOutcome::Committed(s)) => StoreResponse::Committed {
                            events: s.events,
                            dead_letters: s.dead_letters,
                            duplicates: s.duplicates,
                        },
                        Ok(WriteOutcome::Fenced { stored }) => StoreResponse::Fenced(stored),
                        Err(e) => StoreResponse::Error(e.to_string()),
                    },
                    None => StoreResponse::Error("empty batch".into()),
                },
                _ => StoreResponse::Error("nothing to commit".into()),
            },
            StoreRequest::Counts => disk.memory.inspect(|s| StoreResponse::Counts {
                events: s.events.len() as u64,
                dead_letters: s.dead_letters.len() as u64,
                duplicates: s.duplicates.len() as u64,
            }),
        };
        if wire::send(&mut stream, &response).await.is_err() {
            return;
        }
    }
    // The connection is gone: an open transaction rolls back (it is dropped).
}

/// Planted bug [`Bug::OffsetBeforeRows`]: the offset moves in its own
/// transaction when the rows arrive, before they are durable.
fn offset_first(disk: &DbDisk, tx: &mut Tx, records: &[RawRecord]) -> StoreResponse {
    let stored = disk.memory.inspect(|s| s.offsets.get(&tx.key).copied());
    if stored != tx.expected {
        return StoreResponse::Fenced(stored);
    }
    let Some(next) = records.last().map(|r| r.offset + 1) else {
        return StoreResponse::Error("empty batch".into());
    };
    disk.memory
        .update(|s| s.offsets.insert(tx.key.clone(), next));
    disk.record_move(&tx.key, stored, next, &tx.writer);
    disk.fire();
    tx.expected = Some(next);
    tx.rows = Some(records.to_vec());
    StoreResponse::Ok
}

/// Longest a store call may take (a slow store answers within it).
const RPC_TIMEOUT: Duration = Duration::from_millis(1000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// The node side of the store: one session per call, as a pool that
/// discards a connection on any error would.
pub struct DbClient {
    node: &'static str,
    shared: Arc<Shared>,
}

impl DbClient {
    pub fn new(node: &'static str, shared: Arc<Shared>) -> Self {
        Self { node, shared }
    }

    async fn session(&self) -> Result<TcpStream, StoreError> {
        wire::connect(STORE, STORE_PORT, CONNECT_TIMEOUT)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot reach the store: {e}")))
    }

    async fn call(
        &self,
        stream: &mut TcpStream,
        request: &StoreRequest,
    ) -> Result<StoreResponse, StoreError> {
        match wire::call(stream, request, RPC_TIMEOUT).await {
            Ok(StoreResponse::Error(e)) => Err(StoreError::Unavailable(format!("store: {e}"))),
            Ok(response) => Ok(response),
            Err(e) => Err(StoreError::Unavailable(format!("store call failed: {e}"))),
        }
    }

    async fn write(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let mut stream = self.session().await?;
        let begin = StoreRequest::Begin {
            key: WireKey::from(write.key),
            expected: write.expected,
            writer: write.writer.to_string(),
        };
        self.call(&mut stream, &begin).await?;
        let rows = write.batch.records.iter().map(WireRecord::from).collect();
        if let StoreResponse::Fenced(stored) =
            self.call(&mut stream, &StoreRequest::Rows(rows)).await?
        {
            return Ok(WriteOutcome::Fenced { stored });
        }
        let partition = write.key.partition;
        if self
            .shared
            .take_panic(self.node, partition, PanicPoint::BeforeCommit)
        {
            panic!(
                "injected panic: {} partition {partition} mid-batch (rows sent, not committed)",
                self.node
            );
        }
        match self.call(&mut stream, &StoreRequest::Commit).await? {
            StoreResponse::Committed {
                events,
                dead_letters,
                duplicates,
            } => Ok(WriteOutcome::Committed(BatchStats {
                events,
                dead_letters,
                duplicates,
            })),
            StoreResponse::Fenced(stored) => Ok(WriteOutcome::Fenced { stored }),
            other => Err(StoreError::Unavailable(format!(
                "unexpected store answer {other:?}"
            ))),
        }
    }
}

#[async_trait]
impl EventStore for DbClient {
    async fn stored_offset(&self, key: &OffsetKey) -> Result<Option<i64>, StoreError> {
        let mut stream = self.session().await?;
        match self
            .call(&mut stream, &StoreRequest::StoredOffset(key.into()))
            .await?
        {
            StoreResponse::Offset(offset) => Ok(offset),
            other => Err(StoreError::Unavailable(format!(
                "unexpected store answer {other:?}"
            ))),
        }
    }

    async fn write_batch(&self, write: WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        // Counted from here to the answer: the batch is in this node's memory.
        let _inflight = self.shared.write_started(self.node, write.batch.len());
        let (topic, partition) = (&write.key.topic, write.key.partition);
        let result = self.write(write).await;
        match &result {
            Ok(WriteOutcome::Fenced { stored }) => self.shared.count(
                self.node,
                "fenced",
                format!("{topic}/{partition} at {stored:?}"),
            ),
            Err(e) => self.shared.count(
                self.node,
                "write failed",
                format!("{topic}/{partition}: {e}"),
            ),
            Ok(WriteOutcome::Committed(_)) => {}
        }
        result
    }
}

#[async_trait]
impl Inspect for DbClient {
    async fn counts(&self) -> Result<Counts, StoreError> {
        let mut stream = self.session().await?;
        match self.call(&mut stream, &StoreRequest::Counts).await? {
            StoreResponse::Counts {
                events,
                dead_letters,
                duplicates,
            } => Ok(Counts {
                events,
                dead_letters,
                duplicates,
            }),
            other => Err(StoreError::Unavailable(format!(
                "unexpected store answer {other:?}"
            ))),
        }
    }
}
