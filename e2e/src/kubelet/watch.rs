//! What the kubelet knows of its cluster: Pods, Deployments, ReplicaSets, Jobs and
//! Services, each kept by a watch (a list, then changes as they happen), so a cluster at
//! rest costs no requests beyond the watches' occasional renewal.

use std::fmt::Debug;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio_stream::{Stream, StreamExt};

/// The watched objects, as last seen.
pub(super) struct Cache {
    pub(super) pods: Store<Pod>,
    pub(super) deployments: Store<Deployment>,
    pub(super) replica_sets: Store<ReplicaSet>,
    pub(super) services: Store<Service>,
    pub(super) jobs: Store<Job>,
}

/// One event from one of the watches: whether that watch's list is now complete.
struct Seen {
    source: usize,
    listed: bool,
}

/// The watches' events, merged. Polling it is what keeps the [`Cache`] current.
pub(super) struct Changes {
    events: Pin<Box<dyn Stream<Item = Seen> + Send>>,
    listed: [bool; 5],
}

/// Starts watching every Pod, Deployment, ReplicaSet, Service and Job.
pub(super) fn watch(client: &Client) -> (Cache, Changes) {
    let (pods, pod_events) = reflect::<Pod>(client, 0);
    let (deployments, deployment_events) = reflect::<Deployment>(client, 1);
    let (services, service_events) = reflect::<Service>(client, 2);
    let (jobs, job_events) = reflect::<Job>(client, 3);
    let (replica_sets, replica_set_events) = reflect::<ReplicaSet>(client, 4);
    let events = pod_events
        .merge(deployment_events)
        .merge(service_events)
        .merge(job_events)
        .merge(replica_set_events);
    let cache = Cache {
        pods,
        deployments,
        replica_sets,
        services,
        jobs,
    };
    let changes = Changes {
        events: Box::pin(events),
        listed: [false; 5],
    };
    (cache, changes)
}

fn reflect<K>(
    client: &Client,
    source: usize,
) -> (Store<K>, impl Stream<Item = Seen> + Send + use<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map(move |event| match event {
            Ok(event) => Seen {
                source,
                listed: matches!(event, watcher::Event::InitDone),
            },
            Err(e) => {
                eprintln!("process kubelet: watching {}: {e}", K::plural(&()));
                Seen {
                    source,
                    listed: false,
                }
            }
        });
    (store, events)
}

impl Changes {
    /// Waits for the next change.
    pub(super) async fn next(&mut self) {
        match self.events.next().await {
            Some(seen) => self.listed[seen.source] |= seen.listed,
            // The watches retry for ever; should they end, nothing changes again.
            None => std::future::pending().await,
        }
    }

    /// Takes in the changes that have already arrived, so a burst is seen as one.
    pub(super) async fn drain(&mut self) {
        while tokio::time::timeout(Duration::ZERO, self.next())
            .await
            .is_ok()
        {}
    }

    /// Whether every watch has listed its objects once: until then the cache is partial,
    /// and acting on it could (say) create a Deployment's pods a second time.
    pub(super) fn complete(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }
}
