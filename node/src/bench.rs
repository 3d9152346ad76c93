//! `audit-node bench ingest`: end-to-end ingest throughput next to the
//! physical ceiling measured in the same run: parallel COPY of the same rows
//! into the same schema (../shared/notes/postgres-ceiling.md).
//!
//! Not a timed test: it reports numbers for docs/PERFORMANCE.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use audit_ledger::store::postgres::{
    self, local_database_url, COPY_BINARY_HEADER, COPY_BINARY_TRAILER, COPY_EVENTS,
    COPY_EVENTS_BINARY,
};
use rand::Rng;
use sqlx::{ConnectOptions, Connection};

use crate::settings::{FileConfig, Identity, NodeSettings, Tuning};
use crate::{mock, node, produce, traffic};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Produce N events, ingest them through a node, and COPY the same rows.
    Ingest(IngestArgs),
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// Events to produce and ingest.
    #[arg(long, env = "AUDIT_BENCH_EVENTS", default_value_t = 200_000)]
    pub events: u64,
    /// Partitions of the bench topic; default: enough that the mock
    /// cluster's retention (~5 MiB per partition) never evicts a record.
    #[arg(long, env = "AUDIT_BENCH_PARTITIONS")]
    pub partitions: Option<i32>,
    /// Parallel COPY streams of the ceiling; default: the number of cores.
    #[arg(long, env = "AUDIT_BENCH_COPY_STREAMS")]
    pub copy_streams: Option<usize>,
    /// Rows per COPY transaction of the ceiling.
    #[arg(long, env = "AUDIT_BENCH_COPY_BATCH", default_value_t = 5000)]
    pub copy_batch: usize,
    /// Server URL for the two scratch databases (created, then dropped);
    /// default: the local server's Unix socket.
    #[arg(long, env = "AUDIT_BENCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Keep the scratch databases for inspection.
    #[arg(long, env = "AUDIT_BENCH_KEEP_DATABASES")]
    pub keep_databases: bool,
    /// Ingest without field encryption (to measure what protection costs).
    #[arg(long, env = "AUDIT_BENCH_NO_PROTECTION")]
    pub no_protection: bool,
    #[arg(long, env = "AUDIT_BENCH_SEED", default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Ingest(args) => ingest(args).await,
    }
}

#[derive(serde::Serialize)]
struct Report {
    events: u64,
    partitions: i32,
    ingest_seconds: f64,
    ingest_events_per_s: f64,
    copy_streams: usize,
    copy_batch: usize,
    copy_seconds: f64,
    copy_rows_per_s: f64,
    ratio: f64,
    /// CPU per event in each phase: this process (node and mock cluster,
    /// or the COPY client) and the rest of the machine (PostgreSQL).
    ingest_process_cpu_us: f64,
    ingest_other_cpu_us: f64,
    ingest_busy: f64,
    copy_process_cpu_us: f64,
    copy_other_cpu_us: f64,
    copy_busy: f64,
    /// From the node's start to the first durable batch, as the 50 ms
    /// progress poll saw it.
    first_durable_ms: Option<f64>,
}

