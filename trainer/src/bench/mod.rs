//! Benchmarks (`starling-trainer bench ...`). Throughputs are reported next to a baseline
//! measured in the same run on the same buffers, because the machines are shared and
//! absolute numbers drift.

mod agreement;
mod convergence;
mod throughput;

pub use agreement::{AgreementBench, AgreementRow, agreement_table_header, agreement_table_row};
pub use convergence::{
    Axis, ConvergenceBench, ConvergenceRow, Settings, convergence_table_header,
    convergence_table_row,
};
pub use throughput::{
    Shape, ThroughputBench, ThroughputRow, throughput_table_header, throughput_table_row,
};

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::{CodecConfig, Compressor, Finite, Update, ValueBits};

/// One configuration's measurements.
#[derive(Debug, Serialize)]
pub struct CodecRow {
    pub params: usize,
    pub chunk: u32,
    pub k: u32,
    pub value_bits: u8,
    pub bytes_encoded: usize,
    pub bits_per_param: f64,
    /// Dense fp32 bytes / encoded bytes.
    pub ratio_vs_fp32: f64,
    /// Encoded size with fixed-width (⌈log2 chunk⌉-bit) indices / encoded size.
    pub ratio_vs_fixed_index: f64,
    /// GB/s of fp32 input.
    pub compress_gbps: f64,
    pub decode_add_gbps: f64,
    /// GB/s of encoded bytes one core parses and checks (`Update::from_bytes`: checksum,
    /// header, every segment), as the exchange does with each update it receives.
    pub check_gbps: f64,
    /// A plain (single-threaded) copy of the same buffer.
    pub memcpy_gbps: f64,
    /// The same copy split over all threads: a stricter baseline on machines where one
    /// core cannot saturate memory.
    pub memcpy_parallel_gbps: f64,
    /// GB/s of copying the same f32 tensor from the GPU into a new host buffer, as a
    /// peer on a GPU reads θ before compressing its pseudo-gradient on the host (the
    /// buffer's first touch included, as there; none on the CPU).
    pub device_to_host_gbps: Option<f64>,
    pub threads: usize,
}

/// Parameters of a codec benchmark run.
pub struct CodecBench {
    pub params: Vec<usize>,
    pub chunk: u32,
    pub ks: Vec<u32>,
    pub bits: ValueBits,
    pub repeats: usize,
    /// Where the tensors a peer compresses live: a GPU adds the copy to the host.
    pub device: candle_core::Device,
}

impl Default for CodecBench {
    fn default() -> Self {
        Self {
            params: vec![16 << 20, 256 << 20],
            chunk: 4096,
            ks: vec![32, 64, 128],
            bits: ValueBits::Two,
            repeats: 3,
            device: candle_core::Device::Cpu,
        }
    }
}

