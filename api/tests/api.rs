//! The query API against the real PostgreSQL: every route with every role,
//! redaction and audited decryption, blind-index search and erasure,
//! pagination under concurrent ingestion, bad inputs, state folds, limits,
//! and the committed OpenAPI document.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_api::auth::Role;
use audit_api::fold::Reducers;
use audit_api::state::ApiLimits;
use common::*;
use poem::http::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const ALL_ROLES: [Role; 3] = [Role::Reader, Role::Auditor, Role::Admin];

/// A few orders of two customers, a dead letter, on two partitions.
async fn seed(f: &Fixture) -> (Vec<Uuid>, Customer, Customer) {
    let alice = Customer::new(1);
    let bob = Customer::new(2);
    let (a1, e1) = order_event(
        "order-1",
        1,
        "order.created",
        "2026-11-01T10:00:00Z",
        &alice,
        json!({"status": "new", "amount_cents": 1200}),
    );
    let (a2, e2) = order_event(
        "order-1",
        2,
        "order.paid",
        "2026-11-01T11:00:00Z",
        &alice,
        json!({"status": "paid"}),
    );
    let (b1, e3) = order_event(
        "order-2",
        1,
        "order.created",
        "2026-11-02T10:00:00Z",
        &bob,
        json!({"status": "new", "amount_cents": 500}),
    );
    let (p1, e4) = order_event(
        "payment-9",
        1,
        "payment.captured",
        "2026-11-02T12:00:00Z",
        &bob,
        json!({"payment": {"iban": "DE89370400440532013000"}}),
    );
    f.write(0, &[e1, e2]).await;
    f.write(1, &[e3, e4]).await;
    // A record that is not JSON: a dead letter holding personal data.
    let raw = format!("{{not json, email {}", alice.email);
    f.write(1, &[Value::String(raw)]).await;
    (vec![a1, a2, b1, p1], alice, bob)
}

/// Every route, without a token (401), with a bad one (401), with each
/// role (403 below the route's role, 200 from it on); the open routes
/// without any token.
#[tokio::test]
async fn every_route_with_every_role() {
    let f = Fixture::new().await;
    let (ids, alice, _) = seed(&f).await;
    let dead_letter: i64 = sqlx::query_scalar("SELECT min(id) FROM dead_letters")
        .fetch_one(&f.owner)
        .await
        .unwrap();
    let routes: Vec<(Method, String, Role)> = vec![
        (Method::GET, "/v1/events".into(), Role::Reader),
        (
            Method::GET,
            url("/v1/events", &[("event_type", "order.*"), ("limit", "2")]),
            Role::Reader,
        ),
        (Method::GET, format!("/v1/events/{}", ids[0]), Role::Reader),
        (
            Method::GET,
            "/v1/streams/order-1/events".into(),
            Role::Reader,
        ),
        (
            Method::GET,
            "/v1/streams/order-1/state".into(),
            Role::Reader,
        ),
        (Method::GET, "/v1/dead-letters".into(), Role::Reader),
        (
            Method::GET,
            format!("/v1/dead-letters/{dead_letter}"),
            Role::Reader,
        ),
        (
            Method::GET,
            url(
                "/v1/events",
                &[("decrypt", "true"), ("purpose", "role test")],
            ),
            Role::Auditor,
        ),
        (
            Method::GET,
            url(
                &format!("/v1/events/{}", ids[0]),
                &[("decrypt", "true"), ("purpose", "role test")],
            ),
            Role::Auditor,
        ),
        (
            Method::GET,
            url(
                "/v1/streams/order-1/events",
                &[("decrypt", "true"), ("purpose", "role test")],
            ),
            Role::Auditor,
        ),
        (
            Method::GET,
            url(
                "/v1/streams/order-1/state",
                &[("decrypt", "true"), ("purpose", "role test")],
            ),
            Role::Auditor,
        ),
        (Method::GET, "/v1/access-log".into(), Role::Auditor),
        (
            Method::DELETE,
            url(
                &format!("/v1/subjects/{}", alice.id),
                &[("reason", "role test")],
            ),
            Role::Admin,
        ),
    ];
    for (method, uri, needed) in &routes {
        let none = f.request(method.clone(), uri, None, None).await;
        none.assert_problem(401);
        assert_eq!(
            none.www_authenticate.as_deref(),
            Some("Bearer realm=\"order-audit-trail\""),
            "{method} {uri}"
        );
        f.request(method.clone(), uri, Some("not-a-token"), None)
            .await
            .assert_problem(401);
        for role in ALL_ROLES {
            let reply = f
                .request(method.clone(), uri, Some(f.tokens.of(role)), None)
                .await;
            if role >= *needed {
                assert_eq!(
                    reply.status.as_u16(),
                    200,
                    "{method} {uri} as {role}: {reply:#?}"
                );
                assert!(
                    reply.content_type.starts_with("application/json"),
                    "{reply:#?}"
                );
            } else {
                let detail = reply.assert_problem(403);
                assert!(detail.contains(needed.as_str()), "{method} {uri}: {detail}");
            }
        }
    }
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"] {
        let reply = f.get(open, None).await;
        assert_eq!(reply.status.as_u16(), 200, "{open}: {reply:#?}");
    }
    f.finish().await;
}

