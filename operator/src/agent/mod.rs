//! `starling-operator agent`: runs in a member cluster. It dials out to the hub (members
//! are never dialled, so a home box behind NAT works), heartbeats and reports GPU capacity
//! into its MemberCluster's status, and converges its own cluster's trainer Pods to the
//! TrainerGroups in its hub namespace.
//!
//! A member may be someone's home machine on a slow link, and a hub serves many members,
//! so the agent's traffic must grow with what changes, not with the size of the fleet or
//! the passing of time. It is therefore shaped as observe, decide, act:
//!
//! * [`observe`] keeps reflector caches of both clusters, and turns their changes into
//!   reconciles of the groups concerned;
//! * [`decide`] is pure: from one group's observation it says what must change;
//! * [`act`] writes exactly that, and nothing when nothing differs.
//!
//! An idle agent thus sends its heartbeat and holds its watches, and nothing else.

mod act;
pub mod capacity;
pub mod decide;
mod observe;
pub mod placement;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::controller::{self, Action};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use crate::api::TrainerGroup;
use crate::k8s::member_namespace;
use crate::telemetry::{self, Metrics, Readiness};
use act::Writer;
use decide::Site;
use observe::Stores;

/// How often a group is reconciled when nothing wakes it: a safety net for a missed
/// watch event; it reads only caches, so it costs no requests when nothing differs.
const RESYNC: Duration = Duration::from_secs(300);
/// Wait after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);
/// Events this close together (a pod being scheduled, started, reported running) wake
/// their group once.
const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, clap::Args)]
pub struct AgentConfig {
    /// This member's name (its MemberCluster on the hub).
    #[arg(long, env = "STARLING_MEMBER")]
    pub member: String,
    /// Kubeconfig for the hub, holding the member's scoped token.
    #[arg(long, env = "STARLING_HUB_KUBECONFIG")]
    pub hub_kubeconfig: std::path::PathBuf,
    /// Namespace of this cluster where trainer pods run.
    #[arg(
        long,
        env = "STARLING_TRAINER_NAMESPACE",
        default_value = "starling-trainers"
    )]
    pub namespace: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "STARLING_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    #[command(flatten)]
    pub placement: placement::LocalPlacement,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hub API: {0}")]
    Hub(#[source] kube::Error),
    #[error("member cluster API: {0}")]
    Local(#[source] kube::Error),
    #[error("no first list yet from {0}")]
    NotSynced(&'static str),
}

struct Context {
    config: AgentConfig,
    stores: Stores,
    writer: Writer,
    /// Wakes the sweep of removed groups' pods.
    sweep: Arc<Notify>,
    metrics: Arc<Metrics>,
}

/// Runs the agent until SIGTERM/ctrl-c; `local` is a client of its own cluster, and
/// both clusters' requests are counted in `metrics`.
pub async fn run(local: Client, metrics: Arc<Metrics>, config: AgentConfig) -> anyhow::Result<()> {
    let hub_config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&config.hub_kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let credentials = crate::onboard::bearer_token(&hub_config)
        .and_then(|token| crate::onboard::token_lifetime(&token));
    if let Some((_, expires)) = credentials {
        tracing::info!(%expires, "the hub token expires");
    }
    let hub = telemetry::client(hub_config, metrics.clone())?;
    let server = telemetry::serve(
        config.metrics_addr,
        metrics.clone(),
        Arc::new(|_: &Metrics| {}),
    );
    let server = tokio::spawn(server);
    let outcome = agent(local, hub, metrics, config, credentials).await;
    server.abort();
    outcome
}

async fn agent(
    local: Client,
    hub: Client,
    metrics: Arc<Metrics>,
    config: AgentConfig,
    credentials: Option<act::Lifetime>,
) -> anyhow::Result<()> {
    require_namespace(&local, &config.namespace).await?;
    let sweep = Arc::new(Notify::new());
    let (stores, triggers) = observe::watch(&hub, &local, &config, sweep.clone());
    let hub_namespace = member_namespace(&config.member);
    let writer = Writer {
        pods: Api::namespaced(local.clone(), &config.namespace),
        secrets: Api::namespaced(local, &config.namespace),
        groups: Api::namespaced(hub.clone(), &hub_namespace),
        members: Api::all(hub),
        member: config.member.clone(),
        credentials,
    };
    let ctx = Arc::new(Context {
        config,
        stores: stores.clone(),
        writer,
        sweep,
        metrics,
    });
    let reconciles = controller::applier(
        |group, ctx| Box::pin(reconcile(group, ctx)),
        error_policy,
        ctx.clone(),
        stores.groups,
        triggers,
        controller::Config::default().debounce(DEBOUNCE),
    )
    .for_each(|result| async move {
        match result {
            Ok(_) => {}
            Err(controller::Error::ObjectNotFound(_)) => {}
            Err(e) => tracing::warn!(error = %e, "watching"),
        }
    });
    tokio::select! {
        _ = reconciles => {}
        _ = heartbeat_loop(ctx.clone()) => {}
        _ = sweep_loop(ctx) => {}
        _ = telemetry::shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

/// The trainer namespace is the member chart's to make (see `rbac::AGENT_CLUSTER`); a
/// missing one is a mistake in the install, said plainly rather than retried.
async fn require_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    anyhow::ensure!(
        api.get_opt(name).await?.is_some(),
        "the trainer namespace {name} does not exist on this cluster: install the member \
         chart with trainerNamespace.create=true, or create it (kubectl create namespace {name})"
    );
    Ok(())
}

impl Context {
    fn site(&self) -> Site<'_> {
        Site {
            member: &self.config.member,
            namespace: &self.config.namespace,
            placement: &self.config.placement,
        }
    }
}

/// Observe one group from the caches, decide, and write what differs.
#[tracing::instrument(skip_all, fields(group = %group.name_any()))]
async fn reconcile(group: Arc<TrainerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut timer = ctx.metrics.reconcile("trainergroup");
    let result = converge(&group, &ctx).await;
    if result.is_err() {
        timer.failed();
    }
    result
}

async fn converge(group: &Arc<TrainerGroup>, ctx: &Context) -> Result<Action, Error> {
    ctx.stores.local_synced().await?;
    ctx.stores.hub_synced().await?;
    ctx.metrics.set_readiness(Readiness::Ready);
    let plan = decide::decide(&ctx.stores.observe(group.clone()), &ctx.site());
    if !plan.is_empty() {
        ctx.writer.apply(group, plan).await?;
    }
    Ok(Action::requeue(RESYNC))
}

fn error_policy(group: Arc<TrainerGroup>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(group = %group.name_any(), %error, "reconcile failed");
    Action::requeue(RETRY)
}

/// Heartbeat and capacity report every `--heartbeat` seconds, from the caches; a beat
/// is skipped while the member's own API server does not answer, since the agent then
/// cannot keep its pods. Errors are logged and the next beat tried.
async fn heartbeat_loop(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(ctx.config.heartbeat.max(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = ctx.stores.local_synced().await {
            tracing::warn!(error = %e, "heartbeat");
            continue;
        }
        if !ctx.stores.local_ok.load(Ordering::Relaxed) {
            tracing::warn!("heartbeat skipped: the member's API server does not answer");
            continue;
        }
        let nodes = ctx.stores.nodes.state();
        let pods = ctx.stores.pods.state();
        let gpus = capacity::gpu_capacity(nodes.iter().map(|n| &**n), pods.iter().map(|p| &**p));
        if let Err(e) = ctx.writer.heartbeat(&gpus).await {
            tracing::warn!(error = %e, "heartbeat");
        }
    }
}

/// Deletes the local pods and Secrets of groups the hub no longer has, when a group
/// disappears and once a heartbeat interval as a safety net (from the caches, so it is
/// free when there is nothing to sweep).
async fn sweep_loop(ctx: Arc<Context>) {
    let every = Duration::from_secs(ctx.config.heartbeat.max(1));
    loop {
        let _ = tokio::time::timeout(every, ctx.sweep.notified()).await;
        if !ctx.stores.local_ready() {
            continue;
        }
        let groups = ctx.stores.group_names();
        let sweep = decide::sweep(
            groups.as_ref(),
            &ctx.stores.pods.state(),
            &ctx.stores.secrets.state(),
        );
        if let Err(e) = ctx.writer.sweep(&sweep).await {
            tracing::warn!(error = %e, "sweeping the pods of removed groups");
        }
    }
}
