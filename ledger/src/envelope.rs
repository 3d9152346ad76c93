//! The event envelope: how a Kafka record value becomes an [`Event`], or a
//! [`DeadLetter`] with a reason a producer team can act on.
//!
//! Two wire shapes are accepted: our native JSON envelope and CloudEvents 1.0
//! (structured mode and Kafka binary mode). Both map onto the same fields.

use chrono::{DateTime, Datelike, SecondsFormat, SubsecRound, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::record::RawRecord;

/// Longest accepted `event_type`, `stream_id`, `source` or `subject_id`.
pub const MAX_IDENTIFIER_LEN: usize = 512;

/// Namespace for deriving an `event_id` from a CloudEvent whose `id` is not a
/// UUID: CloudEvents identify an event by (`source`, `id`), so the derived id
/// is stable across producer retries and still deduplicates them.
const CLOUDEVENTS_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a9e_3b4d_4c7a_9e21_5d0f_8a3b_c64e);

const NATIVE_FIELDS: &[&str] = &[
    "event_id",
    "event_type",
    "stream_id",
    "occurred_at",
    "payload",
    "stream_version",
    "source",
    "correlation_id",
    "causation_id",
    "subject_id",
    "metadata",
];

/// Limits applied while parsing.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Largest accepted payload, in bytes of its JSON serialisation.
    pub max_payload_bytes: usize,
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
        }
    }
}

/// A validated event, ready to be stored.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub stream_id: String,
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub source: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub subject_id: Option<String>,
    /// The payload's JSON text as sent: never re-serialised on the hot path
    /// (PostgreSQL's jsonb normalises it on input).
    pub payload: Box<RawValue>,
    pub metadata: Option<Box<RawValue>>,
    /// Kafka headers as canonical JSON text (docs/INTEGRITY.md), as
    /// [`RawRecord::headers_json_text`] writes them: stored and hashed as is.
    pub headers: String,
    /// SHA-256 of the normalised envelope: tells a producer retry (same
    /// content) from a reused `event_id` (different content).
    pub content_hash: [u8; 32],
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// Why a record could not become an event. The code is stable (dashboards and
/// alerts key on it); the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    EmptyValue,
    InvalidUtf8 {
        valid_up_to: usize,
    },
    NotJson {
        error: String,
    },
    NotAnObject,
    MissingField {
        field: String,
    },
    InvalidField {
        field: String,
        problem: String,
    },
    UnknownField {
        field: String,
    },
    PayloadTooLarge {
        size: usize,
        max: usize,
    },
    EventIdConflict {
        event_id: Uuid,
        existing: String,
    },
    /// Passed validation but PostgreSQL refused the row: a validation gap,
    /// kept as a dead letter so one record never stalls its partition.
    RejectedByDatabase {
        error: String,
    },
    /// Valid JSON, but its protected fields cannot be encrypted or it has no
    /// canonical form (a number beyond any representable exponent).
    Unprotectable {
        error: String,
    },
}

impl DeadLetterReason {
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyValue => "empty_value",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::NotJson { .. } => "not_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownField { .. } => "unknown_field",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::EventIdConflict { .. } => "event_id_conflict",
            Self::RejectedByDatabase { .. } => "rejected_by_database",
            Self::Unprotectable { .. } => "unprotectable",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EmptyValue => write!(
                f,
                "record has no value (tombstone); an event needs a JSON envelope"
            ),
            Self::InvalidUtf8 { valid_up_to } => {
                write!(
                    f,
                    "value is not valid UTF-8 (first invalid byte at {valid_up_to})"
                )
            }
            Self::NotJson { error } => write!(f, "value is not JSON: {error}"),
            Self::NotAnObject => write!(
                f,
                "value is JSON but not an object; expected an event envelope"
            ),
            Self::MissingField { field } => write!(f, "required field `{field}` is missing"),
            Self::InvalidField { field, problem } => write!(f, "field `{field}` {problem}"),
            Self::UnknownField { field } => write!(
                f,
                "unknown top-level field `{field}`; put extra data in `payload` or `metadata`"
            ),
            Self::PayloadTooLarge { size, max } => {
                write!(
                    f,
                    "payload is {size} bytes, over the configured maximum of {max}"
                )
            }
            Self::EventIdConflict { event_id, existing } => write!(
                f,
                "event_id {event_id} was already stored ({existing}) with different content"
            ),
            Self::RejectedByDatabase { error } => {
                write!(f, "the database refused the event: {error}")
            }
            Self::Unprotectable { error } => {
                write!(f, "the event cannot be protected and stored: {error}")
            }
        }
    }
}

