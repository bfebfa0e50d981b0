//! Named cases for every rule of the scoring state machine.

use super::*;
use crate::scoring::CopySpec;

fn spec() -> ScoringSpec {
    ScoringSpec {
        copying: CopySpec {
            warmup_rounds: 0,
            ..CopySpec::default()
        },
        ..ScoringSpec::default()
    }
}

fn p(i: u32) -> PeerId {
    PeerId::new(i)
}

/// An honest update: it helps, more on the peer's own data than on a random slice.
fn honest(score: f64) -> Measured {
    Measured::Evaluated(Evaluation {
        score,
        own_score: score + 0.005,
        sync_distance: 0.5,
        copy: None,
    })
}

fn with(m: Measured, change: impl FnOnce(&mut Evaluation)) -> Measured {
    match m {
        Measured::Evaluated(mut e) => {
            change(&mut e);
            Measured::Evaluated(e)
        }
        other => other,
    }
}

/// Rounds 0.. of four honest peers p0–p3 and p4 measured as `p4(round)`.
fn rounds(spec: &ScoringSpec, n: u32, p4: impl Fn(u32) -> Measured) -> (Scoring, Vec<Vec<Change>>) {
    let mut state = Scoring::default();
    let mut changes = Vec::new();
    for r in 0..n {
        let mut measured: BTreeMap<PeerId, Measured> = (0..4)
            .map(|i| (p(i), honest(0.01 + 0.001 * f64::from(i))))
            .collect();
        measured.insert(p(4), p4(r));
        let input = RoundInput {
            round: Round(r),
            measured,
        };
        let (next, c) = step(spec, &state, &input);
        state = next;
        changes.push(c);
    }
    (state, changes)
}

fn excluded_at(changes: &[Vec<Change>], peer: PeerId) -> Option<usize> {
    changes.iter().position(|c| {
        c.iter()
            .any(|c| matches!(c, Change::PeerExcluded { peer: x, .. } if *x == peer))
    })
}

fn banned_at(changes: &[Vec<Change>], peer: PeerId) -> Option<usize> {
    changes.iter().position(|c| {
        c.iter()
            .any(|c| matches!(c, Change::PeerBanned { peer: x, .. } if *x == peer))
    })
}

#[test]
fn honest_peers_are_all_aggregated_with_equal_weight() {
    let (s, changes) = rounds(&spec(), 12, |_| honest(0.012));
    assert_eq!(s.aggregate.len(), 5);
    for peer in s.peers.values() {
        assert_eq!(peer.weight, 0.2);
        assert_eq!(peer.standing(Round(11)), Standing::Active);
        assert!(peer.bma > 0.4, "{peer:?}");
    }
    assert!(changes.iter().all(Vec::is_empty), "{changes:?}");
}

#[test]
fn a_better_scorer_is_rated_above_a_worse_one_and_aggregated_first() {
    let (s, _) = rounds(&spec(), 12, |_| honest(0.05));
    let best = s.peers[&p(4)].rating.ordinal();
    assert!(s.peers.values().all(|x| x.rating.ordinal() <= best));
    assert_eq!(s.aggregate[0], p(4));
    assert_eq!(s.aggregate[1], p(3));
}

#[test]
fn one_or_two_negative_scores_do_not_exclude() {
    let (s, changes) = rounds(&spec(), 5, |r| honest(if r >= 3 { -0.01 } else { 0.01 }));
    assert_eq!(excluded_at(&changes, p(4)), None);
    let p4 = &s.peers[&p(4)];
    assert_eq!((p4.negatives_in_a_row, p4.weight), (2, 0.0));
    assert!(p4.reason.contains("≤ 0"), "{}", p4.reason);
}

