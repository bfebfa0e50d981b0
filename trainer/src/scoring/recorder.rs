//! The operator's side of scoring: from the measurements a run's exchange holds and its
//! last ledger record, the next record to sign and the weights it puts in force. Pure, so
//! the operator's decisions and the in-process tests run the same code.

use std::collections::BTreeMap;

use super::ScoringSpec;
use super::ledger::{Draft, EvaluatorReport, Record, Signer};
use super::rules::{Change, Scoring, Standing};
use crate::exchange::{PeerId, proto};
use crate::outer::Round;

/// Rounds a missing evaluator is waited for: a round is recorded without its report once
/// the run is this many rounds past it (an evaluator that died leaves its rounds to the
/// others; with none, the round stays unscored and every peer keeps its state).
pub const GRACE_ROUNDS: u32 = 2;

/// The round to record now and its reports: the oldest pending round that every one of
/// `evaluators` reported, or that the run (open at `open`) is [`GRACE_ROUNDS`] past.
pub fn due(
    pending: &[EvaluatorReport],
    open: Round,
    evaluators: u32,
) -> Option<(Round, Vec<EvaluatorReport>)> {
    let mut by_round: BTreeMap<Round, Vec<EvaluatorReport>> = BTreeMap::new();
    for report in pending {
        by_round
            .entry(report.round)
            .or_default()
            .push(report.clone());
    }
    let (round, reports) = by_round.into_iter().next()?;
    let complete = reports.len() as u32 >= evaluators.max(1);
    let late = open.0 > round.0 + GRACE_ROUNDS;
    (complete || late).then_some((round, reports))
}

/// [`due`] for a run's exchange as it reports itself: its pending measurements (a report
/// that does not verify is left out; the exchange refused those already) and its open
/// round — once the run is done, every report that will come has come.
pub fn due_in(state: &proto::RunState, evaluators: u32) -> Option<(Round, Vec<EvaluatorReport>)> {
    let pending: Vec<EvaluatorReport> = (state.measurements.iter())
        .filter_map(|m| EvaluatorReport::from_signed(&m.report).ok())
        .collect();
    let open = match state.done {
        true => Round(u32::MAX),
        false => Round(state.open_round),
    };
    due(&pending, open, evaluators)
}

/// A record made and signed, and what it does.
#[derive(Debug)]
pub struct Recorded {
    pub round: Round,
    /// The signed ledger line.
    pub line: String,
    pub scoring: Scoring,
    pub changes: Vec<Change>,
    /// The next round's weights: every scored peer's (see [`weights`]).
    pub weights: BTreeMap<PeerId, f32>,
}

/// The state the ledger's last line (`head`, empty before the first) leaves.
pub fn state_of(head: &str, public_key: &str) -> Result<Scoring, String> {
    match head.is_empty() {
        true => Ok(Scoring::default()),
        false => Record::from_signed(head, public_key)
            .map(|r| r.scoring())
            .map_err(|e| format!("the exchange's last ledger record: {e}")),
    }
}

/// The record of `round` after `head`, signed.
pub fn record(
    run: &str,
    constants: &ScoringSpec,
    head: &str,
    round: Round,
    reports: Vec<EvaluatorReport>,
    signer: &Signer,
) -> Result<Recorded, String> {
    let before = state_of(head, &signer.public_key())?;
    let theta = most_common(reports.iter().map(|r| r.theta.as_str()));
    let draft = Draft {
        run,
        round,
        theta: &theta,
        constants,
        evaluators: reports,
    };
    let previous = (!head.is_empty()).then_some((head, &before));
    let (record, scoring, changes) = draft.record_with_changes(previous);
    let weights = weights(&scoring, round);
    Ok(Recorded {
        round,
        line: signer.sign(&record),
        scoring,
        changes,
        weights,
    })
}

/// The weights a scoring state gives the next round: the aggregate's. A round in which
/// no peer qualified (every score at or below the line, say, late in a run when the
/// random slice no longer moves) tells nothing about who helps: then every peer in good
/// standing weighs the same, rather than the round being thrown away.
pub fn weights(scoring: &Scoring, round: Round) -> BTreeMap<PeerId, f32> {
    let nobody = scoring.aggregate.is_empty();
    (scoring.peers.iter())
        .map(|(p, s)| {
            let good = s.standing(round) == Standing::Active;
            let weight = match nobody {
                true => f32::from(u8::from(good)),
                false => s.weight as f32,
            };
            (*p, weight)
        })
        .collect()
}

/// The value most reports agree on (evaluators of one round share θ).
fn most_common<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    (counts.into_iter())
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::ledger::verify;
    use crate::scoring::rules::{Evaluation, Measured};

    fn report(evaluator: &str, round: u32) -> EvaluatorReport {
        let measured = (0..3)
            .map(|p| {
                let score = if p == 2 { -0.05 } else { 0.02 };
                let e = Evaluation {
                    score,
                    own_score: score + 0.01,
                    sync_distance: 0.0,
                    copy: None,
                };
                (PeerId::new(p), Measured::Evaluated(e))
            })
            .collect();
        EvaluatorReport {
            evaluator: evaluator.into(),
            round: Round(round),
            theta: format!("{round:064x}"),
            seed: "00".into(),
            measured,
            public_key: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn a_round_is_recorded_once_every_evaluator_reported_or_the_run_is_past_it() {
        let one = vec![report("e0", 4)];
        assert_eq!(due(&one, Round(5), 1).map(|d| d.0), Some(Round(4)));
        assert_eq!(due(&one, Round(5), 2), None, "e1 may still report");
        assert_eq!(due(&one, Round(7), 2).map(|d| d.1.len()), Some(1));
        let two = vec![report("e1", 5), report("e0", 4), report("e0", 5)];
        let (round, reports) = due(&two, Round(6), 1).unwrap();
        assert_eq!((round, reports.len()), (Round(4), 1), "oldest first");
        assert_eq!(due(&[], Round(9), 1).map(|d| d.0), None);
    }

    #[test]
    fn records_chain_on_the_exchanges_head_and_verify_as_a_ledger() {
        let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let spec = ScoringSpec::default();
        let mut head = String::new();
        let mut lines = vec![];
        for r in 0..4 {
            let recorded = record(
                "ns/run",
                &spec,
                &head,
                Round(r),
                vec![report("e0", r)],
                &signer,
            )
            .unwrap();
            assert_eq!(recorded.weights.len(), 3);
            head = recorded.line.clone();
            lines.push(recorded.line);
            if r == 2 {
                assert!(
                    (recorded.changes.iter()).any(|c| matches!(c, Change::PeerExcluded { peer, .. } if *peer == PeerId::new(2))),
                    "{:?}",
                    recorded.changes
                );
                assert_eq!(recorded.weights[&PeerId::new(2)], 0.0);
            }
        }
        // A round nobody qualified in: the peers in good standing weigh the same.
        let mut bad = report("e0", 4);
        for m in bad.measured.values_mut() {
            if let Measured::Evaluated(e) = m {
                e.score = -0.01;
            }
        }
        let recorded = record("ns/run", &spec, &head, Round(4), vec![bad], &signer).unwrap();
        assert!(recorded.scoring.aggregate.is_empty());
        let w = |p| recorded.weights[&PeerId::new(p)];
        assert_eq!((w(0), w(1), w(2)), (1.0, 1.0, 0.0));
        lines.push(recorded.line);
        let verified = verify(&lines.join("\n"), &signer.public_key()).unwrap();
        assert_eq!(verified.records, 5);
        let other = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        assert!(state_of(&head, &other.public_key()).is_err());
    }
}
