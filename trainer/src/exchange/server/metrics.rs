//! Where the run stands: the `RunState` the operator watches, and the same numbers in
//! the Prometheus text format for `GET /metrics`.

use std::fmt::Write;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;

use super::{Exchange, proto};
use crate::exchange::WATCH_KEEPALIVE;

/// How often a watched state is looked at between round closings, for what changes
/// without waking anyone: updates arriving, peers joining or falling silent.
const WATCH_TICK: Duration = Duration::from_millis(500);

impl Exchange {
    /// Where the run stands, as the operator watches it and `/metrics` reports it.
    pub fn run_state(&self) -> proto::RunState {
        let state = self.state();
        let liveness = self.shared.opts.liveness;
        let peers = state
            .peers
            .iter()
            .map(|(p, r)| proto::PeerState {
                peer: p.to_string(),
                alive: r.last_seen.elapsed() < liveness,
                last_seen_ms_ago: r.last_seen.elapsed().as_millis() as u64,
                weight: state.weights.get(p).copied().unwrap_or(1.0),
                updates_accepted: r.accepted,
                updates_rejected: r.rejected,
                bytes_received: r.bytes,
                last_train_loss: r.last_train_loss,
                last_rejection: r.last_rejection.clone(),
            })
            .collect();
        proto::RunState {
            open_round: state.open.0,
            rounds: state.settings.map_or(0, |s| s.rounds),
            done: state.done(),
            peers,
            recent: state.summaries.iter().cloned().collect(),
            bytes_received: state.bytes_received,
            bytes_sent: state.bytes_sent,
            dense_update_bytes: self.shared.dense_bytes,
            initial_validation_loss: state.initial_validation_loss,
            tokens: state.tokens,
            settings: state.settings.map(Into::into),
            publications: state.publications.values().cloned().collect(),
            measurements: state.ledger.measurements(),
            ledger_head: state.ledger.head().0.to_owned(),
            ledger_records: state.ledger.head().1,
            evaluators: state.evaluators.values().cloned().collect(),
            storage: (self.shared.opts.storage.as_ref())
                .map(|s| s.url.clone())
                .unwrap_or_default(),
            storage_error: state.storage_error.clone().unwrap_or_default(),
        }
    }
}

impl Exchange {
    /// Sends the run's state into `tx` now, then whenever it changes and at least every
    /// [`WATCH_KEEPALIVE`], until the watcher goes away. A closed round is sent at once;
    /// other changes within [`WATCH_TICK`].
    pub(super) async fn watch_run_state(self, tx: mpsc::Sender<Result<proto::RunState, Status>>) {
        let mut closed = self.shared.open_tx.subscribe();
        let mut sent: Option<(proto::RunState, Instant)> = None;
        loop {
            let state = self.run_state();
            let due = sent.as_ref().is_none_or(|(last, at)| {
                state.differs_from(last) || at.elapsed() >= WATCH_KEEPALIVE
            });
            if due {
                if tx.send(Ok(state.clone())).await.is_err() {
                    return;
                }
                sent = Some((state, Instant::now()));
            }
            tokio::select! {
                _ = tx.closed() => return,
                // `self` keeps the sender alive, so this only ends by a change.
                _ = closed.changed() => {}
                _ = tokio::time::sleep(WATCH_TICK) => {}
            }
        }
    }
}

/// A metric's name (after `starling_exchange_`), type and help text.
type Metric = (&'static str, &'static str, &'static str);

/// A per-peer metric and how to read it off a peer's state.
type PeerMetric = (Metric, fn(&proto::PeerState) -> f64);

/// The per-peer metrics, labelled `peer="…"`.
const PEER_METRICS: [PeerMetric; 4] = [
    (
        ("peer_alive", "gauge", "1 while the peer heartbeats."),
        |p| f64::from(u8::from(p.alive)),
    ),
    (
        ("peer_weight", "gauge", "The peer's aggregation weight."),
        |p| f64::from(p.weight),
    ),
    (
        (
            "updates_accepted_total",
            "counter",
            "Updates accepted per peer.",
        ),
        |p| f64::from(p.updates_accepted),
    ),
    (
        (
            "updates_rejected_total",
            "counter",
            "Updates refused per peer.",
        ),
        |p| f64::from(p.updates_rejected),
    ),
];

/// The run-wide metrics and their values.
fn run_metrics(state: &proto::RunState) -> [(Metric, f64); 9] {
    let last = state.recent.last();
    let validation = last.map_or(state.initial_validation_loss, |r| r.validation_loss);
    [
        (
            ("open_round", "gauge", "The round accepting updates."),
            f64::from(state.open_round),
        ),
        (
            ("rounds", "gauge", "Rounds in the run."),
            f64::from(state.rounds),
        ),
        (
            ("done", "gauge", "1 once every round has closed."),
            f64::from(u8::from(state.done)),
        ),
        (
            (
                "tokens_total",
                "counter",
                "Tokens trained on by accepted updates.",
            ),
            state.tokens as f64,
        ),
        (
            ("bytes_received_total", "counter", "Update bytes accepted."),
            state.bytes_received as f64,
        ),
        (
            (
                "bytes_sent_total",
                "counter",
                "Update and state bytes served to peers.",
            ),
            state.bytes_sent as f64,
        ),
        (
            (
                "dense_update_bytes",
                "gauge",
                "Bytes of one dense fp32 update of the model.",
            ),
            state.dense_update_bytes as f64,
        ),
        (
            (
                "validation_loss",
                "gauge",
                "Held-out loss of the global model after the last closed round.",
            ),
            f64::from(validation),
        ),
        (
            (
                "train_loss",
                "gauge",
                "Mean training loss the last round's peers reported.",
            ),
            last.map_or(f64::NAN, |r| f64::from(r.train_loss)),
        ),
    ]
}

/// The run state in the Prometheus text format.
pub fn prometheus(state: &proto::RunState) -> String {
    let mut out = String::new();
    let mut metric = |(name, kind, help): Metric,
                      samples: &mut dyn Iterator<Item = (String, f64)>| {
        let _ = writeln!(out, "# HELP starling_exchange_{name} {help}");
        let _ = writeln!(out, "# TYPE starling_exchange_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "starling_exchange_{name}{labels} {value}");
        }
    };
    for (m, value) in run_metrics(state) {
        metric(m, &mut std::iter::once((String::new(), value)));
    }
    for (m, value) in PEER_METRICS {
        let mut samples = state
            .peers
            .iter()
            .map(|p| (format!("{{peer=\"{}\"}}", p.peer), value(p)));
        metric(m, &mut samples);
    }
    let evaluation = (
        "evaluation_seconds",
        "gauge",
        "From a round's close to an evaluator's measurements of it, for its latest round.",
    );
    let mut samples = (state.evaluators.iter())
        .map(|e| (format!("{{evaluator=\"{}\"}}", e.evaluator), e.seconds));
    metric(evaluation, &mut samples);
    out
}
