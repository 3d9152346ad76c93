//! The cluster simulation: simulated hosts over turmoil TCP, with faults
//! drawn from one seed.
//!
//! ```text
//!             turmoil TCP                         turmoil TCP
//! broker ◄──────────────── node-a, node-b ────────────────► store
//! (logs on "disk",         real NodeSupervisor,              (MemoryStore + hash chains
//!  producer task)          ConsumerActor, PartitionActors     on "disk"; a transaction
//!                          over BrokerSource and DbClient)    lives in host memory)
//! ```
//!
//! The fault schedule ([`plan`]) is applied between simulation steps:
//! partitions, held and delayed links between any two hosts, crashes and
//! restarts of every host, a slow store, panics of partition actors,
//! rebalances. At the end the [`invariants`] are checked on the durable
//! state and on what the actors reported ([`observe`]).
//!
//! Everything runs on one thread, in virtual time, so a seed fixes the run;
//! [`Report::digest`] is a hash of its trace, to show it.

pub mod broker;
pub mod db;
pub mod invariants;
pub mod node;
pub mod observe;
pub mod plan;
pub mod wire;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use audit_actors::{PipelineConfig, RestartPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing_subscriber::layer::SubscriberExt;

use crate::log::SimLog;
use broker::BrokerDisk;
use db::DbDisk;
use invariants::Bounds;
use observe::{ActorEvent, ActorEventKind, ActorEvents};
use plan::{Action, Fault};

pub const TOPIC: &str = "orders";
pub const GROUP: &str = "audit-trail";
pub const BROKER: &str = "broker";
pub const STORE: &str = "store";
pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
pub const NODES: [&str; 2] = [NODE_A, NODE_B];

/// Streams of the seed: the log, the faults and the producer draw from
/// their own, so changing one does not reshuffle the others.
const FAULT_STREAM: u64 = 0x6661_756c_7473;
const SHAPE_STREAM: u64 = 0x0073_6861_7065;

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Where an injected partition actor panic happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicPoint {
    /// Fetching the rest of a batch: a first record held, a permit taken.
    Fetch,
    /// Writing: the rows sent in an open transaction, not yet committed.
    BeforeCommit,
}

/// A deliberate bug, planted to show the invariant checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The store moves the offset when the rows arrive, in its own
    /// transaction, before the rows are durable.
    OffsetBeforeRows,
    /// The store links one event as if its chain were empty.
    SkipChainLink,
    /// The store ignores the writer's expected offset: last writer wins.
    NoFencing,
    /// The store writes one batch back to front.
    ReverseOneBatch,
    /// The node's supervisors restart without limit or backoff.
    RestartStorm,
    /// The node takes no in-flight permits (a budget of 64 batches).
    UnboundedInflight,
}

/// Per node, the most batches and records it held at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub writes: usize,
    pub max_writes: usize,
    pub max_batch: usize,
    pub max_fetch: usize,
}

/// A panic waiting to happen: node, partition (any if `None`), where, how
/// many more times.
type ArmedPanic = (&'static str, Option<i32>, PanicPoint, u32);

/// State shared by the hosts and the harness, outside any host's memory:
/// observations, the trace, armed panics and the group coordinator.
pub struct Shared {
    trace: Mutex<Vec<String>>,
    panics: Mutex<Vec<ArmedPanic>>,
    panics_fired: Mutex<u32>,
    load: Mutex<BTreeMap<&'static str, NodeLoad>>,
    boots: Mutex<BTreeMap<&'static str, u32>>,
    fatal: Mutex<Vec<String>>,
    actor_events: Mutex<Vec<ActorEvent>>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
    /// Owners of each partition, as the group coordinator assigns them.
    group: watch::Sender<BTreeMap<i32, Vec<&'static str>>>,
    /// Virtual time, for code running outside a host.
    clock: Mutex<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrements the node's in-flight writes when the write ends, or when the
/// node crashes under it.
pub struct WriteGuard<'a> {
    shared: &'a Shared,
    node: &'static str,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut load = lock(&self.shared.load);
        let l = load.entry(self.node).or_default();
        l.writes = l.writes.saturating_sub(1);
    }
}

