//! Streaming replay, replay jobs and proofs against the real PostgreSQL:
//! every route with every role; NDJSON replay in order, equal to
//! `/v1/events`, resumed from a cursor; an SSE live tail under concurrent
//! ingestion with no gap and no duplicate; the stream limit; replay jobs
//! (idempotency, conflicts, refused topics, progress with a runner);
//! proofs checked as a client would. Plus an ignored throughput benchmark.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_actors::republish::{
    MemoryRepublisher, ReplayRunner, ReplayRunnerArgs, ReplayRunnerConfig,
};
use audit_api::auth::{entry_for, Role, TokenTable};
use audit_api::fold::Reducers;
use audit_api::state::{ApiDatabase, ApiLimits, ApiState};
use audit_ledger::checkpoint::{Checkpoint, SigningKeyPair};
use audit_ledger::merkle::{self, Hash};
use audit_ledger::query::Position;
use audit_ledger::replay_jobs::HEADER_EVENT_ID;
use audit_ledger::store::checkpointer::{CheckpointPolicy, Checkpointer};
use common::*;
use futures::StreamExt as _;
use poem::http::Method;
use poem::EndpointExt as _;
use serde_json::{json, Value};
use uuid::Uuid;

const ALL_ROLES: [Role; 3] = [Role::Reader, Role::Auditor, Role::Admin];
/// Checkpoints every 5 events of a chain (the interval never passes in a test).
const CHECKPOINT_EVERY: u64 = 5;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);

/// The common fixture, with a checkpointing writer and an API state that
/// knows the checkpointer and the node's topics (`orders`).
/// Checks a checkpoint's signature (the public key inside).
type VerifyCheckpoint = dyn Fn(&Checkpoint) -> Result<(), String> + Send + Sync;

struct Env {
    f: Fixture,
    /// Checks a checkpoint's signature with the node's public key.
    verify: Box<VerifyCheckpoint>,
}

async fn env(limits: ApiLimits) -> Env {
    let mut f = Fixture::with(limits.clone(), Reducers::default()).await;
    let key = SigningKeyPair::generate();
    let public_key = key.public_key();
    let verify = Box::new(move |c: &Checkpoint| c.verify(&public_key).map_err(|e| e.to_string()));
    let checkpointer = Arc::new(Checkpointer::new(
        key,
        None,
        CheckpointPolicy {
            every_events: CHECKPOINT_EVERY,
            every: CHECKPOINT_INTERVAL,
        },
        "api-test",
    ));
    f.writer = f.writer.clone().with_checkpoints(checkpointer.clone());
    let tokens = TokenTable::from_entries(vec![
        entry_for("test-reader", Role::Reader, &f.tokens.reader),
        entry_for("test-auditor", Role::Auditor, &f.tokens.auditor),
        entry_for("test-admin", Role::Admin, &f.tokens.admin),
    ])
    .expect("tokens");
    let state = ApiState::connect(
        &ApiDatabase {
            url: f.db.url.clone(),
            max_connections: 4,
        },
        tokens,
        limits,
    )
    .await
    .expect("api state")
    .with_protection(f.protection.clone())
    .with_checkpointer(checkpointer)
    .with_consumed_topics(vec![TOPIC.to_owned()]);
    f.state.pool().close().await;
    f.state = Arc::new(state);
    let app = audit_api::app(f.state.clone(), None, audit_api::always_ready()).boxed();
    f.client = poem::test::TestClient::new(app);
    Env { f, verify }
}

impl Env {
    async fn finish(self) {
        self.f.finish().await;
    }

    /// A request with extra headers; the raw response.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        role: Option<Role>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> poem::Response {
        let mut builder = self.f.client.request(method, uri.to_owned());
        if let Some(role) = role {
            builder = builder.header(
                "Authorization",
                format!("Bearer {}", self.f.tokens.of(role)),
            );
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(body) = body {
            builder = builder
                .content_type("application/json")
                .body(body.to_string());
        }
        builder.send().await.0
    }

