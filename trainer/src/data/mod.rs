//! Training data: text → tokens → on-disk shards → each peer's deterministic slice.
//!
//! * [`Tokenizer`]: the built-in byte tokenizer (256 tokens), or a Hugging Face
//!   `tokenizer.json`.
//! * [`Corpus`]: the text, split into training and held-out validation documents; the
//!   built-in Shakespeare corpus is embedded in the binary.
//! * [`Shards`]: the tokenised corpus, written to disk once and reopened afterwards.
//! * [`Assignment`]: which training windows a peer trains on in a round, a pure function
//!   of (run seed, peer, round) so evaluators can recompute it exactly.

mod assignment;
mod corpus;
mod shards;
mod tokenizer;

pub use assignment::{Assignment, Batch};
pub use corpus::Corpus;
pub use shards::Shards;
pub use tokenizer::{SpecialTokens, TOKENIZER_FILE, Tokenizer};

use std::path::PathBuf;

/// A token id.
pub type Token = u32;

/// FNV-1a of `bytes` as 16 hex digits: names content so mismatches are caught (the
/// run configuration, a tokenizer file). Not a security measure.
pub fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "tokenizer {0:?} is neither `bytes` nor a tokenizer.json file (or a directory with one)"
    )]
    UnsupportedTokenizer(String),
    #[error("tokenizer {path}: {message}")]
    BadTokenizer { path: PathBuf, message: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("corpus at {path} has no {what} documents")]
    Empty { path: PathBuf, what: &'static str },
    #[error("token shard {path} is corrupt: {reason}")]
    CorruptShard { path: PathBuf, reason: String },
    #[error("{what}: need at least {needed} tokens, the corpus has {available}")]
    TooSmall {
        what: &'static str,
        needed: u64,
        available: u64,
    },
}

impl DataError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DataError::Io { path, source }
    }
}
