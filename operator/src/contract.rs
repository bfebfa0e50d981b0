//! The contract between the operator and the trainer: the run configuration every pod of
//! a run shares (as `STARLING_*` environment variables), the exchange's own settings, and
//! the per-peer tokens.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use starling_trainer::env as names;
use starling_trainer::exchange::Settings;
use starling_trainer::run::RunConfig;

use crate::api::{PeerId, TrainingRunSpec, validation};
use crate::hub::children::{OPERATOR_TOKEN_KEY, TOKENS_KEY, env};

/// The run's configuration as the trainer reads it, identical for the exchange and every
/// peer: the exchange refuses peers whose configuration differs. Fails with the field to
/// fix when the spec asks for what this trainer cannot do.
pub fn run_config(spec: &TrainingRunSpec) -> Result<RunConfig, validation::FieldError> {
    supported(spec)?;
    let model = validation::resolved_model(spec).ok_or_else(|| {
        unsupported(
            "spec.model.preset",
            "a preset needs the built-in `bytes` tokenizer; give an explicit model.config",
        )
    })?;
    model
        .validate()
        .map_err(|e| unsupported("spec.model", &e.to_string()))?;
    let s = &spec.schedule;
    let c = &spec.compression;
    Ok(RunConfig {
        model_config: model.to_hf_json().to_string(),
        seed: spec.seed,
        algorithm: c.algorithm,
        max_peers: spec.peers.max,
        inner_steps: s.inner_steps,
        batch: s.batch_size,
        micro_batch: s.micro_batch_size.unwrap_or(s.batch_size),
        sequence_length: spec.data.sequence_length,
        lr: s.inner_optimizer.lr,
        warmup_steps: u64::from(s.inner_optimizer.warmup_steps),
        outer_lr: s.outer_lr as f32,
        outer_momentum: starling_trainer::run::DEFAULT_OUTER_MOMENTUM,
        chunk: c.chunk_size,
        k: c.k(),
        bits: c.value_bits.bits(),
        error_feedback: c.error_feedback_decay as f32,
        aggregation: c.aggregation,
        corpus: spec.data.corpus.path.as_ref().map(Into::into),
        tokenizer: spec.data.tokenizer.clone(),
        init_from: None,
    })
}

/// [`run_config`] as the `STARLING_*` environment of a pod.
pub fn run_env(spec: &TrainingRunSpec) -> Result<Vec<EnvVar>, validation::FieldError> {
    Ok(as_env(run_config(spec)?.to_env()))
}

fn as_env(vars: Vec<(&'static str, String)>) -> Vec<EnvVar> {
    vars.into_iter()
        .map(|(name, value)| env(name, value))
        .collect()
}

/// What the operator keeps in force in the running exchange ([`Settings`]): the spec's
/// current values, changed in place when the spec changes.
pub fn settings(spec: &TrainingRunSpec) -> Settings {
    Settings {
        rounds: spec.schedule.outer_rounds,
        min_peers: spec.peers.min,
        round_deadline: f64::from(spec.placement.round_deadline_seconds),
        checkpoint_every: spec.checkpoint.every_rounds,
    }
}

fn unsupported(path: &str, message: &str) -> validation::FieldError {
    validation::FieldError {
        path: path.into(),
        message: message.into(),
    }
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

/// The exchange's own environment, on top of the run configuration. Nothing here comes
/// from a field that may change mid-run: those reach the exchange as [`settings`], so
/// editing them never replaces its pod.
pub fn exchange_env(run_name: &str) -> Vec<EnvVar> {
    vec![
        env(names::AWAIT_SETTINGS, true),
        env(names::STATE_DIR, "state"),
        env(names::DATA_DIR, "data"),
        env(names::CHECKPOINT_DIR, "checkpoints"),
        env(names::RUN, run_name),
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
        assert_eq!(get("STARLING_TOPK"), "64");
        assert_eq!(get("STARLING_MAX_PEERS"), "3");
        let config: serde_json::Value =
            serde_json::from_str(&get("STARLING_MODEL_CONFIG")).unwrap();
        assert_eq!(config["vocab_size"], 256);
        assert_eq!(config["num_key_value_heads"], 2);
    }

    #[test]
    fn the_run_configuration_reaches_the_trainer_as_the_operator_built_it() {
        let run = sample();
        let config = run_config(&run.spec).unwrap();
        let vars: Vec<(String, String)> = run_env(&run.spec)
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        let parsed: RunConfig = names::parse_as_env(&vars).unwrap();
        assert_eq!(parsed, config);
        let settings = settings(&run.spec);
        let parsed: Settings = names::parse_as_env(&settings.to_env()).unwrap();
        assert_eq!((parsed, settings.rounds), (settings, 12));
    }

    #[test]
    fn fields_that_may_change_mid_run_are_not_in_any_pods_environment() {
        let run = sample();
        let mut edited = run.clone();
        edited.spec.schedule.outer_rounds += 2;
        edited.spec.peers.min = 1;
        edited.spec.placement.round_deadline_seconds += 30;
        edited.spec.checkpoint.every_rounds += 1;
        assert_eq!(run_env(&edited.spec), run_env(&run.spec));
        assert_ne!(settings(&edited.spec), settings(&run.spec));
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
