//! Checks on a `TrainingRunSpec` that the CRD schema cannot express.
//!
//! The schema (types, ranges, enums, CEL rules) is enforced by the API server at admission.
//! This is the authority the controller applies before it acts: it repeats the cross-field
//! CEL rules (a server may run without CEL) and adds what needs arithmetic across sections.
//! Every problem is returned, each with the path of the field to change, so one
//! `Ready=False` condition tells a user everything to fix at once.

use std::fmt;

use starling_trainer::model::ModelConfig;

use super::{LlamaConfig, TrainingRunSpec};

/// One thing wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path in the object, e.g. `spec.model.config.numAttentionHeads`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a spec; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec(pub Vec<FieldError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidSpec {}

impl InvalidSpec {
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn check(&mut self, ok: bool, path: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(FieldError {
                path: path.to_owned(),
                message: message(),
            });
        }
    }
}

/// Validates a spec, returning every problem found.
pub fn validate(spec: &TrainingRunSpec) -> Result<(), InvalidSpec> {
    let mut p = Problems::default();
    check_model(spec, &mut p);
    check_data(spec, &mut p);
    check_schedule(spec, &mut p);
    check_compression(spec, &mut p);
    check_peers(spec, &mut p);
    check_publish(spec, &mut p);
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(p.0))
    }
}

/// The architecture the run trains, when it can be known from the spec alone (an explicit
/// config, or a preset with the built-in tokenizer).
pub fn resolved_model(spec: &TrainingRunSpec) -> Option<ModelConfig> {
    match (&spec.model.config, spec.model.preset) {
        (Some(config), None) => Some(config.to_model()),
        (None, Some(preset)) => spec
            .data
            .builtin_vocab_size()
            .map(|v| preset.config(v as usize)),
        _ => None,
    }
}

/// The model's arithmetic is the trainer's to check ([`ModelConfig::problems`]); here
/// each problem gets the path of the API field to change.
fn check_model(spec: &TrainingRunSpec, p: &mut Problems) {
    let model = &spec.model;
    p.check(
        model.preset.is_some() != model.config.is_some(),
        "spec.model",
        || "set exactly one of preset and config".into(),
    );
    let Some(c) = &model.config else { return };
    let at = |field: &str| format!("spec.model.config.{}", LlamaConfig::field_name(field));
    for problem in c.to_model().problems() {
        p.check(false, &at(problem.field), || problem.message.clone());
    }
    if let Some(vocab) = spec.data.builtin_vocab_size() {
        p.check(c.vocab_size >= vocab, &at("vocab_size"), || {
            format!(
                "must be at least {vocab} for tokenizer {:?}",
                spec.data.tokenizer
            )
        });
    }
}

fn check_data(spec: &TrainingRunSpec, p: &mut Problems) {
    let corpus = &spec.data.corpus;
    let sources = [
        corpus.builtin.is_some(),
        corpus.path.is_some(),
        corpus.hub_dataset.is_some(),
    ];
    p.check(
        sources.iter().filter(|set| **set).count() == 1,
        "spec.data.corpus",
        || "set exactly one of builtin, path and hubDataset".into(),
    );
    if let Some(model) = resolved_model(spec) {
        p.check(
            spec.data.sequence_length as usize <= model.max_position_embeddings,
            "spec.data.sequenceLength",
            || {
                format!(
                    "{} exceeds the model's maxPositionEmbeddings ({})",
                    spec.data.sequence_length, model.max_position_embeddings
                )
            },
        );
    }
}

fn check_schedule(spec: &TrainingRunSpec, p: &mut Problems) {
    let s = &spec.schedule;
    if let Some(micro) = s.micro_batch_size {
        p.check(
            micro <= s.batch_size && s.batch_size.is_multiple_of(micro),
            "spec.schedule.microBatchSize",
            || format!("must divide batchSize ({} % {micro} != 0)", s.batch_size),
        );
    }
    let total_steps = u64::from(s.outer_rounds) * u64::from(s.inner_steps);
    let warmup = s.inner_optimizer.warmup_steps;
    p.check(
        u64::from(warmup) < total_steps,
        "spec.schedule.innerOptimizer.warmupSteps",
        || format!("{warmup} leaves no steps after warmup (the run has {total_steps} inner steps)"),
    );
    let beta2 = s.inner_optimizer.beta2;
    p.check(beta2 < 1.0, "spec.schedule.innerOptimizer.beta2", || {
        "must be below 1".into()
    });
    let beta1 = s.inner_optimizer.beta1;
    p.check(beta1 < 1.0, "spec.schedule.innerOptimizer.beta1", || {
        "must be below 1".into()
    });
    p.check(
        s.outer_lr.is_none_or(|lr| lr > 0.0),
        "spec.schedule.outerLr",
        || "must be positive".into(),
    );
    p.check(
        s.outer_momentum < 1.0,
        "spec.schedule.outerMomentum",
        || "must be below 1".into(),
    );
    p.check(
        s.inner_optimizer.lr > 0.0,
        "spec.schedule.innerOptimizer.lr",
        || "must be positive".into(),
    );
}

