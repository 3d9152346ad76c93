//! The broker host: serves the topic's partitioned logs over turmoil TCP,
//! and the node side of it, [`BrokerSource`], the simulated
//! [`RecordSource`].
//!
//! The logs and how much of them the producer has published are the
//! broker's disk: they survive a crash. The producer runs on the broker host
//! (it stops while the broker is down, as producers wait for it).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use audit_actors::{RecordSource, SourceError};
use audit_ledger::RawRecord;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use turmoil::net::{TcpListener, TcpStream};

use super::wire::{self, BrokerRequest, BrokerResponse, WireRecord, BROKER_PORT};
use super::{ms, Shared, BROKER};

/// What the broker keeps on disk.
pub struct BrokerDisk {
    pub logs: Vec<Vec<RawRecord>>,
    /// Records of each partition the producer has published.
    visible: Mutex<Vec<usize>>,
    producer_seed: u64,
    boots: Mutex<u64>,
}

impl BrokerDisk {
    pub fn new(logs: Vec<Vec<RawRecord>>, producer_seed: u64) -> Arc<Self> {
        let visible = Mutex::new(vec![0; logs.len()]);
        Arc::new(Self {
            logs,
            visible,
            producer_seed,
            boots: Mutex::new(0),
        })
    }

    fn visible(&self) -> MutexGuard<'_, Vec<usize>> {
        self.visible.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn all_published(&self) -> bool {
        let visible = self.visible();
        self.logs
            .iter()
            .zip(visible.iter())
            .all(|(l, v)| l.len() == *v)
    }

    /// Published records of `partition` from offset `from`, at most `max`.
    fn read(&self, partition: i32, from: i64, max: usize) -> Vec<WireRecord> {
        let Some(log) = self.logs.get(partition as usize) else {
            return Vec::new();
        };
        let visible = self.visible()[partition as usize];
        let start = log[..visible].partition_point(|r| r.offset < from);
        log[start..visible]
            .iter()
            .take(max)
            .map(WireRecord::from)
            .collect()
    }

    fn end(&self, partition: i32) -> Option<i64> {
        let log = self.logs.get(partition as usize)?;
        let visible = self.visible()[partition as usize];
        Some(log[..visible].last().map_or(0, |r| r.offset + 1))
    }
}