    /// A finite NDJSON replay: its lines as JSON.
    async fn ndjson(&self, uri: &str) -> Vec<Value> {
        let response = self
            .send(Method::GET, uri, Some(Role::Reader), &[], None)
            .await;
        assert_eq!(response.status().as_u16(), 200, "{uri}");
        assert_eq!(
            response.content_type(),
            Some("application/x-ndjson"),
            "{uri}"
        );
        let text = response.into_body().into_string().await.expect("body");
        assert!(text.is_empty() || text.ends_with('\n'), "{text}");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    async fn post_job(&self, role: Role, body: Value) -> Reply {
        self.f
            .request(
                Method::POST,
                "/v1/replays",
                Some(self.f.tokens.of(role)),
                Some(body.to_string()),
            )
            .await
    }
}

fn event_ids(lines: &[Value]) -> Vec<Uuid> {
    lines
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Orders of two customers on two partitions, plus a payment.
async fn seed(f: &Fixture) -> (Customer, Customer) {
    let alice = Customer::new(1);
    let bob = Customer::new(2);
    for round in 0..4 {
        let mut p0 = Vec::new();
        let mut p1 = Vec::new();
        for i in 0..3 {
            let (_, e) = order_event(
                &format!("order-a{round}-{i}"),
                1,
                "order.created",
                "2026-11-01T10:00:00Z",
                &alice,
                json!({"status": "new", "amount_cents": 1200, "round": round}),
            );
            p0.push(e);
            let (_, e) = order_event(
                &format!("order-b{round}-{i}"),
                1,
                if i == 2 {
                    "payment.captured"
                } else {
                    "order.paid"
                },
                "2026-11-02T10:00:00.123456Z",
                &bob,
                json!({"status": "paid", "total": 12.5}),
            );
            p1.push(e);
        }
        f.write(0, &p0).await;
        f.write(1, &p1).await;
    }
    (alice, bob)
}

/// Events whose chains get checkpoints at 5 and 10 events: `orders/0`
/// holds 12 (the last 2 not yet covered), `orders/1` 10. Returns the
/// event ids of `orders/0` in chain order.
async fn seed_chains(f: &Fixture) -> Vec<Uuid> {
    let customer = Customer::new(4);
    let mut chain0 = Vec::new();
    for (partition, sizes) in [(0, &[5, 5, 2][..]), (1, &[5, 5][..])] {
        for (batch, n) in sizes.iter().enumerate() {
            let values: Vec<Value> = (0..*n)
                .map(|i| {
                    let (id, e) = order_event(
                        &format!("order-c{partition}-{batch}-{i}"),
                        1,
                        "order.created",
                        "2026-11-04T10:00:00Z",
                        &customer,
                        json!({"i": i}),
                    );
                    if partition == 0 {
                        chain0.push(id);
                    }
                    e
                })
                .collect();
            f.write(partition, &values).await;
        }
    }
    chain0
}

/// Every new route without a token (401), with a bad one (401), with each
/// role: 403 below the route's role, success from it on.
#[tokio::test]
async fn new_routes_with_every_role() {
    let env = env(ApiLimits::default()).await;
    let event_id = seed_chains(&env.f).await[0];
    let job = json!({"job_id": "roles-1", "target_topic": "replayed", "filter": {"event_type": ["order.*"]}});
    // Created by the admin first, so every later POST is the same request (200).
    let created = env.post_job(Role::Admin, job.clone()).await;
    assert_eq!(created.status.as_u16(), 201, "{created:#?}");
    let routes: Vec<(Method, String, Option<Value>, Role)> = vec![
        (Method::GET, "/v1/replay".into(), None, Role::Reader),
        (
            Method::GET,
            url("/v1/replay", &[("event_type", "order.*")]),
            None,
            Role::Reader,
        ),
        (
            Method::GET,
            "/v1/checkpoints/latest".into(),
            None,
            Role::Reader,
        ),
        (
            Method::GET,
            format!("/v1/proofs/inclusion/{event_id}"),
            None,
            Role::Reader,
        ),
        (
            Method::GET,
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "5")],
            ),
            None,
            Role::Reader,
        ),
        (
            Method::GET,
            "/v1/replays/roles-1".into(),
            None,
            Role::Auditor,
        ),
        (Method::POST, "/v1/replays".into(), Some(job), Role::Admin),
    ];
    for (method, uri, body, needed) in &routes {
        for token in [None, Some("not-a-token")] {
            let reply = env
                .f
                .request(
                    method.clone(),
                    uri,
                    token,
                    body.as_ref().map(Value::to_string),
                )
                .await;
            reply.assert_problem(401);
        }
        for role in ALL_ROLES {
            let response = env
                .send(method.clone(), uri, Some(role), &[], body.clone())
                .await;
            let status = response.status().as_u16();
            let content_type = response.content_type().unwrap_or_default().to_owned();
            let text = response.into_body().into_string().await.unwrap();
            if role >= *needed {
                assert_eq!(status, 200, "{method} {uri} as {role}: {text}");
                let expected = if uri.starts_with("/v1/replay?") || uri == "/v1/replay" {
                    "application/x-ndjson"
                } else {
                    "application/json"
                };
                assert!(content_type.starts_with(expected), "{content_type}");
            } else {
                assert_eq!(status, 403, "{method} {uri} as {role}: {text}");
                assert_eq!(content_type, "application/problem+json");
                assert!(text.contains(needed.as_str()), "{text}");
            }
        }
    }
    // The SSE form too.
    for role in ALL_ROLES {
        let response = env
            .send(
                Method::GET,
                "/v1/replay",
                Some(role),
                &[("Accept", "text/event-stream")],
                None,
            )
            .await;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.content_type(), Some("text/event-stream"));
    }
    env.finish().await;
}

