//! A LLaMA-style decoder for training: RMSNorm, rotary embeddings (Hugging Face's
//! rotate-half layout), grouped-query attention and a SwiGLU MLP.
//!
//! Built from differentiable tensor operations only (candle's fused rope/rms-norm kernels
//! have no backward pass), with parameters named exactly as in `LlamaForCausalLM`.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{ModelConfig, ModelError, fused};

/// The model: its configuration and named parameters, in Hugging Face order.
pub struct Llama {
    config: ModelConfig,
    params: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    /// Rotary tables, `[max_positions, head_dim]`.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    precision: Precision,
}

/// The dtype the model's matrix products run in.
///
/// Parameters, gradients and the optimiser's state are f32 whatever it is. `Bf16` is
/// autocast as PyTorch does it: each product's operands are cast down and its result cast
/// back up, so the norms, the softmax and the loss stay in f32, and the backward pass's
/// products run in bf16 too (the gradient of a cast is the gradient cast back). Tensor
/// cores run bf16 at many times their f32 rate; a CPU has no bf16 kernel here and widens
/// the operands again, so there it only checks the numbers.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The dtype products run in.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    /// The name as the CRD and `--precision` spell it: the serde name, so they cannot
    /// differ.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(name.as_str().ok_or(std::fmt::Error)?)
    }
}

/// Standard deviation of the initial weights (Hugging Face's `initializer_range`).
const INIT_STD: f64 = 0.02;

