//! Operator commands on the data-protection and integrity side:
//! `keys`, `subjects erase`, `events show` and `verify`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use audit_ledger::checkpoint::CheckpointDir;
use audit_ledger::protect::{self, KeyLookup, KeyProvider, LocalKeyFile, WrappedKey};
use audit_ledger::store::checkpointer::insert_checkpoint;
use audit_ledger::store::postgres::redact_url;
use audit_ledger::store::system::erase_subject;
use audit_ledger::verify::{verify, VerifyOptions};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::keys::{init_state_dir, KeyArgs};

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a state directory's keys: KEK file, blind-index key, checkpoint signing key pair.
    Init {
        /// Directory to create the keys in (keys/ and checkpoints/ below it).
        #[arg(long, env = "AUDIT_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Add a new KEK version, make it current, and re-wrap every data key under it (events stay untouched).
    Rotate {
        #[command(flatten)]
        keys: KeyArgs,
        /// PostgreSQL URL of a role that may update subject_keys (audit_admin).
        #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Retire an old KEK version once no data key is wrapped under it.
    Retire {
        /// The KEK version to retire, e.g. v1.
        version: String,
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum SubjectsCommand {
    /// Crypto-shred a data subject: destroy its data key, record the erasure. Irreversible.
    Erase {
        /// The data subject's id (the events' subject_id).
        subject_id: String,
        /// Why (e.g. the erasure request's reference); stored in the erasure event.
        #[arg(long, env = "AUDIT_ERASE_REASON")]
        reason: String,
        /// Who requests it; default: the OS user.
        #[arg(long = "by", env = "AUDIT_ACTOR")]
        by: Option<String>,
        #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum EventsCommand {
    /// Print one event as JSON; with --decrypt, its protected fields decrypted (or marked erased).
    Show {
        event_id: Uuid,
        /// Decrypt protected fields (needs the key-encryption keys).
        #[arg(long)]
        decrypt: bool,
        #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[command(flatten)]
    keys: KeyArgs,
    /// Report at most this many problems.
    #[arg(long, env = "AUDIT_VERIFY_MAX_PROBLEMS", default_value_t = 20)]
    max_problems: usize,
    /// Parallel workers, each with its own database connection; default: cores + 1.
    #[arg(long, env = "AUDIT_VERIFY_WORKERS")]
    workers: Option<usize>,
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    connect_with(url, 2).await
}

async fn connect_with(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    let options = audit_ledger::store::postgres::connect_options(url)?;
    PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}: is it running and does the role exist?",
                redact_url(url)
            )
        })
}

fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Init { state_dir } => {
            let created = init_state_dir(&state_dir)?;
            if created.is_empty() {
                println!(
                    "keys already present in {}; nothing created",
                    state_dir.display()
                );
            }
            for path in created {
                println!("created {}", path.display());
            }
            Ok(())
        }
        KeysCommand::Rotate { keys, database_url } => {
            let path = keys
                .key_file_path()
                .context("rotation needs the local key file: pass --key-file or --state-dir")?;
            let version = LocalKeyFile::rotate(&path)
                .with_context(|| format!("rotating the KEK in {}", path.display()))?;
            let provider = keys.provider()?;
            let pool = connect(&database_url).await?;
            let n = rewrap_all(&pool, provider.as_ref()).await?;
            println!("current KEK version is now {version}; re-wrapped {n} data keys");
            Ok(())
        }
        KeysCommand::Retire {
            version,
            keys,
            database_url,
        } => {
            let path = keys
                .key_file_path()
                .context("retiring needs the local key file: pass --key-file or --state-dir")?;
            let pool = connect(&database_url).await?;
            let still: i64 =
                sqlx::query_scalar("SELECT count(*) FROM subject_keys WHERE kek_version = $1")
                    .bind(&version)
                    .fetch_one(&pool)
                    .await?;
            if still > 0 {
                anyhow::bail!(
                    "{still} data keys are still wrapped under KEK {version}; run `audit-node keys rotate` first"
                );
            }
            LocalKeyFile::retire(&path, &version)
                .with_context(|| format!("retiring {version} in {}", path.display()))?;
            println!("KEK {version} retired");
            Ok(())
        }
    }
}

