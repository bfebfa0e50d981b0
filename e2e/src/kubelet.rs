//! The process kubelet: for one test cluster it registers Nodes, schedules pending Pods
//! onto them (resource requests, nodeSelector, tolerations) and runs each Pod's container
//! as a local process of the binary its image names, reporting phase, container state and
//! restarts through the API, as a kubelet and a scheduler would.
//!
//! It also plays the two cluster services Starling's objects need: a Deployment
//! controller (pods from a Deployment's template, replaced when they fail or the template
//! changes) and a load balancer like k3s's ServiceLB (a `LoadBalancer` Service's ingress
//! address is the address of a ready pod it selects).
//!
//! Networking: each pod gets its own loopback address (`127.a.b.c`, with `a.b` random per
//! kubelet so concurrent clusters do not collide) as `status.podIP`; a pod listens on it
//! at its container port, and `$(VAR)` references in env and args expand as in Kubernetes.
//!
//! Deleted pods get their grace period (SIGTERM, SIGKILL at its end) before the kubelet
//! removes them, and their logs are served to the API server for `kubectl logs`
//! (`kubelet/logs.rs`).
//!
//! It talks to its cluster only through the Kubernetes API (kube-rs), so the same code
//! works against any API server. One container per Pod; init containers, probes and
//! volume contents are not implemented (`workingDir` and every mount are the pod's
//! directory).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Taint};
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::{Client, ResourceExt};

mod deployment;
mod env;
mod load_balancer;
mod logs;
mod node;
mod process;
mod schedule;

pub use process::resolve_image;
use process::{Process, Stopping, exit_code};
pub use schedule::quantity;

/// A node the kubelet registers and runs pods on.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// Allocatable CPU cores, memory bytes and GPUs.
    pub cpu: f64,
    pub memory: f64,
    pub gpus: u32,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

