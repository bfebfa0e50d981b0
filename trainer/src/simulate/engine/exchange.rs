//! The exchange's side of a round: checking updates, closing, publishing the results.

use std::time::Duration;

use super::{Event, PeerId, Round, Sim, Transfer};
use crate::exchange::pacing::{self, Close, Pace};
use crate::simulate::{Closing, Download, Payloads};

impl Sim<'_> {
    pub(super) fn validate(&mut self, peer: PeerId, round: Round) {
        self.busy_until = self.busy_until.max(self.now) + self.check_s;
        let delay = self.busy_until - self.now;
        self.at(delay, Event::Validated { peer, round });
    }

    pub(super) fn validated(&mut self, peer: PeerId, round: Round) {
        if round != self.open {
            self.rounds[round as usize].lost += 1;
            self.late(peer, round);
            return;
        }
        let first_at = match self.rounds[round as usize].first_at {
            Some(t) => t,
            None => {
                // The first update starts the round's deadline.
                self.rounds[round as usize].first_at = Some(self.now);
                self.deadline = self.round_deadline();
                if self.deadline.is_finite() {
                    self.at(self.deadline, Event::Deadline { round });
                }
                self.now
            }
        };
        let offset = Duration::from_secs_f64(self.now - first_at);
        self.pacing.record(round, peer, offset);
        self.rounds[round as usize].accepted.push(peer);
        self.close_if_due();
    }

    /// The open round's deadline after its first update.
    fn round_deadline(&self) -> f64 {
        match self.s.closing {
            Closing::AllIn => f64::INFINITY,
            Closing::Fixed { deadline_s } => deadline_s,
            Closing::Adaptive {
                floor_s, ceiling_s, ..
            } => (self.pacing)
                .deadline(
                    self.open,
                    Duration::from_secs_f64(floor_s),
                    Duration::from_secs_f64(ceiling_s),
                )
                .as_secs_f64(),
        }
    }

    /// Times an update that missed its round, as the exchange does.
    pub(super) fn late(&mut self, peer: PeerId, round: Round) {
        if let Some(first_at) = self.rounds[round as usize].first_at {
            let offset = Duration::from_secs_f64(self.now - first_at);
            self.pacing.record(round, peer, offset);
        }
    }

    /// Closes the round if the exchange's rules ([`pacing::closes`]) say so, the expected
    /// peers that have not sent being the missing ones. (The deadline closes it by its own
    /// timer.)
    pub(super) fn close_if_due(&mut self) {
        let open = &self.rounds[self.open as usize];
        let Some(first_at) = open.first_at else {
            return;
        };
        let quorum = match self.s.closing {
            Closing::Adaptive { quorum, .. } => quorum,
            // A quorum of every peer never closes a round early.
            Closing::AllIn | Closing::Fixed { .. } => 1.0,
        };
        let pace = Pace {
            min_peers: 1,
            // No deadline (all in) is one that never passes.
            deadline: Duration::try_from_secs_f64(self.deadline).unwrap_or(Duration::MAX),
            quorum,
        };
        let missing: Vec<Option<Duration>> = (self.expected.iter())
            .filter(|p| !open.accepted.contains(p))
            .map(|&p| self.pacing.predicted(p))
            .collect();
        let elapsed = Duration::from_secs_f64(self.now - first_at);
        if let Some(close) = pacing::closes(&pace, open.accepted.len(), &missing, elapsed) {
            self.close(close);
        }
    }

    /// Closes the open round: uploads still moving are refused, the next round opens, and
    /// the results become downloadable once the exchange has applied every accepted update
    /// to its global state (and compressed the aggregate, in that mode).
    pub(super) fn close(&mut self, by: Close) {
        let round = self.open;
        self.rounds[round as usize].closed_by = Some(by);
        let cancelled = self
            .transfers
            .cancel(|t| matches!(t, Transfer::Upload { round: r, .. } if *r == round));
        for (t, unsent) in cancelled {
            self.count(t, -unsent);
            self.rounds[round as usize].lost += 1;
            if let Transfer::Upload { peer, .. } = t {
                self.late(peer, round);
                self.phase_done(peer, |b, d| b.upload += d);
                self.await_results(peer, round);
            }
        }
        let applied = self
            .aggregate_set(&self.rounds[round as usize].accepted)
            .len();
        let apply = self.apply_s * applied as f64;
        self.rounds[round as usize].closed_at = Some(self.now);
        self.open += 1;
        self.expected = self.members.clone();
        match (self.s.download, self.s.payloads) {
            (Download::Aggregate, Payloads::Storage) => {
                let put = Transfer::PutAggregate { round };
                self.at(apply + self.aggregate_s, Event::Begin(put));
            }
            (Download::Aggregate, Payloads::Exchange) => {
                self.at(apply + self.aggregate_s, Event::ResultsReady { round });
            }
            _ => self.at(apply, Event::ResultsReady { round }),
        }
    }

    pub(super) fn await_results(&mut self, peer: PeerId, round: Round) {
        if self.ready.is_some_and(|r| r >= round) {
            self.download(peer, round);
        } else {
            self.waiting.insert((round, peer));
        }
    }

    pub(super) fn results_ready(&mut self, round: Round) {
        self.ready = Some(round);
        let record = &mut self.rounds[round as usize];
        if let Some(closed_at) = record.closed_at {
            record.publish_s = self.now - closed_at;
        }
        let due: Vec<(Round, PeerId)> = self
            .waiting
            .range(..=(round, PeerId::MAX))
            .copied()
            .collect();
        for (r, peer) in due {
            self.waiting.remove(&(r, peer));
            if self.peers[peer].online {
                self.download(peer, r);
            }
        }
    }

    /// The accepted updates that enter the outer step: the first G in gather mode.
    pub(super) fn aggregate_set<'s>(&self, accepted: &'s [PeerId]) -> &'s [PeerId] {
        match self.s.download {
            Download::Gather(g) => &accepted[..accepted.len().min(g as usize)],
            Download::All | Download::Aggregate => accepted,
        }
    }

    /// How many updates `peer` downloads from `round`'s results.
    pub(super) fn updates_to_fetch(&self, peer: PeerId, round: Round) -> u32 {
        let set = self.aggregate_set(&self.rounds[round as usize].accepted);
        match self.s.download {
            Download::Aggregate => u32::from(!set.is_empty()),
            Download::All | Download::Gather(_) => {
                (set.len() - usize::from(set.contains(&peer))) as u32
            }
        }
    }
}