impl Shared {
    fn new(partitions: usize) -> Arc<Self> {
        Arc::new(Self {
            trace: Mutex::default(),
            panics: Mutex::default(),
            panics_fired: Mutex::new(0),
            load: Mutex::default(),
            boots: Mutex::default(),
            fatal: Mutex::default(),
            actor_events: Mutex::default(),
            counts: Mutex::default(),
            group: watch::Sender::new(plan::initial_owners(partitions)),
            clock: Mutex::default(),
        })
    }

    /// Virtual time since the start of the run.
    pub fn now(&self) -> Duration {
        turmoil::sim_elapsed().unwrap_or_else(|| *lock(&self.clock))
    }

    pub fn trace(&self, host: &str, line: String) {
        let now = self.now();
        lock(&self.trace).push(format!("{:>6}ms {host}: {line}", now.as_millis()));
    }

    /// Counts a start of `host`'s software; returns its number (1 = first).
    pub fn boot(&self, host: &'static str) -> u32 {
        let mut boots = lock(&self.boots);
        let n = boots.entry(host).or_default();
        *n += 1;
        *n
    }

    fn boots_of(&self, host: &str) -> u32 {
        lock(&self.boots)
            .iter()
            .find(|(h, _)| **h == host)
            .map_or(0, |(_, n)| *n)
    }

    pub fn fatal(&self, node: &str, reason: String) {
        self.trace(node, format!("exit: {reason}"));
        lock(&self.fatal).push(format!("{node}: {reason}"));
    }

    /// Whether an armed panic matches, consuming one if so.
    pub fn take_panic(&self, node: &str, partition: i32, point: PanicPoint) -> bool {
        let mut panics = lock(&self.panics);
        let Some(armed) = panics.iter_mut().find(|(n, p, pt, times)| {
            *n == node && p.is_none_or(|p| p == partition) && *pt == point && *times > 0
        }) else {
            return false;
        };
        armed.3 -= 1;
        panics.retain(|(_, _, _, times)| *times > 0);
        drop(panics);
        *lock(&self.panics_fired) += 1;
        self.trace(node, format!("panic in partition {partition} ({point:?})"));
        true
    }

    /// Counts a write of `records` records in flight until the guard drops.
    pub fn write_started(&self, node: &'static str, records: usize) -> WriteGuard<'_> {
        let mut load = lock(&self.load);
        let l = load.entry(node).or_default();
        l.writes += 1;
        l.max_writes = l.max_writes.max(l.writes);
        l.max_batch = l.max_batch.max(records);
        WriteGuard { shared: self, node }
    }

    /// Counts something that happened (a fenced write, a failed call), and
    /// traces it.
    pub fn count(&self, host: &str, what: &'static str, detail: String) {
        *lock(&self.counts).entry(what).or_default() += 1;
        self.trace(host, format!("{what}: {detail}"));
    }

    pub fn note_fetch(&self, node: &'static str, records: usize) {
        let mut load = lock(&self.load);
        let l = load.entry(node).or_default();
        l.max_fetch = l.max_fetch.max(records);
    }

    pub fn subscribe_group(&self) -> watch::Receiver<BTreeMap<i32, Vec<&'static str>>> {
        self.group.subscribe()
    }

    fn actor_event(&self, host: String, kind: ActorEventKind) {
        let boot = self.boots_of(&host);
        let at = self.now();
        self.trace(&host, format!("{kind:?}"));
        lock(&self.actor_events).push(ActorEvent {
            at,
            host,
            boot,
            kind,
        });
    }
}

/// What a run is: its seed fixes everything else unless a test sets it.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub partitions: usize,
    pub records_per_partition: usize,
    pub faults: Vec<(Duration, Fault)>,
    pub bug: Option<Bug>,
    /// Virtual time after which a run that has not stored everything has
    /// stalled.
    pub deadline: Duration,
    /// Largest one-way latency of a healthy link.
    pub max_latency: Duration,
}

