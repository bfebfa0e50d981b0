use candle_core::{Device, Tensor};

use super::*;
use crate::data::{Assignment, Tokenizer};
use crate::testing::{loss_on, shakespeare, small_config as small};

fn params_of(m: &Llama) -> Vec<Vec<f32>> {
    m.params()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn parameters_follow_the_hugging_face_layout() {
    let m = Llama::new(small(), 1, &Device::Cpu).unwrap();
    let names: Vec<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert!(names.contains(&"model.layers.1.self_attn.k_proj.weight"));
    assert!(names.contains(&"model.layers.0.mlp.down_proj.weight"));
    assert_eq!(*names.last().unwrap(), "model.norm.weight");
    assert!(
        !names.contains(&"lm_head.weight"),
        "tied embeddings have no lm_head"
    );
    let k = &m.params()[names
        .iter()
        .position(|n| *n == "model.layers.0.self_attn.k_proj.weight")
        .unwrap()]
    .1;
    assert_eq!(k.dims(), &[32, 64]); // 2 kv heads × head_dim 16
    let untied = ModelConfig {
        tie_word_embeddings: false,
        ..small()
    };
    assert_eq!(
        parameter_shapes(&untied).last().unwrap().0,
        "lm_head.weight"
    );
}

#[test]
fn initialisation_is_a_function_of_the_seed() {
    let a = Llama::new(small(), 7, &Device::Cpu).unwrap();
    let b = Llama::new(small(), 7, &Device::Cpu).unwrap();
    let c = Llama::new(small(), 8, &Device::Cpu).unwrap();
    assert_eq!(params_of(&a), params_of(&b));
    assert_ne!(params_of(&a), params_of(&c));
}

#[test]
fn bad_configs_and_inputs_are_refused() {
    let bad = ModelConfig {
        num_key_value_heads: 3,
        ..small()
    };
    assert!(matches!(
        Llama::new(bad, 0, &Device::Cpu),
        Err(ModelError::Config(_))
    ));
    let m = Llama::new(small(), 0, &Device::Cpu).unwrap();
    let long = Tensor::zeros((1, 129), candle_core::DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(&long),
        Err(ModelError::SequenceTooLong { len: 129, max: 128 })
    ));
}

#[test]
fn an_untrained_model_predicts_uniformly_and_attention_is_causal() {
    let m = Llama::new(small(), 3, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..64).map(|i| (i * 37) % 256).collect();
    let t = Tensor::from_slice(&tokens, (2, 32), &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..64).map(|i| (i * 101 + 13) % 256).collect();
    let y = Tensor::from_slice(&targets, (2, 32), &Device::Cpu).unwrap();
    let loss = m.loss(&t, &y).unwrap().to_scalar::<f32>().unwrap();
    assert!((loss - 256f32.ln()).abs() < 0.1, "loss {loss}");
    // Changing a later token must not change earlier positions' logits.
    let logits = m.forward(&t).unwrap().to_vec2::<f32>().unwrap();
    let mut changed = tokens.clone();
    changed[20] = 1;
    let t2 = Tensor::from_slice(&changed, (2, 32), &Device::Cpu).unwrap();
    let logits2 = m.forward(&t2).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(logits[..20], logits2[..20]);
    assert_ne!(logits[20], logits2[20]);
}

/// Trains `steps` inner steps on Shakespeare; returns (initial, final) validation loss and
/// the model.
fn train_shakespeare(steps: u64, seed: u64) -> (f32, f32, Llama) {
    train_shakespeare_in(steps, seed, Precision::F32)
}

fn train_shakespeare_in(steps: u64, seed: u64, precision: Precision) -> (f32, f32, Llama) {
    let seq = 64;
    let batch_rows = 16;
    let (train, val) = shakespeare(seq);
    let a = Assignment::new(seed, 1, batch_rows as u64 * steps, seq, train.len()).unwrap();
    let windows = a.peer_round(0, 0);
    let m = Llama::new(small(), seed, &Device::Cpu)
        .unwrap()
        .with_precision(precision);
    let before = loss_on(&m, &val);
    let schedule = LrSchedule {
        peak: 3e-3,
        warmup: 10,
        total: steps,
        floor: 0.1,
    };
    let mut opt = InnerOptimizer::new(&m, AdamWConfig::default(), schedule).unwrap();
    for w in windows.chunks(batch_rows) {
        let batch = a.batch(&train, w);
        opt.step(&m, &batch, 8).unwrap();
    }
    assert_eq!(opt.steps(), steps);
    (before, loss_on(&m, &val), m)
}

