//! Starling's Kubernetes operator: the API types, their CRDs, and (in later modules) the
//! hub controllers and the member agent.

pub mod api;
pub mod crdgen;