/// A record that cannot become an event. Keeps the raw bytes so nothing is lost.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Value,
    /// The event id when the envelope got far enough to have one.
    pub event_id: Option<Uuid>,
    pub reason: DeadLetterReason,
}

impl DeadLetter {
    pub fn from_record(
        record: &RawRecord,
        event_id: Option<Uuid>,
        reason: DeadLetterReason,
    ) -> Self {
        Self {
            kafka_topic: record.topic.clone(),
            kafka_partition: record.partition,
            kafka_offset: record.offset,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers_json(),
            event_id,
            reason,
        }
    }
}

/// Parses and validates one record.
// A dead letter is an ordinary outcome here, not a rare error path: boxing
// it would only add an allocation per rejected record.
#[allow(clippy::result_large_err)]
pub fn parse(record: &RawRecord, options: &ParseOptions) -> Result<Event, DeadLetter> {
    parse_with(record, options, true)
}

/// [`parse`], with or without the fast path for valid native envelopes.
#[allow(clippy::result_large_err)]
fn parse_with(record: &RawRecord, options: &ParseOptions, fast: bool) -> Result<Event, DeadLetter> {
    let dead = |reason| DeadLetter::from_record(record, None, reason);
    let is_binary_cloudevent = record.header("ce_specversion").is_some();
    let bytes = match record.value.as_deref() {
        Some(bytes) if !bytes.is_empty() || is_binary_cloudevent => bytes,
        _ => return Err(dead(DeadLetterReason::EmptyValue)),
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        dead(DeadLetterReason::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })
    })?;
    let fields = if is_binary_cloudevent {
        binary_cloudevent(record, text)
    } else if let Some(fields) = fast.then(|| native_fast(record, text)).flatten() {
        Ok(fields)
    } else {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| {
            dead(DeadLetterReason::NotJson {
                error: e.to_string(),
            })
        })?;
        if !raw.get().starts_with('{') {
            return Err(dead(DeadLetterReason::NotAnObject));
        }
        // Top-level fields: small ones as values, bulky ones kept as text.
        let top: Vec<(String, &RawValue)> =
            serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(raw.get())
                .map_err(|e| {
                    dead(DeadLetterReason::NotJson {
                        error: e.to_string(),
                    })
                })?
                .into_iter()
                .collect();
        let mut object = Map::new();
        let mut bulky = Bulky::default();
        for (key, value) in top {
            match key.as_str() {
                "payload" | "data" => bulky.payload = Some((key, value)),
                "metadata" => bulky.metadata = Some(value),
                _ => {
                    let value = serde_json::from_str(value.get()).map_err(|e| {
                        dead(DeadLetterReason::NotJson {
                            error: e.to_string(),
                        })
                    })?;
                    object.insert(key, value);
                }
            }
        }
        if is_structured_cloudevent(record, &object) {
            structured_cloudevent(record, object, bulky)
        } else {
            native(object, bulky)
        }
    };
    let fields =
        fields.map_err(|(event_id, reason)| DeadLetter::from_record(record, event_id, reason))?;
    // Cheap screens on the raw text keep the exact checks off the hot path.
    let screens = Screens {
        may_be_too_large: text.len() > options.max_payload_bytes,
        may_contain_nul: text.contains("\\u0000"),
    };
    fields
        .finish(record, options, screens)
        .map_err(|(event_id, reason)| DeadLetter::from_record(record, event_id, reason))
}

type Rejection = (Option<Uuid>, DeadLetterReason);