impl Llama {
    /// A freshly initialised model. Initialisation is a pure function of `seed` (drawn
    /// from our own generator, in parameter order), so every peer of a run that starts
    /// from scratch holds the same θ₀ without exchanging it.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = vec![];
        for (name, shape) in parameter_shapes(&config) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal(&mut rng) * INIT_STD as f32).collect()
            };
            let t = Tensor::from_vec(data, shape, device)?;
            params.push((name, Var::from_tensor(&t)?));
        }
        Self::assemble(config, params, device)
    }

    /// Builds a model around existing parameters (e.g. loaded from a checkpoint), checking
    /// that every expected tensor is there with the expected shape, and nothing else.
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let mut params = vec![];
        for (name, shape) in parameter_shapes(&config) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    tensor: name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            params.push((name, Var::from_tensor(&t)?));
        }
        if let Some(extra) = tensors.into_keys().next() {
            return Err(ModelError::UnexpectedTensor(extra));
        }
        Self::assemble(config, params, device)
    }

    fn assemble(
        config: ModelConfig,
        params: Vec<(String, Var)>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (cos, sin) = rotary_tables(&config, device)?;
        let index = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            config,
            params,
            index,
            cos,
            sin,
            device: device.clone(),
            precision: Precision::F32,
        })
    }

    /// The model with its matrix products in `precision` (f32 when not set).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters in Hugging Face order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Parameter `name`, in the graph or detached from it.
    fn p(&self, name: &str, graph: Graph) -> Tensor {
        let t = self.params[self.index[name]].1.as_tensor();
        match graph {
            Graph::Record => t.clone(),
            Graph::Skip => t.detach(),
        }
    }

    /// `x @ wᵀ` for a weight stored `[out, in]`, as PyTorch's `Linear` stores it, in the
    /// model's precision. The weight is cast before it is transposed, so the product
    /// reads it in place.
    fn linear(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        self.product(x, &self.down(w)?.t()?)
    }

    /// `a @ b` in the model's precision, the result in f32.
    fn product(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        self.down(a)?.matmul(&self.down(b)?)?.to_dtype(DType::F32)
    }

    /// `t` as a product's operand: itself in f32 (`to_dtype` to the same dtype is a
    /// clone, so f32 results are bit for bit those without autocast), cast in bf16.
    fn down(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.precision.dtype())
    }

    /// Logits `[batch·seq, vocab]` for `tokens` (`[batch, seq]`, u32), recording the
    /// graph for a backward pass.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        self.forward_in(tokens, Graph::Record)
    }

    fn forward_in(&self, tokens: &Tensor, graph: Graph) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(ModelError::SequenceTooLong {
                len: t,
                max: self.config.max_position_embeddings,
            });
        }
        let c = &self.config;
        let p = |name: &str| self.p(name, graph);
        let embed = p("model.embed_tokens.weight");
        let mut x = embed.index_select(&tokens.flatten_all()?, 0)?; // [b·t, h]
        let layers = Layers::new(self, t)?;
        for i in 0..c.num_hidden_layers {
            let at = |s: &str| format!("model.layers.{i}.{s}");
            let h = layers.rms_norm(&x, &p(&at("input_layernorm.weight")))?;
            let attn = self.attention(&layers, &h, i, (b, t), graph)?;
            x = (x + attn)?;
            let h = layers.rms_norm(&x, &p(&at("post_attention_layernorm.weight")))?;
            let gate = self.linear(&h, &p(&at("mlp.gate_proj.weight")))?;
            let up = self.linear(&h, &p(&at("mlp.up_proj.weight")))?;
            let mlp = layers.swiglu(&gate, &up)?;
            x = (x + self.linear(&mlp, &p(&at("mlp.down_proj.weight")))?)?;
        }
        let x = layers.rms_norm(&x, &p("model.norm.weight"))?;
        let head = if c.tie_word_embeddings {
            embed
        } else {
            p("lm_head.weight")
        };
        Ok(self.linear(&x, &head)?)
    }

    fn attention(
        &self,
        layers: &Layers,
        h: &Tensor,
        layer: usize,
        (b, t): (usize, usize),
        graph: Graph,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let at = |s: &str| format!("model.layers.{layer}.self_attn.{s}.weight");
        let split = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let p = |name: &str| self.p(&at(name), graph);
        let q = split(self.linear(h, &p("q_proj"))?, heads)?;
        let k = split(self.linear(h, &p("k_proj"))?, kv_heads)?;
        let v = split(self.linear(h, &p("v_proj"))?, kv_heads)?;
        let (q, k) = (layers.rope(&q)?, layers.rope(&k)?);
        let (k, v) = (
            repeat_kv(k, heads / kv_heads)?,
            repeat_kv(v, heads / kv_heads)?,
        );
        let scores = self.product(&q, &self.down(&k)?.t()?.contiguous()?)?;
        let probs = layers.causal_softmax(&scores, 1.0 / (d as f64).sqrt())?;
        let out = self
            .product(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b * t, heads * d))?;
        Ok(self.linear(&out, &p("o_proj"))?)
    }

    /// Continues `prompt` by `count` tokens, sampling at `temperature` (0 = greedy) from a
    /// generator seeded with `seed`. The context is cut to the model's positions.
    pub fn generate(
        &self,
        prompt: &[u32],
        count: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>, ModelError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tokens = prompt.to_vec();
        if tokens.is_empty() {
            tokens.push(b'\n'.into());
        }
        let window = self.config.max_position_embeddings;
        for _ in 0..count {
            let context = &tokens[tokens.len().saturating_sub(window)..];
            let x = Tensor::from_slice(context, (1, context.len()), &self.device)?;
            let logits = self.forward_in(&x, Graph::Skip)?;
            let last: Vec<f32> = logits.get(context.len() - 1)?.to_vec1()?;
            tokens.push(sample(&last, temperature, &mut rng));
        }
        Ok(tokens.split_off(tokens.len() - count))
    }

    /// Mean next-token cross-entropy of `targets` given `inputs` (both `[batch, seq]`).
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor, ModelError> {
        self.loss_in(inputs, targets, Graph::Record)
    }

    fn loss_in(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        graph: Graph,
    ) -> Result<Tensor, ModelError> {
        let logits = self.forward_in(inputs, graph)?;
        let targets = targets.flatten_all()?;
        if !self.device.is_cpu() {
            return Ok(candle_nn::loss::cross_entropy(&logits, &targets)?);
        }
        let targets = targets.to_vec1::<u32>()?;
        Ok(logits.apply_op1(fused::CrossEntropy { targets })?)
    }

    /// The mean loss on `batch`, without gradients (evaluation), [`EVAL_ROWS`] rows at
    /// a time: no graph is kept and only one slice's activations are alive, so an
    /// evaluation over many rows needs no more memory than a training step.
    pub fn batch_loss(&self, batch: &crate::data::Batch) -> Result<f32, ModelError> {
        let mut sum = 0f64;
        for start in (0..batch.rows).step_by(EVAL_ROWS) {
            let rows = EVAL_ROWS.min(batch.rows - start);
            let span = start * batch.seq..(start + rows) * batch.seq;
            let shape = (rows, batch.seq);
            let inputs = Tensor::from_slice(&batch.inputs[span.clone()], shape, &self.device)?;
            let targets = Tensor::from_slice(&batch.targets[span], shape, &self.device)?;
            let loss = self.loss_in(&inputs, &targets, Graph::Skip)?;
            sum += f64::from(loss.to_scalar::<f32>()?) * rows as f64;
        }
        Ok((sum / batch.rows.max(1) as f64) as f32)
    }
}

