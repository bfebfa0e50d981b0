//! Node registration: each configured node with its capacity and a Ready condition.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Kubelet, now};

impl Kubelet {
    /// Creates or refreshes every node with its capacity and a Ready condition.
    pub(super) async fn register_nodes(&self) -> kube::Result<()> {
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
                "nodeInfo": {"kubeletVersion": "v1.32.0+starling-e2e", "operatingSystem": "linux",
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
}
