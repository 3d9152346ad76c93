use serde_json::json;

use super::*;
use crate::record::Header;

fn record_with(value: &[u8], headers: Vec<(&str, &str)>) -> RawRecord {
    RawRecord {
        topic: "orders".into(),
        partition: 3,
        offset: 42,
        key: Some(b"order-1".to_vec()),
        value: Some(value.to_vec()),
        headers: headers
            .into_iter()
            .map(|(k, v)| Header {
                key: k.into(),
                value: Some(v.as_bytes().to_vec()),
            })
            .collect(),
        timestamp_ms: None,
    }
}

fn as_value(raw: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).unwrap()
}

fn valid() -> serde_json::Value {
    json!({
        "event_id": "7d444840-9dc0-11d1-b245-5ffdce74fad2",
        "event_type": "order.created",
        "stream_id": "order-1",
        "occurred_at": "2026-11-27T10:00:00+01:00",
        "payload": {"total_cents": 1200},
    })
}

fn reason_of(value: serde_json::Value) -> DeadLetterReason {
    let bytes = value.to_string();
    parse(
        &record_with(bytes.as_bytes(), vec![]),
        &ParseOptions::default(),
    )
    .expect_err("should be rejected")
    .reason
}

#[test]
fn parses_a_native_envelope() {
    let mut v = valid();
    v["stream_version"] = json!(3);
    v["correlation_id"] = json!("7d444840-9dc0-11d1-b245-5ffdce74fad3");
    v["metadata"] = json!({"k": "v"});
    let record = record_with(v.to_string().as_bytes(), vec![("traceparent", "00-1")]);
    let event = parse(&record, &ParseOptions::default()).expect("valid");
    assert_eq!(event.event_type, "order.created");
    assert_eq!(event.stream_version, Some(3));
    assert_eq!(event.occurred_at.to_rfc3339(), "2026-11-27T09:00:00+00:00");
    assert_eq!(event.kafka_offset, 42);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&event.headers).unwrap(),
        json!([{"key": "traceparent", "value": "00-1"}])
    );
}

#[test]
fn same_content_same_hash_whatever_the_envelope_field_order() {
    // The envelope's fields may come in any order; the payload is compared
    // as sent (a producer retry re-sends the same bytes).
    let a = r#"{"event_id":"7d444840-9dc0-11d1-b245-5ffdce74fad2","event_type":"t","stream_id":"s","occurred_at":"2026-01-01T00:00:00Z","payload":{"a":1,"b":2}}"#;
    let b = r#"{"payload":{"a":1,"b":2},"occurred_at":"2026-01-01T00:00:00Z","stream_id":"s","event_type":"t","event_id":"7d444840-9dc0-11d1-b245-5ffdce74fad2"}"#;
    let c = r#"{"payload":{"b":3,"a":1},"occurred_at":"2026-01-01T00:00:00Z","stream_id":"s","event_type":"t","event_id":"7d444840-9dc0-11d1-b245-5ffdce74fad2"}"#;
    let opts = ParseOptions::default();
    let ha = parse(&record_with(a.as_bytes(), vec![]), &opts)
        .unwrap()
        .content_hash;
    let hb = parse(&record_with(b.as_bytes(), vec![]), &opts)
        .unwrap()
        .content_hash;
    let hc = parse(&record_with(c.as_bytes(), vec![]), &opts)
        .unwrap()
        .content_hash;
    assert_eq!(ha, hb);
    assert_ne!(ha, hc);
}

#[test]
fn rejects_with_precise_reasons() {
    let opts = ParseOptions::default();
    let r = parse(&record_with(b"", vec![]), &opts).unwrap_err();
    assert_eq!(r.reason.code(), "empty_value");
    let r = parse(&record_with(&[0xff, 0xfe, b'{'], vec![]), &opts).unwrap_err();
    assert_eq!(r.reason.code(), "invalid_utf8");
    assert_eq!(
        r.value.as_deref(),
        Some(&[0xff, 0xfe, b'{'][..]),
        "raw bytes are kept"
    );
    let r = parse(&record_with(b"{nope", vec![]), &opts).unwrap_err();
    assert_eq!(r.reason.code(), "not_json");
    assert_eq!(reason_of(json!([1, 2])).code(), "not_an_object");

    for field in [
        "event_id",
        "event_type",
        "stream_id",
        "occurred_at",
        "payload",
    ] {
        let mut v = valid();
        v.as_object_mut().unwrap().remove(field);
        assert_eq!(
            reason_of(v),
            DeadLetterReason::MissingField {
                field: field.into()
            },
            "{field}"
        );
    }
    let cases = [
        ("event_id", json!("not-a-uuid")),
        ("occurred_at", json!("yesterday")),
        ("occurred_at", json!(12)),
        ("occurred_at", json!("0000-01-01T00:00:00Z")),
        ("payload", json!([1])),
        ("payload", json!("text")),
        ("stream_version", json!(0)),
        ("stream_version", json!("3")),
        ("correlation_id", json!("x")),
        ("metadata", json!(1)),
        ("event_type", json!("")),
        ("stream_id", json!(7)),
    ];
    for (field, value) in cases {
        let mut v = valid();
        v[field] = value.clone();
        match reason_of(v) {
            DeadLetterReason::InvalidField { field: f, problem } => {
                assert_eq!(f, field, "{problem}")
            }
            other => panic!("{field}={value}: {other:?}"),
        }
    }
    let mut v = valid();
    v["colour"] = json!("blue");
    assert_eq!(
        reason_of(v),
        DeadLetterReason::UnknownField {
            field: "colour".into()
        }
    );

    let mut v = valid();
    v["payload"] = json!({"note": "nul \u{0000} here"});
    assert_eq!(reason_of(v).code(), "invalid_field");
}

