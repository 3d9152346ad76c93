//! Data protection and tamper evidence end to end, through real processes:
//! personal data never reaches PostgreSQL in plaintext, `events show
//! --decrypt` gives back what the producer sent, `subjects erase`
//! crypto-shreds a subject, and `verify` catches each way of tampering with
//! a copy of the store.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use audit_ledger::canonical::{canonical_text, chain_hash, ChainRecord, GENESIS};
use audit_ledger::checkpoint::CheckpointDir;
use audit_ledger::merkle::{leaf_hash, CompactRange};
use audit_ledger::testing::TestDatabase;
use chrono::{DateTime, Utc};
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgPool, Row};
use uuid::Uuid;

/// The fields the default policy protects (the issue's list).
const PROTECTED: [&str; 10] = [
    "/customer/name",
    "/customer/email",
    "/customer/phone",
    "/customer/address",
    "/shipping_address",
    "/billing_address",
    "/payment/card/number",
    "/payment/card/expiry",
    "/payment/card/holder",
    "/payment/iban",
];

// ---------------------------------------------------------------------------
// 1. Generated traffic: no plaintext personal data in the store.
// ---------------------------------------------------------------------------

/// Every personal value the generator put in a protected field, for every
/// record it produced, is absent from every column of every stored row; the
/// stored fields are envelopes; a sample decrypts to exactly what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_personal_data_is_never_stored_in_plaintext() {
    let h = Harness::start(4).await;
    let mut node = h.node("node-1");
    let produced = h.produce(3_000, 0.0, 0.0, 301).await;
    h.wait_all_stored(produced, Duration::from_secs(120)).await;
    assert!(node.terminate().success(), "{}", node.log_text());
    let records = read_topic(&h, produced.produced as usize).await;

    // A sample, one record in 60, read back through `events show`.
    let mut revealed: Vec<String> = Vec::new();
    for record in records.iter().step_by(60) {
        let id: Uuid = record["event_id"].as_str().unwrap().parse().unwrap();
        let raw = show(&h, id, false).await;
        let decrypted = show(&h, id, true).await;
        assert_eq!(
            decrypted["payload"], record["payload"],
            "event {id} decrypts to what was produced"
        );
        for pointer in PROTECTED {
            let Some(value) = decrypted["payload"].pointer(pointer) else {
                continue;
            };
            let stored = raw["payload"].pointer(pointer).unwrap();
            assert!(
                is_envelope(stored),
                "{pointer} of {id} is stored as {stored}"
            );
            revealed.extend(leaves(value));
        }
    }
    assert!(
        revealed.len() >= 50,
        "only {} personal values sampled",
        revealed.len()
    );

    // Every personal value of every produced record (leaves long enough
    // not to occur in base64 ciphertext by chance), and the sample's.
    let mut personal: HashMap<String, String> = HashMap::new();
    for record in &records {
        for pointer in PROTECTED {
            if let Some(value) = record.pointer(&format!("/payload{pointer}")) {
                for leaf in leaves(value) {
                    let origin = format!("{pointer} of {}", record["event_type"]);
                    personal.entry(leaf).or_insert(origin);
                }
            }
        }
    }
    for leaf in revealed {
        personal
            .entry(leaf)
            .or_insert_with(|| "a decrypted sample".into());
    }
    personal.retain(|value, _| value.chars().count() >= 6);
    assert!(
        personal.len() > 1_000,
        "the generator should emit plenty of personal data"
    );

    let dump: String = sqlx::query_scalar("SELECT string_agg(e::text, E'\\n') FROM events e")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    let needles: Vec<&String> = personal.keys().collect();
    let found = find_any(&dump, &needles);
    if !found.is_empty() {
        let mut report = format!(
            "{} personal values produced in protected fields are stored in plaintext:\n",
            found.len()
        );
        for value in found.iter().take(5) {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT event_type, payload::text FROM events e WHERE strpos(e::text, $1) > 0 LIMIT 2",
            )
            .bind(value.as_str())
            .fetch_all(&h.pool)
            .await
            .unwrap();
            report.push_str(&format!(
                "  {value:?} (sent in {}) found in: {rows:?}\n",
                personal[value.as_str()]
            ));
        }
        panic!("{report}");
    }
    // The shapes of personal data, whatever the value.
    for (what, condition) in [
        ("an e-mail address", "e::text LIKE '%@%'"),
        (
            "a card number",
            "e::text ~ '[0-9]{4} [0-9]{4} [0-9]{4} [0-9]{4}' OR payload::text ~ '[0-9]{13,19}'",
        ),
        (
            "an IBAN",
            "e::text ~ '[A-Z]{2}[0-9]{2} [A-Z0-9]{4} [0-9]{4}'",
        ),
        ("a phone number", "e::text LIKE '%+44 20 7946%'"),
    ] {
        let n: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM events e WHERE {condition}"))
                .fetch_one(&h.pool)
                .await
                .unwrap();
        assert_eq!(n, 0, "{n} events hold {what} in plaintext");
    }

    // Equal e-mails give equal blind-index tokens; every order.created has one.
    let tokens: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT event_id::text, blind_index FROM events WHERE event_type = 'order.created'",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    let email_of: HashMap<&str, &str> = records
        .iter()
        .filter(|r| r["event_type"] == "order.created")
        .map(|r| {
            (
                r["event_id"].as_str().unwrap(),
                r["payload"]["customer"]["email"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(tokens.len(), email_of.len());
    let mut token_of_email: HashMap<&str, &str> = HashMap::new();
    for (id, index) in &tokens {
        let email = email_of[id.as_str()];
        let [token] = index.as_slice() else {
            panic!("order.created {id} has blind index {index:?}");
        };
        assert!(token.starts_with("email:"), "{token}");
        assert_eq!(
            *token_of_email.entry(email).or_insert(token.as_str()),
            token.as_str(),
            "one e-mail, one token"
        );
    }
    let distinct: BTreeSet<&str> = token_of_email.values().copied().collect();
    assert_eq!(
        distinct.len(),
        token_of_email.len(),
        "distinct e-mails, distinct tokens"
    );

    assert_verifies(&h).await;
    h.finish().await;
}

// ---------------------------------------------------------------------------
// 2. Hand-made events: exact round trip, then erasure.
// ---------------------------------------------------------------------------

/// One event this test sends, and what it sent.
struct Sent {
    event_id: Uuid,
    partition: i32,
    /// The data subject the store should derive.
    subject: Option<String>,
    /// The payload exactly as sent (numbers keep their literal text).
    payload: Value,
}

/// An order event full of personal data: strings, numbers (some of which
/// canonical JSON rewrites: `1.50`, `100`), nested objects and arrays,
/// `true` and `null`, non-ASCII text.
fn order_event(
    n: u32,
    customer: Option<&str>,
    envelope_subject: bool,
    partition: i32,
) -> (Sent, Vec<u8>) {
    let event_id = Uuid::new_v4();
    let customer_json = match customer {
        Some(id) => format!(
            r#""customer": {{
                "id": "{id}",
                "name": "Zoë O'Brien-{n} \"Ünïcødé\"",
                "email": "{email}",
                "phone": 4930123400{n},
                "address": {{"lines": ["{n} Rue de l'Église", "Bâtiment B"], "house_number": {n}, "floor": 1.50,
                             "geo": {{"lat": 52.520008, "lon": -13.404954}}, "verified": true, "care_of": null}}
            }},"#,
            email = if n % 2 == 0 {
                format!("Zoe.{id}@Example.ORG")
            } else {
                format!("zoe.{id}@example.org")
            },
        ),
        None => String::new(),
    };
    let text = format!(
        r#"{{
            {customer_json}
            "billing_address": {{"line1": "Hauptstraße {n}", "postcode": 10115, "extra": [100, "Hinterhaus", {{"door": 7}}]}},
            "shipping_address": ["Zoë at work", {{"street": "Kings Road", "number": 200}}],
            "payment": {{
                "method": "card",
                "card": {{"number": "4111 1111 1111 {n:04}", "expiry": {{"month": 12, "year": 2029}}, "holder": "ZOE O'BRIEN {n}"}},
                "iban": "DE89 3704 0044 0532 0130 {n:02}",
                "amount_cents": 12300
            }},
            "total_cents": 12300,
            "unit_price": 1.50,
            "items": [{{"sku": "SKU-KB-1001", "quantity": 2}}],
            "note": "order number {n}"
        }}"#
    );
    let payload: Value = serde_json::from_str(&text).expect("test payload is JSON");
    let mut envelope = json!({
        "event_id": event_id,
        "event_type": "order.created",
        "stream_id": format!("order-{n}"),
        "occurred_at": format!("2026-03-01T10:00:{:02}.000Z", n % 60),
        "payload": payload,
    });
    if envelope_subject {
        envelope["subject_id"] = json!(customer.expect("a subject"));
    }
    let bytes = serde_json::to_vec(&envelope).unwrap();
    (
        Sent {
            event_id,
            partition,
            subject: customer.map(str::to_owned),
            payload,
        },
        bytes,
    )
}

