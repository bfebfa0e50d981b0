//! The contract between the operator and the trainer: the run configuration every pod of
//! a run shares (as `STARLING_*` environment variables), the exchange's own settings, and
//! the per-peer tokens.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use starling_trainer::env as names;
use starling_trainer::exchange::Settings;
use starling_trainer::run::RunConfig;

use crate::api::{
    ExchangeStorageSpec, PeerId, Precision, PublishSpec, RevisionStyle, TrainingRunSpec, validation,
};
use crate::hub::children::{
    LEDGER_KEY, OPERATOR_TOKEN_KEY, PUBLISHER_TOKEN_KEY, SCORING_KEY, TOKENS_KEY,
};
use crate::k8s::env;
use starling_trainer::exchange::evaluator_name;
use starling_trainer::scoring::ledger::Signer;

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
        beta1: s.inner_optimizer.beta1,
        beta2: s.inner_optimizer.beta2,
        weight_decay: s.inner_optimizer.weight_decay,
        grad_clip: s.inner_optimizer.grad_clip.unwrap_or(0.0),
        outer_lr: s.outer_lr(c.algorithm) as f32,
        outer_momentum: s.outer_momentum as f32,
        chunk: c.chunk_size,
        k: c.k(),
        bits: c.value_bits.bits(),
        error_feedback: c.error_feedback_decay as f32,
        aggregation: c.aggregation,
        download: c.download,
        gather: c.gather,
        aggregate_k: None,
        corpus: spec.data.corpus.path.as_ref().map(Into::into),
        tokenizer: spec.data.tokenizer.clone(),
        init_from: None,
    })
}

/// The port a peer pod serves Prometheus `/metrics` on (the container port `metrics`).
pub const PEER_METRICS_PORT: u16 = 9090;

/// A testing aid, on a TrainingRun: its peers are started with `STARLING_ADVERSARY` set
/// to the value (`p2=signflip`), so the peers it names cheat and scoring can be seen
/// catching them.
pub const ADVERSARY_ANNOTATION: &str = "starling.dev/test-adversary";
/// The round the adversaries start cheating in (`STARLING_ADVERSARY_FROM`).
pub const ADVERSARY_FROM_ANNOTATION: &str = "starling.dev/test-adversary-from";

/// A peer pod's environment: the run's, its precision if the spec sets one, and the
/// testing aid's if the run carries it.
pub fn peer_env(
    annotations: &BTreeMap<String, String>,
    precision: Option<Precision>,
    run_env: &[EnvVar],
) -> Vec<EnvVar> {
    let mut vars = run_env.to_vec();
    if let Some(precision) = precision {
        vars.push(env(names::PRECISION, precision));
    }
    for (annotation, name) in [
        (ADVERSARY_ANNOTATION, names::ADVERSARY),
        (ADVERSARY_FROM_ANNOTATION, names::ADVERSARY_FROM),
    ] {
        if let Some(value) = annotations.get(annotation) {
            vars.push(env(name, value));
        }
    }
    vars
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
        round_deadline_floor: f64::from(spec.placement.round_deadline_floor_seconds),
        round_quorum: spec.placement.round_quorum,
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

/// Where the exchange pod mounts its storage credentials Secret.
pub const STORAGE_CREDENTIALS_DIR: &str = "/var/run/starling/storage";

/// The exchange's own environment, on top of the run configuration: its state in
/// `storage` when the spec names a bucket, else in its working directory. Nothing here
/// comes from a field that may change mid-run: those reach the exchange as
/// [`settings`], so editing them never replaces its pod.
pub fn exchange_env(run_name: &str, storage: Option<&ExchangeStorageSpec>) -> Vec<EnvVar> {
    let mut vars = vec![
        env(names::AWAIT_SETTINGS, true),
        env(names::DATA_DIR, "data"),
        env(names::CHECKPOINT_DIR, "checkpoints"),
        env(names::RUN, run_name),
    ];
    let Some(storage) = storage else {
        vars.push(env(names::STATE_DIR, "state"));
        return vars;
    };
    vars.push(env(names::STORAGE, &storage.url));
    if let Some(endpoint) = &storage.endpoint {
        vars.push(env(names::STORAGE_ENDPOINT, endpoint));
    }
    if storage.credentials_secret.is_some() {
        vars.push(env(names::STORAGE_CREDENTIALS, STORAGE_CREDENTIALS_DIR));
    }
    vars
}

/// The publisher Job's environment: what `starling-trainer publish` reads
/// ([`starling_trainer::hub::PublishArgs`]) for the checkpoint at `checkpoint_url` on the
/// run's exchange. The two tokens come from Secrets, set by the Job's builder.
pub fn publish_env(publish: &PublishSpec, checkpoint_url: &str) -> Vec<EnvVar> {
    let mut vars = vec![
        env(names::CHECKPOINT, checkpoint_url),
        env(names::PUBLISH_REPO, &publish.repo),
        env(names::PUBLISH_PRIVATE, publish.private),
        env(
            names::PUBLISH_TAG,
            publish.revision_style == RevisionStyle::Tagged,
        ),
        env(names::PUBLISH_MAX_SHARD_BYTES, publish.max_shard_bytes),
    ];
    if let Some(endpoint) = &publish.endpoint {
        vars.push(env(names::HUB_ENDPOINT, endpoint));
    }
    if let Some(license) = &publish.license {
        vars.push(env(names::PUBLISH_LICENSE, license));
    }
    if !publish.datasets.is_empty() {
        vars.push(env(names::PUBLISH_DATASETS, publish.datasets.join(",")));
    }
    vars
}

/// A fresh random bearer token.
pub fn mint_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..40)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// Random bytes, as lowercase hex.
fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let random: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
    starling_trainer::scoring::ledger::hex(&random)
}

