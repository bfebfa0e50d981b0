//! The local demo: a hub and three members on this machine, the Shakespeare sample run
//! applied as a user would, live progress until it succeeds, its final checkpoint
//! published to a local Hub (or the real one), then text from the model.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use starling_operator::api::{MemberCluster, Phase, Tier, TrainingRun, TrainingRunStatus};

use crate::federation::{Federation, MemberSpec, TRAINER_NAMESPACE, Timing};
use crate::plot::RunPicture;
use crate::scrape::{RoundPhases, pod_url, scrape};
use starling_operator::contract::{
    ADVERSARY_ANNOTATION, ADVERSARY_FROM_ANNOTATION, PEER_METRICS_PORT,
};

/// The run the demo applies: exactly the sample users read about.
pub const SAMPLE: &str = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");

#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Where clusters, pods, logs and checkpoints go (emptied first).
    #[arg(long, default_value = ".starling/demo")]
    pub dir: PathBuf,
    /// Stop the federation as soon as the run is done instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Publish the trained model to this Hub (e.g. https://huggingface.co) with the token
    /// in `HF_TOKEN`, instead of to a local Hub started for the demo.
    #[arg(long)]
    pub hub_endpoint: Option<String>,
    /// The model repository to publish to.
    #[arg(long, default_value = "starling-dev/shakespeare-tiny")]
    pub hub_repo: String,
    /// Make peers cheat, to watch scoring exclude them: PEER=KIND[,PEER=KIND…], KIND one
    /// of noise, scale:F, signflip, zero, copy:PEER, replay, stale, offslice, frozen.
    #[arg(long)]
    pub adversary: Option<starling_trainer::scoring::adversary::Adversaries>,
    /// The round the adversaries start cheating in.
    #[arg(long, default_value_t = 1)]
    pub adversary_from: u32,
}

/// The local Hub's one account.
const DEMO_HUB_TOKEN: &str = "hf_starling_demo_token";

/// Where the demo publishes: the endpoint and token, and the local Hub if it runs one.
struct Publishing {
    endpoint: String,
    token: String,
    repo: String,
    local: Option<crate::hub::RunningHub>,
}

/// The Hub the demo publishes to: the one the user named, or a local double.
async fn start_hub(opts: &DemoOptions, dir: &Path) -> anyhow::Result<Publishing> {
    if let Some(endpoint) = &opts.hub_endpoint {
        let token = std::env::var("HF_TOKEN")
            .context("--hub-endpoint publishes with the token in HF_TOKEN, which is not set")?;
        println!("Publishing to {endpoint} as {}", opts.hub_repo);
        return Ok(Publishing {
            endpoint: endpoint.clone(),
            token,
            repo: opts.hub_repo.clone(),
            local: None,
        });
    }
    let account = crate::hub::Account {
        user: "starling".into(),
        role: crate::hub::Role::Write,
        orgs: vec![opts.hub_repo.split('/').next().unwrap_or("starling").into()],
    };
    let accounts = std::collections::HashMap::from([(DEMO_HUB_TOKEN.to_owned(), account)]);
    let local = crate::hub::HubDouble::new(&dir.join("hf-hub"), accounts)?
        .start(0)
        .await?;
    println!("  {:<11} {} (a local Hugging Face Hub)", "hub", local.url);
    Ok(Publishing {
        endpoint: local.url.clone(),
        token: DEMO_HUB_TOKEN.into(),
        repo: opts.hub_repo.clone(),
        local: Some(local),
    })
}

/// The members: two clouds and a home box with a slow uplink its trainers honour.
pub fn demo_members() -> Vec<MemberSpec> {
    vec![
        MemberSpec::new("cloud-eu", Tier::Cloud, "eu-west", 10_000, 2),
        MemberSpec::new("cloud-us", Tier::Cloud, "us-east", 10_000, 2),
        MemberSpec::new("home-lagos", Tier::Home, "lagos", 20, 1),
    ]
}

