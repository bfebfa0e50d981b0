//! Scoring peers' contributions, Gauntlet-style: OpenSkill ratings over each round's
//! measured scores, the rules that exclude and ban peers that do not help, and the
//! weights of the next round's aggregate. Pure functions of what was measured, so the
//! ledger can replay them.

pub mod adversary;
pub mod bench;
pub mod canonical;
pub mod evaluate;
pub mod ledger;
pub mod openskill;
pub mod recorder;
pub mod rules;
pub mod simulate;
mod spec;

pub use spec::{CopySpec, OpenSkillSpec, ScoringSpec};
