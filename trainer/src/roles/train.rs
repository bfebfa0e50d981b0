//! The `train` role: one peer of a run. Join, catch up with the global state if the run
//! has started, then round after round: local work → PutUpdate → the round's accepted
//! updates → outer step. A peer that falls behind or finds the exchange restarted
//! resyncs from the exchange's state instead of diverging.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::exchange::PeerId;
use crate::exchange::Reason;
use crate::exchange::client::{ClientError, ClientOptions, ExchangeClient, RoundResult};
use crate::model::{InnerOptimizer, Llama, save_checkpoint};
use crate::outer::{LocalUpdate, Outer, Round, Step};
use crate::roles::metrics::{PeerMetrics, RoundMeasured};
use crate::run::{Algorithm, Run};
use crate::scoring::adversary::{Adversaries, Cheater, Closed};
use crate::scoring::evaluate::{probe_model, probe_positions};

/// How this peer reaches the exchange and where it writes.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    pub exchange: String,
    pub token: String,
    pub bandwidth_mbps: Option<f64>,
    pub retry_for: Duration,
    pub heartbeat: Duration,
    /// What verifies an `https://` exchange.
    pub tls: Option<crate::exchange::tls::ClientTls>,
    /// The peer's final θ is written here (Hugging Face layout) when the run ends.
    pub checkpoint_dir: Option<PathBuf>,
    /// A testing aid: cheat this way (if it names this peer) from this round on.
    pub adversary: Option<(Adversaries, Round)>,
    /// Serve Prometheus `/metrics` here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What a peer did, for its last log line and for tests.
#[derive(Debug)]
pub struct PeerReport {
    pub peer: PeerId,
    pub rounds_trained: u32,
    pub updates_accepted: u32,
    pub resyncs: u32,
    pub bytes_sent: u64,
    pub last_train_loss: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Exchange(#[from] ClientError),
    #[error(transparent)]
    Round(#[from] crate::outer::RoundError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Runs one peer of `run` to the end of the run.
pub fn train(run: &Run, opts: PeerOptions) -> Result<PeerReport, PeerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The lazy channel and the heartbeat task live on this runtime.
    let _runtime = rt.enter();
    let mut peer = Peer::join(&rt, run, &opts)?;
    let mut round = Round(0);
    if peer.open > round {
        round = peer.resync()?;
    }
    // Heartbeats keep this peer in the membership while it computes.
    let current = Arc::new(AtomicU32::new(round.0));
    let beat = peer.heartbeats(current.clone(), opts.heartbeat);
    while round < peer.rounds {
        current.store(round.0, Ordering::Relaxed);
        round = match peer.round(round)? {
            Next::Round(next) => next,
            Next::Done => break,
        };
    }
    beat.abort();
    peer.finish(round, opts.checkpoint_dir.as_deref())
}

/// One peer at work: its connection, its replica and what it has done.
struct Peer<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: ExchangeClient,
    replica: Replica<'a>,
    report: PeerReport,
    /// The round the exchange had open when this peer joined.
    open: Round,
    /// The run's length, as the exchange last said.
    rounds: Round,
    cheat: Option<Cheater>,
    /// Where this peer reports its θ with every update, for the evaluators.
    positions: Vec<(usize, usize)>,
    metrics: Arc<PeerMetrics>,
}

/// Where a round leaves the peer.
enum Next {
    Round(Round),
    Done,
}

impl<'a> Peer<'a> {
    /// Joins the run and sets up this peer's replica from the run's start.
    fn join(
        rt: &'a tokio::runtime::Runtime,
        run: &'a Run,
        opts: &PeerOptions,
    ) -> Result<Self, PeerError> {
        let client = ExchangeClient::new(ClientOptions {
            url: opts.exchange.clone(),
            token: opts.token.clone(),
            fingerprint: run.fingerprint.clone(),
            bandwidth_mbps: opts.bandwidth_mbps,
            retry_for: opts.retry_for,
            tls: opts.tls.clone(),
        })?;
        let (peer, open, rounds) = rt.block_on(client.join())?;
        tracing::info!(%peer, open_round = open.0, rounds = rounds.0, "joined the run");
        let replica = Replica::new(run, rounds)?;
        let positions = probe_positions(&replica.model, run.config.seed);
        let metrics = Arc::new(PeerMetrics::new(peer));
        if let Some(addr) = opts.metrics_listen {
            let served = metrics.clone();
            rt.spawn(async move {
                if let Err(e) = served.serve(addr).await {
                    tracing::warn!(%addr, error = %e, "cannot serve /metrics");
                }
            });
        }
        let report = PeerReport {
            peer,
            rounds_trained: 0,
            updates_accepted: 0,
            resyncs: 0,
            bytes_sent: 0,
            last_train_loss: f32::NAN,
        };
        Ok(Self {
            rt,
            client,
            replica,
            report,
            open,
            rounds,
            cheat: (opts.adversary.as_ref())
                .and_then(|(who, from)| Some((who.of(peer)?, *from)))
                .map(|(adversary, from)| {
                    tracing::warn!(%peer, %adversary, from = from.0, "cheating, as a testing aid");
                    Cheater::new(adversary, from, run.config.seed)
                }),
            positions,
            metrics,
        })
    }

