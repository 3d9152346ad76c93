//! `audit-node`: the order-audit-trail node and its tools.
//!
//! A thin shell: each command parses its flags (every flag has an
//! environment variable) and calls into the library crates.

mod admin;
mod bench;
mod dev;
mod keys;
mod mock;
mod mock_control;
mod node;
mod produce;
mod settings;
mod tokens;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::settings::{FileConfig, Identity, NodeSettings, Tuning};

/// mimalloc: allocation was a tenth of all CPU on the ingest path with
/// glibc's malloc (docs/PERFORMANCE.md), and it fragments less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h; the crate names only
/// some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Gives memory freed by a batch back to the system after a second instead
/// of mimalloc's 10 ms: batches free and allocate the same sizes every few
/// milliseconds, and each page given back and taken again was zeroed by the
/// kernel on its next touch (a tenth of the node's CPU while ingesting:
/// docs/PERFORMANCE.md). `MIMALLOC_PURGE_DELAY` still overrides it.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's global options; no other
        // precondition.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "audit-node",
    version,
    about = "Immutable, verifiable audit trail of business events from Kafka"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "AUDIT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One command for a new user: mock Kafka, local PostgreSQL, a node, demo traffic.
    Dev(Box<dev::DevArgs>),
    /// The production node: consume topics into the event store.
    Run(Box<RunArgs>),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// A standalone Kafka-protocol cluster (librdkafka's mock) for tests and demos.
    KafkaMock(KafkaMockArgs),
    /// Produce realistic order lifecycles (with personal data) to a topic.
    Produce(produce::ProduceArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// Key management: create, rotate and retire key-encryption keys.
    #[command(subcommand)]
    Keys(admin::KeysCommand),
    /// Data subjects: erasure (crypto-shredding).
    #[command(subcommand)]
    Subjects(admin::SubjectsCommand),
    /// Read single events.
    #[command(subcommand)]
    Events(admin::EventsCommand),
    /// Recompute every hash chain and Merkle root and check checkpoint signatures; exit 0 only if all verify.
    Verify(admin::VerifyArgs),
    /// API bearer tokens: create one (the node keeps only its hash).
    #[command(subcommand)]
    Tokens(tokens::TokensCommand),
    /// Print the API's OpenAPI document (docs/openapi.json is a copy).
    Openapi,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "AUDIT_BROKERS")]
    brokers: String,
    /// Topics to consume, comma-separated.
    #[arg(long, env = "AUDIT_TOPICS", value_delimiter = ',', required = true)]
    topics: Vec<String>,
    /// Consumer group; offsets are stored per group in PostgreSQL.
    #[arg(long, env = "AUDIT_GROUP_ID")]
    group_id: String,
    /// PostgreSQL URL, e.g. postgres://user:pass@host/db.
    #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Node id (logs, consumer_offsets.updated_by, Kafka client.id); default: $HOSTNAME.
    #[arg(long, env = "AUDIT_NODE_ID")]
    node_id: Option<String>,
    /// TOML file with tunables (flags win over it).
    #[arg(long, env = "AUDIT_CONFIG")]
    config: Option<PathBuf>,
    /// Do not apply migrations at start (when the node's login role may not change the schema).
    #[arg(long, env = "AUDIT_NO_MIGRATE")]
    no_migrate: bool,
    /// JSON file of API tokens by hash: {"tokens":[{"name","role","sha256"}]} (see `audit-node tokens create`).
    #[arg(long, env = "AUDIT_API_TOKENS")]
    api_tokens: Option<PathBuf>,
    #[command(flatten)]
    api: settings::ApiArgs,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    keys: keys::KeyArgs,
    #[command(flatten)]
    protection: keys::ProtectionArgs,
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// PostgreSQL URL of a role that may create tables and roles.
    #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Create the database first if it does not exist.
    #[arg(long, env = "AUDIT_CREATE_DATABASE")]
    create_database: bool,
}

