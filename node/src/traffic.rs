//! Deterministic synthetic order traffic for `audit-node produce` and `dev`.
//!
//! The generator is pure (no I/O, no wall clock, no global RNG): every byte it
//! emits — including event ids, trace ids and timestamps — comes from one
//! seeded [`SmallRng`], so a seed reproduces a run byte for byte. That makes
//! load tests and consumer bugs replayable.
//!
//! Output is a mix of three record kinds whose counts always add up:
//! - valid envelopes describing interleaved order lifecycles,
//! - invalid records the consumer must reject (see [`InvalidKind`]),
//! - byte-identical re-sends of recent valid records (at-least-once redelivery).
//!
//! Memory stays constant however many records are generated: at most
//! [`MAX_OPEN_ORDERS`] orders are in flight and only the last
//! [`RECENT_VALID_CAPACITY`] valid records are remembered for duplicates and
//! event-id reuse.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// Upper bound of orders whose lifecycle is in progress at the same time.
pub const MAX_OPEN_ORDERS: usize = 64;
/// How many recent valid records are kept for duplicates / reused event ids.
pub const RECENT_VALID_CAPACITY: usize = 1024;
/// Duplicates re-send one of the last this-many valid records, like a
/// redelivery after a producer retry or a consumer-side rewind would.
const DUPLICATE_WINDOW: usize = 256;

/// Top-level fields the consumer requires on every envelope.
pub const REQUIRED_FIELDS: [&str; 5] = [
    "event_id",
    "event_type",
    "stream_id",
    "occurred_at",
    "payload",
];
/// Every top-level field the consumer accepts; anything else is rejected.
#[cfg(test)]
pub const ALLOWED_FIELDS: [&str; 11] = [
    "event_id",
    "event_type",
    "stream_id",
    "stream_version",
    "occurred_at",
    "source",
    "correlation_id",
    "causation_id",
    "subject_id",
    "metadata",
    "payload",
];

const SOURCE: &str = "orders-service";
const PRODUCER_NAME: &str = "audit-node produce";
const SCHEMA_VERSION: u32 = 1;
const CURRENCY: &str = "EUR";
/// Number of distinct customers; small enough that customers place several orders.
const CUSTOMER_COUNT: u64 = 5_000;

/// 2026-01-01T00:00:00Z, the default base so output does not depend on "now".
const DEFAULT_BASE_UNIX_SECS: i64 = 1_767_225_600;

const FIRST_NAMES: [&str; 16] = [
    "Olivia", "Noah", "Amelia", "Oliver", "Isla", "George", "Ava", "Arthur", "Mia", "Muhammad",
    "Freya", "Leo", "Sophia", "Harry", "Grace", "Oscar",
];
const LAST_NAMES: [&str; 16] = [
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Robinson", "Wright", "Thompson", "Evans", "Walker", "White", "Khan",
];
const STREETS: [&str; 12] = [
    "High Street",
    "Station Road",
    "Church Lane",
    "Victoria Road",
    "Green Lane",
    "Manor Road",
    "Park Avenue",
    "Queen Street",
    "Mill Lane",
    "Kings Road",
    "The Crescent",
    "Baker Street",
];
/// (city, postal code) pairs so addresses look coherent.
const CITIES: [(&str, &str); 10] = [
    ("London", "EC1A 1BB"),
    ("Manchester", "M1 1AE"),
    ("Birmingham", "B1 1AA"),
    ("Leeds", "LS1 4DY"),
    ("Bristol", "BS1 4DJ"),
    ("Edinburgh", "EH1 1YZ"),
    ("Glasgow", "G1 1XQ"),
    ("Cardiff", "CF10 1EP"),
    ("Liverpool", "L1 8JQ"),
    ("Oxford", "OX1 2JD"),
];
/// (sku, unit price in cents).
const PRODUCTS: [(&str, u64); 12] = [
    ("SKU-KB-1001", 8_999),
    ("SKU-MS-1002", 2_499),
    ("SKU-HD-1003", 12_900),
    ("SKU-CB-1004", 1_299),
    ("SKU-MN-1005", 23_999),
    ("SKU-LP-1006", 3_450),
    ("SKU-BG-1007", 5_900),
    ("SKU-ST-1008", 1_999),
    ("SKU-CH-1009", 749),
    ("SKU-SD-1010", 4_299),
    ("SKU-WC-1011", 6_999),
    ("SKU-DK-1012", 31_900),
];
/// Well-known payment test card numbers (never real cards).
const TEST_CARDS: [&str; 8] = [
    "4111 1111 1111 1111",
    "4242 4242 4242 4242",
    "5555 5555 5555 4444",
    "5105 1051 0510 5100",
    "4000 0566 5566 5556",
    "4012 8888 8888 1881",
    "5200 8282 8282 8210",
    "6011 1111 1111 1117",
];
/// Documentation example IBANs (never real accounts).
const TEST_IBANS: [&str; 4] = [
    "DE89 3704 0044 0532 0130 00",
    "GB82 WEST 1234 5698 7654 32",
    "FR14 2004 1010 0505 0001 3M02 606",
    "NL91 ABNA 0417 1643 00",
];
const CARRIERS: [&str; 5] = ["DHL", "DPD", "UPS", "Royal Mail", "GLS"];
const CANCEL_REASONS: [&str; 5] = [
    "customer_request",
    "payment_failed",
    "out_of_stock",
    "fraud_suspected",
    "address_unverifiable",
];
const REFUND_REASONS: [&str; 5] = [
    "damaged_in_transit",
    "not_as_described",
    "late_delivery",
    "customer_changed_mind",
    "duplicate_charge",
];

/// One record ready to be sent to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub kind: RecordKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A new, well-formed event (counted once in `Summary::valid`).
    Valid,
    /// A record the consumer must reject.
    Invalid(InvalidKind),
    /// A byte-identical re-send of an earlier valid record.
    Duplicate,
}

