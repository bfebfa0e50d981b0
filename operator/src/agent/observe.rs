//! What the agent observes: one reflector per kind it decides from, and the reconciles
//! their changes call for.
//!
//! Every read the agent's decisions need comes from these caches, so an idle agent makes
//! no requests beyond its heartbeat and the watches themselves. Each watch is also a
//! trigger: a change to a local pod or Secret wakes the reconcile of the group its
//! `starling.dev/group` label names, a change to a hub credentials Secret wakes the
//! groups that use it, and the end of a (re)list wakes every group once, since a list
//! reports no deletions.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::decide::{AGENT, LABEL_GROUP, Observed, secret_name};
use super::{AgentConfig, Error};
use crate::api::TrainerGroup;
use crate::k8s::{LABEL_MANAGED_BY, member_namespace};

/// How long a reconcile or a heartbeat waits for the caches' first lists.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Reconciles the watches call for, or a watch's error (the watch retries by itself).
pub type Triggers = BoxStream<'static, Result<ObjectRef<TrainerGroup>, watcher::Error>>;

/// The agent's caches of both clusters.
#[derive(Clone)]
pub struct Stores {
    /// The TrainerGroups in the member's hub namespace.
    pub groups: Store<TrainerGroup>,
    /// The Secrets in the member's hub namespace: the groups' credentials.
    pub credentials: Store<Secret>,
    /// The agent's pods in the trainer namespace.
    pub pods: Store<Pod>,
    /// The agent's Secrets in the trainer namespace: the local copies of credentials.
    pub secrets: Store<Secret>,
    /// The member's nodes, for its GPU capacity.
    pub nodes: Store<Node>,
    /// Whether the member's own API server answered the pod watch last time it was asked.
    pub local_ok: Arc<AtomicBool>,
    hub_namespace: String,
    namespace: String,
}

impl Stores {
    /// What the agent has seen of one group, for [`super::decide::decide`].
    pub fn observe(&self, group: Arc<TrainerGroup>) -> Observed {
        let name = group.name_any();
        let credentials = self
            .credentials
            .get(&ObjectRef::new(&group.spec.credentials_secret).within(&self.hub_namespace));
        let secret = self
            .secrets
            .get(&ObjectRef::new(&secret_name(&name)).within(&self.namespace));
        let pods = self
            .pods
            .state_filter(|p| p.labels().get(LABEL_GROUP) == Some(&name));
        Observed {
            group,
            credentials,
            pods,
            secret,
        }
    }

    /// The names of the hub's groups, or `None` while the hub has never answered.
    pub fn group_names(&self) -> Option<BTreeSet<String>> {
        ready(&self.groups).then(|| self.groups.state().iter().map(|g| g.name_any()).collect())
    }

    /// Whether the member's caches hold a first list.
    pub fn local_ready(&self) -> bool {
        ready(&self.pods) && ready(&self.secrets) && ready(&self.nodes)
    }

    /// Waits until the member's caches hold a first list (the hub's are waited for by
    /// the reconcile queue itself).
    pub async fn local_synced(&self) -> Result<(), Error> {
        let all = async {
            self.pods.wait_until_ready().await?;
            self.secrets.wait_until_ready().await?;
            self.nodes.wait_until_ready().await
        };
        match tokio::time::timeout(SYNC_TIMEOUT, all).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::NotSynced("the member cluster")),
        }
    }

    /// Waits until the credentials cache holds the hub's first list.
    pub async fn hub_synced(&self) -> Result<(), Error> {
        match tokio::time::timeout(SYNC_TIMEOUT, self.credentials.wait_until_ready()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::NotSynced("the hub's credentials")),
        }
    }
}

fn ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some()
}

/// A reflector's events as they pass into its store, with the watch's backoff.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (store, writer) = reflector::store();
    let events = reflector::reflector(writer, crate::k8s::slim(watcher(api, config)));
    (store, events)
}

/// Maps each event of a watch to the groups it concerns; errors pass through.
fn triggers<K, F>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    mut map: F,
) -> Triggers
where
    K: Send + 'static,
    F: FnMut(&watcher::Event<K>) -> Vec<ObjectRef<TrainerGroup>> + Send + 'static,
{
    events
        .flat_map(move |event| {
            stream::iter(match event {
                Ok(event) => map(&event).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            })
        })
        .boxed()
}

