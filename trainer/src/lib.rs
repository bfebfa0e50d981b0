//! The Starling trainer: the SparseLoCo codec, the model, data, the gRPC exchange and the
//! `train` / `exchange` / `evaluate` roles.

pub mod bench;
pub mod codec;
pub mod data;
pub mod model;
pub mod outer;
#[cfg(test)]
mod testing;
