//! Scoring, case by case: the evaluator Jobs, when a scored round is recorded, what the
//! status and Events say of each peer, and that nothing is recorded or announced twice.

use super::*;
use crate::api::{PeerId, Standing};
use starling_trainer::outer::Round;
use starling_trainer::scoring::ledger::{EvaluatorReport, Signer, verify};
use starling_trainer::scoring::rules::{Evaluation, Measured};

/// The case's ledger key, as the operator reads it.
fn signer(case: &Case) -> Signer {
    let bytes = starling_trainer::scoring::ledger::unhex(&case.ledger_key).unwrap();
    Signer::from_pkcs8(&bytes).unwrap()
}

/// Evaluator `e`'s signed report of `round`: p0 and p1 help, p2 hurts.
fn measurements(e: u32, round: u32) -> proto::Measurements {
    let measured = (0..3)
        .map(|p| {
            let score = if p == 2 {
                -0.04
            } else {
                0.02 + 0.001 * f64::from(p)
            };
            let e = Evaluation {
                score,
                own_score: score + 0.01,
                sync_distance: 0.0,
                copy: None,
            };
            (PeerId::new(p), Measured::Evaluated(e))
        })
        .collect();
    let report = EvaluatorReport {
        evaluator: format!("e{e}"),
        round: Round(round),
        theta: "ab".repeat(32),
        seed: "00".into(),
        measured,
        public_key: String::new(),
        signature: String::new(),
    };
    let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
    proto::Measurements {
        round,
        report: report.signed(&signer),
    }
}

/// A running run whose exchange holds `measured` and the ledger so far (`lines`).
fn scoring_case(open: u32, measured: Vec<proto::Measurements>, lines: &[String]) -> Case {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    let mut state = state(open, false);
    state.measurements = measured;
    state.ledger_head = lines.last().cloned().unwrap_or_default();
    state.ledger_records = lines.len() as u32;
    case.exchange = exchange(Some(state));
    case
}

/// Plays the operator and the exchange for rounds `0..rounds`: each decision's record
/// goes into the exchange's ledger. Returns the ledger and every decision.
fn score_rounds(case: &mut Case, rounds: u32) -> (Vec<String>, Vec<Decision>) {
    let (mut lines, mut decisions) = (vec![], vec![]);
    for r in 0..rounds {
        let mut state = case.exchange.state.clone().unwrap();
        state.open_round = r + 1;
        state.measurements = vec![measurements(0, r)];
        state.ledger_head = lines.last().cloned().unwrap_or_default();
        state.ledger_records = lines.len() as u32;
        case.exchange = exchange(Some(state));
        let d = case.decide();
        let scored = d.children.score.clone().expect("a record");
        lines.push(scored.line);
        case.run = with_status(case.run.clone(), d.status.clone());
        decisions.push(d);
    }
    (lines, decisions)
}