/// `payload` as `events show --decrypt` must show it once its subject is
/// erased: every protected field present replaced with `{"$erased":true}`.
fn erased(payload: &Value) -> Value {
    let mut out = payload.clone();
    for pointer in PROTECTED {
        if let Some(slot) = out.pointer_mut(pointer) {
            *slot = json!({"$erased": true});
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_fields_round_trip_and_erasure_shreds_them() {
    let h = Harness::start(2).await;
    let mut node = h.node("node-1");
    let alice = random_name("alice");
    let bob = random_name("bob");

    let mut sent = Vec::new();
    let mut batch = Vec::new();
    for (n, customer, envelope_subject, partition) in [
        (1, Some(alice.as_str()), true, 0),
        (2, Some(alice.as_str()), true, 1),
        // The subject found through the policy's /customer/id.
        (3, Some(alice.as_str()), false, 0),
        (4, Some(bob.as_str()), true, 0),
        (5, Some(bob.as_str()), false, 1),
        // No subject at all: the default key.
        (6, None, false, 1),
    ] {
        let (s, bytes) = order_event(n, customer, envelope_subject, partition);
        batch.push((partition, bytes));
        sent.push(s);
    }
    send(&h, &batch).await;
    wait_offsets(&h, 6).await;

    // Stored: envelopes under the subject's key, the subject derived.
    let key_of = |subject: &str| {
        let pool = h.pool.clone();
        let subject = subject.to_owned();
        async move {
            sqlx::query_scalar::<_, Uuid>("SELECT key_id FROM subject_keys WHERE subject_id = $1")
                .bind(subject)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    for s in &sent {
        let raw = show(&h, s.event_id, false).await;
        assert_eq!(
            raw["subject_id"].as_str(),
            s.subject.as_deref(),
            "{}",
            s.event_id
        );
        assert_eq!(
            raw["chain"]["id"],
            json!(format!("{}/{}", h.topic, s.partition))
        );
        let key = key_of(s.subject.as_deref().unwrap_or(""))
            .await
            .expect("a data key");
        for pointer in PROTECTED {
            if s.payload.pointer(pointer).is_none() {
                continue;
            }
            let stored = &raw["payload"].pointer(pointer).unwrap()["$enc"];
            assert_eq!(
                stored["kid"],
                json!(key.to_string()),
                "{pointer} of {}",
                s.event_id
            );
        }
        assert_eq!(
            raw["payload"]["note"], s.payload["note"],
            "unprotected fields stay readable"
        );
        assert_eq!(raw["payload"]["total_cents"], s.payload["total_cents"]);
        // Decrypted: what was sent, numbers and nesting included.
        let decrypted = show(&h, s.event_id, true).await;
        assert_same_json(
            &decrypted["payload"],
            &s.payload,
            &format!("event {} decrypted", s.event_id),
        );
    }
    assert_ne!(key_of(&alice).await, key_of(&bob).await);
    // The blind index normalises case: Alice's two spellings, one token.
    let alice_tokens: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT blind_index FROM events WHERE subject_id = $1 ORDER BY stream_id",
    )
    .bind(&alice)
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(alice_tokens.len(), 3);
    assert!(
        alice_tokens
            .iter()
            .all(|t| t.len() == 1 && t == &alice_tokens[0]),
        "{alice_tokens:?}"
    );

    // Erase Alice.
    let alice_key = key_of(&alice).await.unwrap();
    let erase = erase_args(&h, &alice);
    let out = cli(&erase).await;
    assert!(out.ok(), "erase failed: {out:?}");
    assert!(
        out.stdout.contains(&format!("erased subject {alice}")),
        "{out:?}"
    );

    for s in &sent {
        let decrypted = show(&h, s.event_id, true).await;
        let want = if s.subject.as_deref() == Some(alice.as_str()) {
            erased(&s.payload)
        } else {
            s.payload.clone()
        };
        assert_same_json(
            &decrypted["payload"],
            &want,
            &format!("event {} after erasing Alice", s.event_id),
        );
    }
    assert_eq!(key_of(&alice).await, None, "Alice's data key is destroyed");
    assert!(key_of(&bob).await.is_some());
    let erasure_events = |pool: PgPool| async move {
        sqlx::query(
            "SELECT event_id, chain_id, chain_position, subject_id, payload FROM events
             WHERE event_type = 'audit.subject_erased'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let rows = erasure_events(h.pool.clone()).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let erasure_id: Uuid = row.get(0);
    assert_eq!(row.get::<String, _>(1), "system");
    assert_eq!(row.get::<i64, _>(2), 0);
    assert_eq!(
        row.get::<Option<String>, _>(3).as_deref(),
        Some(alice.as_str())
    );
    let payload: Value = row.get(4);
    assert_eq!(payload["subject_id"], json!(alice));
    assert_eq!(payload["reason"], json!("erasure request ER-42"));
    assert_eq!(payload["erased_by"], json!("dpo-test"));
    assert_eq!(payload["key_id"], json!(alice_key.to_string()));
    let recorded: (Uuid, String) =
        sqlx::query_as("SELECT event_id, reason FROM erased_subjects WHERE subject_id = $1")
            .bind(&alice)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(recorded, (erasure_id, "erasure request ER-42".to_string()));

    // Erasing again: a successful no-op.
    let again = cli(&erase).await;
    assert!(again.ok(), "second erase failed: {again:?}");
    assert!(again.stdout.contains("was already erased"), "{again:?}");
    assert!(again.stdout.contains(&erasure_id.to_string()), "{again:?}");
    assert_eq!(erasure_events(h.pool.clone()).await.len(), 1);

    // Alice's events that arrive after the erasure keep no personal data,
    // and no new key is made for her. The node still caches her old key.
    let mut later = Vec::new();
    let mut batch = Vec::new();
    for (n, customer, envelope_subject, partition) in [
        (7, alice.as_str(), true, 0),
        (8, alice.as_str(), false, 1),
        (9, bob.as_str(), true, 1),
    ] {
        let (s, bytes) = order_event(n, Some(customer), envelope_subject, partition);
        batch.push((partition, bytes));
        later.push(s);
    }
    send(&h, &batch).await;
    wait_offsets(&h, 9).await;
    for s in &later {
        let raw = show(&h, s.event_id, false).await;
        let decrypted = show(&h, s.event_id, true).await;
        if s.subject.as_deref() == Some(alice.as_str()) {
            let what = format!("stored form of {}", s.event_id);
            assert_same_json(&raw["payload"], &erased(&s.payload), &what);
            assert_same_json(&decrypted["payload"], &erased(&s.payload), &what);
        } else {
            assert_same_json(&decrypted["payload"], &s.payload, &s.event_id.to_string());
        }
    }
    assert_eq!(
        key_of(&alice).await,
        None,
        "no new key for an erased subject"
    );
    // The node still had Alice's key cached (for KEY_CACHE_TTL, 60 s): its
    // batch was prepared with it, refused at commit, and prepared again.
    assert!(
        node.log_text().contains("erased while it was prepared"),
        "the stale-key path did not run:\n{}",
        node.log_text()
    );

    // SIGTERM publishes a final checkpoint of each chain the node wrote;
    // `subjects erase` published the system chain's.
    assert!(node.terminate().success(), "{}", node.log_text());
    let published = CheckpointDir::new(h.state.join("checkpoints"))
        .load_all()
        .unwrap();
    let chains: Vec<(String, i64)> = sqlx::query_as("SELECT chain_id, length FROM chains")
        .fetch_all(&h.pool)
        .await
        .unwrap();
    assert_eq!(chains.len(), 3, "{chains:?}");
    for (chain, length) in chains {
        assert!(
            published
                .iter()
                .any(|c| c.chain_id == chain && c.tree_size == length as u64),
            "no published checkpoint covers all {length} events of {chain}"
        );
    }
    assert_verifies(&h).await;
    h.finish().await;
}

// ---------------------------------------------------------------------------
// 3. Tampering, each on a copy of a finished store.
// ---------------------------------------------------------------------------

/// `verify` passes on a clean copy and fails, naming the chain and the
/// position, after each of: a payload changed, a row deleted from the
/// middle, rows cut from the end (visible only through the published
/// checkpoints), hashes recomputed without the signing key, rows swapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_chain_and_position_of_each_tampering() {
    let h = Harness::start(2).await;
    let mut args = h.run_args("node-1");
    // Small batches, so each chain gets several checkpoints.
    args.extend(["--batch-max-records", "100", "--checkpoint-every", "250"].map(String::from));
    let mut node = Proc::spawn("node-1", &args, &h.dir);
    let produced = h.produce(2_000, 0.0, 0.0, 302).await;
    h.wait_all_stored(produced, Duration::from_secs(120)).await;
    // SIGTERM: final checkpoints of both chains, and no connection left
    // on the database (a template must have none).
    assert!(node.terminate().success(), "{}", node.log_text());

    let chains: Vec<(String, i64)> =
        sqlx::query_as("SELECT chain_id, length FROM chains ORDER BY chain_id")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    let a = format!("{}/0", h.topic);
    let b = format!("{}/1", h.topic);
    let length = |chain: &str| {
        chains
            .iter()
            .find(|(c, _)| c == chain)
            .map(|(_, l)| *l)
            .unwrap()
    };
    let (len_a, len_b) = (length(&a), length(&b));
    assert!(len_a > 500 && len_b > 500, "{chains:?}");
    let checkpoint_sizes = |chain: String| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT tree_size FROM checkpoints WHERE chain_id = $1 ORDER BY tree_size",
            )
            .bind(chain)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let sizes_b = checkpoint_sizes(b.clone()).await;
    assert!(
        sizes_b.len() >= 3,
        "several checkpoints of {b}: {sizes_b:?}"
    );
    assert_eq!(
        *sizes_b.last().unwrap(),
        len_b,
        "the final checkpoint covers the chain"
    );
    // An order.created (it has total_cents) around a position.
    let created_at_or_after = |chain: String, position: i64| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT min(chain_position) FROM events
                 WHERE chain_id = $1 AND chain_position >= $2 AND payload ? 'total_cents'",
            )
            .bind(chain)
            .bind(position)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let changed_a = created_at_or_after(a.clone(), len_a / 2).await;
    let recomputed_b = created_at_or_after(b.clone(), len_b / 3).await;
    // The first checkpoint whose tree holds the changed event.
    let first_covering = sizes_b.iter().copied().find(|s| *s > recomputed_b).unwrap();
    h.pool.close().await;

    let state = h.state.clone();
    let published_only = vec!["--state-dir".to_string(), state.display().to_string()];

    let clean = on_copy(&h.db, &published_only, |_| async { Ok(()) }).await;
    assert_eq!(clean.code, Some(0), "a clean copy verifies: {clean:?}");
    assert!(clean.stdout.contains("verify: OK"), "{clean:?}");

    // a. One byte of a payload changed.
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move {
            tamper(
                &pool,
                "UPDATE events SET payload = jsonb_set(payload, '{total_cents}',
                     to_jsonb((payload->>'total_cents')::bigint + 1))
                 WHERE chain_id = $1 AND chain_position = $2",
                &chain,
                &[changed_a],
            )
            .await
        }
    })
    .await;
    assert_fails_at(&out, &a, changed_a, "stored hash differs");

    // b. A row deleted from the middle of a chain.
    let deleted = len_a / 3;
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move {
            tamper(
                &pool,
                "DELETE FROM events WHERE chain_id = $1 AND chain_position = $2",
                &chain,
                &[deleted],
            )
            .await
        }
    })
    .await;
    assert_fails_at(&out, &a, deleted, "missing");

    // c. The last rows cut, with the database's own record of them (its
    // checkpoints and chain head) made consistent: only the published
    // checkpoints can tell.
    let kept = len_b - 7;
    let cut = |extra: Vec<String>| {
        let chain = b.clone();
        let db = &h.db;
        async move {
            on_copy(db, &extra, |pool| async move {
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                bypass_triggers(&mut tx).await?;
                for statement in [
                    "DELETE FROM events WHERE chain_id = $1 AND chain_position >= $2",
                    "DELETE FROM checkpoints WHERE chain_id = $1 AND tree_size > $2",
                ] {
                    sqlx::query(statement)
                        .bind(&chain)
                        .bind(kept)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let hashes = rechain(&mut tx, &chain, None).await?;
                assert_eq!(hashes.len() as i64, kept);
                tx.commit().await.map_err(|e| e.to_string())
            })
            .await
        }
    };
    let out = cut(published_only.clone()).await;
    assert_fails_at(&out, &b, kept, "cut from its end");
    let empty = h.dir.join("no-published-checkpoints");
    std::fs::create_dir_all(&empty).unwrap();
    let database_only = vec![
        "--public-key".to_string(),
        state
            .join("keys/signing-key.pub.json")
            .display()
            .to_string(),
        "--checkpoints".to_string(),
        empty.display().to_string(),
    ];
    let out = cut(database_only).await;
    assert_eq!(
        out.code,
        Some(0),
        "the cut is invisible from the database alone (so the published checkpoints caught it): {out:?}"
    );

    // A whole chain deleted, its head and checkpoints with it.
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            bypass_triggers(&mut tx).await?;
            for table in ["events", "checkpoints", "chains"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE chain_id = $1"))
                    .bind(&chain)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())
        }
    })
    .await;
    assert_fails_at(&out, &a, 0, "cut from its end");

    // d. A payload changed and every hash from there recomputed exactly as
    // the node computes them, chain head included: only the signed Merkle
    // roots can tell.
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = b.clone();
        async move {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            bypass_triggers(&mut tx).await?;
            sqlx::query(
                "UPDATE events SET payload = jsonb_set(payload, '{total_cents}', '1')
                 WHERE chain_id = $1 AND chain_position = $2",
            )
            .bind(&chain)
            .bind(recomputed_b)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            rechain(&mut tx, &chain, Some(recomputed_b)).await?;
            tx.commit().await.map_err(|e| e.to_string())
        }
    })
    .await;
    assert_fails_at(&out, &b, first_covering - 1, "Merkle root");
    assert!(
        !out.stdout.contains("stored hash differs"),
        "the hashes are consistent: {out:?}"
    );

    // e. Two adjacent rows swapped: by position, and by content.
    let swapped = len_a / 4;
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move {
            tamper(
                &pool,
                "UPDATE events SET chain_position = CASE chain_position WHEN $2 THEN $3 ELSE $2 END
                 WHERE chain_id = $1 AND chain_position IN ($2, $3)",
                &chain,
                &[swapped, swapped + 1],
            )
            .await
        }
    })
    .await;
    assert_fails_at(&out, &a, swapped, "");
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move {
            tamper(
                &pool,
                "UPDATE events e SET payload = o.payload
                 FROM events o
                 WHERE e.chain_id = $1 AND o.chain_id = $1
                   AND e.chain_position IN ($2, $3) AND o.chain_position IN ($2, $3)
                   AND e.chain_position <> o.chain_position",
                &chain,
                &[swapped, swapped + 1],
            )
            .await
        }
    })
    .await;
    assert_fails_at(&out, &a, swapped, "stored hash differs");
    // ... and by store order: `seq` is not hashed, but must increase along
    // the chain.
    let out = on_copy(&h.db, &published_only, |pool| {
        let chain = a.clone();
        async move { swap_seq(&pool, &chain, swapped).await }
    })
    .await;
    assert_fails_at(&out, &a, swapped + 1, "seq values swapped");

    h.finish().await;
}

