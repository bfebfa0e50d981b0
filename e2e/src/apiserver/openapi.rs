//! OpenAPI v3, as much as kubectl uses (and the same as one v2 document for older clients): the index of group-versions, and per group-version
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

/// The two OpenAPI dialects the server writes: where schemas live and how an operation
/// names its parameters' and response's types.
#[derive(Clone, Copy)]
enum Dialect {
    V2,
    V3,
}

/// Paths and schemas for `types` in `dialect`.
fn documents<'a>(
    types: impl Iterator<Item = &'a ResourceType>,
    dialect: Dialect,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in types {
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let mut schema = t.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        let name = schema_name(t);
        let (ok, parameter) = match dialect {
            Dialect::V3 => {
                let reference = json!({"$ref": format!("#/components/schemas/{name}")});
                let ok = json!({"200": {"description": "OK",
                    "content": {"application/json": {"schema": reference}}}});
                (
                    ok,
                    json!({"in": "query", "schema": {"type": "string", "uniqueItems": true}}),
                )
            }
            Dialect::V2 => {
                let reference = json!({"$ref": format!("#/definitions/{name}")});
                let ok = json!({"200": {"description": "OK", "schema": reference}});
                (
                    ok,
                    json!({"in": "query", "type": "string", "uniqueItems": true}),
                )
            }
        };
        schemas.insert(name, schema);
        let parameters: Vec<Value> = ["fieldValidation", "fieldManager", "dryRun"]
            .iter()
            .map(|name| {
                let mut p = parameter.clone();
                p["name"] = json!(name);
                p
            })
            .collect();
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
    (paths, schemas)
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut types = registry
        .types()
        .filter(|t| t.group == group && t.version == version)
        .peekable();
    types.peek()?;
    let (paths, schemas) = documents(types, Dialect::V3);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `/openapi/v2`: every kind in one Swagger 2.0 document, for clients older than
/// OpenAPI v3 (served as JSON only; clients that accept only the protobuf form get 406,
/// as a server without it answers).
pub fn v2(registry: &Registry) -> Value {
    let (paths, definitions) = documents(registry.types(), Dialect::V2);
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "definitions": definitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v3_describe_the_same_kinds_each_in_its_own_dialect() {
        let registry = Registry::builtin();
        let v2 = v2(&registry);
        assert_eq!(v2["swagger"], "2.0");
        let deployment = &v2["definitions"]["apps.v1.Deployment"];
        assert_eq!(
            deployment["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let get = &v2["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["get"];
        assert_eq!(
            get["responses"]["200"]["schema"]["$ref"],
            "#/definitions/apps.v1.Deployment"
        );
        assert_eq!(get["parameters"][0]["type"], "string");
        let v3 = group_version(&registry, "apps", "v1").unwrap();
        let get = &v3["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["get"];
        let content = &get["responses"]["200"]["content"]["application/json"];
        assert_eq!(
            content["schema"]["$ref"],
            "#/components/schemas/apps.v1.Deployment"
        );
        assert!(group_version(&registry, "apps", "v9").is_none());
    }
}
