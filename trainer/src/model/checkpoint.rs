//! Checkpoints in the Hugging Face layout, written atomically: a reader sees the old
//! checkpoint or the new one, never half of one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Llama, ModelConfig, ModelError};
use crate::data::{SpecialTokens, Tokenizer};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `model.safetensors`, `config.json`, `generation_config.json`,
/// `starling.json` (`meta`: run, round, tokens, loss, codec) and the tokenizer's files
/// into `dir`, replacing any checkpoint already there only once the new one is complete.
pub fn save_checkpoint(
    dir: &Path,
    model: &Llama,
    meta: &serde_json::Value,
    tokenizer: &Tokenizer,
) -> Result<(), ModelError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let tensors: HashMap<String, Tensor> = model
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    // `format: pt` says the tensors are laid out as PyTorch reads them; transformers
    // 4.47 and older refuse a file without it.
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let weights = tmp.join("model.safetensors");
    safetensors::serialize_to_file(&tensors, Some(metadata), &weights).map_err(|e| {
        ModelError::BadFile {
            path: weights.clone(),
            message: e.to_string(),
        }
    })?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
    let special = tokenizer.special_tokens();
    let mut config = model.config().to_hf_json();
    config["bos_token_id"] = serde_json::json!(special.bos);
    config["eos_token_id"] = serde_json::json!(special.eos);
    let json_files = [
        ("config.json", json(&config)),
        ("generation_config.json", json(&generation_config(special))),
        ("starling.json", json(meta)),
    ];
    let all = json_files
        .iter()
        .map(|(f, b)| (*f, b.as_slice()))
        .chain(tokenizer.files());
    for (file, bytes) in all {
        let path = tmp.join(file);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    Ok(())
}

/// How `generate()` samples by default: as `starling-trainer sample` does (temperature
/// 0.8), from and to the tokenizer's special tokens.
fn generation_config(special: SpecialTokens) -> serde_json::Value {
    serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "do_sample": true,
        "temperature": 0.8,
        "top_k": 0,
    })
}

/// Loads a checkpoint written by [`save_checkpoint`] (or any `LlamaForCausalLM`
/// checkpoint in float32 with the same parameter names), with its `starling.json` if any.
pub fn load_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(Llama, serde_json::Value), ModelError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let config = ModelConfig::from_hf_json(&text).map_err(|e| ModelError::BadFile {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        return Err(ModelError::Io {
            path: weights,
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let tensors =
        candle_core::safetensors::load(&weights, device).map_err(|e| ModelError::BadFile {
            path: weights.clone(),
            message: e.to_string(),
        })?;
    let meta_path = dir.join("starling.json");
    let meta = match std::fs::read_to_string(&meta_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: meta_path,
            message: e.to_string(),
        })?,
        Err(_) => serde_json::Value::Null,
    };
    Ok((Llama::from_tensors(config, tensors, device)?, meta))
}
