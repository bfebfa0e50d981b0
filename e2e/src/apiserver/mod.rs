//! A Kubernetes API test server: the real HTTP API, in memory, for tests and the demo.
//!
//! It serves discovery, the built-in kinds Starling uses and whatever
//! CustomResourceDefinitions are created, with get/list/watch/create/update/patch/delete,
//! the status subresource, optimistic concurrency, finalizers and `Status` errors, well
//! enough that kube-rs clients, watchers and controllers cannot tell it from a cluster.
//! It is test infrastructure, not an API server: see `e2e/README.md` for what it does
//! not do.

mod error;
mod http;
mod openapi;
mod registry;
mod schema;
mod selector;
mod store;
mod table;

use std::sync::{Arc, Mutex, RwLock};

use serde_json::json;
use tokio::sync::watch;

pub use error::ApiError;
pub use registry::{Registry, ResourceType};
pub use store::Store;

/// The server's state; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    registry: RwLock<Registry>,
    store: Mutex<Store>,
    /// Bumped to end every open watch (as an API server restart would).
    watch_epoch: watch::Sender<u64>,
}

/// A server listening on loopback.
pub struct Running {
    pub url: String,
    pub server: ApiServer,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// A kubeconfig for this server (no auth yet: every client is admin).
    pub fn kubeconfig(&self, cluster: &str) -> String {
        kubeconfig(&self.url, cluster)
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A kubeconfig with one cluster, user and context named `name`.
pub fn kubeconfig(url: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {url}\n\
         users:\n- name: {name}\n  user: {{}}\ncontexts:\n- name: {name}\n  context:\n    \
         cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n"
    )
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// An empty cluster with the namespaces every cluster has.
    pub fn new() -> Self {
        let registry = Registry::builtin();
        let mut store = Store::default();
        let namespaces = registry
            .find("", "v1", "namespaces")
            .expect("built in")
            .clone();
        for ns in ["default", "kube-system", "kube-public"] {
            let object = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns}, "status": {"phase": "Active"},
            });
            store
                .create(&namespaces, "", object, Default::default())
                .expect("a fresh store");
        }
        let (watch_epoch, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                registry: RwLock::new(registry),
                store: Mutex::new(store),
                watch_epoch,
            }),
        }
    }

    /// Serves on `127.0.0.1:port` (0 picks a free port).
    pub async fn start(self, port: u16) -> std::io::Result<Running> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = http::router(self.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Running {
            url,
            server: self,
            task,
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the change history and ends every open watch, as an API server restart
    /// does: watchers come back with a version that is now too old (410) and relist.
    pub fn compact_and_drop_watches(&self) {
        self.store().compact();
        self.inner.watch_epoch.send_modify(|e| *e += 1);
    }
}
