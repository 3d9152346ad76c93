//! Dead-letter pages are as stable as event pages (Decision 40): following
//! `next_cursor` never skips or repeats a dead letter, even while batches
//! commit out of `id` order.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_api::auth::Role;
use common::*;
use serde_json::Value;

/// A dead letter's Kafka position: what identifies it across pages.
type Position = (i32, i64);

/// Reads every page of `/v1/dead-letters` with `limit`, from `cursor` on,
/// until an empty page.
async fn read_on(
    f: &Fixture,
    cursor: &mut Option<String>,
    limit: &str,
    pages: &mut Vec<Vec<Position>>,
) {
    loop {
        let mut query = vec![("limit", limit), ("topic", TOPIC)];
        if let Some(c) = cursor.as_deref() {
            query.push(("cursor", c));
        }
        let reply = f
            .get_as(Role::Reader, &url("/v1/dead-letters", &query))
            .await;
        let page = reply.assert_ok();
        let positions: Vec<Position> = page["dead_letters"]
            .as_array()
            .expect("dead_letters is an array")
            .iter()
            .map(|d| {
                (
                    d["kafka"]["partition"].as_i64().expect("partition") as i32,
                    d["kafka"]["offset"].as_i64().expect("offset"),
                )
            })
            .collect();
        assert!(positions.len() <= limit.parse().expect("limit"));
        if positions.is_empty() {
            assert_eq!(page["next_cursor"], Value::Null);
            return;
        }
        *cursor = Some(
            page["next_cursor"]
                .as_str()
                .expect("next_cursor on a non-empty page")
                .to_owned(),
        );
        pages.push(positions);
    }
}

fn check_exactly_once(pages: &[Vec<Position>], expected: &HashSet<Position>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for p in pages.iter().flatten() {
        if !seen.insert(*p) {
            return Err(format!("dead letter at {p:?} was returned twice"));
        }
    }
    let missing: Vec<&Position> = expected.difference(&seen).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} dead letters were never returned: {missing:?}",
            missing.len()
        ));
    }
    let extra: Vec<&Position> = seen.difference(expected).collect();
    if !extra.is_empty() {
        return Err(format!("unexpected dead letters: {extra:?}"));
    }
    Ok(())
}

/// Writers store batches of malformed records on four partitions while a
/// reader pages through with limit 5: no dead letter is returned twice, and
/// once the writers stop and the reader reaches the end, every one was
/// returned exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_pages_are_stable_under_concurrent_ingestion() {
    let f = Arc::new(Fixture::new().await);
    let written: Arc<Mutex<HashSet<Position>>> = Arc::default();
    let offsets: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
    let mut writers = Vec::new();
    for partition in 0..4 {
        let f = f.clone();
        let written = written.clone();
        let offsets = offsets.clone();
        writers.push(tokio::spawn(async move {
            for batch in 0..10 {
                let first = offsets
                    .lock()
                    .expect("offsets")
                    .get(&partition)
                    .copied()
                    .unwrap_or(0);
                let n = 2 + (batch + partition as usize) % 4;
                let values: Vec<Value> = (0..n)
                    .map(|i| Value::String(format!("{{not json p{partition} b{batch} r{i}")))
                    .collect();
                write_batch(&f.writer, &offsets, partition, &values).await;
                let mut written = written.lock().expect("written");
                for i in 0..n as i64 {
                    written.insert((partition, first + i));
                }
            }
        }));
    }
    let mut pages = Vec::new();
    let mut cursor = None;
    while !writers.iter().all(|w| w.is_finished()) {
        read_on(&f, &mut cursor, "5", &mut pages).await;
        let mut seen = HashSet::new();
        for p in pages.iter().flatten() {
            assert!(seen.insert(*p), "dead letter at {p:?} returned twice");
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    let expected = written.lock().expect("written").clone();
    assert!(expected.len() > 100, "{}", expected.len());
    // Rows become readable once every older transaction (in any database
    // of the server) has finished: poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        read_on(&f, &mut cursor, "5", &mut pages).await;
        let seen: usize = pages.iter().map(Vec::len).sum();
        if seen >= expected.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_exactly_once(&pages, &expected).unwrap();
    assert!(pages.len() > 1, "the reader really paged");
    Arc::try_unwrap(f).ok().expect("sole owner").finish().await;
}

/// The mechanism, deterministically: a transaction that took a smaller
/// `id` commits after one with a larger `id`. Pages bounded by the snapshot
/// wait for it and return both, in commit order; pages by `id` alone (the
/// pager before migration …05, planted here) skip it, and the checker says
/// so.
#[tokio::test]
async fn a_late_dead_letter_commit_is_not_skipped() {
    let f = Fixture::new().await;
    let insert = "INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, raw_value, reason_code, reason) \
                  VALUES ($1, 0, $2, 'x', 'not_json', 'planted') RETURNING id";
    let mut slow = f.owner.begin().await.unwrap();
    let early_id: i64 = sqlx::query_scalar(insert)
        .bind(TOPIC)
        .bind(0_i64)
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let late_id: i64 = sqlx::query_scalar(insert)
        .bind(TOPIC)
        .bind(1_i64)
        .fetch_one(&f.owner)
        .await
        .unwrap();
    assert!(early_id < late_id);
    let expected: HashSet<Position> = [(0, 0), (0, 1)].into();

    // The naive pager: by id, no snapshot bound. Its first page sees only
    // the committed, later row.
    let naive = "SELECT kafka_partition, kafka_offset, id FROM dead_letters WHERE id > $1 ORDER BY id LIMIT 5";
    let naive_first: Vec<(i32, i64, i64)> = sqlx::query_as(naive)
        .bind(0_i64)
        .fetch_all(&f.owner)
        .await
        .unwrap();
    assert_eq!(naive_first.len(), 1, "only the committed one is visible");
    // The API: nothing yet, the older transaction is still open.
    let mut pages = Vec::new();
    let mut cursor = None;
    read_on(&f, &mut cursor, "5", &mut pages).await;
    assert!(pages.is_empty(), "{pages:?}");

    slow.commit().await.unwrap();
    let naive_after = naive_first.last().map(|r| r.2).unwrap();
    let naive_second: Vec<(i32, i64, i64)> = sqlx::query_as(naive)
        .bind(naive_after)
        .fetch_all(&f.owner)
        .await
        .unwrap();
    let naive_pages: Vec<Vec<Position>> = [naive_first, naive_second]
        .iter()
        .map(|page| page.iter().map(|r| (r.0, r.1)).collect())
        .collect();
    assert!(
        check_exactly_once(&naive_pages, &expected).is_err(),
        "the planted bug must be caught: {naive_pages:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while pages.iter().map(Vec::len).sum::<usize>() < 2 && Instant::now() < deadline {
        read_on(&f, &mut cursor, "5", &mut pages).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check_exactly_once(&pages, &expected).unwrap();
    assert_eq!(pages.concat(), vec![(0, 0), (0, 1)], "in commit order");

    // A cursor of the id-only pager is refused with a 400 that says what to do.
    let old = audit_api::filters::id_cursor::encode(audit_api::filters::id_cursor::DEAD_LETTERS, 1);
    let detail = f
        .get_as(
            Role::Reader,
            &url("/v1/dead-letters", &[("cursor", old.as_str())]),
        )
        .await
        .assert_problem(400);
    assert!(detail.contains("next_cursor"), "{detail}");
    f.finish().await;
}
