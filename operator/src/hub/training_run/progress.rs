//! The parts of a run's status that are read off what was observed: the per-peer table,
//! round, loss, bytes and checkpoints from the exchange; and a member's free capacity
//! as placement sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use starling_trainer::exchange::proto;

use super::decide::Observed;
use crate::api::{
    CheckpointRecord, LossPoint, MemberCluster, PeerId, PeerState, PeerStatus, RoundStatus,
    TrainerGroup, TrainingRun, TrainingRunStatus,
};
use crate::hub::children::{EXCHANGE_WORKDIR, exchange_name};
use crate::k8s::gpus;
use crate::placement::{self, Plan};

/// Fills in the peers table and, when the exchange answered, the run's progress.
pub fn report(status: &mut TrainingRunStatus, o: &Observed, plan: &Plan) {
    let uid = o.run.uid().unwrap_or_default();
    let ours: Vec<&TrainerGroup> = o
        .groups
        .iter()
        .filter(|g| g.spec.run_ref.uid == uid)
        .map(|g| g.as_ref())
        .collect();
    let state = o.exchange.state.as_ref();
    status.peers = (0..o.run.spec.peers.max)
        .map(|i| peer_status(PeerId::new(i), plan, &ours, state))
        .collect();
    status.active_peers = status
        .peers
        .iter()
        .filter(|p| p.state == PeerState::Running)
        .count() as u32;
    let Some(state) = state else { return };
    let closed = state.open_round.min(state.rounds);
    status.round = closed;
    status.tokens_seen = state.tokens;
    status.bytes_received = state.bytes_received;
    status.bytes_sent = state.bytes_sent;
    status.loss_history = loss_history(&status.loss_history, &state.recent);
    if let Some(last) = state.recent.last() {
        status.last_loss = finite(last.validation_loss);
        status.loss = status.last_loss.map(|l| significant(l, 4));
        status.last_round = Some(round_status(last));
    }
    let updates: u64 = state
        .peers
        .iter()
        .map(|p| u64::from(p.updates_accepted))
        .sum();
    if state.bytes_received > 0 {
        let ratio = (updates * state.dense_update_bytes) as f64 / state.bytes_received as f64;
        status.compression_ratio = Some((ratio * 10.0).round() / 10.0);
    }
    status.checkpoints = checkpoints(o.run, closed, &status.checkpoints, o.now);
}

/// Rounds the loss history keeps: enough for a curve, little enough for a status.
pub const LOSS_HISTORY: usize = 100;

/// The history so far with the exchange's recent rounds merged in (by round, a finite
/// loss only), the last [`LOSS_HISTORY`] kept.
fn loss_history(known: &[LossPoint], recent: &[proto::RoundSummary]) -> Vec<LossPoint> {
    let mut by_round: std::collections::BTreeMap<u32, f64> =
        known.iter().map(|p| (p.round, p.loss)).collect();
    for summary in recent {
        if let Some(loss) = finite(summary.validation_loss) {
            by_round.insert(summary.round, loss);
        }
    }
    let skip = by_round.len().saturating_sub(LOSS_HISTORY);
    by_round
        .into_iter()
        .skip(skip)
        .map(|(round, loss)| LossPoint { round, loss })
        .collect()
}

fn round_status(summary: &proto::RoundSummary) -> RoundStatus {
    let tenths = |s: f64| (s * 10.0).round() / 10.0;
    RoundStatus {
        round: summary.round,
        closed_by: summary.closed_by.clone(),
        updates: summary.contributors.len() as u32,
        waited_seconds: tenths(summary.waited_seconds),
        deadline_seconds: tenths(summary.deadline_seconds),
        download_bytes: summary.download_bytes,
    }
}

/// `x` to `digits` significant digits: 5.294079 → "5.294", 0.0123456 → "0.01235".
fn significant(x: f64, digits: i32) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).max(0) as usize;
    format!("{x:.decimals$}")
}

/// `None` for NaN and infinities: they never compare equal, so a status holding one
/// would be rewritten on every look.
fn finite(x: f32) -> Option<f64> {
    x.is_finite().then_some(f64::from(x))
}

fn peer_status(
    peer: PeerId,
    plan: &Plan,
    groups: &[&TrainerGroup],
    state: Option<&proto::RunState>,
) -> PeerStatus {
    let member = plan.assignment.get(&peer).cloned().unwrap_or_default();
    let pod = groups
        .iter()
        .filter(|g| g.spec.member == member)
        .filter_map(|g| g.status.as_ref())
        .flat_map(|s| s.pods.iter())
        .find(|p| p.peer == peer);
    let exchange = state.and_then(|s| s.peers.iter().find(|p| p.peer == peer.to_string()));
    let state = match (pod.map(|p| p.phase.as_str()), exchange) {
        _ if member.is_empty() => PeerState::Lost,
        (Some("Succeeded"), _) => PeerState::Finished,
        (_, Some(e)) if e.weight == 0.0 && e.updates_rejected > 0 => PeerState::Excluded,
        (Some("Running"), Some(e)) if e.alive => PeerState::Running,
        (Some("Running"), None) => PeerState::Running,
        (Some("Failed"), _) => PeerState::Lost,
        _ => PeerState::Pending,
    };
    PeerStatus {
        id: peer,
        member,
        state,
        rating: None,
        // A peer without an accepted update has no loss to show.
        last_score: exchange
            .filter(|e| e.updates_accepted > 0)
            .and_then(|e| finite(e.last_train_loss)),
        weight: exchange.and_then(|e| finite(e.weight)),
        standing: None,
        final_score: None,
        reason: None,
    }
}