/// NDJSON replay: exactly the matching events, in the order and with the
/// shape of `/v1/events` (plus each event's cursor), protected fields
/// redacted; resumed from a cursor without a duplicate.
#[tokio::test]
async fn ndjson_replay_is_ordered_redacted_and_resumable() {
    let env = env(ApiLimits::default()).await;
    let (alice, bob) = seed(&env.f).await;
    let filters: [&[(&str, &str)]; 4] = [
        &[],
        &[("event_type", "order.*")],
        &[("event_type", "payment.captured"), ("source", "shop")],
        &[("email", alice.email.as_str())],
    ];
    for query in filters {
        let lines = env.ndjson(&url("/v1/replay", query)).await;
        let mut page_query = query.to_vec();
        page_query.push(("limit", "1000"));
        let page = env
            .f
            .get_as(Role::Reader, &url("/v1/events", &page_query))
            .await;
        let events = page.assert_ok()["events"].as_array().unwrap().clone();
        assert!(!events.is_empty(), "{query:?}");
        assert_eq!(lines.len(), events.len(), "{query:?}");
        for (line, event) in lines.iter().zip(&events) {
            let mut line = line.clone();
            let cursor = line
                .as_object_mut()
                .unwrap()
                .remove("cursor")
                .expect("every line has its cursor");
            assert!(Position::from_cursor(cursor.as_str().unwrap()).is_ok());
            assert_eq!(&line, event, "the same event as /v1/events shows");
        }
    }
    let all = env.ndjson("/v1/replay").await;
    assert_eq!(all.len(), 24);
    let text = all.iter().map(Value::to_string).collect::<String>();
    for secret in alice.secrets().into_iter().chain(bob.secrets()) {
        assert!(!text.contains(&secret), "{secret} in {text}");
    }
    assert!(!text.contains("$enc"));
    assert_eq!(
        all[0]["payload"]["customer"]["email"],
        json!({"$redacted": true})
    );

    // Resume after the 10th event: the other 14, none again.
    let cursor = all[9]["cursor"].as_str().unwrap();
    let rest = env.ndjson(&url("/v1/replay", &[("cursor", cursor)])).await;
    assert_eq!(event_ids(&rest), event_ids(&all[10..]));
    let last = all[23]["cursor"].as_str().unwrap();
    assert!(env
        .ndjson(&url("/v1/replay", &[("cursor", last)]))
        .await
        .is_empty());

    // System events (no Kafka position, no stream version): an auditor's
    // decrypting read records one. Same shape as /v1/events there too.
    env.f
        .get_as(
            Role::Auditor,
            &url(
                "/v1/events",
                &[("decrypt", "true"), ("purpose", "replay test")],
            ),
        )
        .await
        .assert_ok();
    settle(&env.f.owner).await;
    let audit = env
        .ndjson(&url("/v1/replay", &[("event_type", "audit.*")]))
        .await;
    let page = env
        .f
        .get_as(
            Role::Reader,
            &url("/v1/events", &[("event_type", "audit.*")]),
        )
        .await;
    let events = page.assert_ok()["events"].as_array().unwrap().clone();
    assert_eq!(audit.len(), 1);
    assert_eq!(events.len(), 1);
    let mut line = audit[0].clone();
    line.as_object_mut().unwrap().remove("cursor");
    assert_eq!(line, events[0]);
    assert_eq!(line["kafka"]["topic"], Value::Null);

    // Bad requests are 400 problems before any streaming.
    for (query, needle) in [
        (
            vec![("decrypt", "true"), ("purpose", "x")],
            "GET /v1/events",
        ),
        (vec![("cursor", "nope")], "cursor"),
        (vec![("limit", "5")], "unknown query parameter `limit`"),
        (vec![("event_type", "or*der")], "event_type"),
        (vec![("follow", "maybe")], "follow"),
    ] {
        let reply = env.f.get_as(Role::Reader, &url("/v1/replay", &query)).await;
        let detail = reply.assert_problem(400);
        assert!(detail.contains(needle), "{query:?}: {detail}");
    }
    let bad = env
        .send(
            Method::GET,
            "/v1/replay",
            Some(Role::Reader),
            &[("Accept", "text/event-stream"), ("Last-Event-ID", "x")],
            None,
        )
        .await;
    assert_eq!(bad.status().as_u16(), 400);
    env.finish().await;
}

