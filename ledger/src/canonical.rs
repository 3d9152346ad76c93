//! Canonical JSON (v1) and the event record encoding (v1) that the hash
//! chain covers. The exact rules are in docs/INTEGRITY.md; this module is
//! their reference implementation.
//!
//! The node encodes from the JSON text it received, a verifier from what
//! PostgreSQL's `jsonb` prints back; both must yield the same bytes, so the
//! canonical form depends only on the JSON value (key order, duplicate keys,
//! whitespace, string escapes and number spelling are normalised).

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `format` number written into every [`ChainRecord`].
pub const FORMAT_VERSION: u32 = 1;

/// The `prev` hash of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Why a value has no canonical form. All variants mean the input is at
/// fault: reject it, retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// Not JSON, or nested deeper than serde_json's limit of 127 levels.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A number literal that does not follow the JSON number grammar.
    #[error("invalid JSON number {literal:?}")]
    NumberSyntax { literal: String },
    /// A non-zero number whose normalised exponent does not fit an i64.
    #[error("number {literal:?} has an exponent outside the 64-bit range")]
    ExponentOutOfRange { literal: String },
}

/// Parses `json` and returns its canonical form. The result is itself JSON
/// with the same value, so it can be stored instead of the original.
pub fn canonical_text(json: &str) -> Result<String, CanonicalError> {
    let value: Value = serde_json::from_str(json)?;
    let mut out = Vec::with_capacity(json.len());
    write_value(&value, &mut out)?;
    // Invariant: the output is made of &str slices and ASCII only.
    Ok(String::from_utf8(out).expect("canonical JSON is UTF-8"))
}