fn all_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| all_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, out)),
        _ => {}
    }
}

/// Readers (and auditors who do not ask to decrypt) see every protected
/// field as `{"$redacted": true}` on every route, and never a personal
/// value: not in events, states, or dead letters.
#[tokio::test]
async fn readers_never_see_plaintext() {
    let f = Fixture::new().await;
    let (ids, alice, bob) = seed(&f).await;
    let secrets: Vec<String> = alice
        .secrets()
        .into_iter()
        .chain(bob.secrets())
        .chain(["DE89370400440532013000".to_owned()])
        .collect();
    let dead_letter: i64 = sqlx::query_scalar("SELECT min(id) FROM dead_letters")
        .fetch_one(&f.owner)
        .await
        .unwrap();
    for role in [Role::Reader, Role::Auditor] {
        let mut replies = vec![
            f.get_as(role, "/v1/events").await,
            f.get_as(role, &format!("/v1/events/{}", ids[0])).await,
            f.get_as(role, "/v1/streams/order-1/events").await,
            f.get_as(role, "/v1/streams/order-1/state").await,
            f.get_as(role, "/v1/dead-letters").await,
        ];
        if role == Role::Reader {
            replies.push(
                f.get_as(role, &format!("/v1/dead-letters/{dead_letter}"))
                    .await,
            );
        }
        for reply in &replies {
            reply.assert_ok();
            for secret in &secrets {
                assert!(
                    !reply.text.contains(secret.as_str()),
                    "{role} saw {secret}: {}",
                    reply.text
                );
            }
            let mut strings = Vec::new();
            all_strings(&reply.json, &mut strings);
            assert!(
                !strings.iter().any(|s| s.contains("@example.test")),
                "{strings:?}"
            );
        }
        let page = &replies[0].json;
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 4, "{page}");
        for event in events {
            assert_eq!(
                event["payload"]["customer"]["email"],
                json!({"$redacted": true}),
                "{event}"
            );
            assert_eq!(
                event["payload"]["customer"]["name"],
                json!({"$redacted": true})
            );
            assert!(
                event["payload"]["customer"]["id"].is_string(),
                "the subject id stays in clear"
            );
            assert!(
                event.to_string().find("$enc").is_none(),
                "no envelope is shown: {event}"
            );
        }
        let state = &replies[3].json["state"];
        assert_eq!(
            state["customer"]["email"],
            json!({"$redacted": true}),
            "{state}"
        );
        assert_eq!(state["status"], "paid");
    }
    // The dead letter's raw value (which holds an email) only for auditors.
    let reader = f
        .get_as(Role::Reader, &format!("/v1/dead-letters/{dead_letter}"))
        .await;
    assert_eq!(reader.json["raw_withheld"], true);
    assert_eq!(reader.json["raw_value"], Value::Null);
    let auditor = f
        .get_as(Role::Auditor, &format!("/v1/dead-letters/{dead_letter}"))
        .await;
    assert_eq!(auditor.json["raw_withheld"], false);
    assert!(auditor.json["raw_value"]["text"]
        .as_str()
        .unwrap()
        .contains(&alice.email));
    assert!(auditor.json["raw_value"]["base64"].is_string());
    f.finish().await;
}