/// The fast path for a valid native envelope: one borrowing scan of the
/// text, no maps and no `Value` trees. It returns `None` at the first thing
/// it does not accept as is (an unknown or duplicate field, an escaped
/// string, a wrong type, a failed check, a structured CloudEvent), and the
/// general path then parses the record again and says precisely what is
/// wrong. Its result for a record it accepts is the general path's
/// (`fast_and_general_paths_agree` checks both on generated traffic).
fn native_fast(record: &RawRecord, text: &str) -> Option<Fields> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Native<'a> {
        #[serde(borrow)]
        event_id: Option<&'a str>,
        #[serde(borrow)]
        event_type: Option<&'a str>,
        #[serde(borrow)]
        stream_id: Option<&'a str>,
        #[serde(borrow)]
        occurred_at: Option<&'a str>,
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
        stream_version: Option<i64>,
        #[serde(borrow)]
        source: Option<&'a str>,
        #[serde(borrow)]
        correlation_id: Option<&'a str>,
        #[serde(borrow)]
        causation_id: Option<&'a str>,
        #[serde(borrow)]
        subject_id: Option<&'a str>,
        #[serde(borrow)]
        metadata: Option<&'a RawValue>,
    }
    let content_type = record.header("content-type").unwrap_or_default();
    if content_type.starts_with(b"application/cloudevents+json") {
        return None;
    }
    let native: Native<'_> = serde_json::from_str(text).ok()?;
    let identifier = |value: Option<&str>| -> Option<Option<String>> {
        match value {
            None => Some(None),
            Some(s) => identifier_problem(s).is_none().then(|| Some(s.to_string())),
        }
    };
    let uuid = |value: Option<&str>| -> Option<Option<Uuid>> {
        match value {
            None => Some(None),
            Some(s) => Uuid::parse_str(s).ok().map(Some),
        }
    };
    let payload = native.payload.filter(|p| p.get().starts_with('{'))?;
    let metadata = match native.metadata {
        None => None,
        Some(m) if m.get().starts_with('{') => Some(m.to_owned()),
        Some(_) => return None,
    };
    let stream_version = match native.stream_version {
        Some(v) if v < 1 => return None,
        v => v,
    };
    Some(Fields {
        event_id: uuid(native.event_id)??,
        event_type: identifier(native.event_type)??,
        stream_id: identifier(native.stream_id)??,
        stream_version,
        occurred_at: timestamp_str(native.occurred_at?, "occurred_at").ok()?,
        source: identifier(native.source)?,
        correlation_id: uuid(native.correlation_id)?,
        causation_id: uuid(native.causation_id)?,
        subject_id: identifier(native.subject_id)?,
        payload: payload.to_owned(),
        metadata,
    })
}

/// The top-level fields kept as raw JSON text: `payload` (native) or `data`
/// (CloudEvents), and `metadata`.
#[derive(Default)]
struct Bulky<'a> {
    payload: Option<(String, &'a RawValue)>,
    metadata: Option<&'a RawValue>,
}

impl Bulky<'_> {
    /// The payload under `name`, which must be a JSON object.
    fn payload(&self, name: &str) -> Result<Box<RawValue>, DeadLetterReason> {
        match &self.payload {
            Some((key, raw)) if key == name => match raw_object(raw, name)? {
                Some(object) => Ok(object),
                None => Err(missing(name)),
            },
            Some((key, _)) => Err(DeadLetterReason::UnknownField { field: key.clone() }),
            None => Err(missing(name)),
        }
    }
}

/// `None` for JSON null; the object's text; or why it is not an object.
fn raw_object(raw: &RawValue, field: &str) -> Result<Option<Box<RawValue>>, DeadLetterReason> {
    let kind = match raw.get().as_bytes().first() {
        Some(b'{') => return Ok(Some(raw.to_owned())),
        Some(b'n') => return Ok(None),
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    };
    Err(invalid(
        field,
        &format!("must be a JSON object, got {kind}"),
    ))
}

