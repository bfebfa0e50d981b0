//! The open round as a state machine: [`RoundState::Open`] until its first update,
//! [`RoundState::Collecting`] while updates arrive, [`RoundState::Closing`] while its
//! result is applied to the global state; then the next round opens.
//!
//! Whether a round is due to close is the pure function [`due`] (its deadline and early
//! close paced by [`crate::exchange::pacing`]); one task per exchange ([`close_rounds`])
//! sleeps until the round is due or something happens, and closes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Exchange, Failure, PeerId, Settings, Shared, mean, persist, proto, validation_loss};
use crate::exchange::pacing;
use crate::outer::Round;

/// Recent round summaries kept for `GetRunState`.
const SUMMARIES: usize = 64;

/// Where the open round is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RoundState {
    /// No update yet: the deadline has not started.
    Open,
    /// Updates are arriving; the deadline runs from the first.
    Collecting { first_at: Instant },
    /// The round's result is being applied; these peers' updates are in it, and no
    /// other update is taken. The bytes answer a peer's retry while the round closes.
    Closing {
        contributors: Vec<(PeerId, Arc<Vec<u8>>)>,
    },
}

impl RoundState {
    pub(super) fn accepts_updates(&self) -> bool {
        !matches!(self, RoundState::Closing { .. })
    }

    /// `peer`'s update, if it is in the round being closed.
    pub(super) fn closing_with(&self, peer: PeerId) -> Option<Arc<Vec<u8>>> {
        match self {
            RoundState::Closing { contributors } => contributors
                .iter()
                .find(|(p, _)| *p == peer)
                .map(|(_, bytes)| bytes.clone()),
            _ => None,
        }
    }
}

/// Whether the open round is due to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Not yet: look again at `wake_at`, or only when something happens if `None`.
    No { wake_at: Option<Instant> },
    /// Every live peer has sent, and at least `min_peers` have.
    AllIn,
    /// Early: a quorum has sent, and every live peer still missing is predicted to miss
    /// the deadline.
    AtQuorum,
    /// The deadline passed before the round was all in.
    AtDeadline,
}

impl Due {
    /// How the round closed, as `RoundSummary.closed_by` says it.
    fn closed_by(self) -> &'static str {
        match self {
            Due::No { .. } => "open",
            Due::AllIn => "all-in",
            Due::AtQuorum => "quorum",
            Due::AtDeadline => "deadline",
        }
    }
}

/// What the exchange knows of the open round when it decides whether to close it.
pub(super) struct Observed<'a> {
    /// The peers whose update the round holds.
    pub submitted: &'a [PeerId],
    /// Every known peer with when it last called.
    pub last_seen: &'a [(PeerId, Instant)],
    /// How long after a round's first update each peer's update is expected (peers with
    /// no recent rounds are absent).
    pub predicted: &'a [(PeerId, Duration)],
    /// When the round's first update arrived (`None`: it has none).
    pub first_at: Option<Instant>,
}

/// The rules a round closes by.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rules {
    /// A peer counts as live for this long after it last called.
    pub liveness: Duration,
    pub min_peers: u32,
    /// This round's deadline, after its first update.
    pub deadline: Duration,
    /// The fraction of live peers that may close the round early.
    pub quorum: f64,
}

/// Whether a round is due to close at `now`.
///
/// It closes when every live peer has sent and at least `min_peers` have (all in), at
/// its deadline after the first update, or before that at the quorum when the live peers
/// still missing are all predicted to miss the deadline. Until then it is looked at
/// again when the deadline passes or the first live peer that has not sent lapses,
/// whichever is earlier, and whenever an update arrives.
pub(super) fn due(o: &Observed, rules: &Rules, now: Instant) -> Due {
    let Some(first_at) = o.first_at else {
        return Due::No { wake_at: None };
    };
    // Each live peer that has not sent, with when it lapses (`None`: never, in practice).
    let waiting: Vec<(PeerId, Option<Instant>)> = (o.last_seen.iter())
        .filter(|(p, seen)| {
            now.saturating_duration_since(*seen) < rules.liveness && !o.submitted.contains(p)
        })
        .map(|(p, seen)| (*p, seen.checked_add(rules.liveness)))
        .collect();
    let enough = o.submitted.len() >= rules.min_peers as usize;
    if waiting.is_empty() && enough {
        return Due::AllIn;
    }
    let closes_at = first_at.checked_add(rules.deadline);
    if closes_at.is_some_and(|at| now >= at) {
        return Due::AtDeadline;
    }
    let missing: Vec<Option<Duration>> = (waiting.iter())
        .map(|(p, _)| o.predicted.iter().find(|(q, _)| q == p).map(|(_, t)| *t))
        .collect();
    if enough && pacing::stragglers_miss(o.submitted.len(), &missing, rules.quorum, rules.deadline)
    {
        return Due::AtQuorum;
    }
    Due::No {
        wake_at: (waiting.into_iter().filter_map(|(_, lapse)| lapse))
            .chain(closes_at)
            .min(),
    }
}

