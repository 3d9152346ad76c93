//! One simulated run: a turmoil `Sim` with a fixed seed, whose client host
//! "node" runs a producer, the real consumer actor(s) and a fault schedule,
//! until every record is stored or the deadline passes.
//!
//! The seed fixes the log, the producer's pace and every fault's time and
//! size; partition actors parse on their own task (`parse_inline`), so no
//! real thread takes part and the seed fixes the interleaving too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use audit_actors::consumer::{
    Assignment, Connector, ConnectorHandle, ConsumerActor, ConsumerArgs, ConsumerMsg,
};
use audit_actors::{PipelineConfig, RestartPolicy, SourceError};
use audit_ledger::EventStore;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::check::check_exactly_once;
use crate::log::SimLog;
use crate::source::{PartitionFeed, SimSource, SourceFault, SourceStats};
use crate::store::{ChaosStore, PlantedBug};

pub const TOPIC: &str = "orders";
pub const GROUP: &str = "audit-trail";
pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";

/// A different stream of the seed for the fault schedule than for the log,
/// so changing one does not reshuffle the other.
const FAULT_STREAM: u64 = 0x6661_756c_7473;

/// Which faults a run injects.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub store_outage: Option<StoreOutage>,
    /// A partition's source (on the first consumer) fails once.
    pub source_fault: Option<(i32, SourceFault)>,
    pub rebalance: Option<Rebalance>,
    pub lost_acks: Option<LostAcks>,
    pub reassign: Option<Reassign>,
    /// Every n-th fetch of every source of the first consumer fails with a
    /// transient error (except the partition with `source_fault`).
    pub transient_every: Option<u64>,
    pub bug: Option<PlantedBug>,
}

/// At `at`, the next `writes` writes fail as if the database were down.
#[derive(Debug, Clone, Copy)]
pub struct StoreOutage {
    pub at: Duration,
    pub writes: u32,
}

/// At `at`, `partition` is assigned to a second consumer; the first one is
/// told to let it go `overlap` later, so both own it in between.
#[derive(Debug, Clone, Copy)]
pub struct Rebalance {
    pub partition: i32,
    pub at: Duration,
    pub overlap: Duration,
}

/// At `at`, the next write of `partition` stalls for `stall`; shortly after,
/// the first consumer is told the partition was revoked and assigned to it
/// again, with the same source: librdkafka's partition queue, which a new
/// actor shares with a predecessor still finishing its step. With a stall
/// longer than the consumer's wait for the predecessor (5 s), both actors
/// read, seek and write the partition at once.
#[derive(Debug, Clone, Copy)]
pub struct Reassign {
    pub partition: i32,
    pub at: Duration,
    pub stall: Duration,
}

/// At `at`, the next `count` successful writes lose their acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct LostAcks {
    pub at: Duration,
    pub count: u32,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub partitions: usize,
    pub records_per_partition: usize,
    pub faults: Faults,
    /// Virtual time after which a run that has not stored every record is
    /// reported as stalled.
    pub deadline: Duration,
}

impl Scenario {
    /// Three partitions, no faults.
    pub fn quiet(seed: u64) -> Self {
        Self {
            seed,
            partitions: 3,
            records_per_partition: 300,
            faults: Faults::default(),
            deadline: Duration::from_secs(30),
        }
    }

