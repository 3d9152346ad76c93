//! The real-process fault suite (issue 5, item 6; docs/CHAOS.md § Real-process
//! suite): `audit-node kafka-mock` with its fault-injection API
//! (`--control-addr`), two `audit-node run` nodes and a real PostgreSQL,
//! all separate processes, under one fault per test:
//!
//! - `kill -9` of a node, and its restart;
//! - SIGSTOP of a node past the group's session timeout, then SIGCONT;
//! - a crash and restart of PostgreSQL (a private server: the shared one is
//!   never stopped);
//! - the broker down, then up again;
//! - injected request errors (Fetch, OffsetCommit, heartbeats) and a slow
//!   broker;
//! - a rebalance that moves every partition.
//!
//! After each fault: the broker's log holds every record `produce` had
//! acknowledged, exact totals (`check_exactly_once` against what
//! `produce` reported), every chain verifies (`audit-node verify`), and every
//! live node answers 200 on `/readyz`. No sleeps as synchronisation: each
//! step polls a condition with a deadline. Fixed seeds, random names, port 0.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use audit_ledger::testing::TestDatabase;
use common::private_pg::PrivatePg;
use common::*;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Partitions of the topic: enough that every node owns several.
const PARTITIONS: i32 = 12;
/// The mock cluster's KIP-848 session timeout (node/src/mock.rs).
const MOCK_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// How long any single condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// The world: mock cluster with its control API, database, nodes.
// ---------------------------------------------------------------------------

struct World {
    dir: std::path::PathBuf,
    state: std::path::PathBuf,
    topic: String,
    group: String,
    /// Declared before `mock`: nodes are killed before the cluster stops.
    nodes: Vec<Node>,
    _mock: Proc,
    bootstrap: String,
    control: String,
    db: TestDatabase,
    pool: PgPool,
    /// Dropped last: the private server of the PostgreSQL scenario.
    pg: Option<PrivatePg>,
}

struct Node {
    name: String,
    proc: Proc,
    api: String,
}

impl World {
    /// A world on the shared local PostgreSQL server.
    async fn start() -> Self {
        let db = TestDatabase::create().await.expect("test database");
        Self::with_database(db, None).await
    }

    /// A world on a private PostgreSQL server that the test may stop.
    async fn start_private_pg() -> Self {
        let pg = PrivatePg::start();
        let db = pg.create_database().await;
        Self::with_database(db, Some(pg)).await
    }

    async fn with_database(db: TestDatabase, pg: Option<PrivatePg>) -> Self {
        let dir = scratch_dir();
        eprintln!("fault suite: logs in {}", dir.display());
        let state = init_state_dir(&dir);
        let topic = random_name("orders");
        let group = random_name("group");
        let bootstrap_file = dir.join("bootstrap.txt");
        let mock = Proc::spawn(
            "kafka-mock",
            &[
                "kafka-mock".into(),
                "--brokers".into(),
                "1".into(),
                "--topic".into(),
                format!("{topic}:{PARTITIONS}"),
                "--bootstrap-file".into(),
                bootstrap_file.display().to_string(),
                "--control-addr".into(),
                "127.0.0.1:0".into(),
            ],
            &dir,
        );
        let control = wait_for_line(&mock, "kafka mock control listening: ").await;
        let bootstrap = std::fs::read_to_string(&bootstrap_file)
            .expect("bootstrap file")
            .trim()
            .to_string();
        let pool = admin_pool(&db).await;
        Self {
            dir,
            state,
            topic,
            group,
            nodes: Vec::new(),
            _mock: mock,
            bootstrap,
            control,
            db,
            pool,
            pg,
        }
    }

