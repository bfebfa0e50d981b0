//! The double's repositories: commits with their file trees, branches and tags, and the
//! JSON the Hub's API answers about them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha1::Digest;

/// One file in a commit's tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub size: u64,
    /// Stored through LFS (the tree shows a pointer; downloads redirect to storage).
    pub lfs: bool,
}

impl Entry {
    /// Git's id of the blob the tree holds: the content, or the LFS pointer for it.
    pub fn git_oid(&self, content: Option<&[u8]>) -> String {
        let pointer;
        let blob = match content {
            Some(c) if !self.lfs => c,
            _ => {
                pointer = lfs_pointer(&self.sha256, self.size);
                pointer.as_bytes()
            }
        };
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", blob.len()).as_bytes());
        h.update(blob);
        hex(&h.finalize())
    }
}

pub fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Commit {
    pub id: String,
    pub parent: Option<String>,
    pub title: String,
    pub message: String,
    pub author: String,
    pub date: String,
    pub files: BTreeMap<String, Entry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Repo {
    pub private: bool,
    pub commits: BTreeMap<String, Commit>,
    pub branches: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
}

/// The `.gitattributes` the Hub puts in every new model repo.
pub const GITATTRIBUTES: &str = "*.bin filter=lfs diff=lfs merge=lfs -text\n\
*.gguf filter=lfs diff=lfs merge=lfs -text\n\
*.h5 filter=lfs diff=lfs merge=lfs -text\n\
*.onnx filter=lfs diff=lfs merge=lfs -text\n\
*.pt filter=lfs diff=lfs merge=lfs -text\n\
*.pth filter=lfs diff=lfs merge=lfs -text\n\
*.safetensors filter=lfs diff=lfs merge=lfs -text\n\
*.zip filter=lfs diff=lfs merge=lfs -text\n";

/// Whether the Hub wants `path` through LFS: its extension is tracked, it is large,
/// or it looks binary.
pub fn goes_to_lfs(path: &str, size: u64, sample: &[u8]) -> bool {
    let tracked = GITATTRIBUTES
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix('*'))
        .any(|ext| path.ends_with(ext));
    tracked || size >= 10 * 1024 * 1024 || sample.contains(&0)
}

impl Repo {
    /// A new repo with the Hub's first commit.
    pub fn new(private: bool, author: &str, gitattributes: Entry) -> Self {
        let mut repo = Repo {
            private,
            commits: BTreeMap::new(),
            branches: BTreeMap::new(),
            tags: BTreeMap::new(),
        };
        let files = BTreeMap::from([(".gitattributes".to_owned(), gitattributes)]);
        repo.commit("main", None, "initial commit", "", author, files);
        repo
    }

    /// The commit a branch, tag or commit id names.
    pub fn resolve(&self, revision: &str) -> Option<&Commit> {
        let id = self
            .branches
            .get(revision)
            .or_else(|| self.tags.get(revision))
            .map_or(revision, String::as_str);
        self.commits.get(id)
    }

    /// Adds a commit on `branch` holding `files`, and moves the branch to it.
    pub fn commit(
        &mut self,
        branch: &str,
        parent: Option<String>,
        title: &str,
        message: &str,
        author: &str,
        files: BTreeMap<String, Entry>,
    ) -> String {
        let date = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut h = sha1::Sha1::new();
        h.update(format!("{parent:?}\n{title}\n{message}\n{author}\n{date}\n").as_bytes());
        for (path, e) in &files {
            h.update(format!("{path} {} {}\n", e.sha256, e.size).as_bytes());
        }
        let id = hex(&h.finalize());
        self.commits.insert(
            id.clone(),
            Commit {
                id: id.clone(),
                parent,
                title: title.to_owned(),
                message: message.to_owned(),
                author: author.to_owned(),
                date,
                files,
            },
        );
        self.branches.insert(branch.to_owned(), id.clone());
        id
    }

    /// The commits reachable from `revision`, newest first.
    pub fn history(&self, revision: &str) -> Vec<&Commit> {
        let mut out = vec![];
        let mut next = self.resolve(revision);
        while let Some(c) = next {
            out.push(c);
            next = c.parent.as_deref().and_then(|p| self.commits.get(p));
        }
        out
    }

    pub fn refs_json(&self) -> serde_json::Value {
        let list = |refs: &BTreeMap<String, String>, kind: &str| {
            refs.iter()
                .map(|(name, target)| {
                    serde_json::json!({"name": name, "ref": format!("refs/{kind}/{name}"),
                        "targetCommit": target})
                })
                .collect::<Vec<_>>()
        };
        serde_json::json!({"branches": list(&self.branches, "heads"), "converts": [],
            "tags": list(&self.tags, "tags")})
    }
}

impl Commit {
    /// As `GET /api/models/{repo}/commits/{rev}` lists it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"id": self.id, "title": self.title, "message": self.message,
            "authors": [{"user": self.author}], "date": self.date})
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
