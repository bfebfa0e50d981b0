use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PeerId;

/// What one member cluster must run for one TrainingRun. Lives in the member's hub
/// namespace (`starling-member-<member>`), written by the hub operator, read and reported
/// on by that member's agent, which creates the pods in its own cluster.
///
/// Kubernetes owner references cannot cross namespaces, so the run's finalizer (not the
/// garbage collector) deletes its groups; `runRef` names the run for that and for humans.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "TrainerGroup",
    namespaced,
    shortname = "tg",
    category = "starling",
    status = "TrainerGroupStatus",
    derive = "PartialEq",
    doc = "The trainer pods one member cluster runs for one TrainingRun.",
    printcolumn(name = "Run", type_ = "string", json_path = ".spec.runRef.name"),
    printcolumn(name = "Member", type_ = "string", json_path = ".spec.member"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrainerGroupSpec {
    pub run_ref: RunReference,
    /// The MemberCluster that runs these peers.
    #[schemars(length(min = 1))]
    pub member: String,
    /// The peers this member hosts: one pod each. Ids are stable across re-placement.
    pub peers: Vec<PeerId>,
    pub template: TrainerPodTemplate,
    /// gRPC endpoint of the run's exchange, reachable from the member (dialled outwards).
    #[schemars(length(min = 1))]
    pub exchange_endpoint: String,
    /// Secret (in this namespace) holding one bearer token per peer, keyed by peer id.
    #[schemars(length(min = 1))]
    pub credentials_secret: String,
}

/// Identifies the TrainingRun a group belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReference {
    pub namespace: String,
    pub name: String,
    /// Guards against a deleted and re-created run of the same name adopting old groups.
    pub uid: String,
}

/// The trainer pod a member agent builds. Deliberately narrower than a PodTemplateSpec: a
/// hub can ask a member (perhaps someone's home machine) to run the trainer image with
/// these settings, and nothing else — no host paths, privileges or arbitrary containers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainerPodTemplate {
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Upload cap for the trainer's exchange traffic, from the member's declared bandwidth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub upload_limit_mbps: Option<u32>,
}

/// What the member's agent last reported about the group's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainerGroupStatus {
    /// Pods the agent is converging to (one per peer).
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready: u32,
    #[serde(default)]
    pub running: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodState>,
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One trainer pod on the member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub peer: PeerId,
    /// Pod name in the member cluster.
    pub pod: String,
    /// Kubernetes pod phase as the member reports it.
    pub phase: String,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