#[derive(Clone, Copy)]
struct Screens {
    may_be_too_large: bool,
    may_contain_nul: bool,
}

/// Envelope fields before the checks shared by every wire shape.
struct Fields {
    event_id: Uuid,
    event_type: String,
    stream_id: String,
    stream_version: Option<i64>,
    occurred_at: DateTime<Utc>,
    source: Option<String>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    subject_id: Option<String>,
    payload: Box<RawValue>,
    metadata: Option<Box<RawValue>>,
}

impl Fields {
    fn finish(
        self,
        record: &RawRecord,
        options: &ParseOptions,
        screens: Screens,
    ) -> Result<Event, Rejection> {
        let reject = |reason| (Some(self.event_id), reason);
        if screens.may_be_too_large {
            let size = self.payload.get().len();
            if size > options.max_payload_bytes {
                return Err(reject(DeadLetterReason::PayloadTooLarge {
                    size,
                    max: options.max_payload_bytes,
                }));
            }
        }
        // PostgreSQL's text and jsonb cannot hold U+0000.
        if screens.may_contain_nul {
            let parsed =
                |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).unwrap_or(Value::Null);
            let nul = first_nul(&parsed(&self.payload), "payload").or_else(|| {
                self.metadata
                    .as_deref()
                    .and_then(|m| first_nul(&parsed(m), "metadata"))
            });
            if let Some(field) = nul {
                return Err(reject(invalid(
                    &field,
                    "contains U+0000, which PostgreSQL cannot store",
                )));
            }
        }
        let content_hash = self.content_hash();
        Ok(Event {
            event_id: self.event_id,
            event_type: self.event_type,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            occurred_at: self.occurred_at,
            source: self.source,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            subject_id: self.subject_id,
            payload: self.payload,
            metadata: self.metadata,
            headers: record.headers_json_text(),
            content_hash,
            kafka_topic: record.topic.clone(),
            kafka_partition: record.partition,
            kafka_offset: record.offset,
        })
    }

    /// Hash of the normalised envelope: the fields in key order, as the
    /// JSON object serde_json writes for them (sorted keys, absent values as
    /// `null`; [`Fields::normalised_by_serde`] is that definition).
    fn content_hash(&self) -> [u8; 32] {
        thread_local! {
            static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            self.write_normalised(buffer);
            let hash = Sha256::digest(buffer.as_slice()).into();
            // Do not keep an unusually large payload's buffer for good.
            if buffer.capacity() > 64 * 1024 {
                *buffer = Vec::new();
            }
            hash
        })
    }

    /// The normalised envelope's bytes, written by hand: serde's
    /// serialiser showed up in ingest profiles.
    fn write_normalised(&self, out: &mut Vec<u8>) {
        use crate::canonical::{push_i64, write_opt_uuid, write_str_serde as string, write_uuid};
        let text = |value: Option<&str>, out: &mut Vec<u8>| match value {
            Some(s) => string(s, out),
            None => out.extend_from_slice(b"null"),
        };
        out.extend_from_slice(b"{\"causation_id\":");
        write_opt_uuid(self.causation_id, out);
        out.extend_from_slice(b",\"correlation_id\":");
        write_opt_uuid(self.correlation_id, out);
        out.extend_from_slice(b",\"event_id\":");
        write_uuid(self.event_id, out);
        out.extend_from_slice(b",\"event_type\":");
        string(&self.event_type, out);
        out.extend_from_slice(b",\"metadata\":");
        match &self.metadata {
            Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"occurred_at\":");
        string(
            &self
                .occurred_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            out,
        );
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.get().as_bytes());
        out.extend_from_slice(b",\"source\":");
        text(self.source.as_deref(), out);
        out.extend_from_slice(b",\"stream_id\":");
        string(&self.stream_id, out);
        out.extend_from_slice(b",\"stream_version\":");
        match self.stream_version {
            Some(v) => push_i64(v, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"subject_id\":");
        text(self.subject_id.as_deref(), out);
        out.push(b'}');
    }

    /// The definition [`Fields::write_normalised`] must match byte for byte.
    #[cfg(test)]
    fn normalised_by_serde(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Normalised<'a> {
            causation_id: Option<Uuid>,
            correlation_id: Option<Uuid>,
            event_id: Uuid,
            event_type: &'a str,
            metadata: Option<&'a RawValue>,
            occurred_at: String,
            payload: &'a RawValue,
            source: &'a Option<String>,
            stream_id: &'a str,
            stream_version: Option<i64>,
            subject_id: &'a Option<String>,
        }
        serde_json::to_vec(&Normalised {
            causation_id: self.causation_id,
            correlation_id: self.correlation_id,
            event_id: self.event_id,
            event_type: &self.event_type,
            metadata: self.metadata.as_deref(),
            occurred_at: self
                .occurred_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            payload: &self.payload,
            source: &self.source,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            subject_id: &self.subject_id,
        })
        .unwrap_or_default()
    }
}

