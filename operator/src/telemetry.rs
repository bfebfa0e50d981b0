//! What an SRE watches the operator by: `/healthz` (the process serves), `/readyz` (its
//! caches are synced, or it is a standby waiting for the Lease) and Prometheus
//! `/metrics`: reconciles, failures and reconcile durations per controller, runs per
//! phase, members Ready, Kubernetes API requests by verb, and every scored peer's score,
//! rating and weight. Shared by the hub and the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use starling_trainer::roles::metrics::{OPENMETRICS, openmetrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// One peer of one run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub namespace: String,
    pub run: String,
    pub peer: String,
}

/// One run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabel {
    pub namespace: String,
    pub run: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabel {
    pub member: String,
}

/// A gauge of a real number.
pub type RealGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    pub verb: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s: a reconcile that reads stores is milliseconds, one that waits on an
    // exchange that does not answer is seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The process's readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Readiness {
    Starting = 0,
    /// A hub replica waiting for the leader Lease: alive and ready to take over.
    Standby = 1,
    Ready = 2,
}

pub struct Metrics {
    pub reconciles: Family<ControllerLabel, Counter>,
    pub failures: Family<ControllerLabel, Counter>,
    pub duration: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    pub runs: Family<PhaseLabel, Gauge>,
    pub members_ready: Gauge,
    pub members: Gauge,
    pub api_requests: Family<VerbLabel, Counter>,
    /// The last score s of each scored peer.
    pub peer_score: Family<PeerLabel, RealGauge>,
    /// Each scored peer's OpenSkill ordinal.
    pub peer_rating: Family<PeerLabel, RealGauge>,
    /// Each scored peer's weight in its run's next aggregate.
    pub peer_weight: Family<PeerLabel, RealGauge>,
    /// Each member's last heartbeat, in seconds since the epoch.
    pub member_heartbeat: Family<MemberLabel, RealGauge>,
    /// Each run's last completed round.
    pub run_round: Family<RunLabel, Gauge>,
    /// Each run's validation loss after its last round.
    pub run_loss: Family<RunLabel, RealGauge>,
    /// Each run's dense-over-sent update bytes.
    pub run_compression: Family<RunLabel, RealGauge>,
    /// Each run's peers in state Running.
    pub run_active_peers: Family<RunLabel, Gauge>,
    readiness: AtomicU8,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("starling_operator");
        let m = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            runs: Family::default(),
            members_ready: Gauge::default(),
            members: Gauge::default(),
            api_requests: Family::default(),
            peer_score: Family::default(),
            peer_rating: Family::default(),
            peer_weight: Family::default(),
            member_heartbeat: Family::default(),
            run_round: Family::default(),
            run_loss: Family::default(),
            run_compression: Family::default(),
            run_active_peers: Family::default(),
            readiness: AtomicU8::new(Readiness::Starting as u8),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles started", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            m.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took",
            m.duration.clone(),
        );
        registry.register("training_runs", "TrainingRuns by phase", m.runs.clone());
        registry.register(
            "members_ready",
            "MemberClusters Ready",
            m.members_ready.clone(),
        );
        registry.register("members", "MemberClusters", m.members.clone());
        registry.register(
            "kubernetes_requests",
            "Requests to the Kubernetes API by verb",
            m.api_requests.clone(),
        );
        registry.register(
            "peer_score",
            "A scored peer's last score: relative loss improvement of its update alone",
            m.peer_score.clone(),
        );
        registry.register(
            "peer_rating",
            "A scored peer's OpenSkill ordinal (mu - 3 sigma)",
            m.peer_rating.clone(),
        );
        registry.register(
            "peer_weight",
            "A scored peer's weight in its run's next aggregate",
            m.peer_weight.clone(),
        );
        m.register_runs_and_members(&mut registry);
        Self { registry, ..m }
    }
}

impl Metrics {
    fn register_runs_and_members(&self, registry: &mut Registry) {
        registry.register(
            "member_last_heartbeat_timestamp_seconds",
            "When each MemberCluster's agent last reported, in seconds since the epoch",
            self.member_heartbeat.clone(),
        );
        registry.register(
            "run_round",
            "A TrainingRun's last completed round",
            self.run_round.clone(),
        );
        registry.register(
            "run_validation_loss",
            "A TrainingRun's validation loss after its last round",
            self.run_loss.clone(),
        );
        registry.register(
            "run_compression_ratio",
            "A TrainingRun's dense fp32 update bytes over the bytes its peers sent",
            self.run_compression.clone(),
        );
        registry.register(
            "run_active_peers",
            "A TrainingRun's peers in state Running",
            self.run_active_peers.clone(),
        );
    }

