use std::path::PathBuf;

use clap::{Parser, Subcommand};
use starling_e2e::apiserver::ApiServer;

/// Starling's local control plane and demo: a whole federation on one machine.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub and three member clusters locally and train the Shakespeare sample.
    Demo,
    /// Run the Kubernetes API test server alone (in memory, until stopped).
    Apiserver {
        /// Port on 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Write a kubeconfig for it here.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    match Cli::parse().command {
        Command::Demo => {
            eprintln!(
                "starling-e2e demo: not yet available. The local control plane and the \
                 operator it needs are being built; see README.md for what works today."
            );
            Ok(std::process::ExitCode::from(2))
        }
        Command::Apiserver { port, kubeconfig } => {
            tokio::runtime::Runtime::new()?.block_on(async {
                let running = ApiServer::new().start(port).await?;
                if let Some(path) = kubeconfig {
                    std::fs::write(&path, running.kubeconfig("local"))?;
                }
                println!("API server listening on {}", running.url);
                tokio::signal::ctrl_c().await?;
                anyhow::Ok(())
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
