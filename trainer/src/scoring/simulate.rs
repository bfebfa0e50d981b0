//! A scored federation in one process: honest peers and one adversary, the exchange's
//! replica, an evaluator and the scoring state machine, round by round as a run on the
//! clusters goes (lag mode: round r's scores weigh round r+1), without processes or a
//! network. The adversary benchmark and the scoring tests run it.

use std::collections::{BTreeMap, VecDeque};

use super::ScoringSpec;
use super::adversary::{Adversary, Applies, Material};
use super::evaluate::{Evaluator, Submission, probe, probe_positions, random_slice};
use super::rules::{Change, Measured, RoundInput, Scoring, Standing, step};
use crate::exchange::PeerId;
use crate::outer::{Round, RoundError, read};
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
    let n = run.config.max_peers;
    let adversary_peer = PeerId::new(n - 1);
    let total = Round(scenario.rounds);
    let mut peers: Vec<Replica<'_>> = (0..n)
        .map(|_| Replica::new(run, total))
        .collect::<Result<_, _>>()?;
    let mut exchange = Replica::new(run, total)?;
    let codec = run.config.codec()?;
    let mut evaluator = Evaluator::new(
        run.initial_model()?,
        codec.config(),
        run.config.outer_lr,
        run.config.seed,
    );
    let positions = probe_positions(&exchange.model, run.config.seed);
    let validation = run.validation_batch(scenario.eval_rows)?;
    let half = (scenario.eval_rows / 2).max(1) as usize;
    let seq = run.config.sequence_length as usize;

    let mut scoring = Scoring::default();
    let mut weights: BTreeMap<PeerId, f32> = (0..n).map(|p| (PeerId::new(p), 1.0)).collect();
    let mut sent: Vec<VecDeque<Vec<u8>>> = vec![VecDeque::new(); n as usize];
    let mut late: VecDeque<Vec<(Vec<u8>, f32)>> = VecDeque::new();
    let mut outcome = Outcome {
        excluded_at_round: None,
        weightless_at_round: None,
        honest_excluded: vec![],
        final_validation_loss: f32::NAN,
        rounds: vec![],
    };
    for r in 0..scenario.rounds {
        let round = Round(r);
        let cheating = |p: u32| {
            (p == n - 1 && r >= scenario.cheat_from)
                .then_some(())
                .and(scenario.adversary.as_ref())
        };
        let theta = read(&exchange.model)?;
        let mut submissions = Vec::new();
        for p in 0..n {
            let replica = &mut peers[p as usize];
            let their_probe = probe(&read(&replica.model)?, &positions);
            let data = cheating(p).map_or(PeerId::new(p), |a| a.trains_on(PeerId::new(p), n));
            let (honest, _) = replica.local_round(data, round)?;
            let bytes = match cheating(p) {
                Some(adversary) => {
                    let history = &sent[p as usize];
                    let material = Material {
                        own_old: history.len().checked_sub(2).map(|i| history[i].as_slice()),
                        copied: match adversary {
                            Adversary::Copy(of) => sent
                                .get(of.index() as usize)
                                .and_then(|h| h.back())
                                .map(Vec::as_slice),
                            _ => None,
                        },
                        seed: run.config.seed ^ u64::from(r),
                    };
                    adversary
                        .tamper(&honest, &material)
                        .map_err(RoundError::from)?
                }
                None => honest,
            };
            let windows = run.assignment.peer_round(p, r);
            let own = run
                .assignment
                .batch(&run.shards.train, &windows[..half.min(windows.len())]);
            submissions.push((PeerId::new(p), bytes, their_probe, own));
        }
        let random = random_slice(
            &run.shards.train,
            seq,
            half,
            run.config.seed ^ 0xe7a1,
            round,
        );
        let views: Vec<Submission<'_>> = (submissions.iter())
            .map(|(peer, bytes, probe, own)| Submission {
                peer: *peer,
                bytes,
                probe: probe.clone(),
                own: own.clone(),
            })
            .collect();
        let measured = evaluator.measure(&theta, &views, &random)?;
        let honest_overlap = (measured.iter())
            .filter(|(p, _)| **p != adversary_peer)
            .filter_map(|(_, m)| match m {
                Measured::Evaluated(e) => e.copy.as_ref().map(|c| c.overlap),
                _ => None,
            })
            .fold(0.0, f64::max);
        let of_adversary = measured.get(&adversary_peer).cloned();
        let (next, changes) = step(&scenario.spec, &scoring, &RoundInput { round, measured });
        scoring = next;

        // The exchange takes every update that decodes for this model, with the weights
        // of the round before; the peers apply the same.
        let accepted: Vec<(Vec<u8>, f32)> = (submissions.iter())
            .filter(|(_, bytes, _, _)| exchange.outer.check(&exchange.model, bytes).is_ok())
            .map(|(peer, bytes, _, _)| (bytes.clone(), weights.get(peer).copied().unwrap_or(0.0)))
            .collect();
        let refs: Vec<(&[u8], f32)> = accepted.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
        exchange.apply(&refs)?;
        late.push_back(accepted.clone());
        for (p, replica) in peers.iter_mut().enumerate() {
            match cheating(p as u32).map_or(Applies::AtOnce, Adversary::applies) {
                Applies::AtOnce => replica.apply(&refs)?,
                Applies::Late(lag) => {
                    while late.len() > lag {
                        let old = late.pop_front().unwrap_or_default();
                        let refs: Vec<(&[u8], f32)> =
                            old.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
                        replica.apply(&refs)?;
                    }
                }
                Applies::Never => {}
            }
        }
        if cheating(n - 1).is_none_or(|a| a.applies() == Applies::AtOnce) {
            late.clear();
        }
        let after = read(&exchange.model)?;
        let accepted_ids: Vec<(PeerId, &[u8])> = (submissions.iter())
            .filter(|(_, b, _, _)| accepted.iter().any(|(a, _)| a == b))
            .map(|(p, b, _, _)| (*p, b.as_slice()))
            .collect();
        evaluator.observe(&theta, &after, &accepted_ids);
        for (p, (_, bytes, _, _)) in submissions.iter().enumerate() {
            sent[p].push_back(bytes.clone());
        }
        weights = (scoring.peers.iter())
            .map(|(p, s)| (*p, s.weight as f32))
            .collect();

        let report = RoundReport {
            round: r,
            validation_loss: exchange.model.batch_loss(&validation)?,
            aggregate: scoring.aggregate.clone(),
            changes,
            honest_overlap,
            adversary: of_adversary,
        };
        tally(&mut outcome, &scoring, scenario, adversary_peer, &report);
        progress(&report);
        outcome.final_validation_loss = report.validation_loss;
        outcome.rounds.push(report);
    }
    Ok(outcome)
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
    fn a_sign_flipper_and_a_zero_sender_are_excluded_within_three_rounds_and_nobody_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let run = run(dir.path());
        for kind in ["signflip", "zero"] {
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
