use std::path::PathBuf;

use clap::{Parser, Subcommand};
use starling_e2e::apiserver::ApiServer;
use starling_e2e::harness::{ClusterSpec, LocalClusters, starling_images};

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
    Demo(starling_e2e::demo::DemoOptions),
    /// Run the Kubernetes API test server alone (in memory, until stopped).
    Apiserver {
        /// Port on 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Write a kubeconfig for it here.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Run a hub and member clusters (API server + process kubelet each) until stopped,
    /// with a kubeconfig per cluster for kubectl.
    Clusters {
        /// Members as `name:gpus`, e.g. `cloud-eu:2,home-lagos:1`.
        #[arg(long, value_delimiter = ',', default_value = "cloud-eu:2,home-lagos:1")]
        members: Vec<String>,
        /// Where kubeconfigs and pods' directories go.
        #[arg(long, default_value = ".starling/clusters")]
        dir: PathBuf,
    },
    /// Run a Hugging Face Hub double (the upload and download API, LFS storage on a
    /// second port) until stopped.
    Hub {
        /// Port on 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Where repos and files are kept (reloaded on restart).
        #[arg(long, default_value = ".starling/hub")]
        data: PathBuf,
        /// Accepted tokens as `TOKEN:USER:read|write[:ORG,ORG]`.
        #[arg(long = "token", value_parser = starling_e2e::hub::parse_account,
              default_value = "hf_starling_local:starling:write:starling-dev")]
        tokens: Vec<(String, starling_e2e::hub::Account)>,
    },
    /// Benchmarks: the Starling operator at fleet scale.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
    },
}

#[derive(Subcommand)]
enum BenchTarget {
    /// The hub operator with many members and runs and no trainers: time to place,
    /// time to re-place after a member goes dark, steady-state API requests, memory.
    Operator(starling_e2e::bench::BenchOptions),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    match Cli::parse().command {
        Command::Demo(opts) => {
            tokio::runtime::Runtime::new()?.block_on(starling_e2e::demo::run(opts))?;
            Ok(std::process::ExitCode::SUCCESS)
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
        Command::Hub { port, data, tokens } => {
            tokio::runtime::Runtime::new()?.block_on(async {
                let hub = starling_e2e::hub::HubDouble::new(&data, tokens.into_iter().collect())?;
                let running = hub.start(port).await?;
                println!(
                    "Hub listening on {} (storage {})",
                    running.url, running.storage_url
                );
                tokio::signal::ctrl_c().await?;
                anyhow::Ok(())
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Bench {
            target: BenchTarget::Operator(opts),
        } => {
            let exe = std::env::current_exe()?;
            let exe_dir = exe.parent().unwrap_or(std::path::Path::new("."));
            let report = tokio::runtime::Runtime::new()?
                .block_on(starling_e2e::bench::operator(&opts, exe_dir))?;
            if opts.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", starling_e2e::bench::summary(&report));
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Clusters { members, dir } => {
            let members = members
                .iter()
                .map(|m| {
                    let (name, gpus) = m.split_once(':').unwrap_or((m, "1"));
                    let gpus = gpus
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{m}: expected name:gpus"))?;
                    Ok(ClusterSpec::single_node(name, gpus))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let exe = std::env::current_exe()?;
            let images = starling_images(exe.parent().unwrap_or(std::path::Path::new(".")));
            tokio::runtime::Runtime::new()?.block_on(async {
                let hub = ClusterSpec::single_node("hub", 0);
                let federation = LocalClusters::start(&hub, &members, &images, &dir).await?;
                for c in std::iter::once(&federation.hub).chain(&federation.members) {
                    println!(
                        "{:<12} {}  kubectl --kubeconfig {}",
                        c.name,
                        c.url,
                        c.kubeconfig.display()
                    );
                }
                tokio::signal::ctrl_c().await?;
                anyhow::Ok(())
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