/// Pseudo-gradient-like data: approximately Gaussian (Irwin–Hall of four uniforms),
/// deterministic, generated in parallel.
fn synthetic(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(block, out)| {
            let mut s = seed ^ (block as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut next = || {
                // splitmix64
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            for x in out {
                let r = next();
                let u = |i: u32| ((r >> (16 * i)) & 0xffff) as f32 / 65536.0;
                *x = (u(0) + u(1) + u(2) + u(3) - 2.0) * 1e-3;
            }
        });
    v
}

/// GB/s of copying `values` on one thread, and split over all of them: the baselines
/// the codec's speeds are read against.
fn memcpy_gbps(values: &[f32], repeats: usize) -> (f64, f64) {
    let mut copy = vec![0.0f32; values.len()];
    let serial = best_of(repeats, || copy.copy_from_slice(values));
    let parallel = best_of(repeats, || {
        copy.par_chunks_mut(1 << 20)
            .zip(values.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
    let bytes = values.len() * 4;
    (gbps(bytes, serial), gbps(bytes, parallel))
}

fn best_of(repeats: usize, mut f: impl FnMut()) -> Duration {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("at least one repeat")
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

impl CodecBench {
    /// Runs every configuration, calling `report` as each row is ready.
    pub fn run(&self, mut report: impl FnMut(&CodecRow)) -> anyhow::Result<Vec<CodecRow>> {
        let mut rows = vec![];
        for &params in &self.params {
            let delta = synthetic(params, params as u64);
            let bytes = params * 4;
            let (memcpy_gbps, memcpy_parallel_gbps) = memcpy_gbps(&delta, self.repeats);
            let device_to_host_gbps = self.device_to_host_gbps(&delta)?;

            for &k in &self.ks {
                let config = CodecConfig::new(self.chunk, k, self.bits)?;
                let compressor = Compressor::new(config, 0.95)?;
                let shape = [params as u64];
                // Checked once, as the trainer does while computing the pseudo-gradient.
                let finite = Finite::new(&delta)?;
                let mut ef = vec![0.0f32; params];
                // Warm-up: faults pages in and gives the error feedback realistic content.
                let mut encoded = compressor.compress("bench", &shape, finite, &mut ef)?;
                let mut failure = None;
                let compress = best_of(self.repeats, || {
                    match compressor.compress("bench", &shape, finite, &mut ef) {
                        Ok(t) => encoded = t,
                        Err(e) => failure = Some(e),
                    }
                });
                if let Some(e) = failure {
                    return Err(e.into());
                }
                let mut out = vec![0.0f32; params];
                let decode = best_of(self.repeats, || {
                    if let Err(e) = encoded.decode_add(1.0, &mut out) {
                        failure = Some(e);
                    }
                });
                if let Some(e) = failure {
                    return Err(e.into());
                }
                let index_bits = encoded.index_bits();
                let wire = Update::new(config, vec![encoded.clone()])?.to_bytes();
                let mut check_failure = None;
                let check = best_of(self.repeats, || {
                    if let Err(e) = Update::from_bytes(&wire) {
                        check_failure = Some(e);
                    }
                });
                if let Some(e) = check_failure {
                    return Err(e.into());
                }
                let bytes_encoded = wire.len();
                let fixed = bytes_encoded as f64 - index_bits as f64 / 8.0
                    + config.fixed_index_bits(params) as f64 / 8.0;
                let row = CodecRow {
                    params,
                    chunk: self.chunk,
                    k,
                    value_bits: self.bits.bits(),
                    bytes_encoded,
                    bits_per_param: bytes_encoded as f64 * 8.0 / params as f64,
                    ratio_vs_fp32: bytes as f64 / bytes_encoded as f64,
                    ratio_vs_fixed_index: fixed / bytes_encoded as f64,
                    compress_gbps: gbps(bytes, compress),
                    decode_add_gbps: gbps(bytes, decode),
                    check_gbps: gbps(bytes_encoded, check),
                    memcpy_gbps,
                    memcpy_parallel_gbps,
                    device_to_host_gbps,
                    threads: rayon::current_num_threads(),
                };
                report(&row);
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

impl CodecBench {
    /// The GB/s of copying `values` back from the bench's GPU (none on the CPU).
    fn device_to_host_gbps(&self, values: &[f32]) -> anyhow::Result<Option<f64>> {
        if self.device.is_cpu() {
            return Ok(None);
        }
        let tensor = candle_core::Tensor::from_slice(values, values.len(), &self.device)?;
        self.device.synchronize()?;
        let mut failure = None;
        let copy = best_of(self.repeats, || {
            if let Err(e) = tensor.to_vec1::<f32>() {
                failure = Some(e);
            }
        });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(Some(gbps(values.len() * 4, copy))),
        }
    }
}

/// Human-readable table header and rows.
pub fn codec_table_header() -> String {
    format!(
        "{:>10} {:>6} {:>4} {:>4} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}",
        "params",
        "chunk",
        "k",
        "bits",
        "bytes",
        "bits/p",
        "x fp32",
        "x fixed",
        "comp GB/s",
        "dec GB/s",
        "copy GB/s",
        "comp/copy",
        "pcopy GB/s",
        "comp/pcopy",
        "threads",
        "d2h GB/s"
    )
}

pub fn codec_table_row(r: &CodecRow) -> String {
    format!(
        "{:>10} {:>6} {:>4} {:>4} {:>12} {:>8.4} {:>8.1} {:>9.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>7} {:>9}",
        human(r.params),
        r.chunk,
        r.k,
        r.value_bits,
        r.bytes_encoded,
        r.bits_per_param,
        r.ratio_vs_fp32,
        r.ratio_vs_fixed_index,
        r.compress_gbps,
        r.decode_add_gbps,
        r.memcpy_gbps,
        r.compress_gbps / r.memcpy_gbps,
        r.memcpy_parallel_gbps,
        r.compress_gbps / r.memcpy_parallel_gbps,
        r.threads,
        r.device_to_host_gbps
            .map(|g| format!("{g:.2}"))
            .unwrap_or_else(|| "-".into())
    )
}

fn human(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else {
        n.to_string()
    }
}

/// Parses sizes like `16M`, `256M`, `1G`, `5000`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a size: {s:?} (try 16M)"))
}

/// Prints each row as soon as it is measured (big configurations take a while): a table
/// under `header`, or one JSON object per line.
pub fn printer<R: Serialize>(
    json: bool,
    header: String,
    table_row: fn(&R) -> String,
) -> impl FnMut(&R) {
    use std::io::Write;
    if !json {
        println!("{header}");
    }
    move |row| {
        let line = if json {
            serde_json::to_string(row).expect("rows serialise")
        } else {
            table_row(row)
        };
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

/// The `tiny` preset (the operator's `tiny`, byte vocabulary).
pub const TINY_CONFIG: &str = include_str!("../../tests/fixtures/tiny-config.json");

/// The model config a benchmark trains: the one `given`, or the tiny preset written into
/// `work_dir` (which this creates).
pub fn model_config(
    work_dir: &std::path::Path,
    given: Option<&std::path::Path>,
) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(work_dir)?;
    Ok(match given {
        Some(path) => path.to_owned(),
        None => {
            let path = work_dir.join("tiny-config.json");
            std::fs::write(&path, TINY_CONFIG)?;
            path
        }
    })
}
