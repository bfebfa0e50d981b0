//! Scheduling: pending pods are bound to the first node they fit on (resource requests,
//! nodeSelector, taints and tolerations), or told why none fits.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Taint, Toleration};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::process::report;
use super::{Kubelet, NodeConfig, finished, now};

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
pub(super) fn requests(c: &Container) -> (f64, f64, f64) {
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

pub(super) fn pod_requests(pod: &Pod) -> (f64, f64, f64) {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(requests)
        .fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2))
}

pub(super) fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
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

/// Why pods do not fit on nodes, and on how many.
type Reasons = BTreeMap<&'static str, usize>;

/// The first node `pod` fits on, given what the pods in `all` and `bound` use; or why
/// none fits.
fn place<'a>(
    nodes: &'a [NodeConfig],
    pod: &Pod,
    all: &[Pod],
    bound: &[Pod],
) -> Result<&'a NodeConfig, Reasons> {
    let spec = pod.spec.as_ref().expect("pods to schedule have a spec");
    let (cpu, memory, gpus) = pod_requests(pod);
    let mut reasons = Reasons::new();
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
            .chain(bound)
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
    chosen.ok_or(reasons)
}

/// The pod's `PodScheduled=False` message, if it has one.
fn unschedulable(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
        .message
        .as_deref()
}

impl Kubelet {
    /// Binds each pending pod to the first node it fits on, or says why none fits.
    pub(super) async fn schedule(&mut self, all: &[Pod]) -> kube::Result<()> {
        let nodes = &self.config.nodes;
        let pending = all.iter().filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
                && !finished(p)
        });
        let mut bound = vec![];
        for pod in pending {
            let pods: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            // Pods bound in this pass count against their node's room.
            match place(nodes, pod, all, &bound) {
                Ok(node) => {
                    let bind = json!({"spec": {"nodeName": node.name}});
                    pods.patch(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(bind),
                    )
                    .await?;
                    self.assumed.bound(pod, &node.name);
                    let mut placed = pod.clone();
                    placed.spec.get_or_insert_default().node_name = Some(node.name.clone());
                    bound.push(placed);
                    let status = json!({"status": {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]}});
                    report(&pods, &pod.name_any(), status).await?;
                }
                Err(reasons) => {
                    let why: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let message =
                        format!("0/{} nodes are available: {}.", nodes.len(), why.join(", "));
                    // Looked at again on every change; said again only when it changes.
                    if unschedulable(pod) == Some(message.as_str()) {
                        continue;
                    }
                    let status = json!({"status": {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": message, "lastTransitionTime": now()}]}});
                    report(&pods, &pod.name_any(), status).await?;
                }
            }
        }
        Ok(())
    }
}