/// A round taken out of collection, to be applied.
pub(super) struct ClosingRound {
    round: Round,
    entries: Vec<(PeerId, f32, Arc<Vec<u8>>)>,
    scoring: ForScoring,
    train_loss: f32,
    closed_by: Due,
    first_at: Option<Instant>,
    /// From the round's first update to its close.
    waited: Duration,
    /// The deadline the round had.
    deadline: Duration,
    /// The settings in force when the round closed: its result is applied with them.
    settings: Settings,
    /// Where the run stood before this round: what its checkpoint reports.
    so_far: persist::SoFar,
}

/// One peer's update for the open round.
pub(super) struct Submission {
    pub bytes: Arc<Vec<u8>>,
    pub train_loss: f32,
    /// The peer's θ at the probe positions.
    pub probe: Vec<f32>,
}

/// What evaluators get of a closed round beyond its updates.
#[derive(Default)]
pub(super) struct ForScoring {
    /// Every peer known when the round closed.
    pub roster: Vec<PeerId>,
    pub probes: BTreeMap<PeerId, Vec<f32>>,
}

/// A closed round, kept for fetching: every update with its peer and weight.
pub(super) struct Closed {
    pub round: Round,
    pub entries: Vec<(PeerId, f32, Arc<Vec<u8>>)>,
    /// The run's length when the round closed.
    pub rounds: Round,
    pub scoring: ForScoring,
    pub closed_at: Instant,
    /// When its first update arrived: late updates are timed from it.
    pub first_at: Option<Instant>,
}

