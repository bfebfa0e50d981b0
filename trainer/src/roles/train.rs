//! The `train` role: one peer of a run. Join, catch up with the global state if the run
//! has started, then round after round: local work → PutUpdate → the round's accepted
//! updates → outer step. A peer that falls behind or finds the exchange restarted
//! resyncs from the exchange's state instead of diverging.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::exchange::PeerId;
use crate::exchange::Reason;
use crate::exchange::client::{ClientError, ClientOptions, ExchangeClient};
use crate::model::{InnerOptimizer, Llama, save_checkpoint};
use crate::outer::{Outer, Round};
use crate::run::{Algorithm, Run};
use crate::scoring::adversary::{Adversary, Applies, Material};

/// How this peer reaches the exchange and where it writes.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    pub exchange: String,
    pub token: String,
    pub bandwidth_mbps: Option<f64>,
    pub retry_for: Duration,
    pub heartbeat: Duration,
    /// CA certificate (PEM) of an `https://` exchange.
    pub tls_ca: Option<Vec<u8>>,
    /// The peer's final θ is written here (Hugging Face layout) when the run ends.
    pub checkpoint_dir: Option<PathBuf>,
    /// A testing aid: cheat this way from this round on.
    pub adversary: Option<(Adversary, Round)>,
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
    cheat: Option<Cheat>,
}

/// A cheating peer's plan and what it keeps to carry it out.
struct Cheat {
    adversary: Adversary,
    from: Round,
    /// Its own last two updates, oldest first.
    sent: VecDeque<Vec<u8>>,
    /// Every peer's update of the last closed round.
    previous: BTreeMap<PeerId, Vec<u8>>,
    /// Closed rounds not applied yet (a stale peer).
    late: VecDeque<Vec<(Vec<u8>, f32)>>,
}

impl Cheat {
    /// The adversary, if it cheats in `round`.
    fn active(&self, round: Round) -> Option<&Adversary> {
        (round >= self.from).then_some(&self.adversary)
    }

    /// What goes out instead of the honest `update`.
    fn tamper(&mut self, round: Round, update: Vec<u8>) -> Vec<u8> {
        let sent = match self.active(round) {
            None => update,
            Some(adversary) => {
                let copied = match adversary {
                    Adversary::Copy(of) => self.previous.get(of).map(Vec::as_slice),
                    _ => None,
                };
                let material = Material {
                    own_old: (self.sent.len() == 2).then(|| self.sent[0].as_slice()),
                    copied,
                    seed: u64::from(round.0),
                };
                adversary.tamper(&update, &material).unwrap_or_else(|e| {
                    tracing::warn!(%adversary, error = %e, "could not cheat; sending the honest update");
                    update
                })
            }
        };
        self.sent.push_back(sent.clone());
        if self.sent.len() > 2 {
            self.sent.pop_front();
        }
        sent
    }

