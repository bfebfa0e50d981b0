//! Publishing checkpoints to the Hugging Face Hub over its HTTP API and Git LFS.
//!
//! No Rust crate uploads large files to the Hub except through Xet, so this speaks the
//! Hub's plain protocol, which it still accepts (and migrates to Xet itself): create the
//! repo, ask which files go through LFS (`preupload`), upload those to the storage URLs
//! the LFS batch API hands out (whole, or in parts), then make one commit whose NDJSON
//! body names every file. [`publish`] turns a checkpoint directory into exactly one
//! commit and a tag, and finds its own earlier commit instead of making a second.

mod api;
mod card;
mod cli;
mod exchange;
mod files;
mod http;
mod publish;

pub use api::{CommitInfo, Committed, UploadMode};
pub use card::CardContext;
pub use cli::PublishArgs;
pub use exchange::ExchangeCheckpoint;
pub use files::{DEFAULT_MAX_SHARD_BYTES, RepoFile, RepoFiles};
pub use http::{DEFAULT_ENDPOINT, Hub, Retry};
pub use publish::{Progress, ProgressLine, PublishOptions, Published, Quiet, publish};

use std::path::PathBuf;

/// A model repository's id, `namespace/name`, as the Hub accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoId {
    namespace: String,
    name: String,
}

impl RepoId {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for RepoId {
    type Err = HubError;

    /// The Hub's rules: letters, digits, `-`, `_`, `.`; at most 96 characters a part;
    /// no `--` or `..`; not starting or ending with `-` or `.`.
    fn from_str(s: &str) -> Result<Self, HubError> {
        let bad = || HubError::BadRepoId(s.to_owned());
        let (namespace, name) = s.split_once('/').ok_or_else(bad)?;
        let valid = |part: &str| {
            (1..=96).contains(&part.len())
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !part.contains("--")
                && !part.contains("..")
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
        };
        if !valid(namespace) || !valid(name) || name.ends_with(".git") {
            return Err(bad());
        }
        Ok(RepoId {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// Why publishing failed. [`HubError::Status`] carries the Hub's own message.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{0}` is not a Hub repository id: expected `namespace/name` (letters, digits, `-`, `_`, `.`)"
    )]
    BadRepoId(String),
    #[error("`{0}` is not a Hub endpoint: expected an http:// or https:// URL")]
    BadEndpoint(String),
    #[error("{what}: the Hub answered {status}: {message}")]
    Status {
        what: String,
        status: u16,
        /// `X-Error-Code`, e.g. `RepoNotFound`.
        code: Option<String>,
        message: String,
        /// How many times the request was sent.
        tries: u32,
    },
    #[error("{what}: cannot reach the Hub: {message}")]
    Transport { what: String, message: String },
    #[error("{what}: the Hub's answer is not what its API returns: {message}")]
    Malformed { what: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a checkpoint: {message}")]
    NotACheckpoint { path: PathBuf, message: String },
    #[error(
        "{repo}: gave up after {tries} commits were refused because another writer committed first"
    )]
    Contended { repo: RepoId, tries: u32 },
}

impl HubError {
    /// The HTTP status the Hub answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            HubError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
        move |source| HubError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_the_hubs_rules() {
        let id: RepoId = "starling-dev/shakespeare-tiny".parse().unwrap();
        assert_eq!(id.namespace(), "starling-dev");
        assert_eq!(id.name(), "shakespeare-tiny");
        assert_eq!(id.to_string(), "starling-dev/shakespeare-tiny");
        for bad in [
            "noslash",
            "a/b/c",
            "/name",
            "org/",
            "org/na me",
            "org/-x",
            "org/x..y",
            "org/x--y",
            "org/model.git",
            &format!("org/{}", "x".repeat(97)),
        ] {
            let err = bad.parse::<RepoId>().unwrap_err();
            assert!(err.to_string().contains("namespace/name"), "{bad}: {err}");
        }
    }
}