fn invalid(field: &str, problem: &str) -> DeadLetterReason {
    DeadLetterReason::InvalidField {
        field: field.to_string(),
        problem: problem.to_string(),
    }
}

fn native(mut object: Map<String, Value>, bulky: Bulky<'_>) -> Result<Fields, Rejection> {
    let event_id = required_uuid(&mut object, "event_id").map_err(|r| (None, r))?;
    let with_id = |r| (Some(event_id), r);
    if let Some(unknown) = object.keys().find(|k| !NATIVE_FIELDS.contains(&k.as_str())) {
        return Err(with_id(DeadLetterReason::UnknownField {
            field: unknown.clone(),
        }));
    }
    let event_type = required_identifier(&mut object, "event_type").map_err(with_id)?;
    let stream_id = required_identifier(&mut object, "stream_id").map_err(with_id)?;
    let occurred_at = match object.remove("occurred_at") {
        None | Some(Value::Null) => return Err(with_id(missing("occurred_at"))),
        Some(value) => timestamp(value, "occurred_at").map_err(with_id)?,
    };
    let payload = bulky.payload("payload").map_err(with_id)?;
    let metadata = match bulky.metadata {
        Some(raw) => raw_object(raw, "metadata").map_err(with_id)?,
        None => None,
    };
    Ok(Fields {
        event_id,
        event_type,
        stream_id,
        stream_version: stream_version(object.remove("stream_version"), "stream_version")
            .map_err(with_id)?,
        occurred_at,
        source: optional_identifier(&mut object, "source").map_err(with_id)?,
        correlation_id: optional_uuid(&mut object, "correlation_id").map_err(with_id)?,
        causation_id: optional_uuid(&mut object, "causation_id").map_err(with_id)?,
        subject_id: optional_identifier(&mut object, "subject_id").map_err(with_id)?,
        payload,
        metadata,
    })
}

fn is_structured_cloudevent(record: &RawRecord, object: &Map<String, Value>) -> bool {
    let content_type = record
        .header("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default();
    content_type.starts_with("application/cloudevents+json")
        || (object.contains_key("specversion") && !object.contains_key("event_id"))
}

/// CloudEvents attributes, whichever mode carried them.
struct CloudEvent {
    attributes: Map<String, Value>,
    /// The event data, already checked to be a JSON object.
    data: Option<Box<RawValue>>,
}

fn structured_cloudevent(
    record: &RawRecord,
    mut object: Map<String, Value>,
    bulky: Bulky<'_>,
) -> Result<Fields, Rejection> {
    if object.contains_key("data_base64") {
        return Err((
            None,
            invalid(
                "data_base64",
                "is not supported: the event data must be a JSON object in `data`",
            ),
        ));
    }
    // `metadata` and `payload` are ordinary extension attributes here.
    let as_value = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).unwrap_or(Value::Null);
    if let Some(raw) = bulky.metadata {
        object.insert("metadata".into(), as_value(raw));
    }
    let data = match bulky.payload {
        Some((key, raw)) if key == "data" => raw_object(raw, "data").map_err(|r| (None, r))?,
        Some((key, raw)) => {
            object.insert(key, as_value(raw));
            None
        }
        None => None,
    };
    cloudevent(
        record,
        CloudEvent {
            attributes: object,
            data,
        },
    )
}

