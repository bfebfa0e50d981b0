use super::*;

const DEADLINE: Duration = Duration::from_secs(60);
const LIVENESS: Duration = Duration::from_secs(15);

fn p(i: u32) -> PeerId {
    PeerId::new(i)
}

/// Peers `0..n`, all last heard from at `at`.
fn seen(n: u32, at: Instant) -> Vec<(PeerId, Instant)> {
    (0..n).map(|i| (p(i), at)).collect()
}

fn rules(min_peers: u32, deadline: Duration) -> Rules {
    Rules {
        liveness: LIVENESS,
        pace: Pace {
            min_peers,
            deadline,
            quorum: 0.75,
        },
    }
}

/// [`due`] with the liveness window of these tests and no predictions.
fn due_at(
    submitted: &[PeerId],
    last_seen: &[(PeerId, Instant)],
    min_peers: u32,
    deadline: Duration,
    first_at: Option<Instant>,
    now: Instant,
) -> Due {
    let observed = Observed {
        submitted,
        last_seen,
        predicted: &[],
        first_at,
    };
    due(&observed, &rules(min_peers, deadline), now)
}

#[test]
fn a_round_without_updates_waits_for_one() {
    let now = Instant::now();
    assert_eq!(
        due_at(&[], &seen(3, now), 1, DEADLINE, None, now + DEADLINE * 2),
        Due::No { wake_at: None }
    );
}

#[test]
fn every_live_peer_sent_and_min_peers_reached_closes_all_in() {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let all = [p(0), p(1), p(2)];
    assert_eq!(
        due_at(&all, &seen(3, t0), 3, DEADLINE, Some(t0), now),
        Due::Closes(Close::AllIn)
    );
    // Exactly `min_peers` updates are enough.
    assert_eq!(
        due_at(&all[..2], &seen(2, t0), 2, DEADLINE, Some(t0), now),
        Due::Closes(Close::AllIn)
    );
}

#[test]
fn all_in_wins_over_a_deadline_passed_at_the_same_time() {
    let t0 = Instant::now();
    let all = [p(0), p(1)];
    let late = t0 + DEADLINE;
    assert_eq!(
        due_at(&all, &seen(2, late), 2, DEADLINE, Some(t0), late),
        Due::Closes(Close::AllIn)
    );
}

#[test]
fn a_live_peer_that_has_not_sent_is_waited_for_until_it_lapses() {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let sent = [p(0), p(1)];
    assert_eq!(
        due_at(&sent, &seen(3, t0), 2, DEADLINE, Some(t0), now),
        Due::No {
            wake_at: Some(t0 + LIVENESS)
        }
    );
    // Once it lapses, the others are all in.
    let lapsed = t0 + LIVENESS;
    assert_eq!(
        due_at(&sent, &seen(3, t0), 2, DEADLINE, Some(t0), lapsed),
        Due::Closes(Close::AllIn)
    );
}

#[test]
fn too_few_updates_wait_for_the_deadline_even_when_everyone_sent() {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    assert_eq!(
        due_at(&[p(0)], &seen(1, t0), 2, DEADLINE, Some(t0), now),
        Due::No {
            wake_at: Some(t0 + DEADLINE)
        }
    );
    let late = t0 + DEADLINE;
    assert_eq!(
        due_at(&[p(0)], &seen(1, late), 2, DEADLINE, Some(t0), late),
        Due::Closes(Close::Deadline)
    );
}

#[test]
fn the_deadline_closes_a_round_a_live_peer_never_sent_to() {
    let t0 = Instant::now();
    let late = t0 + DEADLINE;
    let sent = [p(0), p(1)];
    // p2 heartbeats (seen at the deadline) but never sends.
    assert_eq!(
        due_at(&sent, &seen(3, late), 2, DEADLINE, Some(t0), late),
        Due::Closes(Close::Deadline)
    );
    // Just before the deadline the round waits for it, waking at the deadline.
    let before = late - Duration::from_millis(1);
    assert_eq!(
        due_at(&sent, &seen(3, before), 2, DEADLINE, Some(t0), before),
        Due::No {
            wake_at: Some(late)
        }
    );
}

#[test]
fn the_earliest_lapse_or_the_deadline_is_when_to_look_again() {
    // Later than now, so that the instants before it exist on any clock.
    let t0 = Instant::now() + Duration::from_secs(60);
    let last_seen = [
        (p(0), t0),
        (p(1), t0 - Duration::from_secs(10)),
        (p(2), t0 - Duration::from_secs(6)),
    ];
    let now = t0 + Duration::from_secs(1);
    // p1 sent; of those that did not, p2 lapses first (at t0 + 9 s).
    assert_eq!(
        due_at(&[p(1)], &last_seen, 1, DEADLINE, Some(t0), now),
        Due::No {
            wake_at: Some(t0 + Duration::from_secs(9))
        }
    );
    let short = Duration::from_secs(3);
    assert_eq!(
        due_at(&[p(1)], &last_seen, 1, short, Some(t0), now),
        Due::No {
            wake_at: Some(t0 + short)
        }
    );
}

#[test]
fn a_peer_that_never_lapses_is_waited_for_until_the_deadline() {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let observed = Observed {
        submitted: &[p(0)],
        last_seen: &seen(2, t0),
        predicted: &[],
        first_at: Some(t0),
    };
    let never_lapses = Rules {
        liveness: Duration::MAX,
        ..rules(1, DEADLINE)
    };
    let forever = due(&observed, &never_lapses, now);
    assert_eq!(
        forever,
        Due::No {
            wake_at: Some(t0 + DEADLINE)
        }
    );
}

/// Four live peers, three of which sent; the fourth is expected `fourth` after the
/// round's first update.
fn three_of_four(fourth: Option<Duration>, now_after: Duration) -> Due {
    let t0 = Instant::now();
    let now = t0 + now_after;
    let predicted: Vec<(PeerId, Duration)> = fourth.map(|d| (p(3), d)).into_iter().collect();
    let observed = Observed {
        submitted: &[p(0), p(1), p(2)],
        last_seen: &seen(4, now),
        predicted: &predicted,
        first_at: Some(t0),
    };
    due(&observed, &rules(1, DEADLINE), now)
}

#[test]
fn a_quorum_closes_the_round_early_when_the_missing_peer_would_miss_the_deadline() {
    let second = Duration::from_secs(1);
    assert_eq!(
        three_of_four(Some(DEADLINE * 3), second),
        Due::Closes(Close::Quorum)
    );
    // Expected in time, or never measured: the round waits for it.
    assert!(matches!(
        three_of_four(Some(DEADLINE / 2), second),
        Due::No { .. }
    ));
    assert!(matches!(three_of_four(None, second), Due::No { .. }));
}

#[test]
fn below_the_quorum_the_round_waits_even_for_peers_predicted_late() {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let late = DEADLINE * 3;
    let observed = Observed {
        submitted: &[p(0)],
        last_seen: &seen(3, now),
        predicted: &[(p(1), late), (p(2), late)],
        first_at: Some(t0),
    };
    assert!(matches!(
        due(&observed, &rules(1, DEADLINE), now),
        Due::No { .. }
    ));
}
