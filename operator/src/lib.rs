//! Starling's Kubernetes operator: the API types and their CRDs, the hub controllers,
//! placement, and the member agent.

pub mod agent;
pub mod api;
pub mod crdgen;
pub mod hub;
pub mod placement;
pub mod resources;