/// A run's credentials: one token per peer and per evaluator, one for the operator and
/// one for the publisher, the exchange's tokens file built from them (the format
/// `starling_trainer::exchange::Tokens` parses), and the run's scoring secrets: the
/// ledger's signing key ([`LEDGER_KEY`], PKCS#8 in hex) and the key evaluators draw
/// their random slices from ([`SCORING_KEY`], hex).
pub fn mint_credentials(max_peers: u32, evaluators: u32) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let mut file = String::new();
    let peers = (0..max_peers).map(|i| PeerId::new(i).to_string());
    let evaluators = (0..evaluators).map(evaluator_name);
    for identity in peers.chain(evaluators) {
        let token = mint_token();
        file.push_str(&format!("{identity} {token}\n"));
        data.insert(identity, token);
    }
    if let Ok(key) = Signer::generate() {
        data.insert(
            LEDGER_KEY.into(),
            starling_trainer::scoring::ledger::hex(&key),
        );
    }
    data.insert(SCORING_KEY.into(), random_hex(32));
    for identity in [OPERATOR_TOKEN_KEY, PUBLISHER_TOKEN_KEY] {
        let token = mint_token();
        file.push_str(&format!("{identity} {token}\n"));
        data.insert(identity.into(), token);
    }
    data.insert(TOKENS_KEY.into(), file);
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Algorithm, CorpusSource, TrainingRun};

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
    fn every_optimizer_field_of_the_spec_reaches_the_trainer() {
        let mut run = sample();
        let adamw = &mut run.spec.schedule.inner_optimizer;
        (adamw.beta1, adamw.beta2, adamw.weight_decay) = (0.8, 0.99, 0.0);
        adamw.grad_clip = None;
        let trainer = run_config(&run.spec).unwrap().adamw();
        assert_eq!((trainer.beta1, trainer.beta2), (0.8, 0.99));
        assert_eq!(trainer.weight_decay, 0.0);
        assert_eq!(trainer.grad_clip, None, "an unset gradClip clips nothing");
        run.spec.schedule.outer_momentum = 0.5;
        assert_eq!(run_config(&run.spec).unwrap().outer_momentum, 0.5);
        // An unset outer learning rate is the algorithm's tuned one.
        run.spec.schedule.outer_lr = None;
        assert_eq!(run_config(&run.spec).unwrap().outer_lr, 2.0);
        run.spec.compression.algorithm = Algorithm::DiLoCo;
        assert_eq!(run_config(&run.spec).unwrap().outer_lr, 1.0);
        // The CRD's defaults are the trainer's.
        let defaults = run_config(&sample().spec).unwrap().adamw();
        assert_eq!(defaults, starling_trainer::model::AdamWConfig::DEFAULT);
    }

    #[test]
    fn a_peers_precision_reaches_the_trainer_only_when_the_spec_sets_one() {
        use starling_trainer::device::PrecisionChoice;
        let run = sample();
        let run_env = run_env(&run.spec).unwrap();
        let precision = |vars: &[EnvVar]| {
            (vars.iter().find(|e| e.name == names::PRECISION)).and_then(|e| e.value.clone())
        };
        assert_eq!(precision(&peer_env(&BTreeMap::new(), None, &run_env)), None);
        for (set, choice) in [
            (Precision::F32, PrecisionChoice::Fixed(Precision::F32)),
            (Precision::Bf16, PrecisionChoice::Fixed(Precision::Bf16)),
        ] {
            let value = precision(&peer_env(&BTreeMap::new(), Some(set), &run_env)).unwrap();
            assert_eq!(value.parse::<PrecisionChoice>(), Ok(choice), "{value}");
        }
        // The spec's spelling is the trainer's.
        let peers: crate::api::PeersSpec =
            serde_yaml::from_str("{min: 1, max: 2, precision: f32}").unwrap();
        assert_eq!(peers.precision, Some(Precision::F32));
        assert!(
            serde_yaml::from_str::<crate::api::PeersSpec>("{min: 1, max: 2, precision: fp16}")
                .is_err()
        );
    }

    #[test]
    fn the_publisher_reads_its_job_environment_as_the_operator_wrote_it() {
        let publish: PublishSpec = serde_yaml::from_str(
            "{repo: acme/tiny, tokenSecretRef: {name: hf}, endpoint: 'http://hub.local:8080', \
             private: true, revisionStyle: Untagged, maxShardBytes: 1000, license: mit, \
             datasets: [a/b, c/d]}",
        )
        .unwrap();
        let url = "http://tiny-exchange:7070/checkpoints/round-000012";
        let mut vars: Vec<(String, String)> = publish_env(&publish, url)
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        vars.push((names::TOKEN.into(), "publisher-token".into()));
        let args: starling_trainer::hub::PublishArgs = names::parse_as_env(&vars).unwrap();
        assert_eq!(args.checkpoint, url);
        assert_eq!(args.repo.to_string(), "acme/tiny");
        assert_eq!(args.endpoint, "http://hub.local:8080");
        assert!(args.private && !args.tag);
        assert_eq!(args.max_shard_bytes, 1000);
        assert_eq!(args.license.as_deref(), Some("mit"));
        assert_eq!(args.datasets, ["a/b", "c/d"]);
        assert_eq!(args.exchange_token.as_deref(), Some("publisher-token"));
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
        // So are the pacing of rounds, each on its own.
        for edit in [
            (|s: &mut TrainingRunSpec| s.placement.round_deadline_floor_seconds = 5)
                as fn(&mut TrainingRunSpec),
            |s| s.placement.round_quorum = 0.5,
        ] {
            let mut paced = run.clone();
            edit(&mut paced.spec);
            assert_eq!(run_env(&paced.spec), run_env(&run.spec));
            assert_ne!(settings(&paced.spec), settings(&run.spec));
            assert!(settings(&paced.spec).validate().is_ok());
        }
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
        let data = mint_credentials(3, 2);
        let file = &data[TOKENS_KEY];
        for peer in ["p0", "p1", "p2", "e0", "e1", "operator", "publisher"] {
            let token = &data[peer];
            assert!(token.len() >= 32);
            assert!(file.contains(&format!("{peer} {token}\n")));
        }
        assert_ne!(data["p0"], data["p1"]);
        starling_trainer::exchange::Tokens::parse(file).unwrap();
        let key = starling_trainer::scoring::ledger::unhex(&data[LEDGER_KEY]).unwrap();
        Signer::from_pkcs8(&key).unwrap();
        assert_eq!(data[SCORING_KEY].len(), 64);
        assert!(!file.contains(&data[SCORING_KEY]) && !file.contains(&data[LEDGER_KEY]));
    }
}
