//! The double's download endpoints: what `snapshot_download` and `hf_hub_download` read
//! (`revision`, `tree`, `resolve` with `X-Repo-Commit` and content ETags, LFS files
//! redirected to storage), refs, commits and `whoami-v2`.

// A refusal is the response itself, carried by `?`; its size does not matter on a test
// double's error path.
#![allow(clippy::result_large_err)]

use axum::http::StatusCode;
use axum::response::Response;
use sha2::Digest;

use super::api::{Request, coded, error, json, revision_not_found, with_headers};
use super::repo;

impl Request<'_> {
    pub(super) fn whoami(&self) -> Response {
        match self.account() {
            Ok(Some(a)) => json(serde_json::json!({"type": "user", "name": a.user,
                "orgs": a.orgs.iter().map(|o| serde_json::json!({"name": o})).collect::<Vec<_>>(),
                "auth": {"type": "access_token", "accessToken": {"role":
                    if a.role == super::Role::Write { "write" } else { "read" }}}})),
            Ok(None) => error(
                StatusCode::UNAUTHORIZED,
                "Invalid credentials in Authorization header",
            ),
            Err(r) => r,
        }
    }

    pub(super) fn info(&self, id: &str, rev: &str) -> Response {
        let repo = match self.readable(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let Some(commit) = repo.resolve(rev) else {
            return revision_not_found(rev);
        };
        let siblings: Vec<_> = commit
            .files
            .keys()
            .map(|p| serde_json::json!({"rfilename": p}))
            .collect();
        json(
            serde_json::json!({"id": id, "modelId": id, "sha": commit.id,
            "private": repo.private, "author": id.split('/').next(),
            "lastModified": commit.date, "tags": [], "siblings": siblings}),
        )
    }

    pub(super) fn tree(&self, id: &str, rev: &str, under: &str, query: &str) -> Response {
        let repo = match self.readable(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let Some(commit) = repo.resolve(rev) else {
            return revision_not_found(rev);
        };
        let recursive = query
            .split('&')
            .any(|q| q == "recursive=true" || q == "recursive=1");
        let prefix = if under.is_empty() {
            String::new()
        } else {
            format!("{under}/")
        };
        let mut items = vec![];
        let mut dirs = std::collections::BTreeSet::new();
        for (path, entry) in &commit.files {
            let Some(rest) = path.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('/').collect();
            for depth in 1..parts.len() {
                if recursive || depth == 1 {
                    dirs.insert(format!("{prefix}{}", parts[..depth].join("/")));
                }
            }
            if !recursive && parts.len() > 1 {
                continue;
            }
            let content = (!entry.lfs)
                .then(|| self.hub.blob(&entry.sha256).ok())
                .flatten();
            let mut item = serde_json::json!({"type": "file", "oid": entry.git_oid(content.as_deref()),
                "size": entry.size, "path": path});
            if entry.lfs {
                let pointer = repo::lfs_pointer(&entry.sha256, entry.size).len();
                item["lfs"] = serde_json::json!({"oid": entry.sha256, "size": entry.size, "pointerSize": pointer});
            }
            items.push(item);
        }
        for dir in dirs {
            items.push(serde_json::json!({"type": "directory", "oid": repo::hex(&sha2::Sha256::digest(dir.as_bytes()))[..40], "size": 0, "path": dir}));
        }
        json(serde_json::Value::Array(items))
    }

    pub(super) fn refs(&self, id: &str) -> Response {
        match self.readable(id) {
            Ok(repo) => json(repo.refs_json()),
            Err(r) => r,
        }
    }

    pub(super) fn commits(&self, id: &str, rev: &str) -> Response {
        let repo = match self.readable(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        if repo.resolve(rev).is_none() {
            return revision_not_found(rev);
        }
        json(serde_json::Value::Array(
            repo.history(rev)
                .into_iter()
                .map(repo::Commit::json)
                .collect(),
        ))
    }

    /// A file's content (or, for LFS, a redirect to storage) with the headers
    /// `hf_hub_download` reads: the commit, an ETag unique to the content, the size.
    pub(super) fn resolve(&self, id: &str, rev: &str, path: &str) -> Response {
        let repo = match self.readable(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let Some(commit) = repo.resolve(rev) else {
            return revision_not_found(rev);
        };
        let Some(entry) = commit.files.get(path) else {
            let mut r = coded(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
            if let Ok(v) = commit.id.parse() {
                r.headers_mut().insert("x-repo-commit", v);
            }
            return r;
        };
        let mut headers = vec![("x-repo-commit", commit.id.clone())];
        if entry.lfs {
            let storage = self.urls().1;
            headers.push(("location", format!("{storage}/lfs/{}", entry.sha256)));
            headers.push(("x-linked-etag", format!("\"{}\"", entry.sha256)));
            headers.push(("x-linked-size", entry.size.to_string()));
            headers.push(("etag", format!("\"{}\"", entry.git_oid(None))));
            return with_headers(StatusCode::FOUND, headers, Vec::new());
        }
        match self.hub.blob(&entry.sha256) {
            Ok(bytes) => {
                headers.push(("etag", format!("\"{}\"", entry.git_oid(Some(&bytes)))));
                with_headers(StatusCode::OK, headers, bytes)
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }
}
