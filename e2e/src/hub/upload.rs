//! The double's upload endpoints: repos, `preupload`, the LFS batch API and `verify`,
//! NDJSON commits (with the Race and LandThenFail faults), and tags.

// A refusal is the response itself, carried by `?`; its size does not matter on a test
// double's error path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;

use super::api::{Request, coded, error, id, json, repo_not_found, revision_not_found};
use super::repo::{self, Entry, Repo};
use super::{Endpoint, Fault, HubDouble, Upload};

impl Request<'_> {
    pub(super) fn create_repo(&self) -> Response {
        self.create_repo_or_refuse().unwrap_or_else(|r| r)
    }

    fn create_repo_or_refuse(&self) -> Result<Response, Response> {
        self.status_fault(Endpoint::CreateRepo)?;
        let body = self.body_json()?;
        let account = self.account()?.ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "Invalid credentials in Authorization header",
            )
        })?;
        let name = body["name"].as_str().unwrap_or_default();
        let ns = body["organization"].as_str().unwrap_or(&account.user);
        if name.is_empty() {
            return Err(error(StatusCode::BAD_REQUEST, "\"name\" is required"));
        }
        if !account.writes_to(ns) {
            return Err(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "You don't have the rights to create a model under the namespace \"{ns}\""
                ),
            ));
        }
        let id = id(ns, name);
        let url = format!("{}/{id}", self.urls().0);
        let private = body["private"].as_bool().unwrap_or(false)
            || body["visibility"].as_str() == Some("private");
        let mut state = self.hub.lock_state();
        if state.repos.contains_key(&id) {
            let body =
                serde_json::json!({"error": "You already created this model repo", "url": url});
            return Ok((
                StatusCode::CONFLICT,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response());
        }
        let attributes = repo::GITATTRIBUTES.as_bytes();
        let sha256 = self
            .hub
            .store(attributes)
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e))?;
        let entry = Entry {
            sha256,
            size: attributes.len() as u64,
            lfs: false,
        };
        state
            .repos
            .insert(id.clone(), Repo::new(private, &account.user, entry));
        self.hub.save(&state);
        Ok(json(serde_json::json!({"url": url, "name": id, "id": id})))
    }

    /// The model card's YAML must parse; the Hub checks it before a commit.
    pub(super) fn validate_yaml(&self) -> Response {
        let Ok(body) = self.body_json() else {
            return error(StatusCode::BAD_REQUEST, "Invalid JSON body");
        };
        let text = body["content"].as_str().unwrap_or_default();
        let front = text
            .strip_prefix("---\n")
            .and_then(|rest| rest.split_once("\n---").map(|(yaml, _)| yaml));
        match front.map(serde_yaml::from_str::<serde_yaml::Value>) {
            Some(Err(e)) => {
                let body =
                    serde_json::json!({"errors": [{"message": e.to_string()}], "warnings": []});
                (
                    StatusCode::BAD_REQUEST,
                    [("content-type", "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
            _ => json(serde_json::json!({"errors": [], "warnings": []})),
        }
    }

    pub(super) fn preupload(&self, id: &str) -> Response {
        let run = || -> Result<Response, Response> {
            self.status_fault(Endpoint::Preupload)?;
            self.writable(id)?;
            let body = self.body_json()?;
            let b64 = base64::engine::general_purpose::STANDARD;
            let files: Vec<_> = body["files"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    let path = f["path"].as_str().unwrap_or_default();
                    let size = f["size"].as_u64().unwrap_or(0);
                    let sample = b64.decode(f["sample"].as_str().unwrap_or_default()).unwrap_or_default();
                    let mode = if repo::goes_to_lfs(path, size, &sample) { "lfs" } else { "regular" };
                    serde_json::json!({"path": path, "uploadMode": mode, "shouldIgnore": false, "oid": null})
                })
                .collect();
            Ok(json(serde_json::json!({"files": files, "commitOid": null})))
        };
        run().unwrap_or_else(|r| r)
    }

    /// The LFS batch API: where to upload each object not stored yet.
    pub(super) fn batch(&self, id: &str) -> Response {
        let run = || -> Result<Response, Response> {
            self.status_fault(Endpoint::LfsBatch)?;
            self.writable(id)?;
            let body = self.body_json()?;
            let (hub_url, storage) = self.urls();
            let transfers = self.hub.transfers();
            let mut multipart = false;
            let mut objects = vec![];
            for o in body["objects"].as_array().into_iter().flatten() {
                let oid = o["oid"].as_str().unwrap_or_default().to_owned();
                let size = o["size"].as_u64().unwrap_or(0);
                if oid.len() != 64 || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
                    objects.push(serde_json::json!({"oid": oid, "size": size,
                        "error": {"code": 422, "message": "Invalid oid"}}));
                    continue;
                }
                if self.hub.has_blob(&oid, size) {
                    objects.push(serde_json::json!({"oid": oid, "size": size}));
                    continue;
                }
                let upload = upload_id(&oid);
                self.hub.lock_state().uploads.insert(
                    upload.clone(),
                    Upload {
                        sha256: oid.clone(),
                        size,
                        parts: BTreeMap::new(),
                    },
                );
                let verify = serde_json::json!({"href": format!("{hub_url}/{id}.git/info/lfs/objects/verify")});
                let action = if size >= transfers.multipart_from {
                    multipart = true;
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), transfers.part_size.to_string().into());
                    for n in 1..=size.div_ceil(transfers.part_size) {
                        header.insert(
                            format!("{n:05}"),
                            format!("{storage}/upload/{upload}/part/{n}").into(),
                        );
                    }
                    serde_json::json!({"href": format!("{storage}/upload/{upload}/complete"), "header": header})
                } else {
                    serde_json::json!({"href": format!("{storage}/upload/{upload}")})
                };
                objects.push(serde_json::json!({"oid": oid, "size": size,
                    "authenticated": true, "actions": {"upload": action, "verify": verify}}));
            }
            let transfer = if multipart { "multipart" } else { "basic" };
            let body = serde_json::json!({"transfer": transfer, "objects": objects, "hash_algo": "sha256"});
            Ok((
                StatusCode::OK,
                [("content-type", "application/vnd.git-lfs+json")],
                body.to_string(),
            )
                .into_response())
        };
        run().unwrap_or_else(|r| r)
    }

    pub(super) fn verify(&self, id: &str) -> Response {
        let run = || -> Result<Response, Response> {
            self.writable(id)?;
            let body = self.body_json()?;
            let oid = body["oid"].as_str().unwrap_or_default();
            let size = body["size"].as_u64().unwrap_or(0);
            if !self.hub.has_blob(oid, size) {
                return Err(error(StatusCode::NOT_FOUND, "Object not found"));
            }
            Ok(json(serde_json::json!({"success": true})))
        };
        run().unwrap_or_else(|r| r)
    }

    pub(super) fn commit(&self, id: &str, rev: &str) -> Response {
        self.commit_or_refuse(id, rev).unwrap_or_else(|r| r)
    }

    fn commit_or_refuse(&self, id: &str, branch: &str) -> Result<Response, Response> {
        let fault = self.status_fault(Endpoint::Commit)?;
        let (account, _) = self.writable(id)?;
        let (header, changes) = parse_commit(self.body)?;
        let mut state = self.hub.lock_state();
        let repo = state.repos.get_mut(id).ok_or_else(repo_not_found)?;
        if fault == Some(Fault::Race) {
            let mut files = repo
                .resolve(branch)
                .map(|c| c.files.clone())
                .unwrap_or_default();
            files.remove("NOTES.md");
            let head = repo.branches.get(branch).cloned();
            repo.commit(
                branch,
                head,
                "Another writer's commit",
                "",
                "other-writer",
                files,
            );
        }
        let head = repo
            .branches
            .get(branch)
            .cloned()
            .ok_or_else(|| revision_not_found(branch))?;
        if header["parentCommit"].as_str().is_some_and(|p| p != head) {
            return Err(error(
                StatusCode::PRECONDITION_FAILED,
                "A commit has happened since. Please refresh and try again.",
            ));
        }
        let mut files = repo
            .resolve(&head)
            .map(|c| c.files.clone())
            .unwrap_or_default();
        for change in changes {
            change.apply(self.hub, &mut files)?;
        }
        let title = header["summary"].as_str().unwrap_or("Update");
        let message = header["description"].as_str().unwrap_or_default();
        let oid = repo.commit(branch, Some(head), title, message, &account.user, files);
        self.hub.save(&state);
        if fault == Some(Fault::LandThenFail) {
            return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "Internal Error"));
        }
        let url = format!("{}/{id}/commit/{oid}", self.urls().0);
        Ok(json(
            serde_json::json!({"success": true, "commitOid": oid, "commitUrl": url,
            "commitMessage": title, "hookOutput": ""}),
        ))
    }

    pub(super) fn tag(&self, id: &str, rev: &str) -> Response {
        let run = || -> Result<Response, Response> {
            self.status_fault(Endpoint::Tag)?;
            self.writable(id)?;
            let body = self.body_json()?;
            let tag = body["tag"].as_str().unwrap_or_default().to_owned();
            let mut state = self.hub.lock_state();
            let repo = state.repos.get_mut(id).ok_or_else(repo_not_found)?;
            let commit = repo
                .resolve(rev)
                .map(|c| c.id.clone())
                .ok_or_else(|| revision_not_found(rev))?;
            if tag.is_empty() || repo.tags.contains_key(&tag) {
                return Err(error(
                    StatusCode::CONFLICT,
                    &format!("Tag {tag} already exists"),
                ));
            }
            repo.tags.insert(tag, commit);
            self.hub.save(&state);
            Ok(json(serde_json::json!({})))
        };
        run().unwrap_or_else(|r| r)
    }
}