/// `decrypt=true`: auditors and admins only, a purpose required, and each
/// such read recorded in `access_log` and as an `audit.pii_read` event, in
/// the same transaction, visible through the API.
#[tokio::test]
async fn decrypting_reads_need_a_purpose_and_are_audited() {
    let f = Fixture::new().await;
    let (ids, alice, _) = seed(&f).await;
    let path = format!("/v1/events/{}", ids[0]);

    let no_purpose = f
        .get_as(Role::Auditor, &url(&path, &[("decrypt", "true")]))
        .await;
    assert!(no_purpose.assert_problem(400).contains("purpose"));
    let blank = f
        .get_as(
            Role::Auditor,
            &url(&path, &[("decrypt", "true"), ("purpose", "  ")]),
        )
        .await;
    blank.assert_problem(400);
    f.get_as(
        Role::Reader,
        &url(&path, &[("decrypt", "true"), ("purpose", "curious")]),
    )
    .await
    .assert_problem(403);
    let count = |f: &Fixture| {
        let pool = f.owner.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM access_log")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(&f).await, 0, "refused reads are not logged");

    let reply = f
        .get_as(
            Role::Auditor,
            &url(&path, &[("decrypt", "true"), ("purpose", "ticket-4711")]),
        )
        .await;
    let event = reply.assert_ok();
    assert_eq!(event["payload"]["customer"]["email"], alice.email);
    assert_eq!(event["payload"]["customer"]["name"], alice.name);
    assert_eq!(event["payload"]["status"], "new");

    // The admin role includes the auditor's rights: a page, decrypted.
    let page = f
        .get_as(
            Role::Admin,
            &url(
                "/v1/streams/order-1/events",
                &[("decrypt", "true"), ("purpose", "case 12")],
            ),
        )
        .await;
    let events = page.assert_ok()["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| e["payload"]["customer"]["email"] == alice.email));

    // Two reads, two rows, each with its audit event.
    let rows: Vec<(String, String, String, String, Vec<Uuid>, Uuid)> = sqlx::query_as(
        "SELECT actor, role, purpose, route, event_ids, audit_event_id FROM access_log ORDER BY id",
    )
    .fetch_all(&f.owner)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "test-auditor");
    assert_eq!(rows[0].1, "auditor");
    assert_eq!(rows[0].2, "ticket-4711");
    assert_eq!(rows[0].3, "GET /v1/events/{event_id}");
    assert_eq!(rows[0].4, vec![ids[0]]);
    assert_eq!(rows[1].0, "test-admin");
    assert_eq!(rows[1].4, vec![ids[0], ids[1]]);

    // The access log route shows them (auditors), oldest first, paged.
    let log = f
        .get_as(Role::Auditor, &url("/v1/access-log", &[("limit", "1")]))
        .await;
    let log = log.assert_ok().clone();
    assert_eq!(log["entries"][0]["purpose"], "ticket-4711");
    let cursor = log["next_cursor"].as_str().unwrap();
    let next = f
        .get_as(
            Role::Auditor,
            &url("/v1/access-log", &[("limit", "1"), ("cursor", cursor)]),
        )
        .await;
    assert_eq!(next.assert_ok()["entries"][0]["actor"], "test-admin");
    let filtered = f
        .get_as(
            Role::Auditor,
            &url("/v1/access-log", &[("event_id", &ids[1].to_string())]),
        )
        .await;
    assert_eq!(filtered.assert_ok()["entries"].as_array().unwrap().len(), 1);

    // ... and so do the events themselves: audit.* finds the pii_read events.
    settle(&f.owner).await;
    let audit = f
        .get_as(
            Role::Reader,
            &url("/v1/events", &[("event_type", "audit.*")]),
        )
        .await;
    let audit_events = audit.assert_ok()["events"].as_array().unwrap().clone();
    assert_eq!(audit_events.len(), 2, "{audit_events:?}");
    let first = &audit_events[0];
    assert_eq!(first["event_type"], "audit.pii_read");
    assert_eq!(first["event_id"], rows[0].5.to_string());
    assert_eq!(first["chain"]["id"], "system");
    assert_eq!(
        first["payload"]["who"],
        json!({"name": "test-auditor", "role": "auditor"})
    );
    assert_eq!(first["payload"]["why"], "ticket-4711");
    assert_eq!(
        first["payload"]["what"]["route"],
        "GET /v1/events/{event_id}"
    );
    assert_eq!(first["payload"]["what"]["event_ids"], json!([ids[0]]));

    // A decrypting read that decrypts nothing (no protected field) is not a
    // read of personal data and is not logged.
    let before = count(&f).await;
    f.get_as(
        Role::Auditor,
        &url(
            "/v1/events",
            &[
                ("event_type", "audit.*"),
                ("decrypt", "true"),
                ("purpose", "review"),
            ],
        ),
    )
    .await
    .assert_ok();
    assert_eq!(count(&f).await, before);

    // The log and the event are one transaction: make the access_log insert
    // fail, and neither the event nor plaintext comes out.
    sqlx::query("ALTER TABLE access_log ADD CONSTRAINT planted CHECK (purpose <> 'boom')")
        .execute(&f.owner)
        .await
        .unwrap();
    let events_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'audit.pii_read'")
            .fetch_one(&f.owner)
            .await
            .unwrap();
    let failed = f
        .get_as(
            Role::Auditor,
            &url(&path, &[("decrypt", "true"), ("purpose", "boom")]),
        )
        .await;
    assert!(
        failed.status.is_client_error() || failed.status.is_server_error(),
        "{failed:#?}"
    );
    assert!(!failed.text.contains(&alice.email));
    let events_after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'audit.pii_read'")
            .fetch_one(&f.owner)
            .await
            .unwrap();
    assert_eq!(
        events_before, events_after,
        "the audit event rolled back with the log row"
    );
    f.finish().await;
}

/// `email=` finds a customer's events by blind index; after the admin
/// erases the customer (twice: idempotent), the search finds nothing and
/// decryption shows `{"$erased": true}`.
#[tokio::test]
async fn blind_index_search_and_erasure() {
    let f = Fixture::new().await;
    let (ids, alice, bob) = seed(&f).await;
    let search = |email: String| url("/v1/events", &[("email", email.as_str())]);
    let found = f
        .get_as(Role::Reader, &search(alice.email.to_uppercase()))
        .await;
    let found: Vec<String> = found.assert_ok()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        found,
        vec![ids[0].to_string(), ids[1].to_string()],
        "lowercase normalisation"
    );
    let bobs = f.get_as(Role::Reader, &search(bob.email.clone())).await;
    assert_eq!(bobs.assert_ok()["events"].as_array().unwrap().len(), 2);
    let nobody = f
        .get_as(Role::Reader, &search("nobody@example.test".into()))
        .await;
    assert_eq!(nobody.assert_ok()["events"], json!([]));
    // Combined with other filters (AND).
    let paid = f
        .get_as(
            Role::Reader,
            &url(
                "/v1/events",
                &[("email", &alice.email), ("event_type", "order.paid")],
            ),
        )
        .await;
    assert_eq!(paid.assert_ok()["events"].as_array().unwrap().len(), 1);

    // Erasure needs a reason.
    let subject = format!("/v1/subjects/{}", alice.id);
    let no_reason = f
        .request(Method::DELETE, &subject, Some(&f.tokens.admin), None)
        .await;
    assert!(no_reason.assert_problem(400).contains("reason"));
    let erased = f
        .request(
            Method::DELETE,
            &subject,
            Some(&f.tokens.admin),
            Some(r#"{"reason":"GDPR request #123"}"#.into()),
        )
        .await;
    let erased = erased.assert_ok().clone();
    assert_eq!(erased["subject_id"], alice.id);
    assert_eq!(erased["already_erased"], false);
    assert!(erased["key_id"].is_string());
    let again = f
        .request(
            Method::DELETE,
            &url(&subject, &[("reason", "again")]),
            Some(&f.tokens.admin),
            None,
        )
        .await;
    let again = again.assert_ok().clone();
    assert_eq!(again["already_erased"], true);
    assert_eq!(again["event_id"], erased["event_id"]);
    let (by, reason): (String, String) =
        sqlx::query_as("SELECT erased_by, reason FROM erased_subjects WHERE subject_id = $1")
            .bind(&alice.id)
            .fetch_one(&f.owner)
            .await
            .unwrap();
    assert_eq!(
        (by.as_str(), reason.as_str()),
        ("api:test-admin", "GDPR request #123")
    );

    // Erased subjects are left out of blind-index searches.
    let after = f.get_as(Role::Reader, &search(alice.email.clone())).await;
    assert_eq!(after.assert_ok()["events"], json!([]));
    let bobs = f.get_as(Role::Reader, &search(bob.email.clone())).await;
    assert_eq!(
        bobs.assert_ok()["events"].as_array().unwrap().len(),
        2,
        "others still found"
    );
    // Decryption shows the erasure; the erasure event is in the store.
    let shown = f
        .get_as(
            Role::Auditor,
            &url(
                &format!("/v1/events/{}", ids[0]),
                &[("decrypt", "true"), ("purpose", "check erasure")],
            ),
        )
        .await;
    assert_eq!(
        shown.assert_ok()["payload"]["customer"]["email"],
        json!({"$erased": true})
    );
    settle(&f.owner).await;
    let erasures = f
        .get_as(
            Role::Reader,
            &url("/v1/events", &[("event_type", "audit.subject_erased")]),
        )
        .await;
    assert_eq!(
        erasures.assert_ok()["events"][0]["event_id"],
        erased["event_id"]
    );
    f.finish().await;
}

/// A planted bug shows the checker works: pages by `seq` alone skip an
/// event that commits after a later one.
fn check_exactly_once(pages: &[Vec<Uuid>], expected: &HashSet<Uuid>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for id in pages.iter().flatten() {
        if !seen.insert(*id) {
            return Err(format!("event {id} was returned twice"));
        }
    }
    let missing: Vec<&Uuid> = expected.difference(&seen).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} events were never returned: {missing:?}",
            missing.len()
        ));
    }
    let extra: Vec<&Uuid> = seen.difference(expected).collect();
    if !extra.is_empty() {
        return Err(format!("unexpected events: {extra:?}"));
    }
    Ok(())
}