/// Appends the canonical form of `value` to `out`. On error `out` is left
/// as it was.
pub fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let start = out.len();
    let result = write_any(value, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write_any(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n.as_str(), out)?,
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_any(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sort explicitly: a Map keeps insertion order if any crate in
            // the build enables serde_json's `preserve_order`.
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write_any(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Appends `s` as a canonical JSON string: only `"`, `\` and U+0000..U+001F
/// are escaped, everything else is raw UTF-8.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[run_start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        run_start = i + 1;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

/// Appends the canonical form of a JSON number literal: `0`, or an optional
/// `-`, the significant digits without leading or trailing zeros, and
/// `e<exponent>` unless the exponent is 0. Works on the text, so any
/// precision is exact, and never allocates in proportion to the exponent.
pub fn write_number(literal: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let Some(parts) = split_number(literal) else {
        return Err(CanonicalError::NumberSyntax {
            literal: shorten(literal),
        });
    };
    let Some((head, tail, shift)) = significand(parts.int, parts.frac) else {
        // Zero in any spelling, whatever its exponent.
        out.push(b'0');
        return Ok(());
    };
    let out_of_range = || CanonicalError::ExponentOutOfRange {
        literal: shorten(literal),
    };
    // |exponent| < 2^127 and |shift| <= the literal's length, so an i128
    // holds the sum; it must then fit an i64.
    let exponent = parse_exponent(parts.exp).ok_or_else(out_of_range)?;
    let exponent = exponent
        .checked_add(shift)
        .and_then(|e| i64::try_from(e).ok())
        .ok_or_else(out_of_range)?;
    if parts.negative {
        out.push(b'-');
    }
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(tail.as_bytes());
    if exponent != 0 {
        out.push(b'e');
        push_i64(exponent, out);
    }
    Ok(())
}

/// A number literal split along the JSON grammar
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
struct NumberParts<'a> {
    negative: bool,
    int: &'a str,
    frac: &'a str,
    /// The exponent's sign and digits, without the `e`.
    exp: &'a str,
}

fn split_number(literal: &str) -> Option<NumberParts<'_>> {
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let int_len = digit_run(rest);
    let int = &rest[..int_len];
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    let mut rest = &rest[int_len..];
    let mut frac = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let len = digit_run(after_dot);
        if len == 0 {
            return None;
        }
        frac = &after_dot[..len];
        rest = &after_dot[len..];
    }
    let mut exp = "";
    if let Some(after_e) = rest.strip_prefix(['e', 'E']) {
        let unsigned = after_e.strip_prefix(['+', '-']).unwrap_or(after_e);
        let len = digit_run(unsigned);
        if len == 0 || len != unsigned.len() {
            return None;
        }
        exp = after_e;
        rest = "";
    }
    if !rest.is_empty() {
        return None;
    }
    Some(NumberParts {
        negative,
        int,
        frac,
        exp,
    })
}

fn digit_run(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_digit).count()
}

/// The significant digits of `int.frac` as two slices to concatenate, and
/// the amount to add to the literal's exponent; `None` for zero.
fn significand<'a>(int: &'a str, frac: &'a str) -> Option<(&'a str, &'a str, i128)> {
    let int = int.trim_start_matches('0');
    let frac_kept = frac.trim_end_matches('0');
    if !frac_kept.is_empty() {
        // The last significant digit is in the fraction.
        let shift = -to_i128(frac_kept.len());
        if int.is_empty() {
            return Some(("", frac_kept.trim_start_matches('0'), shift));
        }
        return Some((int, frac_kept, shift));
    }
    let digits = int.trim_end_matches('0');
    if digits.is_empty() {
        return None;
    }
    Some((digits, "", to_i128(int.len() - digits.len())))
}

fn to_i128(n: usize) -> i128 {
    // Lossless: usize is at most 64 bits wide.
    n as i128
}

/// The value of an exponent's `[+-]?[0-9]*` text (empty is 0), or `None`
/// when it overflows an i128.
fn parse_exponent(exp: &str) -> Option<i128> {
    let (negative, digits) = match exp.as_bytes().first() {
        Some(b'-') => (true, &exp[1..]),
        Some(b'+') => (false, &exp[1..]),
        _ => (false, exp),
    };
    let mut value: i128 = 0;
    for d in digits.bytes() {
        value = value.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
    }
    Some(if negative { -value } else { value })
}

fn shorten(literal: &str) -> String {
    const MAX: usize = 64;
    if literal.len() <= MAX {
        return literal.to_string();
    }
    // Number literals are ASCII, but the caller's text may not be.
    let mut end = MAX;
    while !literal.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &literal[..end])
}

/// The decimal digits of `n`, in the tail of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        // n % 10 < 10, so the cast cannot truncate.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn push_i64(n: i64, out: &mut Vec<u8>) {
    if n < 0 {
        out.push(b'-');
    }
    let mut buf = [0u8; 20];
    out.extend_from_slice(decimal(n.unsigned_abs(), &mut buf));
}

/// An integer as a canonical number (trailing zeros become the exponent:
/// 1200 is `12e2`), so that encoded records are canonical JSON too.
fn write_int(negative: bool, magnitude: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let digits = decimal(magnitude, &mut buf);
    let kept = match digits.iter().rposition(|&d| d != b'0') {
        Some(last) => &digits[..=last],
        None => {
            out.push(b'0');
            return;
        }
    };
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(kept);
    let zeros = digits.len() - kept.len();
    if zeros > 0 {
        out.push(b'e');
        out.extend_from_slice(decimal(zeros as u64, &mut buf));
    }
}

/// One stored event as the hash chain sees it (encoding v1).
/// `headers`, `metadata` and `payload` must already be canonical JSON text
/// ([`canonical_text`]); they are embedded verbatim.
#[derive(Debug, Clone, Copy)]
pub struct ChainRecord<'a> {
    pub chain_id: &'a str,
    pub position: u64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub stream_id: &'a str,
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub source: Option<&'a str>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub subject_id: Option<&'a str>,
    pub kafka_topic: Option<&'a str>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub headers: &'a str,
    pub metadata: Option<&'a str>,
    pub payload: &'a str,
    pub blind_index: &'a [String],
    pub content_hash: &'a [u8; 32],
}

impl ChainRecord<'_> {
    /// Appends the record's canonical JSON object: keys in bytewise order,
    /// absent values as `null`. Written straight into `out`: this runs for
    /// every ingested event.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"blind_index\":[");
        for (i, entry) in self.blind_index.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(entry, out);
        }
        out.extend_from_slice(b"],\"causation_id\":");
        write_opt_uuid(self.causation_id, out);
        out.extend_from_slice(b",\"chain_id\":");
        write_str(self.chain_id, out);
        out.extend_from_slice(b",\"content_hash\":\"");
        for &byte in self.content_hash {
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        }
        out.extend_from_slice(b"\",\"correlation_id\":");
        write_opt_uuid(self.correlation_id, out);
        out.extend_from_slice(b",\"event_id\":");
        write_uuid(self.event_id, out);
        out.extend_from_slice(b",\"event_type\":");
        write_str(self.event_type, out);
        out.extend_from_slice(b",\"format\":");
        write_int(false, u64::from(FORMAT_VERSION), out);
        out.extend_from_slice(b",\"headers\":");
        out.extend_from_slice(self.headers.as_bytes());
        out.extend_from_slice(b",\"ingested_at\":");
        write_timestamp(self.ingested_at, out);
        out.extend_from_slice(b",\"kafka_offset\":");
        write_opt_i64(self.kafka_offset, out);
        out.extend_from_slice(b",\"kafka_partition\":");
        write_opt_i64(self.kafka_partition.map(i64::from), out);
        out.extend_from_slice(b",\"kafka_topic\":");
        write_opt_str(self.kafka_topic, out);
        out.extend_from_slice(b",\"metadata\":");
        match self.metadata {
            Some(json) => out.extend_from_slice(json.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"occurred_at\":");
        write_timestamp(self.occurred_at, out);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.as_bytes());
        out.extend_from_slice(b",\"position\":");
        write_int(false, self.position, out);
        out.extend_from_slice(b",\"source\":");
        write_opt_str(self.source, out);
        out.extend_from_slice(b",\"stream_id\":");
        write_str(self.stream_id, out);
        out.extend_from_slice(b",\"stream_version\":");
        write_opt_i64(self.stream_version, out);
        out.extend_from_slice(b",\"subject_id\":");
        write_opt_str(self.subject_id, out);
        out.push(b'}');
    }
}

/// The chain hash of a record: SHA-256(prev || record bytes).
pub fn chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev)
        .chain_update(record)
        .finalize()
        .into()
}

fn write_opt_str(value: Option<&str>, out: &mut Vec<u8>) {
    match value {
        Some(s) => write_str(s, out),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_opt_i64(value: Option<i64>, out: &mut Vec<u8>) {
    match value {
        Some(n) => write_int(n < 0, n.unsigned_abs(), out),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_uuid(id: Uuid, out: &mut Vec<u8>) {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'"');
}

fn write_opt_uuid(id: Option<Uuid>, out: &mut Vec<u8>) {
    match id {
        Some(id) => write_uuid(id, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// `"YYYY-MM-DDTHH:MM:SS.ffffffZ"`, truncated to the microsecond that
/// PostgreSQL stores. Goes through the microsecond count, as sqlx does when
/// it binds the value, so a leap second encodes as the instant PostgreSQL
/// keeps (the next second).
fn write_timestamp(at: DateTime<Utc>, out: &mut Vec<u8>) {
    // Invariant: the microsecond count of a valid DateTime is one too.
    let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at);
    out.push(b'"');
    write_year(at.year(), out);
    out.push(b'-');
    push_padded(at.month(), 2, out);
    out.push(b'-');
    push_padded(at.day(), 2, out);
    out.push(b'T');
    push_padded(at.hour(), 2, out);
    out.push(b':');
    push_padded(at.minute(), 2, out);
    out.push(b':');
    push_padded(at.second(), 2, out);
    out.push(b'.');
    push_padded(at.timestamp_subsec_micros(), 6, out);
    out.extend_from_slice(b"Z\"");
}

/// Four digits for years 0000..=9999; outside that, ISO 8601's expanded
/// form: a sign and at least four digits (year 0 is 1 BC).
fn write_year(year: i32, out: &mut Vec<u8>) {
    if year < 0 {
        out.push(b'-');
    } else if year > 9999 {
        out.push(b'+');
    }
    push_padded(year.unsigned_abs(), 4, out);
}

fn push_padded(n: u32, width: usize, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let digits = decimal(u64::from(n), &mut buf);
    for _ in digits.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn canon(json: &str) -> String {
        canonical_text(json).unwrap()
    }

    fn number(literal: &str) -> String {
        let mut out = Vec::new();
        write_number(literal, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn literals() {
        assert_eq!(canon(" true "), "true");
        assert_eq!(canon("false"), "false");
        assert_eq!(canon("\tnull\r\n"), "null");
    }

    #[test]
    fn numbers_keep_their_exact_value() {
        let cases = [
            ("7", "7"),
            ("-7", "-7"),
            ("100", "1e2"),
            ("1.50", "15e-1"),
            ("-0.0015", "-15e-4"),
            ("1E+2", "1e2"),
            ("1e2", "1e2"),
            ("1e-2", "1e-2"),
            ("1.0e+0002", "1e2"),
            ("10e-1", "1"),
            ("0.1", "1e-1"),
            ("120.0340", "120034e-3"),
            ("1000.001", "1000001e-3"),
            ("12345678901234567890123", "12345678901234567890123"),
            ("123456789012345678901230", "12345678901234567890123e1"),
            ("0.000000000000000000000000000001", "1e-30"),
            ("1e9223372036854775807", "1e9223372036854775807"),
            ("10e9223372036854775806", "1e9223372036854775807"),
            ("1e-9223372036854775808", "1e-9223372036854775808"),
            ("0.1e-9223372036854775807", "1e-9223372036854775808"),
            // The literal's exponent overflows an i64, the adjusted one not.
            ("0.1e9223372036854775808", "1e9223372036854775807"),
            ("1e-00", "1"),
            ("-1E-0", "-1"),
        ];
        for (literal, expected) in cases {
            assert_eq!(number(literal), expected, "{literal}");
            assert_eq!(canon(literal), expected, "{literal} via parse");
        }
    }

    #[test]
    fn every_zero_is_0() {
        for literal in [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "0.000",
            "0e5",
            "0E-5",
            "-0e+00",
            "0.00e99",
            // No exponent to keep, so no range to check.
            "0e99999999999999999999999999999999999999999999999",
        ] {
            assert_eq!(number(literal), "0", "{literal}");
            assert_eq!(canon(literal), "0", "{literal} via parse");
        }
    }

    #[test]
    fn exponents_outside_i64_are_errors() {
        for literal in [
            "1e9223372036854775808",
            "10e9223372036854775807",
            "1e-9223372036854775809",
            "0.01e-9223372036854775807",
            "1e99999999999999999999999999999999999999999999999999999999",
            "-1e-99999999999999999999999999999999999999999999999999999999",
        ] {
            let mut out = b"x".to_vec();
            let error = write_number(literal, &mut out).unwrap_err();
            assert!(
                matches!(error, CanonicalError::ExponentOutOfRange { .. }),
                "{literal}: {error}"
            );
            assert_eq!(out, b"x", "output untouched");
            assert!(canonical_text(literal).is_err());
        }
    }

    #[test]
    fn huge_exponent_literal_is_cheap() {
        // A megabyte of exponent digits: rejected without a big allocation.
        let literal = format!("1e{}", "9".repeat(1_000_000));
        let error = canonical_text(&literal).unwrap_err();
        assert!(matches!(error, CanonicalError::ExponentOutOfRange { .. }));
        assert!(error.to_string().len() < 200, "message is shortened");
        let zeros = format!("1e{}5", "0".repeat(1_000_000));
        assert_eq!(canon(&zeros), "1e5");
    }

    #[test]
    fn bad_number_syntax_is_an_error() {
        for literal in [
            "", "-", "+1", "01", "-01", "1.", ".5", "1e", "1e+", "1.e5", "1e5.0", "NaN",
            "Infinity", "0x10", "1 ", " 1", "1_000", "--1", "1ee2", "١",
        ] {
            let error = write_number(literal, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(error, CanonicalError::NumberSyntax { .. }),
                "{literal:?}: {error}"
            );
        }
    }

    #[test]
    fn numbers_from_rust_values() {
        let mut out = Vec::new();
        write_value(
            &serde_json::json!([1.5, -0.0, 1e300, u64::MAX, i64::MIN]),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[15e-1,0,1e300,18446744073709551615,-9223372036854775808]"
        );
    }

    #[test]
    fn strings_escape_only_quote_backslash_and_controls() {
        let cases = [
            (r#""plain""#, r#""plain""#),
            (r#""a\"b\\c""#, r#""a\"b\\c""#),
            (r#""\/""#, r#""/""#),
            (r#""\b\f\n\r\t""#, r#""\u0008\u000c\u000a\u000d\u0009""#),
            (r#""\u001F\u0001\u0000""#, r#""\u001f\u0001\u0000""#),
            (r#""\u007f""#, "\"\u{7f}\""),
            (r#""\u00e9\u00E9é""#, "\"ééé\""),
            (r#""\ud83d\ude00😀""#, "\"😀😀\""),
            (r#""\uDBFF\uDFFF""#, "\"\u{10FFFF}\""),
            (r#""\u2028\ufeff""#, "\"\u{2028}\u{feff}\""),
            ("\"日本語\"", "\"日本語\""),
        ];
        for (json, expected) in cases {
            assert_eq!(canon(json), expected, "{json}");
        }
        let mut out = Vec::new();
        write_str("a\u{1f}\"\\\u{7f}z", &mut out);
        assert_eq!(out, b"\"a\\u001f\\\"\\\\\x7fz\"");
    }

    #[test]
    fn lone_surrogates_are_rejected() {
        // PostgreSQL refuses them too.
        assert!(canonical_text(r#""\ud800""#).is_err());
        assert!(canonical_text(r#""\ude00""#).is_err());
    }

    #[test]
    fn objects_sort_keys_bytewise_and_keep_the_last_duplicate() {
        assert_eq!(
            canon(r#"{ "b" : 1, "a" : 2, "aa": 3, "A": 4, "": 5 }"#),
            r#"{"":5,"A":4,"a":2,"aa":3,"b":1}"#
        );
        assert_eq!(canon(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
        assert_eq!(
            canon(r#"{"a":{"x":1},"a":{"y":2}}"#),
            r#"{"a":{"y":2}}"#,
            "the last duplicate wins whole, no merge"
        );
        // Bytewise UTF-8 order, not UTF-16 order: U+FF61 < U+1F600 in
        // UTF-8 but not in UTF-16 (surrogates sort below U+FF61).
        assert_eq!(
            canon("{\"\u{1F600}\":1,\"\u{FF61}\":2,\"\u{e9}\":3,\"z\":4}"),
            "{\"z\":4,\"\u{e9}\":3,\"\u{FF61}\":2,\"\u{1F600}\":1}"
        );
        // Escaped and raw spellings are the same key.
        assert_eq!(canon(r#"{"\u00e9":1,"é":2}"#), "{\"é\":2}");
    }

    #[test]
    fn nested_structures() {
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{}"), "{}");
        assert_eq!(canon("[ [ ] , { } ]"), "[[],{}]");
        assert_eq!(
            canon(
                r#"{"z": [1, 2.0, {"b": null, "a": [true, false, "x"]}],
                    "y": {"d": {"c": {}}}, "x": -0.0}"#
            ),
            r#"{"x":0,"y":{"d":{"c":{}}},"z":[1,2,{"a":[true,false,"x"],"b":null}]}"#
        );
        let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
        assert_eq!(canon(&deep), deep);
    }

    #[test]
    fn canonical_text_is_a_fixed_point() {
        for json in [
            r#"{"b":[1.50,1E+2,"\u00e9\n"],"a":{"d":-0,"c":1e-7}}"#,
            r#"[0.000,12e0,"\ud83d\ude00"]"#,
        ] {
            let once = canon(json);
            assert_eq!(canon(&once), once);
        }
    }

    #[test]
    fn invalid_json_is_an_error() {
        for json in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "'a'",
            "\"\t\"",
            "1 2",
            "\u{feff}1",
            "nul",
        ] {
            let error = canonical_text(json).unwrap_err();
            assert!(
                matches!(error, CanonicalError::Json(_)),
                "{json:?}: {error}"
            );
        }
        let too_deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(canonical_text(&too_deep).is_err());
    }

    #[test]
    fn timestamps_have_six_fraction_digits_truncated() {
        let mut out = Vec::new();
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        write_timestamp(at, &mut out);
        assert_eq!(out, b"\"2026-01-02T03:04:05.123456Z\"");

        out.clear();
        write_timestamp(Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(), &mut out);
        assert_eq!(out, b"\"0001-01-01T00:00:00.000000Z\"");

        out.clear();
        let before_epoch = Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap()
            + chrono::Duration::nanoseconds(999_999_999);
        write_timestamp(before_epoch, &mut out);
        assert_eq!(out, b"\"1969-12-31T23:59:59.999999Z\"");

        out.clear();
        write_timestamp(
            Utc.with_ymd_and_hms(12345, 6, 7, 8, 9, 10).unwrap(),
            &mut out,
        );
        assert_eq!(out, b"\"+12345-06-07T08:09:10.000000Z\"");

        out.clear();
        write_timestamp(Utc.with_ymd_and_hms(-44, 3, 15, 0, 0, 0).unwrap(), &mut out);
        assert_eq!(out, b"\"-0044-03-15T00:00:00.000000Z\"");
    }

    #[test]
    fn a_leap_second_encodes_as_the_next_second() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 1_500_000)
            .unwrap()
            .and_utc();
        let mut out = Vec::new();
        write_timestamp(leap, &mut out);
        assert_eq!(out, b"\"2017-01-01T00:00:00.500000Z\"");
    }

    /// The worked example of docs/INTEGRITY.md.
    pub(super) fn golden_record<'a>(
        headers: &'a str,
        payload: &'a str,
        blind_index: &'a [String],
        content_hash: &'a [u8; 32],
    ) -> ChainRecord<'a> {
        ChainRecord {
            chain_id: "orders/0",
            position: 42,
            event_id: Uuid::parse_str("0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f").unwrap(),
            event_type: "OrderPlaced",
            stream_id: "order-1001",
            stream_version: Some(3),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 27, 9, 30, 15).unwrap()
                + chrono::Duration::nanoseconds(123_456_789),
            ingested_at: Utc.with_ymd_and_hms(2026, 11, 27, 9, 30, 16).unwrap()
                + chrono::Duration::microseconds(5),
            source: Some("shop/checkout"),
            correlation_id: Some(Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap()),
            causation_id: None,
            subject_id: None,
            kafka_topic: Some("orders"),
            kafka_partition: Some(0),
            kafka_offset: Some(1200),
            headers,
            metadata: None,
            payload,
            blind_index,
            content_hash,
        }
    }

    #[test]
    fn golden_record_encoding_and_hash() {
        let headers = canon(r#"[{"key":"trace","value":"abc"}]"#);
        let payload = canon(
            r#"{"total": 12.50, "currency": "EUR", "note": "Grüße \"VIP\"", "items": [{"sku": "A-1", "qty": 2}]}"#,
        );
        let blind_index = vec!["e3b0c442".to_string(), "98fc1c14".to_string()];
        let content_hash: [u8; 32] = std::array::from_fn(|i| i as u8);
        let record = golden_record(&headers, &payload, &blind_index, &content_hash);

        let mut out = Vec::new();
        record.encode(&mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let expected = concat!(
            r#"{"blind_index":["e3b0c442","98fc1c14"],"causation_id":null,"#,
            r#""chain_id":"orders/0","#,
            r#""content_hash":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","#,
            r#""correlation_id":"11111111-2222-4333-8444-555555555555","#,
            r#""event_id":"0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f","event_type":"OrderPlaced","#,
            r#""format":1,"headers":[{"key":"trace","value":"abc"}],"#,
            r#""ingested_at":"2026-11-27T09:30:16.000005Z","kafka_offset":12e2,"#,
            r#""kafka_partition":0,"kafka_topic":"orders","metadata":null,"#,
            r#""occurred_at":"2026-11-27T09:30:15.123456Z","#,
            r#""payload":{"currency":"EUR","items":[{"qty":2,"sku":"A-1"}],"note":"Grüße \"VIP\"","total":125e-1},"#,
            r#""position":42,"source":"shop/checkout","stream_id":"order-1001","#,
            r#""stream_version":3,"subject_id":null}"#
        );
        assert_eq!(text, expected);
        // The record is itself canonical JSON.
        assert_eq!(canon(&text), text);

        // Plain SHA-256 of the bytes, to tell encoding from chaining bugs.
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            "f22ad87d7ff43db4911b078daf9d89b7a1a8f7c915872d1cd5d06295bd5d7249"
        );
        assert_eq!(out.len(), 718);
        let first = chain_hash(&GENESIS, &out);
        assert_eq!(
            hex::encode(first),
            "77dcede6eb76ff3b717e94020522efe1361eda25dfb6f8ba8b3358116bf006b7",
            "the v1 encoding changed: stored chains would no longer verify"
        );

        // The next link: the same record at position 43, chained on the first.
        let mut next = record;
        next.position = 43;
        out.clear();
        next.encode(&mut out);
        assert_eq!(
            hex::encode(chain_hash(&first, &out)),
            "9c6b64183697032098a3acb12d59679e9fefc229fa1a8c6228434d733cc56e6e",
            "the v1 encoding changed: stored chains would no longer verify"
        );
    }

    #[test]
    fn encode_appends_and_escapes_text_fields() {
        let blind_index = vec!["a\"b".to_string()];
        let content_hash = [0xffu8; 32];
        let mut record = golden_record("[]", "{}", &blind_index, &content_hash);
        record.stream_id = "line\nbreak";
        record.kafka_topic = None;
        record.kafka_partition = Some(i32::MIN);
        record.kafka_offset = Some(i64::MAX);
        record.stream_version = None;
        record.position = u64::MAX;
        record.metadata = Some(r#"{"a":1}"#);
        let mut out = b"prefix".to_vec();
        record.encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        let body = text.strip_prefix("prefix").unwrap();
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["blind_index"][0], "a\"b");
        assert_eq!(value["stream_id"], "line\nbreak");
        assert_eq!(value["kafka_topic"], Value::Null);
        assert_eq!(value["kafka_partition"].to_string(), "-2147483648");
        assert_eq!(value["kafka_offset"].to_string(), i64::MAX.to_string());
        assert_eq!(value["position"].to_string(), u64::MAX.to_string());
        assert_eq!(value["stream_version"], Value::Null);
        assert_eq!(value["metadata"]["a"].to_string(), "1");
        assert_eq!(value["content_hash"], "f".repeat(64));
        assert_eq!(value.as_object().unwrap().len(), 21);
        // Already canonical: sorted keys, no whitespace.
        assert_eq!(canon(body), body);
    }

    #[test]
    fn record_integers_are_canonical_numbers() {
        let cases: [(bool, u64); 12] = [
            (false, 0),
            (false, 1),
            (false, 10),
            (false, 1200),
            (false, 1001),
            (true, 1),
            (true, 500),
            (false, 10_000_000_000_000_000_000),
            (false, u64::MAX),
            (true, i64::MIN.unsigned_abs()),
            (false, i64::MAX as u64),
            (true, 2_147_483_648),
        ];
        for (negative, magnitude) in cases {
            let mut int = Vec::new();
            write_int(negative, magnitude, &mut int);
            let sign = if negative { "-" } else { "" };
            assert_eq!(
                String::from_utf8(int).unwrap(),
                number(&format!("{sign}{magnitude}")),
                "{sign}{magnitude}"
            );
        }
    }

    #[test]
    fn chain_hash_is_sha256_of_prev_then_record() {
        let expected: [u8; 32] = Sha256::digest([[7u8; 32].as_slice(), b"abc"].concat()).into();
        assert_eq!(chain_hash(&[7; 32], b"abc"), expected);
        assert_ne!(chain_hash(&GENESIS, b"abc"), chain_hash(&[1; 32], b"abc"));
    }
}