/// The verifier's checkers are not vacuous on their own either: a chain
/// rewritten from position 0 with no checkpoint at all passes (so what
/// catches case d above really is the signed checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recomputed_chain_without_checkpoints_passes_the_hash_checks() {
    let h = Harness::start(1).await;
    let mut node = h.node("node-1");
    let produced = h.produce(300, 0.0, 0.0, 303).await;
    h.wait_all_stored(produced, Duration::from_secs(120)).await;
    assert!(node.terminate().success(), "{}", node.log_text());
    h.pool.close().await;
    let chain = format!("{}/0", h.topic);
    let empty = h.dir.join("no-published-checkpoints");
    std::fs::create_dir_all(&empty).unwrap();
    let no_checkpoints = vec![
        "--public-key".to_string(),
        h.state
            .join("keys/signing-key.pub.json")
            .display()
            .to_string(),
        "--checkpoints".to_string(),
        empty.display().to_string(),
    ];
    let out = on_copy(&h.db, &no_checkpoints, |pool| {
        let chain = chain.clone();
        async move {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            bypass_triggers(&mut tx).await?;
            sqlx::query("DELETE FROM checkpoints")
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query(
                "UPDATE events SET payload = jsonb_set(payload, '{tampered}', 'true')
                 WHERE chain_id = $1 AND chain_position = 10",
            )
            .bind(&chain)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            rechain(&mut tx, &chain, Some(10)).await?;
            tx.commit().await.map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(
        out.code,
        Some(0),
        "recomputed hashes are consistent, so only checkpoints can catch them: {out:?}"
    );
    h.finish().await;
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct CliOutput {
    code: Option<i32>,
    stdout: String,
    /// Shown (through Debug) when an assertion fails.
    #[allow(dead_code)]
    stderr: String,
}

impl CliOutput {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

async fn cli(args: &[String]) -> CliOutput {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env("AUDIT_LOG", "warn")
        .env_remove("AUDIT_STATE_DIR")
        .output()
        .await
        .expect("run audit-node");
    CliOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `events show` as JSON.
async fn show(h: &Harness, id: Uuid, decrypt: bool) -> Value {
    let mut args: Vec<String> = vec![
        "events".into(),
        "show".into(),
        id.to_string(),
        "--database-url".into(),
        h.db.url.clone(),
        "--state-dir".into(),
        h.state.display().to_string(),
    ];
    if decrypt {
        args.push("--decrypt".into());
    }
    let out = cli(&args).await;
    assert!(out.ok(), "events show {id} failed: {out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn erase_args(h: &Harness, subject: &str) -> Vec<String> {
    vec![
        "subjects".into(),
        "erase".into(),
        subject.into(),
        "--reason".into(),
        "erasure request ER-42".into(),
        "--by".into(),
        "dpo-test".into(),
        "--database-url".into(),
        h.db.url.clone(),
        "--state-dir".into(),
        h.state.display().to_string(),
    ]
}

async fn assert_verifies(h: &Harness) {
    h.assert_verifies().await;
}

/// Asserts `verify` failed and reported `chain` at `position` (with `what`
/// in the same line).
fn assert_fails_at(out: &CliOutput, chain: &str, position: i64, what: &str) {
    assert!(
        out.code.is_some_and(|c| c != 0),
        "verify must fail: {out:?}"
    );
    let prefix = format!("verify: FAILED: chain {chain} position {position}");
    assert!(
        out.stdout.lines().any(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with([' ', ':']) && rest.contains(what))
        }),
        "expected a line starting {prefix:?} mentioning {what:?}: {out:?}"
    );
}

/// `actual` is the JSON value `expected` (numbers compared by value, as
/// jsonb compares them: the store keeps `1.50` as `1.5`), and every integer
/// is still written as an integer: `100` must not come back as `1e2`, which
/// many JSON readers (Python, Jackson) turn into a floating-point number.
fn assert_same_json(actual: &Value, expected: &Value, what: &str) {
    fn differences(actual: &Value, expected: &Value, path: &mut String, out: &mut Vec<String>) {
        match (actual, expected) {
            (Value::Number(a), Value::Number(e)) => {
                let value = |n: &serde_json::Number| canonical_text(&n.to_string()).unwrap();
                let integer = |n: &serde_json::Number| n.is_i64() || n.is_u64();
                if value(a) != value(e) {
                    out.push(format!("{path}: {a} is not {e}"));
                } else if integer(e) && !integer(a) {
                    out.push(format!("{path}: the integer {e} comes back as {a}"));
                }
            }
            (Value::Object(a), Value::Object(e)) => {
                let keys: BTreeSet<&String> = a.keys().chain(e.keys()).collect();
                for key in keys {
                    let len = path.len();
                    path.push('/');
                    path.push_str(key);
                    match (a.get(key), e.get(key)) {
                        (Some(a), Some(e)) => differences(a, e, path, out),
                        (a, e) => out.push(format!("{path}: {a:?} instead of {e:?}")),
                    }
                    path.truncate(len);
                }
            }
            (Value::Array(a), Value::Array(e)) if a.len() == e.len() => {
                for (i, (a, e)) in a.iter().zip(e).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    differences(a, e, path, out);
                    path.truncate(len);
                }
            }
            (a, e) if a == e => {}
            (a, e) => out.push(format!("{path}: {a} instead of {e}")),
        }
    }
    let mut found = Vec::new();
    differences(actual, expected, &mut String::new(), &mut found);
    assert!(
        found.is_empty(),
        "{what}: {found:#?}\nactual:   {actual}\nexpected: {expected}"
    );
}

/// Every string, number and boolean inside `value`, as text.
fn leaves(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string()],
        Value::Array(items) => items.iter().flat_map(leaves).collect(),
        Value::Object(map) => map.values().flat_map(leaves).collect(),
        Value::Bool(_) | Value::Null => Vec::new(),
    }
}

fn is_envelope(value: &Value) -> bool {
    value.as_object().is_some_and(|m| {
        m.len() == 1
            && m["$enc"]["kid"].is_string()
            && m["$enc"]["c"].is_string()
            && m["$enc"]["n"].is_string()
    })
}

/// Sends records to given partitions and waits for each acknowledgement.
async fn send(h: &Harness, records: &[(i32, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &h.kafka.bootstrap)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    for (partition, value) in records {
        producer
            .send(
                FutureRecord::<(), [u8]>::to(&h.topic)
                    .partition(*partition)
                    .payload(value.as_slice()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("record delivered");
    }
}

/// Waits until the group's stored offsets account for `records` records.
async fn wait_offsets(h: &Harness, records: i64) {
    wait_until(
        &format!("{records} records stored"),
        Duration::from_secs(60),
        || async { stored(&h.pool, &h.group).await.offsets == records },
    )
    .await;
}

/// Every record of the topic, from the start, as JSON.
async fn read_topic(h: &Harness, expected: usize) -> Vec<Value> {
    let bootstrap = h.kafka.bootstrap.clone();
    let topic = h.topic.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", random_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut assignment = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(&topic, partition.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut records = Vec::with_capacity(expected);
        while records.len() < expected {
            assert!(
                Instant::now() < deadline,
                "read {} of {expected} records",
                records.len()
            );
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(message)) => {
                    let value = message.payload().expect("a value");
                    records.push(serde_json::from_slice(value).expect("produced records are JSON"));
                }
                Some(Err(e)) => panic!("reading the topic: {e}"),
                None => {}
            }
        }
        records
    })
    .await
    .expect("reader task")
}

