//! The simulated topic's content: a log per partition, generated from a seed,
//! with what real producers send besides good events: malformed records,
//! producer retries (exact duplicates), reused event ids with other content,
//! and offsets that hold no record (transaction markers).

use audit_ledger::store::conformance::{envelope, record};
use audit_ledger::{OffsetKey, RawRecord};
use rand::rngs::StdRng;
use rand::Rng;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct SimLog {
    pub group_id: String,
    pub topic: String,
    /// Records of partition `i`, in offset order.
    pub partitions: Vec<Vec<RawRecord>>,
}

const MALFORMED: &[&[u8]] = &[
    b"{not json",
    b"",
    b"[1, 2, 3]",
    b"{\"event_id\": \"not-a-uuid\"}",
    b"\xff\xfe not utf-8",
];

impl SimLog {
    /// `records` records in each of `partitions` partitions. Event ids never
    /// repeat across partitions, so each partition's expected outcome depends
    /// on that partition alone.
    pub fn generate(
        rng: &mut StdRng,
        topic: &str,
        group_id: &str,
        partitions: usize,
        records: usize,
    ) -> Self {
        let partitions = (0..partitions)
            .map(|p| generate_partition(rng, topic, p as i32, records))
            .collect();
        Self {
            group_id: group_id.to_string(),
            topic: topic.to_string(),
            partitions,
        }
    }

    pub fn key(&self, partition: i32) -> OffsetKey {
        OffsetKey {
            group_id: self.group_id.clone(),
            topic: self.topic.clone(),
            partition,
        }
    }

    /// The offset after the last record: what must be stored at the end.
    pub fn end(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(partition as usize)?
            .last()
            .map(|r| r.offset + 1)
    }

    pub fn len(&self) -> usize {
        self.partitions.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn generate_partition(
    rng: &mut StdRng,
    topic: &str,
    partition: i32,
    records: usize,
) -> Vec<RawRecord> {
    let mut out = Vec::with_capacity(records);
    // Valid events so far: (event_id, value), for retries and reused ids.
    let mut valid: Vec<(String, Vec<u8>)> = Vec::new();
    let mut offset = 0i64;
    for _ in 0..records {
        if rng.gen_bool(0.03) {
            offset += 1; // a transaction marker: an offset with no record
        }
        let roll = rng.gen_range(0..100);
        let value = if roll < 6 {
            MALFORMED[rng.gen_range(0..MALFORMED.len())].to_vec()
        } else if roll < 14 && !valid.is_empty() {
            valid[rng.gen_range(0..valid.len())].1.clone()
        } else if roll < 18 && !valid.is_empty() {
            let (id, _) = &valid[rng.gen_range(0..valid.len())];
            // Same id, different content: amounts of new events are >= 0.
            envelope(id, "order-reused", -rng.gen_range(1..1000i64))
                .to_string()
                .into_bytes()
        } else {
            let id = Uuid::from_u128(rng.gen()).to_string();
            let stream = format!("order-{}", rng.gen_range(0..50));
            let value = envelope(&id, &stream, rng.gen_range(0..100_000))
                .to_string()
                .into_bytes();
            valid.push((id, value.clone()));
            value
        };
        out.push(record(topic, partition, offset, &value));
        offset += 1;
    }
    out
}
