//! One peer's side of an outer round, independent of how updates travel: SparseLoCo
//! ([`RoundState`]) and, as a baseline, dense DiLoCo ([`DilocoState`]).
//!
//! Every peer starts a round holding the same global parameters θ. After its inner steps
//! it holds θᵢ; [`RoundState::make_update`] compresses the pseudo-gradient Δᵢ = θ − θᵢ with
//! the peer's error feedback, and [`RoundState::apply`] takes the round's accepted updates
//! and sets θ ← θ − α·aggregate(Δ) on the model. Peers that apply the same updates, with
//! the same weights, in the same order, end the round with bit-identical θ.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use crate::codec::{
    AggregationRule, CodecConfig, CodecError, Compressor, Finite, Update, outer_step,
};
use crate::data::Batch;
use crate::model::{InnerOptimizer, Llama, ModelError};
use crate::run::{Algorithm, RunConfig};

mod dense;
mod download;

pub use dense::{DenseUpdate, DilocoState};
use dense::{parse_dense, weighted_mean};
pub use download::{Aggregator, Download, Step, gathered};

/// What a peer does at the end of its inner steps, and when a round closes.
pub trait OuterLoop {
    /// An update, which may borrow the bytes it was read from.
    type Update<'a>;
    /// This peer's update for the round, from the model after its inner steps.
    fn make_update(&mut self, model: &Llama) -> Result<Self::Update<'static>, RoundError>;
    /// Applies the round's accepted updates (same order on every peer) to the global θ
    /// and writes it to the model.
    fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&Self::Update<'_>, f32)],
        outer_lr: f32,
    ) -> Result<(), RoundError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor {tensor}: {source}")]
    Tensor {
        tensor: String,
        source: candle_core::Error,
    },
    #[error("dense update: {0}")]
    Dense(String),
}

/// A peer's state across rounds: the global θ of the current round and the error
/// feedback of every tensor.
pub struct RoundState {
    compressor: Compressor,
    rule: AggregationRule,
    /// θ at the start of the round, per parameter (model order).
    global: Vec<Vec<f32>>,
    error_feedback: Vec<Vec<f32>>,
    /// The codec of the exchange's aggregates, when the run's step is one
    /// ([`Download::Aggregate`]).
    aggregate: Option<CodecConfig>,
}

/// The model's parameters (model order), flattened.
pub(crate) fn read(model: &Llama) -> Result<Vec<Vec<f32>>, RoundError> {
    model
        .params()
        .iter()
        .map(|(name, var)| {
            var.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|source| RoundError::Tensor {
                    tensor: name.clone(),
                    source,
                })
        })
        .collect()
}

/// The model's parameters as the starting global θ, and a zeroed per-parameter buffer of
/// the same shapes (error feedback, or momentum).
#[allow(clippy::type_complexity)]
fn global_and_zeros(model: &Llama) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>), RoundError> {
    let global = read(model)?;
    let zeros = global.iter().map(|g| vec![0.0; g.len()]).collect();
    Ok((global, zeros))
}