/// More events than one page (2000): streamed across page boundaries in
/// order, each once; an SSE replay from a `Last-Event-ID` ends with `end`.
#[tokio::test]
async fn replay_crosses_pages() {
    let env = env(ApiLimits::default()).await;
    let customer = Customer::new(3);
    let mut written = Vec::new();
    for batch in 0..9 {
        let values: Vec<Value> = (0..500)
            .map(|i| {
                let (id, e) = order_event(
                    &format!("order-{batch}-{i}"),
                    1,
                    "order.created",
                    "2026-11-03T10:00:00Z",
                    &customer,
                    json!({"i": i}),
                );
                written.push(id);
                e
            })
            .collect();
        env.f.write(batch % 2, &values).await;
    }
    let lines = env.ndjson("/v1/replay").await;
    assert_eq!(lines.len(), 4500);
    check_in_order_once(&lines);
    let got: HashSet<Uuid> = event_ids(&lines).into_iter().collect();
    assert_eq!(got, written.iter().copied().collect::<HashSet<_>>());

    let last_seen = lines[2999]["cursor"].as_str().unwrap().to_owned();
    let response = env
        .send(
            Method::GET,
            "/v1/replay",
            Some(Role::Reader),
            &[
                ("Accept", "text/event-stream"),
                ("Last-Event-ID", &last_seen),
            ],
            None,
        )
        .await;
    let text = response.into_body().into_string().await.unwrap();
    let events = parse_sse(&text);
    let (data, end): (Vec<_>, Vec<_>) = events.into_iter().partition(|e| e.event == "event");
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].event, "end");
    let data: Vec<Value> = data
        .iter()
        .map(|e| {
            let value: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(value["cursor"].as_str(), Some(e.id.as_str()));
            value
        })
        .collect();
    assert_eq!(event_ids(&data), event_ids(&lines[3000..]));
    env.finish().await;
}

#[track_caller]
fn check_in_order_once(lines: &[Value]) {
    let mut seen = HashSet::new();
    let mut previous: Option<Position> = None;
    for line in lines {
        let id = line["event_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "event {id} twice");
        let position = Position::from_cursor(line["cursor"].as_str().unwrap()).unwrap();
        if let Some(p) = previous {
            assert!(p < position, "{p:?} then {position:?}");
        }
        previous = Some(position);
    }
}

#[derive(Debug, Default, Clone)]
struct SseEvent {
    id: String,
    event: String,
    data: String,
}

/// Complete server-sent events in `text`, comments dropped.
fn parse_sse(text: &str) -> Vec<SseEvent> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let mut event = SseEvent::default();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    event.id = v.to_owned();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event.event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    event.data = v.to_owned();
                }
            }
            (!event.event.is_empty()).then_some(event)
        })
        .collect()
}

