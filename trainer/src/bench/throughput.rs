//! `bench throughput`: training tokens/s and model FLOPs utilisation (MFU) per preset,
//! batch shape and thread count, against the f32 matmul peak of this machine measured
//! in the same process with the same threads.
//!
//! Each row runs in a process of its own with `STARLING_THREADS` set (see
//! [`crate::cpu`]: the thread count is fixed when a process starts), so a row's peak RSS
//! is its own too.
//!
//! On a GPU (`--device cuda`) the peak is a large matmul on that GPU in the row's
//! precision (bf16 by default there), the same kernels the model's products call, and
//! the thread count only sizes the host's side.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::device::{DeviceArgs, describe};
use crate::model::{AdamWConfig, InnerOptimizer, Llama, LrSchedule, Precision, Preset};

/// A batch shape: `rows` sequences of `seq` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub rows: usize,
    pub seq: usize,
}

impl std::str::FromStr for Shape {
    type Err = String;

    /// `ROWSxSEQ`, e.g. `8x128`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("batch shape {s:?}: expected ROWSxSEQ, e.g. 8x128");
        let (rows, seq) = s.split_once('x').ok_or_else(bad)?;
        let (rows, seq) = (
            rows.parse().map_err(|_| bad())?,
            seq.parse().map_err(|_| bad())?,
        );
        if rows == 0 || seq == 0 {
            return Err(bad());
        }
        Ok(Shape { rows, seq })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ThroughputBench {
    /// The `starling-trainer` binary each row runs in.
    #[arg(skip)]
    pub binary: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "tiny")]
    pub presets: Vec<Preset>,
    /// Batch shapes, ROWSxSEQ.
    #[arg(long, value_delimiter = ',', default_value = "8x128")]
    pub shapes: Vec<Shape>,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Timed optimiser steps per row (after two untimed ones).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Vocabulary size; by default 256 (bytes) for tiny and 32000 for the others.
    #[arg(long)]
    pub vocab: Option<usize>,
    #[command(flatten)]
    pub placement: DeviceArgs,
    /// Measure the first preset, shape and thread count in this process and print one
    /// JSON row (what each row's process runs).
    #[arg(long, hide = true)]
    pub worker: bool,
}

/// One preset, shape and thread count, measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct ThroughputRow {
    pub preset: Preset,
    pub rows: usize,
    pub seq: usize,
    pub threads: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The dtype of the model's products.
    pub precision: String,
    pub params: u64,
    pub tokens_per_s: f64,
    /// Model GFLOP/s achieved (see `ModelConfig::train_flops_per_token`).
    pub gflops: f64,
    /// GFLOP/s of a large matmul in the same process: f32 with the same threads on the
    /// CPU, the row's precision on a GPU.
    pub peak_gflops: f64,
    /// `gflops / peak_gflops`.
    pub mfu: f64,
    /// Share of a step spent in the optimiser (clipping and AdamW), not the gradients.
    pub optimizer_share: f64,
    /// The process's peak resident memory, bytes.
    pub peak_rss_bytes: Option<u64>,
}

impl ThroughputBench {
    /// Measures every row in its own process, calling `report` as each is ready.
    pub fn run(&self, mut report: impl FnMut(&ThroughputRow)) -> anyhow::Result<()> {
        if self.worker {
            report(&self.measure()?);
            return Ok(());
        }
        for &preset in &self.presets {
            for shape in &self.shapes {
                for &threads in &self.threads {
                    report(&self.spawn_row(preset, *shape, threads)?);
                }
            }
        }
        Ok(())
    }

    fn spawn_row(
        &self,
        preset: Preset,
        shape: Shape,
        threads: usize,
    ) -> anyhow::Result<ThroughputRow> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["bench", "throughput", "--worker", "--json", "--presets"])
            .arg(preset.to_string())
            .args(["--shapes", &format!("{}x{}", shape.rows, shape.seq)])
            .args(["--threads", &threads.to_string()])
            .args(["--steps", &self.steps.to_string()])
            .args(["--device", &self.placement.device.to_string()])
            .args(["--precision", &self.placement.precision.to_string()])
            .env(crate::env::THREADS, threads.to_string());
        if let Some(vocab) = self.vocab {
            cmd.args(["--vocab", &vocab.to_string()]);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", self.binary.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "{preset} {}x{} on {threads} threads failed: {}",
                shape.rows,
                shape.seq,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("reading the row {line:?}"))
    }

    /// This process's row: the first preset, shape and thread count.
    fn measure(&self) -> anyhow::Result<ThroughputRow> {
        let preset = *self.presets.first().context("no preset")?;
        let shape = *self.shapes.first().context("no batch shape")?;
        let threads = crate::cpu::threads();
        let vocab = self.vocab.unwrap_or(preset.default_vocab());
        let mut config = preset.config(vocab);
        config.max_position_embeddings = config.max_position_embeddings.max(shape.seq);
        let placement = self.placement.open(crate::device::Use::Train)?;
        let device = &placement.device;
        let model = Llama::new(config.clone(), 0, device)?.with_precision(placement.precision);
        let schedule = LrSchedule {
            peak: 1e-3,
            warmup: 0,
            total: u64::MAX,
            floor: 1.0,
        };
        let mut optimizer = InnerOptimizer::new(&model, AdamWConfig::default(), schedule)?;
        let batch = random_batch(shape, vocab, 0);
        let (mut gradients, mut apply) = (Duration::ZERO, Duration::ZERO);
        for step in 0..self.steps + 2 {
            let start = Instant::now();
            let (grads, _) = optimizer.gradients(&model, &batch, shape.rows)?;
            device.synchronize()?;
            let mid = Instant::now();
            optimizer.apply(grads)?;
            // A GPU queues kernels: the step has ended when they have run.
            device.synchronize()?;
            if step >= 2 {
                gradients += mid - start;
                apply += mid.elapsed();
            }
        }
        // Measured twice, the better kept: one disturbed
        // measurement on a shared machine would otherwise inflate the MFU.
        let peak = || match device {
            Device::Cpu => matmul_peak_gflops(threads),
            gpu => device_peak_gflops(gpu, placement.precision),
        };
        let peak_gflops = peak()?.max(peak()?);
        let total = (gradients + apply).as_secs_f64();
        let tokens_per_s = (self.steps * shape.rows * shape.seq) as f64 / total;
        let gflops = tokens_per_s * config.train_flops_per_token(shape.seq) as f64 / 1e9;
        Ok(ThroughputRow {
            preset,
            rows: shape.rows,
            seq: shape.seq,
            threads,
            device: describe(device),
            precision: placement.precision.to_string(),
            params: config.parameter_count(),
            tokens_per_s,
            gflops,
            peak_gflops,
            mfu: gflops / peak_gflops,
            optimizer_share: apply.as_secs_f64() / total,
            peak_rss_bytes: crate::cpu::peak_rss_bytes(None),
        })
    }
}

