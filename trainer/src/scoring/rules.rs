//! The scoring state machine: one pure step per round, from the previous state and the
//! round's measurements to the next state, the weights of the next round's aggregate
//! (lag mode: round r's scores weigh round r+1), and what changed that users should hear
//! of. Replaying the steps from recorded measurements gives the same states, which is
//! what makes the ledger verifiable.
//!
//! The rules are Templar's Gauntlet's, with the thresholds of [`ScoringSpec`]:
//! * a score at or below the threshold, or an invalid update, is *negative*; enough in a
//!   row exclude a peer until it scores positive again; more than 4 of the last 8 cut its
//!   binary moving average (bma) to a quarter. Skipped in a round where fewer than half the
//!   scored peers scored positive: that round was hard for everyone.
//! * bma ← 0.95·bma + 0.05·b, with b = +1 when the update helped the peer's own data more
//!   than a random slice (it trained on what it was given), −1 otherwise.
//! * missed rounds cut bma (×0.75, ×0.5, ×0 for 1, 2, 3+ in a row); 4 of the last 8 missed
//!   resets the peer and bans it. Skipped when too few of the roster submitted: an outage.
//! * copying: overlap at the penalise level halves bma, at the reset level resets, at the
//!   ban level (or a replay) resets and bans; overlap counts only after a warm-up.
//! * out of sync beyond the limit: bma ×0.75, and no weight.
//! * final score F = ordinal × max(0, bma) × sync, 0 once past the bma gate's round with
//!   bma below the gate. The aggregate takes the best F among peers that scored positive,
//!   in sync, not excluded or banned and past the gate, each with equal weight.

use std::collections::{BTreeMap, VecDeque};

use crate::outer::Round;
use serde::{Deserialize, Serialize};

use super::ScoringSpec;
use super::openskill::{self, Rating};
use crate::codec::median;
use crate::exchange::PeerId;

/// Rounds the "of the last 8" rules look back over.
const WINDOW: usize = 8;
/// Score given to invalid and missing peers in the rating match.
const ABSENT_SCORE: f64 = -99.0;

/// What the evaluators measured of one peer in one round (several evaluators' values
/// combined by median).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Measured {
    /// The peer sent no update this round.
    Missing,
    /// The peer sent an update the evaluators did not score this round (sampled out).
    NotEvaluated,
    /// The update broke a validity rule.
    Invalid {
        reason: String,
    },
    Evaluated(Evaluation),
}

/// One scored update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// s: relative loss improvement of the update applied alone, on a random slice.
    pub score: f64,
    /// g: the same on the peer's own data for the round.
    pub own_score: f64,
    /// x: how far the peer's θ was from the global θ, in typical steps.
    pub sync_distance: f64,
    /// The worst copying found, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<Copying>,
}

/// An update that shares too much with another peer's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Copying {
    /// The peer whose earlier-received update it resembles.
    pub of: PeerId,
    /// Shared chunk indices / k, averaged over chunks.
    pub overlap: f64,
    /// Byte for byte an update accepted in the last 8 rounds.
    pub replay: bool,
}

/// One round's measurements: every peer of the roster, and what was measured of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundInput {
    pub round: Round,
    pub measured: BTreeMap<PeerId, Measured>,
}

/// How a round went for a peer, as the "of the last 8" rules count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Positive,
    Negative,
    Missed,
    /// Not scored, or a round whose penalties were skipped.
    Unscored,
}

/// Where a peer stands, as `kubectl get` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Standing {
    Active,
    Excluded,
    Banned,
    Missing,
}

/// Everything scoring remembers of one peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerScore {
    pub rating: Rating,
    pub bma: f64,
    /// (1 − min(x, 3)/3)^2.5 of the latest sync distance x.
    pub sync: f64,
    pub sync_distance: f64,
    /// The latest score s, if the latest scored update was valid.
    pub last_score: Option<f64>,
    /// Newest last, at most 8.
    pub recent: VecDeque<Outcome>,
    pub negatives_in_a_row: u32,
    pub misses_in_a_row: u32,
    pub excluded: bool,
    /// Banned before this round.
    pub banned_until: Option<Round>,
    /// F = ordinal × max(0, bma) × sync.
    pub final_score: f64,
    /// Weight in the next round's aggregate.
    pub weight: f64,
    /// Why the peer stands where it does, in words.
    pub reason: String,
}

