//! Placement: which member cluster hosts which peer of a run.
//!
//! A pure function of the run's wishes and the members' state, so it can be tested in
//! isolation and re-run on every reconcile: the same inputs always give the same plan, and
//! a re-plan keeps every peer that can stay where it is.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{PeerId, PlacementSpec, Tier};

/// A Ready member as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    pub tier: Tier,
    pub region: String,
    pub upload_mbps: u32,
    pub labels: BTreeMap<String, String>,
    /// How many more of this run's peers the member can take beyond those it already
    /// hosts for the run (GPUs and `maxTrainers` left after other runs); `None` when
    /// nothing limits it.
    pub free_slots: Option<u32>,
}

/// What a run asks for.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub min_peers: u32,
    pub max_peers: u32,
    pub spec: &'a PlacementSpec,
    /// Where each peer runs now. Peers on members that are not among the candidates
    /// (dark, deleted, no longer eligible) are re-placed.
    pub current: &'a BTreeMap<PeerId, String>,
}

/// Peers per member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub assignment: BTreeMap<PeerId, String>,
    /// Peers no member could take (the run has fewer than `max` peers meanwhile).
    pub unplaced: Vec<PeerId>,
}

impl Plan {
    /// The peers each member hosts, members in name order.
    pub fn by_member(&self) -> BTreeMap<&str, Vec<PeerId>> {
        let mut out: BTreeMap<&str, Vec<PeerId>> = BTreeMap::new();
        for (peer, member) in &self.assignment {
            out.entry(member.as_str()).or_default().push(*peer);
        }
        out
    }

    /// Peers that moved between `before` and this plan (placed for the first time or on
    /// another member).
    pub fn moved(&self, before: &BTreeMap<PeerId, String>) -> usize {
        self.assignment
            .iter()
            .filter(|(p, m)| before.get(p) != Some(m))
            .count()
    }
}

/// Why a run cannot be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{placeable} of the {min} peers the run needs can be placed: {why}")]
pub struct Unschedulable {
    pub placeable: u32,
    pub min: u32,
    pub why: String,
}

/// Places peers `p0 .. p{max-1}`.
///
/// Eligibility: selector, allowed tiers, bandwidth floor. Capacity: the member's free
/// slots and `maxPeersPerMember`. Peers already on an eligible member stay (stability);
/// the rest go one at a time to the member hosting the fewest of this run's peers, then
/// the least-used region, then `cloud` before `home` (stable capacity first), then name
/// (determinism). Spreading bounds what one member or region going dark takes with it.
pub fn place(request: &Request, members: &[Member]) -> Result<Plan, Unschedulable> {
    let (eligible, excluded) = eligible(request, members);
    let plan = assign(request, &eligible);
    let placed = plan.assignment.len() as u32;
    if placed >= request.min_peers {
        return Ok(plan);
    }
    let mut why: Vec<String> = excluded
        .iter()
        .map(|(reason, n)| format!("{n} member(s): {reason}"))
        .collect();
    if eligible.is_empty() && members.is_empty() {
        why.push("no Ready member clusters".into());
    } else if !eligible.is_empty() {
        why.push(format!(
            "{} eligible member(s) have room for {placed}",
            eligible.len()
        ));
    }
    Err(Unschedulable {
        placeable: placed,
        min: request.min_peers,
        why: why.join("; "),
    })
}

/// The members the run may use, in name order, and how many were excluded for which
/// reason.
fn eligible<'m>(
    request: &Request,
    members: &'m [Member],
) -> (Vec<&'m Member>, BTreeMap<String, usize>) {
    let spec = request.spec;
    let mut excluded: BTreeMap<String, usize> = BTreeMap::new();
    let mut eligible: Vec<&Member> = vec![];
    for m in members {
        let reason = if !spec.tiers.contains(&m.tier) {
            Some(format!("tier {} not allowed", m.tier))
        } else if spec
            .min_bandwidth_mbps
            .is_some_and(|floor| m.upload_mbps < floor)
        {
            Some("upload bandwidth below placement.minBandwidthMbps".to_string())
        } else if !selector_matches(spec.member_selector.as_ref(), &m.labels) {
            Some("not matched by placement.memberSelector".to_string())
        } else if m.free_slots == Some(0) && !request.current.values().any(|c| *c == m.name) {
            Some("no free capacity".to_string())
        } else {
            None
        };
        match reason {
            Some(r) => *excluded.entry(r).or_default() += 1,
            None => eligible.push(m),
        }
    }
    eligible.sort_by(|a, b| a.name.cmp(&b.name));
    (eligible, excluded)
}

