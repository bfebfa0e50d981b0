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
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Node, Pod, Secret, Service, Taint, Toleration,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;

mod logs;

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

/// The binary for `image`, from the configured patterns.
pub fn resolve_image<'a>(images: &'a [(String, PathBuf)], image: &str) -> Option<&'a PathBuf> {
    images
        .iter()
        .find(|(pattern, _)| glob(pattern, image))
        .map(|(_, binary)| binary)
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (tail.is_empty() && text.len() >= head.len()
                    || (head.len()..=text.len()).any(|i| glob(tail, &text[i..])))
        }
    }
}

/// Parses a quantity (`500m`, `2`, `4Gi`, `1G`) to a number of units.
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("n", 1e-9),
    ];
    for (suffix, factor) in suffixes {
        if let Some(number) = q.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    q.parse().ok()
}

/// What a container asks for: CPU cores, memory bytes, GPUs.
fn requests(c: &Container) -> (f64, f64, f64) {
    let resources = c.resources.as_ref();
    let get = |name: &str| {
        let from = |m: Option<
            &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| { m.and_then(|m| m.get(name)).and_then(|q| quantity(&q.0)) };
        // Requests default to limits, as the API server defaults them.
        from(resources.and_then(|r| r.requests.as_ref()))
            .or_else(|| from(resources.and_then(|r| r.limits.as_ref())))
            .unwrap_or(0.0)
    };
    (get("cpu"), get("memory"), get("nvidia.com/gpu"))
}

fn pod_requests(pod: &Pod) -> (f64, f64, f64) {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(requests)
        .fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2))
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    taint.effect == "PreferNoSchedule"
        || tolerations.iter().any(|t| {
            let key_ok = t
                .key
                .as_deref()
                .is_none_or(|k| k.is_empty() || k == taint.key);
            let effect_ok = t
                .effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == taint.effect);
            let value_ok = match t.operator.as_deref() {
                Some("Exists") => true,
                _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
            };
            key_ok && effect_ok && value_ok
        })
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

struct Process {
    child: tokio::process::Child,
    uid: String,
    started: String,
    restarts: i32,
    /// When the container may start again after a crash (back-off).
    restart_at: Option<Instant>,
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

