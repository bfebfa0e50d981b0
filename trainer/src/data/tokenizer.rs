use std::path::{Path, PathBuf};

use super::{DataError, Token};

/// Turns text into tokens and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per UTF-8 byte: no vocabulary file, works on any text.
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    HuggingFace {
        /// `tokenizer.json:<hash of the file>`: names this exact vocabulary.
        name: String,
        json: Vec<u8>,
        inner: Box<tokenizers::Tokenizer>,
    },
}

/// The file name a Hugging Face tokenizer has in a checkpoint.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// What `AutoTokenizer` reads first: which class loads `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// `tokenizer_config.json` for either tokenizer: the fast tokenizer over `tokenizer.json`.
const TOKENIZER_CONFIG: &str = r#"{
  "tokenizer_class": "PreTrainedTokenizerFast",
  "clean_up_tokenization_spaces": false
}
"#;

/// The byte tokenizer as Hugging Face tools load it: byte-level BPE with the 256 bytes
/// as its vocabulary (byte `b` is token `b`) and no merges, so `AutoTokenizer` and
/// `pipeline("text-generation")` read a byte-level checkpoint as Starling trained it.
static BYTES_TOKENIZER_JSON: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), serde_json::json!(b)))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": false, "use_regex": false});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    serde_json::to_vec_pretty(&json).unwrap_or_default()
});

/// The printable character byte-level BPE writes byte `b` as (GPT-2's mapping: printable
/// Latin-1 stands for itself, every other byte for a character from U+0100 on, in order).
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Where generation starts and stops, in token ids (`None`: no such token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<Token>,
    pub eos: Option<Token>,
}

/// Beginning-of-text tokens of the LLaMA 1/2, LLaMA 3, GPT-2 and Gemma families.
const BOS_NAMES: [&str; 4] = ["<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>"];
/// End-of-text tokens of the same families.
const EOS_NAMES: [&str; 4] = ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"];

impl Tokenizer {
    /// From a TrainingRun's `data.tokenizer`: `bytes`, or the path of a `tokenizer.json`
    /// (or of a directory holding one, such as a checkpoint).
    pub fn from_spec(spec: &str) -> Result<Self, DataError> {
        if spec == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        let path = Path::new(spec);
        let file = if path.is_dir() {
            path.join(TOKENIZER_FILE)
        } else {
            path.to_owned()
        };
        if !file.is_file() {
            return Err(DataError::UnsupportedTokenizer(spec.to_owned()));
        }
        let json = std::fs::read(&file).map_err(DataError::io(&file))?;
        Self::from_json(json, &file)
    }

