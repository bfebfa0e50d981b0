//! The agent's decisions: pure functions from what it observed to what should change.
//!
//! Nothing here reads or writes a cluster, so every rule (when a pod is replaced, when
//! the credentials are rewritten, when nothing may be swept) is a plain function of its
//! inputs and is tested as a table of named cases in `tests.rs`. A decision names only
//! what differs from the observation: an empty [`Plan`] means the agent makes no calls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodSpec, ResourceRequirements, Secret,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use starling_trainer::env as names;

use super::placement::LocalPlacement;
use crate::api::{PeerId, PodState, TrainerGroup, TrainerGroupStatus};
use crate::contract::PEER_METRICS_PORT;
use crate::hub::run_tls::CA_KEY;
pub use crate::k8s::{AGENT, LABEL_GROUP, LABEL_PEER};
use crate::k8s::{
    ANNOTATION_TEMPLATE_HASH, GPU_RESOURCE, LABEL_MANAGED_BY, LABEL_MEMBER, env as env_var,
    locked_down, pod_ip_env, secret_env,
};

/// Where the agent puts things: its member's name and its trainer namespace.
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    pub member: &'a str,
    pub namespace: &'a str,
    /// What this member adds to every trainer pod.
    pub placement: &'a LocalPlacement,
}

/// What the agent saw of one group, all read from reflector stores.
#[derive(Clone, Debug)]
pub struct Observed {
    pub group: Arc<TrainerGroup>,
    /// The group's credentials Secret on the hub; `None` until the hub's copy is seen.
    pub credentials: Option<Arc<Secret>>,
    /// The local pods labelled with this group.
    pub pods: Vec<Arc<Pod>>,
    /// The local copy of the credentials, if there is one.
    pub secret: Option<Arc<Secret>>,
}

/// An object to delete, pinned to the uid that was observed so that a newer object of
/// the same name is never deleted on the strength of an old observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub name: String,
    pub uid: Option<String>,
}

impl Deletion {
    fn of(meta: &ObjectMeta) -> Self {
        Deletion {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
        }
    }
}

/// What must change for one group; each field is `None` or empty when it already holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The local credentials Secret, when the local copy is missing or differs.
    pub secret: Option<Secret>,
    /// Pods to delete: failed ones, and those of peers the group no longer has.
    pub delete: Vec<Deletion>,
    /// Pods to create: wanted peers with no pod at all.
    pub create: Vec<Pod>,
    /// The group's status, when it differs from what the hub has.
    pub status: Option<TrainerGroupStatus>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self == &Plan::default()
    }
}

/// Local objects of groups the hub no longer has.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sweep {
    pub pods: Vec<Deletion>,
    pub secrets: Vec<Deletion>,
}

/// The name of a peer's pod: stable, so a pod that exists is never duplicated.
pub fn pod_name(group: &str, peer: PeerId) -> String {
    format!("{group}-{peer}")
}

/// The name of a group's local credentials Secret.
pub fn secret_name(group: &str) -> String {
    format!("{group}-credentials")
}

