//! CPU per event of `protection::prepare` (the single pass over the payload
//! text) against `prepare_reference` (payload parsed into a `Value`,
//! `protect_payload`, `write_value`), on order events like those of
//! `audit-node produce` (node/src/traffic.rs), with the default policy and
//! warm data keys. Needs the local PostgreSQL (or AUDIT_TEST_DATABASE_URL)
//! for the keys.
//!
//! ```text
//! cargo test --release -p audit-ledger --bench prepare -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, value::RawValue, Value};
use sqlx::PgPool;
use uuid::Uuid;

use audit_ledger::protect::{EnvKeyProvider, Policy};
use audit_ledger::store::protection::{prepare, prepare_reference, Protection};
use audit_ledger::testing::TestDatabase;
use audit_ledger::Event;

const BATCH: usize = 1_000;
const BATCHES: usize = 4;
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(500);

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn prepare_cpu_per_event() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let db = TestDatabase::create().await.expect("test database");
        let pool = PgPool::connect(&db.url).await.expect("connect");
        let provider = EnvKeyProvider::from_values(
            "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            None,
            "HxgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQAfHh0cGxo=",
        )
        .expect("keys");
        let protection =
            Protection::new(Policy::default_policy(), Arc::new(provider)).expect("protection");
        // The traffic mix, then only `order.created` (the largest payloads,
        // four protected fields).
        for created_only in [false, true] {
        let mut rng = StdRng::seed_from_u64(2026);
        let batches: Vec<Vec<Event>> = (0..BATCHES)
            .map(|b| {
                (0..BATCH)
                    .map(|i| order_event(&mut rng, (b * BATCH + i) as i64, created_only))
                    .collect()
            })
            .collect();
        let sample = &batches[0][0];
        println!("\n{}: {}", sample.event_type, sample.payload.get());
        let bytes: usize = batches.iter().flatten().map(|e| e.payload.get().len()).sum();
        println!(
            "{} events ({}) in batches of {BATCH}, payload {:.0} bytes on average",
            BATCH * BATCHES,
            if created_only { "order.created only" } else { "traffic mix" },
            bytes as f64 / (BATCH * BATCHES) as f64
        );
        let refs: Vec<Vec<&Event>> = batches.iter().map(|b| b.iter().collect()).collect();

        for (name, protection) in [("protected", Some(&protection)), ("unprotected", None)] {
            // Creates and caches the data keys (and checks both agree on what
            // they store).
            for batch in &refs {
                let mut new = prepare(protection, &pool, batch).await.expect("prepare");
                let mut old = prepare_reference(protection, &pool, batch).await.expect("reference");
                for event in batch {
                    let (new, old) = (new.take(event.kafka_offset), old.take(event.kafka_offset));
                    let (new, old) = (new.expect("stored"), old.expect("stored"));
                    assert_eq!(new.payload.len(), old.payload.len());
                    assert_eq!(new.blind_index, old.blind_index);
                }
            }
            let mut results = Vec::new();
            // AUDIT_BENCH_PATH=single (or reference) times one path only,
            // for a profiler.
            let only = std::env::var("AUDIT_BENCH_PATH").unwrap_or_default();
            for path in ["reference", "single pass"] {
                if !only.is_empty() && !path.starts_with(only.as_str()) {
                    continue;
                }
                let mut best = f64::INFINITY;
                let mut best_wall = f64::INFINITY;
                for _ in 0..ROUNDS {
                    let (cpu_start, wall_start) = (thread_cpu(), Instant::now());
                    let mut done = 0usize;
                    while wall_start.elapsed() < ROUND_TIME {
                        for batch in &refs {
                            let prepared = match path {
                                "reference" => prepare_reference(protection, &pool, batch).await,
                                _ => prepare(protection, &pool, batch).await,
                            };
                            drop(std::hint::black_box(prepared.expect("prepare")));
                            done += batch.len();
                        }
                    }
                    let cpu = (thread_cpu() - cpu_start).as_secs_f64() * 1e6 / done as f64;
                    let wall = wall_start.elapsed().as_secs_f64() * 1e6 / done as f64;
                    best = best.min(cpu);
                    best_wall = best_wall.min(wall);
                }
                results.push(best);
                println!(
                    "{name:>11}: prepare ({path:<11}) {best:.2} µs CPU per event ({best_wall:.2} µs wall)"
                );
            }
            if let [reference, single] = results[..] {
                println!(
                    "{name:>11}: single pass saves {:.2} µs per event ({:.1}x)",
                    reference - single,
                    reference / single
                );
            }
        }
        }
        pool.close().await;
        db.drop_database().await;
    });
}

