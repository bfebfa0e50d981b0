//! Admission of custom resources against their CRD's structural schema, as a real server
//! does it: unknown fields pruned, defaults applied, then types, enums, ranges, lengths,
//! patterns and required fields checked, every problem reported with its field path;
//! then the schema's CEL rules (`x-kubernetes-validations`), transition rules against the
//! stored object.

use kube::core::cel::Validator;
use serde_json::{Map, Value};

use super::registry::Rules;

/// A problem with one field: its path and what is wrong.
pub type Cause = (String, String);

/// What admission found.
#[derive(Debug, Default, PartialEq)]
pub struct Admission {
    /// Invalid fields.
    pub causes: Vec<Cause>,
    /// Unknown fields that were dropped (an error under `fieldValidation=Strict`).
    pub pruned: Vec<String>,
}

/// Drops the fields of `fields` that `keep` refuses, noting their paths.
fn prune(
    fields: &mut Map<String, Value>,
    path: &str,
    out: &mut Admission,
    keep: impl Fn(&str) -> bool,
) {
    fields.retain(|k, _| {
        let kept = keep(k);
        if !kept {
            out.pruned.push(join(path, k));
        }
        kept
    });
}

/// Prunes, defaults and validates `object` against `schema` (a CRD's
/// `openAPIV3Schema`). `apiVersion`, `kind` and `metadata` are the server's business and
/// left alone.
pub fn admit(schema: &Value, object: &mut Value) -> Admission {
    let mut out = Admission::default();
    let Some(fields) = object.as_object_mut() else {
        out.causes.push((String::new(), "must be an object".into()));
        return out;
    };
    let properties = schema["properties"].as_object();
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    prune(fields, "", &mut out, |k| {
        matches!(k, "apiVersion" | "kind" | "metadata")
            || preserve
            || properties.is_some_and(|p| p.contains_key(k))
    });
    if let Some(properties) = properties {
        for (name, sub) in properties {
            if matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            visit_field(fields, name, sub, name, &mut out);
        }
        required(schema, fields, "", &mut out);
    }
    out
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Defaults a missing (or null, non-nullable) field, then visits it.
fn visit_field(
    fields: &mut Map<String, Value>,
    name: &str,
    schema: &Value,
    path: &str,
    out: &mut Admission,
) {
    let nullable = schema["nullable"] == true;
    if fields.get(name).is_some_and(|v| v.is_null() && !nullable) {
        fields.remove(name);
    }
    if !fields.contains_key(name)
        && let Some(default) = schema.get("default")
    {
        fields.insert(name.to_owned(), default.clone());
    }
    if let Some(value) = fields.get_mut(name) {
        visit(schema, value, path, out);
    }
}

fn required(schema: &Value, fields: &Map<String, Value>, path: &str, out: &mut Admission) {
    for name in schema["required"].as_array().into_iter().flatten() {
        if let Some(name) = name.as_str()
            && !fields.contains_key(name)
        {
            out.causes.push((join(path, name), "Required value".into()));
        }
    }
}

fn type_error(path: &str, value: &Value, expected: &str) -> Cause {
    (
        path.to_owned(),
        format!(
            "Invalid value: {value}: {path} in body must be of type {expected}: \"{}\"",
            kind(value)
        ),
    )
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Prunes, defaults and checks `value`, at `path`, against its schema node `schema`.
fn visit(schema: &Value, value: &mut Value, path: &str, out: &mut Admission) {
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            out.causes
                .push(type_error(path, value, "integer or string"));
        }
        return;
    }
    match schema["type"].as_str() {
        Some("object") => visit_object(schema, value, path, out),
        Some("array") => visit_array(schema, value, path, out),
        Some("string") => visit_string(schema, value, path, out),
        Some(t @ ("integer" | "number")) => visit_number(schema, value, t, path, out),
        Some("boolean") if !value.is_boolean() => {
            out.causes.push(type_error(path, value, "boolean"))
        }
        _ => check_enum(schema, value, path, out),
    }
}

