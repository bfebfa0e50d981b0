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
use starling_operator::rbac;
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
    /// The hub controllers' kubeconfig: the hub chart's ServiceAccount and RBAC.
    operator_kubeconfig: PathBuf,
    timing: Timing,
    /// The operator and its identity in the leader Lease.
    operator: Option<(String, Child)>,
    /// Further hub replicas, by identity, contending for the Lease.
    replicas: BTreeMap<String, Child>,
    agents: BTreeMap<String, Child>,
    /// Each member's hub token (its agent's ServiceAccount).
    pub agent_tokens: BTreeMap<String, String>,
    restarts: u32,
    /// More environment for the operator and the agents (as a chart's `extraEnv`).
    env: Vec<(String, String)>,
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

/// A ServiceAccount of the operator's, as the charts name it: (namespace, name).
#[derive(Clone, Copy, Debug)]
pub struct Account {
    pub namespace: &'static str,
    pub name: &'static str,
}

impl Account {
    pub fn user(&self) -> User {
        User::service_account(self.namespace, self.name)
    }
}

/// The hub controllers' identity (the hub chart's ServiceAccount).
pub const OPERATOR: Account = Account {
    namespace: "starling-system",
    name: "starling-operator",
};

/// An agent's identity on its own member cluster (the member chart's ServiceAccount).
pub const AGENT: Account = Account {
    namespace: "starling-system",
    name: "starling-agent",
};

/// Where a member's trainer pods run (the agent's default).
pub const TRAINER_NAMESPACE: &str = "starling-trainers";

/// What a chart's RBAC templates make on `cluster`: `account` bound to a ClusterRole of
/// `cluster_wide` and to a Role of `namespaced.1` in `namespaced.0`. Returns a kubeconfig
/// authenticating as the account, as a pod of it would.
async fn grant(
    cluster: &LocalCluster,
    account: Account,
    cluster_wide: &[rbac::Grant],
    namespaced: (&str, &[rbac::Grant]),
) -> anyhow::Result<String> {
    let (namespace, grants) = namespaced;
    let name = account.name;
    let subjects =
        json!([{"kind": "ServiceAccount", "name": name, "namespace": account.namespace}]);
    let role_ref =
        |kind: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name});
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": account.namespace}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": account.namespace}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": rbac::rules(cluster_wide)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name}, "roleRef": role_ref("ClusterRole"), "subjects": subjects}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace}, "rules": rbac::rules(grants)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": role_ref("Role"), "subjects": subjects}),
    ];
    for object in objects {
        crate::apply(&cluster.client, &object, false).await?;
    }
    let token = format!(
        "{name}-{:08x}{:08x}",
        crate::kubelet::rand_u32(),
        crate::kubelet::rand_u32()
    );
    let server = cluster.server().context("the cluster is up")?;
    server.add_token(&token, account.user());
    cluster
        .kubeconfig_with_token(&token)
        .context("the cluster is up")
}

