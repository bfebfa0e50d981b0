//! A run's configuration, shared by its exchange and every peer: the model, the data, the
//! schedule and the outer algorithm. The operator passes it as `STARLING_*` environment
//! variables; the exchange refuses peers whose configuration differs from its own.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::codec::{AggregationRule, CodecConfig, Compressor, ValueBits};
use crate::data::{Assignment, Batch, Corpus, Shards, Tokenizer};
use crate::device::Placement;
use schemars::JsonSchema;

use crate::env;
use crate::outer::Round;

use crate::model::{AdamWConfig, Llama, LrSchedule, ModelConfig, load_checkpoint};

/// How peers combine their work.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// H local AdamW steps, then top-k + 2-bit compressed pseudo-gradients with error
    /// feedback, averaged and applied with the outer learning rate.
    #[default]
    #[value(name = "sparseloco")]
    SparseLoCo,
    /// H local AdamW steps, then dense fp32 pseudo-gradients applied with Nesterov
    /// momentum: the baseline SparseLoCo is measured against.
    #[value(name = "diloco")]
    DiLoCo,
    /// Every step: dense gradients averaged over peers, one shared AdamW step (what
    /// data-parallel training does inside a datacenter).
    #[value(name = "ddp")]
    Ddp,
}

/// How a round's updates are combined into the global step (`sparseloco`; the dense
/// algorithms always take the weighted mean).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// `Σ wᵢ·dᵢ / Σ wᵢ` over the peers with positive weight.
    #[default]
    WeightedMean,
    /// Each peer's update clipped to the median of the peers' norms, then each
    /// coordinate averaged over the peers that sent it (Templar's rule): no single peer
    /// can dominate a round.
    MedianNorm,
}

impl Aggregation {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What every peer downloads each round to take the round's step. Each bounds a home
/// link's download differently as the federation grows; all keep every replica
/// bit-identical, because all apply the same bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Download {
    /// One object: the exchange aggregates the round's updates and compresses the
    /// aggregate again (chunked top-k + quantisation, with the exchange's own error
    /// feedback). A peer's download no longer depends on how many peers there are.
    #[default]
    Aggregate,
    /// At most `gather` updates: the highest-weighted, ties drawn anew each round.
    Gather,
    /// Every accepted update: a peer's download grows with the federation.
    All,
}

/// Updates gathered per round under [`Download::Gather`] (as Templar gathers).
pub const DEFAULT_GATHER: u32 = 20;

/// The compressed aggregate keeps this many times the peers' k per chunk unless the run
/// says otherwise. Measured with `bench convergence` (4 peers, k = 32, 96 rounds of 10
/// steps; final validation loss against downloading every update): 1× ended 4.8% higher,
/// 2× 1.5%, 3× 0.6%, 4× 0.1% lower, for an aggregate of 1.0, 1.6, 2.1 and 2.6 updates'
/// bytes (Rice-coded indices cost less as a chunk fills). 3× is the densest that stays
/// under three updates at k = 64 of 4096 too, where 4× would be 3.1.
pub const AGGREGATE_K_FACTOR: u32 = 3;

