//! What may change while a run goes on: its length, the quorum a round waits for, how
//! long a round stays open (see [`super::pacing`]), and how often checkpoints are written.
//!
//! Everything else about a run is fixed when it starts (its fingerprint), but these are
//! the exchange's alone, so the operator can change them in the running exchange
//! (`Configure`) without restarting anything or losing a round. The exchange keeps the
//! latest settings with its state, so a restart keeps them too.

use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::proto;
use crate::env;

/// The settings of a running run.
#[derive(Args, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Outer rounds in the run (for `ddp`: optimiser steps).
    #[arg(long, env = env::ROUNDS, default_value_t = 12)]
    pub rounds: u32,
    /// Updates needed before a round closes early (when every live peer has sent).
    #[arg(long, env = env::MIN_PEERS, default_value_t = 1)]
    pub min_peers: u32,
    /// Seconds a round stays open after its first update, at most: below it the deadline
    /// follows how long recent rounds' updates took (1.5 × their 90th percentile).
    #[arg(long, env = env::ROUND_DEADLINE, default_value_t = 120.0)]
    pub round_deadline: f64,
    /// Write a checkpoint every this many rounds (and after the last).
    #[arg(long, env = env::CHECKPOINT_EVERY, default_value_t = 10)]
    pub checkpoint_every: u32,
    /// The adaptive deadline is never shorter than this many seconds.
    #[arg(long, env = env::ROUND_DEADLINE_FLOOR, default_value_t = DEFAULT_DEADLINE_FLOOR)]
    pub round_deadline_floor: f64,
    /// A round closes early once this fraction of the live peers has sent and every peer
    /// still missing is predicted to miss the deadline; 1 never closes early.
    #[arg(long, env = env::ROUND_QUORUM, default_value_t = DEFAULT_QUORUM)]
    pub round_quorum: f64,
}

/// Rounds are never cut shorter than a minute after their first update unless every
/// peer is in: a deadline shorter than the spread of a few healthy peers loses updates.
pub const DEFAULT_DEADLINE_FLOOR: f64 = 60.0;
/// Three quarters of the peers in, and the rest predicted late: closing is no loss.
pub const DEFAULT_QUORUM: f64 = 0.75;

impl Settings {
    /// How long a round stays open after its first update, at most.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.round_deadline)
    }

    /// The adaptive deadline's floor.
    pub fn deadline_floor(&self) -> Duration {
        Duration::from_secs_f64(self.round_deadline_floor)
    }

    /// Checks the settings on their own; the exchange also refuses a length shorter than
    /// the round in progress.
    pub fn validate(&self) -> Result<(), String> {
        if self.rounds == 0 {
            return Err("rounds must be positive".into());
        }
        if !(self.round_deadline.is_finite() && self.round_deadline > 0.0) {
            return Err(format!(
                "the round deadline must be a positive number of seconds, not {}",
                self.round_deadline
            ));
        }
        if Duration::try_from_secs_f64(self.round_deadline).is_err() {
            return Err(format!(
                "a round deadline of {}s is too long",
                self.round_deadline
            ));
        }
        if Duration::try_from_secs_f64(self.round_deadline_floor).is_err() {
            return Err(format!(
                "the round deadline's floor must be a number of seconds, not {}",
                self.round_deadline_floor
            ));
        }
        if !(self.round_quorum > 0.0 && self.round_quorum <= 1.0) {
            return Err(format!(
                "the round quorum is a fraction of the peers in (0, 1], not {}",
                self.round_quorum
            ));
        }
        Ok(())
    }

    /// The settings as environment variables, read back by the same flags.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (env::ROUNDS, self.rounds.to_string()),
            (env::MIN_PEERS, self.min_peers.to_string()),
            (env::ROUND_DEADLINE, self.round_deadline.to_string()),
            (env::CHECKPOINT_EVERY, self.checkpoint_every.to_string()),
            (
                env::ROUND_DEADLINE_FLOOR,
                self.round_deadline_floor.to_string(),
            ),
            (env::ROUND_QUORUM, self.round_quorum.to_string()),
        ]
    }
}

impl From<Settings> for proto::Settings {
    fn from(s: Settings) -> Self {
        Self {
            rounds: s.rounds,
            min_peers: s.min_peers,
            round_deadline_seconds: s.round_deadline,
            checkpoint_every: s.checkpoint_every,
            round_deadline_floor_seconds: s.round_deadline_floor,
            round_quorum: s.round_quorum,
        }
    }
}

impl TryFrom<proto::Settings> for Settings {
    type Error = String;

    fn try_from(s: proto::Settings) -> Result<Self, String> {
        let settings = Self {
            rounds: s.rounds,
            min_peers: s.min_peers,
            round_deadline: s.round_deadline_seconds,
            checkpoint_every: s.checkpoint_every,
            round_deadline_floor: s.round_deadline_floor_seconds,
            round_quorum: s.round_quorum,
        };
        settings.validate()?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            rounds: 14,
            min_peers: 2,
            round_deadline: 90.5,
            checkpoint_every: 3,
            round_deadline_floor: 12.5,
            round_quorum: 0.8,
        }
    }

    #[test]
    fn settings_survive_the_trip_through_the_environment_and_the_wire() {
        let s = settings();
        let back: Settings = env::parse_as_env(&s.to_env()).unwrap();
        assert_eq!(back, s);
        let wire: proto::Settings = s.into();
        assert_eq!(Settings::try_from(wire).unwrap(), s);
    }

    #[test]
    fn nonsense_settings_are_refused_with_the_reason() {
        for (change, expected) in [
            (
                (|s: &mut Settings| s.rounds = 0) as fn(&mut Settings),
                "rounds must be positive",
            ),
            (
                |s| s.round_deadline = f64::NAN,
                "positive number of seconds, not NaN",
            ),
            (|s| s.round_deadline = -1.0, "not -1"),
            (|s| s.round_deadline = 1e300, "too long"),
            (|s| s.round_deadline_floor = -3.0, "not -3"),
            (|s| s.round_quorum = 0.0, "in (0, 1], not 0"),
            (|s| s.round_quorum = 1.5, "not 1.5"),
        ] {
            let mut s = settings();
            change(&mut s);
            let err = Settings::try_from(proto::Settings::from(s)).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
