//! Test harness: the real `audit-node` binary as separate processes (so a
//! node can be `kill -9`'d), the mock Kafka cluster in its own process, and
//! a fresh PostgreSQL database per test. Random names, port 0, and polling
//! with deadlines instead of sleeps.
#![allow(dead_code)]

pub mod private_pg;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audit_ledger::testing::TestDatabase;
use rand::Rng;
use sqlx::PgPool;

pub const BIN: &str = env!("CARGO_BIN_EXE_audit-node");

pub fn random_name(prefix: &str) -> String {
    format!(
        "{prefix}-{:012x}",
        rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff
    )
}

pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(random_name("audit-test"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_dir: &std::path::Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args(args)
            .env("AUDIT_LOG", "info,librdkafka=warn,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn audit-node");
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// `kill -9`: no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().expect("wait")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `audit-node kafka-mock` in its own process.
pub struct MockKafka {
    pub proc: Proc,
    pub bootstrap: String,
}

impl MockKafka {
    pub async fn start(topic: &str, partitions: i32, dir: &std::path::Path) -> Self {
        let file = dir.join("bootstrap.txt");
        let proc = Proc::spawn(
            "kafka-mock",
            &[
                "kafka-mock".into(),
                "--brokers".into(),
                "1".into(),
                "--topic".into(),
                format!("{topic}:{partitions}"),
                "--bootstrap-file".into(),
                file.display().to_string(),
            ],
            dir,
        );
        wait_until(
            "the mock cluster's bootstrap file",
            Duration::from_secs(30),
            || {
                let exists = file.exists();
                async move { exists }
            },
        )
        .await;
        let bootstrap = std::fs::read_to_string(&file)
            .expect("bootstrap file")
            .trim()
            .to_string();
        Self { proc, bootstrap }
    }
}

/// What `audit-node produce` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub produced: u64,
    pub valid: u64,
    pub invalid: u64,
    pub duplicates: u64,
}

pub fn produce_args(
    bootstrap: &str,
    topic: &str,
    count: u64,
    invalid: f64,
    duplicate: f64,
    seed: u64,
) -> Vec<String> {
    vec![
        "produce".into(),
        "--brokers".into(),
        bootstrap.into(),
        "--topic".into(),
        topic.into(),
        "--count".into(),
        count.to_string(),
        "--invalid-ratio".into(),
        invalid.to_string(),
        "--duplicate-ratio".into(),
        duplicate.to_string(),
        "--seed".into(),
        seed.to_string(),
    ]
}

/// Runs `audit-node produce` to completion and parses its last stdout line.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    count: u64,
    invalid: f64,
    duplicate: f64,
    seed: u64,
) -> Produced {
    run_produce(produce_args(
        bootstrap, topic, count, invalid, duplicate, seed,
    ))
    .await
}

/// Runs `audit-node produce` with `args` and returns its summary line.
pub async fn run_produce(args: Vec<String>) -> Produced {
    let output = tokio::process::Command::new(BIN)
        .args(&args)
        .env("AUDIT_LOG", "warn")
        .output()
        .await
        .expect("run produce");
    assert!(
        output.status.success(),
        "produce failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().expect("a summary line");
    let v: serde_json::Value = serde_json::from_str(last).expect("summary is JSON");
    let get = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("summary lacks {k}: {last}"))
    };
    let p = Produced {
        produced: get("produced"),
        valid: get("valid"),
        invalid: get("invalid"),
        duplicates: get("duplicates"),
    };
    assert_eq!(p.produced, p.valid + p.invalid + p.duplicates);
    p
}