/// The ways an invalid record is broken. Each one must be rejected by the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidKind {
    /// Not JSON at all (log lines, CSV, XML, truncated JSON).
    NotJson,
    /// Bytes that are not UTF-8 (UTF-16 with BOM, Latin-1 inside JSON).
    InvalidUtf8,
    /// One required top-level field is missing.
    MissingField,
    /// `event_id` is not a UUID.
    BadEventId,
    /// `occurred_at` is not RFC 3339.
    BadOccurredAt,
    /// `payload` is an array, string or number instead of an object.
    PayloadNotObject,
    /// `stream_version` is 0, negative, fractional or a string.
    BadStreamVersion,
    /// An extra top-level field.
    UnknownField,
    /// A well-formed envelope reusing an earlier valid event's `event_id` with
    /// different content (same key, so it lands after the original).
    ReusedEventId,
}

impl InvalidKind {
    /// `ReusedEventId` is last on purpose: it is excluded by slicing when no
    /// valid event exists yet.
    pub const ALL: [InvalidKind; 9] = [
        InvalidKind::NotJson,
        InvalidKind::InvalidUtf8,
        InvalidKind::MissingField,
        InvalidKind::BadEventId,
        InvalidKind::BadOccurredAt,
        InvalidKind::PayloadNotObject,
        InvalidKind::BadStreamVersion,
        InvalidKind::UnknownField,
        InvalidKind::ReusedEventId,
    ];

    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::NotJson => "not_json",
            InvalidKind::InvalidUtf8 => "invalid_utf8",
            InvalidKind::MissingField => "missing_field",
            InvalidKind::BadEventId => "bad_event_id",
            InvalidKind::BadOccurredAt => "bad_occurred_at",
            InvalidKind::PayloadNotObject => "payload_not_object",
            InvalidKind::BadStreamVersion => "bad_stream_version",
            InvalidKind::UnknownField => "unknown_field",
            InvalidKind::ReusedEventId => "reused_event_id",
        }
    }
}

/// Counts of generated records; `produced == valid + invalid + duplicates`.
/// Field order is the JSON output order of `audit-node produce`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub produced: u64,
    pub valid: u64,
    pub invalid: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Created,
    Paid,
    Shipped,
    Delivered,
}

#[derive(Debug, Clone)]
struct Address {
    line1: String,
    city: &'static str,
    postal_code: &'static str,
}

impl Address {
    fn to_json(&self) -> Value {
        json!({
            "line1": self.line1,
            "city": self.city,
            "postal_code": self.postal_code,
            "country": "GB",
        })
    }
}

#[derive(Debug, Clone)]
struct Customer {
    id: String,
    first: &'static str,
    last: &'static str,
    phone: String,
    address: Address,
}

impl Customer {
    fn name(&self) -> String {
        format!("{} {}", self.first, self.last)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name(),
            "email": format!("{}.{}@example.com", self.first, self.last).to_lowercase(),
            "phone": self.phone,
            "address": self.address.to_json(),
        })
    }
}

#[derive(Debug, Clone)]
struct Order {
    stream_id: String,
    correlation_id: Uuid,
    customer: Customer,
    /// Version of the last committed event of this stream.
    version: u64,
    last_event_id: Uuid,
    /// `occurred_at` of the last committed event of this stream.
    last_at: DateTime<Utc>,
    stage: Stage,
    total_cents: u64,
}

/// The next event of some order, computed but not yet applied, so invalid
/// records can be built from a realistic event without advancing any stream.
struct Draft {
    /// `Some(i)`: advances `open[i]`; `None`: a new order.
    slot: Option<usize>,
    /// The order's state after this event.
    order: Order,
    /// The order leaves the pool after this event (terminal state).
    closes: bool,
    event_id: Uuid,
    event_type: &'static str,
    causation_id: Option<Uuid>,
    occurred_at: DateTime<Utc>,
    payload: Value,
}

#[derive(Serialize)]
struct Envelope<'a> {
    event_id: Uuid,
    event_type: &'a str,
    stream_id: &'a str,
    stream_version: u64,
    occurred_at: String,
    source: &'a str,
    correlation_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    causation_id: Option<Uuid>,
    subject_id: &'a str,
    metadata: Metadata,
    payload: &'a Value,
}

#[derive(Serialize)]
struct Metadata {
    schema_version: u32,
    producer: &'static str,
}

/// Seeded generator of interleaved order lifecycles plus invalid and duplicate records.
pub struct TrafficGenerator {
    rng: SmallRng,
    seed: u64,
    invalid_ratio: f64,
    duplicate_ratio: f64,
    base_time: DateTime<Utc>,
    /// Milliseconds since `base_time` of the latest generated event.
    clock_ms: i64,
    next_order_no: u64,
    open: Vec<Order>,
    /// Last valid records (oldest first), bounded by `RECENT_VALID_CAPACITY`.
    recent_valid: VecDeque<GeneratedRecord>,
    summary: Summary,
}

impl TrafficGenerator {
    /// Ratios are clamped to `[0, 1]` (NaN counts as 0); if they sum above 1
    /// duplicates get what is left. Callers validate user input beforehand.
    pub fn new(seed: u64, invalid_ratio: f64, duplicate_ratio: f64) -> Self {
        let clamp = |r: f64| if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
        let invalid_ratio = clamp(invalid_ratio);
        let duplicate_ratio = clamp(duplicate_ratio).min(1.0 - invalid_ratio);
        let base_time = DateTime::from_timestamp(DEFAULT_BASE_UNIX_SECS, 0).unwrap_or_default();
        Self {
            rng: SmallRng::seed_from_u64(seed),
            seed,
            invalid_ratio,
            duplicate_ratio,
            base_time,
            clock_ms: 0,
            next_order_no: 1,
            open: Vec::with_capacity(MAX_OPEN_ORDERS),
            recent_valid: VecDeque::with_capacity(RECENT_VALID_CAPACITY),
            summary: Summary::default(),
        }
    }

