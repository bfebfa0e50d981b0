//! A Kubernetes API test server: the real HTTP API, in memory, for tests and the demo.
//!
//! It serves discovery, the built-in kinds Starling uses and whatever
//! CustomResourceDefinitions are created, with get/list/watch/create/update/patch/delete,
//! the status subresource, optimistic concurrency, server-side apply with field
//! ownership, schema and CEL admission, finalizers, garbage collection and `Status`
//! errors, well enough that kube-rs clients, watchers and controllers and the real
//! kubectl cannot tell it from a cluster.
//! It is test infrastructure, not an API server: see `e2e/README.md` for what it does
//! not do.

mod auth;
mod builtin;
mod error;
mod http;
mod logs;
mod managed;
mod openapi;
mod printers;
mod protobuf;
mod registry;
mod requests;
mod schema;
mod selector;
mod services;
mod shape;
mod store;
mod strategic;
mod table;
mod tls;

use std::sync::{Arc, Mutex, RwLock};

use serde_json::json;
use tokio::sync::watch;

pub use auth::{Decision, User};
pub use error::ApiError;
pub(crate) use http::{param, query};
pub use registry::{Registry, ResourceType};
pub use requests::{RequestKey, resource_of};
pub use store::Store;

/// The server's state; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: RwLock<auth::Tokens>,
    admin_token: String,
    registry: RwLock<Registry>,
    store: Mutex<Store>,
    /// Bumped to end every open watch (as an API server restart would).
    watch_epoch: watch::Sender<u64>,
    /// Every request received, for benchmarks.
    requests: requests::Counts,
    /// Every authorisation decision, for RBAC tests.
    decisions: auth::Decisions,
}

/// A server listening on loopback over HTTPS.
pub struct Running {
    pub url: String,
    pub server: ApiServer,
    /// The CA that signed the server's certificate (PEM).
    pub ca_pem: String,
    ca_der: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// A kubeconfig for this server with its admin token.
    pub fn kubeconfig(&self, cluster: &str) -> String {
        kubeconfig(
            &self.url,
            cluster,
            &self.ca_pem,
            &self.server.inner.admin_token,
        )
    }

    /// A kube client authenticated as `token`'s user.
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().expect("the server's own URL"));
        config.auth_info.token = Some(token.to_owned().into());
        config.root_cert = Some(vec![self.ca_der.clone()]);
        kube::Client::try_from(config).expect("a client for the server")
    }

    /// A kube client with the admin token.
    pub fn client(&self) -> kube::Client {
        self.client_with_token(&self.server.inner.admin_token)
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

/// A kubeconfig with one cluster (trusting `ca_pem`), user (authenticated by `token`)
/// and context named `name`.
pub fn kubeconfig(url: &str, name: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {url}\n\
         \x20   certificate-authority-data: {ca}\n\
         users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  \
         context:\n    cluster: {name}\n    user: {name}\n    namespace: default\n\
         current-context: {name}\n"
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
        let mut created = vec![];
        for ns in ["default", "kube-system", "kube-public"] {
            let object = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns}, "status": {"phase": "Active"},
            });
            created.push(
                store
                    .create(&namespaces, "", object, Default::default())
                    .expect("a fresh store"),
            );
        }
        let (watch_epoch, _) = watch::channel(0);
        // Unique per server, so a token from one cluster never works on another.
        static SERVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let admin_token = format!("admin-{}-{n}-{:x}", std::process::id(), rand_suffix());
        let mut tokens = auth::Tokens::default();
        let admin = User {
            name: "admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        };
        tokens.insert(admin_token.clone(), admin);
        let server = Self {
            inner: Arc::new(Inner {
                tokens: RwLock::new(tokens),
                admin_token,
                registry: RwLock::new(registry),
                store: Mutex::new(store),
                watch_epoch,
                requests: Default::default(),
                decisions: Default::default(),
            }),
        };
        for namespace in &created {
            http::default_service_account(&server, namespace);
        }
        server
    }

    /// Serves HTTPS on `127.0.0.1:port` (0 picks a free port) with a certificate from a
    /// new CA.
    pub async fn start(self, port: u16) -> std::io::Result<Running> {
        let (authority, acceptor) = tls::acceptor().map_err(std::io::Error::other)?;
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let url = format!("https://{}", tcp.local_addr()?);
        let app = http::router(self.clone()).layer(axum::middleware::from_fn_with_state(
            self.clone(),
            requests::count,
        ));
        let listener = tls::TlsListener { tcp, acceptor };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Running {
            url,
            server: self,
            ca_pem: authority.pem,
            ca_der: authority.der,
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

    /// Makes `token` authenticate as `user`.
    pub fn add_token(&self, token: &str, user: User) {
        self.inner
            .tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_owned(), user);
    }

    /// How many requests the server has received so far, by user, verb and resource.
    pub fn request_counts(&self) -> std::collections::BTreeMap<RequestKey, u64> {
        self.inner.requests.snapshot()
    }

    /// Every distinct authorisation decision so far (who, verb, resource, namespace,
    /// allowed), sorted.
    pub fn decisions(&self) -> Vec<auth::Decision> {
        self.inner.decisions.snapshot()
    }

    /// Forgets the change history and ends every open watch, as an API server restart
    /// does: watchers come back with a version that is now too old (410) and relist.
    pub fn compact_and_drop_watches(&self) {
        self.store().compact();
        self.inner.watch_epoch.send_modify(|e| *e += 1);
    }
}

/// Some entropy for tokens without a random-number crate: the clock's nanoseconds.
fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}