    /// The closed rounds to apply now, oldest first (none, this one, or an older one).
    fn due(
        &mut self,
        round: Round,
        entries: Vec<(PeerId, Vec<u8>, f32)>,
    ) -> Vec<Vec<(Vec<u8>, f32)>> {
        self.previous = entries.iter().map(|(p, b, _)| (*p, b.clone())).collect();
        self.late
            .push_back(entries.into_iter().map(|(_, b, w)| (b, w)).collect());
        match self
            .active(round)
            .map_or(Applies::AtOnce, Adversary::applies)
        {
            Applies::AtOnce => self.late.drain(..).collect(),
            Applies::Late(lag) => {
                let due = self.late.len().saturating_sub(lag);
                self.late.drain(..due).collect()
            }
            Applies::Never => {
                self.late.clear();
                vec![]
            }
        }
    }
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
            tls_ca: opts.tls_ca.clone(),
        })?;
        let (peer, open, rounds) = rt.block_on(client.join())?;
        tracing::info!(%peer, open_round = open.0, rounds = rounds.0, "joined the run");
        let replica = Replica::new(run, rounds)?;
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
            cheat: opts.adversary.clone().map(|(adversary, from)| Cheat {
                adversary,
                from,
                sent: VecDeque::new(),
                previous: BTreeMap::new(),
                late: VecDeque::new(),
            }),
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
        let peer = self.report.peer;
        let started = Instant::now();
        let mut update = self.local_work(round);
        if let (Some(cheat), Some((bytes, _))) = (&mut self.cheat, &mut update) {
            *bytes = cheat.tamper(round, std::mem::take(bytes));
        }
        let computed = started.elapsed();
        let sent = update.as_ref().map(|(b, l)| (b.as_slice(), *l));
        let result = match self.rt.block_on(self.client.exchange_round(round, sent)) {
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
            tracing::info!(%peer, from = self.rounds.0, to = result.rounds.0, "run length changed");
            self.rounds = result.rounds;
            let schedule = self.replica.run.config.schedule(self.rounds);
            self.replica.inner.set_schedule(schedule);
        }
        if let Some((bytes, loss)) = &update {
            let dense = 4 * self.replica.model.parameter_count();
            tracing::info!(
                %peer,
                round = format!("{}/{}", round.0 + 1, self.rounds.0),
                train_loss = format!("{loss:.4}"),
                update_bytes = bytes.len(),
                compression = format!("{:.1}x", dense as f64 / bytes.len() as f64),
                compute_s = format!("{:.2}", computed.as_secs_f64()),
                round_s = format!("{:.2}", started.elapsed().as_secs_f64()),
                updates = result.entries.len(),
                "round done"
            );
        }
        let updates: Vec<(&[u8], f32)> = result
            .entries
            .iter()
            .map(|e| (e.bytes.as_slice(), e.weight))
            .collect();
        match &mut self.cheat {
            None => self.replica.apply(&updates)?,
            Some(cheat) => {
                let entries = (result.entries.iter())
                    .map(|e| (e.peer, e.bytes.clone(), e.weight))
                    .collect();
                for closed in cheat.due(round, entries) {
                    let refs: Vec<(&[u8], f32)> =
                        closed.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
                    self.replica.apply(&refs)?;
                }
            }
        }
        tracing::debug!(%peer, round = round.0, updates = updates.len(), "round applied");
        Ok(Next::Round(round.next()))
    }

    /// This peer's update for `round` and its training loss; `None` when a step
    /// diverged (it then takes everyone else's updates).
    fn local_work(&mut self, round: Round) -> Option<(Vec<u8>, f32)> {
        let peer = self.report.peer;
        let peers = self.replica.run.config.max_peers;
        let data = (self.cheat.as_ref())
            .and_then(|c| c.active(round))
            .map_or(peer, |a| a.trains_on(peer, peers));
        match self.replica.local_round(data, round) {
            Ok(update) => {
                self.report.rounds_trained += 1;
                self.report.last_train_loss = update.1;
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
    ) -> Result<(Vec<u8>, f32), crate::outer::RoundError> {
        let batches = self.run.batches(peer.index(), round.0);
        let micro = self.run.config.micro_batch as usize;
        self.outer
            .local_round(&self.model, &mut self.inner, &batches, micro)
    }

    /// The outer step with a round's accepted updates.
    pub fn apply(&mut self, updates: &[(&[u8], f32)]) -> Result<(), crate::outer::RoundError> {
        let lr = self.run.config.outer_lr;
        self.outer
            .apply(&self.model, Some(&mut self.inner), updates, lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheat(kind: &str, from: u32) -> Cheat {
        Cheat {
            adversary: kind.parse().unwrap(),
            from: Round(from),
            sent: VecDeque::new(),
            previous: BTreeMap::new(),
            late: VecDeque::new(),
        }
    }

    fn closed(round: u8) -> Vec<(PeerId, Vec<u8>, f32)> {
        vec![
            (PeerId::new(0), vec![round], 1.0),
            (PeerId::new(1), vec![round, 1], 1.0),
        ]
    }

    #[test]
    fn a_stale_peer_applies_rounds_two_late_and_a_frozen_one_never() {
        let mut stale = cheat("stale", 1);
        let applied: Vec<usize> = (0..5)
            .map(|r| stale.due(Round(r), closed(r as u8)).len())
            .collect();
        assert_eq!(applied, [1, 0, 0, 1, 1]);
        let mut frozen = cheat("frozen", 2);
        let applied: Vec<usize> = (0..4)
            .map(|r| frozen.due(Round(r), closed(r as u8)).len())
            .collect();
        assert_eq!(applied, [1, 1, 0, 0]);
        let mut honest_until_late = cheat("signflip", 9);
        assert_eq!(honest_until_late.due(Round(0), closed(0)).len(), 1);
    }

    #[test]
    fn a_replayer_resends_its_update_of_two_rounds_before_and_a_copier_another_peers() {
        let mut replay = cheat("replay", 2);
        let sent: Vec<Vec<u8>> = (0..4)
            .map(|r| replay.tamper(Round(r), vec![r as u8]))
            .collect();
        assert_eq!(sent, [vec![0], vec![1], vec![0], vec![1]]);
        let mut copy = cheat("copy:p1", 1);
        assert_eq!(copy.tamper(Round(0), vec![9]), [9]);
        copy.due(Round(0), closed(7));
        assert_eq!(copy.tamper(Round(1), vec![9]), [7, 1]);
    }

    #[test]
    fn an_offslice_peer_trains_on_the_next_peers_data() {
        let a: Adversary = "offslice".parse().unwrap();
        assert_eq!(a.trains_on(PeerId::new(2), 3), PeerId::new(0));
        assert_eq!(
            cheat("zero", 0).adversary.trains_on(PeerId::new(2), 3),
            PeerId::new(2)
        );
    }
}
