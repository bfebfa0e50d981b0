use std::path::{Path, PathBuf};

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
        /// Directories to write into (created if missing); by default `crds/` and the
        /// hub chart's `crds/`, from the repository's root.
        #[arg(long, default_values = starling_operator::crdgen::DIRECTORIES)]
        out: Vec<PathBuf>,
    },
    /// Run the hub controllers (on the hub cluster).
    Hub(starling_operator::hub::HubConfig),
    /// Run a member cluster's agent.
    Agent(starling_operator::agent::AgentConfig),
    /// Work with a run's scoring ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Onboard member clusters (run against the hub, as its administrator).
    #[command(subcommand)]
    Member(MemberCommand),
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Register a member cluster and write what its administrator applies there:
    /// member-NAME-secret.yaml (the hub kubeconfig, with a bound token) and
    /// member-NAME.yaml (the member chart's values).
    Add {
        #[command(flatten)]
        member: starling_operator::onboard::NewMember,
        #[command(flatten)]
        access: starling_operator::onboard::Access,
    },
    /// Write member-NAME-secret.yaml again with a fresh token (apply it on the member;
    /// the agent keeps its place). The old token stays valid until it expires.
    RotateToken {
        /// The member's name.
        name: String,
        #[command(flatten)]
        access: starling_operator::onboard::Access,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check a ledger: canonical form, signatures, hash chain, and a replay of the scoring
    /// rules from the recorded measurements. Exits non-zero naming the first record that
    /// does not hold.
    Verify {
        /// `ledger.jsonl`, or a checkpoint directory holding it and `ledger.pub`.
        path: PathBuf,
        /// The run's public key (hex, as `kubectl get tr -o jsonpath='{.status.scoring.publicKey}'`
        /// prints it); by default `ledger.pub` beside the ledger.
        #[arg(long)]
        public_key: Option<String>,
        /// The head the run's status reports: a ledger cut short is caught only by this.
        #[arg(long)]
        head: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let service = match command {
        Command::Agent(_) => "starling-agent",
        _ => "starling-operator",
    };
    let _tracing = starling_trainer::trace::init(
        service,
        "info,kube_runtime=warn,h2=warn,tower=warn,hyper=warn",
    );
    match command {
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
        Command::Ledger(LedgerCommand::Verify {
            path,
            public_key,
            head,
        }) => verify_ledger(&path, public_key, head)?,
        Command::Member(command) => runtime()?.block_on(member(command))?,
        Command::Crdgen { out } => {
            for dir in out {
                let written = starling_operator::crdgen::write_all(&dir)
                    .with_context(|| format!("writing CRDs to {}", dir.display()))?;
                for path in written {
                    println!("wrote {}", path.display());
                }
            }
        }
    }
    Ok(())
}

fn verify_ledger(path: &Path, key: Option<String>, head: Option<String>) -> anyhow::Result<()> {
    use starling_trainer::scoring::ledger;
    let file = if path.is_dir() {
        path.join("ledger.jsonl")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let key = match key {
        Some(key) => key,
        None => {
            let pub_file = file.with_file_name("ledger.pub");
            std::fs::read_to_string(&pub_file)
                .with_context(|| format!("reading {} (or pass --public-key)", pub_file.display()))?
        }
    };
    let verified = ledger::verify(&text, &key).with_context(|| format!("{}", file.display()))?;
    if let Some(expected) = head
        && expected.trim() != verified.head
    {
        anyhow::bail!(
            "{}: its last record (round {}) has hash {}, not the head {expected}: records are missing",
            file.display(),
            verified.last_round,
            verified.head
        );
    }
    println!(
        "{}: {} records, rounds {} to {}, every one signed, chained and replayed; head {}",
        file.display(),
        verified.records,
        verified.first_round,
        verified.last_round,
        verified.head
    );
    Ok(())
}

async fn member(command: MemberCommand) -> anyhow::Result<()> {
    use starling_operator::onboard;
    let config = kube::Config::infer().await?;
    let client = kube::Client::try_from(config.clone())?;
    let (written, name) = match &command {
        MemberCommand::Add { member, access } => (
            onboard::add(&client, &config, member, access).await?,
            member.name.clone(),
        ),
        MemberCommand::RotateToken { name, access } => (
            onboard::rotate(&client, &config, name, access).await?,
            name.clone(),
        ),
    };
    println!(
        "wrote {} (the agent's hub kubeconfig; its token expires {})",
        written.secret.display(),
        written.expires
    );
    if let Some(values) = &written.values {
        println!("wrote {} (the member chart's values)", values.display());
    }
    println!("\nOn member {name}:");
    println!("  kubectl apply -f {}", written.secret.display());
    if let Some(values) = &written.values {
        println!(
            "  helm install starling-member charts/starling-member -n starling-system -f {} --wait",
            values.display()
        );
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