/// A learning rate of 1e-3 throughout.
const CONSTANT: LrSchedule = LrSchedule {
    peak: 1e-3,
    warmup: 0,
    total: 10,
    floor: 1.0,
};

/// Every parameter's gradient in `g`, flattened in parameter order; each is f32.
fn flat_gradients(m: &Llama, g: &candle_core::backprop::GradStore) -> Vec<f32> {
    (m.params().iter())
        .flat_map(|(name, v)| {
            let t = g
                .get(v.as_tensor())
                .expect("every parameter has a gradient");
            assert_eq!(t.dtype(), candle_core::DType::F32, "{name}: gradient dtype");
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn gradients_split_over_threads_match_one_pass_and_repeat_bit_for_bit() {
    let m = Llama::new(small(), 3, &Device::Cpu).unwrap();
    let (train, _) = shakespeare(32);
    // 7 rows over 3 threads: uneven groups, micro-batches cut to fit.
    let a = Assignment::new(0, 1, 7, 32, train.len()).unwrap();
    let batch = a.batch(&train, &a.peer_round(0, 0));
    let mut opt = InnerOptimizer::new(&m, AdamWConfig::default(), CONSTANT).unwrap();
    let gradients = |opt: &InnerOptimizer| {
        let (g, loss) = opt.gradients(&m, &batch, 8).unwrap();
        (flat_gradients(&m, &g), loss)
    };
    let (one, loss_one) = gradients(&opt);
    opt.set_threads(3);
    let (three, loss_three) = gradients(&opt);
    assert_eq!(three, gradients(&opt).0, "same threads, same bits");
    assert!(
        (loss_one - loss_three).abs() < 1e-5,
        "{loss_one} vs {loss_three}"
    );
    let worst = one
        .iter()
        .zip(&three)
        .map(|(a, b)| (a - b).abs() / (1e-4 + a.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "relative gradient difference {worst}");
}

#[test]
fn training_lowers_held_out_loss_and_is_deterministic() {
    let (before, after, m1) = train_shakespeare(200, 5);
    eprintln!("validation loss {before} -> {after}");
    // ln 256 ≈ 5.55 at the start; byte unigram statistics alone give about 3.3.
    assert!(before > 5.3, "initial validation loss {before}");
    assert!(
        after < 2.8,
        "validation loss only fell from {before} to {after}"
    );
    let (_, again, m2) = train_shakespeare(200, 5);
    assert_eq!(after.to_bits(), again.to_bits());
    assert_eq!(
        params_of(&m1),
        params_of(&m2),
        "same inputs must give bit-identical θ"
    );

    // What it learned shows in its text: mostly letters and spaces, like the plays.
    let tok = Tokenizer::Bytes;
    let text = tok.decode(
        &m1.generate(&tok.encode("ROMEO:\n").unwrap(), 200, 0.8, 1)
            .unwrap(),
    );
    let plain = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || " \n,.'".contains(*c))
        .count();
    assert!(plain * 10 >= text.chars().count() * 9, "{text:?}");
    let greedy = m1
        .generate(&tok.encode("ROMEO:\n").unwrap(), 20, 0.0, 1)
        .unwrap();
    assert_eq!(
        greedy,
        m1.generate(&tok.encode("ROMEO:\n").unwrap(), 20, 0.0, 2)
            .unwrap()
    );
}

/// The gradient of every parameter, flattened in order, and the loss, at `precision`.
fn gradients_at(precision: Precision, seed: u64) -> (Vec<f32>, f32) {
    let m = Llama::new(small(), seed, &Device::Cpu)
        .unwrap()
        .with_precision(precision);
    let (train, _) = shakespeare(64);
    let a = Assignment::new(seed, 1, 8, 64, train.len()).unwrap();
    let batch = a.batch(&train, &a.peer_round(0, 0));
    let opt = InnerOptimizer::new(&m, AdamWConfig::default(), CONSTANT).unwrap();
    let (g, loss) = opt.gradients(&m, &batch, 8).unwrap();
    (flat_gradients(&m, &g), loss)
}

#[test]
fn bf16_products_give_the_f32_loss_and_f32_gradients_within_bf16_tolerance() {
    let (f32_grads, f32_loss) = gradients_at(Precision::F32, 4);
    let (bf16_grads, bf16_loss) = gradients_at(Precision::Bf16, 4);
    // bf16 keeps 8 bits of mantissa: products of 64-long rows agree to about 1%.
    assert!(
        (f32_loss - bf16_loss).abs() < 1e-2 * f32_loss,
        "loss {f32_loss} in f32, {bf16_loss} in bf16"
    );
    assert_ne!(f32_loss.to_bits(), bf16_loss.to_bits(), "bf16 was not used");
    let dot: f64 = f32_grads
        .iter()
        .zip(&bf16_grads)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let norm = |g: &[f32]| g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (norm(&f32_grads) * norm(&bf16_grads));
    assert!(cosine > 0.99, "gradient cosine {cosine}");
    let ratio = norm(&bf16_grads) / norm(&f32_grads);
    assert!((ratio - 1.0).abs() < 0.02, "gradient norm ratio {ratio}");
}

#[test]
fn training_with_bf16_products_follows_the_f32_curve() {
    let (before, f32_after, _) = train_shakespeare_in(100, 6, Precision::F32);
    let (bf16_before, bf16_after, m) = train_shakespeare_in(100, 6, Precision::Bf16);
    eprintln!(
        "validation loss {before} -> {f32_after} (f32), {bf16_before} -> {bf16_after} (bf16)"
    );
    assert!(
        m.params()
            .iter()
            .all(|(_, v)| v.dtype() == candle_core::DType::F32),
        "master weights must stay f32"
    );
    assert!(
        bf16_after < before - 1.5,
        "bf16 training did not learn: {bf16_after}"
    );
    assert!(
        (bf16_after - f32_after).abs() < 0.03 * f32_after,
        "bf16 {bf16_after} against f32 {f32_after}"
    );
}

#[test]
fn schedule_warms_up_then_decays_to_its_floor() {
    let s = LrSchedule {
        peak: 1.0,
        warmup: 10,
        total: 110,
        floor: 0.1,
    };
    assert!((s.at(0) - 0.1).abs() < 1e-12);
    assert!((s.at(9) - 1.0).abs() < 1e-12);
    assert!((s.at(60) - 0.55).abs() < 1e-9);
    assert!((s.at(110) - 0.1).abs() < 1e-12);
    assert!((s.at(10_000) - 0.1).abs() < 1e-12);
}

#[test]
fn checkpoints_round_trip_and_bad_ones_are_reported() {
    let m = Llama::new(small(), 11, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("round-3");
    let meta = serde_json::json!({"run": "test", "round": 3});
    let tok = Tokenizer::Bytes;
    save_checkpoint(&ckpt, &m, &meta, &tok).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "starling.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 2);
    // Generation starts at a newline and has no end token: never transformers' guess
    // of 1 and 2, two control bytes.
    assert_eq!(config["bos_token_id"], 10);
    assert!(config["eos_token_id"].is_null());
    let generation: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(generation["bos_token_id"], 10);
    assert_eq!(generation["temperature"], 0.8);
    let (loaded, loaded_meta) = load_checkpoint(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(params_of(&loaded), params_of(&m));
    assert_eq!(loaded_meta, meta);
    // Overwriting replaces the checkpoint whole, and leaves no partial directories.
    let m2 = Llama::new(small(), 12, &Device::Cpu).unwrap();
    save_checkpoint(&ckpt, &m2, &meta, &tok).unwrap();
    assert_eq!(
        params_of(&load_checkpoint(&ckpt, &Device::Cpu).unwrap().0),
        params_of(&m2)
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1);

    // A checkpoint for another architecture names the offending tensor.
    let wide = ModelConfig {
        hidden_size: 128,
        ..small()
    };
    std::fs::write(
        ckpt.join("config.json"),
        serde_json::to_vec(&wide.to_hf_json()).unwrap(),
    )
    .unwrap();
    let err = load_checkpoint(&ckpt, &Device::Cpu).err().unwrap();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
    std::fs::write(ckpt.join("model.safetensors"), b"garbage").unwrap();
    let err = load_checkpoint(&ckpt, &Device::Cpu).err().unwrap();
    assert!(matches!(err, ModelError::BadFile { .. }), "{err}");
    std::fs::remove_file(ckpt.join("config.json")).unwrap();
    assert!(matches!(
        load_checkpoint(&ckpt, &Device::Cpu),
        Err(ModelError::Io { .. })
    ));
}
