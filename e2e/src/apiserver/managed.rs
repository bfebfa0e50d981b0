//! Field ownership, kept in `metadata.managedFields` as a real server keeps it, and
//! server-side apply on top of it.
//!
//! Every write has a field manager (`fieldManager`, else the client's User-Agent). An
//! update gives its manager the fields it changed and takes them from every other
//! manager. An apply makes its manager own exactly the fields of its configuration: it
//! may not change a field another manager owns unless it forces (409 naming the
//! conflicting fields and their managers otherwise; forcing takes them over), setting
//! a field to the value it already has shares it, and fields the manager applied before
//! but leaves out now are removed unless another manager still owns them. Items of keyed
//! lists and sets are owned one by one (see [`super::shape`]); other lists as a whole.
//!
//! Ownership is tracked per subresource: writes to `/status` own status fields, writes
//! to the main resource everything else. Fields a server sets (`uid`,
//! `resourceVersion`, ...) are nobody's.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::registry::ResourceType;
use super::shape::{ListType, Shape};
use super::store::Part;

/// A field path, one `fieldsV1` key a step: `f:<name>` a field, `k:<keys as JSON>` an
/// item of a keyed list, `v:<value as JSON>` an item of a set.
type Path = Vec<String>;

/// A set of owned fields. A path is a field whose value is owned whole, or an item of a
/// keyed list or set (the item's own fields follow it in the set's order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fields(BTreeSet<Path>);

/// Metadata the server sets, which no manager owns.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// What a write may touch: a status subresource write only `status`; a main resource
/// write everything else, and `status` too when the kind has no status subresource.
#[derive(Clone, Copy, Debug)]
struct Scope {
    part: Part,
    status_subresource: bool,
}

impl Scope {
    fn of(t: &ResourceType, part: Part) -> Self {
        Self {
            part,
            status_subresource: t.status,
        }
    }

    fn admits(self, top: &str) -> bool {
        match top {
            "apiVersion" | "kind" => false,
            "status" => self.part == Part::Status || !self.status_subresource,
            _ => self.part == Part::Main,
        }
    }

    fn subresource(self) -> &'static str {
        match self.part {
            Part::Main => "",
            Part::Status => "status",
        }
    }
}

impl Fields {
    /// The fields `object` sets within `scope`.
    fn of(object: &Value, shape: Shape<'_>, scope: Scope) -> Self {
        let mut out = BTreeSet::new();
        let mut path = vec![];
        for (top, value) in object.as_object().into_iter().flatten() {
            if !scope.admits(top) || value.is_null() {
                continue;
            }
            path.push(format!("f:{top}"));
            if top == "metadata" {
                for (name, v) in value.as_object().into_iter().flatten() {
                    if SERVER_METADATA.contains(&name.as_str()) || v.is_null() {
                        continue;
                    }
                    path.push(format!("f:{name}"));
                    collect(v, shape.field(top).field(name), &mut path, &mut out);
                    path.pop();
                }
            } else {
                collect(value, shape.field(top), &mut path, &mut out);
            }
            path.pop();
        }
        Self(out)
    }

    fn from_v1(v1: &Value) -> Self {
        fn walk(node: &Map<String, Value>, prefix: &mut Path, out: &mut BTreeSet<Path>) {
            for (step, child) in node {
                if step == "." {
                    out.insert(prefix.clone());
                    continue;
                }
                prefix.push(step.clone());
                match child.as_object() {
                    Some(c) if !c.is_empty() => walk(c, prefix, out),
                    _ => {
                        out.insert(prefix.clone());
                    }
                }
                prefix.pop();
            }
        }
        let mut out = BTreeSet::new();
        if let Some(root) = v1.as_object() {
            walk(root, &mut vec![], &mut out);
        }
        Self(out)
    }

    /// The `fieldsV1` form: nested steps, `{}` for an owned leaf, `".": {}` for an owned
    /// node that has owned fields under it.
    fn to_v1(&self) -> Value {
        let mut root = json!({});
        for path in &self.0 {
            let mut node = &mut root;
            for step in path {
                node = node
                    .as_object_mut()
                    .expect("nodes are objects")
                    .entry(step.clone())
                    .or_insert_with(|| json!({}));
            }
        }
        for path in &self.0 {
            if self.below(path).next().is_some() {
                let mut node = &mut root;
                for step in path {
                    node = &mut node[step.as_str()];
                }
                node["."] = json!({});
            }
        }
        root
    }