impl Scenario {
    /// 2–4 partitions of 80–200 records, 3–8 faults in the first 2.5 s.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ SHAPE_STREAM);
        let partitions = rng.gen_range(2..=4);
        let records_per_partition = rng.gen_range(80..=200);
        let count = rng.gen_range(3..=8);
        let max_latency = ms(rng.gen_range(1..=5));
        let faults = plan::draw(seed ^ FAULT_STREAM, partitions, count, ms(2500));
        Self {
            seed,
            partitions,
            records_per_partition,
            faults,
            bug: None,
            deadline: Duration::from_secs(40),
            max_latency,
        }
    }

    /// No faults at all.
    pub fn quiet(seed: u64) -> Self {
        Self {
            faults: Vec::new(),
            ..Self::from_seed(seed)
        }
    }

    /// The bounds the invariants hold the node to.
    pub fn bounds() -> Bounds {
        let c = config(None);
        Bounds {
            restart: c.restart,
            max_inflight_batches: c.max_inflight_batches,
            batch_max_records: c.batch_max_records,
        }
    }

    pub fn describe(&self) -> String {
        let mut out = format!(
            "seed {}: {} partitions x {} records, latency <= {:?}, bug {:?}\n",
            self.seed, self.partitions, self.records_per_partition, self.max_latency, self.bug
        );
        for (at, fault) in &self.faults {
            let _ = writeln!(out, "  {:>6}ms  {fault}", at.as_millis());
        }
        out
    }

    pub fn run(&self) -> Result<Report, String> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let log = SimLog::generate(
            &mut rng,
            TOPIC,
            GROUP,
            self.partitions,
            self.records_per_partition,
        );
        let shared = Shared::new(self.partitions);
        let broker = BrokerDisk::new(log.partitions.clone(), rng.gen());
        let db = DbDisk::new(self.bug);

        let mut sim = turmoil::Builder::new()
            .simulation_duration(self.deadline + Duration::from_secs(30))
            .tick_duration(ms(1))
            .min_message_latency(Duration::ZERO)
            .max_message_latency(self.max_latency)
            .build_with_rng(Box::new(StdRng::seed_from_u64(self.seed)));
        {
            let (disk, shared) = (broker.clone(), shared.clone());
            sim.host(BROKER, move || broker::serve(disk.clone(), shared.clone()));
        }
        {
            let (disk, shared) = (db.clone(), shared.clone());
            sim.host(STORE, move || db::serve(disk.clone(), shared.clone()));
        }
        for node in NODES {
            let shared = shared.clone();
            let config = config(self.bug);
            sim.host(node, move || {
                node::run(node, config.clone(), shared.clone())
            });
        }

        let subscriber = tracing_subscriber::registry().with(ActorEvents {
            shared: shared.clone(),
        });
        let outcome = tracing::subscriber::with_default(subscriber, || {
            self.drive(&mut sim, &shared, &broker, &db, &log)
        });
        let (completed, elapsed) = outcome?;
        drop(sim);
        Ok(Report::new(self, log, shared, db, completed, elapsed))
    }

    /// Steps the simulation, applying the schedule, until every record is
    /// stored and every fault healed, then one more second for stragglers.
    fn drive(
        &self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Shared,
        broker: &BrokerDisk,
        db: &DbDisk,
        log: &SimLog,
    ) -> Result<(bool, Duration), String> {
        let actions = plan::actions(&self.faults);
        let mut next = 0;
        let mut down: Vec<&'static str> = Vec::new();
        // Nodes that exited, and when the orchestrator restarts them.
        let mut restart_at: BTreeMap<&'static str, Duration> = BTreeMap::new();
        let mut completed_at = None;
        loop {
            let now = sim.elapsed();
            *lock(&shared.clock) = now;
            while next < actions.len() && actions[next].0 <= now {
                let action = actions[next].1.clone();
                shared.trace("harness", format!("{action:?}"));
                self.apply(sim, shared, db, &action, &mut down);
                next += 1;
            }
            for node in NODES {
                if down.contains(&node) || sim.is_host_running(node) {
                    continue;
                }
                match restart_at.get(node) {
                    Some(at) if *at <= now => {
                        shared.trace("harness", format!("orchestrator restarts {node}"));
                        sim.bounce(node);
                        restart_at.remove(node);
                    }
                    Some(_) => {}
                    None => {
                        restart_at.insert(node, now + Duration::from_secs(1));
                    }
                }
            }
            let healed = next == actions.len() && down.is_empty();
            match completed_at {
                None if healed && broker.all_published() && stored_all(db, log) => {
                    completed_at = Some(now);
                }
                Some(at) if now >= at + Duration::from_secs(1) => return Ok((true, at)),
                _ => {}
            }
            if completed_at.is_none() && now >= self.deadline {
                return Ok((false, now));
            }
            sim.step().map_err(|e| format!("simulation failed: {e}"))?;
        }
    }

    fn apply(
        &self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Shared,
        db: &DbDisk,
        action: &Action,
        down: &mut Vec<&'static str>,
    ) {
        match *action {
            Action::Partition(a, b) => sim.partition(a, b),
            Action::Repair(a, b) => sim.repair(a, b),
            Action::Hold(a, b) => sim.hold(a, b),
            Action::Release(a, b) => sim.release(a, b),
            Action::Latency(a, b, latency) => {
                if latency.is_zero() {
                    sim.set_link_latency(a, b, Duration::ZERO);
                    sim.set_link_max_message_latency(a, b, self.max_latency);
                } else {
                    sim.set_link_latency(a, b, latency);
                }
            }
            Action::Crash(host) => {
                sim.crash(host);
                if !down.contains(&host) {
                    down.push(host);
                }
            }
            Action::Bounce(host) => {
                sim.bounce(host);
                down.retain(|h| *h != host);
            }
            Action::Slow(delay) => db.set_slow(delay),
            Action::ArmPanic {
                node,
                partition,
                point,
                times,
            } => lock(&shared.panics).push((node, partition, point, times)),
            Action::Assign(p, node) => shared.group.send_modify(|owners| {
                let o = owners.entry(p).or_default();
                if !o.contains(&node) {
                    o.push(node);
                }
            }),
            Action::Revoke(p, node) => shared.group.send_modify(|owners| {
                if let Some(o) = owners.get_mut(&p) {
                    o.retain(|n| *n != node);
                }
            }),
        }
    }
}