/// Assigns every peer it can: first where it already runs, then by spread.
fn assign(request: &Request, eligible: &[&Member]) -> Plan {
    // Slots per member for this run: what it hosts now plus what is free, capped.
    let hosted_now = |name: &str| request.current.values().filter(|m| *m == name).count() as u32;
    let cap = request.spec.max_peers_per_member.unwrap_or(u32::MAX);
    let mut room: BTreeMap<&str, u32> = eligible
        .iter()
        .map(|m| {
            let slots = m
                .free_slots
                .map_or(u32::MAX, |free| free.saturating_add(hosted_now(&m.name)));
            (m.name.as_str(), slots.min(cap))
        })
        .collect();
    let mut plan = Plan::default();
    let peers: Vec<PeerId> = (0..request.max_peers).map(PeerId::new).collect();
    // Stay where possible, in peer order so a shrunken member keeps its lowest peers.
    for peer in &peers {
        if let Some(member) = request.current.get(peer)
            && let Some(left) = room.get_mut(member.as_str())
            && *left > 0
        {
            *left -= 1;
            plan.assignment.insert(*peer, member.clone());
        }
    }
    for peer in &peers {
        if plan.assignment.contains_key(peer) {
            continue;
        }
        let best = best_member(&plan, eligible, &room);
        match best.and_then(|m| Some((m, room.get_mut(m.name.as_str())?))) {
            Some((m, left)) => {
                *left -= 1;
                plan.assignment.insert(*peer, m.name.clone());
            }
            None => plan.unplaced.push(*peer),
        }
    }
    plan
}

/// The member with room that hosts the fewest of the run's peers, then in the
/// least-used region, then `cloud` before `home`, then by name.
fn best_member<'m>(
    plan: &Plan,
    eligible: &[&'m Member],
    room: &BTreeMap<&str, u32>,
) -> Option<&'m Member> {
    let count_on = |name: &str| plan.assignment.values().filter(|m| *m == name).count();
    let count_in_region = |region: &str| {
        plan.assignment
            .values()
            .filter(|m| eligible.iter().any(|e| e.name == **m && e.region == region))
            .count()
    };
    eligible
        .iter()
        .filter(|m| room.get(m.name.as_str()).is_some_and(|r| *r > 0))
        .min_by_key(|m| {
            (
                count_on(&m.name),
                count_in_region(&m.region),
                m.tier,
                m.name.clone(),
            )
        })
        .copied()
}

