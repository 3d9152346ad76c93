//! `audit-node bench ingest`: end-to-end ingest throughput next to the
//! physical ceiling (parallel COPY into the same schema) in the same run.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Produce N events, ingest them through a node, compare with COPY.
    Ingest(IngestArgs),
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// Events to produce and ingest.
    #[arg(long, env = "AUDIT_BENCH_EVENTS", default_value_t = 200_000)]
    pub events: u64,
}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench ingest is not implemented yet")
}
