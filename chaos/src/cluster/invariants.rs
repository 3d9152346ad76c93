//! The invariants checked at the end of every run. Each checker returns its
//! violations, prefixed by its name, so a test can tell which one caught a
//! planted bug.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use audit_actors::restart::backoff;
use audit_actors::RestartPolicy;
use audit_ledger::canonical::{chain_hash, GENESIS};
use audit_ledger::store::memory::MemoryState;

use super::db::{Chains, OffsetMove};
use super::observe::{ActorEvent, ActorEventKind};
use super::NodeLoad;
use crate::check::check_exactly_once;
use crate::log::SimLog;

pub const EXACTLY_ONCE: &str = "exactly-once";
pub const OFFSETS_FORWARD: &str = "offsets-forward";
pub const CHAINS: &str = "hash-chains";
pub const RESTARTS: &str = "restart-policy";
pub const INFLIGHT: &str = "in-flight-bounds";

/// The bounds the node was meant to run with (a planted bug may configure
/// the actors otherwise).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub restart: RestartPolicy,
    pub max_inflight_batches: usize,
    pub batch_max_records: usize,
}

/// Every produced record stored exactly once, dead-lettered or counted as a
/// duplicate, in offset order per partition; the final offsets at the ends
/// of the logs (the existing checker).
pub fn exactly_once(log: &SimLog, state: &MemoryState) -> Vec<String> {
    match check_exactly_once(log, state) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("{EXACTLY_ONCE}: {e}")],
    }
}

/// Each commit moves its partition's offset strictly forward, from where
/// the previous commit left it (never back, never the same range twice).
pub fn offsets_forward(moves: &[OffsetMove]) -> Vec<String> {
    let mut last: HashMap<_, i64> = HashMap::new();
    let mut out = Vec::new();
    for m in moves {
        let before = last.get(&m.key).copied();
        if m.from != before {
            out.push(format!(
                "{OFFSETS_FORWARD}: {}/{} commit by {} started from {:?}, the offset was {before:?}",
                m.key.topic, m.key.partition, m.writer, m.from
            ));
        }
        if before.is_some_and(|b| m.to <= b) {
            out.push(format!(
                "{OFFSETS_FORWARD}: {}/{} moved from {before:?} to {} (by {})",
                m.key.topic, m.key.partition, m.to, m.writer
            ));
        }
        last.insert(m.key.clone(), m.to);
    }
    out
}

/// Every chain recomputed from its rows with the ledger's own record
/// encoding and hash: positions 0, 1, 2, ...; each hash over the previous
/// one; the head in the chains table equal to the last row; every stored
/// event linked exactly once, in offset order.
pub fn chains(chains: &Chains, state: &MemoryState) -> Vec<String> {
    let mut out = Vec::new();
    let mut tails: BTreeMap<&str, (u64, [u8; 32], Option<i64>)> = BTreeMap::new();
    let mut scratch = Vec::new();
    for row in &chains.rows {
        let (next, prev, last_offset) = tails
            .entry(row.chain_id.as_str())
            .or_insert((0, GENESIS, None));
        if row.chain_position != *next {
            out.push(format!(
                "{CHAINS}: chain {} event {} at position {}, expected {next}",
                row.chain_id, row.event_id, row.chain_position
            ));
        }
        scratch.clear();
        row.record().encode(&mut scratch);
        let hash = chain_hash(prev, &scratch);
        if hash != row.hash {
            out.push(format!(
                "{CHAINS}: chain {} position {} (event {}): hash does not link to the previous event",
                row.chain_id, row.chain_position, row.event_id
            ));
        }
        if let (Some(last), Some(offset)) = (*last_offset, row.kafka_offset) {
            if offset <= last {
                out.push(format!(
                    "{CHAINS}: chain {} position {}: offset {offset} linked after offset {last}",
                    row.chain_id, row.chain_position
                ));
            }
        }
        *next = row.chain_position + 1;
        *prev = row.hash;
        *last_offset = row.kafka_offset.or(*last_offset);
    }
    for (id, head) in &chains.heads {
        let (length, hash, _) = tails
            .get(id.as_str())
            .copied()
            .unwrap_or((0, GENESIS, None));
        if head.length != length || head.head_hash != hash {
            out.push(format!(
                "{CHAINS}: chain {id}: head says length {}, the rows give {length} (or the head hash differs)",
                head.length
            ));
        }
    }
    let mut linked: HashSet<_> = HashSet::new();
    for row in &chains.rows {
        if !linked.insert(row.event_id) {
            out.push(format!("{CHAINS}: event {} linked twice", row.event_id));
        }
    }
    for event in &state.events {
        if !linked.contains(&event.event_id) {
            out.push(format!("{CHAINS}: event {} is in no chain", event.event_id));
        }
    }
    if linked.len() != state.events.len() {
        out.push(format!(
            "{CHAINS}: {} chain rows for {} events",
            linked.len(),
            state.events.len()
        ));
    }
    out.truncate(20);
    out
}

