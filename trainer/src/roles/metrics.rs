//! What a peer reports to Prometheus at `GET /metrics` while it trains: each round's
//! time by phase, its loss, bytes each way and the compression it achieves. A home peer
//! behind NAT cannot be scraped from the hub, so its own member cluster's Prometheus
//! scrapes it (the member chart's PodMonitor); every series carries `peer` so the
//! federation's series join up wherever they are gathered.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::exchange::PeerId;
use crate::exchange::client::ExchangeTimes;
use crate::outer::{LocalUpdate, Round};

/// Where a peer's round goes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// H inner optimiser steps on the peer's data.
    InnerSteps,
    /// Top-k, quantisation and error feedback: the update from the steps.
    Compress,
    /// Sending the update to the exchange.
    Upload,
    /// Until the round closes (the slowest peer, or the deadline).
    Wait,
    /// Downloading the round's accepted updates.
    Fetch,
    /// Decoding, aggregating and applying them.
    OuterStep,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::InnerSteps,
        Phase::Compress,
        Phase::Upload,
        Phase::Wait,
        Phase::Fetch,
        Phase::OuterStep,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::InnerSteps => "inner_steps",
            Phase::Compress => "compress",
            Phase::Upload => "upload",
            Phase::Wait => "wait",
            Phase::Fetch => "fetch",
            Phase::OuterStep => "outer_step",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

type RealGauge = Gauge<f64, AtomicU64>;

/// What `/metrics` answers with: the OpenMetrics text `prometheus-client` writes (its
/// counters end in `_total`, and the exposition in `# EOF`), as Prometheus negotiates it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` as OpenMetrics text; every `prometheus-client` registry here is written so.
pub fn openmetrics(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// One round of one peer, as measured.
pub struct RoundMeasured<'a> {
    pub round: Round,
    /// The peer's own update (`None` when its steps diverged).
    pub local: Option<&'a LocalUpdate>,
    /// Bytes of this peer's update the exchange accepted.
    pub accepted_bytes: Option<u64>,
    pub exchange: ExchangeTimes,
    /// Bytes of the round's updates downloaded.
    pub received_bytes: u64,
    pub outer_step: Duration,
    /// Bytes of one dense fp32 update of the model.
    pub dense_bytes: usize,
}

/// A peer's metrics, labelled with the peer.
pub struct PeerMetrics {
    registry: Registry,
    phase_seconds: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    round: Gauge,
    train_loss: RealGauge,
    bytes_sent: Counter,
    bytes_received: Counter,
    compression_ratio: RealGauge,
}

fn phase_histogram() -> Histogram {
    // 10 ms .. ~5 min: compression of a tiny model is milliseconds, inner steps of a
    // large one on a CPU minutes.
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

impl PeerMetrics {
    pub fn new(peer: PeerId) -> Self {
        let label = (Cow::Borrowed("peer"), Cow::Owned(peer.to_string()));
        let mut registry =
            Registry::with_prefix_and_labels("starling_trainer", std::iter::once(label));
        let m = Self {
            registry: Registry::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
            round: Gauge::default(),
            train_loss: RealGauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            compression_ratio: RealGauge::default(),
        };
        for phase in Phase::ALL {
            // Every phase is listed from the start, so a dashboard's breakdown never
            // misses a series.
            let _ = m.phase_seconds.get_or_create(&PhaseLabel {
                phase: phase.name(),
            });
        }
        registry.register(
            "round_phase_seconds",
            "Time of each phase of a round",
            m.phase_seconds.clone(),
        );
        registry.register(
            "round",
            "The last round this peer finished",
            m.round.clone(),
        );
        registry.register(
            "train_loss",
            "Mean training loss of the peer's last inner steps",
            m.train_loss.clone(),
        );
        registry.register(
            "update_bytes_sent",
            "Update bytes the exchange accepted from this peer",
            m.bytes_sent.clone(),
        );
        registry.register(
            "update_bytes_received",
            "Update bytes this peer downloaded",
            m.bytes_received.clone(),
        );
        registry.register(
            "compression_ratio",
            "Dense fp32 update bytes over this peer's last update's bytes",
            m.compression_ratio.clone(),
        );
        Self { registry, ..m }
    }

    fn observe(&self, phase: Phase, took: Duration) {
        let label = PhaseLabel {
            phase: phase.name(),
        };
        (self.phase_seconds.get_or_create(&label)).observe(took.as_secs_f64());
    }

    /// Records a finished round.
    pub fn round_done(&self, m: &RoundMeasured) {
        if let Some(local) = m.local {
            self.observe(Phase::InnerSteps, local.inner_steps);
            self.observe(Phase::Compress, local.compress);
            self.train_loss.set(f64::from(local.loss));
            let ratio = m.dense_bytes as f64 / local.bytes.len().max(1) as f64;
            self.compression_ratio.set(ratio);
            self.observe(Phase::Upload, m.exchange.upload);
        }
        self.observe(Phase::Wait, m.exchange.wait);
        self.observe(Phase::Fetch, m.exchange.fetch);
        self.observe(Phase::OuterStep, m.outer_step);
        self.bytes_sent.inc_by(m.accepted_bytes.unwrap_or(0));
        self.bytes_received.inc_by(m.received_bytes);
        self.round.set(i64::from(m.round.0) + 1);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        openmetrics(&self.registry)
    }

    /// Serves `GET /metrics` on `addr` until the process ends.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        serve(listener, OPENMETRICS, move || self.encode()).await
    }
}

