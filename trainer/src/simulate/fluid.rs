//! Transfers as fluid flows: every flow is capped by its own link, and flows that cross a
//! shared link (the exchange's ingress or egress) split it max-min fairly, which is what
//! many parallel TCP streams through one bottleneck converge to. Between two events every
//! rate is constant, so a flow's completion time is exact.

use super::Bandwidth;

/// The exchange's link, one direction each (links are full duplex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shared {
    /// Into the exchange: peers' uploads (or its fetches from storage).
    Ingress,
    /// Out of the exchange: peers' downloads (or its uploads to storage).
    Egress,
}

/// Rates that share `capacity` max-min fairly among flows each capped at `caps[i]`: no flow
/// can get more without taking from one that has less.
pub fn max_min_fair(caps: &[f64], capacity: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| caps[a].total_cmp(&caps[b]));
    let mut rates = vec![0.0; caps.len()];
    let mut left = capacity;
    for (served, &i) in order.iter().enumerate() {
        let share = left / (caps.len() - served) as f64;
        rates[i] = caps[i].min(share);
        left -= rates[i];
    }
    rates
}

/// One transfer in flight; `T` says what its completion means to the caller.
struct Flow<T> {
    left: f64,
    cap: f64,
    via: Option<Shared>,
    rate: f64,
    tag: T,
}

/// The flows in flight and the exchange's two link directions.
pub struct Transfers<T> {
    flows: Vec<Flow<T>>,
    ingress: Bandwidth,
    egress: Bandwidth,
}

impl<T: Clone> Transfers<T> {
    pub fn new(ingress: Bandwidth, egress: Bandwidth) -> Self {
        Self {
            flows: vec![],
            ingress,
            egress,
        }
    }

    /// Starts moving `bytes`, at most `cap` and through `via` if it crosses the exchange.
    pub fn start(&mut self, bytes: f64, cap: Bandwidth, via: Option<Shared>, tag: T) {
        self.flows.push(Flow {
            left: bytes,
            cap: cap.bytes_per_s(),
            via,
            rate: 0.0,
            tag,
        });
        self.share();
    }

    /// Removes the flows `cancel` picks; returns each one's tag and the bytes it had still
    /// to move.
    pub fn cancel(&mut self, mut cancel: impl FnMut(&T) -> bool) -> Vec<(T, f64)> {
        let mut cancelled = vec![];
        self.flows.retain(|f| {
            let keep = !cancel(&f.tag);
            if !keep {
                cancelled.push((f.tag.clone(), f.left));
            }
            keep
        });
        self.share();
        cancelled
    }

    /// Seconds until the next flow completes, if any is moving.
    pub fn next_completion(&self) -> Option<f64> {
        self.flows
            .iter()
            .filter(|f| f.rate > 0.0)
            .map(|f| f.left / f.rate)
            .min_by(f64::total_cmp)
    }

    /// Moves every flow on by `dt` seconds and returns the tags of those that completed.
    pub fn advance(&mut self, dt: f64) -> Vec<T> {
        let mut done = vec![];
        for f in &mut self.flows {
            f.left -= f.rate * dt;
            // A flow due now may keep a rounding residue of a few bytes.
            if f.left <= 1e-6 * f.rate.max(1.0) {
                f.left = 0.0;
                done.push(f.tag.clone());
            }
        }
        if !done.is_empty() {
            self.flows.retain(|f| f.left > 0.0);
            self.share();
        }
        done
    }

    /// Recomputes every rate after a flow started, ended or was cancelled.
    fn share(&mut self) {
        for (via, capacity) in [
            (None, f64::INFINITY),
            (Some(Shared::Ingress), self.ingress.bytes_per_s()),
            (Some(Shared::Egress), self.egress.bytes_per_s()),
        ] {
            let members: Vec<usize> = (0..self.flows.len())
                .filter(|&i| self.flows[i].via == via)
                .collect();
            let caps: Vec<f64> = members.iter().map(|&i| self.flows[i].cap).collect();
            let rates = if via.is_none() {
                caps
            } else {
                max_min_fair(&caps, capacity)
            };
            for (&i, rate) in members.iter().zip(rates) {
                self.flows[i].rate = rate;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_link_gives_the_slow_flows_all_they_can_take_and_splits_the_rest() {
        assert_eq!(max_min_fair(&[1.0, 5.0, 10.0], 12.0), vec![1.0, 5.0, 6.0]);
        assert_eq!(max_min_fair(&[10.0, 10.0], 12.0), vec![6.0, 6.0]);
        assert_eq!(max_min_fair(&[1.0, 2.0], 100.0), vec![1.0, 2.0]);
    }

    #[test]
    fn a_flow_speeds_up_when_the_flow_sharing_its_link_ends() {
        let mut t = Transfers::new(Bandwidth::bytes(10.0), Bandwidth::bytes(10.0));
        t.start(10.0, Bandwidth::UNLIMITED, Some(Shared::Ingress), "short");
        t.start(30.0, Bandwidth::UNLIMITED, Some(Shared::Ingress), "long");
        // 5 B/s each: the short one ends at 2 s, the long one has 20 B left at 10 B/s.
        assert_eq!(t.next_completion(), Some(2.0));
        assert_eq!(t.advance(2.0), vec!["short"]);
        assert_eq!(t.next_completion(), Some(2.0));
        assert_eq!(t.advance(2.0), vec!["long"]);
        assert_eq!(t.next_completion(), None);
    }

    #[test]
    fn flows_off_the_exchange_are_capped_by_their_own_link_only() {
        let mut t = Transfers::new(Bandwidth::bytes(1.0), Bandwidth::bytes(1.0));
        t.start(8.0, Bandwidth::bytes(4.0), None, 1);
        t.start(8.0, Bandwidth::bytes(4.0), None, 2);
        assert_eq!(t.next_completion(), Some(2.0));
        assert_eq!(t.cancel(|&tag| tag == 2), vec![(2, 8.0)]);
        assert_eq!(t.advance(2.0), vec![1]);
    }
}
