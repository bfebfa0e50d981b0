//! Watches: the requested history (or, without a resourceVersion, the current objects as
//! ADDED), then live changes, as newline-delimited JSON events.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::super::ApiServer;
use super::super::error::ApiError;
use super::super::registry::ResourceType;
use super::super::selector::Selector;
use super::super::store::{Change, Store};
use super::param;

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// What a watch sees: one resource type, in a namespace or all, through a selector.
struct Scope {
    t: ResourceType,
    namespace: Option<String>,
    selector: Selector,
}

impl Scope {
    fn sees(&self, c: &Change) -> bool {
        c.group == self.t.group
            && c.plural == self.t.plural
            && self.namespace.as_ref().is_none_or(|n| *n == c.namespace)
            && self.selector.matches(&c.object)
    }
}

/// A watch. A resourceVersion older than the change log gets an ERROR event with 410,
/// as a real server sends.
pub(super) fn watch(
    server: &ApiServer,
    t: &ResourceType,
    namespace: Option<&str>,
    selector: Selector,
    q: &[(String, String)],
) -> Result<Response, ApiError> {
    let scope = Scope {
        t: t.clone(),
        namespace: namespace.map(str::to_owned),
        selector,
    };
    let bookmarks = matches!(param(q, "allowWatchBookmarks"), Some("true" | "1"));
    let streaming = matches!(param(q, "sendInitialEvents"), Some("true" | "1"));
    if streaming && !bookmarks {
        return Err(ApiError::invalid(
            "ListOptions.meta.k8s.io",
            "",
            vec![(
                "sendInitialEvents".into(),
                "Forbidden: sendInitialEvents is forbidden for watch unless the \
                 allowWatchBookmarks option is set"
                    .into(),
            )],
        ));
    }
    let timeout = param(q, "timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (initial, changes, last) = {
        let store = server.store();
        let changes = store.subscribe();
        match initial(&store, &scope, q) {
            Ok(initial) => (initial, changes, store.resource_version()),
            Err(gone) => {
                let line = watch_line("ERROR", &gone.status());
                return Ok(stream_response(Body::from(line)));
            }
        }
    };
    let mut epoch = server.inner.watch_epoch.subscribe();
    epoch.mark_unchanged();
    let (tx, out) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let watch = Follow {
        scope,
        changes,
        epoch,
        last,
        bookmarks,
        timeout,
        tx,
    };
    tokio::spawn(watch.run(initial));
    Ok(stream_response(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(out),
    )))
}

/// The current objects as ADDED events.
fn current(store: &Store, scope: &Scope) -> Vec<Bytes> {
    store
        .list(&scope.t, scope.namespace.as_deref())
        .iter()
        .filter(|o| scope.selector.matches(o))
        .map(|o| watch_line("ADDED", o))
        .collect()
}

/// The watch's first events: with `sendInitialEvents` (a streaming list, client-go's
/// WatchList), the current objects then a bookmark annotated
/// `k8s.io/initial-events-end`, which tells the client its list is complete; otherwise
/// the changes since the requested resourceVersion, or the current objects.
fn initial(store: &Store, scope: &Scope, q: &[(String, String)]) -> Result<Vec<Bytes>, ApiError> {
    if matches!(param(q, "sendInitialEvents"), Some("true" | "1")) {
        let mut lines = current(store, scope);
        let end = json!({"kind": scope.t.kind, "apiVersion": scope.t.api_version(),
            "metadata": {"resourceVersion": store.resource_version().to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"}}});
        lines.push(watch_line("BOOKMARK", &end));
        return Ok(lines);
    }
    match param(q, "resourceVersion").and_then(|v| v.parse::<u64>().ok()) {
        Some(rv) if rv > 0 => Ok(store
            .changes_since(&scope.t, rv)?
            .iter()
            .filter(|c| scope.sees(c))
            .map(|c| watch_line(c.kind, &c.object))
            .collect()),
        _ => Ok(current(store, scope)),
    }
}

/// A watch after its first events: live changes (and bookmarks, if asked for) until
/// its timeout, until the client goes, or until the server drops every watch.
struct Follow {
    scope: Scope,
    changes: broadcast::Receiver<Change>,
    epoch: tokio::sync::watch::Receiver<u64>,
    /// The last resourceVersion seen, for bookmarks.
    last: u64,
    bookmarks: bool,
    timeout: Duration,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
}

impl Follow {
    async fn run(mut self, initial: Vec<Bytes>) {
        for line in initial {
            if self.tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut bookmark = tokio::time::interval(Duration::from_secs(5));
        let api_version = self.scope.t.api_version();
        loop {
            // Biased: a cut watch must not deliver changes made after the cut.
            let line = tokio::select! {
                biased;
                _ = self.epoch.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = bookmark.tick(), if self.bookmarks => {
                    let object = json!({"kind": self.scope.t.kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": self.last.to_string()}});
                    watch_line("BOOKMARK", &object)
                }
                change = self.changes.recv() => match change {
                    Ok(c) => {
                        self.last = self.last.max(c.rv);
                        if !self.scope.sees(&c) {
                            continue;
                        }
                        watch_line(c.kind, &c.object)
                    }
                    // Too slow to keep up: end the watch; the client resumes or relists.
                    Err(_) => return,
                },
            };
            if self.tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    }
}

fn stream_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response")
}