/// The Prometheus text format 0.0.4, which the exchange's exposition is written in.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` on `listener` with what `render` writes, as `content_type`:
/// plain HTTP and no token, as scrapers inside the cluster expect, on a port apart from
/// any the pod serves its peers on (which may speak TLS).
pub async fn serve(
    listener: tokio::net::TcpListener,
    content_type: &'static str,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "serving /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render();
            async move { ([(axum::http::header::CONTENT_TYPE, content_type)], text) }
        }),
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_reported_by_phase_with_its_bytes_loss_and_compression() {
        let m = PeerMetrics::new("p1".parse().unwrap());
        let local = LocalUpdate {
            bytes: vec![0; 100],
            loss: 3.25,
            inner_steps: Duration::from_millis(1500),
            compress: Duration::from_millis(20),
        };
        m.round_done(&RoundMeasured {
            round: Round(4),
            local: Some(&local),
            accepted_bytes: Some(100),
            exchange: ExchangeTimes {
                upload: Duration::from_millis(30),
                wait: Duration::from_millis(700),
                fetch: Duration::from_millis(40),
            },
            received_bytes: 300,
            outer_step: Duration::from_millis(5),
            dense_bytes: 5000,
        });
        let text = m.encode();
        for line in [
            "starling_trainer_round{peer=\"p1\"} 5",
            "starling_trainer_train_loss{peer=\"p1\"} 3.25",
            "starling_trainer_update_bytes_sent_total{peer=\"p1\"} 100",
            "starling_trainer_update_bytes_received_total{peer=\"p1\"} 300",
            "starling_trainer_compression_ratio{peer=\"p1\"} 50.0",
            "starling_trainer_round_phase_seconds_sum{peer=\"p1\",phase=\"inner_steps\"} 1.5",
            "starling_trainer_round_phase_seconds_count{peer=\"p1\",phase=\"wait\"} 1",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn a_round_without_an_update_counts_no_local_phases_and_no_bytes_sent() {
        let m = PeerMetrics::new("p0".parse().unwrap());
        m.round_done(&RoundMeasured {
            round: Round(0),
            local: None,
            accepted_bytes: None,
            exchange: ExchangeTimes::default(),
            received_bytes: 10,
            outer_step: Duration::ZERO,
            dense_bytes: 5000,
        });
        let text = m.encode();
        for line in [
            "starling_trainer_round_phase_seconds_count{peer=\"p0\",phase=\"inner_steps\"} 0",
            "starling_trainer_round_phase_seconds_count{peer=\"p0\",phase=\"outer_step\"} 1",
            "starling_trainer_update_bytes_sent_total{peer=\"p0\"} 0",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
    }
}
