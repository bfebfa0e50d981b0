//! The trainer binary's long-running roles: `train` (one peer of a run), `evaluate` (one
//! of its evaluators) and `exchange` (the run's rendezvous, in
//! [`crate::exchange::server`]).

pub mod evaluate;
pub mod metrics;
pub mod train;
