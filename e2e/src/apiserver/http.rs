//! The HTTP surface: discovery, and every verb on every served resource.
//!
//! This file routes a request (discovery, authentication, authorization, the resource
//! it names); each verb family has its own file: `read` (get, list), `write` (create,
//! update), `patch`, `delete` and `watch`, with what they share in `request`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{self, Attributes, User};
use super::error::ApiError;
use super::registry::{Registry, ResourceType};
use super::store::{Part, Store, resource_name};
use super::{ApiServer, logs, openapi};

mod delete;
mod patch;
mod read;
mod request;
mod watch;
mod write;

pub(super) use write::default_service_account;

use request::{dry_run, field_manager, parse_body};

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

/// Discovery: the version, API groups and OpenAPI documents; `None` for a resource's
/// path.
fn discovery(
    server: &ApiServer,
    segments: &[&str],
    path: &str,
    headers: &HeaderMap,
) -> Option<Result<Response, ApiError>> {
    let ok = |v: &Value| Ok(json_response(StatusCode::OK, v));
    let found = |doc: Option<Value>| {
        doc.map(|doc| json_response(StatusCode::OK, &doc))
            .ok_or_else(|| ApiError::no_route(path))
    };
    Some(match segments {
        ["version"] => ok(&version_info()),
        ["api"] => ok(&json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})),
        ["openapi", "v2"] if !accepts_json(headers) => Err(ApiError::not_acceptable(
            "only application/json is served at /openapi/v2",
        )),
        ["openapi", "v2"] => ok(&openapi::v2(&server.registry())),
        ["openapi", "v3"] => ok(&openapi::index(&server.registry())),
        ["openapi", "v3", "api", version] => {
            found(openapi::group_version(&server.registry(), "", version))
        }
        ["openapi", "v3", "apis", group, version] => {
            found(openapi::group_version(&server.registry(), group, version))
        }
        ["apis"] => ok(&server.registry().group_list()),
        ["api", "v1"] => found(server.registry().resource_list("", "v1")),
        ["apis", group, version] => found(server.registry().resource_list(group, version)),
        _ => return None,
    })
}

/// Whether the request takes JSON: no `Accept`, or one naming JSON or anything.
fn accepts_json(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    accept.is_none_or(|a| a.contains("json") || a.contains("*/*"))
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
    if let Some(response) = discovery(server, &segments, path, headers) {
        return response;
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route(path)),
    };
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
    let allowed = auth::allowed(&server.store(), &user, &attributes);
    server.inner.decisions.record(&user, &attributes, allowed);
    if !allowed {
        return Err(attributes.forbidden(&user));
    }
    check_escalation(server, &user, &attributes, headers, &body)?;
    resource(
        server,
        method,
        headers,
        body,
        target,
        &q,
        (&user, &attributes),
    )
    .await
}

/// A write of a role or binding may grant only what its caller holds (see
/// [`auth::may_grant`]). Checked on creates, updates and applies, whose bodies are the
/// whole object; merge and JSON patches of RBAC objects are not checked.
fn check_escalation(
    server: &ApiServer,
    user: &User,
    a: &Attributes,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), ApiError> {
    let whole = match a.verb.as_str() {
        "create" | "update" => true,
        "patch" => headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/apply-patch")),
        _ => false,
    };
    if !whole || a.group != "rbac.authorization.k8s.io" {
        return Ok(());
    }
    let object = parse_body(headers, body)?;
    let store = server.store();
    match auth::granted_rules(&store, a, &object) {
        Some(rules) => auth::may_grant(&store, &server.inner.decisions, user, a, &rules),
        None => Ok(()),
    }
}

