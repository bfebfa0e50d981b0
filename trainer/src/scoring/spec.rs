//! What a run's scoring is told: how many evaluators, how much they evaluate, the rating
//! model and every threshold of the rules. A TrainingRun's `spec.scoring`, and the
//! constants every ledger record carries.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Gauntlet-style scoring: evaluators measure each update's effect on loss, scores feed
/// OpenSkill ratings, and the rules below decide who the next round's aggregate takes.
/// The defaults are Templar's, where it has them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScoringSpec {
    /// Evaluator pods that score the peers' updates each round.
    #[serde(default = "default_evaluators")]
    #[schemars(range(min = 0))]
    pub evaluators: u32,
    /// Sequences per scored update: half from a random slice, half from the peer's own.
    #[serde(default = "default_eval_batches")]
    #[schemars(range(min = 2))]
    pub eval_batches: u32,
    /// Updates scored per round; beyond it, a seeded sample favouring the peers scored
    /// least recently.
    #[serde(default = "default_max_evaluated_per_round")]
    #[schemars(range(min = 1))]
    pub max_evaluated_per_round: u32,
    #[serde(default)]
    pub open_skill: OpenSkillSpec,
    /// A score (relative loss improvement of the update applied alone) at or below this is
    /// negative.
    #[serde(default)]
    pub exclusion_threshold: f64,
    /// A score at or below this fraction of the round's median score is negative too: an
    /// update that helps a tenth as much as the typical peer's contributes nothing (random
    /// noise of an honest norm scores a few hundredths of it).
    #[serde(default = "default_relative_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub relative_threshold: f64,
    /// Negative scores in a row that exclude a peer, until it scores positive again.
    #[serde(default = "default_negatives_to_exclude")]
    #[schemars(range(min = 1))]
    pub negatives_to_exclude: u32,
    /// Rounds a banned peer (a copier, a replayer, one missing 4 of 8 rounds) gets no
    /// weight.
    #[serde(default = "default_ban_rounds")]
    #[schemars(range(min = 0))]
    pub ban_rounds: u32,
    /// Peers the aggregate takes at most, best final score first.
    #[serde(default = "default_max_aggregated")]
    #[schemars(range(min = 1))]
    pub max_aggregated: u32,
    /// After `bmaGateAfterRounds` rounds, a peer whose binary moving average (did it train
    /// on its own data?) is below this gets no weight. Off unless set (Templar uses 0.10
    /// after round 10): on data split evenly at random and rounds of tens of steps, an
    /// honest peer's update helps its own data no more than a random slice, so the
    /// average is a coin flip's (in the demo, honest peers' own data came out ahead in 9
    /// of 22 rounds) and the gate would take honest peers' weight at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bma_gate: Option<f64>,
    #[serde(default = "default_bma_gate_after_rounds")]
    pub bma_gate_after_rounds: u32,
    /// A peer further out of sync than this many typical steps gets no weight.
    #[serde(default = "default_sync_limit")]
    #[schemars(range(min = 0.0))]
    pub sync_limit: f64,
    /// Below this fraction of the roster submitting, a round is an outage: nobody is
    /// penalised for missing it.
    #[serde(default = "default_outage_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub outage_fraction: f64,
    #[serde(default)]
    pub copying: CopySpec,
}

fn default_evaluators() -> u32 {
    1
}
fn default_eval_batches() -> u32 {
    16
}
fn default_max_evaluated_per_round() -> u32 {
    32
}
fn default_relative_threshold() -> f64 {
    0.1
}
fn default_negatives_to_exclude() -> u32 {
    3
}
fn default_ban_rounds() -> u32 {
    20
}
fn default_max_aggregated() -> u32 {
    20
}
fn default_bma_gate_after_rounds() -> u32 {
    10
}
fn default_sync_limit() -> f64 {
    2.0
}
fn default_outage_fraction() -> f64 {
    0.4
}

impl Default for ScoringSpec {
    fn default() -> Self {
        Self {
            evaluators: default_evaluators(),
            eval_batches: default_eval_batches(),
            max_evaluated_per_round: default_max_evaluated_per_round(),
            open_skill: OpenSkillSpec::default(),
            exclusion_threshold: 0.0,
            relative_threshold: default_relative_threshold(),
            negatives_to_exclude: default_negatives_to_exclude(),
            ban_rounds: default_ban_rounds(),
            max_aggregated: default_max_aggregated(),
            bma_gate: None,
            bma_gate_after_rounds: default_bma_gate_after_rounds(),
            sync_limit: default_sync_limit(),
            outage_fraction: default_outage_fraction(),
            copying: CopySpec::default(),
        }
    }
}

/// Copy detection: the share of chunk indices two updates have in common. An exact
/// payload match with an update of the last 8 rounds (a replay) counts as the top level
/// at any round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopySpec {
    /// Rounds before overlap is judged: early updates of honest peers overlap more.
    #[serde(default = "default_copy_warmup_rounds")]
    pub warmup_rounds: u32,
    /// Overlap that halves a peer's binary moving average.
    #[serde(default = "default_copy_penalise")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub penalise_at: f64,
    /// Overlap that resets a peer's scoring state.
    #[serde(default = "default_copy_reset")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub reset_at: f64,
    /// Overlap that resets and bans a peer.
    #[serde(default = "default_copy_ban")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ban_at: f64,
}

/// Templar waits 20 rounds. Honest peers of the adversary benchmark (tiny model, 5 peers)
/// overlap by at most 0.14 in any round, round 0 included, so the 0.4 line needs no
/// warm-up there; 3 rounds leave a margin for the first rounds after a random init of a
/// larger model, whose peers' gradients share more.
fn default_copy_warmup_rounds() -> u32 {
    3
}
fn default_copy_penalise() -> f64 {
    0.4
}
fn default_copy_reset() -> f64 {
    0.5
}
fn default_copy_ban() -> f64 {
    0.6
}

impl Default for CopySpec {
    fn default() -> Self {
        Self {
            warmup_rounds: default_copy_warmup_rounds(),
            penalise_at: default_copy_penalise(),
            reset_at: default_copy_reset(),
            ban_at: default_copy_ban(),
        }
    }
}

/// Weng-Lin (OpenSkill, Plackett-Luce) rating parameters. The defaults are Templar's:
/// OpenSkill's μ and σ with a wider performance spread β and a faster drift τ, so ratings
/// follow peers that change over a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenSkillSpec {
    /// A newcomer's mean skill.
    #[serde(default = "default_mu")]
    pub mu: f64,
    /// A newcomer's uncertainty.
    #[serde(default = "default_sigma")]
    #[schemars(range(min = 0.0))]
    pub sigma: f64,
    /// Performance spread within one match.
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0.0))]
    pub beta: f64,
    /// Added to every σ before each match (σ² + τ²): keeps ratings able to move.
    #[serde(default = "default_tau")]
    #[schemars(range(min = 0.0))]
    pub tau: f64,
    /// Floor of the factor σ shrinks by in one match: σ never collapses to zero.
    #[serde(default = "default_kappa")]
    #[schemars(range(min = 0.0))]
    pub kappa: f64,
}

fn default_mu() -> f64 {
    25.0
}
fn default_sigma() -> f64 {
    25.0 / 3.0
}
fn default_beta() -> f64 {
    7.0
}
fn default_tau() -> f64 {
    0.1
}
fn default_kappa() -> f64 {
    1e-4
}

impl Default for OpenSkillSpec {
    fn default() -> Self {
        Self {
            mu: default_mu(),
            sigma: default_sigma(),
            beta: default_beta(),
            tau: default_tau(),
            kappa: default_kappa(),
        }
    }
}