/// Runs `change` on a fresh copy of `db` (as the superuser), then `verify`
/// with `verify_args` on the copy; drops the copy before returning, so a
/// failing assertion never leaves it behind.
async fn on_copy<F, Fut>(db: &TestDatabase, verify_args: &[String], change: F) -> CliOutput
where
    F: FnOnce(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let name = format!("audit_test_{:016x}", rand::random::<u64>());
    let url = db
        .url
        .replacen(&format!("/{}", db.name), &format!("/{name}"), 1);
    copy_database(&db.url, &db.name, &name).await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect to the copy");
    let changed = change(pool.clone()).await;
    pool.close().await;
    let out = match &changed {
        Ok(()) => {
            let mut args = vec!["verify".to_string(), "--database-url".into(), url.clone()];
            args.extend_from_slice(verify_args);
            Some(cli(&args).await)
        }
        Err(_) => None,
    };
    audit_ledger::store::postgres::drop_database(&url).await;
    if let Err(e) = changed {
        panic!("tampering with the copy failed: {e}");
    }
    out.expect("verify ran")
}

/// `CREATE DATABASE copy TEMPLATE source`, retried while the server still
/// counts a just-closed connection to the source.
async fn copy_database(url: &str, source: &str, copy: &str) {
    let admin_url = url.replacen(&format!("/{source}"), "/postgres", 1);
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connect to postgres");
    let statement = format!("CREATE DATABASE \"{copy}\" TEMPLATE \"{source}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.execute(statement.as_str()).await {
            Ok(_) => break,
            // 55006: the source database is being accessed by other users.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {
                if Instant::now() >= deadline {
                    let who: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                        "SELECT application_name, backend_type, query FROM pg_stat_activity WHERE datname = $1",
                    )
                    .bind(source)
                    .fetch_all(&mut admin)
                    .await
                    .unwrap_or_default();
                    panic!("{source} stays in use: {e}; connected: {who:?}");
                }
                // Autovacuum of the freshly loaded source, or a pooled
                // connection the server has not reaped yet, still holds it.
                // Every writer is stopped by now, so cutting them off is safe.
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(source)
                .execute(&mut admin)
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("copying {source}: {e}"),
        }
    }
    let _ = admin.close().await;
}

