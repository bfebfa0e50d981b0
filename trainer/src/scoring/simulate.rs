//! A scored federation in one process: honest peers and one adversary, the exchange's
//! replica, an evaluator and the scoring state machine, round by round as a run on the
//! clusters goes (lag mode: round r's scores weigh round r+1), without processes or a
//! network. The adversary benchmark and the scoring tests run it.

use std::collections::BTreeMap;

use super::ScoringSpec;
use super::adversary::{Adversary, Cheater, Closed};
use super::evaluate::{Evaluator, Submission, own_slice, probe, probe_positions, random_slice};
use super::rules::{Change, Measured, RoundInput, Scoring, Standing, step};
use crate::data::Batch;
use crate::exchange::PeerId;
use crate::outer::{Round, read};
use crate::roles::train::{PeerError, Replica};
use crate::run::Run;

/// What to simulate: the last peer of the run is the adversary, honest until
/// `cheat_from`.
pub struct Scenario {
    pub adversary: Option<Adversary>,
    pub cheat_from: u32,
    pub rounds: u32,
    /// Sequences per scored update (half random, half the peer's own), and of the
    /// validation batch.
    pub eval_rows: u32,
    pub spec: ScoringSpec,
}

/// One round as it went.
#[derive(Debug)]
pub struct RoundReport {
    pub round: u32,
    pub validation_loss: f32,
    /// Who the next round aggregates.
    pub aggregate: Vec<PeerId>,
    pub changes: Vec<Change>,
    /// The largest overlap an honest peer's update had with another's.
    pub honest_overlap: f64,
    /// What the evaluator measured of the adversary's update.
    pub adversary: Option<Measured>,
}

#[derive(Debug)]
pub struct Outcome {
    /// First round after which the adversary stood excluded or banned.
    pub excluded_at_round: Option<u32>,
    /// First round (from `cheat_from`) after which it had no weight.
    pub weightless_at_round: Option<u32>,
    /// Honest peers ever excluded or banned.
    pub honest_excluded: Vec<PeerId>,
    pub final_validation_loss: f32,
    pub rounds: Vec<RoundReport>,
}

/// Runs `scenario` on `run` (its model, data, codec and aggregation), reporting each round.
pub fn simulate(
    run: &Run,
    scenario: &Scenario,
    mut progress: impl FnMut(&RoundReport),
) -> Result<Outcome, PeerError> {
    let mut federation = Federation::new(run, scenario)?;
    let mut outcome = Outcome {
        excluded_at_round: None,
        weightless_at_round: None,
        honest_excluded: vec![],
        final_validation_loss: f32::NAN,
        rounds: vec![],
    };
    for r in 0..scenario.rounds {
        let report = federation.round(Round(r))?;
        tally(
            &mut outcome,
            &federation.scoring,
            scenario,
            federation.adversary,
            &report,
        );
        progress(&report);
        outcome.final_validation_loss = report.validation_loss;
        outcome.rounds.push(report);
    }
    Ok(outcome)
}

/// Everyone in the simulated run.
struct Federation<'a> {
    run: &'a Run,
    scenario: &'a Scenario,
    adversary: PeerId,
    peers: Vec<Replica<'a>>,
    /// The exchange's replica: the global θ.
    exchange: Replica<'a>,
    evaluator: Evaluator,
    positions: Vec<(usize, usize)>,
    validation: Batch,
    scoring: Scoring,
    /// The weights of the next aggregate: everyone's 1 before any scores.
    weights: BTreeMap<PeerId, f32>,
    /// The adversary's plan, if the scenario has one.
    cheater: Option<Cheater>,
}

impl<'a> Federation<'a> {
    fn new(run: &'a Run, scenario: &'a Scenario) -> Result<Self, PeerError> {
        let n = run.config.max_peers;
        let total = Round(scenario.rounds);
        let exchange = Replica::new(run, total)?;
        let evaluator = Evaluator::new(
            run.initial_model()?,
            run.config.codec()?.config(),
            run.config.outer_lr,
            run.config.seed,
        );
        Ok(Self {
            run,
            scenario,
            adversary: PeerId::new(n - 1),
            peers: (0..n)
                .map(|_| Replica::new(run, total))
                .collect::<Result<_, _>>()?,
            positions: probe_positions(&exchange.model, run.config.seed),
            exchange,
            evaluator,
            validation: run.validation_batch(scenario.eval_rows)?,
            scoring: Scoring::default(),
            weights: (0..n).map(|p| (PeerId::new(p), 1.0)).collect(),
            cheater: (scenario.adversary.clone())
                .map(|a| Cheater::new(a, Round(scenario.cheat_from), run.config.seed)),
        })
    }

    /// The adversary's plan, if `p` is the adversary.
    fn cheater(&mut self, p: PeerId) -> Option<&mut Cheater> {
        self.cheater.as_mut().filter(|_| p == self.adversary)
    }

    /// Sequences per half of a scored update.
    fn half(&self) -> usize {
        (self.scenario.eval_rows / 2).max(1) as usize
    }

