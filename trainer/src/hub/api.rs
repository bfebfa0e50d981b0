//! The Hub's endpoints, one typed call each: repos, refs and commits, `preupload`, the
//! Git LFS batch API with its basic and multipart transfers, and the NDJSON commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use super::http::Auth;
use super::{Hub, HubError, Progress, RepoFile, RepoId};

/// How the Hub wants a file: inline in the commit, or uploaded to LFS storage first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadMode {
    Lfs,
    Regular,
}

/// One commit of a branch, newest first.
#[derive(Clone, Debug, Deserialize)]
pub struct CommitInfo {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct Revision {
    sha: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ref {
    name: String,
    target_commit: String,
}

#[derive(Deserialize)]
struct Refs {
    tags: Vec<Ref>,
}

#[derive(Deserialize)]
struct Preupload {
    files: Vec<PreuploadFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: UploadMode,
    #[serde(default)]
    should_ignore: bool,
}

#[derive(Deserialize)]
struct Batch {
    objects: Vec<BatchObject>,
}

#[derive(Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    actions: Option<Actions>,
    #[serde(default)]
    error: Option<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    code: u16,
    message: String,
}

#[derive(Deserialize)]
struct Actions {
    upload: Action,
    #[serde(default)]
    verify: Option<Action>,
}

#[derive(Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: HashMap<String, serde_json::Value>,
}

/// What a commit made.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Committed {
    pub commit_oid: String,
    pub commit_url: String,
}

