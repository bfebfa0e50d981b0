//! A whole Starling federation on one machine: local clusters (a hub and members), the
//! CRDs, MemberClusters, the hub operator and one agent per member as processes, the way
//! the Helm charts would install them. Used by the demo and the end-to-end tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::json;
use starling_operator::api::{MemberCluster, Tier};
use tokio::process::{Child, Command};

use crate::apiserver::User;
use crate::harness::{ClusterSpec, LocalCluster, LocalClusters, starling_images};

/// One member to start.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub name: String,
    pub tier: Tier,
    pub region: String,
    pub upload_mbps: u32,
    pub gpus: u32,
    pub max_trainers: Option<u32>,
}

impl MemberSpec {
    pub fn new(name: &str, tier: Tier, region: &str, upload_mbps: u32, gpus: u32) -> Self {
        Self {
            name: name.into(),
            tier,
            region: region.into(),
            upload_mbps,
            gpus,
            max_trainers: None,
        }
    }
}

/// Timing knobs; the defaults suit tests (fast heartbeats, short grace).
#[derive(Clone, Debug)]
pub struct Timing {
    pub heartbeat_seconds: u64,
    pub heartbeat_grace_seconds: u64,
    pub lease_seconds: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 2,
            heartbeat_grace_seconds: 8,
            lease_seconds: 6,
        }
    }
}

pub struct Federation {
    pub clusters: LocalClusters,
    pub dir: PathBuf,
    operator_binary: PathBuf,
    timing: Timing,
    /// The operator and its identity in the leader Lease.
    operator: Option<(String, Child)>,
    /// Further hub replicas, by identity, contending for the Lease.
    replicas: BTreeMap<String, Child>,
    agents: BTreeMap<String, Child>,
    /// Each member's hub token (its agent's ServiceAccount).
    pub agent_tokens: BTreeMap<String, String>,
    restarts: u32,
}

/// What `helm install starling-hub` does to a hub's API: the CRDs and the operator's
/// namespace.
pub async fn install_hub(client: &kube::Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in starling_operator::api::crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "starling-system"}}))?,
        )
        .await?;
    Ok(())
}

/// The trainer image TrainingRuns default to in a local federation.
pub const TRAINER_IMAGE: &str = "ghcr.io/starling-dev/starling-trainer:local";

impl Federation {
    /// Starts everything under `dir`, with the binaries found next to `exe_dir`.
    pub async fn start(
        members: &[MemberSpec],
        timing: Timing,
        dir: &Path,
        exe_dir: &Path,
    ) -> anyhow::Result<Self> {
        let images = starling_images(exe_dir);
        let operator_binary = images
            .iter()
            .find(|(p, _)| p.contains("operator"))
            .map(|(_, b)| b.clone())
            .expect("an operator image");
        anyhow::ensure!(
            operator_binary.exists(),
            "{} not found: build it first (cargo build -p starling-operator)",
            operator_binary.display()
        );
        let hub = ClusterSpec::single_node("hub", 0);
        let specs: Vec<ClusterSpec> = members
            .iter()
            .map(|m| ClusterSpec::single_node(&m.name, m.gpus))
            .collect();
        let clusters = LocalClusters::start(&hub, &specs, &images, dir).await?;
        let client = clusters.hub.client.clone();

        install_hub(&client).await?;
        // The platform team registers each member.
        let mcs: Api<MemberCluster> = Api::all(client.clone());
        for m in members {
            let mc: MemberCluster = serde_json::from_value(json!({
                "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
                "metadata": {"name": m.name},
                "spec": {
                    "tier": m.tier, "region": m.region,
                    "bandwidth": {"uploadMbps": m.upload_mbps, "downloadMbps": m.upload_mbps},
                    "maxTrainers": m.max_trainers,
                    "labels": {"name": m.name},
                },
            }))?;
            mcs.create(&PostParams::default(), &mc).await?;
        }
        let mut federation = Self {
            clusters,
            dir: dir.to_path_buf(),
            operator_binary,
            timing,
            operator: None,
            replicas: BTreeMap::new(),
            agents: BTreeMap::new(),
            agent_tokens: BTreeMap::new(),
            restarts: 0,
        };
        federation.start_operator()?;
        for m in members {
            federation.start_agent(&m.name).await?;
        }
        Ok(federation)
    }

