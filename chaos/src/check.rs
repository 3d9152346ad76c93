//! The invariant of the whole system, checked on the store after a run.

use std::collections::{BTreeMap, HashMap, HashSet};

use audit_ledger::store::memory::MemoryState;
use audit_ledger::{classify, ParseOptions, PreparedBatch};

use crate::log::SimLog;

/// Most problems listed in one error.
const MAX_PROBLEMS: usize = 20;

/// Exactly once, for every partition of `log`:
/// - every record's offset is in exactly one of events, dead letters and
///   duplicates, and in the one processing the log in order gives;
/// - nothing is stored that is not in the log;
/// - no `event_id` is stored twice;
/// - each partition's rows are stored in offset order;
/// - the stored offset is the end of the log.
pub fn check_exactly_once(log: &SimLog, state: &MemoryState) -> Result<(), String> {
    let mut problems = Vec::new();
    let partition_of = |topic: &str, partition: i32| {
        (topic == log.topic && (partition as usize) < log.partitions.len()).then_some(partition)
    };

    // Where each (partition, offset) was stored, and in which order.
    let mut found: BTreeMap<(i32, i64), Vec<&'static str>> = BTreeMap::new();
    let mut order: HashMap<(&'static str, i32), Vec<i64>> = HashMap::new();
    let rows = state
        .events
        .iter()
        .map(|e| {
            (
                "event",
                e.kafka_topic.as_str(),
                e.kafka_partition,
                e.kafka_offset,
            )
        })
        .chain(state.dead_letters.iter().map(|d| {
            (
                "dead letter",
                d.kafka_topic.as_str(),
                d.kafka_partition,
                d.kafka_offset,
            )
        }))
        .chain(state.duplicates.iter().map(|d| {
            (
                "duplicate",
                d.kafka_topic.as_str(),
                d.kafka_partition,
                d.kafka_offset,
            )
        }));
    for (kind, topic, partition, offset) in rows {
        let Some(partition) = partition_of(topic, partition) else {
            problems.push(format!(
                "{kind} stored for {topic}/{partition}, which is not in the log"
            ));
            continue;
        };
        found.entry((partition, offset)).or_default().push(kind);
        order.entry((kind, partition)).or_default().push(offset);
    }

    for (p, records) in log.partitions.iter().enumerate() {
        let p = p as i32;
        for (offset, want) in expected_destinations(records) {
            match found.remove(&(p, offset)) {
                Some(got) if got == [want] => {}
                None => problems.push(format!(
                    "partition {p} offset {offset}: lost (expected one {want})"
                )),
                Some(got) => problems.push(format!(
                    "partition {p} offset {offset}: stored as {got:?}, expected one {want}"
                )),
            }
        }
        let end = log.end(p);
        let stored = state.offsets.get(&log.key(p)).copied();
        if stored != end {
            problems.push(format!(
                "partition {p}: stored offset {stored:?}, the log ends at {end:?}"
            ));
        }
    }
    for ((p, offset), got) in found {
        problems.push(format!(
            "partition {p} offset {offset}: stored as {got:?} but no such record"
        ));
    }

    let mut ids = HashSet::new();
    for event in &state.events {
        if !ids.insert(event.event_id) {
            problems.push(format!("event {} stored twice", event.event_id));
        }
    }

    let mut order: Vec<_> = order.into_iter().collect();
    order.sort();
    for ((kind, p), offsets) in order {
        if let Some(w) = offsets.windows(2).find(|w| w[0] >= w[1]) {
            problems.push(format!(
                "partition {p}: {kind} at offset {} stored after offset {}",
                w[1], w[0]
            ));
        }
    }

    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    problems.truncate(MAX_PROBLEMS);
    if total > MAX_PROBLEMS {
        problems.push(format!("... and {} more", total - MAX_PROBLEMS));
    }
    Err(format!(
        "{total} exactly-once violation(s):\n  {}",
        problems.join("\n  ")
    ))
}

/// The oracle: the whole partition classified as one batch is what reading
/// it in order, in any batches, must store. Valid because event ids do not
/// repeat across partitions (see [`SimLog::generate`]).
fn expected_destinations(records: &[audit_ledger::RawRecord]) -> BTreeMap<i64, &'static str> {
    let mut out = BTreeMap::new();
    let Some(batch) = PreparedBatch::parse(records.to_vec(), &ParseOptions::default()) else {
        return out;
    };
    let classified = classify(&batch, &HashMap::new());
    out.extend(classified.events.iter().map(|e| (e.kafka_offset, "event")));
    out.extend(
        classified
            .dead_letters
            .iter()
            .map(|d| (d.kafka_offset, "dead letter")),
    );
    out.extend(
        classified
            .duplicates
            .iter()
            .map(|d| (d.kafka_offset, "duplicate")),
    );
    out
}