fn terminating(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// One pod per peer of the group. A failed pod, or one made from another template, is
/// deleted and, once it is gone, created afresh; a pod being deleted is left to finish.
/// Pods wait for the group's credentials, which they read their token from.
pub fn decide(observed: &Observed, site: &Site) -> Plan {
    let group = &observed.group;
    let name = group.name_any();
    let wanted: BTreeMap<String, PeerId> = group
        .spec
        .peers
        .iter()
        .map(|p| (pod_name(&name, *p), *p))
        .collect();
    let existing: BTreeMap<String, &Pod> = observed
        .pods
        .iter()
        .map(|p| (p.name_any(), p.as_ref()))
        .collect();
    let mut plan = Plan::default();
    for (existing_name, pod) in &existing {
        let replace = match wanted.get(existing_name) {
            None => true,
            Some(peer) => {
                phase(pod) == Some("Failed")
                    || outdated(pod, &trainer_pod(group, existing_name, *peer, site))
            }
        };
        if replace && !terminating(&pod.metadata) {
            plan.delete.push(Deletion::of(&pod.metadata));
        }
    }
    if let Some(credentials) = &observed.credentials {
        let secret = local_secret(group, credentials, site);
        if observed
            .secret
            .as_deref()
            .is_none_or(|local| !same_secret(local, &secret))
        {
            plan.secret = Some(secret);
        }
        for (wanted_name, peer) in &wanted {
            if !existing.contains_key(wanted_name) {
                plan.create
                    .push(trainer_pod(group, wanted_name, *peer, site));
            }
        }
    }
    let status = status(group, &wanted, &existing);
    if group.status.as_ref() != Some(&status) {
        plan.status = Some(status);
    }
    plan
}

/// The local pods and Secrets whose group the hub no longer has. `groups` is `None`
/// when the hub has not answered yet: then nothing is swept, since an unreachable hub
/// must never make a member stop training.
pub fn sweep(
    groups: Option<&BTreeSet<String>>,
    pods: &[Arc<Pod>],
    secrets: &[Arc<Secret>],
) -> Sweep {
    let Some(groups) = groups else {
        return Sweep::default();
    };
    let orphan = |meta: &ObjectMeta| {
        !terminating(meta)
            && !meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_GROUP))
                .is_some_and(|g| groups.contains(g))
    };
    Sweep {
        pods: pods
            .iter()
            .filter(|p| orphan(&p.metadata))
            .map(|p| Deletion::of(&p.metadata))
            .collect(),
        secrets: secrets
            .iter()
            .filter(|s| orphan(&s.metadata))
            .map(|s| Deletion::of(&s.metadata))
            .collect(),
    }
}

fn labels(group: &str, site: &Site) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), AGENT.to_string()),
        (LABEL_GROUP.to_string(), group.to_string()),
        (LABEL_MEMBER.to_string(), site.member.to_string()),
    ])
}

/// The group's credentials as the member keeps them: the hub's data under local labels.
fn local_secret(group: &TrainerGroup, credentials: &Secret, site: &Site) -> Secret {
    let name = group.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&name)),
            namespace: Some(site.namespace.to_string()),
            labels: Some(labels(&name, site)),
            ..ObjectMeta::default()
        },
        data: Some(credentials.data.clone().unwrap_or_default()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// Whether the local copy already holds what `wanted` says: the same data and type,
/// and the agent's labels (labels others added do not count as a difference).
fn same_secret(local: &Secret, wanted: &Secret) -> bool {
    let local_labels = local.metadata.labels.clone().unwrap_or_default();
    local.data.clone().unwrap_or_default() == wanted.data.clone().unwrap_or_default()
        && local.type_ == wanted.type_
        && wanted
            .metadata
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| local_labels.get(k) == Some(v))
}

