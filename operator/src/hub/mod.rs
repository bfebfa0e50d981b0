//! `starling-operator hub`: the controllers that run on the hub cluster.
//!
//! * [`member_cluster`] keeps each MemberCluster's namespace, RBAC and `Ready` condition.
//! * [`training_run`] turns a TrainingRun into an exchange, credentials, a placement and
//!   one TrainerGroup per chosen member, and reports the run's progress.
//!
//! Both are shaped observe → decide → act: they read what they need from reflector
//! stores shared through [`Context`] (one watch per kind, no lists per reconcile), decide
//! with a pure function of that and `now`, and write only what differs. Only the holder of
//! the `starling-hub` Lease reconciles, so a second replica never writes.

pub mod children;
mod exchanges;
mod lease;
mod member_cluster;
pub mod run_tls;
pub mod training_run;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{EnvVar, Pod, Secret, Service};
use kube::api::DynamicObject;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::Phase;
use crate::api::{MemberCluster, TrainerGroup, TrainingRun};
use crate::k8s::{
    Backoff, COMPONENT_EXCHANGE, LABEL_COMPONENT, LABEL_MANAGED_BY, MANAGER, apply, condition,
    condition_true,
};
use crate::telemetry::{Metrics, PhaseLabel, Readiness, Refresh};
use exchanges::Wake;

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
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "STARLING_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
}

/// Errors of one reconcile; each is retried with back-off and reported as an Event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("exchange: {0}")]
    Exchange(#[from] starling_trainer::exchange::client::ClientError),
    /// A Secret of the credentials' name exists that the operator's cache does not hold:
    /// one it made a moment ago (the next reconcile sees it), or someone else's, which it
    /// will not adopt.
    #[error(
        "Secret {0} exists but is not (yet) the operator's: retrying; if it is not a run's \
         credentials, delete or rename it"
    )]
    CredentialsTaken(String),
    #[error("minting the run's TLS certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// `spec.exchange.tls.secretName` names a Secret the exchange cannot serve with.
    #[error("certificate Secret {name} (spec.exchange.tls.secretName): {message}")]
    CertificateSecret { name: String, message: String },
}

/// What the controllers read instead of listing: one reflector per kind, kept current by
/// a watch.
#[derive(Clone)]
pub struct Stores {
    pub members: Store<MemberCluster>,
    pub groups: Store<TrainerGroup>,
    /// Exchange pods (`app.kubernetes.io/component=exchange`), for their health.
    pub exchange_pods: Store<Pod>,
    /// Everything the operator manages, by kind.
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub secrets: Store<Secret>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: HubConfig,
    pub stores: Stores,
    /// Each live run's exchange, watched.
    pub exchanges: exchanges::Exchanges,
    /// Each run's status as this replica last wrote it.
    pub statuses: training_run::WrittenStatuses,
    pub backoff: Backoff,
    pub metrics: Arc<Metrics>,
    /// The OpenTelemetry settings the exchange pods inherit.
    pub trace_env: Vec<EnvVar>,
    applied: Applied,
}

/// What this replica last applied, so an unchanged object is not written again.
///
/// An object is rewritten when what is wanted changed, or when the stored object no
/// longer holds what this replica wrote: someone edited or deleted it. What others write
/// beside it (a Service's load-balancer address, a Deployment's or TrainerGroup's
/// status, the server's resourceVersion) does not count, so those changes cost no
/// write. A write is trusted for [`Applied::SETTLE`] while the store catches up with it;
/// kinds without a store are rewritten after [`Applied::RESYNC`] (a deleted Role heals
/// within minutes, at no cost at rest).
#[derive(Default)]
struct Applied(std::sync::Mutex<HashMap<ObjectRef<DynamicObject>, Written>>);

struct Written {
    /// Of the object as wanted.
    hash: u64,
    /// Of the object as the server returned it, see [`content_hash`].
    content: u64,
    at: Instant,
}

impl Applied {
    const RESYNC: Duration = Duration::from_secs(600);
    const SETTLE: Duration = Duration::from_secs(5);

    /// `stored` is `None` for kinds without a store, else the [`content_hash`] of what
    /// the store holds (`None` when it holds nothing).
    fn current(
        &self,
        key: &ObjectRef<DynamicObject>,
        hash: u64,
        stored: Option<Option<u64>>,
    ) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).is_some_and(|w| {
            let settling = w.at.elapsed() < Self::SETTLE;
            w.hash == hash
                && match stored {
                    Some(Some(content)) => content == w.content || settling,
                    Some(None) => settling,
                    None => w.at.elapsed() < Self::RESYNC,
                }
        })
    }

    fn record(&self, key: ObjectRef<DynamicObject>, hash: u64, content: u64) {
        let written = Written {
            hash,
            content,
            at: Instant::now(),
        };
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, written);
    }

    fn forget(&self, key: &ObjectRef<DynamicObject>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

fn hash_of<K: Serialize>(object: &K) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// A hash of what an object holds that the operator writes: everything but its status
/// and the metadata the server and other writers keep (resourceVersion, managedFields,
/// timestamps), so that only an edit of what was applied changes it.
fn content_hash<K: Serialize>(object: &K) -> u64 {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.retain(|k, _| {
                [
                    "name",
                    "namespace",
                    "labels",
                    "annotations",
                    "ownerReferences",
                ]
                .contains(&k.as_str())
            });
        }
    }
    hash_of(&value)
}

