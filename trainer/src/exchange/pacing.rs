//! How long a round waits for its peers.
//!
//! A fixed deadline is either too short for the slow links of a federation (their
//! updates are lost every round) or too long for its fast ones (everyone waits on a peer
//! that lost power). So the deadline follows the run: it is 1.5 × the 90th percentile of
//! how long after a round's first update the peers' updates arrived over the last
//! [`HISTORY_ROUNDS`] rounds (late ones included), within a floor and the run's ceiling.
//! And a round closes early once a quorum of the live peers has sent and every peer
//! still missing is predicted, from its own recent rounds, to miss the deadline anyway:
//! waiting for it would cost everyone time and gain nothing.
//!
//! The exchange and the simulator (`crate::simulate`) both pace rounds with this module.

use std::collections::VecDeque;
use std::time::Duration;

/// Rounds of submission times the deadline is computed from.
pub const HISTORY_ROUNDS: usize = 8;
/// Which percentile of the recent submission times the deadline covers…
pub const DEADLINE_PERCENTILE: f64 = 0.9;
/// …and with what margin.
pub const DEADLINE_MARGIN: f64 = 1.5;

/// When recent rounds' updates arrived, as offsets from each round's first update.
#[derive(Clone, Debug)]
pub struct History<P> {
    rounds: VecDeque<(u32, Vec<(P, Duration)>)>,
}

impl<P> Default for History<P> {
    fn default() -> Self {
        Self {
            rounds: VecDeque::new(),
        }
    }
}

impl<P: Copy + PartialEq> History<P> {
    /// Records that `peer`'s update for `round` arrived `offset` after the round's first,
    /// whether it was in time or not. Only the latest [`HISTORY_ROUNDS`] rounds are kept.
    pub fn record(&mut self, round: u32, peer: P, offset: Duration) {
        let at = self.rounds.iter().position(|(r, _)| *r >= round);
        match at {
            Some(i) if self.rounds[i].0 == round => {
                let times = &mut self.rounds[i].1;
                match times.iter_mut().find(|(p, _)| *p == peer) {
                    Some(entry) => entry.1 = entry.1.max(offset),
                    None => times.push((peer, offset)),
                }
            }
            Some(i) => self.rounds.insert(i, (round, vec![(peer, offset)])),
            None => self.rounds.push_back((round, vec![(peer, offset)])),
        }
        while self.rounds.len() > HISTORY_ROUNDS {
            self.rounds.pop_front();
        }
    }

    /// The deadline of `round`: the submission times of the recent rounds before it,
    /// their 90th percentile × 1.5, within `floor` and `ceiling`; the ceiling while no
    /// round before it was timed (and when the floor is above it).
    pub fn deadline(&self, round: u32, floor: Duration, ceiling: Duration) -> Duration {
        let mut times: Vec<Duration> = (self.rounds.iter())
            .filter(|(r, _)| *r < round)
            .flat_map(|(_, times)| times.iter().map(|(_, t)| *t))
            .collect();
        if times.is_empty() {
            return ceiling;
        }
        times.sort_unstable();
        let p = percentile(&times, DEADLINE_PERCENTILE);
        p.mul_f64(DEADLINE_MARGIN)
            .clamp(floor.min(ceiling), ceiling)
    }

    /// When `peer`'s update is expected after a round's first: the median of its recent
    /// rounds, or `None` when it has none.
    pub fn predicted(&self, peer: P) -> Option<Duration> {
        let mut own: Vec<Duration> = (self.rounds.iter())
            .flat_map(|(_, times)| times.iter())
            .filter(|(p, _)| *p == peer)
            .map(|(_, t)| *t)
            .collect();
        own.sort_unstable();
        (!own.is_empty()).then(|| percentile(&own, 0.5))
    }
}

/// The nearest-rank percentile of sorted, non-empty `times`.
fn percentile(times: &[Duration], q: f64) -> Duration {
    let rank = (q * times.len() as f64).ceil() as usize;
    times[rank.clamp(1, times.len()) - 1]
}

/// Whether a round can close before its deadline: at least `quorum` (a fraction) of the
/// live peers have sent, and each live peer still missing is predicted to arrive after
/// the deadline (`predicted`: its expected offset; `None`, no history, counts as on
/// time).
pub fn stragglers_miss(
    sent: usize,
    missing: &[Option<Duration>],
    quorum: f64,
    deadline: Duration,
) -> bool {
    let live = sent + missing.len();
    !missing.is_empty()
        && sent as f64 >= quorum * live as f64
        && missing.iter().all(|p| p.is_some_and(|p| p > deadline))
}