    /// Every fault once, with times and sizes drawn from the seed, in
    /// separate phases: store outage (0.2–0.6 s), lost acknowledgements
    /// (0.65–0.85 s), a partition failure (an early fetch), a rebalance of
    /// another partition (0.9–1.5 s, overlap 20–400 ms). The producer
    /// publishes for about two seconds.
    pub fn with_all_faults(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ FAULT_STREAM);
        let scenario = Self::quiet(seed);
        let partitions = scenario.partitions as i32;
        let failing = rng.gen_range(0..partitions);
        let moved = (failing + rng.gen_range(1..partitions)) % partitions;
        let on_call = rng.gen_range(3..20);
        let source_fault = if rng.gen_bool(0.5) {
            SourceFault::Fatal { on_call }
        } else {
            SourceFault::Panic { on_call }
        };
        let faults = Faults {
            store_outage: Some(StoreOutage {
                at: ms(rng.gen_range(200..600)),
                writes: rng.gen_range(2..8),
            }),
            source_fault: Some((failing, source_fault)),
            rebalance: Some(Rebalance {
                partition: moved,
                at: ms(rng.gen_range(900..1500)),
                overlap: ms(rng.gen_range(20..400)),
            }),
            lost_acks: Some(LostAcks {
                at: ms(rng.gen_range(650..850)),
                count: rng.gen_range(1..4),
            }),
            reassign: None,
            transient_every: None,
            bug: None,
        };
        Self { faults, ..scenario }
    }

    /// Runs the scenario in a turmoil simulation.
    pub fn run(&self) -> Result<Outcome, String> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let log = SimLog::generate(
            &mut rng,
            TOPIC,
            GROUP,
            self.partitions,
            self.records_per_partition,
        );
        let store = Arc::new(ChaosStore::new(self.faults.bug));
        let report: Arc<Mutex<Option<Report>>> = Arc::default();
        let node = Node {
            log: log.clone(),
            faults: self.faults.clone(),
            store: store.clone(),
            producer_seed: rng.gen(),
            deadline: self.deadline,
            report: report.clone(),
        };
        let mut sim = turmoil::Builder::new()
            .simulation_duration(self.deadline + Duration::from_secs(60))
            .tick_duration(Duration::from_millis(1))
            .build_with_rng(Box::new(StdRng::seed_from_u64(self.seed)));
        sim.client("node", async move { node.run().await.map_err(Into::into) });
        sim.run().map_err(|e| format!("simulation failed: {e}"))?;
        let report = report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or("the node reported nothing")?;
        Ok(Outcome {
            seed: self.seed,
            log,
            store,
            completed: report.completed,
            elapsed: report.elapsed,
            sources: report.sources,
            consumer_failures: report.consumer_failures,
        })
    }
}

/// What a run left behind, for the checker and for assertions that each
/// fault really happened.
pub struct Outcome {
    pub seed: u64,
    pub log: SimLog,
    pub store: Arc<ChaosStore>,
    /// Every partition's stored offset reached the end of its log in time.
    pub completed: bool,
    /// Virtual time until completion (or the deadline).
    pub elapsed: Duration,
    /// (consumer node id, partition, what its source saw), taken when the
    /// run completed or stalled, before the consumers were stopped.
    pub sources: Vec<(&'static str, i32, SourceStats)>,
    /// Supervision failures of the consumer actors: there should be none.
    pub consumer_failures: Vec<String>,
}

impl Outcome {
    pub fn check(&self) -> Result<(), String> {
        self.store
            .memory()
            .inspect(|state| check_exactly_once(&self.log, state))
    }

    pub fn source(&self, consumer: &str, partition: i32) -> Option<&SourceStats> {
        self.sources
            .iter()
            .find(|(c, p, _)| *c == consumer && *p == partition)
            .map(|(_, _, s)| s)
    }

