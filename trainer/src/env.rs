//! The environment variables the trainer reads, named once: the trainer's flags bind to
//! these constants and the operator writes pods' environments with them, so a renamed
//! variable cannot leave the two sides disagreeing.
//!
//! Typed values travel through [`crate::run::RunConfig::to_env`] and
//! [`crate::exchange::Settings::to_env`]; their tests parse the variables back through the
//! very flags that read them.

// The run configuration every pod of a run shares (`RunConfig`).
pub const MODEL_CONFIG: &str = "STARLING_MODEL_CONFIG";
pub const SEED: &str = "STARLING_SEED";
pub const ALGORITHM: &str = "STARLING_ALGORITHM";
pub const MAX_PEERS: &str = "STARLING_MAX_PEERS";
pub const INNER_STEPS: &str = "STARLING_INNER_STEPS";
pub const BATCH: &str = "STARLING_BATCH";
pub const MICRO_BATCH: &str = "STARLING_MICRO_BATCH";
pub const SEQUENCE_LENGTH: &str = "STARLING_SEQUENCE_LENGTH";
pub const LR: &str = "STARLING_LR";
pub const WARMUP_STEPS: &str = "STARLING_WARMUP_STEPS";
pub const BETA1: &str = "STARLING_BETA1";
pub const BETA2: &str = "STARLING_BETA2";
pub const WEIGHT_DECAY: &str = "STARLING_WEIGHT_DECAY";
pub const GRAD_CLIP: &str = "STARLING_GRAD_CLIP";
pub const OUTER_LR: &str = "STARLING_OUTER_LR";
pub const OUTER_MOMENTUM: &str = "STARLING_OUTER_MOMENTUM";
pub const CHUNK: &str = "STARLING_CHUNK";
pub const TOPK: &str = "STARLING_TOPK";
pub const VALUE_BITS: &str = "STARLING_VALUE_BITS";
pub const ERROR_FEEDBACK: &str = "STARLING_ERROR_FEEDBACK";
pub const AGGREGATION: &str = "STARLING_AGGREGATION";
pub const DOWNLOAD: &str = "STARLING_DOWNLOAD";
pub const GATHER: &str = "STARLING_GATHER";
pub const AGGREGATE_K: &str = "STARLING_AGGREGATE_TOPK";
pub const CORPUS: &str = "STARLING_CORPUS";
pub const TOKENIZER: &str = "STARLING_TOKENIZER";
pub const INIT_FROM: &str = "STARLING_INIT_FROM";

// What the operator may change while the run goes on (`Settings`).
pub const ROUNDS: &str = "STARLING_ROUNDS";
pub const MIN_PEERS: &str = "STARLING_MIN_PEERS";
pub const ROUND_DEADLINE: &str = "STARLING_ROUND_DEADLINE";
pub const ROUND_DEADLINE_FLOOR: &str = "STARLING_ROUND_DEADLINE_FLOOR";
pub const ROUND_QUORUM: &str = "STARLING_ROUND_QUORUM";
pub const CHECKPOINT_EVERY: &str = "STARLING_CHECKPOINT_EVERY";

// The exchange pod.
pub const LISTEN: &str = "STARLING_LISTEN";
pub const TOKENS: &str = "STARLING_TOKENS";
pub const TOKENS_FILE: &str = "STARLING_TOKENS_FILE";
pub const AWAIT_SETTINGS: &str = "STARLING_AWAIT_SETTINGS";
pub const STATE_DIR: &str = "STARLING_STATE_DIR";
/// Object storage for payloads and the state: `s3://bucket/prefix`, `gs://…`, `az://…`.
pub const STORAGE: &str = "STARLING_STORAGE";
/// An S3-compatible server's URL (MinIO, R2, moto), for `STORAGE`.
pub const STORAGE_ENDPOINT: &str = "STARLING_STORAGE_ENDPOINT";
/// A directory of the storage's credentials, one file per setting (a mounted Secret).
pub const STORAGE_CREDENTIALS: &str = "STARLING_STORAGE_CREDENTIALS";
/// The storage's access key, as the AWS tools name it (read by the exchange only).
pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const RUN: &str = "STARLING_RUN";

