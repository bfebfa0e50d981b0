//! The `train` role: one peer of a run. Join, catch up with the global state if the run
//! has started, then round after round: local work → PutUpdate → the round's accepted
//! updates → outer step. A peer that falls behind or finds the exchange restarted
//! resyncs from the exchange's state instead of diverging.

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
    let config = &run.config;
    let client = ExchangeClient::new(ClientOptions {
        url: opts.exchange.clone(),
        token: opts.token.clone(),
        fingerprint: run.fingerprint.clone(),
        bandwidth_mbps: opts.bandwidth_mbps,
        retry_for: opts.retry_for,
        tls_ca: opts.tls_ca.clone(),
    })?;
    let (peer, open, mut rounds) = rt.block_on(client.join())?;
    tracing::info!(%peer, open_round = open.0, rounds = rounds.0, "joined the run");

    let model = run.initial_model()?;
    let mut replica = Replica {
        run,
        outer: Outer::new(config, &model)?,
        inner: InnerOptimizer::new(&model, config.adamw(), config.schedule(rounds))?,
        model,
    };
    let mut report = PeerReport {
        peer,
        rounds_trained: 0,
        updates_accepted: 0,
        resyncs: 0,
        bytes_sent: 0,
        last_train_loss: f32::NAN,
    };
    let mut round = Round(0);
    if open > round {
        round = resync(&rt, &client, &mut replica, &mut report)?;
    }

    // Heartbeats keep this peer in the membership while it computes.
    let current = Arc::new(AtomicU32::new(round.0));
    let beat = {
        let (client, current, every) = (client.clone(), current.clone(), opts.heartbeat);
        rt.spawn(async move {
            loop {
                let _ = client
                    .heartbeat(Round(current.load(Ordering::Relaxed)))
                    .await;
                tokio::time::sleep(every).await;
            }
        })
    };

    let dense = 4 * replica.model.parameter_count();
    let micro = config.micro_batch as usize;
    while round < rounds {
        current.store(round.0, Ordering::Relaxed);
        let started = Instant::now();
        let batches = run.batches(peer.index(), round.0);
        let Replica {
            model,
            outer,
            inner,
            ..
        } = &mut replica;
        let update = match outer.local_round(model, inner, &batches, micro) {
            Ok(update) => {
                report.rounds_trained += 1;
                report.last_train_loss = update.1;
                Some(update)
            }
            // A diverged step: no update this round; take everyone else's.
            Err(e) => {
                tracing::warn!(%peer, round = round.0, error = %e, "no update this round");
                None
            }
        };
        let computed = started.elapsed();
        let result = rt.block_on(
            client.exchange_round(round, update.as_ref().map(|(b, l)| (b.as_slice(), *l))),
        );
        let entries = match result {
            Ok(result) => {
                if let Some(n) = result.accepted_bytes {
                    report.updates_accepted += 1;
                    report.bytes_sent += n;
                }
                if result.rounds != rounds {
                    // The operator changed the run's length: apply this round and go
                    // on with the exchange's schedule, as the exchange does.
                    tracing::info!(%peer, from = rounds.0, to = result.rounds.0, "run length changed");
                    rounds = result.rounds;
                    replica.inner.set_schedule(config.schedule(rounds));
                }
                result.entries
            }
            Err(e) => match e.refusal().map(|r| r.reason) {
                Some(Reason::Resync) => {
                    round = resync(&rt, &client, &mut replica, &mut report)?;
                    continue;
                }
                Some(Reason::RunDone) => break,
                _ => return Err(e.into()),
            },
        };
        if let Some((bytes, loss)) = &update {
            tracing::info!(
                %peer,
                round = format!("{}/{}", round.0 + 1, rounds.0),
                train_loss = format!("{loss:.4}"),
                update_bytes = bytes.len(),
                compression = format!("{:.1}x", dense as f64 / bytes.len() as f64),
                compute_s = format!("{:.2}", computed.as_secs_f64()),
                round_s = format!("{:.2}", started.elapsed().as_secs_f64()),
                updates = entries.len(),
                "round done"
            );
        }
        let updates: Vec<(&[u8], f32)> = entries
            .iter()
            .map(|e| (e.bytes.as_slice(), e.weight))
            .collect();
        let Replica {
            model,
            outer,
            inner,
            ..
        } = &mut replica;
        outer.apply(model, Some(inner), &updates, config.outer_lr)?;
        tracing::debug!(%peer, round = round.0, updates = entries.len(), "round applied");
        round = round.next();
    }
    beat.abort();
    if let Some(dir) = &opts.checkpoint_dir {
        let meta = serde_json::json!({
            "round": round.0,
            "peer": peer.to_string(),
            "seed": config.seed,
            "algorithm": config.algorithm,
            "tokenizer": run.tokenizer.name(),
        });
        save_checkpoint(dir, &replica.model, &meta, &run.tokenizer.files())?;
    }
    tracing::info!(%peer, ?report, "run finished");
    Ok(report)
}

/// A peer's copy of the run: its model and the optimisers that move it.
struct Replica<'a> {
    run: &'a Run,
    model: Llama,
    outer: Outer,
    inner: InnerOptimizer,
}

/// Replaces this peer's state with the exchange's and returns the round to work on.
fn resync(
    rt: &tokio::runtime::Runtime,
    client: &ExchangeClient,
    replica: &mut Replica,
    report: &mut PeerReport,
) -> Result<Round, PeerError> {
    let (round, bytes) = rt.block_on(client.fetch_state())?;
    let imported = replica.outer.import(&replica.model, &bytes)?;
    let steps = u64::from(imported.0) * u64::from(replica.run.config.steps_per_round());
    replica.inner.set_steps(steps);
    report.resyncs += 1;
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
