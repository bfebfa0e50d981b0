//! One peer's side of an outer round, independent of how updates travel: SparseLoCo
//! ([`RoundState`]) and, as a baseline, dense DiLoCo ([`DilocoState`]).
//!
//! Every peer starts a round holding the same global parameters θ. After its inner steps
//! it holds θᵢ; [`RoundState::make_update`] compresses the pseudo-gradient Δᵢ = θ − θᵢ with
//! the peer's error feedback, and [`RoundState::apply`] takes the round's accepted updates
//! and sets θ ← θ − α·aggregate(Δ) on the model. Peers that apply the same updates, with
//! the same weights, in the same order, end the round with bit-identical θ.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use crate::codec::{AggregationRule, CodecError, Compressor, Finite, Update, outer_step};
use crate::data::Batch;
use crate::model::{InnerOptimizer, Llama, ModelError};
use crate::run::{Algorithm, RunConfig};

/// What a peer does at the end of its inner steps, and when a round closes.
pub trait OuterLoop {
    type Update;
    /// This peer's update for the round, from the model after its inner steps.
    fn make_update(&mut self, model: &Llama) -> Result<Self::Update, RoundError>;
    /// Applies the round's accepted updates (same order on every peer) to the global θ
    /// and writes it to the model.
    fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&Self::Update, f32)],
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

impl RoundState {
    /// Whether `update` is one this run applies: encoded with the run's chunk, k and value
    /// bits (a peer choosing its own could send a nearly dense update every peer then
    /// downloads), with every tensor of the model once, in its shape.
    fn check_update(&self, model: &Llama, update: &Update) -> Result<(), RoundError> {
        let layout = Self::layout(model);
        let layout = layout.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
        Ok(update.check_fits(self.compressor.config(), layout)?)
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
        })
    }

    /// The model's tensors as `(name, shape)`, for checking an update's layout.
    pub fn layout(model: &Llama) -> Vec<(String, Vec<u64>)> {
        model
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().iter().map(|&d| d as u64).collect()))
            .collect()
    }
}

impl OuterLoop for RoundState {
    type Update = Update;

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

/// A dense pseudo-gradient: every tensor in fp32, carried as a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseUpdate {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl DenseUpdate {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with(None)
    }

    fn to_bytes_with(&self, meta: Option<std::collections::HashMap<String, String>>) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .expect("shape matches data");
                (name.clone(), view)
            });
        safetensors::tensor::serialize(views, meta).expect("in-memory serialisation")
    }

    /// Parses and checks an update: fp32 only, every value finite.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RoundError> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| RoundError::Dense(e.to_string()))?;
        let mut tensors = vec![];
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(RoundError::Dense(format!("{name}: not float32")));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Finite::new(&values).map_err(|e| e.in_tensor(&name))?;
            tensors.push((name, view.shape().to_vec(), values));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { tensors })
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&[f32], RoundError> {
        match self.tensors.iter().find(|t| t.0 == name) {
            Some((_, s, v)) if s == shape => Ok(v),
            Some((_, s, _)) => Err(RoundError::Dense(format!(
                "{name}: shape {s:?}, the model has {shape:?}"
            ))),
            None => Err(RoundError::Dense(format!("{name} is missing"))),
        }
    }
}

/// Dense DiLoCo (Douillard et al., 2023), the baseline SparseLoCo is measured against:
/// peers send full fp32 pseudo-gradients, the mean is applied with Nesterov momentum,
/// v ← μ·v + Δ̄, θ ← θ − α·(Δ̄ + μ·v).
pub struct DilocoState {
    global: Vec<Vec<f32>>,
    velocity: Vec<Vec<f32>>,
    momentum: f32,
}

impl DilocoState {
    pub fn new(model: &Llama, momentum: f32) -> Result<Self, RoundError> {
        let (global, velocity) = global_and_zeros(model)?;
        Ok(Self {
            global,
            velocity,
            momentum,
        })
    }
}

impl OuterLoop for DilocoState {
    type Update = DenseUpdate;

    fn make_update(&mut self, model: &Llama) -> Result<DenseUpdate, RoundError> {
        let mut deltas = Vec::new();
        pseudo_gradients(model, &self.global, &mut deltas)?;
        let tensors = model
            .params()
            .iter()
            .zip(deltas)
            .map(|((name, var), d)| (name.clone(), var.dims().to_vec(), d))
            .collect();
        Ok(DenseUpdate { tensors })
    }

    fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&DenseUpdate, f32)],
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        let total: f32 = updates.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Ok(()); // nothing accepted: θ stays
        }
        let mut mean = Vec::new();
        for (i, (name, var)) in model.params().iter().enumerate() {
            mean.clear();
            mean.resize(self.global[i].len(), 0.0f32);
            for (u, w) in updates {
                for (m, d) in mean.iter_mut().zip(u.tensor(name, var.dims())?) {
                    *m += w / total * d;
                }
            }
            let (g, v) = (&mut self.global[i], &mut self.velocity[i]);
            for ((g, v), m) in g.iter_mut().zip(v.iter_mut()).zip(&mean) {
                *v = self.momentum * *v + m;
                *g -= outer_lr * (m + self.momentum * *v);
            }
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
                let codec = run.codec().map_err(|e| RoundError::Dense(e.to_string()))?;
                Outer::SparseLoCo(RoundState::new(model, codec, run.aggregation())?)
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
                tensors.push((name.clone(), var.dims().to_vec(), g));
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
                let total: f32 = parsed.iter().map(|(_, w)| w).sum();
                if total <= 0.0 {
                    return Ok(()); // nothing accepted: no step on any replica
                }
                let mut grads = candle_core::backprop::GradStore::default();
                for (name, var) in model.params() {
                    let mut mean = vec![0.0f32; var.elem_count()];
                    for (u, w) in &parsed {
                        for (m, g) in mean.iter_mut().zip(u.tensor(name, var.dims())?) {
                            *m += w / total * g;
                        }
                    }
                    let g =
                        Tensor::from_slice(&mean, var.dims(), var.device()).map_err(|source| {
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

    /// The global state at the start of `round` as a safetensors file: the parameters
    /// under their model names, outer momentum under `outer.velocity.<name>`.
    pub fn export(&self, model: &Llama, round: Round) -> Result<Vec<u8>, RoundError> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let global = match self {
            Outer::SparseLoCo(s) => s.global.clone(),
            Outer::DiLoCo(s) => s.global.clone(),
            Outer::Ddp => read(model)?,
        };
        for ((name, var), g) in model.params().iter().zip(global) {
            tensors.push((name.clone(), var.dims().to_vec(), g));
        }
        if let Outer::DiLoCo(s) = self {
            for ((name, var), v) in model.params().iter().zip(&s.velocity) {
                tensors.push((format!("{VELOCITY}{name}"), var.dims().to_vec(), v.clone()));
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

fn parse_dense(updates: &[(&[u8], f32)]) -> Result<Vec<(DenseUpdate, f32)>, RoundError> {
    updates
        .iter()
        .map(|(b, w)| Ok((DenseUpdate::from_bytes(b)?, *w)))
        .collect()
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
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::codec::{CodecConfig, ValueBits};
    use crate::data::Assignment;
    use crate::model::{AdamWConfig, InnerOptimizer, LrSchedule};
    use crate::testing::{loss_on, shakespeare, small_config as small};

    fn bits(m: &Llama) -> Vec<u32> {
        read(m)
            .unwrap()
            .concat()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    struct Outcome {
        before: f32,
        after: f32,
        /// Dense fp32 bytes of all pseudo-gradients / bytes actually sent.
        ratio: f64,
    }

    /// Three peers train for six rounds of 15 inner steps with `outer`; replicas must be
    /// bit-identical after every round.
    fn federate<S: OuterLoop>(
        outer: impl Fn(&Llama) -> S,
        outer_lr: f32,
        bytes: impl Fn(&S::Update) -> usize,
    ) -> Outcome {
        let (peers, rounds, inner, rows, seq) = (3usize, 6u32, 15usize, 16usize, 64usize);
        let (train, val) = shakespeare(seq);
        let assignment =
            Assignment::new(9, peers as u32, (inner * rows) as u64, seq, train.len()).unwrap();
        let schedule = LrSchedule {
            peak: 3e-3,
            warmup: 10,
            total: u64::from(rounds) * inner as u64,
            floor: 0.1,
        };
        let models: Vec<Llama> = (0..peers)
            .map(|_| Llama::new(small(), 9, &Device::Cpu).unwrap())
            .collect();
        let mut opts: Vec<_> = models
            .iter()
            .map(|m| InnerOptimizer::new(m, AdamWConfig::default(), schedule.clone()).unwrap())
            .collect();
        let mut states: Vec<S> = models.iter().map(&outer).collect();
        let before = loss_on(&models[0], &val);
        let mut sent = 0;
        for round in 0..rounds {
            let mut updates = vec![];
            for p in 0..peers {
                for w in assignment.peer_round(p as u32, round).chunks(rows) {
                    opts[p]
                        .step(&models[p], &assignment.batch(&train, w), rows)
                        .unwrap();
                }
                let u = states[p].make_update(&models[p]).unwrap();
                sent += bytes(&u);
                updates.push(u);
            }
            let weighted: Vec<_> = updates.iter().map(|u| (u, 1.0)).collect();
            for (state, model) in states.iter_mut().zip(&models) {
                state.apply(model, &weighted, outer_lr).unwrap();
            }
            let reference = bits(&models[0]);
            for m in &models[1..] {
                assert!(bits(m) == reference, "replicas diverged in round {round}");
            }
        }
        let dense = 4 * models[0].parameter_count() * peers * rounds as usize;
        Outcome {
            before,
            after: loss_on(&models[0], &val),
            ratio: dense as f64 / sent as f64,
        }
    }

    #[test]
    fn sparseloco_peers_improve_together_on_a_hundredth_of_the_traffic() {
        let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
        let sparse = federate(
            |m| {
                let c = Compressor::new(codec, 0.95).unwrap();
                RoundState::new(m, c, AggregationRule::WeightedMean).unwrap()
            },
            1.0,
            |u| u.to_bytes().len(),
        );
        let dense = federate(
            |m| DilocoState::new(m, 0.9).unwrap(),
            0.7,
            |u| u.to_bytes().len(),
        );
        eprintln!(
            "held-out loss: SparseLoCo {:.3} -> {:.3} ({:.0}x less traffic), DiLoCo {:.3} -> {:.3} ({:.2}x)",
            sparse.before, sparse.after, sparse.ratio, dense.before, dense.after, dense.ratio
        );
        assert!(
            sparse.after < sparse.before - 1.0,
            "SparseLoCo: {} -> {}",
            sparse.before,
            sparse.after
        );
        assert!(
            dense.after < dense.before - 1.0,
            "DiLoCo: {} -> {}",
            dense.before,
            dense.after
        );
        assert!(
            sparse.ratio > 50.0,
            "SparseLoCo sent only {:.1}x less than dense",
            sparse.ratio
        );
        assert!(
            (0.95..1.0).contains(&dense.ratio),
            "dense ratio {}",
            dense.ratio
        );
    }

    #[test]
    fn a_diverged_peer_is_refused_and_keeps_its_error_feedback() {
        let m = Llama::new(small(), 1, &Device::Cpu).unwrap();
        let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
        let c = Compressor::new(codec, 0.95).unwrap();
        let mut state = RoundState::new(&m, c, AggregationRule::WeightedMean).unwrap();
        let mut diloco = DilocoState::new(&m, 0.9).unwrap();
        let (name, var) = &m.params()[3];
        let poisoned = (var.as_tensor() * f64::NAN).unwrap();
        var.set(&poisoned).unwrap();
        let err = state.make_update(&m).err().unwrap();
        assert!(err.to_string().contains(name.as_str()), "{err}");
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert!(state.error_feedback.iter().flatten().all(|&e| e == 0.0));
        assert!(diloco.make_update(&m).is_err());
    }

    #[test]
    fn dense_updates_round_trip_and_bad_ones_are_refused() {
        let m = Llama::new(small(), 2, &Device::Cpu).unwrap();
        let mut state = DilocoState::new(&m, 0.9).unwrap();
        let (_, var) = &m.params()[0];
        var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
        let update = state.make_update(&m).unwrap();
        let bytes = update.to_bytes();
        let parsed = DenseUpdate::from_bytes(&bytes).unwrap();
        let embed = var.dims().to_vec();
        assert_eq!(
            parsed.tensor("model.embed_tokens.weight", &embed).unwrap(),
            update.tensor("model.embed_tokens.weight", &embed).unwrap()
        );
        assert!(DenseUpdate::from_bytes(&bytes[..bytes.len() / 2]).is_err());
        assert!(DenseUpdate::from_bytes(b"not safetensors").is_err());
        // A NaN smuggled into the payload is caught on parse.
        let mut poisoned = bytes.clone();
        let at = poisoned.len() - 4;
        poisoned[at..].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = DenseUpdate::from_bytes(&poisoned).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        // Applying an update for another model names the problem.
        let wrong = DenseUpdate {
            tensors: vec![("model.norm.weight".into(), vec![3], vec![0.0; 3])],
        };
        let err = state.apply(&m, &[(&wrong, 1.0)], 0.7).unwrap_err();
        assert!(
            err.to_string()
                .contains("model.embed_tokens.weight is missing"),
            "{err}"
        );
    }
}
