use serde::{Deserialize, Serialize};

/// A LLaMA-style decoder, in the field names and meaning of Hugging Face's `config.json`
/// for `LlamaForCausalLM`, so a checkpoint's config loads in the HF ecosystem as is.
///
/// The operator resolves a TrainingRun's preset or explicit config to this and hands it
/// to every trainer; the trainer never guesses an architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// The `rope_theta` a config without one has (Hugging Face's default).
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;
/// The `rms_norm_eps` a config without one has.
pub const DEFAULT_RMS_NORM_EPS: f64 = 1e-5;

fn default_rope_theta() -> f64 {
    DEFAULT_ROPE_THETA
}

fn default_rms_norm_eps() -> f64 {
    DEFAULT_RMS_NORM_EPS
}

/// One thing wrong with a model config: the field to change (its `config.json` name) and
/// why.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("invalid model config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks what the arithmetic of the model relies on; the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Every problem with this config, so a user can fix them all at once.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut out = vec![];
        let mut check = |ok: bool, field: &'static str, message: &dyn Fn() -> String| {
            if !ok {
                out.push(ConfigError {
                    field,
                    message: message(),
                });
            }
        };
        let positive = || "must be positive".to_owned();
        check(self.vocab_size > 0, "vocab_size", &positive);
        check(self.hidden_size > 0, "hidden_size", &positive);
        check(self.num_hidden_layers > 0, "num_hidden_layers", &positive);
        check(self.intermediate_size > 0, "intermediate_size", &positive);
        check(
            self.max_position_embeddings > 0,
            "max_position_embeddings",
            &positive,
        );
        let (hidden, heads, kv) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        let heads_divide = heads > 0 && hidden.is_multiple_of(heads);
        check(heads_divide, "num_attention_heads", &|| {
            format!("must divide the hidden size ({hidden} % {heads} != 0)")
        });
        check(
            kv > 0 && heads.is_multiple_of(kv),
            "num_key_value_heads",
            &|| format!("must divide the attention heads ({heads} % {kv} != 0)"),
        );
        if heads_divide && hidden > 0 {
            let head_dim = hidden / heads;
            check(head_dim.is_multiple_of(2), "hidden_size", &|| {
                format!(
                    "hidden size / attention heads = {head_dim} must be even for rotary embeddings"
                )
            });
        }
        out
    }

    /// Number of parameters, counted as Hugging Face counts them for `LlamaForCausalLM`.
    pub fn parameter_count(&self) -> u64 {
        let [v, h, i, heads, kv, layers] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.num_hidden_layers,
        ]
        .map(|x| x as u64);
        let kv_dim = kv * (h / heads.max(1));
        let attention = h * h * 2 + h * kv_dim * 2; // q, o and k, v projections
        let mlp = 3 * h * i; // gate, up, down
        let norms = 2 * h;
        let embeddings = if self.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        layers * (attention + mlp + norms) + embeddings + h // final norm
    }

    /// The `config.json` Hugging Face tools expect next to `model.safetensors`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let extra = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
        });
        for (k, x) in extra.as_object().expect("object") {
            v[k] = x.clone();
        }
        v
    }
}

/// Named architectures. A preset fixes everything but the vocabulary, which comes from the
/// run's tokenizer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Preset {
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

impl Preset {
    pub fn config(self, vocab_size: usize) -> ModelConfig {
        let (hidden, layers, heads, kv, inter, positions, theta, tied) = match self {
            Preset::Tiny => (128, 4, 4, 2, 384, 512, DEFAULT_ROPE_THETA, true),
            Preset::Llama125M => (768, 12, 12, 12, 2048, 2048, DEFAULT_ROPE_THETA, true),
            Preset::Llama1B => (2048, 16, 32, 8, 8192, 8192, 500_000.0, true),
            Preset::Llama8B => (4096, 32, 32, 8, 14336, 8192, 500_000.0, false),
        };
        ModelConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            max_position_embeddings: positions,
            rope_theta: theta,
            rms_norm_eps: DEFAULT_RMS_NORM_EPS,
            tie_word_embeddings: tied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_sizes_their_names_promise() {
        let tiny = Preset::Tiny.config(256).parameter_count();
        assert!(tiny < 1_000_000, "tiny has {tiny} parameters");
        let m125 = Preset::Llama125M.config(32_000).parameter_count();
        assert!((100_000_000..150_000_000).contains(&m125), "{m125}");
        // Llama 3.2 1B and Llama 3.1 8B with their 128256-token vocabulary.
        let b1 = Preset::Llama1B.config(128_256).parameter_count();
        assert_eq!(b1, 1_235_814_400);
        let b8 = Preset::Llama8B.config(128_256).parameter_count();
        assert_eq!(b8, 8_030_261_248);
        for preset in [
            Preset::Tiny,
            Preset::Llama125M,
            Preset::Llama1B,
            Preset::Llama8B,
        ] {
            assert_eq!(preset.config(256).problems(), vec![], "{preset:?}");
        }
    }

    #[test]
    fn the_parameter_count_is_the_models_own() {
        let config = Preset::Tiny.config(256);
        let model = crate::model::Llama::new(config.clone(), 0, &candle_core::Device::Cpu).unwrap();
        assert_eq!(config.parameter_count(), model.parameter_count() as u64);
    }

    #[test]
    fn every_problem_names_its_field() {
        let mut c = Preset::Tiny.config(256);
        c.hidden_size = 100;
        c.num_attention_heads = 6;
        c.num_key_value_heads = 4;
        c.num_hidden_layers = 0;
        let fields: Vec<_> = c.problems().iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads"
            ]
        );
        assert_eq!(c.validate().unwrap_err().field, "num_hidden_layers");
        c = Preset::Tiny.config(256);
        c.hidden_size = 12;
        c.num_attention_heads = 4;
        c.num_key_value_heads = 4;
        let problem = c.validate().unwrap_err();
        assert_eq!(problem.field, "hidden_size");
        assert!(problem.message.contains("= 3 must be even"), "{problem}");
    }

    #[test]
    fn the_tiny_fixture_is_the_tiny_preset() {
        let text = include_str!("../../tests/fixtures/tiny-config.json");
        let fixture: ModelConfig = serde_json::from_str(text).unwrap();
        assert_eq!(fixture, Preset::Tiny.config(256));
    }
}
