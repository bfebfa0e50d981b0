//! The contract between the operator and the trainer: the run configuration every pod of
//! a run shares (as `STARLING_*` environment variables), the exchange's own settings, and
//! the per-peer tokens.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use starling_trainer::model::ModelConfig;

use crate::api::{Algorithm, PeerId, TrainingRunSpec, validation};
use crate::hub::children::{OPERATOR_TOKEN_KEY, TOKENS_KEY, env};

/// The run's configuration as the trainer reads it (`STARLING_*`), identical for the
/// exchange and every peer: the exchange refuses peers whose configuration differs.
/// Fails with the field to fix when the spec asks for what this trainer cannot do.
pub fn run_env(spec: &TrainingRunSpec) -> Result<Vec<EnvVar>, validation::FieldError> {
    supported(spec)?;
    let model = model_config(spec)?;
    let s = &spec.schedule;
    let c = &spec.compression;
    let algorithm = match c.algorithm {
        Algorithm::SparseLoCo => "sparseloco",
        Algorithm::DiLoCo => "diloco",
        Algorithm::Ddp => "ddp",
    };
    let mut out = vec![
        env("STARLING_MODEL_CONFIG", model),
        env("STARLING_SEED", spec.seed),
        env("STARLING_ALGORITHM", algorithm),
        env("STARLING_MAX_PEERS", spec.peers.max),
        env("STARLING_ROUNDS", s.outer_rounds),
        env("STARLING_INNER_STEPS", s.inner_steps),
        env("STARLING_BATCH", s.batch_size),
        env(
            "STARLING_MICRO_BATCH",
            s.micro_batch_size.unwrap_or(s.batch_size),
        ),
        env("STARLING_SEQUENCE_LENGTH", spec.data.sequence_length),
        env("STARLING_LR", s.inner_optimizer.lr),
        env("STARLING_WARMUP_STEPS", s.inner_optimizer.warmup_steps),
        env("STARLING_OUTER_LR", s.outer_lr),
        env("STARLING_CHUNK", c.chunk_size),
        env("STARLING_TOPK", c.k()),
        env("STARLING_VALUE_BITS", c.value_bits.bits()),
        env("STARLING_ERROR_FEEDBACK", c.error_feedback_decay),
        env("STARLING_TOKENIZER", &spec.data.tokenizer),
    ];
    if let Some(path) = &spec.data.corpus.path {
        out.push(env("STARLING_CORPUS", path));
    }
    Ok(out)
}

fn unsupported(path: &str, message: &str) -> validation::FieldError {
    validation::FieldError {
        path: path.into(),
        message: message.into(),
    }
}

/// The model as the trainer reads it: its own `ModelConfig`, as Hugging Face
/// `config.json` JSON.
fn model_config(spec: &TrainingRunSpec) -> Result<String, validation::FieldError> {
    let model = validation::resolved_model(spec).ok_or_else(|| {
        unsupported(
            "spec.model.preset",
            "a preset needs the built-in `bytes` tokenizer; give an explicit model.config",
        )
    })?;
    let config = ModelConfig {
        vocab_size: model.vocab_size as usize,
        hidden_size: model.hidden_size as usize,
        intermediate_size: model.intermediate_size as usize,
        num_hidden_layers: model.num_hidden_layers as usize,
        num_attention_heads: model.num_attention_heads as usize,
        num_key_value_heads: model.kv_heads() as usize,
        max_position_embeddings: model.max_position_embeddings as usize,
        rope_theta: model.rope_theta,
        rms_norm_eps: model.rms_norm_eps,
        tie_word_embeddings: model.tie_word_embeddings,
    };
    config
        .validate()
        .map_err(|e| unsupported("spec.model", &e.to_string()))?;
    Ok(config.to_hf_json().to_string())
}

/// What this trainer cannot do yet, with the field to change.
fn supported(spec: &TrainingRunSpec) -> Result<(), validation::FieldError> {
    if spec.data.corpus.hub_dataset.is_some() {
        return Err(unsupported(
            "spec.data.corpus.hubDataset",
            "Hub datasets are not supported yet; use builtin or path",
        ));
    }
    if spec.data.tokenizer != "bytes" {
        return Err(unsupported(
            "spec.data.tokenizer",
            "only the built-in `bytes` tokenizer is supported yet",
        ));
    }
    if spec.model.init.is_some() {
        return Err(unsupported(
            "spec.model.init",
            "starting from Hub weights is not supported yet",
        ));
    }
    Ok(())
}

/// The exchange's own settings, on top of the run configuration.
pub fn exchange_env(spec: &TrainingRunSpec, run_name: &str) -> Vec<EnvVar> {
    vec![
        env("STARLING_MIN_PEERS", spec.peers.min),
        env(
            "STARLING_ROUND_DEADLINE",
            spec.placement.round_deadline_seconds,
        ),
        env("STARLING_STATE_DIR", "state"),
        env("STARLING_DATA_DIR", "data"),
        env("STARLING_CHECKPOINT_DIR", "checkpoints"),
        env("STARLING_CHECKPOINT_EVERY", spec.checkpoint.every_rounds),
        env("STARLING_RUN", run_name),
    ]
}

/// A fresh random bearer token.
pub fn mint_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..40)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// A run's credentials: one token per peer and one for the operator, plus the exchange's
/// tokens file built from them (the format `starling_trainer::exchange::Tokens` parses).
pub fn mint_credentials(max_peers: u32) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let mut file = String::new();
    for i in 0..max_peers {
        let token = mint_token();
        file.push_str(&format!("{} {token}\n", PeerId::new(i)));
        data.insert(PeerId::new(i).to_string(), token);
    }
    let operator = mint_token();
    file.push_str(&format!("{OPERATOR_TOKEN_KEY} {operator}\n"));
    data.insert(OPERATOR_TOKEN_KEY.into(), operator);
    data.insert(TOKENS_KEY.into(), file);
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CorpusSource, TrainingRun};

    fn sample() -> TrainingRun {
        let yaml = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_sample_run_maps_onto_the_trainer_configuration() {
        let run = sample();
        let env = run_env(&run.spec).unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|e| e.name == k)
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("STARLING_ROUNDS"), "12");
        assert_eq!(get("STARLING_TOPK"), "64");
        assert_eq!(get("STARLING_MAX_PEERS"), "3");
        let config: serde_json::Value =
            serde_json::from_str(&get("STARLING_MODEL_CONFIG")).unwrap();
        assert_eq!(config["vocab_size"], 256);
        assert_eq!(config["num_key_value_heads"], 2);
    }

    #[test]
    fn unsupported_sources_name_the_field_to_change() {
        let mut run = sample();
        run.spec.data.corpus = CorpusSource {
            builtin: None,
            path: None,
            hub_dataset: Some(crate::api::HubRef {
                repo_id: "a/b".into(),
                revision: "main".into(),
            }),
        };
        let err = run_env(&run.spec).unwrap_err();
        assert_eq!(err.path, "spec.data.corpus.hubDataset");
    }

    #[test]
    fn credentials_hold_one_token_per_peer_and_a_tokens_file_the_exchange_reads() {
        let data = mint_credentials(3);
        let file = &data[TOKENS_KEY];
        for peer in ["p0", "p1", "p2", "operator"] {
            let token = &data[peer];
            assert!(token.len() >= 32);
            assert!(file.contains(&format!("{peer} {token}\n")));
        }
        assert_ne!(data["p0"], data["p1"]);
        starling_trainer::exchange::Tokens::parse(file).unwrap();
    }
}
