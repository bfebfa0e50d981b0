//! Strategic merge patches (what `kubectl apply`, `kubectl patch` and Helm send for
//! built-in kinds): a JSON merge, except that keyed lists merge item by item (a container
//! patched by name keeps its siblings), sets (`finalizers`) take the union, and the
//! directives work: `$patch: delete` on an item, `$deleteFromPrimitiveList/<field>`,
//! `$setElementOrder/<field>` and `$retainKeys`.

use serde_json::{Map, Value};

use super::shape::{ListType, Shape};

const DELETE_FROM: &str = "$deleteFromPrimitiveList/";
const ELEMENT_ORDER: &str = "$setElementOrder/";

/// Applies `patch` to `target` with strategic-merge semantics; `shape` says how the
/// lists there merge.
pub fn merge(target: &mut Value, patch: &Value, shape: Shape<'_>) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let fields = target.as_object_mut().expect("made an object above");
    for (name, value) in patch {
        if name.starts_with('$') {
            continue; // directives, applied below
        }
        merge_field(fields, name, value, shape.field(name));
    }
    apply_directives(fields, patch, shape);
    fields.remove("$patch");
}

/// Merges the patch's `value` for field `name` into `fields`: null deletes it, keyed
/// lists and sets merge item by item, objects field by field, anything else replaces.
fn merge_field(fields: &mut Map<String, Value>, name: &str, value: &Value, field: Shape<'_>) {
    match (value, field.list_type()) {
        (Value::Null, _) => {
            fields.remove(name);
        }
        (Value::Array(items), ListType::Map(keys)) => {
            merge_keyed(list_at(fields, name), items, keys[0], field);
        }
        (Value::Array(items), ListType::Set) => {
            let list = list_at(fields, name);
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        (Value::Object(_), _) => merge(
            fields.entry(name.to_owned()).or_insert(Value::Null),
            value,
            field,
        ),
        _ => {
            fields.insert(name.to_owned(), value.clone());
        }
    }
}

/// Merges patch `items` into a keyed `list` by their `key`: an item with `$patch:
/// delete` removes its match, others merge into it, or are added when there is none.
fn merge_keyed(list: &mut Vec<Value>, items: &[Value], key: &str, field: Shape<'_>) {
    for item in items {
        let id = &item[key];
        let at = list.iter().position(|e| !id.is_null() && e[key] == *id);
        match (at, item.get("$patch").and_then(Value::as_str)) {
            (Some(i), Some("delete")) => {
                list.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), _) => merge(&mut list[i], item, field.items()),
            (None, _) => {
                let mut new = Value::Null;
                merge(&mut new, item, field.items());
                list.push(new);
            }
        }
    }
}

/// The patch's directives on `fields`: `$deleteFromPrimitiveList/<field>`,
/// `$setElementOrder/<field>` and `$retainKeys`.
fn apply_directives(fields: &mut Map<String, Value>, patch: &Map<String, Value>, shape: Shape<'_>) {
    for (directive, value) in patch {
        if let Some(name) = directive.strip_prefix(DELETE_FROM)
            && let (Some(list), Some(gone)) = (
                fields.get_mut(name).and_then(Value::as_array_mut),
                value.as_array(),
            )
        {
            list.retain(|item| !gone.contains(item));
        } else if let Some(name) = directive.strip_prefix(ELEMENT_ORDER)
            && let (Some(list), Some(order)) = (
                fields.get_mut(name).and_then(Value::as_array_mut),
                value.as_array(),
            )
        {
            let key = match shape.field(name).list_type() {
                ListType::Map(keys) => Some(keys[0]),
                _ => None,
            };
            reorder(list, order, key);
        } else if directive == "$retainKeys"
            && let Some(keep) = value.as_array()
        {
            fields.retain(|k, _| keep.iter().any(|r| r == k));
        }
    }
}

/// The list in field `name`, made one if it is missing or something else.
fn list_at<'a>(fields: &'a mut Map<String, Value>, name: &str) -> &'a mut Vec<Value> {
    let slot = fields
        .entry(name.to_owned())
        .or_insert(Value::Array(vec![]));
    if !slot.is_array() {
        *slot = Value::Array(vec![]);
    }
    slot.as_array_mut().expect("made a list above")
}

/// Puts the items `order` names first, in its order (by `key` for keyed lists, by
/// value otherwise); the rest keep their places after them.
fn reorder(list: &mut [Value], order: &[Value], key: Option<&str>) {
    let id = |item: &Value| match key {
        Some(k) => item[k].clone(),
        None => item.clone(),
    };
    let rank = |item: &Value| {
        order
            .iter()
            .position(|o| id(o) == id(item))
            .unwrap_or(order.len())
    };
    list.sort_by_key(rank); // stable: unnamed items keep their order
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patched(mut object: Value, patch: Value) -> Value {
        merge(&mut object, &patch, Shape::root(None));
        object
    }

    #[test]
    fn keyed_lists_merge_by_key_and_others_are_replaced() {
        let pod = json!({"spec": {
            "containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1",
                "env": [{"name": "X", "value": "1"}]}],
            "tolerations": [{"key": "k"}], "nodeName": "n"}});
        let pod = patched(
            pod,
            json!({"spec": {
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

    #[test]
    fn service_ports_merge_by_port_and_container_ports_by_container_port() {
        let object = json!({"spec": {
            "ports": [{"port": 80, "name": "http"}],
            "containers": [{"name": "a", "ports": [{"containerPort": 7070, "name": "grpc"}]}]}});
        let object = patched(
            object,
            json!({"spec": {"ports": [{"port": 443, "name": "https"}],
                "containers": [{"name": "a", "ports": [{"containerPort": 7070, "name": "x"}]}]}}),
        );
        assert_eq!(
            object,
            json!({"spec": {
            "ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
            "containers": [{"name": "a", "ports": [{"containerPort": 7070, "name": "x"}]}]}})
        );
    }

    #[test]
    fn finalizers_are_a_set_and_directives_work() {
        let object = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1"}},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "keep": 1, "drop": 2}});
        let object = patched(
            object,
            json!({"metadata": {"finalizers": ["c", "a"],
                "$deleteFromPrimitiveList/finalizers": ["b"]},
            "spec": {"containers": [{"name": "c"}],
                "$setElementOrder/containers": [{"name": "c"}, {"name": "b"}, {"name": "a"}],
                "$retainKeys": ["containers", "keep"]}}),
        );
        assert_eq!(
            object,
            json!({"metadata": {"finalizers": ["a", "c"], "labels": {"x": "1"}},
            "spec": {"containers": [{"name": "c"}, {"name": "b"}, {"name": "a"}], "keep": 1}})
        );
    }
}