/// How a round closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Every live peer sent (and at least the minimum did).
    AllIn,
    /// Early: a quorum sent, and every live peer still missing is predicted to miss the
    /// deadline.
    Quorum,
    /// The deadline passed first.
    Deadline,
}

impl Close {
    /// As `RoundSummary.closed_by` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Close::AllIn => "all-in",
            Close::Quorum => "quorum",
            Close::Deadline => "deadline",
        }
    }
}

/// The rules a round closes by.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Updates a round needs before it closes other than at its deadline.
    pub min_peers: u32,
    /// The round's deadline after its first update.
    pub deadline: Duration,
    /// The fraction of live peers that may close the round early; 1 never does.
    pub quorum: f64,
}

/// Whether a round whose first update came `elapsed` ago closes now, with `sent` updates
/// in and `missing` holding the predicted arrival of each live peer still to send: all in,
/// at the deadline, or early at the quorum ([`stragglers_miss`]).
pub fn closes(
    pace: &Pace,
    sent: usize,
    missing: &[Option<Duration>],
    elapsed: Duration,
) -> Option<Close> {
    let enough = sent >= pace.min_peers as usize;
    if missing.is_empty() && enough {
        return Some(Close::AllIn);
    }
    if elapsed >= pace.deadline {
        return Some(Close::Deadline);
    }
    (enough && stragglers_miss(sent, missing, pace.quorum, pace.deadline)).then_some(Close::Quorum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn with_no_history_the_deadline_is_the_ceiling() {
        let mut h = History::<u32>::default();
        assert_eq!(h.deadline(0, s(10), s(300)), s(300));
        // The round's own arrivals do not shorten its deadline.
        h.record(0, 1, s(0));
        assert_eq!(h.deadline(0, s(10), s(300)), s(300));
        assert_eq!(h.deadline(1, s(10), s(300)), s(10));
    }

    #[test]
    fn the_deadline_covers_the_90th_percentile_with_half_again_as_margin() {
        let mut h = History::default();
        // Ten peers arriving 1..=10 s after each round's first update.
        for round in 0..3 {
            for peer in 1..=10u32 {
                h.record(round, peer, s(u64::from(peer)));
            }
        }
        // p90 = 9 s → 13.5 s.
        assert_eq!(h.deadline(99, s(1), s(300)), Duration::from_millis(13_500));
        // Within the floor and the ceiling, and never above the ceiling.
        assert_eq!(h.deadline(99, s(20), s(300)), s(20));
        assert_eq!(h.deadline(99, s(1), s(12)), s(12));
        assert_eq!(h.deadline(99, s(60), s(30)), s(30));
    }

    #[test]
    fn a_peer_that_is_always_late_pulls_the_deadline_only_past_the_90th_percentile() {
        let mut h = History::default();
        for round in 0..4 {
            for peer in 0..19u32 {
                h.record(round, peer, s(2));
            }
            h.record(round, 99, s(200));
        }
        // One peer in twenty is above the 90th percentile: it does not set the deadline.
        assert_eq!(h.deadline(99, s(1), s(300)), s(3));
        assert_eq!(h.predicted(99), Some(s(200)));
        assert_eq!(h.predicted(7), Some(s(2)));
        assert_eq!(h.predicted(1234), None);
    }

    #[test]
    fn only_the_latest_rounds_count() {
        let mut h = History::default();
        h.record(0, 1u32, s(100));
        for round in 1..=HISTORY_ROUNDS as u32 {
            h.record(round, 1, s(4));
        }
        assert_eq!(h.deadline(99, s(1), s(300)), s(6));
        // A late arrival for a round still kept updates it; the later time wins.
        h.record(3, 1, s(8));
        h.record(3, 1, s(5));
        assert_eq!(h.predicted(1), Some(s(4)));
        assert_eq!(h.deadline(99, s(1), s(300)), s(12));
    }

    #[test]
    fn a_round_closes_early_only_at_quorum_and_when_every_missing_peer_would_miss() {
        let deadline = s(30);
        let late = Some(s(200));
        // 3 of 4 sent, the fourth always comes at 200 s: close now.
        assert!(stragglers_miss(3, &[late], 0.75, deadline));
        // Below the quorum: wait.
        assert!(!stragglers_miss(2, &[late, late], 0.75, deadline));
        // A missing peer predicted in time, or with no history: wait.
        assert!(!stragglers_miss(3, &[Some(s(20))], 0.75, deadline));
        assert!(!stragglers_miss(3, &[None], 0.75, deadline));
        // Nobody missing is not an early close (the round is all in).
        assert!(!stragglers_miss(4, &[], 0.75, deadline));
    }
}