// Read by the trainer but not set by the operator: defaults suit a pod.
/// `cpu`, `cuda`, `cuda:N` or `auto` (see [`crate::device`]).
pub const DEVICE: &str = "STARLING_DEVICE";
/// `f32`, `bf16` or `auto`: the dtype of the model's matrix products.
pub const PRECISION: &str = "STARLING_PRECISION";
/// Threads that train (see [`crate::cpu`]); by default the CPUs the pod may use.
pub const THREADS: &str = "STARLING_THREADS";
pub const LIVENESS: &str = "STARLING_LIVENESS";
pub const MAX_UPDATE_BYTES: &str = "STARLING_MAX_UPDATE_BYTES";
pub const KEEP_ROUNDS: &str = "STARLING_KEEP_ROUNDS";
pub const EVAL_ROWS: &str = "STARLING_EVAL_ROWS";
pub const TLS_CERT: &str = "STARLING_TLS_CERT";
/// Where a peer serves Prometheus `/metrics` (`IP:PORT`); unset, it serves none.
pub const METRICS_LISTEN: &str = "STARLING_METRICS_LISTEN";
pub const TLS_KEY: &str = "STARLING_TLS_KEY";
/// The run's CA: PEM inline or a file (see [`crate::exchange::tls::pem`]).
pub const TLS_CA: &str = "STARLING_TLS_CA";
/// The name the exchange's certificate is verified against, if not the URL's host.
pub const TLS_SERVER_NAME: &str = "STARLING_TLS_SERVER_NAME";
pub const RETRY_FOR: &str = "STARLING_RETRY_FOR";
/// The checkpoint `sample` reads.
pub const CHECKPOINT: &str = "STARLING_CHECKPOINT";

// A peer pod.
pub const EXCHANGE: &str = "STARLING_EXCHANGE";
/// Testing aid: how a peer cheats, and from which round.
pub const ADVERSARY: &str = "STARLING_ADVERSARY";
pub const ADVERSARY_FROM: &str = "STARLING_ADVERSARY_FROM";
pub const TOKEN: &str = "STARLING_TOKEN";
pub const BANDWIDTH_MBPS: &str = "STARLING_BANDWIDTH_MBPS";

// The evaluate role, besides EXCHANGE, TOKEN and the run configuration.
/// The run's scoring key, hex: the secret evaluators draw their random slices from.
pub const SCORING_KEY: &str = "STARLING_SCORING_KEY";
pub const RUN_UID: &str = "STARLING_RUN_UID";
pub const EVAL_BATCHES: &str = "STARLING_EVAL_BATCHES";
pub const MAX_EVALUATED: &str = "STARLING_MAX_EVALUATED";

// The publisher (`starling-trainer publish`). The token and endpoint use the names every
// Hugging Face tool reads.
pub const HUB_TOKEN: &str = "HF_TOKEN";
pub const HUB_ENDPOINT: &str = "HF_ENDPOINT";
pub const PUBLISH_TOKEN_FILE: &str = "STARLING_PUBLISH_TOKEN_FILE";
pub const PUBLISH_REPO: &str = "STARLING_PUBLISH_REPO";
pub const PUBLISH_REVISION: &str = "STARLING_PUBLISH_REVISION";
pub const PUBLISH_PRIVATE: &str = "STARLING_PUBLISH_PRIVATE";
pub const PUBLISH_TAG: &str = "STARLING_PUBLISH_TAG";
pub const PUBLISH_MAX_SHARD_BYTES: &str = "STARLING_PUBLISH_MAX_SHARD_BYTES";
pub const PUBLISH_LICENSE: &str = "STARLING_PUBLISH_LICENSE";
pub const PUBLISH_DATASETS: &str = "STARLING_PUBLISH_DATASETS";
pub const PUBLISH_RESULT_FILE: &str = "STARLING_PUBLISH_RESULT_FILE";

// Both.
pub const DATA_DIR: &str = "STARLING_DATA_DIR";
pub const CHECKPOINT_DIR: &str = "STARLING_CHECKPOINT_DIR";

/// Parses `vars` (name, value) through the flags of `A` as if they were the process
/// environment: each variable becomes the flag bound to it. Fails on a variable no flag
/// reads, so a test of a `to_env` also proves every name it writes is one the trainer
/// reads.
pub fn parse_as_env<A: clap::Args + clap::FromArgMatches>(
    vars: &[(impl AsRef<str>, String)],
) -> Result<A, String> {
    let command = A::augment_args(clap::Command::new("env"));
    let mut argv = vec!["env".to_owned()];
    for (name, value) in vars {
        let name = name.as_ref();
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .ok_or_else(|| format!("no flag reads {name}"))?;
        let long = arg
            .get_long()
            .ok_or_else(|| format!("{name} has no long flag"))?;
        argv.push(format!("--{long}={value}"));
    }
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|e| e.to_string())?;
    A::from_arg_matches(&matches).map_err(|e| e.to_string())
}
