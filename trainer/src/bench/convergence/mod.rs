//! The convergence benchmark: the same model, data and token budget trained by a local
//! federation (an exchange and its peers as processes on loopback) with each algorithm,
//! and, with `--sweep`, over a grid of the settings that decide quality.
//!
//! Every row trains on the same tokens: a point of the grid with fewer inner steps per
//! round gets proportionally more rounds, and DDP's rounds are single steps. Each
//! federated row is compared with the DDP row of the same inner learning rate, because
//! that is what an ML engineer weighs a federated run against.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use serde::Serialize;

use crate::local::LocalFederation;

mod table;

use crate::run::{Algorithm, Download, tuned};
pub use table::{convergence_table_header, convergence_table_row};

/// The settings one run trains with: a point of the sweep's grid.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Peak inner (AdamW) learning rate.
    pub lr: f64,
    pub warmup_steps: u64,
    /// Inner steps per round (H); 1 for DDP.
    pub inner_steps: u32,
    pub rounds: u32,
    /// The outer learning rate (1 for DDP, whose rounds apply one AdamW step).
    pub outer_lr: f32,
    /// Outer Nesterov momentum (DiLoCo only).
    pub outer_momentum: Option<f32>,
    /// Error-feedback decay β and values kept per chunk (SparseLoCo only).
    pub error_feedback: Option<f32>,
    pub k: Option<u32>,
    /// What each peer downloads a round (SparseLoCo only: the dense algorithms'
    /// aggregate is their exact mean, so every mode trains them alike).
    pub download: Option<Download>,
    /// Values per chunk of the compressed aggregate (`download: aggregate` only).
    pub aggregate_k: Option<u32>,
}

/// One setting the sweep varies, and the values it takes (`lr=1e-3,3e-3`).
#[derive(Clone, Debug, PartialEq)]
pub enum Axis {
    Lr(Vec<f64>),
    WarmupSteps(Vec<u64>),
    /// Inner steps per round; the rounds change with them so the tokens stay equal.
    InnerSteps(Vec<u32>),
    OuterLr(Vec<f32>),
    OuterMomentum(Vec<f32>),
    ErrorFeedback(Vec<f32>),
    K(Vec<u32>),
    Download(Vec<Download>),
    AggregateK(Vec<u32>),
}

/// The names `--sweep` accepts, as in `NAME=V1,V2`.
const AXES: &str = "lr, warmup-steps, inner-steps, outer-lr, outer-momentum, error-feedback, \
                    k, download, aggregate-k";

