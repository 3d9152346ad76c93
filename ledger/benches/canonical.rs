//! Canonical JSON throughput on order events as PostgreSQL prints them,
//! `canonical_text` (the reference) against the single-pass canonicaliser,
//! and a whole chain link as `verify` computes it. Prints timings; asserts
//! only that the ways compared give the same bytes.
//!
//! ```text
//! cargo test --release -p audit-ledger --bench canonical -- --ignored --nocapture
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use audit_ledger::canonical::{
    canonical_text, chain_hash, write_canonical_text, Canonicalizer, ChainRecord, GENESIS,
};

const DOCS: usize = 2_000;
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(300);

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn canonical_throughput() {
    let mut rng = StdRng::seed_from_u64(2026);
    let events: Vec<[String; 3]> = (0..DOCS)
        .map(|i| {
            [
                pg_text(&order_payload(&mut rng, i)),
                pg_text(&headers(&mut rng)),
                pg_text(&metadata(&mut rng)),
            ]
        })
        .collect();
    let sample = &events[0];
    println!("payload as PostgreSQL prints it: {}", sample[0]);
    println!("headers: {}", sample[1]);
    println!("metadata: {}", sample[2]);

    let mut scratch = Canonicalizer::new();
    for (field, name) in ["payload", "headers", "metadata"].iter().enumerate() {
        let docs: Vec<&str> = events.iter().map(|e| e[field].as_str()).collect();
        let bytes: usize = docs.iter().map(|d| d.len()).sum();
        let (objects, ascending) = docs
            .iter()
            .map(|d| key_order(&serde_json::from_str(d).expect("JSON")))
            .fold((0, 0), |(o, a), (o2, a2)| (o + o2, a + a2));
        for doc in &docs {
            let mut out = Vec::new();
            scratch.canonicalize(doc, &mut out).expect("canonical");
            assert_eq!(out, canonical_text(doc).expect("canonical").into_bytes());
        }
        let reference = time_per_doc(&docs, |doc| {
            black_box(canonical_text(doc).expect("canonical"));
        });
        let mut out = Vec::with_capacity(4096);
        let fast = time_per_doc(&docs, |doc| {
            out.clear();
            scratch.canonicalize(doc, &mut out).expect("canonical");
            black_box(&out);
        });
        let thread_local = time_per_doc(&docs, |doc| {
            out.clear();
            write_canonical_text(doc, &mut out).expect("canonical");
            black_box(&out);
        });
        // A lower bound of sorts: serde_json only checking the syntax.
        let validate = time_per_doc(&docs, |doc| {
            black_box(serde_json::from_str::<serde::de::IgnoredAny>(doc).expect("JSON"));
        });
        let canonical: Vec<String> = docs
            .iter()
            .map(|d| canonical_text(d).expect("canonical"))
            .collect();
        let presorted = time_per_doc(
            &canonical.iter().map(String::as_str).collect::<Vec<_>>(),
            |doc| {
                out.clear();
                scratch.canonicalize(doc, &mut out).expect("canonical");
                black_box(&out);
            },
        );
        println!(
            "{name:>8}: {:.0} bytes avg, {ascending}/{objects} objects already in byte order; \
             canonical_text {:.3} µs, Canonicalizer {:.3} µs ({:.1}x), \
             write_canonical_text {:.3} µs, Canonicalizer on canonical input {:.3} µs; \
             serde_json syntax check alone {:.3} µs",
            bytes as f64 / DOCS as f64,
            reference,
            fast,
            reference / fast,
            thread_local,
            presorted,
            validate,
        );
    }

    // A whole event, as `verify` does it: three fields into one buffer.
    let mut out = Vec::with_capacity(4096);
    let reference = time_per_doc(&events, |event| {
        for field in event {
            black_box(canonical_text(field).expect("canonical"));
        }
    });
    let fast = time_per_doc(&events, |event| {
        out.clear();
        for field in event {
            scratch.canonicalize(field, &mut out).expect("canonical");
        }
        black_box(&out);
    });
    println!(
        "   event: canonical_text {reference:.3} µs ({:.0}k events/s per core), \
         Canonicalizer {fast:.3} µs ({:.0}k events/s per core)",
        1e3 / reference,
        1e3 / fast
    );

    // A whole chain link, as `verify` computes it from a row: the record
    // (encoding v1) with its JSON columns canonicalised, then SHA-256.
    let blind_index = vec!["email:3f2a9c".to_string()];
    let content_hash = [7u8; 32];
    // Before: each JSON column into its own string, then the record.
    let separate = time_per_doc(&events, |event| {
        let canonical: Vec<String> = event
            .iter()
            .map(|field| {
                let mut text = Vec::with_capacity(field.len());
                write_canonical_text(field, &mut text).expect("canonical");
                String::from_utf8(text).expect("UTF-8")
            })
            .collect();
        out.clear();
        sample_record(
            &canonical[0],
            &canonical[1],
            &canonical[2],
            &blind_index,
            &content_hash,
        )
        .encode(&mut out);
        black_box(chain_hash(&GENESIS, &out));
    });
    let mut checked = Vec::new();
    for event in &events {
        out.clear();
        link(event, &blind_index, &content_hash)
            .encode_canonicalizing(&mut scratch, &mut out)
            .expect("canonical");
        let canonical = [0, 1, 2].map(|i| canonical_text(&event[i]).expect("canonical"));
        checked.clear();
        link(&canonical, &blind_index, &content_hash).encode(&mut checked);
        assert_eq!(
            out, checked,
            "encode_canonicalizing gives the bytes of encode"
        );
    }
    let in_place = time_per_doc(&events, |event| {
        out.clear();
        link(event, &blind_index, &content_hash)
            .encode_canonicalizing(&mut scratch, &mut out)
            .expect("canonical");
        black_box(chain_hash(&GENESIS, &out));
    });
    let encode_only = time_per_doc(&events, |event| {
        out.clear();
        link(event, &blind_index, &content_hash)
            .encode_canonicalizing(&mut scratch, &mut out)
            .expect("canonical");
        black_box(&out);
    });
    println!(
        "    link: {:.0} bytes avg; canonical strings + encode + SHA-256 {separate:.3} µs, \
         encode_canonicalizing + SHA-256 {in_place:.3} µs ({:.0}k links/s per core), \
         of which SHA-256 {:.3} µs",
        out.len() as f64,
        1e3 / in_place,
        in_place - encode_only
    );
}

