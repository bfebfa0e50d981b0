//! The Starling API: custom resources in group `starling.dev`, version `v1alpha1`.
//!
//! These types are the single source of the CRD YAML under `crds/` (see [`crate::crdgen`]).
//! Everything a schema can say (types, ranges, enums, defaults, simple cross-field CEL rules)
//! is said here so the API server rejects bad objects at `kubectl apply` time; what a schema
//! cannot say lives in [`validation`].

// Each `printcolumn(...)` in a `#[kube]` attribute repeats keys like `type_`; that is the
// derive's syntax, not a mistake.
#![allow(clippy::duplicated_attributes)]

mod exchange;
mod member_cluster;
mod model;
mod trainer_group;
mod training_run;
pub mod validation;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use exchange::{
    ExchangeServiceSpec, ExchangeSpec, ExchangeStorageSpec, ExchangeTlsSpec, ServiceType,
};
pub use member_cluster::{
    Bandwidth, GpuCapacity, MemberCluster, MemberClusterSpec, MemberClusterStatus, Tier,
};
pub use model::{LlamaConfig, ModelPreset};
pub use trainer_group::{
    PodState, RunReference, TrainerGroup, TrainerGroupSpec, TrainerGroupStatus, TrainerPodTemplate,
};
pub use training_run::{
    AdamWSpec, Algorithm, BuiltinCorpus, CheckpointRecord, CheckpointSpec, CompressionSpec,
    CopySpec, CorpusSource, DataSpec, HubRef, LossPoint, ModelSpec, OpenSkillSpec, PeerState,
    PeerStatus, PeersSpec, Phase, PlacementSpec, Precision, PublishSpec, PublishedRecord,
    RevisionStyle, RoundStatus, ScheduleSpec, ScoringSpec, ScoringStatus, Standing, TokenSecretRef,
    TrainingRun, TrainingRunSpec, TrainingRunStatus, ValueBits,
};

/// API group of every Starling resource.
pub const GROUP: &str = "starling.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// Every Starling CRD, in a stable order (the order `crdgen` writes and tests check).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        MemberCluster::crd(),
        TrainingRun::crd(),
        TrainerGroup::crd(),
    ]
}

/// Identity of one trainer peer within a run, e.g. `p0`: the trainer's own type, so the
/// operator and the exchange can never disagree on what a peer id is.
pub use starling_trainer::exchange::PeerId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_its_string_form() {
        let id: PeerId = serde_json::from_str("\"p12\"").unwrap();
        assert_eq!(id.index(), 12);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"p12\"");
        for bad in ["\"12\"", "\"p\"", "\"p+1\"", "\"q1\"", "\"p-1\"", "\"p01\""] {
            assert!(
                serde_json::from_str::<PeerId>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }
}
