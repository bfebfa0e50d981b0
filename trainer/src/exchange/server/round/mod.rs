//! The open round as a state machine: [`RoundState::Open`] until its first update,
//! [`RoundState::Collecting`] while updates arrive, [`RoundState::Closing`] while its
//! result is applied to the global state; then the next round opens.
//!
//! Whether a round is due to close is the pure function [`due`] (its deadline and early
//! close paced by [`crate::exchange::pacing`]); one task per exchange ([`close_rounds`])
//! sleeps until the round is due or something happens, and closes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::Instrument;

mod keep;

use super::payloads::Stored;
use super::{Exchange, Failure, PeerId, Settings, Shared, mean, persist, proto, validation_loss};
use crate::exchange::pacing::{self, Close, Pace};
use crate::outer::{Download, Round, Step, gathered};
use crate::run::RunConfig;

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
    /// Now, for this reason.
    Closes(Close),
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
    pub pace: Pace,
}

/// Whether a round is due to close at `now`.
///
/// The live peers that have not sent are the ones missing; [`pacing::closes`] decides
/// (all in, at the deadline after the first update, or early at the quorum). Until then
/// the round is looked at again when the deadline passes or the first live peer that has
/// not sent lapses, whichever is earlier, and whenever an update arrives.
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
    let missing: Vec<Option<Duration>> = (waiting.iter())
        .map(|(p, _)| o.predicted.iter().find(|(q, _)| q == p).map(|(_, t)| *t))
        .collect();
    let elapsed = now.saturating_duration_since(first_at);
    if let Some(close) = pacing::closes(&rules.pace, o.submitted.len(), &missing, elapsed) {
        return Due::Closes(close);
    }
    Due::No {
        wake_at: (waiting.into_iter().filter_map(|(_, lapse)| lapse))
            .chain(first_at.checked_add(rules.pace.deadline))
            .min(),
    }
}

/// A round taken out of collection, to be applied.
pub(super) struct ClosingRound {
    round: Round,
    entries: Vec<(PeerId, f32, Arc<Vec<u8>>)>,
    /// The accepted updates the round's step does not take.
    left_out: BTreeSet<PeerId>,
    scoring: ForScoring,
    train_loss: f32,
    paced: Paced,
    /// The settings in force when the round closed: its result is applied with them.
    settings: Settings,
    /// Where the run stood before this round: what its checkpoint reports.
    so_far: persist::SoFar,
}

/// A round's step taken on the global state.
struct Advanced {
    /// The state after it, as peers fetch it.
    state_bytes: Vec<u8>,
    validation_loss: f32,
    /// The step as one object, under [`Download::Aggregate`].
    aggregate: Option<Vec<u8>>,
}

/// How a round came to close.
#[derive(Clone, Copy, Debug)]
struct Paced {
    closed_by: Close,
    first_at: Option<Instant>,
    /// From the round's first update to its close.
    waited: Duration,
    /// The deadline the round had.
    deadline: Duration,
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

/// A closed round's updates and what its step took of them.
struct Taken<'a> {
    entries: &'a [(PeerId, f32, Arc<Vec<u8>>)],
    left_out: &'a BTreeSet<PeerId>,
    aggregate: Option<&'a [u8]>,
}

/// What `GetRunState` reports of a closed round.
fn summarize(
    round: Round,
    taken: Taken<'_>,
    train_loss: f32,
    validation_loss: f32,
    paced: &Paced,
) -> proto::RoundSummary {
    let Taken {
        entries,
        left_out,
        aggregate,
    } = taken;
    let download_bytes = match aggregate {
        Some(a) => a.len() as u64,
        None => in_step(entries, left_out)
            .map(|(_, _, b)| b.len() as u64)
            .sum(),
    };
    proto::RoundSummary {
        round: round.0,
        contributors: entries.iter().map(|(p, _, _)| p.to_string()).collect(),
        train_loss,
        validation_loss,
        bytes: entries.iter().map(|(_, _, b)| b.len() as u64).sum(),
        closed_at_deadline: paced.closed_by == Close::Deadline,
        closed_by: paced.closed_by.as_str().to_owned(),
        waited_seconds: paced.waited.as_secs_f64(),
        deadline_seconds: paced.deadline.as_secs_f64(),
        download_bytes,
    }
}