    /// The tokenizer a checkpoint was trained with: its `tokenizer.json` if it has one,
    /// else bytes.
    pub fn of_checkpoint(dir: &Path) -> Result<Self, DataError> {
        let file = dir.join(TOKENIZER_FILE);
        if file.is_file() {
            Self::from_spec(&file.to_string_lossy())
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    fn from_json(json: Vec<u8>, file: &Path) -> Result<Self, DataError> {
        // The byte tokenizer's own file (a checkpoint of a byte-level run) is bytes, so
        // that a run initialised from one keeps the same vocabulary name.
        if json == *BYTES_TOKENIZER_JSON {
            return Ok(Tokenizer::Bytes);
        }
        let inner =
            tokenizers::Tokenizer::from_bytes(&json).map_err(|e| DataError::BadTokenizer {
                path: PathBuf::from(file),
                message: e.to_string(),
            })?;
        Ok(Tokenizer::HuggingFace {
            name: format!("{TOKENIZER_FILE}:{}", super::fingerprint(&json)),
            json,
            inner: Box::new(inner),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::HuggingFace { name, .. } => name,
        }
    }

    pub fn vocab_size(&self) -> u32 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::HuggingFace { inner, .. } => inner.get_vocab_size(true) as u32,
        }
    }

    /// The tokens generation starts and stops at, as `config.json` and
    /// `generation_config.json` name them.
    ///
    /// The byte vocabulary has no special tokens: generation starts from a newline (how
    /// every speech in the corpus begins) and stops only at its length limit. Without
    /// these ids Hugging Face tools assume 1 and 2, two control bytes.
    /// A `tokenizer.json` gives its own, found by the names the common families use.
    pub fn special_tokens(&self) -> SpecialTokens {
        match self {
            Tokenizer::Bytes => SpecialTokens {
                bos: Some(u32::from(b'\n')),
                eos: None,
            },
            Tokenizer::HuggingFace { inner, .. } => {
                let first = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
                SpecialTokens {
                    bos: first(&BOS_NAMES),
                    eos: first(&EOS_NAMES),
                }
            }
        }
    }

    /// Files a checkpoint carries for this tokenizer, as Hugging Face tools load them.
    pub fn files(&self) -> Vec<(&'static str, &[u8])> {
        let json = match self {
            Tokenizer::Bytes => BYTES_TOKENIZER_JSON.as_slice(),
            Tokenizer::HuggingFace { json, .. } => json.as_slice(),
        };
        vec![
            (TOKENIZER_FILE, json),
            (TOKENIZER_CONFIG_FILE, TOKENIZER_CONFIG.as_bytes()),
        ]
    }

    pub fn encode(&self, text: &str) -> Result<Vec<Token>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(Token::from).collect()),
            Tokenizer::HuggingFace { inner, name, .. } => inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::BadTokenizer {
                    path: PathBuf::from(name),
                    message: e.to_string(),
                }),
        }
    }

    /// Decodes tokens to text, replacing invalid sequences (a model can emit any bytes).
    pub fn decode(&self, tokens: &[Token]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::HuggingFace { inner, .. } => inner.decode(tokens, true).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_any_text() {
        let t = Tokenizer::from_spec("bytes").unwrap();
        let text = "To be, or not to be — «that» is the question.";
        let tokens = t.encode(text);
        let tokens = tokens.unwrap();
        assert_eq!(tokens.len(), text.len());
        assert!(tokens.iter().all(|&x| x < t.vocab_size()));
        assert_eq!(t.decode(&tokens), text);
        assert_eq!(t.decode(&[0xe2, 0x80]), "\u{fffd}");
    }

    #[test]
    fn the_byte_tokenizer_written_for_hugging_face_tools_is_the_byte_tokenizer() {
        let (name, json) = Tokenizer::Bytes.files()[0];
        assert_eq!(name, TOKENIZER_FILE);
        let hf = tokenizers::Tokenizer::from_bytes(json).unwrap();
        assert_eq!(hf.get_vocab_size(true), 256);
        let text = "To be, or not to be — «that» is\n\tthe question.\u{0}\u{7f}";
        let ids = hf.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, Tokenizer::Bytes.encode(text).unwrap());
        let every_byte: Vec<u32> = (0..=255).collect();
        let chars: std::collections::BTreeSet<char> = (0..=255).map(byte_level_char).collect();
        assert_eq!(chars.len(), 256, "each byte its own character");
        assert_eq!(hf.decode(&ids, false).unwrap(), text);
        assert_eq!(hf.decode(&every_byte[..128], false).unwrap().len(), 128);
        // A checkpoint carrying it reads back as bytes: the vocabulary keeps its name.
        let dir = tempfile::tempdir().unwrap();
        for (file, bytes) in Tokenizer::Bytes.files() {
            std::fs::write(dir.path().join(file), bytes).unwrap();
        }
        assert_eq!(
            Tokenizer::of_checkpoint(dir.path()).unwrap().name(),
            "bytes"
        );
    }

    #[test]
    fn special_tokens_come_from_the_vocabulary_or_start_bytes_at_a_newline() {
        let bytes = Tokenizer::Bytes.special_tokens();
        assert_eq!(
            bytes,
            SpecialTokens {
                bos: Some(10),
                eos: None
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let with_eos = WORDS.replace(r#""not":4"#, r#""not":4,"</s>":5"#);
        std::fs::write(dir.path().join(TOKENIZER_FILE), with_eos).unwrap();
        let t = Tokenizer::from_spec(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(
            t.special_tokens(),
            SpecialTokens {
                bos: None,
                eos: Some(5)
            }
        );
    }

    #[test]
    fn hub_repo_ids_are_refused_by_name() {
        let err = Tokenizer::from_spec("meta-llama/Llama-3.2-1B").unwrap_err();
        assert!(err.to_string().contains("meta-llama/Llama-3.2-1B"), "{err}");
    }

    /// A word-level vocabulary in the `tokenizer.json` format.
    const WORDS: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","unk_token":"[UNK]",
        "vocab":{"[UNK]":0,"to":1,"be":2,"or":3,"not":4}}}"#;

    #[test]
    fn hugging_face_tokenizer_json_loads_from_a_file_or_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), WORDS).unwrap();
        let from_dir = Tokenizer::from_spec(dir.path().to_str().unwrap()).unwrap();
        let file = dir.path().join(TOKENIZER_FILE);
        let t = Tokenizer::from_spec(file.to_str().unwrap()).unwrap();
        assert_eq!(t.name(), from_dir.name());
        assert!(t.name().starts_with("tokenizer.json:"), "{}", t.name());
        assert_eq!(t.vocab_size(), 5);
        let ids = t.encode("to be or not to be").unwrap();
        assert_eq!(ids, [1, 2, 3, 4, 1, 2]);
        assert_eq!(t.decode(&ids), "to be or not to be");
        assert_eq!(t.encode("to sleep").unwrap(), [1, 0]);
        assert_eq!(t.files()[0].1, WORDS.as_bytes());
        assert_eq!(
            Tokenizer::of_checkpoint(dir.path()).unwrap().name(),
            t.name()
        );

        std::fs::write(&file, "{not json").unwrap();
        let err = Tokenizer::from_spec(file.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
