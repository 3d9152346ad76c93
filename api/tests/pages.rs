//! Event pages (`GET /v1/events`, `GET /v1/streams/{id}/events`,
//! `GET /v1/events/{id}`) rendered straight from rows: the same JSON as the
//! `EventView` rendering, for every kind of event. Plus an ignored
//! per-page cost benchmark.

mod common;

use std::time::Instant;

use audit_api::auth::Role;
use audit_api::disclose::EventView;
use audit_api::events::{to_page, EventPage};
use audit_api::render;
use audit_ledger::protect;
use audit_ledger::query::{self, EventFilter, EventRecord, PageQuery, TypePattern};
use audit_ledger::store::conformance;
use audit_ledger::{Header, OffsetKey, ParseOptions, PreparedBatch, RawRecord, WriteOutcome};
use common::*;
use poem::http::Method;
use poem_openapi::types::ToJSON as _;
use serde_json::{json, Value};
use uuid::Uuid;

/// A partition [`write_records`] writes to, apart from `Fixture::write`'s.
const RAW_PARTITION: i32 = 9;

/// Writes records with chosen keys and headers to [`RAW_PARTITION`],
/// from offset `first`.
async fn write_records(f: &Fixture, first: i64, records: Vec<(Vec<Header>, Value)>) {
    let n = records.len() as u64;
    let records = records
        .into_iter()
        .enumerate()
        .map(|(i, (headers, value))| RawRecord {
            topic: TOPIC.into(),
            partition: RAW_PARTITION,
            offset: first + i as i64,
            key: None,
            value: Some(value.to_string().into_bytes()),
            headers,
            timestamp_ms: Some(1_700_000_000_000),
        })
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch parses");
    let key = OffsetKey {
        group_id: "api-test".into(),
        topic: TOPIC.into(),
        partition: RAW_PARTITION,
    };
    let start = (first > 0).then_some(first);
    let outcome = conformance::write(&f.writer, &key, start, &batch).await;
    let WriteOutcome::Committed(stats) = outcome else {
        panic!("the batch was not written: {outcome:?}");
    };
    assert_eq!(stats.events, n, "every record became an event");
    settle(&f.owner).await;
}

