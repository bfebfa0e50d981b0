//! How the lists and maps of an object merge, which strategic merge patches and
//! server-side apply both need: for a custom resource from its CRD's schema
//! (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, `x-kubernetes-map-type`),
//! for built-in kinds (and every object's metadata) from the list tags of the Kubernetes
//! API types Starling uses.

use serde_json::Value;

/// How a list is merged, and how its items are owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType<'a> {
    /// Replaced and owned as a whole.
    Atomic,
    /// A set of scalars: items merge by value (`metadata.finalizers`).
    Set,
    /// Items are identified by these key fields and merge field by field (containers by
    /// `name`, conditions by `type`, ...). The first key is the strategic merge key.
    Map(Vec<&'a str>),
}

/// Where in an object a value sits: its schema node (custom resources) and the field it
/// is in and the one around that (built-in kinds are described by field names: a
/// container's `ports` are keyed differently from a Service's).
#[derive(Clone, Copy, Debug)]
pub struct Shape<'a> {
    schema: Option<&'a Value>,
    field: &'a str,
    parent: &'a str,
}

impl<'a> Shape<'a> {
    /// The root of an object described by `schema` (a CRD's `openAPIV3Schema`), or of a
    /// built-in kind with `None`.
    pub fn root(schema: Option<&'a Value>) -> Self {
        Self {
            schema,
            field: "",
            parent: "",
        }
    }

    /// The value of field `name` of this object.
    pub fn field(self, name: &'a str) -> Self {
        let schema = self.schema.and_then(|s| {
            s["properties"]
                .get(name)
                .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
        });
        Self {
            schema,
            field: name,
            parent: self.field,
        }
    }

    /// An item of this list.
    pub fn items(self) -> Self {
        Self {
            schema: self.schema.and_then(|s| s.get("items")),
            ..self
        }
    }

    pub fn list_type(self) -> ListType<'a> {
        match self.schema {
            Some(s) => match s["x-kubernetes-list-type"].as_str() {
                Some("map") => ListType::Map(
                    s["x-kubernetes-list-map-keys"]
                        .as_array()
                        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default(),
                ),
                Some("set") => ListType::Set,
                _ => ListType::Atomic,
            },
            None => builtin_list(self.field, self.parent),
        }
    }

    /// Whether this object is replaced and owned as a whole rather than field by field.
    pub fn atomic_map(self) -> bool {
        self.schema.is_some_and(|s| {
            s["x-kubernetes-map-type"] == "atomic" || s["x-kubernetes-struct-type"] == "atomic"
        })
    }
}

/// The list types of the built-in fields Starling's kinds use (the `+listType` and
/// `patchMergeKey` tags of the Kubernetes API); every other list is atomic.
fn builtin_list(field: &str, parent: &str) -> ListType<'static> {
    match (field, parent) {
        ("finalizers", "metadata") => ListType::Set,
        ("ownerReferences", _) => ListType::Map(vec!["uid"]),
        ("containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets", _) => {
            ListType::Map(vec!["name"])
        }
        ("ports", "containers" | "initContainers") => {
            ListType::Map(vec!["containerPort", "protocol"])
        }
        ("ports", _) => ListType::Map(vec!["port", "protocol"]),
        ("volumeMounts", _) => ListType::Map(vec!["mountPath"]),
        ("conditions", _) => ListType::Map(vec!["type"]),
        _ => ListType::Atomic,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn built_in_lists_follow_the_kubernetes_tags() {
        let pod = Shape::root(None).field("spec");
        let containers = pod.field("containers");
        assert_eq!(containers.list_type(), ListType::Map(vec!["name"]));
        assert_eq!(
            containers.items().field("ports").list_type(),
            ListType::Map(vec!["containerPort", "protocol"])
        );
        assert_eq!(
            pod.field("ports").list_type(),
            ListType::Map(vec!["port", "protocol"])
        );
        assert_eq!(
            containers.items().field("args").list_type(),
            ListType::Atomic
        );
        let meta = Shape::root(None).field("metadata");
        assert_eq!(meta.field("finalizers").list_type(), ListType::Set);
        assert_eq!(pod.field("finalizers").list_type(), ListType::Atomic);
    }

    #[test]
    fn custom_lists_follow_the_schema_and_metadata_stays_built_in() {
        let schema = json!({"type": "object", "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {
            "peers": {"type": "array", "x-kubernetes-list-type": "map",
                      "x-kubernetes-list-map-keys": ["id"], "items": {"type": "object"}},
            "tags": {"type": "array", "x-kubernetes-list-type": "set"},
            "conditions": {"type": "array"},
            "selector": {"type": "object", "x-kubernetes-map-type": "atomic"},
        }}}});
        let spec = Shape::root(Some(&schema)).field("spec");
        assert_eq!(spec.field("peers").list_type(), ListType::Map(vec!["id"]));
        assert_eq!(spec.field("tags").list_type(), ListType::Set);
        // Without a list type a custom resource's list is atomic, whatever its name.
        assert_eq!(spec.field("conditions").list_type(), ListType::Atomic);
        assert!(spec.field("selector").atomic_map());
        let meta = Shape::root(Some(&schema)).field("metadata");
        assert_eq!(meta.field("finalizers").list_type(), ListType::Set);
    }
}