impl Context {
    /// Applies `object` unless this replica already wrote exactly it and it is unchanged
    /// since (`store` says what the cluster holds; `None` for kinds without a store).
    pub async fn apply_changed<K>(
        &self,
        api: &Api<K>,
        store: Option<&Store<K>>,
        object: &K,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
    {
        let key = ObjectRef::from_obj(object);
        let hash = hash_of(object);
        let stored = store.map(|s| s.get(&key).map(|o| content_hash(o.as_ref())));
        if self.applied.current(&key.clone().erase(), hash, stored) {
            return Ok(());
        }
        let written = apply(api, MANAGER, object).await?;
        self.applied
            .record(key.erase(), hash, content_hash(&written));
        Ok(())
    }

    /// Forgets what was applied for `object` (it was deleted).
    pub fn forget<K: Resource<DynamicType = ()>>(&self, object: &ObjectRef<K>) {
        self.applied.forget(&object.clone().erase());
    }
}

/// Which runs an object of kind `K` concerns: they are woken when it changes.
type Concerns<K> = Box<dyn Fn(&K) -> Vec<ObjectRef<TrainingRun>> + Send + Sync>;

/// A reflector over `api`, and the task that keeps it current. With `wake`, every
/// object that changes (or goes) wakes the runs it concerns, after the store holds the
/// change.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    wake: Option<(Wake, Concerns<K>)>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource<DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, crate::k8s::slim(watcher(api, config)));
    let task = stream.for_each(move |event| {
        let changed = match &event {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o))
            | Ok(watcher::Event::InitApply(o)) => Some(o),
            _ => None,
        };
        if let (Some(object), Some((wake, concerns))) = (changed, &wake) {
            for run in concerns(object) {
                let _ = wake.unbounded_send(run);
            }
        }
        futures::future::ready(())
    });
    (reader, task)
}

/// Starts the reflectors, waking runs through `wake`; the returned future drives them.
fn stores(client: &Client, wake: &Wake) -> (Stores, impl Future<Output = ()> + use<>) {
    let managed = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let exchange = managed.clone().labels(&format!(
        "{LABEL_MANAGED_BY}={MANAGER},{LABEL_COMPONENT}={COMPONENT_EXCHANGE}"
    ));
    let (groups, b) = reflect(
        Api::all(client.clone()),
        watcher::Config::default(),
        Some((wake.clone(), Box::new(training_run::concerned_by_group))),
    );
    let flipped = training_run::runs_on_flipped_member(groups.clone());
    let (members, a) = reflect(
        Api::all(client.clone()),
        watcher::Config::default(),
        Some((wake.clone(), Box::new(flipped))),
    );
    let (exchange_pods, c) = reflect(
        Api::all(client.clone()),
        exchange.clone(),
        Some((
            wake.clone(),
            Box::new(training_run::concerned_by_labels::<Pod>),
        )),
    );
    let (services, d) = reflect(
        Api::all(client.clone()),
        exchange.clone(),
        Some((
            wake.clone(),
            Box::new(training_run::concerned_by_labels::<Service>),
        )),
    );
    let (deployments, e) = reflect(Api::all(client.clone()), exchange, None);
    let (secrets, f) = reflect(Api::all(client.clone()), managed, None);
    let stores = Stores {
        members,
        groups,
        exchange_pods,
        services,
        deployments,
        secrets,
    };
    let all = async move {
        futures::join!(a, b, c, d, e, f);
    };
    (stores, all)
}

impl Stores {
    async fn ready(&self) -> anyhow::Result<()> {
        self.members.wait_until_ready().await?;
        self.groups.wait_until_ready().await?;
        self.exchange_pods.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.deployments.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        Ok(())
    }
}

/// What `/metrics` reads at scrape time once this replica leads.
type Scraped = Arc<std::sync::OnceLock<(Stores, Store<TrainingRun>)>>;

fn refresh(scraped: Scraped) -> Refresh {
    Arc::new(move |metrics: &Metrics| {
        let Some((stores, runs)) = scraped.get() else {
            return;
        };
        let members = stores.members.state();
        let ready = members.iter().filter(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| condition_true(&s.conditions, condition::READY))
        });
        metrics.members.set(members.len() as i64);
        metrics.members_ready.set(ready.count() as i64);
        let phases = [
            Phase::Pending,
            Phase::Placing,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
        ];
        let runs = runs.state();
        for phase in phases {
            let n = runs
                .iter()
                .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(phase))
                .count();
            let label = PhaseLabel {
                phase: phase.to_string(),
            };
            metrics.runs.get_or_create(&label).set(n as i64);
        }
        metrics.set_peer_scores(runs.iter().map(|r| r.as_ref()));
        metrics.set_runs(runs.iter().map(|r| r.as_ref()));
        metrics.set_members(members.iter().map(|m| m.as_ref()));
    })
}

