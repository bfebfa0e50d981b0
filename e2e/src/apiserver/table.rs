//! `Table` output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): what
//! `kubectl get` prints, from a CRD's `additionalPrinterColumns`.

use serde_json::{Value, json};

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

/// `5s`, `3m`, `2h`, `4d`: how kubectl shows a timestamp's age.
fn age(timestamp: &str) -> String {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return "<invalid>".into();
    };
    let secs = (chrono::Utc::now() - then.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cell(value: Option<&Value>, column_type: &str) -> Value {
    match (value, column_type) {
        (None | Some(Value::Null), _) => Value::Null,
        (Some(Value::String(s)), "date") => json!(age(s)),
        (Some(v), _) => v.clone(),
    }
}

/// The objects as a Table: Name, the type's printer columns, and Age unless the columns
/// already show it.
pub fn table(t: &ResourceType, objects: &[Value], resource_version: u64) -> Value {
    let mut columns = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    let mut paths = vec![(".metadata.name".to_owned(), "string".to_owned())];
    for c in &t.columns {
        let column_type = c["type"].as_str().unwrap_or("string").to_owned();
        columns.push(json!({
            "name": c["name"], "type": column_type, "format": c["format"].as_str().unwrap_or(""),
            "description": c["description"].as_str().unwrap_or(""),
            "priority": c["priority"].as_i64().unwrap_or(0),
        }));
        paths.push((c["jsonPath"].as_str().unwrap_or("").to_owned(), column_type));
    }
    if !t.columns.iter().any(|c| c["name"] == "Age") {
        columns.push(json!({"name": "Age", "type": "date", "format": "",
            "description": "Time since the object was created.", "priority": 0}));
        paths.push((".metadata.creationTimestamp".into(), "date".into()));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = paths
                .iter()
                .map(|(path, column_type)| cell(json_path(o, path), column_type))
                .collect();
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": o["metadata"]},
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns,
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
