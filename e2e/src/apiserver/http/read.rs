//! Reads: get one object, or list them (a watch, with `watch=true`).

use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::super::error::ApiError;
use super::super::selector::Selector;
use super::super::table::{Include, table};
use super::{Call, json_response, param, watch};

/// Whether the client asked for a table (as kubectl does to print).
fn wants_table(call: &Call) -> bool {
    call.headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// What a Table's rows carry (`includeObject`).
fn include(call: &Call) -> Include {
    Include::from_query(param(call.q, "includeObject"))
}

/// GET on a collection: the objects the selectors match, or a watch of them.
pub(super) fn list(call: &Call) -> Result<Response, ApiError> {
    let (t, q) = (call.t, call.q);
    let selector = Selector::parse(param(q, "labelSelector"), param(q, "fieldSelector"))?;
    let all_namespaces = !t.namespaced || call.ns.is_empty();
    let namespace = (!all_namespaces).then_some(call.ns);
    if matches!(param(q, "watch"), Some("true" | "1")) {
        return watch::watch(call.server, t, namespace, selector, q);
    }
    let store = call.server.store();
    let items: Vec<Value> = store
        .list(t, namespace)
        .into_iter()
        .filter(|o| selector.matches(o))
        .collect();
    let body = if wants_table(call) {
        table(t, &items, store.resource_version(), include(call))
    } else {
        json!({
            "kind": format!("{}List", t.kind),
            "apiVersion": t.api_version(),
            "metadata": {"resourceVersion": store.resource_version().to_string()},
            "items": items,
        })
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// GET on one object.
pub(super) fn get(call: &Call, name: &str) -> Result<Response, ApiError> {
    let store = call.server.store();
    let object = store.get(call.t, call.ns, name)?;
    if wants_table(call) {
        let table = table(call.t, &[object], store.resource_version(), include(call));
        return Ok(json_response(StatusCode::OK, &table));
    }
    Ok(json_response(StatusCode::OK, &object))
}
