//! Checkpoints over HTTP, for the run's publisher: it downloads a checkpoint from here
//! and reports back what the Hub made of it, so that neither the exchange nor the
//! trainers ever hold the Hub token, and the operator learns of publications from the
//! run state it already watches.
//!
//! * `GET /checkpoints/round-NNNNNN` — the checkpoint's files: `{"files": [{"name", "size"}]}`
//! * `GET /checkpoints/round-NNNNNN/FILE` — one file, streamed
//! * `POST /checkpoints/round-NNNNNN/publication` — `{"repo", "revision", "commit", "url"}`
//!   once published, or `{"error"}` after a failed attempt
//!
//! Each needs the publisher's or the operator's bearer token.

use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Exchange;
use crate::exchange::{Identity, proto};

pub(super) fn routes(exchange: Exchange) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/checkpoints/{name}", get(list))
        .route("/checkpoints/{name}/publication", post(report))
        .route("/checkpoints/{name}/{file}", get(file))
        .with_state(exchange)
}

/// A refusal: its status and a message a publisher's log shows.
type Refused = (StatusCode, String);

fn refused(status: StatusCode, message: impl Into<String>) -> Refused {
    (status, message.into())
}

/// A refusal, as text a publisher's log shows.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

impl Exchange {
    /// The checkpoint directory `name` names, if the caller may read it and it exists.
    fn checkpoint(&self, headers: &HeaderMap, name: &str) -> Result<PathBuf, Refused> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| self.shared.opts.tokens.identify(t)) {
            Some(Identity::Publisher | Identity::Operator) => {}
            Some(Identity::Peer(_) | Identity::Evaluator(_)) => {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "only the publisher reads checkpoints",
                ));
            }
            None => {
                return Err(refused(
                    StatusCode::UNAUTHORIZED,
                    "no or unknown bearer token",
                ));
            }
        }
        let round = round_of(name).ok_or_else(|| {
            refused(
                StatusCode::NOT_FOUND,
                format!("{name}: not a checkpoint name"),
            )
        })?;
        let dir = self
            .shared
            .opts
            .checkpoint_dir
            .as_ref()
            .map(|d| d.join(format!("round-{round:06}")))
            .filter(|d| d.is_dir())
            .ok_or_else(|| (StatusCode::NOT_FOUND, format!("{name}: no such checkpoint")))?;
        Ok(dir)
    }
}

/// `round-000012` → 12; anything else (a path, `..`) is no checkpoint.
fn round_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("round-")?;
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The files a checkpoint publishes: plain files, no hidden or partial ones.
fn files_of(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = vec![];
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata()?;
        if meta.is_file() && !name.starts_with('.') {
            files.push((name, meta.len()));
        }
    }
    files.sort();
    Ok(files)
}

async fn list(
    State(exchange): State<Exchange>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let dir = match exchange.checkpoint(&headers, &name) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    match files_of(&dir) {
        Ok(files) => {
            let files: Vec<_> = files
                .into_iter()
                .map(|(name, size)| serde_json::json!({"name": name, "size": size}))
                .collect();
            let body = serde_json::json!({"files": files}).to_string();
            ([("content-type", "application/json")], body).into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn file(
    State(exchange): State<Exchange>,
    UrlPath((name, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let dir = match exchange.checkpoint(&headers, &name) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let listed = files_of(&dir).unwrap_or_default();
    let Some((_, size)) = listed.iter().find(|(n, _)| *n == file) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("{name}/{file}: no such file"),
        );
    };
    match tokio::fs::File::open(dir.join(&file)).await {
        Ok(f) => {
            let stream = futures::stream::try_unfold(f, |mut f| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 1 << 20];
                let n = f.read(&mut buf).await?;
                buf.truncate(n);
                Ok::<_, std::io::Error>((n > 0).then(|| (Bytes::from(buf), f)))
            });
            (
                [("content-length", size.to_string())],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What a publisher reports.
#[derive(serde::Deserialize)]
struct Report {
    #[serde(default)]
    repo: String,
    #[serde(default)]
    revision: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    error: String,
}

async fn report(
    State(exchange): State<Exchange>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = exchange.checkpoint(&headers, &name) {
        return r.into_response();
    }
    let report: Report = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("not a publication report: {e}"),
            );
        }
    };
    if report.error.is_empty() && (report.repo.is_empty() || report.commit.is_empty()) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a report names the repo and commit, or an error",
        );
    }
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let round = round_of(&name).unwrap_or_default();
    let mut state = exchange.state();
    let failed_before = state.publications.get(&round).map_or(0, |p| p.failures);
    let failures = if report.error.is_empty() {
        0
    } else {
        failed_before + 1
    };
    let publication = proto::Publication {
        round,
        repo: report.repo,
        revision: report.revision,
        commit: report.commit,
        url: report.url,
        at_ms,
        error: report.error,
        failures,
    };
    state.publications.insert(round, publication);
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_round_directories_are_checkpoint_names() {
        assert_eq!(round_of("round-000012"), Some(12));
        for bad in [
            "round-12",
            "round-00001a",
            "..",
            "round-000012/..",
            "state",
            "round-0000123",
        ] {
            assert_eq!(round_of(bad), None, "{bad}");
        }
    }
}
