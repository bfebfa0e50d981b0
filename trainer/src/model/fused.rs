//! Fused CPU kernels, with their backward passes, for the model's elementwise layers:
//! RMSNorm, rotary embeddings, SwiGLU, the causal softmax of attention and the
//! cross-entropy loss.
//!
//! Written as candle's composite operations, each of these is four to ten passes over
//! its tensor forward and as many backward, and every backward op also allocates a zero
//! gradient to add into. On the tiny preset that elementwise traffic took more of a
//! training step than the matrix multiplies. Here each is one pass forward and one or
//! two backward. The composite versions in [`super::llama`] stay: they are the
//! reference these kernels are tested against, and what other devices run.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor, bail};

type Result<T> = candle_core::Result<T>;

/// The contiguous f32 data of a CPU tensor's storage.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: expected f32, got {:?}", storage.dtype())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: expected a contiguous tensor")
    };
    Ok(&data[start..end])
}

/// Runs `f` on the data of `t` (made contiguous first), which must be an f32 CPU tensor.
pub(super) fn with_data<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: the fused kernels run on the CPU")
    };
    Ok(f(slice(cpu, layout, op)?))
}

/// [`with_data`] of three tensors at once.
fn with_data3<R>(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    op: &str,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> R,
) -> Result<R> {
    // The two outer reads' results; the innermost is what is returned.
    with_data(a, op, |a| {
        with_data(b, op, |b| with_data(c, op, |c| f(a, b, c)))
    })??
}

/// A tensor of `shape` on `like`'s device from `data`.
fn tensor(data: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, like.shape(), like.device())
}

/// Σ a·b, in eight lanes so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `x / rms(x) · w` over the last dimension.
pub struct RmsNorm {
    pub eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        1.0 / (dot(row, row) / row.len() as f32 + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl, self.name())?, slice(ws, wl, self.name())?);
        let h = w.len();
        if h == 0 || xl.dims().last() != Some(&h) {
            bail!("{}: weight of {h} for input {:?}", self.name(), xl.dims())
        }
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = self.inv_rms(row);
            for ((o, &xi), &wi) in out.iter_mut().zip(row).zip(w) {
                *o = xi * r * wi;
            }
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    /// With r = 1/rms(x) and u = g·w: dx = r·u − x·r³·mean(u·x), dw = Σ_rows g·x·r.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_data3((x, w, g), self.name(), |x, w, g| {
            let h = w.len();
            let (mut dx, mut dw) = (vec![0f32; x.len()], vec![0f32; h]);
            let mut u = vec![0f32; h];
            for ((xr, gr), dxr) in x
                .chunks_exact(h)
                .zip(g.chunks_exact(h))
                .zip(dx.chunks_exact_mut(h))
            {
                let r = self.inv_rms(xr);
                for i in 0..h {
                    u[i] = gr[i] * w[i];
                    dw[i] += gr[i] * xr[i] * r;
                }
                let c = r * r * r * dot(&u, xr) / h as f32;
                for i in 0..h {
                    dxr[i] = r * u[i] - xr[i] * c;
                }
            }
            (dx, dw)
        })?;
        Ok((Some(tensor(dx, x)?), Some(tensor(dw, w)?)))
    }
}

/// `silu(gate) · up`, the SwiGLU MLP's gate.
pub struct SwiGlu;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(gs, gl, self.name())?, slice(us, ul, self.name())?);
        if gl.dims() != ul.dims() {
            bail!(
                "{}: shapes {:?} and {:?}",
                self.name(),
                gl.dims(),
                ul.dims()
            )
        }
        let y = gate
            .iter()
            .zip(up)
            .map(|(&a, &b)| a * sigmoid(a) * b)
            .collect();
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    /// d gate = g·up·σ(a)(1 + a(1 − σ(a))), d up = g·silu(a).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = with_data3((gate, up, g), self.name(), |a, b, g| {
            let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
            for i in 0..a.len() {
                let s = sigmoid(a[i]);
                da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                db[i] = g[i] * a[i] * s;
            }
            (da, db)
        })?;
        Ok((Some(tensor(da, gate)?), Some(tensor(db, up)?)))
    }
}

