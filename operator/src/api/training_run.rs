use std::fmt;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LlamaConfig, ModelPreset, PeerId, Tier};
/// The trainer's own types: what the operator asks for is what the trainer reads.
pub use starling_trainer::codec::ValueBits;
pub use starling_trainer::model::Precision;
use starling_trainer::run::tuned;
pub use starling_trainer::run::{Aggregation, Algorithm, DEFAULT_GATHER, Download};
pub use starling_trainer::scoring::rules::Standing;
pub use starling_trainer::scoring::{CopySpec, OpenSkillSpec, ScoringSpec};

/// Fields that change what is trained (the model, its data, the compression, the seed,
/// the data split across `peers.max` and the inner optimisation) are fixed once the run
/// is `Running` or done: changing them mid-run would silently train something else.
/// Everything else (rounds, `peers.min`, placement, checkpointing, scoring) may change.
const TRAINING_FIELDS_FIXED_ONCE_RUNNING: &str = "!has(oldSelf.status) || !has(oldSelf.status.phase) \
    || oldSelf.status.phase in ['Pending', 'Placing'] \
    || (self.spec.model == oldSelf.spec.model && self.spec.data == oldSelf.spec.data \
    && self.spec.compression == oldSelf.spec.compression && self.spec.seed == oldSelf.spec.seed \
    && self.spec.peers.max == oldSelf.spec.peers.max \
    && (has(self.spec.exchange) && has(self.spec.exchange.storage)) \
    == (has(oldSelf.spec.exchange) && has(oldSelf.spec.exchange.storage)) \
    && (!has(self.spec.exchange) || !has(self.spec.exchange.storage) \
    || self.spec.exchange.storage == oldSelf.spec.exchange.storage) \
    && self.spec.schedule.innerSteps == oldSelf.spec.schedule.innerSteps \
    && self.spec.schedule.batchSize == oldSelf.spec.schedule.batchSize \
    && self.spec.schedule.innerOptimizer == oldSelf.spec.schedule.innerOptimizer \
    && has(self.spec.schedule.outerLr) == has(oldSelf.spec.schedule.outerLr) \
    && (!has(self.spec.schedule.outerLr) || self.spec.schedule.outerLr == oldSelf.spec.schedule.outerLr) \
    && self.spec.schedule.outerMomentum == oldSelf.spec.schedule.outerMomentum \
    && has(self.spec.schedule.microBatchSize) == has(oldSelf.spec.schedule.microBatchSize) \
    && (!has(self.spec.schedule.microBatchSize) \
    || self.spec.schedule.microBatchSize == oldSelf.spec.schedule.microBatchSize))";
const TRAINING_FIELDS_MESSAGE: &str = "model, data, compression, seed, peers.max, \
    exchange.storage and the \
    schedule's innerSteps, batchSize, microBatchSize, innerOptimizer, outerLr and outerMomentum \
    cannot change \
    once the run has started: they change what is being trained. Create a new TrainingRun \
    instead, starting from this run's last checkpoint to keep its progress; outerRounds, \
    peers.min, placement, checkpoint and scoring may change";

