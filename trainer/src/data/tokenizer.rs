use super::{DataError, Token};

/// Turns text into tokens and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// One token per UTF-8 byte: no vocabulary file, works on any text.
    Bytes,
}

impl Tokenizer {
    /// From a TrainingRun's `data.tokenizer` (`bytes`, or a Hub repo id).
    pub fn from_spec(spec: &str) -> Result<Self, DataError> {
        match spec {
            "bytes" => Ok(Tokenizer::Bytes),
            other => Err(DataError::UnsupportedTokenizer(other.to_owned())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
        }
    }

    pub fn vocab_size(&self) -> u32 {
        match self {
            Tokenizer::Bytes => 256,
        }
    }

    pub fn encode(&self, text: &str) -> Vec<Token> {
        match self {
            Tokenizer::Bytes => text.bytes().map(Token::from).collect(),
        }
    }

    /// Decodes tokens to text, replacing invalid sequences (a model can emit any bytes).
    pub fn decode(&self, tokens: &[Token]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
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
        assert_eq!(tokens.len(), text.len());
        assert!(tokens.iter().all(|&x| x < t.vocab_size()));
        assert_eq!(t.decode(&tokens), text);
        assert_eq!(t.decode(&[0xe2, 0x80]), "\u{fffd}");
    }

    #[test]
    fn hub_tokenizers_are_refused_by_name() {
        let err = Tokenizer::from_spec("meta-llama/Llama-3.2-1B").unwrap_err();
        assert!(err.to_string().contains("meta-llama/Llama-3.2-1B"), "{err}");
    }
}