/// Events of every shape a page shows: protected fields (some of a subject
/// erased afterwards), every optional column null, metadata and headers of
/// all kinds, strings that need escaping, numbers of many spellings,
/// look-alikes of envelopes in plain fields, and a system event. Returns
/// the customers' secrets.
async fn seed_every_shape(f: &Fixture) -> Vec<String> {
    let alice = Customer::new(1);
    let bob = Customer::new(2);
    let mut values = Vec::new();
    for (i, (customer, event_type)) in [
        (&alice, "order.created"),
        (&alice, "order.paid"),
        (&bob, "order.created"),
        (&bob, "order.shipped"),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, e) = order_event(
            &format!("order-{}", customer.id),
            i as i64 + 1,
            event_type,
            "2026-11-01T10:00:00.123456Z",
            customer,
            json!({
                "status": "new",
                "amount": 12.50,
                "shipping_address": {"street": "1 Main St", "city": "Springfield"},
                "payment": {"card": {"number": "4111111111111111", "brand": "visa"}},
            }),
        );
        values.push(e);
    }
    f.write(0, &values).await;

    let bare = |stream: &str, payload: Value| {
        json!({
            "event_id": Uuid::new_v4(),
            "event_type": "note.added",
            "stream_id": stream,
            "occurred_at": "2026-11-02T00:00:00Z",
            "payload": payload,
        })
    };
    // Spelled as written (arbitrary precision); PostgreSQL normalises some.
    let numbers: Value = serde_json::from_str(
        "[0, -0, 1.0, 1.50, 1e2, 1E-7, -3.25e+10, 12345678901234567890123456789, 0.1]",
    )
    .expect("numbers parse");
    let mut tricky = bare(
        "notes-1",
        json!({
            "text": "quote \" backslash \\ slash / tab \t newline \n bell \u{7} é ü 中文 😀 \u{2028}",
            "look": {"$encrypted": true, "$enc_": 1},
            "as_value": "$enc",
            "in_string": "{\"$enc\": {\"v\": 1}}",
            "numbers": numbers,
            "empty": {}, "list": [], "null": null, "yes": true, "no": false,
        }),
    );
    tricky["metadata"] = Value::Null;
    let mut with_metadata = bare("notes-1", json!({"n": 1}));
    with_metadata["metadata"] = json!({"trace": {"id": "abc"}, "tags": ["a", "b"], "n": 1.25});
    with_metadata["source"] = json!("backoffice");
    with_metadata["stream_version"] = json!(7);
    with_metadata["correlation_id"] = json!(Uuid::new_v4());
    with_metadata["causation_id"] = json!(Uuid::new_v4());
    let mut no_customer_id = bare(
        "orders-anon",
        json!({"customer": {"email": "anon@example.test"}}),
    );
    no_customer_id["event_type"] = json!("order.created");
    let header = |key: &str, value: Option<&[u8]>| Header {
        key: key.into(),
        value: value.map(<[u8]>::to_vec),
    };
    write_records(
        f,
        0,
        vec![
            (vec![], bare("notes-2", json!({}))),
            (
                vec![
                    header("traceparent", Some(b"00-abc-def-01")),
                    header("empty", Some(b"")),
                    header("none", None),
                    header("binary", Some(&[0, 159, 146, 150])),
                    header("quote\"key", Some("é\n".as_bytes())),
                    header("traceparent", Some(b"repeated")),
                ],
                tricky,
            ),
            (vec![header("k", Some(b"v"))], with_metadata),
            (vec![], no_customer_id),
        ],
    )
    .await;

    // Alice is erased: her fields are envelopes whose key is gone (and the
    // erasure is a system event, in the system chain).
    let erased = f
        .request(
            Method::DELETE,
            &format!("/v1/subjects/{}", alice.id),
            Some(&f.tokens.admin),
            Some(r#"{"reason":"test"}"#.into()),
        )
        .await;
    erased.assert_ok();
    settle(&f.owner).await;
    let mut secrets = alice.secrets();
    secrets.extend(bob.secrets());
    secrets.extend([
        "4111111111111111".into(),
        "Springfield".into(),
        "anon@example.test".into(),
    ]);
    secrets
}

/// The events as the previous rendering showed them: decoded into
/// `EventRecord`s, redacted as `Value`s, turned into `EventView`s and
/// serialized by poem-openapi.
fn previous_page(records: Vec<EventRecord>) -> Value {
    let redacted = records
        .into_iter()
        .map(|mut r| {
            protect::redact_payload(&mut r.payload);
            r
        })
        .collect();
    to_page(redacted).to_json().expect("a page is JSON")
}

fn previous_event(mut record: EventRecord) -> Value {
    protect::redact_payload(&mut record.payload);
    EventView::from_record(record)
        .to_json()
        .expect("an event is JSON")
}

async fn records(
    f: &Fixture,
    filter: &EventFilter,
    after: Option<query::Position>,
    limit: i64,
) -> Vec<EventRecord> {
    query::page(
        f.state.pool(),
        PageQuery {
            filter,
            after,
            limit,
            until_tx: None,
        },
    )
    .await
    .expect("page reads")
}

/// Checks a response rendered from rows against the previous rendering,
/// as JSON values; also that it is JSON as declared and shows no secret.
#[track_caller]
fn assert_same(reply: &Reply, previous: &Value, secrets: &[String]) {
    assert_eq!(reply.status.as_u16(), 200, "{reply:#?}");
    assert_eq!(reply.content_type, "application/json; charset=utf-8");
    let parsed: Value = serde_json::from_str(&reply.text).expect("the body is JSON");
    assert_eq!(&parsed, previous, "{}", reply.text);
    for secret in secrets {
        assert!(
            !reply.text.contains(secret.as_str()),
            "{secret} shown: {}",
            reply.text
        );
    }
}