#[test]
fn three_negatives_in_a_row_exclude_until_a_positive_score() {
    let (s, changes) = rounds(&spec(), 8, |r| match r {
        3..=5 => honest(-0.02),
        6 => honest(-0.01),
        _ => honest(0.01),
    });
    assert_eq!(excluded_at(&changes, p(4)), Some(5));
    assert!(
        matches!(&changes[7][..], [Change::PeerReadmitted { peer, .. }] if *peer == p(4)),
        "{:?}",
        changes[7]
    );
    assert_eq!(s.peers[&p(4)].standing(Round(7)), Standing::Active);
    let (s, _) = rounds(&spec(), 7, |r| honest(if r >= 3 { -0.02 } else { 0.01 }));
    let p4 = &s.peers[&p(4)];
    assert_eq!(
        (p4.standing(Round(6)), p4.weight),
        (Standing::Excluded, 0.0)
    );
    assert!(
        p4.reason.starts_with("3 negative rounds in a row"),
        "{}",
        p4.reason
    );
    assert!(!s.aggregate.contains(&p(4)));
}

#[test]
fn an_invalid_update_is_negative_and_rated_last() {
    let invalid = || Measured::Invalid {
        reason: "all zero".into(),
    };
    let (s, changes) = rounds(
        &spec(),
        5,
        |r| if r >= 2 { invalid() } else { honest(0.01) },
    );
    assert_eq!(excluded_at(&changes, p(4)), Some(4));
    let p4 = &s.peers[&p(4)];
    assert!(
        p4.reason.contains("invalid update (all zero)"),
        "{}",
        p4.reason
    );
    assert!(s.peers.values().all(|x| x.rating.mu >= p4.rating.mu));
    assert!(p4.rating.mu < 25.0);
}

#[test]
fn more_than_four_negatives_in_eight_quarter_the_bma() {
    // Negatives never three in a row, so only the window rule acts.
    let pattern = |r: u32| honest(if r.is_multiple_of(3) { 0.01 } else { -0.01 });
    let (before, _) = rounds(&spec(), 7, pattern);
    let (after, changes) = rounds(&spec(), 8, pattern);
    assert_eq!(excluded_at(&changes, p(4)), None);
    let (b, a) = (before.peers[&p(4)].bma, after.peers[&p(4)].bma);
    assert_eq!(after.peers[&p(4)].count(Outcome::Negative), 5);
    assert!((a - 0.25 * (0.95 * b + 0.05)).abs() < 1e-12, "{b} -> {a}");
}

#[test]
fn negative_scores_go_unpunished_in_a_round_most_peers_scored_negative() {
    let spec = spec();
    let mut state = Scoring::default();
    let mut all_changes = vec![];
    for r in 0..6 {
        // A hard stretch: every peer's score is negative.
        let measured = (0..5).map(|i| (p(i), honest(-0.001))).collect();
        let (next, changes) = step(
            &spec,
            &state,
            &RoundInput {
                round: Round(r),
                measured,
            },
        );
        state = next;
        all_changes.extend(changes);
    }
    assert!(all_changes.is_empty(), "{all_changes:?}");
    assert!(
        state
            .peers
            .values()
            .all(|s| s.negatives_in_a_row == 0 && !s.excluded)
    );
    assert!(
        state.aggregate.is_empty(),
        "negative scores still earn no weight"
    );
}

#[test]
fn missed_rounds_cut_the_bma_by_a_quarter_a_half_then_all() {
    let bma = |n: u32| {
        rounds(&spec(), n, |r| {
            if r >= 6 {
                Measured::Missing
            } else {
                honest(0.01)
            }
        })
        .0
        .peers[&p(4)]
            .bma
    };
    let base = bma(6);
    assert!((bma(7) - 0.75 * base).abs() < 1e-12);
    assert!((bma(8) - 0.375 * base).abs() < 1e-12);
    assert_eq!(bma(9), 0.0);
    let (s, _) = rounds(&spec(), 7, |r| {
        if r == 6 {
            Measured::Missing
        } else {
            honest(0.01)
        }
    });
    let p4 = &s.peers[&p(4)];
    assert_eq!((p4.standing(Round(6)), p4.weight), (Standing::Missing, 0.0));
}

