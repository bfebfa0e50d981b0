//! Homes losing power: the cut, the exchange noticing, the return.

use rand::{Rng, rngs::StdRng};

use super::{Breakdown, Event, PeerId, Sim, Transfer};

/// An exponentially distributed wait with the given mean.
fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

impl Sim<'_> {
    pub(super) fn schedule_cut(&mut self, peer: PeerId) {
        if let Some(cuts) = self.peers[peer].power_cuts {
            let wait = exponential(&mut self.rng, 3600.0 / cuts.per_hour);
            let epoch = self.peers[peer].epoch;
            self.at(wait, Event::PowerCut { peer, epoch });
        }
    }

    /// The peer's work in flight is lost; the exchange notices at the heartbeat timeout.
    pub(super) fn power_cut(&mut self, peer: PeerId) {
        let now = self.now;
        let p = &mut self.peers[peer];
        p.online = false;
        p.epoch += 1;
        let (epoch, round, started) = (p.epoch, p.round, p.started);
        // The round's work is lost: its time counts as online, none of it as compute.
        self.totals.online += now - started;
        p.spent = Breakdown::default();
        let cancelled = self.transfers.cancel(|t| match *t {
            Transfer::Upload { peer: q, .. }
            | Transfer::Download { peer: q, .. }
            | Transfer::State { peer: q, .. } => q == peer,
            _ => false,
        });
        for (t, unsent) in cancelled {
            self.count(t, -unsent);
        }
        let r = &mut self.rounds[round as usize];
        if round == self.open && !r.accepted.contains(&peer) {
            r.lost += 1;
        }
        self.waiting.retain(|&(_, q)| q != peer);
        self.at(self.s.heartbeat_timeout_s, Event::Noticed { peer, epoch });
        let mean = self.peers[peer].power_cuts.map_or(0.0, |c| c.mean_s);
        let back = exponential(&mut self.rng, mean);
        self.at(back, Event::PowerBack { peer });
    }

    /// Back online: fetch the model state, then join the open round.
    pub(super) fn power_back(&mut self, peer: PeerId) {
        let now = self.now;
        let p = &mut self.peers[peer];
        // A new epoch: the heartbeat timeout of the cut no longer applies.
        p.epoch += 1;
        p.online = true;
        p.started = now;
        p.phase_since = now;
        let epoch = p.epoch;
        let rtt = p.link.rtt_s;
        self.schedule_cut(peer);
        let round = self.open;
        self.at(rtt, Event::Begin(Transfer::State { peer, epoch, round }));
    }
}
