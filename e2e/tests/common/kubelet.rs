//! A one-node local cluster (API test server + process kubelet) and helpers, shared by
//! the kubelet's test binaries.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use serde_json::json;
use starling_e2e::apiserver::{ApiServer, Running};
use starling_e2e::kubelet::{InCluster, Kubelet, KubeletConfig, NodeConfig};

/// How long anything the kubelet should do may take before a test fails: generous, as
/// the machine may be busy, but finite, so a kubelet that never does it fails the test
/// instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub pods: Api<Pod>,
    pub client: Client,
    pub work_dir: tempfile::TempDir,
    pub _server: Running,
    pub _kubelet: tokio::task::JoinHandle<kube::Result<()>>,
}

pub async fn cluster() -> Cluster {
    let server = ApiServer::new().start(0).await.unwrap();
    let client = server.client();
    let work_dir = tempfile::tempdir().unwrap();
    let mut node = NodeConfig::new("node-a", 4.0, 8.0, 1);
    node.labels
        .insert("starling.dev/tier".into(), "home".into());
    let config = KubeletConfig {
        nodes: vec![node],
        images: vec![("example.com/sh".into(), PathBuf::from("/bin/sh"))],
        work_dir: work_dir.path().to_owned(),
        in_cluster: InCluster::new(&server.url, &server.ca_pem),
    };
    let kubelet = tokio::spawn(Kubelet::new(client.clone(), config).run());
    Cluster {
        pods: Api::namespaced(client.clone(), "default"),
        client,
        work_dir,
        _server: server,
        _kubelet: kubelet,
    }
}

pub fn pod(name: &str, restart: &str, script: &str, extra: serde_json::Value) -> Pod {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": restart, "containers": [{
            "name": "main", "image": "example.com/sh", "command": ["sh", "-c", script]}]},
    });
    json_patch::merge(&mut pod, &extra);
    serde_json::from_value(pod).unwrap()
}

/// Polls object `name` of `api` until `done` holds ([`PATIENCE`] at most); returns it.
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, done: impl Fn(&K) -> bool) -> K
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let start = std::time::Instant::now();
    loop {
        let object = api.get(name).await.unwrap();
        if done(&object) {
            return object;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{name} never {what}: {object:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Polls pod `name` until `done` holds ([`PATIENCE`] at most); returns it.
    pub async fn wait(&self, name: &str, what: &str, done: impl Fn(&Pod) -> bool) -> Pod {
        wait_for(&self.pods, name, what, done).await
    }
}

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn container(p: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    p.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .clone()
}
