//! The simulated run summed up as a [`Row`].

use super::{RoundRecord, Sim};
use crate::exchange::pacing::Close;
use crate::simulate::Row;

impl Sim<'_> {
    pub(super) fn row(&self) -> Row {
        let s = self.s;
        // Rounds are measured from the first close to the last; their traffic and updates
        // over the rounds before the last (whose results are still being fetched).
        let closes: Vec<f64> = (self.rounds.iter()).filter_map(|r| r.closed_at).collect();
        let measured = closes.len().saturating_sub(1).max(1);
        let round_s = match closes.as_slice() {
            [] => f64::NAN,
            [only] => *only,
            [first, .., last] => (last - first) / (closes.len() - 1) as f64,
        };
        let rounds = &self.rounds[..measured];
        let per_round =
            |f: &dyn Fn(&RoundRecord) -> f64| rounds.iter().map(f).sum::<f64>() / measured as f64;
        let t = &self.totals;
        let n = f64::from(t.peer_rounds.max(1));
        let busy = t.spent.busy();
        let accepted = per_round(&|r| r.accepted.len() as f64);
        let aggregated = per_round(&|r| self.aggregate_set(&r.accepted).len() as f64);
        let downloads: f64 = rounds.iter().map(|r| f64::from(r.peer_downloads)).sum();
        Row {
            scenario: s.name.clone(),
            peers: s.peers(),
            model_params: s.params,
            payloads: s.payloads,
            download: s.download.to_string(),
            update_bytes: self.update_bytes,
            round_s,
            compute_s: t.spent.compute / n,
            codec_s: t.spent.codec / n,
            upload_s: t.spent.upload / n,
            download_s: t.spent.download / n,
            wait_s: (t.online - busy) / n,
            publish_s: per_round(&|b| b.publish_s),
            utilisation: t.spent.compute / t.online,
            accepted,
            aggregated,
            closed_all_in: per_round(&|b| f64::from(b.closed_by == Some(Close::AllIn))),
            closed_quorum: per_round(&|b| f64::from(b.closed_by == Some(Close::Quorum))),
            closed_deadline: per_round(&|b| f64::from(b.closed_by == Some(Close::Deadline))),
            lost: per_round(&|b| f64::from(b.lost)),
            exchange_ingress_bytes: per_round(&|b| b.exchange_in),
            exchange_egress_bytes: per_round(&|b| b.exchange_out),
            storage_ingress_bytes: per_round(&|b| b.storage_in),
            storage_egress_bytes: per_round(&|b| b.storage_out),
            download_per_peer_bytes: per_round(&|b| b.peer_download) * measured as f64
                / downloads.max(1.0),
        }
    }
}
