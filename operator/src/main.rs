use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
