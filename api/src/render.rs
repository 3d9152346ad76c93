//! Events written straight from PostgreSQL rows to JSON text, for the
//! routes that show events redacted (`GET /v1/events`, a stream's events,
//! one event, `GET /v1/replay`).
//!
//! Decoding each `jsonb` column into a `serde_json::Value`, redacting that
//! tree and turning the view into a second tree before writing it cost
//! most of a page's CPU. Here the JSON columns are copied as PostgreSQL
//! prints them, protected fields are redacted on that text
//! ([`redact_into`]), and the other columns are written field by field.
//! The JSON means the same as the `EventView` rendering (the same fields,
//! nulls, times and redaction); key order and whitespace may differ.

use std::io::Write as _;
use std::marker::PhantomData;

use audit_ledger::protect;
use audit_ledger::query::{Position, QueryError};
use chrono::{DateTime, Utc};
use poem::http::header;
use poem::{IntoResponse, Response};
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::types::ToJSON;
use poem_openapi::ApiResponse;
use sqlx::postgres::PgRow;
use sqlx::{Row, ValueRef as _};
use uuid::Uuid;

use crate::problem::ApiError;

/// The columns [`write_event_fields`] reads, by index, `FROM events e`.
pub use audit_ledger::query::EVENT_COLUMNS;

/// Events per page above which a page is rendered on a blocking thread
/// (100 events are about 0.3 ms of CPU; async workers should block for at
/// most a few hundred microseconds).
pub const INLINE_RENDER_EVENTS: usize = 200;

/// A JSON response body with the OpenAPI schema of `T`, declared exactly as
/// poem-openapi's `Json<T>` declares it (so the document does not change),
/// whose bytes are either rendered from rows or serialized from a `T`.
pub struct JsonBody<T> {
    bytes: Vec<u8>,
    schema: PhantomData<fn() -> T>,
}