fn stored_all(db: &DbDisk, log: &SimLog) -> bool {
    db.memory.inspect(|s| {
        (0..log.partitions.len() as i32).all(|p| s.offsets.get(&log.key(p)).copied() == log.end(p))
    })
}

/// The pipeline's settings in the simulation: small batches and short
/// waits, so a few hundred records make many batches and restarts.
pub fn config(bug: Option<Bug>) -> PipelineConfig {
    let mut config = PipelineConfig {
        batch_max_records: 32,
        batch_linger: ms(5),
        poll_wait: ms(50),
        max_inflight_batches: 2,
        write_retry_base: ms(20),
        write_retry_max: ms(400),
        restart: RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            base_backoff: ms(20),
            max_backoff: ms(200),
        },
        // Real threads would make the run depend on the machine's speed.
        parse_inline: true,
        ..PipelineConfig::default()
    };
    match bug {
        Some(Bug::RestartStorm) => {
            config.restart = RestartPolicy {
                max_restarts: u32::MAX,
                window: Duration::from_secs(60),
                base_backoff: Duration::ZERO,
                max_backoff: Duration::ZERO,
            }
        }
        Some(Bug::UnboundedInflight) => config.max_inflight_batches = 64,
        _ => {}
    }
    config
}

/// What a run left behind, and its invariants.
pub struct Report {
    pub seed: u64,
    pub bug: Option<Bug>,
    pub log: SimLog,
    pub db: Arc<DbDisk>,
    pub completed: bool,
    /// Virtual time until everything was stored (or the deadline).
    pub elapsed: Duration,
    pub trace: Vec<String>,
    pub actor_events: Vec<ActorEvent>,
    pub load: BTreeMap<&'static str, NodeLoad>,
    pub fatal: Vec<String>,
    pub panics_fired: u32,
    pub boots: BTreeMap<&'static str, u32>,
    /// What the clients saw: fenced writes, failed store and broker calls.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Report {
    fn new(
        scenario: &Scenario,
        log: SimLog,
        shared: Arc<Shared>,
        db: Arc<DbDisk>,
        completed: bool,
        elapsed: Duration,
    ) -> Self {
        Self {
            seed: scenario.seed,
            bug: scenario.bug,
            log,
            db,
            completed,
            elapsed,
            trace: lock(&shared.trace).clone(),
            actor_events: lock(&shared.actor_events).clone(),
            load: lock(&shared.load).clone(),
            fatal: lock(&shared.fatal).clone(),
            panics_fired: *lock(&shared.panics_fired),
            boots: lock(&shared.boots).clone(),
            counts: lock(&shared.counts).clone(),
        }
    }

