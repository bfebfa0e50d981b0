use candle_core::{Tensor, Var, backprop::GradStore};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::adamw::CpuAdamW;
use super::{Llama, ModelError};
use crate::data::Batch;

/// AdamW hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; `None` disables clipping.
    pub grad_clip: Option<f64>,
}

impl AdamWConfig {
    pub const DEFAULT: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        eps: 1e-8,
        grad_clip: Some(1.0),
    };
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Linear warmup to `peak`, then cosine decay to `peak · floor` at `total` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub floor: f64,
}

impl LrSchedule {
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.floor + (1.0 - self.floor) * cosine)
    }
}

/// AdamW on the CPU (one pass per parameter, see [`CpuAdamW`]) or candle's elsewhere.
enum Adam {
    Cpu(CpuAdamW, ParamsAdamW),
    Device(AdamW),
}

/// The inner loop's optimiser: one [`InnerOptimizer::step`] per batch, with gradient
/// accumulation over micro-batches and global-norm clipping.
pub struct InnerOptimizer {
    adamw: Adam,
    vars: Vec<Var>,
    config: AdamWConfig,
    schedule: LrSchedule,
    step: u64,
    /// Threads [`InnerOptimizer::gradients`] splits a batch over.
    threads: usize,
}

impl InnerOptimizer {
    pub fn new(
        model: &Llama,
        config: AdamWConfig,
        schedule: LrSchedule,
    ) -> Result<Self, ModelError> {
        let vars: Vec<Var> = model.params().iter().map(|(_, v)| v.clone()).collect();
        let params = ParamsAdamW {
            lr: schedule.at(0),
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        let adamw = if model.device().is_cpu() {
            Adam::Cpu(CpuAdamW::new(&vars), params)
        } else {
            Adam::Device(AdamW::new(vars.clone(), params)?)
        };
        Ok(Self {
            adamw,
            vars,
            config,
            schedule,
            step: 0,
            // A GPU takes a batch as one stream of kernels: splitting it over host
            // threads would only shrink its products.
            threads: if model.device().is_cpu() {
                crate::cpu::threads()
            } else {
                1
            },
        })
    }

    /// Splits each batch over `threads` threads from now on (the process's
    /// [`crate::cpu::threads`] by default).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Steps taken so far (the schedule's position).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Moves the schedule to `steps` steps taken: a peer that joins a run mid-way starts
    /// its learning rate where the others are.
    pub fn set_steps(&mut self, steps: u64) {
        self.step = steps;
    }

    /// Replaces the learning-rate schedule from the next step on: the run's length
    /// changed.
    pub fn set_schedule(&mut self, schedule: LrSchedule) {
        self.schedule = schedule;
    }

    /// One optimiser step on `batch`, forwarding `micro_rows` sequences at a time.
    /// Returns the batch's mean loss. A non-finite loss is refused before any parameter
    /// changes.
    pub fn step(
        &mut self,
        model: &Llama,
        batch: &Batch,
        micro_rows: usize,
    ) -> Result<f32, ModelError> {
        let (grads, loss) = self.gradients(model, batch, micro_rows)?;
        self.apply(grads)?;
        Ok(loss)
    }

    /// The gradient of the mean loss over `batch` (accumulated over micro-batches of
    /// `micro_rows`), and that loss; the parameters do not change.
    ///
    /// With several threads ([`InnerOptimizer::set_threads`]), the micro-batches are
    /// split into one contiguous group per thread (micro-batches shrink so that every
    /// thread has rows) and the groups' sums are added in batch order: the result depends
    /// on the thread count, never on timing. With one thread it is one sequential pass.
    pub fn gradients(
        &self,
        model: &Llama,
        batch: &Batch,
        micro_rows: usize,
    ) -> Result<(GradStore, f32), ModelError> {
        use rayon::prelude::*;
        let threads = self.threads;
        let micro_rows = micro_rows
            .clamp(1, batch.rows.max(1))
            .min(batch.rows.div_ceil(threads).max(1));
        let starts: Vec<usize> = (0..batch.rows).step_by(micro_rows).collect();
        let per_group = starts.len().div_ceil(threads).max(1);
        let groups: Vec<&[usize]> = starts.chunks(per_group).collect();
        let sums: Vec<(GradStore, f32)> = if groups.len() > 1 {
            groups
                .par_iter()
                .map(|group| self.accumulate(model, batch, group, micro_rows))
                .collect::<Result<_, _>>()?
        } else {
            vec![self.accumulate(model, batch, &starts, micro_rows)?]
        };
        let mut sums = sums.into_iter();
        let (mut total, mut loss_sum) = sums.next().unwrap_or_default();
        for (grads, loss) in sums {
            self.add_into(&mut total, &grads)?;
            loss_sum += loss;
        }
        Ok((total, loss_sum / batch.rows.max(1) as f32))
    }

    /// The gradient of the batch-mean loss restricted to the micro-batches starting at
    /// `starts`, and the sum of their rows' losses.
    fn accumulate(
        &self,
        model: &Llama,
        batch: &Batch,
        starts: &[usize],
        micro_rows: usize,
    ) -> Result<(GradStore, f32), ModelError> {
        let device = model.device();
        let mut total = GradStore::default();
        let mut loss_sum = 0.0f32;
        for &start in starts {
            let rows = micro_rows.min(batch.rows - start);
            let span = start * batch.seq..(start + rows) * batch.seq;
            let inputs =
                Tensor::from_slice(&batch.inputs[span.clone()], (rows, batch.seq), device)?;
            let targets = Tensor::from_slice(&batch.targets[span], (rows, batch.seq), device)?;
            let loss = model.loss(&inputs, &targets)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(ModelError::Diverged(value));
            }
            loss_sum += value * rows as f32;
            // Weight each micro-batch by its share of the rows: the sum is the batch mean.
            let grads = (loss * (rows as f64 / batch.rows as f64))?.backward()?;
            self.add_into(&mut total, &grads)?;
        }
        Ok((total, loss_sum))
    }