    /// The per-run gauges, from every run's status (runs gone, gone).
    pub fn set_runs<'a>(&self, runs: impl IntoIterator<Item = &'a crate::api::TrainingRun>) {
        use kube::ResourceExt;
        self.run_round.clear();
        self.run_loss.clear();
        self.run_compression.clear();
        self.run_active_peers.clear();
        for run in runs {
            let Some(status) = &run.status else { continue };
            let label = RunLabel {
                namespace: run.namespace().unwrap_or_default(),
                run: run.name_any(),
            };
            (self.run_round.get_or_create(&label)).set(i64::from(status.round));
            (self.run_active_peers.get_or_create(&label)).set(i64::from(status.active_peers));
            if let Some(loss) = status.last_loss {
                self.run_loss.get_or_create(&label).set(loss);
            }
            if let Some(ratio) = status.compression_ratio {
                self.run_compression.get_or_create(&label).set(ratio);
            }
        }
    }

    /// Each member's last heartbeat (members gone, gone).
    pub fn set_members<'a>(
        &self,
        members: impl IntoIterator<Item = &'a crate::api::MemberCluster>,
    ) {
        use kube::ResourceExt;
        self.member_heartbeat.clear();
        for member in members {
            let beat = member
                .status
                .as_ref()
                .and_then(|s| s.last_heartbeat.as_ref());
            if let Some(beat) = beat {
                let label = MemberLabel {
                    member: member.name_any(),
                };
                let seconds = beat.0.as_millisecond() as f64 / 1000.0;
                self.member_heartbeat.get_or_create(&label).set(seconds);
            }
        }
    }
}

impl Metrics {
    /// The per-peer scoring gauges, from every run's status (peers of runs gone, gone).
    pub fn set_peer_scores<'a>(&self, runs: impl IntoIterator<Item = &'a crate::api::TrainingRun>) {
        use kube::ResourceExt;
        self.peer_score.clear();
        self.peer_rating.clear();
        self.peer_weight.clear();
        for run in runs {
            let peers = run.status.iter().flat_map(|s| &s.peers);
            for p in peers.filter(|p| p.standing.is_some()) {
                let label = PeerLabel {
                    namespace: run.namespace().unwrap_or_default(),
                    run: run.name_any(),
                    peer: p.id.to_string(),
                };
                for (family, value) in [
                    (&self.peer_score, p.last_score),
                    (&self.peer_rating, p.rating),
                    (&self.peer_weight, p.weight),
                ] {
                    if let Some(v) = value {
                        family.get_or_create(&label).set(v);
                    }
                }
            }
        }
    }
}

/// Measures one reconcile: counts it, and its duration and failure when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
    failed: bool,
}

impl ReconcileTimer<'_> {
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let label = ControllerLabel {
            controller: self.controller,
        };
        self.metrics
            .duration
            .get_or_create(&label)
            .observe(self.start.elapsed().as_secs_f64());
        if self.failed {
            self.metrics.failures.get_or_create(&label).inc();
        }
    }
}

impl Metrics {
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
            failed: false,
        }
    }

    pub fn set_readiness(&self, readiness: Readiness) {
        self.readiness.store(readiness as u8, Ordering::Relaxed);
    }

    fn readiness(&self) -> Readiness {
        match self.readiness.load(Ordering::Relaxed) {
            1 => Readiness::Standby,
            2 => Readiness::Ready,
            _ => Readiness::Starting,
        }
    }

    /// Counts one API request by its HTTP method, read as a Kubernetes verb family.
    pub fn api_request(&self, method: &str) {
        self.api_requests
            .get_or_create(&VerbLabel {
                verb: method.to_ascii_lowercase(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        openmetrics(&self.registry)
    }
}

/// A tower layer counting every request a kube `Client` sends, by method.
pub fn counting_layer(
    metrics: Arc<Metrics>,
) -> tower::util::MapRequestLayer<
    impl Fn(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone,
> {
    tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
        metrics.api_request(request.method().as_str());
        request
    })
}

/// A client for `config` whose requests are counted in `metrics`.
pub fn client(config: kube::Config, metrics: Arc<Metrics>) -> kube::Result<kube::Client> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counting_layer(metrics))
        .build())
}