#[test]
fn enforces_the_payload_limit() {
    let mut v = valid();
    v["payload"] = json!({"blob": "x".repeat(2000)});
    let record = record_with(v.to_string().as_bytes(), vec![]);
    let r = parse(
        &record,
        &ParseOptions {
            max_payload_bytes: 1000,
        },
    )
    .unwrap_err();
    assert!(matches!(
        r.reason,
        DeadLetterReason::PayloadTooLarge { max: 1000, .. }
    ));
    assert!(r
        .reason
        .to_string()
        .contains("over the configured maximum of 1000"));
}

#[test]
fn accepts_structured_cloudevents() {
    let ce = json!({
        "specversion": "1.0",
        "id": "A234-1234-1234",
        "source": "/orders",
        "type": "order.paid",
        "subject": "order-7",
        "time": "2026-11-27T10:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": "7d444840-9dc0-11d1-b245-5ffdce74fad3",
        "tenant": "eu",
        "data": {"amount_cents": 10},
    });
    let record = record_with(
        ce.to_string().as_bytes(),
        vec![(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )],
    );
    let event = parse(&record, &ParseOptions::default()).expect("valid cloudevent");
    assert_eq!(event.event_type, "order.paid");
    assert_eq!(event.stream_id, "order-7");
    assert_eq!(event.source.as_deref(), Some("/orders"));
    assert!(event.correlation_id.is_some());
    assert_eq!(as_value(&event.payload), json!({"amount_cents": 10}));
    let meta = as_value(&event.metadata.expect("metadata"));
    assert_eq!(meta["cloudevents"]["tenant"], "eu");
    assert_eq!(meta["cloudevents"]["id"], "A234-1234-1234");
    // A non-UUID id maps to a stable UUID, so retries still deduplicate.
    let again = parse(&record, &ParseOptions::default()).unwrap();
    assert_eq!(event.event_id, again.event_id);
}

#[test]
fn accepts_binary_cloudevents() {
    let record = record_with(
        br#"{"amount_cents": 10}"#,
        vec![
            ("ce_specversion", "1.0"),
            ("ce_id", "7d444840-9dc0-11d1-b245-5ffdce74fad9"),
            ("ce_source", "/payments"),
            ("ce_type", "payment.captured"),
            ("ce_time", "2026-11-27T10:00:00Z"),
            ("ce_causationid", "7d444840-9dc0-11d1-b245-5ffdce74fad3"),
            ("content-type", "application/json"),
        ],
    );
    let event = parse(&record, &ParseOptions::default()).expect("valid cloudevent");
    assert_eq!(
        event.event_id.to_string(),
        "7d444840-9dc0-11d1-b245-5ffdce74fad9"
    );
    assert_eq!(event.stream_id, "order-1", "falls back to the record key");
    assert!(event.causation_id.is_some());

    let missing_type = record_with(
        br#"{"a": 1}"#,
        vec![
            ("ce_specversion", "1.0"),
            ("ce_id", "1"),
            ("ce_source", "/x"),
            ("ce_time", "2026-11-27T10:00:00Z"),
        ],
    );
    let r = parse(&missing_type, &ParseOptions::default()).unwrap_err();
    assert_eq!(
        r.reason,
        DeadLetterReason::MissingField {
            field: "type".into()
        }
    );
}

