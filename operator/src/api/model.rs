use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use starling_trainer::model::{self, ModelConfig};

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
    model::DEFAULT_ROPE_THETA
}

fn default_rms_norm_eps() -> f64 {
    model::DEFAULT_RMS_NORM_EPS
}

impl LlamaConfig {
    /// The trainer's model config: the one type that validates, counts and is written
    /// as `config.json`. This spelling exists only for the Kubernetes API's camelCase.
    pub fn to_model(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size as usize,
            hidden_size: self.hidden_size as usize,
            intermediate_size: self.intermediate_size as usize,
            num_hidden_layers: self.num_hidden_layers as usize,
            num_attention_heads: self.num_attention_heads as usize,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads)
                as usize,
            max_position_embeddings: self.max_position_embeddings as usize,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    /// The API's name of a `config.json` field (`num_attention_heads` →
    /// `numAttentionHeads`), for pointing at the field to fix.
    pub fn field_name(hf: &str) -> String {
        let mut out = String::new();
        let mut upper = false;
        for c in hf.chars() {
            match c {
                '_' => upper = true,
                c if upper => {
                    out.extend(c.to_uppercase());
                    upper = false;
                }
                c => out.push(c),
            }
        }
        out
    }
}

/// Named architectures; the vocabulary comes from the run's tokenizer.
pub use starling_trainer::model::Preset as ModelPreset;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_spelling_maps_field_for_field_onto_the_trainers_config() {
        let api: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocabSize": 256, "hiddenSize": 128, "intermediateSize": 384,
            "numHiddenLayers": 4, "numAttentionHeads": 4, "numKeyValueHeads": 2,
            "maxPositionEmbeddings": 512, "tieWordEmbeddings": true
        }))
        .unwrap();
        // Defaults are the trainer's, and the result is the tiny preset exactly.
        assert_eq!(api.to_model(), ModelPreset::Tiny.config(256));
        // Every trainer field has its API name.
        let trainer = serde_json::to_value(api.to_model()).unwrap();
        let ours = serde_json::to_value(&api).unwrap();
        for field in trainer.as_object().unwrap().keys() {
            let name = LlamaConfig::field_name(field);
            assert!(ours.get(&name).is_some(), "{field} has no API field {name}");
        }
    }
}
