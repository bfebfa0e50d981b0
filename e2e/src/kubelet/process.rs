//! Process lifecycle: a pod's container runs as a local process of the binary its image
//! names; exits restart it (with back-off) or finish the pod, and a deleted pod's process
//! gets its grace period (SIGTERM, then SIGKILL).
//!
//! Each process is watched by a task of its own, which reports its exit to the kubelet
//! (so the kubelet learns of exits when they happen, without polling) and passes on the
//! kubelet's signals. A process whose kubelet is gone is killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::env::{confine, expand};
use super::volumes::may_mount;
use super::{Kubelet, now};

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

/// How long a container that could not be started (its image, configuration or binary)
/// waits before the kubelet tries again.
pub(super) const START_RETRY: Duration = Duration::from_secs(1);

/// A signal for a pod's process, passed on by the task that watches it.
#[derive(Clone, Copy, Debug)]
enum Signal {
    Term,
    Kill,
}

/// A process has exited: which one (see [`Process::id`]) and its exit code.
#[derive(Debug)]
pub(super) struct Exit {
    pub(super) id: u64,
    pub(super) code: i32,
}

/// The kubelet's end of a process: signals go to the task that watches it; dropping it
/// kills the process.
struct Handle {
    signals: mpsc::UnboundedSender<Signal>,
}

impl Handle {
    fn send(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }
}

/// Watches `child` until it exits, then reports its exit code as `id`'s on `exits`.
fn supervise(
    mut child: tokio::process::Child,
    id: u64,
    exits: mpsc::UnboundedSender<Exit>,
) -> Handle {
    let (signals, mut received) = mpsc::unbounded_channel();
    let pid = child.id();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            // Ends at SIGKILL, or when the kubelet is gone.
            _ = async {
                while let Some(Signal::Term) = received.recv().await {
                    if let Some(pid) = pid {
                        // SAFETY: signalling our own child, not yet reaped (reaping it
                        // ends this select).
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                    }
                }
            } => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let code = status.map_or(128 + libc::SIGKILL, exit_code);
        let _ = exits.send(Exit { id, code });
    });
    Handle { signals }
}

/// A pod's container process (or, between a crash and its restart, the memory of it).
pub(super) struct Process {
    /// Unique among the kubelet's processes: exits are matched by it.
    pub(super) id: u64,
    handle: Handle,
    pub(super) uid: String,
    pub(super) started: String,
    pub(super) restarts: i32,
    /// The exit code, once the process has exited.
    pub(super) exit: Option<i32>,
    /// When the container may start again after a crash (back-off).
    pub(super) restart_at: Option<Instant>,
}

/// A pod's process being stopped: SIGTERM first, SIGKILL when its grace period is over.
pub(super) struct Stopping {
    pub(super) id: u64,
    handle: Handle,
    pub(super) uid: String,
    /// When it is killed; `None` once it has been.
    pub(super) kill_at: Option<Instant>,
}

impl Stopping {
    /// Asks a running process to stop, within `grace`.
    pub(super) fn begin(proc: Process, grace: Duration) -> Self {
        proc.handle.send(Signal::Term);
        Self {
            id: proc.id,
            handle: proc.handle,
            uid: proc.uid,
            kill_at: Some(Instant::now() + grace),
        }
    }

    /// Kills the process if its grace period is over.
    pub(super) fn enforce(&mut self, now: Instant) {
        if self.kill_at.is_some_and(|at| at <= now) {
            self.handle.send(Signal::Kill);
            self.kill_at = None;
        }
    }
}

/// Why a container could not start, as its waiting state says.
struct Refusal {
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

impl Kubelet {
    /// Starts (or restarts) a pod's container and reports it running; a container that
    /// cannot start is reported waiting, and tried again after [`START_RETRY`].
    pub(super) async fn start(&mut self, pod: &Pod, restarts: i32) -> kube::Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.as_ref().expect("scheduled pods have a spec");
        let Some(container) = spec.containers.first() else {
            return Ok(());
        };
        let (child, ip) = match self.launch(pod, container).await {
            Ok(launched) => launched,
            Err(refusal) => {
                self.retry_at.insert(uid, Instant::now() + START_RETRY);
                return refuse(&pods, pod, container, &refusal).await;
            }
        };
        self.retry_at.remove(&uid);
        let started = now();
        report(
            &pods,
            &name,
            running(pod, container, ip, restarts, &started),
        )
        .await?;
        self.next_process += 1;
        let id = self.next_process;
        let handle = supervise(child, id, self.exits.clone());
        let process = Process {
            id,
            handle,
            uid,
            started,
            restarts,
            exit: None,
            restart_at: None,
        };
        self.processes.insert((ns, name), process);
        Ok(())
    }

