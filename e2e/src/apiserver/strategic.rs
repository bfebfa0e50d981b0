//! Strategic merge patches (what `kubectl apply` and Helm send for built-in kinds): a
//! JSON merge, except that lists with a merge key are merged element by element — a
//! container patched by name keeps its siblings — and `$patch: delete` removes one.

use serde_json::{Map, Value};

/// The merge key of the lists Starling's kinds have (as in the Kubernetes API's
/// `patchMergeKey` tags).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => "name",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Applies `patch` to `target` with strategic-merge semantics.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let fields = target.as_object_mut().expect("made an object above");
    for (name, value) in patch {
        match (value, merge_key(name)) {
            (Value::Null, _) => {
                fields.remove(name);
            }
            (Value::Array(items), Some(key)) if fields.get(name).is_some_and(Value::is_array) => {
                let list = fields
                    .get_mut(name)
                    .and_then(Value::as_array_mut)
                    .expect("checked");
                for item in items {
                    let id = &item[key];
                    let at = list.iter().position(|e| !id.is_null() && e[key] == *id);
                    match (at, item.get("$patch").and_then(Value::as_str)) {
                        (Some(i), Some("delete")) => {
                            list.remove(i);
                        }
                        (None, Some("delete")) => {}
                        (Some(i), _) => merge(&mut list[i], item),
                        (None, _) => {
                            let mut new = Value::Null;
                            merge(&mut new, item);
                            list.push(new);
                        }
                    }
                }
            }
            (Value::Object(_), _) => {
                merge(fields.entry(name.clone()).or_insert(Value::Null), value)
            }
            _ => {
                fields.insert(name.clone(), value.clone());
            }
        }
    }
    fields.remove("$patch");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keyed_lists_merge_by_key_and_others_are_replaced() {
        let mut pod = json!({"spec": {
            "containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1",
                "env": [{"name": "X", "value": "1"}]}],
            "tolerations": [{"key": "k"}], "nodeName": "n"}});
        merge(
            &mut pod,
            &json!({"spec": {
            "containers": [{"name": "b", "image": "b:2", "env": [{"name": "Y", "value": "2"}]},
                           {"name": "c", "image": "c:1"}, {"name": "a", "$patch": "delete"}],
            "tolerations": [{"key": "other"}], "nodeName": null}}),
        );
        assert_eq!(
            pod,
            json!({"spec": {
            "containers": [{"name": "b", "image": "b:2",
                "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "c", "image": "c:1"}],
            "tolerations": [{"key": "other"}]}})
        );
    }
}