/// The demo from start to finish: federation up, sample applied, progress until it
/// succeeds, text from the model, then the clusters left running for a look around.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let exe_dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    build_siblings(&exe_dir)?;
    let dir = fresh_dir(&opts.dir)?;
    let federation = start_federation(&dir, &exe_dir).await?;
    let publishing = start_hub(&opts, &dir).await?;
    let hub = federation.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    apply_sample(&hub, &runs, &publishing, &opts).await?;

    let started = Instant::now();
    let deadline = Duration::from_secs(opts.timeout);
    let mut phases = RoundPhases::default();
    let final_run = await_success(&federation, started, deadline, &mut phases).await?;
    let status = final_run.status.clone().unwrap_or_default();
    print_outcome(&status, started);
    print_scores(&status);
    write_picture(&dir, &status, &phases)?;

    let checkpoint = final_checkpoint(&hub, &federation, status.round).await?;
    println!("Checkpoint (Hugging Face layout): {}", checkpoint.display());
    print_published(&status, &publishing);
    print_sample(&exe_dir, &checkpoint)?;
    print_kubectl_hints(&federation);
    if !opts.exit_when_done {
        println!("The clusters keep running until Ctrl-C.");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// `dir` emptied (or made) and made absolute: the demo starts from nothing each time, and
/// the paths it prints work from anywhere.
fn fresh_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(std::fs::canonicalize(dir)?)
}

/// The hub and the members, with short heartbeats and leases so a demo run reacts in
/// seconds; prints where each cluster's API server listens.
async fn start_federation(dir: &Path, exe_dir: &Path) -> anyhow::Result<Federation> {
    println!(
        "Starting a hub and 3 member clusters under {} ...",
        dir.display()
    );
    let timing = Timing {
        heartbeat_seconds: 2,
        heartbeat_grace_seconds: 10,
        lease_seconds: 10,
    };
    let federation = Federation::start(&demo_members(), timing, dir, exe_dir).await?;
    for c in std::iter::once(&federation.clusters.hub).chain(&federation.clusters.members) {
        println!("  {:<11} {}", c.name, c.url);
    }
    Ok(federation)
}

/// Creates the sample run on the hub, as `kubectl apply` would, publishing its final
/// checkpoint with the token in a Secret, and says what it asks for.
async fn apply_sample(
    hub: &kube::Client,
    runs: &Api<TrainingRun>,
    publishing: &Publishing,
    opts: &DemoOptions,
) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "hf-token", "namespace": "default"},
        "stringData": {"token": publishing.token}}))?;
    Api::<Secret>::namespaced(hub.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await?;
    let mut run: TrainingRun = serde_yaml::from_str(SAMPLE)?;
    run.spec.publish = Some(serde_json::from_value(serde_json::json!({
        "repo": publishing.repo, "endpoint": publishing.endpoint,
        "tokenSecretRef": {"name": "hf-token"}, "license": "apache-2.0"}))?);
    if let Some(adversary) = &opts.adversary {
        // The testing aid the operator hands the run's peers.
        let annotations = run.metadata.annotations.get_or_insert_default();
        annotations.insert(ADVERSARY_ANNOTATION.into(), adversary.to_string());
        let from = opts.adversary_from.to_string();
        annotations.insert(ADVERSARY_FROM_ANNOTATION.into(), from);
        println!(
            "Adversaries: {adversary}, cheating from round {}.",
            opts.adversary_from
        );
    }
    runs.create(&PostParams::default(), &run).await?;
    println!(
        "Applied TrainingRun default/shakespeare: {} peers, {} rounds of {} steps, SparseLoCo top-{} of {} with {}-bit values.\n",
        run.spec.peers.max,
        run.spec.schedule.outer_rounds,
        run.spec.schedule.inner_steps,
        run.spec.compression.k(),
        run.spec.compression.chunk_size,
        run.spec.compression.value_bits.bits(),
    );
    Ok(())
}

/// Polls the sample run every second, showing its progress and scraping its trainers'
/// round times into `phases`, until it succeeds; an error when it fails or `deadline`
/// after `started` passes first.
async fn await_success(
    federation: &Federation,
    started: Instant,
    deadline: Duration,
    phases: &mut RoundPhases,
) -> anyhow::Result<TrainingRun> {
    let hub = &federation.clusters.hub.client;
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let mut progress = Progress::new(started);
    let final_run = loop {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "the run did not finish in {} s; logs are under {}",
            deadline.as_secs(),
            federation.dir.display()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        scrape_trainers(federation, phases).await;
        let Some(run) = runs.get_opt("shakespeare").await? else {
            continue;
        };
        let members = Api::<MemberCluster>::all(hub.clone())
            .list(&ListParams::default())
            .await?
            .items;
        progress.show(progress_line(&run, &members))?;
        let status = run.status.clone().unwrap_or_default();
        match status.phase {
            Some(Phase::Succeeded) => break run,
            Some(Phase::Failed) => anyhow::bail!("the run failed: see kubectl describe tr"),
            _ => {}
        }
    };
    progress.finish();
    Ok(final_run)
}