/// `GET /v1/events`, `GET /v1/streams/{id}/events` and `GET /v1/events/{id}`
/// rendered from rows equal the previous `EventView` rendering for every
/// kind of event, for readers and for auditors who do not decrypt; pages
/// followed by cursor, filtered, and past the end (`next_cursor: null`).
#[tokio::test]
async fn rendered_pages_equal_the_previous_rendering() {
    let f = Fixture::new().await;
    let secrets = seed_every_shape(&f).await;
    let all = records(&f, &EventFilter::default(), None, 1000).await;
    assert_eq!(all.len(), 9, "8 written, 1 erasure");
    assert!(all.iter().any(|r| r.event_type == "audit.subject_erased"));
    assert!(all.iter().any(|r| r.metadata.is_none()));
    assert!(all
        .iter()
        .any(|r| r.subject_id.is_none() && r.source.is_none()));

    for role in [Role::Reader, Role::Auditor] {
        // Everything in one page, then three at a time to the end.
        let reply = f
            .get_as(role, &url("/v1/events", &[("limit", "1000")]))
            .await;
        assert_same(&reply, &previous_page(all.clone()), &secrets);
        let mut after = None;
        loop {
            let page = records(&f, &EventFilter::default(), after, 3).await;
            let cursor = after.map(|p: query::Position| p.to_cursor());
            let mut params = vec![("limit", "3")];
            if let Some(c) = &cursor {
                params.push(("cursor", c));
            }
            let reply = f.get_as(role, &url("/v1/events", &params)).await;
            let empty = page.is_empty();
            after = page.last().map(|r| r.position);
            assert_same(&reply, &previous_page(page), &secrets);
            if empty {
                assert_eq!(reply.json, json!({"events": [], "next_cursor": null}));
                break;
            }
        }
        // Filtered.
        let filter = EventFilter {
            event_types: vec!["order.*".parse().unwrap()],
            ..EventFilter::default()
        };
        let reply = f
            .get_as(role, &url("/v1/events", &[("event_type", "order.*")]))
            .await;
        assert_same(
            &reply,
            &previous_page(records(&f, &filter, None, 100).await),
            &secrets,
        );
        // Each stream, and each event alone.
        let mut streams: Vec<&str> = all.iter().map(|r| r.stream_id.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            let filter = EventFilter {
                stream_id: Some(stream.to_owned()),
                ..EventFilter::default()
            };
            let path = format!("/v1/streams/{}/events", urlencode(stream));
            let reply = f.get_as(role, &path).await;
            assert_same(
                &reply,
                &previous_page(records(&f, &filter, None, 100).await),
                &secrets,
            );
        }
        for record in &all {
            let reply = f
                .get_as(role, &format!("/v1/events/{}", record.event_id))
                .await;
            assert_same(&reply, &previous_event(record.clone()), &secrets);
        }
    }
    let missing = f
        .get_as(Role::Reader, &format!("/v1/events/{}", Uuid::new_v4()))
        .await;
    missing.assert_problem(404);

    // The comparison would catch a page that skipped redaction.
    let unredacted = to_page(all.clone()).to_json().unwrap();
    let reply = f
        .get_as(Role::Reader, &url("/v1/events", &[("limit", "1000")]))
        .await;
    assert_ne!(reply.json, unredacted);
    f.finish().await;
}

fn urlencode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Event types the benchmark writes, in turn.
const BENCH_TYPES: [&str; 4] = [
    "order.created",
    "order.paid",
    "order.shipped",
    "order.refunded",
];

/// An order event of about the size of the benchmark generator's (~880
/// bytes as served): four protected customer fields, a protected address.
fn bench_event(i: usize, customer: &Customer) -> Value {
    let (_, mut e) = order_event(
        &format!("order-{}", i / 4),
        (i % 4) as i64 + 1,
        BENCH_TYPES[i % 4],
        "2026-11-03T10:00:00Z",
        customer,
        json!({
            "status": "paid",
            "currency": "EUR",
            "total": "37.50",
            "items": [
                {"sku": format!("sku-{}", i % 97), "qty": 1, "price": "12.50"},
                {"sku": format!("sku-{}", i % 89), "qty": 2, "price": "12.50"},
            ],
            "shipping_address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"},
        }),
    );
    e["metadata"] = json!({"schema": 1, "producer": "shop-7"});
    e
}

/// User and system CPU time of this process so far (Linux), in seconds.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks (100 per second).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Just enough of a page to follow it.
#[derive(serde::Deserialize)]
struct PageShape {
    events: Vec<serde::de::IgnoredAny>,
    next_cursor: Option<String>,
}