impl<T: ToJSON> JsonBody<T> {
    /// Bytes this module wrote for a `T`.
    fn rendered(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            schema: PhantomData,
        }
    }

    /// A `T` serialized as poem-openapi would.
    pub fn from_typed(value: &T) -> Result<Self, ApiError> {
        serde_json::to_vec(&value.to_json())
            .map(Self::rendered)
            .map_err(|e| ApiError::internal("writing a response", &e))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl<T: ToJSON> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = <Json<T> as Payload>::CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ToJSON> IntoResponse for JsonBody<T> {
    fn into_response(self) -> Response {
        Response::builder()
            .header(header::CONTENT_TYPE, Self::CONTENT_TYPE)
            .body(self.bytes)
    }
}

impl<T: ToJSON> ApiResponse for JsonBody<T> {
    fn meta() -> MetaResponses {
        // As `Json<T>` (poem-openapi 5): one 200 with the schema of `T`.
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

/// `{"events": [...], "next_cursor": ...}` (the `EventPage` schema) from
/// rows of [`EVENT_COLUMNS`], protected fields redacted. `next_cursor`
/// points after the last row, `null` without rows.
pub fn event_page<T: ToJSON>(rows: &[PgRow]) -> Result<JsonBody<T>, QueryError> {
    let mut out = Vec::with_capacity(64 + rows.len() * 1024);
    out.extend_from_slice(b"{\"events\":[");
    let mut last = None;
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut o = JsonObject::open(&mut out);
        last = Some(write_event_fields(row, &mut o)?);
        o.close();
    }
    out.extend_from_slice(b"],\"next_cursor\":");
    Slot { out: &mut out }.opt_str(last.map(Position::to_cursor).as_deref());
    out.push(b'}');
    Ok(JsonBody::rendered(out))
}

/// [`event_page`], on a blocking thread for a page of more than
/// [`INLINE_RENDER_EVENTS`] rows.
pub async fn event_page_off_worker<T: ToJSON + 'static>(
    rows: Vec<PgRow>,
) -> Result<JsonBody<T>, QueryError> {
    if rows.len() <= INLINE_RENDER_EVENTS {
        return event_page(&rows);
    }
    tokio::task::spawn_blocking(move || event_page(&rows))
        .await
        .map_err(|e| QueryError::Fatal(format!("rendering a page of events panicked: {e}")))?
}

/// One event (the `EventView` schema) from a row of [`EVENT_COLUMNS`],
/// protected fields redacted.
pub fn event<T: ToJSON>(row: &PgRow) -> Result<JsonBody<T>, QueryError> {
    let mut out = Vec::with_capacity(1024);
    let mut o = JsonObject::open(&mut out);
    write_event_fields(row, &mut o)?;
    o.close();
    Ok(JsonBody::rendered(out))
}

/// Writes the fields of `EventView` (the same names and spellings) from a
/// row of [`EVENT_COLUMNS`] into an open object, every protected field as
/// `{"$redacted": true}`; returns the row's position.
pub fn write_event_fields(row: &PgRow, o: &mut JsonObject<'_>) -> Result<Position, QueryError> {
    let position = row_position(row)?;
    o.key("seq").int(position.seq);
    o.key("event_id").uuid(row.try_get(2)?);
    o.key("event_type").str(row.try_get(3)?);
    o.key("stream_id").str(row.try_get(4)?);
    o.key("stream_version").opt_int(row.try_get(5)?);
    o.key("occurred_at").time(row.try_get(6)?);
    o.key("ingested_at").time(row.try_get(7)?);
    o.key("source").opt_str(row.try_get(8)?);
    o.key("correlation_id").opt_uuid(row.try_get(9)?);
    o.key("causation_id").opt_uuid(row.try_get(10)?);
    o.key("subject_id").opt_str(row.try_get(11)?);
    let payload = raw_json(row, 12)?.unwrap_or("null");
    redact_into(payload, o.key("payload").out);
    o.key("metadata").raw(raw_json(row, 13)?.unwrap_or("null"));
    o.key("headers").raw(raw_json(row, 14)?.unwrap_or("null"));
    {
        let mut kafka = JsonObject::open(o.key("kafka").out);
        kafka.key("topic").opt_str(row.try_get(15)?);
        kafka
            .key("partition")
            .opt_int(row.try_get::<Option<i32>, _>(16)?.map(i64::from));
        kafka.key("offset").opt_int(row.try_get(17)?);
        kafka.close();
    }
    {
        let mut chain = JsonObject::open(o.key("chain").out);
        chain.key("id").opt_str(row.try_get(18)?);
        chain.key("position").opt_int(row.try_get(19)?);
        let hash: Option<&[u8]> = row.try_get(20)?;
        match hash {
            Some(hash) => chain.key("hash").hex(hash),
            None => chain.key("hash").null(),
        }
        chain.close();
    }
    Ok(position)
}

/// The store position of a row of [`EVENT_COLUMNS`] (its cursor).
pub fn row_position(row: &PgRow) -> Result<Position, QueryError> {
    let tx: &str = row.try_get(0)?;
    let tx: u64 = tx.parse().map_err(|_| {
        QueryError::Fatal(format!("events.tx {tx:?} is not a 64-bit transaction id"))
    })?;
    let seq: i64 = row.try_get(1)?;
    Ok(Position { tx, seq })
}

/// The text of a `jsonb` column as PostgreSQL sent it, without parsing it
/// (`None` for SQL NULL). The binary format is a version byte (1) and the text.
fn raw_json(row: &PgRow, index: usize) -> Result<Option<&str>, QueryError> {
    let value = row.try_get_raw(index)?;
    if value.is_null() {
        return Ok(None);
    }
    let binary = matches!(value.format(), sqlx::postgres::PgValueFormat::Binary);
    let bytes = value
        .as_bytes()
        .map_err(|e| QueryError::Fatal(format!("reading a jsonb column: {e}")))?;
    let text = match (binary, bytes.split_first()) {
        (false, _) => bytes,
        (true, Some((1, text))) => text,
        (true, _) => {
            return Err(QueryError::Fatal(
                "a jsonb column came in an unknown binary version".into(),
            ))
        }
    };
    std::str::from_utf8(text)
        .map(Some)
        .map_err(|e| QueryError::Fatal(format!("a jsonb column is not UTF-8: {e}")))
}

/// Writes `payload` (JSON text) with every field envelope replaced by
/// `{"$redacted": true}`: the same result as `protect::redact_payload`,
/// without building a `Value`.
///
/// An envelope is an object whose only key is `$enc`. PostgreSQL prints
/// jsonb keys unescaped except for control characters, quotes and
/// backslashes, so such a key is spelled `"$enc"` in its output; text
/// holding any `\u00..` escape (which could spell it otherwise) takes the
/// slow path through `Value`, as does text PostgreSQL did not produce.
pub fn redact_into(payload: &str, out: &mut Vec<u8>) {
    if !payload.contains("$enc") && !payload.contains("\\u") {
        out.extend_from_slice(payload.as_bytes());
        return;
    }
    if payload.contains("\\u") {
        redact_slowly(payload, out);
        return;
    }
    let bytes = payload.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = skip_string(bytes, i),
            b'{' => match envelope_end(bytes, i) {
                Some(end) => {
                    out.extend_from_slice(&bytes[copied..i]);
                    out.extend_from_slice(br#"{"$redacted": true}"#);
                    i = end;
                    copied = end;
                }
                None => i += 1,
            },
            _ => i += 1,
        }
    }
    out.extend_from_slice(&bytes[copied..]);
}