    /// Starts `audit-node run` as `name` and waits until its API listens.
    async fn start_node(&mut self, name: &str) -> usize {
        let args = run_args(
            &self.bootstrap,
            &self.topic,
            &self.group,
            &self.db,
            name,
            &self.state,
        );
        let proc = Proc::spawn(name, &args, &self.dir);
        let api = wait_for_line_after(&proc, "API listening", "addr=").await;
        self.nodes.push(Node {
            name: name.to_string(),
            proc,
            api,
        });
        self.nodes.len() - 1
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `audit-node produce` in the background, paced at `rate` records/s
    /// (0: as fast as it can).
    fn produce(&self, count: u64, rate: u32, seed: u64) -> tokio::task::JoinHandle<Produced> {
        let mut args = produce_args(&self.bootstrap, &self.topic, count, 0.02, 0.01, seed);
        if rate > 0 {
            args.extend(["--rate".into(), rate.to_string()]);
        }
        tokio::spawn(run_produce(args))
    }

    async fn stored(&self) -> Stored {
        stored(&self.pool, &self.group).await
    }

    /// Waits until at least `records` offsets are stored in all.
    async fn wait_stored_at_least(&self, records: i64) {
        wait_until(
            &format!("{records} records stored"),
            DEADLINE,
            || async move { self.stored().await.offsets >= records },
        )
        .await;
    }

    /// The last writer of each partition that has stored something.
    async fn writers(&self) -> BTreeMap<i32, String> {
        sqlx::query_as::<_, (i32, String)>(
            "SELECT partition, coalesce(updated_by, '') FROM consumer_offsets
             WHERE group_id = $1 AND next_offset > 0",
        )
        .bind(&self.group)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect()
    }

    /// Waits until at least two nodes have each written a partition last.
    async fn wait_both_writing(&self) {
        wait_until("two nodes writing", DEADLINE, || async move {
            let writers = self.writers().await;
            writers
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= 2
        })
        .await;
    }

    /// Waits until `node` is the last writer of one of `partitions`.
    async fn wait_taken_over(&self, partitions: &[i32], node: &str) {
        assert!(!partitions.is_empty(), "no partitions to take over");
        wait_until(
            &format!("{node} to take over one of {partitions:?}"),
            DEADLINE,
            || async move {
                let writers = self.writers().await;
                partitions
                    .iter()
                    .any(|p| writers.get(p).is_some_and(|n| n == node))
            },
        )
        .await;
    }

    /// Waits until `node` has committed a batch that started after `since`
    /// (a database timestamp): it consumes and writes again.
    async fn wait_writes_since(&self, node: &str, since: f64) {
        wait_until(&format!("{node} to write again"), DEADLINE, || async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM consumer_offsets
                     WHERE group_id = $1 AND updated_by = $2
                       AND extract(epoch FROM updated_at) > $3",
            )
            .bind(&self.group)
            .bind(node)
            .bind(since)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0);
            n > 0
        })
        .await;
    }

    /// Waits until `node` has started more partition actors than `before`
    /// (its log): it is a member of the group with partitions again.
    async fn wait_partitions_started(&mut self, node: &str, before: usize) {
        let node = self.node(node);
        let name = node.name.clone();
        let node = &*node;
        wait_until(
            &format!("{name} to be assigned partitions"),
            DEADLINE,
            || {
                let started = count_lines(node, &["partition actor started"]);
                async move { started > before }
            },
        )
        .await;
    }

    async fn db_now(&self) -> f64 {
        sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(&self.pool)
            .await
            .expect("database clock")
    }

    /// A request to the mock cluster's control API; panics unless 200.
    async fn control(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let (status, text) = http(&self.control, method, path, body)
            .await
            .unwrap_or_else(|e| panic!("control API {method} {path}: {e}"));
        assert_eq!(status, 200, "control API {method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    }

    /// Waits until the broker has answered every injected error of `api`.
    async fn wait_errors_consumed(&self, api: &str) {
        let path = format!("/brokers/1/request-errors?api={api}");
        let path = &path;
        wait_until(
            &format!("every injected {api} error returned"),
            DEADLINE,
            || async move { self.control("GET", path, None).await["pending"] == 0 },
        )
        .await;
    }

    /// Records in the topic's log: the sum of its partitions' high
    /// watermarks (the mock never truncates the start here: small volumes).
    async fn log_records(&self) -> u64 {
        let (bootstrap, topic) = (self.bootstrap.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer as _;
            let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("watermark client");
            (0..PARTITIONS)
                .map(|p| {
                    let (low, high) = consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .expect("watermarks");
                    assert_eq!(low, 0, "{topic}/{p}: the mock evicted records");
                    high as u64
                })
                .sum()
        })
        .await
        .expect("watermark task")
    }

    /// After a fault: every produced record exactly once, every chain
    /// verifies, every live node ready.
    async fn assert_recovered(&mut self, produced: Produced) {
        // The producer has all its acks, so the log must hold every record;
        // otherwise the broker lost some and no node can store them.
        let in_log = self.log_records().await;
        assert_eq!(
            in_log,
            produced.produced,
            "the mock's log holds {in_log} records but the producer had {} acknowledged: \
             records were lost before any node could read them (logs in {})",
            produced.produced,
            self.dir.display()
        );
        wait_all_stored(&self.pool, &self.group, produced, Duration::from_secs(240)).await;
        check_exactly_once(&self.pool, produced)
            .await
            .unwrap_or_else(|e| panic!("exactly once: {e} (logs in {})", self.dir.display()));
        self.assert_verifies().await;
        for node in &mut self.nodes {
            if node.proc.child.is_none() {
                continue;
            }
            assert!(
                node.proc.is_running(),
                "{} exited:\n{}",
                node.name,
                node.proc.log_text()
            );
            let api = node.api.clone();
            wait_until(&format!("{} ready", node.name), DEADLINE, || {
                let api = api.clone();
                async move { matches!(http(&api, "GET", "/readyz", None).await, Ok((200, _))) }
            })
            .await;
        }
    }

    /// `audit-node verify`: exit 0, and every stored event checked once.
    async fn assert_verifies(&self) {
        let output = tokio::process::Command::new(BIN)
            .args(["verify", "--database-url", &self.db.url, "--state-dir"])
            .arg(&self.state)
            .env("AUDIT_LOG", "warn")
            .output()
            .await
            .expect("run verify");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .expect("count events");
        assert!(
            output.status.success() && stdout.contains(&format!("verify: OK: {events} events")),
            "verify failed (expected {events} events):\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    async fn finish(mut self) {
        for node in &mut self.nodes {
            node.proc.kill9();
        }
        self.pool.close().await;
        if self.pg.is_none() {
            self.db.drop_database().await;
        }
        // AUDIT_TEST_KEEP_LOGS=1 keeps every process's log for a look.
        if std::env::var_os("AUDIT_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn sum(parts: &[Produced]) -> Produced {
    parts.iter().fold(
        Produced {
            produced: 0,
            valid: 0,
            invalid: 0,
            duplicates: 0,
        },
        |a, p| Produced {
            produced: a.produced + p.produced,
            valid: a.valid + p.valid,
            invalid: a.invalid + p.invalid,
            duplicates: a.duplicates + p.duplicates,
        },
    )
}

fn signal(node: &Node, signal: i32) {
    let pid = node.proc.child.as_ref().expect("node running").id();
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Waits for a log line containing `prefix`; returns the rest of the line.
async fn wait_for_line(proc: &Proc, prefix: &str) -> String {
    wait_for_line_after(proc, prefix, prefix).await
}

/// Waits for a log line containing `marker`; returns the word after `key`.
async fn wait_for_line_after(proc: &Proc, marker: &str, key: &str) -> String {
    let mut found = None;
    wait_until(
        &format!("`{marker}` in {}'s log", proc.name),
        Duration::from_secs(60),
        || {
            found = strip_ansi(&proc.log_text())
                .lines()
                .find(|l| l.contains(marker))
                .and_then(|l| l.split(key).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            let ok = found.is_some();
            async move { ok }
        },
    )
    .await;
    found.expect("found")
}

/// Lines of `node`'s log containing any of `markers`.
fn count_lines(node: &Node, markers: &[&str]) -> usize {
    node.proc
        .log_text()
        .lines()
        .filter(|l| markers.iter().any(|m| l.contains(m)))
        .count()
}

/// A minimal HTTP/1.0 client: (status, body). Times out, so a stopped
/// process (which accepts but never answers) cannot hang the test.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_owned()))
    };
    // Longer than the pool's acquire timeout (10 s), which bounds /readyz.
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| format!("{method} {addr}{path}: no answer within 20 s"))?
}

// ---------------------------------------------------------------------------
// Scenarios. Each comment is the failure timeline the test drives.
// ---------------------------------------------------------------------------

// Timeline: nodes a and b share 12 partitions, 20k records paced at
// 2500/s → a is `kill -9`'d mid-batch (its open transactions roll back, its
// group membership is left to expire) → after the KIP-848 session timeout
// the broker hands a's partitions to b, which resumes each from the offset
// stored in PostgreSQL (not Kafka's commit) → a restarts as a2 and takes
// partitions back → all records stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node() {
    let mut w = World::start().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let producer = w.produce(20_000, 2_500, 101);
    w.wait_stored_at_least(3_000).await;
    w.wait_both_writing().await;

    let owned_by_a: Vec<i32> = w
        .writers()
        .await
        .into_iter()
        .filter(|(_, n)| n == "a")
        .map(|(p, _)| p)
        .collect();
    w.node("a").proc.kill9();
    // b takes over a partition a had been writing.
    w.wait_taken_over(&owned_by_a, "b").await;
    let since = w.db_now().await;
    w.start_node("a2").await;
    w.wait_partitions_started("a2", 0).await;
    let produced = producer.await.expect("producer");
    let more = w.produce(3_000, 0, 102).await.expect("producer");
    w.wait_writes_since("a2", since).await;
    w.assert_recovered(sum(&[produced, more])).await;
    w.finish().await;
}

// Timeline: a and b ingesting → SIGSTOP a (frozen: no heartbeats, its
// database connections and any open transaction stay as they are) → the
// broker's 6 s session timeout expires, a's partitions go to b; a partition
// whose row a locked mid-transaction blocks b until a runs again → b writes
// a partition a had → SIGCONT a: a finishes its frozen batch (the offset
// compare-and-set fences whichever writer is behind), learns from its next
// heartbeat that it was fenced, loses its partitions and rejoins → a
// writes again → exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_session_timeout() {
    let mut w = World::start().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let producer = w.produce(24_000, 2_000, 201);
    w.wait_stored_at_least(3_000).await;
    w.wait_both_writing().await;

    let owned_by_a: Vec<i32> = w
        .writers()
        .await
        .into_iter()
        .filter(|(_, n)| n == "a")
        .map(|(p, _)| p)
        .collect();
    signal(w.node("a"), libc::SIGSTOP);
    w.wait_taken_over(&owned_by_a, "b").await;
    let since = w.db_now().await;
    let started = count_lines(w.node("a"), &["partition actor started"]);
    signal(w.node("a"), libc::SIGCONT);
    // Fenced out of the group while frozen: a rejoins and gets partitions anew.
    w.wait_partitions_started("a", started).await;
    let produced = producer.await.expect("producer");
    let more = w.produce(4_000, 0, 202).await.expect("producer");
    w.wait_writes_since("a", since).await;
    w.assert_recovered(sum(&[produced, more])).await;
    w.finish().await;
}

