//! The partition actor: reads one Kafka partition, batches by size and time,
//! validates, and writes each batch with its offset in one transaction.
//!
//! Position: the actor trusts only the store's offset. Records below it are
//! skipped (already stored); a gap above it means records were missed (for
//! instance after a restart dropped the in-memory batch), so it seeks back.
//! Backpressure: a node-wide semaphore bounds batches in flight, and while
//! the store fails the partition is paused at the broker, so nothing piles up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_ledger::{EventStore, OffsetKey, PreparedBatch, StoreError, WriteBatch, WriteOutcome};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PipelineConfig;
use crate::restart::{backoff, RestartPolicy};
use crate::source::{RecordSource, SourceError};
use crate::telemetry;

pub struct PartitionActor;

#[derive(Debug)]
pub enum PartitionMsg {
    /// Do the next step: fetch a batch, or retry the pending write.
    Step,
}

pub struct PartitionArgs {
    pub key: OffsetKey,
    pub source: Arc<dyn RecordSource>,
    pub store: Arc<dyn EventStore>,
    pub config: Arc<PipelineConfig>,
    pub permits: Arc<Semaphore>,
    pub generation: u64,
}

pub struct PartitionState {
    key: OffsetKey,
    source: Arc<dyn RecordSource>,
    store: Arc<dyn EventStore>,
    config: Arc<PipelineConfig>,
    permits: Arc<Semaphore>,
    /// The store's offset as this actor last saw it (`None`: nothing stored).
    expected: Option<i64>,
    /// A gap was seen at this offset and a seek was already tried: the gap
    /// is real in the log (compaction, transaction markers), accept it.
    gap_tolerated_at: Option<i64>,
    pending: Option<Pending>,
    write_failures: u32,
    paused: bool,
}

struct Pending {
    batch: PreparedBatch,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("source: {0}")]
    Source(#[from] SourceError),
    #[error("batch parsing task failed: {0}")]
    Parse(String),
}

