//! One checkpoint → exactly one commit and one tag, whatever fails along the way.
//!
//! Every commit carries a `Starling-Checkpoint: <hash of the weights>` trailer. Before
//! each try the publisher looks for a commit with its trailer among the branch's latest,
//! so a publisher that crashed (or lost the answer) after its commit landed finds it and
//! only tags it, and publishing the same checkpoint twice makes no second commit. A
//! commit refused with 412 (another writer moved the branch) is retried on the new head.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::api::UploadMode;
use super::{CardContext, Hub, HubError, RepoFiles, RepoId};

/// How a checkpoint is published.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub repo: RepoId,
    /// The branch committed to.
    pub revision: String,
    /// Whether a repo that does not exist yet is created private.
    pub private: bool,
    /// Tag each checkpoint's commit `round-N`.
    pub tag: bool,
    pub max_shard_bytes: u64,
    pub card: CardContext,
}

impl PublishOptions {
    /// `main`, tagged, public, 5 GB shards.
    pub fn new(repo: RepoId) -> Self {
        PublishOptions {
            repo,
            revision: "main".to_owned(),
            private: false,
            tag: true,
            max_shard_bytes: super::DEFAULT_MAX_SHARD_BYTES,
            card: CardContext::default(),
        }
    }
}

/// A published checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    pub repo: String,
    /// The tag when there is one, else the branch.
    pub revision: String,
    pub commit: String,
    /// Where a browser shows this revision.
    pub url: String,
    /// Whether this call found the commit made already rather than making it.
    pub already: bool,
}

/// What a publisher reports while it works.
pub trait Progress: Send + Sync {
    /// A step begins: `creating the repo`, `uploading 3 files`, ….
    fn step(&self, _what: &str) {}
    /// `sent` of `size` bytes of `path` are uploaded.
    fn sent(&self, _path: &str, _sent: u64, _size: u64) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// Reports on standard error: each step, and each large file's upload as a bar redrawn
/// in place on a terminal, or a line every 10% elsewhere (a pod's log).
#[derive(Default)]
pub struct ProgressLine {
    /// The file being uploaded and the last tenth reported.
    last: std::sync::Mutex<(String, u64)>,
}

impl Progress for ProgressLine {
    fn step(&self, what: &str) {
        eprintln!("{what}");
    }