/// Closes rounds as they fall due, until the exchange is dropped or a round's result
/// cannot be applied (recorded in `failed`, which stops `serve`).
pub(super) async fn close_rounds(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let exchange = Exchange { shared };
        let wake_at = match exchange.start_closing(Instant::now()) {
            Ok(closing) => {
                if let Err(failure) = exchange.close(closing).await {
                    tracing::error!(round = failure.round.0, error = %failure.message,
                        "could not advance the global state");
                    exchange.shared.failed.send_replace(Some(failure));
                    return;
                }
                continue;
            }
            Err(wake_at) => wake_at,
        };
        // Hold no reference while asleep: dropping the exchange must end this task.
        drop(exchange);
        match wake_at {
            Some(at) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Tokens a closed round trained on: every contributing peer's inner steps.
fn round_tokens(config: &crate::run::RunConfig, entries: &[(PeerId, f32, Arc<Vec<u8>>)]) -> u64 {
    let contributing = entries.iter().filter(|(_, w, _)| *w > 0.0).count() as u64;
    contributing
        * u64::from(config.steps_per_round())
        * u64::from(config.batch)
        * u64::from(config.sequence_length)
}

impl super::State {
    /// Times an update that came after its round closed, so that the pacing knows how
    /// late this peer runs (rounds no longer kept are not timed).
    pub(super) fn record_late(&mut self, peer: PeerId, round: Round) {
        let first_at = match &self.round_state {
            RoundState::Collecting { first_at } if self.open == round => Some(*first_at),
            _ => (self.closed.iter())
                .find(|c| c.round == round)
                .and_then(|c| c.first_at),
        };
        if let Some(first_at) = first_at {
            self.pacing.record(round.0, peer, first_at.elapsed());
        }
    }

    /// [`due`] on what the exchange knows of the open round.
    fn due(&self, rules: &Rules, first_at: Option<Instant>, now: Instant) -> Due {
        let submitted: Vec<PeerId> = self.submissions.keys().copied().collect();
        let last_seen: Vec<(PeerId, Instant)> =
            self.peers.iter().map(|(p, r)| (*p, r.last_seen)).collect();
        let predicted: Vec<(PeerId, Duration)> = (self.peers.keys())
            .filter_map(|&p| Some((p, self.pacing.predicted(p)?)))
            .collect();
        let observed = Observed {
            submitted: &submitted,
            last_seen: &last_seen,
            predicted: &predicted,
            first_at,
        };
        due(&observed, rules, now)
    }
}

impl Exchange {
    /// Moves the open round to [`RoundState::Closing`] if it is due at `now`, taking its
    /// updates; otherwise says when to look again.
    fn start_closing(&self, now: Instant) -> Result<ClosingRound, Option<Instant>> {
        let opts = &self.shared.opts;
        let mut state = self.state();
        let Some(settings) = state.settings else {
            return Err(None);
        };
        let first_at = match state.round_state {
            RoundState::Open => None,
            RoundState::Collecting { first_at } => Some(first_at),
            RoundState::Closing { .. } => return Err(None),
        };
        let rules = Rules {
            liveness: opts.liveness,
            min_peers: settings.min_peers,
            deadline: (state.pacing).deadline(
                state.open.0,
                settings.deadline_floor(),
                settings.deadline(),
            ),
            quorum: settings.round_quorum,
        };
        let closed_by = match state.due(&rules, first_at, now) {
            Due::No { wake_at } => return Err(wake_at),
            verdict => verdict,
        };
        let waited = first_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let round = state.open;
        state.round_state = RoundState::Closing {
            contributors: (state.submissions.iter())
                .map(|(p, s)| (*p, s.bytes.clone()))
                .collect(),
        };
        let mut submissions = std::mem::take(&mut state.submissions);
        let scoring = ForScoring {
            roster: state.peers.keys().copied().collect(),
            probes: (submissions.iter_mut())
                .map(|(p, s)| (*p, std::mem::take(&mut s.probe)))
                .collect(),
        };
        let train_loss = mean(
            &submissions
                .values()
                .map(|s| s.train_loss)
                .collect::<Vec<_>>(),
        );
        let entries = submissions
            .into_iter()
            .map(|(p, s)| (p, state.weights.get(&p).copied().unwrap_or(1.0), s.bytes))
            .collect();
        let so_far = persist::SoFar {
            tokens: state.tokens,
            validation: std::iter::once((0, state.initial_validation_loss))
                .chain(
                    state
                        .summaries
                        .iter()
                        .map(|s| (s.round + 1, s.validation_loss)),
                )
                .collect(),
            ledger: state.ledger.snapshot(),
        };
        Ok(ClosingRound {
            round,
            entries,
            scoring,
            train_loss,
            closed_by,
            first_at,
            waited,
            deadline: rules.deadline,
            settings,
            so_far,
        })
    }

    /// Applies a closing round to the global state, then opens the next round.
    async fn close(&self, closing: ClosingRound) -> Result<(), Failure> {
        let ClosingRound {
            round,
            entries,
            scoring,
            train_loss,
            closed_by,
            first_at,
            waited,
            deadline,
            settings,
            so_far,
        } = closing;
        let this = self.clone();
        let to_apply = entries.clone();
        let applied = tokio::task::spawn_blocking(move || {
            this.advance(round, &to_apply, train_loss, settings, so_far)
        })
        .await
        .unwrap_or_else(|e| Err(format!("advancing the global state panicked: {e}")));
        let (state_bytes, validation_loss) =
            applied.map_err(|message| Failure { round, message })?;
        let summary = proto::RoundSummary {
            round: round.0,
            contributors: entries.iter().map(|(p, _, _)| p.to_string()).collect(),
            train_loss,
            validation_loss,
            bytes: entries.iter().map(|(_, _, b)| b.len() as u64).sum(),
            closed_at_deadline: closed_by == Due::AtDeadline,
            closed_by: closed_by.closed_by().to_owned(),
            waited_seconds: waited.as_secs_f64(),
            deadline_seconds: deadline.as_secs_f64(),
        };
        tracing::info!(
            round = round.0,
            updates = entries.len(),
            contributors = ?summary.contributors,
            bytes = summary.bytes,
            train_loss,
            validation_loss,
            closed_by = summary.closed_by,
            waited_s = summary.waited_seconds,
            deadline_s = summary.deadline_seconds,
            "round closed"
        );
        let rounds = Round(settings.rounds);
        self.open_next(
            Closed {
                round,
                entries,
                rounds,
                scoring,
                closed_at: Instant::now(),
                first_at,
            },
            summary,
            state_bytes,
        );
        Ok(())
    }

    /// Records the closed round and opens the next one, waking its fetchers.
    fn open_next(&self, closed: Closed, summary: proto::RoundSummary, state_bytes: Vec<u8>) {
        let config = &self.shared.run.config;
        let next = closed.round.next();
        {
            let mut state = self.state();
            state.tokens += round_tokens(config, &closed.entries);
            state.closed.push_back(closed);
            while state.closed.len() > self.shared.opts.keep_rounds.max(1) {
                state.closed.pop_front();
            }
            state.summaries.push_back(summary);
            while state.summaries.len() > SUMMARIES {
                state.summaries.pop_front();
            }
            state.state_bytes = Arc::new(state_bytes);
            state.open = next;
            state.round_state = RoundState::Open;
        }
        self.shared.open_tx.send_replace(next);
    }

    /// Applies a closed round to the global state, persists it, writes a checkpoint when
    /// due, and returns the new state's bytes and validation loss.
    fn advance(
        &self,
        round: Round,
        entries: &[(PeerId, f32, Arc<Vec<u8>>)],
        train_loss: f32,
        settings: Settings,
        mut so_far: persist::SoFar,
    ) -> Result<(Vec<u8>, f32), String> {
        let shared = &self.shared;
        let mut global = shared.global.lock().unwrap_or_else(|p| p.into_inner());
        let g = &mut *global;
        if let Some(inner) = g.inner.as_mut() {
            inner.set_schedule(shared.run.config.schedule(Round(settings.rounds)));
        }
        let updates: Vec<(&[u8], f32)> =
            entries.iter().map(|(_, w, b)| (b.as_slice(), *w)).collect();
        g.outer
            .apply(
                &g.model,
                g.inner.as_mut(),
                &updates,
                shared.run.config.outer_lr,
            )
            .map_err(|e| e.to_string())?;
        let next = round.next();
        let bytes = g.outer.export(&g.model, next).map_err(|e| e.to_string())?;
        if let Some(dir) = &shared.opts.state_dir {
            persist::save_state(dir, &bytes)?;
        }
        let validation_loss = validation_loss(&g.model, &g.validation);
        let contributors: Vec<PeerId> = entries.iter().map(|(p, _, _)| *p).collect();
        so_far.tokens += round_tokens(&shared.run.config, entries);
        so_far.validation.push((next.0, validation_loss));
        let checkpoint = persist::Checkpoint {
            next,
            settings,
            validation_loss,
            train_loss,
            contributors: &contributors,
            so_far,
        };
        persist::write_checkpoint(shared, g, checkpoint)?;
        Ok((bytes, validation_loss))
    }
}

#[cfg(test)]
mod tests {
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
            min_peers,
            deadline,
            quorum: 0.75,
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
            Due::AllIn
        );
        // Exactly `min_peers` updates are enough.
        assert_eq!(
            due_at(&all[..2], &seen(2, t0), 2, DEADLINE, Some(t0), now),
            Due::AllIn
        );
    }

    #[test]
    fn all_in_wins_over_a_deadline_passed_at_the_same_time() {
        let t0 = Instant::now();
        let all = [p(0), p(1)];
        let late = t0 + DEADLINE;
        assert_eq!(
            due_at(&all, &seen(2, late), 2, DEADLINE, Some(t0), late),
            Due::AllIn
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
            Due::AllIn
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
            Due::AtDeadline
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
            Due::AtDeadline
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
        assert_eq!(three_of_four(Some(DEADLINE * 3), second), Due::AtQuorum);
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
}