/// Scrapes every running trainer's `/metrics`, as a member's Prometheus would; a trainer
/// that does not answer (starting, or just finished) is skipped.
async fn scrape_trainers(federation: &Federation, phases: &mut RoundPhases) {
    for member in &federation.clusters.members {
        let pods: Api<Pod> = Api::namespaced(member.client.clone(), TRAINER_NAMESPACE);
        let Ok(pods) = pods.list(&ListParams::default()).await else {
            continue;
        };
        let urls = (pods.items.iter()).filter_map(|p| pod_url(p, PEER_METRICS_PORT));
        for url in urls {
            if let Ok(samples) = scrape(&url).await {
                phases.observe(&samples);
            }
        }
    }
}

/// Draws the run's loss by round and its peers' round time by phase into `run.svg`.
fn write_picture(
    dir: &Path,
    status: &TrainingRunStatus,
    phases: &RoundPhases,
) -> anyhow::Result<()> {
    let loss: Vec<(u32, f64)> = (status.loss_history.iter())
        .map(|p| (p.round, p.loss))
        .collect();
    let phases = phases.means();
    let title = format!(
        "default/shakespeare: {} rounds, {} peers on {} members",
        status.round,
        phases.len(),
        demo_members().len()
    );
    let svg = RunPicture {
        title: &title,
        loss: &loss,
        phases: &phases,
    }
    .svg();
    let path = dir.join("run.svg");
    std::fs::write(&path, svg).with_context(|| path.display().to_string())?;
    println!("Loss and round time by phase, drawn: {}", path.display());
    Ok(())
}

/// The live progress display: on a terminal one line redrawn in place every second,
/// otherwise (a log) a new line only when something changed.
struct Progress {
    started: Instant,
    tty: bool,
    last_line: String,
}

impl Progress {
    fn new(started: Instant) -> Self {
        Self {
            started,
            tty: std::io::stdout().is_terminal(),
            last_line: String::new(),
        }
    }

    fn show(&mut self, line: String) -> std::io::Result<()> {
        if self.tty || line != self.last_line {
            let at = self.started.elapsed().as_secs();
            if self.tty {
                print!("\r\x1b[2K[{at:>4}s] {line}");
            } else {
                println!("[{at:>4}s] {line}");
            }
            std::io::stdout().flush()?;
            self.last_line = line;
        }
        Ok(())
    }

    /// Ends the line being redrawn, so what follows starts on its own.
    fn finish(&self) {
        if self.tty {
            println!();
        }
    }
}

/// Every peer's standing as scoring left it.
fn print_scores(status: &TrainingRunStatus) {
    let scored: Vec<String> = (status.peers.iter())
        .filter_map(|p| {
            let standing = p.standing?;
            let reason = p.reason.as_deref().unwrap_or("");
            Some(format!(
                "  {} {standing:?}: rating {:.2}, weight {:.2}, {reason}",
                p.id,
                p.rating.unwrap_or_default(),
                p.weight.unwrap_or_default()
            ))
        })
        .collect();
    if !scored.is_empty() {
        let records = status.scoring.as_ref().map_or(0, |s| s.records);
        println!("Scores ({records} rounds in the signed ledger):");
        println!("{}", scored.join("\n"));
    }
}

fn print_outcome(status: &TrainingRunStatus, started: Instant) {
    println!(
        "\nSucceeded in {:.0} s: {} rounds, validation loss {}, {} on the wire ({}x less than dense fp32).",
        started.elapsed().as_secs_f64(),
        status.round,
        status.last_loss.map_or("-".into(), |l| format!("{l:.3}")),
        human_bytes(status.bytes_received),
        status
            .compression_ratio
            .map_or("-".into(), |r| format!("{r:.0}")),
    );
}

/// Where the model was published and how a Hugging Face user downloads it.
fn print_published(status: &TrainingRunStatus, publishing: &Publishing) {
    let published = status.checkpoints.last().and_then(|c| c.published.as_ref());
    let Some(p) = published else {
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Published")
            .map_or("no publication was reported".to_owned(), |c| {
                c.message.clone()
            });
        println!("Not published: {why}");
        return;
    };
    println!("Published to the Hub: {} (commit {})", p.url, p.commit);
    let xet = if publishing.local.is_some() {
        "HF_HUB_DISABLE_XET=1 "
    } else {
        ""
    };
    println!(
        "Download it with huggingface_hub:\n\n    {xet}HF_ENDPOINT={} python3 -c 'from huggingface_hub import \
         snapshot_download; print(snapshot_download(\"{}\", revision=\"{}\"))'",
        publishing.endpoint, p.repo, p.revision
    );
}