/// Per-page cost of `GET /v1/events?event_type=order.paid&limit=100`
/// through the real router (in process, no TCP), one request at a time:
///
/// `cargo test --release -p audit-api --test pages bench -- --ignored --nocapture`
///
/// (`AUDIT_BENCH_EVENTS`, default 20000 events written first;
/// `AUDIT_BENCH_PAGES`, default 1000 pages timed.) Also times the SQL of the
/// same pages alone (rows fetched, not decoded), to tell database from node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn bench_event_pages() {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let total = var("AUDIT_BENCH_EVENTS", 20_000);
    let pages = var("AUDIT_BENCH_PAGES", 1000);
    let f = Fixture::new().await;
    let customer = Customer::new(5);
    let started = Instant::now();
    for batch in 0..total.div_ceil(1000) {
        let values: Vec<Value> = (batch * 1000..total.min(batch * 1000 + 1000))
            .map(|i| bench_event(i, &customer))
            .collect();
        f.write((batch % 4) as i32, &values).await;
    }
    eprintln!("wrote {total} events in {:.1?}", started.elapsed());
    sqlx::query("VACUUM ANALYZE events")
        .execute(&f.owner)
        .await
        .unwrap();

    // The HTTP route.
    let token = f.tokens.of(Role::Reader).to_owned();
    for round in 0..3 {
        let mut cursor: Option<String> = None;
        let mut bytes = 0usize;
        let mut events = 0usize;
        let started = Instant::now();
        let cpu = process_cpu_seconds();
        for _ in 0..pages {
            let mut params = vec![("event_type", "order.paid"), ("limit", "100")];
            if let Some(c) = &cursor {
                params.push(("cursor", c));
            }
            let response = f
                .client
                .get(url("/v1/events", &params))
                .header("Authorization", format!("Bearer {token}"))
                .send()
                .await
                .0;
            assert_eq!(response.status().as_u16(), 200);
            let body = response.into_body().into_vec().await.unwrap();
            bytes += body.len();
            // Not a full parse: the events are skipped, not built.
            let page: PageShape = serde_json::from_slice(&body).unwrap();
            let n = page.events.len();
            events += n;
            cursor = if n == 100 { page.next_cursor } else { None };
        }
        let elapsed = started.elapsed();
        let cpu = process_cpu_seconds() - cpu;
        eprintln!(
            "round {round}: GET /v1/events: {pages} pages, {events} events, {:.1} KB/page: \
             {:.2} ms/page, {:.0} pages/s; this process's CPU {:.2} ms/page \
             (node and the client's skim of each body; PostgreSQL's not counted)",
            bytes as f64 / pages as f64 / 1e3,
            elapsed.as_secs_f64() * 1e3 / pages as f64,
            pages as f64 / elapsed.as_secs_f64(),
            cpu * 1e3 / pages as f64,
        );
    }

    // The same pages' SQL alone.
    let filter = EventFilter {
        event_types: vec![TypePattern::Exact("order.paid".to_owned())],
        ..EventFilter::default()
    };
    let mut after = None;
    let started = Instant::now();
    let cpu = process_cpu_seconds();
    let mut rendering = std::time::Duration::ZERO;
    for _ in 0..pages {
        let rows = query::page_query(
            query::EVENT_COLUMNS,
            PageQuery {
                filter: &filter,
                after,
                limit: 100,
                until_tx: None,
            },
        )
        .build()
        .fetch_all(f.state.pool())
        .await
        .unwrap();
        after = if rows.len() == 100 {
            Some(render::row_position(rows.last().unwrap()).unwrap())
        } else {
            None
        };
        let render_started = Instant::now();
        let body = render::event_page::<EventPage>(&rows).unwrap();
        rendering += render_started.elapsed();
        std::hint::black_box(body.as_bytes());
    }
    let elapsed = started.elapsed() - rendering;
    let cpu = process_cpu_seconds() - cpu - rendering.as_secs_f64();
    eprintln!(
        "SQL alone: {:.2} ms/page (this process's CPU {:.2} ms/page); rendering the rows alone: {:.3} ms/page",
        elapsed.as_secs_f64() * 1e3 / pages as f64,
        cpu * 1e3 / pages as f64,
        rendering.as_secs_f64() * 1e3 / pages as f64,
    );
    f.finish().await;
}