/// Rows [`Llama::batch_loss`] evaluates at once.
pub const EVAL_ROWS: usize = 8;

/// Whether a forward pass records the graph a backward pass needs. Evaluation and
/// generation skip it: every activation is then freed as soon as the next is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Graph {
    Record,
    Skip,
}

/// `(name, shape)` of every parameter, in Hugging Face order.
pub fn parameter_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, h, i) = (c.vocab_size, c.hidden_size, c.intermediate_size);
    let kv = c.num_key_value_heads * c.head_dim();
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.num_hidden_layers {
        let p = |s: &str, shape: Vec<usize>| (format!("model.layers.{l}.{s}"), shape);
        out.extend([
            p("input_layernorm.weight", vec![h]),
            p("self_attn.q_proj.weight", vec![h, h]),
            p("self_attn.k_proj.weight", vec![kv, h]),
            p("self_attn.v_proj.weight", vec![kv, h]),
            p("self_attn.o_proj.weight", vec![h, h]),
            p("post_attention_layernorm.weight", vec![h]),
            p("mlp.gate_proj.weight", vec![i, h]),
            p("mlp.up_proj.weight", vec![i, h]),
            p("mlp.down_proj.weight", vec![h, i]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Draws a token from `softmax(logits / temperature)`; the arg-max at temperature 0.
fn sample(logits: &[f32], temperature: f64, rng: &mut StdRng) -> u32 {
    let argmax = || {
        (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap_or(0) as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l - max)) / temperature).exp())
        .collect();
    let mut pick = rng.random_range(0.0..weights.iter().sum::<f64>());
    for (i, w) in weights.iter().enumerate() {
        if pick < *w {
            return i as u32;
        }
        pick -= w;
    }
    argmax()
}

/// A standard normal draw (Box–Muller), from our own seeded generator.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// The model's elementwise layers at one sequence length: the fused CPU kernels, or
/// candle's composite operations on other devices.
struct Layers {
    eps: f64,
    /// Rotary tables of all positions (the fused kernel) or of the first `seq` ones.
    cos: Tensor,
    sin: Tensor,
    /// `None` where the kernels are fused (the causal softmax masks by itself).
    mask: Option<Tensor>,
}

impl Layers {
    fn new(model: &Llama, seq: usize) -> candle_core::Result<Self> {
        let eps = model.config.rms_norm_eps;
        let (cos, sin) = (model.cos.clone(), model.sin.clone());
        if model.device.is_cpu() {
            return Ok(Self {
                eps,
                cos,
                sin,
                mask: None,
            });
        }
        Ok(Self {
            eps,
            cos: cos.narrow(0, 0, seq)?,
            sin: sin.narrow(0, 0, seq)?,
            mask: Some(causal_mask(seq, &model.device)?),
        })
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        match self.mask {
            None => x.apply_op2(
                weight,
                fused::RmsNorm {
                    eps: self.eps as f32,
                },
            ),
            Some(_) => rms_norm(x, weight, self.eps),
        }
    }

    fn rope(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.mask {
            None => x.apply_op1(fused::Rope {
                cos: self.cos.clone(),
                sin: self.sin.clone(),
            }),
            Some(_) => rope(x, &self.cos, &self.sin),
        }
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        match self.mask {
            None => gate.apply_op2(up, fused::SwiGlu),
            Some(_) => candle_nn::ops::silu(gate)? * up,
        }
    }

    fn causal_softmax(&self, scores: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
        match &self.mask {
            None => scores.apply_op1(fused::CausalSoftmax {
                scale: scale as f32,
            }),
            Some(mask) => {
                candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(mask)?, D::Minus1)
            }
        }
    }
}

pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    x.broadcast_div(&rms)?.broadcast_mul(weight)
}

/// Rotary tables in Hugging Face's layout: frequencies for the first half of the head
/// dimension, repeated for the second half.
fn rotary_tables(c: &ModelConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let d = c.head_dim();
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| (1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64)) as f32)
        .collect();
    let positions = c.max_position_embeddings;
    let mut angles = Vec::with_capacity(positions * d);
    for p in 0..positions {
        for _half in 0..2 {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
    }
    let angles = Tensor::from_vec(angles, (positions, d), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// `x·cos + rotate_half(x)·sin` over `[batch, heads, seq, head_dim]`.
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Shares each key/value head among `n` query heads.
fn repeat_kv(x: Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

/// `[t, t]`: 0 where a position may attend, −∞ above the diagonal.
pub(super) fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}