#[test]
fn four_missed_of_eight_reset_and_ban_the_peer_for_the_ban_rounds() {
    let spec = ScoringSpec {
        ban_rounds: 5,
        ..spec()
    };
    let flaky = |r: u32| {
        if r % 2 == 1 {
            Measured::Missing
        } else {
            honest(0.01)
        }
    };
    let (s, changes) = rounds(&spec, 8, flaky);
    assert_eq!(banned_at(&changes, p(4)), Some(7));
    let p4 = &s.peers[&p(4)];
    assert_eq!(p4.banned_until, Some(Round(13)));
    assert_eq!(
        (p4.standing(Round(7)), p4.weight, p4.bma),
        (Standing::Banned, 0.0, 0.0)
    );
    assert_eq!(p4.rating, Rating::initial(&spec.open_skill));
    let (s, changes) = rounds(&spec, 14, |r| if r < 8 { flaky(r) } else { honest(0.01) });
    assert!(
        matches!(&changes[12][..], [Change::PeerReadmitted { .. }]),
        "{:?}",
        changes[12]
    );
    assert!(s.aggregate.contains(&p(4)));
}

#[test]
fn nobody_is_penalised_for_missing_an_outage() {
    let spec = spec();
    let mut state = Scoring::default();
    for r in 0..8 {
        // Only p0 of five gets through (20% < 40%): a regional outage.
        let measured = (0..5)
            .map(|i| {
                (
                    p(i),
                    if i == 0 || r < 2 {
                        honest(0.01)
                    } else {
                        Measured::Missing
                    },
                )
            })
            .collect();
        let (next, changes) = step(
            &spec,
            &state,
            &RoundInput {
                round: Round(r),
                measured,
            },
        );
        assert!(changes.is_empty(), "{changes:?}");
        state = next;
    }
    let p4 = &state.peers[&p(4)];
    assert_eq!((p4.misses_in_a_row, p4.banned_until), (0, None));
    assert!(p4.bma > 0.0);
}

#[test]
fn copying_halves_resets_or_bans_by_overlap() {
    let copy = |overlap: f64, replay: bool| {
        move |r: u32| {
            with(honest(0.01), |e| {
                if r == 4 {
                    e.copy = Some(Copying {
                        of: p(1),
                        overlap,
                        replay,
                    });
                }
            })
        }
    };
    let clean = rounds(&spec(), 5, copy(0.1, false));
    assert!(clean.1.iter().all(Vec::is_empty));
    let (s, changes) = rounds(&spec(), 5, copy(0.45, false));
    assert!(matches!(&changes[4][..], [Change::CopyDetected { .. }]));
    assert!((s.peers[&p(4)].bma - 0.5 * clean.0.peers[&p(4)].bma).abs() < 1e-12);
    let (s, changes) = rounds(&spec(), 5, copy(0.55, false));
    assert_eq!(banned_at(&changes, p(4)), None);
    assert_eq!(s.peers[&p(4)].bma, 0.0);
    assert!(
        s.peers[&p(4)]
            .reason
            .starts_with("reset for copying: 55% overlap with p1")
    );
    for (overlap, replay) in [(0.65, false), (0.0, true)] {
        let (s, changes) = rounds(&spec(), 5, copy(overlap, replay));
        assert_eq!(banned_at(&changes, p(4)), Some(4), "{overlap} {replay}");
        assert_eq!(s.peers[&p(4)].standing(Round(4)), Standing::Banned);
    }
}

#[test]
fn overlap_is_forgiven_during_the_warm_up_but_a_replay_never() {
    let spec = ScoringSpec::default();
    let copy = |replay: bool| {
        move |r: u32| {
            with(honest(0.01), |e| {
                if r == 2 {
                    e.copy = Some(Copying {
                        of: p(1),
                        overlap: 0.9,
                        replay,
                    });
                }
            })
        }
    };
    assert!(rounds(&spec, 3, copy(false)).1.iter().all(Vec::is_empty));
    assert_eq!(banned_at(&rounds(&spec, 3, copy(true)).1, p(4)), Some(2));
}