impl PeerScore {
    pub fn new(spec: &ScoringSpec) -> Self {
        Self {
            rating: Rating::initial(&spec.open_skill),
            bma: 0.0,
            sync: 1.0,
            sync_distance: 0.0,
            last_score: None,
            recent: VecDeque::new(),
            negatives_in_a_row: 0,
            misses_in_a_row: 0,
            excluded: false,
            banned_until: None,
            final_score: 0.0,
            weight: 0.0,
            reason: String::new(),
        }
    }

    /// Where the peer stands for the round after `round`.
    pub fn standing(&self, round: Round) -> Standing {
        if self.banned_until.is_some_and(|until| until > round.next()) {
            Standing::Banned
        } else if self.excluded {
            Standing::Excluded
        } else if self.recent.back() == Some(&Outcome::Missed) {
            Standing::Missing
        } else {
            Standing::Active
        }
    }

    fn push(&mut self, outcome: Outcome) {
        self.recent.push_back(outcome);
        while self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.recent.iter().filter(|o| **o == outcome).count()
    }

    /// Back to a newcomer's state (a ban, if any, is kept).
    fn reset(&mut self, spec: &ScoringSpec) {
        *self = Self {
            banned_until: self.banned_until,
            ..Self::new(spec)
        };
    }
}

/// The scoring state of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scoring {
    pub peers: BTreeMap<PeerId, PeerScore>,
    /// The peers the next round's aggregate takes, best first.
    pub aggregate: Vec<PeerId>,
}

/// What changed for a peer that users should hear of (an Event each).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    PeerExcluded {
        peer: PeerId,
        reason: String,
    },
    PeerBanned {
        peer: PeerId,
        until: Round,
        reason: String,
    },
    PeerReadmitted {
        peer: PeerId,
        reason: String,
    },
    CopyDetected {
        peer: PeerId,
        copying: Copying,
    },
}

/// What a round is like as a whole, which decides whether penalties apply.
struct RoundContext {
    round: Round,
    /// Too few of the roster submitted: missing it is not a peer's fault.
    outage: bool,
    /// Fewer than half the scored peers scored positive: no negative-score penalties.
    hard: bool,
    /// A score at or below this is negative: the absolute threshold, or the relative
    /// one times the round's median score if that is higher.
    line: f64,
    /// Past the copy warm-up.
    copies_count: bool,
}

impl RoundContext {
    fn of(spec: &ScoringSpec, input: &RoundInput) -> Self {
        let roster = input.measured.len();
        let submitted = (input.measured.values())
            .filter(|m| **m != Measured::Missing)
            .count();
        let scores: Vec<f64> = (input.measured.values())
            .filter_map(|m| match m {
                Measured::Evaluated(e) => Some(e.score),
                _ => None,
            })
            .collect();
        let positive = (scores.iter())
            .filter(|s| **s > spec.exclusion_threshold)
            .count();
        let median = median(&scores);
        Self {
            round: input.round,
            outage: (submitted as f64) < spec.outage_fraction * roster as f64,
            hard: 2 * positive < scores.len(),
            line: spec
                .exclusion_threshold
                .max(spec.relative_threshold * median),
            copies_count: input.round.0 >= spec.copying.warmup_rounds,
        }
    }
}

impl Evaluation {
    /// Why these numbers cannot be used, if they cannot.
    pub fn defect(&self) -> Option<String> {
        let finite = [self.score, self.own_score, self.sync_distance]
            .iter()
            .all(|v| v.is_finite());
        let copy_ok = (self.copy.as_ref()).is_none_or(|c| (0.0..=1.0).contains(&c.overlap));
        match (finite, self.sync_distance >= 0.0, copy_ok) {
            (false, _, _) => Some("a measurement is not a finite number".into()),
            (_, false, _) => Some("negative sync distance".into()),
            (_, _, false) => Some("copy overlap outside [0, 1]".into()),
            _ => None,
        }
    }
}

/// `measured`, with numbers no rule can use turned into an invalid update.
fn usable(measured: &Measured) -> Measured {
    match measured {
        Measured::Evaluated(e) => match e.defect() {
            Some(reason) => Measured::Invalid { reason },
            None => measured.clone(),
        },
        other => other.clone(),
    }
}