/// A closed round, kept for fetching: every update with its peer and weight, and the
/// step the round made of them.
pub(super) struct Closed {
    pub round: Round,
    pub entries: Vec<(PeerId, f32, Arc<Vec<u8>>)>,
    /// The accepted updates the step does not take (beyond the gather limit).
    pub left_out: BTreeSet<PeerId>,
    /// The step as one object, under [`Download::Aggregate`].
    pub aggregate: Option<Arc<Vec<u8>>>,
    /// Its payloads' digests, when they are in object storage.
    pub stored: Option<Stored>,
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
                let round_span = exchange.state().round_span.clone();
                let span = tracing::info_span!(parent: &round_span, "close_round",
                    round = closing.round.0, updates = closing.entries.len(),
                    closed_by = closing.paced.closed_by.as_str());
                if let Err(failure) = exchange.close(closing).instrument(span).await {
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

impl Closed {
    /// The updates the round's step takes, with their weights, in peer order.
    pub(super) fn in_step(&self) -> impl Iterator<Item = &(PeerId, f32, Arc<Vec<u8>>)> {
        in_step(&self.entries, &self.left_out)
    }

    /// The bytes of payload it holds: its updates and its aggregate.
    fn payload_bytes(&self) -> u64 {
        let entries: usize = self.entries.iter().map(|(_, _, b)| b.len()).sum();
        (entries + self.aggregate.as_ref().map_or(0, |a| a.len())) as u64
    }
}

fn in_step<'a>(
    entries: &'a [(PeerId, f32, Arc<Vec<u8>>)],
    left_out: &'a BTreeSet<PeerId>,
) -> impl Iterator<Item = &'a (PeerId, f32, Arc<Vec<u8>>)> {
    entries.iter().filter(|(p, _, _)| !left_out.contains(p))
}

/// Of a closing round's accepted updates, those its step leaves out: under
/// [`Download::Gather`], all but the `gather` it takes (see [`gathered`]).
fn left_out(
    config: &RunConfig,
    round: Round,
    entries: &[(PeerId, f32, Arc<Vec<u8>>)],
) -> BTreeSet<PeerId> {
    if config.download != Download::Gather {
        return BTreeSet::new();
    }
    let weighted: Vec<(PeerId, f32)> = entries.iter().map(|(p, w, _)| (*p, *w)).collect();
    let taken = gathered(&weighted, config.gather, config.seed ^ u64::from(round.0));
    (weighted.into_iter().map(|(p, _)| p))
        .filter(|p| !taken.contains(p))
        .collect()
}

