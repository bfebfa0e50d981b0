//! Scoring as the operator runs it (part of [`super::decide`], so pure): the evaluator
//! Jobs; when a scored round is due, its ledger record, signed with the run's key, and
//! the weights the record gives the next round; the peers' scores in the status; and an
//! Event for every peer excluded, banned, readmitted or caught copying.
//!
//! The exchange holds the ledger; the operator keeps nothing of its own, so a restarted
//! operator picks up from the exchange's last record.

use std::collections::BTreeMap;

use kube::ResourceExt;
use starling_trainer::exchange::{PeerId, evaluator_name, proto};
use starling_trainer::outer::Round;
use starling_trainer::scoring::ledger::{Record, Signer, line_hash, unhex};
use starling_trainer::scoring::recorder;
use starling_trainer::scoring::rules::{Change, Scoring, Standing};

use super::decide::Draft;
use crate::api::{ScoringStatus, TrainingRunStatus};
use crate::hub::children::{self, EvaluatorSettings, LEDGER_KEY};
use crate::k8s::reason;

/// The condition that says why a run with evaluators is not scored, when it is not.
const SCORED: &str = "Scored";

/// A record to hand the exchange, with the weights it gives the next round.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub weights: BTreeMap<PeerId, f32>,
    pub line: String,
    pub public_key: String,
}

/// The run's ledger key from its credentials.
fn signer(tokens: &BTreeMap<String, String>) -> Option<Signer> {
    Signer::from_pkcs8(&unhex(tokens.get(LEDGER_KEY)?)?).ok()
}

/// Runs scoring for the decision `d`: evaluators, the record due, the status.
pub(super) fn score(
    d: &mut Draft,
    tokens: &BTreeMap<String, String>,
    evaluators: &EvaluatorSettings,
) {
    let o = d.o;
    let count = o.run.spec.scoring.evaluators;
    if count == 0 {
        return;
    }
    let Some(signer) = signer(tokens) else {
        // Announced once: the condition remembers it.
        let message = "the run's credentials hold no ledger key: it predates scoring";
        let known = (d.previous.conditions.iter())
            .any(|c| c.type_ == SCORED && c.reason == reason::SCORING_UNAVAILABLE);
        if !known {
            d.note(false, reason::SCORING_UNAVAILABLE, message);
        }
        d.condition(SCORED, false, reason::SCORING_UNAVAILABLE, message);
        return;
    };
    d.children.evaluators = (0..count)
        .filter(|i| tokens.contains_key(&evaluator_name(*i)))
        .map(|i| children::evaluator_job(o.run, evaluators, i))
        .collect();
    let Some(state) = o.exchange.state.as_ref() else {
        return;
    };
    let previous = d.previous.scoring.clone().unwrap_or_default();
    let mut head = Head::of(state, &signer);
    // The exchange has not yet taken the record the last look made: wait for it rather
    // than make (and announce) the same record twice.
    let caught_up = state.ledger_records >= previous.records;
    if let Some(recorded) = caught_up.then(|| due(d, state, &signer)).flatten() {
        for change in &recorded.changes {
            announce(d, recorded.round, change);
        }
        head = Head {
            round: Some(recorded.round),
            scoring: recorded.scoring.clone(),
            line: recorded.line.clone(),
            records: state.ledger_records + 1,
        };
        d.children.score = Some(Scored {
            weights: recorded.weights,
            line: recorded.line,
            public_key: signer.public_key(),
        });
    }
    show(&mut d.status, &head, signer.public_key());
}

/// The next record, if one is due.
fn due(d: &Draft, state: &proto::RunState, signer: &Signer) -> Option<recorder::Recorded> {
    let o = d.o;
    let (round, reports) = recorder::due_in(state, o.run.spec.scoring.evaluators)?;
    let run = format!(
        "{}/{}",
        o.run.namespace().unwrap_or_default(),
        o.run.name_any()
    );
    let spec = &o.run.spec.scoring;
    recorder::record(&run, spec, &state.ledger_head, round, reports, signer)
        .inspect_err(|e| tracing::warn!(run = %run, error = %e, "cannot record the round"))
        .ok()
}

/// The ledger's last record as the status shows it.
struct Head {
    round: Option<Round>,
    scoring: Scoring,
    line: String,
    records: u32,
}

impl Head {
    fn of(state: &proto::RunState, signer: &Signer) -> Self {
        let record = (!state.ledger_head.is_empty())
            .then(|| Record::from_signed(&state.ledger_head, &signer.public_key()).ok())
            .flatten();
        Self {
            round: record.as_ref().map(|r| r.round),
            scoring: record.map(|r| r.scoring()).unwrap_or_default(),
            line: state.ledger_head.clone(),
            records: state.ledger_records,
        }
    }
}

/// Each peer's score, rating, weight and standing, and the ledger's head.
fn show(status: &mut TrainingRunStatus, head: &Head, public_key: String) {
    let round = head.round.unwrap_or_default();
    let weights = recorder::weights(&head.scoring, round);
    for row in &mut status.peers {
        let Some(s) = head.scoring.peers.get(&row.id) else {
            continue;
        };
        row.rating = Some(s.rating.ordinal());
        row.last_score = s.last_score;
        // The weight in force: the rules', or everyone's in good standing when no peer
        // qualified.
        row.weight = weights.get(&row.id).map(|w| f64::from(*w));
        row.final_score = Some(s.final_score);
        row.standing = Some(s.standing(round));
        row.reason = (!s.reason.is_empty()).then(|| s.reason.clone());
    }
    status.excluded_peers = (head.scoring.peers.values())
        .filter(|s| matches!(s.standing(round), Standing::Excluded | Standing::Banned))
        .count() as u32;
    status.ledger_head = (!head.line.is_empty()).then(|| line_hash(&head.line));
    status.scoring = Some(ScoringStatus {
        public_key,
        records: head.records,
        last_round: head.round.map(|r| r.0),
    });
}

/// An Event for a peer's change of standing in `round`.
fn announce(d: &mut Draft, round: Round, change: &Change) {
    match change {
        Change::PeerExcluded { peer, reason } => {
            let message = format!("{peer} excluded in round {round}: {reason}");
            d.note(true, reason::PEER_EXCLUDED, message);
        }
        Change::PeerBanned {
            peer,
            until,
            reason,
        } => {
            let message = format!("{peer} banned in round {round} until round {until}: {reason}");
            d.note(true, reason::PEER_BANNED, message);
        }
        Change::PeerReadmitted { peer, reason } => {
            let message = format!("{peer} readmitted in round {round}: {reason}");
            d.note(false, reason::PEER_READMITTED, message);
        }
        Change::CopyDetected { peer, copying } => {
            let message = match copying.replay {
                true => format!("{peer} sent in round {round} an update accepted before"),
                false => format!(
                    "{peer}'s update of round {round} shares {:.0}% of its kept positions with {}'s",
                    100.0 * copying.overlap,
                    copying.of
                ),
            };
            d.note(true, reason::COPY_DETECTED, message);
        }
    }
}