/// Checkpoint records: every `everyRounds` rounds and the last, as the exchange writes
/// them, keeping when each was first seen.
fn checkpoints(
    run: &TrainingRun,
    closed: u32,
    previous: &[CheckpointRecord],
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<CheckpointRecord> {
    let every = run.spec.checkpoint.every_rounds.max(1);
    let last = run.spec.schedule.outer_rounds;
    let mut out: Vec<CheckpointRecord> = (1..=closed)
        .filter(|r| r % every == 0 || *r == last)
        .map(|round| {
            previous
                .iter()
                .find(|c| c.round == round)
                .cloned()
                .unwrap_or_else(|| CheckpointRecord {
                    round,
                    location: format!(
                        "{}/{}:{EXCHANGE_WORKDIR}/checkpoints/round-{round:06}",
                        run.namespace().unwrap_or_default(),
                        exchange_name(run)
                    ),
                    published: None,
                    time: Time(now),
                })
        })
        .collect();
    let keep = run.spec.checkpoint.keep_last.max(1) as usize;
    if out.len() > keep {
        out.drain(..out.len() - keep);
    }
    out
}

/// What other runs' trainers hold on each member, by member name: peers and GPUs.
/// Peers whose pods finished hold nothing: a finished run's groups stay for inspection
/// without blocking new runs. One pass over the groups, so a decision costs O(groups),
/// not O(members × groups).
pub fn held_by_others<'g>(
    groups: &'g [std::sync::Arc<TrainerGroup>],
    run_uid: &str,
) -> std::collections::HashMap<&'g str, (u32, u32)> {
    let mut held = std::collections::HashMap::new();
    for g in groups.iter().filter(|g| g.spec.run_ref.uid != run_uid) {
        let finished = g
            .status
            .iter()
            .flat_map(|s| &s.pods)
            .filter(|p| p.phase == "Succeeded")
            .count() as u32;
        let holding = (g.spec.peers.len() as u32).saturating_sub(finished);
        let entry: &mut (u32, u32) = held.entry(g.spec.member.as_str()).or_default();
        entry.0 += holding;
        entry.1 += holding * gpus(g.spec.template.resources.as_ref());
    }
    held
}

/// A Ready member as placement sees it: how many more of this run's peers it can take
/// after what other runs hold (`held`: peers and GPUs, from [`held_by_others`]) within
/// `maxTrainers` and its GPUs.
pub fn capacity(
    member: &MemberCluster,
    held: (u32, u32),
    ours_here: u32,
    gpus_per_peer: u32,
) -> placement::Member {
    let name = member.name_any();
    let (other_peers, other_gpus) = held;
    let by_trainers = member
        .spec
        .max_trainers
        .map(|max| max.saturating_sub(other_peers + ours_here));
    let by_gpus = (gpus_per_peer > 0).then(|| {
        let allocatable = member.status.as_ref().map_or(0, |s| s.gpus_allocatable);
        allocatable.saturating_sub(other_gpus + ours_here * gpus_per_peer) / gpus_per_peer
    });
    placement::Member {
        name,
        tier: member.spec.tier,
        region: member.spec.region.clone(),
        upload_mbps: member.spec.bandwidth.upload_mbps,
        labels: member.spec.labels.clone(),
        free_slots: match (by_trainers, by_gpus) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(round: u32, loss: f32) -> proto::RoundSummary {
        proto::RoundSummary {
            round,
            validation_loss: loss,
            ..Default::default()
        }
    }

    #[test]
    fn the_loss_history_merges_new_rounds_skips_nan_and_keeps_the_last_hundred() {
        let known: Vec<LossPoint> = (0..99)
            .map(|r| LossPoint {
                round: r,
                loss: 5.0 - f64::from(r) / 100.0,
            })
            .collect();
        // The exchange's recent rounds overlap what is known, and one lost its loss.
        let recent = [
            summary(98, 4.02),
            summary(99, 4.0),
            summary(100, f32::NAN),
            summary(101, 3.5),
        ];
        let history = loss_history(&known, &recent);
        assert_eq!(history.len(), LOSS_HISTORY);
        assert_eq!(history[0].round, 1, "the oldest went to make room");
        let last: Vec<u32> = history[97..].iter().map(|p| p.round).collect();
        assert_eq!(last, [98, 99, 101]);
        assert_eq!(history[99].loss, 3.5);
        assert_eq!(loss_history(&[], &[]), vec![]);
    }

    #[test]
    fn losses_show_four_significant_digits() {
        assert_eq!(significant(5.294079303741455, 4), "5.294");
        assert_eq!(significant(0.012345678, 4), "0.01235");
        assert_eq!(significant(12.3456, 4), "12.35");
        assert_eq!(significant(12345.6, 4), "12346");
        assert_eq!(significant(0.0, 4), "0");
    }
}
