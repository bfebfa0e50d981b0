//! The dense baseline: fp32 pseudo-gradients (DiLoCo) and gradients (DDP), carried as
//! safetensors files.

use std::borrow::Cow;

use super::{Finite, Llama, OuterLoop, RoundError, global_and_zeros, pseudo_gradients, write};

/// A dense pseudo-gradient: every tensor in fp32, carried as a safetensors file.
///
/// Its values are borrowed where they can be: from the file it was read from (a
/// safetensors file aligns its tensors, so on a little-endian machine they are f32 in
/// place), or from the state it exports. An exchange reading four peers' dense updates,
/// or writing its state, then holds no second copy of them.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseUpdate<'a> {
    pub(super) tensors: Vec<(String, Vec<usize>, Cow<'a, [f32]>)>,
}

/// `values` as little-endian bytes: themselves on a little-endian machine.
fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Little-endian bytes as f32: borrowed where they are aligned on a little-endian
/// machine, copied otherwise.
fn le_floats(bytes: &[u8]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) if cfg!(target_endian = "little") => Cow::Borrowed(values),
        _ => Cow::Owned(
            (bytes.chunks_exact(4))
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ),
    }
}

impl<'a> DenseUpdate<'a> {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with(None)
    }

    pub(super) fn to_bytes_with(
        &self,
        meta: Option<std::collections::HashMap<String, String>>,
    ) -> Vec<u8> {
        let bytes: Vec<Cow<[u8]>> = self.tensors.iter().map(|(_, _, v)| le_bytes(v)).collect();
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
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self, RoundError> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| RoundError::Dense(e.to_string()))?;
        let mut tensors = vec![];
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(RoundError::Dense(format!("{name}: not float32")));
            }
            let values = le_floats(view.data());
            Finite::new(&values).map_err(|e| e.in_tensor(&name))?;
            tensors.push((name, view.shape().to_vec(), values));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { tensors })
    }

    pub(super) fn tensor(&self, name: &str, shape: &[usize]) -> Result<&[f32], RoundError> {
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
    pub(super) global: Vec<Vec<f32>>,
    pub(super) velocity: Vec<Vec<f32>>,
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
    type Update<'a> = DenseUpdate<'a>;

    fn make_update(&mut self, model: &Llama) -> Result<DenseUpdate<'static>, RoundError> {
        let mut deltas = Vec::new();
        pseudo_gradients(model, &self.global, &mut deltas)?;
        let tensors = model
            .params()
            .iter()
            .zip(deltas)
            .map(|((name, var), d)| (name.clone(), var.dims().to_vec(), d.into()))
            .collect();
        Ok(DenseUpdate { tensors })
    }

    fn apply(
        &mut self,
        model: &Llama,
        updates: &[(&DenseUpdate<'_>, f32)],
        outer_lr: f32,
    ) -> Result<(), RoundError> {
        let Some(mean) = weighted_mean(model, updates)? else {
            return Ok(()); // nothing accepted: θ stays
        };
        for (i, (name, var)) in model.params().iter().enumerate() {
            let mean = mean.tensor(name, var.dims())?;
            let (g, v) = (&mut self.global[i], &mut self.velocity[i]);
            for ((g, v), m) in g.iter_mut().zip(v.iter_mut()).zip(mean) {
                *v = self.momentum * *v + m;
                *g -= outer_lr * (m + self.momentum * *v);
            }
        }
        write(model, &self.global)
    }
}

pub(super) fn parse_dense<'a>(
    updates: &[(&'a [u8], f32)],
) -> Result<Vec<(DenseUpdate<'a>, f32)>, RoundError> {
    updates
        .iter()
        .map(|(b, w)| Ok((DenseUpdate::from_bytes(b)?, *w)))
        .collect()
}

/// `Σ wᵢ·dᵢ / Σ wᵢ` of every tensor of `model`, or `None` when no update has positive
/// weight. The one mean of dense updates: DiLoCo's step, DDP's gradient, and the
/// aggregate the exchange sends in their place.
pub(super) fn weighted_mean(
    model: &Llama,
    updates: &[(&DenseUpdate<'_>, f32)],
) -> Result<Option<DenseUpdate<'static>>, RoundError> {
    let total: f32 = updates.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return Ok(None);
    }
    let mut tensors = Vec::with_capacity(model.params().len());
    for (name, var) in model.params() {
        let mut mean = vec![0.0f32; var.elem_count()];
        for (u, w) in updates {
            for (m, d) in mean.iter_mut().zip(u.tensor(name, var.dims())?) {
                *m += w / total * d;
            }
        }
        tensors.push((name.clone(), var.dims().to_vec(), mean.into()));
    }
    Ok(Some(DenseUpdate { tensors }))
}
