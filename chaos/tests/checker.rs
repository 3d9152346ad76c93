//! The invariant checker on hand-made store states: it accepts the state a
//! correct in-order write leaves, and rejects each kind of violation.

use audit_chaos::check_exactly_once;
use audit_chaos::scenario::{GROUP, TOPIC};
use audit_chaos::SimLog;
use audit_ledger::store::memory::MemoryState;
use audit_ledger::store::MemoryStore;
use audit_ledger::{EventStore, ParseOptions, PreparedBatch, WriteBatch, WriteOutcome};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn log() -> SimLog {
    SimLog::generate(&mut StdRng::seed_from_u64(7), TOPIC, GROUP, 2, 60)
}

/// The log written in order, in batches of 7, by a correct writer.
async fn correct_state(log: &SimLog) -> MemoryState {
    let store = MemoryStore::new();
    for (p, records) in log.partitions.iter().enumerate() {
        let key = log.key(p as i32);
        let mut expected = None;
        for chunk in records.chunks(7) {
            let batch =
                PreparedBatch::parse(chunk.to_vec(), &ParseOptions::default()).expect("records");
            let write = WriteBatch {
                key: &key,
                expected,
                batch: &batch,
                writer: "test",
            };
            let outcome = store.write_batch(write).await.expect("write");
            assert!(matches!(outcome, WriteOutcome::Committed(_)));
            expected = Some(batch.next_offset);
        }
    }
    store.inspect(copy)
}

fn copy(state: &MemoryState) -> MemoryState {
    let mut out = MemoryState::default();
    out.events.clone_from(&state.events);
    out.dead_letters.clone_from(&state.dead_letters);
    out.duplicates.clone_from(&state.duplicates);
    out.offsets.clone_from(&state.offsets);
    out
}

fn violation(log: &SimLog, state: &MemoryState) -> String {
    check_exactly_once(log, state).expect_err("the checker must reject this state")
}

#[tokio::test]
async fn accepts_a_correct_run() {
    let log = log();
    let state = correct_state(&log).await;
    assert!(
        !state.dead_letters.is_empty() && !state.duplicates.is_empty(),
        "the log has every kind of record"
    );
    assert_eq!(check_exactly_once(&log, &state), Ok(()));
}

#[tokio::test]
async fn rejects_a_lost_record() {
    let log = log();
    let mut state = correct_state(&log).await;
    let lost = state.dead_letters.remove(0);
    let err = violation(&log, &state);
    let want = format!(
        "partition {} offset {}: lost (expected one dead letter)",
        lost.kafka_partition, lost.kafka_offset
    );
    assert!(err.contains(&want), "{err}");
}

#[tokio::test]
async fn rejects_an_event_stored_twice() {
    let log = log();
    let mut state = correct_state(&log).await;
    let again = state.events[3].clone();
    state.events.push(again.clone());
    let err = violation(&log, &state);
    assert!(
        err.contains(&format!("event {} stored twice", again.event_id)),
        "{err}"
    );
    assert!(err.contains(r#"stored as ["event", "event"]"#), "{err}");
}

#[tokio::test]
async fn rejects_a_record_in_the_wrong_place() {
    let log = log();
    let mut state = correct_state(&log).await;
    // A retry stored as a new event (a deduplication bug).
    let retry = state.duplicates.remove(0);
    let mut event = state
        .events
        .iter()
        .find(|e| e.event_id == retry.event_id)
        .expect("original")
        .clone();
    event.kafka_offset = retry.kafka_offset;
    event.event_id = uuid_like(retry.kafka_offset);
    let position = state
        .events
        .iter()
        .position(|e| {
            e.kafka_partition == retry.kafka_partition && e.kafka_offset > retry.kafka_offset
        })
        .unwrap_or(state.events.len());
    state.events.insert(position, event);
    let err = violation(&log, &state);
    assert!(
        err.contains(r#"stored as ["event"], expected one duplicate"#),
        "{err}"
    );
}

#[tokio::test]
async fn rejects_events_out_of_offset_order() {
    let log = log();
    let mut state = correct_state(&log).await;
    state.events.swap(1, 2);
    let err = violation(&log, &state);
    assert!(err.contains("event at offset"), "{err}");
}

#[tokio::test]
async fn rejects_an_offset_short_of_the_log_end() {
    let log = log();
    let mut state = correct_state(&log).await;
    let end = log.end(1).expect("records");
    state.offsets.insert(log.key(1), end - 1);
    let err = violation(&log, &state);
    assert!(
        err.contains(&format!(
            "partition 1: stored offset Some({}), the log ends at Some({end})",
            end - 1
        )),
        "{err}"
    );
}

#[tokio::test]
async fn rejects_rows_that_are_not_in_the_log() {
    let log = log();
    let mut state = correct_state(&log).await;
    let mut stray = state.duplicates[0].clone();
    stray.kafka_partition = 9;
    state.duplicates.push(stray);
    let err = violation(&log, &state);
    assert!(err.contains("which is not in the log"), "{err}");
}

fn uuid_like(n: i64) -> uuid::Uuid {
    uuid::Uuid::from_u128(0xdead_0000_0000_0000_0000_0000_0000_0000 | n as u128)
}
