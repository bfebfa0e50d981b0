use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A LLaMA-style decoder architecture. Field meanings follow Hugging Face's `LlamaConfig`
/// (`hiddenSize` is `hidden_size`, ...), so a run's config maps one-to-one onto the
/// `config.json` published with its checkpoints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlamaConfig {
    #[schemars(range(min = 2))]
    pub vocab_size: u32,
    #[schemars(range(min = 2))]
    pub hidden_size: u32,
    #[schemars(range(min = 1))]
    pub num_hidden_layers: u32,
    #[schemars(range(min = 1))]
    pub num_attention_heads: u32,
    /// Grouped-query attention: heads share key/value heads. Unset means multi-head
    /// attention (as many key/value heads as attention heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub num_key_value_heads: Option<u32>,
    #[schemars(range(min = 1))]
    pub intermediate_size: u32,
    #[schemars(range(min = 1))]
    pub max_position_embeddings: u32,
    #[serde(default = "default_rope_theta")]
    #[schemars(range(min = 1.0))]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    #[schemars(range(min = 0.0))]
    pub rms_norm_eps: f64,
    /// Share the input embedding with the output projection (as small LLaMAs do).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

impl LlamaConfig {
    /// Key/value heads, resolving the multi-head default.
    pub fn kv_heads(&self) -> u32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Number of parameters, counted as Hugging Face counts them for `LlamaForCausalLM`.
    pub fn parameter_count(&self) -> u64 {
        let (v, h, i) = (
            u64::from(self.vocab_size),
            u64::from(self.hidden_size),
            u64::from(self.intermediate_size),
        );
        let head_dim = h / u64::from(self.num_attention_heads.max(1));
        let kv = u64::from(self.kv_heads()) * head_dim;
        let attention = h * h * 2 + h * kv * 2; // q, o and k, v projections
        let mlp = 3 * h * i; // gate, up, down
        let norms = 2 * h;
        let layers = u64::from(self.num_hidden_layers) * (attention + mlp + norms);
        let embeddings = if self.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        layers + embeddings + h // final norm
    }
}

/// Named architectures. A preset fixes everything but the vocabulary, which comes from the
/// run's tokenizer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelPreset {
    /// Under 1M parameters: tests, the local demo, CPU-only machines.
    #[serde(rename = "tiny")]
    Tiny,
    /// GPT-2-small-sized LLaMA, about 125M parameters with a 32k vocabulary.
    #[serde(rename = "llama-125m")]
    Llama125M,
    /// The Llama 3.2 1B architecture.
    #[serde(rename = "llama-1b")]
    Llama1B,
    /// The Llama 3.1 8B architecture.
    #[serde(rename = "llama-8b")]
    Llama8B,
}

impl ModelPreset {
    pub fn config(self, vocab_size: u32) -> LlamaConfig {
        let (hidden, layers, heads, kv, inter, positions, theta, tied) = match self {
            ModelPreset::Tiny => (128, 4, 4, 2, 384, 512, 10_000.0, true),
            ModelPreset::Llama125M => (768, 12, 12, 12, 2048, 2048, 10_000.0, true),
            ModelPreset::Llama1B => (2048, 16, 32, 8, 8192, 8192, 500_000.0, true),
            ModelPreset::Llama8B => (4096, 32, 32, 8, 14336, 8192, 500_000.0, false),
        };
        LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            intermediate_size: inter,
            max_position_embeddings: positions,
            rope_theta: theta,
            rms_norm_eps: default_rms_norm_eps(),
            tie_word_embeddings: tied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_sizes_their_names_promise() {
        let tiny = ModelPreset::Tiny.config(256).parameter_count();
        assert!(tiny < 1_000_000, "tiny has {tiny} parameters");
        let m125 = ModelPreset::Llama125M.config(32_000).parameter_count();
        assert!((100_000_000..150_000_000).contains(&m125), "{m125}");
        // Llama 3.2 1B and Llama 3.1 8B with their 128256-token vocabulary.
        let b1 = ModelPreset::Llama1B.config(128_256).parameter_count();
        assert_eq!(b1, 1_235_814_400);
        let b8 = ModelPreset::Llama8B.config(128_256).parameter_count();
        assert_eq!(b8, 8_030_261_248);
    }
}