impl FromStr for Axis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        fn values<T: FromStr>(name: &str, list: &str) -> Result<Vec<T>, String> {
            let values = (list.split(',').map(str::trim))
                .map(|v| v.parse().map_err(|_| format!("{name}: not a value: {v:?}")))
                .collect::<Result<Vec<T>, String>>()?;
            Ok(values)
        }
        let (name, list) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=V1,V2 (NAME one of {AXES})"))?;
        let axis = match name.trim() {
            "lr" => Axis::Lr(values(name, list)?),
            "warmup-steps" => Axis::WarmupSteps(values(name, list)?),
            "inner-steps" => Axis::InnerSteps(values(name, list)?),
            "outer-lr" => Axis::OuterLr(values(name, list)?),
            "outer-momentum" => Axis::OuterMomentum(values(name, list)?),
            "error-feedback" => Axis::ErrorFeedback(values(name, list)?),
            "k" => Axis::K(values(name, list)?),
            "download" => Axis::Download(
                (list.split(',').map(str::trim))
                    .map(|v| {
                        clap::ValueEnum::from_str(v, false).map_err(|e| format!("{name}: {e}"))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            "aggregate-k" => Axis::AggregateK(values(name, list)?),
            other => return Err(format!("no sweep axis {other:?} (one of {AXES})")),
        };
        Ok(axis)
    }
}

impl Axis {
    fn len(&self) -> usize {
        match self {
            Axis::Lr(v) => v.len(),
            Axis::WarmupSteps(v) => v.len(),
            Axis::InnerSteps(v) | Axis::K(v) | Axis::AggregateK(v) => v.len(),
            Axis::Download(v) => v.len(),
            Axis::OuterLr(v) | Axis::OuterMomentum(v) | Axis::ErrorFeedback(v) => v.len(),
        }
    }

    /// Sets value `i` of this axis on `base`.
    fn set(&self, i: usize, base: &mut Base) {
        match self {
            Axis::Lr(v) => base.lr = v[i],
            Axis::WarmupSteps(v) => base.warmup_steps = v[i],
            Axis::InnerSteps(v) => base.inner_steps = v[i],
            Axis::OuterLr(v) => base.outer_lr = Some(v[i]),
            Axis::OuterMomentum(v) => base.outer_momentum = v[i],
            Axis::ErrorFeedback(v) => base.error_feedback = v[i],
            Axis::K(v) => base.k = v[i],
            Axis::Download(v) => base.download = v[i],
            Axis::AggregateK(v) => base.aggregate_k = Some(v[i]),
        }
    }
}

/// The flags of a point before it is resolved for an algorithm.
#[derive(Clone, Debug, PartialEq)]
struct Base {
    lr: f64,
    warmup_steps: u64,
    inner_steps: u32,
    /// One outer learning rate for every algorithm, when the sweep sets it.
    outer_lr: Option<f32>,
    outer_momentum: f32,
    error_feedback: f32,
    k: u32,
    download: Download,
    aggregate_k: Option<u32>,
}

/// One algorithm's outcome in the convergence benchmark.
#[derive(Debug, Serialize)]
pub struct ConvergenceRow {
    pub algorithm: Algorithm,
    pub peers: u32,
    #[serde(flatten)]
    pub settings: Settings,
    /// Tokens trained on by accepted updates, all peers together.
    pub tokens: u64,
    pub initial_validation_loss: f32,
    pub final_validation_loss: f32,
    /// `final / DDP's final − 1` against the DDP row of the same learning rate and
    /// warmup, when the benchmark ran one.
    pub vs_ddp: Option<f64>,
    /// `final / final with download: all − 1` against the row of the same settings that
    /// downloaded every update, when the benchmark ran one.
    pub vs_all: Option<f64>,
    /// Bytes one peer downloaded to take a round's step, mean over the last rounds.
    pub download_per_round: u64,
    /// That, over one peer's mean update: what the download bound is measured in.
    pub download_vs_update: f64,
    /// Bytes of updates each peer sent (mean over peers).
    pub bytes_sent_per_peer: u64,
    /// The same updates as dense fp32: the baseline of the ratio.
    pub dense_bytes_per_peer: u64,
    pub ratio_vs_dense: f64,
    pub wall_s: f64,
    /// Peak resident memory of the exchange, of the largest peer, and of the largest
    /// evaluator (none without `--evaluators`), bytes.
    pub exchange_peak_rss_bytes: u64,
    pub peer_peak_rss_bytes: u64,
    pub evaluator_peak_rss_bytes: Option<u64>,
}

/// The convergence benchmark's flags: the base settings, and the axes to sweep.
#[derive(clap::Args, Debug)]
pub struct ConvergenceBench {
    /// The `starling-trainer` binary to run the exchange and the peers with.
    #[arg(skip)]
    pub binary: PathBuf,
    /// Where the runs work (kept afterwards for their logs and checkpoints).
    #[arg(long, default_value = ".starling/bench-convergence")]
    pub work_dir: PathBuf,
    /// A model `config.json`; the tiny preset by default.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Algorithms to run, in order (DDP first whatever the order: the others are
    /// compared with it).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "ddp,diloco,sparseloco"
    )]
    pub algorithms: Vec<Algorithm>,
    #[arg(long, default_value_t = 4)]
    pub peers: u32,
    /// Evaluators scoring every round beside the peers (at most 2), for their memory
    /// and their cost to the round; none by default.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::local::MAX_EVALUATORS)))]
    pub evaluators: u32,
    /// Rounds of `--inner-steps` steps: with the batch, every row's token budget. The
    /// defaults here are the tuned ones, which the TrainingRun's defaults follow.
    #[arg(long, default_value_t = 96)]
    pub rounds: u32,
    #[arg(long, default_value_t = tuned::INNER_STEPS)]
    pub inner_steps: u32,
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    #[arg(long, default_value_t = 128)]
    pub sequence_length: u32,
    #[arg(long, default_value_t = tuned::LR)]
    pub lr: f64,
    #[arg(long, default_value_t = u64::from(tuned::WARMUP_STEPS))]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 4096)]
    pub chunk: u32,
    #[arg(long, default_value_t = tuned::K)]
    pub k: u32,
    #[arg(long, default_value_t = 2)]
    pub bits: u8,
    #[arg(long, default_value_t = 0.95)]
    pub error_feedback: f32,
    /// What each peer downloads a round (`sparseloco`).
    #[arg(long, value_enum, default_value_t = Download::Aggregate)]
    pub download: Download,
    /// Updates a round takes with `--download gather`.
    #[arg(long, default_value_t = crate::run::DEFAULT_GATHER)]
    pub gather: u32,
    /// Values per chunk of the compressed aggregate; three times `--k` by default.
    #[arg(long)]
    pub aggregate_k: Option<u32>,
    #[arg(long, default_value_t = tuned::outer_lr(Algorithm::SparseLoCo))]
    pub sparseloco_outer_lr: f32,
    #[arg(long, default_value_t = tuned::outer_lr(Algorithm::DiLoCo))]
    pub diloco_outer_lr: f32,
    #[arg(long, default_value_t = crate::run::DEFAULT_OUTER_MOMENTUM)]
    pub diloco_momentum: f32,
    /// Vary a setting, `NAME=V1,V2`; repeat it for a grid (every combination runs, each
    /// algorithm once per combination of the settings it uses). NAME: lr, warmup-steps,
    /// inner-steps (the rounds follow, so the tokens stay equal), outer-lr (every
    /// federated algorithm's), outer-momentum, error-feedback, k, download (`all`,
    /// `gather`, `aggregate`), aggregate-k.
    #[arg(long = "sweep", value_name = "NAME=V1,V2")]
    pub sweep: Vec<Axis>,
    /// Held-out sequences the validation loss is measured on.
    #[arg(long, default_value_t = 64)]
    pub eval_rows: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl ConvergenceBench {
    /// Trains every run of the grid in turn, calling `report` as each row is ready.
    pub fn run(
        &self,
        mut report: impl FnMut(&ConvergenceRow),
    ) -> anyhow::Result<Vec<ConvergenceRow>> {
        let runs = self.runs().map_err(anyhow::Error::msg)?;
        let model_config = super::model_config(&self.work_dir, self.model_config.as_deref())?;
        let mut rows: Vec<ConvergenceRow> = vec![];
        for (i, (algorithm, settings)) in runs.into_iter().enumerate() {
            let dir = (self.work_dir).join(format!("{i:02}-{}", algorithm_name(algorithm)));
            let mut row = self.run_one(algorithm, settings, &model_config, &dir)?;
            row.vs_ddp = (rows.iter())
                .find(|r| {
                    r.algorithm == Algorithm::Ddp
                        && r.settings.lr == row.settings.lr
                        && r.settings.warmup_steps == row.settings.warmup_steps
                })
                .map(|ddp| f64::from(row.final_validation_loss / ddp.final_validation_loss) - 1.0);
            let all = Settings {
                download: Some(Download::All),
                aggregate_k: None,
                ..row.settings.clone()
            };
            row.vs_all = (rows.iter())
                .find(|r| r.algorithm == row.algorithm && r.settings == all)
                .map(|r| f64::from(row.final_validation_loss / r.final_validation_loss) - 1.0);
            report(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    /// Every (algorithm, settings) the grid asks for, each once, DDP's first.
    pub fn runs(&self) -> Result<Vec<(Algorithm, Settings)>, String> {
        let mut runs: Vec<(Algorithm, Settings)> = vec![];
        let mut algorithms = self.algorithms.clone();
        algorithms.sort_by_key(|&a| a != Algorithm::Ddp);
        for algorithm in algorithms {
            for point in self.grid() {
                let settings = self.settings(algorithm, &point)?;
                if !runs.contains(&(algorithm, settings.clone())) {
                    runs.push((algorithm, settings));
                }
            }
        }
        Ok(runs)
    }

    /// The base flags with every combination of the sweep's values.
    fn grid(&self) -> Vec<Base> {
        let base = Base {
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            inner_steps: self.inner_steps,
            outer_lr: None,
            outer_momentum: self.diloco_momentum,
            error_feedback: self.error_feedback,
            k: self.k,
            download: self.download,
            aggregate_k: self.aggregate_k,
        };
        self.sweep.iter().fold(vec![base], |points, axis| {
            (points.iter())
                .flat_map(|point| {
                    (0..axis.len()).map(move |i| {
                        let mut point = point.clone();
                        axis.set(i, &mut point);
                        point
                    })
                })
                .collect()
        })
    }

    /// What `algorithm` trains with at `point`: only the settings it uses, and the
    /// rounds that keep its tokens equal to every other row's.
    fn settings(&self, algorithm: Algorithm, point: &Base) -> Result<Settings, String> {
        let steps = self.rounds * self.inner_steps;
        let h = if algorithm == Algorithm::Ddp {
            1
        } else {
            point.inner_steps
        };
        if h == 0 || !steps.is_multiple_of(h) {
            return Err(format!(
                "inner-steps={h} does not divide the token budget's {steps} steps \
                 (--rounds {} × --inner-steps {})",
                self.rounds, self.inner_steps
            ));
        }
        let (outer_lr, outer_momentum, error_feedback, k) = match algorithm {
            Algorithm::Ddp => (1.0, None, None, None),
            Algorithm::DiLoCo => (
                point.outer_lr.unwrap_or(self.diloco_outer_lr),
                Some(point.outer_momentum),
                None,
                None,
            ),
            Algorithm::SparseLoCo => (
                point.outer_lr.unwrap_or(self.sparseloco_outer_lr),
                None,
                Some(point.error_feedback),
                Some(point.k),
            ),
        };
        let sparse = algorithm == Algorithm::SparseLoCo;
        let download = sparse.then_some(point.download);
        let aggregate_k = match download {
            Some(Download::Aggregate) => Some(
                (point.aggregate_k)
                    .unwrap_or(crate::run::AGGREGATE_K_FACTOR * point.k)
                    .min(self.chunk),
            ),
            _ => None,
        };
        Ok(Settings {
            lr: point.lr,
            warmup_steps: point.warmup_steps,
            inner_steps: h,
            rounds: steps / h,
            outer_lr,
            outer_momentum,
            error_feedback,
            k,
            download,
            aggregate_k,
        })
    }

    /// One run, from a fresh directory to its end, measured.
    fn run_one(
        &self,
        algorithm: Algorithm,
        settings: Settings,
        model_config: &Path,
        dir: &Path,
    ) -> anyhow::Result<ConvergenceRow> {
        let args = self.run_args(algorithm, &settings, model_config);
        let _ = std::fs::remove_dir_all(dir);
        let mut federation = LocalFederation::new(&self.binary, dir, self.peers, args)?;
        let start = Instant::now();
        self.train(&mut federation, settings.rounds)?;
        let wall_s = start.elapsed().as_secs_f64();
        let state = federation.run_state()?;
        let last = (state.recent.last())
            .ok_or_else(|| anyhow::anyhow!("{}: no round closed", algorithm_name(algorithm)))?;
        let bytes_sent_per_peer = state.bytes_received / u64::from(self.peers);
        let peaks = federation.peak_rss();
        // Processes are named `p0`, `e0`, ...: a role's letter and a number.
        let largest = |role: char| {
            (peaks.iter())
                .filter(|(name, _)| {
                    (name.strip_prefix(role)).is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .map(|(_, &b)| b)
                .max()
        };
        let dense_bytes_per_peer = state.dense_update_bytes * u64::from(settings.rounds);
        let downloads: Vec<u64> = state.recent.iter().map(|r| r.download_bytes).collect();
        let download_per_round = downloads.iter().sum::<u64>() / downloads.len().max(1) as u64;
        let update = bytes_sent_per_peer as f64 / f64::from(settings.rounds.max(1));
        Ok(ConvergenceRow {
            algorithm,
            peers: self.peers,
            settings,
            tokens: state.tokens,
            initial_validation_loss: state.initial_validation_loss,
            final_validation_loss: last.validation_loss,
            vs_ddp: None,
            vs_all: None,
            download_per_round,
            download_vs_update: download_per_round as f64 / update.max(1.0),
            bytes_sent_per_peer,
            dense_bytes_per_peer,
            ratio_vs_dense: dense_bytes_per_peer as f64 / bytes_sent_per_peer.max(1) as f64,
            wall_s,
            exchange_peak_rss_bytes: peaks.get("exchange").copied().unwrap_or(0),
            peer_peak_rss_bytes: largest('p').unwrap_or(0),
            evaluator_peak_rss_bytes: largest('e'),
        })
    }

    /// The run flags the exchange and every peer of a run get.
    fn run_args(&self, algorithm: Algorithm, s: &Settings, model_config: &Path) -> Vec<String> {
        [
            ("--model-config", model_config.display().to_string()),
            ("--algorithm", algorithm_name(algorithm)),
            ("--seed", self.seed.to_string()),
            ("--max-peers", self.peers.to_string()),
            ("--inner-steps", s.inner_steps.to_string()),
            ("--batch", self.batch.to_string()),
            ("--micro-batch", self.batch.to_string()),
            ("--sequence-length", self.sequence_length.to_string()),
            ("--lr", s.lr.to_string()),
            ("--warmup-steps", s.warmup_steps.to_string()),
            ("--outer-lr", s.outer_lr.to_string()),
            (
                "--outer-momentum",
                (s.outer_momentum.unwrap_or(self.diloco_momentum)).to_string(),
            ),
            ("--chunk", self.chunk.to_string()),
            ("--k", s.k.unwrap_or(self.k).to_string()),
            (
                "--download",
                crate::run::value_name(&s.download.unwrap_or(self.download)),
            ),
            ("--gather", self.gather.to_string()),
            ("--bits", self.bits.to_string()),
            (
                "--error-feedback",
                (s.error_feedback.unwrap_or(self.error_feedback)).to_string(),
            ),
        ]
        .into_iter()
        .chain(s.aggregate_k.map(|k| ("--aggregate-k", k.to_string())))
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }

    /// Starts the exchange (for `rounds` rounds, each waiting for every peer) and the
    /// peers, and waits until every peer has finished.
    fn train(&self, federation: &mut LocalFederation, rounds: u32) -> anyhow::Result<()> {
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
        let evaluators = (0..self.evaluators)
            .map(|e| federation.start_evaluator(e))
            .collect::<Result<Vec<_>, _>>()?;
        for (p, child) in children.into_iter().enumerate() {
            federation
                .finish(p as u32, child)
                .map_err(anyhow::Error::msg)?;
        }
        // An evaluator scores the last rounds after the peers have sent them.
        for (e, child) in evaluators.into_iter().enumerate() {
            federation
                .finish_evaluator_within(e as u32, child, std::time::Duration::from_secs(600))
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

/// An algorithm as its flag spells it.
fn algorithm_name(algorithm: Algorithm) -> String {
    crate::run::value_name(&algorithm)
}

#[cfg(test)]
mod tests;
