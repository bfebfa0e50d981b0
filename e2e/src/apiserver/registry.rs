//! The resource types the test server serves: the built-in kinds Starling uses, and the
//! kinds that CustomResourceDefinitions add while it runs.

use std::sync::Arc;

use kube::core::cel::{CompiledSchema, compile_schema};
use serde_json::{Value, json};

/// One served resource type (a group/version/plural).
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `status` is a subresource: the main resource then ignores status changes.
    pub status: bool,
    /// A CRD's `additionalPrinterColumns`, for Table output.
    pub columns: Vec<Value>,
    /// A CRD's `openAPIV3Schema`.
    pub schema: Option<Value>,
    /// Its CEL rules (`x-kubernetes-validations`), compiled once.
    pub rules: Option<Rules>,
}

/// A schema's compiled CEL rules.
#[derive(Clone)]
pub struct Rules(pub Arc<CompiledSchema>);

impl Rules {
    fn compile(schema: &Value) -> Result<Self, String> {
        let compiled = compile_schema(schema);
        let errors = compiled_errors(&compiled);
        if errors.is_empty() {
            Ok(Self(Arc::new(compiled)))
        } else {
            Err(format!("invalid CEL rules: {}", errors.join("; ")))
        }
    }
}

/// Every rule in a compiled schema that did not compile.
fn compiled_errors(schema: &CompiledSchema) -> Vec<String> {
    let mut out: Vec<String> = schema
        .compilation_errors()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let children = schema
        .properties
        .values()
        .chain(schema.items.as_deref())
        .chain(schema.additional_properties.as_deref())
        .chain(&schema.all_of)
        .chain(&schema.one_of)
        .chain(&schema.any_of);
    for child in children {
        out.extend(compiled_errors(child));
    }
    out
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rules(..)")
    }
}

/// Rules are derived from the schema, which the type compares already.
impl PartialEq for Rules {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The type's entry in an `APIResourceList`, with its subresources after it.
    fn discovery(&self) -> Vec<Value> {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        let mut entry = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            entry["categories"] = json!(self.categories);
        }
        let mut out = vec![entry];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.group.is_empty() && self.plural == "pods" {
            out.push(
                json!({"name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"]}),
            );
        }
        out
    }
}

/// Every type served, built-in and custom.
#[derive(Clone, Debug)]
pub struct Registry {
    types: Vec<ResourceType>,
    /// Bumped on every change: clients key their OpenAPI caches on it.
    generation: u64,
}

/// (group, version, kind, plural, namespaced, short names, status subresource)
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    bool,
);

const BUILTINS: &[Builtin] = &[
    ("", "v1", "Namespace", "namespaces", false, &["ns"], true),
    ("", "v1", "Pod", "pods", true, &["po"], true),
    ("", "v1", "Service", "services", true, &["svc"], true),
    ("", "v1", "Secret", "secrets", true, &[], false),
    ("", "v1", "ConfigMap", "configmaps", true, &["cm"], false),
    ("", "v1", "Event", "events", true, &["ev"], false),
    (
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        true,
        &["sa"],
        false,
    ),
    ("", "v1", "Node", "nodes", false, &["no"], true),
    (
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        true,
        &["ev"],
        false,
    ),
    (
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        false,
    ),
    (
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        &["deploy"],
        true,
    ),
    (
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        true,
        &["rs"],
        true,
    ),
    ("batch", "v1", "Job", "jobs", true, &[], true),
    (
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        &["pdb"],
        true,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        &[],
        false,
    ),
    (
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        false,
        &[],
        false,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        true,
    ),
];

/// The built-in kinds `kubectl get all` lists, as a real server puts them in category
/// `all`.
fn in_all(plural: &str) -> Vec<String> {
    const ALL: [&str; 5] = ["pods", "services", "deployments", "replicasets", "jobs"];
    if ALL.contains(&plural) {
        vec!["all".into()]
    } else {
        vec![]
    }
}

impl Registry {
    pub fn builtin() -> Self {
        let types = BUILTINS
            .iter()
            .map(
                |&(group, version, kind, plural, namespaced, short, status)| ResourceType {
                    group: group.into(),
                    version: version.into(),
                    kind: kind.into(),
                    plural: plural.into(),
                    singular: kind.to_lowercase(),
                    namespaced,
                    short_names: short.iter().map(|s| s.to_string()).collect(),
                    categories: in_all(plural),
                    status,
                    columns: vec![],
                    schema: None,
                    rules: None,
                },
            )
            .collect();
        Self {
            types,
            generation: 1,
        }
    }

    pub fn types(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.iter()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// The types a CustomResourceDefinition defines (one per served version).
    pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
        let spec = &crd["spec"];
        let text = |v: &Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("spec.{what} is required"))
        };
        let names = &spec["names"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let group = text(&spec["group"], "group")?;
        let plural = text(&names["plural"], "names.plural")?;
        let kind = text(&names["kind"], "names.kind")?;
        let namespaced = match spec["scope"].as_str() {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            other => {
                return Err(format!(
                    "spec.scope must be Namespaced or Cluster, not {other:?}"
                ));
            }
        };
        let expected = format!("{plural}.{group}");
        if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
            return Err(format!("metadata.name must be {expected}"));
        }
        let versions = spec["versions"]
            .as_array()
            .filter(|v| !v.is_empty())
            .ok_or("spec.versions must list at least one version")?;
        versions
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(false))
            .map(|v| {
                let schema = &v["schema"]["openAPIV3Schema"];
                let rules = Rules::compile(schema).map_err(|e| {
                    format!("spec.versions[{}].schema.openAPIV3Schema: {e}", v["name"])
                })?;
                Ok(ResourceType {
                    group: group.clone(),
                    version: v["name"].as_str().unwrap_or_default().to_owned(),
                    kind: kind.clone(),
                    plural: plural.clone(),
                    singular: names["singular"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| kind.to_lowercase()),
                    namespaced,
                    short_names: strings(&names["shortNames"]),
                    categories: strings(&names["categories"]),
                    status: v["subresources"]["status"].is_object(),
                    columns: v["additionalPrinterColumns"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    schema: Some(schema.clone()),
                    rules: Some(rules),
                })
            })
            .collect()
    }

    /// Serves a CRD's types, replacing what an earlier version of it served.
    pub fn register(&mut self, types: Vec<ResourceType>) {
        for t in &types {
            self.types
                .retain(|old| !(old.group == t.group && old.plural == t.plural));
        }
        self.types.extend(types);
        self.generation += 1;
    }

    pub fn unregister(&mut self, group: &str, plural: &str) {
        self.types
            .retain(|t| !(t.group == group && t.plural == plural));
        self.generation += 1;
    }

    /// `/apis`: every group but the legacy core one, with its versions.
    pub fn group_list(&self) -> Value {
        let mut groups: Vec<(String, Vec<String>)> = vec![];
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if !versions.contains(&t.version) => {
                    versions.push(t.version.clone())
                }
                Some(_) => {}
                None => groups.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(name, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                    .collect();
                json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `/api/v1` or `/apis/<group>/<version>`; `None` when nothing is served there.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let resources: Vec<Value> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(ResourceType::discovery)
            .collect();
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }
}