/// One round: the state after `input`, and what changed. Peers of the roster are the
/// keys of `input.measured`; peers scored before and absent from it keep their state.
pub fn step(spec: &ScoringSpec, before: &Scoring, input: &RoundInput) -> (Scoring, Vec<Change>) {
    let ctx = RoundContext::of(spec, input);
    let measured: BTreeMap<PeerId, Measured> = (input.measured.iter())
        .map(|(p, m)| (*p, usable(m)))
        .collect();
    let mut peers = before.peers.clone();
    for peer in measured.keys() {
        peers.entry(*peer).or_insert_with(|| PeerScore::new(spec));
    }
    // Rated first, so that a reset by the rules below is where the round leaves a peer.
    rate(spec, &ctx, &measured, &mut peers);
    let mut changes = Vec::new();
    for (peer, score) in peers.iter_mut() {
        let Some(m) = measured.get(peer) else {
            continue;
        };
        let mut judge = Judge {
            spec,
            ctx: &ctx,
            peer: *peer,
            score,
            changes: &mut changes,
        };
        judge.apply(m);
    }
    lift_bans(ctx.round, &mut peers, &mut changes);
    let aggregate = choose_aggregate(spec, ctx.round, &mut peers);
    (Scoring { peers, aggregate }, changes)
}

/// Applies one peer's measurement to its state.
struct Judge<'a> {
    spec: &'a ScoringSpec,
    ctx: &'a RoundContext,
    peer: PeerId,
    score: &'a mut PeerScore,
    changes: &'a mut Vec<Change>,
}

impl Judge<'_> {
    fn apply(&mut self, measured: &Measured) {
        if *measured != Measured::Missing {
            self.score.misses_in_a_row = 0;
        }
        match measured {
            Measured::Missing => self.missed(),
            Measured::NotEvaluated => self.score.push(Outcome::Unscored),
            Measured::Invalid { reason } => {
                self.score.bma = 0.95 * self.score.bma - 0.05;
                self.score.last_score = None;
                self.negative(format!("invalid update ({reason})"));
            }
            Measured::Evaluated(e) => self.evaluated(e),
        }
    }

    fn missed(&mut self) {
        let s = &mut *self.score;
        if self.ctx.outage {
            s.push(Outcome::Unscored);
            return;
        }
        s.misses_in_a_row += 1;
        s.push(Outcome::Missed);
        s.bma *= match s.misses_in_a_row {
            1 => 0.75,
            2 => 0.5,
            _ => 0.0,
        };
        if s.count(Outcome::Missed) >= 4 {
            self.ban(format!("missed 4 of the last {WINDOW} rounds"));
        } else {
            s.reason = format!("missed {} round(s) in a row", s.misses_in_a_row);
        }
    }

    fn evaluated(&mut self, e: &Evaluation) {
        let (spec, s) = (self.spec, &mut *self.score);
        let b = if e.own_score > e.score { 1.0 } else { -1.0 };
        s.bma = 0.95 * s.bma + 0.05 * b;
        s.sync_distance = e.sync_distance;
        s.sync = (1.0 - e.sync_distance.min(3.0) / 3.0).powf(2.5);
        if e.sync_distance > spec.sync_limit {
            s.bma *= 0.75;
        }
        s.last_score = Some(e.score);
        if e.score > self.ctx.line {
            s.negatives_in_a_row = 0;
            s.push(Outcome::Positive);
            s.reason = format!("scored {:.5}", e.score);
            if s.excluded {
                s.excluded = false;
                let reason = format!("scored positive again ({:.5})", e.score);
                self.changes.push(Change::PeerReadmitted {
                    peer: self.peer,
                    reason,
                });
            }
        } else if self.ctx.hard {
            s.push(Outcome::Unscored);
            s.reason = format!(
                "scored {:.5} in a round most peers scored negative",
                e.score
            );
        } else {
            let why = format!("scored {:.5} ≤ {:.5}", e.score, self.ctx.line);
            self.negative(why);
        }
        if let Some(copy) = &e.copy {
            self.copied(copy);
        }
    }

    fn negative(&mut self, why: String) {
        let s = &mut *self.score;
        s.negatives_in_a_row += 1;
        s.push(Outcome::Negative);
        if s.count(Outcome::Negative) > 4 {
            s.bma *= 0.25;
        }
        if s.excluded {
            return;
        }
        if s.negatives_in_a_row >= self.spec.negatives_to_exclude {
            s.excluded = true;
            s.reason = format!("{} negative rounds in a row; {why}", s.negatives_in_a_row);
            self.changes.push(Change::PeerExcluded {
                peer: self.peer,
                reason: s.reason.clone(),
            });
        } else {
            s.reason = why;
        }
    }

    fn copied(&mut self, copy: &Copying) {
        let c = &self.spec.copying;
        let counts = copy.replay || (self.ctx.copies_count && copy.overlap >= c.penalise_at);
        if !counts {
            return;
        }
        self.changes.push(Change::CopyDetected {
            peer: self.peer,
            copying: copy.clone(),
        });
        let what = if copy.replay {
            format!("replayed an update of {}", copy.of)
        } else {
            format!("{:.0}% overlap with {}", 100.0 * copy.overlap, copy.of)
        };
        if copy.replay || copy.overlap >= c.ban_at {
            self.ban(format!("copying: {what}"));
        } else if copy.overlap >= c.reset_at {
            self.score.reset(self.spec);
            self.score.reason = format!("reset for copying: {what}");
        } else {
            self.score.bma *= 0.5;
            self.score.reason = format!("penalised for copying: {what}");
        }
    }

    /// Resets the peer and bans it for the spec's rounds after this one.
    fn ban(&mut self, reason: String) {
        let until = Round(self.ctx.round.0 + 1 + self.spec.ban_rounds);
        self.score.reset(self.spec);
        self.score.banned_until = Some(until);
        self.score.reason = reason.clone();
        self.changes.push(Change::PeerBanned {
            peer: self.peer,
            until,
            reason,
        });
    }
}