/// See [`Federation::rbac_report`].
#[derive(Debug, Default)]
pub struct RbacReport {
    /// Requests of the operator's identities that their roles refused.
    pub refused: Vec<String>,
    /// Permissions granted that no request used.
    pub unused: Vec<String>,
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
        Self::start_with_env(members, timing, dir, exe_dir, vec![]).await
    }

    /// [`Federation::start`], the operator and agents running with `env` added (as a
    /// chart's `extraEnv` adds it: `OTEL_EXPORTER_OTLP_ENDPOINT`, say).
    pub async fn start_with_env(
        members: &[MemberSpec],
        timing: Timing,
        dir: &Path,
        exe_dir: &Path,
        env: Vec<(String, String)>,
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
            let mut mc = starling_operator::onboard::NewMember {
                name: m.name.clone(),
                tier: m.tier,
                region: m.region.clone(),
                bandwidth_mbps: m.upload_mbps,
                max_trainers: m.max_trainers,
            }
            .object()?;
            mc.spec.labels = BTreeMap::from([("name".to_string(), m.name.clone())]);
            mcs.create(&PostParams::default(), &mc).await?;
        }
        let operator_kubeconfig = dir.join("operator-kubeconfig");
        let kubeconfig = grant(
            &clusters.hub,
            OPERATOR,
            rbac::HUB,
            (OPERATOR.namespace, rbac::HUB_LEADER_ELECTION),
        )
        .await?;
        std::fs::write(&operator_kubeconfig, kubeconfig)?;
        let mut federation = Self {
            clusters,
            dir: dir.to_path_buf(),
            operator_binary,
            operator_kubeconfig,
            timing,
            operator: None,
            replicas: BTreeMap::new(),
            agents: BTreeMap::new(),
            agent_tokens: BTreeMap::new(),
            restarts: 0,
            env,
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
        let child = self.spawn(log, &args, &self.operator_kubeconfig)?;
        Ok((identity, child))
    }

    /// Where a process of this federation (`operator`, `agent-NAME`: the name of its log)
    /// serves `/metrics`, as its log says (each listens on a port of its own choosing).
    pub fn metrics_url(&self, log: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(format!("{log}.log"))).ok()?;
        let line = (text.lines().rev()).find(|l| l.contains("serving /healthz"))?;
        let address = line.split("address=").nth(1)?.split_whitespace().next()?;
        Some(format!("http://{address}/metrics"))
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
        // What `starling-operator member add` does: a bound token of the member's agent
        // ServiceAccount (TokenRequest), in a kubeconfig for the hub.
        let hub = &self.clusters.hub;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&hub.kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let issued = starling_operator::onboard::issue(
            &hub.client,
            &config,
            member,
            None,
            (24, Duration::from_secs(60)),
        )
        .await?;
        self.agent_tokens.insert(member.into(), issued.token);
        self.start_agent_with(member, &issued.kubeconfig).await
    }

    /// Starts (or restarts) a member's agent with `hub_kubeconfig`, as a member chart
    /// installed with that Secret would: a wrong or expired one included.
    pub async fn start_agent_with(
        &mut self,
        member: &str,
        hub_kubeconfig: &str,
    ) -> anyhow::Result<()> {
        if let Some(mut old) = self.agents.remove(member) {
            let _ = old.kill().await;
        }
        let kubeconfig = self.dir.join(member).join("hub-kubeconfig");
        std::fs::write(&kubeconfig, hub_kubeconfig)?;
        let cluster = self.member(member);
        let local_kubeconfig = self.dir.join(member).join("agent-kubeconfig");
        let access = grant(
            cluster,
            AGENT,
            rbac::AGENT_CLUSTER,
            (TRAINER_NAMESPACE, rbac::AGENT_TRAINERS),
        )
        .await?;
        std::fs::write(&local_kubeconfig, access)?;
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
        Ok(())
    }

    /// Every authorisation decision made for the operator's own identities (the hub
    /// controllers and each agent on its member; an agent's hub identity is granted by
    /// the operator and not counted), by cluster.
    pub fn starling_decisions(&self) -> Vec<(String, crate::apiserver::Decision)> {
        let ours = |cluster: &LocalCluster, account: Account| {
            let user = account.user().name;
            cluster
                .server()
                .map(|s| s.decisions())
                .unwrap_or_default()
                .into_iter()
                .filter(move |d| d.user == user)
                .map(|d| (cluster.name.clone(), d))
                .collect::<Vec<_>>()
        };
        let mut all = ours(&self.clusters.hub, OPERATOR);
        for m in &self.clusters.members {
            all.extend(ours(m, AGENT));
        }
        all
    }

    /// The operator's own permissions held against what it did: what was refused, and
    /// what its roles grant that nothing used (`group/resource verb`, by table).
    pub fn rbac_report(&self) -> RbacReport {
        let decisions = self.starling_decisions();
        let refused = decisions
            .iter()
            .filter(|(_, d)| !d.allowed)
            .map(|(cluster, d)| {
                format!(
                    "{cluster}: {} {}/{} in {:?}",
                    d.verb, d.group, d.resource, d.namespace
                )
            })
            .collect();
        let used =
            |on_hub: bool, namespace: Option<&str>, g: &rbac::Grant, resource: &str, verb: &str| {
                decisions.iter().any(|(cluster, d)| {
                    (cluster == "hub") == on_hub
                        && d.allowed
                        && d.group == g.group
                        && d.resource == resource
                        && d.verb == verb
                        && namespace.is_none_or(|ns| d.namespace == ns)
                })
            };
        let tables: [(&str, bool, Option<&str>, &[rbac::Grant]); 4] = [
            ("HUB", true, None, rbac::HUB),
            (
                "HUB_LEADER_ELECTION",
                true,
                Some(OPERATOR.namespace),
                rbac::HUB_LEADER_ELECTION,
            ),
            ("AGENT_CLUSTER", false, Some(""), rbac::AGENT_CLUSTER),
            (
                "AGENT_TRAINERS",
                false,
                Some(TRAINER_NAMESPACE),
                rbac::AGENT_TRAINERS,
            ),
        ];
        let mut unused = vec![];
        for (table, on_hub, namespace, grants) in tables {
            for g in grants {
                for resource in g.resources {
                    for verb in g.verbs {
                        if !used(on_hub, namespace, g, resource, verb) {
                            unused.push(format!("{table}: {}/{resource} {verb}", g.group));
                        }
                    }
                }
            }
        }
        RbacReport { refused, unused }
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