    fn round(&mut self, round: Round) -> Result<RoundReport, PeerError> {
        let theta = read(&self.exchange.model)?;
        let submissions = (0..self.run.config.max_peers)
            .map(|p| self.submit(PeerId::new(p), round))
            .collect::<Result<Vec<_>, _>>()?;
        let random = random_slice(
            &self.run.assignment,
            &self.run.shards.train,
            self.half(),
            self.run.config.seed ^ 0xe7a1,
            round,
        );
        let measured = self.evaluator.measure(&theta, &submissions, &random)?;
        let honest_overlap = (measured.iter())
            .filter(|(p, _)| **p != self.adversary)
            .filter_map(|(_, m)| match m {
                Measured::Evaluated(e) => e.copy.as_ref().map(|c| c.overlap),
                _ => None,
            })
            .fold(0.0, f64::max);
        let adversary = measured.get(&self.adversary).cloned();
        let (next, changes) = step(
            &self.scenario.spec,
            &self.scoring,
            &RoundInput { round, measured },
        );
        self.scoring = next;
        self.close(round, &theta, &submissions)?;
        Ok(RoundReport {
            round: round.0,
            validation_loss: self.exchange.model.batch_loss(&self.validation)?,
            aggregate: self.scoring.aggregate.clone(),
            changes,
            honest_overlap,
            adversary,
        })
    }

    /// Peer `p`'s work for `round`, as the evaluator receives it.
    fn submit(&mut self, p: PeerId, round: Round) -> Result<Submission, PeerError> {
        let (run, n) = (self.run, self.run.config.max_peers);
        let data = (self.cheater(p)).map_or(p, |c| c.trains_on(p, n, round));
        let replica = &mut self.peers[p.index() as usize];
        let probe = probe(&read(&replica.model)?, &self.positions);
        let honest = replica.local_round(data, round)?.bytes;
        let bytes = match self.cheater(p) {
            Some(cheater) => cheater.tamper(round, honest),
            None => honest,
        };
        let own = own_slice(run, p, round, self.half());
        Ok(Submission {
            peer: p,
            bytes,
            probe,
            own,
        })
    }

    /// The exchange takes every update that decodes for this model, with the weights of
    /// the round before, and the peers apply the same (a stale adversary late, a frozen
    /// one never); then the next round's weights are the scores of this one.
    fn close(
        &mut self,
        round: Round,
        theta: &[Vec<f32>],
        submissions: &[Submission],
    ) -> Result<(), PeerError> {
        let accepted: Vec<&Submission> = (submissions.iter())
            .filter(|s| {
                self.exchange
                    .outer
                    .check(&self.exchange.model, &s.bytes)
                    .is_ok()
            })
            .collect();
        let weighted: Vec<(Vec<u8>, f32)> = (accepted.iter())
            .map(|s| {
                (
                    s.bytes.clone(),
                    self.weights.get(&s.peer).copied().unwrap_or(0.0),
                )
            })
            .collect();
        let refs: Vec<(&[u8], f32)> = weighted.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
        self.exchange.apply(&refs)?;
        for p in 0..self.peers.len() {
            let peer = PeerId::new(p as u32);
            let due = match self.cheater(peer) {
                Some(cheater) => {
                    let entries = (accepted.iter().zip(&weighted))
                        .map(|(s, (bytes, w))| (s.peer, bytes.clone(), *w))
                        .collect();
                    cheater.due(round, entries, None)
                }
                None => vec![Closed {
                    updates: weighted.clone(),
                    aggregate: None,
                }],
            };
            for closed in due {
                self.peers[p].apply_closed(&closed)?;
            }
        }
        let after = read(&self.exchange.model)?;
        let ids: Vec<(PeerId, &[u8])> = accepted
            .iter()
            .map(|s| (s.peer, s.bytes.as_slice()))
            .collect();
        self.evaluator.observe(theta, &after, &ids);
        self.weights = (self.scoring.peers.iter())
            .map(|(p, s)| (*p, s.weight as f32))
            .collect();
        Ok(())
    }
}

/// Notes when the adversary lost its standing or its weight, and any honest peer that
/// ever did.
fn tally(
    outcome: &mut Outcome,
    scoring: &Scoring,
    scenario: &Scenario,
    adversary: PeerId,
    report: &RoundReport,
) {
    let round = Round(report.round);
    let out = |s: Standing| matches!(s, Standing::Excluded | Standing::Banned);
    for (peer, s) in &scoring.peers {
        let cheater = *peer == adversary && scenario.adversary.is_some();
        if !cheater && out(s.standing(round)) && !outcome.honest_excluded.contains(peer) {
            outcome.honest_excluded.push(*peer);
        }
        if cheater && report.round >= scenario.cheat_from {
            if out(s.standing(round)) {
                outcome.excluded_at_round.get_or_insert(report.round);
            }
            if s.weight == 0.0 {
                outcome.weightless_at_round.get_or_insert(report.round);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::small_run;

    fn scenario(adversary: Option<&str>, rounds: u32) -> Scenario {
        Scenario {
            adversary: adversary.map(|a| a.parse().unwrap()),
            cheat_from: 3,
            rounds,
            eval_rows: 16,
            spec: ScoringSpec::default(),
        }
    }

    fn run(dir: &std::path::Path) -> Run {
        small_run(
            dir,
            &[
                "--max-peers",
                "5",
                "--inner-steps",
                "4",
                "--batch",
                "4",
                "--micro-batch",
                "4",
                "--aggregation",
                "median-norm",
                "--lr",
                "3e-3",
            ],
        )
    }

    #[test]
    fn a_sign_flipper_a_zero_sender_and_a_noisy_copier_are_excluded_within_three_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let run = run(dir.path());
        for kind in ["signflip", "zero", "copy:p0:noisy"] {
            let outcome = simulate(&run, &scenario(Some(kind), 7), |r| {
                eprintln!("{kind} {r:?}")
            })
            .unwrap();
            eprintln!("{kind}: {outcome:?}");
            let excluded = outcome.excluded_at_round.expect("excluded");
            assert!(
                excluded <= 3 + 2,
                "{kind} excluded only after round {excluded}"
            );
            assert!(
                outcome.honest_excluded.is_empty(),
                "{:?}",
                outcome.honest_excluded
            );
        }
    }
}
