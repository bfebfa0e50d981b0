//! Benchmarks (`starling-trainer bench ...`). Throughputs are reported next to a baseline
//! measured in the same run on the same buffers, because the machines are shared and
//! absolute numbers drift.

mod throughput;

pub use throughput::{
    Shape, ThroughputBench, ThroughputRow, throughput_table_header, throughput_table_row,
};

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::{CodecConfig, Compressor, Finite, Update, ValueBits};
use crate::run::Algorithm;

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
    /// A plain (single-threaded) copy of the same buffer.
    pub memcpy_gbps: f64,
    /// The same copy split over all threads: a stricter baseline on machines where one
    /// core cannot saturate memory.
    pub memcpy_parallel_gbps: f64,
    pub threads: usize,
}

/// Parameters of a codec benchmark run.
pub struct CodecBench {
    pub params: Vec<usize>,
    pub chunk: u32,
    pub ks: Vec<u32>,
    pub bits: ValueBits,
    pub repeats: usize,
}

impl Default for CodecBench {
    fn default() -> Self {
        Self {
            params: vec![16 << 20, 256 << 20],
            chunk: 4096,
            ks: vec![32, 64, 128],
            bits: ValueBits::Two,
            repeats: 3,
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
            let mut copy = vec![0.0f32; params];
            let serial = best_of(self.repeats, || copy.copy_from_slice(&delta));
            let parallel = best_of(self.repeats, || {
                copy.par_chunks_mut(1 << 20)
                    .zip(delta.par_chunks(1 << 20))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            });
            let (memcpy_gbps, memcpy_parallel_gbps) = (gbps(bytes, serial), gbps(bytes, parallel));
            drop(copy);

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
                let bytes_encoded = Update::new(config, vec![encoded.clone()])?.to_bytes().len();
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
                    memcpy_gbps,
                    memcpy_parallel_gbps,
                    threads: rayon::current_num_threads(),
                };
                report(&row);
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

/// Human-readable table header and rows.
pub fn codec_table_header() -> String {
    format!(
        "{:>10} {:>6} {:>4} {:>4} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
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
        "threads"
    )
}

pub fn codec_table_row(r: &CodecRow) -> String {
    format!(
        "{:>10} {:>6} {:>4} {:>4} {:>12} {:>8.4} {:>8.1} {:>9.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>7}",
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
        r.threads
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

/// One algorithm's outcome in the convergence benchmark.
#[derive(Debug, Serialize)]
pub struct ConvergenceRow {
    pub algorithm: Algorithm,
    pub peers: u32,
    pub rounds: u32,
    /// Tokens trained on by accepted updates, all peers together.
    pub tokens: u64,
    pub initial_validation_loss: f32,
    pub final_validation_loss: f32,
    /// Bytes of updates each peer sent (mean over peers).
    pub bytes_sent_per_peer: u64,
    /// The same updates as dense fp32: the baseline of the ratio.
    pub dense_bytes_per_peer: u64,
    pub ratio_vs_dense: f64,
    pub wall_s: f64,
    /// Peak resident memory of the exchange, and of the largest peer, bytes.
    pub exchange_peak_rss_bytes: u64,
    pub peer_peak_rss_bytes: u64,
}

/// The convergence benchmark: the same model, data and token budget trained by a local
/// federation (exchange + peers as processes on loopback) with each algorithm.
#[derive(clap::Args, Debug)]
pub struct ConvergenceBench {
    /// The `starling-trainer` binary to run the exchange and the peers with.
    #[arg(skip)]
    pub binary: std::path::PathBuf,
    /// Where the runs work (kept afterwards for their logs and checkpoints).
    #[arg(long, default_value = ".starling/bench-convergence")]
    pub work_dir: std::path::PathBuf,
    /// A model `config.json`; the tiny preset by default.
    #[arg(long)]
    pub model_config: Option<std::path::PathBuf>,
    /// Algorithms to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "ddp,diloco,sparseloco"
    )]
    pub algorithms: Vec<Algorithm>,
    #[arg(long, default_value_t = 4)]
    pub peers: u32,
    #[arg(long, default_value_t = 12)]
    pub rounds: u32,
    #[arg(long, default_value_t = 20)]
    pub inner_steps: u32,
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    #[arg(long, default_value_t = 128)]
    pub sequence_length: u32,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 20)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 4096)]
    pub chunk: u32,
    #[arg(long, default_value_t = 64)]
    pub k: u32,
    #[arg(long, default_value_t = 2)]
    pub bits: u8,
    #[arg(long, default_value_t = 0.95)]
    pub error_feedback: f32,
    #[arg(long, default_value_t = 1.0)]
    pub sparseloco_outer_lr: f32,
    #[arg(long, default_value_t = 0.7)]
    pub diloco_outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    pub diloco_momentum: f32,
    /// Held-out sequences the validation loss is measured on.
    #[arg(long, default_value_t = 64)]
    pub eval_rows: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

