//! Helpers shared by the unit tests.

use candle_core::{Device, Tensor};

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
    let batch = crate::run::validation_batch(&tok.encode(&corpus.validation), 32, seq).unwrap();
    (tok.encode(&corpus.train), batch)
}

/// The model's mean loss on `batch`.
pub fn loss_on(model: &Llama, batch: &Batch) -> f32 {
    let x = Tensor::from_slice(&batch.inputs, (batch.rows, batch.seq), &Device::Cpu).unwrap();
    let y = Tensor::from_slice(&batch.targets, (batch.rows, batch.seq), &Device::Cpu).unwrap();
    model.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap()
}
