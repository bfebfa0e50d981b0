//! `kubectl starling`: a kubectl plugin (install the binary on your PATH as
//! `kubectl-starling`). `kubectl starling status RUN [-n NAMESPACE]` prints one screen:
//! the run's phase and progress, its loss curve, every peer, the members' health and the
//! latest checkpoint.

use clap::{Parser, Subcommand};
use kube::api::{Api, ListParams};
use starling_operator::api::{MemberCluster, TrainingRun};

#[derive(Parser)]
#[command(
    name = "kubectl starling",
    version,
    about = "Starling's kubectl plugin"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One screen on a TrainingRun: progress, loss curve, peers, members, checkpoint.
    Status {
        /// The TrainingRun's name.
        run: String,
        /// Its namespace (by default the kubeconfig context's).
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Command::Status { run, namespace } = Cli::parse().command;
    let config = kube::Config::infer().await?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    let runs: Api<TrainingRun> = Api::namespaced(client.clone(), &namespace);
    let Some(found) = runs.get_opt(&run).await? else {
        anyhow::bail!("no TrainingRun {run} in namespace {namespace}");
    };
    let members: Api<MemberCluster> = Api::all(client);
    let members = members.list(&ListParams::default()).await?.items;
    print!(
        "{}",
        starling_operator::status_view::render(
            &found,
            &members,
            k8s_openapi::jiff::Timestamp::now()
        )
    );
    Ok(())
}