/// CPU time of this thread (the runtime is single-threaded).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

const FIRST: [&str; 8] = [
    "Ada", "Grace", "Alan", "Zoë", "Linus", "Barbara", "Ken", "Margaret",
];
const LAST: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Müller", "Torvalds", "Liskov", "Thompson", "Hamilton",
];
const CITIES: [(&str, &str); 4] = [
    ("London", "EC1A 1BB"),
    ("Leeds", "LS1 4AP"),
    ("Bristol", "BS1 5TR"),
    ("York", "YO1 7HH"),
];
const CARDS: [&str; 3] = [
    "4111 1111 1111 1111",
    "4242 4242 4242 4242",
    "5555 5555 5555 4444",
];

/// An event as `audit-node produce` sends it (in its mix of types, or only
/// `order.created`): the envelope has the subject, the payload is what
/// traffic.rs writes for the event type (serde_json output: keys sorted,
/// compact).
fn order_event(rng: &mut StdRng, offset: i64, created_only: bool) -> Event {
    let customer = rng.gen_range(1..=5_000u64);
    let mut person = StdRng::seed_from_u64(customer);
    let (first, last) = (FIRST[person.gen_range(0..8)], LAST[person.gen_range(0..8)]);
    let (city, postal_code) = CITIES[person.gen_range(0..4)];
    let address = json!({
        "line1": format!("{} High Street", person.gen_range(1..200)),
        "city": city, "postal_code": postal_code, "country": "GB",
    });
    let name = format!("{first} {last}");
    let roll = if created_only {
        0
    } else {
        rng.gen_range(0..100)
    };
    let (event_type, payload) = match roll {
        0..=26 => {
            let items: Vec<Value> = (0..rng.gen_range(1..=3))
                .map(|_| {
                    json!({
                        "sku": format!("SKU-KB-{}", rng.gen_range(1000..1012)),
                        "quantity": rng.gen_range(1..=3),
                        "unit_price_cents": rng.gen_range(999..20_000),
                    })
                })
                .collect();
            (
                "order.created",
                json!({
                    "customer": {
                        "id": format!("customer-{customer}"),
                        "name": name,
                        "email": format!("{first}.{last}@example.com").to_lowercase(),
                        "phone": format!("+44 20 7946 0{:03}", person.gen_range(0..1000)),
                        "address": address,
                    },
                    "items": items,
                    "total_cents": rng.gen_range(999..60_000),
                    "currency": "EUR",
                }),
            )
        }
        27..=48 => (
            "order.paid",
            json!({"payment": {
                "method": "card",
                "card": {
                    "number": CARDS[rng.gen_range(0..3)],
                    "expiry": format!("{:02}/{:02}", rng.gen_range(1..=12), rng.gen_range(27..=31)),
                    "holder": name,
                },
                "amount_cents": rng.gen_range(999..60_000),
                "currency": "EUR",
            }}),
        ),
        49..=66 => (
            "order.shipped",
            json!({
                "carrier": "DHL",
                "tracking_number": format!("JD{:012}", rng.gen_range(0..1_000_000_000u64)),
                "shipping_address": address,
            }),
        ),
        67..=82 => (
            "order.delivered",
            json!({
                "delivered_at": "2026-01-01T10:00:00.123Z",
                "signed_by": name,
            }),
        ),
        83..=91 => ("order.cancelled", json!({"reason": "customer_request"})),
        _ => (
            "order.refunded",
            json!({
                "amount_cents": rng.gen_range(100..60_000),
                "reason": "damaged",
            }),
        ),
    };
    let raw = |value: &Value| RawValue::from_string(value.to_string()).expect("json");
    Event {
        event_id: Uuid::from_u128(rng.gen()),
        event_type: event_type.to_owned(),
        stream_id: format!("order-{}", rng.gen_range(1..100_000)),
        stream_version: Some(rng.gen_range(1..6)),
        occurred_at: Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap(),
        source: Some("orders-service".to_owned()),
        correlation_id: Some(Uuid::from_u128(rng.gen())),
        causation_id: Some(Uuid::from_u128(rng.gen())),
        subject_id: Some(format!("customer-{customer}")),
        payload: raw(&payload),
        metadata: Some(raw(
            &json!({"schema_version": 1, "producer": "audit-node produce"}),
        )),
        headers: json!([
            {"key": "content-type", "value": "application/json"},
            {"key": "traceparent", "value": format!("00-{:032x}-{:016x}-01", rng.gen::<u128>(), rng.gen::<u64>())},
        ])
        .to_string(),
        content_hash: rng.gen(),
        kafka_topic: "orders".to_owned(),
        kafka_partition: 0,
        kafka_offset: offset,
    }
}
