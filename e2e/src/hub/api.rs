//! The double's Hub endpoints, routed by hand as the Hub's paths mix ids and suffixes
//! (`{ns}/{name}.git/info/lfs/...`). Answers and refusals have the Hub's shapes: JSON
//! `{"error": ...}` with `X-Error-Message`, and `X-Error-Code` where the official client
//! maps one to an exception. What uploads is in [`super::upload`], what downloads in
//! [`super::download`].

// A refusal is the response itself, carried by `?`; its size does not matter on a test
// double's error path.
#![allow(clippy::result_large_err)]

use super::repo::Repo;
use super::{Account, Endpoint, Fault, HubDouble};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

pub fn router(hub: HubDouble) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(hub)
}

pub(super) fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": message}).to_string();
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("x-error-message", message.to_owned()),
    ];
    (status, headers, body).into_response()
}

pub(super) fn coded(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = error(status, message);
    if let Ok(v) = code.parse() {
        r.headers_mut().insert("x-error-code", v);
    }
    r
}

pub(super) fn json(value: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

pub(super) fn repo_not_found() -> Response {
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

pub(super) fn id(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

pub(super) struct Request<'a> {
    pub(super) hub: &'a HubDouble,
    pub(super) headers: &'a HeaderMap,
    pub(super) body: &'a Bytes,
}

impl Request<'_> {
    pub(super) fn urls(&self) -> (String, String) {
        self.hub.lock_urls().clone()
    }

    pub(super) fn fault(&self, endpoint: Endpoint) -> Option<Fault> {
        self.hub.take_fault(endpoint)
    }

    /// A status fault's answer (other faults are acted on where they apply).
    pub(super) fn status_fault(&self, endpoint: Endpoint) -> Result<Option<Fault>, Response> {
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
    pub(super) fn account(&self) -> Result<Option<&Account>, Response> {
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
    pub(super) fn writer(&self, namespace: &str) -> Result<&Account, Response> {
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
    pub(super) fn readable(&self, id: &str) -> Result<Repo, Response> {
        let account = self.account()?;
        let repo = self.hub.repo(id).ok_or_else(repo_not_found)?;
        let ns = id.split('/').next().unwrap_or_default();
        let sees = account.is_some_and(|a| a.user == ns || a.orgs.iter().any(|o| o == ns));
        if repo.private && !sees {
            return Err(repo_not_found());
        }
        Ok(repo)
    }

    pub(super) fn writable(&self, id: &str) -> Result<(&Account, Repo), Response> {
        let ns = id.split('/').next().unwrap_or_default();
        let account = self.writer(ns)?;
        let repo = self.hub.repo(id).ok_or_else(repo_not_found)?;
        Ok((account, repo))
    }

    pub(super) fn body_json(&self) -> Result<serde_json::Value, Response> {
        serde_json::from_slice(self.body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("Invalid JSON body: {e}")))
    }
}

pub(super) fn with_headers(
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

pub(super) fn revision_not_found(rev: &str) -> Response {
    coded(
        StatusCode::NOT_FOUND,
        "RevisionNotFound",
        &format!("Invalid rev id: {rev}"),
    )
}