    /// Paths strictly below `path`.
    fn below<'s>(&'s self, path: &'s Path) -> impl Iterator<Item = &'s Path> + 's {
        self.0
            .range(path.clone()..)
            .skip_while(move |p| *p == path)
            .take_while(move |p| p.starts_with(path))
    }

    /// Whether `path` or anything below it is in the set.
    fn touches(&self, path: &Path) -> bool {
        self.0.contains(path) || self.below(path).next().is_some()
    }

    /// Removes `path` and everything below it; whether anything was there.
    fn remove_all(&mut self, path: &Path) -> bool {
        let gone: Vec<Path> = self
            .0
            .range(path.clone()..)
            .take_while(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in &gone {
            self.0.remove(p);
        }
        !gone.is_empty()
    }

    /// The paths with nothing owned below them: the values an apply sets.
    fn leaves(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().filter(|p| self.below(p).next().is_none())
    }
}

/// Adds the fields `value` sets (it sits at `path`) to `out`.
fn collect<'v>(value: &'v Value, shape: Shape<'v>, path: &mut Path, out: &mut BTreeSet<Path>) {
    match value {
        Value::Object(fields) if !fields.is_empty() && !shape.atomic_map() => {
            for (name, v) in fields {
                if v.is_null() {
                    continue;
                }
                path.push(format!("f:{name}"));
                collect(v, shape.field(name), path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match shape.list_type() {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map(keys) => {
                for item in items {
                    path.push(key_step(item, &keys));
                    out.insert(path.clone());
                    collect(item, shape.items(), path, out);
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The step naming `item` of a keyed list: `k:` and its key fields as JSON, sorted.
fn key_step(item: &Value, keys: &[&str]) -> String {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            item.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| format!("{}:{v}", Value::from(*k)))
        })
        .collect();
    format!("k:{{{}}}", parts.join(","))
}

/// A path as messages show it: `.spec.containers[name="trainer"].image`.
fn display(path: &Path) -> String {
    path.iter()
        .map(|step| {
            if let Some(name) = step.strip_prefix("f:") {
                format!(".{name}")
            } else if let Some(key) = step.strip_prefix("k:") {
                let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", parts.join(","))
            } else if let Some(value) = step.strip_prefix("v:") {
                format!("[={value}]")
            } else {
                step.clone()
            }
        })
        .collect()
}

/// One step down from `value` (with its shape) along `step`.
fn step_into<'v, 'p>(
    value: &'v Value,
    shape: Shape<'p>,
    step: &'p str,
) -> Option<(&'v Value, Shape<'p>)> {
    if let Some(name) = step.strip_prefix("f:") {
        return Some((value.get(name)?, shape.field(name)));
    }
    let items = value.as_array()?;
    let at = position(items, shape, step)?;
    Some((&items[at], shape.items()))
}

/// Where the item `step` names is in a list of the given shape.
fn position(items: &[Value], shape: Shape<'_>, step: &str) -> Option<usize> {
    match shape.list_type() {
        ListType::Map(keys) if step.starts_with("k:") => {
            items.iter().position(|i| key_step(i, &keys) == step)
        }
        _ => {
            let value: Value = serde_json::from_str(step.strip_prefix("v:")?).ok()?;
            items.iter().position(|i| *i == value)
        }
    }
}

/// The value at `path`, if the object has one there.
fn lookup<'v, 'p>(value: &'v Value, shape: Shape<'p>, path: &'p [String]) -> Option<&'v Value> {
    let (mut value, mut shape) = (value, shape);
    for step in path {
        (value, shape) = step_into(value, shape, step)?;
    }
    Some(value)
}

/// Removes the field or item at `path`; afterwards, containers above it that are left
/// empty and are not `kept` go too.
fn remove(object: &mut Value, shape: Shape<'_>, path: &Path, kept: &dyn Fn(&Path) -> bool) {
    for end in (1..=path.len()).rev() {
        let here = &path[..end];
        let (last, parents) = here.split_last().expect("not empty");
        if end < path.len() {
            let empty = lookup(object, shape, here).is_some_and(|v| {
                v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty)
            });
            if !empty || kept(&here.to_vec()) {
                return;
            }
        }
        let parent_shape = parents
            .iter()
            .fold(shape, |s, step| match step.strip_prefix("f:") {
                Some(field) => s.field(field),
                None => s.items(),
            });
        let Some(parent) = lookup_mut(object, shape, parents) else {
            return;
        };
        if let Some(name) = last.strip_prefix("f:") {
            parent.as_object_mut().map(|o| o.remove(name));
        } else if let Some(items) = parent.as_array_mut()
            && let Some(at) = position(items, parent_shape, last)
        {
            items.remove(at);
        }
    }
}

fn lookup_mut<'v>(
    value: &'v mut Value,
    shape: Shape<'_>,
    path: &[String],
) -> Option<&'v mut Value> {
    let (mut value, mut shape) = (value, shape);
    for step in path {
        if let Some(name) = step.strip_prefix("f:") {
            value = value.get_mut(name)?;
            shape = shape.field(name);
        } else {
            let at = position(value.as_array()?, shape, step)?;
            value = &mut value.as_array_mut()?[at];
            shape = shape.items();
        }
    }
    Some(value)
}

/// Merges an apply configuration into `target`: objects field by field, keyed lists item
/// by item, sets by value; everything else is replaced.
fn merge(target: &mut Value, config: &Value, shape: Shape<'_>) {
    match (target, config) {
        (Value::Object(fields), Value::Object(config)) if !shape.atomic_map() => {
            for (name, value) in config {
                match fields.get_mut(name) {
                    Some(existing) => merge(existing, value, shape.field(name)),
                    None => {
                        fields.insert(name.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(items), Value::Array(config)) => match shape.list_type() {
            ListType::Atomic => items.clone_from(config),
            ListType::Set => {
                for item in config {
                    if !items.contains(item) {
                        items.push(item.clone());
                    }
                }
            }
            ListType::Map(keys) => {
                for item in config {
                    let key = key_step(item, &keys);
                    match items.iter_mut().find(|i| key_step(i, &keys) == key) {
                        Some(existing) => merge(existing, item, shape.items()),
                        None => items.push(item.clone()),
                    }
                }
            }
        },
        (target, config) => *target = config.clone(),
    }
}

/// Drops `null`s, which an apply configuration means as "not set".
fn without_nulls(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.retain(|_, v| !v.is_null());
            fields.values_mut().for_each(without_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(without_nulls),
        _ => {}
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Apply,
    Update,
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: Operation,
    api_version: String,
    time: Option<String>,
    subresource: String,
    fields: Fields,
}

impl Entry {
    fn parse(v: &Value) -> Option<Self> {
        Some(Self {
            manager: v["manager"].as_str().filter(|m| !m.is_empty())?.to_owned(),
            operation: match v["operation"].as_str()? {
                "Apply" => Operation::Apply,
                _ => Operation::Update,
            },
            api_version: v["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: v["time"].as_str().map(str::to_owned),
            subresource: v["subresource"].as_str().unwrap_or_default().to_owned(),
            fields: Fields::from_v1(&v["fieldsV1"]),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": match self.operation {
                Operation::Apply => "Apply",
                Operation::Update => "Update",
            },
            "apiVersion": self.api_version,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_v1(),
        });
        if let Some(time) = &self.time {
            v["time"] = json!(time);
        }
        if !self.subresource.is_empty() {
            v["subresource"] = json!(self.subresource);
        }
        v
    }

    fn is(&self, manager: &str, operation: Operation, scope: Scope) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource == scope.subresource()
    }
}

fn entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Entry::parse)
        .collect()
}

fn store_entries(object: &mut Value, entries: &[Entry]) {
    let Some(meta) = object["metadata"].as_object_mut() else {
        return;
    };
    let kept: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.0.is_empty())
        .map(Entry::to_json)
        .collect();
    if kept.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(kept));
    }
}

/// Gives `manager`'s entry for `operation` (made if missing) `fields`, stamping the time
/// only when they change, so a repeated identical write changes nothing.
fn own(
    entries: &mut Vec<Entry>,
    manager: &str,
    operation: Operation,
    scope: Scope,
    api_version: &str,
    fields: Fields,
    now: &str,
) {
    match entries.iter_mut().find(|e| e.is(manager, operation, scope)) {
        Some(e) if e.fields == fields => {}
        Some(e) => {
            e.fields = fields;
            e.time = Some(now.to_owned());
            e.api_version = api_version.to_owned();
        }
        None => entries.push(Entry {
            manager: manager.to_owned(),
            operation,
            api_version: api_version.to_owned(),
            time: Some(now.to_owned()),
            subresource: scope.subresource().to_owned(),
            fields,
        }),
    }
}

/// Records in `new` (about to replace `live`, or to be created) what `manager`'s update
/// changed. Managed fields the request carries are taken as they are when they differ
/// from the stored ones (that is how a client resets or hands over ownership);
/// otherwise the stored ones are the base.
pub fn record_update(
    t: &ResourceType,
    part: Part,
    manager: &str,
    live: Option<&Value>,
    new: &mut Value,
    now: &str,
) {
    let scope = Scope::of(t, part);
    let shape = Shape::root(t.schema.as_ref());
    let sent = &new["metadata"]["managedFields"];
    let stored = live.map_or(&Value::Null, |l| &l["metadata"]["managedFields"]);
    let mut entries = if sent.as_array().is_some_and(|a| !a.is_empty()) && sent != stored {
        entries(new)
    } else {
        live.map(entries).unwrap_or_default()
    };
    let before = live
        .map(|l| Fields::of(l, shape, scope))
        .unwrap_or_default();
    let after = Fields::of(new, shape, scope);
    let empty = Value::Null;
    let changed: BTreeSet<Path> = after
        .0
        .iter()
        .filter(|p| {
            let was = lookup(live.unwrap_or(&empty), shape, p);
            let is = lookup(new, shape, p);
            !before.0.contains(*p) || (after.below(p).next().is_none() && was != is)
        })
        .cloned()
        .collect();
    for gone in before.0.difference(&after.0) {
        for e in &mut entries {
            e.fields.0.remove(gone);
        }
    }
    for e in entries
        .iter_mut()
        .filter(|e| !e.is(manager, Operation::Update, scope))
    {
        for p in &changed {
            e.fields.0.remove(p);
        }
    }
    if !changed.is_empty() {
        let mut mine = entries
            .iter()
            .find(|e| e.is(manager, Operation::Update, scope))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        mine.0.extend(changed);
        own(
            &mut entries,
            manager,
            Operation::Update,
            scope,
            &t.api_version(),
            mine,
            now,
        );
    }
    store_entries(new, &entries);
}

/// Who applies, to which object, and how.
pub struct Apply<'a> {
    pub name: &'a str,
    pub manager: &'a str,
    pub force: bool,
    pub now: &'a str,
}