// Timeline: a and b ingesting into a private PostgreSQL server → the server
// crashes (`pg_ctl stop -m immediate`: every connection cut, no checkpoint)
// → in-flight transactions are lost, writes and the readiness ping fail:
// partitions pause and retry with backoff, /readyz answers 503 → both
// nodes have seen the outage → the server starts (crash recovery) → pools
// reconnect, each partition re-reads its stored offset, batches are
// retried → exact totals, both nodes still the same processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart() {
    let mut w = World::start_private_pg().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let producer = w.produce(20_000, 2_500, 301);
    w.wait_stored_at_least(3_000).await;

    let failures_before: usize = w
        .nodes
        .iter()
        .map(|n| count_lines(n, &["store write failed"]))
        .sum();
    w.pg.as_ref()
        .expect("private server")
        .stop_server("immediate");
    for i in 0..w.nodes.len() {
        let api = w.nodes[i].api.clone();
        wait_until(
            &format!("{} to report not ready", w.nodes[i].name),
            DEADLINE,
            || {
                let api = api.clone();
                async move { matches!(http(&api, "GET", "/readyz", None).await, Ok((503, _))) }
            },
        )
        .await;
    }
    wait_until("a write to fail", DEADLINE, || {
        let failures: usize = w
            .nodes
            .iter()
            .map(|n| count_lines(n, &["store write failed"]))
            .sum();
        async move { failures > failures_before }
    })
    .await;
    w.pg.as_ref().expect("private server").start_server();

    let produced = producer.await.expect("producer");
    w.assert_recovered(produced).await;
    w.finish().await;
}