    fn heartbeats(&self, current: Arc<AtomicU32>, every: Duration) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        self.rt.spawn(async move {
            loop {
                let _ = client
                    .heartbeat(Round(current.load(Ordering::Relaxed)))
                    .await;
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Local work on `round`, the exchange, and the outer step; returns the round to work
    /// on next.
    fn round(&mut self, round: Round) -> Result<Next, PeerError> {
        let span = tracing::info_span!("peer_round", peer = %self.report.peer, round = round.0);
        if let Some(exchange_round) = self.client.round_trace(round) {
            // Fails only for a span that is not traced.
            let _ = span.set_parent(exchange_round);
        }
        let _in_round = span.enter();
        let started = Instant::now();
        let probe = probe_model(&self.replica.model, &self.positions)?;
        let mut update = self.local_work(round);
        if let (Some(cheat), Some(u)) = (&mut self.cheat, &mut update) {
            u.bytes = cheat.tamper(round, std::mem::take(&mut u.bytes));
        }
        let computed = started.elapsed();
        let sent = update.as_ref().map(|u| (u.bytes.as_slice(), u.loss));
        let exchanged = self.client.exchange_round_probed(round, sent, &probe);
        let result = match self.rt.block_on(exchanged) {
            Ok(result) => result,
            Err(e) => {
                return match e.refusal().map(|r| r.reason) {
                    Some(Reason::Resync) => Ok(Next::Round(self.resync()?)),
                    Some(Reason::RunDone) => Ok(Next::Done),
                    _ => Err(e.into()),
                };
            }
        };
        if let Some(n) = result.accepted_bytes {
            self.report.updates_accepted += 1;
            self.report.bytes_sent += n;
        }
        if result.rounds != self.rounds {
            // The operator changed the run's length: apply this round and go on with the
            // exchange's schedule, as the exchange does.
            tracing::info!(peer = %self.report.peer, from = self.rounds.0, to = result.rounds.0, "run length changed");
            self.rounds = result.rounds;
            let schedule = self.replica.run.config.schedule(self.rounds);
            self.replica.inner.set_schedule(schedule);
        }
        let dense_bytes = 4 * self.replica.model.parameter_count();
        if let Some(u) = &update {
            tracing::info!(
                peer = %self.report.peer,
                round = format!("{}/{}", round.0 + 1, self.rounds.0),
                train_loss = format!("{:.4}", u.loss),
                update_bytes = u.bytes.len(),
                compression = format!("{:.1}x", dense_bytes as f64 / u.bytes.len() as f64),
                compute_s = format!("{:.2}", computed.as_secs_f64()),
                round_s = format!("{:.2}", started.elapsed().as_secs_f64()),
                updates = result.entries.len(),
                "round done"
            );
        }
        let applying = Instant::now();
        tracing::info_span!(
            "outer_step",
            round = round.0,
            updates = result.entries.len()
        )
        .in_scope(|| self.apply(round, &result))?;
        self.metrics.round_done(&RoundMeasured {
            round,
            local: update.as_ref(),
            accepted_bytes: result.accepted_bytes,
            exchange: result.times,
            received_bytes: result.downloaded_bytes(),
            outer_step: applying.elapsed(),
            dense_bytes,
        });
        Ok(Next::Round(round.next()))
    }

    /// The outer step with `round`'s accepted updates (a cheater's way, if it cheats).
    fn apply(&mut self, round: Round, result: &RoundResult) -> Result<(), PeerError> {
        match &mut self.cheat {
            None => self.replica.apply_round(result)?,
            Some(cheat) => {
                let entries = (result.entries.iter())
                    .filter(|e| !e.left_out)
                    .map(|e| (e.peer, e.bytes.clone(), e.weight))
                    .collect();
                for closed in cheat.due(round, entries, result.aggregate.clone()) {
                    self.replica.apply_closed(&closed)?;
                }
            }
        }
        let updates = result.entries.len();
        tracing::debug!(peer = %self.report.peer, round = round.0, updates, "round applied");
        Ok(())
    }

    /// This peer's update for `round`; `None` when a step diverged (it then takes
    /// everyone else's updates).
    fn local_work(&mut self, round: Round) -> Option<LocalUpdate> {
        let peer = self.report.peer;
        let peers = self.replica.run.config.max_peers;
        let data = (self.cheat.as_ref()).map_or(peer, |c| c.trains_on(peer, peers, round));
        match self.replica.local_round(data, round) {
            Ok(update) => {
                self.report.rounds_trained += 1;
                self.report.last_train_loss = update.loss;
                Some(update)
            }
            Err(e) => {
                tracing::warn!(%peer, round = round.0, error = %e, "no update this round");
                None
            }
        }
    }

    /// Replaces this peer's state with the exchange's and returns the round to work on.
    fn resync(&mut self) -> Result<Round, PeerError> {
        let (round, bytes) = self.rt.block_on(self.client.fetch_state())?;
        let replica = &mut self.replica;
        let imported = replica.outer.import(&replica.model, &bytes)?;
        let steps = u64::from(imported.0) * u64::from(replica.run.config.steps_per_round());
        replica.inner.set_steps(steps);
        self.report.resyncs += 1;
        if replica.run.config.algorithm == Algorithm::Ddp {
            // DDP's shared state includes the optimiser moments, which the exchange does
            // not send: a DDP peer that resyncs trains on, but no longer bit-identically.
            tracing::warn!("resynced a DDP peer: its optimiser moments start afresh");
        }
        tracing::info!(
            round = round.0,
            bytes = bytes.len(),
            "synced the global state"
        );
        Ok(imported)
    }

    /// Writes the final parameters (when asked) and reports.
    fn finish(self, round: Round, dir: Option<&std::path::Path>) -> Result<PeerReport, PeerError> {
        if let Some(dir) = dir {
            let run = self.replica.run;
            let meta = serde_json::json!({
                "round": round.0,
                "peer": self.report.peer.to_string(),
                "seed": run.config.seed,
                "algorithm": run.config.algorithm,
                "tokenizer": run.tokenizer.name(),
            });
            save_checkpoint(dir, &self.replica.model, &meta, &run.tokenizer)?;
        }
        tracing::info!(peer = %self.report.peer, report = ?self.report, "run finished");
        Ok(self.report)
    }
}

/// A peer's copy of the run: its model and the optimisers that move it.
pub(crate) struct Replica<'a> {
    pub run: &'a Run,
    pub model: Llama,
    pub outer: Outer,
    pub inner: InnerOptimizer,
}

impl<'a> Replica<'a> {
    /// The run's initial model, with optimisers for a run of `rounds` rounds.
    pub fn new(run: &'a Run, rounds: Round) -> Result<Self, PeerError> {
        let model = run.initial_model()?;
        Ok(Self {
            run,
            outer: Outer::new(&run.config, &model)?,
            inner: InnerOptimizer::new(&model, run.config.adamw(), run.config.schedule(rounds))?,
            model,
        })
    }

    /// `peer`'s inner steps on its data for `round`: its update and training loss.
    pub fn local_round(
        &mut self,
        peer: PeerId,
        round: Round,
    ) -> Result<LocalUpdate, crate::outer::RoundError> {
        let batches = self.run.batches(peer.index(), round.0);
        let micro = self.run.config.micro_batch as usize;
        self.outer
            .local_round(&self.model, &mut self.inner, &batches, micro)
    }

    /// The outer step with a round's accepted updates.
    pub fn apply(&mut self, updates: &[(&[u8], f32)]) -> Result<(), crate::outer::RoundError> {
        self.apply_step(Step::Updates(updates))
    }

    /// The outer step of a closed round as the exchange streamed it.
    pub fn apply_round(&mut self, result: &RoundResult) -> Result<(), crate::outer::RoundError> {
        let updates = result.updates();
        self.apply_step(result.step(&updates))
    }

    /// The outer step of a closed round kept to be applied later.
    pub fn apply_closed(&mut self, closed: &Closed) -> Result<(), crate::outer::RoundError> {
        let updates: Vec<(&[u8], f32)> = (closed.updates.iter())
            .map(|(b, w)| (b.as_slice(), *w))
            .collect();
        self.apply_step(Step::of(closed.aggregate.as_deref(), &updates))
    }

    fn apply_step(&mut self, step: Step<'_>) -> Result<(), crate::outer::RoundError> {
        let lr = self.run.config.outer_lr;
        self.outer
            .apply_step(&self.model, Some(&mut self.inner), step, lr)
    }
}
