//! `bench agreement`: one model's loss on one batch, on the CPU in f32 (the reference)
//! and on `--device` in f32 and in bf16 (on the CPU in bf16, when the device is the CPU). A GPU must compute what the CPU computes, to its
//! precision's tolerance; a peer on a GPU and a peer on a CPU train the same run.

use std::path::PathBuf;

use candle_core::Device;
use serde::Serialize;

use super::{Shape, throughput::random_batch};
use crate::device::{DeviceChoice, describe};
use crate::model::{Llama, Precision, Preset, load_checkpoint};

#[derive(clap::Args, Debug, Clone)]
pub struct AgreementBench {
    /// A checkpoint directory (`model.safetensors`, `config.json`); by default a fresh
    /// `--preset` model from seed 0.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "tiny")]
    pub preset: Preset,
    /// The batch, ROWSxSEQ, of uniform random tokens drawn from seed 0.
    #[arg(long, default_value = "8x128")]
    pub shape: Shape,
    /// The device compared with the CPU: cpu (f32 against bf16 only), cuda, cuda:N or
    /// auto.
    #[arg(long, env = crate::env::DEVICE, default_value = "auto")]
    pub device: DeviceChoice,
}

/// One device and precision's loss, against the CPU's in f32.
#[derive(Debug, Serialize)]
pub struct AgreementRow {
    pub device: String,
    pub precision: String,
    pub loss: f64,
    /// `|loss − reference|`.
    pub abs_diff: f64,
    /// `abs_diff / reference`.
    pub rel_diff: f64,
}

impl AgreementBench {
    /// The CPU's f32 row first, then the device's f32 and bf16 rows (the CPU's bf16
    /// when the device is the CPU). The model is built once, on the CPU, and copied.
    pub fn run(&self, mut report: impl FnMut(&AgreementRow)) -> anyhow::Result<()> {
        let device = self.device.open()?;
        let model = self.load()?;
        let batch = random_batch(self.shape, model.config().vocab_size, 0);
        let rows = [
            (Device::Cpu, Precision::F32),
            (device.clone(), Precision::F32),
            (device.clone(), Precision::Bf16),
        ];
        let mut reference = None;
        for (device, precision) in rows.into_iter().skip(usize::from(device.is_cpu())) {
            let on_device = copy_to(&model, &device)?.with_precision(precision);
            let loss = f64::from(on_device.batch_loss(&batch)?);
            let reference = *reference.get_or_insert(loss);
            let abs_diff = (loss - reference).abs();
            report(&AgreementRow {
                device: describe(&device),
                precision: precision.to_string(),
                loss,
                abs_diff,
                rel_diff: abs_diff / reference,
            });
        }
        Ok(())
    }

    /// The model, on the CPU.
    fn load(&self) -> anyhow::Result<Llama> {
        Ok(match &self.checkpoint {
            Some(dir) => load_checkpoint(dir, &Device::Cpu)?.0,
            None => {
                let mut config = self.preset.config(self.preset.default_vocab());
                config.max_position_embeddings = config.max_position_embeddings.max(self.shape.seq);
                Llama::new(config, 0, &Device::Cpu)?
            }
        })
    }
}

/// A copy of `model` on `device` (a fresh one on the CPU too: precision is set by value).
fn copy_to(model: &Llama, device: &Device) -> anyhow::Result<Llama> {
    let tensors = (model.params().iter())
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(device)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(Llama::from_tensors(
        model.config().clone(),
        tensors,
        device,
    )?)
}

pub fn agreement_table_header() -> String {
    format!(
        "{:<8} {:>9} {:>12} {:>10} {:>10}",
        "device", "precision", "loss", "|diff|", "relative"
    )
}

pub fn agreement_table_row(r: &AgreementRow) -> String {
    format!(
        "{:<8} {:>9} {:>12.6} {:>10.2e} {:>10.2e}",
        r.device, r.precision, r.loss, r.abs_diff, r.rel_diff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_bf16_products_agree_with_f32_to_bf16_tolerance() {
        let bench = AgreementBench {
            checkpoint: None,
            preset: Preset::Tiny,
            shape: Shape { rows: 2, seq: 32 },
            device: DeviceChoice::Cpu,
        };
        let mut rows = vec![];
        bench
            .run(|r| rows.push((r.precision.clone(), r.rel_diff)))
            .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0], ("f32".to_string(), 0.0));
        let (precision, rel) = &rows[1];
        assert_eq!(precision, "bf16");
        assert!(*rel > 0.0 && *rel < 1e-2, "bf16 differs by {rel}");
    }
}