/// Restarts stay within the policy: per host start and child, at most
/// `max_restarts` restarts in any `window`, each delayed at least by the
/// policy's backoff for its rank, no budget spent (escalation), and every
/// restarted partition actor started no earlier than its delay.
pub fn restarts(events: &[ActorEvent], policy: &RestartPolicy) -> Vec<String> {
    let mut out = Vec::new();
    // (host, start, child) -> restarts as (time, generation, delay).
    type Restarts = Vec<(Duration, u64, Duration)>;
    let mut scheduled: BTreeMap<(&str, u32, &str), Restarts> = BTreeMap::new();
    for e in events {
        match &e.kind {
            ActorEventKind::RestartScheduled {
                child,
                generation,
                delay,
            } => scheduled
                .entry((e.host.as_str(), e.boot, child.as_str()))
                .or_default()
                .push((e.at, *generation, *delay)),
            ActorEventKind::Escalated { child } => out.push(format!(
                "{RESTARTS}: {} (start {}) spent the restart budget of {child} at {:?}",
                e.host, e.boot, e.at
            )),
            ActorEventKind::PartitionStarted { .. } => {}
        }
    }
    for ((host, boot, child), restarts) in &scheduled {
        for (i, (at, _, delay)) in restarts.iter().enumerate() {
            let in_window = restarts[..=i]
                .iter()
                .filter(|(t, _, _)| *at - *t < policy.window)
                .count();
            if in_window as u32 > policy.max_restarts {
                out.push(format!(
                    "{RESTARTS}: {host} (start {boot}) restarted {child} {in_window} times within {:?} (policy: {})",
                    policy.window, policy.max_restarts
                ));
                break;
            }
            let floor = backoff(policy, in_window.saturating_sub(1) as u32);
            if *delay < floor {
                out.push(format!(
                    "{RESTARTS}: {host} (start {boot}) restarted {child} after {delay:?}, the policy's backoff is {floor:?}"
                ));
                break;
            }
        }
    }
    // A restarted partition actor starts no earlier than its delay.
    for e in events {
        let ActorEventKind::PartitionStarted {
            partition,
            generation,
        } = &e.kind
        else {
            continue;
        };
        if *generation == 0 {
            continue;
        }
        let child = format!("partition:{}:{partition}", super::TOPIC);
        let restart = scheduled
            .get(&(e.host.as_str(), e.boot, child.as_str()))
            .and_then(|r| r.iter().rfind(|(at, g, _)| g == generation && *at <= e.at));
        match restart {
            Some((at, _, delay)) if e.at + Duration::from_millis(1) < *at + *delay => out.push(format!(
                "{RESTARTS}: {} partition {partition} generation {generation} started at {:?}, before its backoff ended at {:?}",
                e.host, e.at, *at + *delay
            )),
            Some(_) => {}
            None => out.push(format!(
                "{RESTARTS}: {} partition {partition} generation {generation} started with no restart scheduled",
                e.host
            )),
        }
    }
    out.truncate(20);
    out
}

/// Batches in memory stay within the configured bounds: per node, at most
/// `max_inflight_batches` writes at once, no batch or fetch larger than
/// `batch_max_records`.
pub fn inflight(load: &BTreeMap<&'static str, NodeLoad>, bounds: &Bounds) -> Vec<String> {
    let mut out = Vec::new();
    for (node, l) in load {
        if l.max_writes > bounds.max_inflight_batches {
            out.push(format!(
                "{INFLIGHT}: {node} had {} batches in flight, the bound is {}",
                l.max_writes, bounds.max_inflight_batches
            ));
        }
        if l.max_batch > bounds.batch_max_records || l.max_fetch > bounds.batch_max_records {
            out.push(format!(
                "{INFLIGHT}: {node} held a batch of {} records (fetch of {}), the bound is {}",
                l.max_batch, l.max_fetch, bounds.batch_max_records
            ));
        }
    }
    out
}
