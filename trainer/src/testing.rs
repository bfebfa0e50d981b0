//! Helpers shared by the unit tests.

use crate::data::{Batch, Corpus, Tokenizer};
use crate::model::{Llama, ModelConfig};

/// A model small enough to train in seconds on a CPU.
pub fn small_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 128,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
    }
}

/// Shakespeare's training tokens, and a fixed batch of 32 held-out sequences.
pub fn shakespeare(seq: usize) -> (Vec<u32>, Batch) {
    let tok = Tokenizer::Bytes;
    let corpus = Corpus::shakespeare();
    let batch =
        crate::run::validation_batch(&tok.encode(&corpus.validation).unwrap(), 32, seq).unwrap();
    (tok.encode(&corpus.train).unwrap(), batch)
}

/// The model's mean loss on `batch`.
pub fn loss_on(model: &Llama, batch: &Batch) -> f32 {
    model.batch_loss(batch).unwrap()
}

/// A run of [`small_config`] on Shakespeare with short sequences, set up under `dir`;
/// `args` are `train`/`exchange` run flags that override the defaults here.
pub fn small_run(dir: &std::path::Path, args: &[&str]) -> crate::run::Run {
    use clap::Parser;
    #[derive(Parser)]
    #[command(args_override_self = true)]
    struct Flags {
        #[command(flatten)]
        run: crate::run::RunConfig,
    }
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("model.json");
    std::fs::write(&config, serde_json::to_vec(&small_config()).unwrap()).unwrap();
    let mut argv = vec!["run", "--model-config", config.to_str().unwrap()];
    argv.extend([
        "--max-peers",
        "3",
        "--inner-steps",
        "2",
        "--batch",
        "2",
        "--micro-batch",
        "2",
        "--sequence-length",
        "32",
        "--warmup-steps",
        "2",
    ]);
    argv.extend(args);
    Flags::parse_from(argv).run.load(&dir.join("data")).unwrap()
}
