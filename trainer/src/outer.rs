//! One peer's side of a SparseLoCo round, independent of how updates travel.
//!
//! Every peer starts a round holding the same global parameters θ. After its inner steps
//! it holds θᵢ; [`RoundState::make_update`] compresses the pseudo-gradient Δᵢ = θ − θᵢ with
//! the peer's error feedback, and [`RoundState::apply`] takes the round's accepted updates
//! and sets θ ← θ − α·aggregate(Δ) on the model. Peers that apply the same updates, with
//! the same weights, in the same order, end the round with bit-identical θ.

use candle_core::Tensor;

use crate::codec::{AggregationRule, CodecError, Compressor, Finite, Update, aggregate};
use crate::model::{Llama, ModelError};

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
}

/// A peer's state across rounds: the global θ of the current round and the error
/// feedback of every tensor.
pub struct RoundState {
    compressor: Compressor,
    /// θ at the start of the round, per parameter (model order).
    global: Vec<Vec<f32>>,
    error_feedback: Vec<Vec<f32>>,
}

fn read(model: &Llama) -> Result<Vec<Vec<f32>>, RoundError> {
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

impl RoundState {
    /// Starts from the model's current parameters as the global θ.
    pub fn new(model: &Llama, compressor: Compressor) -> Result<Self, RoundError> {
        let global = read(model)?;
        let error_feedback = global.iter().map(|g| vec![0.0; g.len()]).collect();
        Ok(Self {
            compressor,
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

    /// Compresses this peer's pseudo-gradient θ − θᵢ (θᵢ: the model after its inner
    /// steps). A diverged model (non-finite Δ) is refused and leaves error feedback as it
    /// was.
    pub fn make_update(&mut self, model: &Llama) -> Result<Update, RoundError> {
        let local = read(model)?;
        // Every pseudo-gradient is computed and checked before any is compressed, so a
        // non-finite tensor anywhere leaves all error feedback untouched.
        let mut deltas: Vec<Vec<f32>> = local.iter().map(|l| vec![0.0; l.len()]).collect();
        let finite = deltas
            .iter_mut()
            .zip(self.global.iter().zip(&local))
            .zip(model.params())
            .map(|((d, (g, l)), (name, _))| {
                Finite::pseudo_gradient(g, l, d).map_err(|e| e.in_tensor(name))
            })
            .collect::<Result<Vec<Finite<'_>>, CodecError>>()?;
        let mut tensors = Vec::with_capacity(finite.len());
        for (i, ((name, var), delta)) in model.params().iter().zip(finite).enumerate() {
            let shape: Vec<u64> = var.dims().iter().map(|&d| d as u64).collect();
            let ef = &mut self.error_feedback[i];
            tensors.push(self.compressor.compress(name, &shape, delta, ef)?);
        }
        Ok(Update::new(self.compressor.config(), tensors)?)
    }

    /// Ends the round: θ ← θ − `outer_lr` · aggregate(`updates`), written to the model and
    /// kept as the next round's global θ. `updates` must be in the same order on every
    /// peer (e.g. by peer id) for replicas to stay bit-identical.
    pub fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&Update, f32)],
        rule: AggregationRule,
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        let layout = Self::layout(model);
        for (update, _) in updates {
            update.check_layout(layout.iter().map(|(n, s)| (n.as_str(), s.as_slice())))?;
        }
        let mut step = Vec::new();
        for (i, (name, var)) in model.params().iter().enumerate() {
            let inputs: Vec<_> = updates
                .iter()
                .map(|(u, w)| (u.tensor(name).expect("layout checked"), *w))
                .collect();
            step.resize(self.global[i].len(), 0.0);
            aggregate(rule, &inputs, &mut step)?;
            for (g, s) in self.global[i].iter_mut().zip(&step) {
                *g -= outer_lr * s;
            }
            Tensor::from_slice(&self.global[i], var.dims(), var.device())
                .and_then(|t| var.set(&t))
                .map_err(|source| RoundError::Tensor {
                    tensor: name.clone(),
                    source,
                })?;
        }
        Ok(())
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

    #[test]
    fn peers_training_together_improve_and_stay_bit_identical() {
        let (peers, rounds, inner, rows, seq) = (3usize, 6u32, 15usize, 16usize, 64usize);
        let (train, val) = shakespeare(seq);
        let assignment =
            Assignment::new(9, peers as u32, (inner * rows) as u64, seq, train.len()).unwrap();
        let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
        let schedule = LrSchedule {
            peak: 3e-3,
            warmup: 10,
            total: u64::from(rounds) * inner as u64,
            floor: 0.1,
        };
        let mut models = vec![];
        let mut opts = vec![];
        let mut states = vec![];
        for _ in 0..peers {
            let m = Llama::new(small(), 9, &Device::Cpu).unwrap();
            opts.push(InnerOptimizer::new(&m, AdamWConfig::default(), schedule.clone()).unwrap());
            states.push(RoundState::new(&m, Compressor::new(codec, 0.95).unwrap()).unwrap());
            models.push(m);
        }
        let before = loss_on(&models[0], &val);
        let dense_bytes = 4 * models[0].parameter_count();
        let mut sent = 0;
        for round in 0..rounds {
            let mut updates = vec![];
            for p in 0..peers {
                let windows = assignment.peer_round(p as u32, round);
                for w in windows.chunks(rows) {
                    opts[p]
                        .step(&models[p], &assignment.batch(&train, w), rows)
                        .unwrap();
                }
                let u = states[p].make_update(&models[p]).unwrap();
                sent += u.to_bytes().len();
                updates.push(u);
            }
            let weighted: Vec<_> = updates.iter().map(|u| (u, 1.0)).collect();
            for p in 0..peers {
                states[p]
                    .apply(&models[p], &weighted, AggregationRule::WeightedMean, 1.0)
                    .unwrap();
            }
            let reference = bits(&models[0]);
            for m in &models[1..] {
                assert!(bits(m) == reference, "replicas diverged in round {round}");
            }
        }
        let after = loss_on(&models[0], &val);
        let ratio = (dense_bytes * peers * rounds as usize) as f64 / sent as f64;
        eprintln!("validation loss {before} -> {after}, {ratio:.0}x less than dense");
        assert!(
            after < before - 1.0,
            "validation loss only fell from {before} to {after}"
        );
        assert!(ratio > 50.0, "updates only {ratio:.1}x smaller than dense");
    }

    #[test]
    fn a_diverged_peer_is_refused_and_keeps_its_error_feedback() {
        let m = Llama::new(small(), 1, &Device::Cpu).unwrap();
        let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
        let mut state = RoundState::new(&m, Compressor::new(codec, 0.95).unwrap()).unwrap();
        let (name, var) = &m.params()[3];
        let poisoned = (var.as_tensor() * f64::NAN).unwrap();
        var.set(&poisoned).unwrap();
        let err = state.make_update(&m).err().unwrap();
        assert!(err.to_string().contains(name.as_str()), "{err}");
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert!(state.error_feedback.iter().flatten().all(|&e| e == 0.0));
    }
}
