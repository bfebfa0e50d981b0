//! Where a run's peers go, as part of its decision: placement over the Ready members
//! (see [`crate::placement`]), the TrainerGroups that follow from it, peers re-placed when
//! their member goes dark, and waiting (then failing) when nothing has room.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use kube::ResourceExt;

use super::decide::{CAPACITY_POLL, Decision, Draft, Observed, our_groups};
use super::progress;
use crate::api::{MemberCluster, PeerId, Phase, TrainingRun};
use crate::hub::children::{self, GroupSettings};
use crate::k8s::{condition, condition_true, member_namespace, reason};
use crate::placement::{self, Plan, Unschedulable};

pub(super) enum Placed {
    /// Placed; `lost` peers were on members that are no longer Ready.
    Yes {
        plan: Plan,
        lost: usize,
    },
    No(Box<Decision>),
}

/// Places the run's peers and fills in the groups to write and remove.
pub(super) fn place(
    d: &mut Draft,
    tokens: &BTreeMap<String, String>,
    settings: &GroupSettings,
) -> Placed {
    let o = d.o;
    let view = placement_view(o);
    let plan = match placement::place(&view.request(o.run), &view.candidates) {
        Ok(plan) => {
            d.status.unschedulable_since = None;
            plan
        }
        Err(why) if view.current.is_empty() => {
            return Placed::No(Box::new(unschedulable(d.take(), why)));
        }
        Err(why) => keep_what_runs(d, &view, why),
    };
    let lost = view.lost();
    for (peer, from) in &lost {
        let message = match plan.assignment.get(peer) {
            Some(to) => format!("{peer}: member {from} is not Ready; re-placed on {to}"),
            None => format!("{peer}: member {from} is not Ready; no member has room for it"),
        };
        d.note(true, reason::PEER_LOST, message);
    }
    let by_member = plan.by_member();
    for (member, peers) in &by_member {
        if let Some(m) = view.ready.get(*member) {
            d.children
                .groups
                .push(children::trainer_group(o.run, m, peers, tokens, settings));
        }
    }
    d.children.remove = our_groups(o)
        .into_iter()
        .filter(|g| !by_member.keys().any(|m| member_namespace(m) == g.namespace))
        .collect();
    // Announced once: by the status, since the groups just written may not be in the
    // store yet at the next look.
    let placed_before = d.previous.peers.iter().any(|p| !p.member.is_empty());
    if view.current.is_empty() && !placed_before {
        let summary: Vec<String> = by_member
            .iter()
            .map(|(m, p)| format!("{m}: {}", p.len()))
            .collect();
        let message = format!(
            "{} peers placed ({})",
            plan.assignment.len(),
            summary.join(", ")
        );
        d.note(false, reason::PLACED, message);
    }
    Placed::Yes {
        plan,
        lost: lost.len(),
    }
}

impl<'a> Draft<'a> {
    /// Moves the draft out, for helpers that finish the decision.
    pub(super) fn take(&mut self) -> Draft<'a> {
        Draft {
            o: self.o,
            previous: self.previous.clone(),
            status: std::mem::take(&mut self.status),
            events: std::mem::take(&mut self.events),
            children: std::mem::take(&mut self.children),
        }
    }
}

/// Never placed and nowhere to go: wait for capacity, up to the spec's deadline.
fn unschedulable(mut d: Draft, why: Unschedulable) -> Decision {
    let o = d.o;
    let since = d
        .previous
        .unschedulable_since
        .clone()
        .unwrap_or(Time(o.now));
    let deadline =
        SignedDuration::from_secs(i64::from(o.run.spec.placement.placement_deadline_seconds));
    let waited = o.now.duration_since(since.0);
    let message = why.to_string();
    if waited >= deadline {
        return d.fail(
            reason::UNSCHEDULABLE,
            format!(
                "could not be placed for {}s (placement.placementDeadlineSeconds): {message}",
                waited.as_secs()
            ),
        );
    }
    d.status.unschedulable_since = Some(since);
    d.note_once(condition::READY, true, reason::UNSCHEDULABLE, &message);
    d.condition(condition::READY, false, reason::UNSCHEDULABLE, message);
    d.phase(Phase::Pending);
    d.finish(Some(CAPACITY_POLL))
}

/// Already running but short of capacity: keep every peer whose member is still Ready
/// and wait for room for the others; the run is degraded, not restarted.
fn keep_what_runs(d: &mut Draft, view: &PlacementView, why: Unschedulable) -> Plan {
    let keep: BTreeMap<PeerId, String> = view
        .current
        .iter()
        .filter(|(_, m)| view.ready.contains_key(m.as_str()))
        .map(|(p, m)| (*p, m.clone()))
        .collect();
    d.condition(
        condition::DEGRADED,
        true,
        reason::UNSCHEDULABLE,
        why.to_string(),
    );
    Plan {
        unplaced: (0..d.o.run.spec.peers.max)
            .map(PeerId::new)
            .filter(|p| !keep.contains_key(p))
            .collect(),
        assignment: keep,
    }
}

/// The members and groups as placement sees them.
struct PlacementView<'a> {
    ready: BTreeMap<String, &'a MemberCluster>,
    current: BTreeMap<PeerId, String>,
    candidates: Vec<placement::Member>,
}

impl PlacementView<'_> {
    fn request<'r>(&'r self, run: &'r TrainingRun) -> placement::Request<'r> {
        placement::Request {
            min_peers: run.spec.peers.min,
            max_peers: run.spec.peers.max,
            spec: &run.spec.placement,
            current: &self.current,
        }
    }

    /// Peers whose member is no longer Ready, with that member.
    fn lost(&self) -> Vec<(PeerId, String)> {
        self.current
            .iter()
            .filter(|(_, m)| !self.ready.contains_key(m.as_str()))
            .map(|(p, m)| (*p, m.clone()))
            .collect()
    }
}

fn placement_view<'a>(o: &'a Observed) -> PlacementView<'a> {
    let uid = o.run.uid().unwrap_or_default();
    let ready: BTreeMap<String, &MemberCluster> = o
        .members
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| condition_true(&s.conditions, condition::READY))
        })
        .map(|m| (m.name_any(), m.as_ref()))
        .collect();
    let mut current = BTreeMap::new();
    for g in o.groups.iter().filter(|g| g.spec.run_ref.uid == uid) {
        for p in &g.spec.peers {
            current.insert(*p, g.spec.member.clone());
        }
    }
    let gpus_per_peer = crate::k8s::gpus(o.run.spec.peers.resources.as_ref());
    let held = progress::held_by_others(o.groups, &uid);
    let candidates = ready
        .values()
        .map(|m| {
            let ours_here = current.values().filter(|c| **c == m.name_any()).count() as u32;
            let held = held.get(m.name_any().as_str()).copied().unwrap_or_default();
            progress::capacity(m, held, ours_here, gpus_per_peer)
        })
        .collect();
    PlacementView {
        ready,
        current,
        candidates,
    }
}