/// `audit-node keys init --state-dir DIR`: the keys every node of one test
/// shares (KEK file, checkpoint signing key) and the published checkpoints.
pub fn init_state_dir(dir: &std::path::Path) -> PathBuf {
    let state = dir.join("state");
    let output = Command::new(BIN)
        .args(["keys", "init", "--state-dir"])
        .arg(&state)
        .env("AUDIT_LOG", "warn")
        .output()
        .expect("run keys init");
    assert!(
        output.status.success(),
        "keys init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    state
}

pub fn run_args(
    bootstrap: &str,
    topic: &str,
    group: &str,
    db: &TestDatabase,
    node_id: &str,
    state: &std::path::Path,
) -> Vec<String> {
    vec![
        "run".into(),
        "--brokers".into(),
        bootstrap.into(),
        "--topics".into(),
        topic.into(),
        "--group-id".into(),
        group.into(),
        "--database-url".into(),
        db.url.clone(),
        "--node-id".into(),
        node_id.into(),
        "--api-addr".into(),
        "127.0.0.1:0".into(),
        // KIP-848: fast joins and hand-overs on the mock cluster.
        "--group-protocol".into(),
        "consumer".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    pub events: i64,
    pub dead_letters: i64,
    pub duplicates: i64,
    /// Sum of the stored next offsets of the group: records accounted for.
    pub offsets: i64,
}

pub async fn stored(pool: &PgPool, group: &str) -> Stored {
    let (events, dead_letters, duplicates, offsets): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM dead_letters),
                (SELECT count(*) FROM duplicates),
                (SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE group_id = $1)",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .unwrap_or((0, 0, 0, 0));
    Stored {
        events,
        dead_letters,
        duplicates,
        offsets,
    }
}

/// Waits until the group's stored offsets cover every produced record.
pub async fn wait_all_stored(pool: &PgPool, group: &str, produced: Produced, timeout: Duration) {
    wait_until("all records stored", timeout, || async move {
        stored(pool, group).await.offsets == produced.produced as i64
    })
    .await;
}

/// The exactly-once invariant over the whole store: every offset of every
/// partition is in exactly one of the three tables, no gaps, no overlaps,
/// and no event_id twice.
pub async fn check_exactly_once(pool: &PgPool, expected: Produced) -> Result<(), String> {
    const ALL_OFFSETS: &str = "WITH all_offsets AS (
             -- System events (erasures, audited reads) have no Kafka position.
             SELECT kafka_topic, kafka_partition, kafka_offset FROM events WHERE kafka_topic IS NOT NULL
             UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset FROM dead_letters
             UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset FROM duplicates)";
    let (rows, distinct_positions): (i64, i64) = sqlx::query_as(&format!(
        "{ALL_OFFSETS} SELECT count(*), count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) FROM all_offsets"
    ))
    .fetch_one(pool)
    .await
    .map_err(|e| e.to_string())?;
    if rows != distinct_positions {
        // Say where: each doubled position and the tables holding it.
        let doubled: Vec<(String, i32, i64, String)> = sqlx::query_as(
            "WITH all_offsets AS (
                 SELECT kafka_topic, kafka_partition, kafka_offset, 'events' AS t FROM events
                 WHERE kafka_topic IS NOT NULL
                 UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset, 'dead_letters' FROM dead_letters
                 UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset, 'duplicates' FROM duplicates)
             SELECT kafka_topic, kafka_partition, kafka_offset, string_agg(t, ',')
             FROM all_offsets GROUP BY 1, 2, 3 HAVING count(*) > 1 LIMIT 10",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        return Err(format!(
            "{} offsets are stored more than once: {doubled:?}",
            rows - distinct_positions
        ));
    }
    // Offsets are dense from 0 in each partition: max + 1 == count.
    let holes: i64 = sqlx::query_scalar(&format!(
        "{ALL_OFFSETS} SELECT coalesce(sum(gap), 0)::bigint FROM (
             SELECT max(kafka_offset) + 1 - count(*) AS gap FROM all_offsets
             GROUP BY kafka_topic, kafka_partition) g"
    ))
    .fetch_one(pool)
    .await
    .map_err(|e| e.to_string())?;
    if holes != 0 {
        return Err(format!(
            "{holes} offsets are missing (holes in a partition)"
        ));
    }
    let ids: (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM events")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    if ids.0 != ids.1 {
        return Err(format!("{} event_ids are stored twice", ids.0 - ids.1));
    }
    let got = (
        ids.0 as u64,
        count(pool, "dead_letters").await?,
        count(pool, "duplicates").await?,
    );
    let want = (expected.valid, expected.invalid, expected.duplicates);
    if got != want {
        return Err(format!(
            "stored (events, dead_letters, duplicates) = {got:?}, produced (valid, invalid, duplicates) = {want:?}"
        ));
    }
    Ok(())
}

async fn count(pool: &PgPool, table: &str) -> Result<u64, String> {
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n as u64)
}

/// One test's world: a mock Kafka cluster with a random topic, a random
/// consumer group, a fresh database and a pool on it as its owner, and one
/// state directory (keys, published checkpoints) shared by all its nodes.
pub struct Harness {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub topic: String,
    pub group: String,
    pub kafka: MockKafka,
    pub db: TestDatabase,
    pub pool: PgPool,
}

impl Harness {
    pub async fn start(partitions: i32) -> Self {
        let dir = scratch_dir();
        let state = init_state_dir(&dir);
        let topic = random_name("orders");
        let group = random_name("group");
        let kafka = MockKafka::start(&topic, partitions, &dir).await;
        let db = TestDatabase::create().await.expect("test database");
        let pool = admin_pool(&db).await;
        Self {
            dir,
            state,
            topic,
            group,
            kafka,
            db,
            pool,
        }
    }

    /// `audit-node run` in this world.
    pub fn node(&self, node_id: &str) -> Proc {
        Proc::spawn(node_id, &self.run_args(node_id), &self.dir)
    }

    /// The flags of `audit-node run` in this world, to extend.
    pub fn run_args(&self, node_id: &str) -> Vec<String> {
        run_args(
            &self.kafka.bootstrap,
            &self.topic,
            &self.group,
            &self.db,
            node_id,
            &self.state,
        )
    }

    pub async fn produce(&self, count: u64, invalid: f64, duplicate: f64, seed: u64) -> Produced {
        produce(
            &self.kafka.bootstrap,
            &self.topic,
            count,
            invalid,
            duplicate,
            seed,
        )
        .await
    }

    pub async fn wait_all_stored(&self, produced: Produced, timeout: Duration) {
        wait_all_stored(&self.pool, &self.group, produced, timeout).await;
    }

    /// `audit-node verify` with this world's keys and published
    /// checkpoints; panics with its report unless every chain verifies.
    pub async fn assert_verifies(&self) {
        let output = tokio::process::Command::new(BIN)
            .args(["verify", "--database-url", &self.db.url, "--state-dir"])
            .arg(&self.state)
            .env("AUDIT_LOG", "warn")
            .output()
            .await
            .expect("run verify");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("verify: OK"),
            "verify failed:\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Every stored event was checked, once.
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .expect("count events");
        assert!(
            stdout.contains(&format!("verify: OK: {events} events")),
            "verify checked a different number of events than the {events} stored:\n{stdout}"
        );
    }

    pub async fn finish(self) {
        self.pool.close().await;
        self.db.drop_database().await;
    }
}

pub async fn admin_pool(db: &TestDatabase) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("connect to the test database")
}
