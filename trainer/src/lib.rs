//! The Starling trainer: the SparseLoCo codec, the model, data, the gRPC exchange and the
//! `train` / `exchange` / `evaluate` roles.

pub mod bench;
pub mod codec;
pub mod cpu;
pub mod data;
pub mod device;
pub mod env;
pub mod exchange;
pub mod hub;
pub mod local;
pub mod model;
pub mod outer;
pub mod roles;
pub mod run;
pub mod scoring;
pub mod simulate;
#[cfg(test)]
mod testing;
pub mod trace;