// Timeline: a and b ingesting from the cluster's only broker → the broker
// goes down (connections closed, new ones refused): fetches, heartbeats
// and commits fail, the producer queues and retries → both nodes report
// every broker down, and the broker stays down past the 6 s session
// timeout → the broker comes back → clients reconnect, members whose
// session expired are fenced and rejoin, partitions resume from the
// offsets stored in PostgreSQL → both nodes write again → exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_up() {
    let mut w = World::start().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let producer = w.produce(20_000, 2_500, 401);
    w.wait_stored_at_least(3_000).await;

    let all_down = ["AllBrokersDown"];
    let before: Vec<usize> = w.nodes.iter().map(|n| count_lines(n, &all_down)).collect();
    let stored_at_down = w.stored().await.offsets;
    w.control("POST", "/brokers/1/down", None).await;
    let down_at = std::time::Instant::now();
    // The fault lasts until both nodes have lost every broker connection
    // and the group's session timeout has passed (the mock expires the
    // members meanwhile): a fault duration, not a synchronisation.
    wait_until(
        "both nodes to lose every broker, past the session timeout",
        DEADLINE,
        || {
            let seen = w
                .nodes
                .iter()
                .zip(&before)
                .all(|(n, b)| count_lines(n, &all_down) > *b);
            let long_enough = down_at.elapsed() > MOCK_SESSION_TIMEOUT + Duration::from_secs(1);
            async move { seen && long_enough }
        },
    )
    .await;
    w.control("POST", "/brokers/1/up", None).await;

    let produced = producer.await.expect("producer");
    assert!(
        (stored_at_down as u64) < produced.produced,
        "the outage happened mid-stream"
    );
    let since = w.db_now().await;
    let more = w.produce(3_000, 0, 402).await.expect("producer");
    w.wait_writes_since("a", since).await;
    w.wait_writes_since("b", since).await;
    w.assert_recovered(sum(&[produced, more])).await;
    w.finish().await;
}

