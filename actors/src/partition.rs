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
    /// Seeked to the stored offset since start.
    positioned: bool,
    /// A gap was seen at this offset and a seek was already tried: the gap
    /// is real in the log (compaction, transaction markers), accept it.
    gap_tolerated_at: Option<i64>,
    /// Records read before a permit was available (at most one).
    carry: Vec<audit_ledger::RawRecord>,
    pending: Option<Pending>,
    /// Consecutive store failures, for the retry backoff.
    failures: u32,
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

    /// Does no I/O: positioning happens in the first step, so a slow store
    /// or broker never blocks the consumer actor that spawns partitions.
    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionArgs,
    ) -> Result<PartitionState, ActorProcessingErr> {
        telemetry::partition_started(&args.key.topic, args.key.partition, args.generation);
        myself.send_message(PartitionMsg::Step)?;
        Ok(PartitionState {
            key: args.key,
            source: args.source,
            store: args.store,
            config: args.config,
            permits: args.permits,
            expected: None,
            positioned: false,
            gap_tolerated_at: None,
            carry: Vec::new(),
            pending: None,
            failures: 0,
            // An earlier incarnation may have died paused: resume once positioned.
            paused: true,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: PartitionMsg,
        state: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionMsg::Step => match state.step().await? {
                None => myself.send_message(PartitionMsg::Step)?,
                Some(delay) => {
                    myself.send_after(delay, || PartitionMsg::Step);
                }
            },
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        // Not called when the actor fails or is killed: the next incarnation
        // resumes the partition instead (it starts as `paused`).
        state.resume_if_paused();
        tracing::info!(topic = %state.key.topic, partition = state.key.partition, "partition actor stopped");
        Ok(())
    }
}

impl PartitionState {
    /// One step of the pipeline. Returns a delay when the next step should
    /// wait (a failed write, an unavailable store), `None` to go on at once.
    async fn step(&mut self) -> Result<Option<Duration>, PartitionError> {
        match self.step_once().await {
            // A seek or read that failed for now (the partition was revoked
            // meanwhile, the broker is away): start again from the stored
            // offset, which is always right, after a pause in which the
            // actor can take its stop.
            Err(PartitionError::Source(SourceError::Transient(e))) => {
                telemetry::source_error(&self.key.topic, self.key.partition, &e);
                self.positioned = false;
                self.pending = None;
                self.carry.clear();
                Ok(Some(self.config.write_retry_base))
            }
            other => other,
        }
    }

    async fn step_once(&mut self) -> Result<Option<Duration>, PartitionError> {
        if !self.positioned {
            return self.position_at_stored_offset().await;
        }
        if self.pending.is_none() {
            match self.fetch().await {
                Ok(Some(pending)) => self.pending = Some(pending),
                Ok(None) => return Ok(None),
                Err(PartitionError::Source(SourceError::Transient(e))) => {
                    telemetry::source_error(&self.key.topic, self.key.partition, &e);
                    return Ok(Some(self.config.write_retry_base));
                }
                Err(e) => return Err(e),
            }
        }
        self.write().await
    }

    /// Starts exactly where the store says, whatever the broker's committed
    /// offset is (it is informational and may lag or be lost).
    async fn position_at_stored_offset(&mut self) -> Result<Option<Duration>, PartitionError> {
        match self.store.stored_offset(&self.key).await {
            Ok(stored) => {
                let end = match self.source.end_offset().await {
                    Ok(end) => end,
                    Err(SourceError::Transient(e)) => {
                        telemetry::source_error(&self.key.topic, self.key.partition, &e);
                        return Ok(Some(self.config.write_retry_base));
                    }
                    Err(fatal) => return Err(fatal.into()),
                };
                if let (Some(stored), Some(end)) = (stored, end) {
                    if stored > end {
                        // Skipping would drop every record below `stored`
                        // silently: refuse, and let the operator decide.
                        return Err(PartitionError::Source(SourceError::Fatal(format!(
                            "the stored offset {stored} of {}/{} (group {}) is beyond the end of the Kafka log ({end}): \
                             the topic was deleted and recreated, or this database belongs to another cluster; \
                             nothing was skipped. Ingest the new log under another --group-id",
                            self.key.topic, self.key.partition, self.key.group_id
                        ))));
                    }
                }
                self.source.seek(stored).await?;
                self.expected = stored;
                self.positioned = true;
                self.failures = 0;
                self.resume_if_paused();
                Ok(None)
            }
            Err(error) if error.is_retryable() => {
                self.failures += 1;
                let delay = retry_delay(&self.config, self.failures);
                telemetry::store_read_failed(
                    &self.key.topic,
                    self.key.partition,
                    self.failures,
                    delay,
                    &error,
                );
                Ok(Some(delay))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn fetch(&mut self) -> Result<Option<Pending>, PartitionError> {
        let config = self.config.clone();
        // Wait for data before taking a permit, so idle partitions never hold
        // the node's in-flight budget (at most one record each is held here).
        if self.carry.is_empty() {
            self.carry = self
                .source
                .next_batch(1, config.poll_wait, Duration::ZERO)
                .await?;
            if self.carry.is_empty() {
                return Ok(None);
            }
        }
        // No permit in time: give the mailbox a turn (stop requests) and retry.
        let permit = match tokio::time::timeout(
            config.poll_wait,
            self.permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Ok(None),
        };
        let mut records = std::mem::take(&mut self.carry);
        if config.batch_max_records > records.len() {
            match self
                .source
                .next_batch(
                    config.batch_max_records - records.len(),
                    config.batch_linger,
                    config.batch_linger,
                )
                .await
            {
                // `more` is a recycled buffer (`record_buffer`): keep it
                // rather than copying it into the empty carry.
                Ok(more) if records.is_empty() => records = more,
                Ok(more) => records.extend(more),
                // Write what we have; the error shows again on the next read.
                Err(SourceError::Transient(e)) => {
                    telemetry::source_error(&self.key.topic, self.key.partition, &e)
                }
                Err(fatal) => {
                    self.carry = records;
                    return Err(fatal.into());
                }
            }
        }
        let Some(records) = self.skip_or_seek(records).await? else {
            return Ok(None);
        };
        let parse = config.parse.clone();
        let batch = if config.parse_inline {
            PreparedBatch::parse(records, &parse)
        } else {
            tokio::task::spawn_blocking(move || PreparedBatch::parse(records, &parse))
                .await
                .map_err(|e| PartitionError::Parse(e.to_string()))?
        };
        Ok(batch.map(|batch| Pending {
            batch,
            _permit: permit,
        }))
    }

    /// Keeps only records at or after the stored offset, and seeks back when
    /// records were skipped over. `None`: nothing to write this time.
    async fn skip_or_seek(
        &mut self,
        mut records: Vec<audit_ledger::RawRecord>,
    ) -> Result<Option<Vec<audit_ledger::RawRecord>>, PartitionError> {
        if let Some(expected) = self.expected {
            let before = records.len();
            records.retain(|r| r.offset >= expected);
            if records.len() < before {
                telemetry::records_skipped(
                    &self.key.topic,
                    self.key.partition,
                    before - records.len(),
                    expected,
                );
            }
            if let Some(first) = records.first() {
                if first.offset > expected {
                    if self.gap_tolerated_at != Some(expected) {
                        telemetry::partition_seek(
                            &self.key.topic,
                            self.key.partition,
                            Some(expected),
                            "gap before first record",
                        );
                        self.gap_tolerated_at = Some(expected);
                        self.source.seek(Some(expected)).await?;
                        return Ok(None);
                    }
                    // Still a gap after seeking back: those offsets are not in
                    // the log (retention, compaction or transaction markers).
                    telemetry::offsets_missing_from_log(
                        &self.key.topic,
                        self.key.partition,
                        expected,
                        first.offset,
                    );
                }
            }
        }
        // A record missing inside the batch: another reader of this
        // partition's queue took it (an old actor of this partition still
        // stopping after a revoke and a quick re-assignment), or the log has
        // a gap there. Write only the records before it and seek to it: the
        // check above then handles what comes next, like any gap.
        if let Some(i) = records
            .windows(2)
            .position(|w| w[1].offset != w[0].offset + 1)
        {
            let hole = records[i].offset + 1;
            records.truncate(i + 1);
            telemetry::partition_seek(
                &self.key.topic,
                self.key.partition,
                Some(hole),
                "gap inside a batch",
            );
            self.source.seek(Some(hole)).await?;
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
                telemetry::batch_committed(
                    &self.key.topic,
                    self.key.partition,
                    next,
                    stats,
                    started.elapsed(),
                );
                self.expected = Some(next);
                self.pending = None;
                self.failures = 0;
                self.source.commit(next);
                self.resume_if_paused();
                Ok(None)
            }
            Ok(WriteOutcome::Fenced { stored }) => {
                telemetry::partition_fenced(
                    &self.key.topic,
                    self.key.partition,
                    self.expected,
                    stored,
                );
                self.pending = None;
                self.carry.clear();
                self.expected = stored;
                self.failures = 0;
                self.source.seek(stored).await?;
                self.resume_if_paused();
                Ok(None)
            }
            Err(error) if error.is_retryable() => {
                self.failures += 1;
                let delay = retry_delay(&self.config, self.failures);
                telemetry::store_write_failed(
                    &self.key.topic,
                    self.key.partition,
                    self.failures,
                    delay,
                    &error,
                );
                // Stop fetching while the store is down; if the client refuses,
                // the bounded prefetch still caps what piles up.
                if !self.paused {
                    match self.source.pause() {
                        Ok(()) => self.paused = true,
                        Err(e) => telemetry::source_error(&self.key.topic, self.key.partition, &e),
                    }
                }
                // A concurrent-write conflict resolves at once (the retry
                // reclassifies); only repeated conflicts back off.
                let conflict_first_retry =
                    matches!(error, StoreError::Conflict(_)) && self.failures == 1;
                Ok(Some(if conflict_first_retry {
                    Duration::ZERO
                } else {
                    delay
                }))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A refused resume is retried after the next batch.
    fn resume_if_paused(&mut self) {
        if self.paused {
            match self.source.resume() {
                Ok(()) => self.paused = false,
                Err(e) => telemetry::source_error(&self.key.topic, self.key.partition, &e),
            }
        }
    }
}

fn retry_delay(config: &PipelineConfig, failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    config
        .write_retry_base
        .saturating_mul(factor)
        .min(config.write_retry_max)
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