/// A client follows (SSE, `follow=true`) while four writers keep storing
/// batches: once the writers have stopped and the stream has caught up,
/// the client received every event exactly once, in store order. The one
/// stream allowed holds its permit (a second one is 429) until the client
/// goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_live_tail_has_no_gap_and_no_duplicate() {
    let limits = ApiLimits {
        max_replay_streams: 1,
        ..ApiLimits::default()
    };
    let env = Arc::new(env(limits).await);
    let customer = Customer::new(7);
    let written: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let offsets: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
    // Some history first, so the stream catches up, then tails.
    write_orders(&env.f, &offsets, &written, &customer, 0, 99, 20).await;

    let response = env
        .send(
            Method::GET,
            &url(
                "/v1/replay",
                &[("follow", "true"), ("event_type", "order.*")],
            ),
            Some(Role::Reader),
            &[("Accept", "text/event-stream")],
            None,
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.content_type(), Some("text/event-stream"));
    let received: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
    let reader = {
        let received = received.clone();
        let mut body = response.into_body().into_bytes_stream();
        tokio::spawn(async move {
            let mut buffer = String::new();
            while let Some(chunk) = body.next().await {
                buffer.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
                let Some(end) = buffer.rfind("\n\n") else {
                    continue;
                };
                let complete: String = buffer.drain(..end + 2).collect();
                received.lock().unwrap().extend(parse_sse(&complete));
            }
        })
    };

    // The one stream allowed is taken.
    let refused = env.f.get_as(Role::Reader, "/v1/replay").await;
    let detail = refused.assert_problem(429);
    assert!(detail.contains("--api-max-replay-streams"), "{detail}");

    let mut writers = Vec::new();
    for partition in 0..4 {
        let env = env.clone();
        let written = written.clone();
        let offsets = offsets.clone();
        let customer = customer.clone();
        writers.push(tokio::spawn(async move {
            for batch in 0..12 {
                let n = 3 + (batch + partition as usize) % 5;
                write_orders(&env.f, &offsets, &written, &customer, partition, batch, n).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let expected = written.lock().unwrap().clone();
    assert!(expected.len() > 200, "{}", expected.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = received.lock().unwrap().len();
        if got >= expected.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tail did not catch up: {got} of {} events",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = received.lock().unwrap().clone();
    let lines: Vec<Value> = events
        .iter()
        .map(|e| {
            assert_eq!(e.event, "event");
            let value: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(value["cursor"].as_str(), Some(e.id.as_str()));
            value
        })
        .collect();
    check_in_order_once(&lines);
    let got: HashSet<Uuid> = event_ids(&lines).into_iter().collect();
    assert_eq!(got, expected, "every event exactly once");

    // The client goes away: its permit comes back.
    reader.abort();
    let _ = reader.await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = env
            .f
            .get_as(Role::Reader, &url("/v1/replay", &[("stream_id", "none")]))
            .await;
        if reply.status.as_u16() == 200 {
            break;
        }
        reply.assert_problem(429);
        assert!(Instant::now() < deadline, "the permit was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::try_unwrap(env)
        .ok()
        .expect("sole owner")
        .finish()
        .await;
}

/// The mechanism, deterministically: a transaction that stored an event
/// is still open when a later one commits. A live tail that starts then
/// must wait for the older one (its first page is read while it is open),
/// and deliver both, in order. Without the snapshot bound (the planted bug,
/// tried once) the tail sends the later event first and never the older.
#[tokio::test]
async fn live_tail_waits_for_an_older_open_transaction() {
    let env = env(ApiLimits::default()).await;
    let insert =
        "INSERT INTO events (event_id, event_type, stream_id, occurred_at, payload, content_hash) \
         VALUES ($1, 'order.created', 'late', now(), '{}', '\\x00')";
    let early = Uuid::new_v4();
    let late = Uuid::new_v4();
    let mut slow = env.f.owner.begin().await.unwrap();
    sqlx::query(insert)
        .bind(early)
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query(insert)
        .bind(late)
        .execute(&env.f.owner)
        .await
        .unwrap();

    let response = env
        .send(
            Method::GET,
            &url("/v1/replay", &[("follow", "true")]),
            Some(Role::Reader),
            &[],
            None,
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.into_body().into_bytes_stream();
    slow.commit().await.unwrap();

    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Keep-alives are empty lines: count events only.
    while text.lines().filter(|l| !l.is_empty()).count() < 2 || !text.ends_with('\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .unwrap_or_else(|_| panic!("the tail did not deliver both events: {text}"))
            .expect("the stream goes on")
            .expect("chunk");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        event_ids(&lines),
        vec![early, late],
        "both, in commit order"
    );
    drop(body);
    env.finish().await;
}

/// The checker of the tail test fails on a duplicate and on a gap.
#[test]
#[should_panic(expected = "twice")]
fn order_checker_catches_a_duplicate() {
    let p = Position { tx: 10, seq: 1 };
    let line = json!({"event_id": Uuid::nil(), "cursor": p.to_cursor()});
    check_in_order_once(&[line.clone(), line]);
}

async fn write_orders(
    f: &Fixture,
    offsets: &Mutex<HashMap<i32, i64>>,
    written: &Mutex<HashSet<Uuid>>,
    customer: &Customer,
    partition: i32,
    batch: usize,
    n: usize,
) {
    let values: Vec<Value> = (0..n)
        .map(|i| {
            let (id, e) = order_event(
                &format!("order-p{partition}-{batch}-{i}"),
                1,
                "order.created",
                "2026-11-03T10:00:00Z",
                customer,
                json!({"n": i}),
            );
            written.lock().unwrap().insert(id);
            e
        })
        .collect();
    write_batch(&f.writer, offsets, partition, &values).await;
}

/// POST /v1/replays: 201, then 200 for the same id and request, 409 for
/// another request, 400 for bad requests and for a topic the node ingests;
/// GET shows the progress a runner makes until every matching event is
/// published, in order.
#[tokio::test]
async fn replay_jobs_are_idempotent_and_show_progress() {
    let env = env(ApiLimits::default()).await;
    let (alice, _) = seed(&env.f).await;
    let job = json!({
        "job_id": "job-1",
        "target_topic": "orders.replayed",
        "rate_per_sec": 5000,
        "filter": {"event_type": ["order.*"], "blind_index": {"email": alice.email}},
    });
    let created = env.post_job(Role::Admin, job.clone()).await;
    assert_eq!(created.status.as_u16(), 201, "{created:#?}");
    let shown = created.json.clone();
    assert_eq!(shown["job_id"], "job-1");
    assert_eq!(shown["state"], "pending");
    assert_eq!(shown["created_by"], "test-admin");
    assert_eq!(shown["filter"]["blind_index"], json!(["email"]));
    assert_eq!(shown["filter"]["event_type"], json!(["order.*"]));
    assert!(!created.text.contains(&alice.email), "{}", created.text);
    let again = env.post_job(Role::Admin, job.clone()).await;
    assert_eq!(again.status.as_u16(), 200, "{again:#?}");
    assert_eq!(again.json["created_at"], shown["created_at"]);
    let mut other = job.clone();
    other["rate_per_sec"] = json!(10);
    let detail = env.post_job(Role::Admin, other).await.assert_problem(409);
    assert!(
        detail.contains("job-1") && detail.contains("another job_id"),
        "{detail}"
    );

    for (body, status, needle) in [
        (
            json!({"job_id": "j2", "target_topic": TOPIC}),
            400,
            "ingests",
        ),
        (json!({"job_id": "a b", "target_topic": "t"}), 400, "job id"),
        (
            json!({"job_id": "j2", "target_topic": "a/b"}),
            400,
            "target_topic",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "rate_per_sec": 0}),
            400,
            "rate_per_sec",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "decrypt": true}),
            400,
            "decrypt",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "filter": {"blind_index": {"iban": "x"}}}),
            400,
            "blind index",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "filter": {"event_type": ["x*"]}}),
            400,
            "event_type",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "filter": {"contains": [1]}}),
            400,
            "contains",
        ),
        (
            json!({"job_id": "j2", "target_topic": "t", "filter": {"stream": "x"}}),
            400,
            "stream",
        ),
        (json!({"target_topic": "t"}), 400, "NewReplayJob"),
    ] {
        let reply = env.post_job(Role::Admin, body.clone()).await;
        let detail = reply.assert_problem(status);
        assert!(detail.contains(needle), "{body}: {detail}");
    }
    env.f
        .get_as(Role::Auditor, "/v1/replays/nope")
        .await
        .assert_problem(404);
    env.f
        .get_as(Role::Auditor, "/v1/replays/a%20b")
        .await
        .assert_problem(404);

    // A runner publishes the job; GET shows it done, every event published.
    let republisher = Arc::new(MemoryRepublisher::new());
    let runner = start_runner(&env, &republisher).await;
    let done = wait_for_job(&env, "job-1", |job| job["state"] == "done").await;
    stop_runner(runner).await;
    let matching = env
        .ndjson(&url(
            "/v1/replay",
            &[("event_type", "order.*"), ("email", &alice.email)],
        ))
        .await;
    assert_eq!(matching.len(), 12);
    assert_eq!(done["published"], 12);
    assert_eq!(done["total"], 12);
    assert_eq!(done["cursor"], matching[11]["cursor"]);
    assert!(done["finished_at"].is_string());
    assert_eq!(
        published_ids(&republisher, "orders.replayed"),
        event_ids(&matching),
        "exactly the matching events, in order"
    );

    // Across a restart: a slow job, its runner stopped half way, another
    // runner finishes it from the recorded cursor.
    let slow = json!({
        "job_id": "job-2",
        "target_topic": "orders.slow",
        "rate_per_sec": 10,
        "filter": {"event_type": ["order.*"], "blind_index": {"email": alice.email}},
    });
    assert_eq!(env.post_job(Role::Admin, slow).await.status.as_u16(), 201);
    let republisher = Arc::new(MemoryRepublisher::new());
    let first = start_runner(&env, &republisher).await;
    let halfway = wait_for_job(&env, "job-2", |job| {
        job["published"].as_u64().is_some_and(|n| n >= 4)
    })
    .await;
    stop_runner(first).await;
    assert_eq!(halfway["state"], "running", "{halfway}");
    let second = start_runner(&env, &republisher).await;
    let done = wait_for_job(&env, "job-2", |job| job["state"] == "done").await;
    stop_runner(second).await;
    assert_eq!(done["published"], 12, "{done}");
    let published = published_ids(&republisher, "orders.slow");
    let mut seen = HashSet::new();
    let distinct: Vec<Uuid> = published
        .iter()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect();
    assert_eq!(
        distinct,
        event_ids(&matching),
        "every matching event, in order"
    );
    // At least once: only the page in flight at the stop may go twice.
    assert!(
        published.len() - distinct.len() <= RUNNER_PAGE,
        "{published:?}"
    );
    env.finish().await;
}