impl NodeConfig {
    pub fn new(name: &str, cpu: f64, memory_gib: f64, gpus: u32) -> Self {
        Self {
            name: name.into(),
            cpu,
            memory: memory_gib * (1u64 << 30) as f64,
            gpus,
            labels: BTreeMap::new(),
            taints: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub nodes: Vec<NodeConfig>,
    /// Image patterns (`*` matches anything) and the binary each runs; the first match
    /// wins.
    pub images: Vec<(String, PathBuf)>,
    /// Pods' working directories and logs go under `<work_dir>/<namespace>_<pod>/`.
    pub work_dir: PathBuf,
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub struct Kubelet {
    client: Client,
    config: KubeletConfig,
    /// Running (or restarting) pods by namespace/name.
    processes: HashMap<(String, String), Process>,
    /// Pod addresses by pod uid, and the next free one.
    addresses: HashMap<String, Ipv4Addr>,
    next_address: u32,
    /// Processes of deleted pods, on their way out.
    stopping: Vec<Stopping>,
    /// Where the log endpoint listens (0 until it does).
    log_port: u16,
}

/// Aborts a task when dropped, so the log endpoint ends with the kubelet.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Kubelet {
    pub fn new(client: Client, config: KubeletConfig) -> Self {
        let [a, b]: [u8; 2] = std::array::from_fn(|_| 1 + (rand_u32() % 254) as u8);
        Self {
            client,
            config,
            processes: HashMap::new(),
            addresses: HashMap::new(),
            next_address: u32::from(Ipv4Addr::new(127, a, b, 2)),
            stopping: vec![],
            log_port: 0,
        }
    }

    /// Registers the nodes, then schedules, runs and reports pods until the task is
    /// dropped. Processes are killed with it.
    pub async fn run(mut self) -> kube::Result<()> {
        let _logs = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(listener) => {
                self.log_port = listener.local_addr().map_or(0, |a| a.port());
                let serve =
                    logs::serve(listener, self.config.work_dir.clone(), self.client.clone());
                Some(AbortOnDrop(tokio::spawn(serve)))
            }
            Err(e) => {
                eprintln!("process kubelet: no log endpoint (kubectl logs will fail): {e}");
                None
            }
        };
        self.register_nodes().await?;
        let mut last_heartbeat = Instant::now();
        loop {
            if last_heartbeat.elapsed() > Duration::from_secs(10) {
                self.register_nodes().await?;
                last_heartbeat = Instant::now();
            }
            if let Err(e) = self.sync().await {
                eprintln!("process kubelet: {e}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn sync(&mut self) -> kube::Result<()> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let all = pods.list(&ListParams::default()).await?.items;
        let mine = |p: &Pod| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| self.config.nodes.iter().any(|c| c.name == n))
        };
        // Pods that went away (or are being deleted) lose their process.
        let live: HashMap<(String, String), &Pod> = all
            .iter()
            .filter(|p| mine(p) && p.metadata.deletion_timestamp.is_none())
            .map(|p| ((p.namespace().unwrap_or_default(), p.name_any()), p))
            .collect();
        let gone: Vec<_> = self
            .processes
            .iter()
            .filter(|(k, proc)| {
                live.get(*k)
                    .is_none_or(|p| p.uid().as_deref() != Some(&proc.uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(proc) = self.processes.remove(&key) {
                let grace = all
                    .iter()
                    .find(|p| p.uid().as_deref() == Some(&proc.uid))
                    .and_then(|p| p.metadata.deletion_grace_period_seconds)
                    .unwrap_or(5)
                    .max(0) as u64;
                self.stopping
                    .push(Stopping::begin(proc, Duration::from_secs(grace)));
            }
        }
        self.stopping.retain_mut(Stopping::still_running);
        // A deleted pod whose process has stopped (or never ran) is removed for good.
        for pod in all
            .iter()
            .filter(|p| mine(p) && p.metadata.deletion_timestamp.is_some())
        {
            let uid = pod.uid().unwrap_or_default();
            if self.stopping.iter().any(|s| s.uid == uid) {
                continue;
            }
            let finally = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let pods: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            if let Err(e) = pods.delete(&pod.name_any(), &finally).await {
                eprintln!("process kubelet: removing pod {}: {e}", pod.name_any());
            }
        }
        self.schedule(&all).await?;
        self.deployments(&all).await?;
        self.load_balancers(&all).await?;
        for pod in live.values() {
            if finished(pod) {
                continue;
            }
            let key = (pod.namespace().unwrap_or_default(), pod.name_any());
            match self.processes.get_mut(&key) {
                None => self.start(pod, 0).await?,
                Some(proc) => {
                    if let Some(at) = proc.restart_at {
                        if Instant::now() >= at {
                            let restarts = proc.restarts;
                            self.start(pod, restarts).await?;
                        }
                        continue;
                    }
                    if let Ok(Some(status)) = proc.child.try_wait() {
                        let code = exit_code(status);
                        self.exited(pod, code).await?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A random number (not cryptographic): unique names and addresses.
pub(crate) fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::env::expand;
    use super::*;

    #[test]
    fn variable_references_expand_as_in_kubernetes() {
        let vars = vec![("POD_IP".to_string(), "127.9.9.2".to_string())];
        assert_eq!(expand("$(POD_IP):7070", &vars), "127.9.9.2:7070");
        assert_eq!(
            expand("$$(POD_IP) $(NOPE) $x", &vars),
            "$(POD_IP) $(NOPE) $x"
        );
    }

    #[test]
    fn images_match_patterns_and_quantities_parse() {
        let images = vec![
            (
                "*/starling-trainer*".to_owned(),
                PathBuf::from("/bin/trainer"),
            ),
            ("example.com/sh".to_owned(), PathBuf::from("/bin/sh")),
        ];
        assert_eq!(
            resolve_image(&images, "ghcr.io/starling-dev/starling-trainer:0.1.0"),
            Some(&PathBuf::from("/bin/trainer"))
        );
        assert_eq!(
            resolve_image(&images, "example.com/sh"),
            Some(&PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve_image(&images, "nginx:1.27"), None);
        assert_eq!(quantity("500m"), Some(0.5));
        assert_eq!(quantity("2Gi"), Some(2.0 * 1024f64.powi(3)));
        assert_eq!(quantity("1"), Some(1.0));
        assert_eq!(quantity("lots"), None);
    }
}
