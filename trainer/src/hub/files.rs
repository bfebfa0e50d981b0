//! What a published repo holds: the checkpoint's files, the weights split into shards
//! above a size, and a model card — each with the size, SHA-256 and first bytes the
//! Hub's upload protocol asks for.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::card::{self, CardContext};
use super::{HubError, RepoId};

/// The Hub's own default shard size (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

const WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Bytes of each file the Hub looks at to decide LFS or not.
const SAMPLE: usize = 512;

/// One file of the repo.
#[derive(Clone, Debug)]
pub struct RepoFile {
    /// Its path in the repo.
    pub path: String,
    source: Source,
    pub size: u64,
    /// Hex SHA-256: the LFS object id.
    pub sha256: String,
    /// Its first 512 bytes.
    sample: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Source {
    Memory(Bytes),
    File(PathBuf),
}

impl RepoFile {
    fn from_bytes(path: &str, bytes: Vec<u8>) -> Self {
        let sample = bytes[..bytes.len().min(SAMPLE)].to_vec();
        RepoFile {
            path: path.to_owned(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
            sample,
            source: Source::Memory(Bytes::from(bytes)),
        }
    }

    fn from_file(path: &str, file: &Path) -> Result<Self, HubError> {
        let mut reader = std::fs::File::open(file).map_err(HubError::io(file))?;
        let mut hasher = Sha256::new();
        let mut sample = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(HubError::io(file))?;
            if n == 0 {
                break;
            }
            if sample.len() < SAMPLE {
                sample.extend_from_slice(&buf[..n.min(SAMPLE - sample.len())]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(RepoFile {
            path: path.to_owned(),
            source: Source::File(file.to_owned()),
            size,
            sha256: hex(&hasher.finalize()),
            sample,
        })
    }

    pub(super) fn sample(&self) -> &[u8] {
        &self.sample
    }

    /// All of its bytes (for files small enough to commit inline).
    pub(super) async fn read_all(&self) -> Result<Bytes, HubError> {
        match &self.source {
            Source::Memory(bytes) => Ok(bytes.clone()),
            Source::File(file) => tokio::fs::read(file)
                .await
                .map(Bytes::from)
                .map_err(HubError::io(file)),
        }
    }

    /// Bytes `start..start + len` as a request body, streamed from disk; `sent` hears the
    /// position reached in the file as the body is read.
    pub(super) fn body(
        &self,
        start: u64,
        len: u64,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> reqwest::Body {
        match &self.source {
            Source::Memory(bytes) => {
                let end = (start + len).min(bytes.len() as u64) as usize;
                sent(end as u64);
                reqwest::Body::from(bytes.slice(start as usize..end))
            }
            Source::File(file) => {
                let state = (file.clone(), None::<tokio::fs::File>, start, len);
                let sent = std::sync::Arc::new(sent);
                let stream = futures::stream::try_unfold(state, move |(file, open, pos, left)| {
                    let sent = sent.clone();
                    async move { read_chunk(file, open, pos, left, &*sent).await }
                });
                reqwest::Body::wrap_stream(stream)
            }
        }
    }
}

type ChunkState = (PathBuf, Option<tokio::fs::File>, u64, u64);

/// The next chunk of a file body, opening the file at `pos` on first use.
async fn read_chunk(
    file: PathBuf,
    open: Option<tokio::fs::File>,
    pos: u64,
    left: u64,
    sent: &(impl Fn(u64) + Send + Sync),
) -> std::io::Result<Option<(Bytes, ChunkState)>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    if left == 0 {
        return Ok(None);
    }
    let mut reader = match open {
        Some(f) => f,
        None => {
            let mut f = tokio::fs::File::open(&file).await?;
            f.seek(std::io::SeekFrom::Start(pos)).await?;
            f
        }
    };
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    reader.read_exact(&mut buf).await?;
    let n = buf.len() as u64;
    sent(pos + n);
    Ok(Some((
        Bytes::from(buf),
        (file, Some(reader), pos + n, left - n),
    )))
}

/// Everything one checkpoint publishes, and the staging directory its shards live in.
#[derive(Debug)]
pub struct RepoFiles {
    pub files: Vec<RepoFile>,
    /// The checkpoint's `starling.json` (`Null` if it has none).
    pub meta: serde_json::Value,
    _staging: Option<Staging>,
}

/// A directory removed when the files in it are no longer needed.
#[derive(Debug)]
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RepoFiles {
    /// The checkpoint in `dir` as a repo: its files, `model.safetensors` split into
    /// `model-0000i-of-0000n.safetensors` shards with an index when larger than
    /// `max_shard_bytes`, and a `README.md` model card.
    pub fn from_checkpoint(
        dir: &Path,
        repo: &RepoId,
        max_shard_bytes: u64,
        card: &CardContext,
    ) -> Result<Self, HubError> {
        let not_checkpoint = |message: String| HubError::NotACheckpoint {
            path: dir.to_owned(),
            message,
        };
        let read_json = |name: &str| -> Result<serde_json::Value, HubError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| not_checkpoint(format!("{name}: {e}"))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
                Err(e) => Err(HubError::io(&path)(e)),
            }
        };
        let config = read_json("config.json")?;
        if config.is_null() || !dir.join(WEIGHTS).is_file() {
            return Err(not_checkpoint(format!("needs config.json and {WEIGHTS}")));
        }
        let meta = read_json("starling.json")?;
        let mut files = Vec::new();
        let mut staging = None;
        for entry in std::fs::read_dir(dir).map_err(HubError::io(dir))? {
            let entry = entry.map_err(HubError::io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "README.md" || !entry.path().is_file() {
                continue;
            }
            let weights = entry.path();
            let size = entry.metadata().map_err(HubError::io(&weights))?.len();
            if name == WEIGHTS && size > max_shard_bytes {
                let stage = staging_dir(dir)?;
                files.extend(shard(&weights, max_shard_bytes, &stage.0)?);
                staging = Some(stage);
            } else {
                files.push(RepoFile::from_file(&name, &weights)?);
            }
        }
        let card = card::with_ledger_ratings(card, dir, &meta);
        let readme = card::model_card(repo, &config, &meta, &card);
        files.push(RepoFile::from_bytes("README.md", readme.into_bytes()));
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(RepoFiles {
            files,
            meta,
            _staging: staging,
        })
    }

    /// The hash of the weights, whole or sharded: names this checkpoint's content.
    pub fn weights_sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for f in &self.files {
            if f.path.ends_with(".safetensors") {
                hasher.update(f.sha256.as_bytes());
            }
        }
        hex(&hasher.finalize())
    }
}

fn staging_dir(checkpoint: &Path) -> Result<Staging, HubError> {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "starling-publish-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(HubError::io(&dir))?;
    Ok(Staging(dir))
}

/// Splits a safetensors file into shards of at most `max_bytes` of tensor data (a
/// larger tensor gets a shard of its own), in name order, as transformers writes them,
/// plus `model.safetensors.index.json`.
fn shard(weights: &Path, max_bytes: u64, out: &Path) -> Result<Vec<RepoFile>, HubError> {
    let bad = |e: safetensors::SafeTensorError| HubError::NotACheckpoint {
        path: weights.to_owned(),
        message: e.to_string(),
    };
    let bytes = std::fs::read(weights).map_err(HubError::io(weights))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut groups: Vec<Vec<String>> = vec![];
    let mut filled = u64::MAX;
    let mut total = 0u64;
    for name in names {
        let size = tensors.tensor(&name).map_err(bad)?.data().len() as u64;
        total += size;
        if filled.saturating_add(size) > max_bytes {
            groups.push(vec![]);
            filled = 0;
        }
        filled += size;
        if let Some(group) = groups.last_mut() {
            group.push(name);
        }
    }
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let views = group
            .iter()
            .map(|name| Ok((name.clone(), tensors.tensor(name).map_err(bad)?)))
            .collect::<Result<Vec<_>, HubError>>()?;
        let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let path = out.join(&file);
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(bad)?;
        files.push(RepoFile::from_file(&file, &path)?);
        for name in group {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index = serde_json::to_vec_pretty(&index).map_err(|e| HubError::NotACheckpoint {
        path: weights.to_owned(),
        message: e.to_string(),
    })?;
    files.push(RepoFile::from_bytes(INDEX, index));
    Ok(files)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
