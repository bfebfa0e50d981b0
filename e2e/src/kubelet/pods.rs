//! A pass over the cluster: the pods of deleted or replaced objects lose their process,
//! deleted pods whose process has stopped are removed, pending pods are scheduled, the
//! Deployment controller and load balancer converge, and this kubelet's pods are started,
//! restarted or finished as their processes require.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use tokio::time::Instant;

use super::watch::Cache;
use super::{Kubelet, RESYNC, Stopping, finished};

/// A pod's key: namespace and name.
fn key(pod: &Pod) -> (String, String) {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

impl Kubelet {
    /// Acts on the cluster as watched (and as the kubelet's own writes leave it); `now`
    /// says which timers are due.
    pub(super) async fn sync(&mut self, cache: &Cache, now: Instant) -> kube::Result<()> {
        let all = self.assumed.view(cache.pods.state(), now);
        let present: std::collections::HashSet<String> =
            all.iter().filter_map(|p| p.uid()).collect();
        self.retry_at.retain(|uid, _| present.contains(uid));
        self.stop_gone(&all);
        self.remove_deleted(&all).await;
        self.schedule(&all).await?;
        self.deployments(cache, &all).await?;
        self.jobs(cache, &all).await?;
        self.load_balancers(cache, &all).await?;
        self.run_pods(&all, now).await
    }

    /// Whether `pod` is bound to one of this kubelet's nodes.
    fn mine(&self, pod: &Pod) -> bool {
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| self.config.nodes.iter().any(|c| c.name == n))
    }

    /// This kubelet's pods that are not being deleted, by key.
    fn live<'a>(&self, all: &'a [Pod]) -> HashMap<(String, String), &'a Pod> {
        all.iter()
            .filter(|p| self.mine(p) && p.metadata.deletion_timestamp.is_none())
            .map(|p| (key(p), p))
            .collect()
    }

    /// Pods that went away (or are being deleted) lose their process, within their grace
    /// period.
    fn stop_gone(&mut self, all: &[Pod]) {
        let live = self.live(all);
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
            let Some(proc) = self.processes.remove(&key) else {
                continue;
            };
            if proc.exit.is_some() {
                continue; // Already stopped (or crashed, waiting for its restart).
            }
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

    /// A deleted pod whose process has stopped (or never ran) is removed for good.
    async fn remove_deleted(&mut self, all: &[Pod]) {
        let deleted: Vec<&Pod> = all
            .iter()
            .filter(|p| {
                self.mine(p)
                    && p.metadata.deletion_timestamp.is_some()
                    && !self.assumed.is_removed(p)
            })
            .collect();
        for pod in deleted {
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
            match pods.delete(&pod.name_any(), &finally).await {
                Ok(_) => self.assumed.removed(pod),
                Err(kube::Error::Api(e)) if e.code == 404 => self.assumed.removed(pod),
                Err(e) => {
                    eprintln!("process kubelet: removing pod {}: {e}", pod.name_any());
                    self.resync_at = Some(Instant::now() + RESYNC);
                }
            }
        }
    }

    /// Starts this kubelet's pods that have no process, restarts those whose back-off is
    /// over and reports those whose process has exited.
    async fn run_pods(&mut self, all: &[Pod], now: Instant) -> kube::Result<()> {
        let live = self.live(all);
        for pod in live.values().filter(|p| !finished(p)) {
            let uid = pod.uid().unwrap_or_default();
            if self.retry_at.get(&uid).is_some_and(|at| *at > now) {
                continue;
            }
            match self.processes.get(&key(pod)) {
                None => self.start(pod, 0).await?,
                Some(proc) => match (proc.restart_at, proc.exit) {
                    (Some(at), _) if at <= now => {
                        let restarts = proc.restarts;
                        self.start(pod, restarts).await?;
                    }
                    (None, Some(code)) => self.exited(pod, code).await?,
                    _ => {}
                },
            }
        }
        Ok(())
    }
}
