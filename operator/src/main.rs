use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use starling_operator::telemetry::{self, Metrics};

/// Starling operator: federated open-model training across clouds and homes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML, one file per CRD.
    Crdgen {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "crds")]
        out: PathBuf,
    },
    /// Run the hub controllers (on the hub cluster).
    Hub(starling_operator::hub::HubConfig),
    /// Run a member cluster's agent.
    Agent(starling_operator::agent::AgentConfig),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_runtime=warn,h2=warn,tower=warn,hyper=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Hub(config) => runtime()?.block_on(async {
            let metrics = std::sync::Arc::new(Metrics::default());
            let client = telemetry::client(kube::Config::infer().await?, metrics.clone())?;
            starling_operator::hub::run(client, metrics, config).await
        })?,
        Command::Agent(config) => runtime()?.block_on(async {
            let metrics = std::sync::Arc::new(Metrics::default());
            let client = telemetry::client(kube::Config::infer().await?, metrics.clone())?;
            starling_operator::agent::run(client, metrics, config).await
        })?,
        Command::Crdgen { out } => {
            let written = starling_operator::crdgen::write_all(&out)
                .with_context(|| format!("writing CRDs to {}", out.display()))?;
            for path in written {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