/// The sample record with the JSON columns of `event`.
fn link<'a>(
    event: &'a [String; 3],
    blind_index: &'a [String],
    content_hash: &'a [u8; 32],
) -> ChainRecord<'a> {
    let [payload, headers, metadata] = event;
    sample_record(payload, headers, metadata, blind_index, content_hash)
}

fn sample_record<'a>(
    payload: &'a str,
    headers: &'a str,
    metadata: &'a str,
    blind_index: &'a [String],
    content_hash: &'a [u8; 32],
) -> ChainRecord<'a> {
    ChainRecord {
        chain_id: "orders/7",
        position: 123_456,
        event_id: uuid::Uuid::from_u128(0x0192_b9c4_7d3e_7a51_9f00_5a1b_2c3d_4e5f),
        event_type: "order.created",
        stream_id: "order-1001",
        stream_version: Some(1),
        occurred_at: chrono::DateTime::from_timestamp_micros(1_795_000_000_123_456)
            .expect("timestamp"),
        ingested_at: chrono::DateTime::from_timestamp_micros(1_795_000_001_000_005)
            .expect("timestamp"),
        source: Some("shop/checkout"),
        correlation_id: Some(uuid::Uuid::from_u128(42)),
        causation_id: None,
        subject_id: Some("customer-4224"),
        kafka_topic: Some("orders"),
        kafka_partition: Some(7),
        kafka_offset: Some(98_765),
        headers,
        metadata: Some(metadata),
        payload,
        blind_index,
        content_hash,
    }
}

