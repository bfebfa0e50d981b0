//! `starling-operator agent`: runs in a member cluster. It dials out to the hub (members
//! are never dialled, so a home box behind NAT works), heartbeats and reports GPU capacity
//! into its MemberCluster's status, and converges its own cluster's trainer Pods to the
//! TrainerGroups in its hub namespace.

pub mod capacity;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::api::{MemberCluster, PeerId, PodState, TrainerGroup, TrainerGroupStatus};
use crate::resources::{LABEL_MANAGED_BY, LABEL_MEMBER, member_namespace};

const LABEL_GROUP: &str = "starling.dev/group";
const LABEL_PEER: &str = "starling.dev/peer";
const AGENT: &str = "starling-agent";

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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hub API: {0}")]
    Hub(#[source] kube::Error),
    #[error("member cluster API: {0}")]
    Local(#[source] kube::Error),
}

struct Context {
    hub: Client,
    local: Client,
    config: AgentConfig,
}

pub async fn run(local: Client, config: AgentConfig) -> anyhow::Result<()> {
    let hub_config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&config.hub_kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let hub = Client::try_from(hub_config)?;
    ensure_namespace(&local, &config.namespace).await?;
    let ctx = Arc::new(Context { hub, local, config });

    let heartbeats = heartbeat_loop(ctx.clone());
    let groups: Api<TrainerGroup> =
        Api::namespaced(ctx.hub.clone(), &member_namespace(&ctx.config.member));
    let controller = Controller::new(groups, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    tokio::select! {
        _ = controller => {}
        _ = heartbeats => {}
    }
    Ok(())
}

async fn ensure_namespace(client: &Client, name: &str) -> kube::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_none() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Heartbeat, capacity report and orphan sweep, every `--heartbeat` seconds; errors are
/// logged and retried, so a hub outage only delays the next beat.
async fn heartbeat_loop(ctx: Arc<Context>) {
    loop {
        if let Err(e) = heartbeat(&ctx).await {
            tracing::warn!(error = %e, "heartbeat");
        }
        if let Err(e) = sweep(&ctx).await {
            tracing::warn!(error = %e, "sweeping pods of removed groups");
        }
        tokio::time::sleep(Duration::from_secs(ctx.config.heartbeat)).await;
    }
}

async fn heartbeat(ctx: &Context) -> Result<(), Error> {
    let nodes = Api::<Node>::all(ctx.local.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Local)?;
    let pods = Api::<Pod>::namespaced(ctx.local.clone(), &ctx.config.namespace)
        .list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={AGENT}")))
        .await
        .map_err(Error::Local)?;
    let gpus = capacity::gpu_capacity(&nodes.items, &pods.items);
    let status = json!({"status": {
        "lastHeartbeat": k8s_openapi::jiff::Timestamp::now(),
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "gpusAllocatable": gpus.iter().map(|g| g.allocatable).sum::<u32>(),
        "gpusInUse": gpus.iter().map(|g| g.in_use).sum::<u32>(),
        "gpus": gpus,
    }});
    Api::<MemberCluster>::all(ctx.hub.clone())
        .patch_status(
            &ctx.config.member,
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .map_err(Error::Hub)?;
    Ok(())
}

/// Deletes local pods and secrets of groups the hub no longer has. Only runs when the
/// hub answered: an unreachable hub never makes the agent stop training.
async fn sweep(ctx: &Context) -> Result<(), Error> {
    let groups: BTreeSet<String> =
        Api::<TrainerGroup>::namespaced(ctx.hub.clone(), &member_namespace(&ctx.config.member))
            .list(&ListParams::default())
            .await
            .map_err(Error::Hub)?
            .items
            .iter()
            .map(|g| g.name_any())
            .collect();
    let selector = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={AGENT}"));
    let pods: Api<Pod> = Api::namespaced(ctx.local.clone(), &ctx.config.namespace);
    for pod in pods.list(&selector).await.map_err(Error::Local)?.items {
        if !pod
            .labels()
            .get(LABEL_GROUP)
            .is_some_and(|g| groups.contains(g))
        {
            tracing::info!(pod = %pod.name_any(), "deleting the pod of a removed group");
            delete(&pods, &pod.name_any()).await?;
        }
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.local.clone(), &ctx.config.namespace);
    for secret in secrets.list(&selector).await.map_err(Error::Local)?.items {
        if !secret
            .labels()
            .get(LABEL_GROUP)
            .is_some_and(|g| groups.contains(g))
        {
            delete(&secrets, &secret.name_any()).await?;
        }
    }
    Ok(())
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Local(e)),
    }
}

fn pod_name(group: &str, peer: &str) -> String {
    format!("{group}-{peer}")
}

/// Converges the local pods of one group: one per peer, failed ones replaced, extra
/// ones deleted; then reports them in the group's status.
async fn reconcile(group: Arc<TrainerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = group.name_any();
    let ns = &ctx.config.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.local.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.local.clone(), ns);
    let labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), AGENT.to_string()),
        (LABEL_GROUP.to_string(), name.clone()),
        (LABEL_MEMBER.to_string(), ctx.config.member.clone()),
    ]);

    // The group's credentials, copied from the hub.
    let hub_secrets: Api<Secret> =
        Api::namespaced(ctx.hub.clone(), &member_namespace(&ctx.config.member));
    let credentials = hub_secrets
        .get(&group.spec.credentials_secret)
        .await
        .map_err(Error::Hub)?;
    let local_secret = Secret {
        metadata: ObjectMeta {
            name: Some(format!("{name}-credentials")),
            namespace: Some(ns.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        data: Some(
            credentials
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.0)))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    secrets
        .patch(
            &format!("{name}-credentials"),
            &PatchParams::apply(AGENT).force(),
            &Patch::Apply(&local_secret),
        )
        .await
        .map_err(Error::Local)?;

    let existing: BTreeMap<String, Pod> = pods
        .list(&ListParams::default().labels(&format!("{LABEL_GROUP}={name}")))
        .await
        .map_err(Error::Local)?
        .items
        .into_iter()
        .map(|p| (p.name_any(), p))
        .collect();
    let wanted: BTreeMap<String, PeerId> = group
        .spec
        .peers
        .iter()
        .map(|p| (pod_name(&name, &p.to_string()), *p))
        .collect();
    for (pod, _) in existing.iter().filter(|(n, _)| !wanted.contains_key(*n)) {
        delete(&pods, pod).await?;
    }
    let mut states = vec![];
    for (pod_name, peer) in &wanted {
        let phase = existing
            .get(pod_name)
            .and_then(|p| p.status.as_ref()?.phase.clone());
        let being_deleted = existing
            .get(pod_name)
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some());
        // A pod that failed outright (not restarted in place) is replaced.
        if phase.as_deref() == Some("Failed") && !being_deleted {
            delete(&pods, pod_name).await?;
        }
        if !existing.contains_key(pod_name) || phase.as_deref() == Some("Failed") {
            let secret = format!("{name}-credentials");
            let pod = trainer_pod(&group, pod_name, &peer.to_string(), &labels, ns, &secret);
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(Error::Local(e)),
            }
        }
        let current = existing.get(pod_name);
        let status = current.and_then(|p| p.status.as_ref());
        let container = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first());
        states.push(PodState {
            peer: *peer,
            pod: pod_name.clone(),
            phase: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into()),
            restarts: container.map_or(0, |c| c.restart_count.max(0) as u32),
            message: container
                .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
                .or_else(|| status.and_then(|s| s.message.clone())),
        });
    }
    let count = |phase: &str| states.iter().filter(|s| s.phase == phase).count() as u32;
    let status = TrainerGroupStatus {
        replicas: wanted.len() as u32,
        ready: count("Running"),
        running: count("Running"),
        failed: count("Failed"),
        pods: states,
        observed_generation: group.metadata.generation,
    };
    if group.status.as_ref() != Some(&status) {
        let groups: Api<TrainerGroup> =
            Api::namespaced(ctx.hub.clone(), &member_namespace(&ctx.config.member));
        groups
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(Error::Hub)?;
    }
    // Pods change without the group changing: look again shortly.
    Ok(Action::requeue(Duration::from_secs(2)))
}