    /// Creates or refreshes every node with its capacity and a Ready condition.
    async fn register_nodes(&self) -> kube::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for n in &self.config.nodes {
            let capacity = json!({
                "cpu": n.cpu.to_string(),
                "memory": format!("{}", n.memory as u64),
                "nvidia.com/gpu": n.gpus.to_string(),
                "pods": "110",
            });
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": n.labels},
                "spec": {"taints": n.taints},
            });
            let params = PatchParams::apply("process-kubelet").force();
            nodes.patch(&n.name, &params, &Patch::Apply(node)).await?;
            let status = json!({"status": {
                "capacity": capacity, "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": n.name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "process kubelet is posting ready status",
                    "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "nodeInfo": {"kubeletVersion": "v1.32.0-starling-e2e", "operatingSystem": "linux",
                    "architecture": std::env::consts::ARCH, "containerRuntimeVersion": "process://",
                    "kernelVersion": "", "osImage": "", "kubeProxyVersion": "", "machineID": "",
                    "systemUUID": "", "bootID": ""},
            }});
            nodes
                .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
        }
        Ok(())
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

    /// Binds each pending pod to the first node it fits on, or says why none fits.
    async fn schedule(&self, all: &[Pod]) -> kube::Result<()> {
        let nodes = &self.config.nodes;
        for pod in all.iter().filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
                && !finished(p)
        }) {
            let spec = pod.spec.as_ref().expect("filtered");
            let (cpu, memory, gpus) = pod_requests(pod);
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            let chosen = nodes.iter().find(|n| {
                let selector_ok = spec
                    .node_selector
                    .iter()
                    .flatten()
                    .all(|(k, v)| n.labels.get(k) == Some(v));
                let tolerations = spec.tolerations.as_deref().unwrap_or_default();
                let taints_ok = n.taints.iter().all(|t| tolerates(tolerations, t));
                let used = all
                    .iter()
                    .filter(|p| {
                        !finished(p)
                            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&n.name)
                    })
                    .map(pod_requests)
                    .fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
                let fits = [
                    (used.0 + cpu <= n.cpu + 1e-9, "Insufficient cpu"),
                    (used.1 + memory <= n.memory, "Insufficient memory"),
                    (
                        used.2 + gpus <= f64::from(n.gpus),
                        "Insufficient nvidia.com/gpu",
                    ),
                    (
                        selector_ok,
                        "node(s) didn't match Pod's node affinity/selector",
                    ),
                    (taints_ok, "node(s) had untolerated taint"),
                ];
                for (ok, why) in fits {
                    if !ok {
                        *reasons.entry(why).or_default() += 1;
                    }
                }
                fits.iter().all(|(ok, _)| *ok)
            });
            let pods: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            match chosen {
                Some(node) => {
                    let bind = json!({"spec": {"nodeName": node.name}});
                    pods.patch(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(bind),
                    )
                    .await?;
                    let status = json!({"status": {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]}});
                    report(&pods, &pod.name_any(), status).await?;
                }
                None => {
                    let why: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let message =
                        format!("0/{} nodes are available: {}.", nodes.len(), why.join(", "));
                    let status = json!({"status": {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": message, "lastTransitionTime": now()}]}});
                    report(&pods, &pod.name_any(), status).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts (or restarts) a pod's container and reports it running.
    async fn start(&mut self, pod: &Pod, restarts: i32) -> kube::Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.as_ref().expect("scheduled pods have a spec");
        let Some(container) = spec.containers.first() else {
            return Ok(());
        };
        let image = container.image.clone().unwrap_or_default();
        let Some(binary) = resolve_image(&self.config.images, &image).cloned() else {
            let status = waiting(
                container,
                "ErrImagePull",
                &format!("image {image} is not one the process kubelet can run (a Starling image)"),
            );
            report(&pods, &name, status).await?;
            return Ok(());
        };
        let ip = self.address(pod);
        let env = match self.env(pod, container, ip).await {
            Ok(env) => env,
            Err(message) => {
                let status = waiting(container, "CreateContainerConfigError", &message);
                report(&pods, &name, status).await?;
                return Ok(());
            }
        };
        let dir = self.config.work_dir.join(format!("{ns}_{name}"));
        let _ = std::fs::create_dir_all(&dir);
        let log = dir.join(format!("{}.log", container.name));
        let files = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|f| Ok((f.try_clone()?, f)));
        let (out, err) = match files {
            Ok(files) => files,
            Err(e) => {
                let status = waiting(
                    container,
                    "RunContainerError",
                    &format!("{}: {e}", log.display()),
                );
                report(&pods, &name, status).await?;
                return Ok(());
            }
        };
        let args: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(container.args.iter().flatten())
            .map(|a| expand(a, &env))
            .collect();
        let spawned = tokio::process::Command::new(&binary)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let status = waiting(
                    container,
                    "RunContainerError",
                    &format!("{}: {e}", binary.display()),
                );
                report(&pods, &name, status).await?;
                return Ok(());
            }
        };
        let started = now();
        let status = json!({"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map_or(json!(started), |t| json!(t)),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": started},
                {"type": "Ready", "status": "True", "lastTransitionTime": started}],
            "containerStatuses": [{
                "name": container.name, "image": image, "imageID": "", "ready": true, "started": true,
                "restartCount": restarts,
                "state": {"running": {"startedAt": started}},
                "lastState": pod.status.as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .and_then(|c| c.last_state.clone()),
            }],
        }});
        report(&pods, &name, status).await?;
        self.processes.insert(
            (ns, name),
            Process {
                child,
                uid: pod.uid().unwrap_or_default(),
                started,
                restarts,
                restart_at: None,
            },
        );
        Ok(())
    }

    /// A container exited: restart it (with back-off) or finish the pod, per its
    /// `restartPolicy`.
    async fn exited(&mut self, pod: &Pod, code: i32) -> kube::Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.as_ref().expect("running pods have a spec");
        let container = &spec.containers[0];
        let key = (ns.clone(), name.clone());
        let proc = self
            .processes
            .get_mut(&key)
            .expect("exited pods have a process");
        let terminated = json!({"terminated": {
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": proc.started, "finishedAt": now()}});
        let restart = match spec.restart_policy.as_deref().unwrap_or("Always") {
            "Always" => true,
            "OnFailure" => code != 0,
            _ => false,
        };
        let status = if restart {
            proc.restarts += 1;
            // Back-off doubles from 1 s, as crash loops do (capped for tests' sake).
            let backoff = Duration::from_secs(1 << proc.restarts.clamp(0, 4) as u32 >> 1);
            proc.restart_at = Some(Instant::now() + backoff);
            json!({"status": {"phase": "Running", "containerStatuses": [{
                "name": container.name, "image": container.image, "imageID": "", "ready": false,
                "started": false, "restartCount": proc.restarts, "lastState": terminated,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {}", container.name)}},
            }]}})
        } else {
            self.processes.remove(&key);
            let previous = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first());
            json!({"status": {"phase": if code == 0 { "Succeeded" } else { "Failed" },
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{
                "name": container.name, "image": container.image, "imageID": "", "ready": false,
                "started": false, "restartCount": previous.map_or(0, |c| c.restart_count),
                "lastState": previous.and_then(|c| c.last_state.clone()),
                "state": terminated,
            }]}})
        };
        report(&pods, &name, status).await?;
        Ok(())
    }

    /// The container's environment, with `valueFrom` resolved through the API.
    async fn env(
        &self,
        pod: &Pod,
        container: &Container,
        ip: Ipv4Addr,
    ) -> Result<Vec<(String, String)>, String> {
        let ns = pod.namespace().unwrap_or_default();
        let mut out = vec![];
        for EnvVar {
            name,
            value,
            value_from,
        } in container.env.iter().flatten()
        {
            let resolved = match (value, value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(r) = &from.secret_key_ref {
                        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
                        let secret = secrets
                            .get(&r.name)
                            .await
                            .map_err(|e| format!("secret {}: {e}", r.name))?;
                        let bytes = secret
                            .data
                            .as_ref()
                            .and_then(|d| d.get(&r.key))
                            .map(|b| b.0.clone());
                        let text = secret
                            .string_data
                            .as_ref()
                            .and_then(|d| d.get(&r.key))
                            .cloned();
                        match (bytes, text) {
                            (Some(b), _) => String::from_utf8_lossy(&b).into_owned(),
                            (None, Some(t)) => t,
                            _ => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {ns}/{}",
                                    r.key, r.name
                                ));
                            }
                        }
                    } else if let Some(r) = &from.config_map_key_ref {
                        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
                        let map = maps
                            .get(&r.name)
                            .await
                            .map_err(|e| format!("configmap {}: {e}", r.name))?;
                        map.data
                            .as_ref()
                            .and_then(|d| d.get(&r.key))
                            .cloned()
                            .ok_or_else(|| {
                                format!("couldn't find key {} in ConfigMap {ns}/{}", r.key, r.name)
                            })?
                    } else if let Some(f) = &from.field_ref {
                        match f.field_path.as_str() {
                            "metadata.name" => pod.name_any(),
                            "metadata.namespace" => ns.clone(),
                            "metadata.uid" => pod.uid().unwrap_or_default(),
                            "spec.nodeName" => pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.node_name.clone())
                                .unwrap_or_default(),
                            "status.podIP" => ip.to_string(),
                            "status.hostIP" => "127.0.0.1".into(),
                            other => return Err(format!("unsupported fieldRef {other}")),
                        }
                    } else {
                        return Err(format!("env {name}: unsupported valueFrom"));
                    }
                }
                (None, None) => String::new(),
            };
            // Only `value`s expand, and only names defined before them.
            let resolved = if value.is_some() {
                expand(&resolved, &out)
            } else {
                resolved
            };
            out.push((name.clone(), resolved));
        }
        Ok(out)
    }
}

