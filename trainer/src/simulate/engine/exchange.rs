//! The exchange's side of a round: checking updates, closing, publishing the results.

use super::{Event, PeerId, Round, Sim, Transfer};
use crate::simulate::{Download, Payloads};

impl Sim<'_> {
    pub(super) fn validate(&mut self, peer: PeerId, round: Round) {
        self.busy_until = self.busy_until.max(self.now) + self.check_s;
        let delay = self.busy_until - self.now;
        self.at(delay, Event::Validated { peer, round });
    }

    pub(super) fn validated(&mut self, peer: PeerId, round: Round) {
        if round != self.open {
            self.bytes[round as usize].lost += 1;
            return;
        }
        self.accepted.push(peer);
        self.close_if_complete();
    }

    pub(super) fn close_if_complete(&mut self) {
        if self.expected.iter().all(|p| self.accepted.contains(p)) {
            self.close();
        }
    }

    /// Closes the open round: uploads still moving are refused, the next round opens, and
    /// the results become downloadable once the exchange has applied every accepted update
    /// to its global state (and compressed the aggregate, in that mode).
    pub(super) fn close(&mut self) {
        let round = self.open;
        let cancelled = self
            .transfers
            .cancel(|t| matches!(t, Transfer::Upload { round: r, .. } if *r == round));
        for (t, unsent) in cancelled {
            self.count(t, round, -unsent);
            self.bytes[round as usize].lost += 1;
            if let Transfer::Upload { peer, .. } = t {
                self.phase_done(peer, |b, d| b.upload += d);
                self.await_results(peer, round);
            }
        }
        let apply = self.apply_s * self.aggregate_set(&self.accepted).len() as f64;
        self.closed.push(std::mem::take(&mut self.accepted));
        self.closes.push(self.now);
        self.open += 1;
        self.expected = self.members.clone();
        if let Some(d) = self.s.deadline_s {
            self.at(d, Event::Deadline { round: self.open });
        }
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
        if let Some(closed) = self.closes.get(round as usize) {
            self.bytes[round as usize].publish_s = self.now - closed;
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
        let set = self.aggregate_set(&self.closed[round as usize]);
        match self.s.download {
            Download::Aggregate => u32::from(!set.is_empty()),
            Download::All | Download::Gather(_) => {
                (set.len() - usize::from(set.contains(&peer))) as u32
            }
        }
    }
}
