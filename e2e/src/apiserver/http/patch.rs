//! PATCH: merge, strategic merge and JSON patches, and server-side apply.

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::Value;

use super::super::error::ApiError;
use super::super::shape::Shape;
use super::super::store::{Part, Store, now};
use super::super::{managed, strategic};
use super::request::{parse_body, validation, write};
use super::write::after_write;
use super::{Call, json_response, param};

/// PATCH on an object (or its status).
pub(super) fn patch(call: &Call, name: &str, body: &Bytes) -> Result<Response, ApiError> {
    let (patched, status) = write(call.server, call.dry_run, |store| {
        patched(store, call, name, body)
    })?;
    if !call.dry_run {
        after_write(call.server, call.t, &patched)?;
    }
    Ok(json_response(status, &patched))
}

/// Applies a patch of the request's content type to what is stored. Server-side apply
/// creates the object when it does not exist and tracks field ownership
/// ([`managed::apply`]); every other patch is an update by the call's manager.
fn patched(
    store: &mut Store,
    call: &Call,
    name: &str,
    body: &Bytes,
) -> Result<(Value, StatusCode), ApiError> {
    let (t, ns, part, q) = (call.t, call.ns, call.part, call.q);
    let content_type = call
        .headers
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
        return apply(store, call, name, body, force);
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
    merge(call, name, media, body, &mut object)?;
    // A patch is made against what is stored: only an explicit resourceVersion in the
    // patch itself is checked.
    if object["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
        && let Some(m) = object["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    managed::record_update(t, part, &call.manager, Some(&current), &mut object, &now());
    Ok((
        store.update(t, ns, name, object, part, validation(q))?,
        StatusCode::OK,
    ))
}

/// Server-side apply: creates the object, or merges the caller's configuration into it
/// with field ownership.
fn apply(
    store: &mut Store,
    call: &Call,
    name: &str,
    body: &Bytes,
    force: bool,
) -> Result<(Value, StatusCode), ApiError> {
    let (t, ns, part, q) = (call.t, call.ns, call.part, call.q);
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
    let config = parse_body(call.headers, body)?;
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
    match live {
        None => {
            call.authorize_create(store)?;
            Ok((
                store.create(t, ns, object, validation(q))?,
                StatusCode::CREATED,
            ))
        }
        Some(_) => Ok((
            store.update(t, ns, name, object, part, validation(q))?,
            StatusCode::OK,
        )),
    }
}

/// Applies a merge, strategic merge or JSON patch (`media`) to `object`.
fn merge(
    call: &Call,
    name: &str,
    media: &str,
    body: &Bytes,
    object: &mut Value,
) -> Result<(), ApiError> {
    let t = call.t;
    match media {
        "application/merge-patch+json" => {
            let patch = parse_body(call.headers, body)?;
            json_patch::merge(object, &patch);
        }
        // As on a real server, custom resources have no strategic merge information.
        "application/strategic-merge-patch+json" if t.schema.is_none() => {
            let patch = parse_body(call.headers, body)?;
            strategic::merge(object, &patch, Shape::root(None));
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
            json_patch::patch(object, &ops).map_err(|e| {
                ApiError::invalid(&t.kind, name, vec![("patch".into(), e.to_string())])
            })?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    Ok(())
}