/// Every group in the store, for the end of a (re)list.
fn all(groups: &Store<TrainerGroup>) -> Vec<ObjectRef<TrainerGroup>> {
    groups
        .state()
        .iter()
        .map(|g| ObjectRef::from_obj(&**g))
        .collect()
}

/// The group a local object's `starling.dev/group` label names.
fn labelled<K: Resource>(object: &K, hub_namespace: &str) -> Vec<ObjectRef<TrainerGroup>> {
    object
        .meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_GROUP))
        .map(|g| ObjectRef::new(g).within(hub_namespace))
        .into_iter()
        .collect()
}

/// The member's caches, its health, and the reconciles its changes call for.
struct Local {
    pods: Store<Pod>,
    secrets: Store<Secret>,
    nodes: Store<Node>,
    local_ok: Arc<AtomicBool>,
    triggers: Vec<Triggers>,
}

/// The local watches: the agent's pods and Secrets (waking their groups) and the nodes
/// (read by the heartbeat only).
fn local(
    client: &Client,
    config: &AgentConfig,
    groups: &Store<TrainerGroup>,
    hub_namespace: &str,
) -> Local {
    let mine = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={AGENT}"));
    let (pods, pod_events) = reflect(
        Api::<Pod>::namespaced(client.clone(), &config.namespace),
        mine.clone(),
    );
    let (secrets, secret_events) = reflect(
        Api::<Secret>::namespaced(client.clone(), &config.namespace),
        mine,
    );
    let (nodes, node_events) =
        reflect(Api::<Node>::all(client.clone()), watcher::Config::default());
    let local_ok = Arc::new(AtomicBool::new(true));
    let health = local_ok.clone();
    let pod_events = pod_events.inspect(move |r| health.store(r.is_ok(), Ordering::Relaxed));
    let (g1, g2, ns1, ns2) = (
        groups.clone(),
        groups.clone(),
        hub_namespace.to_string(),
        hub_namespace.to_string(),
    );
    let streams = vec![
        triggers(pod_events, move |event| match event {
            watcher::Event::Apply(p) | watcher::Event::Delete(p) => labelled(p, &ns1),
            watcher::Event::InitDone => all(&g1),
            _ => vec![],
        }),
        triggers(secret_events, move |event| match event {
            watcher::Event::Apply(s) | watcher::Event::Delete(s) => labelled(s, &ns2),
            watcher::Event::InitDone => all(&g2),
            _ => vec![],
        }),
        triggers(node_events, |_| vec![]),
    ];
    Local {
        pods,
        secrets,
        nodes,
        local_ok,
        triggers: streams,
    }
}

/// Starts observing both clusters: the caches, and the reconciles their changes call
/// for. `sweep` is notified when a group disappears from the hub.
pub fn watch(
    hub: &Client,
    local_client: &Client,
    config: &AgentConfig,
    sweep: Arc<Notify>,
) -> (Stores, Triggers) {
    let hub_namespace = member_namespace(&config.member);
    let (groups, group_events) = reflect(
        Api::<TrainerGroup>::namespaced(hub.clone(), &hub_namespace),
        watcher::Config::default(),
    );
    let (credentials, credential_events) = reflect(
        Api::<Secret>::namespaced(hub.clone(), &hub_namespace),
        watcher::Config::default(),
    );
    let Local {
        pods,
        secrets,
        nodes,
        local_ok,
        triggers: mut streams,
    } = local(local_client, config, &groups, &hub_namespace);
    let store = groups.clone();
    streams.push(triggers(group_events, move |event| match event {
        watcher::Event::Apply(g) => vec![ObjectRef::from_obj(g)],
        watcher::Event::Delete(_) => {
            sweep.notify_one();
            vec![]
        }
        watcher::Event::InitDone => {
            sweep.notify_one();
            all(&store)
        }
        _ => vec![],
    }));
    let store = groups.clone();
    streams.push(triggers(credential_events, move |event| match event {
        watcher::Event::Apply(s) | watcher::Event::Delete(s) => store
            .state()
            .iter()
            .filter(|g| g.spec.credentials_secret == s.name_any())
            .map(|g| ObjectRef::from_obj(&**g))
            .collect(),
        watcher::Event::InitDone => all(&store),
        _ => vec![],
    }));
    let stores = Stores {
        groups,
        credentials,
        pods,
        secrets,
        nodes,
        local_ok,
        hub_namespace,
        namespace: config.namespace.clone(),
    };
    (stores, stream::select_all(streams).boxed())
}
