//! A simulated Kafka partition. The log is shared by every consumer of the
//! partition ([`PartitionFeed`]); each consumer reads it through its own
//! [`SimSource`] with its own position, as two group members would.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use audit_actors::{RecordSource, SourceError};
use audit_ledger::RawRecord;
use tokio::sync::watch;

/// One partition of the topic: its whole log, of which the producer has made
/// a growing prefix visible.
pub struct PartitionFeed {
    records: Vec<RawRecord>,
    visible: watch::Sender<usize>,
}

impl PartitionFeed {
    pub fn new(records: Vec<RawRecord>) -> Arc<Self> {
        Arc::new(Self {
            records,
            visible: watch::Sender::new(0),
        })
    }

    /// Makes `count` more records visible.
    pub fn publish(&self, count: usize) {
        let total = self.records.len();
        self.visible.send_modify(|v| *v = (*v + count).min(total));
    }

    pub fn is_complete(&self) -> bool {
        *self.visible.borrow() == self.records.len()
    }
}

/// A fault of one source; calls of `next_batch` count from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFault {
    Fatal {
        on_call: u64,
    },
    Panic {
        on_call: u64,
    },
    /// Every `every`-th call returns a transient error (a broker blip).
    Transient {
        every: u64,
    },
}

/// What a source saw, to assert a fault really happened.
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub calls: u64,
    pub records_delivered: u64,
    pub seeks: Vec<Option<i64>>,
    pub pauses: u32,
    pub resumes: u32,
    pub paused: bool,
    /// Polls of a paused partition: a paused Kafka partition returns nothing.
    pub polls_while_paused: u32,
    pub injected_failures: u32,
    pub transient_errors: u32,
    pub last_commit: Option<i64>,
}

pub struct SimSource {
    topic: String,
    partition: i32,
    feed: Arc<PartitionFeed>,
    fault: Option<SourceFault>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The next offset to deliver.
    position: i64,
    stats: SourceStats,
}

impl SimSource {
    pub fn new(
        topic: &str,
        partition: i32,
        feed: Arc<PartitionFeed>,
        fault: Option<SourceFault>,
    ) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.to_string(),
            partition,
            feed,
            fault,
            state: Mutex::default(),
        })
    }

    pub fn stats(&self) -> SourceStats {
        self.state().stats.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Visible records from the position on, at most `max`; moves the position.
    fn take(&self, max: usize) -> Vec<RawRecord> {
        let visible = *self.feed.visible.borrow();
        let mut state = self.state();
        let position = state.position;
        let batch: Vec<RawRecord> = self.feed.records[..visible]
            .iter()
            .filter(|r| r.offset >= position)
            .take(max)
            .cloned()
            .collect();
        if let Some(last) = batch.last() {
            state.position = last.offset + 1;
            state.stats.records_delivered += batch.len() as u64;
        }
        batch
    }

    fn has_records(&self) -> bool {
        let visible = *self.feed.visible.borrow();
        let position = self.state().position;
        self.feed.records[..visible]
            .last()
            .is_some_and(|r| r.offset >= position)
    }
}

#[async_trait]
impl RecordSource for SimSource {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    async fn next_batch(
        &self,
        max: usize,
        max_wait: Duration,
        linger: Duration,
    ) -> Result<Vec<RawRecord>, SourceError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let paused = {
            let mut state = self.state();
            state.stats.calls += 1;
            let call = state.stats.calls;
            match self.fault {
                Some(SourceFault::Fatal { on_call }) if on_call == call => {
                    state.stats.injected_failures += 1;
                    return Err(SourceError::Fatal(format!(
                        "injected fatal error on call {call}"
                    )));
                }
                Some(SourceFault::Panic { on_call }) if on_call == call => {
                    state.stats.injected_failures += 1;
                    drop(state);
                    panic!("injected panic in next_batch on call {call}");
                }
                Some(SourceFault::Transient { every }) if call % every.max(1) == 0 => {
                    state.stats.transient_errors += 1;
                    return Err(SourceError::Transient(format!(
                        "injected broker error on call {call}"
                    )));
                }
                _ => {}
            }
            if state.stats.paused {
                state.stats.polls_while_paused += 1;
            }
            state.stats.paused
        };
        if paused {
            tokio::time::sleep_until(deadline).await;
            return Ok(Vec::new());
        }
        let mut changes = self.feed.visible.subscribe();
        while !self.has_records() {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
            }
        }
        // A first record is there: like the Kafka source, give the batch
        // `linger` to fill up (this models time, it synchronises nothing).
        tokio::time::sleep(linger).await;
        Ok(self.take(max))
    }

    async fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
        let earliest = self.feed.records.first().map_or(0, |r| r.offset);
        let mut state = self.state();
        state.stats.seeks.push(offset);
        state.position = offset.unwrap_or(earliest);
        Ok(())
    }

    fn pause(&self) -> Result<(), SourceError> {
        let mut state = self.state();
        state.stats.pauses += 1;
        state.stats.paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), SourceError> {
        let mut state = self.state();
        state.stats.resumes += 1;
        state.stats.paused = false;
        Ok(())
    }

    fn commit(&self, next_offset: i64) {
        self.state().stats.last_commit = Some(next_offset);
    }
}