/// Writes `global` (model order) into the model's parameters.
pub(crate) fn write(model: &Llama, global: &[Vec<f32>]) -> Result<(), RoundError> {
    for ((name, var), values) in model.params().iter().zip(global) {
        Tensor::from_slice(values, var.dims(), var.device())
            .and_then(|t| var.set(&t))
            .map_err(|source| RoundError::Tensor {
                tensor: name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Pseudo-gradients θ − θᵢ of every tensor into `deltas`, all checked finite before any
/// is used, so a diverged peer changes no state.
fn pseudo_gradients<'a>(
    model: &Llama,
    global: &[Vec<f32>],
    deltas: &'a mut Vec<Vec<f32>>,
) -> Result<Vec<Finite<'a>>, RoundError> {
    let local = read(model)?;
    *deltas = local.iter().map(|l| vec![0.0; l.len()]).collect();
    deltas
        .iter_mut()
        .zip(global.iter().zip(&local))
        .zip(model.params())
        .map(|((d, (g, l)), (name, _))| {
            Finite::pseudo_gradient(g, l, d).map_err(|e| e.in_tensor(name).into())
        })
        .collect()
}

/// Whether `update` is encoded with `config` and has every tensor of `model` once, in
/// its shape: the one check of a peer's update and of the exchange's aggregate.
pub(crate) fn fits(model: &Llama, update: &Update, config: CodecConfig) -> Result<(), RoundError> {
    let layout = RoundState::layout(model);
    let layout = layout.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    Ok(update.check_fits(config, layout)?)
}

impl RoundState {
    /// Whether `update` is one this run applies: encoded with the run's chunk, k and value
    /// bits (a peer choosing its own could send a nearly dense update every peer then
    /// downloads), with every tensor of the model once, in its shape.
    fn check_update(&self, model: &Llama, update: &Update) -> Result<(), RoundError> {
        fits(model, update, self.compressor.config())
    }

    /// Starts from the model's current parameters as the global θ.
    pub fn new(
        model: &Llama,
        compressor: Compressor,
        rule: AggregationRule,
    ) -> Result<Self, RoundError> {
        let (global, error_feedback) = global_and_zeros(model)?;
        Ok(Self {
            compressor,
            rule,
            global,
            error_feedback,
            aggregate: None,
        })
    }

    /// The same state, taking its steps as the exchange's aggregates made with `config`.
    pub fn with_aggregates(self, config: CodecConfig) -> Self {
        Self {
            aggregate: Some(config),
            ..self
        }
    }

    /// θ ← θ − `outer_lr` · `aggregate`, decoded as it is. Every replica and the exchange
    /// that made it compute the same bytes.
    fn apply_aggregate(
        &mut self,
        model: &Llama,
        aggregate: &Update,
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        let config = self.aggregate.ok_or(RoundError::Dense(
            "this run's rounds carry updates, not an aggregate".into(),
        ))?;
        fits(model, aggregate, config)?;
        let mut step = Vec::new();
        for (i, (name, _)) in model.params().iter().enumerate() {
            let input = [(aggregate.tensor(name).expect("layout checked"), 1.0)];
            let rule = AggregationRule::WeightedMean;
            outer_step(rule, &input, outer_lr, &mut self.global[i], &mut step)?;
        }
        write(model, &self.global)
    }

    /// The model's tensors as `(name, shape)`, for checking an update's layout.
    fn layout(model: &Llama) -> Vec<(String, Vec<u64>)> {
        model
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().iter().map(|&d| d as u64).collect()))
            .collect()
    }
}

impl OuterLoop for RoundState {
    type Update<'a> = Update;

    /// Compresses this peer's pseudo-gradient θ − θᵢ with its error feedback. A diverged
    /// model (non-finite Δ anywhere) is refused and leaves error feedback as it was.
    fn make_update(&mut self, model: &Llama) -> Result<Update, RoundError> {
        let mut buffers = Vec::new();
        let deltas = pseudo_gradients(model, &self.global, &mut buffers)?;
        let mut tensors = Vec::with_capacity(deltas.len());
        for (i, ((name, var), delta)) in model.params().iter().zip(deltas).enumerate() {
            let shape: Vec<u64> = var.dims().iter().map(|&d| d as u64).collect();
            let ef = &mut self.error_feedback[i];
            tensors.push(self.compressor.compress(name, &shape, delta, ef)?);
        }
        Ok(Update::new(self.compressor.config(), tensors)?)
    }

    /// θ ← θ − `outer_lr` · aggregate(`updates`) under the state's aggregation rule.
    fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&Update, f32)],
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        for (update, _) in updates {
            self.check_update(model, update)?;
        }
        let mut step = Vec::new();
        for (i, (name, _)) in model.params().iter().enumerate() {
            let inputs: Vec<_> = updates
                .iter()
                .map(|(u, w)| (u.tensor(name).expect("layout checked"), *w))
                .collect();
            outer_step(self.rule, &inputs, outer_lr, &mut self.global[i], &mut step)?;
        }
        write(model, &self.global)
    }
}

/// A run's outer loop as the exchange and every peer hold it: the global state, and how
/// updates — as the bytes that travel — are made and applied. Peers that apply the same
/// updates with the same weights in the same order stay bit-identical, and so does the
/// exchange, which is how it can hand a late peer the state everyone else has.
pub enum Outer {
    SparseLoCo(RoundState),
    DiLoCo(DilocoState),
    /// Data-parallel baseline: updates are gradients and the "outer" step is the shared
    /// AdamW step, so no state beyond the model and its optimiser.
    Ddp,
}

/// Prefix of the outer momentum tensors in an exported state.
const VELOCITY: &str = "outer.velocity.";

/// A peer's update for one round, its mean training loss, and where the time went.
#[derive(Debug)]
pub struct LocalUpdate {
    pub bytes: Vec<u8>,
    pub loss: f32,
    /// The inner steps (for DDP: the gradient of one batch).
    pub inner_steps: Duration,
    /// Making the update from the steps' result: compression, or the dense encoding.
    pub compress: Duration,
}

