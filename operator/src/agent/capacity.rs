//! GPU capacity by product, as the agent reports it in its MemberCluster's status.
//!
//! Placement on the hub matches runs to GPU products, so capacity is counted per
//! `nvidia.com/gpu.product` node label rather than as one number. It is a pure function
//! of the member's nodes and the agent's pods so that it can be tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use crate::api::GpuCapacity;

use crate::k8s::{GPU_PRODUCT_LABEL as PRODUCT_LABEL, GPU_RESOURCE};
/// The product of nodes without a product label.
pub const UNKNOWN_PRODUCT: &str = "unknown";

fn node_gpus(node: &Node) -> u32 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(GPU_RESOURCE))
        .and_then(|q| q.0.parse::<u32>().ok())
        .unwrap_or(0)
}

fn pod_gpus(pod: &Pod) -> u32 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| crate::k8s::gpus(c.resources.as_ref()))
        .sum()
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Allocatable GPUs per product over the nodes that have any, and the GPUs the given
/// pods hold on them (by their `nvidia.com/gpu` limits) while they have not finished.
/// Pods on no node, or on a node not listed, hold nothing here.
pub fn gpu_capacity<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<GpuCapacity> {
    let mut by_product: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let mut node_product: BTreeMap<String, String> = BTreeMap::new();
    for node in nodes {
        let product = node
            .labels()
            .get(PRODUCT_LABEL)
            .cloned()
            .unwrap_or_else(|| UNKNOWN_PRODUCT.into());
        let gpus = node_gpus(node);
        if gpus > 0 {
            by_product.entry(product.clone()).or_default().0 += gpus;
        }
        node_product.insert(node.name_any(), product);
    }
    for pod in pods.into_iter().filter(|p| !finished(p)) {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_ref());
        if let Some(product) = node.and_then(|n| node_product.get(n)) {
            by_product.entry(product.clone()).or_default().1 += pod_gpus(pod);
        }
    }
    by_product
        .into_iter()
        .map(|(product, (allocatable, in_use))| GpuCapacity {
            product,
            allocatable,
            in_use,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, product: Option<&str>, gpus: u32) -> Node {
        let labels = product.map(|p| json!({PRODUCT_LABEL: p}));
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "8", GPU_RESOURCE: gpus.to_string()}},
        }))
        .unwrap()
    }

    fn pod(node: Option<&str>, gpus: u32, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "trainer",
                    "resources": {"limits": {GPU_RESOURCE: gpus.to_string()}}}],
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn gpu(product: &str, allocatable: u32, in_use: u32) -> GpuCapacity {
        GpuCapacity {
            product: product.into(),
            allocatable,
            in_use,
        }
    }

    /// A name, the nodes and pods observed, and the capacity reported.
    type Case = (&'static str, Vec<Node>, Vec<Pod>, Vec<GpuCapacity>);

    #[test]
    fn capacity_is_counted_per_gpu_product() {
        let cases: Vec<Case> = vec![
            (
                "two products are reported apart, each with the pods on its nodes",
                vec![
                    node("a", Some("H100"), 8),
                    node("b", Some("H100"), 8),
                    node("c", Some("A10"), 1),
                ],
                vec![
                    pod(Some("a"), 2, "Running"),
                    pod(Some("b"), 1, "Pending"),
                    pod(Some("c"), 1, "Running"),
                ],
                vec![gpu("A10", 1, 1), gpu("H100", 16, 3)],
            ),
            (
                "a node without the product label counts as unknown",
                vec![node("a", None, 2), node("b", Some("L4"), 1)],
                vec![pod(Some("a"), 1, "Running")],
                vec![gpu("L4", 1, 0), gpu(UNKNOWN_PRODUCT, 2, 1)],
            ),
            (
                "finished pods hold no GPUs",
                vec![node("a", Some("H100"), 4)],
                vec![
                    pod(Some("a"), 1, "Succeeded"),
                    pod(Some("a"), 1, "Failed"),
                    pod(Some("a"), 1, "Running"),
                ],
                vec![gpu("H100", 4, 1)],
            ),
            (
                "unscheduled pods and pods on unknown nodes hold nothing",
                vec![node("a", Some("H100"), 4)],
                vec![pod(None, 1, "Pending"), pod(Some("gone"), 1, "Running")],
                vec![gpu("H100", 4, 0)],
            ),
            (
                "nodes without GPUs are not listed",
                vec![node("cpu", Some("H100"), 0), node("gpu", Some("A10"), 2)],
                vec![],
                vec![gpu("A10", 2, 0)],
            ),
            (
                "a cluster without nodes has no capacity",
                vec![],
                vec![],
                vec![],
            ),
        ];
        for (name, nodes, pods, want) in cases {
            assert_eq!(gpu_capacity(&nodes, &pods), want, "{name}");
        }
    }
}