    /// Spawns the container's process, with its environment, in the pod's directory.
    async fn launch(
        &mut self,
        pod: &Pod,
        container: &Container,
    ) -> Result<(tokio::process::Child, std::net::Ipv4Addr), Refusal> {
        let image = container.image.clone().unwrap_or_default();
        let Some(binary) = resolve_image(&self.config.images, &image).cloned() else {
            let message =
                format!("image {image} is not one the process kubelet can run (a Starling image)");
            return Err(Refusal::new("ErrImagePull", message));
        };
        let ip = self.address(pod);
        let env = self
            .env(pod, container, ip)
            .await
            .map_err(|message| Refusal::new("CreateContainerConfigError", message))?;
        let dir = self.config.work_dir.join(format!(
            "{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        ));
        let (out, err) = log_files(&dir, &container.name)?;
        let mut mounts = self
            .mounts(pod, container, &dir)
            .await
            .map_err(|message| Refusal::new("CreateContainerConfigError", message))?;
        if !mounts.binds.is_empty() && !may_mount() {
            eprintln!(
                "process kubelet: not root, so pod {}'s volumes and ServiceAccount token are written \
                 under {} but not mounted",
                pod.name_any(),
                dir.display()
            );
            mounts.binds.clear();
        }
        mounts
            .prepare()
            .map_err(|message| Refusal::new("CreateContainerConfigError", message))?;
        let args: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(container.args.iter().flatten())
            .map(|a| confine(&expand(a, &env), ip))
            .collect();
        let env = env.into_iter().map(|(k, v)| (k, confine(&v, ip)));
        let mut command = tokio::process::Command::new(&binary);
        command
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(mounts.env.clone())
            .envs(env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // SAFETY: `enter` makes only system calls (see there).
        unsafe { command.pre_exec(move || mounts.enter()) };
        let child = command
            .spawn()
            .map_err(|e| Refusal::new("RunContainerError", format!("{}: {e}", binary.display())))?;
        Ok((child, ip))
    }

    /// A container exited: restart it (with back-off) or finish the pod, per its
    /// `restartPolicy`.
    pub(super) async fn exited(&mut self, pod: &Pod, code: i32) -> kube::Result<()> {
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
            // Not ready until it runs again: a crash-looping pod is no ready replica.
            json!({"status": {"phase": "Running",
            "conditions": conditions(Some(&container.name), &now()),
            "containerStatuses": [{
                "name": container.name, "image": container.image, "imageID": "", "ready": false,
                "started": false, "restartCount": proc.restarts, "lastState": terminated,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {}", container.name)}},
            }]}})
        } else {
            let restarts = proc.restarts;
            self.processes.remove(&key);
            let phase = if code == 0 { "Succeeded" } else { "Failed" };
            self.assumed.finished(pod, phase);
            let previous = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first());
            json!({"status": {"phase": phase,
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{
                "name": container.name, "image": container.image, "imageID": "", "ready": false,
                "started": false, "restartCount": restarts,
                "lastState": previous.and_then(|c| c.last_state.clone()),
                "state": terminated,
            }]}})
        };
        report(&pods, &name, status).await?;
        Ok(())
    }
}

/// The container's log, opened for its output and its errors.
fn log_files(dir: &Path, container: &str) -> Result<(std::fs::File, std::fs::File), Refusal> {
    let _ = std::fs::create_dir_all(dir);
    let log = dir.join(format!("{container}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|f| Ok((f.try_clone()?, f)))
        .map_err(|e| Refusal::new("RunContainerError", format!("{}: {e}", log.display())))
}

/// A started pod's conditions: ready since `since`, or not ready (since then) because
/// container `unready` is not running.
fn conditions(unready: Option<&str>, since: &str) -> serde_json::Value {
    let ready = |type_: &str| match unready {
        None => json!({"type": type_, "status": "True", "lastTransitionTime": since}),
        Some(container) => json!({"type": type_, "status": "False",
            "reason": "ContainersNotReady", "lastTransitionTime": since,
            "message": format!("containers with unready status: [{container}]")}),
    };
    json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        ready("ContainersReady"),
        ready("Ready"),
    ])
}

/// A running container's pod status.
fn running(
    pod: &Pod,
    container: &Container,
    ip: std::net::Ipv4Addr,
    restarts: i32,
    started: &str,
) -> serde_json::Value {
    json!({"status": {
        "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map_or(json!(started), |t| json!(t)),
        "conditions": conditions(None, started),
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": true,
            "started": true, "restartCount": restarts,
            "state": {"running": {"startedAt": started}},
            "lastState": pod.status.as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.last_state.clone()),
        }],
    }})
}

/// Reports a container that could not start as waiting, unless the pod already says so
/// (its start is retried; an unchanged refusal costs no write).
async fn refuse(
    pods: &Api<Pod>,
    pod: &Pod,
    container: &Container,
    refusal: &Refusal,
) -> kube::Result<()> {
    let said = pod
        .status
        .as_ref()
        .filter(|s| s.phase.as_deref() == Some("Pending"))
        .and_then(|s| {
            s.container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?
                .waiting
                .as_ref()
        })
        .is_some_and(|w| {
            w.reason.as_deref() == Some(refusal.reason)
                && w.message.as_deref() == Some(&refusal.message)
        });
    if said {
        return Ok(());
    }
    let status = waiting(container, refusal.reason, &refusal.message);
    report(pods, &pod.name_any(), status).await
}

/// Writes a pod's status (a merge patch of the status subresource).
pub(super) async fn report(
    pods: &Api<Pod>,
    name: &str,
    status: serde_json::Value,
) -> kube::Result<()> {
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