/// One federated training run: a model, its data, the round schedule, and how peers are
/// compressed, placed, scored and checkpointed.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "TrainingRun",
    namespaced,
    shortname = "tr",
    category = "starling",
    status = "TrainingRunStatus",
    derive = "PartialEq",
    doc = "A federated SparseLoCo training run over Starling member clusters.",
    validation = Rule::new(TRAINING_FIELDS_FIXED_ONCE_RUNNING).message(TRAINING_FIELDS_MESSAGE),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round"),
    printcolumn(
        name = "Peers",
        type_ = "integer",
        description = "Peers currently training",
        json_path = ".status.activePeers"
    ),
    printcolumn(
        name = "Excluded",
        type_ = "integer",
        description = "Peers scoring has excluded or banned",
        json_path = ".status.excludedPeers"
    ),
    printcolumn(
        name = "Loss",
        type_ = "string",
        description = "Validation loss after the last round, to 4 significant digits",
        json_path = ".status.loss"
    ),
    printcolumn(
        name = "Ratio",
        type_ = "number",
        description = "Dense fp32 bytes / bytes sent on the wire",
        json_path = ".status.compressionRatio"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Published",
        type_ = "string",
        description = "The last checkpoint published to the Hub: repo@revision",
        json_path = ".status.lastPublished",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRunSpec {
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub compression: CompressionSpec,
    pub peers: PeersSpec,
    #[serde(default)]
    pub placement: PlacementSpec,
    #[serde(default)]
    pub scoring: ScoringSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// How peers reach the run's exchange (TLS, on by default).
    #[serde(default)]
    pub exchange: super::ExchangeSpec,
    /// Publish checkpoints to the Hugging Face Hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishSpec>,
    /// Seeds initialisation and every peer's data assignment, so evaluators can recompute
    /// exactly what each peer should have trained on.
    #[serde(default)]
    pub seed: u64,
}

/// The architecture: a preset, or an explicit config. Exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.preset) != has(self.config)").message("set exactly one of preset and config"))]
pub struct ModelSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<ModelPreset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<LlamaConfig>,
    /// Start from published weights instead of a random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<HubRef>,
}

/// A repository on the Hugging Face Hub at a revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HubRef {
    /// `owner/name`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub repo_id: String,
    /// Branch, tag or commit.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1))]
    pub revision: String,
}

fn default_revision() -> String {
    "main".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpec {
    pub corpus: CorpusSource,
    /// `bytes` (built in, 256 tokens) or the repo id of a Hub `tokenizer.json`.
    #[serde(default = "default_tokenizer")]
    #[schemars(regex(
        pattern = r"^(bytes|[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)$"
    ))]
    pub tokenizer: String,
    /// Tokens per training sequence.
    #[serde(default = "default_sequence_length")]
    #[schemars(range(min = 8, max = 131072))]
    pub sequence_length: u32,
}

fn default_tokenizer() -> String {
    "bytes".into()
}

fn default_sequence_length() -> u32 {
    128
}

impl DataSpec {
    /// The vocabulary the tokenizer implies, when it is known without fetching anything.
    pub fn builtin_vocab_size(&self) -> Option<u32> {
        (self.tokenizer == "bytes").then_some(256)
    }
}

/// Where the training text comes from. Exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.builtin), has(self.path), has(self.hubDataset)].filter(x, x).size() == 1").message("set exactly one of builtin, path and hubDataset"))]
pub struct CorpusSource {
    /// A corpus shipped inside the trainer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinCorpus>,
    /// A file or directory of UTF-8 text inside the trainer pod (e.g. a mounted volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub path: Option<String>,
    /// A dataset repository on the Hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_dataset: Option<HubRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BuiltinCorpus {
    /// 36 public-domain plays; a few are held out for validation.
    Shakespeare,
}

