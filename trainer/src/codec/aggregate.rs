//! Combining several peers' updates for one tensor into one dense update.

use super::{CodecError, EncodedTensor};

/// How peers' decoded updates are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AggregationRule {
    /// `Σ wᵢ·dᵢ / Σ wᵢ` over peers with positive weight.
    #[default]
    WeightedMean,
    /// Templar's production rule: scale each peer's tensor down to the median of the
    /// peers' norms (a peer with an outsized update cannot dominate), then average each
    /// coordinate over the peers that *selected* it, not over all peers (a coordinate
    /// one peer sent is not diluted by the peers that did not).
    MedianNormClipSelectedMean,
}

/// Writes the aggregate of `inputs` (each an encoded tensor and its peer weight) into
/// `out`, overwriting it. Peers with weight 0 (excluded) are ignored; with no positive
/// weight at all, the aggregate is zero.
pub fn aggregate(
    rule: AggregationRule,
    inputs: &[(&EncodedTensor, f32)],
    out: &mut [f32],
) -> Result<(), CodecError> {
    for (t, w) in inputs {
        t.check_len(out.len())?;
        if !(w.is_finite() && *w >= 0.0) {
            return Err(CodecError::InvalidConfig(format!(
                "peer weight for {} must be finite and non-negative, not {w}",
                t.name
            )));
        }
    }
    out.fill(0.0);
    let live: Vec<(&EncodedTensor, f32)> =
        inputs.iter().copied().filter(|(_, w)| *w > 0.0).collect();
    if live.is_empty() {
        return Ok(());
    }
    match rule {
        AggregationRule::WeightedMean => {
            let total: f32 = live.iter().map(|(_, w)| w).sum();
            for (t, w) in &live {
                t.decode_add(w / total, out)?;
            }
        }
        AggregationRule::MedianNormClipSelectedMean => {
            let norms = live
                .iter()
                .map(|(t, _)| t.norm())
                .collect::<Result<Vec<_>, _>>()?;
            let median = median(&norms);
            let mut selected_weight = vec![0.0f32; out.len()];
            for ((t, w), norm) in live.iter().zip(&norms) {
                let clip = clip_factor(*norm, median);
                let scale = w * clip;
                t.for_each_entry(|at, v| {
                    out[at] += scale * v;
                    selected_weight[at] += w;
                })?;
            }
            for (o, s) in out.iter_mut().zip(&selected_weight) {
                if *s > 0.0 {
                    *o /= s;
                }
            }
        }
    }
    Ok(())
}

/// One tensor's outer step, `θ ← θ − α·aggregate(inputs)`, every operation in binary32
/// (`θᵢ − (α·sᵢ)`, two roundings, no fused multiply-add), as `docs/wire-format.md`
/// specifies it. `scratch` holds the aggregate and is reused across tensors.
pub fn outer_step(
    rule: AggregationRule,
    inputs: &[(&EncodedTensor, f32)],
    alpha: f32,
    theta: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<(), CodecError> {
    scratch.resize(theta.len(), 0.0);
    aggregate(rule, inputs, scratch)?;
    for (t, s) in theta.iter_mut().zip(scratch.iter()) {
        *t -= alpha * s;
    }
    Ok(())
}

/// The median of `values` in binary64: the middle one, or the mean of the middle two for
/// an even count (0 for none). The one median of aggregation and of scoring.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The factor a tensor of L2 norm `norm` is scaled by to clip it to `median`: down only.
pub(crate) fn clip_factor(norm: f64, median: f64) -> f32 {
    if norm > median {
        (median / norm) as f32
    } else {
        1.0
    }
}