/// The LFS content type; the batch API refuses plain JSON.
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// A path segment as the Hub's URLs take it (`refs/pr/1` → `refs%2Fpr%2F1`).
fn quote(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Hub {
    /// Creates the model repo; one that exists already is fine.
    pub async fn create_repo(&self, repo: &RepoId, private: bool) -> Result<(), HubError> {
        let body = serde_json::json!({
            "name": repo.name(), "organization": repo.namespace(), "private": private,
        });
        let url = self.url("/api/repos/create");
        match self
            .send("creating the repo", Auth::Hub, |c| c.post(&url).json(&body))
            .await
        {
            Err(HubError::Status { status: 409, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The commit `revision` points at.
    pub async fn head(&self, repo: &RepoId, revision: &str) -> Result<String, HubError> {
        let url = self.url(&format!("/api/models/{repo}/revision/{}", quote(revision)));
        let r: Revision = self
            .json("reading the branch head", Auth::Hub, |c| c.get(&url))
            .await?;
        Ok(r.sha)
    }

    /// The commit tag `tag` points at, if the tag exists.
    pub async fn tag_target(&self, repo: &RepoId, tag: &str) -> Result<Option<String>, HubError> {
        let url = self.url(&format!("/api/models/{repo}/refs"));
        let refs: Refs = self
            .json("listing tags", Auth::Hub, |c| c.get(&url))
            .await?;
        Ok(refs
            .tags
            .into_iter()
            .find(|t| t.name == tag)
            .map(|t| t.target_commit))
    }

    /// The latest commits of `revision` (the Hub's first page), newest first.
    pub async fn commits(
        &self,
        repo: &RepoId,
        revision: &str,
    ) -> Result<Vec<CommitInfo>, HubError> {
        let url = self.url(&format!("/api/models/{repo}/commits/{}", quote(revision)));
        self.json("listing commits", Auth::Hub, |c| c.get(&url))
            .await
    }

    /// Tags `commit` as `tag`; a tag that exists already is left as it is.
    pub async fn create_tag(
        &self,
        repo: &RepoId,
        commit: &str,
        tag: &str,
        message: &str,
    ) -> Result<(), HubError> {
        let url = self.url(&format!("/api/models/{repo}/tag/{}", quote(commit)));
        let body = serde_json::json!({"tag": tag, "message": message});
        match self
            .send("tagging the commit", Auth::Hub, |c| {
                c.post(&url).json(&body)
            })
            .await
        {
            Err(HubError::Status { status: 409, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// How the Hub wants each file (files it would ignore are left out of the answer).
    pub async fn preupload(
        &self,
        repo: &RepoId,
        revision: &str,
        files: &[RepoFile],
    ) -> Result<HashMap<String, UploadMode>, HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut modes = HashMap::new();
        // The Hub takes at most 256 files a request.
        for batch in files.chunks(256) {
            let listed: Vec<_> = batch
                .iter()
                .map(|f| serde_json::json!({"path": f.path, "size": f.size, "sample": b64.encode(f.sample())}))
                .collect();
            let body = serde_json::json!({"files": listed});
            let url = self.url(&format!("/api/models/{repo}/preupload/{}", quote(revision)));
            let answer: Preupload = self
                .json("asking how to upload", Auth::Hub, |c| {
                    c.post(&url).json(&body)
                })
                .await?;
            for f in answer.files.into_iter().filter(|f| !f.should_ignore) {
                modes.insert(f.path, f.upload_mode);
            }
        }
        Ok(modes)
    }

    /// Uploads `files` to LFS storage unless the Hub holds them already, reporting the
    /// bytes sent as they go.
    pub async fn upload_lfs(
        &self,
        repo: &RepoId,
        revision: &str,
        files: &[&RepoFile],
        progress: Arc<dyn Progress>,
    ) -> Result<(), HubError> {
        for batch in files.chunks(256) {
            let objects: Vec<_> = batch
                .iter()
                .map(|f| serde_json::json!({"oid": f.sha256, "size": f.size}))
                .collect();
            let body = serde_json::json!({
                "operation": "upload", "transfers": ["basic", "multipart"],
                "objects": objects, "hash_algo": "sha256", "ref": {"name": revision},
            });
            let url = self.url(&format!("/{repo}.git/info/lfs/objects/batch"));
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let answer: Batch = self
                .json("asking where to upload", Auth::Hub, |c| {
                    c.post(&url)
                        .header("accept", LFS_JSON)
                        .header("content-type", LFS_JSON)
                        .body(body.clone())
                })
                .await?;
            for object in answer.objects {
                let file = batch
                    .iter()
                    .find(|f| f.sha256 == object.oid)
                    .ok_or_else(|| malformed("LFS batch", "an object nobody asked for"))?;
                self.upload_object(file, object, progress.clone()).await?;
            }
        }
        Ok(())
    }

    /// Uploads one LFS object as its batch answer says: nothing (already stored), in one
    /// PUT, or in parts; then asks the Hub to verify it.
    async fn upload_object(
        &self,
        file: &RepoFile,
        object: BatchObject,
        progress: Arc<dyn Progress>,
    ) -> Result<(), HubError> {
        if let Some(e) = object.error {
            return Err(HubError::Status {
                what: format!("uploading {}", file.path),
                status: e.code,
                code: None,
                message: e.message,
                tries: 1,
            });
        }
        let Some(actions) = object.actions else {
            progress.sent(&file.path, file.size, file.size);
            return Ok(());
        };
        let what = format!("uploading {}", file.path);
        let path = file.path.clone();
        let size = file.size;
        let progress = move |at: u64| progress.sent(&path, at, size);
        let progress = Arc::new(progress);
        match chunk_size(&actions.upload) {
            None => {
                let href = &actions.upload.href;
                self.send(&what, Auth::Storage, |c| {
                    let p = progress.clone();
                    c.put(href)
                        .header("content-length", file.size)
                        .body(file.body(0, file.size, move |at| p(at)))
                })
                .await?;
            }
            Some(chunk) => {
                self.upload_parts(file, &actions.upload, chunk, &what, progress)
                    .await?
            }
        }
        if let Some(verify) = actions.verify {
            let body = serde_json::json!({"oid": file.sha256, "size": file.size});
            self.send(&format!("verifying {}", file.path), Auth::Hub, |c| {
                c.post(&verify.href).json(&body)
            })
            .await?;
        }
        Ok(())
    }

    /// The multipart transfer: each part PUT to its own URL, then the parts' ETags
    /// posted to the completion URL.
    async fn upload_parts(
        &self,
        file: &RepoFile,
        upload: &Action,
        chunk: u64,
        what: &str,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<(), HubError> {
        let parts: BTreeMap<u64, &str> = upload
            .header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?)))
            .collect();
        if parts.len() as u64 != file.size.div_ceil(chunk) {
            return Err(malformed(what, "part URLs do not match the file's size"));
        }
        let mut etags = Vec::new();
        for (i, (number, url)) in parts.into_iter().enumerate() {
            let start = i as u64 * chunk;
            let len = chunk.min(file.size - start);
            let response = self
                .send(what, Auth::Storage, |c| {
                    let p = progress.clone();
                    c.put(url).header("content-length", len).body(file.body(
                        start,
                        len,
                        move |at| p(at),
                    ))
                })
                .await?;
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| malformed(what, "a part's answer has no ETag"))?;
            etags.push(serde_json::json!({"partNumber": number, "etag": etag}));
        }
        let body = serde_json::json!({"oid": file.sha256, "parts": etags});
        let body = serde_json::to_vec(&body).unwrap_or_default();
        self.send(what, Auth::Storage, |c| {
            c.post(&upload.href)
                .header("accept", LFS_JSON)
                .header("content-type", LFS_JSON)
                .body(body.clone())
        })
        .await?;
        Ok(())
    }

    /// One commit on `revision` holding `files` (inline or as LFS pointers), refused
    /// with 412 when `parent` is no longer the head.
    pub async fn commit(
        &self,
        repo: &RepoId,
        revision: &str,
        parent: &str,
        (summary, description): (&str, &str),
        files: &[(&RepoFile, UploadMode)],
    ) -> Result<Committed, HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let header = serde_json::json!({"key": "header", "value": {
            "summary": summary, "description": description, "parentCommit": parent}});
        let mut lines = vec![header];
        for (file, mode) in files {
            lines.push(match mode {
                UploadMode::Regular => serde_json::json!({"key": "file", "value": {
                    "content": b64.encode(file.read_all().await?), "path": file.path,
                    "encoding": "base64"}}),
                UploadMode::Lfs => serde_json::json!({"key": "lfsFile", "value": {
                    "path": file.path, "algo": "sha256", "oid": file.sha256, "size": file.size}}),
            });
        }
        let mut body = Vec::new();
        for line in lines {
            body.extend(serde_json::to_vec(&line).unwrap_or_default());
            body.push(b'\n');
        }
        let url = self.url(&format!("/api/models/{repo}/commit/{}", quote(revision)));
        // One try only: whether a failed commit landed is for the caller to look up.
        self.clone()
            .with_retry(super::Retry {
                attempts: 1,
                ..Default::default()
            })
            .json("committing", Auth::Hub, |c| {
                c.post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
            })
            .await
    }
}

/// The part size of a multipart upload, if the Hub asks for one.
fn chunk_size(upload: &Action) -> Option<u64> {
    match upload.header.get("chunk_size")? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|&n| n > 0)
}

fn malformed(what: &str, message: &str) -> HubError {
    HubError::Malformed {
        what: what.to_owned(),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_quoted_as_one_path_segment() {
        assert_eq!(quote("main"), "main");
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(quote("round 1"), "round%201");
    }

    #[test]
    fn chunk_sizes_come_as_numbers_or_strings() {
        let action = |v: serde_json::Value| Action {
            href: String::new(),
            header: HashMap::from([("chunk_size".to_owned(), v)]),
        };
        assert_eq!(chunk_size(&action(serde_json::json!(1024))), Some(1024));
        assert_eq!(chunk_size(&action(serde_json::json!("1024"))), Some(1024));
        assert_eq!(chunk_size(&action(serde_json::json!("0"))), None);
    }
}