/// The best of several rounds, in µs per item.
fn time_per_doc<T>(items: &[T], mut run: impl FnMut(&T)) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut done = 0usize;
        while start.elapsed() < ROUND_TIME {
            for item in items {
                run(item);
            }
            done += items.len();
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e6 / done as f64);
    }
    best
}

/// How many objects there are, and how many of them PostgreSQL prints with
/// keys already in bytewise order (the single pass then moves nothing).
fn key_order(value: &Value) -> (usize, usize) {
    match value {
        Value::Array(items) => items
            .iter()
            .map(key_order)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        Value::Object(map) => {
            let keys = pg_keys(map);
            let ascending = keys.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes());
            map.values()
                .map(key_order)
                .fold((1, usize::from(ascending)), |a, b| (a.0 + b.0, a.1 + b.1))
        }
        _ => (0, 0),
    }
}

fn order_payload(rng: &mut StdRng, i: usize) -> Value {
    let items: Vec<Value> = (0..rng.gen_range(1..=3))
        .map(|_| {
            let cents: u32 = rng.gen_range(100..20_000);
            serde_json::json!({
                "sku": format!("SKU-{:05}", rng.gen_range(0..100_000)),
                "qty": rng.gen_range(1..5),
                "unit_price": number(&format!("{}.{:02}", cents / 100, cents % 100)),
            })
        })
        .collect();
    let subtotal: u32 = rng.gen_range(1_000..50_000);
    let tax = subtotal / 5;
    serde_json::json!({
        "order_id": format!("ord-{i:08}"),
        "customer": {
            "id": format!("cus-{:06}", rng.gen_range(0..1_000_000)),
            "email": envelope(rng),
            "name": envelope(rng),
        },
        "items": items,
        "amounts": {
            "subtotal": number(&format!("{}.{:02}", subtotal / 100, subtotal % 100)),
            "tax": number(&format!("{}.{:02}", tax / 100, tax % 100)),
            "total": number(&format!("{}.{:02}", (subtotal + tax) / 100, (subtotal + tax) % 100)),
            "currency": "EUR",
        },
        "channel": "web",
    })
}

/// A field encrypted by the protection layer.
fn envelope(rng: &mut StdRng) -> Value {
    serde_json::json!({"$enc": {
        "c": base64(rng, 60),
        "n": base64(rng, 16),
        "v": 1,
        "kid": uuid::Uuid::from_u128(rng.gen()).to_string(),
    }})
}

fn headers(rng: &mut StdRng) -> Value {
    serde_json::json!([
        {"key": "traceparent", "value": format!("00-{:032x}-{:016x}-01", rng.gen::<u128>(), rng.gen::<u64>())},
        {"key": "content-type", "value": "application/json"},
    ])
}

fn metadata(rng: &mut StdRng) -> Value {
    let region = ["eu-west-1", "eu-central-1"][rng.gen_range(0..2)];
    serde_json::json!({"schema": 3, "producer": "checkout-svc", "region": region})
}

fn base64(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

fn number(literal: &str) -> Value {
    serde_json::from_str(literal).expect("number")
}

/// `value` as PostgreSQL prints `jsonb`: keys by length, then bytes; ", "
/// and ": "; numbers as stored (`12.50` keeps its scale); escape_json.
fn pg_text(value: &Value) -> String {
    let mut out = String::new();
    write_pg(value, &mut out);
    out
}

fn pg_keys(map: &serde_json::Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by(|a, b| a.len().cmp(&b.len()).then(a.as_bytes().cmp(b.as_bytes())));
    keys
}

fn write_pg(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(n.as_str()),
        Value::String(s) => write_pg_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_pg(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, key) in pg_keys(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_pg_str(key, out);
                out.push_str(": ");
                write_pg(&map[key], out);
            }
            out.push('}');
        }
    }
}

fn write_pg_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < '\u{20}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}