/// A peer's trainer pod: the template's image and settings, the exchange endpoint, and
/// the peer's token from the local credentials Secret.
fn trainer_pod(group: &TrainerGroup, name: &str, peer: PeerId, site: &Site) -> Pod {
    let t = &group.spec.template;
    let peer = peer.to_string();
    let mut labels = labels(&group.name_any(), site);
    labels.insert(LABEL_PEER.into(), peer.clone());
    let mut env = t.env.clone();
    env.extend([
        env_var(names::EXCHANGE, &group.spec.exchange_endpoint),
        secret_env(names::TOKEN, &secret_name(&group.name_any()), &peer),
        env_var(names::DATA_DIR, "data"),
        pod_ip_env(),
        env_var(
            names::METRICS_LISTEN,
            format!("$(POD_IP):{PEER_METRICS_PORT}"),
        ),
    ]);
    if group.spec.exchange_endpoint.starts_with("https://") {
        // The run's CA came with the tokens (the hub writes it next to them).
        let ca = secret_env(names::TLS_CA, &secret_name(&group.name_any()), CA_KEY);
        env.push(ca);
    }
    if !env.iter().any(|e| e.name == names::DEVICE) {
        env.push(env_var(names::DEVICE, device_for(t.resources.as_ref())));
    }
    env.extend(site.placement.trace_env.iter().cloned());
    let placed = site.placement.place(t);
    if let Some(mbps) = placed.upload_limit_mbps {
        env.push(env_var(names::BANDWIDTH_MBPS, mbps));
    }
    let mut spec = PodSpec {
        restart_policy: Some("OnFailure".into()),
        // Trainers talk to their exchange, never to the Kubernetes API.
        automount_service_account_token: Some(false),
        node_selector: placed.node_selector,
        tolerations: placed.tolerations,
        containers: vec![Container {
            name: "trainer".into(),
            image: Some(t.image.clone()),
            args: Some(t.args.clone()),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some("metrics".into()),
                container_port: PEER_METRICS_PORT.into(),
                ..ContainerPort::default()
            }]),
            resources: t.resources.clone(),
            ..Container::default()
        }],
        ..PodSpec::default()
    };
    locked_down(&mut spec);
    let hash = template_hash(&spec);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(site.namespace.into()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(ANNOTATION_TEMPLATE_HASH.into(), hash)])),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        ..Pod::default()
    }
}

/// `cuda` for a pod that asks for a GPU, `cpu` otherwise: a GPU pod that finds no CUDA
/// fails and says why rather than training slowly on the CPU, and a CPU pod never picks up
/// a GPU it was not given. A template that sets `STARLING_DEVICE` itself keeps its own.
fn device_for(resources: Option<&ResourceRequirements>) -> &'static str {
    let gpus = |m: Option<&BTreeMap<String, Quantity>>| {
        m.and_then(|m| m.get(GPU_RESOURCE))
            .is_some_and(|q| !matches!(q.0.trim(), "" | "0"))
    };
    let asks = resources.is_some_and(|r| gpus(r.limits.as_ref()) || gpus(r.requests.as_ref()));
    if asks { "cuda" } else { "cpu" }
}

/// Whether `pod` was made from another template than `wanted`. A pod that carries no
/// hash (made by an older agent) is left alone: an agent upgrade alone must not restart
/// every trainer.
fn outdated(pod: &Pod, wanted: &Pod) -> bool {
    let hash = |p: &Pod| p.annotations().get(ANNOTATION_TEMPLATE_HASH).cloned();
    hash(pod).is_some_and(|h| Some(h) != hash(wanted))
}

/// A hash of a pod spec that stays the same across agent builds and versions (FNV-1a
/// over its JSON form), unlike `std`'s hasher.
fn template_hash(spec: &PodSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// One line per wanted peer, as its pod last reported (`Pending` while it has none).
fn pod_state(peer: PeerId, name: &str, pod: Option<&Pod>) -> PodState {
    let status = pod.and_then(|p| p.status.as_ref());
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first());
    PodState {
        peer,
        pod: name.to_string(),
        phase: status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
        restarts: container.map_or(0, |c| u32::try_from(c.restart_count).unwrap_or(0)),
        message: container
            .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
            .or_else(|| status.and_then(|s| s.message.clone())),
    }
}

fn status(
    group: &TrainerGroup,
    wanted: &BTreeMap<String, PeerId>,
    existing: &BTreeMap<String, &Pod>,
) -> TrainerGroupStatus {
    let pods: Vec<PodState> = wanted
        .iter()
        .map(|(name, peer)| pod_state(*peer, name, existing.get(name).copied()))
        .collect();
    let count = |phase: &str| pods.iter().filter(|s| s.phase == phase).count() as u32;
    TrainerGroupStatus {
        replicas: wanted.len() as u32,
        ready: count("Running"),
        running: count("Running"),
        failed: count("Failed"),
        pods,
        observed_generation: group.metadata.generation,
    }
}