/// A 40-hex-digit id for a new upload.
fn upload_id(oid: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    repo::hex(&sha2::Sha256::digest(format!("{oid}{nanos}").as_bytes()))[..40].to_owned()
}

/// One line of a commit after the header.
enum Change {
    Inline {
        path: String,
        bytes: Vec<u8>,
    },
    Lfs {
        path: String,
        sha256: String,
        size: u64,
    },
    Delete {
        path: String,
    },
}

impl Change {
    fn apply(self, hub: &HubDouble, files: &mut BTreeMap<String, Entry>) -> Result<(), Response> {
        match self {
            Change::Inline { path, bytes } => {
                let sha256 = hub
                    .store(&bytes)
                    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e))?;
                files.insert(
                    path,
                    Entry {
                        sha256,
                        size: bytes.len() as u64,
                        lfs: false,
                    },
                );
            }
            Change::Lfs { path, sha256, size } => {
                if !hub.has_blob(&sha256, size) {
                    return Err(error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &format!(
                            "Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}"
                        ),
                    ));
                }
                files.insert(
                    path,
                    Entry {
                        sha256,
                        size,
                        lfs: true,
                    },
                );
            }
            Change::Delete { path } => {
                if files.remove(&path).is_none() {
                    return Err(coded(
                        StatusCode::NOT_FOUND,
                        "EntryNotFound",
                        &format!("{path}: Entry not found"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The NDJSON commit body: a header line, then one line per file.
fn parse_commit(body: &[u8]) -> Result<(serde_json::Value, Vec<Change>), Response> {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, &m);
    let mut lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let first: serde_json::Value = serde_json::from_slice(lines.next().unwrap_or_default())
        .map_err(|e| bad(format!("Invalid commit header: {e}")))?;
    if first["key"] != "header" {
        return Err(bad("The first line of a commit must be its header".into()));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut changes = vec![];
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| bad(format!("Invalid commit line: {e}")))?;
        let value = &v["value"];
        let path = value["path"].as_str().unwrap_or_default().to_owned();
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|p| p == "..") {
            return Err(bad(format!("Invalid path `{path}`")));
        }
        changes.push(match v["key"].as_str() {
            Some("file") => Change::Inline {
                bytes: b64
                    .decode(value["content"].as_str().unwrap_or_default())
                    .map_err(|e| bad(format!("{path}: invalid base64: {e}")))?,
                path,
            },
            Some("lfsFile") => Change::Lfs {
                sha256: value["oid"].as_str().unwrap_or_default().to_owned(),
                size: value["size"].as_u64().unwrap_or(0),
                path,
            },
            Some("deletedFile") => Change::Delete { path },
            other => return Err(bad(format!("Unknown commit operation {other:?}"))),
        });
    }
    Ok((first["value"].clone(), changes))
}
