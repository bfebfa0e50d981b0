//! The double's Hub endpoints, routed by hand as the Hub's paths mix ids and suffixes
//! (`{ns}/{name}.git/info/lfs/...`). Answers and refusals have the Hub's shapes: JSON
//! `{"error": ...}` with `X-Error-Message`, and `X-Error-Code` where the official client
//! maps one to an exception.

// A refusal is the response itself, carried by `?`; its size does not matter on a test
// double's error path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;

use super::repo::{self, Entry, Repo};
use super::{Account, Endpoint, Fault, HubDouble, Upload};

pub fn router(hub: HubDouble) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(hub)
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": message}).to_string();
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("x-error-message", message.to_owned()),
    ];
    (status, headers, body).into_response()
}

fn coded(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = error(status, message);
    if let Ok(v) = code.parse() {
        r.headers_mut().insert("x-error-code", v);
    }
    r
}

fn json(value: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn repo_not_found() -> Response {
    coded(
        StatusCode::NOT_FOUND,
        "RepoNotFound",
        "Repository not found",
    )
}

/// `%2F` and friends, as clients quote revisions and paths.
fn unquote(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn handle(
    State(hub): State<HubDouble>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hub.record(&method, &uri);
    let segments: Vec<String> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .map(unquote)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let query = uri.query().unwrap_or("");
    let request = Request {
        hub: &hub,
        headers: &headers,
        body: &body,
    };
    let get = method == Method::GET || method == Method::HEAD;
    match (method.clone(), s.as_slice()) {
        (Method::POST, ["api", "repos", "create"]) => request.create_repo(),
        (Method::POST, ["api", "validate-yaml"]) => request.validate_yaml(),
        (Method::GET, ["api", "whoami-v2"]) => request.whoami(),
        (Method::GET, ["api", "models", ns, name]) => request.info(&id(ns, name), "main"),
        (Method::GET, ["api", "models", ns, name, "revision", rev]) => {
            request.info(&id(ns, name), rev)
        }
        (Method::GET, ["api", "models", ns, name, "tree", rev, path @ ..]) => {
            request.tree(&id(ns, name), rev, &path.join("/"), query)
        }
        (Method::GET, ["api", "models", ns, name, "refs"]) => request.refs(&id(ns, name)),
        (Method::GET, ["api", "models", ns, name, "commits", rev]) => {
            request.commits(&id(ns, name), rev)
        }
        (Method::POST, ["api", "models", ns, name, "preupload", _]) => {
            request.preupload(&id(ns, name))
        }
        (Method::POST, ["api", "models", ns, name, "commit", rev]) => {
            request.commit(&id(ns, name), rev)
        }
        (Method::POST, ["api", "models", ns, name, "tag", rev]) => request.tag(&id(ns, name), rev),
        (Method::POST, [ns, git, "info", "lfs", "objects", op]) if git.ends_with(".git") => {
            let repo = id(ns, git.trim_end_matches(".git"));
            match *op {
                "batch" => request.batch(&repo),
                "verify" => request.verify(&repo),
                _ => error(StatusCode::NOT_FOUND, "Not found"),
            }
        }
        (_, [ns, name, "resolve", rev, path @ ..]) if get => {
            request.resolve(&id(ns, name), rev, &path.join("/"))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "Sorry, we can't find the page you are looking for.",
        ),
    }
}

fn id(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

struct Request<'a> {
    hub: &'a HubDouble,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

impl Request<'_> {
    fn urls(&self) -> (String, String) {
        self.hub.lock_urls().clone()
    }

    fn fault(&self, endpoint: Endpoint) -> Option<Fault> {
        self.hub.take_fault(endpoint)
    }

    /// A status fault's answer (other faults are acted on where they apply).
    fn status_fault(&self, endpoint: Endpoint) -> Result<Option<Fault>, Response> {
        match self.fault(endpoint) {
            Some(Fault::Status {
                status,
                retry_after,
            }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut r = error(status, "injected fault");
                if let Some(after) = retry_after.and_then(|a| a.to_string().parse().ok()) {
                    r.headers_mut().insert("retry-after", after);
                }
                Err(r)
            }
            other => Ok(other),
        }
    }

    /// The account a request is made as; a token the Hub does not know is refused.
    fn account(&self) -> Result<Option<&Account>, Response> {
        match token(self.headers) {
            None => Ok(None),
            Some(t) => self.hub.account(Some(t)).map(Some).ok_or_else(|| {
                error(
                    StatusCode::UNAUTHORIZED,
                    "Invalid credentials in Authorization header",
                )
            }),
        }
    }

    /// The account, if it may write to `namespace`.
    fn writer(&self, namespace: &str) -> Result<&Account, Response> {
        let account = self.account()?.ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "Invalid credentials in Authorization header",
            )
        })?;
        if !account.writes_to(namespace) {
            return Err(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "You don't have the rights to write to a model under the namespace \"{namespace}\""
                ),
            ));
        }
        Ok(account)
    }

    /// The repo, if this request may read it (a private repo others cannot see is "not
    /// found", as on the Hub).
    fn readable(&self, id: &str) -> Result<Repo, Response> {
        let account = self.account()?;
        let repo = self.hub.repo(id).ok_or_else(repo_not_found)?;
        let ns = id.split('/').next().unwrap_or_default();
        let sees = account.is_some_and(|a| a.user == ns || a.orgs.iter().any(|o| o == ns));
        if repo.private && !sees {
            return Err(repo_not_found());
        }
        Ok(repo)
    }

    fn writable(&self, id: &str) -> Result<(&Account, Repo), Response> {
        let ns = id.split('/').next().unwrap_or_default();
        let account = self.writer(ns)?;
        let repo = self.hub.repo(id).ok_or_else(repo_not_found)?;
        Ok((account, repo))
    }

    fn body_json(&self) -> Result<serde_json::Value, Response> {
        serde_json::from_slice(self.body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("Invalid JSON body: {e}")))
    }

    fn create_repo(&self) -> Response {
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
        let sha256 = repo::hex(&sha2::Sha256::digest(attributes));
        self.hub
            .put_blob(&sha256, attributes)
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
    fn validate_yaml(&self) -> Response {
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

    fn whoami(&self) -> Response {
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

    fn info(&self, id: &str, rev: &str) -> Response {
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

    fn tree(&self, id: &str, rev: &str, under: &str, query: &str) -> Response {
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

    fn refs(&self, id: &str) -> Response {
        match self.readable(id) {
            Ok(repo) => json(repo.refs_json()),
            Err(r) => r,
        }
    }

    fn commits(&self, id: &str, rev: &str) -> Response {
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

    fn preupload(&self, id: &str) -> Response {
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
    fn batch(&self, id: &str) -> Response {
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

    fn verify(&self, id: &str) -> Response {
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

    fn commit(&self, id: &str, rev: &str) -> Response {
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

    fn tag(&self, id: &str, rev: &str) -> Response {
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

    /// A file's content (or, for LFS, a redirect to storage) with the headers
    /// `hf_hub_download` reads: the commit, an ETag unique to the content, the size.
    fn resolve(&self, id: &str, rev: &str, path: &str) -> Response {
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

fn with_headers(
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
) -> Response {
    let mut r = (status, body).into_response();
    for (name, value) in headers {
        if let Ok(v) = value.parse() {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

fn revision_not_found(rev: &str) -> Response {
    coded(
        StatusCode::NOT_FOUND,
        "RevisionNotFound",
        &format!("Invalid rev id: {rev}"),
    )
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
                let sha256 = repo::hex(&sha2::Sha256::digest(&bytes));
                hub.put_blob(&sha256, &bytes)
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