/// Tokens a closed round trained on: the inner steps of every peer its step takes.
fn round_tokens<'a>(
    config: &RunConfig,
    entries: impl Iterator<Item = &'a (PeerId, f32, Arc<Vec<u8>>)>,
) -> u64 {
    let contributing = entries.filter(|(_, w, _)| *w > 0.0).count() as u64;
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

    /// Takes the open round out of collection to be applied: its updates, what scoring
    /// needs of it, and where the run stood before it.
    fn take_round(&mut self, config: &RunConfig, paced: Paced, settings: Settings) -> ClosingRound {
        let state = self;
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
        let entries: Vec<_> = submissions
            .into_iter()
            .map(|(p, s)| (p, state.weights.get(&p).copied().unwrap_or(1.0), s.bytes))
            .collect();
        let left_out = left_out(config, round, &entries);
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
        ClosingRound {
            round,
            entries,
            left_out,
            scoring,
            train_loss,
            paced,
            settings,
            so_far,
        }
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
        let pace = Pace {
            min_peers: settings.min_peers,
            deadline: (state.pacing).deadline(
                state.open.0,
                settings.deadline_floor(),
                settings.deadline(),
            ),
            quorum: settings.round_quorum,
        };
        let rules = Rules {
            liveness: opts.liveness,
            pace,
        };
        let closed_by = match state.due(&rules, first_at, now) {
            Due::No { wake_at } => return Err(wake_at),
            Due::Closes(close) => close,
        };
        let paced = Paced {
            closed_by,
            first_at,
            waited: first_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
            deadline: pace.deadline,
        };
        Ok(state.take_round(&self.shared.run.config, paced, settings))
    }

    /// Applies a closing round to the global state, then opens the next round.
    async fn close(&self, closing: ClosingRound) -> Result<(), Failure> {
        let ClosingRound {
            round,
            entries,
            left_out,
            scoring,
            train_loss,
            paced,
            settings,
            so_far,
        } = closing;
        let this = self.clone();
        let step: Vec<_> = in_step(&entries, &left_out).cloned().collect();
        let span = tracing::Span::current();
        let applied = tokio::task::spawn_blocking(move || {
            span.in_scope(|| this.advance(round, &step, train_loss, settings, so_far))
        })
        .await
        .unwrap_or_else(|e| Err(format!("advancing the global state panicked: {e}")));
        let Advanced {
            state_bytes,
            validation_loss,
            aggregate,
        } = applied.map_err(|message| Failure { round, message })?;
        let taken = Taken {
            entries: &entries,
            left_out: &left_out,
            aggregate: aggregate.as_deref(),
        };
        let summary = summarize(round, taken, train_loss, validation_loss, &paced);
        tracing::info!(
            round = round.0,
            updates = entries.len(),
            contributors = ?summary.contributors,
            bytes = summary.bytes,
            download_bytes = summary.download_bytes,
            left_out = left_out.len(),
            train_loss,
            validation_loss,
            closed_by = summary.closed_by,
            waited_s = summary.waited_seconds,
            deadline_s = summary.deadline_seconds,
            "round closed"
        );
        let rounds = Round(settings.rounds);
        let stored = self
            .store_round(round, &entries, aggregate.as_deref())
            .await;
        self.open_next(
            Closed {
                round,
                entries,
                left_out,
                aggregate: aggregate.map(Arc::new),
                stored,
                rounds,
                scoring,
                closed_at: Instant::now(),
                first_at: paced.first_at,
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
        let mut forgotten = vec![];
        {
            let mut state = self.state();
            state.tokens += round_tokens(config, closed.in_step());
            state.closed.push_back(closed);
            let payloads: Vec<u64> = state.closed.iter().map(Closed::payload_bytes).collect();
            let keep = keep::rounds_to_keep(
                &payloads,
                self.shared.opts.keep_rounds,
                state_bytes.len() as u64,
            );
            while state.closed.len() > keep {
                forgotten.extend(state.closed.pop_front().map(|c| c.round));
            }
            state.summaries.push_back(summary);
            while state.summaries.len() > SUMMARIES {
                state.summaries.pop_front();
            }
            state.state_bytes = Arc::new(state_bytes);
            state.open = next;
            // Ends the closed round's span.
            state.round_span = super::round_span(&self.shared.opts.run_name, next);
            state.round_state = RoundState::Open;
        }
        self.shared.open_tx.send_replace(next);
        self.forget_rounds(forgotten);
    }

    /// Takes a closed round's step (`entries`: the updates it takes) on the global state,
    /// persists it, writes a checkpoint when due, and returns the new state.
    fn advance(
        &self,
        round: Round,
        entries: &[(PeerId, f32, Arc<Vec<u8>>)],
        train_loss: f32,
        settings: Settings,
        mut so_far: persist::SoFar,
    ) -> Result<Advanced, String> {
        let shared = &self.shared;
        let mut global = shared.global.lock().unwrap_or_else(|p| p.into_inner());
        let g = &mut *global;
        if let Some(inner) = g.inner.as_mut() {
            inner.set_schedule(shared.run.config.schedule(Round(settings.rounds)));
        }
        let updates: Vec<(&[u8], f32)> =
            entries.iter().map(|(_, w, b)| (b.as_slice(), *w)).collect();
        let aggregate = match g.aggregator.as_mut() {
            Some(a) => a.aggregate(&g.model, &updates).map_err(|e| e.to_string())?,
            None => None,
        };
        let step = Step::of(aggregate.as_deref(), &updates);
        let lr = shared.run.config.outer_lr;
        (g.outer)
            .apply_step(&g.model, g.inner.as_mut(), step, lr)
            .map_err(|e| e.to_string())?;
        let next = round.next();
        let bytes = g.outer.export(&g.model, next).map_err(|e| e.to_string())?;
        if let Some(store) = &self.store() {
            persist::save_state(store, &bytes)?;
            if let Some(a) = &g.aggregator {
                persist::save_residual(store, a.export(&g.model))?;
            }
        }
        let validation_loss = validation_loss(&g.model, &g.validation);
        let contributors: Vec<PeerId> = entries.iter().map(|(p, _, _)| *p).collect();
        so_far.tokens += round_tokens(&shared.run.config, entries.iter());
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
        Ok(Advanced {
            state_bytes: bytes,
            validation_loss,
            aggregate,
        })
    }
}

#[cfg(test)]
mod tests;
