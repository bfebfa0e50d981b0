//! DELETE: one object, or (deletecollection) every one the selectors match.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::super::error::ApiError;
use super::super::selector::Selector;
use super::super::store::{DeleteOptions, Propagation};
use super::request::write;
use super::{Call, json_response, param};

/// DELETE on an object (`name`) or a collection.
pub(super) fn delete(call: &Call, name: Option<&str>, body: &Bytes) -> Result<Response, ApiError> {
    let (server, t, ns, q) = (call.server, call.t, call.ns, call.q);
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let dry_run = call.dry_run || options["dryRun"].as_array().is_some_and(|d| !d.is_empty());
    let options = delete_options(call, &options)?;
    // One object, or (deletecollection) every one the selectors match.
    let names: Vec<String> = match name {
        Some(name) => vec![name.to_owned()],
        None => {
            let selector = Selector::parse(param(q, "labelSelector"), param(q, "fieldSelector"))?;
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
    let body = match name {
        Some(_) => deleted[0].clone(),
        None => json!({
            "kind": format!("{}List", t.kind),
            "apiVersion": t.api_version(),
            "metadata": {"resourceVersion": server.store().resource_version().to_string()},
            "items": deleted,
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// The body's (or the query's) DeleteOptions.
fn delete_options(call: &Call, options: &Value) -> Result<DeleteOptions, ApiError> {
    let q = call.q;
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
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Ok(DeleteOptions {
        propagation,
        grace_period: options["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| param(q, "gracePeriodSeconds")?.parse().ok()),
        uid: text(&options["preconditions"]["uid"]),
        rv: text(&options["preconditions"]["resourceVersion"]),
    })
}
