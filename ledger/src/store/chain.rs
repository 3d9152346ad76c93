//! Hash chains: what an event looks like once stored (protected, canonical)
//! and how it is linked to the one before it.
//!
//! One chain per Kafka (topic, partition), named `topic/partition`, plus the
//! `system` chain for events the node writes itself. Each event's
//! `hash = SHA-256(prev_hash || canonical record bytes)` (docs/INTEGRITY.md);
//! its leaf in the chain's RFC 9162 Merkle tree is that hash.

use std::fmt::Write as _;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use crate::canonical::{chain_hash, ChainRecord, GENESIS};
use crate::envelope::Event;
use crate::merkle::{leaf_hash, CompactRange};

/// The chain of events the node writes itself (erasures, audited reads).
pub const SYSTEM_CHAIN: &str = "system";

/// The chain a Kafka partition's events are linked into.
pub fn kafka_chain_id(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// An event in the form it is stored and hashed: payload with protected
/// fields encrypted, JSON columns in canonical text.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub stream_id: String,
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub source: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// The data subject: the envelope's, or found in the payload by policy.
    pub subject_id: Option<String>,
    /// Canonical JSON text.
    pub payload: String,
    pub metadata: Option<String>,
    pub headers: String,
    pub blind_index: Vec<String>,
    pub content_hash: [u8; 32],
    pub kafka_topic: Option<String>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    /// Set by [`ChainHead::link`].
    pub chain_id: String,
    pub chain_position: u64,
    pub hash: [u8; 32],
}

impl StoredEvent {
    /// The stored form of an ingested event, before protection and linking:
    /// the caller replaces `payload` (and `blind_index`, `subject_id`).
    pub fn from_event(
        event: &Event,
        payload: String,
        ingested_at: DateTime<Utc>,
    ) -> Result<Self, crate::canonical::CanonicalError> {
        Ok(Self {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            occurred_at: normalized(event.occurred_at),
            ingested_at: normalized(ingested_at),
            source: event.source.clone(),
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
            subject_id: event.subject_id.clone(),
            payload,
            metadata: match &event.metadata {
                Some(m) => Some(canonical(m.get())?),
                None => None,
            },
            headers: event.headers.clone(),
            blind_index: Vec::new(),
            content_hash: event.content_hash,
            kafka_topic: Some(event.kafka_topic.clone()),
            kafka_partition: Some(event.kafka_partition),
            kafka_offset: Some(event.kafka_offset),
            // Set by `ChainHead::link`, which every stored event goes through.
            chain_id: String::new(),
            chain_position: 0,
            hash: [0; 32],
        })
    }

    pub fn record(&self) -> ChainRecord<'_> {
        ChainRecord {
            chain_id: &self.chain_id,
            position: self.chain_position,
            event_id: self.event_id,
            event_type: &self.event_type,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            occurred_at: self.occurred_at,
            ingested_at: self.ingested_at,
            source: self.source.as_deref(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            subject_id: self.subject_id.as_deref(),
            kafka_topic: self.kafka_topic.as_deref(),
            kafka_partition: self.kafka_partition,
            kafka_offset: self.kafka_offset,
            headers: &self.headers,
            metadata: self.metadata.as_deref(),
            payload: &self.payload,
            blind_index: &self.blind_index,
            content_hash: &self.content_hash,
        }
    }
}

/// Canonical JSON text of `json`, by the single-pass canonicaliser.
fn canonical(json: &str) -> Result<String, crate::canonical::CanonicalError> {
    let mut out = Vec::with_capacity(json.len());
    crate::canonical::write_canonical_text(json, &mut out)?;
    // The canonical form is built from UTF-8 input and ASCII punctuation.
    String::from_utf8(out).map_err(|e| {
        crate::canonical::CanonicalError::Json(serde::de::Error::custom(e.to_string()))
    })
}

/// Whole microseconds, and a leap second as the next second: the exact
/// instant PostgreSQL stores and the chain record encodes.
pub fn normalized(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t.trunc_subsecs(6))
}

/// A chain's head, read under the chain row's lock and advanced by each
/// appended event.
#[derive(Debug, Clone)]
pub struct ChainHead {
    pub chain_id: String,
    pub length: u64,
    pub head_hash: [u8; 32],
    pub frontier: CompactRange,
}

impl ChainHead {
    pub fn genesis(chain_id: &str) -> Self {
        Self {
            chain_id: chain_id.to_owned(),
            length: 0,
            head_hash: GENESIS,
            frontier: CompactRange::new(),
        }
    }