/// Rotary embedding in Hugging Face's rotate-half layout over `[batch, heads, seq,
/// head_dim]`: `x·cos + rotate_half(x)·sin`, with the tables' rows `0..seq`.
pub struct Rope {
    /// `[positions, head_dim]` each.
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Calls `f(position, cos row, sin row, x row, out row)` for every row of `x`.
    fn rows(
        &self,
        x: &[f32],
        dims: &[usize],
        out: &mut [f32],
        f: impl Fn(&[f32], &[f32], &[f32], &mut [f32]),
    ) -> Result<()> {
        let name = "fused-rope";
        let &[_, _, t, d] = dims else {
            bail!("{name}: expected [batch, heads, seq, head_dim], got {dims:?}")
        };
        if !d.is_multiple_of(2) || self.cos.dims() != self.sin.dims() || self.cos.dim(1)? != d {
            bail!("{name}: tables {:?} for head_dim {d}", self.cos.dims())
        }
        if self.cos.dim(0)? < t {
            bail!("{name}: {t} positions, tables for {}", self.cos.dim(0)?)
        }
        with_data(&self.cos, name, |cos| {
            with_data(&self.sin, name, |sin| {
                for (i, (xr, or)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
                    let at = (i % t) * d..(i % t + 1) * d;
                    f(&cos[at.clone()], &sin[at], xr, or);
                }
            })
        })?
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        self.rows(x, l.dims(), &mut y, |cos, sin, x, y| {
            let h = x.len() / 2;
            for j in 0..h {
                y[j] = x[j] * cos[j] - x[j + h] * sin[j];
                y[j + h] = x[j + h] * cos[j + h] + x[j] * sin[j + h];
            }
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// The transpose of the rotation: dx₁ = g₁·cos₁ + g₂·sin₂, dx₂ = g₂·cos₂ − g₁·sin₁.
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_data(g, self.name(), |g| -> Result<Vec<f32>> {
            let mut dx = vec![0f32; g.len()];
            self.rows(g, x.dims(), &mut dx, |cos, sin, g, dx| {
                let h = g.len() / 2;
                for j in 0..h {
                    dx[j] = g[j] * cos[j] + g[j + h] * sin[j + h];
                    dx[j + h] = g[j + h] * cos[j + h] - g[j] * sin[j];
                }
            })?;
            Ok(dx)
        })??;
        Ok(Some(tensor(dx, x)?))
    }
}

/// `softmax(scale · scores)` over the last dimension of `[.., seq, seq]` attention
/// scores, each query position attending to itself and earlier positions only.
pub struct CausalSoftmax {
    pub scale: f32,
}

/// The positions query row `i` of `[.., t, t]` scores may attend to.
fn visible(i: usize, t: usize) -> Range<usize> {
    0..i % t + 1
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let t = match l.dims() {
            [.., a, b] if a == b => *b,
            dims => bail!("{}: expected [.., seq, seq], got {dims:?}", self.name()),
        };
        let mut p = vec![0f32; x.len()];
        for (i, (xr, pr)) in x.chunks_exact(t).zip(p.chunks_exact_mut(t)).enumerate() {
            let on = visible(i, t);
            let max = xr[on.clone()]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for j in on.clone() {
                pr[j] = ((xr[j] - max) * self.scale).exp();
                sum += pr[j];
            }
            let inv = 1.0 / sum;
            pr[on].iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    /// d scores = scale · p · (g − Σ g·p), row by row.
    fn bwd(&self, x: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let t = x.dim(candle_core::D::Minus1)?;
        let dx = with_data(p, self.name(), |p| {
            with_data(g, self.name(), |g| {
                let mut dx = vec![0f32; p.len()];
                let rows = p.chunks_exact(t).zip(g.chunks_exact(t));
                for (i, ((pr, gr), dr)) in rows.zip(dx.chunks_exact_mut(t)).enumerate() {
                    let on = visible(i, t);
                    let c = dot(&pr[on.clone()], &gr[on.clone()]);
                    for j in on {
                        dr[j] = self.scale * pr[j] * (gr[j] - c);
                    }
                }
                dx
            })
        })??;
        Ok(Some(tensor(dx, x)?))
    }
}

/// The mean next-token cross-entropy of `[rows, vocab]` logits against `targets`.
pub struct CrossEntropy {
    pub targets: Vec<u32>,
}

impl CrossEntropy {
    /// Calls `f(row, target, logits row, max logit)` for every row.
    fn rows(&self, z: &[f32], mut f: impl FnMut(usize, usize, &[f32], f32)) -> Result<()> {
        let n = self.targets.len();
        if n == 0 || !z.len().is_multiple_of(n) {
            bail!("fused-cross-entropy: {} logits for {n} targets", z.len())
        }
        let v = z.len() / n;
        for (row, (zr, &target)) in z.chunks_exact(v).zip(&self.targets).enumerate() {
            let target = target as usize;
            if target >= v {
                bail!("fused-cross-entropy: target {target} outside a vocabulary of {v}")
            }
            let max = zr.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            f(row, target, zr, max);
        }
        Ok(())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = slice(s, l, self.name())?;
        let mut total = 0f64;
        self.rows(z, |_, target, zr, max| {
            let sum: f32 = zr.iter().map(|&x| (x - max).exp()).sum();
            total += f64::from(sum.ln() + max - zr[target]);
        })?;
        let mean = (total / self.targets.len() as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    /// d logits = g/rows · (softmax(logits) − onehot(target)).
    fn bwd(&self, z: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let scale = g.to_scalar::<f32>()? / self.targets.len() as f32;
        let dz = with_data(z, self.name(), |z| -> Result<Vec<f32>> {
            let mut dz = vec![0f32; z.len()];
            let v = z.len() / self.targets.len().max(1);
            self.rows(z, |row, target, zr, max| {
                // One exp pass: the exponentials are written, summed, then scaled.
                let out = &mut dz[row * v..(row + 1) * v];
                let mut sum = 0f32;
                for (o, &x) in out.iter_mut().zip(zr) {
                    *o = (x - max).exp();
                    sum += *o;
                }
                let inv = scale / sum;
                out.iter_mut().for_each(|o| *o *= inv);
                out[target] -= scale;
            })?;
            Ok(dz)
        })??;
        Ok(Some(tensor(dz, z)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor, Var};

    use super::*;
    use crate::model::llama::{causal_mask, rms_norm, rope};

    fn randn(shape: &[usize], seed: u64) -> Var {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Var::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// `f`'s output and the gradients of `Σ f(inputs)·r` (r random) w.r.t. each input.
    fn run(inputs: &[Var], f: impl Fn(&[Tensor]) -> Tensor) -> (Vec<f32>, Vec<Vec<f32>>) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs);
        let r = randn(y.dims(), 99);
        let grads = (&y * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dx = xs.iter().map(|x| flat(grads.get(x).unwrap())).collect();
        (flat(&y), dx)
    }

    /// Fused and composite agree, forward and backward, to f32 rounding.
    fn assert_agree(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let (y1, g1) = run(inputs, fused);
        let (y2, g2) = run(inputs, reference);
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
                    "{what}[{i}]: {x} vs {y}"
                );
            }
        };
        close(&y1, &y2, "output");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            close(a, b, &format!("gradient of input {i}"));
        }
    }

    #[test]
    fn fused_rms_norm_matches_the_composite_ops() {
        let inputs = [randn(&[6, 16], 1), randn(&[16], 2)];
        assert_agree(
            &inputs,
            |t| t[0].apply_op2(&t[1], RmsNorm { eps: 1e-5 }).unwrap(),
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        );
    }

    #[test]
    fn fused_swiglu_matches_the_composite_ops() {
        let inputs = [randn(&[5, 12], 3), randn(&[5, 12], 4)];
        assert_agree(
            &inputs,
            |t| t[0].apply_op2(&t[1], SwiGlu).unwrap(),
            |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn fused_rope_matches_the_composite_ops_on_the_first_positions() {
        // Tables for 10 positions, a sequence of 7: rows past the sequence are unused.
        let (cos, sin) = (randn(&[10, 8], 5), randn(&[10, 8], 6));
        let (cos, sin) = (cos.as_tensor(), sin.as_tensor());
        let (c7, s7) = (cos.narrow(0, 0, 7).unwrap(), sin.narrow(0, 0, 7).unwrap());
        let fused = |t: &[Tensor]| {
            let (cos, sin) = (cos.clone(), sin.clone());
            t[0].apply_op1(Rope { cos, sin }).unwrap()
        };
        assert_agree(&[randn(&[2, 3, 7, 8], 7)], fused, |t| {
            rope(&t[0], &c7, &s7).unwrap()
        });
    }

    #[test]
    fn fused_causal_softmax_matches_mask_and_softmax() {
        let scale = 0.35;
        let mask = causal_mask(9, &Device::Cpu).unwrap();
        assert_agree(
            &[randn(&[2, 3, 9, 9], 8)],
            |t| t[0].apply_op1(CausalSoftmax { scale }).unwrap(),
            |t| {
                let scaled = (&t[0] * f64::from(scale)).unwrap();
                candle_nn::ops::softmax(&scaled.broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
            },
        );
    }

    #[test]
    fn fused_cross_entropy_matches_log_softmax_and_gather() {
        let targets = vec![3, 0, 7, 7, 1];
        let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        assert_agree(
            &[randn(&[5, 8], 9)],
            |z| {
                z[0].apply_op1(CrossEntropy {
                    targets: targets.clone(),
                })
                .unwrap()
            },
            |z| candle_nn::loss::cross_entropy(&z[0], &t).unwrap(),
        );
    }

    #[test]
    fn fused_kernels_refuse_what_they_cannot_compute() {
        let z = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let outside = z
            .apply_op1(CrossEntropy {
                targets: vec![1, 4],
            })
            .unwrap_err();
        assert!(
            outside
                .to_string()
                .contains("target 4 outside a vocabulary of 4"),
            "{outside}"
        );
        let short = z
            .apply_op1(CrossEntropy {
                targets: vec![1, 2, 3],
            })
            .unwrap_err();
        assert!(
            short.to_string().contains("8 logits for 3 targets"),
            "{short}"
        );
        let not_square = z.apply_op1(CausalSoftmax { scale: 1.0 }).unwrap_err();
        assert!(
            not_square.to_string().contains("[.., seq, seq]"),
            "{not_square}"
        );
        let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let wrong = z.apply_op2(&w, RmsNorm { eps: 1e-5 }).unwrap_err();
        assert!(wrong.to_string().contains("weight of 3"), "{wrong}");
        let ints = Tensor::zeros((2, 4), candle_core::DType::U32, &Device::Cpu).unwrap();
        let dtype = ints.apply_op1(CausalSoftmax { scale: 1.0 }).unwrap_err();
        assert!(dtype.to_string().contains("expected f32"), "{dtype}");
    }
}