/// Reads every page of `/v1/events` with `limit`, from `cursor` on, until
/// an empty page; returns the pages and the last cursor.
async fn read_on(
    f: &Fixture,
    cursor: &mut Option<String>,
    limit: &str,
    pages: &mut Vec<Vec<Uuid>>,
) {
    loop {
        let mut query = vec![("limit", limit), ("event_type", "order.*")];
        if let Some(c) = cursor.as_deref() {
            query.push(("cursor", c));
        }
        let reply = f.get_as(Role::Reader, &url("/v1/events", &query)).await;
        let page = reply.assert_ok();
        let ids: Vec<Uuid> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(ids.len() <= 7);
        if ids.is_empty() {
            assert_eq!(page["next_cursor"], Value::Null);
            return;
        }
        *cursor = Some(page["next_cursor"].as_str().unwrap().to_owned());
        pages.push(ids);
    }
}

/// A writer keeps storing batches on four partitions while a reader pages
/// through with limit 7: no event is ever returned twice, and once the
/// writer has stopped and the reader reaches the end, every event was
/// returned exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_is_stable_under_concurrent_ingestion() {
    let f = Arc::new(Fixture::new().await);
    let written: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let offsets: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
    let customer = Customer::new(7);
    let mut writers = Vec::new();
    for partition in 0..4 {
        let f = f.clone();
        let written = written.clone();
        let offsets = offsets.clone();
        let customer = customer.clone();
        writers.push(tokio::spawn(async move {
            for batch in 0..12 {
                let mut values = Vec::new();
                for i in 0..(3 + (batch + partition as usize) % 5) {
                    let stream = format!("order-p{partition}-{batch}-{i}");
                    let (id, e) = order_event(
                        &stream,
                        1,
                        "order.created",
                        "2026-11-03T10:00:00Z",
                        &customer,
                        json!({"n": i}),
                    );
                    values.push(e);
                    written.lock().unwrap().insert(id);
                }
                write_batch(&f.writer, &offsets, partition, &values).await;
            }
        }));
    }
    let mut pages = Vec::new();
    let mut cursor = None;
    while !writers.iter().all(|w| w.is_finished()) {
        read_on(&f, &mut cursor, "7", &mut pages).await;
        check_exactly_once_so_far(&pages);
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let expected = written.lock().unwrap().clone();
    assert!(expected.len() > 200, "{}", expected.len());
    // Events become readable once every older transaction (in any database
    // of the server) has finished: poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        read_on(&f, &mut cursor, "7", &mut pages).await;
        let seen: usize = pages.iter().map(Vec::len).sum();
        if seen >= expected.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_exactly_once(&pages, &expected).unwrap();
    assert!(
        pages.len() > expected.len() / 7,
        "the reader really paged: {}",
        pages.len()
    );
    Arc::try_unwrap(f).ok().expect("sole owner").finish().await;
}