    fn sent(&self, path: &str, sent: u64, size: u64) {
        use std::io::{IsTerminal, Write};
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let tenth = (sent * 10).checked_div(size).unwrap_or(10);
        let terminal = std::io::stderr().is_terminal();
        if last.0 == path && last.1 == tenth && !terminal {
            return;
        }
        *last = (path.to_owned(), tenth);
        let percent = (sent * 100).checked_div(size).unwrap_or(100);
        let bar = format!("{:<20}", "#".repeat((percent / 5) as usize));
        let mb = |b: u64| b as f64 / 1e6;
        let line = format!(
            "{path} [{bar}] {percent:>3}% {:.1}/{:.1} MB",
            mb(sent),
            mb(size)
        );
        let mut err = std::io::stderr();
        if terminal {
            let end = if sent >= size { "\n" } else { "" };
            let _ = write!(err, "\r{line}{end}");
            let _ = err.flush();
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Commits refused for a moved branch (412) or failed in transit before giving up.
const COMMIT_TRIES: u32 = 6;

/// Publishes the checkpoint in `dir` as one commit on `opts.revision` (tagged
/// `round-N` when `opts.tag`); a second call for the same checkpoint finds the first
/// commit and makes none.
pub async fn publish(
    hub: &Hub,
    dir: &Path,
    opts: &PublishOptions,
    progress: Arc<dyn Progress>,
) -> Result<Published, HubError> {
    let repo = &opts.repo;
    let files = RepoFiles::from_checkpoint(dir, repo, opts.max_shard_bytes, &opts.card)?;
    let message = CommitMessage::of(&files);
    progress.step("creating the repo");
    hub.create_repo(repo, opts.private).await?;
    let mut modes = None;
    let mut wait = Duration::from_millis(500);
    for _ in 0..COMMIT_TRIES {
        if let Some(commit) = find_commit(hub, repo, &opts.revision, &message.trailer).await? {
            return finish(hub, opts, &message, commit, true).await;
        }
        let parent = hub.head(repo, &opts.revision).await?;
        let modes = match &modes {
            Some(m) => m,
            None => modes.insert(upload(hub, opts, &files, progress.clone()).await?),
        };
        progress.step("committing");
        let listed: Vec<_> = files
            .files
            .iter()
            .filter_map(|f| Some((f, *modes.get(&f.path)?)))
            .collect();
        let summary = (message.summary.as_str(), message.description.as_str());
        match hub
            .commit(repo, &opts.revision, &parent, summary, &listed)
            .await
        {
            Ok(done) => return finish(hub, opts, &message, done.commit_oid, false).await,
            // Another writer moved the branch: try again on the new head.
            Err(HubError::Status { status: 412, .. }) => {}
            // Lost in transit or refused for now: it may have landed, which the next
            // try looks for before committing again.
            Err(e) if transient(&e) => {
                tracing::warn!(error = %e, "commit failed; checking whether it landed");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    Err(HubError::Contended {
        repo: repo.clone(),
        tries: COMMIT_TRIES,
    })
}

fn transient(e: &HubError) -> bool {
    matches!(e, HubError::Transport { .. })
        || matches!(e.status(), Some(408 | 429 | 500 | 502 | 503 | 504))
}

/// Asks the Hub how each file goes, and uploads the LFS ones.
async fn upload(
    hub: &Hub,
    opts: &PublishOptions,
    files: &RepoFiles,
    progress: Arc<dyn Progress>,
) -> Result<std::collections::HashMap<String, UploadMode>, HubError> {
    progress.step("asking the Hub how to upload each file");
    let modes = hub
        .preupload(&opts.repo, &opts.revision, &files.files)
        .await?;
    let lfs: Vec<_> = files
        .files
        .iter()
        .filter(|f| modes.get(&f.path) == Some(&UploadMode::Lfs))
        .collect();
    let bytes: u64 = lfs.iter().map(|f| f.size).sum();
    progress.step(&format!(
        "uploading {} large files, {bytes} bytes",
        lfs.len()
    ));
    hub.upload_lfs(&opts.repo, &opts.revision, &lfs, progress)
        .await?;
    Ok(modes)
}

/// Tags the commit (when asked) and says where it is.
async fn finish(
    hub: &Hub,
    opts: &PublishOptions,
    message: &CommitMessage,
    commit: String,
    already: bool,
) -> Result<Published, HubError> {
    let revision = match (&message.tag, opts.tag) {
        (Some(tag), true) => {
            hub.create_tag(&opts.repo, &commit, tag, &message.summary)
                .await?;
            tag.clone()
        }
        _ => opts.revision.clone(),
    };
    Ok(Published {
        repo: opts.repo.to_string(),
        url: format!("{}/{}/tree/{revision}", hub.endpoint(), opts.repo),
        revision,
        commit,
        already,
    })
}

/// The commit of an earlier try (or an earlier publisher) for this checkpoint.
async fn find_commit(
    hub: &Hub,
    repo: &RepoId,
    revision: &str,
    trailer: &str,
) -> Result<Option<String>, HubError> {
    match hub.commits(repo, revision).await {
        Ok(commits) => Ok(commits
            .into_iter()
            .find(|c| c.message.lines().any(|l| l == trailer))
            .map(|c| c.id)),
        // A branch with no commits yet has none of ours.
        Err(HubError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `Round 12: validation loss 2.415`, a description, and the trailer that finds it.
struct CommitMessage {
    summary: String,
    description: String,
    trailer: String,
    tag: Option<String>,
}

impl CommitMessage {
    fn of(files: &RepoFiles) -> Self {
        let meta = &files.meta;
        let round = meta["round"].as_u64();
        let summary = match (round, meta["validation_loss"].as_f64()) {
            (Some(r), Some(loss)) => format!("Round {r}: validation loss {loss:.3}"),
            (Some(r), None) => format!("Round {r}: initial weights"),
            _ => "Starling checkpoint".to_owned(),
        };
        let trailer = format!("Starling-Checkpoint: {}", files.weights_sha256());
        let mut description = String::new();
        if let Some(run) = meta["run"].as_str() {
            description.push_str(&format!("Run {run}"));
            if let Some(tokens) = meta["tokens"].as_u64() {
                description.push_str(&format!(", {tokens} tokens"));
            }
            description.push_str(".\n\n");
        }
        description.push_str(&trailer);
        CommitMessage {
            summary,
            description,
            trailer,
            tag: round.map(|r| format!("round-{r}")),
        }
    }
}