/// The f32 matmul peak of `threads` threads, GFLOP/s: the best of several rounds in
/// which every thread multiplies its own 1024² matrices through candle (the same gemm
/// the model uses, on one thread each, as training runs it; see [`crate::cpu`]). At
/// n = 1024 packing overheads are a few percent.
fn matmul_peak_gflops(threads: usize) -> anyhow::Result<f64> {
    use rayon::prelude::*;
    const N: usize = 1024;
    let a = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        (0..threads)
            .into_par_iter()
            .try_for_each(|_| a.matmul(&b).map(drop))?;
        best = best.min(start.elapsed());
    }
    Ok(2.0 * (N * N * N * threads) as f64 / best.as_secs_f64() / 1e9)
}

/// The matmul peak of a GPU in `precision`, GFLOP/s: the best of several 8192² products
/// (large enough that cuBLAS runs at its best), each timed to its synchronisation.
fn device_peak_gflops(device: &Device, precision: Precision) -> anyhow::Result<f64> {
    const N: usize = 8192;
    let a = Tensor::randn(0f32, 1.0, (N, N), device)?.to_dtype(precision.dtype())?;
    let b = Tensor::randn(0f32, 1.0, (N, N), device)?.to_dtype(precision.dtype())?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(start.elapsed());
    }
    Ok(2.0 * (N * N * N) as f64 / best.as_secs_f64() / 1e9)
}

/// Uniform random tokens: throughput does not depend on what the text says.
pub(super) fn random_batch(shape: Shape, vocab: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.rows * shape.seq;
    let mut draw = || (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    Batch {
        inputs: draw(),
        targets: draw(),
        rows: shape.rows,
        seq: shape.seq,
    }
}

pub fn throughput_table_header() -> String {
    format!(
        "{:<11} {:>9} {:>7} {:>7} {:>5} {:>10} {:>9} {:>8} {:>9} {:>6} {:>7} {:>9}",
        "preset",
        "batch",
        "threads",
        "device",
        "dtype",
        "params",
        "tokens/s",
        "GFLOP/s",
        "peak",
        "MFU",
        "optim",
        "peak RSS"
    )
}

pub fn throughput_table_row(r: &ThroughputRow) -> String {
    format!(
        "{:<11} {:>9} {:>7} {:>7} {:>5} {:>10} {:>9.0} {:>8.1} {:>9.1} {:>5.1}% {:>6.1}% {:>9}",
        r.preset.to_string(),
        format!("{}x{}", r.rows, r.seq),
        r.threads,
        r.device,
        r.precision,
        r.params,
        r.tokens_per_s,
        r.gflops,
        r.peak_gflops,
        100.0 * r.mfu,
        100.0 * r.optimizer_share,
        r.peak_rss_bytes
            .map(|b| format!("{} MB", b >> 20))
            .unwrap_or_else(|| "-".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_shapes_parse_as_rows_by_sequence() {
        assert_eq!("8x128".parse(), Ok(Shape { rows: 8, seq: 128 }));
        for bad in ["8", "8x", "x128", "0x128", "8x0", "8*128"] {
            assert!(
                bad.parse::<Shape>().unwrap_err().contains("ROWSxSEQ"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_worker_row_reports_a_utilisation_below_one() {
        let bench = ThroughputBench {
            binary: PathBuf::new(),
            presets: vec![Preset::Tiny],
            shapes: vec![Shape { rows: 2, seq: 16 }],
            threads: vec![1],
            steps: 1,
            vocab: None,
            placement: DeviceArgs {
                device: crate::device::DeviceChoice::Cpu,
                precision: crate::device::PrecisionChoice::Auto,
            },
            worker: true,
        };
        let row = bench.measure().unwrap();
        assert!(row.tokens_per_s > 0.0 && row.peak_gflops > 0.0);
        assert!(row.mfu > 0.0 && row.mfu < 1.0, "MFU {}", row.mfu);
        assert!(row.peak_rss_bytes.unwrap() > 1 << 20);
        assert_eq!(
            (row.device.as_str(), row.precision.as_str()),
            ("cpu", "f32")
        );
    }
}