/// A server-side apply of `config` by `manager` to `live` (or to nothing yet): the
/// object to store, with its managed fields, or 409 when it would change fields other
/// managers own and `force` is not set.
pub fn apply(
    t: &ResourceType,
    part: Part,
    apply: &Apply<'_>,
    live: Option<&Value>,
    mut config: Value,
) -> Result<Value, ApiError> {
    let scope = Scope::of(t, part);
    let shape = Shape::root(t.schema.as_ref());
    check_config(&config, apply.name)?;
    let explicit_rv = config["metadata"]["resourceVersion"].clone();
    without_nulls(&mut config);
    trim_to_scope(&mut config, scope);
    let applied = Fields::of(&config, shape, scope);
    let base = match live {
        Some(l) => l.clone(),
        None => json!({"apiVersion": config["apiVersion"], "kind": config["kind"],
            "metadata": {"name": apply.name}}),
    };
    let mut entries = entries(&base);
    let mine = |e: &Entry| e.is(apply.manager, Operation::Apply, scope);

    let conflicts = conflicts(&entries, &applied, &base, &config, shape, mine);
    if !conflicts.is_empty() && !apply.force {
        return Err(conflict_error(&entries, &conflicts));
    }
    for (i, path) in &conflicts {
        entries[*i].fields.remove_all(path);
    }

    let previous = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut object = base;
    merge(&mut object, &config, shape);
    remove_left_out(&mut object, shape, &previous, &applied, &entries, mine);
    own(
        &mut entries,
        apply.manager,
        Operation::Apply,
        scope,
        config["apiVersion"].as_str().unwrap_or_default(),
        applied,
        apply.now,
    );
    store_entries(&mut object, &entries);
    match explicit_rv {
        Value::String(rv) => object["metadata"]["resourceVersion"] = json!(rv),
        _ => {
            object["metadata"]
                .as_object_mut()
                .map(|m| m.remove("resourceVersion"));
        }
    }
    Ok(object)
}

