//! Kubernetes' protobuf encoding, for the requests kubectl sends that way: `kubectl
//! create namespace|secret|configmap|serviceaccount` and `kubectl auth can-i`. A body is
//! the `k8s\0` magic and a `runtime.Unknown` carrying the kind and the object's own
//! message, which is turned into the JSON form the rest of the server works on. Other
//! kinds are refused (415), so nothing is stored half-read.

use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use serde_json::{Map, Value, json};

/// Why a protobuf body was not read.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// A kind this server cannot read in protobuf (415).
    Kind(String),
    /// Not a valid encoding (400).
    Malformed(String),
}

/// The JSON form of a protobuf-encoded object, or why it cannot be read.
pub fn decode(body: &[u8]) -> Result<Value, Refused> {
    let body = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| Refused::Malformed("a protobuf body starts with the k8s\\0 magic".into()))?;
    let unknown =
        Unknown::decode(body).map_err(|e| Refused::Malformed(format!("runtime.Unknown: {e}")))?;
    let meta = unknown.type_meta.unwrap_or_default();
    let raw = unknown.raw.as_slice();
    let bad = |e: prost::DecodeError| Refused::Malformed(format!("{}: {e}", meta.kind));
    let mut object = match meta.kind.as_str() {
        "Namespace" => {
            let ns = Namespace::decode(raw).map_err(bad)?;
            let mut o = json!({"metadata": metadata(ns.metadata)});
            if let Some(spec) = ns.spec.filter(|s| !s.finalizers.is_empty()) {
                o["spec"] = json!({"finalizers": spec.finalizers});
            }
            o
        }
        "Secret" => {
            let s = Secret::decode(raw).map_err(bad)?;
            let mut o = json!({"metadata": metadata(s.metadata), "data": base64_map(s.data)});
            if !s.string_data.is_empty() {
                o["stringData"] = json!(s.string_data);
            }
            optional(&mut o, "type", s.type_.map(Value::from));
            optional(&mut o, "immutable", s.immutable.map(Value::from));
            o
        }
        "ConfigMap" => {
            let c = ConfigMap::decode(raw).map_err(bad)?;
            let mut o = json!({"metadata": metadata(c.metadata), "data": c.data});
            if !c.binary_data.is_empty() {
                o["binaryData"] = base64_map(c.binary_data);
            }
            optional(&mut o, "immutable", c.immutable.map(Value::from));
            o
        }
        "ServiceAccount" => {
            let sa = ServiceAccount::decode(raw).map_err(bad)?;
            let mut o = json!({"metadata": metadata(sa.metadata)});
            if !sa.image_pull_secrets.is_empty() {
                let names: Vec<Value> = sa
                    .image_pull_secrets
                    .into_iter()
                    .map(|r| json!({"name": r.name}))
                    .collect();
                o["imagePullSecrets"] = Value::Array(names);
            }
            optional(
                &mut o,
                "automountServiceAccountToken",
                sa.automount.map(Value::from),
            );
            o
        }
        "SelfSubjectAccessReview" => {
            let review = Review::decode(raw).map_err(bad)?;
            let a = review
                .spec
                .and_then(|s| s.resource_attributes)
                .unwrap_or_default();
            json!({"spec": {"resourceAttributes": {
                "namespace": a.namespace, "verb": a.verb, "group": a.group,
                "version": a.version, "resource": a.resource,
                "subresource": a.subresource, "name": a.name}}})
        }
        other => {
            return Err(Refused::Kind(format!(
                "{other} in protobuf is not supported by this server; send it as JSON \
                 (kubectl apply does)"
            )));
        }
    };
    object["apiVersion"] = json!(meta.api_version);
    object["kind"] = json!(meta.kind);
    Ok(object)
}

fn optional(object: &mut Value, field: &str, value: Option<Value>) {
    if let Some(v) = value {
        object[field] = v;
    }
}

fn base64_map(map: BTreeMap<String, Vec<u8>>) -> Value {
    let engine = base64::engine::general_purpose::STANDARD;
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, Value::from(engine.encode(v))))
            .collect(),
    )
}