/// Events per page of the test runners.
const RUNNER_PAGE: usize = 4;

async fn start_runner(
    env: &Env,
    republisher: &Arc<MemoryRepublisher>,
) -> (
    ractor::ActorRef<audit_actors::republish::ReplayRunnerMsg>,
    tokio::task::JoinHandle<()>,
) {
    ractor::Actor::spawn(
        None,
        ReplayRunner,
        ReplayRunnerArgs {
            pool: env.f.state.pool().clone(),
            republisher: republisher.clone(),
            config: Arc::new(ReplayRunnerConfig {
                node_id: "api-test".into(),
                poll_interval: Duration::from_millis(50),
                max_page: RUNNER_PAGE,
                ..ReplayRunnerConfig::default()
            }),
        },
    )
    .await
    .expect("runner starts")
}

/// Stops cleanly: the runner releases its job's lease.
async fn stop_runner(
    (runner, join): (
        ractor::ActorRef<audit_actors::republish::ReplayRunnerMsg>,
        tokio::task::JoinHandle<()>,
    ),
) {
    runner.stop(None);
    join.await.expect("runner stops");
}

/// Polls `GET /v1/replays/{id}` until `done` holds (30 s at most).
async fn wait_for_job(env: &Env, job_id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = env
            .f
            .get_as(Role::Auditor, &format!("/v1/replays/{job_id}"))
            .await;
        let job = reply.assert_ok().clone();
        if done(&job) {
            return job;
        }
        assert_ne!(job["state"], "failed", "{job}");
        assert!(
            Instant::now() < deadline,
            "job {job_id} did not get there: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Event ids of the records published to `topic`, in publishing order.
fn published_ids(republisher: &MemoryRepublisher, topic: &str) -> Vec<Uuid> {
    republisher
        .published()
        .iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, record)| {
            let (_, id) = record
                .headers
                .iter()
                .find(|(k, _)| k == HEADER_EVENT_ID)
                .expect("event id header");
            String::from_utf8(id.clone().unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn decode(text: &Value) -> Hash {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text.as_str().expect("hex string"), &mut hash).expect("64 hex digits");
    hash
}

fn checkpoint(value: &Value) -> Checkpoint {
    serde_json::from_value(value.clone()).expect("a checkpoint in its published form")
}

/// Proofs, checked as a client would: checkpoint signatures with the
/// public key, inclusion and consistency with the RFC 9162 verifiers. An
/// event not yet covered by a checkpoint is a 409 saying when to retry;
/// unknown events are 404; bad input is never a 500.
#[tokio::test]
async fn proofs_verify_against_signed_checkpoints() {
    let env = env(ApiLimits::default()).await;
    let written = seed_chains(&env.f).await;
    // Checkpoints at 5 and 10 on both chains; 2 events of orders/0 uncovered.
    let latest = env.f.get_as(Role::Reader, "/v1/checkpoints/latest").await;
    let checkpoints = latest.assert_ok()["checkpoints"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(checkpoints.len(), 2, "{checkpoints:?}");
    for c in &checkpoints {
        assert_eq!(c["tree_size"], 10);
        (env.verify)(&checkpoint(c)).expect("signed by the node's key");
    }
    let one = env
        .f
        .get_as(
            Role::Reader,
            &url("/v1/checkpoints/latest", &[("chain", "orders/1")]),
        )
        .await;
    assert_eq!(one.assert_ok()["checkpoints"].as_array().unwrap().len(), 1);
    let none = env
        .f
        .get_as(
            Role::Reader,
            &url("/v1/checkpoints/latest", &[("chain", "nope/9")]),
        )
        .await;
    assert_eq!(none.assert_ok()["checkpoints"], json!([]));

    let chain: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE chain_id = 'orders/0' ORDER BY chain_position",
    )
    .fetch_all(&env.f.owner)
    .await
    .unwrap();
    assert_eq!(chain, written);
    for (index, id) in chain.iter().enumerate().take(10) {
        let reply = env
            .f
            .get_as(Role::Reader, &format!("/v1/proofs/inclusion/{id}"))
            .await;
        let proof = reply.assert_ok();
        assert_eq!(proof["leaf_index"], index);
        let cp = checkpoint(&proof["checkpoint"]);
        (env.verify)(&cp).unwrap();
        let leaf = decode(&proof["leaf_hash"]);
        assert_eq!(leaf, merkle::leaf_hash(&decode(&proof["event_hash"])));
        let path: Vec<Hash> = proof["audit_path"]
            .as_array()
            .unwrap()
            .iter()
            .map(decode)
            .collect();
        merkle::verify_inclusion(index as u64, cp.tree_size, &leaf, &path, &cp.root_hash)
            .expect("inclusion verifies");
        // A tampered path does not (the check is not vacuous).
        if let Some(first) = path.first() {
            let mut bad = path.clone();
            bad[0] = merkle::leaf_hash(first);
            assert!(merkle::verify_inclusion(
                index as u64,
                cp.tree_size,
                &leaf,
                &bad,
                &cp.root_hash
            )
            .is_err());
        }
    }
    // Against the older checkpoint a client holds.
    let old = env
        .f
        .get_as(
            Role::Reader,
            &url(
                &format!("/v1/proofs/inclusion/{}", chain[2]),
                &[("tree_size", "5")],
            ),
        )
        .await;
    assert_eq!(old.assert_ok()["tree_size"], 5);

    // Not yet covered: 409 with when to retry.
    let response = env
        .send(
            Method::GET,
            &format!("/v1/proofs/inclusion/{}", chain[11]),
            Some(Role::Reader),
            &[],
            None,
        )
        .await;
    assert_eq!(response.status().as_u16(), 409);
    assert_eq!(response.content_type(), Some("application/problem+json"));
    let wait = CHECKPOINT_INTERVAL.as_secs() + 5;
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some(wait.to_string().as_str())
    );
    let text = response.into_body().into_string().await.unwrap();
    assert!(
        text.contains("not yet covered by a checkpoint")
            && text.contains(&format!("at most {wait} seconds"))
            && text.contains("covers only the first 10"),
        "{text}"
    );

    // Consistency 5 -> 10 (explicit and by default), and 10 -> 10.
    for query in [vec![("from", "5"), ("to", "10")], vec![("from", "5")]] {
        let mut query = query;
        query.push(("chain", "orders/0"));
        let reply = env
            .f
            .get_as(Role::Reader, &url("/v1/proofs/consistency", &query))
            .await;
        let proof = reply.assert_ok();
        let from = checkpoint(&proof["from"]);
        let to = checkpoint(&proof["to"]);
        (env.verify)(&from).unwrap();
        (env.verify)(&to).unwrap();
        assert_eq!((from.tree_size, to.tree_size), (5, 10));
        let hashes: Vec<Hash> = proof["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(decode)
            .collect();
        merkle::verify_consistency(5, 10, &from.root_hash, &to.root_hash, &hashes)
            .expect("consistency verifies");
        assert!(merkle::verify_consistency(5, 10, &to.root_hash, &to.root_hash, &hashes).is_err());
    }
    let same = env
        .f
        .get_as(
            Role::Reader,
            &url(
                "/v1/proofs/consistency",
                &[("chain", "orders/1"), ("from", "10"), ("to", "10")],
            ),
        )
        .await;
    assert_eq!(same.assert_ok()["proof"], json!([]));

    // Unknown things are 404, bad input 400: never a 500.
    let unknown = Uuid::new_v4();
    for (uri, status) in [
        (format!("/v1/proofs/inclusion/{unknown}"), 404),
        ("/v1/proofs/inclusion/not-a-uuid".to_owned(), 400),
        (
            url(
                &format!("/v1/proofs/inclusion/{}", chain[0]),
                &[("tree_size", "7")],
            ),
            404,
        ),
        (
            url(
                &format!("/v1/proofs/inclusion/{}", chain[0]),
                &[("tree_size", "0")],
            ),
            400,
        ),
        (
            url(
                &format!("/v1/proofs/inclusion/{}", chain[0]),
                &[("tree_size", "-1")],
            ),
            400,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "10"), ("to", "5")],
            ),
            400,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "0")],
            ),
            400,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "3")],
            ),
            404,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "99999999999999999999")],
            ),
            400,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "orders/0"), ("from", "18446744073709551615")],
            ),
            400,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "nope/1"), ("from", "5")],
            ),
            404,
        ),
        (
            url(
                "/v1/proofs/consistency",
                &[("chain", "a\u{0}b"), ("from", "5")],
            ),
            400,
        ),
        (url("/v1/proofs/consistency", &[("from", "5")]), 400),
        (url("/v1/checkpoints/latest", &[("chain", "a\u{0}b")]), 400),
    ] {
        let reply = env.f.get_as(Role::Reader, &uri).await;
        reply.assert_problem(status);
    }
    env.finish().await;
}

