//! The kubelet's log endpoint, `GET /containerLogs/<namespace>/<pod>/<container>`, which
//! the API server proxies `kubectl logs` to (a real kubelet serves it on port 10250).
//! It understands `tailLines`, `limitBytes` and `follow`; following ends once the
//! container is no longer running and its log has been read to the end.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::apiserver::{param, query};

#[derive(Clone)]
struct Logs {
    work_dir: PathBuf,
    client: Client,
}

/// Serves the endpoint on `listener` for the pods under `work_dir`.
pub async fn serve(listener: tokio::net::TcpListener, work_dir: PathBuf, client: Client) {
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(Logs { work_dir, client });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("process kubelet: log endpoint: {e}");
    }
}

/// A namespace, pod or container name: nothing that could leave the work directory.
fn is_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

async fn handle(State(logs): State<Logs>, uri: Uri) -> Response {
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = segments.as_slice() else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {}", uri.path()),
        );
    };
    if ![ns, pod, container].iter().all(|s| is_name(s)) {
        return refuse(StatusCode::BAD_REQUEST, "invalid name".into());
    }
    let q = query(&uri);
    let number = |name: &str| param(&q, name).and_then(|v| v.parse::<usize>().ok());
    let (tail_lines, limit) = (number("tailLines"), number("limitBytes"));
    let follow = matches!(param(&q, "follow"), Some("true" | "1"));
    let path = logs
        .work_dir
        .join(format!("{ns}_{pod}"))
        .join(format!("{container}.log"));
    let Ok(log) = tokio::fs::read(&path).await else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("container \"{container}\" in pod \"{pod}\" is waiting to start"),
        );
    };
    let start = tail_lines.map_or(0, |n| tail(&log, n));
    let mut first = log[start..].to_vec();
    if let Some(limit) = limit {
        first.truncate(limit);
    }
    if !follow {
        return ([(header::CONTENT_TYPE, "text/plain")], first).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let pods: Api<Pod> = Api::namespaced(logs.client, ns);
    let (pod, container) = (pod.to_string(), container.to_string());
    tokio::spawn(async move {
        let mut offset = log.len() as u64;
        let mut left = limit.map(|l| l - first.len());
        if tx.send(Ok(Bytes::from(first))).await.is_err() {
            return;
        }
        let mut idle = 0u32;
        loop {
            let mut chunk = read_from(&path, offset).await;
            if let Some(left) = &mut left {
                chunk.truncate(*left);
                *left -= chunk.len();
            }
            if !chunk.is_empty() {
                offset += chunk.len() as u64;
                idle = 0;
                if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                    return;
                }
                continue;
            }
            if left == Some(0) {
                return;
            }
            // Asking the API whether the container still runs once a second is enough.
            idle += 1;
            if idle.is_multiple_of(5) && !running(&pods, &pod, &container).await {
                let rest = read_from(&path, offset).await;
                if !rest.is_empty() {
                    let _ = tx.send(Ok(Bytes::from(rest))).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("a valid response")
}

/// Where the last `lines` lines of `log` start.
fn tail(log: &[u8], lines: usize) -> usize {
    if lines == 0 {
        return log.len();
    }
    let end = log.len() - usize::from(log.ends_with(b"\n"));
    let mut seen = 0;
    for i in (0..end).rev() {
        if log[i] == b'\n' {
            seen += 1;
            if seen == lines {
                return i + 1;
            }
        }
    }
    0
}

/// The log from `offset` to its current end.
async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    let mut out = vec![];
    if let Ok(mut file) = tokio::fs::File::open(path).await
        && file.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
    {
        let _ = file.read_to_end(&mut out).await;
    }
    out
}

async fn running(pods: &Api<Pod>, pod: &str, container: &str) -> bool {
    let Ok(pod) = pods.get(pod).await else {
        return false;
    };
    pod.status
        .and_then(|s| s.container_statuses)
        .into_iter()
        .flatten()
        .any(|c| c.name == container && c.state.is_some_and(|s| s.running.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_count_lines_from_the_end() {
        let log = b"one\ntwo\nthree\n";
        assert_eq!(&log[tail(log, 1)..], b"three\n");
        assert_eq!(&log[tail(log, 2)..], b"two\nthree\n");
        assert_eq!(&log[tail(log, 9)..], log);
        assert_eq!(&log[tail(log, 0)..], b"");
        assert_eq!(&b"a\npartial"[tail(b"a\npartial", 1)..], b"partial");
    }

    #[test]
    fn names_cannot_climb_out_of_the_work_directory() {
        assert!(is_name("starling-member-cloud-eu"));
        assert!(is_name("p0.x"));
        assert!(!is_name(".."));
        assert!(!is_name(""));
        assert!(!is_name("a%2F.."));
    }
}