    pub fn summary(&self) -> String {
        let counts = self.store.memory().inspect(|s| {
            format!(
                "{} events, {} dead letters, {} duplicates",
                s.events.len(),
                s.dead_letters.len(),
                s.duplicates.len()
            )
        });
        format!(
            "seed {}: {} records in {} partitions -> {counts}; completed={} after {:?} (virtual); writers {:?}",
            self.seed,
            self.log.len(),
            self.log.partitions.len(),
            self.completed,
            self.elapsed,
            self.store.stats()
        )
    }
}

struct Report {
    completed: bool,
    elapsed: Duration,
    sources: Vec<(&'static str, i32, SourceStats)>,
    consumer_failures: Vec<String>,
}

enum Action {
    StoreOutage(u32),
    LoseAcks(u32),
    Assign(i32),
    Revoke(i32),
    StallNextWrite(i32, Duration),
    Reassign(i32),
}

/// The software of the simulated host.
struct Node {
    log: SimLog,
    faults: Faults,
    store: Arc<ChaosStore>,
    producer_seed: u64,
    deadline: Duration,
    report: Arc<Mutex<Option<Report>>>,
}

impl Node {
    fn schedule(&self) -> Vec<(Duration, Action)> {
        let mut actions = Vec::new();
        if let Some(o) = self.faults.store_outage {
            actions.push((o.at, Action::StoreOutage(o.writes)));
        }
        if let Some(l) = self.faults.lost_acks {
            actions.push((l.at, Action::LoseAcks(l.count)));
        }
        if let Some(r) = self.faults.rebalance {
            actions.push((r.at, Action::Assign(r.partition)));
            actions.push((r.at + r.overlap, Action::Revoke(r.partition)));
        }
        if let Some(r) = self.faults.reassign {
            actions.push((r.at, Action::StallNextWrite(r.partition, r.stall)));
            // Batches are written every few milliseconds: by then the
            // stalled write has started.
            actions.push((
                r.at + Duration::from_millis(100),
                Action::Reassign(r.partition),
            ));
        }
        actions.sort_by_key(|(at, _)| *at);
        actions
    }

    fn done(&self) -> bool {
        self.store.memory().inspect(|s| {
            (0..self.log.partitions.len() as i32)
                .all(|p| s.offsets.get(&self.log.key(p)).copied() == self.log.end(p))
        })
    }

