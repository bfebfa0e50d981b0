//! AdamW on the CPU in one pass per parameter, parameters in parallel.
//!
//! candle's AdamW is ten tensor operations per parameter, and on the CPU each runs on one
//! thread (see [`crate::cpu`]): on llama-125m it took 40% of a two-thread step. This is
//! the same update, term for term, as one loop over each parameter's values, with the
//! parameters spread over the threads.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

use super::fused::with_data;

pub struct CpuAdamW {
    /// First and second moments of each parameter, in the order of the optimiser's vars.
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    step: i32,
}

impl CpuAdamW {
    pub fn new(vars: &[Var]) -> Self {
        let moments = vars
            .iter()
            .map(|v| (vec![0.0; v.elem_count()], vec![0.0; v.elem_count()]))
            .collect();
        Self { moments, step: 0 }
    }

    /// One step: each parameter with a gradient in `grads` (times `grad_scale`, the
    /// clipping factor) moves by AdamW with decoupled weight decay and bias correction.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &GradStore,
        p: &ParamsAdamW,
        grad_scale: f64,
    ) -> candle_core::Result<()> {
        self.step += 1;
        let f = |x: f64| x as f32;
        let (b1, b2, eps, lr, g_scale) = (f(p.beta1), f(p.beta2), f(p.eps), f(p.lr), f(grad_scale));
        let scale_m = f(1.0 / (1.0 - p.beta1.powi(self.step)));
        let scale_v = f(1.0 / (1.0 - p.beta2.powi(self.step)));
        let decay = f(1.0 - p.lr * p.weight_decay);
        vars.par_iter()
            .zip(self.moments.par_iter_mut())
            .try_for_each(|(var, (m, v))| {
                let Some(g) = grads.get(var.as_tensor()) else {
                    return Ok(());
                };
                let next = with_data(var.as_tensor(), "adamw", |theta| {
                    with_data(g, "adamw", |g| {
                        let mut next = vec![0f32; theta.len()];
                        for i in 0..theta.len() {
                            let gi = g[i] * g_scale;
                            m[i] = b1 * m[i] + (1.0 - b1) * gi;
                            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                            let step = (m[i] * scale_m) / ((v[i] * scale_v).sqrt() + eps);
                            next[i] = theta[i] * decay - step * lr;
                        }
                        next
                    })
                })??;
                var.set(&Tensor::from_vec(next, var.shape(), var.device())?)
            })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer};

    use super::*;

    #[test]
    fn three_steps_match_candles_adamw() {
        let params = ParamsAdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let start: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let var = || Var::from_vec(start.clone(), (3, 100), &Device::Cpu).unwrap();
        let (ours, theirs) = (vec![var(), var()], vec![var(), var()]);
        let mut cpu = CpuAdamW::new(&ours);
        let mut reference = AdamW::new(theirs.clone(), params.clone()).unwrap();
        for step in 0..3 {
            // The same loss on both: Σ θ² · (step + 1) on the first parameter, Σ θ on the
            // second (the gradient grad-scaled by one half on our side, as clipping does).
            let grads = |vars: &[Var], scale: f64| {
                let a = (vars[0].as_tensor().sqr().unwrap().sum_all().unwrap() * (step + 1) as f64)
                    .unwrap();
                let b = vars[1].as_tensor().sum_all().unwrap();
                ((a + b).unwrap() * scale).unwrap().backward().unwrap()
            };
            cpu.step(&ours, &grads(&ours, 2.0), &params, 0.5).unwrap();
            reference.step(&grads(&theirs, 1.0)).unwrap();
        }
        for (a, b) in ours.iter().zip(&theirs) {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_ne!(a, start, "the parameters moved");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{x} vs {y}");
            }
        }
    }
}