/// Runs one statement with `$1` = chain and `$2..` = positions, triggers off.
async fn tamper(
    pool: &PgPool,
    statement: &str,
    chain: &str,
    positions: &[i64],
) -> Result<(), String> {
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    bypass_triggers(&mut tx).await?;
    let mut query = sqlx::query(statement).bind(chain);
    for p in positions {
        query = query.bind(*p);
    }
    let done = query.execute(&mut *tx).await.map_err(|e| e.to_string())?;
    if done.rows_affected() == 0 {
        return Err(format!("`{statement}` changed nothing"));
    }
    tx.commit().await.map_err(|e| e.to_string())
}

/// Swaps the `seq` values of `chain`'s rows at `position` and the next, in
/// two steps: the primary key is checked row by row.
async fn swap_seq(pool: &PgPool, chain: &str, position: i64) -> Result<(), String> {
    const NEGATE: &str =
        "UPDATE events SET seq = -seq WHERE chain_id = $1 AND chain_position IN ($2, $3)";
    const SWAP: &str = "UPDATE events e SET seq = -o.seq FROM events o
         WHERE e.chain_id = $1 AND o.chain_id = $1
           AND e.chain_position IN ($2, $3) AND o.chain_position IN ($2, $3)
           AND e.chain_position <> o.chain_position AND e.seq < 0 AND o.seq < 0";
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    bypass_triggers(&mut tx).await?;
    for statement in [NEGATE, SWAP] {
        let done = sqlx::query(statement)
            .bind(chain)
            .bind(position)
            .bind(position + 1)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        if done.rows_affected() != 2 {
            return Err(format!(
                "`{statement}` changed {} rows",
                done.rows_affected()
            ));
        }
    }
    tx.commit().await.map_err(|e| e.to_string())
}