fn redact_slowly(payload: &str, out: &mut Vec<u8>) {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(mut value) => {
            protect::redact_payload(&mut value);
            // Writing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &value);
        }
        // Never shown unparsed: it could hold an envelope.
        Err(_) => out.extend_from_slice(br#"{"$redacted": true}"#),
    }
}

/// The index after the string starting at `start` (a `"`).
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

fn skip_whitespace(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The index after the JSON value starting at `start`.
fn skip_value(bytes: &[u8], start: usize) -> usize {
    match bytes.get(start) {
        Some(b'"') => skip_string(bytes, start),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = start;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => {
                        i = skip_string(bytes, i);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            bytes.len()
        }
        _ => {
            let mut i = start;
            while i < bytes.len()
                && !matches!(bytes[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                i += 1;
            }
            i
        }
    }
}

/// If the object starting at `start` is an envelope (`{"$enc": …}` and no
/// other key), the index after it.
fn envelope_end(bytes: &[u8], start: usize) -> Option<usize> {
    let i = skip_whitespace(bytes, start + 1);
    let rest = bytes.get(i..)?;
    if !rest.starts_with(b"\"$enc\"") {
        return None;
    }
    let i = skip_whitespace(bytes, i + 6);
    if bytes.get(i) != Some(&b':') {
        return None;
    }
    let i = skip_whitespace(bytes, i + 1);
    let i = skip_whitespace(bytes, skip_value(bytes, i));
    (bytes.get(i) == Some(&b'}')).then_some(i + 1)
}

/// Writes a JSON object field by field; keys are constant ASCII.
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

/// The value slot after a key.
pub struct Slot<'b> {
    out: &'b mut Vec<u8>,
}

impl<'a> JsonObject<'a> {
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    pub fn key(&mut self, key: &'static str) -> Slot<'_> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        Slot {
            out: &mut *self.out,
        }
    }

    pub fn close(self) {
        self.out.push(b'}');
    }
}

impl Slot<'_> {
    pub fn str(self, value: &str) {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    pub fn opt_str(self, value: Option<&str>) {
        match value {
            Some(v) => self.str(v),
            None => self.null(),
        }
    }

    pub fn int(self, value: i64) {
        let _ = write!(self.out, "{value}");
    }

    pub fn opt_int(self, value: Option<i64>) {
        match value {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    pub fn uuid(self, value: Uuid) {
        let mut buffer = Uuid::encode_buffer();
        self.out.push(b'"');
        self.out
            .extend_from_slice(value.hyphenated().encode_lower(&mut buffer).as_bytes());
        self.out.push(b'"');
    }

    pub fn opt_uuid(self, value: Option<Uuid>) {
        match value {
            Some(v) => self.uuid(v),
            None => self.null(),
        }
    }

    /// As poem-openapi writes `DateTime<Utc>` (RFC 3339, `+00:00`, the
    /// fraction in 0, 3, 6 or 9 digits as `to_rfc3339` does), written in
    /// place, digit by digit.
    pub fn time(self, value: DateTime<Utc>) {
        use chrono::{Datelike, Timelike};
        let t = value.naive_utc();
        let year = t.year();
        if !(0..=9999).contains(&year) {
            // A sign and more digits: rare, left to chrono's formatter.
            let _ = write!(
                self.out,
                "\"{}\"",
                value.format("%Y-%m-%dT%H:%M:%S%.f+00:00")
            );
            return;
        }
        // Digits by hand: chrono's formatter parses its format string for
        // every value, a tenth of the node's CPU on a filtered page.
        let nanos = t.nanosecond();
        // chrono keeps a leap second as :59 with 1e9 or more nanoseconds.
        let second = t.second() + nanos / 1_000_000_000;
        let fraction = nanos % 1_000_000_000;
        let out = &mut *self.out;
        out.reserve(40);
        out.push(b'"');
        digits(out, year as u32, 4);
        out.push(b'-');
        digits(out, t.month(), 2);
        out.push(b'-');
        digits(out, t.day(), 2);
        out.push(b'T');
        digits(out, t.hour(), 2);
        out.push(b':');
        digits(out, t.minute(), 2);
        out.push(b':');
        digits(out, second, 2);
        // As `%.f`: none, or 3, 6 or 9 digits, the fewest that are exact.
        if fraction != 0 {
            out.push(b'.');
            if fraction % 1_000_000 == 0 {
                digits(out, fraction / 1_000_000, 3);
            } else if fraction % 1_000 == 0 {
                digits(out, fraction / 1_000, 6);
            } else {
                digits(out, fraction, 9);
            }
        }
        out.extend_from_slice(b"+00:00\"");
    }

    /// Bytes as a lowercase hex string, written in place.
    pub fn hex(self, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.out.reserve(bytes.len() * 2 + 2);
        self.out.push(b'"');
        for &byte in bytes {
            self.out.push(DIGITS[usize::from(byte >> 4)]);
            self.out.push(DIGITS[usize::from(byte & 0xf)]);
        }
        self.out.push(b'"');
    }

    /// JSON text, copied as it is.
    fn raw(self, json: &str) {
        self.out.extend_from_slice(json.as_bytes());
    }

    pub fn null(self) {
        self.out.extend_from_slice(b"null");
    }
}

/// `value` in exactly `width` decimal digits, zero-padded (it must fit).
fn digits(out: &mut Vec<u8>, value: u32, width: u32) {
    let mut divisor = 10u32.pow(width - 1);
    while divisor > 0 {
        out.push(b'0' + (value / divisor % 10) as u8);
        divisor /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn redacted(text: &str) -> Value {
        let mut out = Vec::new();
        redact_into(text, &mut out);
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out));
        })
    }

    fn reference(text: &str) -> Value {
        let mut value: Value = serde_json::from_str(text).unwrap();
        protect::redact_payload(&mut value);
        value
    }

    #[test]
    fn raw_redaction_matches_the_value_redaction() {
        let cases = [
            r#"{}"#,
            r#"{"a": 1, "b": [1, 2, {"c": "x"}]}"#,
            r#"{"email": {"$enc": {"v": 1, "kid": "k", "ct": "abc}\"{"}}}"#,
            r#"{"customer": {"id": "c-1", "email": {"$enc": {"v": 1}}, "name": {"$enc": "x"}}}"#,
            r#"{"list": [{"$enc": 1}, {"$enc": [1, {"a": "}"}]}, 3]}"#,
            // Look-alikes: a second key, or $enc as a value or inside a string.
            r#"{"x": {"$enc": {"v": 1}, "other": 2}}"#,
            r#"{"x": {"other": 2, "$enc": {"v": 1}}}"#,
            r#"{"x": "$enc", "y": "{\"$enc\": 1}"}"#,
            r#"{"$enc": {"v": 1}}"#,
            r#"{"x": {"$enc": {"$enc": 1}, "y": 1}}"#,
            r#"{"x":{"$enc":true}}"#,
            r#"{"x" : { "$enc" : null } }"#,
            r#"{"n": 12.50, "e": {"$enc": -1.5e3}}"#,
            // Escapes take the slow path.
            r#"{"x": {"\u0024enc": {"v": 1}}}"#,
            r#"{"x": "a\u0001b", "y": {"$enc": 1}}"#,
        ];
        for text in cases {
            assert_eq!(redacted(text), reference(text), "{text}");
        }
        // Numbers keep their spelling on the fast path.
        let mut out = Vec::new();
        redact_into(r#"{"n": 12.50, "e": {"$enc": 1}}"#, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"n": 12.50, "e": {"$redacted": true}}"#
        );
    }

    /// Random payloads with envelopes, look-alikes and strings that look
    /// like JSON, written compact and pretty: the raw redaction always
    /// equals the `Value` one.
    #[test]
    fn raw_redaction_matches_on_random_payloads() {
        use rand::{Rng as _, SeedableRng as _};
        fn value(rng: &mut rand::rngs::SmallRng, depth: u32) -> Value {
            let keys = ["$enc", "a", "b", "$redacted", "x \"y\" {", "$enc2"];
            match rng.gen_range(0..if depth == 0 { 4 } else { 7 }) {
                0 => json!(rng.gen_range(-5..5)),
                1 => json!(["$enc", "{\"$enc\": 1}", "}", "\\"][rng.gen_range(0..4)]),
                2 => Value::Null,
                3 => json!(rng.gen_bool(0.5)),
                4 => Value::Array(
                    (0..rng.gen_range(0..3))
                        .map(|_| value(rng, depth - 1))
                        .collect(),
                ),
                5 => json!({"$enc": value(rng, depth - 1)}),
                _ => {
                    let mut map = serde_json::Map::new();
                    for _ in 0..rng.gen_range(0..4) {
                        map.insert(
                            keys[rng.gen_range(0..keys.len())].to_owned(),
                            value(rng, depth - 1),
                        );
                    }
                    Value::Object(map)
                }
            }
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut envelopes = 0;
        for _ in 0..2000 {
            let payload = json!({"p": value(&mut rng, 4)});
            for text in [
                payload.to_string(),
                serde_json::to_string_pretty(&payload).unwrap(),
            ] {
                let expected = reference(&text);
                envelopes += usize::from(expected.to_string().contains("$redacted\":true"));
                assert_eq!(redacted(&text), expected, "{text}");
            }
        }
        assert!(
            envelopes > 100,
            "the generator makes envelopes: {envelopes}"
        );
    }

    /// A planted bug (treating any object starting with `$enc` as an
    /// envelope) is caught by the comparison above.
    #[test]
    fn the_comparison_catches_a_sloppy_envelope_test() {
        let text = r#"{"x": {"$enc": {"v": 1}, "other": 2}}"#;
        let sloppy = json!({"x": {"$redacted": true}});
        assert_ne!(reference(text), sloppy);
    }

    /// Timestamps and hashes written in place read as `to_rfc3339` and
    /// `hex::encode` write them, whatever the fraction's precision.
    #[test]
    fn times_and_hex_match_the_reference_writers() {
        use chrono::{TimeZone, Timelike};
        let second = Utc.with_ymd_and_hms(2026, 11, 28, 23, 59, 59).unwrap();
        for nanos in [
            0,
            120_000_000,
            123_450_000,
            123_456_000,
            123_456_789,
            1_500_000_000,
        ] {
            let t = second + chrono::Duration::nanoseconds(nanos);
            let t = if nanos >= 1_000_000_000 {
                // A leap second: 23:59:60.5.
                second
                    .with_nanosecond(u32::try_from(nanos).unwrap())
                    .unwrap()
            } else {
                t
            };
            let mut out = Vec::new();
            Slot { out: &mut out }.time(t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{}\"", t.to_rfc3339())
            );
        }
        // Times from 4713 BC (PostgreSQL's first) to year 190,000, seeded:
        // years 0-9999 by hand, the rest (BC, five digits) through chrono.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(28);
        let nanos = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..4) {
            0 => 0,
            1 => rng.gen_range(0..1_000) * 1_000_000,
            2 => rng.gen_range(0..1_000_000) * 1_000,
            _ => rng.gen_range(0..1_000_000_000),
        };
        for _ in 0..20_000 {
            let seconds = rng.gen_range(-210_866_803_200i64..=6_000_000_000_000);
            let t = DateTime::from_timestamp(seconds, nanos(&mut rng)).unwrap();
            let mut out = Vec::new();
            Slot { out: &mut out }.time(t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{}\"", t.to_rfc3339()),
                "{t:?}"
            );
        }
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        Slot { out: &mut out }.hex(&bytes);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("\"{}\"", hex::encode(&bytes))
        );
    }
}