fn trainer_pod(
    group: &TrainerGroup,
    name: &str,
    peer: &str,
    labels: &BTreeMap<String, String>,
    namespace: &str,
    secret: &str,
) -> Pod {
    let t = &group.spec.template;
    let mut labels = labels.clone();
    labels.insert(LABEL_PEER.into(), peer.into());
    let mut env = serde_json::to_value(&t.env).expect("env serialises");
    let extra = json!([
        {"name": "STARLING_EXCHANGE", "value": group.spec.exchange_endpoint},
        {"name": "STARLING_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": peer}}},
        {"name": "STARLING_DATA_DIR", "value": "data"},
    ]);
    let env_list = env.as_array_mut().expect("a list");
    env_list.extend(extra.as_array().expect("a list").iter().cloned());
    if let Some(mbps) = t.upload_limit_mbps {
        env_list.push(json!({"name": "STARLING_BANDWIDTH_MBPS", "value": mbps.to_string()}));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "restartPolicy": "OnFailure",
            "nodeSelector": t.node_selector,
            "tolerations": t.tolerations,
            "containers": [{
                "name": "trainer",
                "image": t.image,
                "args": t.args,
                "env": env,
                "resources": t.resources,
            }],
        },
    }))
    .expect("a valid pod")
}

fn error_policy(group: Arc<TrainerGroup>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(group = %group.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}