#[derive(clap::Args, Debug)]
struct KafkaMockArgs {
    /// Number of brokers.
    #[arg(long, env = "AUDIT_MOCK_BROKERS", default_value_t = 3)]
    brokers: i32,
    /// Topic to create as NAME:PARTITIONS; repeat for more topics.
    #[arg(long = "topic", env = "AUDIT_MOCK_TOPICS", value_delimiter = ',')]
    topics: Vec<mock::TopicSpec>,
    /// File to write the bootstrap address to once the cluster is ready.
    #[arg(long, env = "AUDIT_MOCK_BOOTSTRAP_FILE")]
    bootstrap_file: Option<PathBuf>,
    /// Serve the fault-injection HTTP API here (port 0: any free port; printed as `kafka mock control listening: ADDR`). No authentication: keep it on loopback.
    #[arg(long, env = "AUDIT_MOCK_CONTROL_ADDR")]
    control_addr: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    // Blocking work (batch parsing, librdkafka seeks) is short. Tokio's
    // default of 512 threads let 256 partitions grow ~150 threads, each with
    // its own allocator heap: far more resident memory than data.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // Do not wait for stray blocking tasks (a wedged Kafka client close).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev::run(*args).await,
        Command::Run(args) => run(*args).await,
        Command::Migrate(args) => {
            if args.create_database {
                audit_ledger::store::postgres::create_database_if_missing(&args.database_url)
                    .await?;
            }
            audit_ledger::store::postgres::migrate(&args.database_url).await?;
            println!(
                "migrations applied to {}",
                audit_ledger::store::postgres::redact_url(&args.database_url)
            );
            Ok(())
        }
        Command::KafkaMock(args) => kafka_mock(args).await,
        Command::Produce(args) => {
            let summary = produce::run(args).await?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Bench(args) => bench::run(args).await,
        Command::Keys(command) => admin::keys(command).await,
        Command::Subjects(command) => admin::subjects(command).await,
        Command::Events(command) => admin::events(command).await,
        Command::Tokens(command) => tokens::command(command),
        Command::Openapi => {
            println!("{}", audit_api::openapi_json());
            Ok(())
        }
        Command::Verify(args) => {
            if admin::verify_command(args).await? {
                Ok(())
            } else {
                anyhow::bail!(
                    "verification failed: the store does not match its chains or checkpoints"
                )
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let file = FileConfig::load(args.config.as_deref())?;
    let mut settings = NodeSettings::resolve(
        Identity {
            brokers: &args.brokers,
            topics: args.topics.clone(),
            group_id: &args.group_id,
            database_url: &args.database_url,
            node_id: args
                .node_id
                .clone()
                .unwrap_or_else(settings::default_node_id),
            default_group_protocol: "classic",
        },
        &args.tuning,
        file,
    )?;
    settings.api_addr = Some(args.api.api_addr);
    let tokens = match &args.api_tokens {
        Some(path) => audit_api::auth::TokenTable::load(path)?,
        None => audit_api::auth::TokenTable::default(),
    };
    settings.api = args.api.settings(tokens)?;
    settings.migrate = !args.no_migrate;
    settings.protection = Some(keys::build_protection(
        &args.keys,
        &args.protection,
        &settings.pipeline.node_id,
    )?);
    let node = node::start(settings, Some(metrics)).await?;
    tracing::info!(topics = ?args.topics, group_id = %args.group_id, "node running");
    node.run_until(shutdown_signal()).await
}

async fn kafka_mock(args: KafkaMockArgs) -> anyhow::Result<()> {
    let cluster = mock::start(args.brokers, &args.topics)?;
    if let Some(path) = &args.bootstrap_file {
        mock::write_atomically(path, cluster.bootstrap())?;
    }
    println!("kafka mock cluster ready: {}", cluster.bootstrap());
    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control = match args.control_addr {
        Some(addr) => {
            let (local, server) = mock_control::bind(addr, cluster.control(), async move {
                let _ = control_stopped.await;
            })
            .await?;
            tracing::info!(addr = %local, "mock control API listening");
            println!("kafka mock control listening: {local}");
            Some(server)
        }
        None => None,
    };
    shutdown_signal().await;
    let _ = stop_control.send(());
    if let Some(server) = control {
        if let Err(error) = server.await.context("stopping the mock control API")? {
            tracing::warn!(error = %error, "mock control API stopped with an error");
        }
    }
    // Leave the stopping cluster alone off the runtime.
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .context("stopping the mock cluster")?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
}

/// Installs the Prometheus recorder. Must run inside the tokio runtime.
pub fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus metrics recorder")?;
    // Histogram samples pile up until something drains them: a scrape does,
    // but nobody may scrape. Upkeep bounds that memory either way.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_env("AUDIT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    // librdkafka and sqlx also log through the `log` crate.
    let _ = tracing_log::LogTracer::init();
}