#[track_caller]
fn check_exactly_once_so_far(pages: &[Vec<Uuid>]) {
    let mut seen = HashSet::new();
    for id in pages.iter().flatten() {
        assert!(seen.insert(*id), "event {id} returned twice");
    }
}

/// The mechanism, deterministically: a transaction that took a smaller
/// `seq` commits after one with a larger `seq`. Pages bounded by the
/// snapshot wait for it and return both, in order; pages by `seq` alone
/// (the planted bug) skip it, and the checker says so.
#[tokio::test]
async fn a_late_commit_with_a_smaller_seq_is_not_skipped() {
    let f = Fixture::new().await;
    let insert =
        "INSERT INTO events (event_id, event_type, stream_id, occurred_at, payload, content_hash) \
                  VALUES ($1, 'order.created', 'late', now(), '{}', '\\x00')";
    let early = Uuid::new_v4();
    let late = Uuid::new_v4();
    let mut slow = f.owner.begin().await.unwrap();
    sqlx::query(insert)
        .bind(early)
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query(insert)
        .bind(late)
        .execute(&f.owner)
        .await
        .unwrap();
    let seqs: Vec<(Uuid, i64)> = sqlx::query_as("SELECT event_id, seq FROM events ORDER BY seq")
        .fetch_all(&f.owner)
        .await
        .unwrap();
    assert_eq!(seqs.len(), 1, "only the committed one is visible");

    // The naive pager: by seq, no snapshot bound.
    let naive_first: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, seq FROM events ORDER BY seq LIMIT 7")
            .fetch_all(&f.owner)
            .await
            .unwrap();
    // The API: nothing yet, the older transaction is still open.
    let mut pages = Vec::new();
    let mut cursor = None;
    read_on(&f, &mut cursor, "7", &mut pages).await;
    assert!(pages.is_empty(), "{pages:?}");

    slow.commit().await.unwrap();
    let naive_after = naive_first.last().map(|(_, s)| *s).unwrap();
    let naive_second: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, seq FROM events WHERE seq > $1 ORDER BY seq LIMIT 7")
            .bind(naive_after)
            .fetch_all(&f.owner)
            .await
            .unwrap();
    let naive_pages = vec![
        naive_first.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        naive_second.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
    ];
    let expected: HashSet<Uuid> = [early, late].into();
    let naive = check_exactly_once(&naive_pages, &expected);
    assert!(
        naive.is_err(),
        "the planted bug must be caught: {naive_pages:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while pages.iter().map(Vec::len).sum::<usize>() < 2 && Instant::now() < deadline {
        read_on(&f, &mut cursor, "7", &mut pages).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check_exactly_once(&pages, &expected).unwrap();
    assert_eq!(pages.concat(), vec![early, late], "in commit order");
    f.finish().await;
}

/// Bad input is a 400 problem that names what to fix, never a 500.
#[tokio::test]
async fn bad_inputs_are_400_problems() {
    let f = Fixture::new().await;
    seed(&f).await;
    let cases: Vec<(String, &str)> = vec![
        ("/v1/events/not-a-uuid".into(), "/v1/events/not-a-uuid"),
        (
            url("/v1/events", &[("correlation_id", "nope")]),
            "correlation_id",
        ),
        (
            url("/v1/events", &[("occurred_from", "yesterday")]),
            "occurred_from",
        ),
        (
            url(
                "/v1/events",
                &[
                    ("occurred_from", "2026-11-02T00:00:00Z"),
                    ("occurred_to", "2026-11-01T00:00:00Z"),
                ],
            ),
            "after",
        ),
        (url("/v1/events", &[("limit", "0")]), "limit"),
        (url("/v1/events", &[("limit", "1001")]), "limit"),
        (url("/v1/events", &[("limit", "ten")]), "limit"),
        (url("/v1/events", &[("cursor", "garbage")]), "cursor"),
        (
            url("/v1/events", &[("cursor", "AgAAAAAAAAABAAAAAAAAAAE")]),
            "cursor",
        ),
        (url("/v1/events", &[("contains", "{not json")]), "contains"),
        (url("/v1/events", &[("contains", "[1,2]")]), "contains"),
        (url("/v1/events", &[("event_type", "order*")]), "event_type"),
        (
            url("/v1/events", &[("evnet_type", "order.created")]),
            "unknown query parameter `evnet_type`",
        ),
        (url("/v1/events", &[("email", " ")]), "email"),
        (url("/v1/events", &[("decrypt", "maybe")]), "decrypt"),
        (
            url("/v1/streams/order-1/events", &[("from_version", "0")]),
            "from_version",
        ),
        (
            url("/v1/streams/order-1/events", &[("cursor", "x")]),
            "cursor",
        ),
        (
            url("/v1/streams/order-1/state", &[("at", "2026-13-01")]),
            "at",
        ),
        ("/v1/dead-letters/abc".into(), "path"),
        (
            url(
                "/v1/dead-letters",
                &[(
                    "cursor",
                    &audit_api::filters::id_cursor::encode(
                        audit_api::filters::id_cursor::ACCESS_LOG,
                        3,
                    ),
                )],
            ),
            "cursor",
        ),
        (url("/v1/dead-letters", &[("partition", "-1")]), "partition"),
        (url("/v1/access-log", &[("from", "x")]), "from"),
    ];
    for (uri, needle) in cases {
        let reply = f.get_as(Role::Admin, &uri).await;
        let detail = reply.assert_problem(400);
        assert!(detail.contains(needle), "{uri}: {detail}");
    }
    // The right cursor kind for the wrong route.
    let page = f
        .get_as(Role::Reader, &url("/v1/events", &[("limit", "1")]))
        .await;
    let event_cursor = page.json["next_cursor"].as_str().unwrap().to_owned();
    f.get_as(
        Role::Reader,
        &url("/v1/dead-letters", &[("cursor", &event_cursor)]),
    )
    .await
    .assert_problem(400);
    // Unknown things are 404 problems.
    f.get_as(Role::Reader, &format!("/v1/events/{}", Uuid::new_v4()))
        .await
        .assert_problem(404);
    f.get_as(Role::Reader, "/v1/dead-letters/999999")
        .await
        .assert_problem(404);
    f.get_as(Role::Reader, "/v1/streams/no-such-stream/state")
        .await
        .assert_problem(404);
    f.get_as(Role::Reader, "/v1/nothing-here")
        .await
        .assert_problem(404);
    let wrong_method = f
        .request(Method::POST, "/v1/events", Some(&f.tokens.reader), None)
        .await;
    assert!(
        wrong_method.assert_problem(405).contains("method"),
        "{wrong_method:#?}"
    );
    // A body that is not JSON, a body too large.
    let erase = format!("/v1/subjects/{}", Customer::new(1).id);
    f.request(
        Method::DELETE,
        &erase,
        Some(&f.tokens.admin),
        Some("{reason".into()),
    )
    .await
    .assert_problem(400);
    let huge = format!("{{\"reason\":\"{}\"}}", "x".repeat(100_000));
    let too_large = f
        .request(Method::DELETE, &erase, Some(&f.tokens.admin), Some(huge))
        .await;
    assert!(too_large
        .assert_problem(413)
        .contains("--api-max-body-bytes"));
    f.finish().await;
}

/// Filters, alone and together, against what was written.
#[tokio::test]
async fn filters_select_the_right_events() {
    let f = Fixture::new().await;
    let (ids, _, _) = seed(&f).await;
    let count = |reply: Reply| reply.assert_ok()["events"].as_array().unwrap().len();
    let cases: Vec<(Vec<(&str, &str)>, usize)> = vec![
        (vec![], 4),
        (vec![("stream_id", "order-1")], 2),
        (vec![("event_type", "order.created")], 2),
        (vec![("event_type", "order.*")], 3),
        (
            vec![("event_type", "order.paid"), ("event_type", "payment.*")],
            2,
        ),
        (vec![("event_type", "*")], 4),
        (vec![("source", "shop")], 4),
        (vec![("source", "other")], 0),
        (vec![("occurred_from", "2026-11-02T00:00:00Z")], 2),
        (vec![("occurred_to", "2026-11-01T11:00:00Z")], 1),
        (
            vec![
                ("occurred_from", "2026-11-01T11:00:00+00:00"),
                ("occurred_to", "2026-11-02T11:00:00Z"),
            ],
            2,
        ),
        (vec![("ingested_from", "2000-01-01T00:00:00Z")], 4),
        (vec![("ingested_to", "2000-01-01T00:00:00Z")], 0),
        (vec![("contains", r#"{"status":"new"}"#)], 2),
        (
            vec![("contains", r#"{"status":"new","amount_cents":500}"#)],
            1,
        ),
        (vec![("contains", r#"{"customer":{"id":"customer-2"}}"#)], 2),
    ];
    for (query, expected) in cases {
        let reply = f.get_as(Role::Reader, &url("/v1/events", &query)).await;
        assert_eq!(count(reply), expected, "{query:?}");
    }
    let event = f
        .get_as(Role::Reader, &format!("/v1/events/{}", ids[1]))
        .await;
    let event = event.assert_ok().clone();
    let correlation = event["correlation_id"].as_str().unwrap().to_owned();
    let reply = f
        .get_as(
            Role::Reader,
            &url("/v1/events", &[("correlation_id", &correlation)]),
        )
        .await;
    assert_eq!(count(reply), 1);
    // The event's shape.
    for key in [
        "seq",
        "event_id",
        "event_type",
        "stream_id",
        "stream_version",
        "occurred_at",
        "ingested_at",
        "source",
        "correlation_id",
        "causation_id",
        "subject_id",
        "payload",
        "metadata",
        "headers",
        "kafka",
        "chain",
    ] {
        assert!(event.get(key).is_some(), "missing {key}: {event}");
    }
    assert_eq!(event["causation_id"], Value::Null);
    assert_eq!(event["subject_id"], "customer-1");
    assert_eq!(
        event["kafka"],
        json!({"topic": TOPIC, "partition": 0, "offset": 1})
    );
    assert_eq!(event["chain"]["id"], "orders/0");
    assert_eq!(event["chain"]["position"], 1);
    assert_eq!(event["chain"]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(event["metadata"], json!({"schema": 1}));
    assert_eq!(event["headers"][0]["key"], "traceparent");

    // Stream pages: in order, from a version, with a cursor.
    let stream = f
        .get_as(
            Role::Reader,
            &url("/v1/streams/order-1/events", &[("limit", "1")]),
        )
        .await;
    let stream = stream.assert_ok().clone();
    assert_eq!(stream["events"][0]["stream_version"], 1);
    let next = f
        .get_as(
            Role::Reader,
            &url(
                "/v1/streams/order-1/events",
                &[
                    ("limit", "1"),
                    ("cursor", stream["next_cursor"].as_str().unwrap()),
                ],
            ),
        )
        .await;
    assert_eq!(next.assert_ok()["events"][0]["stream_version"], 2);
    let from = f
        .get_as(
            Role::Reader,
            &url("/v1/streams/order-1/events", &[("from_version", "2")]),
        )
        .await;
    assert_eq!(from.assert_ok()["events"].as_array().unwrap().len(), 1);

    // Dead letters: filters and detail.
    let dls = f
        .get_as(
            Role::Reader,
            &url(
                "/v1/dead-letters",
                &[
                    ("reason_code", "not_json"),
                    ("topic", TOPIC),
                    ("partition", "1"),
                ],
            ),
        )
        .await;
    let dls = dls.assert_ok().clone();
    assert_eq!(dls["dead_letters"].as_array().unwrap().len(), 1, "{dls}");
    assert_eq!(dls["dead_letters"][0]["kafka"]["offset"], 2);
    let none = f
        .get_as(
            Role::Reader,
            &url("/v1/dead-letters", &[("reason_code", "unprotectable")]),
        )
        .await;
    assert_eq!(none.assert_ok()["dead_letters"], json!([]));
    let later = f
        .get_as(
            Role::Reader,
            &url(
                "/v1/dead-letters",
                &[("received_from", "2999-01-01T00:00:00Z")],
            ),
        )
        .await;
    assert_eq!(later.assert_ok()["dead_letters"], json!([]));
    f.finish().await;
}

/// The state at a point in time folds the stream's payloads by JSON merge
/// patch, up to that time, with configurable reducers.
#[tokio::test]
async fn state_folds_events_up_to_a_time() {
    let reducers = Reducers::from_toml_str(
        r#"
        [reducers]
        "order.snapshot" = "replace"
        "order.note" = "ignore"
        "#,
        "test",
    )
    .unwrap();
    let f = Fixture::with(ApiLimits::default(), reducers).await;
    let c = Customer::new(3);
    let events = [
        order_event(
            "order-9",
            1,
            "order.created",
            "2026-11-05T10:00:00Z",
            &c,
            json!({"status": "new", "items": ["a"], "gift": true}),
        ),
        order_event(
            "order-9",
            2,
            "order.note",
            "2026-11-05T10:30:00Z",
            &c,
            json!({"status": "ignored"}),
        ),
        order_event(
            "order-9",
            3,
            "order.paid",
            "2026-11-05T11:00:00Z",
            &c,
            json!({"status": "paid", "gift": null}),
        ),
        order_event(
            "order-9",
            4,
            "order.snapshot",
            "2026-11-05T12:00:00Z",
            &c,
            json!({"status": "shipped"}),
        ),
    ];
    let ids: Vec<Uuid> = events.iter().map(|(id, _)| *id).collect();
    f.write(
        0,
        &events.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
    )
    .await;
    let state_at = |at: &str| url("/v1/streams/order-9/state", &[("at", at)]);

    let before = f
        .get_as(Role::Reader, &state_at("2026-11-05T09:00:00Z"))
        .await;
    assert!(before.assert_problem(404).contains("at or before"));

    let first = f
        .get_as(Role::Reader, &state_at("2026-11-05T10:00:00Z"))
        .await;
    let first = first.assert_ok().clone();
    assert_eq!(first["stream_id"], "order-9");
    assert_eq!(first["state"]["status"], "new");
    assert_eq!(first["state"]["gift"], true);
    assert_eq!(
        first["state"]["customer"]["email"],
        json!({"$redacted": true})
    );
    assert_eq!(first["events_applied"].as_array().unwrap().len(), 1);

    let paid = f
        .get_as(Role::Reader, &state_at("2026-11-05T11:30:00Z"))
        .await;
    let paid = paid.assert_ok().clone();
    assert_eq!(paid["state"]["status"], "paid");
    assert!(
        paid["state"].get("gift").is_none(),
        "null removes: {}",
        paid["state"]
    );
    assert_eq!(paid["state"]["items"], json!(["a"]));
    let applied: Vec<&str> = paid["events_applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        applied,
        vec![ids[0].to_string(), ids[2].to_string()],
        "the note is ignored"
    );
    assert_eq!(paid["events_applied"][1]["event_type"], "order.paid");
    assert!(paid["events_applied"][1]["occurred_at"].is_string());

    let now = f.get_as(Role::Reader, "/v1/streams/order-9/state").await;
    let now = now.assert_ok().clone();
    assert_eq!(now["state"]["status"], "shipped");
    assert!(
        now["state"].get("items").is_none(),
        "replace: {}",
        now["state"]
    );
    // Decrypted for an auditor: the folded state holds the plaintext.
    let decrypted = f
        .get_as(
            Role::Auditor,
            &url(
                "/v1/streams/order-9/state",
                &[
                    ("at", "2026-11-05T11:00:00Z"),
                    ("decrypt", "true"),
                    ("purpose", "dispute 5"),
                ],
            ),
        )
        .await;
    assert_eq!(decrypted.assert_ok()["state"]["customer"]["email"], c.email);
    f.finish().await;
}

/// A query that runs into the statement timeout answers 503 with a body
/// that says what to do, not 500.
#[tokio::test]
async fn statement_timeout_is_a_503_problem() {
    let limits = ApiLimits {
        statement_timeout: Duration::from_millis(300),
        ..ApiLimits::default()
    };
    let f = Fixture::with(limits, Reducers::default()).await;
    seed(&f).await;
    let mut lock = f.owner.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let reply = f.get_as(Role::Reader, "/v1/events").await;
    let detail = reply.assert_problem(503);
    assert!(
        detail.contains("statement timeout") && detail.contains("narrow"),
        "{detail}"
    );
    lock.rollback().await.unwrap();
    f.get_as(Role::Reader, "/v1/events").await.assert_ok();
    f.finish().await;
}

/// Event pages by stream, type and ids run on connections that plan each
/// statement once (planning a page over every partition of `events` cost
/// more than running it); a time range or a containment keeps a plan made
/// for its values.
/// No connection of the API compiles with JIT (30 ms per statement).
#[tokio::test]
async fn value_independent_pages_plan_once_and_no_connection_jits() {
    let f = Fixture::with(ApiLimits::default(), Reducers::default()).await;
    let plain = audit_ledger::query::EventFilter {
        event_types: vec!["order.paid".parse().unwrap()],
        stream_id: Some("order-1".into()),
        ..Default::default()
    };
    let ranged = audit_ledger::query::EventFilter {
        occurred_from: Some(chrono::Utc::now()),
        ..plain.clone()
    };
    let ingested = audit_ledger::query::EventFilter {
        ingested_to: Some(chrono::Utc::now()),
        ..plain.clone()
    };
    let contains = audit_ledger::query::EventFilter {
        contains: Some(json!({"status": "paid"})),
        ..plain.clone()
    };
    let show = |pool: sqlx::PgPool, setting: &'static str| async move {
        sqlx::query_scalar::<_, String>(&format!("SHOW {setting}"))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let generic = f.state.page_pool(&plain).clone();
    assert_eq!(
        show(generic.clone(), "plan_cache_mode").await,
        "force_generic_plan"
    );
    let blind = audit_ledger::query::EventFilter {
        blind: vec![audit_ledger::query::BlindMatch {
            name: "email".into(),
            tokens: vec!["email:00".into()],
        }],
        ..plain.clone()
    };
    for filter in [&ranged, &ingested, &contains, &blind] {
        let pool = f.state.page_pool(filter).clone();
        assert_eq!(show(pool, "plan_cache_mode").await, "auto");
    }
    for pool in [generic, f.state.pool().clone()] {
        assert_eq!(show(pool.clone(), "jit").await, "off");
        // Still the API's role on both.
        assert_eq!(show(pool, "role").await, "audit_api");
    }
    f.finish().await;
}

/// The replay stream limit: permits up to the limit, then 429.
#[tokio::test]
async fn replay_streams_are_limited() {
    let limits = ApiLimits {
        max_replay_streams: 2,
        ..ApiLimits::default()
    };
    let f = Fixture::with(limits, Reducers::default()).await;
    let a = f.state.replay_stream_permit().unwrap();
    let _b = f.state.replay_stream_permit().unwrap();
    let refused = f.state.replay_stream_permit().unwrap_err();
    assert_eq!(refused.problem().status, 429);
    assert!(refused
        .problem()
        .detail
        .contains("--api-max-replay-streams"));
    drop(a);
    assert!(f.state.replay_stream_permit().is_ok());
    f.finish().await;
}

/// The served OpenAPI document is the committed one.
#[tokio::test]
async fn served_spec_matches_docs_openapi_json() {
    let f = Fixture::new().await;
    let served = f.get("/openapi.json", None).await;
    served.assert_ok();
    let committed = include_str!("../../docs/openapi.json");
    let committed: Value = serde_json::from_str(committed).expect("docs/openapi.json is JSON");
    assert!(
        served.json == committed,
        "docs/openapi.json is out of date; regenerate it with\n    cargo run -p audit-node -- openapi > docs/openapi.json\nand commit it"
    );
    assert_eq!(audit_api::openapi_json().trim(), served.text.trim());
    let spec = &served.json;
    assert!(spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let open = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
            assert_eq!(op.get("security").is_none(), open, "{method} {path}");
            if !open {
                for status in ["400", "401", "403", "404", "413", "429", "503"] {
                    let content = &op["responses"][status]["content"];
                    assert!(
                        content.get("application/problem+json").is_some(),
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    f.finish().await;
}
