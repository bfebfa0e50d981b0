use super::*;
use crate::codec::AggregationRule;
use crate::testing::small_run;

#[test]
fn a_configuration_survives_the_trip_through_the_environment() {
    let config = RunConfig {
        model_config: r#"{"vocab_size": 256}"#.into(),
        seed: 7,
        algorithm: Algorithm::DiLoCo,
        max_peers: 5,
        inner_steps: 30,
        batch: 16,
        micro_batch: 4,
        sequence_length: 256,
        lr: 1.5e-3,
        warmup_steps: 11,
        beta1: 0.8,
        beta2: 0.99,
        weight_decay: 0.0,
        grad_clip: 0.5,
        outer_lr: 0.7,
        outer_momentum: 0.85,
        chunk: 2048,
        k: 32,
        bits: 4,
        error_feedback: 0.9,
        aggregation: Aggregation::MedianNorm,
        download: Download::Gather,
        gather: 7,
        aggregate_k: Some(96),
        corpus: Some("/data/corpus.txt".into()),
        tokenizer: "/data/tokenizer.json".into(),
        init_from: Some("/data/init".into()),
    };
    let back: RunConfig = env::parse_as_env(&config.to_env()).unwrap();
    assert_eq!(back, config);
    // Defaults and absent paths too.
    let mut plain = config.clone();
    (plain.corpus, plain.init_from) = (None, None);
    plain.aggregation = Aggregation::default();
    let back: RunConfig = env::parse_as_env(&plain.to_env()).unwrap();
    assert_eq!(back, plain);
}

#[test]
fn the_aggregation_rule_is_chosen_per_run_and_fingerprinted() {
    let dir = tempfile::tempdir().unwrap();
    let default = small_run(&dir.path().join("default"), &[]);
    let mean = small_run(
        &dir.path().join("mean"),
        &["--aggregation", "weighted-mean"],
    );
    let median = small_run(
        &dir.path().join("median"),
        &["--aggregation", "median-norm"],
    );
    assert_eq!(default.config.aggregation(), AggregationRule::WeightedMean);
    assert_eq!(
        median.config.aggregation(),
        AggregationRule::MedianNormClipSelectedMean
    );
    // Peers that combine updates differently must not share a run.
    assert_eq!(default.fingerprint, mean.fingerprint);
    assert_ne!(default.fingerprint, median.fingerprint);
}

#[test]
fn the_inner_optimizer_settings_are_the_runs_and_fingerprinted() {
    let dir = tempfile::tempdir().unwrap();
    let default = small_run(&dir.path().join("default"), &[]);
    let same = small_run(&dir.path().join("same"), &["--weight-decay", "0.1"]);
    let other = small_run(
        &dir.path().join("other"),
        &["--weight-decay", "0", "--grad-clip", "0"],
    );
    assert_eq!(default.config.adamw(), AdamWConfig::DEFAULT);
    let adamw = other.config.adamw();
    assert_eq!((adamw.weight_decay, adamw.grad_clip), (0.0, None));
    assert_eq!(default.fingerprint, same.fingerprint);
    assert_ne!(default.fingerprint, other.fingerprint);
}

#[test]
fn what_peers_download_is_chosen_per_run_and_fingerprinted() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, args: &[&str]| small_run(&dir.path().join(name), args);
    let default = run("default", &[]);
    assert_eq!(default.config.download, Download::Aggregate);
    let k = default.config.aggregate_codec().unwrap().config().k();
    assert_eq!(
        k,
        (AGGREGATE_K_FACTOR * default.config.k).min(default.config.chunk)
    );
    let denser = run("denser", &["--aggregate-k", "7"]);
    assert_eq!(denser.config.aggregate_codec().unwrap().config().k(), 7);
    let all = run("all", &["--download", "all"]);
    let gather = run("gather", &["--download", "gather"]);
    let fewer = run("fewer", &["--download", "gather", "--gather", "3"]);
    // Replicas that take their steps from different downloads must not share a run.
    let prints = [&default, &denser, &all, &gather, &fewer].map(|r| r.fingerprint.clone());
    for (i, a) in prints.iter().enumerate() {
        for b in &prints[i + 1..] {
            assert_ne!(a, b);
        }
    }
    let mut vars = default.config.to_env();
    vars.retain(|(name, _)| *name != env::GATHER);
    vars.push((env::GATHER, "0".into()));
    let err = env::parse_as_env::<RunConfig>(&vars).unwrap_err();
    assert!(err.contains("gather"), "a gather of 0 takes nothing: {err}");
}