impl ConvergenceBench {
    /// Trains every algorithm in turn, calling `report` as each row is ready.
    pub fn run(
        &self,
        mut report: impl FnMut(&ConvergenceRow),
    ) -> anyhow::Result<Vec<ConvergenceRow>> {
        let model_config = self.model_config()?;
        let mut rows = vec![];
        for &algorithm in &self.algorithms {
            let row = self.run_one(algorithm, &model_config)?;
            report(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    /// The model config to train: the one given, or the tiny preset written into the
    /// work directory.
    fn model_config(&self) -> anyhow::Result<std::path::PathBuf> {
        std::fs::create_dir_all(&self.work_dir)?;
        Ok(match &self.model_config {
            Some(path) => path.clone(),
            None => {
                let path = self.work_dir.join("tiny-config.json");
                std::fs::write(&path, TINY_CONFIG)?;
                path
            }
        })
    }

    /// One algorithm's run, from a fresh directory to its end, measured.
    fn run_one(
        &self,
        algorithm: Algorithm,
        model_config: &std::path::Path,
    ) -> anyhow::Result<ConvergenceRow> {
        // Same tokens for everyone: DDP's rounds are single steps.
        let (rounds, inner) = match algorithm {
            Algorithm::Ddp => (self.rounds * self.inner_steps, 1),
            _ => (self.rounds, self.inner_steps),
        };
        let args = self.run_args(algorithm, model_config, inner);
        let dir = self.work_dir.join(format!("{algorithm:?}").to_lowercase());
        let _ = std::fs::remove_dir_all(&dir);
        let mut federation =
            crate::local::LocalFederation::new(&self.binary, &dir, self.peers, args)?;
        let start = Instant::now();
        self.train(&mut federation, rounds)?;
        let wall_s = start.elapsed().as_secs_f64();
        let state = federation.run_state()?;
        let last = state
            .recent
            .last()
            .ok_or_else(|| anyhow::anyhow!("{algorithm:?}: no round closed"))?;
        let bytes_sent_per_peer = state.bytes_received / u64::from(self.peers);
        let peaks = federation.peak_rss();
        let peer_peak = peaks
            .iter()
            .filter(|(name, _)| name.starts_with('p'))
            .map(|(_, &b)| b)
            .max()
            .unwrap_or(0);
        let dense_bytes_per_peer = state.dense_update_bytes * u64::from(rounds);
        Ok(ConvergenceRow {
            algorithm,
            peers: self.peers,
            rounds,
            tokens: state.tokens,
            initial_validation_loss: state.initial_validation_loss,
            final_validation_loss: last.validation_loss,
            bytes_sent_per_peer,
            dense_bytes_per_peer,
            ratio_vs_dense: dense_bytes_per_peer as f64 / bytes_sent_per_peer.max(1) as f64,
            wall_s,
            exchange_peak_rss_bytes: peaks.get("exchange").copied().unwrap_or(0),
            peer_peak_rss_bytes: peer_peak,
        })
    }

    /// The run flags the exchange and every peer of `algorithm`'s run get, with `inner`
    /// steps a round.
    fn run_args(
        &self,
        algorithm: Algorithm,
        model_config: &std::path::Path,
        inner: u32,
    ) -> Vec<String> {
        let outer_lr = match algorithm {
            Algorithm::SparseLoCo => self.sparseloco_outer_lr,
            Algorithm::DiLoCo => self.diloco_outer_lr,
            Algorithm::Ddp => 1.0,
        };
        [
            ("--model-config", model_config.display().to_string()),
            ("--algorithm", format!("{algorithm:?}").to_lowercase()),
            ("--seed", self.seed.to_string()),
            ("--max-peers", self.peers.to_string()),
            ("--inner-steps", inner.to_string()),
            ("--batch", self.batch.to_string()),
            ("--micro-batch", self.batch.to_string()),
            ("--sequence-length", self.sequence_length.to_string()),
            ("--lr", self.lr.to_string()),
            ("--warmup-steps", self.warmup_steps.to_string()),
            ("--outer-lr", outer_lr.to_string()),
            ("--outer-momentum", self.diloco_momentum.to_string()),
            ("--chunk", self.chunk.to_string()),
            ("--k", self.k.to_string()),
            ("--bits", self.bits.to_string()),
            ("--error-feedback", self.error_feedback.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }

    /// Starts the exchange (for `rounds` rounds, each waiting for every peer) and the
    /// peers, and waits until every peer has finished.
    fn train(
        &self,
        federation: &mut crate::local::LocalFederation,
        rounds: u32,
    ) -> anyhow::Result<()> {
        federation.start_exchange(&[
            "--rounds",
            &rounds.to_string(),
            "--min-peers",
            &self.peers.to_string(),
            "--round-deadline",
            "600",
            "--eval-rows",
            &self.eval_rows.to_string(),
        ])?;
        let children = (0..self.peers)
            .map(|p| federation.start_peer(p))
            .collect::<Result<Vec<_>, _>>()?;
        for (p, child) in children.into_iter().enumerate() {
            federation
                .finish(p as u32, child)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

pub fn convergence_table_header() -> String {
    format!(
        "{:<11} {:>5} {:>6} {:>9} {:>8} {:>8} {:>13} {:>13} {:>9} {:>8} {:>9} {:>9}",
        "algorithm",
        "peers",
        "rounds",
        "tokens",
        "val0",
        "val",
        "sent/peer",
        "dense/peer",
        "vs dense",
        "wall s",
        "exch RSS",
        "peer RSS"
    )
}

pub fn convergence_table_row(r: &ConvergenceRow) -> String {
    format!(
        "{:<11} {:>5} {:>6} {:>9} {:>8.4} {:>8.4} {:>13} {:>13} {:>8.1}x {:>8.1} {:>6} MB {:>6} MB",
        format!("{:?}", r.algorithm).to_lowercase(),
        r.peers,
        r.rounds,
        r.tokens,
        r.initial_validation_loss,
        r.final_validation_loss,
        r.bytes_sent_per_peer,
        r.dense_bytes_per_peer,
        r.ratio_vs_dense,
        r.wall_s,
        r.exchange_peak_rss_bytes >> 20,
        r.peer_peak_rss_bytes >> 20
    )
}
