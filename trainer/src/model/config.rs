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

    /// Model FLOPs of one training step per token at sequence length `seq`, as MFU is
    /// conventionally counted (PaLM, appendix B): 6 per weight of every matrix multiply
    /// (forward 2, backward 4; the LM head included, the embedding lookup not) and
    /// 12·layers·seq·hidden for attention's scores and weighted sum, causal masking not
    /// subtracted. Recomputation and elementwise work are not model FLOPs.
    pub fn train_flops_per_token(&self, seq: usize) -> u64 {
        let [v, h, layers, t] = [
            self.vocab_size,
            self.hidden_size,
            self.num_hidden_layers,
            seq,
        ]
        .map(|x| x as u64);
        6 * (layers * self.layer_matmul_weights() + v * h) + 12 * layers * t * h
    }

    /// Number of parameters, counted as Hugging Face counts them for `LlamaForCausalLM`.
    pub fn parameter_count(&self) -> u64 {
        let [v, h, layers] =
            [self.vocab_size, self.hidden_size, self.num_hidden_layers].map(|x| x as u64);
        let norms = 2 * h;
        let embeddings = if self.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        layers * (self.layer_matmul_weights() + norms) + embeddings + h // final norm
    }

    /// Weights of one decoder layer's projections: q and o, k and v (grouped), and the
    /// MLP's gate, up and down.
    fn layer_matmul_weights(&self) -> u64 {
        let [h, i, heads, kv] = [
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        ]
        .map(|x| x as u64);
        let kv_dim = kv * (h / heads.max(1));
        h * h * 2 + h * kv_dim * 2 + 3 * h * i
    }

    /// The `config.json` Hugging Face tools expect next to `model.safetensors`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let extra = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "dtype": "float32",
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

/// A `config.json` that describes a model Starling does not train as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum HfConfigError {
    #[error("not a model config: {0}")]
    Malformed(String),
    #[error("`{field}` = {value}: {why}")]
    Unsupported {
        field: String,
        value: String,
        why: &'static str,
    },
}

/// `config.json` fields that change nothing Starling trains or computes: metadata for
/// other tools, token ids for generation, the stored dtype (weights load as float32).
const IGNORED_FIELDS: [&str; 10] = [
    "_name_or_path",
    "architectures",
    "bos_token_id",
    "dtype",
    "eos_token_id",
    "initializer_range",
    "pad_token_id",
    "torch_dtype",
    "transformers_version",
    "use_cache",
];