/// The checkpoint the exchange wrote after round `round`, in its pod's directory.
async fn final_checkpoint(
    hub: &kube::Client,
    federation: &Federation,
    round: u32,
) -> anyhow::Result<PathBuf> {
    let pods: Api<Pod> = Api::namespaced(hub.clone(), "default");
    let exchange_pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=exchange"))
        .await?
        .items
        .into_iter()
        .next()
        .context("the exchange pod is gone")?;
    let name = exchange_pod.metadata.name.unwrap_or_default();
    Ok(federation
        .hub_pod_dir("default", &name)
        .join("checkpoints")
        .join(format!("round-{round:06}")))
}

/// Text from the trained model, by the trainer binary a user would run on the checkpoint.
fn print_sample(exe_dir: &Path, checkpoint: &Path) -> anyhow::Result<()> {
    let sample = std::process::Command::new(exe_dir.join("starling-trainer"))
        .args([
            "sample",
            "--tokens",
            "240",
            "--temperature",
            "0.7",
            "--prompt",
            "ROMEO:\n",
        ])
        .arg("--checkpoint")
        .arg(checkpoint)
        .output()
        .context("running starling-trainer sample")?;
    println!("\nSampled from the trained model:\n");
    for line in String::from_utf8_lossy(&sample.stdout).lines() {
        println!("    {line}");
    }
    Ok(())
}

/// How to look at the clusters that keep running with a user's own kubectl.
fn print_kubectl_hints(federation: &Federation) {
    println!(
        "\nInspect the federation with your own kubectl:\n\n    export KUBECONFIG={}\n    kubectl get tr,tg,mc -A\n    kubectl describe tr shakespeare\n    kubectl logs -l app.kubernetes.io/component=exchange\n",
        federation.clusters.hub.kubeconfig.display()
    );
    if let Some(member) = federation.clusters.members.first() {
        println!(
            "and a member's trainers with its own kubeconfig:\n\n    kubectl --kubeconfig {} get pods -A\n    kubectl --kubeconfig {} logs -n <namespace> <pod>\n",
            member.kubeconfig.display(),
            member.kubeconfig.display()
        );
    }
}

fn progress_line(run: &TrainingRun, members: &[MemberCluster]) -> String {
    let status = run.status.clone().unwrap_or_default();
    let health: Vec<String> = members
        .iter()
        .map(|m| {
            let ready = m.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            format!(
                "{}{}",
                m.metadata.name.clone().unwrap_or_default(),
                if ready { "✓" } else { "✗" }
            )
        })
        .collect();
    format!(
        "{:<9} round {:>2}/{}  loss {:>6}  peers {}/{}  excluded {}  wire {:>9}  ratio {:>5}  members {}",
        status.phase.map_or("Pending".into(), |p| p.to_string()),
        status.round,
        run.spec.schedule.outer_rounds,
        status.last_loss.map_or("-".into(), |l| format!("{l:.3}")),
        status.active_peers,
        run.spec.peers.max,
        status.excluded_peers,
        human_bytes(status.bytes_received),
        status
            .compression_ratio
            .map_or("-".into(), |r| format!("{r:.0}x")),
        health.join(" "),
    )
}

fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// The demo runs the trainer and operator binaries; under `cargo run` it makes sure they
/// are built (in the same profile) next to this one.
fn build_siblings(exe_dir: &Path) -> anyhow::Result<()> {
    let Ok(cargo) = std::env::var("CARGO") else {
        return Ok(());
    };
    let release = exe_dir.file_name().is_some_and(|n| n == "release");
    println!("Building starling-trainer and starling-operator ...");
    let mut cmd = std::process::Command::new(cargo);
    // The same package set as `cargo run -p starling-e2e` builds, so features unify the
    // same way and nothing is rebuilt.
    cmd.args([
        "build",
        "-p",
        "starling-e2e",
        "-p",
        "starling-trainer",
        "-p",
        "starling-operator",
    ]);
    if release {
        cmd.arg("--release");
    }
    // What `cargo run` sets for its program would change build scripts' inputs and make
    // this build and the next `cargo run` rebuild each other's dependencies.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key.as_str(),
                "CARGO_BIN_NAME"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "LD_LIBRARY_PATH"
                    | "RUST_RECURSION_COUNT"
            )
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the trainer and operator failed");
    Ok(())
}