/// Producer linger of the benchmark's bulk load (PERFORMANCE.md, session 8).
const BULK_LINGER_MS: u32 = 100;

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let copy_streams = args.copy_streams.unwrap_or(cores).max(1);
    // ~900 bytes a record on the wire; keep each partition under 3 MiB.
    let partitions = args
        .partitions
        .unwrap_or_else(|| ((args.events * 900).div_ceil(3 * 1024 * 1024) as i32).max(16));
    let suffix: u32 = rand::thread_rng().gen();
    let ingest_db = database_url(
        &args.database_url,
        &format!("audit_bench_{suffix:08x}_ingest"),
    );
    let copy_db = database_url(
        &args.database_url,
        &format!("audit_bench_{suffix:08x}_copy"),
    );
    for url in [&ingest_db, &copy_db] {
        postgres::create_database_if_missing(url).await?;
        postgres::migrate(url).await?;
        no_autovacuum(url).await;
    }

    let topic = "bench";
    let cluster = mock::start(
        1,
        &[mock::TopicSpec {
            name: topic.into(),
            partitions,
        }],
    )?;
    let bootstrap = cluster.bootstrap().to_string();

    eprintln!(
        "bench: producing {} events to {partitions} partitions",
        args.events
    );
    // Batches of about a record each (5 ms linger over hundreds of
    // partitions) made the mock broker, which finds a fetch's offset by
    // walking the partition's batches one by one, a fifth of this
    // process's CPU at 1M events; a real broker looks offsets up in an
    // index. Larger batches keep the harness's cost out of the ingest's.
    let producer = produce::create_producer_lingering(&bootstrap, BULK_LINGER_MS)?;
    let mut generator = traffic::TrafficGenerator::new(args.seed, 0.0, 0.0);
    produce::produce_stream(
        &producer,
        topic,
        &mut generator,
        Some(args.events),
        None,
        std::future::pending(),
    )
    .await?;
    produce::flush(&producer, Duration::from_secs(60)).await?;
    drop(producer);

    eprintln!("bench: ingesting through a node");
    let settings = NodeSettings::resolve(
        Identity {
            brokers: &bootstrap,
            topics: vec![topic.into()],
            group_id: "bench",
            database_url: &ingest_db,
            node_id: "bench".into(),
            default_group_protocol: "consumer",
        },
        &args.tuning,
        FileConfig::default(),
    )?;
    // Keys of a throwaway state directory: the production path encrypts.
    let state = std::env::temp_dir().join(format!("audit-bench-{suffix:08x}"));
    let protection = if args.no_protection {
        None
    } else {
        crate::keys::init_state_dir(&state)?;
        let keys = crate::keys::KeyArgs {
            state_dir: Some(state.clone()),
            kek_provider: "file".into(),
            ..Default::default()
        };
        Some(crate::keys::build_protection(
            &keys,
            &crate::keys::ProtectionArgs {
                policy: None,
                checkpoint_every: 10_000,
                checkpoint_interval_secs: 60,
            },
            "bench",
        )?)
    };
    checkpoint(&ingest_db).await;
    let cpu_before = CpuReading::now();
    let started = Instant::now();
    let running = node::start(
        NodeSettings {
            migrate: false,
            protection,
            ..settings
        },
        None,
    )
    .await?;
    let pool = running.store.pool().clone();
    let mut last = (0i64, Instant::now());
    let mut first_durable = None;
    loop {
        let stored: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE group_id = 'bench'",
        )
        .fetch_one(&pool)
        .await?;
        if stored > 0 && first_durable.is_none() {
            first_durable = Some(started.elapsed());
        }
        if stored as u64 >= args.events {
            break;
        }
        if stored > last.0 {
            last = (stored, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            anyhow::bail!(
                "ingestion stalled at {stored} of {} events for 60s; see the node's log above",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    if let Some(first) = first_durable {
        eprintln!(
            "bench: first batch durable {:.0} ms after the node started (startup: group join, assignment, seeks; polled every 50 ms)",
            first.as_secs_f64() * 1000.0
        );
    }
    let ingest_cpu = PhaseCpu::since(&cpu_before);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        events as u64 == args.events,
        "ingested {events} events, expected {}",
        args.events
    );
    running.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    let _ = std::fs::remove_dir_all(&state);

    // The ceiling's rows: exactly the rows the node stored (ciphertext,
    // hashes and all), read back before the clock starts.
    eprintln!("bench: reading the stored rows back for the ceiling");
    let chunks = Arc::new(stored_chunks(&ingest_db, args.copy_batch).await?);

    eprintln!("bench: ceiling: COPY with {copy_streams} parallel streams");
    checkpoint(&copy_db).await;
    let cpu_before = CpuReading::now();
    let copy_seconds = copy_ceiling(&copy_db, chunks, copy_streams).await?;
    let copy_cpu = PhaseCpu::since(&cpu_before);

    if !args.keep_databases {
        for url in [&ingest_db, &copy_db] {
            postgres::drop_database(url).await;
        }
    }
    let n = args.events as f64;
    let report = Report {
        events: args.events,
        partitions,
        ingest_seconds,
        ingest_events_per_s: n / ingest_seconds,
        copy_streams,
        copy_batch: args.copy_batch,
        copy_seconds,
        copy_rows_per_s: n / copy_seconds,
        ratio: copy_seconds / ingest_seconds,
        ingest_process_cpu_us: ingest_cpu.process * 1e6 / n,
        ingest_other_cpu_us: ingest_cpu.other() * 1e6 / n,
        ingest_busy: ingest_cpu.busy(),
        copy_process_cpu_us: copy_cpu.process * 1e6 / n,
        copy_other_cpu_us: copy_cpu.other() * 1e6 / n,
        copy_busy: copy_cpu.busy(),
        first_durable_ms: first_durable.map(|d| d.as_secs_f64() * 1000.0),
    };
    println!(
        "ingest: {:.0} events/s ({} events in {:.2}s)\nceiling: {:.0} rows/s (COPY, {} streams, {} rows per transaction, {:.2}s)\nratio ingest/ceiling: {:.2}",
        report.ingest_events_per_s, report.events, report.ingest_seconds, report.copy_rows_per_s, report.copy_streams,
        report.copy_batch, report.copy_seconds, report.ratio
    );
    println!(
        "CPU per event: ingest {:.1} µs in this process (node, mock cluster) + {:.1} µs elsewhere (PostgreSQL), cores {:.0}% busy\n\
         CPU per row:   COPY {:.1} µs in this process (client) + {:.1} µs elsewhere (PostgreSQL), cores {:.0}% busy",
        report.ingest_process_cpu_us, report.ingest_other_cpu_us, report.ingest_busy * 100.0,
        report.copy_process_cpu_us, report.copy_other_cpu_us, report.copy_busy * 100.0
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn database_url(server: &Option<String>, name: &str) -> String {
    match server {
        None => local_database_url(name),
        Some(url) => {
            let (base, query) = url
                .split_once('?')
                .map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
            let scheme_end = base.find("://").map_or(0, |i| i + 3);
            let base = base[scheme_end..]
                .find('/')
                .map_or(base, |i| &base[..scheme_end + i]);
            query.map_or(format!("{base}/{name}"), |q| format!("{base}/{name}?{q}"))
        }
    }
}

/// Forces a checkpoint, so that each phase starts with none pending: one
/// triggered by the WAL of the phase before would otherwise land in the
/// next and slow it (its spread writes, then full-page images of every
/// page touched again). Needs superuser or `pg_checkpoint`; without them
/// the phases run as they come, with a warning.
async fn checkpoint(url: &str) {
    if let Err(error) = run_statement(url, "CHECKPOINT").await {
        eprintln!("bench: no CHECKPOINT before the phase ({error:#}); a checkpoint may land in either phase");
    }
}

/// Runs one statement on a connection of its own.
async fn run_statement(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut conn = postgres::connect_options(url)?.connect().await?;
    sqlx::query(sql).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Turns autovacuum off for every table of a scratch database. Its ANALYZE
/// of a table that grew by a tenth starts when the launcher next visits the
/// database, so it fell in one phase or the other at random: in profiles it
/// took about 12% of PostgreSQL's CPU in the phase it hit (about 5 µs an
/// event), while the COPY and the node's statements cost the same per row in
/// both phases. It is maintenance the same rows cost however they are
/// written, so neither phase pays it. Needs ownership of the tables (the
/// bench creates them); otherwise it warns and the phases run as they come.
async fn no_autovacuum(url: &str) {
    let result = run_statement(
        url,
        "DO $$
             DECLARE t record;
             BEGIN
               FOR t IN SELECT n.nspname, c.relname FROM pg_class c
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.relkind = 'r'
                          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                          AND n.nspname NOT LIKE 'pg_toast%'
               LOOP
                 EXECUTE format('ALTER TABLE %I.%I SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)',
                                t.nspname, t.relname);
               END LOOP;
             END $$",
    )
    .await;
    if let Err(error) = result {
        eprintln!("bench: autovacuum left on ({error:#}); its ANALYZE may land in either phase");
    }
}

/// Every stored row of `events` and `event_ids` in COPY's binary format (as
/// the node writes events), in chunks of `batch` events (each chunk: those
/// events and their ids, each a complete COPY stream).
async fn stored_chunks(url: &str, batch: usize) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use futures::TryStreamExt as _;
    let mut conn = postgres::connect_options(url)?.connect().await?;
    async fn read(conn: &mut sqlx::PgConnection, sql: String) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut stream = conn.copy_out_raw(&sql).await?;
        while let Some(bytes) = stream.try_next().await? {
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }
    let columns = COPY_EVENTS
        .trim_start_matches("COPY events (")
        .trim_end_matches(") FROM STDIN")
        .to_string();
    let events = read(
        &mut conn,
        format!(
            "COPY (SELECT {columns} FROM events ORDER BY kafka_partition, kafka_offset) TO STDOUT (FORMAT binary)"
        ),
    )
    .await?;
    let ids = read(
        &mut conn,
        "COPY (SELECT e.* FROM event_ids e ORDER BY kafka_partition, kafka_offset) TO STDOUT (FORMAT binary)"
            .into(),
    )
    .await?;
    let _ = conn.close().await;
    let (events, ids) = (binary_chunks(&events, batch)?, binary_chunks(&ids, batch)?);
    anyhow::ensure!(
        events.len() == ids.len(),
        "events and event_ids differ in size"
    );
    Ok(events.into_iter().zip(ids).collect())
}

/// Splits one binary COPY stream into streams of `batch` rows each.
fn binary_chunks(stream: &[u8], batch: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let read_i32 = |at: usize| -> anyhow::Result<i32> {
        let bytes = stream
            .get(at..at + 4)
            .context("binary COPY stream cut short")?;
        Ok(i32::from_be_bytes(bytes.try_into()?))
    };
    anyhow::ensure!(
        stream.starts_with(&COPY_BINARY_HEADER[..11]),
        "not a binary COPY stream"
    );
    // Signature (11 bytes), flags, then the header extension's length.
    let mut at = 19 + usize::try_from(read_i32(15)?)?;
    let mut rows = Vec::new();
    loop {
        let count = stream
            .get(at..at + 2)
            .context("binary COPY stream cut short")?;
        let count = i16::from_be_bytes(count.try_into()?);
        if count == -1 {
            break;
        }
        let start = at;
        at += 2;
        for _ in 0..count {
            let len = read_i32(at)?;
            at += 4 + usize::try_from(len.max(0))?;
        }
        rows.push(start..at);
    }
    Ok(rows
        .chunks(batch.max(1))
        .map(|chunk| {
            let mut out = COPY_BINARY_HEADER.to_vec();
            out.extend_from_slice(&stream[chunk[0].start..chunk[chunk.len() - 1].end]);
            out.extend_from_slice(COPY_BINARY_TRAILER);
            out
        })
        .collect())
}

fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU time in seconds: this process's (user and system), and the
/// machine's from /proc/stat, busy (everything but idle and I/O wait) and
/// total.
struct CpuReading {
    process: f64,
    busy: f64,
    total: f64,
}

impl CpuReading {
    fn now() -> Self {
        let ticks = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let line = stat.lines().next()?.strip_prefix("cpu ")?.to_string();
                Some(
                    line.split_whitespace()
                        .filter_map(|t| t.parse::<f64>().ok())
                        .collect::<Vec<_>>(),
                )
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal ...; guest time is
        // already in user.
        let total: f64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Self {
            process: process_cpu_seconds(),
            busy: (total - idle) / hz,
            total: total / hz,
        }
    }
}

/// CPU used during one phase of the benchmark.
struct PhaseCpu {
    process: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl PhaseCpu {
    fn since(before: &CpuReading) -> Self {
        let now = CpuReading::now();
        Self {
            process: now.process - before.process,
            machine_busy: now.busy - before.busy,
            machine_total: now.total - before.total,
        }
    }

    /// CPU of every other process (here: PostgreSQL).
    fn other(&self) -> f64 {
        (self.machine_busy - self.process).max(0.0)
    }

    /// Share of the machine's cores that were busy.
    fn busy(&self) -> f64 {
        if self.machine_total > 0.0 {
            self.machine_busy / self.machine_total
        } else {
            0.0
        }
    }
}

/// COPY every chunk with `streams` connections in parallel, one transaction
/// per chunk plus one offsets-table update (the shape of a node's batch).
async fn copy_ceiling(
    url: &str,
    chunks: Arc<Vec<(Vec<u8>, Vec<u8>)>>,
    streams: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut connections = Vec::new();
    for _ in 0..streams {
        connections.push(
            postgres::connect_options(url)?
                .connect()
                .await
                .context("ceiling connection")?,
        );
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (stream, mut conn) in connections.into_iter().enumerate() {
        let chunks = chunks.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((events, ids)) = chunks.get(i) else { break };
                let mut tx = conn.begin().await?;
                let mut copy = tx.copy_in_raw(COPY_EVENTS_BINARY).await?;
                copy.send(events.as_slice()).await?;
                copy.finish().await?;
                let mut copy = tx.copy_in_raw("COPY event_ids FROM STDIN (FORMAT binary)").await?;
                copy.send(ids.as_slice()).await?;
                copy.finish().await?;
                sqlx::query(
                    "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ('ceiling', 'bench', $1, $2)
                     ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                )
                .bind(stream as i32)
                .bind(i as i64)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            let _ = conn.close().await;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}