/// Re-wraps every data key not wrapped under the current KEK version.
async fn rewrap_all(pool: &PgPool, provider: &dyn KeyProvider) -> anyhow::Result<u64> {
    let current = provider.current_version();
    let rows = sqlx::query(
        "SELECT key_id, kek_version, wrapped_key FROM subject_keys WHERE kek_version <> $1",
    )
    .bind(&current)
    .fetch_all(pool)
    .await?;
    let mut n = 0;
    for row in rows {
        let key_id: Uuid = row.try_get(0)?;
        let wrapped = WrappedKey {
            key_id: key_id.to_string(),
            kek_version: row.try_get(1)?,
            ciphertext: row.try_get(2)?,
        };
        let rewrapped = protect::rewrap(provider, &wrapped)
            .await
            .with_context(|| format!("re-wrapping data key {key_id}"))?;
        // Conditional: an erasure meanwhile deleted the row, and stays.
        n += sqlx::query(
            "UPDATE subject_keys SET kek_version = $2, wrapped_key = $3, rewrapped_at = now()
             WHERE key_id = $1 AND kek_version = $4",
        )
        .bind(key_id)
        .bind(&rewrapped.kek_version)
        .bind(&rewrapped.ciphertext)
        .bind(&wrapped.kek_version)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(n)
}

pub async fn subjects(command: SubjectsCommand) -> anyhow::Result<()> {
    let SubjectsCommand::Erase {
        subject_id,
        reason,
        by,
        database_url,
        keys,
    } = command;
    let pool = connect(&database_url).await?;
    let by = by.unwrap_or_else(os_user);
    let (erasure, head) = erase_subject(&pool, &subject_id, &reason, &by).await?;
    if erasure.already_erased {
        println!(
            "subject {subject_id} was already erased at {} (event {}); nothing to do",
            erasure.erased_at.to_rfc3339(),
            erasure.event_id
        );
        return Ok(());
    }
    // Checkpoint the system chain so the erasure event is covered at once.
    if let (Some(head), Some(_)) = (head, keys.signing_key_path()) {
        let signing = keys.signing()?;
        let checkpoint = signing.sign(&head.chain_id, head.length, head.root(), Utc::now());
        insert_checkpoint(&pool, &checkpoint, &by).await?;
        if let Some(dir) = keys.checkpoint_dir()? {
            dir.publish(&checkpoint)?;
        }
    }
    println!(
        "erased subject {subject_id}: data key {} destroyed; erasure recorded as event {} (audit.subject_erased)",
        erasure
            .key_id
            .map(|k| k.to_string())
            .unwrap_or_else(|| "(none existed)".into()),
        erasure.event_id
    );
    if !erasure.vacuumed {
        println!(
            "note: this role may not VACUUM subject_keys; the deleted row stays in the table file until autovacuum (run VACUUM subject_keys as its owner to remove it now)"
        );
    }
    Ok(())
}

pub async fn events(command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Show {
        event_id,
        decrypt,
        database_url,
        keys,
    } = command;
    let pool = connect(&database_url).await?;
    let row = sqlx::query(
        "SELECT seq, event_id, event_type, stream_id, stream_version, occurred_at, ingested_at, source,
                correlation_id, causation_id, subject_id, payload, metadata, headers,
                kafka_topic, kafka_partition, kafka_offset, chain_id, chain_position, hash
         FROM events WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(&pool)
    .await?
    .ok_or_else(|| anyhow::anyhow!("no event {event_id} in {}", redact_url(&database_url)))?;
    let mut payload: Value = row.try_get("payload")?;
    if decrypt {
        let provider = keys.provider()?;
        let ids = protect::key_ids(&payload);
        let mut found: HashMap<String, protect::DataKey> = HashMap::new();
        let mut erased: Vec<String> = Vec::new();
        for kid in ids {
            let Ok(key_id) = Uuid::parse_str(&kid) else {
                continue;
            };
            match load_key(&pool, provider.as_ref(), key_id).await? {
                Some(key) => {
                    found.insert(kid, key);
                }
                None => {
                    let was_erased: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM erased_subjects WHERE key_id = $1)",
                    )
                    .bind(key_id)
                    .fetch_one(&pool)
                    .await?;
                    if was_erased {
                        erased.push(kid);
                    }
                }
            }
        }
        let lookup = |kid: &str| match found.get(kid) {
            Some(key) => KeyLookup::Found(key),
            None if erased.iter().any(|e| e == kid) => KeyLookup::Erased,
            None => KeyLookup::Missing,
        };
        protect::reveal_payload(&mut payload, event_id, &lookup)
            .with_context(|| format!("decrypting event {event_id}"))?;
    }
    let hash: Option<Vec<u8>> = row.try_get("hash")?;
    let out = json!({
        "seq": row.try_get::<i64, _>("seq")?,
        "event_id": row.try_get::<Uuid, _>("event_id")?,
        "event_type": row.try_get::<String, _>("event_type")?,
        "stream_id": row.try_get::<String, _>("stream_id")?,
        "stream_version": row.try_get::<Option<i64>, _>("stream_version")?,
        "occurred_at": row.try_get::<chrono::DateTime<Utc>, _>("occurred_at")?,
        "ingested_at": row.try_get::<chrono::DateTime<Utc>, _>("ingested_at")?,
        "source": row.try_get::<Option<String>, _>("source")?,
        "correlation_id": row.try_get::<Option<Uuid>, _>("correlation_id")?,
        "causation_id": row.try_get::<Option<Uuid>, _>("causation_id")?,
        "subject_id": row.try_get::<Option<String>, _>("subject_id")?,
        "payload": payload,
        "metadata": row.try_get::<Option<Value>, _>("metadata")?,
        "headers": row.try_get::<Value, _>("headers")?,
        "kafka": {
            "topic": row.try_get::<Option<String>, _>("kafka_topic")?,
            "partition": row.try_get::<Option<i32>, _>("kafka_partition")?,
            "offset": row.try_get::<Option<i64>, _>("kafka_offset")?,
        },
        "chain": {
            "id": row.try_get::<Option<String>, _>("chain_id")?,
            "position": row.try_get::<Option<i64>, _>("chain_position")?,
            "hash": hash.map(hex::encode),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn load_key(
    pool: &PgPool,
    provider: &dyn KeyProvider,
    key_id: Uuid,
) -> anyhow::Result<Option<protect::DataKey>> {
    let row = sqlx::query("SELECT kek_version, wrapped_key FROM subject_keys WHERE key_id = $1")
        .bind(key_id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let wrapped = WrappedKey {
        key_id: key_id.to_string(),
        kek_version: row.try_get(0)?,
        ciphertext: row.try_get(1)?,
    };
    Ok(Some(provider.unwrap(&wrapped).await.with_context(
        || {
            format!(
                "unwrapping data key {key_id} (KEK version {})",
                wrapped.kek_version
            )
        },
    )?))
}

pub async fn verify_command(args: VerifyArgs) -> anyhow::Result<bool> {
    let public_key = args.keys.verifying()?;
    let external = match args.keys.checkpoint_dir_path() {
        Some(path) if path.exists() => CheckpointDir::new(path.clone())
            .load_all()
            .with_context(|| format!("reading published checkpoints in {}", path.display()))?,
        Some(path) => anyhow::bail!("checkpoint directory {} does not exist", path.display()),
        None => Vec::new(),
    };
    let n_external = external.len();
    // One more worker than cores: while one waits for rows, another hashes.
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() + 1)
            .unwrap_or(3)
    });
    let pool = connect_with(&args.database_url, workers as u32 + 1).await?;
    let started = std::time::Instant::now();
    let report = verify(
        &pool,
        &VerifyOptions {
            public_key,
            external,
            max_problems: args.max_problems,
            workers,
        },
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    for (chain, summary) in &report.chains {
        println!(
            "verify: chain {chain}: {} events, {} checkpoints match",
            summary.length, summary.checkpoints
        );
    }
    if report.ok() {
        println!(
            "verify: OK: {} events in {} chains, {} checkpoints verified ({} published outside the database) in {elapsed:.2}s ({:.0}k events/s)",
            report.events,
            report.chains.len(),
            report.checkpoints_verified,
            n_external,
            report.events as f64 / elapsed.max(1e-9) / 1e3
        );
        Ok(true)
    } else {
        for problem in &report.problems {
            println!("verify: FAILED: {problem}");
        }
        println!(
            "verify: {} problem(s) found in {} events",
            report.problems.len(),
            report.events
        );
        Ok(false)
    }
}
