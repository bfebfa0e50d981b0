//! Publishing checkpoints to the Hub, as a pure function of the run and what its
//! exchange reports: which checkpoint a publisher Job should be publishing, what each
//! checkpoint's record says of its commit, and the `Published` condition and Events.
//!
//! The publisher reports to the exchange (see `starling_trainer::hub::ExchangeCheckpoint`),
//! so all of this is read from the run state the operator already watches; no Job or pod
//! is read.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use starling_trainer::exchange::proto;

use crate::api::{PublishSpec, PublishedRecord, TrainingRun, TrainingRunStatus};
use crate::hub::children::PUBLISH_ATTEMPTS;
use crate::k8s::reason;

/// What publishing asks of the decision.
#[derive(Debug, Default, PartialEq)]
pub struct Publishing {
    /// The round whose checkpoint a publisher Job should publish now (one at a time,
    /// oldest first).
    pub job: Option<u32>,
    /// The run is done and its final checkpoint is neither published nor given up on.
    pub final_pending: bool,
    /// `Published`: whether, why, and what to say.
    pub condition: Option<(bool, &'static str, String)>,
    /// Events: (warning, reason, message).
    pub notes: Vec<(bool, &'static str, String)>,
}

/// Records what the exchange reports of each checkpoint's publication in
/// `status.checkpoints` and `status.lastPublished`, and says what to publish next.
/// `previous` is the status before this decision (what was announced already).
pub fn publishing(
    run: &TrainingRun,
    state: &proto::RunState,
    previous: &TrainingRunStatus,
    status: &mut TrainingRunStatus,
) -> Publishing {
    let Some(spec) = &run.spec.publish else {
        return Publishing::default();
    };
    let mut out = Publishing::default();
    let report = |round: u32| state.publications.iter().find(|p| p.round == round);
    let last_round = state.rounds;
    for record in &mut status.checkpoints {
        let Some(p) = report(record.round).filter(|p| p.error.is_empty()) else {
            continue;
        };
        if record.published.is_none() {
            record.published = Some(published(p));
        }
        let announced = previous
            .checkpoints
            .iter()
            .any(|c| c.round == record.round && c.published.is_some());
        if !announced {
            let message = format!(
                "round {} published to {} as {} (commit {}): {}",
                record.round,
                p.repo,
                p.revision,
                &p.commit[..p.commit.len().min(12)],
                p.url
            );
            out.notes
                .push((false, reason::CHECKPOINT_PUBLISHED, message));
        }
    }
    let newest = status
        .checkpoints
        .iter()
        .rev()
        .find_map(|c| c.published.as_ref().map(|p| (c.round, p)));
    status.last_published = newest.map(|(_, p)| format!("{}@{}", p.repo, p.revision));
    let pending: Vec<u32> = status
        .checkpoints
        .iter()
        .filter(|c| c.published.is_none() && due(spec, run, c.round, last_round))
        .map(|c| c.round)
        .collect();
    let failures = |round: u32| report(round).map_or(0, |p| p.failures);
    out.job = pending
        .iter()
        .copied()
        .find(|r| failures(*r) < PUBLISH_ATTEMPTS);
    out.final_pending =
        state.done && pending.contains(&last_round) && failures(last_round) < PUBLISH_ATTEMPTS;
    out.condition = condition(&pending, &report, newest, &mut out.notes, previous);
    out
}

/// Whether the checkpoint of `round` is one the spec publishes: every `every`-th
/// checkpoint the run writes, and always the last.
fn due(spec: &PublishSpec, run: &TrainingRun, round: u32, last_round: u32) -> bool {
    if round == last_round {
        return true;
    }
    let nth = round / run.spec.checkpoint.every_rounds.max(1);
    spec.every > 0 && nth.is_multiple_of(spec.every)
}

fn published(p: &proto::Publication) -> PublishedRecord {
    let at = Timestamp::from_millisecond(p.at_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH);
    PublishedRecord {
        repo: p.repo.clone(),
        revision: p.revision.clone(),
        commit: p.commit.clone(),
        url: p.url.clone(),
        at: Time(at),
    }
}

/// `Published`: False with the Hub's message while the oldest pending checkpoint's last
/// attempt failed (one Event per new failure), else True once anything is published, else
/// False while the first publication is under way. A failure older than the newest
/// published checkpoint is superseded: its Event was said, and what a user downloads is
/// the newer one.
fn condition<'a>(
    pending: &[u32],
    report: &impl Fn(u32) -> Option<&'a proto::Publication>,
    newest: Option<(u32, &PublishedRecord)>,
    notes: &mut Vec<(bool, &'static str, String)>,
    previous: &TrainingRunStatus,
) -> Option<(bool, &'static str, String)> {
    let superseded = |round: u32| newest.is_some_and(|(published, _)| round < published);
    let failing = pending
        .iter()
        .filter(|r| !superseded(**r))
        .filter_map(|r| report(*r))
        .find(|p| !p.error.is_empty());
    if let Some(p) = failing {
        let gave_up = if p.failures >= PUBLISH_ATTEMPTS {
            "; gave up"
        } else {
            ""
        };
        let message = format!(
            "round {}: attempt {} of {PUBLISH_ATTEMPTS} failed{gave_up}: {}",
            p.round, p.failures, p.error
        );
        let said = previous
            .conditions
            .iter()
            .any(|c| c.type_ == crate::k8s::condition::PUBLISHED && c.message == message);
        if !said {
            notes.push((true, reason::PUBLISH_FAILED, message.clone()));
        }
        return Some((false, reason::PUBLISH_FAILED, message));
    }
    match (newest, pending.first()) {
        (Some((_, p)), _) => Some((
            true,
            reason::PUBLISHED,
            format!("{}@{}: {}", p.repo, p.revision, p.url),
        )),
        (None, Some(round)) => Some((
            false,
            reason::PUBLISHING,
            format!("publishing the checkpoint of round {round}"),
        )),
        (None, None) => None,
    }
}