/// The round schedule: `outerRounds` rounds of `innerSteps` local AdamW steps each.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    #[serde(default = "default_outer_rounds")]
    #[schemars(range(min = 1))]
    pub outer_rounds: u32,
    /// Local optimiser steps per round (H in DiLoCo). 10 by default: with 32 values a
    /// chunk and the default outer learning rate, on the tiny preset (`bench
    /// convergence`, 960 inner steps) it ended within 5% of data-parallel training,
    /// sending 25% more bytes than 20 steps with 64, which ended 7% above it. Fewer steps
    /// mean more rounds, so on slow links raise it (and `kPerChunk` with it).
    #[serde(default = "default_inner_steps")]
    #[schemars(range(min = 1))]
    pub inner_steps: u32,
    /// Sequences per inner step on each peer.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    /// Sequences per forward/backward pass; gradients accumulate up to `batchSize`.
    /// Unset means the whole batch at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub micro_batch_size: Option<u32>,
    #[serde(default)]
    pub inner_optimizer: AdamWSpec,
    /// Outer learning rate α in θ ← θ − α·mean(Δ). Unset: 2 for `sparseloco`, 1 for
    /// `diloco`. SparseLoCo's error feedback holds back most of each round's update
    /// (decaying it while it waits), so its step lags the dense mean and gains from a
    /// larger α: on the tiny preset (4 peers, 960 inner steps, `bench convergence`) α = 2
    /// ended 3% lower than α = 1 at 10 inner steps a round and 32 values a chunk, and
    /// α = 3 no lower than 2. Dense DiLoCo steps by the plain mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub outer_lr: Option<f64>,
    /// Outer Nesterov momentum of `diloco` (SparseLoCo's error feedback plays its part, so
    /// `sparseloco` ignores it). 0 by default, the plain mean: DiLoCo's published 0.9
    /// suits hundreds of inner steps a round, and at 20 on the tiny preset (`bench
    /// convergence`, with α 0.7) it ended 12% above the plain mean.
    #[serde(default = "default_outer_momentum")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub outer_momentum: f64,
}

fn default_outer_rounds() -> u32 {
    20
}
fn default_inner_steps() -> u32 {
    tuned::INNER_STEPS
}
fn default_batch_size() -> u32 {
    8
}
fn default_outer_momentum() -> f64 {
    f64::from(starling_trainer::run::DEFAULT_OUTER_MOMENTUM)
}

impl ScheduleSpec {
    /// The outer learning rate `algorithm` steps with: the spec's, else its default.
    pub fn outer_lr(&self, algorithm: Algorithm) -> f64 {
        (self.outer_lr).unwrap_or(f64::from(tuned::outer_lr(algorithm)))
    }
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            outer_rounds: default_outer_rounds(),
            inner_steps: default_inner_steps(),
            batch_size: default_batch_size(),
            micro_batch_size: None,
            inner_optimizer: AdamWSpec::default(),
            outer_lr: None,
            outer_momentum: default_outer_momentum(),
        }
    }
}

/// The inner optimiser: AdamW with linear warmup then cosine decay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdamWSpec {
    /// Peak learning rate. 3e-3 by default, tuned on the tiny preset (`bench
    /// convergence`): 1e-3 ended 14% higher (240 inner steps); 6e-3 ended 1.5% lower with
    /// an outer learning rate of 1 but 1% higher with 2. Models of 100M parameters and
    /// more usually want 3e-4 to 6e-4.
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0))]
    pub lr: f64,
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: f64,
    #[serde(default = "default_weight_decay")]
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    /// Inner steps of linear warmup, counted over the whole run (20 by default, what
    /// the tuning runs used).
    #[serde(default = "default_warmup_steps")]
    pub warmup_steps: u32,
    /// Clip the global gradient norm to this value; unset means no clipping.
    #[serde(default = "default_grad_clip", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub grad_clip: Option<f64>,
}

fn default_lr() -> f64 {
    tuned::LR
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_warmup_steps() -> u32 {
    tuned::WARMUP_STEPS
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}

impl Default for AdamWSpec {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            weight_decay: default_weight_decay(),
            warmup_steps: default_warmup_steps(),
            grad_clip: default_grad_clip(),
        }
    }
}

