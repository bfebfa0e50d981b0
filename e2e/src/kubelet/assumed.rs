//! What the kubelet has written that its watches may not show yet. A watch shows a
//! write a moment after it is made, and the kubelet may look again in between (woken by
//! another change): without this it would bind a pod twice (or two pods to room for
//! one), create a Deployment's pods again, or start a finished pod once more. Like a
//! scheduler's assumed pods and a controller's expectations, each entry lasts until the
//! watch shows the write (or, for the ones that could be lost, for a while).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::ResourceExt;
use tokio::time::Instant;

use super::finished;

/// How long a write that the watch does not show is assumed to have happened.
const ASSUME_FOR: Duration = Duration::from_secs(30);

/// Writes not yet seen, by pod uid.
#[derive(Default)]
pub(super) struct Assumed {
    /// Pods bound to a node, and the node.
    bound: HashMap<String, (String, Instant)>,
    /// Pods the Deployment controller created.
    created: HashMap<String, (Pod, Instant)>,
    /// Pods the Deployment controller deleted.
    deleted: HashMap<String, Instant>,
    /// Deleted pods the kubelet removed for good (once their process had stopped).
    removed: HashSet<String>,
    /// Pods the kubelet reported finished, and their phase.
    finished: HashMap<String, &'static str>,
}

impl Assumed {
    pub(super) fn bound(&mut self, pod: &Pod, node: &str) {
        let at = Instant::now();
        self.bound
            .insert(pod.uid().unwrap_or_default(), (node.into(), at));
    }

    pub(super) fn created(&mut self, pod: Pod) {
        let at = Instant::now();
        self.created
            .insert(pod.uid().unwrap_or_default(), (pod, at));
    }

    pub(super) fn deleted(&mut self, pod: &Pod) {
        let at = Instant::now();
        self.deleted.insert(pod.uid().unwrap_or_default(), at);
    }

    pub(super) fn removed(&mut self, pod: &Pod) {
        self.removed.insert(pod.uid().unwrap_or_default());
    }

    pub(super) fn finished(&mut self, pod: &Pod, phase: &'static str) {
        self.finished.insert(pod.uid().unwrap_or_default(), phase);
    }

    /// Whether the Deployment controller has deleted `pod`, as far as the kubelet knows.
    pub(super) fn is_deleted(&self, pod: &Pod) -> bool {
        pod.metadata.deletion_timestamp.is_some()
            || self.deleted.contains_key(&pod.uid().unwrap_or_default())
    }

    /// Whether the kubelet has removed `pod` for good.
    pub(super) fn is_removed(&self, pod: &Pod) -> bool {
        self.removed.contains(&pod.uid().unwrap_or_default())
    }

    /// The pods as the kubelet's own writes leave them: the watched ones with what the
    /// watch does not show yet, and the ones created that it has not shown at all.
    pub(super) fn view(&mut self, watched: Vec<Arc<Pod>>, now: Instant) -> Vec<Pod> {
        self.forget(&watched, now);
        let mut pods: Vec<Pod> = watched.iter().map(|p| Pod::clone(p)).collect();
        for pod in &mut pods {
            let uid = pod.uid().unwrap_or_default();
            if let Some((node, _)) = self.bound.get(&uid)
                && let Some(spec) = pod.spec.as_mut()
            {
                spec.node_name = Some(node.clone());
            }
            if let Some(phase) = self.finished.get(&uid) {
                let status = pod.status.get_or_insert_with(PodStatus::default);
                status.phase = Some((*phase).into());
            }
        }
        pods.extend(self.created.values().map(|(pod, _)| pod.clone()));
        pods
    }

    /// Forgets what the watch now shows (or what has been assumed long enough).
    fn forget(&mut self, watched: &[Arc<Pod>], now: Instant) {
        let by_uid: HashMap<String, &Pod> = watched
            .iter()
            .map(|p| (p.uid().unwrap_or_default(), p.as_ref()))
            .collect();
        let fresh = |at: &Instant| now.duration_since(*at) < ASSUME_FOR;
        self.bound.retain(|uid, (_, at)| {
            let shown = by_uid
                .get(uid)
                .is_some_and(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()));
            !shown && fresh(at)
        });
        self.created
            .retain(|uid, (_, at)| !by_uid.contains_key(uid) && fresh(at));
        self.deleted.retain(|uid, at| {
            let shown = by_uid
                .get(uid)
                .is_some_and(|p| p.metadata.deletion_timestamp.is_some());
            !shown && fresh(at)
        });
        // Held until the pod is gone: a finalizer may keep it for a while.
        self.removed.retain(|uid| by_uid.contains_key(uid));
        self.finished
            .retain(|uid, _| by_uid.get(uid).is_some_and(|p| !finished(p)));
    }
}