/// Throughput of an NDJSON replay over real HTTP (not a timed test):
/// `cargo test --release -p audit-api --test replay -- --ignored --nocapture`
/// (`AUDIT_BENCH_EVENTS`, default 200000, events written first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn bench_ndjson_replay_throughput() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let total: usize = std::env::var("AUDIT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let env = env(ApiLimits::default()).await;
    let customer = Customer::new(5);
    let offsets: Mutex<HashMap<i32, i64>> = Mutex::default();
    let written: Mutex<HashSet<Uuid>> = Mutex::default();
    let started = Instant::now();
    for batch in 0..total.div_ceil(1000) {
        let n = 1000.min(total - batch * 1000);
        write_orders(
            &env.f,
            &offsets,
            &written,
            &customer,
            (batch % 4) as i32,
            batch,
            n,
        )
        .await;
    }
    settle(&env.f.owner).await;
    eprintln!("wrote {total} events in {:.1?}", started.elapsed());
    sqlx::query("VACUUM ANALYZE events")
        .execute(&env.f.owner)
        .await
        .unwrap();

    let app = audit_api::app(env.f.state.clone(), None, audit_api::always_ready());
    let acceptor =
        poem::listener::Listener::into_acceptor(poem::listener::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
    let addr = poem::listener::Acceptor::local_addr(&acceptor)[0]
        .as_socket_addr()
        .copied()
        .unwrap();
    let server = tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    for round in 0..3 {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /v1/replay HTTP/1.0\r\nHost: bench\r\nAuthorization: Bearer {}\r\n\r\n",
            env.f.tokens.reader
        );
        let started = Instant::now();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0usize;
        let mut newlines = 0usize;
        loop {
            let n = socket.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            bytes += n;
            newlines += buffer[..n].iter().filter(|b| **b == b'\n').count();
        }
        let elapsed = started.elapsed();
        // The response head has 6 or so lines; the body one per event.
        let events = newlines.saturating_sub(6);
        eprintln!(
            "round {round}: ~{events} events, {:.1} MB in {:.2?}: {:.0} events/s",
            bytes as f64 / 1e6,
            elapsed,
            total as f64 / elapsed.as_secs_f64()
        );
        assert!(events >= total, "{events} < {total}");
    }
    server.abort();
    env.finish().await;
}
