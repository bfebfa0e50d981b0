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
//! The kubelet learns of its cluster through watches of Pods, Deployments and Services
//! (`kubelet/watch.rs`), of its processes' exits from the tasks that wait on them, and
//! of back-offs and grace periods from timers; it acts on each of these as it happens
//! and otherwise sleeps, so a cluster at rest costs no API requests but the watches'
//! renewal and a node status update a minute.
//!
//! It talks to its cluster only through the Kubernetes API (kube-rs), so the same code
//! works against any API server. One container per Pod; init containers and probes are
//! not implemented. Secret and ConfigMap volumes and the ServiceAccount's token are
//! mounted where the container asks (`kubelet/volumes.rs`); `workingDir` and other
//! volumes are the pod's directory. A listen address of `0.0.0.0:port` in args or env
//! becomes the pod's own address, as its own network namespace would confine it.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Taint};
use kube::Client;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod assumed;
mod deployment;
mod env;
mod job;
mod load_balancer;
mod logs;
mod node;
mod pods;
mod process;
mod schedule;
mod volumes;
mod watch;

use assumed::Assumed;
pub use process::resolve_image;
use process::{Exit, Process, Stopping};
pub use schedule::quantity;
pub use volumes::{InCluster, SERVICE_ACCOUNT_DIR, may_mount};

/// How often nodes' status is posted again (which also re-creates a deleted node).
const HEARTBEAT: Duration = Duration::from_secs(60);

/// How soon a pass over the cluster that failed (a write refused, the API unreachable)
/// is tried again.
const RESYNC: Duration = Duration::from_secs(1);

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
    /// A node with the labels a kubelet gives every node, and, with GPUs, the one
    /// NVIDIA's GPU feature discovery adds (what GPU node selectors name).
    pub fn new(name: &str, cpu: f64, memory_gib: f64, gpus: u32) -> Self {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), name.to_owned()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ]);
        if gpus > 0 {
            labels.insert("nvidia.com/gpu.present".into(), "true".into());
        }
        Self {
            name: name.into(),
            cpu,
            memory: memory_gib * (1u64 << 30) as f64,
            gpus,
            labels,
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
    /// How pods reach the API server (`KUBERNETES_SERVICE_*` and their ServiceAccount's
    /// files); `None` gives them neither.
    pub in_cluster: Option<InCluster>,
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
    /// The last process id given out (see [`Process::id`]).
    next_process: u64,
    /// Where processes' watchers report exits, and where the kubelet hears them.
    exits: mpsc::UnboundedSender<Exit>,
    exits_heard: Option<mpsc::UnboundedReceiver<Exit>>,
    /// Pod addresses by pod uid, and the next free one.
    addresses: HashMap<String, Ipv4Addr>,
    next_address: u32,
    /// Processes of deleted pods, on their way out.
    stopping: Vec<Stopping>,
    /// Pods whose container could not start, by uid, and when to try again.
    retry_at: HashMap<String, Instant>,
    /// What the kubelet has written that its watches may not show yet.
    assumed: Assumed,
    /// When the last pass over the cluster began; timers due by then were seen by it.
    synced_at: Instant,
    /// When to try again after a pass that failed.
    resync_at: Option<Instant>,
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
        let (exits, exits_heard) = mpsc::unbounded_channel();
        Self {
            client,
            config,
            processes: HashMap::new(),
            next_process: 0,
            exits,
            exits_heard: Some(exits_heard),
            addresses: HashMap::new(),
            next_address: u32::from(Ipv4Addr::new(127, a, b, 2)),
            stopping: vec![],
            retry_at: HashMap::new(),
            assumed: Assumed::default(),
            synced_at: Instant::now(),
            resync_at: None,
            log_port: 0,
        }
    }

    /// Registers the nodes, then schedules, runs and reports pods until the task is
    /// dropped. Processes are killed with it.
    pub async fn run(mut self) -> kube::Result<()> {
        let _logs = self.serve_logs().await;
        self.register_nodes().await?;
        let (cache, mut changes) = watch::watch(&self.client);
        let mut exits = self.exits_heard.take().expect("a kubelet runs once");
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        loop {
            let wake = self.next_wake();
            tokio::select! {
                () = changes.next() => {}
                Some(exit) = exits.recv() => self.heard(exit),
                () = sleep_until(wake) => {}
                _ = heartbeat.tick() => self.register_nodes().await?,
            }
            changes.drain().await;
            while let Ok(exit) = exits.try_recv() {
                self.heard(exit);
            }
            if changes.complete() {
                self.pass(&cache).await;
            }
        }
    }

    /// Starts the log endpoint, which lives as long as what this returns.
    async fn serve_logs(&mut self) -> Option<AbortOnDrop> {
        match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
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
        }
    }

    /// Notes a process's exit, to be acted on in the next pass.
    fn heard(&mut self, exit: Exit) {
        if let Some(proc) = self.processes.values_mut().find(|p| p.id == exit.id) {
            proc.exit = Some(exit.code);
        }
        self.stopping.retain(|s| s.id != exit.id);
    }

    /// One pass over the cluster as last seen: everything due is done.
    async fn pass(&mut self, cache: &watch::Cache) {
        let now = Instant::now();
        self.synced_at = now;
        self.resync_at = None;
        for stopping in &mut self.stopping {
            stopping.enforce(now);
        }
        if let Err(e) = self.sync(cache, now).await {
            eprintln!("process kubelet: {e}");
            self.resync_at = Some(Instant::now() + RESYNC);
        }
    }

    /// The next timer: a restart after back-off, a start retried, a grace period's end or
    /// a failed pass tried again. Only timers after the last pass count: earlier ones were
    /// due then, and were seen to.
    fn next_wake(&self) -> Option<Instant> {
        let restarts = self.processes.values().filter_map(|p| p.restart_at);
        let kills = self.stopping.iter().filter_map(|s| s.kill_at);
        restarts
            .chain(kills)
            .chain(self.retry_at.values().copied())
            .chain(self.resync_at)
            .filter(|at| *at > self.synced_at)
            .min()
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