/// How peers' pseudo-gradients travel: SparseLoCo by default, or a dense baseline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.density) && has(self.kPerChunk))").message("set at most one of density and kPerChunk"))]
pub struct CompressionSpec {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Elements per chunk; top-k is taken within each chunk.
    #[serde(default = "default_chunk_size")]
    #[schemars(range(min = 64, max = 1048576))]
    pub chunk_size: u32,
    /// Fraction of each chunk to send (e.g. 0.0156 = 64 of 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub density: Option<f64>,
    /// Entries to send per chunk. If neither this nor `density` is set, 32, with 10 inner
    /// steps a round (see `schedule.innerSteps`): at the same outer learning rate, 64
    /// every 10 steps ended no lower for 60% more bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub k_per_chunk: Option<u32>,
    #[serde(default)]
    pub value_bits: ValueBits,
    /// How a round's updates are combined (`sparseloco`): `weighted-mean`, or
    /// `median-norm` (each update clipped to the round's median norm first, so no single
    /// peer can dominate a round).
    #[serde(default, skip_serializing_if = "Aggregation::is_default")]
    pub aggregation: Aggregation,
    /// What each peer downloads every round: `aggregate` (one object the exchange makes:
    /// the round's aggregate compressed again, the same size whatever the federation's),
    /// `gather` (at most `gather` updates, the highest-weighted), or `all` (every
    /// update: a peer's download grows with the federation).
    #[serde(default)]
    pub download: Download,
    /// Most updates a round's step takes with `download: gather`.
    #[serde(default = "default_gather")]
    #[schemars(range(min = 1))]
    pub gather: u32,
    /// Error-feedback decay β in e ← β·e + Δ.
    #[serde(default = "default_error_feedback_decay")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_feedback_decay: f64,
}

fn default_chunk_size() -> u32 {
    4096
}
fn default_gather() -> u32 {
    DEFAULT_GATHER
}
fn default_error_feedback_decay() -> f64 {
    0.95
}

/// Entries per chunk when neither `density` nor `kPerChunk` is given.
pub const DEFAULT_K_PER_CHUNK: u32 = tuned::K;

impl CompressionSpec {
    /// Entries kept per chunk, resolving `density` against the chunk size (at least 1).
    pub fn k(&self) -> u32 {
        match (self.k_per_chunk, self.density) {
            (Some(k), _) => k,
            (None, Some(d)) => ((d * f64::from(self.chunk_size)).round() as u32).max(1),
            (None, None) => DEFAULT_K_PER_CHUNK,
        }
    }
}

impl Default for CompressionSpec {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            chunk_size: default_chunk_size(),
            density: None,
            k_per_chunk: None,
            value_bits: ValueBits::default(),
            aggregation: Aggregation::default(),
            download: Download::default(),
            gather: default_gather(),
            error_feedback_decay: default_error_feedback_decay(),
        }
    }
}

/// How many trainer peers, and what each one gets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("min must not exceed max"))]
pub struct PeersSpec {
    /// Below this many live peers the run stops making progress (and is `Degraded`).
    #[schemars(range(min = 1))]
    pub min: u32,
    #[schemars(range(min = 1, max = 1024))]
    pub max: u32,
    /// Per-peer resources, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Trainer image; defaults to the release matching the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// The dtype of peers' matrix products: `bf16` (autocast: weights, gradients and
    /// the optimiser's state stay f32) or `f32`. Unset, peers on GPUs use bf16, which
    /// their tensor cores run many times faster, and peers on CPUs f32 (no faster in
    /// bf16). Losses on the same checkpoint and batch agree within 1%
    /// (`starling-trainer bench agreement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

/// Where peers may run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Matches `MemberCluster.spec.labels`; unset selects every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_selector: Option<LabelSelector>,
    #[serde(default = "default_tiers")]
    #[schemars(length(min = 1))]
    pub tiers: Vec<Tier>,
    /// Caps how many of this run's peers one member hosts, limiting what one member
    /// going dark can take with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_peers_per_member: Option<u32>,
    /// Members declaring less upload bandwidth than this are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_bandwidth_mbps: Option<u32>,
    /// A round closes at most this long after its first update even if some peers have
    /// not sent. Below it the deadline follows the run: 1.5 × the 90th percentile of how
    /// long after each of the last 8 rounds' first update its updates arrived (late ones
    /// included), so that a federation of fast links does not wait minutes for a peer
    /// that lost power, and one with slow links does not lose their updates.
    #[serde(default = "default_round_deadline_seconds")]
    #[schemars(range(min = 1))]
    pub round_deadline_seconds: u32,
    /// The adaptive deadline is never shorter than this (capped by
    /// `roundDeadlineSeconds`): a round is not cut short of a spread that healthy peers
    /// have.
    #[serde(default = "default_round_deadline_floor_seconds")]
    #[schemars(range(min = 1))]
    pub round_deadline_floor_seconds: u32,
    /// A round closes before its deadline once this fraction of its live peers has sent
    /// and every peer still missing is predicted, from its own recent rounds, to miss
    /// the deadline anyway. 1 waits for every live peer or the deadline.
    #[serde(default = "default_round_quorum")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub round_quorum: f64,
    /// A run that cannot be placed for this long fails (`Unschedulable`) instead of
    /// waiting for capacity forever.
    #[serde(default = "default_placement_deadline_seconds")]
    #[schemars(range(min = 1))]
    pub placement_deadline_seconds: u32,
}

