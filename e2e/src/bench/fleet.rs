//! The fleet a benchmark runs against: a hub API test server with the CRDs and
//! MemberClusters, heartbeats standing in for the members' agents, the load balancer
//! standing in for the exchanges' Services, and the hub operator as a process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use starling_operator::api::MemberCluster;
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

use crate::apiserver::{ApiServer, Running, User};

/// The user the operator authenticates as; its requests are counted under this name.
pub const OPERATOR_USER: &str = "starling-operator";

const REGIONS: [&str; 5] = ["eu-west", "us-east", "ap-south", "af-west", "sa-east"];

/// Member `i`'s name.
pub fn member_name(i: usize) -> String {
    format!("m{i:03}")
}

/// The hub: its server, an admin client and a kubeconfig for the operator.
pub struct Hub {
    pub running: Running,
    pub client: Client,
    pub operator_kubeconfig: PathBuf,
}

impl Hub {
    /// Starts the server, installs the CRDs and the operator's namespace, and gives the
    /// operator its own token (cluster-admin, as the hub chart's ClusterRole is broad).
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let running = ApiServer::new().start(0).await?;
        let client = running.client();
        crate::federation::install_hub(&client).await?;
        let token = format!("operator-{}", std::process::id());
        running.server.add_token(
            &token,
            User {
                name: OPERATOR_USER.into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
            },
        );
        let operator_kubeconfig = dir.join("operator-kubeconfig");
        let kubeconfig = crate::apiserver::kubeconfig(&running.url, "hub", &running.ca_pem, &token);
        std::fs::write(&operator_kubeconfig, kubeconfig)?;
        Ok(Self {
            running,
            client,
            operator_kubeconfig,
        })
    }

    /// Registers `count` members: every fourth at home, regions in turn, each with room
    /// for `max_trainers` peers.
    pub async fn register_members(&self, count: usize, max_trainers: u32) -> anyhow::Result<()> {
        let api: Api<MemberCluster> = Api::all(self.client.clone());
        for i in 0..count {
            let name = member_name(i);
            let (tier, mbps) = if i % 4 == 3 {
                ("home", 100)
            } else {
                ("cloud", 1000)
            };
            let mc: MemberCluster = serde_json::from_value(json!({
                "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
                "metadata": {"name": name},
                "spec": {
                    "tier": tier, "region": REGIONS[i % REGIONS.len()],
                    "bandwidth": {"uploadMbps": mbps, "downloadMbps": mbps},
                    "maxTrainers": max_trainers,
                    "labels": {"name": name},
                },
            }))?;
            api.create(&PostParams::default(), &mc).await?;
        }
        Ok(())
    }
}

/// Members whose heartbeats have stopped.
pub type Dark = Arc<Mutex<HashSet<String>>>;

/// One heartbeat for each member not in `dark`, as the agent writes it.
pub async fn beat(client: &Client, members: usize, dark: &Dark) -> anyhow::Result<()> {
    let mut beats = tokio::task::JoinSet::new();
    for i in 0..members {
        let name = member_name(i);
        if dark
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&name)
        {
            continue;
        }
        let api: Api<MemberCluster> = Api::all(client.clone());
        beats.spawn(async move {
            let status = json!({"status": {
                "lastHeartbeat": k8s_openapi::jiff::Timestamp::now(),
                "agentVersion": "bench",
                "gpusAllocatable": 1,
                "gpusInUse": 0,
            }});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .with_context(|| format!("heartbeat of {name}"))
        });
    }
    while let Some(done) = beats.join_next().await {
        done??;
    }
    Ok(())
}

/// Heartbeats every `period` until aborted; a failed round is reported and retried.
pub async fn heartbeats(client: Client, members: usize, dark: Dark, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = beat(&client, members, &dark).await {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Gives every exchange Service a load-balancer address (127.0.0.1) once it exists, as
/// a cloud's load balancer would, until aborted.
pub async fn load_balancer(client: Client) {
    let api: Api<Service> = Api::all(client.clone());
    let config = watcher::Config::default().labels("app.kubernetes.io/component=exchange");
    let mut stream = std::pin::pin!(watcher(api, config));
    while let Some(event) = stream.next().await {
        let service = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(_) => continue,
            Err(e) => {
                eprintln!("bench: watching exchange Services: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let has_address = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref())
            .is_some_and(|i| !i.is_empty());
        if has_address {
            continue;
        }
        let ns = service.namespace().unwrap_or_default();
        let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}});
        let result = Api::<Service>::namespaced(client.clone(), &ns)
            .patch_status(
                &service.name_any(),
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await;
        if let Err(e) = result {
            eprintln!(
                "bench: exchange address for {ns}/{}: {e}",
                service.name_any()
            );
        }
    }
}

/// Starts `starling-operator hub` against the hub, logging to `dir/operator.log`.
pub fn start_operator(
    binary: &Path,
    hub: &Hub,
    dir: &Path,
    heartbeat_grace: u64,
) -> anyhow::Result<Child> {
    let path = dir.join("operator.log");
    let log = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    let grace = heartbeat_grace.to_string();
    Command::new(binary)
        .args([
            "hub",
            "--trainer-image",
            crate::federation::TRAINER_IMAGE,
            "--heartbeat-grace",
            &grace,
            "--identity",
            "operator-bench",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &hub.operator_kubeconfig)
        .env(
            "RUST_LOG",
            "info,kube_runtime=warn,h2=warn,tower=warn,hyper=warn",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// A process's peak and current resident memory in MiB (VmHWM, VmRSS), from /proc.
pub fn memory_mb(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb / 1024.0 * 10.0).round() / 10.0)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}