#[test]
fn each_evaluator_is_a_job_with_its_own_token_and_the_scoring_key_but_not_the_ledger_key() {
    let mut case = scoring_case(1, vec![], &[]);
    case.run.spec.scoring.evaluators = 2;
    let d = case.decide();
    let names: Vec<String> = d.children.evaluators.iter().map(|j| j.name_any()).collect();
    // The case's tokens hold one evaluator: a second has no token to run with.
    assert_eq!(names, ["shakespeare-evaluator-0"]);
    let pod = d.children.evaluators[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone();
    let pod = pod.unwrap();
    assert_eq!(
        crate::k8s::restricted_violations(&pod),
        Vec::<String>::new()
    );
    let container = &pod.containers[0];
    assert_eq!(container.args.as_ref().unwrap(), &["evaluate"]);
    let keys: Vec<String> = (container.env.iter().flatten())
        .filter_map(|e| Some(e.value_from.clone()?.secret_key_ref?.key))
        .collect();
    assert_eq!(keys, ["e0", "scoring-key", "ca.crt"]);
    let status = d.status.scoring.unwrap();
    assert_eq!(status.public_key, signer(&case).public_key());
    assert_eq!(status.records, 0);
}

#[test]
fn a_run_without_evaluators_scores_nothing() {
    let mut case = scoring_case(1, vec![measurements(0, 0)], &[]);
    case.run.spec.scoring.evaluators = 0;
    let d = case.decide();
    assert!(d.children.evaluators.is_empty() && d.children.score.is_none());
    assert_eq!(d.status.scoring, None);
    assert!(d.status.peers.iter().all(|p| p.standing.is_none()));
}

#[test]
fn a_measured_round_is_recorded_signed_and_its_weights_handed_to_the_exchange() {
    let case = scoring_case(1, vec![measurements(0, 0)], &[]);
    let d = case.decide();
    let scored = d.children.score.clone().expect("round 0 recorded");
    let key = signer(&case).public_key();
    assert_eq!(scored.public_key, key);
    let verified = verify(&scored.line, &key).unwrap();
    assert_eq!((verified.records, verified.last_round), (1, Round(0)));
    // p2 hurt: no weight; p0 and p1 share the aggregate.
    let w = |p: u32| scored.weights[&PeerId::new(p)];
    assert_eq!((w(0), w(1), w(2)), (0.5, 0.5, 0.0));
    let row = |p: usize| d.status.peers[p].clone();
    assert_eq!(row(0).standing, Some(Standing::Active));
    assert_eq!((row(0).weight, row(2).weight), (Some(0.5), Some(0.0)));
    assert_eq!(row(2).last_score, Some(-0.04));
    assert!(row(0).rating.unwrap() > row(2).rating.unwrap());
    let status = d.status.scoring.clone().unwrap();
    assert_eq!((status.records, status.last_round), (1, Some(0)));
    assert_eq!(d.status.ledger_head, Some(verified.head));
}

#[test]
fn a_peer_hurting_three_rounds_running_is_excluded_with_an_event_once() {
    let mut case = scoring_case(1, vec![], &[]);
    let (lines, decisions) = score_rounds(&mut case, 4);
    let excluded: Vec<(usize, &str)> = (decisions.iter().enumerate())
        .flat_map(|(r, d)| d.events.iter().map(move |e| (r, e.reason)))
        .filter(|(_, reason)| *reason == "PeerExcluded")
        .collect();
    assert_eq!(excluded, [(2, "PeerExcluded")]);
    let note = decisions[2]
        .events
        .iter()
        .find(|e| e.reason == "PeerExcluded");
    let message = &note.unwrap().message;
    assert!(message.starts_with("p2 excluded in round 2: "), "{message}");
    let last = &decisions[3].status;
    assert_eq!(last.peers[2].standing, Some(Standing::Excluded));
    assert_eq!(last.excluded_peers, 1);
    assert!(last.peers[2].reason.is_some());
    assert_eq!(
        verify(&lines.join("\n"), &signer(&case).public_key())
            .unwrap()
            .records,
        4
    );
}

#[test]
fn a_record_the_exchange_has_not_taken_yet_is_not_made_or_announced_again() {
    let mut case = scoring_case(1, vec![], &[]);
    let (_, decisions) = score_rounds(&mut case, 3);
    // The exchange still shows round 2's measurements and the ledger before it.
    let mut state = case.exchange.state.clone().unwrap();
    state.ledger_records = 2;
    case.exchange = exchange(Some(state));
    let d = case.decide();
    assert_eq!(d.children.score, None);
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert_eq!(decisions[2].status.scoring.as_ref().unwrap().records, 3);
}

#[test]
fn a_round_waits_for_every_evaluator_until_two_more_rounds_have_closed() {
    let mut case = scoring_case(1, vec![measurements(0, 0)], &[]);
    case.run.spec.scoring.evaluators = 2;
    assert_eq!(case.decide().children.score, None, "e1 may still report");
    let mut late = scoring_case(2, vec![measurements(0, 0)], &[]);
    late.run.spec.scoring.evaluators = 2;
    assert_eq!(late.decide().children.score, None);
    let mut later = scoring_case(3, vec![measurements(0, 0)], &[]);
    later.run.spec.scoring.evaluators = 2;
    assert!(
        later.decide().children.score.is_some(),
        "recorded without e1"
    );
    let both = scoring_case(1, vec![measurements(0, 0), measurements(1, 0)], &[]);
    assert!(both.decide().children.score.is_some());
}

#[test]
fn rounds_no_evaluator_reported_stay_unscored_and_the_ledger_goes_on_after_them() {
    // Round 0 was recorded; the evaluator died during rounds 1 and 2 and its
    // replacement reported round 3.
    let mut case = scoring_case(1, vec![], &[]);
    let (mut lines, _) = score_rounds(&mut case, 1);
    let before = verify(&lines[0], &signer(&case).public_key()).unwrap();
    let mut state = case.exchange.state.clone().unwrap();
    state.open_round = 4;
    state.measurements = vec![measurements(0, 3)];
    state.ledger_head = lines[0].clone();
    state.ledger_records = 1;
    case.exchange = exchange(Some(state));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Running));
    lines.push(d.children.score.expect("round 3 recorded").line);
    let after = verify(&lines.join("\n"), &signer(&case).public_key()).unwrap();
    assert_eq!((before.last_round, after.last_round), (Round(0), Round(3)));
    // Two negative rounds for p2, not three: the unscored rounds count for nobody.
    assert_eq!(d.status.peers[2].standing, Some(Standing::Active));
}

#[test]
fn a_run_minted_before_scoring_says_so_once_and_runs_unscored() {
    let mut case = scoring_case(1, vec![measurements(0, 0)], &[]);
    case.ledger_key = String::new();
    let first = case.decide();
    assert!(first.children.evaluators.is_empty() && first.children.score.is_none());
    assert!(reasons(&first).contains(&"ScoringUnavailable"));
    assert_eq!(condition(&first, "Scored").1, "ScoringUnavailable");
    let second = again(&mut case, &first);
    assert!(second.events.is_empty(), "{:?}", second.events);
    assert_eq!(second.status, first.status);
}