fn default_tiers() -> Vec<Tier> {
    vec![Tier::Cloud, Tier::Home]
}
fn default_round_deadline_seconds() -> u32 {
    300
}
fn default_round_deadline_floor_seconds() -> u32 {
    starling_trainer::exchange::DEFAULT_DEADLINE_FLOOR as u32
}
fn default_round_quorum() -> f64 {
    starling_trainer::exchange::DEFAULT_QUORUM
}
fn default_placement_deadline_seconds() -> u32 {
    24 * 3600
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            member_selector: None,
            tiers: default_tiers(),
            max_peers_per_member: None,
            min_bandwidth_mbps: None,
            round_deadline_seconds: default_round_deadline_seconds(),
            round_deadline_floor_seconds: default_round_deadline_floor_seconds(),
            round_quorum: default_round_quorum(),
            placement_deadline_seconds: default_placement_deadline_seconds(),
        }
    }
}

/// When to checkpoint and how many to keep.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Checkpoint every this many rounds, and always after the last one.
    #[serde(default = "default_every_rounds")]
    #[schemars(range(min = 1))]
    pub every_rounds: u32,
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1))]
    pub keep_last: u32,
}

fn default_every_rounds() -> u32 {
    5
}
fn default_keep_last() -> u32 {
    3
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_rounds: default_every_rounds(),
            keep_last: default_keep_last(),
        }
    }
}

/// Where and how checkpoints are published: one commit per checkpoint on `main`,
/// tagged `round-N`, made by a publisher Job that alone sees the Hub token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishSpec {
    /// `namespace/name` of the model repository (created if missing).
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub repo: String,
    /// The Secret (in the run's namespace) holding a Hub token with write access.
    pub token_secret_ref: TokenSecretRef,
    /// The Hub's URL; the public Hub when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Create the repository private (an existing one keeps its visibility).
    #[serde(default)]
    pub private: bool,
    /// Publish every this many checkpoints, and always the final one; 0 publishes
    /// the final checkpoint only.
    #[serde(default)]
    pub every: u32,
    /// How each checkpoint's commit is named.
    #[serde(default)]
    pub revision_style: RevisionStyle,
    /// Weights above this many bytes are split into shards with an index.
    #[serde(default = "default_max_shard_bytes")]
    #[schemars(range(min = 1))]
    pub max_shard_bytes: u64,
    /// The model card's license, as a Hub license id (e.g. `apache-2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Hub datasets the model is trained on, for the model card.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
}

fn default_max_shard_bytes() -> u64 {
    starling_trainer::hub::DEFAULT_MAX_SHARD_BYTES
}

/// A key of a Secret in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenSecretRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default = "default_token_key")]
    pub key: String,
}

fn default_token_key() -> String {
    "token".into()
}

/// How a checkpoint's commit is found later.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RevisionStyle {
    /// Commits on `main`, each tagged `round-N`.
    #[default]
    Tagged,
    /// Commits on `main`, untagged.
    Untagged,
}

