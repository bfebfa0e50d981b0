//! A federation of local clusters: a hub and members, each its own API test server and
//! process kubelet, with a kubeconfig per cluster for Rust tests and the shell alike.

use std::path::{Path, PathBuf};

use kube::Client;

use crate::apiserver::{ApiServer, Running};
use crate::kubelet::{InCluster, Kubelet, KubeletConfig, NodeConfig};

/// What one cluster has.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub nodes: Vec<NodeConfig>,
}

impl ClusterSpec {
    /// A cluster of one node with `gpus` GPUs.
    pub fn single_node(name: &str, gpus: u32) -> Self {
        Self {
            name: name.into(),
            nodes: vec![NodeConfig::new(&format!("{name}-node-0"), 16.0, 64.0, gpus)],
        }
    }
}

/// One running cluster.
pub struct LocalCluster {
    pub name: String,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub client: Client,
    server: Option<Running>,
    kubelet: tokio::task::JoinHandle<kube::Result<()>>,
}

impl LocalCluster {
    /// Starts a cluster's server and kubelet; its kubeconfig and pods' directories go
    /// under `dir/<name>/`.
    pub async fn start(
        spec: &ClusterSpec,
        images: &[(String, PathBuf)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let home = dir.join(&spec.name);
        std::fs::create_dir_all(&home)?;
        let server = ApiServer::new().start(0).await?;
        let kubeconfig = home.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig(&spec.name))?;
        let client = server.client();
        let config = KubeletConfig {
            nodes: spec.nodes.clone(),
            images: images.to_vec(),
            work_dir: home.join("pods"),
            in_cluster: InCluster::new(&server.url, &server.ca_pem),
        };
        let kubelet = tokio::spawn(Kubelet::new(client.clone(), config).run());
        Ok(Self {
            name: spec.name.clone(),
            url: server.url.clone(),
            kubeconfig,
            client,
            server: Some(server),
            kubelet,
        })
    }

    /// A kubeconfig for this cluster authenticating as `token` (which must be known to
    /// the server, see [`ApiServer::add_token`]).
    pub fn kubeconfig_with_token(&self, token: &str) -> Option<String> {
        let running = self.server.as_ref()?;
        Some(crate::apiserver::kubeconfig(
            &running.url,
            &self.name,
            &running.ca_pem,
            token,
        ))
    }

    /// A client authenticating as `token`.
    pub fn client_with_token(&self, token: &str) -> Option<Client> {
        Some(self.server.as_ref()?.client_with_token(token))
    }

    /// The cluster's server, for test hooks.
    pub fn server(&self) -> Option<&ApiServer> {
        self.server.as_ref().map(|r| &r.server)
    }

    /// Cuts the cluster off as a power cut would: the kubelet (and with it every pod's
    /// process) and the API server stop; nothing is cleaned up or reported.
    pub fn go_dark(&mut self) {
        self.kubelet.abort();
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.go_dark();
    }
}

/// The images a local cluster can run: Starling's, as the binaries built next to
/// `exe_dir` (the running test or `starling-e2e` binary's directory, or its parent for
/// test binaries under `deps/`).
pub fn starling_images(exe_dir: &Path) -> Vec<(String, PathBuf)> {
    let find = |name: &str| {
        [exe_dir.join(name), exe_dir.join("..").join(name)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| exe_dir.join(name))
    };
    vec![
        ("*/starling-trainer*".into(), find("starling-trainer")),
        ("*/starling-operator*".into(), find("starling-operator")),
    ]
}

/// A hub and its members.
pub struct LocalClusters {
    pub hub: LocalCluster,
    pub members: Vec<LocalCluster>,
}

impl LocalClusters {
    pub async fn start(
        hub: &ClusterSpec,
        members: &[ClusterSpec],
        images: &[(String, PathBuf)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let hub = LocalCluster::start(hub, images, dir).await?;
        let mut started = vec![];
        for m in members {
            started.push(LocalCluster::start(m, images, dir).await?);
        }
        Ok(Self {
            hub,
            members: started,
        })
    }

    pub fn member(&mut self, name: &str) -> Option<&mut LocalCluster> {
        self.members.iter_mut().find(|m| m.name == name)
    }
}