/// Everything that must be the same on every peer of a run. The run's length is not here:
/// it may change while the run goes on, so peers learn it from the exchange
/// ([`crate::exchange::Settings`]).
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct RunConfig {
    /// The model: a Hugging Face `config.json` for LlamaForCausalLM, as a path or as the
    /// JSON itself (what the operator passes, so pods need no mounted file).
    #[arg(long, env = env::MODEL_CONFIG)]
    #[serde(skip)] // its content is part of the fingerprint, not where it lies
    pub model_config: String,
    /// Seed of the initial weights and of the data assignment.
    #[arg(long, env = env::SEED, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, env = env::ALGORITHM, value_enum, default_value_t = Algorithm::SparseLoCo)]
    pub algorithm: Algorithm,
    /// Most peers the run can have (fixes each peer's data slice for the whole run).
    #[arg(long, env = env::MAX_PEERS, default_value_t = 4)]
    pub max_peers: u32,
    /// Inner steps per round (ignored by `ddp`, whose rounds are single steps).
    #[arg(long, env = env::INNER_STEPS, default_value_t = 20)]
    pub inner_steps: u32,
    /// Sequences per peer per inner step.
    #[arg(long, env = env::BATCH, default_value_t = 8)]
    pub batch: u32,
    /// Sequences per forward pass (gradient accumulation reaches the batch).
    #[arg(long, env = env::MICRO_BATCH, default_value_t = 8)]
    pub micro_batch: u32,
    #[arg(long, env = env::SEQUENCE_LENGTH, default_value_t = 128)]
    pub sequence_length: u32,
    /// Peak inner (AdamW) learning rate.
    #[arg(long, env = env::LR, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, env = env::WARMUP_STEPS, default_value_t = 20)]
    pub warmup_steps: u64,
    // The inner AdamW's other settings. Each is left out of the fingerprint at its
    // default, so runs that predate them keep theirs.
    #[arg(long, env = env::BETA1, default_value_t = AdamWConfig::DEFAULT.beta1)]
    #[serde(skip_serializing_if = "adamw_default::beta1")]
    pub beta1: f64,
    #[arg(long, env = env::BETA2, default_value_t = AdamWConfig::DEFAULT.beta2)]
    #[serde(skip_serializing_if = "adamw_default::beta2")]
    pub beta2: f64,
    /// Decoupled weight decay.
    #[arg(long, env = env::WEIGHT_DECAY, default_value_t = AdamWConfig::DEFAULT.weight_decay)]
    #[serde(skip_serializing_if = "adamw_default::weight_decay")]
    pub weight_decay: f64,
    /// Clip each step's global gradient norm to this; 0 clips nothing.
    #[arg(long, env = env::GRAD_CLIP, default_value_t = adamw_default::GRAD_CLIP)]
    #[serde(skip_serializing_if = "adamw_default::grad_clip")]
    pub grad_clip: f64,
    #[arg(long, env = env::OUTER_LR, default_value_t = 1.0)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum (`diloco`).
    #[arg(long, env = env::OUTER_MOMENTUM, default_value_t = DEFAULT_OUTER_MOMENTUM)]
    pub outer_momentum: f32,
    #[arg(long, env = env::CHUNK, default_value_t = 4096)]
    pub chunk: u32,
    /// Values kept per chunk.
    #[arg(long, env = env::TOPK, default_value_t = 64)]
    pub k: u32,
    #[arg(long, env = env::VALUE_BITS, default_value_t = 2)]
    pub bits: u8,
    /// Error-feedback decay β.
    #[arg(long, env = env::ERROR_FEEDBACK, default_value_t = 0.95)]
    pub error_feedback: f32,
    /// How a round's updates are combined.
    #[arg(long, env = env::AGGREGATION, value_enum, default_value_t = Aggregation::WeightedMean)]
    // Left out at its default, so runs that predate the choice keep their fingerprint.
    #[serde(skip_serializing_if = "Aggregation::is_default")]
    pub aggregation: Aggregation,
    /// What a peer downloads each round (see [`Download`]).
    #[arg(long, env = env::DOWNLOAD, value_enum, default_value_t = Download::Aggregate)]
    pub download: Download,
    /// Most updates a round's step takes under `--download gather`.
    #[arg(long, env = env::GATHER, default_value_t = DEFAULT_GATHER, value_parser = clap::value_parser!(u32).range(1..))]
    pub gather: u32,
    /// Values kept per chunk of the compressed aggregate (`--download aggregate`, with
    /// `sparseloco`); three times `--k` when absent.
    #[arg(long, env = env::AGGREGATE_K)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate_k: Option<u32>,
    /// Text corpus (see `Corpus::from_path`); the built-in Shakespeare when absent.
    #[arg(long, env = env::CORPUS)]
    #[serde(skip)]
    pub corpus: Option<PathBuf>,
    /// `bytes`, or the path of a Hugging Face `tokenizer.json`.
    #[arg(long, env = env::TOKENIZER, default_value = "bytes")]
    pub tokenizer: String,
    /// Start from this checkpoint (a Hugging Face model directory with
    /// `model.safetensors` and a matching `config.json`) instead of random weights.
    #[arg(long, env = env::INIT_FROM)]
    #[serde(skip)]
    pub init_from: Option<PathBuf>,
}

