//! OpenAPI v3, as much as kubectl uses: the index of group-versions, and per group-version
//! the resource paths (whose PATCH accepts `fieldValidation`, so kubectl leaves
//! validation to the server) and each kind's schema (what `kubectl explain` reads).

use serde_json::{Map, Value, json};

use super::registry::{Registry, ResourceType};

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: where each group-version's document is.
pub fn index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for t in registry.types() {
        let gv = group_version_path(&t.group, &t.version);
        let url = format!("/openapi/v3/{gv}?hash={}", registry.generation());
        paths.insert(gv, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// The schema name of a kind: the group reversed, then version and kind
/// (`dev.starling.v1alpha1.TrainingRun`, `io.k8s.api.core.v1.Pod`).
fn schema_name(t: &ResourceType) -> String {
    let group = if t.group.is_empty() {
        "io.k8s.api.core".to_owned()
    } else {
        t.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", t.version, t.kind)
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry
        .types()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in types {
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let mut schema = t.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        let name = schema_name(t);
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        schemas.insert(name, schema);
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let parameters = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let operation = |verb: &str| {
            json!({"x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk,
                   "parameters": parameters, "responses": ok})
        };
        let prefix = format!("/{}", group_version_path(&t.group, &t.version));
        let collection = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("{prefix}/{}", t.plural)
        };
        paths.insert(
            collection.clone(),
            json!({"get": operation("list"), "post": operation("post")}),
        );
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"get": operation("get"), "put": operation("put"),
                   "patch": operation("patch"), "delete": operation("delete")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