/// Fields Starling implements in one setting only, with that setting.
fn required_value(field: &str) -> Option<(serde_json::Value, &'static str)> {
    use serde_json::json;
    let (value, why) = match field {
        "model_type" => (json!("llama"), "only Llama models are implemented"),
        "hidden_act" => (json!("silu"), "only the SiLU activation is implemented"),
        "attention_bias" => (json!(false), "attention projections have no bias here"),
        "mlp_bias" => (json!(false), "MLP projections have no bias here"),
        "rope_scaling" => (
            json!(null),
            "only unscaled rotary embeddings are implemented",
        ),
        "pretraining_tp" => (
            json!(1),
            "tensor-parallel pretraining slices are not implemented",
        ),
        "attention_dropout" => (json!(0.0), "attention dropout is not implemented"),
        _ => return None,
    };
    Some((value, why))
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`, refusing every field that would make the
    /// model differ from what Starling trains (rope scaling, another activation,
    /// biases, an unknown field…): ignored, a Llama 3 config would silently train a
    /// different model than the file describes.
    pub fn from_hf_json(text: &str) -> Result<Self, HfConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| HfConfigError::Malformed(e.to_string()))?;
        let config: ModelConfig = serde_json::from_value(value.clone())
            .map_err(|e| HfConfigError::Malformed(e.to_string()))?;
        let ours =
            serde_json::to_value(&config).map_err(|e| HfConfigError::Malformed(e.to_string()))?;
        let fields = value.as_object().into_iter().flatten();
        for (field, given) in fields {
            if ours.get(field).is_some() || IGNORED_FIELDS.contains(&field.as_str()) {
                continue;
            }
            let unsupported = |why| HfConfigError::Unsupported {
                field: field.clone(),
                value: given.to_string(),
                why,
            };
            match (field.as_str(), required_value(field)) {
                ("head_dim", _) if given.as_u64() == Some(config.head_dim() as u64) => {}
                ("head_dim", _) => {
                    return Err(unsupported(
                        "only hidden_size / num_attention_heads is implemented",
                    ));
                }
                (_, Some((wanted, _))) if numeric_eq(given, &wanted) => {}
                (_, Some((_, why))) => return Err(unsupported(why)),
                (_, None) => return Err(unsupported("Starling does not implement this field")),
            }
        }
        Ok(config)
    }
}

/// Equal as JSON, with `0` and `0.0` the same number.
fn numeric_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
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

impl std::fmt::Display for Preset {
    /// The preset's name as the CRD spells it: the serde name, so the two cannot differ.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(name.as_str().ok_or(std::fmt::Error)?)
    }
}

impl std::str::FromStr for Preset {
    type Err = String;

    /// The preset's name as the CRD spells it (`tiny`, `llama-125m`, ...).
    fn from_str(name: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(name.to_owned()))
            .map_err(|_| format!("unknown preset {name:?}: tiny, llama-125m, llama-1b or llama-8b"))
    }
}

impl Preset {
    /// The vocabulary benchmarks give it: bytes (256) for tiny, LLaMA's 32000 for the
    /// others.
    pub fn default_vocab(self) -> usize {
        match self {
            Preset::Tiny => 256,
            _ => 32_000,
        }
    }

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
    fn training_flops_count_six_per_matmul_weight_plus_attention() {
        // tiny at 128 tokens: per layer q,o 2·128² + k,v 2·128·64 + mlp 3·128·384 =
        // 196 608 weights; 4 layers plus the 256×128 head; attention 12·4·128·128.
        let flops = Preset::Tiny.config(256).train_flops_per_token(128);
        assert_eq!(flops, 6 * (4 * 196_608 + 256 * 128) + 12 * 4 * 128 * 128);
        // Without attention, it is 6 × the parameters minus norms and the embedding
        // lookup (tied here, so the head's weights are counted once, as the head).
        let c = Preset::Llama125M.config(32_000);
        let weights = c.parameter_count() - (2 * 12 + 1) * 768;
        assert_eq!(c.train_flops_per_token(0), 6 * weights);
    }

    #[test]
    fn presets_parse_from_their_crd_names() {
        assert_eq!("llama-1b".parse::<Preset>(), Ok(Preset::Llama1B));
        for p in [
            Preset::Tiny,
            Preset::Llama125M,
            Preset::Llama1B,
            Preset::Llama8B,
        ] {
            assert_eq!(p.to_string().parse::<Preset>(), Ok(p));
        }
        let refused = "llama-2b".parse::<Preset>().unwrap_err();
        assert!(
            refused.contains("llama-2b") && refused.contains("llama-125m"),
            "{refused}"
        );
    }

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
    fn a_config_json_is_read_only_when_it_describes_what_is_trained() {
        let written = Preset::Tiny.config(256).to_hf_json();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = written.clone();
            v[field] = value;
            ModelConfig::from_hf_json(&v.to_string())
        };
        assert_eq!(
            ModelConfig::from_hf_json(&written.to_string()),
            Ok(Preset::Tiny.config(256))
        );
        // What Llama 3 configs carry and changes nothing here.
        assert!(with("eos_token_id", serde_json::json!([128001, 128009])).is_ok());
        assert!(with("torch_dtype", "bfloat16".into()).is_ok());
        assert!(with("head_dim", 32.into()).is_ok());
        assert!(with("attention_dropout", 0.into()).is_ok());
        let refused = [
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 32.0}),
            ),
            ("hidden_act", "gelu".into()),
            ("attention_bias", true.into()),
            ("mlp_bias", true.into()),
            ("model_type", "mistral".into()),
            ("head_dim", 64.into()),
            ("sliding_window", 4096.into()),
        ];
        for (field, value) in refused {
            match with(field, value) {
                Err(HfConfigError::Unsupported { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let err = with("rope_scaling", serde_json::json!({"factor": 8.0})).unwrap_err();
        assert!(err.to_string().contains("rope_scaling"), "{err}");
        assert!(matches!(
            ModelConfig::from_hf_json("{\"hidden_size\": 4}"),
            Err(HfConfigError::Malformed(_))
        ));
    }

    #[test]
    fn the_tiny_fixture_is_the_tiny_preset() {
        let text = include_str!("../../tests/fixtures/tiny-config.json");
        let fixture: ModelConfig = serde_json::from_str(text).unwrap();
        assert_eq!(fixture, Preset::Tiny.config(256));
    }
}