pub mod memory;

/// Whether an AdamW setting is at its default (and so left out of the fingerprint).
mod adamw_default {
    use crate::model::AdamWConfig;

    pub const GRAD_CLIP: f64 = match AdamWConfig::DEFAULT.grad_clip {
        Some(clip) => clip,
        None => 0.0,
    };
    pub fn beta1(v: &f64) -> bool {
        *v == AdamWConfig::DEFAULT.beta1
    }
    pub fn beta2(v: &f64) -> bool {
        *v == AdamWConfig::DEFAULT.beta2
    }
    pub fn weight_decay(v: &f64) -> bool {
        *v == AdamWConfig::DEFAULT.weight_decay
    }
    pub fn grad_clip(v: &f64) -> bool {
        *v == GRAD_CLIP
    }
}

/// The outer Nesterov momentum of `diloco` when none is given: none, so the outer step
/// is the plain mean. DiLoCo's published 0.9 (with α = 0.7) suits hundreds of inner steps
/// a round; at 20 it overshoots: on the tiny preset (`bench convergence`, 4 peers, 960
/// inner steps) it ended 12% above the plain mean, and 17% above data-parallel training.
pub const DEFAULT_OUTER_MOMENTUM: f32 = 0.0;

/// The settings `bench convergence --sweep` found best on the tiny preset (the README's
/// table): the defaults of that benchmark and of the TrainingRun, defined once.
pub mod tuned {
    use super::Algorithm;

    pub const INNER_STEPS: u32 = 10;
    /// Values kept per chunk of 4096.
    pub const K: u32 = 32;
    pub const LR: f64 = 3e-3;
    pub const WARMUP_STEPS: u32 = 20;

    /// SparseLoCo's step lags the dense mean (its error feedback holds most of each
    /// update back), so it steps past it; the dense algorithms step by the mean.
    pub const fn outer_lr(algorithm: Algorithm) -> f32 {
        match algorithm {
            Algorithm::SparseLoCo => 2.0,
            Algorithm::DiLoCo | Algorithm::Ddp => 1.0,
        }
    }
}

/// A value-enum's name as its flag (and variable) spells it.
pub(crate) fn value_name<V: ValueEnum>(v: &V) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

impl RunConfig {
    /// The configuration as environment variables, read back by the same flags
    /// (what the operator gives every pod of a run).
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (env::MODEL_CONFIG, self.model_config.clone()),
            (env::SEED, self.seed.to_string()),
            (env::ALGORITHM, value_name(&self.algorithm)),
            (env::MAX_PEERS, self.max_peers.to_string()),
            (env::INNER_STEPS, self.inner_steps.to_string()),
            (env::BATCH, self.batch.to_string()),
            (env::MICRO_BATCH, self.micro_batch.to_string()),
            (env::SEQUENCE_LENGTH, self.sequence_length.to_string()),
            (env::LR, self.lr.to_string()),
            (env::WARMUP_STEPS, self.warmup_steps.to_string()),
            (env::BETA1, self.beta1.to_string()),
            (env::BETA2, self.beta2.to_string()),
            (env::WEIGHT_DECAY, self.weight_decay.to_string()),
            (env::GRAD_CLIP, self.grad_clip.to_string()),
            (env::OUTER_LR, self.outer_lr.to_string()),
            (env::OUTER_MOMENTUM, self.outer_momentum.to_string()),
            (env::CHUNK, self.chunk.to_string()),
            (env::TOPK, self.k.to_string()),
            (env::VALUE_BITS, self.bits.to_string()),
            (env::ERROR_FEEDBACK, self.error_feedback.to_string()),
            (env::AGGREGATION, value_name(&self.aggregation)),
            (env::DOWNLOAD, value_name(&self.download)),
            (env::GATHER, self.gather.to_string()),
            (env::TOKENIZER, self.tokenizer.clone()),
        ];
        let paths = [
            (env::CORPUS, &self.corpus),
            (env::INIT_FROM, &self.init_from),
        ];
        if let Some(k) = self.aggregate_k {
            out.push((env::AGGREGATE_K, k.to_string()));
        }
        for (name, path) in paths {
            if let Some(path) = path {
                out.push((name, path.display().to_string()));
            }
        }
        out
    }
}