fn check_compression(spec: &TrainingRunSpec, p: &mut Problems) {
    let c = &spec.compression;
    p.check(
        !(c.density.is_some() && c.k_per_chunk.is_some()),
        "spec.compression",
        || "set at most one of density and kPerChunk".into(),
    );
    if let Some(k) = c.k_per_chunk {
        p.check(k <= c.chunk_size, "spec.compression.kPerChunk", || {
            format!("{k} exceeds chunkSize ({})", c.chunk_size)
        });
    }
    if let Some(d) = c.density {
        p.check(d > 0.0 && d <= 1.0, "spec.compression.density", || {
            format!("{d} must be in (0, 1]")
        });
    }
}

fn check_peers(spec: &TrainingRunSpec, p: &mut Problems) {
    let peers = &spec.peers;
    p.check(peers.min <= peers.max, "spec.peers.min", || {
        format!("{} exceeds peers.max ({})", peers.min, peers.max)
    });
    let evaluators = spec.scoring.evaluators;
    p.check(evaluators <= peers.min, "spec.scoring.evaluators", || {
        format!(
            "{evaluators} evaluators but as few as {} peers (evaluators are peers)",
            peers.min
        )
    });
}

fn check_publish(spec: &TrainingRunSpec, p: &mut Problems) {
    let Some(publish) = &spec.publish else {
        return;
    };
    let repo = publish.repo.parse::<starling_trainer::hub::RepoId>();
    p.check(repo.is_ok(), "spec.publish.repo", || {
        repo.err().map(|e| e.to_string()).unwrap_or_default()
    });
    p.check(
        !publish.token_secret_ref.name.is_empty(),
        "spec.publish.tokenSecretRef.name",
        || "must name the Secret holding the Hub token".into(),
    );
    if let Some(endpoint) = &publish.endpoint {
        let hub = starling_trainer::hub::Hub::new(endpoint, None);
        p.check(hub.is_ok(), "spec.publish.endpoint", || {
            hub.err().map(|e| e.to_string()).unwrap_or_default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TrainingRunSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    const VALID: &str = r#"
model: {preset: tiny}
data: {corpus: {builtin: shakespeare}}
peers: {min: 2, max: 3}
"#;

    fn paths_of(spec: &TrainingRunSpec) -> Vec<String> {
        match validate(spec) {
            Ok(()) => vec![],
            Err(e) => e.0.into_iter().map(|e| e.path).collect(),
        }
    }

    #[test]
    fn a_minimal_spec_is_valid_and_resolves_the_tiny_preset() {
        let s = spec(VALID);
        assert_eq!(validate(&s), Ok(()));
        let model = resolved_model(&s).unwrap();
        assert_eq!(model.vocab_size, 256);
        assert!(model.parameter_count() < 1_000_000);
    }

    #[test]
    fn heads_must_divide_hidden_and_kv_heads_must_divide_heads() {
        let s = spec(
            r#"
model:
  config: {vocabSize: 256, hiddenSize: 100, numHiddenLayers: 2, numAttentionHeads: 6,
           numKeyValueHeads: 4, intermediateSize: 64, maxPositionEmbeddings: 256}
data: {corpus: {builtin: shakespeare}}
peers: {min: 1, max: 1}
"#,
        );
        assert_eq!(
            paths_of(&s),
            [
                "spec.model.config.numAttentionHeads",
                "spec.model.config.numKeyValueHeads"
            ]
        );
        let err = validate(&s).unwrap_err().to_string();
        assert!(
            err.contains("must divide the hidden size (100 % 6 != 0)"),
            "{err}"
        );
    }

    #[test]
    fn head_dim_must_be_even_for_rope() {
        let s = spec(
            r#"
model:
  config: {vocabSize: 256, hiddenSize: 12, numHiddenLayers: 1, numAttentionHeads: 4,
           intermediateSize: 8, maxPositionEmbeddings: 64}
data: {corpus: {builtin: shakespeare}, sequenceLength: 64}
peers: {min: 1, max: 1}
"#,
        );
        assert_eq!(paths_of(&s), ["spec.model.config.hiddenSize"]);
    }

    #[test]
    fn byte_tokenizer_needs_256_tokens_and_sequences_must_fit_positions() {
        let s = spec(
            r#"
model:
  config: {vocabSize: 100, hiddenSize: 16, numHiddenLayers: 1, numAttentionHeads: 2,
           intermediateSize: 32, maxPositionEmbeddings: 64}
data: {corpus: {builtin: shakespeare}, sequenceLength: 128}
peers: {min: 1, max: 1}
"#,
        );
        assert_eq!(
            paths_of(&s),
            ["spec.model.config.vocabSize", "spec.data.sequenceLength"]
        );
    }

    #[test]
    fn preset_and_config_are_exclusive() {
        let mut s = spec(VALID);
        s.model.config = Some(
            serde_json::from_value(serde_json::json!({"vocabSize": 256, "hiddenSize": 16,
                "numHiddenLayers": 1, "numAttentionHeads": 2, "intermediateSize": 32,
                "maxPositionEmbeddings": 64}))
            .unwrap(),
        );
        assert_eq!(paths_of(&s), ["spec.model"]);
        s.model.preset = None;
        s.model.config = None;
        assert_eq!(paths_of(&s), ["spec.model"]);
    }

    #[test]
    fn corpus_needs_exactly_one_source() {
        let mut s = spec(VALID);
        s.data.corpus.path = Some("/data".into());
        assert_eq!(paths_of(&s), ["spec.data.corpus"]);
    }

    #[test]
    fn k_must_fit_in_a_chunk_and_density_excludes_k() {
        let mut s = spec(VALID);
        s.compression.chunk_size = 256;
        s.compression.k_per_chunk = Some(512);
        assert_eq!(paths_of(&s), ["spec.compression.kPerChunk"]);
        s.compression.k_per_chunk = Some(16);
        s.compression.density = Some(0.01);
        assert_eq!(paths_of(&s), ["spec.compression"]);
        s.compression.k_per_chunk = None;
        s.compression.density = Some(0.0);
        assert_eq!(paths_of(&s), ["spec.compression.density"]);
    }

    #[test]
    fn density_resolves_to_at_least_one_entry_per_chunk() {
        let mut s = spec(VALID);
        assert_eq!(
            s.compression.k(),
            crate::api::training_run::DEFAULT_K_PER_CHUNK
        );
        s.compression.density = Some(0.03125);
        assert_eq!(s.compression.k(), 128);
        s.compression.density = Some(1e-9);
        assert_eq!(s.compression.k(), 1);
    }

    #[test]
    fn evaluators_cannot_outnumber_peers_and_min_cannot_exceed_max() {
        let mut s = spec(VALID);
        s.scoring.evaluators = 3;
        s.peers.min = 4;
        assert_eq!(paths_of(&s), ["spec.peers.min"]);
        s.peers.min = 2;
        assert_eq!(paths_of(&s), ["spec.scoring.evaluators"]);
    }

    #[test]
    fn schedule_problems_are_all_reported_together() {
        let s = spec(
            r#"
model: {preset: tiny}
data: {corpus: {builtin: shakespeare}}
peers: {min: 1, max: 1}
schedule:
  outerRounds: 2
  innerSteps: 10
  batchSize: 8
  microBatchSize: 3
  outerLr: 0
  outerMomentum: 1.0
  innerOptimizer: {warmupSteps: 20, beta1: 1.0}
"#,
        );
        assert_eq!(
            paths_of(&s),
            [
                "spec.schedule.microBatchSize",
                "spec.schedule.innerOptimizer.warmupSteps",
                "spec.schedule.innerOptimizer.beta1",
                "spec.schedule.outerLr",
                "spec.schedule.outerMomentum",
            ]
        );
    }

    #[test]
    fn publishing_needs_a_repo_id_a_token_secret_and_a_web_endpoint() {
        let mut s = spec(VALID);
        s.publish = Some(
            serde_yaml::from_str(
                "{repo: acme/ti--ny, tokenSecretRef: {name: ''}, endpoint: hub.local}",
            )
            .unwrap(),
        );
        assert_eq!(
            paths_of(&s),
            [
                "spec.publish.repo",
                "spec.publish.tokenSecretRef.name",
                "spec.publish.endpoint"
            ]
        );
        s.publish =
            Some(serde_yaml::from_str("{repo: acme/tiny, tokenSecretRef: {name: hf}}").unwrap());
        assert!(paths_of(&s).is_empty());
        let publish = s.publish.unwrap();
        assert_eq!(publish.token_secret_ref.key, "token");
        assert_eq!(publish.every, 0, "the final checkpoint only, by default");
    }
}
