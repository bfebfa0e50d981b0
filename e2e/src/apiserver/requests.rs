//! Request counting, for benchmarks: every request the server receives, by authenticated
//! user, method and resource. Counted before routing, so a refused or failed request
//! counts too; a watch counts once, when it starts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::ApiServer;

/// One kind of request: who sent it and what it asked for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    /// The authenticated user's name, or `anonymous`.
    pub user: String,
    /// The HTTP method, with `WATCH` for a GET with `watch=true`.
    pub verb: String,
    /// The resource's plural (with `/subresource`), or the path for anything else.
    pub resource: String,
}

#[derive(Default)]
pub(super) struct Counts(Mutex<HashMap<RequestKey, u64>>);

impl Counts {
    fn add(&self, key: RequestKey) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub(super) fn snapshot(&self) -> BTreeMap<RequestKey, u64> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// The middleware: counts the request, then serves it.
pub(super) async fn count(
    State(server): State<ApiServer>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = server
        .inner
        .tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .authenticate(token)
        .map_or_else(|_| "anonymous".to_owned(), |u| u.name);
    let watching = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = if watching {
        "WATCH".to_owned()
    } else {
        request.method().as_str().to_owned()
    };
    let resource = resource_of(request.uri().path());
    server.inner.requests.add(RequestKey {
        user,
        verb,
        resource,
    });
    next.run(request).await
}

/// `pods`, `trainingruns/status`, … from a resource path; other paths as they are.
pub fn resource_of(path: &str) -> String {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segments.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return path.to_owned(),
    };
    let rest = match rest {
        ["namespaces", _, resource, tail @ ..] => {
            return with_subresource(resource, tail);
        }
        rest => rest,
    };
    match rest {
        [] => path.to_owned(),
        [resource, tail @ ..] => with_subresource(resource, tail),
    }
}

fn with_subresource(resource: &str, tail: &[&str]) -> String {
    match tail {
        [_, sub, ..] => format!("{resource}/{sub}"),
        _ => resource.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::resource_of;

    #[test]
    fn resources_from_paths() {
        assert_eq!(resource_of("/api/v1/namespaces/a/pods/p"), "pods");
        assert_eq!(resource_of("/api/v1/namespaces/a/pods"), "pods");
        assert_eq!(resource_of("/api/v1/namespaces"), "namespaces");
        assert_eq!(resource_of("/api/v1/namespaces/a"), "namespaces");
        assert_eq!(
            resource_of("/apis/starling.dev/v1alpha1/namespaces/d/trainingruns/r/status"),
            "trainingruns/status"
        );
        assert_eq!(
            resource_of("/apis/starling.dev/v1alpha1/trainergroups"),
            "trainergroups"
        );
        assert_eq!(
            resource_of("/apis/starling.dev/v1alpha1/memberclusters/m/status"),
            "memberclusters/status"
        );
        assert_eq!(resource_of("/apis"), "/apis");
        assert_eq!(resource_of("/version"), "/version");
    }
}