/// A loaded run: the configuration made concrete.
pub struct Run {
    pub config: RunConfig,
    pub model: ModelConfig,
    pub tokenizer: Tokenizer,
    pub shards: Shards,
    pub assignment: Assignment,
    /// Hash of everything peers must agree on.
    pub fingerprint: String,
    /// Where this process holds the model and the dtype of its products (the CPU in
    /// f32 unless a role opened another; not part of what peers agree on).
    pub placement: Placement,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("model config {origin}: {message}")]
    Model { origin: String, message: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error("invalid run: {0}")]
    Invalid(String),
}

/// How an inline model config (rather than a path) starts.
const JSON_OBJECT: char = '{';

impl RunConfig {
    /// Reads the model config and builds (or reopens) the token shards under `data_dir`.
    pub fn load(self, data_dir: &Path) -> Result<Run, RunError> {
        let inline = self.model_config.trim_start().starts_with(JSON_OBJECT);
        let model_error = |message: String| RunError::Model {
            origin: if inline {
                "(inline JSON)".into()
            } else {
                self.model_config.clone()
            },
            message,
        };
        let text = if inline {
            self.model_config.clone()
        } else {
            std::fs::read_to_string(&self.model_config).map_err(|e| model_error(e.to_string()))?
        };
        let model: ModelConfig =
            serde_json::from_str(&text).map_err(|e| model_error(e.to_string()))?;
        model.validate().map_err(|e| model_error(e.to_string()))?;
        let tokenizer = Tokenizer::from_spec(&self.tokenizer)?;
        self.check_fits(&model, &tokenizer)?;
        let corpus = match &self.corpus {
            Some(path) => Corpus::from_path(path)?,
            None => Corpus::shakespeare(),
        };
        let (shards, _) = Shards::build_or_open(data_dir, &corpus, &tokenizer)?;
        let assignment = Assignment::new(
            self.seed,
            self.max_peers,
            u64::from(self.steps_per_round()) * u64::from(self.batch),
            self.sequence_length as usize,
            shards.train.len(),
        )?;
        let init = self.init_identity()?;
        let fingerprint = crate::data::fingerprint(
            serde_json::json!({
                "config": &self,
                "model": &model,
                "corpus": corpus.fingerprint(),
                "tokenizer": tokenizer.name(),
                "init": init,
            })
            .to_string()
            .as_bytes(),
        );
        Ok(Run {
            config: self,
            model,
            tokenizer,
            shards,
            assignment,
            fingerprint,
            placement: Placement::default(),
        })
    }

    /// Checks that the schedule, the tokenizer and the codec fit the model.
    fn check_fits(&self, model: &ModelConfig, tokenizer: &Tokenizer) -> Result<(), RunError> {
        if (tokenizer.vocab_size() as usize) > model.vocab_size {
            return Err(RunError::Invalid(format!(
                "tokenizer {} has {} tokens but the model's vocab_size is {}",
                tokenizer.name(),
                tokenizer.vocab_size(),
                model.vocab_size
            )));
        }
        if self.sequence_length as usize > model.max_position_embeddings {
            return Err(RunError::Invalid(format!(
                "sequence length {} exceeds the model's max_position_embeddings {}",
                self.sequence_length, model.max_position_embeddings
            )));
        }
        if self.batch == 0 || self.max_peers == 0 {
            return Err(RunError::Invalid(
                "batch and max peers must be positive".into(),
            ));
        }
        self.codec()?;
        self.aggregate_codec()?;
        Ok(())
    }

    /// The initial checkpoint as the fingerprint names it: by its weights file's size
    /// and time, since hashing gigabytes on every start would be slow, and a mismatch is
    /// what this must catch. `null` for random weights.
    fn init_identity(&self) -> Result<serde_json::Value, RunError> {
        let Some(dir) = &self.init_from else {
            return Ok(serde_json::Value::Null);
        };
        let weights = dir.join("model.safetensors");
        let meta = std::fs::metadata(&weights).map_err(|e| {
            RunError::Invalid(format!("initial checkpoint {}: {e}", weights.display()))
        })?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        Ok(serde_json::json!({"size": meta.len(), "modified": modified}))
    }