/// Runs the hub until SIGTERM/ctrl-c: serves health and metrics, waits for leadership,
/// then runs both controllers.
pub async fn run(client: Client, metrics: Arc<Metrics>, config: HubConfig) -> anyhow::Result<()> {
    let scraped: Scraped = Arc::default();
    let server = crate::telemetry::serve(
        config.metrics_addr,
        metrics.clone(),
        refresh(scraped.clone()),
    );
    let server = tokio::spawn(server);
    metrics.set_readiness(Readiness::Standby);
    let outcome = lead(client, metrics, config, scraped).await;
    server.abort();
    outcome
}

async fn lead(
    client: Client,
    metrics: Arc<Metrics>,
    config: HubConfig,
    scraped: Scraped,
) -> anyhow::Result<()> {
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

    let (wake, wakes) = futures::channel::mpsc::unbounded();
    let (stores, reflectors) = stores(&client, &wake);
    let reflectors = tokio::spawn(reflectors);
    stores.ready().await?;
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
        stores: stores.clone(),
        exchanges: exchanges::Exchanges::new(wake),
        statuses: Default::default(),
        backoff: Backoff::default(),
        metrics: metrics.clone(),
        trace_env: crate::k8s::trace_env(),
        applied: Applied::default(),
    });
    let outcome = control(&client, ctx, &leadership, &scraped, stores, wakes).await;
    reflectors.abort();
    outcome?;
    leadership.release().await;
    Ok(())
}

/// Both controllers, until shutdown or a lost Lease.
async fn control(
    client: &Client,
    ctx: Arc<Context>,
    leadership: &lease::Leadership,
    scraped: &Scraped,
    stores: Stores,
    wakes: impl futures::Stream<Item = ObjectRef<TrainingRun>> + Send + 'static,
) -> anyhow::Result<()> {
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
    .run(
        member_cluster::reconcile,
        member_cluster::error_policy,
        ctx.clone(),
    )
    .for_each(|_| async {});
    let runs = training_run::controller(client, wakes);
    let _ = scraped.set((stores, runs.store()));
    ctx.metrics.set_readiness(Readiness::Ready);
    let runs = runs
        .graceful_shutdown_on(stopped())
        .run(
            training_run::reconcile,
            training_run::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let controllers = futures::future::join(members, runs);
    tokio::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => Ok(()),
        _ = crate::telemetry::shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            controllers.await;
            Ok(())
        }
        lost = leadership.lost() => {
            // Another replica may already be writing: stop at once, never write again.
            Err(anyhow::anyhow!("lost the leader Lease: {lost}"))
        }
    }
}

/// Publishes an Event on `object`; a failure to publish is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    warning: bool,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = kube::runtime::events::Event {
        type_: if warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};

    fn service(label: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "ns", "labels": {"run": label},
                "resourceVersion": "7", "uid": "u"},
            "spec": {"ports": [{"port": 7070}]},
        }))
        .unwrap()
    }

    /// A write of `written` made `ago`, checked against `stored` for the wish `wanted`.
    fn current(wanted: &Service, written: &Service, ago: u64, stored: Option<&Service>) -> bool {
        let applied = Applied::default();
        let key = ObjectRef::from_obj(written).erase();
        applied.0.lock().unwrap().insert(
            key.clone(),
            Written {
                hash: hash_of(written),
                content: content_hash(written),
                at: Instant::now() - Duration::from_secs(ago),
            },
        );
        applied.current(&key, hash_of(wanted), Some(stored.map(content_hash)))
    }

    #[test]
    fn only_an_edit_of_what_was_applied_is_written_again() {
        let ours = service("a");
        let mut addressed = ours.clone();
        addressed.metadata.resource_version = Some("9".into());
        addressed.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("10.0.0.1".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let edited = service("b");
        let cases = [
            ("unchanged", &ours, 60, Some(&ours), true),
            (
                "another writer's status and version",
                &ours,
                60,
                Some(&addressed),
                true,
            ),
            ("a different wish", &edited, 60, Some(&ours), false),
            ("edited by someone", &ours, 60, Some(&edited), false),
            ("deleted", &ours, 60, None, false),
            ("not in the store yet", &ours, 1, None, true),
            (
                "the store still holds the version before ours",
                &ours,
                1,
                Some(&edited),
                true,
            ),
        ];
        for (name, wanted, ago, stored, expected) in cases {
            assert_eq!(current(wanted, &ours, ago, stored), expected, "{name}");
        }
    }
}
