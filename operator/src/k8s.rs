//! Kubernetes vocabulary shared by the hub controllers and the member agent: the field
//! manager, labels, condition types and reasons, object names, GPU resources, the one
//! server-side-apply helper and the per-object back-off. Defined once so a controller and
//! the agent can never spell a contract two ways.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::time::Duration;

mod pod_security;

#[cfg(test)]
pub(crate) use pod_security::restricted_violations;
pub use pod_security::{WORKDIR, locked_down};

use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, ObjectFieldSelector, ResourceRequirements, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of everything the hub operator writes.
pub const MANAGER: &str = "starling-operator";
/// Field manager (and `managed-by` label) of what a member agent writes.
pub const AGENT: &str = "starling-agent";

/// The extended resource GPUs are requested and advertised as.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Node label naming the GPU model (set by NVIDIA's GPU feature discovery).
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

pub const LABEL_RUN: &str = "starling.dev/run";
pub const LABEL_RUN_NAMESPACE: &str = "starling.dev/run-namespace";
pub const LABEL_RUN_UID: &str = "starling.dev/run-uid";
pub const LABEL_MEMBER: &str = "starling.dev/member";
pub const LABEL_GROUP: &str = "starling.dev/group";
pub const LABEL_PEER: &str = "starling.dev/peer";
/// On a trainer pod: a hash of the spec it was made from, so that a pod made from an
/// older TrainerGroup template (a new image, say) is told apart and replaced.
pub const ANNOTATION_TEMPLATE_HASH: &str = "starling.dev/template-hash";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/component` of a run's exchange (Deployment, Pods, Service).
pub const COMPONENT_EXCHANGE: &str = "exchange";
pub const COMPONENT_PUBLISHER: &str = "publisher";
pub const COMPONENT_EVALUATOR: &str = "evaluator";

/// Condition types the Starling resources report.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    /// Whether the run's checkpoints reach the Hub (only for runs with `spec.publish`).
    pub const PUBLISHED: &str = "Published";
    /// Whether a member agent's hub token is good for a while yet.
    pub const CREDENTIALS: &str = "Credentials";
    /// Whether the run's exchange speaks TLS, verified with the run's own CA.
    pub const EXCHANGE_TLS: &str = "ExchangeTLS";
    /// Whether the exchange can use the run's bucket (only for runs with
    /// `spec.exchange.storage`).
    pub const EXCHANGE_STORAGE: &str = "ExchangeStorage";
}

/// Condition reasons, which double as Event reasons.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const CREDENTIALS_CREATED: &str = "CredentialsCreated";
    pub const EXCHANGE_STARTING: &str = "ExchangeStarting";
    pub const EXCHANGE_FAILED: &str = "ExchangeFailed";
    pub const EXCHANGE_UNREACHABLE: &str = "ExchangeUnreachable";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const PLACED: &str = "Placed";
    pub const SETTINGS_CHANGED: &str = "SettingsChanged";
    pub const PEER_LOST: &str = "PeerLost";
    pub const MEMBER_LOST: &str = "MemberLost";
    pub const PEERS_UNPLACED: &str = "PeersUnplaced";
    pub const PEERS_MISSING: &str = "PeersMissing";
    pub const ALL_PEERS_TRAINING: &str = "AllPeersTraining";
    pub const RUNNING: &str = "Running";
    pub const TRAINING: &str = "Training";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const PUBLISHING: &str = "Publishing";
    pub const PUBLISHED: &str = "Published";
    pub const CHECKPOINT_PUBLISHED: &str = "CheckpointPublished";
    pub const PUBLISH_FAILED: &str = "PublishFailed";
    pub const RUN_FINISHED: &str = "RunFinished";
    pub const DELETED: &str = "Deleted";
    pub const RECONCILE_ERROR: &str = "ReconcileError";
    pub const AGENT_NOT_CONNECTED: &str = "AgentNotConnected";
    pub const HEARTBEAT_RECEIVED: &str = "HeartbeatReceived";
    pub const HEARTBEAT_MISSED: &str = "HeartbeatMissed";
    pub const CREDENTIALS_VALID: &str = "CredentialsValid";
    pub const CREDENTIALS_EXPIRING: &str = "CredentialsExpiring";
    pub const CREDENTIALS_EXPIRED: &str = "CredentialsExpired";
    pub const PEER_EXCLUDED: &str = "PeerExcluded";
    pub const PEER_BANNED: &str = "PeerBanned";
    pub const PEER_READMITTED: &str = "PeerReadmitted";
    pub const COPY_DETECTED: &str = "CopyDetected";
    pub const SCORING_UNAVAILABLE: &str = "ScoringUnavailable";
    pub const RUN_CA: &str = "RunCA";
    pub const NO_CERTIFICATE: &str = "NoCertificate";
    pub const TLS_DISABLED: &str = "TLSDisabled";
    pub const CERTIFICATE_SECRET: &str = "CertificateSecret";
    pub const STORAGE_READY: &str = "StorageReady";
    pub const STORAGE_UNAVAILABLE: &str = "StorageUnavailable";
}

/// The hub namespace holding one member's TrainerGroups and credentials.
pub fn member_namespace(member: &str) -> String {
    format!("starling-member-{member}")
}

/// Sets one condition, keeping its transition time while its status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    let transition = match &existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match existing {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

pub fn condition_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// The reason of condition `type_`, if it is set.
pub fn condition_reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

/// GPUs asked for: `nvidia.com/gpu` in limits, else in requests (Kubernetes requires the
/// two to be equal for extended resources, and either may be the one written).
pub fn gpus(resources: Option<&ResourceRequirements>) -> u32 {
    let get =
        |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            m.and_then(|m| m.get(GPU_RESOURCE))
                .and_then(|q| q.0.parse().ok())
        };
    resources
        .and_then(|r| get(r.limits.as_ref()).or_else(|| get(r.requests.as_ref())))
        .unwrap_or(0)
}

/// `Ok` for a 404: deleting what is already gone succeeds.
pub fn ignore_not_found<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// `Ok` for a 409: creating what already exists succeeds.
pub fn ignore_conflict<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Server-side applies `object` as `manager`, taking over fields from anyone else: the
/// one way Starling writes a whole object. The object's name comes from its metadata.
pub async fn apply<K>(api: &Api<K>, manager: &str, object: &K) -> kube::Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(object),
    )
    .await
}

/// Consecutive failures per object: 2 s doubling to 60 s, reset by a success.
///
/// Keyed by the object itself (kind, namespace, name), so the reconcile that succeeds and
/// the error policy that counts a failure cannot name it two ways.
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<HashMap<ObjectRef<DynamicObject>, u32>>,
}

impl Backoff {
    const MAX_EXPONENT: u32 = 6;

    /// Counts a failure of `object` and says how long to wait before the next attempt.
    pub fn failed<K: Resource<DynamicType = ()>>(&self, object: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures
            .entry(ObjectRef::from_obj(object).erase())
            .or_default();
        *n = (*n + 1).min(Self::MAX_EXPONENT);
        Duration::from_secs(1 << *n).min(Duration::from_secs(60))
    }

    /// Forgets `object`'s failures.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, object: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ObjectRef::from_obj(object).erase());
    }
}

/// A watch as the stores keep it: with the watch's backoff, and without `managedFields`,
/// which no decision reads and which are most of an applied object's size (one entry per
/// field per manager), so a thousand runs' children stay small in memory.
pub fn slim<K: Resource + Clone + Send + 'static>(
    watch: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send {
    watch
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
}

/// An env var with a literal value.
pub fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

pub fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(source),
    }
}

/// `name` set from `key` of Secret `secret`.
pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    env_from(
        name,
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..EnvVarSource::default()
        },
    )
}

/// This process's OpenTelemetry settings as a pod's environment: the pods the operator
/// and the agents make export their traces where they do.
pub fn trace_env() -> Vec<EnvVar> {
    (starling_trainer::trace::forwarded_env().into_iter())
        .map(|(name, value)| env(&name, value))
        .collect()
}

/// `POD_IP`, from the pod's status: what a container listens on, `$(POD_IP):PORT`.
pub fn pod_ip_env() -> EnvVar {
    env_from(
        "POD_IP",
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.podIP".into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::api::MemberCluster;

    fn member(name: &str) -> MemberCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "metadata": {"name": name},
            "spec": {"tier": "cloud", "region": "eu", "bandwidth": {"uploadMbps": 100, "downloadMbps": 100}},
        }))
        .unwrap()
    }

    #[test]
    fn a_success_resets_the_back_off_its_failures_built_up() {
        let backoff = Backoff::default();
        let eu = member("cloud-eu");
        assert_eq!(backoff.failed(&eu), Duration::from_secs(2));
        assert_eq!(backoff.failed(&eu), Duration::from_secs(4));
        // The reconcile's copy of the object, not the error policy's, clears it.
        backoff.succeeded(&member("cloud-eu"));
        assert_eq!(backoff.failed(&eu), Duration::from_secs(2));
    }

    #[test]
    fn back_off_is_counted_per_object_and_capped_at_a_minute() {
        let backoff = Backoff::default();
        let eu = member("cloud-eu");
        for _ in 0..10 {
            backoff.failed(&eu);
        }
        assert_eq!(backoff.failed(&eu), Duration::from_secs(60));
        assert_eq!(backoff.failed(&member("cloud-us")), Duration::from_secs(2));
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut conds = vec![];
        set_condition(&mut conds, "Ready", false, "Placing", "a", Some(1), t0);
        set_condition(&mut conds, "Ready", false, "Placing", "b", Some(2), t1);
        assert_eq!(conds[0].last_transition_time, Time(t0));
        assert_eq!(conds[0].message, "b");
        set_condition(&mut conds, "Ready", true, "Running", "c", Some(2), t1);
        assert_eq!(conds[0].last_transition_time, Time(t1));
        assert!(condition_true(&conds, "Ready"));
        assert_eq!(condition_reason(&conds, "Ready"), Some("Running"));
    }

    #[test]
    fn gpus_come_from_limits_else_requests() {
        let r: ResourceRequirements = serde_json::from_value(serde_json::json!({
            "requests": {"nvidia.com/gpu": "2"}
        }))
        .unwrap();
        assert_eq!(gpus(Some(&r)), 2);
        let r: ResourceRequirements = serde_json::from_value(serde_json::json!({
            "limits": {"nvidia.com/gpu": "1", "cpu": "4"}
        }))
        .unwrap();
        assert_eq!(gpus(Some(&r)), 1);
        assert_eq!(gpus(None), 0);
    }
}
