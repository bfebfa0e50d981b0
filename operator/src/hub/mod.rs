//! `starling-operator hub`: the controllers that run on the hub cluster.
//!
//! * [`member`] keeps each MemberCluster's namespace, RBAC and `Ready` condition.
//! * [`run`] turns a TrainingRun into an exchange, credentials, a placement and one
//!   TrainerGroup per chosen member, and reports the run's progress.
//!
//! Only the holder of the `starling-hub` Lease reconciles, so a second replica (or an old
//! one that has not died yet) never writes.

mod lease;
mod member;
mod run;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::Mutex;

use crate::api::{MemberCluster, TrainingRun};
use crate::resources::MANAGER;

/// What the hub is configured with.
#[derive(Clone, Debug, clap::Args)]
pub struct HubConfig {
    /// Trainer image for runs that do not name one.
    #[arg(long, env = "STARLING_TRAINER_IMAGE", default_value = concat!("ghcr.io/starling-dev/starling-trainer:", env!("CARGO_PKG_VERSION")))]
    pub trainer_image: String,
    /// Seconds without an agent heartbeat before a member is `Ready=False`.
    #[arg(long, env = "STARLING_HEARTBEAT_GRACE", default_value_t = 30)]
    pub heartbeat_grace: u64,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "starling-system")]
    pub namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "starling-operator")]
    pub identity: String,
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
}

/// Errors of one reconcile; each is retried with back-off and reported as an Event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Serialization(#[from] serde_json::Error),
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: HubConfig,
    /// Connections to each run's exchange, by run uid.
    pub exchanges: Mutex<HashMap<String, run::ExchangeConnection>>,
    /// Consecutive failures per object, for back-off.
    failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Back-off for an object that failed: 1 s doubling to 60 s.
    fn backoff(&self, key: String) -> Action {
        let mut failures = self.failures.lock().expect("not poisoned");
        let n = failures.entry(key).or_default();
        *n = (*n + 1).min(6);
        Action::requeue(Duration::from_secs(1 << *n).min(Duration::from_secs(60)))
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().expect("not poisoned").remove(key);
    }
}

/// Runs the hub until SIGTERM/ctrl-c: waits for leadership, then both controllers.
pub async fn run(client: Client, config: HubConfig) -> anyhow::Result<()> {
    let lease = lease::Lease::new(
        client.clone(),
        &config.namespace,
        "starling-hub",
        &config.identity,
        Duration::from_secs(config.lease_seconds),
    );
    tracing::info!(identity = %config.identity, "waiting for leadership");
    let leadership = lease.acquire().await?;
    tracing::info!("leading; starting controllers");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "starling-operator".into(),
            instance: Some(config.identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        config,
        exchanges: Mutex::new(HashMap::new()),
        failures: Default::default(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let members = Controller::new(
        Api::<MemberCluster>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stopped())
    .run(member::reconcile, member::error_policy, ctx.clone())
    .for_each(|_| async {});
    let runs = Controller::new(
        Api::<TrainingRun>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stopped())
    .run(run::reconcile, run::error_policy, ctx.clone())
    .for_each(|_| async {});

    let controllers = futures::future::join(members, runs);
    tokio::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {}
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            controllers.await;
        }
        lost = leadership.lost() => {
            // Another replica may already be writing: stop at once, never write again.
            anyhow::bail!("lost the leader Lease: {lost}");
        }
    }
    leadership.release().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Server-side applies any object given as JSON, by its apiVersion and kind.
async fn apply_object(ctx: &Context, object: serde_json::Value) -> Result<(), Error> {
    let (group, version) = match object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
    };
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let plural = match kind.as_str() {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "Deployment" => "deployments",
        "Service" => "services",
        "Secret" => "secrets",
        "TrainerGroup" => "trainergroups",
        other => unreachable!("the operator does not write {other}"),
    };
    let resource = ApiResource {
        group: group.clone(),
        version: version.clone(),
        api_version: object["apiVersion"].as_str().unwrap_or_default().into(),
        kind,
        plural: plural.into(),
    };
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
        None => Api::all_with(ctx.client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}