/// 400 unless the configuration names its apiVersion and kind, and (if it names one)
/// the object on the URL.
fn check_config(config: &Value, name: &str) -> Result<(), ApiError> {
    for field in ["apiVersion", "kind"] {
        if !config[field].is_string() {
            return Err(ApiError::bad_request(format!(
                "invalid object: {field} is required in an apply configuration"
            )));
        }
    }
    if let Some(sent) = config["metadata"]["name"].as_str()
        && sent != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({sent}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

/// Cuts the configuration to what the write may touch: top-level fields outside `scope`
/// and the metadata the server sets go (a status apply keeps no metadata at all);
/// apiVersion and kind stay.
fn trim_to_scope(config: &mut Value, scope: Scope) {
    let Some(fields) = config.as_object_mut() else {
        return;
    };
    let kinds = (fields.remove("apiVersion"), fields.remove("kind"));
    fields.retain(|top, _| top == "metadata" || scope.admits(top));
    if let Some(meta) = fields.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
        if scope.part == Part::Status {
            meta.clear();
        }
    }
    if let (Some(v), Some(k)) = kinds {
        fields.insert("apiVersion".into(), v);
        fields.insert("kind".into(), k);
    }
}

/// The applied fields whose value would change that other managers own, each with the
/// index of the owner's entry. Setting a field to the value it already has is no
/// conflict: the field becomes shared.
fn conflicts(
    entries: &[Entry],
    applied: &Fields,
    base: &Value,
    config: &Value,
    shape: Shape<'_>,
    mine: impl Fn(&Entry) -> bool,
) -> Vec<(usize, Path)> {
    let mut conflicts = vec![];
    for path in applied.leaves() {
        let was = lookup(base, shape, path);
        if was.is_none() || was == lookup(config, shape, path) {
            continue;
        }
        for (i, e) in entries.iter().enumerate() {
            if !mine(e) && e.fields.touches(path) {
                conflicts.push((i, path.clone()));
            }
        }
    }
    conflicts
}

/// Removes from `object` the fields the manager applied before (`previous`) but leaves
/// out now, except where it still applies something under them or another manager owns
/// them.
fn remove_left_out(
    object: &mut Value,
    shape: Shape<'_>,
    previous: &Fields,
    applied: &Fields,
    entries: &[Entry],
    mine: impl Fn(&Entry) -> bool,
) {
    let owned_by_others = |p: &Path| entries.iter().any(|e| !mine(e) && e.fields.touches(p));
    for gone in previous.0.difference(&applied.0) {
        if !applied.touches(gone) && !owned_by_others(gone) {
            remove(object, shape, gone, &|p| {
                applied.touches(p) || owned_by_others(p)
            });
        }
    }
}

/// 409 as a real server words it: `Apply failed with 1 conflict: conflict with
/// "kubectl-patch" using starling.dev/v1alpha1: .spec.region`.
fn conflict_error(entries: &[Entry], conflicts: &[(usize, Path)]) -> ApiError {
    let mut by_manager: Vec<(usize, Vec<String>)> = vec![];
    for (i, path) in conflicts {
        match by_manager.iter_mut().find(|(m, _)| m == i) {
            Some((_, paths)) => paths.push(display(path)),
            None => by_manager.push((*i, vec![display(path)])),
        }
    }
    let who = |i: usize| {
        format!(
            "\"{}\" using {}",
            entries[i].manager, entries[i].api_version
        )
    };
    let parts: Vec<String> = by_manager
        .iter()
        .map(|(i, paths)| match paths.as_slice() {
            [one] => format!("conflict with {}: {one}", who(*i)),
            many => format!(
                "conflicts with {}:\n{}",
                who(*i),
                many.iter()
                    .map(|p| format!("- {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        })
        .collect();
    let n = conflicts.len();
    let message = format!(
        "Apply failed with {n} conflict{}: {}",
        if n == 1 { "" } else { "s" },
        parts.join("\n")
    );
    let causes = conflicts
        .iter()
        .map(|(i, path)| {
            json!({"type": "FieldManagerConflict", "message": format!("conflict with {}", who(*i)),
                "field": display(path)})
        })
        .collect();
    ApiError::field_manager_conflict(message, causes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::Registry;

    fn deployments() -> ResourceType {
        Registry::builtin()
            .find("apps", "v1", "deployments")
            .expect("built in")
            .clone()
    }

    fn apply_as(
        manager: &str,
        force: bool,
        live: Option<&Value>,
        config: Value,
    ) -> Result<Value, ApiError> {
        let how = Apply {
            name: "web",
            manager,
            force,
            now: "2026-01-01T00:00:00Z",
        };
        apply(&deployments(), Part::Main, &how, live, config)
    }

    fn deployment(spec: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": spec})
    }

    fn managers(object: &Value) -> Vec<(String, Value)> {
        entries(object)
            .iter()
            .map(|e| (e.manager.clone(), e.fields.to_v1()))
            .collect()
    }

    #[test]
    fn fields_v1_round_trips_and_marks_owned_items() {
        let object = deployment(json!({"replicas": 2, "template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "args": ["x"]}]}}}));
        let t = deployments();
        let fields = Fields::of(&object, Shape::root(None), Scope::of(&t, Part::Main));
        let v1 = fields.to_v1();
        assert_eq!(
            v1,
            json!({"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"a\"}": {".": {}, "f:args": {}, "f:image": {}, "f:name": {}}}}}}})
        );
        assert_eq!(Fields::from_v1(&v1), fields);
    }

    #[test]
    fn applies_conflict_unless_forced_and_share_equal_values() {
        let first = apply_as("a", false, None, deployment(json!({"replicas": 2}))).unwrap();
        // The same value is shared ...
        let shared =
            apply_as("b", false, Some(&first), deployment(json!({"replicas": 2}))).unwrap();
        assert_eq!(managers(&shared).len(), 2);
        // ... a different one conflicts with everyone who owns it ...
        let err = apply_as(
            "c",
            false,
            Some(&shared),
            deployment(json!({"replicas": 3})),
        )
        .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert_eq!(
            err.message,
            "Apply failed with 2 conflicts: conflict with \"a\" using apps/v1: .spec.replicas\n\
             conflict with \"b\" using apps/v1: .spec.replicas"
        );
        // ... and forcing takes it over.
        let forced =
            apply_as("c", true, Some(&shared), deployment(json!({"replicas": 3}))).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        assert_eq!(
            managers(&forced),
            [("c".to_owned(), json!({"f:spec": {"f:replicas": {}}}))]
        );
    }

    #[test]
    fn fields_left_out_are_removed_unless_someone_else_owns_them() {
        let containers = |names: &[&str]| {
            let list: Vec<Value> = names
                .iter()
                .map(|n| json!({"name": n, "image": format!("{n}:1")}))
                .collect();
            deployment(json!({"paused": true, "template": {"spec": {"containers": list}}}))
        };
        let a = apply_as("a", false, None, containers(&["x", "y"])).unwrap();
        let b = apply_as("b", false, Some(&a), containers(&["y", "z"])).unwrap();
        // a drops x (gone) and y (b still owns it) and `paused` (b owns it too).
        let a2 = apply_as("a", false, Some(&b), deployment(json!({"replicas": 1}))).unwrap();
        let names: Vec<&str> = a2["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["y", "z"]);
        assert_eq!(a2["spec"]["paused"], true);
        // Once b lets go too, the rest disappears, empty parents included.
        let b2 = apply_as("b", false, Some(&a2), deployment(json!({"replicas": 1}))).unwrap();
        assert_eq!(b2["spec"], json!({"replicas": 1}));
    }

    #[test]
    fn updates_take_the_fields_they_change_from_appliers() {
        let t = deployments();
        let applied = apply_as("op", false, None, deployment(json!({"replicas": 2}))).unwrap();
        let mut edited = applied.clone();
        edited["spec"]["replicas"] = json!(5);
        edited["metadata"]["labels"] = json!({"team": "ml"});
        record_update(
            &t,
            Part::Main,
            "kubectl-edit",
            Some(&applied),
            &mut edited,
            "t1",
        );
        assert_eq!(
            managers(&edited),
            [(
                "kubectl-edit".to_owned(),
                json!({"f:metadata": {"f:labels": {"f:team": {}}}, "f:spec": {"f:replicas": {}}})
            )]
        );
        let err = apply_as(
            "op",
            false,
            Some(&edited),
            deployment(json!({"replicas": 2})),
        )
        .unwrap_err();
        assert!(
            err.message.contains("conflict with \"kubectl-edit\""),
            "{}",
            err.message
        );
        // An identical write records nothing new.
        let mut again = edited.clone();
        record_update(
            &t,
            Part::Main,
            "kubectl-edit",
            Some(&edited),
            &mut again,
            "t2",
        );
        assert_eq!(again, edited);
    }
}