/// TokenRequest (`kubectl create token`): a bound token for the ServiceAccount, valid
/// for `spec.expirationSeconds` (default an hour, at least ten minutes, as a real server
/// holds them).
fn token_request(
    server: &ApiServer,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    server
        .store()
        .get_raw("", "serviceaccounts", ns, name)
        .ok_or_else(|| ApiError::not_found("serviceaccounts", name))?;
    let mut request = parse_body(headers, body)?;
    let seconds = request["spec"]["expirationSeconds"]
        .as_u64()
        .unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::invalid(
            "TokenRequest.authentication.k8s.io",
            name,
            vec![(
                "spec.expirationSeconds".into(),
                format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
            )],
        ));
    }
    let issued = std::time::SystemTime::now();
    let expires = issued + std::time::Duration::from_secs(seconds);
    let token = bound_token(ns, name, issued, expires);
    server
        .inner
        .tokens
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert_expiring(token.clone(), User::service_account(ns, name), expires);
    let expiration = chrono::DateTime::<chrono::Utc>::from(expires)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!("TokenRequest");
    request["metadata"] = json!({"name": name, "namespace": ns,
        "creationTimestamp": super::store::now()});
    request["spec"]["expirationSeconds"] = json!(seconds);
    request["status"] = json!({"token": token, "expirationTimestamp": expiration});
    Ok(json_response(StatusCode::CREATED, &request))
}

/// A token shaped as a real server's bound token, a JWT whose claims say who and until
/// when (`sub`, `iat`, `exp`), so clients can read its lifetime; its signature is random
/// bytes, since only this server, which keeps every token it issued, checks it.
fn bound_token(
    ns: &str,
    name: &str,
    issued: std::time::SystemTime,
    expires: std::time::SystemTime,
) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let seconds = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let claims = json!({"iss": "starling-e2e", "sub": format!("system:serviceaccount:{ns}:{name}"),
        "iat": seconds(issued), "exp": seconds(expires)});
    let signature = format!(
        "{:08x}{:08x}{:08x}{:08x}",
        crate::kubelet::rand_u32(),
        crate::kubelet::rand_u32(),
        crate::kubelet::rand_u32(),
        crate::kubelet::rand_u32()
    );
    format!(
        "{}.{}.{signature}",
        b64(&json!({"alg": "RS256", "typ": "JWT"})),
        b64(&claims)
    )
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
        "major": "1", "minor": "32", "gitVersion": "v1.32.0+starling-e2e",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64",
    })
}

/// A request on one resource type, ready for its verb.
struct Call<'a> {
    server: &'a ApiServer,
    t: &'a ResourceType,
    /// The namespace in the path ("" for none).
    ns: &'a str,
    headers: &'a HeaderMap,
    q: &'a [(String, String)],
    /// The object itself or its status.
    part: Part,
    dry_run: bool,
    /// Who is writing (see [`field_manager`]).
    manager: String,
    /// Who called, and what the request was authorised as.
    caller: (&'a User, &'a Attributes),
}

impl Call<'_> {
    /// A write that turns out to create (an apply of an object that does not exist) is
    /// authorised as a create too, as a real API server does: `patch` alone does not
    /// let a caller make new objects.
    fn authorize_create(&self, store: &Store) -> Result<(), ApiError> {
        let (user, asked) = self.caller;
        let create = Attributes {
            verb: "create".into(),
            ..asked.clone()
        };
        let allowed = auth::allowed(store, user, &create);
        self.server.inner.decisions.record(user, &create, allowed);
        if allowed {
            Ok(())
        } else {
            Err(create.forbidden(user))
        }
    }
}

async fn resource(
    server: &ApiServer,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
    target: Target,
    q: &[(String, String)],
    caller: (&User, &Attributes),
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
        Some("token")
            if t.group.is_empty() && t.plural == "serviceaccounts" && method == Method::POST =>
        {
            let name = target.name.as_deref().unwrap_or_default();
            return token_request(server, ns, name, headers, &body);
        }
        Some(other) => {
            return Err(ApiError::no_route(&format!("{}/{other}", t.plural)));
        }
    };
    let call = Call {
        server,
        t,
        ns,
        headers,
        q,
        part,
        dry_run: dry_run(q)?,
        manager: field_manager(q, headers),
        caller,
    };
    match (method, target.name.as_deref()) {
        (&Method::GET, None) => read::list(&call),
        (&Method::GET, Some(name)) => read::get(&call, name),
        (&Method::POST, None) => write::create(&call, &body),
        (&Method::PUT, Some(name)) => write::update(&call, name, &body),
        (&Method::PATCH, Some(name)) => patch::patch(&call, name, &body),
        (&Method::DELETE, name) => delete::delete(&call, name, &body),
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {}",
            resource_name(t)
        ))),
    }
}