impl Kubelet {
    /// The pod's loopback address, stable for the pod's life.
    fn address(&mut self, pod: &Pod) -> Ipv4Addr {
        let uid = pod.uid().unwrap_or_default();
        if let Some(ip) = self.addresses.get(&uid) {
            return *ip;
        }
        let ip = Ipv4Addr::from(self.next_address);
        // Skip .0, .1 and .255 of each /24, keep within 127/8.
        self.next_address += 1;
        while matches!(self.next_address & 0xff, 0 | 1 | 255) {
            self.next_address += 1;
        }
        if self.next_address >> 24 != 127 {
            self.next_address = u32::from(Ipv4Addr::new(127, 1, 1, 2));
        }
        self.addresses.insert(uid, ip);
        ip
    }

    /// Converges each Deployment's pods to its template and replica count. Pods carry a
    /// hash of the template they were made from; a changed template replaces them
    /// (the `Recreate` strategy).
    async fn deployments(&self, all: &[Pod]) -> kube::Result<()> {
        let deployments: Api<Deployment> = Api::all(self.client.clone());
        for d in deployments.list(&ListParams::default()).await?.items {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ns = d.namespace().unwrap_or_default();
            let uid = d.uid().unwrap_or_default();
            let spec = d.spec.clone();
            let template = serde_json::to_value(&spec.template).unwrap_or_default();
            let hash = format!(
                "{:010x}",
                fnv(template.to_string().as_bytes()) & 0xff_ffff_ffff
            );
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let owned: Vec<&Pod> = all
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.owner_references().iter().any(|o| o.uid == uid)
                })
                .collect();
            let mut keep = vec![];
            for p in owned {
                let current = p.labels().get("pod-template-hash") == Some(&hash);
                if current && !finished(p) {
                    keep.push(p);
                } else {
                    let _ = pods.delete(&p.name_any(), &Default::default()).await;
                }
            }
            let want = spec.replicas.unwrap_or(1).max(0) as usize;
            for extra in keep.iter().skip(want) {
                let _ = pods.delete(&extra.name_any(), &Default::default()).await;
            }
            for _ in keep.len()..want {
                let mut pod = template.clone();
                let name = format!("{}-{hash}-{:05x}", d.name_any(), rand_u32() & 0xfffff);
                pod["apiVersion"] = json!("v1");
                pod["kind"] = json!("Pod");
                pod["metadata"]["name"] = json!(name);
                pod["metadata"]["namespace"] = json!(ns);
                pod["metadata"]["labels"]["pod-template-hash"] = json!(hash);
                pod["metadata"]["ownerReferences"] = json!([{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": d.name_any(),
                    "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
                let pod: Pod = match serde_json::from_value(pod) {
                    Ok(pod) => pod,
                    Err(e) => {
                        eprintln!("process kubelet: deployment {}: {e}", d.name_any());
                        continue;
                    }
                };
                pods.create(&Default::default(), &pod).await?;
            }
            let ready = keep
                .iter()
                .take(want)
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count() as i32;
            let status = json!({"status": {
                "observedGeneration": d.metadata.generation,
                "replicas": keep.len().min(want), "updatedReplicas": keep.len().min(want),
                "readyReplicas": ready, "availableReplicas": ready,
            }});
            let current = d
                .status
                .as_ref()
                .map(|s| (s.ready_replicas, s.observed_generation));
            if current != Some((Some(ready), d.metadata.generation)) {
                Api::<Deployment>::namespaced(self.client.clone(), &ns)
                    .patch_status(
                        &d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Gives each `LoadBalancer` Service the address of a running pod it selects.
    async fn load_balancers(&self, all: &[Pod]) -> kube::Result<()> {
        let services: Api<Service> = Api::all(self.client.clone());
        for svc in services.list(&ListParams::default()).await?.items {
            let Some(spec) = &svc.spec else { continue };
            if spec.type_.as_deref() != Some("LoadBalancer") {
                continue;
            }
            let ns = svc.namespace().unwrap_or_default();
            let selector = spec.selector.clone().unwrap_or_default();
            let ip = all
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                .filter_map(|p| {
                    let s = p.status.as_ref()?;
                    (s.phase.as_deref() == Some("Running")).then(|| s.pod_ip.clone())?
                })
                .next();
            let ingress = ip.map_or(json!([]), |ip| json!([{"ip": ip}]));
            let current = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .map_or(json!([]), |i| serde_json::to_value(i).unwrap_or_default());
            if current != ingress {
                let status = json!({"status": {"loadBalancer": {"ingress": ingress}}});
                Api::<Service>::namespaced(self.client.clone(), &ns)
                    .patch_status(
                        &svc.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// Expands `$(NAME)` from `vars` as Kubernetes does: unknown references stay as they are
/// and `$$` escapes a `$`.
fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = vars.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
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

/// Writes a pod's status (a merge patch of the status subresource).
async fn report(pods: &Api<Pod>, name: &str, status: serde_json::Value) -> kube::Result<()> {
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map(drop)
}

fn waiting(container: &Container, reason: &str, message: &str) -> serde_json::Value {
    json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": container.name, "image": container.image, "imageID": "", "ready": false,
        "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}})
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A pod's process being stopped: SIGTERM first, SIGKILL when its grace period is over.
struct Stopping {
    child: tokio::process::Child,
    uid: String,
    kill_at: Instant,
}

impl Stopping {
    fn begin(mut proc: Process, grace: Duration) -> Self {
        if let Ok(None) = proc.child.try_wait()
            && let Some(pid) = proc.child.id()
        {
            // SAFETY: signalling a child process we own.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        Self {
            child: proc.child,
            uid: proc.uid,
            kill_at: Instant::now() + grace,
        }
    }

    /// Whether the process still runs, killing it once its time is up.
    fn still_running(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return false;
        }
        if Instant::now() >= self.kill_at {
            let _ = self.child.start_kill();
        }
        true
    }
}

#[cfg(test)]
mod tests {
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