/// What a superuser attacker does first: the append-only triggers off.
async fn bypass_triggers(tx: &mut sqlx::PgConnection) -> Result<(), String> {
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(tx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Recomputes the chain's hashes as the node computes them (docs/INTEGRITY.md)
/// from its rows as stored now; rewrites those from position `from` on
/// (checking that the ones before it match what the node stored) and the
/// chain's head row. Returns the hashes.
async fn rechain(
    tx: &mut sqlx::PgConnection,
    chain: &str,
    from: Option<i64>,
) -> Result<Vec<[u8; 32]>, String> {
    let rows = sqlx::query(
        "SELECT chain_position, hash, event_id, event_type, stream_id, stream_version,
                occurred_at, ingested_at, source, correlation_id, causation_id, subject_id,
                kafka_topic, kafka_partition, kafka_offset, headers::text, metadata::text,
                payload::text, blind_index, content_hash
         FROM events WHERE chain_id = $1 ORDER BY chain_position",
    )
    .bind(chain)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    let mut prev = GENESIS;
    let mut frontier = CompactRange::new();
    let mut hashes = Vec::with_capacity(rows.len());
    let mut buffer = Vec::new();
    for row in rows {
        let position: i64 = row.get(0);
        assert_eq!(position as usize, hashes.len(), "positions are dense");
        let stored: Vec<u8> = row.get(1);
        let headers = canonical_text(&row.get::<String, _>(15)).unwrap();
        let metadata = row
            .get::<Option<String>, _>(16)
            .map(|m| canonical_text(&m).unwrap());
        let payload = canonical_text(&row.get::<String, _>(17)).unwrap();
        let blind_index: Vec<String> = row.get(18);
        let content_hash: [u8; 32] = row.get::<Vec<u8>, _>(19).try_into().unwrap();
        let (event_type, stream_id): (String, String) = (row.get(3), row.get(4));
        let (source, subject_id, topic): (Option<String>, Option<String>, Option<String>) =
            (row.get(8), row.get(11), row.get(12));
        let record = ChainRecord {
            chain_id: chain,
            position: position as u64,
            event_id: row.get(2),
            event_type: &event_type,
            stream_id: &stream_id,
            stream_version: row.get(5),
            occurred_at: row.get::<DateTime<Utc>, _>(6),
            ingested_at: row.get::<DateTime<Utc>, _>(7),
            source: source.as_deref(),
            correlation_id: row.get(9),
            causation_id: row.get(10),
            subject_id: subject_id.as_deref(),
            kafka_topic: topic.as_deref(),
            kafka_partition: row.get(13),
            kafka_offset: row.get(14),
            headers: &headers,
            metadata: metadata.as_deref(),
            payload: &payload,
            blind_index: &blind_index,
            content_hash: &content_hash,
        };
        buffer.clear();
        record.encode(&mut buffer);
        let hash = chain_hash(&prev, &buffer);
        match from {
            Some(from) if position >= from => {
                sqlx::query(
                    "UPDATE events SET hash = $3 WHERE chain_id = $1 AND chain_position = $2",
                )
                .bind(chain)
                .bind(position)
                .bind(&hash[..])
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            }
            // Untouched rows: the recomputation must agree with the node.
            _ => assert_eq!(
                stored, hash,
                "recomputed hash of {chain} position {position}"
            ),
        }
        prev = hash;
        frontier.push(leaf_hash(&hash));
        hashes.push(hash);
    }
    sqlx::query("UPDATE chains SET length = $2, head_hash = $3, frontier = $4 WHERE chain_id = $1")
        .bind(chain)
        .bind(hashes.len() as i64)
        .bind(&prev[..])
        .bind(frontier.to_bytes())
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    Ok(hashes)
}

/// The needles that occur in `haystack`, in one pass: candidate positions
/// by each needle's first bytes, then a full comparison.
fn find_any<'n>(haystack: &str, needles: &[&'n String]) -> Vec<&'n String> {
    const PREFIX: usize = 6;
    let mut by_prefix: HashMap<&[u8], Vec<&String>> = HashMap::new();
    for needle in needles {
        assert!(needle.len() >= PREFIX);
        by_prefix
            .entry(&needle.as_bytes()[..PREFIX])
            .or_default()
            .push(needle);
    }
    let bytes = haystack.as_bytes();
    let mut found = BTreeSet::new();
    for start in 0..bytes.len().saturating_sub(PREFIX - 1) {
        let Some(candidates) = by_prefix.get(&bytes[start..start + PREFIX]) else {
            continue;
        };
        for needle in candidates {
            if bytes[start..].starts_with(needle.as_bytes()) {
                found.insert(*needle);
            }
        }
    }
    found.into_iter().collect()
}