fn binary_cloudevent(record: &RawRecord, text: &str) -> Result<Fields, Rejection> {
    let mut attributes = Map::new();
    for header in &record.headers {
        let Some(name) = header.key.strip_prefix("ce_") else {
            continue;
        };
        let value = match header.value.as_deref().map(std::str::from_utf8) {
            Some(Ok(v)) if v.contains('\0') => {
                return Err((
                    None,
                    invalid(
                        &header.key,
                        "header contains U+0000, which PostgreSQL cannot store",
                    ),
                ))
            }
            Some(Ok(v)) => Value::String(v.to_string()),
            Some(Err(_)) => return Err((None, invalid(&header.key, "header is not valid UTF-8"))),
            None => Value::Null,
        };
        attributes.insert(name.to_string(), value);
    }
    if let Some(ct) = record
        .header("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
    {
        attributes.insert("datacontenttype".into(), Value::String(ct.to_string()));
    }
    let data = if text.trim().is_empty() {
        None
    } else {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| {
            (
                None,
                DeadLetterReason::NotJson {
                    error: e.to_string(),
                },
            )
        })?;
        raw_object(raw, "data").map_err(|r| (None, r))?
    };
    cloudevent(record, CloudEvent { attributes, data })
}

fn cloudevent(record: &RawRecord, event: CloudEvent) -> Result<Fields, Rejection> {
    let CloudEvent {
        mut attributes,
        data,
    } = event;
    match attributes.remove("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(other) => {
            return Err((
                None,
                invalid("specversion", &format!("must be \"1.0\", got {other}")),
            ))
        }
        None => return Err((None, missing("specversion"))),
    }
    let source = required_identifier(&mut attributes, "source").map_err(|r| (None, r))?;
    let raw_id = required_identifier(&mut attributes, "id").map_err(|r| (None, r))?;
    let event_id = Uuid::parse_str(&raw_id).unwrap_or_else(|_| {
        Uuid::new_v5(
            &CLOUDEVENTS_ID_NAMESPACE,
            format!("{source}\n{raw_id}").as_bytes(),
        )
    });
    let with_id = |r| (Some(event_id), r);
    let event_type = required_identifier(&mut attributes, "type").map_err(with_id)?;
    let stream_id = match optional_identifier(&mut attributes, "subject").map_err(with_id)? {
        Some(subject) => subject,
        None => record
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .filter(|k| !k.is_empty() && k.len() <= MAX_IDENTIFIER_LEN && !k.contains('\0'))
            .map(str::to_string)
            .ok_or_else(|| with_id(missing("subject (or a UTF-8 record key)")))?,
    };
    let occurred_at = match attributes.remove("time") {
        Some(Value::Null) | None => return Err(with_id(missing("time"))),
        Some(value) => timestamp(value, "time").map_err(with_id)?,
    };
    let payload = data.ok_or_else(|| with_id(missing("data")))?;
    if let Some(ct) = attributes.get("datacontenttype").and_then(Value::as_str) {
        if !(ct.starts_with("application/json") || ct.contains("+json")) {
            return Err(with_id(invalid(
                "datacontenttype",
                &format!("is {ct:?}; only JSON event data is accepted"),
            )));
        }
    }
    let correlation_id = optional_uuid(&mut attributes, "correlationid").map_err(with_id)?;
    let causation_id = optional_uuid(&mut attributes, "causationid").map_err(with_id)?;
    let subject_id = optional_identifier(&mut attributes, "subjectid").map_err(with_id)?;
    let stream_version =
        stream_version(attributes.remove("streamversion"), "streamversion").map_err(with_id)?;
    // Whatever is left (dataschema, datacontenttype, other extensions) is kept.
    attributes.insert("id".into(), Value::String(raw_id));
    attributes.insert("specversion".into(), Value::String("1.0".into()));
    let mut metadata = Map::new();
    metadata.insert("cloudevents".into(), Value::Object(attributes));
    Ok(Fields {
        event_id,
        event_type,
        stream_id,
        stream_version,
        occurred_at,
        source: Some(source),
        correlation_id,
        causation_id,
        subject_id,
        payload,
        metadata: RawValue::from_string(Value::Object(metadata).to_string()).ok(),
    })
}

