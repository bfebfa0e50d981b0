//! The tokenised corpus on disk, written once per (corpus, tokenizer).
//!
//! `<dir>/train.tokens` and `<dir>/validation.tokens`: magic `STOK`, version `1: u16`,
//! bytes per token `1 | 2 | 4: u16`, token count `u64`, the tokens (little-endian), and a
//! CRC-32 of everything before it. `<dir>/shards.json` names the tokenizer and the corpus
//! fingerprint; shards whose fingerprint differs are rebuilt, never reused.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Corpus, DataError, Token, Tokenizer};

const MAGIC: &[u8; 4] = b"STOK";

/// Tokens for training and validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shards {
    pub train: Vec<Token>,
    pub validation: Vec<Token>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct Meta {
    tokenizer: String,
    corpus: String,
}

impl Shards {
    /// Tokenises `corpus` into `dir`, or reopens what an earlier call wrote there for the
    /// same corpus and tokenizer. Returns the shards and whether they were reused.
    pub fn build_or_open(
        dir: &Path,
        corpus: &Corpus,
        tokenizer: &Tokenizer,
    ) -> Result<(Self, bool), DataError> {
        let meta = Meta {
            tokenizer: tokenizer.name().to_owned(),
            corpus: corpus.fingerprint(),
        };
        let meta_path = dir.join("shards.json");
        let existing = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
        if existing.as_ref() == Some(&meta) {
            let shards = Self {
                train: read(&dir.join("train.tokens"))?,
                validation: read(&dir.join("validation.tokens"))?,
            };
            return Ok((shards, true));
        }
        let shards = Self {
            train: tokenizer.encode(&corpus.train)?,
            validation: tokenizer.encode(&corpus.validation)?,
        };
        std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
        let width = token_width(tokenizer.vocab_size());
        write_atomic(&dir.join("train.tokens"), &encode(&shards.train, width))?;
        write_atomic(
            &dir.join("validation.tokens"),
            &encode(&shards.validation, width),
        )?;
        // Written last: a crash before this leaves shards that the next call rebuilds.
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        write_atomic(&meta_path, &json)?;
        Ok((shards, false))
    }
}

fn token_width(vocab: u32) -> u16 {
    match vocab {
        0..=0x100 => 1,
        0x101..=0x1_0000 => 2,
        _ => 4,
    }
}

fn encode(tokens: &[Token], width: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + tokens.len() * usize::from(width) + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        out.extend_from_slice(&t.to_le_bytes()[..usize::from(width)]);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn read(path: &Path) -> Result<Vec<Token>, DataError> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    let corrupt = |reason: &str| DataError::CorruptShard {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 20 || &bytes[..4] != MAGIC {
        return Err(corrupt("not a token shard"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch"));
    }
    if u16::from_le_bytes([body[4], body[5]]) != 1 {
        return Err(corrupt("unknown version"));
    }
    let width = usize::from(u16::from_le_bytes([body[6], body[7]]));
    if ![1, 2, 4].contains(&width) {
        return Err(corrupt("bad token width"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let data = &body[16..];
    if Some(data.len() as u64) != count.checked_mul(width as u64) {
        return Err(corrupt("length disagrees with the token count"));
    }
    Ok(data
        .chunks_exact(width)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..width].copy_from_slice(c);
            Token::from_le_bytes(b)
        })
        .collect())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(DataError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_built_once_and_reused_for_the_same_corpus() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = Corpus {
            train: "to be or not to be".into(),
            validation: "that is the question".into(),
        };
        let (built, reused) =
            Shards::build_or_open(dir.path(), &corpus, &Tokenizer::Bytes).unwrap();
        assert!(!reused);
        assert_eq!(built.train, Tokenizer::Bytes.encode(&corpus.train).unwrap());
        let (again, reused) =
            Shards::build_or_open(dir.path(), &corpus, &Tokenizer::Bytes).unwrap();
        assert!(reused);
        assert_eq!(again, built);
        // One byte per token on disk for a 256-token vocabulary.
        let len = std::fs::metadata(dir.path().join("train.tokens"))
            .unwrap()
            .len();
        assert_eq!(len, 16 + 18 + 4);

        let other = Corpus {
            train: "something else".into(),
            ..corpus.clone()
        };
        let (rebuilt, reused) =
            Shards::build_or_open(dir.path(), &other, &Tokenizer::Bytes).unwrap();
        assert!(!reused);
        assert_eq!(rebuilt.train.len(), "something else".len());
    }

    #[test]
    fn corrupt_shards_are_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = Corpus {
            train: "abcdef".into(),
            validation: "ghi".into(),
        };
        Shards::build_or_open(dir.path(), &corpus, &Tokenizer::Bytes).unwrap();
        let path = dir.path().join("train.tokens");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[17] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Shards::build_or_open(dir.path(), &corpus, &Tokenizer::Bytes).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        std::fs::write(&path, b"short").unwrap();
        let err = Shards::build_or_open(dir.path(), &corpus, &Tokenizer::Bytes).unwrap_err();
        assert!(err.to_string().contains("not a token shard"), "{err}");
    }

    #[test]
    fn wide_vocabularies_round_trip() {
        for vocab in [256u32, 50_000, 128_256] {
            let tokens: Vec<Token> = (0..1000).map(|i| (i * 7919) % vocab).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.tokens");
            std::fs::write(&path, encode(&tokens, token_width(vocab))).unwrap();
            assert_eq!(read(&path).unwrap(), tokens);
        }
    }
}