/// An object: its declared properties visited and the rest pruned (unless the schema
/// preserves unknown fields), or, for a map, every entry against `additionalProperties`;
/// then its required fields checked.
fn visit_object(schema: &Value, value: &mut Value, path: &str, out: &mut Admission) {
    let Some(fields) = value.as_object_mut() else {
        out.causes.push(type_error(path, value, "object"));
        return;
    };
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    if let Some(properties) = schema["properties"].as_object() {
        if !preserve {
            prune(fields, path, out, |k| properties.contains_key(k));
        }
        for (name, sub) in properties {
            visit_field(fields, name, sub, &join(path, name), out);
        }
    } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        for (name, v) in fields.iter_mut() {
            visit(additional, v, &join(path, name), out);
        }
    } else if !preserve {
        prune(fields, path, out, |_| false);
    }
    required(schema, fields, path, out);
}

/// A list: its length against `minItems`/`maxItems`, then every item against `items`.
fn visit_array(schema: &Value, value: &mut Value, path: &str, out: &mut Admission) {
    let Some(items) = value.as_array_mut() else {
        out.causes.push(type_error(path, value, "array"));
        return;
    };
    let n = items.len() as u64;
    if let Some(min) = schema["minItems"].as_u64().filter(|m| n < *m) {
        out.causes.push((
            path.into(),
            format!("Invalid value: {n}: must have at least {min} items"),
        ));
    }
    if let Some(max) = schema["maxItems"].as_u64().filter(|m| n > *m) {
        out.causes.push((
            path.into(),
            format!("Too many: {n}: must have at most {max} items"),
        ));
    }
    for (i, item) in items.iter_mut().enumerate() {
        visit(&schema["items"], item, &format!("{path}[{i}]"), out);
    }
}