    /// Inner steps in one round: one for `ddp`.
    pub fn steps_per_round(&self) -> u32 {
        match self.algorithm {
            Algorithm::Ddp => 1,
            _ => self.inner_steps.max(1),
        }
    }

    pub fn codec(&self) -> Result<Compressor, RunError> {
        let config = CodecConfig::new(self.chunk, self.k, ValueBits::try_from(self.bits)?)?;
        Ok(Compressor::new(config, self.error_feedback)?)
    }

    /// How the exchange compresses a round's aggregate under [`Download::Aggregate`]:
    /// the run's chunk and value bits, `aggregate_k` values per chunk
    /// ([`AGGREGATE_K_FACTOR`] × `k`, within the chunk, by default), and error feedback
    /// that forgets nothing (β = 1), so what one round's aggregate leaves out goes out
    /// in a later one.
    pub fn aggregate_codec(&self) -> Result<Compressor, RunError> {
        let k = (self.aggregate_k)
            .unwrap_or(AGGREGATE_K_FACTOR * self.k)
            .min(self.chunk);
        let config = CodecConfig::new(self.chunk, k, ValueBits::try_from(self.bits)?)?;
        Ok(Compressor::new(config, 1.0)?)
    }

    pub fn aggregation(&self) -> AggregationRule {
        match self.aggregation {
            Aggregation::WeightedMean => AggregationRule::WeightedMean,
            Aggregation::MedianNorm => AggregationRule::MedianNormClipSelectedMean,
        }
    }

    /// The inner learning rate over a run of `rounds` rounds: it decays to its floor at
    /// the run's end, so a run made longer mid-way stretches its decay from then on.
    pub fn schedule(&self, rounds: Round) -> LrSchedule {
        LrSchedule {
            peak: self.lr,
            warmup: self.warmup_steps,
            total: u64::from(rounds.0) * u64::from(self.steps_per_round()),
            floor: 0.1,
        }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            ..AdamWConfig::DEFAULT
        }
    }
}

impl Run {
    /// The run's starting parameters: the initial checkpoint if there is one, else
    /// random weights from the run's seed. Every peer and the exchange get the same.
    pub fn initial_model(&self) -> Result<Llama, RunError> {
        let Some(dir) = &self.config.init_from else {
            return Llama::new(self.model.clone(), self.config.seed, &self.placement.device)
                .map(|m| m.with_precision(self.placement.precision))
                .map_err(|e| RunError::Invalid(e.to_string()));
        };
        let (model, _) = load_checkpoint(dir, &self.placement.device)
            .map_err(|e| RunError::Invalid(format!("initial checkpoint: {e}")))?;
        if model.config() != &self.model {
            return Err(RunError::Invalid(format!(
                "initial checkpoint {} has a different architecture from the run's model",
                dir.display()
            )));
        }
        Ok(model.with_precision(self.placement.precision))
    }

    /// The batches peer `peer` trains on in `round`, one per inner step.
    pub fn batches(&self, peer: u32, round: u32) -> Vec<Batch> {
        let windows = self.assignment.peer_round(peer, round);
        windows
            .chunks(self.config.batch as usize)
            .map(|w| self.assignment.batch(&self.shards.train, w))
            .collect()
    }

    /// A fixed batch of `rows` held-out sequences: the run's validation loss is measured
    /// on it.
    pub fn validation_batch(&self, rows: u32) -> Result<Batch, RunError> {
        Ok(validation_batch(
            &self.shards.validation,
            rows,
            self.config.sequence_length as usize,
        )?)
    }
}

/// `rows` held-out sequences of `seq` tokens, the same for everyone who asks.
pub fn validation_batch(
    tokens: &[crate::data::Token],
    rows: u32,
    seq: usize,
) -> Result<Batch, crate::data::DataError> {
    let a = Assignment::new(0, 1, u64::from(rows), seq, tokens.len())?;
    Ok(a.batch(tokens, &a.peer_round(0, 0)))
}

#[cfg(test)]
mod tests;