fn metadata(meta: Option<ObjectMeta>) -> Value {
    let meta = meta.unwrap_or_default();
    let mut out = Map::new();
    let mut text = |k: &str, v: String| {
        if !v.is_empty() {
            out.insert(k.into(), Value::from(v));
        }
    };
    text("name", meta.name);
    text("generateName", meta.generate_name);
    text("namespace", meta.namespace);
    if !meta.labels.is_empty() {
        out.insert("labels".into(), json!(meta.labels));
    }
    if !meta.annotations.is_empty() {
        out.insert("annotations".into(), json!(meta.annotations));
    }
    if !meta.finalizers.is_empty() {
        out.insert("finalizers".into(), json!(meta.finalizers));
    }
    Value::Object(out)
}

// The messages, with the field numbers of k8s.io/api's generated.proto. Only what the
// kinds above carry when a client creates them; server-set metadata is not read.

#[derive(prost::Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", tag = "2")]
    raw: Vec<u8>,
}

#[derive(prost::Message)]
struct TypeMeta {
    #[prost(string, tag = "1")]
    api_version: String,
    #[prost(string, tag = "2")]
    kind: String,
}

#[derive(prost::Message)]
struct ObjectMeta {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    generate_name: String,
    #[prost(string, tag = "3")]
    namespace: String,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(string, repeated, tag = "14")]
    finalizers: Vec<String>,
}

#[derive(prost::Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<NamespaceSpec>,
}

#[derive(prost::Message)]
struct NamespaceSpec {
    #[prost(string, repeated, tag = "1")]
    finalizers: Vec<String>,
}

#[derive(prost::Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    type_: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

#[derive(prost::Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(prost::Message)]
struct ServiceAccount {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "3")]
    image_pull_secrets: Vec<LocalObjectReference>,
    #[prost(bool, optional, tag = "4")]
    automount: Option<bool>,
}

#[derive(prost::Message)]
struct LocalObjectReference {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(prost::Message)]
struct Review {
    #[prost(message, optional, tag = "2")]
    spec: Option<ReviewSpec>,
}

#[derive(prost::Message)]
struct ReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
}

#[derive(prost::Message)]
struct ResourceAttributes {
    #[prost(string, tag = "1")]
    namespace: String,
    #[prost(string, tag = "2")]
    verb: String,
    #[prost(string, tag = "3")]
    group: String,
    #[prost(string, tag = "4")]
    version: String,
    #[prost(string, tag = "5")]
    resource: String,
    #[prost(string, tag = "6")]
    subresource: String,
    #[prost(string, tag = "7")]
    name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: "v1".into(),
                kind: kind.into(),
            }),
            raw,
        };
        let mut body = b"k8s\0".to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn a_secret_reads_as_its_json_form() {
        let secret = Secret {
            metadata: Some(ObjectMeta {
                name: "hf-token".into(),
                labels: [("app".to_owned(), "starling".to_owned())].into(),
                ..Default::default()
            }),
            data: [("token".to_owned(), b"hf_secret".to_vec())].into(),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let object = decode(&wrapped("Secret", secret.encode_to_vec())).unwrap();
        assert_eq!(
            object,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "hf-token", "labels": {"app": "starling"}},
                "data": {"token": "aGZfc2VjcmV0"}})
        );
    }

    #[test]
    fn other_kinds_and_garbage_are_refused_with_a_reason() {
        let Err(Refused::Kind(err)) = decode(&wrapped("Pod", vec![])) else {
            panic!("a Pod is not read")
        };
        assert!(err.starts_with("Pod in protobuf is not supported"), "{err}");
        let Err(Refused::Malformed(err)) = decode(b"{}") else {
            panic!("JSON is not protobuf")
        };
        assert!(err.contains("magic"), "{err}");
        let Err(Refused::Malformed(err)) = decode(&wrapped("Secret", vec![0x0a, 0xff])) else {
            panic!("a truncated Secret is not read")
        };
        assert!(err.starts_with("Secret: "), "{err}");
    }
}