    async fn run(self) -> Result<(), String> {
        let start = tokio::time::Instant::now();
        let feeds: Vec<Arc<PartitionFeed>> = self
            .log
            .partitions
            .iter()
            .map(|r| PartitionFeed::new(r.clone()))
            .collect();
        let producer = tokio::spawn(produce(feeds.clone(), self.producer_seed));
        let (reports, mut supervision) = mpsc::unbounded_channel();
        let (probe, _) = Actor::spawn(None, Probe, reports)
            .await
            .map_err(|e| e.to_string())?;

        let sources_a: Vec<Arc<SimSource>> = feeds
            .iter()
            .enumerate()
            .map(|(p, feed)| {
                let p = p as i32;
                let fault = match self.faults.source_fault {
                    Some((fp, fault)) if fp == p => Some(fault),
                    _ => self
                        .faults
                        .transient_every
                        .map(|every| SourceFault::Transient { every }),
                };
                SimSource::new(TOPIC, p, feed.clone(), fault)
            })
            .collect();
        let a = spawn_consumer(NODE_A, sources_a.clone(), self.store.clone(), &probe).await?;
        let mut b = None;
        let mut sources_b = Vec::new();

        for (at, action) in self.schedule() {
            tokio::time::sleep_until(start + at).await;
            match action {
                Action::StoreOutage(writes) => self.store.fail_next_writes(writes),
                Action::LoseAcks(count) => self.store.lose_next_acks(count),
                Action::Assign(p) => {
                    let source = SimSource::new(TOPIC, p, feeds[p as usize].clone(), None);
                    sources_b.push(source.clone());
                    b = Some(
                        spawn_consumer(NODE_B, vec![source], self.store.clone(), &probe).await?,
                    );
                }
                Action::Revoke(p) => a
                    .send_message(ConsumerMsg::Revoked(vec![(TOPIC.to_string(), p)]))
                    .map_err(|e| format!("revoke: {e}"))?,
                Action::StallNextWrite(p, duration) => self.store.stall_next_write_of(p, duration),
                Action::Reassign(p) => {
                    a.send_message(ConsumerMsg::Revoked(vec![(TOPIC.to_string(), p)]))
                        .map_err(|e| format!("revoke: {e}"))?;
                    a.send_message(ConsumerMsg::Assigned(vec![Assignment {
                        topic: TOPIC.to_string(),
                        partition: p,
                        source: sources_a[p as usize].clone(),
                    }]))
                    .map_err(|e| format!("reassign: {e}"))?;
                }
            }
        }

        let completed = loop {
            if feeds.iter().all(|f| f.is_complete()) && self.done() {
                break true;
            }
            if start.elapsed() >= self.deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let elapsed = start.elapsed();
        // Before stopping: a stopping partition actor resumes its source.
        let sources = sources_a
            .iter()
            .map(|s| (NODE_A, s))
            .chain(sources_b.iter().map(|s| (NODE_B, s)))
            .map(|(node, s)| (node, audit_actors::RecordSource::partition(&**s), s.stats()))
            .collect();
        producer.abort();
        for consumer in b.iter().chain([&a]) {
            let _ = consumer
                .stop_and_wait(Some("end of run".into()), Some(Duration::from_secs(5)))
                .await;
        }
        let mut consumer_failures = Vec::new();
        while let Ok(report) = supervision.try_recv() {
            if report.contains(" failed: ") {
                consumer_failures.push(report);
            }
        }
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(Report {
            completed,
            elapsed,
            sources,
            consumer_failures,
        });
        Ok(())
    }
}

/// Publishes the logs in bursts of 1–8 records to a random partition, every
/// 1–20 ms, until everything is visible.
async fn produce(feeds: Vec<Arc<PartitionFeed>>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let open: Vec<&Arc<PartitionFeed>> = feeds.iter().filter(|f| !f.is_complete()).collect();
        if open.is_empty() {
            return;
        }
        open[rng.gen_range(0..open.len())].publish(rng.gen_range(1..=8));
        tokio::time::sleep(ms(rng.gen_range(1..=20))).await;
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config(node_id: &str) -> PipelineConfig {
    PipelineConfig {
        batch_max_records: 32,
        batch_linger: ms(5),
        poll_wait: ms(50),
        max_inflight_batches: 4,
        write_retry_base: ms(20),
        write_retry_max: ms(500),
        restart: RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            base_backoff: ms(20),
            max_backoff: ms(200),
        },
        node_id: node_id.to_string(),
        group_id: GROUP.to_string(),
        parse_inline: true,
        ..PipelineConfig::default()
    }
}

async fn spawn_consumer(
    node_id: &str,
    sources: Vec<Arc<SimSource>>,
    store: Arc<ChaosStore>,
    probe: &ActorRef<String>,
) -> Result<ActorRef<ConsumerMsg>, String> {
    let args = ConsumerArgs {
        connector: Arc::new(SimConnector { sources }),
        store: store as Arc<dyn EventStore>,
        config: Arc::new(config(node_id)),
    };
    let (consumer, _) = Actor::spawn_linked(None, ConsumerActor, args, probe.get_cell())
        .await
        .map_err(|e| format!("{node_id} did not start: {e}"))?;
    Ok(consumer)
}

/// Group membership in the simulation: assigns its sources on connect.
struct SimConnector {
    sources: Vec<Arc<SimSource>>,
}

struct SimHandle;

#[async_trait]
impl ConnectorHandle for SimHandle {
    async fn shutdown(self: Box<Self>) {}
}

#[async_trait]
impl Connector for SimConnector {
    async fn connect(
        &self,
        consumer: ActorRef<ConsumerMsg>,
    ) -> Result<Box<dyn ConnectorHandle>, SourceError> {
        let assignments = self
            .sources
            .iter()
            .map(|s| Assignment {
                topic: TOPIC.to_string(),
                partition: audit_actors::RecordSource::partition(&**s),
                source: s.clone(),
            })
            .collect();
        consumer
            .send_message(ConsumerMsg::Assigned(assignments))
            .map_err(|e| SourceError::Fatal(format!("assign: {e}")))?;
        Ok(Box::new(SimHandle))
    }
}

/// The parent of the consumer actors: reports how they end.
struct Probe;

impl Actor for Probe {
    type Msg = String;
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;

    async fn pre_start(
        &self,
        _myself: ActorRef<String>,
        reports: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(reports)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<String>,
        event: SupervisionEvent,
        reports: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let report = match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                format!("consumer {} failed: {error}", cell.get_id())
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                format!(
                    "consumer {} stopped: {}",
                    cell.get_id(),
                    reason.unwrap_or_default()
                )
            }
            _ => return Ok(()),
        };
        let _ = reports.send(report);
        Ok(())
    }
}