/// `matchLabels` and `matchExpressions` (In, NotIn, Exists, DoesNotExist) against labels.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values: BTreeSet<&str> = e.values.iter().flatten().map(String::as_str).collect();
        let value = labels.get(&e.key).map(String::as_str);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn member(name: &str, tier: Tier, region: &str, free: Option<u32>) -> Member {
        Member {
            name: name.into(),
            tier,
            region: region.into(),
            upload_mbps: if tier == Tier::Cloud { 10_000 } else { 100 },
            labels: BTreeMap::from([("name".to_string(), name.to_string())]),
            free_slots: free,
        }
    }

    fn fleet() -> Vec<Member> {
        vec![
            member("cloud-eu", Tier::Cloud, "eu", Some(4)),
            member("cloud-us", Tier::Cloud, "us", Some(4)),
            member("home-lagos", Tier::Home, "lagos", Some(1)),
        ]
    }

    fn place_fresh(
        spec: &PlacementSpec,
        min: u32,
        max: u32,
        members: &[Member],
    ) -> Result<Plan, Unschedulable> {
        let current = BTreeMap::new();
        place(
            &Request {
                min_peers: min,
                max_peers: max,
                spec,
                current: &current,
            },
            members,
        )
    }

    fn counts(plan: &Plan) -> BTreeMap<String, usize> {
        plan.by_member()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.len()))
            .collect()
    }

    #[test]
    fn spreads_over_members_and_prefers_cloud_first() {
        let plan = place_fresh(&PlacementSpec::default(), 2, 3, &fleet()).unwrap();
        assert_eq!(
            counts(&plan),
            BTreeMap::from([
                ("cloud-eu".into(), 1),
                ("cloud-us".into(), 1),
                ("home-lagos".into(), 1)
            ])
        );
        // The first peers land on stable capacity.
        assert_eq!(plan.assignment[&PeerId::new(0)], "cloud-eu");
        assert_eq!(plan.assignment[&PeerId::new(1)], "cloud-us");
        // Deterministic: the same inputs give the same plan.
        assert_eq!(
            plan,
            place_fresh(&PlacementSpec::default(), 2, 3, &fleet()).unwrap()
        );
        let bigger = place_fresh(&PlacementSpec::default(), 2, 7, &fleet()).unwrap();
        assert_eq!(
            counts(&bigger),
            BTreeMap::from([
                ("cloud-eu".into(), 3),
                ("cloud-us".into(), 3),
                ("home-lagos".into(), 1)
            ])
        );
    }

    #[test]
    fn spreads_across_regions_before_filling_one() {
        let members = vec![
            member("a1", Tier::Cloud, "eu", None),
            member("a2", Tier::Cloud, "eu", None),
            member("b1", Tier::Cloud, "us", None),
        ];
        let plan = place_fresh(&PlacementSpec::default(), 1, 2, &members).unwrap();
        let regions: BTreeSet<&str> = plan
            .assignment
            .values()
            .map(|m| if m.starts_with('a') { "eu" } else { "us" })
            .collect();
        assert_eq!(regions.len(), 2, "{plan:?}");
    }

    #[test]
    fn tiers_selectors_and_bandwidth_floors_exclude_members() {
        let cloud_only = PlacementSpec {
            tiers: vec![Tier::Cloud],
            ..PlacementSpec::default()
        };
        let plan = place_fresh(&cloud_only, 1, 3, &fleet()).unwrap();
        assert!(plan.assignment.values().all(|m| m.starts_with("cloud")));

        let floor = PlacementSpec {
            min_bandwidth_mbps: Some(1000),
            ..PlacementSpec::default()
        };
        let plan = place_fresh(&floor, 1, 3, &fleet()).unwrap();
        assert!(!plan.assignment.values().any(|m| m == "home-lagos"));

        let selector = PlacementSpec {
            member_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "name".into(),
                    operator: "In".into(),
                    values: Some(vec!["cloud-us".into(), "home-lagos".into()]),
                }]),
            }),
            ..PlacementSpec::default()
        };
        let plan = place_fresh(&selector, 1, 2, &fleet()).unwrap();
        assert_eq!(
            plan.assignment.values().cloned().collect::<BTreeSet<_>>(),
            BTreeSet::from(["cloud-us".to_string(), "home-lagos".to_string()])
        );
    }

    #[test]
    fn capacity_exhaustion_is_unschedulable_with_the_reasons() {
        let members = vec![
            member("cloud-eu", Tier::Cloud, "eu", Some(1)),
            member("home-lagos", Tier::Home, "lagos", Some(0)),
        ];
        let err = place_fresh(&PlacementSpec::default(), 2, 3, &members).unwrap_err();
        assert_eq!((err.placeable, err.min), (1, 2));
        assert!(err.why.contains("no free capacity"), "{err}");

        // Enough for min but not max: placed, with the rest waiting.
        let plan = place_fresh(&PlacementSpec::default(), 1, 3, &members).unwrap();
        assert_eq!(plan.assignment.len(), 1);
        assert_eq!(plan.unplaced, vec![PeerId::new(1), PeerId::new(2)]);

        let capped = PlacementSpec {
            max_peers_per_member: Some(1),
            ..PlacementSpec::default()
        };
        let err = place_fresh(&capped, 3, 3, &fleet()[..2]).unwrap_err();
        assert_eq!(err.placeable, 2);

        let err = place_fresh(&PlacementSpec::default(), 1, 1, &[]).unwrap_err();
        assert!(err.why.contains("no Ready member clusters"), "{err}");
    }

    #[test]
    fn replanning_moves_only_the_peers_that_must_move() {
        let spec = PlacementSpec {
            max_peers_per_member: Some(2),
            ..PlacementSpec::default()
        };
        let mut members = fleet();
        members.push(member("cloud-ap", Tier::Cloud, "ap", Some(4)));
        let first = place_fresh(&spec, 2, 5, &members).unwrap();
        assert!(first.unplaced.is_empty());

        // The same members again: nothing moves.
        let again = place(
            &Request {
                min_peers: 2,
                max_peers: 5,
                spec: &spec,
                current: &first.assignment,
            },
            &members,
        )
        .unwrap();
        assert_eq!(again.moved(&first.assignment), 0);

        // A member goes dark: only its peers move, to members with room.
        let dark = first.assignment[&PeerId::new(0)].clone();
        let survivors: Vec<Member> = members.into_iter().filter(|m| m.name != dark).collect();
        let replan = place(
            &Request {
                min_peers: 2,
                max_peers: 5,
                spec: &spec,
                current: &first.assignment,
            },
            &survivors,
        )
        .unwrap();
        let lost = first.assignment.values().filter(|m| **m == dark).count();
        assert_eq!(replan.moved(&first.assignment), lost);
        assert!(replan.assignment.values().all(|m| *m != dark));
        for (peer, member) in &first.assignment {
            if *member != dark {
                assert_eq!(&replan.assignment[peer], member, "{peer} moved needlessly");
            }
        }
    }
}