/// Random envelopes, valid and broken in the ways producers break them:
/// every field missing, null, of another type, escaped, empty, too long,
/// duplicated or unknown; the fast path must give exactly what the general
/// path gives, event or dead letter.
#[test]
fn fast_and_general_paths_agree() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(7);
    let fields = NATIVE_FIELDS;
    let odd_values = [
        "null",
        "1",
        "0",
        "-3",
        "3.0",
        "1e2",
        "\"3\"",
        "true",
        "[]",
        "{}",
        "{\"a\": 1}",
        "\"\"",
        "\"  \"",
        "\"order\\u002e1\"",
        "\"tab\\there\"",
        "\"7d444840-9dc0-11d1-b245-5ffdce74fad2\"",
        "\"not-a-uuid\"",
        "\"2026-11-27T10:00:00Z\"",
        "\"2026-13-27T10:00:00Z\"",
        "\"0000-01-01T00:00:00Z\"",
        "\"2026-11-27T10:00:00.1234567+05:30\"",
        "{\"n\": \"\\u0000\"}",
    ];
    let long = format!("\"{}\"", "x".repeat(MAX_IDENTIFIER_LEN + 1));
    let mut accepted_fast = 0;
    for case in 0..20_000 {
        let mut members: Vec<(String, String)> = vec![
            (
                "event_id".into(),
                format!("\"{}\"", Uuid::from_u128(rng.gen())),
            ),
            ("event_type".into(), "\"order.created\"".into()),
            (
                "stream_id".into(),
                format!("\"order-{}\"", rng.gen_range(0..100)),
            ),
            (
                "occurred_at".into(),
                "\"2026-11-27T10:00:00.5+01:00\"".into(),
            ),
            (
                "payload".into(),
                format!(
                    "{{\"total_cents\": {}, \"customer\": {{\"email\": \"a@b.c\"}}}}",
                    rng.gen_range(0..10_000)
                ),
            ),
        ];
        for optional in [
            ("stream_version", "2".to_string()),
            ("source", "\"checkout\"".to_string()),
            (
                "correlation_id",
                format!("\"{}\"", Uuid::from_u128(rng.gen())),
            ),
            (
                "causation_id",
                format!("\"{}\"", Uuid::from_u128(rng.gen())),
            ),
            ("subject_id", "\"customer-9\"".to_string()),
            ("metadata", "{\"trace\": \"t-1\"}".to_string()),
        ] {
            if rng.gen_bool(0.5) {
                members.push((optional.0.into(), optional.1));
            }
        }
        let mutations = if case % 4 == 0 {
            0
        } else {
            rng.gen_range(1..3)
        };
        for _ in 0..mutations {
            let field = fields[rng.gen_range(0..fields.len())].to_string();
            match rng.gen_range(0..6) {
                0 => members.retain(|(k, _)| *k != field),
                1 => {
                    let value = if rng.gen_bool(0.1) {
                        long.clone()
                    } else {
                        odd_values[rng.gen_range(0..odd_values.len())].to_string()
                    };
                    members.retain(|(k, _)| *k != field);
                    members.push((field, value));
                }
                2 => members.push((field, "\"again\"".into())),
                3 => members.push((
                    ["data", "specversion", "extra", "Event_id"][rng.gen_range(0..4)].into(),
                    "\"1.0\"".into(),
                )),
                4 => members.reverse(),
                _ => {
                    // The key spelled with an escape.
                    if let Some(member) = members.iter_mut().find(|(k, _)| *k == field) {
                        member.0 = member.0.replacen('_', "\\u005f", 1);
                    }
                }
            }
        }
        let text = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let headers = if case % 50 == 0 {
            vec![("content-type", "application/cloudevents+json")]
        } else {
            vec![("trace", "x")]
        };
        let record = record_with(text.as_bytes(), headers);
        let options = ParseOptions::default();
        let fast = parse_with(&record, &options, true);
        let general = parse_with(&record, &options, false);
        if fast.is_ok() {
            accepted_fast += 1;
        }
        assert_eq!(format!("{fast:?}"), format!("{general:?}"), "{text}");
    }
    // The generator is not so broken that nothing is valid.
    assert!(accepted_fast > 4_000, "{accepted_fast} valid cases");
}

/// The hand-written normalised envelope is serde_json's, byte for byte,
/// so content hashes (and with them duplicate detection against events
/// stored by earlier versions) do not change.
#[test]
fn normalised_envelope_is_serde_jsons() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(5);
    let strings = [
        "order.created",
        "a\"b",
        "back\\slash",
        "tab\tnew\nline",
        "\u{1}\u{1f}\u{7f}",
        "é€😀",
        "/",
    ];
    let pick = |rng: &mut StdRng| strings[rng.gen_range(0..strings.len())].to_string();
    for _ in 0..2_000 {
        let fields = Fields {
            event_id: Uuid::from_u128(rng.gen()),
            event_type: pick(&mut rng),
            stream_id: pick(&mut rng),
            stream_version: rng.gen_bool(0.5).then(|| rng.gen_range(1..i64::MAX)),
            occurred_at: DateTime::from_timestamp_micros(rng.gen_range(0..253_402_300_799_999_999))
                .expect("in range"),
            source: rng.gen_bool(0.5).then(|| pick(&mut rng)),
            correlation_id: rng.gen_bool(0.5).then(|| Uuid::from_u128(rng.gen())),
            causation_id: rng.gen_bool(0.5).then(|| Uuid::from_u128(rng.gen())),
            subject_id: rng.gen_bool(0.5).then(|| pick(&mut rng)),
            payload: RawValue::from_string(r#"{"b": [1, 2.50], "a": "x"}"#.into()).expect("json"),
            metadata: rng
                .gen_bool(0.5)
                .then(|| RawValue::from_string(r#"{ "m" : null }"#.into()).expect("json")),
        };
        let mut written = Vec::new();
        fields.write_normalised(&mut written);
        assert_eq!(
            String::from_utf8_lossy(&written),
            String::from_utf8_lossy(&fields.normalised_by_serde())
        );
    }
}