    /// Every invariant's violations (empty: the run is correct).
    pub fn violations(&self) -> Vec<String> {
        let bounds = Scenario::bounds();
        let mut out = Vec::new();
        if !self.completed {
            out.push(format!(
                "stalled: not everything stored after {:?} (virtual)",
                self.elapsed
            ));
        }
        self.db.memory.inspect(|state| {
            out.extend(invariants::exactly_once(&self.log, state));
            out.extend(invariants::chains(&self.db.chains(), state));
        });
        out.extend(invariants::offsets_forward(&self.db.moves()));
        out.extend(invariants::restarts(&self.actor_events, &bounds.restart));
        out.extend(invariants::inflight(&self.load, &bounds));
        out
    }

    /// A hash of everything the run did, in order: same seed, same digest.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for line in &self.trace {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        for row in &self.db.chains().rows {
            hasher.update(row.hash);
        }
        hex::encode(hasher.finalize())
    }

    pub fn summary(&self) -> String {
        let counts = self.db.memory.inspect(|s| {
            format!(
                "{} events, {} dead letters, {} duplicates",
                s.events.len(),
                s.dead_letters.len(),
                s.duplicates.len()
            )
        });
        format!(
            "seed {}: {} records -> {counts}; completed={} at {:?} (virtual); {} commits; restarts {}; panics {}; boots {:?}; seen {:?}; load {:?}",
            self.seed,
            self.log.len(),
            self.completed,
            self.elapsed,
            self.db.moves().len(),
            self.actor_events
                .iter()
                .filter(|e| matches!(e.kind, ActorEventKind::RestartScheduled { .. }))
                .count(),
            self.panics_fired,
            self.boots,
            self.counts,
            self.load,
        )
    }
}

/// The command that replays `seed` (printed by every failing run).
pub fn replay_command(seed: u64) -> String {
    format!("cargo test -p chaos --test sim -- --seed {seed}")
}

/// The store conformance suite against the simulated store: the suite runs
/// on a node host and reaches the store host through [`db::DbClient`] over
/// turmoil TCP, so the wire protocol and transactions are under test too.
pub fn store_conformance() -> Result<(), String> {
    let shared = Shared::new(1);
    let disk = DbDisk::new(None);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(60))
        .build_with_rng(Box::new(StdRng::seed_from_u64(1)));
    {
        let (disk, shared) = (disk.clone(), shared.clone());
        sim.host(STORE, move || db::serve(disk.clone(), shared.clone()));
    }
    let client = db::DbClient::new(NODE_A, shared.clone());
    sim.client(NODE_A, async move {
        audit_ledger::store::conformance::run_all(&client).await;
        Ok(())
    });
    sim.run()
        .map_err(|e| format!("conformance suite failed: {e}"))?;
    // The suite's events are chained like the real store's.
    let violations = disk
        .memory
        .inspect(|state| invariants::chains(&disk.chains(), state));
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations.join("\n"))
    }
}
