//! The trainer binary's long-running roles: `train` (one peer of a run) and `exchange`
//! (the run's rendezvous, in [`crate::exchange::server`]). `evaluate` is to come.

pub mod train;