impl LocalUpdate {
    fn timed(bytes: Vec<u8>, loss: f32, started: Instant, inner_steps: Duration) -> Self {
        Self {
            bytes,
            loss,
            inner_steps,
            compress: started.elapsed().saturating_sub(inner_steps),
        }
    }
}

impl Outer {
    pub fn new(run: &RunConfig, model: &Llama) -> Result<Self, RoundError> {
        Ok(match run.algorithm {
            Algorithm::SparseLoCo => {
                let invalid = |e: crate::run::RunError| RoundError::Dense(e.to_string());
                let codec = run.codec().map_err(invalid)?;
                let state = RoundState::new(model, codec, run.aggregation())?;
                Outer::SparseLoCo(match run.download {
                    Download::Aggregate => {
                        state.with_aggregates(run.aggregate_codec().map_err(invalid)?.config())
                    }
                    Download::Gather | Download::All => state,
                })
            }
            Algorithm::DiLoCo => Outer::DiLoCo(DilocoState::new(model, run.outer_momentum)?),
            Algorithm::Ddp => Outer::Ddp,
        })
    }

    /// A peer's work for one round on `batches`: H inner steps and the compressed (or
    /// dense) pseudo-gradient, or for DDP the gradient of one batch and its dense
    /// encoding.
    pub fn local_round(
        &mut self,
        model: &Llama,
        inner: &mut InnerOptimizer,
        batches: &[Batch],
        micro_rows: usize,
    ) -> Result<LocalUpdate, RoundError> {
        let started = Instant::now();
        let steps = tracing::info_span!("inner_steps", batches = batches.len()).entered();
        if let Outer::Ddp = self {
            let batch = batches
                .first()
                .ok_or(RoundError::Dense("no batch".into()))?;
            let (grads, loss) = inner.gradients(model, batch, micro_rows)?;
            let inner_steps = started.elapsed();
            drop(steps);
            let _compress = tracing::info_span!("compress", dense = true).entered();
            let mut tensors = Vec::with_capacity(model.params().len());
            for (name, var) in model.params() {
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all().and_then(|g| g.to_vec1::<f32>()),
                    None => Ok(vec![0.0; var.elem_count()]),
                }
                .map_err(|source| RoundError::Tensor {
                    tensor: name.clone(),
                    source,
                })?;
                Finite::new(&g).map_err(|e| e.in_tensor(name))?;
                tensors.push((name.clone(), var.dims().to_vec(), g.into()));
            }
            let bytes = DenseUpdate { tensors }.to_bytes();
            return Ok(LocalUpdate::timed(bytes, loss, started, inner_steps));
        }
        let mut loss = 0.0;
        for batch in batches {
            loss += inner.step(model, batch, micro_rows)?;
        }
        let loss = loss / batches.len().max(1) as f32;
        let inner_steps = started.elapsed();
        drop(steps);
        let _compress = tracing::info_span!("compress").entered();
        let bytes = match self {
            Outer::SparseLoCo(s) => s.make_update(model)?.to_bytes(),
            Outer::DiLoCo(s) => s.make_update(model)?.to_bytes(),
            Outer::Ddp => unreachable!("handled above"),
        };
        Ok(LocalUpdate::timed(bytes, loss, started, inner_steps))
    }

    /// Checks that `bytes` is an update this run can apply to `model`: it decodes, every
    /// value is finite and every tensor has the model's name and shape. The exchange
    /// accepts nothing that fails this.
    pub fn check(&self, model: &Llama, bytes: &[u8]) -> Result<(), RoundError> {
        match self {
            Outer::SparseLoCo(s) => s.check_update(model, &Update::from_bytes(bytes)?)?,
            Outer::DiLoCo(_) | Outer::Ddp => {
                let update = DenseUpdate::from_bytes(bytes)?;
                if update.tensors.len() != model.params().len() {
                    return Err(RoundError::Dense(format!(
                        "{} tensors, the model has {}",
                        update.tensors.len(),
                        model.params().len()
                    )));
                }
                for (name, var) in model.params() {
                    update.tensor(name, var.dims())?;
                }
            }
        }
        Ok(())
    }

    /// Applies a closed round's accepted updates (peer order, with weights) to the global
    /// state and the model. DDP needs the optimiser whose step the gradients feed.
    pub fn apply(
        &mut self,
        model: &Llama,
        inner: Option<&mut InnerOptimizer>,
        updates: &[(&[u8], f32)],
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        match self {
            Outer::SparseLoCo(s) => {
                let parsed = updates
                    .iter()
                    .map(|(b, w)| Ok((Update::from_bytes(b)?, *w)))
                    .collect::<Result<Vec<_>, RoundError>>()?;
                let refs: Vec<_> = parsed.iter().map(|(u, w)| (u, *w)).collect();
                s.apply(model, &refs, outer_lr)
            }
            Outer::DiLoCo(s) => {
                let parsed = parse_dense(updates)?;
                let refs: Vec<_> = parsed.iter().map(|(u, w)| (u, *w)).collect();
                s.apply(model, &refs, outer_lr)
            }
            Outer::Ddp => {
                let inner = inner.ok_or(RoundError::Dense(
                    "DDP needs the optimiser to apply gradients".into(),
                ))?;
                let parsed = parse_dense(updates)?;
                let refs: Vec<_> = parsed.iter().map(|(u, w)| (u, *w)).collect();
                let Some(mean) = weighted_mean(model, &refs)? else {
                    return Ok(()); // nothing accepted: no step on any replica
                };
                let mut grads = candle_core::backprop::GradStore::default();
                for (name, var) in model.params() {
                    let mean = mean.tensor(name, var.dims())?;
                    let g =
                        Tensor::from_slice(mean, var.dims(), var.device()).map_err(|source| {
                            RoundError::Tensor {
                                tensor: name.clone(),
                                source,
                            }
                        })?;
                    grads.insert(var.as_tensor(), g);
                }
                Ok(inner.apply(grads)?)
            }
        }
    }

    /// Takes a closed round's step: its updates, or the exchange's aggregate of them.
    pub fn apply_step(
        &mut self,
        model: &Llama,
        inner: Option<&mut InnerOptimizer>,
        step: Step<'_>,
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        match (step, self) {
            (Step::Updates(updates), outer) => outer.apply(model, inner, updates, outer_lr),
            (Step::Aggregate(bytes), Outer::SparseLoCo(s)) => {
                s.apply_aggregate(model, &Update::from_bytes(bytes)?, outer_lr)
            }
            // A dense aggregate is the weighted mean: one update of weight 1.
            (Step::Aggregate(bytes), outer) => outer.apply(model, inner, &[(bytes, 1.0)], outer_lr),
        }
    }

    /// The global state at the start of `round` as a safetensors file: the parameters
    /// under their model names, outer momentum under `outer.velocity.<name>`.
    pub fn export(&self, model: &Llama, round: Round) -> Result<Vec<u8>, RoundError> {
        // Borrowed, not cloned: the state's bytes are the one copy this makes.
        let read_global;
        let global = match self {
            Outer::SparseLoCo(s) => &s.global,
            Outer::DiLoCo(s) => &s.global,
            Outer::Ddp => {
                read_global = read(model)?;
                &read_global
            }
        };
        let mut tensors: Vec<(String, Vec<usize>, Cow<[f32]>)> = Vec::new();
        for ((name, var), g) in model.params().iter().zip(global) {
            tensors.push((name.clone(), var.dims().to_vec(), g.as_slice().into()));
        }
        if let Outer::DiLoCo(s) = self {
            for ((name, var), v) in model.params().iter().zip(&s.velocity) {
                let velocity = format!("{VELOCITY}{name}");
                tensors.push((velocity, var.dims().to_vec(), v.as_slice().into()));
            }
        }
        let meta = [("round".to_owned(), round.0.to_string())].into();
        Ok(DenseUpdate { tensors }.to_bytes_with(Some(meta)))
    }

    /// Replaces the global state (and the model's parameters) with an exported one and
    /// returns the round it belongs to.
    pub fn import(&mut self, model: &Llama, bytes: &[u8]) -> Result<Round, RoundError> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| RoundError::Dense(format!("state: {e}")))?;
        let round = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("round"))
            .and_then(|r| r.parse().ok())
            .map(Round)
            .ok_or(RoundError::Dense("state has no round".into()))?;
        let state = DenseUpdate::from_bytes(bytes)?;
        let mut global = Vec::with_capacity(model.params().len());
        for (name, var) in model.params() {
            global.push(state.tensor(name, var.dims())?.to_vec());
        }
        match self {
            Outer::SparseLoCo(s) => s.global = global.clone(),
            Outer::DiLoCo(s) => {
                s.global = global.clone();
                for (i, (name, var)) in model.params().iter().enumerate() {
                    s.velocity[i] = state
                        .tensor(&format!("{VELOCITY}{name}"), var.dims())?
                        .to_vec();
                }
            }
            Outer::Ddp => {}
        }
        write(model, &global)?;
        Ok(round)
    }
}

/// An outer round's number.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Round(pub u32);

impl Round {
    pub fn next(self) -> Self {
        Round(self.0 + 1)
    }
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests;