/// A string: its length (in characters) against `minLength`/`maxLength`, its `pattern`
/// and its `enum`.
fn visit_string(schema: &Value, value: &Value, path: &str, out: &mut Admission) {
    let Some(s) = value.as_str() else {
        out.causes.push(type_error(path, value, "string"));
        return;
    };
    let len = s.chars().count() as u64;
    if let Some(min) = schema["minLength"].as_u64().filter(|m| len < *m) {
        out.causes.push((
            path.into(),
            format!("Invalid value: \"{s}\": {path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = schema["maxLength"].as_u64().filter(|m| len > *m) {
        out.causes.push((
            path.into(),
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(pattern) = schema["pattern"].as_str()
        && regex::Regex::new(pattern).is_ok_and(|re| !re.is_match(s))
    {
        out.causes.push((
            path.into(),
            format!("Invalid value: \"{s}\": {path} in body should match '{pattern}'"),
        ));
    }
    check_enum(schema, value, path, out);
}

/// A number of type `t` (`integer` or `number`): its type, its range and its `enum`.
fn visit_number(schema: &Value, value: &Value, t: &str, path: &str, out: &mut Admission) {
    let ok = if t == "integer" {
        value.is_i64() || value.is_u64()
    } else {
        value.is_number()
    };
    if !ok {
        out.causes.push(type_error(path, value, t));
        return;
    }
    check_bound(schema, value, &MINIMUM, path, out);
    check_bound(schema, value, &MAXIMUM, path, out);
    check_enum(schema, value, path, out);
}

/// One end of a numeric range: its schema keywords, which side of the limit is out of
/// it, and how a real server words what it wants.
struct Bound {
    limit: &'static str,
    exclusive: &'static str,
    beyond: fn(f64, f64) -> bool,
    inclusive_op: &'static str,
    exclusive_op: &'static str,
}

const MINIMUM: Bound = Bound {
    limit: "minimum",
    exclusive: "exclusiveMinimum",
    beyond: |x, limit| x < limit,
    inclusive_op: "greater than or equal to",
    exclusive_op: "greater than",
};

const MAXIMUM: Bound = Bound {
    limit: "maximum",
    exclusive: "exclusiveMaximum",
    beyond: |x, limit| x > limit,
    inclusive_op: "less than or equal to",
    exclusive_op: "less than",
};

/// A number against one end of its range (`minimum`, or `maximum`), honouring the
/// schema's `exclusiveMinimum`/`exclusiveMaximum`.
fn check_bound(schema: &Value, value: &Value, bound: &Bound, path: &str, out: &mut Admission) {
    let x = value.as_f64().unwrap_or_default();
    let exclusive = schema[bound.exclusive] == true;
    if let Some(limit) = schema[bound.limit].as_f64()
        && ((bound.beyond)(x, limit) || (exclusive && x == limit))
    {
        let op = if exclusive {
            bound.exclusive_op
        } else {
            bound.inclusive_op
        };
        out.causes.push((
            path.into(),
            format!("Invalid value: {value}: {path} in body should be {op} {limit}"),
        ));
    }
}

fn check_enum(schema: &Value, value: &Value, path: &str, out: &mut Admission) {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        out.causes.push((
            path.into(),
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
}

/// The CEL rules `object` breaks (`old` is what is stored, for transition rules), as
/// causes worded like a real server's: `spec: Invalid value: "object": <message>`.
pub fn check_rules(rules: &Rules, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    thread_local! {
        // Registering the Kubernetes CEL library is not free; once per thread will do.
        static VALIDATOR: Validator = Validator::new();
    }
    let result = VALIDATOR.with(|v| v.validate_compiled(&rules.0, object, old));
    let Err(errors) = result else {
        return vec![];
    };
    errors
        .iter()
        .map(|e| {
            let at = e
                .field_path
                .split('.')
                .filter(|s| !s.is_empty())
                .try_fold(object, |v, step| v.get(step));
            let kind = match at {
                Some(Value::String(_)) => "string",
                Some(Value::Number(_)) => "number",
                Some(Value::Bool(_)) => "boolean",
                Some(Value::Array(_)) => "array",
                _ => "object",
            };
            (
                e.field_path.clone(),
                format!("Invalid value: \"{kind}\": {}", e.message),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["peers"], "properties": {
                "peers": {"type": "integer", "minimum": 1, "maximum": 64},
                "bits": {"type": "integer", "enum": [2, 4, 8], "default": 2},
                "name": {"type": "string", "pattern": "^p[0-9]+$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "size": {"x-kubernetes-int-or-string": true},
                "list": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "density": {"type": "number", "exclusiveMinimum": true, "minimum": 0.0, "nullable": true},
            }},
            "status": {"type": "object", "properties": {"round": {"type": "integer"}}},
        }})
    }

    #[test]
    fn unknown_fields_are_pruned_and_defaults_applied() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
            "spec": {"peers": 3, "extra": 1, "labels": {"a": "b"}, "free": {"any": [1]},
                     "size": "10Gi", "density": null},
            "junk": true});
        let admission = admit(&schema(), &mut o);
        assert_eq!(admission.causes, vec![]);
        assert_eq!(admission.pruned, ["junk", "spec.extra"]);
        assert_eq!(o["spec"]["bits"], 2);
        assert!(o["spec"].get("extra").is_none() && o.get("junk").is_none());
        assert_eq!(o["spec"]["free"]["any"], json!([1]));
        assert_eq!(o["metadata"]["name"], "a");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut o = json!({"spec": {"bits": 3, "peers": 0, "name": "q1", "labels": {"a": 1},
            "size": 1.5, "list": ["a", "b", "c"], "density": 0.0}});
        let causes = admit(&schema(), &mut o).causes;
        let mut fields: Vec<&str> = causes.iter().map(|(f, _)| f.as_str()).collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "spec.bits",
                "spec.density",
                "spec.labels.a",
                "spec.list",
                "spec.name",
                "spec.peers",
                "spec.size"
            ],
            "{causes:?}"
        );
        let bits = causes.iter().find(|(f, _)| f == "spec.bits").unwrap();
        assert!(bits.1.starts_with("Unsupported value: 3"), "{causes:?}");
        let mut missing = json!({"spec": {}});
        assert_eq!(
            admit(&schema(), &mut missing).causes,
            vec![("spec.peers".into(), "Required value".into())]
        );
    }
}