    /// Runs `starling-operator ARGS` against `kubeconfig`, logging to `dir/<name>.log`.
    fn spawn(&self, name: &str, args: &[&str], kubeconfig: &Path) -> anyhow::Result<Child> {
        let path = self.dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| path.display().to_string())?;
        Command::new(&self.operator_binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                "info,kube_runtime=warn,h2=warn,tower=warn,hyper=warn",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))
    }

    /// Starts (or restarts) the hub operator, as `operator-N`, logging to `operator.log`.
    pub fn start_operator(&mut self) -> anyhow::Result<()> {
        self.operator = Some(self.spawn_hub("operator")?);
        Ok(())
    }

    /// Starts one more hub replica next to the operator (as the chart's second replica
    /// does); it logs to `<identity>.log`. Returns its identity.
    pub fn start_replica(&mut self) -> anyhow::Result<String> {
        let (identity, child) = self.spawn_hub(&format!("operator-{}", self.restarts + 1))?;
        self.replicas.insert(identity.clone(), child);
        Ok(identity)
    }

    fn spawn_hub(&mut self, log: &str) -> anyhow::Result<(String, Child)> {
        self.restarts += 1;
        let identity = format!("operator-{}", self.restarts);
        let grace = self.timing.heartbeat_grace_seconds.to_string();
        let lease = self.timing.lease_seconds.to_string();
        let args = [
            "hub",
            "--trainer-image",
            TRAINER_IMAGE,
            "--heartbeat-grace",
            &grace,
            "--lease-seconds",
            &lease,
            "--identity",
            &identity,
            // Several processes share this machine's ports.
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        let child = self.spawn(log, &args, &self.clusters.hub.kubeconfig)?;
        Ok((identity, child))
    }

    /// The identity of the operator started by [`Federation::start_operator`].
    pub fn operator_identity(&self) -> Option<&str> {
        self.operator.as_ref().map(|(id, _)| id.as_str())
    }

    /// Kills the hub operator at once (SIGKILL: no shutdown, no Lease released).
    pub async fn kill_operator(&mut self) {
        if let Some((_, mut child)) = self.operator.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts a member's agent once the operator has made its hub namespace, with a
    /// token for the member's ServiceAccount (what `kubectl create token` gives the
    /// member chart).
    pub async fn start_agent(&mut self, member: &str) -> anyhow::Result<()> {
        let namespace = format!("starling-member-{member}");
        let namespaces: Api<Namespace> = Api::all(self.clusters.hub.client.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while namespaces.get_opt(&namespace).await?.is_none() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the operator did not create {namespace}; see {}",
                self.dir.join("operator.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let token = format!(
            "agent-{member}-{:08x}{:08x}",
            crate::kubelet::rand_u32(),
            crate::kubelet::rand_u32()
        );
        let hub = &self.clusters.hub;
        hub.server()
            .expect("the hub is up")
            .add_token(&token, User::service_account(&namespace, "agent"));
        let kubeconfig = self.dir.join(member).join("hub-kubeconfig");
        std::fs::write(
            &kubeconfig,
            hub.kubeconfig_with_token(&token).expect("the hub is up"),
        )?;
        let cluster = self.member(member);
        let local_kubeconfig = cluster.kubeconfig.clone();
        let hub_kubeconfig = kubeconfig.display().to_string();
        let heartbeat = self.timing.heartbeat_seconds.to_string();
        let args = [
            "agent",
            "--member",
            member,
            "--hub-kubeconfig",
            &hub_kubeconfig,
            "--heartbeat",
            &heartbeat,
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        let child = self.spawn(&format!("agent-{member}"), &args, &local_kubeconfig)?;
        self.agents.insert(member.into(), child);
        self.agent_tokens.insert(member.into(), token);
        Ok(())
    }

    pub fn member(&self, name: &str) -> &LocalCluster {
        self.clusters
            .members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// A member loses power: its agent, API server, kubelet and pods all stop.
    pub async fn go_dark(&mut self, member: &str) {
        if let Some(mut agent) = self.agents.remove(member) {
            let _ = agent.kill().await;
        }
        if let Some(cluster) = self.clusters.member(member) {
            cluster.go_dark();
        }
    }

    /// Where a hub pod's working directory is.
    pub fn hub_pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir
            .join("hub")
            .join("pods")
            .join(format!("{namespace}_{pod}"))
    }
}