/// The broker host's software; run again from scratch after a crash.
pub async fn serve(disk: Arc<BrokerDisk>, shared: Arc<Shared>) -> turmoil::Result {
    let boot = {
        let mut boots = disk.boots.lock().unwrap_or_else(|e| e.into_inner());
        *boots += 1;
        *boots
    };
    shared.trace(BROKER, format!("boot {boot}"));
    let published = Arc::new(Notify::new());
    tokio::spawn(produce(disk.clone(), published.clone(), boot));
    let listener = TcpListener::bind(("0.0.0.0", BROKER_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(session(stream, disk.clone(), published.clone()));
    }
}

/// Publishes bursts of 1–8 records to a random unfinished partition every
/// 1–20 ms, until everything is published.
async fn produce(disk: Arc<BrokerDisk>, published: Arc<Notify>, boot: u64) {
    let mut rng = StdRng::seed_from_u64(disk.producer_seed.wrapping_add(boot));
    loop {
        {
            let mut visible = disk.visible();
            let open: Vec<usize> = (0..disk.logs.len())
                .filter(|&p| visible[p] < disk.logs[p].len())
                .collect();
            if open.is_empty() {
                return;
            }
            let p = open[rng.gen_range(0..open.len())];
            visible[p] = (visible[p] + rng.gen_range(1..=8)).min(disk.logs[p].len());
        }
        published.notify_waiters();
        tokio::time::sleep(ms(rng.gen_range(1..=20))).await;
    }
}

async fn session(mut stream: TcpStream, disk: Arc<BrokerDisk>, published: Arc<Notify>) {
    while let Ok(Some(request)) = wire::recv::<BrokerRequest>(&mut stream).await {
        let response = match request {
            BrokerRequest::Fetch {
                partition,
                from,
                max,
                wait_ms,
                linger_ms,
            } => {
                let deadline = tokio::time::Instant::now() + ms(wait_ms);
                loop {
                    // Registered before the check, so no publish is missed.
                    let notified = published.notified();
                    if !disk.read(partition, from, 1).is_empty() {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        break;
                    }
                }
                if !disk.read(partition, from, 1).is_empty() && linger_ms > 0 {
                    tokio::time::sleep(ms(linger_ms)).await;
                }
                BrokerResponse::Records(disk.read(partition, from, max))
            }
            BrokerRequest::End { partition } => BrokerResponse::End(disk.end(partition)),
        };
        if wire::send(&mut stream, &response).await.is_err() {
            return;
        }
    }
}

/// Longest a broker call may take beyond its own wait.
const RPC_SLACK: Duration = Duration::from_millis(250);

/// A node's view of one partition: the position and the pause flag live in
/// the node's memory, as in librdkafka.
pub struct BrokerSource {
    topic: String,
    partition: i32,
    node: &'static str,
    shared: Arc<Shared>,
    conn: tokio::sync::Mutex<Option<TcpStream>>,
    state: Mutex<SourceState>,
}

#[derive(Default)]
struct SourceState {
    position: i64,
    paused: bool,
}

impl BrokerSource {
    pub fn new(topic: &str, partition: i32, node: &'static str, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.to_string(),
            partition,
            node,
            shared,
            conn: tokio::sync::Mutex::new(None),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, SourceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn call(
        &self,
        request: &BrokerRequest,
        timeout: Duration,
    ) -> Result<BrokerResponse, SourceError> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            let stream = wire::connect(BROKER, BROKER_PORT, RPC_SLACK)
                .await
                .map_err(|e| SourceError::Transient(format!("broker unreachable: {e}")))?;
            *conn = Some(stream);
        }
        let Some(stream) = conn.as_mut() else {
            return Err(SourceError::Transient("no connection".into()));
        };
        match wire::call(stream, request, timeout).await {
            Ok(response) => Ok(response),
            Err(e) => {
                // A late answer must not be read as the next one's.
                *conn = None;
                self.shared.count(
                    self.node,
                    "fetch failed",
                    format!("partition {}: {e}", self.partition),
                );
                Err(SourceError::Transient(format!("broker call failed: {e}")))
            }
        }
    }
}

#[async_trait]
impl RecordSource for BrokerSource {
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
        // Mid-batch: a first record is held and a permit taken.
        if max > 1
            && self
                .shared
                .take_panic(self.node, self.partition, super::PanicPoint::Fetch)
        {
            panic!(
                "injected panic: {} partition {} mid-batch (fetching the rest)",
                self.node, self.partition
            );
        }
        let (paused, from) = {
            let state = self.state();
            (state.paused, state.position)
        };
        if paused {
            // A paused partition fetches nothing; the client just waits.
            tokio::time::sleep(max_wait).await;
            return Ok(Vec::new());
        }
        let request = BrokerRequest::Fetch {
            partition: self.partition,
            from,
            max,
            wait_ms: max_wait.as_millis() as u64,
            linger_ms: linger.as_millis() as u64,
        };
        let records = match self.call(&request, max_wait + linger + RPC_SLACK).await? {
            BrokerResponse::Records(records) => records,
            other => {
                return Err(SourceError::Transient(format!(
                    "unexpected broker answer {other:?}"
                )))
            }
        };
        if records.len() > max {
            return Err(SourceError::Fatal(format!(
                "broker returned {} records, asked for {max}",
                records.len()
            )));
        }
        let records: Vec<RawRecord> = records.into_iter().map(RawRecord::from).collect();
        if let Some(last) = records.last() {
            self.state().position = last.offset + 1;
        }
        self.shared.note_fetch(self.node, records.len());
        Ok(records)
    }

    async fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
        // The earliest offset of every simulated log is 0 (nothing expires).
        self.state().position = offset.unwrap_or(0);
        Ok(())
    }

    fn pause(&self) -> Result<(), SourceError> {
        self.state().paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), SourceError> {
        self.state().paused = false;
        Ok(())
    }

    async fn end_offset(&self) -> Result<Option<i64>, SourceError> {
        let request = BrokerRequest::End {
            partition: self.partition,
        };
        match self.call(&request, RPC_SLACK).await? {
            BrokerResponse::End(end) => Ok(end),
            other => Err(SourceError::Transient(format!(
                "unexpected broker answer {other:?}"
            ))),
        }
    }

    fn commit(&self, _next_offset: i64) {}
}