    /// `total += grads`, parameter by parameter.
    fn add_into(&self, total: &mut GradStore, grads: &GradStore) -> Result<(), ModelError> {
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let sum = match total.get(v.as_tensor()) {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                };
                total.insert(v.as_tensor(), sum);
            }
        }
        Ok(())
    }

    /// Clips `grads` to the configured global norm and takes one AdamW step with them.
    pub fn apply(&mut self, mut grads: GradStore) -> Result<(), ModelError> {
        let scale = self.clip_scale(&grads)?;
        let lr = self.schedule.at(self.step);
        match &mut self.adamw {
            Adam::Cpu(adamw, params) => {
                params.lr = lr;
                adamw.step(&self.vars, &grads, params, scale)?;
            }
            Adam::Device(adamw) => {
                if scale != 1.0 {
                    for v in &self.vars {
                        if let Some(g) = grads.remove(v.as_tensor()) {
                            grads.insert(v.as_tensor(), (g * scale)?);
                        }
                    }
                }
                adamw.set_learning_rate(lr);
                adamw.step(&grads)?;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// The factor that brings the gradients' global norm down to the configured clip (1
    /// when it is under it, or clipping is off). Parameters' squared norms are computed
    /// in parallel and summed in order.
    fn clip_scale(&self, grads: &GradStore) -> Result<f64, ModelError> {
        use rayon::prelude::*;
        let Some(clip) = self.config.grad_clip else {
            return Ok(1.0);
        };
        let squares = self
            .vars
            .par_iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?)),
                None => Ok(0.0),
            })
            .collect::<Result<Vec<f64>, candle_core::Error>>()?;
        let norm = squares.iter().sum::<f64>().sqrt();
        Ok(if norm > clip { clip / norm } else { 1.0 })
    }
}