impl Actor for PartitionActor {
    type Msg = PartitionMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: PartitionArgs) -> Result<PartitionState, ActorProcessingErr> {
        let stored = read_stored_offset(&*args.store, &args.key, &args.config.restart).await?;
        // Start exactly where the store says, whatever the broker's committed
        // offset is (it is informational and may lag or be lost).
        args.source.seek(stored).await.map_err(PartitionError::from)?;
        telemetry::partition_started(&args.key.topic, args.key.partition, stored, args.generation);
        myself.send_message(PartitionMsg::Step)?;
        Ok(PartitionState {
            key: args.key,
            source: args.source,
            store: args.store,
            config: args.config,
            permits: args.permits,
            expected: stored,
            gap_tolerated_at: None,
            pending: None,
            write_failures: 0,
            paused: false,
        })
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: PartitionMsg, state: &mut PartitionState) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionMsg::Step => {
                let retry_in = state.step().await?;
                match retry_in {
                    None => myself.send_message(PartitionMsg::Step)?,
                    Some(delay) => {
                        myself.send_after(delay, || PartitionMsg::Step);
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut PartitionState) -> Result<(), ActorProcessingErr> {
        if state.paused {
            let _ = state.source.resume();
        }
        telemetry::partition_stopped(&state.key.topic, state.key.partition);
        Ok(())
    }
}

/// Reads the stored offset, retrying while the store is unavailable: a
/// partition cannot start anywhere else.
async fn read_stored_offset(store: &dyn EventStore, key: &OffsetKey, policy: &RestartPolicy) -> Result<Option<i64>, PartitionError> {
    let mut attempt = 0;
    loop {
        match store.stored_offset(key).await {
            Ok(offset) => return Ok(offset),
            Err(e) if e.is_retryable() && attempt < 10 => {
                let delay = backoff(policy, attempt);
                telemetry::store_write_failed(&key.topic, key.partition, attempt, delay, &e);
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl PartitionState {
    /// One step of the pipeline. Returns a delay when the next step should
    /// wait (a failed write), `None` to go on at once.
    async fn step(&mut self) -> Result<Option<Duration>, PartitionError> {
        if self.pending.is_none() {
            let Some(pending) = self.fetch().await? else {
                return Ok(None);
            };
            self.pending = Some(pending);
        }
        self.write().await
    }

    async fn fetch(&mut self) -> Result<Option<Pending>, PartitionError> {
        let config = self.config.clone();
        // No permit in time: give the mailbox a turn (stop requests) and retry.
        let permit = match tokio::time::timeout(config.poll_wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Ok(None),
        };
        let records = match self
            .source
            .next_batch(config.batch_max_records, config.poll_wait, config.batch_linger)
            .await
        {
            Ok(records) => records,
            Err(SourceError::Transient(e)) => {
                telemetry::source_error(&self.key.topic, self.key.partition, &e);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let Some(records) = self.position(records).await? else {
            return Ok(None);
        };
        let parse = config.parse.clone();
        let batch = tokio::task::spawn_blocking(move || PreparedBatch::parse(records, &parse))
            .await
            .map_err(|e| PartitionError::Parse(e.to_string()))?;
        Ok(batch.map(|batch| Pending { batch, _permit: permit }))
    }

    /// Keeps only records at or after the stored offset, and seeks back when
    /// records were skipped over. `None`: nothing to write this time.
    async fn position(&mut self, mut records: Vec<audit_ledger::RawRecord>) -> Result<Option<Vec<audit_ledger::RawRecord>>, PartitionError> {
        if let Some(expected) = self.expected {
            let before = records.len();
            records.retain(|r| r.offset >= expected);
            if records.len() < before {
                telemetry::records_skipped(&self.key.topic, self.key.partition, before - records.len(), expected);
            }
            if let Some(first) = records.first() {
                if first.offset > expected && self.gap_tolerated_at != Some(expected) {
                    telemetry::partition_seek(&self.key.topic, self.key.partition, Some(expected), "gap before first record");
                    self.gap_tolerated_at = Some(expected);
                    self.source.seek(Some(expected)).await?;
                    return Ok(None);
                }
            }
        }
        Ok((!records.is_empty()).then_some(records))
    }

    async fn write(&mut self) -> Result<Option<Duration>, PartitionError> {
        let Some(pending) = &self.pending else {
            return Ok(None);
        };
        let started = Instant::now();
        let result = self
            .store
            .write_batch(WriteBatch {
                key: &self.key,
                expected: self.expected,
                batch: &pending.batch,
                writer: &self.config.node_id,
            })
            .await;
        match result {
            Ok(WriteOutcome::Committed(stats)) => {
                let next = pending.batch.next_offset;
                telemetry::batch_committed(&self.key.topic, self.key.partition, next, stats, started.elapsed());
                self.expected = Some(next);
                self.pending = None;
                self.write_failures = 0;
                self.source.commit(next);
                if self.paused {
                    self.source.resume()?;
                    self.paused = false;
                }
                Ok(None)
            }
            Ok(WriteOutcome::Fenced { stored }) => {
                telemetry::partition_fenced(&self.key.topic, self.key.partition, self.expected, stored);
                self.pending = None;
                self.expected = stored;
                self.source.seek(stored).await?;
                Ok(None)
            }
            Err(error) if error.is_retryable() => {
                self.write_failures += 1;
                let delay = retry_delay(&self.config, self.write_failures);
                telemetry::store_write_failed(&self.key.topic, self.key.partition, self.write_failures, delay, &error);
                if !self.paused {
                    self.source.pause()?;
                    self.paused = true;
                }
                // A write conflict resolves at once: the retry reclassifies.
                Ok(Some(if matches!(error, StoreError::Conflict(_)) { Duration::ZERO } else { delay }))
            }
            Err(error) => Err(error.into()),
        }
    }
}

fn retry_delay(config: &PipelineConfig, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
    config.write_retry_base.saturating_mul(factor).min(config.write_retry_max)
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
