//! Test and demo infrastructure: a local Kubernetes control plane and the end-to-end tests.
//! Real users run real clusters; nothing in the product depends on this crate.
pub mod apiserver;
pub mod bench;
pub mod demo;
pub mod federation;
pub mod harness;
pub mod hub;
pub mod kubelet;
