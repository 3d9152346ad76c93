//! `audit-node dev`: the one-command embedded default. An in-process mock
//! Kafka cluster with topic `orders` (16 partitions), the local PostgreSQL,
//! a node on the production code path, and demo traffic.

use std::path::PathBuf;

use anyhow::Context as _;
use audit_ledger::store::postgres::{self, local_database_url};
use tokio::sync::watch;

use crate::settings::{FileConfig, Identity, NodeSettings, Tuning};
use crate::{mock, node, produce, traffic};

pub const DEV_TOPIC: &str = "orders";
pub const DEV_PARTITIONS: i32 = 16;
pub const DEV_GROUP: &str = "audit-dev";
pub const DEV_DATABASE: &str = "order_audit";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Directory for the dev state: bootstrap.txt, tokens.json (API tokens), keys/ (KEK file, signing key pair), checkpoints/.
    #[arg(long, env = "AUDIT_STATE_DIR", default_value = ".audit-dev")]
    state_dir: PathBuf,
    /// PostgreSQL URL; default: the local server's Unix socket, database `order_audit`.
    #[arg(long, env = "AUDIT_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Demo events per second; 0 turns demo traffic off.
    #[arg(long, env = "AUDIT_DEMO_RATE", default_value_t = 20.0)]
    demo_rate: f64,
    #[command(flatten)]
    api: crate::settings::ApiArgs,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    protection: crate::keys::ProtectionArgs,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    produce::validate_rate(Some(args.demo_rate))?;
    std::fs::create_dir_all(&args.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            args.state_dir.display()
        )
    })?;
    let metrics = crate::install_metrics()?;

    let cluster = mock::start(
        1,
        &[mock::TopicSpec {
            name: DEV_TOPIC.into(),
            partitions: DEV_PARTITIONS,
        }],
    )?;
    let bootstrap = cluster.bootstrap().to_string();
    let bootstrap_file = args.state_dir.join("bootstrap.txt");
    mock::write_atomically(&bootstrap_file, &bootstrap)?;

    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| local_database_url(DEV_DATABASE));
    // The embedded cluster is new on every run and its offsets start at 0
    // again: data of an earlier run would not line up with it.
    if postgres::group_has_offsets(&database_url, DEV_GROUP).await? {
        if args.database_url.is_some() {
            anyhow::bail!(
                "{} holds an earlier dev run (consumer group {DEV_GROUP}) whose embedded Kafka cluster is gone; \
                 its offsets would not match the new cluster. Use a fresh database, or omit --database-url to \
                 let dev recreate its own",
                postgres::redact_url(&database_url)
            );
        }
        postgres::drop_database(&database_url).await;
        // Checkpoints of the dropped chains would not verify against the new ones.
        let old = args.state_dir.join("checkpoints");
        if old.exists() {
            let aside = args.state_dir.join(format!(
                "checkpoints-before-{}",
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            ));
            std::fs::rename(&old, &aside)
                .with_context(|| format!("moving {} aside", old.display()))?;
        }
        println!(
            "note: recreated the dev database {DEV_DATABASE}: the embedded Kafka cluster is new on every run, \
             so an earlier run's data would not line up with it"
        );
    }
    if postgres::create_database_if_missing(&database_url).await? {
        tracing::info!(database = %postgres::redact_url(&database_url), "database created");
    }
    let mut settings = NodeSettings::resolve(
        Identity {
            brokers: &bootstrap,
            topics: vec![DEV_TOPIC.into()],
            group_id: DEV_GROUP,
            database_url: &database_url,
            node_id: "dev".into(),
            // KIP-848: joins in milliseconds on the mock cluster.
            default_group_protocol: "consumer",
        },
        &args.tuning,
        FileConfig::default(),
    )?;
    settings.api_addr = Some(args.api.api_addr);
    let tokens_file = args.state_dir.join(crate::tokens::DEV_TOKENS_FILE);
    let tokens = crate::tokens::dev_tokens(&tokens_file)?;
    settings.api = args.api.settings(tokens)?;
    let created = crate::keys::init_state_dir(&args.state_dir)?;
    for path in &created {
        tracing::info!(path = %path.display(), "dev key created");
    }
    let keys = crate::keys::KeyArgs {
        state_dir: Some(args.state_dir.clone()),
        kek_provider: "file".into(),
        ..Default::default()
    };
    settings.protection = Some(crate::keys::build_protection(
        &keys,
        &args.protection,
        "dev",
    )?);
    let node = node::start(settings, Some(metrics)).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let traffic = (args.demo_rate > 0.0).then(|| {
        let bootstrap = bootstrap.clone();
        let rate = args.demo_rate;
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let producer = produce::create_producer(&bootstrap)?;
            let seed = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
            let mut generator = traffic::TrafficGenerator::new(seed, 0.01, 0.005)
                .with_base_time(chrono::Utc::now());
            produce::produce_stream(
                &producer,
                DEV_TOPIC,
                &mut generator,
                None,
                Some(rate),
                wait_for(stop),
            )
            .await?;
            produce::flush(&producer, std::time::Duration::from_secs(10)).await?;
            anyhow::Ok(())
        })
    });

    let api = node
        .api_addr
        .borrow()
        .map(|a| a.to_string())
        .unwrap_or_else(|| args.api.api_addr.to_string());
    println!("order-audit-trail dev is running");
    println!(
        "  kafka (mock):  {bootstrap}  (also in {})",
        bootstrap_file.display()
    );
    println!(
        "  topic:         {DEV_TOPIC} ({DEV_PARTITIONS} partitions), consumer group {DEV_GROUP}"
    );
    println!("  database:      {}", postgres::redact_url(&database_url));
    println!("  api:           http://{api}/v1/events  (Swagger UI: http://{api}/docs; spec: /openapi.json)");
    println!(
        "  api tokens:    {} (reader, auditor, admin): curl -H \"Authorization: Bearer $(jq -r .reader {})\" http://{api}/v1/events",
        tokens_file.display(),
        tokens_file.display()
    );
    if args.demo_rate > 0.0 {
        println!(
            "  demo traffic:  {} events/s (1% malformed, 0.5% duplicates)",
            args.demo_rate
        );
    }
    println!("  produce more:  cargo run --release -p audit-node -- produce --brokers $(cat {}) --topic {DEV_TOPIC} --count 1000", bootstrap_file.display());
    println!("  look:          psql \"{}\" -c 'SELECT seq, event_type, stream_id, occurred_at FROM events ORDER BY seq DESC LIMIT 10'", postgres::redact_url(&database_url));
    let layout = crate::keys::layout(&args.state_dir);
    println!(
        "  keys:          {} (KEK), {} (checkpoint signing)",
        layout.key_file.display(),
        layout.signing_key.display()
    );
    println!("  checkpoints:   {}", layout.checkpoints.display());
    println!(
        "  verify:        cargo run --release -p audit-node -- verify --database-url \"{}\" --state-dir {}",
        postgres::redact_url(&database_url),
        args.state_dir.display()
    );
    println!("  stop:          Ctrl-C");

    // Stop the demo traffic first, so the node drains what was produced.
    let shutdown = async {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let result = node.run_until(shutdown).await;
    if let Some(traffic) = traffic {
        match traffic.await {
            Ok(Err(error)) => tracing::warn!(error = %error, "demo traffic stopped with an error"),
            Err(error) => tracing::warn!(error = %error, "demo traffic task failed"),
            Ok(Ok(())) => {}
        }
    }
    // The cluster goes last, after every client (kafka-mock notes, pitfall 3).
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    result
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
