//! The model: a LLaMA-style decoder (candle), its inner optimiser, and checkpoints in the
//! Hugging Face layout (`model.safetensors`, `config.json`, `generation_config.json`).

mod adamw;
mod checkpoint;
mod config;
mod fused;
mod llama;
mod optim;

pub use checkpoint::{load_checkpoint, save_checkpoint};
pub use config::{
    ConfigError, DEFAULT_RMS_NORM_EPS, DEFAULT_ROPE_THETA, HfConfigError, ModelConfig, Preset,
};
pub use llama::{Llama, Precision, parameter_shapes};
pub use optim::{AdamWConfig, InnerOptimizer, LrSchedule};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("checkpoint lacks tensor {0}")]
    MissingTensor(String),
    #[error("checkpoint has tensor {0}, which the model does not")]
    UnexpectedTensor(String),
    #[error("tensor {tensor}: shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("sequence of {len} tokens exceeds max_position_embeddings ({max})")]
    SequenceTooLong { len: usize, max: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("loss is not finite ({0}): the step diverged")]
    Diverged(f32),
}

#[cfg(test)]
mod tests;