    /// Timestamps start at `base` instead of 2026-01-01T00:00:00Z (`dev` uses now()).
    pub fn with_base_time(mut self, base: DateTime<Utc>) -> Self {
        self.base_time = base;
        self
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    pub fn next_record(&mut self) -> GeneratedRecord {
        // One draw decides the kind so the ratios hold independently of what
        // else the rng is used for.
        let roll: f64 = self.rng.gen();
        let record = if roll < self.invalid_ratio {
            self.summary.invalid += 1;
            self.next_invalid()
        } else if roll < self.invalid_ratio + self.duplicate_ratio && !self.recent_valid.is_empty()
        {
            self.summary.duplicates += 1;
            self.next_duplicate()
        } else {
            self.summary.valid += 1;
            self.next_valid()
        };
        self.summary.produced += 1;
        record
    }

    fn next_valid(&mut self) -> GeneratedRecord {
        let draft = self.draft_event();
        let value = self.serialize_draft(&draft);
        let record = GeneratedRecord {
            key: Some(draft.order.stream_id.clone().into_bytes()),
            value,
            headers: self.headers("application/json"),
            kind: RecordKind::Valid,
        };
        self.commit(draft);
        if self.recent_valid.len() == RECENT_VALID_CAPACITY {
            self.recent_valid.pop_front();
        }
        self.recent_valid.push_back(record.clone());
        record
    }

    fn next_duplicate(&mut self) -> GeneratedRecord {
        let window = self.recent_valid.len().min(DUPLICATE_WINDOW);
        let back = self.rng.gen_range(0..window);
        let index = self.recent_valid.len() - 1 - back;
        let mut record = self.recent_valid[index].clone();
        record.kind = RecordKind::Duplicate;
        record
    }

    fn next_invalid(&mut self) -> GeneratedRecord {
        let kinds = if self.recent_valid.is_empty() {
            &InvalidKind::ALL[..InvalidKind::ALL.len() - 1]
        } else {
            &InvalidKind::ALL[..]
        };
        let kind = kinds[self.rng.gen_range(0..kinds.len())];
        if kind == InvalidKind::ReusedEventId {
            if let Some(record) = self.reused_event_id() {
                return record;
            }
        }
        // Build a plausible next event for some order, then break it; the
        // draft is never committed, so streams are unaffected.
        let draft = self.draft_event();
        let key = Some(draft.order.stream_id.clone().into_bytes());
        let mut content_type = "application/json";
        let value = match kind {
            InvalidKind::NotJson => {
                content_type = "text/plain";
                self.not_json(&draft)
            }
            InvalidKind::InvalidUtf8 => self.invalid_utf8(&draft),
            _ => {
                let mut envelope = self.envelope_value(&draft);
                self.break_envelope(kind, &mut envelope, &draft);
                serde_json::to_vec(&envelope).unwrap_or_default()
            }
        };
        GeneratedRecord {
            key,
            value,
            headers: self.headers(content_type),
            kind: RecordKind::Invalid(kind),
        }
    }

    /// A schema-valid envelope carrying the `event_id` of a remembered valid
    /// event but different content, keyed like the original.
    fn reused_event_id(&mut self) -> Option<GeneratedRecord> {
        let index = self.rng.gen_range(0..self.recent_valid.len());
        let original = &self.recent_valid[index];
        let key = original.key.clone();
        let mut envelope: Value = serde_json::from_slice(&original.value).ok()?;
        let occurred_at = self.tick();
        let object = envelope.as_object_mut()?;
        object.insert("occurred_at".into(), json!(format_ts(occurred_at)));
        let payload = object.get_mut("payload")?.as_object_mut()?;
        // "amended" never appears in a valid payload, so the bytes always differ.
        payload.insert("amended".into(), json!(true));
        payload.insert(
            "amended_total_cents".into(),
            json!(self.rng.gen_range(100..100_000u64)),
        );
        let value = serde_json::to_vec(&envelope).ok()?;
        Some(GeneratedRecord {
            key,
            value,
            headers: self.headers("application/json"),
            kind: RecordKind::Invalid(InvalidKind::ReusedEventId),
        })
    }

    fn break_envelope(&mut self, kind: InvalidKind, envelope: &mut Value, draft: &Draft) {
        let Some(object) = envelope.as_object_mut() else {
            return;
        };
        match kind {
            InvalidKind::MissingField => {
                let field = REQUIRED_FIELDS[self.rng.gen_range(0..REQUIRED_FIELDS.len())];
                object.remove(field);
            }
            InvalidKind::BadEventId => {
                let id = draft.event_id.hyphenated().to_string();
                let bad = match self.rng.gen_range(0..4) {
                    // Truncated UUID (a lost character).
                    0 => json!(&id[..id.len() - 1]),
                    1 => json!(format!("evt-{:012x}", self.rng.gen::<u64>() >> 16)),
                    2 => json!(""),
                    _ => json!(self.rng.gen_range(1..10_000_000u64)),
                };
                object.insert("event_id".into(), bad);
            }
            InvalidKind::BadOccurredAt => {
                let at = draft.occurred_at;
                let bad = match self.rng.gen_range(0..5) {
                    // Missing offset: RFC 3339 requires one.
                    0 => json!(at.format("%Y-%m-%dT%H:%M:%S").to_string()),
                    1 => json!(at.format("%d/%m/%Y %H:%M:%S").to_string()),
                    2 => json!("yesterday"),
                    3 => json!(at.timestamp_millis()),
                    _ => json!(at.format("%Y-02-30T%H:%M:%SZ").to_string()),
                };
                object.insert("occurred_at".into(), bad);
            }
            InvalidKind::PayloadNotObject => {
                let payload = object.remove("payload").unwrap_or(Value::Null);
                let bad = match self.rng.gen_range(0..3) {
                    0 => Value::Array(vec![payload]),
                    // Double-encoded JSON, a classic producer bug.
                    1 => Value::String(payload.to_string()),
                    _ => json!(draft.order.total_cents),
                };
                object.insert("payload".into(), bad);
            }
            InvalidKind::BadStreamVersion => {
                let version = draft.order.version;
                let bad = match self.rng.gen_range(0..4) {
                    0 => json!(0),
                    1 => json!(-(self.rng.gen_range(1..5i64))),
                    2 => json!(version.to_string()),
                    _ => json!(version as f64 + 0.5),
                };
                object.insert("stream_version".into(), bad);
            }
            InvalidKind::UnknownField => {
                let (field, value) = match self.rng.gen_range(0..4) {
                    0 => ("eventType", json!(draft.event_type)),
                    1 => ("retry_count", json!(self.rng.gen_range(1..5u32))),
                    2 => ("tenant_id", json!("tenant-eu-1")),
                    _ => ("debug", json!({"host": "orders-7f9c", "build": "1.4.2"})),
                };
                object.insert(field.into(), value);
            }
            // Handled by the caller; nothing to break here.
            InvalidKind::NotJson | InvalidKind::InvalidUtf8 | InvalidKind::ReusedEventId => {}
        }
    }

    fn not_json(&mut self, draft: &Draft) -> Vec<u8> {
        let order = &draft.order;
        match self.rng.gen_range(0..4) {
            0 => format!(
                "{} {} stream={} customer={} total={}",
                format_ts(draft.occurred_at),
                draft.event_type,
                order.stream_id,
                order.customer.id,
                order.total_cents
            )
            .into_bytes(),
            1 => format!(
                "{},{},{},{},{}",
                draft.event_id,
                draft.event_type,
                order.stream_id,
                format_ts(draft.occurred_at),
                order.total_cents
            )
            .into_bytes(),
            2 => format!(
                "<event><id>{}</id><type>{}</type><stream>{}</stream></event>",
                draft.event_id, draft.event_type, order.stream_id
            )
            .into_bytes(),
            _ => {
                // A proper prefix of a JSON object never parses: the closing
                // brace is missing.
                let mut full = self.serialize_draft(draft);
                let cut = self.rng.gen_range(1..full.len().max(2));
                full.truncate(cut);
                full
            }
        }
    }

    fn invalid_utf8(&mut self, draft: &Draft) -> Vec<u8> {
        let full = self.serialize_draft(draft);
        if self.rng.gen_bool(0.5) {
            // UTF-16LE with BOM: 0xFF never occurs in UTF-8.
            let text = String::from_utf8_lossy(&full).into_owned();
            let mut bytes = vec![0xff, 0xfe];
            bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
            bytes
        } else {
            // Latin-1 'é' (0xE9) inside a string: a UTF-8 lead byte followed by
            // ASCII is invalid.
            let mut bytes = full;
            let needle = SOURCE.as_bytes();
            match bytes.windows(needle.len()).position(|w| w == needle) {
                Some(at) => bytes[at + 8] = 0xe9, // orders-s[e]rvice
                None => bytes.insert(0, 0xff),
            }
            bytes
        }
    }

    /// Picks an order (new or in flight) and computes its next event without
    /// mutating the pool.
    fn draft_event(&mut self) -> Draft {
        let occurred_at = self.tick();
        let create =
            self.open.is_empty() || (self.open.len() < MAX_OPEN_ORDERS && self.rng.gen_bool(0.3));
        if create {
            return self.draft_created(occurred_at);
        }
        let slot = self.rng.gen_range(0..self.open.len());
        let mut order = self.open[slot].clone();
        let causation_id = Some(order.last_event_id);
        let event_id = self.uuid();
        let roll: f64 = self.rng.gen();
        let (event_type, next_stage, closes, payload) = match order.stage {
            Stage::Created if roll < 0.8 => {
                ("order.paid", Stage::Paid, false, self.paid_payload(&order))
            }
            Stage::Created => (
                "order.cancelled",
                Stage::Created,
                true,
                self.cancelled_payload(),
            ),
            Stage::Paid if roll < 0.85 => (
                "order.shipped",
                Stage::Shipped,
                false,
                self.shipped_payload(&order),
            ),
            Stage::Paid if roll < 0.93 => (
                "order.cancelled",
                Stage::Paid,
                true,
                self.cancelled_payload(),
            ),
            Stage::Paid => (
                "order.refunded",
                Stage::Paid,
                true,
                self.refunded_payload(&order),
            ),
            // Most delivered orders are done; one in ten stays open for a refund.
            Stage::Shipped => (
                "order.delivered",
                Stage::Delivered,
                roll < 0.9,
                self.delivered_payload(&order, occurred_at),
            ),
            Stage::Delivered => (
                "order.refunded",
                Stage::Delivered,
                true,
                self.refunded_payload(&order),
            ),
        };
        order.version += 1;
        order.last_event_id = event_id;
        order.last_at = occurred_at;
        order.stage = next_stage;
        Draft {
            slot: Some(slot),
            order,
            closes,
            event_id,
            event_type,
            causation_id,
            occurred_at,
            payload,
        }
    }

    fn draft_created(&mut self, occurred_at: DateTime<Utc>) -> Draft {
        let number = self.next_order_no;
        self.next_order_no += 1;
        let customer_number = self.rng.gen_range(1..=CUSTOMER_COUNT);
        let customer = self.customer(customer_number);
        let item_count = self.rng.gen_range(1..=3);
        let mut items = Vec::with_capacity(item_count);
        let mut total_cents = 0;
        for _ in 0..item_count {
            let (sku, unit_price_cents) = PRODUCTS[self.rng.gen_range(0..PRODUCTS.len())];
            let quantity: u64 = self.rng.gen_range(1..=3);
            total_cents += quantity * unit_price_cents;
            items.push(json!({
                "sku": sku,
                "quantity": quantity,
                "unit_price_cents": unit_price_cents,
            }));
        }
        let payload = json!({
            "customer": customer.to_json(),
            "items": items,
            "total_cents": total_cents,
            "currency": CURRENCY,
        });
        let event_id = self.uuid();
        let order = Order {
            stream_id: format!("order-{number}"),
            correlation_id: self.uuid(),
            customer,
            version: 1,
            last_event_id: event_id,
            last_at: occurred_at,
            stage: Stage::Created,
            total_cents,
        };
        Draft {
            slot: None,
            order,
            closes: false,
            event_id,
            event_type: "order.created",
            causation_id: None,
            occurred_at,
            payload,
        }
    }

    fn commit(&mut self, draft: Draft) {
        match (draft.slot, draft.closes) {
            (Some(slot), true) => {
                // Order in the pool is irrelevant (picks are random), so O(1) removal.
                self.open.swap_remove(slot);
            }
            (Some(slot), false) => self.open[slot] = draft.order,
            (None, true) => {}
            (None, false) => self.open.push(draft.order),
        }
    }

    fn paid_payload(&mut self, order: &Order) -> Value {
        let mut payment = if self.rng.gen_bool(0.8) {
            json!({
                "method": "card",
                "card": {
                    "number": TEST_CARDS[self.rng.gen_range(0..TEST_CARDS.len())],
                    "expiry": format!(
                        "{:02}/{:02}",
                        self.rng.gen_range(1..=12),
                        self.rng.gen_range(27..=31)
                    ),
                    "holder": order.customer.name(),
                },
            })
        } else {
            json!({
                "method": "sepa",
                "iban": TEST_IBANS[self.rng.gen_range(0..TEST_IBANS.len())],
            })
        };
        if let Some(object) = payment.as_object_mut() {
            object.insert("amount_cents".into(), json!(order.total_cents));
            object.insert("currency".into(), json!(CURRENCY));
        }
        json!({ "payment": payment })
    }

    fn shipped_payload(&mut self, order: &Order) -> Value {
        // Mostly the customer's own address, sometimes a gift to someone else.
        let address = if self.rng.gen_bool(0.85) {
            order.customer.address.clone()
        } else {
            self.address()
        };
        const ALNUM: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789";
        let tracking: String = (0..14)
            .map(|_| char::from(ALNUM[self.rng.gen_range(0..ALNUM.len())]))
            .collect();
        json!({
            "carrier": CARRIERS[self.rng.gen_range(0..CARRIERS.len())],
            "tracking_number": tracking,
            "shipping_address": address.to_json(),
        })
    }

    fn delivered_payload(&mut self, order: &Order, occurred_at: DateTime<Utc>) -> Value {
        let signed_by = if self.rng.gen_bool(0.8) {
            order.customer.name()
        } else {
            format!("{} {}", self.first_name(), self.last_name())
        };
        // The courier's scan happened after shipping and before this event
        // reached the orders service. The clock is strictly increasing, so
        // the gap is at least 1 ms.
        let gap_ms = (occurred_at - order.last_at).num_milliseconds().max(1);
        let delivered_at = occurred_at - Duration::milliseconds(self.rng.gen_range(0..gap_ms));
        json!({
            "delivered_at": format_ts(delivered_at),
            "signed_by": signed_by,
        })
    }

    fn cancelled_payload(&mut self) -> Value {
        json!({ "reason": CANCEL_REASONS[self.rng.gen_range(0..CANCEL_REASONS.len())] })
    }

    fn refunded_payload(&mut self, order: &Order) -> Value {
        let amount_cents = if self.rng.gen_bool(0.7) {
            order.total_cents
        } else {
            self.rng.gen_range(1..=order.total_cents.max(1))
        };
        json!({
            "amount_cents": amount_cents,
            "reason": REFUND_REASONS[self.rng.gen_range(0..REFUND_REASONS.len())],
        })
    }

    /// The same customer id always yields the same person within a seed, so
    /// repeat customers look consistent across orders.
    fn customer(&self, number: u64) -> Customer {
        let mut rng = SmallRng::seed_from_u64(
            self.seed.rotate_left(29) ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let (city, postal_code) = CITIES[rng.gen_range(0..CITIES.len())];
        Customer {
            id: format!("customer-{number}"),
            first: FIRST_NAMES[rng.gen_range(0..FIRST_NAMES.len())],
            last: LAST_NAMES[rng.gen_range(0..LAST_NAMES.len())],
            // Ofcom reserves 020 7946 0000-0999 for fiction.
            phone: format!("+44 20 7946 0{:03}", rng.gen_range(0..1000)),
            address: Address {
                line1: format!(
                    "{} {}",
                    rng.gen_range(1..200),
                    STREETS[rng.gen_range(0..STREETS.len())]
                ),
                city,
                postal_code,
            },
        }
    }

    fn address(&mut self) -> Address {
        let (city, postal_code) = CITIES[self.rng.gen_range(0..CITIES.len())];
        Address {
            line1: format!(
                "{} {}",
                self.rng.gen_range(1..200),
                STREETS[self.rng.gen_range(0..STREETS.len())]
            ),
            city,
            postal_code,
        }
    }

    fn first_name(&mut self) -> &'static str {
        FIRST_NAMES[self.rng.gen_range(0..FIRST_NAMES.len())]
    }

    fn last_name(&mut self) -> &'static str {
        LAST_NAMES[self.rng.gen_range(0..LAST_NAMES.len())]
    }