/// What `/metrics` adds on top of the counters: gauges read at scrape time.
pub type Refresh = Arc<dyn Fn(&Metrics) + Send + Sync>;

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    refresh: Refresh,
}

async fn scrape(State(s): State<Served>) -> impl IntoResponse {
    (s.refresh)(&s.metrics);
    ([(header::CONTENT_TYPE, OPENMETRICS)], s.metrics.encode())
}

async fn ready(State(s): State<Served>) -> impl IntoResponse {
    match s.metrics.readiness() {
        Readiness::Ready => (StatusCode::OK, "ok"),
        Readiness::Standby => (StatusCode::OK, "standby"),
        Readiness::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` until the process ends. Prints
/// the address it bound (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    refresh: Refresh,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(scrape))
        .with_state(Served { metrics, refresh });
    axum::serve(listener, app).await
}

/// SIGINT or SIGTERM: how a pod is told to stop.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; stopping on ctrl-c only");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_failures_and_durations_are_exposed_per_controller() {
        let m = Metrics::default();
        {
            let _ok = m.reconcile("trainingrun");
        }
        {
            let mut bad = m.reconcile("trainingrun");
            bad.failed();
        }
        m.api_request("PATCH");
        let sample = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");
        let mut run: crate::api::TrainingRun = serde_yaml::from_str(sample).unwrap();
        run.metadata.namespace = Some("ml".into());
        run.metadata.name = Some("tiny".into());
        run.status = serde_json::from_value(serde_json::json!({"peers": [
            {"id": "p0", "member": "a", "state": "Running", "standing": "Active",
             "lastScore": 0.02, "rating": 3.5, "weight": 0.5},
            {"id": "p1", "member": "b", "state": "Running", "lastScore": 2.9}]}))
        .unwrap();
        m.set_peer_scores([&run]);
        m.runs
            .get_or_create(&PhaseLabel {
                phase: "Running".into(),
            })
            .set(2);
        let text = m.encode();
        assert!(
            text.contains("starling_operator_reconciles_total{controller=\"trainingrun\"} 2"),
            "{text}"
        );
        for line in [
            "starling_operator_peer_score{namespace=\"ml\",run=\"tiny\",peer=\"p0\"} 0.02",
            "starling_operator_peer_rating{namespace=\"ml\",run=\"tiny\",peer=\"p0\"} 3.5",
            "starling_operator_peer_weight{namespace=\"ml\",run=\"tiny\",peer=\"p0\"} 0.5",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        assert!(!text.contains("peer=\"p1\""), "an unscored peer: {text}");
        assert!(
            text.contains("starling_operator_reconcile_errors_total{controller=\"trainingrun\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "starling_operator_reconcile_duration_seconds_count{controller=\"trainingrun\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("starling_operator_kubernetes_requests_total{verb=\"patch\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("starling_operator_training_runs{phase=\"Running\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn each_run_s_progress_and_each_member_s_heartbeat_are_exposed_from_their_status() {
        let m = Metrics::default();
        let sample = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");
        let mut run: crate::api::TrainingRun = serde_yaml::from_str(sample).unwrap();
        run.metadata.namespace = Some("ml".into());
        run.status = serde_json::from_value(serde_json::json!({
            "round": 7, "lastLoss": 2.5, "compressionRatio": 96.0, "activePeers": 3}))
        .unwrap();
        let mut member: crate::api::MemberCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "metadata": {"name": "home-lagos"},
            "spec": {"tier": "home", "region": "lagos",
                     "bandwidth": {"uploadMbps": 20, "downloadMbps": 100}},
            "status": {"lastHeartbeat": "2026-12-07T06:00:00.500Z"}}))
        .unwrap();
        m.set_runs([&run]);
        m.set_members([&member]);
        let text = m.encode();
        for line in [
            "starling_operator_run_round{namespace=\"ml\",run=\"shakespeare\"} 7",
            "starling_operator_run_validation_loss{namespace=\"ml\",run=\"shakespeare\"} 2.5",
            "starling_operator_run_compression_ratio{namespace=\"ml\",run=\"shakespeare\"} 96.0",
            "starling_operator_run_active_peers{namespace=\"ml\",run=\"shakespeare\"} 3",
            "starling_operator_member_last_heartbeat_timestamp_seconds{member=\"home-lagos\"} 1796623200.5",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        member.status = None;
        m.set_members([&member]);
        m.set_runs([]);
        let text = m.encode();
        assert!(!text.contains("home-lagos"), "{text}");
        assert!(!text.contains("shakespeare"), "{text}");
    }
}