// Timeline: a and b ingesting → the broker becomes slow (200 ms per
// response) and answers the next requests with errors: Fetch
// NOT_LEADER_FOR_PARTITION (metadata refresh, refetch) and twice a closed
// connection, OffsetCommit COORDINATOR_NOT_AVAILABLE and
// REBALANCE_IN_PROGRESS (our Kafka commit is informational: ignored),
// ConsumerGroupHeartbeat COORDINATOR_NOT_AVAILABLE (member rediscovers its
// coordinator) → every injected error is returned → the broker is fast
// again → exact totals.
// No Produce errors: the mock checks producer sequence numbers only for
// transactional producers, so after an injected Produce error a later
// pipelined batch is appended, librdkafka takes that as proof the failed one
// was persisted (it would be on a real broker), and the record is lost with
// a successful delivery report (docs/CHAOS.md, "The mock and Produce
// errors"). `assert_recovered` checks the log against the producer's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_request_errors_and_a_slow_broker() {
    let mut w = World::start().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let producer = w.produce(24_000, 2_000, 501);
    w.wait_stored_at_least(3_000).await;

    w.control("POST", "/brokers/1/rtt", Some(r#"{"rtt_ms": 200}"#))
        .await;
    let injections = [
        (
            "Fetch",
            r#"{"api": "Fetch", "errors": ["NOT_LEADER_FOR_PARTITION", "NOT_LEADER_FOR_PARTITION", "_TRANSPORT", "NOT_LEADER_FOR_PARTITION", "_TRANSPORT", "NOT_LEADER_FOR_PARTITION"]}"#,
        ),
        (
            "OffsetCommit",
            r#"{"api": "OffsetCommit", "errors": ["COORDINATOR_NOT_AVAILABLE", "REBALANCE_IN_PROGRESS", "COORDINATOR_NOT_AVAILABLE"]}"#,
        ),
        (
            "ConsumerGroupHeartbeat",
            r#"{"api": "ConsumerGroupHeartbeat", "errors": ["COORDINATOR_NOT_AVAILABLE"]}"#,
        ),
    ];
    for (api, body) in injections {
        let reply = w
            .control("POST", "/brokers/1/request-errors", Some(body))
            .await;
        assert!(reply["pending"].as_u64().unwrap_or(0) > 0, "{api}: {reply}");
    }
    for (api, _) in injections {
        w.wait_errors_consumed(api).await;
    }
    w.control("POST", "/brokers/1/rtt", Some(r#"{"rtt_ms": 0}"#))
        .await;

    let produced = producer.await.expect("producer");
    w.assert_recovered(produced).await;
    w.finish().await;
}

// Timeline: a and b share the partitions → a third node c joins (the group
// rebalances across three) → a and b leave gracefully (SIGTERM: in-flight
// batches finish, the consumers leave the group) → c owns every partition,
// and every partition's next batch is written by c → a2 and b2 join
// again, partitions spread back → exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_of_every_partition() {
    let mut w = World::start().await;
    w.start_node("a").await;
    w.start_node("b").await;
    let first = w.produce(12_000, 3_000, 601);
    w.wait_stored_at_least(2_000).await;

    let since = w.db_now().await;
    w.start_node("c").await;
    w.wait_writes_since("c", since).await;
    for name in ["a", "b"] {
        let status = w.node(name).proc.terminate();
        assert!(status.success(), "{name} did not stop cleanly: {status}");
    }
    let first = first.await.expect("producer");
    // Every partition gets records while c is alone: each must be c's.
    let second = w.produce(6_000, 0, 602).await.expect("producer");
    w.wait_all_stored_partial(sum(&[first, second])).await;
    let writers = w.writers().await;
    assert_eq!(writers.len(), PARTITIONS as usize, "{writers:?}");
    assert!(
        writers.values().all(|n| n == "c"),
        "every partition moved to c: {writers:?}"
    );

    let since = w.db_now().await;
    w.start_node("a2").await;
    w.start_node("b2").await;
    w.wait_partitions_started("a2", 0).await;
    w.wait_partitions_started("b2", 0).await;
    let third = w.produce(6_000, 0, 603).await.expect("producer");
    w.wait_writes_since("a2", since).await;
    w.wait_writes_since("b2", since).await;
    w.assert_recovered(sum(&[first, second, third])).await;
    w.finish().await;
}

impl World {
    /// Waits until `produced` records are stored, without the other checks.
    async fn wait_all_stored_partial(&self, produced: Produced) {
        wait_all_stored(&self.pool, &self.group, produced, Duration::from_secs(240)).await;
    }
}
