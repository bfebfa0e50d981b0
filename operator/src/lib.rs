//! Starling's Kubernetes operator: the API types and their CRDs, the hub controllers,
//! placement, the member agent, and the contract with the trainer.

pub mod agent;
pub mod api;
pub mod contract;
pub mod crdgen;
pub mod hub;
pub mod k8s;
pub mod onboard;
pub mod placement;
pub mod rbac;
pub mod status_view;
pub mod telemetry;