/// KEK rotation: `keys rotate` re-wraps every data key under the new KEK
/// version without touching events; the old version can then be retired,
/// and everything still decrypts. Retiring a version still in use, or the
/// current one, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_rewraps_data_keys_and_events_still_decrypt() {
    let h = Harness::start(2).await;
    let mut node = h.node("node-1");
    let mut sent = Vec::new();
    let mut batch = Vec::new();
    let alice = random_name("alice");
    for (n, customer, partition) in [(1, Some(alice.as_str()), 0), (2, None, 1)] {
        let (s, bytes) = order_event(n, customer, customer.is_some(), partition);
        batch.push((partition, bytes));
        sent.push(s);
    }
    send(&h, &batch).await;
    wait_offsets(&h, 2).await;
    node.terminate();

    let hashes_before: Vec<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events ORDER BY seq")
        .fetch_all(&h.pool)
        .await
        .unwrap();
    let versions = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT DISTINCT kek_version FROM subject_keys")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    assert_eq!(versions(h.pool.clone()).await, vec!["v1".to_string()]);
    let keys_cmd = |args: &[&str]| {
        let mut all: Vec<String> = vec!["keys".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend([
            "--state-dir".into(),
            h.state.display().to_string(),
            "--database-url".into(),
            h.db.url.clone(),
        ]);
        all
    };

    // v1 still wraps keys: retiring it is refused.
    let refused = cli(&keys_cmd(&["retire", "v1"])).await;
    assert!(
        !refused.ok(),
        "retiring a KEK in use must fail: {refused:?}"
    );
    assert!(refused.stderr.contains("still wrapped"), "{refused:?}");

    let rotated = cli(&keys_cmd(&["rotate"])).await;
    assert!(rotated.ok(), "{rotated:?}");
    assert!(rotated.stdout.contains("v2"), "{rotated:?}");
    assert_eq!(versions(h.pool.clone()).await, vec!["v2".to_string()]);
    // Events untouched: the same hashes, the chain still verifies.
    let hashes_after: Vec<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events ORDER BY seq")
        .fetch_all(&h.pool)
        .await
        .unwrap();
    assert_eq!(hashes_before, hashes_after);

    let retired = cli(&keys_cmd(&["retire", "v1"])).await;
    assert!(retired.ok(), "{retired:?}");
    let current = cli(&keys_cmd(&["retire", "v2"])).await;
    assert!(
        !current.ok(),
        "retiring the current KEK must fail: {current:?}"
    );

    for s in &sent {
        let decrypted = show(&h, s.event_id, true).await;
        assert_same_json(
            &decrypted["payload"],
            &s.payload,
            &format!("event {} after rotation", s.event_id),
        );
    }
    assert_verifies(&h).await;
    drop(node);
    h.finish().await;
}
