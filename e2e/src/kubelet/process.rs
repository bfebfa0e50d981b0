//! Process lifecycle: a pod's container runs as a local process of the binary its image
//! names; exits restart it (with back-off) or finish the pod, and a deleted pod's process
//! gets its grace period (SIGTERM, then SIGKILL).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::env::expand;
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

pub(super) struct Process {
    pub(super) child: tokio::process::Child,
    pub(super) uid: String,
    pub(super) started: String,
    pub(super) restarts: i32,
    /// When the container may start again after a crash (back-off).
    pub(super) restart_at: Option<Instant>,
}

impl Kubelet {
    /// Starts (or restarts) a pod's container and reports it running.
    pub(super) async fn start(&mut self, pod: &Pod, restarts: i32) -> kube::Result<()> {
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

pub(super) fn waiting(container: &Container, reason: &str, message: &str) -> serde_json::Value {
    json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": container.name, "image": container.image, "imageID": "", "ready": false,
        "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}})
}

pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A pod's process being stopped: SIGTERM first, SIGKILL when its grace period is over.
pub(super) struct Stopping {
    pub(super) child: tokio::process::Child,
    pub(super) uid: String,
    pub(super) kill_at: Instant,
}

impl Stopping {
    pub(super) fn begin(mut proc: Process, grace: Duration) -> Self {
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
    pub(super) fn still_running(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return false;
        }
        if Instant::now() >= self.kill_at {
            let _ = self.child.start_kill();
        }
        true
    }
}