fn missing(field: &str) -> DeadLetterReason {
    DeadLetterReason::MissingField {
        field: field.to_string(),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required_identifier(
    object: &mut Map<String, Value>,
    field: &str,
) -> Result<String, DeadLetterReason> {
    optional_identifier(object, field)?.ok_or_else(|| missing(field))
}

fn optional_identifier(
    object: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<String>, DeadLetterReason> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match identifier_problem(&s) {
            Some(problem) => Err(invalid(field, &problem)),
            None => Ok(Some(s)),
        },
        Some(other) => Err(invalid(
            field,
            &format!("must be a string, got {}", json_kind(&other)),
        )),
    }
}

/// What is wrong with an identifier's text, if anything.
fn identifier_problem(s: &str) -> Option<String> {
    if s.trim().is_empty() {
        Some("must not be empty".into())
    } else if s.len() > MAX_IDENTIFIER_LEN {
        Some(format!(
            "is {} bytes long, over the maximum of {MAX_IDENTIFIER_LEN}",
            s.len()
        ))
    } else if s.chars().any(char::is_control) {
        Some("must not contain control characters".into())
    } else {
        None
    }
}

fn required_uuid(object: &mut Map<String, Value>, field: &str) -> Result<Uuid, DeadLetterReason> {
    optional_uuid(object, field)?.ok_or_else(|| missing(field))
}

fn optional_uuid(
    object: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<Uuid>, DeadLetterReason> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(&s)
            .map(Some)
            .map_err(|_| invalid(field, &format!("must be a UUID, got {:?}", truncate(&s)))),
        Some(other) => Err(invalid(
            field,
            &format!("must be a UUID string, got {}", json_kind(&other)),
        )),
    }
}

fn timestamp(value: Value, field: &str) -> Result<DateTime<Utc>, DeadLetterReason> {
    let Value::String(s) = value else {
        return Err(invalid(
            field,
            &format!("must be an RFC 3339 string, got {}", json_kind(&value)),
        ));
    };
    timestamp_str(&s, field)
}

fn timestamp_str(s: &str, field: &str) -> Result<DateTime<Utc>, DeadLetterReason> {
    let parsed = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            invalid(
                field,
                &format!("must be an RFC 3339 timestamp, got {:?} ({e})", truncate(s)),
            )
        })?;
    if !(1..=9999).contains(&parsed.year()) {
        return Err(invalid(
            field,
            &format!("must be between years 0001 and 9999, got {:?}", truncate(s)),
        ));
    }
    // PostgreSQL keeps microseconds: hash and store the same instant.
    Ok(parsed.trunc_subsecs(6))
}

fn stream_version(value: Option<Value>, field: &str) -> Result<Option<i64>, DeadLetterReason> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v >= 1 => Ok(Some(v)),
            _ => Err(invalid(field, &format!("must be an integer >= 1, got {n}"))),
        },
        // Binary-mode CloudEvents carry every attribute as a string.
        Some(Value::String(s)) if field == "streamversion" => match s.parse::<i64>() {
            Ok(v) if v >= 1 => Ok(Some(v)),
            _ => Err(invalid(
                field,
                &format!("must be an integer >= 1, got {:?}", truncate(&s)),
            )),
        },
        Some(other) => Err(invalid(
            field,
            &format!("must be an integer >= 1, got {}", json_kind(&other)),
        )),
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Path of the first string or key holding U+0000, if any.
fn first_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| first_nul(v, &format!("{path}/{i}"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = format!("{path}/{k}");
            if k.contains('\0') {
                Some(child)
            } else {
                first_nul(v, &child)
            }
        }),
        _ => None,
    }
}

#[cfg(test)]
#[path = "envelope_tests.rs"]
mod tests;