    /// Links `event` as the chain's next event: sets its chain id, position
    /// and hash. `scratch` is reused between events to avoid allocations.
    pub fn link(&mut self, event: &mut StoredEvent, scratch: &mut Vec<u8>) {
        event.chain_id.clone_from(&self.chain_id);
        event.chain_position = self.length;
        scratch.clear();
        event.record().encode(scratch);
        event.hash = chain_hash(&self.head_hash, scratch);
        self.head_hash = event.hash;
        self.frontier.push(leaf_hash(&event.hash));
        self.length += 1;
    }

    /// The chain's current Merkle root.
    pub fn root(&self) -> [u8; 32] {
        self.frontier.root()
    }
}

/// The COPY statement [`encode_copy_row`] produces rows for.
pub const COPY_EVENTS: &str =
    "COPY events (event_id, event_type, stream_id, stream_version, occurred_at, ingested_at, source,
     correlation_id, causation_id, subject_id, payload, metadata, headers, content_hash,
     kafka_topic, kafka_partition, kafka_offset, chain_id, chain_position, hash, blind_index) FROM STDIN";

/// [`COPY_EVENTS`] in COPY's binary format: PostgreSQL then skips parsing
/// uuids, timestamps, numbers, hex bytea and the array literal, and
/// scanning every byte for escapes (a sixth of the database's CPU per row
/// in a single-stream COPY of stored rows: docs/PERFORMANCE.md).
pub const COPY_EVENTS_BINARY: &str =
    "COPY events (event_id, event_type, stream_id, stream_version, occurred_at, ingested_at, source,
     correlation_id, causation_id, subject_id, payload, metadata, headers, content_hash,
     kafka_topic, kafka_partition, kafka_offset, chain_id, chain_position, hash, blind_index) FROM STDIN (FORMAT binary)";

/// The binary COPY header: signature, flags (no OIDs), no header extension.
pub const COPY_BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The binary COPY trailer: a field count of -1.
pub const COPY_BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// The type OID of `text`, for the `text[]` array's header.
const TEXT_OID: u32 = 25;

/// Field writers of COPY's binary format: each value is its length (i32,
/// big-endian; -1 for NULL) followed by the type's binary form.
mod binary {
    use super::PG_EPOCH_MICROS;
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    pub(super) fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        // A value over 2 GiB cannot be sent; PostgreSQL refuses the row
        // (its size is far beyond any configured payload limit anyway).
        out.extend_from_slice(&i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    pub(super) fn null(out: &mut Vec<u8>) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
    }
    pub(super) fn text(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            Some(v) => field(out, v.as_bytes()),
            None => null(out),
        }
    }
    pub(super) fn jsonb(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            Some(v) => {
                let len = i32::try_from(v.len() + 1).unwrap_or(i32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.push(1); // jsonb's binary format version
                out.extend_from_slice(v.as_bytes());
            }
            None => null(out),
        }
    }
    pub(super) fn uuid(out: &mut Vec<u8>, value: Option<Uuid>) {
        match value {
            Some(v) => field(out, v.as_bytes()),
            None => null(out),
        }
    }
    pub(super) fn int8(out: &mut Vec<u8>, value: Option<i64>) {
        match value {
            Some(v) => field(out, &v.to_be_bytes()),
            None => null(out),
        }
    }
    pub(super) fn time(out: &mut Vec<u8>, t: DateTime<Utc>) {
        field(out, &(t.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes());
    }
}

/// Claims event ids in `event_ids` by COPY: a plain insert, which fails on
/// an id already there (unique violation), where `INSERT ... ON CONFLICT DO
/// NOTHING` costs PostgreSQL about 2.3 times as much per row
/// (docs/PERFORMANCE.md).
pub const COPY_EVENT_IDS_BINARY: &str =
    "COPY event_ids (event_id, content_hash, occurred_at, kafka_topic, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";

/// Appends one row of [`COPY_EVENT_IDS_BINARY`] for `event` (after
/// [`COPY_BINARY_HEADER`]; end with [`COPY_BINARY_TRAILER`]): the values the
/// `ON CONFLICT` claim binds for it, `occurred_at` in whole microseconds
/// rounded down as `events` stores it.
pub fn encode_event_id_row_binary(out: &mut Vec<u8>, event: &Event) {
    use binary::{field, int8, text, time, uuid};
    out.extend_from_slice(&6i16.to_be_bytes());
    uuid(out, Some(event.event_id));
    field(out, &event.content_hash);
    time(out, event.occurred_at);
    text(out, Some(&event.kafka_topic));
    field(out, &event.kafka_partition.to_be_bytes());
    int8(out, Some(event.kafka_offset));
}

