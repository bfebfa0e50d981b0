//! The HTTP surface: discovery, and every verb on every served resource.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{self, Attributes, User};
use super::error::ApiError;
use super::registry::{Registry, ResourceType};
use super::selector::Selector;
use super::shape::Shape;
use super::store::{
    Change, DeleteOptions, FieldValidation, Part, Propagation, Store, now, resource_name,
};
use super::table::table;
use super::{ApiServer, logs, managed, openapi, protobuf, strategic};

pub fn router(server: ApiServer) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(server)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

/// A request on a resource, from its path.
struct Target {
    resource: ResourceType,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

/// A URL's query parameters, decoded.
pub fn query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding (and `+` as space), as query strings are encoded.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

async fn handle(
    State(server): State<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match route(&server, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn route(
    server: &ApiServer,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let path = uri.path();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = server
        .inner
        .tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .authenticate(token)?;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(json_response(StatusCode::OK, &version_info())),
        ["api"] => {
            let versions = json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]});
            return Ok(json_response(StatusCode::OK, &versions));
        }
        ["openapi", "v3"] => {
            let index = openapi::index(&server.registry());
            return Ok(json_response(StatusCode::OK, &index));
        }
        ["openapi", "v3", "api", version] => {
            return openapi::group_version(&server.registry(), "", version)
                .map(|doc| json_response(StatusCode::OK, &doc))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["openapi", "v3", "apis", group, version] => {
            return openapi::group_version(&server.registry(), group, version)
                .map(|doc| json_response(StatusCode::OK, &doc))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["apis"] => {
            return Ok(json_response(
                StatusCode::OK,
                &server.registry().group_list(),
            ));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    if rest.is_empty() {
        return match server.registry().resource_list(group, version) {
            Some(list) => Ok(json_response(StatusCode::OK, &list)),
            None => Err(ApiError::no_route(path)),
        };
    }
    let q = query(uri);
    if group == "authorization.k8s.io"
        && rest == ["selfsubjectaccessreviews"]
        && method == Method::POST
    {
        return access_review(server, &user, headers, &body);
    }
    let target =
        target(&server.registry(), group, version, rest).ok_or_else(|| ApiError::no_route(path))?;
    let watching = matches!(param(&q, "watch"), Some("true" | "1"));
    let attributes = Attributes {
        verb: auth::verb(method, target.name.is_some(), watching).into(),
        group: group.into(),
        resource: target.resource.plural.clone(),
        subresource: target.subresource.clone(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
    };
    if !auth::allowed(&server.store(), &user, &attributes) {
        return Err(attributes.forbidden(&user));
    }
    resource(server, method, headers, body, target, &q).await
}

/// `kubectl auth can-i`: may the caller do what the review describes?
fn access_review(
    server: &ApiServer,
    user: &User,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let mut review = parse_body(headers, body)?;
    let a = &review["spec"]["resourceAttributes"];
    let text = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
    let optional = |k: &str| a[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let attributes = Attributes {
        verb: text("verb"),
        group: text("group"),
        resource: text("resource"),
        subresource: optional("subresource"),
        namespace: text("namespace"),
        name: optional("name"),
    };
    let allowed = auth::allowed(&server.store(), user, &attributes);
    review["status"] = json!({"allowed": allowed});
    Ok(json_response(StatusCode::CREATED, &review))
}

/// Parses `<plural>[/<name>[/<sub>]]` or `namespaces/<ns>/<plural>[/<name>[/<sub>]]`.
fn target(registry: &Registry, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let namespaced = rest.len() >= 3
        && rest[0] == "namespaces"
        && registry
            .find(group, version, rest[2])
            .is_some_and(|t| t.namespaced);
    let (namespace, rest) = if namespaced {
        (rest[1].to_owned(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    let resource = registry.find(group, version, rest[0])?.clone();
    if rest.len() > 3 || (!namespaced && resource.namespaced && rest.len() > 1) {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn version_info() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-starling-e2e",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64",
    })
}

fn validation(q: &[(String, String)]) -> FieldValidation {
    match param(q, "fieldValidation") {
        Some("Strict") => FieldValidation::Strict,
        _ => FieldValidation::Ignore,
    }
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if content_type.contains("protobuf") {
        protobuf::decode(body).map_err(|refused| match refused {
            protobuf::Refused::Kind(reason) => {
                ApiError::unsupported_media_type(&format!("{content_type}: {reason}"))
            }
            protobuf::Refused::Malformed(e) => invalid_body(e),
        })
    } else if content_type.contains("yaml") {
        serde_yaml::from_slice::<Value>(body).map_err(invalid_body)
    } else {
        serde_json::from_slice::<Value>(body).map_err(invalid_body)
    }
}

fn invalid_body(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the request body is not valid: {e}"))
}

/// `dryRun=All`: the write is checked and answered but not kept.
fn dry_run(q: &[(String, String)]) -> Result<bool, ApiError> {
    match param(q, "dryRun") {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "Invalid dry run value {other:?}: valid values are All"
        ))),
    }
}

/// Runs a write on the store or, for a dry run, on a scratch copy of it.
fn write<T>(server: &ApiServer, dry_run: bool, f: impl FnOnce(&mut Store) -> T) -> T {
    if dry_run {
        f(&mut server.store().scratch())
    } else {
        f(&mut server.store())
    }
}

/// Who is writing: `fieldManager`, else the client's User-Agent up to its first `/`
/// (`kubectl`, `kube-rs`), as a real server names managers.
fn field_manager(q: &[(String, String)], headers: &HeaderMap) -> String {
    param(q, "fieldManager")
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            let agent = headers.get(header::USER_AGENT)?.to_str().ok()?;
            let prefix = agent.split('/').next()?.trim();
            (!prefix.is_empty()).then(|| prefix.to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn resource(
    server: &ApiServer,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
    target: Target,
    q: &[(String, String)],
) -> Result<Response, ApiError> {
    let t = &target.resource;
    let ns = target.namespace.as_str();
    let part = match target.subresource.as_deref() {
        None => Part::Main,
        Some("status") if t.status => Part::Status,
        Some("log") if t.group.is_empty() && t.plural == "pods" && method == Method::GET => {
            let name = target.name.as_deref().unwrap_or_default();
            return logs::pod_log(server, ns, name, q).await;
        }
        Some(other) => {
            return Err(ApiError::no_route(&format!("{}/{other}", t.plural)));
        }
    };
    let ok = |v: &Value| Ok(json_response(StatusCode::OK, v));
    let dry_run = dry_run(q)?;
    let manager = field_manager(q, headers);
    match (method, target.name.as_deref()) {
        (&Method::GET, None) => {
            let selector = Selector::parse(param(q, "labelSelector"), param(q, "fieldSelector"))?;
            let all_namespaces = !t.namespaced || target.namespace.is_empty();
            let namespace = (!all_namespaces).then_some(ns);
            if matches!(param(q, "watch"), Some("true" | "1")) {
                return watch(server, t, namespace, selector, q);
            }
            let store = server.store();
            let items: Vec<Value> = store
                .list(t, namespace)
                .into_iter()
                .filter(|o| selector.matches(o))
                .collect();
            if wants_table(headers) {
                return ok(&table(t, &items, store.resource_version()));
            }
            ok(&json!({
                "kind": format!("{}List", t.kind),
                "apiVersion": t.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            }))
        }
        (&Method::GET, Some(name)) => {
            let store = server.store();
            let object = store.get(t, ns, name)?;
            if wants_table(headers) {
                return ok(&table(t, &[object], store.resource_version()));
            }
            ok(&object)
        }
        (&Method::POST, None) => {
            let mut object = parse_body(headers, &body)?;
            managed::record_update(t, Part::Main, &manager, None, &mut object, &now());
            let created = write(server, dry_run, |store| {
                store.create(t, ns, object, validation(q))
            })?;
            if !dry_run {
                after_write(server, t, &created)?;
            }
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::PUT, Some(name)) => {
            let mut object = parse_body(headers, &body)?;
            let updated = write(server, dry_run, |store| {
                let current = store.get(t, ns, name)?;
                managed::record_update(t, part, &manager, Some(&current), &mut object, &now());
                store.update(t, ns, name, object, part, validation(q))
            })?;
            if !dry_run {
                after_write(server, t, &updated)?;
            }
            ok(&updated)
        }
        (&Method::PATCH, Some(name)) => {
            let (patched, status) = write(server, dry_run, |store| {
                patch(store, t, ns, name, part, headers, &body, q, &manager)
            })?;
            if !dry_run {
                after_write(server, t, &patched)?;
            }
            Ok(json_response(status, &patched))
        }
        (&Method::DELETE, name) => {
            let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let policy = options["propagationPolicy"]
                .as_str()
                .or(param(q, "propagationPolicy"));
            let propagation = match policy {
                None | Some("Background") => Propagation::Background,
                Some("Foreground") => Propagation::Foreground,
                Some("Orphan") => Propagation::Orphan,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "unknown propagationPolicy {other:?}"
                    )));
                }
            };
            let dry_run = dry_run || options["dryRun"].as_array().is_some_and(|d| !d.is_empty());
            let text = |v: &Value| v.as_str().map(str::to_owned);
            let options = DeleteOptions {
                propagation,
                grace_period: options["gracePeriodSeconds"]
                    .as_i64()
                    .or_else(|| param(q, "gracePeriodSeconds")?.parse().ok()),
                uid: text(&options["preconditions"]["uid"]),
                rv: text(&options["preconditions"]["resourceVersion"]),
            };
            // One object, or (deletecollection) every one the selectors match.
            let names: Vec<String> = match name {
                Some(name) => vec![name.to_owned()],
                None => {
                    let selector =
                        Selector::parse(param(q, "labelSelector"), param(q, "fieldSelector"))?;
                    let namespace = (t.namespaced && !ns.is_empty()).then_some(ns);
                    server
                        .store()
                        .list(t, namespace)
                        .iter()
                        .filter(|o| selector.matches(o))
                        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
                        .collect()
                }
            };
            let deleted = write(server, dry_run, |store| {
                let mut deleted = vec![];
                for n in &names {
                    match store.delete(t, ns, n, &options) {
                        Ok(object) => deleted.push(object),
                        // Gone with an owner deleted before it.
                        Err(e) if name.is_none() && e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(deleted)
            })?;
            // A CRD that is gone (not held by a finalizer) stops serving its resource.
            let crds_gone = deleted.iter().filter(|o| {
                !dry_run
                    && t.plural == "customresourcedefinitions"
                    && o["metadata"]["deletionTimestamp"].is_null()
            });
            for crd in crds_gone {
                let spec = &crd["spec"];
                server.registry_mut().unregister(
                    spec["group"].as_str().unwrap_or_default(),
                    spec["names"]["plural"].as_str().unwrap_or_default(),
                );
            }
            match name {
                Some(_) => ok(&deleted[0]),
                None => ok(&json!({
                    "kind": format!("{}List", t.kind),
                    "apiVersion": t.api_version(),
                    "metadata": {"resourceVersion": server.store().resource_version().to_string()},
                    "items": deleted,
                })),
            }
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {}",
            resource_name(t)
        ))),
    }
}

/// Applies a patch of the request's content type to what is stored. Server-side apply
/// creates the object when it does not exist and tracks field ownership
/// ([`managed::apply`]); every other patch is an update by `manager`.
#[allow(clippy::too_many_arguments)]
fn patch(
    store: &mut Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    part: Part,
    headers: &HeaderMap,
    body: &Bytes,
    q: &[(String, String)],
    manager: &str,
) -> Result<(Value, StatusCode), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let force = matches!(param(q, "force"), Some("true" | "1"));
    if matches!(
        media,
        "application/apply-patch+yaml" | "application/apply-patch+json"
    ) {
        let Some(manager) = param(q, "fieldManager").filter(|m| !m.is_empty()) else {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                vec![(
                    "fieldManager".into(),
                    "Required value: is required for apply patch".into(),
                )],
            ));
        };
        let config = parse_body(headers, body)?;
        let live = match store.get(t, ns, name) {
            Ok(live) => Some(live),
            Err(e) if part == Part::Status => return Err(e),
            Err(_) => None,
        };
        let now = now();
        let how = managed::Apply {
            name,
            manager,
            force,
            now: &now,
        };
        let object = managed::apply(t, part, &how, live.as_ref(), config)?;
        return match live {
            None => Ok((
                store.create(t, ns, object, validation(q))?,
                StatusCode::CREATED,
            )),
            Some(_) => Ok((
                store.update(t, ns, name, object, part, validation(q))?,
                StatusCode::OK,
            )),
        };
    }
    if force {
        return Err(ApiError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            vec![(
                "force".into(),
                "Forbidden: may not be specified for non-apply patch".into(),
            )],
        ));
    }
    let current = store.get(t, ns, name)?;
    let mut object = current.clone();
    match media {
        "application/merge-patch+json" => {
            let patch = parse_body(headers, body)?;
            json_patch::merge(&mut object, &patch);
        }
        // As on a real server, custom resources have no strategic merge information.
        "application/strategic-merge-patch+json" if t.schema.is_none() => {
            let patch = parse_body(headers, body)?;
            strategic::merge(&mut object, &patch, Shape::root(None));
        }
        "application/json-patch+json" => {
            let mut ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            // As in Kubernetes, testing a missing field against `null` passes (kube-rs's
            // finalizer helper relies on it when an object has no finalizers yet).
            ops.0.retain(|op| match op {
                json_patch::PatchOperation::Test(t) => {
                    !(t.value.is_null() && object.pointer(t.path.as_str()).is_none())
                }
                _ => true,
            });
            json_patch::patch(&mut object, &ops).map_err(|e| {
                ApiError::invalid(&t.kind, name, vec![("patch".into(), e.to_string())])
            })?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    // A patch is made against what is stored: only an explicit resourceVersion in the
    // patch itself is checked.
    if object["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
        && let Some(m) = object["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    managed::record_update(t, part, manager, Some(&current), &mut object, &now());
    Ok((
        store.update(t, ns, name, object, part, validation(q))?,
        StatusCode::OK,
    ))
}

/// Side effects of writing some kinds: a CustomResourceDefinition starts (or changes)
/// serving its resource and reports itself established.
fn after_write(server: &ApiServer, t: &ResourceType, object: &Value) -> Result<(), ApiError> {
    if t.group == "events.k8s.io" && t.kind == "Event" {
        mirror_event(server, object);
        return Ok(());
    }
    if t.plural != "customresourcedefinitions"
        || object["metadata"]["deletionTimestamp"].is_string()
    {
        return Ok(());
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let types = Registry::from_crd(object)
        .map_err(|e| ApiError::invalid(&t.kind, &name, vec![("spec".into(), e)]))?;
    server.registry_mut().register(types);
    if object["status"]["conditions"].is_null() {
        let mut established = object.clone();
        established["status"] = json!({
            "acceptedNames": object["spec"]["names"],
            "storedVersions": object["spec"]["versions"].as_array().map(|v| {
                v.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()
            }),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": object["metadata"]["creationTimestamp"]},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": object["metadata"]["creationTimestamp"]},
            ],
        });
        server.store().update(
            t,
            "",
            &name,
            established,
            Part::Status,
            FieldValidation::Ignore,
        )?;
    }
    Ok(())
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A watch: the requested history (or, without a resourceVersion, the current objects
/// as ADDED), then live changes, as newline-delimited JSON events. A resourceVersion
/// older than the change log gets an ERROR event with 410, as a real server sends.
fn watch(
    server: &ApiServer,
    t: &ResourceType,
    namespace: Option<&str>,
    selector: Selector,
    q: &[(String, String)],
) -> Result<Response, ApiError> {
    let namespace = namespace.map(str::to_owned);
    let in_scope = {
        let (t, namespace) = (t.clone(), namespace.clone());
        move |c: &Change| {
            c.group == t.group
                && c.plural == t.plural
                && namespace.as_ref().is_none_or(|n| *n == c.namespace)
        }
    };
    let bookmarks = matches!(param(q, "allowWatchBookmarks"), Some("true" | "1"));
    let timeout = param(q, "timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (initial, mut rx, mut last) = {
        let store = server.store();
        let rx = store.subscribe();
        let current = store.resource_version();
        let initial: Vec<Bytes> =
            match param(q, "resourceVersion").and_then(|v| v.parse::<u64>().ok()) {
                Some(rv) if rv > 0 => match store.changes_since(t, rv) {
                    Ok(changes) => changes
                        .iter()
                        .filter(|c| in_scope(c) && selector.matches(&c.object))
                        .map(|c| watch_line(c.kind, &c.object))
                        .collect(),
                    Err(gone) => {
                        let line = watch_line("ERROR", &gone.status());
                        let body = Body::from(line);
                        return Ok(stream_response(body));
                    }
                },
                _ => store
                    .list(t, namespace.as_deref())
                    .iter()
                    .filter(|o| selector.matches(o))
                    .map(|o| watch_line("ADDED", o))
                    .collect(),
            };
        (initial, rx, current)
    };
    let mut epoch = server.inner.watch_epoch.subscribe();
    epoch.mark_unchanged();
    let (t, api_version) = (t.clone(), t.api_version());
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark = tokio::time::interval(Duration::from_secs(5));
        loop {
            // Biased: a cut watch must not deliver changes made after the cut.
            let line = tokio::select! {
                biased;
                _ = epoch.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = bookmark.tick(), if bookmarks => {
                    let object = json!({"kind": t.kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last.to_string()}});
                    watch_line("BOOKMARK", &object)
                }
                change = rx.recv() => match change {
                    Ok(c) => {
                        last = last.max(c.rv);
                        if !(in_scope(&c) && selector.matches(&c.object)) {
                            continue;
                        }
                        watch_line(c.kind, &c.object)
                    }
                    // Too slow to keep up: end the watch; the client resumes or relists.
                    Err(_) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    Ok(stream_response(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(out),
    )))
}

fn stream_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response")
}

/// `events.k8s.io/v1` and core `v1` Events are one resource in two shapes on a real
/// server; here a new-style Event is also stored as its core form, so `kubectl describe`
/// (which lists core Events) shows what controllers record.
fn mirror_event(server: &ApiServer, event: &Value) {
    let Some(core) = server.registry().find("", "v1", "events").cloned() else {
        return;
    };
    let meta = &event["metadata"];
    let ns = meta["namespace"].as_str().unwrap_or_default();
    let name = meta["name"].as_str().unwrap_or_default();
    let time = event["eventTime"].clone();
    let first = if event["deprecatedFirstTimestamp"].is_null() {
        time.clone()
    } else {
        event["deprecatedFirstTimestamp"].clone()
    };
    let last = if event["series"]["lastObservedTime"].is_null() {
        first.clone()
    } else {
        event["series"]["lastObservedTime"].clone()
    };
    let seconds = |t: &Value| {
        t.as_str()
            .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
            .unwrap_or(Value::Null)
    };
    let core_event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": ns, "labels": meta["labels"]},
        "involvedObject": event["regarding"],
        "related": event["related"],
        "reason": event["reason"],
        "message": event["note"],
        "type": event["type"],
        "action": event["action"],
        "source": {"component": event["reportingController"]},
        "reportingComponent": event["reportingController"],
        "reportingInstance": event["reportingInstance"],
        "eventTime": time,
        "firstTimestamp": seconds(&first),
        "lastTimestamp": seconds(&last),
        "count": event["series"]["count"].as_i64().unwrap_or(1),
    });
    let mut store = server.store();
    let written = match store.get(&core, ns, name) {
        Ok(_) => store.update(&core, ns, name, core_event, Part::Main, Default::default()),
        Err(_) => store.create(&core, ns, core_event, Default::default()),
    };
    if let Err(e) = written {
        eprintln!("API test server: mirroring event {ns}/{name}: {e:?}");
    }
}