/// What the operator last observed of a run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRunStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Last completed outer round (0 before the first completes).
    #[serde(default)]
    pub round: u32,
    #[serde(default)]
    pub tokens_seen: u64,
    /// Validation loss of the global model after the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// `lastLoss` as a person reads it (4 significant digits): what `kubectl get` shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    /// Peers currently in state `Running`.
    #[serde(default)]
    pub active_peers: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Bytes of updates sent to the exchange by all peers.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes of updates fetched from the exchange by all peers.
    #[serde(default)]
    pub bytes_received: u64,
    /// Dense fp32 pseudo-gradient bytes divided by bytes sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<f64>,
    /// Since when the run has been waiting for members with room for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable_since: Option<Time>,
    /// The last checkpoint published to the Hub, as `repo@revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_published: Option<String>,
    /// Hash of the newest ledger entry (hex SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_head: Option<String>,
    /// Peers scoring has excluded or banned.
    #[serde(default)]
    pub excluded_peers: u32,
    /// The run's scoring ledger, once scoring runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoring: Option<ScoringStatus>,
    /// Validation loss by round, oldest first: the last 100 rounds the operator saw
    /// close (what `kubectl starling status` draws).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_history: Vec<LossPoint>,
    /// How the last round closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<RoundStatus>,
}

/// The global model's validation loss after one round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LossPoint {
    pub round: u32,
    pub loss: f64,
}

/// How a round closed: what paced it, and what it waited for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundStatus {
    pub round: u32,
    /// `all-in` (every live peer sent), `quorum` (closed early: the peers still missing
    /// were predicted to miss the deadline) or `deadline`.
    pub closed_by: String,
    /// Updates in the round.
    pub updates: u32,
    /// Seconds from the round's first update to its close (to 0.1 s).
    pub waited_seconds: f64,
    /// The deadline the round had, in seconds (to 0.1 s): adapted to recent rounds
    /// within `spec.placement.roundDeadlineFloorSeconds` and `roundDeadlineSeconds`.
    pub deadline_seconds: f64,
    /// Bytes each peer downloaded to take the round's step: the exchange's aggregate,
    /// or the updates the step took (`spec.compression.download`).
    #[serde(default)]
    pub download_bytes: u64,
}

/// Where a run's scoring ledger stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScoringStatus {
    /// The Ed25519 key the ledger's records are signed with (hex): what
    /// `starling-operator ledger verify --public-key` takes.
    pub public_key: String,
    /// Records in the ledger.
    #[serde(default)]
    pub records: u32,
    /// The last round scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Placing,
    Running,
    /// Trained; the final checkpoint is being published.
    Publishing,
    Succeeded,
    Failed,
}

impl Phase {
    /// A finished run: nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One row of the per-peer table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub id: PeerId,
    /// Member cluster hosting the peer.
    pub member: String,
    pub state: PeerState,
    /// OpenSkill ordinal (μ − 3σ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_score: Option<f64>,
    /// Weight of this peer's update in the next aggregate (0 = excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Where scoring stands the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing: Option<Standing>,
    /// F = ordinal × max(0, bma) × sync: what the aggregate ranks peers by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_score: Option<f64>,
    /// Why the peer stands where it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PeerState {
    Pending,
    Running,
    /// Its member went dark or its pod failed; it is being re-placed.
    Lost,
    /// Scored as harmful or copied; its updates carry no weight.
    Excluded,
    Finished,
}

/// A checkpoint the run wrote.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    pub round: u32,
    /// Where the exchange keeps it.
    pub location: String,
    /// Where it is on the Hub, once published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<PublishedRecord>,
    pub time: Time,
}

/// A checkpoint's commit on the Hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedRecord {
    pub repo: String,
    /// The tag (or branch) it is published as.
    pub revision: String,
    pub commit: String,
    pub url: String,
    pub at: Time,
}
