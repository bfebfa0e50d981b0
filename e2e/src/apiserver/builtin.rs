//! Admission of built-in kinds: the object must deserialise into its k8s-openapi type,
//! and fields that type does not know are unknown fields (dropped, or refused under
//! `fieldValidation=Strict`).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use super::schema::Admission;

fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Paths in `input` that `typed` (its round trip) lost: the unknown fields. Nulls are
/// not fields.
fn lost(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => lost(v, w, &at, out),
                    None if !v.is_null() => out.push(at),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks a built-in object; `None` when the kind is not one this server types.
pub fn admit(group: &str, kind: &str, object: &mut Value) -> Option<Result<Admission, String>> {
    let typed = match (group, kind) {
        ("", "Namespace") => round_trip::<Namespace>(object),
        ("", "Pod") => round_trip::<Pod>(object),
        ("", "Service") => round_trip::<Service>(object),
        ("", "Secret") => round_trip::<Secret>(object),
        ("", "ConfigMap") => round_trip::<ConfigMap>(object),
        ("", "Event") => round_trip::<Event>(object),
        ("", "ServiceAccount") => round_trip::<ServiceAccount>(object),
        ("", "Node") => round_trip::<Node>(object),
        ("events.k8s.io", "Event") => round_trip::<EventV1>(object),
        ("coordination.k8s.io", "Lease") => round_trip::<Lease>(object),
        ("apps", "Deployment") => round_trip::<Deployment>(object),
        ("apps", "ReplicaSet") => round_trip::<ReplicaSet>(object),
        ("batch", "Job") => round_trip::<Job>(object),
        ("policy", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(object),
        ("rbac.authorization.k8s.io", "Role") => round_trip::<Role>(object),
        ("rbac.authorization.k8s.io", "RoleBinding") => round_trip::<RoleBinding>(object),
        ("rbac.authorization.k8s.io", "ClusterRole") => round_trip::<ClusterRole>(object),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(object)
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(object)
        }
        _ => return None,
    };
    Some(typed.map(|typed| {
        let mut admission = Admission::default();
        lost(object, &typed, "", &mut admission.pruned);
        if !admission.pruned.is_empty() {
            *object = typed;
        }
        if (group, kind) == ("", "Secret") {
            fold_string_data(object);
        }
        admission
    }))
}

/// A Secret's `stringData` is write-only: its entries are stored base64-encoded in
/// `data`, overriding the same keys there, and it is never returned.
fn fold_string_data(secret: &mut Value) {
    use base64::Engine;
    let Some(Value::Object(strings)) = secret.as_object_mut().and_then(|s| s.remove("stringData"))
    else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = Value::Object(Default::default());
    }
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default();
        secret["data"][key] = Value::String(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secret_string_data_is_stored_as_data() {
        let mut secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"b": "hi"}});
        admit("", "Secret", &mut secret).unwrap().unwrap();
        assert_eq!(secret["data"], json!({"a": "eA==", "b": "aGk="}));
        assert!(secret.get("stringData").is_none());
    }

    #[test]
    fn unknown_fields_of_built_in_kinds_are_found_and_dropped() {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "imagePolicy": "x"}],
                     "restartPolicy": "Never", "nodeName": null}});
        let admission = admit("", "Pod", &mut pod).unwrap().unwrap();
        assert_eq!(admission.pruned, ["spec.containers[0].imagePolicy"]);
        assert!(pod["spec"]["containers"][0].get("imagePolicy").is_none());
        let mut bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": "not a list"}});
        assert!(admit("", "Pod", &mut bad).unwrap().is_err());
        assert!(admit("starling.dev", "TrainingRun", &mut bad).is_none());
    }
}