/// Bans that end before the next round.
fn lift_bans(round: Round, peers: &mut BTreeMap<PeerId, PeerScore>, changes: &mut Vec<Change>) {
    for (peer, s) in peers.iter_mut() {
        if s.banned_until.is_some_and(|until| until <= round.next()) {
            s.banned_until = None;
            s.reason = "ban over".into();
            changes.push(Change::PeerReadmitted {
                peer: *peer,
                reason: format!("ban over after round {round}"),
            });
        }
    }
}

/// One OpenSkill match over the scored peers; invalid and (outside an outage) missing
/// peers take part with the lowest score.
fn rate(
    spec: &ScoringSpec,
    ctx: &RoundContext,
    measured: &BTreeMap<PeerId, Measured>,
    peers: &mut BTreeMap<PeerId, PeerScore>,
) {
    let players: Vec<(PeerId, f64)> = (measured.iter())
        .filter_map(|(p, m)| match m {
            Measured::Evaluated(e) => Some((*p, e.score)),
            Measured::Invalid { .. } => Some((*p, ABSENT_SCORE)),
            Measured::Missing if !ctx.outage => Some((*p, ABSENT_SCORE)),
            _ => None,
        })
        .collect();
    let game: Vec<(Rating, f64)> = (players.iter())
        .map(|(p, score)| (peers[p].rating, *score))
        .collect();
    let rated = openskill::rate(&spec.open_skill, &game);
    for ((p, _), rating) in players.iter().zip(rated) {
        if let Some(s) = peers.get_mut(p) {
            s.rating = rating;
        }
    }
}

/// Sets every peer's final score and weight; returns the aggregate's peers, best first.
fn choose_aggregate(
    spec: &ScoringSpec,
    round: Round,
    peers: &mut BTreeMap<PeerId, PeerScore>,
) -> Vec<PeerId> {
    let gated = |s: &PeerScore| {
        let after = round.0 >= spec.bma_gate_after_rounds;
        (spec.bma_gate).is_some_and(|gate| after && s.bma < gate)
    };
    for s in peers.values_mut() {
        s.final_score = if gated(s) {
            0.0
        } else {
            s.rating.ordinal() * s.bma.max(0.0) * s.sync
        };
        s.weight = 0.0;
    }
    let mut eligible: Vec<(PeerId, f64)> = (peers.iter())
        .filter(|(_, s)| {
            s.last_score.is_some_and(|x| x > spec.exclusion_threshold)
                && s.negatives_in_a_row == 0
                && s.sync_distance <= spec.sync_limit
                && s.standing(round) == Standing::Active
                && !gated(s)
        })
        .map(|(p, s)| (*p, s.final_score))
        .collect();
    eligible.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    eligible.truncate(spec.max_aggregated as usize);
    let weight = 1.0 / eligible.len().max(1) as f64;
    for (p, _) in &eligible {
        if let Some(s) = peers.get_mut(p) {
            s.weight = weight;
        }
    }
    eligible.into_iter().map(|(p, _)| p).collect()
}

/// Each peer's share of the round's reward, F² / ΣF² over positive F: reported, not used
/// for aggregation.
pub fn reward_shares(scoring: &Scoring) -> BTreeMap<PeerId, f64> {
    let squares = |s: &PeerScore| s.final_score.max(0.0).powi(2);
    let total: f64 = scoring.peers.values().map(squares).sum();
    (scoring.peers.iter())
        .map(|(p, s)| (*p, if total > 0.0 { squares(s) / total } else { 0.0 }))
        .collect()
}

#[cfg(test)]
mod tests;