    fn envelope<'a>(&self, draft: &'a Draft) -> Envelope<'a> {
        Envelope {
            event_id: draft.event_id,
            event_type: draft.event_type,
            stream_id: &draft.order.stream_id,
            stream_version: draft.order.version,
            occurred_at: format_ts(draft.occurred_at),
            source: SOURCE,
            correlation_id: draft.order.correlation_id,
            causation_id: draft.causation_id,
            subject_id: &draft.order.customer.id,
            metadata: Metadata {
                schema_version: SCHEMA_VERSION,
                producer: PRODUCER_NAME,
            },
            payload: &draft.payload,
        }
    }

    fn serialize_draft(&self, draft: &Draft) -> Vec<u8> {
        // Serializing plain structs, strings and `Value`s cannot fail.
        serde_json::to_vec(&self.envelope(draft)).unwrap_or_default()
    }

    fn envelope_value(&self, draft: &Draft) -> Value {
        serde_json::to_value(self.envelope(draft)).unwrap_or(Value::Null)
    }

    fn headers(&mut self, content_type: &str) -> Vec<(String, Vec<u8>)> {
        // W3C trace context; ids come from the rng to stay deterministic.
        let trace_id: u128 = self.rng.gen::<u128>() | 1;
        let span_id: u64 = self.rng.gen::<u64>() | 1;
        vec![
            ("content-type".to_owned(), content_type.as_bytes().to_vec()),
            (
                "traceparent".to_owned(),
                format!("00-{trace_id:032x}-{span_id:016x}-01").into_bytes(),
            ),
        ]
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.gen()).into_uuid()
    }

    /// Advances the synthetic clock by 1–20 ms (≈100 events/s of event time,
    /// so `dev` at modest rates stays close to wall-clock time).
    fn tick(&mut self) -> DateTime<Utc> {
        self.clock_ms += self.rng.gen_range(1..=20);
        self.base_time + Duration::milliseconds(self.clock_ms)
    }
}