/// Appends one row of [`COPY_EVENTS_BINARY`] (after [`COPY_BINARY_HEADER`];
/// end the stream with [`COPY_BINARY_TRAILER`]). The same values as
/// [`encode_copy_row`] writes as text, which the tests check.
pub fn encode_copy_row_binary(out: &mut Vec<u8>, event: &StoredEvent) {
    use binary::{field, int8, jsonb, null, text, time, uuid};
    out.extend_from_slice(&21i16.to_be_bytes());
    uuid(out, Some(event.event_id));
    text(out, Some(&event.event_type));
    text(out, Some(&event.stream_id));
    int8(out, event.stream_version);
    time(out, event.occurred_at);
    time(out, event.ingested_at);
    text(out, event.source.as_deref());
    uuid(out, event.correlation_id);
    uuid(out, event.causation_id);
    text(out, event.subject_id.as_deref());
    jsonb(out, Some(&event.payload));
    jsonb(out, event.metadata.as_deref());
    jsonb(out, Some(&event.headers));
    field(out, &event.content_hash);
    text(out, event.kafka_topic.as_deref());
    match event.kafka_partition {
        Some(p) => field(out, &p.to_be_bytes()),
        None => null(out),
    }
    int8(out, event.kafka_offset);
    text(out, Some(&event.chain_id));
    // As a bigint; a position beyond i64::MAX (never reached) reads as
    // negative and fails the column's CHECK, as its text form fails input.
    field(out, &event.chain_position.to_be_bytes());
    field(out, &event.hash);
    // text[]: dimensions, has-nulls flag, element type, then per dimension
    // its length and lower bound (1), then the elements.
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let tokens = &event.blind_index;
    let dims: i32 = if tokens.is_empty() { 0 } else { 1 };
    out.extend_from_slice(&dims.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&TEXT_OID.to_be_bytes());
    if !tokens.is_empty() {
        out.extend_from_slice(
            &i32::try_from(tokens.len())
                .unwrap_or(i32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&1i32.to_be_bytes());
        for token in tokens {
            field(out, token.as_bytes());
        }
    }
    let len = i32::try_from(out.len() - at - 4).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends one row in COPY's text format (tab-separated, `\N` for NULL).
pub fn encode_copy_row(out: &mut String, event: &StoredEvent) {
    let _ = write!(out, "{}\t", event.event_id);
    copy_text(out, &event.event_type);
    out.push('\t');
    copy_text(out, &event.stream_id);
    out.push('\t');
    copy_opt_display(out, event.stream_version);
    out.push('\t');
    copy_time(out, event.occurred_at);
    out.push('\t');
    copy_time(out, event.ingested_at);
    out.push('\t');
    copy_opt_text(out, event.source.as_deref());
    out.push('\t');
    copy_opt_display(out, event.correlation_id);
    out.push('\t');
    copy_opt_display(out, event.causation_id);
    out.push('\t');
    copy_opt_text(out, event.subject_id.as_deref());
    out.push('\t');
    copy_text(out, &event.payload);
    out.push('\t');
    copy_opt_text(out, event.metadata.as_deref());
    out.push('\t');
    copy_text(out, &event.headers);
    out.push('\t');
    copy_bytea(out, &event.content_hash);
    out.push('\t');
    copy_opt_text(out, event.kafka_topic.as_deref());
    out.push('\t');
    copy_opt_display(out, event.kafka_partition);
    out.push('\t');
    copy_opt_display(out, event.kafka_offset);
    out.push('\t');
    copy_text(out, &event.chain_id);
    let _ = write!(out, "\t{}\t", event.chain_position);
    copy_bytea(out, &event.hash);
    out.push('\t');
    // A text[] literal; every element quoted, so no token can break it.
    out.push('{');
    for (i, token) in event.blind_index.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in token.chars() {
            match c {
                // Escaped once for the array literal, then again for COPY.
                '"' => out.push_str("\\\\\""),
                '\\' => out.push_str("\\\\\\\\"),
                _ => copy_char(out, c),
            }
        }
        out.push('"');
    }
    out.push_str("}\n");
}

fn copy_time(out: &mut String, t: DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    // Hand-rolled: chrono's strftime parser, then `write!`, showed up in
    // ingest profiles.
    let (year, month, day) = (t.year(), t.month(), t.day());
    let (hour, minute, second) = (t.hour(), t.minute(), t.second());
    let micros = t.timestamp_subsec_micros().min(999_999);
    if (0..=9999).contains(&year) {
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let mut digits = |at: usize, width: usize, mut value: u32| {
            for k in (at..at + width).rev() {
                text[k] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        digits(0, 4, year as u32);
        digits(5, 2, month);
        digits(8, 2, day);
        digits(11, 2, hour);
        digits(14, 2, minute);
        digits(17, 2, second.min(59));
        digits(20, 6, micros);
        out.push_str(std::str::from_utf8(&text).unwrap_or_default());
    } else {
        let _ = write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
    }
}

fn copy_bytea(out: &mut String, bytes: &[u8; 32]) {
    // bytea in text COPY: `\\x` + hex (the backslash itself is escaped).
    out.push_str("\\\\x");
    let mut hex = [0u8; 64];
    if hex::encode_to_slice(bytes, &mut hex).is_ok() {
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }
}

fn copy_opt_display(out: &mut String, value: Option<impl std::fmt::Display>) {
    match value {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("\\N"),
    }
}

fn copy_opt_text(out: &mut String, value: Option<&str>) {
    match value {
        Some(v) => copy_text(out, v),
        None => out.push_str("\\N"),
    }
}

/// COPY text escaping: backslash, tab, newline and carriage return.
pub fn copy_text(out: &mut String, value: &str) {
    // Byte-wise: the four special bytes never occur inside a multi-byte
    // UTF-8 sequence, so slicing at them keeps every slice valid UTF-8.
    let bytes = value.as_bytes();
    let mut start = 0;
    let mut i = 0;
    loop {
        i = next_candidate(bytes, i);
        let Some(&byte) = bytes.get(i) else {
            break;
        };
        let escape = match byte {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            // Another control byte: COPY takes it as is.
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&value[start..i]);
        out.push_str(escape);
        i += 1;
        start = i;
    }
    out.push_str(&value[start..]);
}

/// The first backslash or control byte at or after `from`: eight bytes at
/// a time, as the canonicaliser scans (a branch per byte was 3.6% of the
/// node's CPU).
fn next_candidate(bytes: &[u8], from: usize) -> usize {
    crate::canonical::find_control_or(bytes, from, [b'\\'])
}

fn copy_char(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        _ => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked escaper against the obvious one, on random text with
    /// special bytes at every position relative to the 32-byte chunks.
    #[test]
    fn copy_text_matches_a_byte_by_byte_escaper() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let naive = |value: &str| {
            let mut out = String::new();
            for c in value.chars() {
                copy_char(&mut out, c);
            }
            out
        };
        let alphabet = [
            'a', 'Z', '\\', '\t', '\n', '\r', '\u{1}', 'é', '€', '"', ' ',
        ];
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..5_000 {
            let len = rng.gen_range(0..200);
            let value: String = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.9) {
                        'x'
                    } else {
                        alphabet[rng.gen_range(0..alphabet.len())]
                    }
                })
                .collect();
            let mut out = String::new();
            copy_text(&mut out, &value);
            assert_eq!(out, naive(&value), "{value:?}");
        }
    }

    #[test]
    fn copy_time_matches_chrono() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(12);
        for _ in 0..5_000 {
            let micros = rng.gen_range(-62_135_596_800_000_000i64..253_402_300_799_999_999);
            let t = DateTime::from_timestamp_micros(micros).expect("in range");
            let mut out = String::new();
            copy_time(&mut out, t);
            assert_eq!(out, t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        }
    }

    #[test]
    fn blind_index_array_literal_quotes_every_token() {
        let mut event = StoredEvent {
            event_id: Uuid::nil(),
            event_type: "t".into(),
            stream_id: "s".into(),
            stream_version: None,
            occurred_at: DateTime::UNIX_EPOCH,
            ingested_at: DateTime::UNIX_EPOCH,
            source: None,
            correlation_id: None,
            causation_id: None,
            subject_id: None,
            payload: "{}".into(),
            metadata: None,
            headers: "[]".into(),
            blind_index: vec!["email:ab".into(), "we\"ird\\".into()],
            content_hash: [0; 32],
            kafka_topic: None,
            kafka_partition: None,
            kafka_offset: None,
            chain_id: SYSTEM_CHAIN.into(),
            chain_position: 0,
            hash: [0; 32],
        };
        let mut head = ChainHead::genesis(SYSTEM_CHAIN);
        let mut scratch = Vec::new();
        head.link(&mut event, &mut scratch);
        let mut row = String::new();
        encode_copy_row(&mut row, &event);
        assert!(
            row.ends_with("{\"email:ab\",\"we\\\\\"ird\\\\\\\\\"}\n"),
            "{row}"
        );
        assert!(row.contains("\\N\t\\N\t\\N\tsystem\t0\t"), "{row}");
        assert_eq!(head.length, 1);
    }
}