#[test]
fn a_peer_out_of_sync_loses_its_weight_and_some_bma() {
    let drift = |x: f64| move |_| with(honest(0.01), |e| e.sync_distance = x);
    let (in_sync, _) = rounds(&spec(), 3, drift(1.9));
    let (out, _) = rounds(&spec(), 3, drift(2.5));
    assert!(in_sync.aggregate.contains(&p(4)));
    assert!(!out.aggregate.contains(&p(4)));
    assert!(out.peers[&p(4)].bma < in_sync.peers[&p(4)].bma);
    let sync = out.peers[&p(4)].sync;
    assert!((sync - (1.0f64 - 2.5 / 3.0).powf(2.5)).abs() < 1e-12);
}

#[test]
fn past_the_gate_round_a_peer_that_ignores_its_own_data_gets_nothing_when_the_gate_is_set() {
    // Helps a random slice as much as its own data: b = −1 every round.
    let offslice = |_| with(honest(0.01), |e| e.own_score = e.score);
    let gated = ScoringSpec {
        bma_gate: Some(0.1),
        ..spec()
    };
    let (early, _) = rounds(&gated, 10, offslice);
    assert!(
        early.aggregate.contains(&p(4)),
        "the gate waits for round 10"
    );
    let (late, _) = rounds(&gated, 11, offslice);
    let p4 = &late.peers[&p(4)];
    assert!(p4.bma < 0.1);
    assert_eq!((p4.final_score, p4.weight), (0.0, 0.0));
    assert!(!late.aggregate.contains(&p(4)));
    assert!(late.aggregate.contains(&p(0)), "honest peers pass the gate");
    // Off by default: the signal is a coin flip on evenly split data.
    let (ungated, _) = rounds(&spec(), 11, offslice);
    assert!(ungated.aggregate.contains(&p(4)));
}

#[test]
fn the_aggregate_takes_at_most_max_aggregated_best_first() {
    let spec = ScoringSpec {
        max_aggregated: 3,
        ..spec()
    };
    let (s, _) = rounds(&spec, 12, |_| honest(0.02));
    assert_eq!(s.aggregate, [p(4), p(3), p(2)]);
    let weights: Vec<f64> = s.peers.values().map(|x| x.weight).collect();
    assert_eq!(weights, [0.0, 0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
    let shares = reward_shares(&s);
    assert!((shares.values().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(shares[&p(4)] > shares[&p(0)]);
}

#[test]
fn numbers_no_rule_can_use_count_as_an_invalid_update() {
    let (s, _) = rounds(&spec(), 3, |r| {
        with(honest(0.01), |e| {
            if r == 2 {
                e.score = f64::NAN
            }
        })
    });
    let p4 = &s.peers[&p(4)];
    assert!(p4.reason.contains("not a finite number"), "{}", p4.reason);
    assert!(p4.rating.mu.is_finite() && p4.last_score.is_none());
}

#[test]
fn a_step_is_a_pure_function_of_state_and_measurements() {
    let a = rounds(&spec(), 15, |r| {
        honest(if r.is_multiple_of(4) { -0.01 } else { 0.02 })
    });
    let b = rounds(&spec(), 15, |r| {
        honest(if r.is_multiple_of(4) { -0.01 } else { 0.02 })
    });
    assert_eq!(a, b);
    let json = serde_json::to_string(&a.0).unwrap();
    assert_eq!(serde_json::from_str::<Scoring>(&json).unwrap(), a.0);
}

#[test]
fn a_score_far_below_the_rounds_median_counts_as_negative() {
    // Honest peers score about 0.01; p4 helps a fiftieth as much, every round.
    let (s, changes) = rounds(&spec(), 5, |r| honest(if r >= 2 { 0.0002 } else { 0.01 }));
    assert_eq!(excluded_at(&changes, p(4)), Some(4));
    assert!(
        s.peers[&p(4)].reason.contains("0.00020 ≤ 0.00"),
        "{}",
        s.peers[&p(4)].reason
    );
    let relaxed = ScoringSpec {
        relative_threshold: 0.0,
        ..spec()
    };
    let (s, changes) = rounds(&relaxed, 5, |r| honest(if r >= 2 { 0.0002 } else { 0.01 }));
    assert_eq!(excluded_at(&changes, p(4)), None);
    assert!(s.aggregate.contains(&p(4)));
}
