//! Writes of whole objects: create (POST) and update (PUT), and what writing some kinds
//! sets off.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::super::error::ApiError;
use super::super::registry::{Registry, ResourceType};
use super::super::store::{FieldValidation, Part, now};
use super::super::{ApiServer, managed};
use super::request::{parse_body, validation, write};
use super::{Call, json_response};

/// POST: creates an object.
pub(super) fn create(call: &Call, body: &Bytes) -> Result<Response, ApiError> {
    let (t, ns, q) = (call.t, call.ns, call.q);
    let mut object = parse_body(call.headers, body)?;
    managed::record_update(t, Part::Main, &call.manager, None, &mut object, &now());
    let created = write(call.server, call.dry_run, |store| {
        store.create(t, ns, object, validation(q))
    })?;
    if !call.dry_run {
        after_write(call.server, t, &created)?;
    }
    Ok(json_response(StatusCode::CREATED, &created))
}

/// PUT: replaces an object (or its status).
pub(super) fn update(call: &Call, name: &str, body: &Bytes) -> Result<Response, ApiError> {
    let (t, ns, q, part) = (call.t, call.ns, call.q, call.part);
    let mut object = parse_body(call.headers, body)?;
    let updated = write(call.server, call.dry_run, |store| {
        let current = store.get(t, ns, name)?;
        managed::record_update(t, part, &call.manager, Some(&current), &mut object, &now());
        store.update(t, ns, name, object, part, validation(q))
    })?;
    if !call.dry_run {
        after_write(call.server, t, &updated)?;
    }
    Ok(json_response(StatusCode::OK, &updated))
}

/// Side effects of writing some kinds: a CustomResourceDefinition starts (or changes)
/// serving its resource and reports itself established.
pub(super) fn after_write(
    server: &ApiServer,
    t: &ResourceType,
    object: &Value,
) -> Result<(), ApiError> {
    if t.group == "events.k8s.io" && t.kind == "Event" {
        mirror_event(server, object);
        return Ok(());
    }
    if t.group.is_empty() && t.plural == "namespaces" {
        default_service_account(server, object);
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

/// Every namespace has a ServiceAccount `default`, as a real control plane's
/// ServiceAccount controller makes it, so pods that name none get that one's token.
pub(in super::super) fn default_service_account(server: &ApiServer, namespace: &Value) {
    let Some(t) = server.registry().find("", "v1", "serviceaccounts").cloned() else {
        return;
    };
    let ns = namespace["metadata"]["name"].as_str().unwrap_or_default();
    if namespace["metadata"]["deletionTimestamp"].is_string() || ns.is_empty() {
        return;
    }
    let mut store = server.store();
    if store.get(&t, ns, "default").is_ok() {
        return;
    }
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "default", "namespace": ns}});
    if let Err(e) = store.create(&t, ns, account, Default::default()) {
        eprintln!("API test server: the default ServiceAccount of {ns}: {e:?}");
    }
}
