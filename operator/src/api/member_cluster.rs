use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster that contributes GPUs to Starling runs: a cloud or university cluster, or a
/// home k3s box behind NAT. Created on the hub by the platform team; its status is written
/// by the member's agent, which always dials out to the hub (members are never dialled).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "MemberCluster",
    shortname = "mc",
    category = "starling",
    status = "MemberClusterStatus",
    derive = "PartialEq",
    doc = "A member cluster that runs Starling trainer pods.",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        description = "Allocatable GPUs reported by the agent",
        json_path = ".status.gpusAllocatable"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MemberClusterSpec {
    /// Reliability class. `home` members may vanish at any moment (power, NAT, ISP), so
    /// placement spreads over them and prefers `cloud` members for evaluators.
    pub tier: Tier,

    /// Free-form region name (e.g. `eu-west`, `lagos`), used to spread peers.
    #[schemars(length(min = 1, max = 63))]
    pub region: String,

    /// Declared link capacity; home trainers are rate-limited to it.
    pub bandwidth: Bandwidth,

    /// Most trainer pods this member accepts across all runs; unset means as many as it
    /// has GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_trainers: Option<u32>,

    /// Attributes that a TrainingRun's `placement.memberSelector` matches against.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Reliability class of a member cluster.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Tier {
    Cloud,
    Home,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Cloud => "cloud",
            Tier::Home => "home",
        })
    }
}

/// Declared bandwidth of a member's internet link, in megabits per second.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    #[schemars(range(min = 1))]
    pub upload_mbps: u32,
    #[schemars(range(min = 1))]
    pub download_mbps: u32,
}

/// What the member's agent last reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberClusterStatus {
    /// `Ready` is True while heartbeats arrive within the grace period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,

    /// When the agent's hub token expires, as the agent read it from the token; the
    /// `Credentials` condition turns False ahead of it. Rotate with `starling-operator
    /// member rotate-token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_expire: Option<Time>,

    /// When that token was issued (its lifetime sets how early `Credentials` warns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_issued: Option<Time>,

    /// Version of the agent binary, to spot members that need an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// GPU capacity by product (the `nvidia.com/gpu.product` node label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuCapacity>,

    /// Sum of `gpus[].allocatable`, kept for `kubectl get mc`.
    #[serde(default)]
    pub gpus_allocatable: u32,

    /// Sum of `gpus[].inUse`.
    #[serde(default)]
    pub gpus_in_use: u32,
}

/// Allocatable and used GPUs of one product on a member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuCapacity {
    /// e.g. `NVIDIA-H100-80GB-HBM3`, or `unknown` when nodes carry no product label.
    pub product: String,
    pub allocatable: u32,
    /// GPUs held by Starling trainer pods.
    pub in_use: u32,
}