fn format_ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use super::*;

    fn generate(generator: &mut TrafficGenerator, n: usize) -> Vec<GeneratedRecord> {
        (0..n).map(|_| generator.next_record()).collect()
    }

    /// Reference implementation of the consumer's envelope rules; returns the
    /// parsed envelope when the record is acceptable on its own.
    fn check_envelope(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("utf8: {e}"))?;
        let value: Value = serde_json::from_str(text).map_err(|e| format!("json: {e}"))?;
        let Value::Object(object) = value else {
            return Err("not an object".into());
        };
        for key in object.keys() {
            if !ALLOWED_FIELDS.contains(&key.as_str()) {
                return Err(format!("unknown field {key}"));
            }
        }
        for field in REQUIRED_FIELDS {
            if !object.contains_key(field) {
                return Err(format!("missing {field}"));
            }
        }
        let str_field = |name: &str| object.get(name).and_then(Value::as_str);
        str_field("event_id")
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or("bad event_id")?;
        str_field("event_type").ok_or("bad event_type")?;
        str_field("stream_id").ok_or("bad stream_id")?;
        str_field("occurred_at")
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .ok_or("bad occurred_at")?;
        if !object["payload"].is_object() {
            return Err("payload not object".into());
        }
        if let Some(version) = object.get("stream_version") {
            match version.as_u64() {
                Some(v) if v >= 1 => {}
                _ => return Err("bad stream_version".into()),
            }
        }
        for name in ["correlation_id", "causation_id"] {
            if let Some(v) = object.get(name) {
                v.as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or(format!("bad {name}"))?;
            }
        }
        if let Some(m) = object.get("metadata") {
            if !m.is_object() {
                return Err("metadata not object".into());
            }
        }
        Ok(object)
    }

    #[test]
    fn same_seed_gives_identical_output() {
        let mut a = TrafficGenerator::new(7, 0.05, 0.05);
        let mut b = TrafficGenerator::new(7, 0.05, 0.05);
        assert_eq!(generate(&mut a, 3_000), generate(&mut b, 3_000));
        assert_eq!(a.summary(), b.summary());

        let mut c = TrafficGenerator::new(8, 0.05, 0.05);
        let mut a = TrafficGenerator::new(7, 0.05, 0.05);
        assert_ne!(generate(&mut a, 10), generate(&mut c, 10));
    }

    #[test]
    fn counts_add_up_and_ratios_hold() {
        let mut generator = TrafficGenerator::new(42, 0.02, 0.01);
        let records = generate(&mut generator, 10_000);
        let summary = generator.summary();
        assert_eq!(summary.produced, 10_000);
        assert_eq!(
            summary.valid + summary.invalid + summary.duplicates,
            summary.produced
        );
        let count =
            |pred: fn(&RecordKind) -> bool| records.iter().filter(|r| pred(&r.kind)).count() as u64;
        assert_eq!(count(|k| *k == RecordKind::Valid), summary.valid);
        assert_eq!(
            count(|k| matches!(k, RecordKind::Invalid(_))),
            summary.invalid
        );
        assert_eq!(count(|k| *k == RecordKind::Duplicate), summary.duplicates);
        // Expected 200 ± 14 and 100 ± 10 (one standard deviation).
        assert!((140..=260).contains(&summary.invalid), "{summary:?}");
        assert!((60..=140).contains(&summary.duplicates), "{summary:?}");
        assert_eq!(
            serde_json::to_string(&summary).unwrap(),
            format!(
                r#"{{"produced":10000,"valid":{},"invalid":{},"duplicates":{}}}"#,
                summary.valid, summary.invalid, summary.duplicates
            )
        );
    }

    #[test]
    fn valid_records_follow_the_envelope_schema() {
        let mut generator = TrafficGenerator::new(1, 0.0, 0.0);
        let mut event_ids = HashSet::new();
        let mut sizes = Vec::new();
        let mut event_types = BTreeSet::new();
        for record in generate(&mut generator, 5_000) {
            assert_eq!(record.kind, RecordKind::Valid);
            let object = check_envelope(&record.value).unwrap();
            assert!(event_ids.insert(object["event_id"].as_str().unwrap().to_owned()));
            assert_eq!(
                record.key.as_deref(),
                Some(object["stream_id"].as_str().unwrap().as_bytes())
            );
            assert_eq!(object["source"], "orders-service");
            assert_eq!(object["metadata"]["producer"], "audit-node produce");
            assert!(object["subject_id"]
                .as_str()
                .unwrap()
                .starts_with("customer-"));
            assert_eq!(
                record.headers[0],
                ("content-type".into(), b"application/json".to_vec())
            );
            assert_eq!(record.headers[1].0, "traceparent");
            event_types.insert(object["event_type"].as_str().unwrap().to_owned());
            sizes.push(record.value.len());
        }
        let expected: BTreeSet<String> = [
            "order.created",
            "order.paid",
            "order.shipped",
            "order.delivered",
            "order.cancelled",
            "order.refunded",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(event_types, expected);
        let min = sizes.iter().min().unwrap();
        let max = sizes.iter().max().unwrap();
        assert!(*min >= 380 && *max <= 950, "value sizes {min}..{max}");
    }

    #[test]
    fn payloads_carry_personal_data_at_stable_paths() {
        let mut generator = TrafficGenerator::new(3, 0.0, 0.0);
        let (mut cards, mut sepa, mut created) = (0, 0, 0);
        for record in generate(&mut generator, 3_000) {
            let v: Value = serde_json::from_slice(&record.value).unwrap();
            let p = &v["payload"];
            match v["event_type"].as_str().unwrap() {
                "order.created" => {
                    created += 1;
                    let c = &p["customer"];
                    assert_eq!(c["id"], v["subject_id"]);
                    for path in [
                        "/name",
                        "/email",
                        "/phone",
                        "/address/line1",
                        "/address/city",
                        "/address/postal_code",
                    ] {
                        assert!(c.pointer(path).and_then(Value::as_str).is_some(), "{path}");
                    }
                    assert_eq!(c["address"]["country"], "GB");
                    assert!(c["email"].as_str().unwrap().ends_with("@example.com"));
                    assert!(c["phone"].as_str().unwrap().starts_with("+44 20 7946 0"));
                    let items = p["items"].as_array().unwrap();
                    let total: u64 = items
                        .iter()
                        .map(|i| {
                            i["quantity"].as_u64().unwrap()
                                * i["unit_price_cents"].as_u64().unwrap()
                        })
                        .sum();
                    assert_eq!(p["total_cents"].as_u64(), Some(total));
                    assert_eq!(p["currency"], "EUR");
                }
                "order.paid" => match p["payment"]["method"].as_str().unwrap() {
                    "card" => {
                        cards += 1;
                        let number = p["payment"]["card"]["number"].as_str().unwrap();
                        assert_eq!(number.chars().filter(char::is_ascii_digit).count(), 16);
                        assert!(p.pointer("/payment/card/expiry").is_some());
                        assert!(p.pointer("/payment/card/holder").is_some());
                    }
                    "sepa" => {
                        sepa += 1;
                        assert!(p["payment"]["iban"].as_str().is_some());
                    }
                    other => panic!("method {other}"),
                },
                "order.shipped" => {
                    assert!(p["carrier"].is_string() && p["tracking_number"].is_string());
                    assert_eq!(p["shipping_address"]["country"], "GB");
                }
                "order.delivered" => {
                    let delivered_at = p["delivered_at"].as_str().unwrap();
                    let occurred_at = v["occurred_at"].as_str().unwrap();
                    assert!(DateTime::parse_from_rfc3339(delivered_at).is_ok());
                    // Same format, so string order is time order.
                    assert!(
                        delivered_at <= occurred_at && delivered_at > "2026-01-01T00:00:00.000Z"
                    );
                    assert!(p["signed_by"].is_string());
                }
                "order.cancelled" => assert!(p["reason"].is_string()),
                "order.refunded" => {
                    assert!(p["amount_cents"].as_u64().unwrap() >= 1);
                    assert!(p["reason"].is_string());
                }
                other => panic!("event type {other}"),
            }
        }
        assert!(created > 0 && cards > 0 && sepa > 0);
    }

    #[test]
    fn streams_are_consistent_lifecycles() {
        struct Stream {
            version: u64,
            last_event_id: String,
            correlation_id: String,
            last_type: String,
            subject_id: String,
        }
        let mut generator = TrafficGenerator::new(11, 0.1, 0.1);
        let mut streams: HashMap<String, Stream> = HashMap::new();
        let mut interleaved = 0;
        let mut previous_stream = String::new();
        for record in generate(&mut generator, 20_000) {
            if record.kind != RecordKind::Valid {
                continue;
            }
            let v: Value = serde_json::from_slice(&record.value).unwrap();
            let stream_id = v["stream_id"].as_str().unwrap().to_owned();
            let event_type = v["event_type"].as_str().unwrap().to_owned();
            let version = v["stream_version"].as_u64().unwrap();
            let event_id = v["event_id"].as_str().unwrap().to_owned();
            if stream_id != previous_stream {
                interleaved += 1;
            }
            previous_stream = stream_id.clone();
            match streams.get_mut(&stream_id) {
                None => {
                    assert_eq!(event_type, "order.created");
                    assert_eq!(version, 1);
                    assert!(v.get("causation_id").is_none());
                    streams.insert(
                        stream_id,
                        Stream {
                            version,
                            last_event_id: event_id,
                            correlation_id: v["correlation_id"].as_str().unwrap().to_owned(),
                            last_type: event_type,
                            subject_id: v["subject_id"].as_str().unwrap().to_owned(),
                        },
                    );
                }
                Some(s) => {
                    assert_eq!(version, s.version + 1, "{stream_id}");
                    assert_eq!(v["causation_id"].as_str(), Some(s.last_event_id.as_str()));
                    assert_eq!(
                        v["correlation_id"].as_str(),
                        Some(s.correlation_id.as_str())
                    );
                    assert_eq!(v["subject_id"].as_str(), Some(s.subject_id.as_str()));
                    let allowed: &[&str] = match s.last_type.as_str() {
                        "order.created" => &["order.paid", "order.cancelled"],
                        "order.paid" => &["order.shipped", "order.cancelled", "order.refunded"],
                        "order.shipped" => &["order.delivered"],
                        "order.delivered" => &["order.refunded"],
                        terminal => panic!("event after terminal {terminal} in {stream_id}"),
                    };
                    assert!(
                        allowed.contains(&event_type.as_str()),
                        "{} -> {event_type}",
                        s.last_type
                    );
                    s.version = version;
                    s.last_event_id = event_id;
                    s.last_type = event_type;
                }
            }
        }
        assert!(streams.len() > 100);
        // Consecutive events mostly belong to different orders.
        assert!(interleaved > 10_000, "interleaved {interleaved}");
        assert!(generator.open.len() <= MAX_OPEN_ORDERS);
        assert!(generator.recent_valid.len() <= RECENT_VALID_CAPACITY);
    }

    #[test]
    fn duplicates_and_reused_ids_refer_to_earlier_valid_records() {
        let mut generator = TrafficGenerator::new(5, 0.2, 0.2);
        type Sent = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);
        let mut seen_valid: HashSet<Sent> = HashSet::new();
        let mut valid_by_event_id: HashMap<String, (Option<Vec<u8>>, Vec<u8>)> = HashMap::new();
        let (mut duplicates, mut reused) = (0, 0);
        for record in generate(&mut generator, 20_000) {
            match record.kind {
                RecordKind::Valid => {
                    let object = check_envelope(&record.value).unwrap();
                    let id = object["event_id"].as_str().unwrap().to_owned();
                    valid_by_event_id.insert(id, (record.key.clone(), record.value.clone()));
                    seen_valid.insert((record.key, record.value, record.headers));
                }
                RecordKind::Duplicate => {
                    duplicates += 1;
                    assert!(seen_valid.contains(&(record.key, record.value, record.headers)));
                }
                RecordKind::Invalid(InvalidKind::ReusedEventId) => {
                    reused += 1;
                    // Schema-valid on its own; only the id collision makes it invalid.
                    let object = check_envelope(&record.value).unwrap();
                    let id = object["event_id"].as_str().unwrap();
                    let (key, value) = valid_by_event_id.get(id).expect("reuses a known id");
                    assert_eq!(&record.key, key);
                    assert_ne!(&record.value, value);
                    let original: Value = serde_json::from_slice(value).unwrap();
                    assert_ne!(original["payload"], object["payload"]);
                }
                RecordKind::Invalid(_) => {}
            }
        }
        assert!(duplicates > 3_000 && reused > 100, "{duplicates} {reused}");
    }

    #[test]
    fn every_invalid_kind_occurs_and_is_rejected() {
        let mut generator = TrafficGenerator::new(9, 0.6, 0.0);
        let mut kinds = BTreeMap::new();
        let mut names = BTreeSet::new();
        let mut valid_ids = HashSet::new();
        for record in generate(&mut generator, 10_000) {
            match record.kind {
                RecordKind::Valid => {
                    let object = check_envelope(&record.value).unwrap();
                    valid_ids.insert(object["event_id"].as_str().unwrap().to_owned());
                }
                RecordKind::Invalid(kind) => {
                    *kinds.entry(kind).or_insert(0) += 1;
                    names.insert(kind.as_str());
                    match check_envelope(&record.value) {
                        Err(_) => assert_ne!(kind, InvalidKind::ReusedEventId),
                        Ok(object) => {
                            assert_eq!(kind, InvalidKind::ReusedEventId, "{:?} accepted", kind);
                            assert!(valid_ids.contains(object["event_id"].as_str().unwrap()));
                        }
                    }
                    if kind == InvalidKind::InvalidUtf8 {
                        assert!(std::str::from_utf8(&record.value).is_err());
                    }
                    if kind == InvalidKind::NotJson {
                        assert!(serde_json::from_slice::<Value>(&record.value).is_err());
                    }
                }
                RecordKind::Duplicate => panic!("no duplicates requested"),
            }
        }
        assert_eq!(kinds.len(), InvalidKind::ALL.len(), "{kinds:?}");
        assert_eq!(names.len(), InvalidKind::ALL.len());
        assert!(kinds.values().all(|&n| n > 300), "{kinds:?}");
    }

    #[test]
    fn extreme_ratios() {
        let mut all_invalid = TrafficGenerator::new(1, 1.0, 0.0);
        let records = generate(&mut all_invalid, 500);
        assert!(records
            .iter()
            .all(|r| matches!(r.kind, RecordKind::Invalid(k) if k != InvalidKind::ReusedEventId)));
        assert_eq!(all_invalid.summary().invalid, 500);

        let mut all_duplicates = TrafficGenerator::new(1, 0.0, 1.0);
        let records = generate(&mut all_duplicates, 500);
        assert_eq!(records[0].kind, RecordKind::Valid);
        assert!(records[1..].iter().all(|r| r.value == records[0].value));
        let summary = all_duplicates.summary();
        assert_eq!((summary.valid, summary.duplicates), (1, 499));

        // Out-of-range input is clamped rather than panicking.
        let mut clamped = TrafficGenerator::new(1, f64::NAN, 7.0);
        generate(&mut clamped, 10);
        assert_eq!(clamped.summary().produced, 10);
    }

    #[test]
    fn timestamps_start_at_the_base_time() {
        let mut generator = TrafficGenerator::new(2, 0.0, 0.0);
        let first: Value = serde_json::from_slice(&generator.next_record().value).unwrap();
        let at = first["occurred_at"].as_str().unwrap();
        assert!(at.starts_with("2026-01-01T00:00:00."), "{at}");
        assert!(at.ends_with('Z'));

        let base = DateTime::parse_from_rfc3339("2030-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut generator = TrafficGenerator::new(2, 0.0, 0.0).with_base_time(base);
        let mut last = base;
        for record in generate(&mut generator, 100) {
            let v: Value = serde_json::from_slice(&record.value).unwrap();
            let at = DateTime::parse_from_rfc3339(v["occurred_at"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc);
            assert!(at > last);
            last = at;
        }
    }
}
