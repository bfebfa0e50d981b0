//! `Table` output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): what
//! `kubectl get` prints: a built-in kind's usual columns, a CRD's `additionalPrinterColumns`.

use serde_json::{Value, json};

use super::printers::{self, age};
use super::registry::ResourceType;

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `[0]` and
/// `[?(@.key=="value")]`. Returns the first match.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = object;
    let mut rest = path.trim();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            current = current.get(&after[..end])?;
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let inner = &after[..end];
            rest = &after[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (key, value) = filter.split_once("==")?;
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                current = current
                    .as_array()?
                    .iter()
                    .find(|item| item.get(key.trim()).and_then(Value::as_str) == Some(value))?;
            } else {
                current = current.get(inner.parse::<usize>().ok()?)?;
            }
        } else {
            return None;
        }
    }
    Some(current)
}

fn cell(value: Option<&Value>, column_type: &str) -> Value {
    match (value, column_type) {
        (None | Some(Value::Null), _) => Value::Null,
        (Some(Value::String(s)), "date") => json!(age(s)),
        (Some(v), _) => v.clone(),
    }
}

/// What each row carries besides its cells (`includeObject`): nothing, the object's
/// metadata (the default), or the whole object (kubectl asks for it to `--sort-by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn from_query(value: Option<&str>) -> Self {
        match value {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }

    fn row_object(self, o: &Value) -> Value {
        match self {
            Include::None => Value::Null,
            Include::Metadata => json!({"kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}),
            Include::Object => o.clone(),
        }
    }
}

type Cell = Box<dyn Fn(&Value) -> Value>;

fn definition(name: &str, kind: &str, priority: i64, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": description,
        "priority": priority})
}

/// A custom resource's columns: Name, its CRD's printer columns, and Age unless they
/// already show it.
fn crd_columns(t: &ResourceType) -> Vec<(Value, Cell)> {
    let mut columns: Vec<(Value, Cell)> = vec![(
        definition(
            "Name",
            "string",
            0,
            "Name must be unique within a namespace.",
        ),
        Box::new(|o: &Value| o["metadata"]["name"].clone()),
    )];
    for c in &t.columns {
        let column_type = c["type"].as_str().unwrap_or("string").to_owned();
        let mut def = definition(
            c["name"].as_str().unwrap_or_default(),
            &column_type,
            c["priority"].as_i64().unwrap_or(0),
            c["description"].as_str().unwrap_or(""),
        );
        def["format"] = json!(c["format"].as_str().unwrap_or(""));
        let path = c["jsonPath"].as_str().unwrap_or("").to_owned();
        columns.push((
            def,
            Box::new(move |o: &Value| cell(json_path(o, &path), &column_type)),
        ));
    }
    if !t.columns.iter().any(|c| c["name"] == "Age") {
        columns.push((
            definition("Age", "date", 0, "Time since the object was created."),
            Box::new(|o: &Value| cell(o["metadata"].get("creationTimestamp"), "date")),
        ));
    }
    columns
}

/// The objects as a Table, with a built-in kind's usual columns (see [`printers`]) or a
/// custom resource's printer columns.
pub fn table(
    t: &ResourceType,
    objects: &[Value],
    resource_version: u64,
    include: Include,
) -> Value {
    let columns: Vec<(Value, Cell)> = match printers::columns(&t.group, &t.kind) {
        Some(builtin) => builtin
            .into_iter()
            .map(|c| {
                let def = definition(c.name, c.kind, c.priority, "");
                (def, Box::new(c.value) as Cell)
            })
            .collect(),
        None => crd_columns(t),
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = columns.iter().map(|(_, cell)| cell(o)).collect();
            json!({"cells": cells, "object": include.row_object(o)})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_follows_fields_indices_and_filters() {
        let o = json!({"status": {"phase": "Training", "conditions": [
            {"type": "Progressing", "status": "True"}, {"type": "Ready", "status": "False"}]}});
        assert_eq!(json_path(&o, ".status.phase"), Some(&json!("Training")));
        assert_eq!(
            json_path(&o, ".status.conditions[1].type"),
            Some(&json!("Ready"))
        );
        assert_eq!(
            json_path(&o, r#".status.conditions[?(@.type=="Ready")].status"#),
            Some(&json!("False"))
        );
        assert_eq!(json_path(&o, ".status.round"), None);
    }
}
